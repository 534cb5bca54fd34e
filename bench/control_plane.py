"""The cluster tier's control plane: build time (cold, with an empty Go build cache, and cached),
start-up time, and how long a Deployment takes to get a Running pod on a simulated node.

    python bench/control_plane.py [--cold] [--starts 3]

--cold builds once more into a throw-away GOCACHE (the module cache is kept: downloads are not
counted), which is what a CI machine without Go's build cache pays. Prints seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.cluster import harness  # noqa: E402
from tests.cluster.nodes import NodeAgent  # noqa: E402
from tests.tools import tool  # noqa: E402


def cold_build() -> float:
    """Seconds to build the harness from source with an empty Go build cache."""
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        started = time.monotonic()
        subprocess.run(
            [harness.go_command(), "build", "-o", str(Path(out) / "kube-harness"), "."],
            cwd=harness.SOURCE,
            env={**os.environ, "GOCACHE": cache, "CGO_ENABLED": "0"},
            check=True,
        )
        return time.monotonic() - started


def cached_build() -> float:
    target = harness.binary_path()
    if target.exists():
        shutil.rmtree(target.parent)
    started = time.monotonic()
    harness.build()
    return time.monotonic() - started


def start_and_schedule(workdir: Path) -> tuple[float, float]:
    """(seconds until the control plane is ready, seconds from Deployment create to a Running
    pod: controller-manager, scheduler and the node agent at work)."""
    started = time.monotonic()
    plane = harness.start(workdir)
    ready = time.monotonic() - started
    agent = NodeAgent(plane.kubeconfig, workdir / "nodes").start()
    kubectl = [tool("kubectl"), "--kubeconfig", plane.kubeconfig]
    try:
        created = time.monotonic()
        subprocess.run(
            [*kubectl, "create", "deployment", "probe", "--image=example/probe:1"],
            check=True,
            capture_output=True,
        )
        while True:
            out = subprocess.run(
                [*kubectl, "get", "pods", "-l", "app=probe", "-o", "json"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            if any(p["status"].get("phase") == "Running" for p in json.loads(out)["items"]):
                return ready, time.monotonic() - created
            time.sleep(0.05)
    finally:
        agent.stop()
        plane.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cold", action="store_true", help="also time a cold build")
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    print(f"Kubernetes {harness.kubernetes_release()}, {os.cpu_count()} cores")
    if args.cold:
        print(f"cold build (empty GOCACHE): {cold_build():.0f} s")
    print(f"build with Go's build cache: {cached_build():.1f} s")
    starts, schedules = [], []
    for _ in range(args.starts):
        with tempfile.TemporaryDirectory() as workdir:
            ready, scheduled = start_and_schedule(Path(workdir))
            starts.append(ready)
            schedules.append(scheduled)
    print(
        f"control plane ready: median {statistics.median(starts):.1f} s "
        f"(min {min(starts):.1f}, max {max(starts):.1f})"
    )
    print(
        f"Deployment -> Running pod: median {statistics.median(schedules):.2f} s "
        f"(min {min(schedules):.2f}, max {max(schedules):.2f})"
    )


if __name__ == "__main__":
    main()
