"""Where a variant's bytecode goes: opcodes executed per request, by part and by function.

Run: `.venv/bin/python -m benchmarks.opcodes [--variants guard floor bare] [--top 25]`. Each
variant of benchmarks/apps.py answers benchmarks/cpu.py's request in-process, as
`benchmarks.instructions --quick` drives it, under `sys.settrace` with opcode events: every
bytecode the interpreter executes for a request is counted once, against the function it runs
in. The request path's counts are exact and the same on every run and machine (no valgrind,
no timer; only the log writer's background flushes, which a clock also starts, can move the
`asyncio` and request-log rows a little), so a change's effect reads off one run, where
callgrind's totals move by a few hundred instructions with memory layout alone.

Opcodes are not instructions: one that calls into C (a dict lookup, `bytes.translate`, xxhash)
counts once whatever the C costs. Over this project's request path the interpreter's own work
is most of the cost (callgrind puts most of the guard's instructions in the eval loop, frames
and allocation), so the opcode count is the map of what a change can save, and the callgrind
figures of `benchmarks.instructions` remain the measure.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from types import FrameType
from typing import Any

from benchmarks.apps import FACTORIES
from benchmarks.cpu import per_request_us

#: The part of the request path each of our modules belongs to; anything else is named by
#: its package (starlette, asyncio, the benchmark's own loop).
PARTS = {
    "middleware/context.py": "runner",
    "middleware/steps.py": "runner",
    "middleware/guard.py": "runner",
    "middleware/fingerprint.py": "fingerprint",
    "core/headers.py": "fingerprint",
    "core/clientip.py": "fingerprint",
    "middleware/apikeys.py": "api keys",
    "middleware/botdetection.py": "bots",
    "middleware/botverify.py": "bots",
    "core/useragent.py": "bots",
    "middleware/ratelimit.py": "rate limits",
    "middleware/rules.py": "rate limits",
    "core/limits.py": "rate limits",
    "core/estimates.py": "rate limits",
    "stores/base.py": "stores (shared types)",
    "stores/memory.py": "rate limits",
    "middleware/body.py": "request body",
    "middleware/validation.py": "request body",
    "core/bodycheck.py": "request body",
    "middleware/logger.py": "request log",
    "middleware/logwriter.py": "request log",
    "core/streamusage.py": "request log",
}


def part_of(module: str) -> str:
    """The part a function belongs to, by the module whose globals it runs with (a
    dataclass's generated `__init__` has no file of its own, but its class's module)."""
    package, _, rest = module.partition(".")
    if package == "convex_guard":
        return PARTS.get(rest.replace(".", "/") + ".py", "convex_guard (other)")
    if package in ("starlette", "asyncio", "benchmarks"):
        return package
    return "other"


#: A function as counted: its module, where it is (file and first line), its name.
Where = tuple[str, str, str]


def where(frame: FrameType) -> Where:
    """The function `frame` runs, as the table names it: a generated function (a dataclass's
    `__init__`, which has no file) by its module and its instance's class."""
    code = frame.f_code
    module: str = frame.f_globals.get("__name__", "?")
    name = code.co_name
    if code.co_filename.startswith("<"):
        owner = frame.f_locals.get("self")
        if owner is not None:
            name = f"{type(owner).__name__}.{name}"
        return module, f"{module}:{code.co_firstlineno}", name
    place = "/".join(code.co_filename.replace("\\", "/").rsplit("/", 2)[-2:])
    return module, f"{place}:{code.co_firstlineno}", name


def count(variant: str, requests: int) -> Counter[Where]:
    """Opcodes per function over `requests` requests, after a warm-up."""
    app = FACTORIES[variant]()
    counts: Counter[Where] = Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        # A frame's start (or a coroutine's resumption): its function is named once, and its
        # own tracer counts each opcode against that name.
        frame.f_trace_opcodes = True
        key = where(frame)

        def opcodes(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[key] += 1
            return opcodes

        return opcodes

    async def run() -> None:
        await per_request_us(app, max(requests // 10, 1))
        sys.settrace(tracer)
        try:
            await per_request_us(app, requests)
        finally:
            sys.settrace(None)

    asyncio.run(run())
    return counts


def table(variants: list[str], requests: int, top: int) -> str:
    measured = {name: count(name, requests) for name in variants}
    lines = [
        f"opcodes executed per request, in-process ({requests} requests after a warm-up)",
        "",
    ]
    parts: dict[str, Counter[str]] = {}
    for name, counts in measured.items():
        by_part: Counter[str] = Counter()
        for (module, _, _), c in counts.items():
            by_part[part_of(module)] += c
        parts[name] = by_part
    names = sorted({p for by in parts.values() for p in by}, key=lambda p: -parts[variants[0]][p])
    lines.append(f"{'part':24}" + "".join(f"{v:>12}" for v in variants))
    for part in names:
        row = "".join(f"{parts[v][part] / requests:12.1f}" for v in variants)
        lines.append(f"{part:24}{row}")
    totals = "".join(f"{sum(parts[v].values()) / requests:12.1f}" for v in variants)
    lines.append(f"{'total':24}{totals}")
    if top > 0:
        for name in variants:
            counts = measured[name]
            lines += ["", f"{name}: the {top} functions with the most opcodes per request"]
            for (_, place, function), c in counts.most_common(top):
                lines.append(f"{c / requests:9.1f}  {place} {function}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", nargs="+", default=["guard", "floor", "bare"])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in FACTORIES]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {sorted(FACTORIES)}")
    print(table(args.variants, args.requests, args.top))


if __name__ == "__main__":
    main()
