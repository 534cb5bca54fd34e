"""Fixtures for every test: no test may reach a real Kubernetes cluster unless marked `cluster`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
# Only this folder goes on child processes' PYTHONPATH (as `handlers.*`): putting `tests/` there
# would let `tests/operator` shadow the standard library's `operator` module.
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def child_pythonpath(*extra: str) -> str:
    """PYTHONPATH for a worker subprocess: the test handlers, the repo root, then `extra`."""
    return os.pathsep.join([str(FIXTURES), str(REPO_ROOT), *extra])


@pytest.fixture(autouse=True)
def _no_real_cluster(request, monkeypatch, tmp_path_factory):
    """Point kubeconfig at a file that does not exist and drop in-cluster env vars.

    Any client that tries to load the real cluster config fails loudly instead of talking to
    whatever cluster the developer's machine has. Tests marked `cluster` opt out.
    """
    if request.node.get_closest_marker("cluster"):
        return
    missing = tmp_path_factory.getbasetemp() / "no-real-cluster" / "kubeconfig"
    monkeypatch.setenv("KUBECONFIG", str(missing))
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)


def subprocess_env(**extra: str) -> dict[str, str]:
    """A clean environment for child processes: no RUNPOD_* leaking in from the parent."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RUNPOD_", "HANDLER_"))
    }
    env.update(extra)
    return env
