"""Round-trip time of cloudpickle arguments through the generic handler (ours vs runpod-flash).

    python bench/generic_handler.py [--repeat 15]

A round trip = client serializes (cloudpickle+base64) -> job JSON encoded/decoded as over HTTP
-> handler deserializes, calls `echo(x)`, serializes the result -> client decodes it. Payloads:
1 KB, 1 MB and 10 MB of bytes. runpod-flash's `create_handler` is measured in the same run when
installed (`pip install runpod-flash`); ratio = ours / flash (goal <= 1.0x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable

from handler_worker import serialization
from handler_worker.generic import create_handler, decode_result

SIZES = {"1 KB": 1024, "1 MB": 1024**2, "10 MB": 10 * 1024**2}


def echo(value):
    return value


def through_json(job_input: dict) -> dict:
    return json.loads(json.dumps({"id": "bench", "input": job_input}))


def ours_registry(payload: bytes) -> bytes:
    handler = OURS
    job = through_json({"function_name": "echo", "args": [serialization.encode(payload)]})
    output = json.loads(json.dumps(asyncio.run(handler(job))))
    return decode_result(output)


def ours_pickled(payload: bytes) -> bytes:
    job = through_json(
        {"function": serialization.encode(echo), "args": [serialization.encode(payload)]}
    )
    output = json.loads(json.dumps(asyncio.run(OURS(job))))
    return decode_result(output)


def flash_factory() -> Callable[[bytes], bytes] | None:
    try:
        from runpod_flash.runtime.generic_handler import create_handler as flash_create
        from runpod_flash.runtime.serialization import deserialize_arg, serialize_args
    except ImportError:
        return None
    handler = flash_create({"echo": echo})

    def flash(payload: bytes) -> bytes:
        job = through_json({"function_name": "echo", "args": serialize_args((payload,))})
        output = json.loads(json.dumps(handler(job)))
        if not output.get("success"):
            raise RuntimeError(output.get("error"))
        return deserialize_arg(output["result"])

    return flash


OURS = create_handler({"echo": echo})


def timed(fn: Callable[[bytes], bytes], payload: bytes, repeat: int) -> float | str:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            result = fn(payload)
        except Exception as exc:  # e.g. flash's 10 MB encoded-payload limit
            return f"error: {str(exc)[:60]}"
        samples.append(time.perf_counter() - start)
        assert result == payload
    return statistics.median(samples)


def fmt(value: float | str) -> str:
    return f"{value * 1000:9.2f} ms" if isinstance(value, float) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    flash = flash_factory()
    print("generic handler round trip, median of", args.repeat, "runs")
    print(
        f"{'payload':>8} | {'ours (registry)':>15} | {'ours (pickled fn)':>17} | "
        f"{'runpod-flash':>14} | ratio ours/flash"
    )
    for label, size in SIZES.items():
        payload = bytes(range(256)) * (size // 256) or b"x" * size
        registry = timed(ours_registry, payload, args.repeat)
        pickled = timed(ours_pickled, payload, args.repeat)
        other = timed(flash, payload, args.repeat) if flash else "not installed"
        ratio = (
            f"{registry / other:.2f}x"
            if isinstance(registry, float) and isinstance(other, float)
            else "n/a"
        )
        print(f"{label:>8} | {fmt(registry):>15} | {fmt(pickled):>17} | {fmt(other):>14} | {ratio}")


if __name__ == "__main__":
    main()
