"""The sans-IO core: limits, client addresses, fingerprints, user agents, keys and problems.

Nothing here awaits, opens a socket or reads a store: the middlewares and the stores are thin
adapters around these functions, so every decision can be tested as plain data in, data out.
"""
