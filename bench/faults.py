"""The fault matrix with real processes: worker SIGKILL, gateway SIGKILL, Redis kill and
restart, Sentinel failover, a poison handler, a ghost long-poll, a Redis outage longer than the
heartbeat window (the scenarios are in tests/scenarios.py; tests/e2e/test_faults.py runs a subset).

    python bench/faults.py [--only NAME ...]

Prints one table: jobs submitted, completed, failed, dead-lettered, lost, executed twice (the
handler ran to its end more than once), redelivered and the p99 time from the fault to their
new start. No figure is asserted here: this prints.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import scenarios  # noqa: E402
from tests.processes import shared_redis_url  # noqa: E402

COLUMNS = ("submitted", "completed", "failed", "dead_lettered", "lost", "executed_twice",
           "redelivered")  # fmt: skip


def run(name: str, workdir: Path) -> scenarios.Tally:
    scenario = scenarios.SCENARIOS[name]
    if name in ("worker-sigkill", "poison", "ghost-take"):
        return scenario(workdir, "memory://")
    if name == "gateway-sigkill":
        return scenario(workdir, shared_redis_url())
    return scenario(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(scenarios.SCENARIOS))
    args = parser.parse_args()
    names = args.only or list(scenarios.SCENARIOS)
    header = f"{'fault':<34}" + "".join(f"{c.replace('_', ' '):>15}" for c in COLUMNS)
    print(header + f"{'p99 redelivery':>16}{'took':>7}")
    for name in names:
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as workdir:
            tally = run(name, Path(workdir))
        p99 = tally.redelivery_p99_s
        print(
            f"{tally.scenario:<34}"
            + "".join(f"{getattr(tally, c):>15}" for c in COLUMNS)
            + (f"{p99:>15.2f}s" if p99 is not None else f"{'–':>16}")
            + f"{time.monotonic() - started:>6.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
