"""Builds a generic-handler job that runs a local function on a worker (cloudpickle + base64).

    python examples/generic/client.py > job.json
    python -m handler_worker --test_input_file job.json      # HANDLER_MODULE defaults to generic

With a gateway: post `{"input": request}` with `runpod.Endpoint(...).run_sync(request)` and
decode the output with `handler_worker.generic.decode_result`.
"""

import json
import sys


def scaled_sum(values, scale=1.0):
    """Runs on the worker: defined here, shipped by value with cloudpickle."""
    return sum(values) * scale


def main() -> None:
    from handler_worker.generic import build_request

    request = build_request(scaled_sum, [1, 2, 3], scale=10.0)
    json.dump({"input": request}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
