"""Operator memory beside unrelated pods: RSS with 0 and with N pods that are not ours, created
while the operator runs, against the Kubernetes emulator (which applies label selectors as the
apiserver does).

    python bench/watch_memory.py [--pods 5000]

The operator watches Pods and Deployments with its label selector, so unrelated pods never reach
it: the two RSS figures should be within a few MiB. Prints MiB (current RSS and peak).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clusters import handler_deployment, peak_rss_mib, post, running_operator


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def unrelated_pod(n: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"web-{n:05d}", "namespace": f"apps{n % 20}", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "nginx:1.27", "env": [{"name": "N", "value": str(n)}]}]},
    }  # fmt: skip


def measure(pods: int) -> tuple[float, float]:
    with running_operator() as bench:
        time.sleep(3)  # start-up
        bench.create(handler_deployment("hello", "default"))
        for n in range(pods):
            post(f"{bench.cluster.url}/api/v1/namespaces/apps{n % 20}/pods", unrelated_pod(n))
        deadline = time.monotonic() + 120
        while not bench.cluster.objects("deployments") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(5)  # let every event there is reach the operator
        return rss_mib(bench.operator.pid), peak_rss_mib(bench.operator.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=5000)
    count = parser.parse_args().pods
    base_rss, base_peak = measure(0)
    print(f"0 unrelated pods: operator RSS {base_rss:.1f} MiB (peak {base_peak:.1f})")
    rss, peak = measure(count)
    print(f"{count} unrelated pods: operator RSS {rss:.1f} MiB (peak {peak:.1f})")
    print(f"difference: {rss - base_rss:+.1f} MiB (peak {peak - base_peak:+.1f})")


if __name__ == "__main__":
    main()
