"""Fixtures of the image tests: podman with private storage, the Debian base imported, the
project's images built once per run by `scripts/build-images`, and containers that are always
removed. A missing podman/buildah/mmdebstrap fails the tests (`bash .ci/run` installs them)."""

from __future__ import annotations

import contextlib
import subprocess
import time
import tomllib
import urllib.error
import uuid

import pytest

from handler_protocol.urls import worker_webhook_env
from tests.conftest import REPO_ROOT
from tests.images.containers import BASE_IMAGE, Podman, base_tarball, missing_tools
from tests.processes import http_json

VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
REGISTRY = "ghcr.io/handler-operator"
BUILD_IMAGES = REPO_ROOT / "scripts" / "build-images"
# What Pod Security `restricted` leaves a container: no capabilities, no privilege escalation.
RESTRICTED = ("--cap-drop", "ALL", "--security-opt", "no-new-privileges")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/images/" in str(item.path):
            item.add_marker(pytest.mark.images)
            # The first test also waits for the base and the images to build (minutes).
            item.add_marker(pytest.mark.timeout(1200))


def image(name: str, tag: str = VERSION) -> str:
    return f"{REGISTRY}/{name}:{tag}"


@pytest.fixture(scope="session")
def podman(tmp_path_factory):
    missing = missing_tools()
    if missing:
        pytest.fail(
            f"the image tests need {', '.join(missing)}: scripts/test-images --install "
            "installs them (as .ci/run does)"
        )
    engine = Podman(tmp_path_factory.mktemp("containers"))
    yield engine
    engine.remove()


@pytest.fixture(scope="session")
def base_image(podman):
    podman("import", str(base_tarball()), BASE_IMAGE)
    return BASE_IMAGE


def build_images(podman: Podman, *args: str) -> subprocess.CompletedProcess:
    """`scripts/build-images` as a developer runs it, with this run's podman storage."""
    built = subprocess.run(
        [str(BUILD_IMAGES), *args], capture_output=True, text=True, timeout=1200, env=podman.env
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return built


@pytest.fixture(scope="session")
def project_images(podman, base_image):
    """worker, gateway, operator and the examples' images, as scripts/build-images names them."""
    build_images(podman, "--builder", "podman", "--base", base_image, "--", "--pull=never")
    build_images(podman, "--builder", "podman", "examples", "--", "--pull=never")
    return {
        name: image(name)
        for name in ("handler-worker", "handler-gateway", "handler-operator", "examples-hello")
    }


@pytest.fixture
def containers(podman):
    """Start detached containers by name; each is removed after the test (its log on failure)."""
    started: list[str] = []

    def start(*args: str) -> str:
        name = f"test-{uuid.uuid4().hex[:10]}"
        podman("run", "--detach", "--name", name, "--network", "host", *RESTRICTED, *args)
        started.append(name)
        return name

    yield start
    for name in started:
        logs = podman("logs", name, check=False)
        print(f"--- log of container {name}:\n{(logs.stdout + logs.stderr)[-3000:]}")
        podman("rm", "--force", "--time", "2", name, check=False)


def worker_env(gateway_url: str, endpoint: str, token: str, **extra: str) -> list[str]:
    """`--env` arguments of a worker container, as the operator sets them on a pod."""
    env = {
        **worker_webhook_env(gateway_url, endpoint),
        "RUNPOD_POD_ID": f"container-{uuid.uuid4().hex[:6]}",
        "RUNPOD_AI_API_KEY": token,
        "RUNPOD_PING_INTERVAL": "1000",
        **extra,
    }
    return [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]


def wait_healthy(url: str, podman: Podman, container: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, urllib.error.URLError):
            if http_json("GET", url + "/healthz")[0] == 200:
                return
        state = podman("inspect", "--format", "{{.State.Status}}", container).stdout.strip()
        assert state == "running", f"{container} is {state}"
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer /healthz")
