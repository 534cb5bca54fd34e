"""`handlerctl build`: the AST scan (no import of user code), the manifest against a golden file,
generated handlers that run a job, HandlerDeployments the operator accepts, and errors that
name the file and line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml

from handler_operator.models import HandlerDeployment
from handlerctl import projects
from tests.conftest import FIXTURES, REPO_ROOT, subprocess_env
from tests.operator.conftest import GOLDEN
from tests.processes import handlerctl

PROJECT = FIXTURES / "remote_project"


@pytest.fixture
def built(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(PROJECT, project)
    result = handlerctl(
        "build", str(project), "--image", "ghcr.io/acme/app:1.0", "--builder", "none"
    )
    assert result.returncode == 0, result.stderr
    return project, project / ".handler_build", result.stdout


def test_manifest_matches_the_golden_file(built):
    _, out, stdout = built
    manifest = json.loads((out / projects.MANIFEST).read_text())
    assert manifest == json.loads((GOLDEN / "handler_manifest.json").read_text())
    assert "endpoint cpu-tasks: add, chain, shout, where" in stdout
    assert "try it: handlerctl dev" in stdout


# (endpoint module, generic request, expected json_result)
JOBS = [
    ("cpu_tasks", {"function_name": "add", "args": [2, 3]}, 5),
    ("cpu_tasks", {"function_name": "shout", "args": ["hi"]}, "HI"),
    ("cpu_tasks", {"function_name": "where"}, "local-test"),
    (
        "gpu_models",
        {
            "function_name": "Scaler",
            "execution_type": "class",
            "constructor_args": [3],
            "method_name": "scale",
            "args": [7],
        },
        21,
    ),
]


@pytest.mark.parametrize(
    ("module", "request_", "expected"), JOBS, ids=[j[1]["function_name"] for j in JOBS]
)
def test_generated_handlers_import_and_run_a_job(built, module, request_, expected):
    project, out, _ = built
    job = {"input": {**request_, "serialization_format": "json"}}
    env = subprocess_env(
        HANDLER_MODULE=f"{projects.PACKAGE}.{module}",
        PYTHONPATH=f"{out}:{project}",
        RUNPOD_POD_ID="local-test",
    )
    result = subprocess.run(
        [sys.executable, "-m", "handler_worker", "--test_input", json.dumps(job)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    output = json.loads(result.stdout.strip().splitlines()[-1])["output"]
    assert output.pop("instance", "built") == "built"  # a class: its instance, built for it
    assert output == {"success": True, "json_result": expected}


def test_generated_handler_serves_only_the_registered_functions(built):
    project, out, _ = built
    job = {"input": {"function_name": "not_remote", "serialization_format": "json"}}
    env = subprocess_env(
        HANDLER_MODULE=f"{projects.PACKAGE}.cpu_tasks", PYTHONPATH=f"{out}:{project}"
    )
    result = subprocess.run(
        [sys.executable, "-m", "handler_worker", "--test_input", json.dumps(job)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["output"]["success"] is False
    assert (
        "'not_remote' is not registered (available: ['add', 'chain', 'shout', 'where'])"
        in json.dumps(last)
    )


def test_handler_deployments_are_valid_and_render(built):
    _, out, _ = built
    gpu = yaml.safe_load((out / "deploy" / "gpu-models.yaml").read_text())
    HandlerDeployment.model_validate(gpu)
    assert gpu["spec"]["handler"]["module"] == "handlerops_endpoints.gpu_models"
    assert gpu["spec"]["resources"]["gpu"] == {
        "count": 1,
        "vendor": "nvidia",
        "product": "NVIDIA-L4",
    }
    rendered = handlerctl("render", str(out / "deploy" / "gpu-models.yaml"))
    assert rendered.returncode == 0, rendered.stderr
    deployment = [d for d in yaml.safe_load_all(rendered.stdout) if d["kind"] == "Deployment"][0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == "ghcr.io/acme/app:1.0"


def test_archive_holds_sources_generated_handlers_and_requirements(built):
    _, out, _ = built
    with tarfile.open(out / "build.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"app/tasks.py", "app/models.py", "app/plain.py"} <= names
    assert {"handlerops_endpoints/cpu_tasks.py", "handlerops_endpoints/gpu_models.py"} <= names
    assert "requirements.txt" in names
    assert (out / "requirements.txt").read_text() == "numpy>=1.26\ntorch>=2.3\n"


# (file name, source, text the error must have: after "<file>:<line>: ")
BAD_SOURCES = [
    ("broken.py", "def f(:\n    pass\n", "broken.py:1: syntax error"),
    (
        "unknown_arg.py",
        "from handler_worker.remote import remote\n\n@remote(gpus=2)\ndef f():\n    pass\n",
        "unknown_arg.py:3: unsupported @remote argument 'gpus'",
    ),
    (
        "not_literal.py",
        "from handler_worker.remote import remote\nN = 2\n\n\n@remote(gpu=N)\ndef f():\n    pass\n",
        "not_literal.py:5: @remote argument 'gpu' must be a literal, not `N`",
    ),
    (
        "nested.py",
        "from handler_worker.remote import remote\n\ndef outer():\n    @remote\n    def f():\n        pass\n",
        "nested.py:5: @remote 'f' must be defined at the top level",
    ),
    (
        "wrong_type.py",
        "from handler_worker.remote import remote as r\n\n@r(max_workers='3')\ndef f():\n    pass\n",
        "wrong_type.py:3: @remote argument 'max_workers' has the wrong type (str)",
    ),
    (
        "clash.py",
        "from handler_worker.remote import remote\n\n@remote(endpoint='gpu-models', gpu=2)\ndef g():\n    pass\n",
        "clash.py:4: endpoint 'gpu-models': gpu=2 here but 1 at app/models.py:14",
    ),
]


@pytest.mark.parametrize(
    ("name", "source", "message"), BAD_SOURCES, ids=[b[0] for b in BAD_SOURCES]
)
def test_errors_name_the_file_and_line(tmp_path, name, source, message):
    project = tmp_path / "project"
    shutil.copytree(PROJECT, project)
    (project / name).write_text(source)
    result = handlerctl("build", str(project))
    assert result.returncode == 2
    assert f"{project}/{message}" in result.stderr.replace("\n", ""), result.stderr
    assert not (project / ".handler_build").exists()


def test_scan_never_imports_user_code():
    # app/plain.py raises when imported; the scan reads it as text only.
    result = projects.scan({"app/plain.py": (PROJECT / "app" / "plain.py").read_text()})
    assert result.targets == [] and result.errors == []


def test_a_project_without_remote_targets_is_an_error(tmp_path):
    (tmp_path / "mod.py").write_text("def f():\n    return 1\n")
    result = handlerctl("build", str(tmp_path))
    assert result.returncode == 2 and "no @remote functions or classes" in result.stderr
