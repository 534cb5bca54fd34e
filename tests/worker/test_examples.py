"""Each example handler runs one job through `--test_input` / `--test_input_file`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import EXAMPLES, REPO_ROOT, subprocess_env
from tests.worker.conftest import example_path, run_worker

EXPECTED = {
    "hello": {"greeting": "Hello, GPU!"},
    "streaming": [
        {"index": 0, "token": "streamed"},
        {"index": 1, "token": "from"},
        {"index": 2, "token": "a"},
        {"index": 3, "token": "generator"},
        {"index": 4, "token": "handler"},
    ],
    "typed": {"job": "local_test", "sum": 13.0, "count": 3},
    "generic": {"success": True, "json_result": 42},
}


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_test_input_file(name):
    result = run_worker(
        "handler",
        "--test_input_file",
        str(EXAMPLES / name / "test_input.json"),
        extra_path=(example_path(name),),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert last_json_line(result.stdout) == {"output": EXPECTED[name]}


def test_example_inline_test_input():
    result = run_worker(
        "handler",
        "--test_input",
        '{"input": {"name": "A100"}}',
        extra_path=(example_path("hello"),),
    )
    assert last_json_line(result.stdout) == {"output": {"greeting": "Hello, A100!"}}


def test_typed_example_rejects_bad_input_with_structured_error():
    result = run_worker(
        "handler", "--test_input", '{"input": {"numbers": []}}', extra_path=(example_path("typed"),)
    )
    assert result.returncode == 1
    error = json.loads(last_json_line(result.stdout)["error"])
    assert error["status"] == 400 and error["error_type"] == "InputValidationError"
    assert error["errors"][0]["loc"] == "input.numbers"


def test_generic_client_snippet_runs_on_the_default_module(tmp_path):
    job = subprocess.run(
        [sys.executable, str(EXAMPLES / "generic" / "client.py")],
        capture_output=True,
        text=True,
        check=True,
        env=subprocess_env(),
        cwd=REPO_ROOT,
    ).stdout
    (tmp_path / "job.json").write_text(job)
    result = run_worker("", "--test_input_file", str(tmp_path / "job.json"))
    assert result.returncode == 0, result.stderr
    from handler_worker.generic import decode_result

    assert decode_result(last_json_line(result.stdout)["output"]) == 60.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--test_input", "{not json"], "--test_input is not valid JSON"),
        (["--test_input", '{"foo": 1}'], 'must be a JSON object with an "input" key'),
        (["--test_input_file", "/nonexistent/job.json"], "No such file or directory"),
    ],
    ids=["bad-json", "no-input-key", "missing-file"],
)
def test_bad_test_input_is_a_clear_error(args, message):
    result = run_worker("handler", *args, extra_path=(example_path("hello"),))
    assert result.returncode == 8
    assert message in result.stderr


def test_failed_local_job_exits_nonzero_with_the_error():
    result = run_worker("handlers.raises", "--test_input", '{"input": {"value": 7}}')
    assert result.returncode == 1
    error = json.loads(last_json_line(result.stdout)["error"])
    assert error["error_message"] == "bad value: 7"
    assert "Traceback" in error["error_traceback"]
