"""Container images, the pure part: the project's image names and tags, and the Dockerfile and
build command of a user's handler image (`handlerctl build --image`)."""

from __future__ import annotations

from handler_protocol import __version__

REGISTRY = "ghcr.io/handler-operator"
BUILDERS = ("docker", "podman", "buildah")  # tried in this order when none is named
RUN_AS = "10001:10001"  # the worker image's non-root user


def project_image(name: str, version: str = __version__, registry: str = REGISTRY) -> str:
    """One of the project's images (`handler-worker`, `handler-gateway`, `handler-operator`)."""
    return f"{registry}/{name}:{version}"


DEFAULT_WORKER_IMAGE = project_image("handler-worker")


def build_dockerfile(archive: str, worker_image: str = DEFAULT_WORKER_IMAGE) -> str:
    """A handler image: the worker image, the project's requirements, then its sources (the
    archive `handlerctl build` writes, unpacked into /app by ADD)."""
    return (
        "# syntax=docker/dockerfile:1\n"
        "# Written by `handlerctl build`: your project's code on the worker image.\n"
        "#   docker build -t IMAGE .   (from this directory)\n"
        f"ARG WORKER_IMAGE={worker_image}\n"
        "FROM ${WORKER_IMAGE}\n\n"
        "# The worker image's virtual environment is root's: install as root, run as the worker.\n"
        "USER root\n"
        "COPY requirements.txt /app/requirements.txt\n"
        "RUN pip install -r /app/requirements.txt\n"
        f"ADD {archive} /app/\n"
        f"USER {RUN_AS}\n"
    )


def build_dockerignore(*keep: str) -> str:
    """Send only `keep` to the builder (the context is the whole build directory)."""
    return "*\n" + "".join(f"!{name}\n" for name in keep)


def build_command(
    builder: str, image: str, context: str, worker_image: str | None = None
) -> list[str]:
    """The argv that builds `image` from `context` with docker, podman or buildah."""
    if builder not in BUILDERS:
        raise ValueError(f"unknown image builder {builder!r}: use one of {', '.join(BUILDERS)}")
    command = [builder, "build", "--tag", image]
    if worker_image:
        command += ["--build-arg", f"WORKER_IMAGE={worker_image}"]
    return [*command, context]
