"""A worker stopped mid-job (SIGTERM, as a pod deletion sends it): seconds from the job's end to
the process's exit, for `python -m handler_worker` (tells the gateway it leaves) and for an
unmodified runpod worker (the SDK alone: its take and stop long-polls run out first).

    python bench/shutdown.py [--trials 3] [--take-hold 25] [--job-seconds 3]

The gateway runs on the in-memory backend with the chart's default take hold (25 s).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import processes  # noqa: E402
from tests.processes import CLIENT_KEY, GatewayProcess, http_json  # noqa: E402

TOKEN = "bench-shutdown-token-0123456789"
# The SDK on its own: the same handler module, no handler_worker runtime around it.
PLAIN_SDK = (
    "import runpod, handlers.echo_async as m; runpod.serverless.start({'handler': m.handler})"
)


def trial(gateway: GatewayProcess, workdir: Path, plain: bool, job_seconds: float) -> float:
    env = gateway.worker_env("ep", TOKEN, "w-plain" if plain else "w-ours")
    if plain:  # the same environment, the SDK's loop without our runtime around it
        worker = subprocess.Popen(
            [sys.executable, "-c", PLAIN_SDK],
            env={**env, "PYTHONPATH": f"{REPO / 'tests' / 'fixtures'}:{REPO}"},
            stdout=open(workdir / "plain.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    else:
        worker = processes.start_worker(env, "handlers.echo_async", [], workdir / "worker.log")
    try:
        url = f"{gateway.url}/v2/ep"
        job = http_json("POST", f"{url}/run", {"input": {"sleep": job_seconds}}, key=CLIENT_KEY)[1]
        while http_json("GET", f"{url}/status/{job['id']}", key=CLIENT_KEY)[1]["status"] != (
            "IN_PROGRESS"
        ):
            time.sleep(0.01)
        worker.send_signal(signal.SIGTERM)
        while True:
            view = http_json("GET", f"{url}/status/{job['id']}", key=CLIENT_KEY)[1]
            if view["status"] == "COMPLETED":
                ended = time.monotonic()
                break
            time.sleep(0.01)
        worker.wait(300)
        return time.monotonic() - ended
    finally:
        processes.kill_group(worker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--take-hold", type=float, default=25.0)
    parser.add_argument("--job-seconds", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        hold = ("--take-hold-seconds", str(args.take_hold))
        gateway = GatewayProcess("memory://", workdir, extra_args=hold).start()
        try:
            gateway.register("ep", TOKEN, heartbeatIntervalSeconds=1, heartbeatMisses=3)
            for label, plain in (("python -m handler_worker", False), ("runpod SDK alone", True)):
                waits = [
                    trial(gateway, workdir, plain, args.job_seconds) for _ in range(args.trials)
                ]
                print(
                    f"{label}: job end -> exit median {statistics.median(waits):.2f} s "
                    f"(min {min(waits):.2f}, max {max(waits):.2f}; take hold {args.take_hold:g} s)"
                )
        finally:
            gateway.stop()


if __name__ == "__main__":
    main()
