"""Cold and warm round trips of `handlerctl dev` on a trivial handler (examples/hello).

    python bench/cold_start.py [--trials 5] [--warm 50]

Cold: from the first job's POST /runsync on an endpoint with zero workers (scaled to zero, no
worker process left) to its result: the scale-up decision, the worker process start (Python, the
runpod SDK, the handler import) and the job. Warm: POST /runsync -> result with a worker idle and
polling. Both through the real HTTP API, as a client sees them. Goal: cold <= 1.5 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.processes import DevProcess, descendants  # noqa: E402

ENDPOINT = "default--hello"
SCALING = """
apiVersion: handlerops.dev/v1alpha1
kind: HandlerDeployment
metadata: {name: hello}
spec:
  handler: {module: handler}
  scaling: {minReplicas: 0, maxReplicas: 1, scaleToZeroAfterSeconds: 1,
            scaleDownStabilizationSeconds: 0}
"""


def runsync(server: DevProcess, name: str) -> tuple[float, dict]:
    request = urllib.request.Request(
        f"{server.url}/v2/{ENDPOINT}/runsync",
        data=json.dumps({"input": {"name": name}}).encode(),
        headers={"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"},
        method="POST",
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    return time.perf_counter() - start, body


def wait_for_zero(server: DevProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while descendants(server.process.pid):
        if time.monotonic() > deadline:
            raise TimeoutError("workers did not scale to zero")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="cold starts to time")
    parser.add_argument("--warm", type=int, default=50, help="warm round trips to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "hello.yaml"
        manifest.write_text(SCALING)
        server = DevProcess("examples/hello", Path(tmp), ("-f", str(manifest))).start()
        try:
            cold = []
            for trial in range(args.trials):
                wait_for_zero(server)
                seconds, body = runsync(server, f"cold{trial}")
                assert body["status"] == "COMPLETED", body
                cold.append(seconds)
                warm = [
                    runsync(server, f"warm{i}")[0] for i in range(args.warm if not trial else 0)
                ]
                if warm:
                    warm_p50 = statistics.median(warm)
                    warm_max = max(warm)
        finally:
            server.stop()
    python = subprocess.run(
        [sys.executable, "-c", "import time; s=time.perf_counter(); import runpod; "
         "print(time.perf_counter()-s)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    print(f"cold start (0 workers -> result), {args.trials} trials:")
    print(f"  median {statistics.median(cold):.3f} s, min {min(cold):.3f} s, max {max(cold):.3f} s")
    print(
        f"warm round trip, {args.warm} jobs: median {warm_p50 * 1000:.1f} ms, max {warm_max * 1000:.1f} ms"
    )
    print(f"for reference: `import runpod` alone takes {float(python.stdout):.3f} s here")
    print("goal: cold <= 1.5 s")


if __name__ == "__main__":
    main()
