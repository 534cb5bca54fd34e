"""The distribution as users install it: the sdist and the wheel built from it (`python -m
build`), the wheel installed, not editable, into a fresh virtual environment once per extra;
every module of the extra's packages imports and every entry point answers `--help`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, subprocess_env
from tests.processes import (
    CLIENT_KEY,
    GatewayProcess,
    fresh_venv,
    kill_group,
    start_worker,
)

TOKEN = "cli-extra-worker-token-0123"
FIND_SPECS = """
import importlib.util, json, sys
print(json.dumps([importlib.util.find_spec(name) for name in sys.argv[1:]], default=str))
"""

SOURCE_ROOTS = [
    REPO_ROOT / part for part in ("protocol", "worker-image", "gateway", "operator", "cli")
]
# What each extra is for, and so must work with it alone.
EXTRAS = {
    "worker": {
        "packages": ["handler_worker"],
        "commands": [["handler-worker", "--help"], ["-m", "handler_worker", "--help"]],
    },
    "gateway": {
        "packages": ["handler_gateway"],
        "commands": [["handler-gateway", "--help"], ["-m", "handler_gateway", "--help"]],
    },
    "operator": {
        "packages": ["handler_operator"],
        "commands": [["-m", "handler_operator", "--help"]],
    },
    "cli": {
        "packages": ["handlerctl", "handler_protocol"],
        # `handlerctl dev`'s runner runs a gateway and workers: [cli,gateway,worker].
        "skip": ["handlerctl.runners"],
        "commands": [["handlerctl", "--help"], ["-m", "handlerctl", "--help"]],
    },
}
IMPORT_ALL = """
import importlib, json, pkgutil, sys
failed = {}
count = 0
names = [name for name in sys.argv[1:] if not name.startswith("-")]
skip = {name[1:] for name in sys.argv[1:] if name.startswith("-")}
for name in names:
    package = importlib.import_module(name)
    for module in pkgutil.walk_packages(package.__path__, name + "."):
        if module.name in skip:
            continue
        count += 1
        try:
            importlib.import_module(module.name)
        except Exception as exc:  # report every module that does not import
            failed[module.name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"modules": count, "failed": failed}))
"""


def clean_copy(target: Path) -> Path:
    """The files git tracks or would track, without build leftovers (an editable install's
    egg-info would otherwise feed the sdist its own file list)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name, follow_symlinks=False)
    return target


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    source = clean_copy(tmp_path_factory.mktemp("source"))
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        env=subprocess_env(),
    )
    assert built.returncode == 0, built.stderr[-3000:]
    return {"wheel": next(out.glob("*.whl")), "sdist": next(out.glob("*.tar.gz"))}


def test_the_wheel_carries_every_package(dist):
    names = zipfile.ZipFile(dist["wheel"]).namelist()
    on_disk = {
        str(init.parent.relative_to(root))
        for root in SOURCE_ROOTS
        for init in [
            *root.glob("handler_*/**/__init__.py"),
            *root.glob("handlerctl/**/__init__.py"),
        ]
    }
    shipped = {name.rsplit("/", 1)[0] for name in names if name.endswith("/__init__.py")}
    assert on_disk <= shipped, on_disk - shipped


@pytest.mark.slow
@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_each_extra_installs_imports_and_starts(dist, tmp_path, extra):
    env_dir = tmp_path / "venv"
    python = fresh_venv(env_dir, f"{dist['wheel']}[{extra}]")
    spec = EXTRAS[extra]
    imported = subprocess.run(
        [
            python,
            "-c",
            IMPORT_ALL,
            *spec["packages"],
            *("-" + name for name in spec.get("skip", [])),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the repo: only the installed wheel can be found
        env=subprocess_env(),
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    report = json.loads(imported.stdout.strip().splitlines()[-1])
    assert report["modules"] > 0 and report["failed"] == {}, report
    for command in spec["commands"]:
        args = [python, *command] if command[0] == "-m" else [str(env_dir / "bin" / command[0])]
        args += command[1:] if command[0] != "-m" else []
        ran = subprocess.run(
            args, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=subprocess_env()
        )
        assert ran.returncode == 0, (command, ran.stdout[-1500:], ran.stderr[-1500:])
        assert "usage" in (ran.stdout + ran.stderr).lower(), (command, ran.stdout[-500:])


@pytest.mark.slow
def test_the_cli_extra_alone_runs_jobs_against_a_gateway(dist, tmp_path):
    """`pip install 'handler-operator[cli]'`: no kopf, no Kubernetes client, no gateway; a job
    submitted with `handlerctl run --wait` to a gateway with a real worker comes back done, and
    `handlerctl dev` says which extras it needs."""
    env_dir = tmp_path / "venv"
    python = fresh_venv(env_dir, f"{dist['wheel']}[cli]")
    absent = subprocess.run(
        [python, "-c", FIND_SPECS, "kopf", "kubernetes", "kubernetes_asyncio", "redis", "runpod"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=subprocess_env(),
    )
    assert json.loads(absent.stdout) == [None] * 5, absent.stdout

    gateway = GatewayProcess("memory://", tmp_path / "gateway")
    (tmp_path / "gateway").mkdir()
    gateway.start()
    worker = None
    try:
        gateway.register("ep", TOKEN)
        worker = start_worker(
            gateway.worker_env("ep", TOKEN, "cli-worker-1"),
            "handler",
            [str(REPO_ROOT / "examples" / "hello")],
            tmp_path / "worker.log",
        )
        handlerctl = str(env_dir / "bin" / "handlerctl")
        ran = subprocess.run(
            [
                handlerctl,
                "run",
                "ep",
                "--input",
                '{"name": "cli"}',
                "--wait",
                "--timeout",
                "60",
                "--url",
                gateway.url,
                "--api-key",
                CLIENT_KEY,
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=subprocess_env(),
        )
        assert ran.returncode == 0, (ran.stdout[-1500:], ran.stderr[-1500:])
        job = json.loads(ran.stdout.strip().splitlines()[-1])
        assert job["status"] == "COMPLETED" and job["output"] == {"greeting": "Hello, cli!"}
    finally:
        if worker is not None:
            kill_group(worker)
        gateway.stop()

    dev = subprocess.run(
        [str(env_dir / "bin" / "handlerctl"), "dev", str(REPO_ROOT / "examples" / "hello")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=subprocess_env(),
    )
    assert dev.returncode == 2, (dev.stdout[-1500:], dev.stderr[-1500:])
    assert "handler-operator[cli,gateway,worker]" in dev.stderr
