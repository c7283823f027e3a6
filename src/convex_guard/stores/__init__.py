"""Stores: the capabilities the middlewares need (`base`), and the stores that have them.

`MemoryStore` (one process), `ConvexStore` (a self-hosted Convex deployment shared by every
instance), `ResilientStore` (a store's calls bounded, with a breaker and a local fallback).
A store of your own implements the capabilities its middlewares use and runs the contract
suite in `convex_guard.stores.testing`.
"""
