"""Loader validation errors: exact message, exit code, termination log — in a subprocess."""

from __future__ import annotations

import pytest

from handler_worker import loader
from tests.worker.conftest import run_worker

CASES = {
    "missing module": (
        "no_such_handler_module",
        "",
        loader.EXIT_MODULE_NOT_FOUND,
        "Cannot import handler module 'no_such_handler_module': ModuleNotFoundError: "
        "No module named 'no_such_handler_module' (sys.path: [",
    ),
    "missing parent package": (
        "no_such_pkg.handler",
        "",
        loader.EXIT_MODULE_NOT_FOUND,
        "No module named 'no_such_pkg' (sys.path: [",
    ),
    "no handler": (
        "nohandler",
        "value = 1\n",
        loader.EXIT_NO_HANDLER,
        "Module 'nohandler' does not export a 'handler' function",
    ),
    "handler not callable": (
        "notcallable",
        "handler = 'not a function'\n",
        loader.EXIT_NOT_CALLABLE,
        "'handler' in module 'notcallable' is not callable",
    ),
    "concurrency_modifier not callable": (
        "badmodifier",
        "def handler(job):\n    return 1\n\nconcurrency_modifier = 4\n",
        loader.EXIT_NOT_CALLABLE,
        "'concurrency_modifier' in module 'badmodifier' is not callable",
    ),
    "bad module name": (
        "not-a-module",
        "",
        loader.EXIT_BAD_MODULE_NAME,
        "HANDLER_MODULE 'not-a-module' is not a dotted Python module name",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_validation_error_is_exact_and_fatal(case, tmp_path):
    module, source, exit_code, message = CASES[case]
    if source:
        (tmp_path / f"{module}.py").write_text(source)
    term_log = tmp_path / "termination-log"
    result = run_worker(
        module, "--check", extra_path=(str(tmp_path),), HANDLER_TERMINATION_LOG=str(term_log)
    )
    assert result.returncode == exit_code, result.stderr
    assert message in result.stderr
    assert result.stderr.count(message) == 1, "printed once"
    assert "Traceback" not in result.stderr, "no traceback noise"
    assert message in term_log.read_text()


IMPORT_FAILURES = {
    "raises at import": (
        "def load_model():\n    raise RuntimeError('weights missing at /models/x')\n\n"
        "load_model()\n",
        ["line 2, in load_model", "RuntimeError: weights missing at /models/x"],
    ),
    "imports a missing dependency": (
        "import torch_that_is_not_installed\n\ndef handler(job):\n    return 1\n",
        ["line 1, in <module>", "No module named 'torch_that_is_not_installed'"],
    ),
    "syntax error": ("def handler(job)\n    return 1\n", ["SyntaxError"]),
}


@pytest.mark.parametrize("case", IMPORT_FAILURES, ids=list(IMPORT_FAILURES))
def test_import_failure_shows_the_modules_own_traceback(case, tmp_path):
    source, expected = IMPORT_FAILURES[case]
    (tmp_path / "broken.py").write_text(source)
    term_log = tmp_path / "termination-log"
    result = run_worker(
        "broken", "--check", extra_path=(str(tmp_path),), HANDLER_TERMINATION_LOG=str(term_log)
    )
    assert result.returncode == loader.EXIT_IMPORT_FAILED
    assert result.stderr.startswith("Importing handler module 'broken' failed:")
    for fragment in expected:
        assert fragment in result.stderr
    assert "importlib" not in result.stderr and "loader.py" not in result.stderr
    assert "weights missing" in term_log.read_text() or "broken" in term_log.read_text()


def test_default_module_is_the_generic_handler():
    result = run_worker("", "--check")
    assert result.returncode == 0, result.stderr
    assert "handler_worker.generic" in result.stdout


def test_bad_concurrency_env_is_rejected():
    result = run_worker("handlers.echo_async", "--check", HANDLER_CONCURRENCY="zero")
    assert result.returncode == loader.EXIT_BAD_OPTION
    assert "HANDLER_CONCURRENCY must be a positive integer, got 'zero'" in result.stderr


@pytest.mark.parametrize(
    ("raw", "expected"), [("", None), ("1", None), ("3", 3)], ids=["unset", "one", "three"]
)
def test_concurrency_from_env(raw, expected):
    modifier = loader._concurrency_from_env({loader.CONCURRENCY_ENV: raw})
    assert (modifier(1) if modifier else None) == expected


def test_module_flags_pass_through(tmp_path, monkeypatch):
    (tmp_path / "flags_mod.py").write_text(
        "return_aggregate_stream = 1\nrefresh_worker = True\ndef handler(job):\n    yield 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = loader.load({"HANDLER_MODULE": "flags_mod"})
    assert config["return_aggregate_stream"] is True
    assert config["refresh_worker"] is True


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://gw/v2/ep/job-take/w1?", "http://gw/v2/ep/job-take/w1?capacity=3"),
        ("http://gw/v2/ep/job-take/w1", "http://gw/v2/ep/job-take/w1?capacity=3"),
        ("http://gw/v2/ep/job-take/w1?gpu=1", "http://gw/v2/ep/job-take/w1?gpu=1&capacity=3"),
        ("http://gw/x?capacity=9", "http://gw/x?capacity=9"),
    ],
    ids=["trailing-question-mark", "no-query", "existing-query", "already-set"],
)
def test_capacity_url(url, expected):
    from handler_worker.slots import capacity_url

    assert capacity_url(url, 3) == expected
