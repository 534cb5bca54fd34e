"""scripts/build-images' choices, with stand-in builders on PATH that record their arguments:
which builder, image names and tags, build arguments, examples, push and multi-platform rules."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.images.conftest import BUILD_IMAGES, VERSION

# What the script needs besides a builder.
UTILITIES = ("bash", "cat", "dirname", "sed", "head", "basename")
RECORDER = '#!/bin/sh\necho "$(basename "$0") $*" >> "$RECORD"\n'


@pytest.fixture
def path_with(tmp_path):
    """A PATH holding the script's utilities and stand-ins for the builders named."""

    def make(*builders: str, failing: str = "") -> tuple[str, Path]:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        for utility in UTILITIES:
            for folder in ("/usr/bin", "/bin"):
                if os.path.exists(f"{folder}/{utility}") and not (bin_dir / utility).exists():
                    (bin_dir / utility).symlink_to(f"{folder}/{utility}")
        for builder in builders:
            tail = "exit 1\n" if builder == failing else ""
            (bin_dir / builder).write_text(RECORDER + tail)
            (bin_dir / builder).chmod(0o755)
        return str(bin_dir), tmp_path / "record"

    return make


def run(path: str, record: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    done = subprocess.run(
        ["bash", str(BUILD_IMAGES), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": path, "RECORD": str(record), "HOME": str(record.parent)},
    )
    calls = (
        [shlex.split(line) for line in record.read_text().splitlines()] if record.exists() else []
    )
    return done, calls


def image(name: str) -> str:
    return f"ghcr.io/handler-operator/{name}:{VERSION}"


def test_builds_worker_gateway_and_operator_from_their_dockerfiles(path_with):
    done, calls = run(*path_with("podman"))
    assert done.returncode == 0, done.stderr
    control_plane = str(REPO_ROOT / "operator/Dockerfile")
    assert calls == [
        ["podman", "build", "--file", str(REPO_ROOT / "worker-image/Dockerfile"),
         "--tag", image("handler-worker"), str(REPO_ROOT)],
        ["podman", "build", "--file", control_plane, "--target", "gateway",
         "--tag", image("handler-gateway"), str(REPO_ROOT)],
        ["podman", "build", "--file", control_plane, "--target", "operator",
         "--tag", image("handler-operator"), str(REPO_ROOT)],
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("installed", "expected"),
    [
        (("docker", "podman", "buildah"), "docker"),
        (("podman", "buildah"), "podman"),
        (("buildah",), "buildah"),
    ],
)
def test_the_first_builder_found_is_used(path_with, installed, expected):
    done, calls = run(*path_with(*installed), "gateway")
    assert done.returncode == 0, done.stderr
    assert [call[:2] for call in calls] == [[expected, "build"]]


def test_base_registry_tag_and_builder_arguments(path_with):
    done, calls = run(
        *path_with("podman"), "--base", "debian:bookworm", "--registry", "registry.local/ml",
        "--tag", "dev", "worker", "--", "--pull=never", "--network", "host",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (call,) = calls
    assert call[call.index("--tag") + 1] == "registry.local/ml/handler-worker:dev"
    assert call[call.index("--build-arg") + 1] == "BASE_IMAGE=debian:bookworm"
    assert call[-4:] == ["--pull=never", "--network", "host", str(REPO_ROOT)]


def test_examples_build_from_the_hello_dockerfile_on_the_worker_image(path_with):
    done, calls = run(*path_with("buildah"), "examples")
    assert done.returncode == 0, done.stderr
    examples = sorted(p.parent.name for p in (REPO_ROOT / "examples").glob("*/handler.py"))
    assert "hello" in examples
    assert [call[call.index("--tag") + 1] for call in calls] == [
        image(f"examples-{e}") for e in examples
    ]
    for call, example in zip(calls, examples, strict=True):
        assert call[call.index("--file") + 1] == str(REPO_ROOT / "examples/hello/Dockerfile")
        assert call[call.index("--build-arg") + 1] == f"WORKER_IMAGE={image('handler-worker')}"
        assert call[-1] == str(REPO_ROOT / "examples" / example)


def test_push_follows_each_build(path_with):
    done, calls = run(*path_with("podman"), "--push", "gateway", "operator")
    assert done.returncode == 0, done.stderr
    assert [call[:2] for call in calls] == [["podman", "build"], ["podman", "push"]] * 2
    assert calls[1] == ["podman", "push", image("handler-gateway")]


def test_multi_platform_builds_push_through_docker_buildx(path_with):
    done, calls = run(
        *path_with("docker"), "--platform", "linux/amd64,linux/arm64", "--push", "worker"
    )
    assert done.returncode == 0, done.stderr
    (call,) = calls
    assert call[:6] == [
        "docker",
        "buildx",
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "--push",
    ]


@pytest.mark.parametrize(
    ("builders", "args", "message"),
    [
        ((), (), "no OCI builder found: install docker, podman or buildah"),
        (("podman",), ("--builder", "kaniko"), "--builder must be docker, podman or buildah"),
        (("podman",), ("--builder", "docker"), "docker is not on PATH"),
        (("podman",), ("--platform", "linux/arm64", "--push"), "--platform needs docker buildx"),
        (("docker",), ("--platform", "linux/arm64"), "--platform needs --push"),
        (("podman",), ("--frobnicate",), "unknown argument: --frobnicate"),
        (("podman",), ("--tag",), "--tag needs a value"),
    ],
    ids=[
        "no-builder",
        "unknown-builder",
        "builder-missing",
        "platform-podman",
        "platform-no-push",
        "unknown-arg",
        "no-value",
    ],
)
def test_bad_invocations_say_what_to_change(path_with, builders, args, message):
    done, calls = run(*path_with(*builders), *args)
    assert done.returncode != 0
    assert message in done.stderr
    assert calls == []


def test_a_failing_build_stops_the_script(path_with):
    done, calls = run(*path_with("podman", failing="podman"))
    assert done.returncode != 0
    assert len(calls) == 1


def test_help_lists_the_options(path_with):
    done, _ = run(*path_with(), "--help")
    assert done.returncode == 0
    for option in (
        "--builder",
        "--registry",
        "--tag",
        "--base",
        "--examples",
        "--platform",
        "--push",
    ):
        assert option in done.stdout
