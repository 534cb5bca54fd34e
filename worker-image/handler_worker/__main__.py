"""Worker entry point: `python -m handler_worker [--test_input JSON | --test_input_file F]`.

Loads HANDLER_MODULE, then hands the validated config to `runpod.serverless.start` (production
mode when RUNPOD_WEBHOOK_GET_JOB is set), or runs one local job and prints its JSON result.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping

from handler_worker import speedups
from handler_worker.loader import HandlerLoadError, concurrency, env_flag, load_module
from handler_worker.parents import watch_parent
from handler_worker.termination import write_termination_message

EXIT_JOB_FAILED = 1
EXIT_BAD_TEST_INPUT = 8


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m handler_worker",
        description="Run HANDLER_MODULE's handler on the runpod serverless worker loop.",
        epilog="Other --rp_* flags are passed to the runpod SDK unchanged.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--test_input", help="run one local job, e.g. '{\"input\": {...}}'")
    source.add_argument("--test_input_file", help="run one local job read from this JSON file")
    parser.add_argument(
        "--check", action="store_true", help="only import and validate HANDLER_MODULE, then exit"
    )
    return parser


def _fail(message: str, exit_code: int) -> int:
    print(message, file=sys.stderr, flush=True)
    write_termination_message(message)
    return exit_code


def _read_test_job(args: argparse.Namespace) -> dict | None:
    from handler_worker.local import parse_test_job

    if args.test_input is not None:
        return parse_test_job(args.test_input, "--test_input")
    if args.test_input_file is not None:
        try:
            with open(args.test_input_file, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            from handler_worker.local import TestInputError

            raise TestInputError(f"--test_input_file: {exc.strerror}: {exc.filename}") from None
        return parse_test_job(text, args.test_input_file)
    return None


def main(argv: list[str] | None = None) -> int:
    args, passthrough = _parser().parse_known_args(argv if argv is not None else sys.argv[1:])
    watch_parent(os.environ)
    speedups.install()
    try:
        module, config = load_module(os.environ)
    except HandlerLoadError as exc:
        return _fail(exc.message, exc.exit_code)
    if args.check:
        print(f"handler module '{config['handler'].__module__}' is valid")
        return 0

    from handler_worker.local import TestInputError, quiet_sdk_logs, render_result, run_local_job

    try:
        job = _read_test_job(args)
    except TestInputError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_TEST_INPUT
    if job is not None:
        quiet_sdk_logs()
        result = asyncio.run(run_local_job(config, job))
        print(render_result(result), flush=True)
        return EXIT_JOB_FAILED if result.get("error") else 0

    from handler_worker.signals import leave_on_sigterm, leaver

    announce = leaver(os.environ)
    if announce is not None and not passthrough and not sdk_loop(os.environ):
        # Production against a gateway: our loop (no idle polling), the SDK's job functions.
        from runpod.serverless.modules import rp_job

        from handler_worker.channels import channel_enabled
        from handler_worker.loops import serve
        from handler_worker.slots import capacity_url

        capacity = None
        if getattr(module, "concurrency_modifier", None) is None:  # else it decides, as in the SDK
            capacity = concurrency(os.environ)
            rp_job.JOB_GET_URL = capacity_url(rp_job.JOB_GET_URL, capacity)
        if serve(config, concurrency(os.environ), announce, capacity, channel_enabled(os.environ)):
            refresh()  # does not return
        return 0

    import runpod

    from handler_worker.slots import apply_spare_slot

    apply_spare_slot(config, module, concurrency(os.environ), os.environ)
    leave_on_sigterm(config, os.environ)
    sys.argv = [sys.argv[0], *passthrough]
    runpod.serverless.start(config)
    return 0


SDK_LOOP_ENV = "HANDLER_SDK_LOOP"
REFRESHES_ENV = "HANDLER_WORKER_REFRESHES"


def refresh() -> None:
    """RunPod's worker refresh: the runtime starts afresh in this process (`exec`: a clean
    interpreter, the handler imported again, the same pid, so neither the pod's container nor
    `handlerctl dev` sees an exit), counted in HANDLER_WORKER_REFRESHES."""
    count = int(os.environ.get(REFRESHES_ENV, "0") or 0) + 1
    os.environ[REFRESHES_ENV] = str(count)
    print(f"worker refresh {count}: starting the handler afresh", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "handler_worker", *sys.argv[1:]])


def sdk_loop(env: Mapping[str, str]) -> bool:
    """HANDLER_SDK_LOOP=1 runs the runpod SDK's own job loop instead of ours."""
    return env_flag(env, SDK_LOOP_ENV, default=False)


if __name__ == "__main__":
    sys.exit(main())
