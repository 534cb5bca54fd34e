"""One version everywhere: pyproject.toml's, in the worker package, the operator's default worker
image, and every image reference of ours in the examples and Dockerfiles (the chart's own check is
in tests/chart). A release bumps pyproject and these follow or fail here."""

from __future__ import annotations

import re
import tomllib

import pytest

from handler_operator import images
from handler_operator.settings import OperatorSettings
from handler_worker import __version__
from tests.conftest import REPO_ROOT

VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
OUR_IMAGE = re.compile(r"ghcr\.io/handler-operator/([a-z0-9-]+):([A-Za-z0-9._-]+)")
FILES = sorted(
    path.relative_to(REPO_ROOT).as_posix()
    for pattern in ("examples/**/*.yaml", "**/Dockerfile", "README.md", "tests/operator/golden/*")
    for path in REPO_ROOT.glob(pattern)
    if ".cache" not in path.parts and "build" not in path.parts
)


def test_the_package_and_the_default_image_carry_the_version():
    assert __version__ == VERSION
    assert OperatorSettings().default_image == images.DEFAULT_WORKER_IMAGE
    assert images.DEFAULT_WORKER_IMAGE.endswith(f"/handler-worker:{VERSION}")


@pytest.mark.parametrize("relative", FILES)
def test_our_image_references_carry_the_version(relative):
    text = (REPO_ROOT / relative).read_text()
    stale = {m.group(0) for m in OUR_IMAGE.finditer(text) if m.group(2) != VERSION}
    assert not stale, f"{relative}: {sorted(stale)} (the version is {VERSION})"


def test_the_files_checked_include_the_examples_and_dockerfiles():
    assert "examples/hello/Dockerfile" in FILES and "examples/hello/handlerdeployment.yaml" in FILES
    assert {"worker-image/Dockerfile", "operator/Dockerfile"} <= set(FILES)
