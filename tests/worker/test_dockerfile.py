"""Dockerfile rules, read statically (hadolint-style); tests/images builds and runs the images.

Parsed with the `dockerfile` package (Docker's own Go parser); plus the worker extra installed in
a fresh virtual environment, which is what the image's `pip install ".[worker]"` does.
"""

from __future__ import annotations

import subprocess
import sys

import dockerfile
import pytest

from tests.conftest import REPO_ROOT, subprocess_env
from tests.processes import fresh_venv

DOCKERFILE = REPO_ROOT / "worker-image" / "Dockerfile"
OPERATOR_DOCKERFILE = REPO_ROOT / "operator" / "Dockerfile"
# (Dockerfile, target stage or None for the last, module its entry point runs)
IMAGES = [
    (DOCKERFILE, None, "handler_worker"),
    (OPERATOR_DOCKERFILE, "gateway", "handler_gateway"),
    (OPERATOR_DOCKERFILE, "operator", "handler_operator"),
]
IMAGE_IDS = ["worker", "gateway", "operator"]


@pytest.fixture(scope="module")
def commands():
    return dockerfile.parse_file(str(DOCKERFILE))


def stage(path, target):
    """The instructions of one build stage (`target`, or the last)."""
    stages: list[tuple[str | None, list]] = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd.upper() == "FROM":
            stages.append((command.value[2].lower() if len(command.value) == 3 else None, []))
        if stages:  # global ARGs before the first FROM belong to no stage
            stages[-1][1].append(command)
    return dict(stages)[target] if target else stages[-1][1]


@pytest.mark.parametrize(("path", "target", "module"), IMAGES, ids=IMAGE_IDS)
def test_images_run_as_non_root_with_exec_entrypoints(path, target, module):
    commands = stage(path, target)
    users = of(commands, "USER")
    assert users and users[-1].value[0] == "10001:10001"
    (entry,) = of(commands, "ENTRYPOINT")
    assert entry.json and list(entry.value) == ["python", "-m", module]
    assert commands.index(users[-1]) < commands.index(entry)


def of(commands, name):
    return [c for c in commands if c.cmd.upper() == name]


def test_entrypoint_is_exec_form(commands):
    (entry,) = of(commands, "ENTRYPOINT")
    assert entry.json and list(entry.value) == ["python", "-m", "handler_worker"]


def test_runs_as_non_root(commands):
    users = of(commands, "USER")
    assert users, "a USER instruction is required"
    user = users[-1].value[0].split(":")[0]
    assert user not in ("root", "0")
    assert commands.index(users[-1]) < commands.index(of(commands, "ENTRYPOINT")[0])


def test_base_image_is_pinned_and_overridable(commands):
    (arg,) = [c for c in of(commands, "ARG") if c.value[0].startswith("BASE_IMAGE=")]
    default = arg.value[0].split("=", 1)[1]
    assert ":" in default and not default.endswith(":latest")
    assert of(commands, "FROM")[0].value[0] == "${BASE_IMAGE}"


def test_installs_only_the_worker_extra(commands):
    pip_runs = [c.original for c in of(commands, "RUN") if "pip install" in c.original]
    assert pip_runs == [c for c in pip_runs if '".[worker]"' in c]


def test_apt_hygiene(commands):
    for run in of(commands, "RUN"):
        if "apt-get install" in run.original:
            assert "--no-install-recommends" in run.original
            assert "rm -rf /var/lib/apt/lists/*" in run.original


@pytest.mark.slow
def test_worker_extra_in_a_fresh_venv(tmp_path):
    """`pip install .[worker]` alone is enough to validate a handler and run a local job."""
    python = fresh_venv(tmp_path / "venv", f"{REPO_ROOT}[worker]", timeout=600)
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    ).stdout.lower()
    for unwanted in ("kopf", "kubernetes", "redis", "import-linter", "pytest"):
        assert f"\n{unwanted}==" not in f"\n{listed}", f"{unwanted} leaked into the worker extra"
    run = subprocess.run(
        [python, "-m", "handler_worker", "--test_input", '{"input": {"name": "venv"}}'],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=subprocess_env(HANDLER_MODULE="handler", PYTHONPATH=str(REPO_ROOT / "examples/hello")),
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == '{"output": {"greeting": "Hello, venv!"}}'
    assert sys.executable != python


# Groups and users a Debian base image already has (base-passwd): `groupadd operator` fails there.
DEBIAN_NAMES = {
    "root",
    "daemon",
    "bin",
    "sys",
    "adm",
    "tty",
    "disk",
    "lp",
    "mail",
    "news",
    "uucp",
    "man",
    "proxy",
    "kmem",
    "dialout",
    "fax",
    "voice",
    "cdrom",
    "floppy",
    "tape",
    "sudo",
    "audio",
    "dip",
    "www-data",
    "backup",
    "operator",
    "list",
    "irc",
    "src",
    "shadow",
    "utmp",
    "video",
    "sasl",
    "plugdev",
    "staff",
    "games",
    "users",
    "nogroup",
    "sync",
    "gnats",
    "nobody",
}


@pytest.mark.parametrize("path", [DOCKERFILE, OPERATOR_DOCKERFILE], ids=["worker", "control-plane"])
def test_the_image_user_and_group_do_not_clash_with_a_debian_base(path):
    import re

    created = [
        name
        for run in of(dockerfile.parse_file(str(path)), "RUN")
        for name in re.findall(
            r"(?:groupadd|useradd)\b[^&;]*?\s([a-z_][a-z0-9_-]*)\s*(?:\\\\|&&|$)", run.original
        )
    ]
    assert created, "the image creates its user"
    assert not set(created) & DEBIAN_NAMES, set(created) & DEBIAN_NAMES
