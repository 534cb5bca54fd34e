"""Time and operator peak RSS to converge N HandlerDeployments against the Kubernetes emulator.

    python bench/operator_scale.py [--counts 100,1000]

The emulator (tests/operator/emulator.py) and a memory-backend gateway run in this process; the
operator runs as `python -m handler_operator` in a subprocess, so its peak RSS (VmHWM) is its
own. Converged = every CR has Ready=True and its worker Deployment exists.
"""

from __future__ import annotations

import argparse
import time

from clusters import handler_deployment, peak_rss_mib, running_operator

from tests.operator.emulator import EmulatedCluster


def converged(cluster: EmulatedCluster, count: int) -> int:
    ready = 0
    for (_, _), obj in cluster.objects("handlerdeployments").items():
        conditions = (obj.get("status") or {}).get("conditions") or []
        ready += any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    return min(ready, len(cluster.objects("deployments")))


def run(count: int) -> None:
    with running_operator() as bench:
        time.sleep(2)  # operator start-up, not counted
        start = time.perf_counter()
        for n in range(count):
            bench.create(handler_deployment(f"hd{n:04d}", f"team{n % 10}"))
        while converged(bench.cluster, count) < count:
            if time.perf_counter() - start > 1800:
                raise TimeoutError(f"only {converged(bench.cluster, count)} of {count} converged")
            time.sleep(0.5)
        elapsed = time.perf_counter() - start
        rss = peak_rss_mib(bench.operator.pid)
    print(
        f"N={count}: converged in {elapsed:.1f} s ({count / elapsed:.1f} CRs/s), "
        f"operator peak RSS {rss:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100,1000")
    for count in parser.parse_args().counts.split(","):
        run(int(count))


if __name__ == "__main__":
    main()
