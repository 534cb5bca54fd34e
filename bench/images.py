"""Image builds with podman, no Docker engine: the Debian base (mmdebstrap), each image's build
time (cold: empty storage, so no cached layers) and size, and a worker container's cold start:
from `podman run` of examples-hello to its first job's result through a gateway on the host.

    python bench/images.py [--fresh-base] [--starts 3]

--fresh-base makes the base again instead of taking the cached tarball. Prints seconds and MB.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.images import containers  # noqa: E402
from tests.images.conftest import VERSION, image, worker_env  # noqa: E402
from tests.processes import CLIENT_KEY, GatewayProcess, http_json  # noqa: E402

IMAGES = ("handler-worker", "handler-gateway", "handler-operator", "examples-hello")


def base(podman: containers.Podman, fresh: bool) -> tuple[float, float]:
    """(seconds to make the base tarball, seconds to import it)."""
    if fresh:
        for cached in containers.CACHE.glob("base-*.tar"):
            cached.unlink()
    started = time.monotonic()
    tarball = containers.base_tarball()
    made = time.monotonic() - started
    started = time.monotonic()
    podman("import", str(tarball), containers.BASE_IMAGE)
    return made, time.monotonic() - started


def builds(podman: containers.Podman) -> dict[str, float]:
    """Seconds per image, as scripts/build-images reports them."""
    seconds: dict[str, float] = {}
    for args in (
        ["--base", containers.BASE_IMAGE],
        ["examples"],
    ):
        done = subprocess.run(
            [
                str(REPO / "scripts/build-images"),
                "--builder",
                "podman",
                *args,
                "--",
                "--pull=never",
            ],
            capture_output=True,
            text=True,
            env=podman.env,
            check=True,
        )
        for name, value in re.findall(r"/([a-z-]+):\S+ built in (\d+) s", done.stderr):
            seconds[name] = float(value)
    return seconds


def cold_start(podman: containers.Podman, workdir: Path) -> float:
    """Seconds from `podman run` of a worker to its first job's result."""
    gateway = GatewayProcess("memory://", workdir).start()
    try:
        gateway.register("hello", "bench-worker-token")
        started = time.monotonic()
        name = f"bench-{time.monotonic_ns()}"
        podman("run", "--detach", "--name", name, "--network", "host",
               *worker_env(gateway.url, "hello", "bench-worker-token"), image("examples-hello"))  # fmt: skip
        status, body = http_json(
            "POST", f"{gateway.url}/v2/hello/runsync", {"input": {}}, key=CLIENT_KEY, timeout=120
        )
        elapsed = time.monotonic() - started
        assert status == 200 and body["status"] == "COMPLETED", body
        podman("rm", "--force", "--time", "2", name)
        return elapsed
    finally:
        gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh-base", action="store_true")
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        podman = containers.Podman(Path(tmp) / "containers")
        try:
            made, imported = base(podman, args.fresh_base)
            print(f"base: mmdebstrap {made:.1f} s{' (cached)' if not args.fresh_base else ''}, "
                  f"import {imported:.1f} s, {podman.image_size(containers.BASE_IMAGE) / 1e6:.0f} MB")  # fmt: skip
            seconds = builds(podman)
            for name in IMAGES:
                size = podman.image_size(image(name)) / 1e6
                print(
                    f"{name}:{VERSION}: build {seconds.get(name, float('nan')):.0f} s, {size:.0f} MB"
                )
            starts = [cold_start(podman, Path(tmp)) for _ in range(args.starts)]
            print(f"worker container, run -> first result: median {statistics.median(starts):.2f} s "
                  f"(min {min(starts):.2f}, max {max(starts):.2f}, n={len(starts)})")  # fmt: skip
        finally:
            podman.remove()


if __name__ == "__main__":
    main()
