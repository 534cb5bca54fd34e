"""Time per method call of an `@remote` class whose `__init__` takes 2 s (a model load), through
the generic handler as a worker runs it: instances rebuilt per call (HANDLER_INSTANCES=0, the
behaviour before instances were kept) against kept instances (the default).

    python bench/stateful.py [--calls 10] [--init-seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker-image"))

from handler_worker.generic import create_handler  # noqa: E402

INIT_SECONDS = 2.0


class Model:
    def __init__(self, name: str):
        time.sleep(INIT_SECONDS)  # the weights
        self.name = name

    def predict(self, value: int) -> int:
        return value * 2


def call(value: int) -> dict:
    return {
        "function_name": "Model",
        "serialization_format": "json",
        "constructor_args": ["weights-v1"],
        "method_name": "predict",
        "args": [value],
    }


async def series(instances: str, calls: int) -> list[float]:
    os.environ["HANDLER_INSTANCES"] = instances
    handler = create_handler({"Model": Model}, allow_pickled=False)
    times = []
    for n in range(calls):
        started = time.perf_counter()
        output = await handler({"id": f"job-{n}", "input": call(n)})
        times.append(time.perf_counter() - started)
        assert output["success"] and output["json_result"] == 2 * n, output
    return times


def main() -> None:
    global INIT_SECONDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--init-seconds", type=float, default=INIT_SECONDS)
    args = parser.parse_args()
    INIT_SECONDS = args.init_seconds
    print(f"@remote class, __init__ {INIT_SECONDS:g} s, {args.calls} calls on one worker")
    print(f"{'instances':<22} {'first call':>11} {'later calls (median)':>21} {'total':>8}")
    for label, setting in (("rebuilt per call", "0"), ("kept (default)", "8")):
        times = asyncio.run(series(setting, args.calls))
        later = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else 0.0
        print(f"{label:<22} {times[0]:>10.3f}s {later * 1000:>19.3f}ms {sum(times):>7.2f}s")


if __name__ == "__main__":
    main()
