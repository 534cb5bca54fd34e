"""A user's handler image from `handlerctl build`: the Dockerfile and build command (pure), the
reproducible archive, and how the CLI picks a builder, says how to build without one, and fails."""

from __future__ import annotations

import shutil
import tarfile

import dockerfile
import pytest

from handler_operator import images
from handler_worker import __version__
from tests.conftest import FIXTURES
from tests.processes import handlerctl


def test_the_default_worker_image_is_the_projects_at_this_version():
    assert images.DEFAULT_WORKER_IMAGE == f"ghcr.io/handler-operator/handler-worker:{__version__}"


def test_the_dockerfile_installs_requirements_as_root_and_runs_as_the_worker(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text(images.build_dockerfile("build.tar.gz", "registry.local/worker:1"))
    parsed = [(c.cmd.upper(), c.value) for c in dockerfile.parse_file(str(path))]
    assert parsed == [
        ("ARG", ("WORKER_IMAGE=registry.local/worker:1",)),
        ("FROM", ("${WORKER_IMAGE}",)),
        ("USER", ("root",)),
        ("COPY", ("requirements.txt", "/app/requirements.txt")),
        ("RUN", ("pip install -r /app/requirements.txt",)),
        ("ADD", ("build.tar.gz", "/app/")),
        ("USER", ("10001:10001",)),
    ]


@pytest.mark.parametrize("builder", images.BUILDERS)
def test_build_commands(builder):
    assert images.build_command(builder, "app:1", "/ctx", "w:1") == [
        builder, "build", "--tag", "app:1", "--build-arg", "WORKER_IMAGE=w:1", "/ctx",
    ]  # fmt: skip


def test_an_unknown_builder_is_refused():
    with pytest.raises(ValueError, match="use one of docker, podman, buildah"):
        images.build_command("kaniko", "app:1", "/ctx")


@pytest.fixture
def project(tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(FIXTURES / "remote_project", copy)
    return copy


@pytest.fixture
def fake_path(tmp_path):
    """PATH with stand-in builders (recording their arguments) and no docker engine."""

    def make(*builders: str, exit_code: int = 0) -> dict[str, str]:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        for name in builders:
            script = f'#!/bin/sh\necho "{name} $*" >> {tmp_path}/calls\nexit {exit_code}\n'
            (bin_dir / name).write_text(script)
            (bin_dir / name).chmod(0o755)
        return {"PATH": str(bin_dir)}  # no /usr/bin: the real podman stays out of sight

    return make


def calls(tmp_path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_build_writes_a_dockerfile_and_a_context_of_two_files(project, fake_path):
    done = handlerctl(
        "build", str(project), "--image", "app:1", "--builder", "none", env=fake_path()
    )
    assert done.returncode == 0, done.stderr
    out = project / ".handler_build"
    assert "ADD build.tar.gz /app/" in (out / "Dockerfile").read_text()
    assert (out / ".dockerignore").read_text() == "*\n!build.tar.gz\n!requirements.txt\n"
    assert "--builder none: build it with" in done.stdout
    assert (
        f"docker build --tag app:1 --build-arg WORKER_IMAGE={images.DEFAULT_WORKER_IMAGE} {out}"
        in done.stdout
    )


def test_builder_none_runs_no_builder_at_all(project, fake_path, tmp_path):
    """Not even `docker info` to choose one: --builder none only writes the context."""
    env = fake_path("docker", "podman", "buildah")
    done = handlerctl("build", str(project), "--image", "app:1", "--builder", "none", env=env)
    assert done.returncode == 0, done.stderr
    assert calls(tmp_path) == []


def test_the_archive_is_root_owned_readable_and_reproducible(project):
    archive = project / ".handler_build" / "build.tar.gz"
    assert handlerctl("build", str(project), "--builder", "none").returncode == 0
    first = archive.read_bytes()
    assert handlerctl("build", str(project), "--builder", "none").returncode == 0
    assert archive.read_bytes() == first
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    assert members and all((m.uid, m.gid, m.mode, m.mtime) == (0, 0, 0o644, 0) for m in members)


def test_without_image_it_says_the_default_image_lacks_the_code(project):
    done = handlerctl("build", str(project))
    assert done.returncode == 0, done.stderr
    assert "without this project's code: pass --image NAME" in done.stdout


@pytest.mark.parametrize(
    ("installed", "expected"), [(("podman", "buildah"), "podman"), (("buildah",), "buildah")]
)
def test_auto_picks_the_first_builder_found(project, tmp_path, fake_path, installed, expected):
    done = handlerctl("build", str(project), "--image", "app:1", env=fake_path(*installed))
    assert done.returncode == 0, done.stderr
    assert calls(tmp_path) == [
        f"{expected} build --tag app:1 --build-arg WORKER_IMAGE={images.DEFAULT_WORKER_IMAGE} "
        f"{project / '.handler_build'}"
    ]
    assert "image app:1 built in" in done.stdout


def test_a_docker_cli_without_an_engine_is_passed_over(project, tmp_path, fake_path):
    env = fake_path("docker", exit_code=1)  # `docker info` fails: no engine
    (tmp_path / "bin" / "podman").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "podman").chmod(0o755)
    done = handlerctl("build", str(project), "--image", "app:1", env=env)
    assert done.returncode == 0, done.stderr
    assert calls(tmp_path) == ["docker info"]
    assert "building app:1 with podman" in done.stderr


def test_no_builder_prints_the_command(project, fake_path):
    done = handlerctl("build", str(project), "--image", "app:1", env=fake_path())
    assert done.returncode == 0, done.stderr
    assert "no docker engine, podman or buildah found: build it with" in done.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--builder", "kaniko"), 2, "--builder must be auto, none or one of docker, podman"),
        (("--builder", "buildah"), 2, "buildah is not on PATH"),
    ],
)
def test_bad_builder_choices(project, fake_path, args, code, message):
    done = handlerctl("build", str(project), "--image", "app:1", *args, env=fake_path())
    assert done.returncode == code
    assert message in done.stderr


def test_a_failed_build_exits_4(project, fake_path):
    done = handlerctl(
        "build", str(project), "--image", "app:1", env=fake_path("podman", exit_code=3)
    )
    assert done.returncode == 4
    assert "podman build failed with exit code 3" in done.stderr
