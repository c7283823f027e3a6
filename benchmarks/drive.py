"""One variant's ASGI app answering requests in-process, as `benchmarks.instructions` counts it.

`python -m benchmarks.drive VARIANT REQUESTS [--apps FILE]` builds the variant from
benchmarks/apps.py and calls it REQUESTS times with benchmarks/cpu.py's request and loop: no
server and no socket, so callgrind counts what the app and its middlewares execute.

A tenth of REQUESTS is served first, to warm caches and lazy starts; then `os.getppid()`
marks where the measured requests begin and end. Under `valgrind --tool=callgrind
--dump-before=getppid` each mark writes a dump of the counts since the last one, so the second
dump holds exactly the REQUESTS requests: no start-up, no shutdown, one process per figure.

`--apps` names another tree's benchmarks/apps.py (a baseline revision's, run with that tree's
`src` first on PYTHONPATH). It stands in for this tree's `benchmarks.apps`, so that the other
tree's app is driven by this tree's loop: whatever that revision's benchmarks looked like, both
trees are measured by the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys

import benchmarks


def use_apps(path: str) -> None:
    """Load `path` as `benchmarks.apps`, before anything here imports this tree's."""
    spec = importlib.util.spec_from_file_location("benchmarks.apps", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks.apps"] = module
    benchmarks.apps = module  # as an import of the submodule would have set it
    spec.loader.exec_module(module)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant")
    parser.add_argument("requests", type=int)
    parser.add_argument("--apps", help="another tree's benchmarks/apps.py")
    args = parser.parse_args(argv)
    if args.apps:
        use_apps(args.apps)
    # Imported only now: benchmarks.cpu imports benchmarks.apps, which may be the other tree's.
    from benchmarks.apps import FACTORIES
    from benchmarks.cpu import per_request_us

    app = FACTORIES[args.variant]()

    async def run() -> None:
        await per_request_us(app, max(args.requests // 10, 1))
        os.getppid()  # the mark: callgrind dumps start-up and warm-up here
        await per_request_us(app, args.requests)
        os.getppid()  # and the measured requests here

    asyncio.run(run())


if __name__ == "__main__":
    main()
