"""`python -m bench [SCENARIO ...] [--rounds N] [--duration S] [--quick] [--list]` (`make bench`).

Starts a private redis-server on a free port, runs the chosen scenarios (all by
default) one after another, and prints one table per kind of result (admission
scenarios, HTTP scenarios).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import time
from typing import Any

from bench import MODULES, REGISTRY, Context, idle_polling, redis_server, render


def main(argv: list[str] | None = None) -> int:
    for module in MODULES:
        importlib.import_module(module)  # registers its scenarios
    names = list(REGISTRY.scenarios)
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"which to run (default: all of {', '.join(names)})",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case")
    parser.add_argument(
        "--duration",
        type=int,
        default=5,
        help="seconds of load per timed round of the HTTP scenarios",
    )
    parser.add_argument(
        "--quick", action="store_true", help="few operations, short rounds: a smoke run"
    )
    parser.add_argument(
        "--idle-poll",
        action="store_true",
        help="idle CPUs poll instead of halting for the run (/dev/cpu_dma_latency held at 0; "
        "root): what a machine tuned for latency does",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [n for n in args.scenarios if n not in REGISTRY.scenarios]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {names}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.duration < 1:
        parser.error("--duration must be at least 1 (whole seconds: wrk takes no fractions)")
    chosen = args.scenarios or names

    started = time.monotonic()
    with idle_polling(args.idle_poll), redis_server() as url:
        ctx = Context(redis_url=url, rounds=args.rounds, quick=args.quick, duration=args.duration)

        async def run_all() -> list[Any]:
            rows: list[Any] = []
            for name in chosen:
                rows += await REGISTRY.scenarios[name](ctx)
            return rows

        rows = asyncio.run(run_all())
    print(render(rows, args.rounds))
    print(
        f"\n{sum(len(r.rates) for r in rows)} rounds in {time.monotonic() - started:.1f} s "
        "against a private redis-server on loopback"
        + (", idle CPUs polling (/dev/cpu_dma_latency held at 0)" if args.idle_poll else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
