"""Daemonless podman for the image tests: a private configuration and storage, and a Debian base
image made with mmdebstrap (no registry is reachable), as shared/design's recipe measured it.

`python -m tests.images.containers base` builds (or finds) the cached base tarball.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT

CACHE = REPO_ROOT / ".cache" / "images"
BASE_IMAGE = "localhost/handler-base:bookworm"
SUITE = "bookworm"  # Python 3.11, what the images' default base has
PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates,passwd"
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
TOOLS = ("podman", "buildah", "mmdebstrap", "runc")

# Root without CAP_SYS_RESOURCE needs explicit ulimits; no systemd: cgroupfs, file events and logs.
CONTAINERS_CONF = """\
[containers]
log_driver = "k8s-file"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 `.sources` or a one-line `sources.list`)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources + [Path("/etc/apt/sources.list")]:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split()
                if words[:1] == ["URIs:"] and "security" not in line:
                    return words[1]
                if words[:1] == ["deb"] and len(words) > 2 and words[2] == SUITE:
                    return words[1]
    return "http://deb.debian.org/debian"


def _customize_hooks() -> list[str]:
    """Trust the host's extra CAs (pip here goes through a TLS-intercepting proxy) and let pip
    install into the system like `python:3.11-slim` does (no PEP 668 marker)."""
    return [
        f'cp {EXTRA_CA_DIR}/*.crt "$1/usr/local/share/ca-certificates/" 2>/dev/null || true',
        'chroot "$1" update-ca-certificates',
        'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
        'printf "[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n" > "$1/etc/pip.conf"',
    ]


def base_tarball() -> Path:
    """The base's root filesystem as a tarball, cached by what goes into it."""
    mirror = debian_mirror()
    hooks = _customize_hooks()
    key = hashlib.sha256(repr((SUITE, PACKAGES, mirror, hooks)).encode())
    for cert in sorted(EXTRA_CA_DIR.glob("*.crt")):
        key.update(cert.read_bytes())
    tarball = CACHE / f"base-{SUITE}-{key.hexdigest()[:16]}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    for stale in CACHE.glob(f"base-{SUITE}-*.tar"):
        stale.unlink()
    partial = tarball.with_suffix(".partial.tar")
    command = ["mmdebstrap", "--variant=apt", f"--include={PACKAGES}", "--quiet"]
    command += [f"--customize-hook={hook}" for hook in hooks]
    made = subprocess.run(
        [*command, SUITE, str(partial), mirror], capture_output=True, text=True, timeout=900
    )
    if made.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"mmdebstrap failed:\n{made.stderr[-3000:]}")
    partial.rename(tarball)
    return tarball


@dataclass
class Podman:
    """podman (and buildah) with their configuration and storage under `root`."""

    root: Path

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "containers.conf").write_text(CONTAINERS_CONF)
        (self.root / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.root / "storage"}"\n'
            f'runroot = "{self.root / "run"}"\n'
        )

    @property
    def config(self) -> dict[str, str]:
        """The variables that point podman and buildah at this configuration and storage."""
        return {
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
        }

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.config}

    def __call__(
        self, *args: str, tool: str = "podman", timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [tool, *args], capture_output=True, text=True, timeout=timeout, env=self.env
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{tool} {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def image_size(self, image: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    def remove(self) -> None:
        """Remove every container and the storage (its overlay mount first)."""
        self("rm", "--all", "--force", "--time", "0", check=False)
        self("system", "reset", "--force", check=False)
        overlay = self.root / "storage" / "overlay"
        if overlay.is_dir():
            subprocess.run(["umount", "--lazy", str(overlay)], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["base"]:
        sys.exit("usage: python -m tests.images.containers base")
    print(base_tarball())
