"""Build and start the real control plane (`tests/cluster/harness`, Go): kube-apiserver, etcd,
controller-manager and scheduler from the pinned k8s.io modules, cached by source hash.

`python -m tests.cluster.harness build` builds it (CI); `python -m tests.cluster.harness up DIR`
runs one for a developer until Ctrl-C (then `export KUBECONFIG=DIR/admin.kubeconfig`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT

SOURCE = Path(__file__).resolve().parent / "harness"
CACHE = REPO_ROOT / ".cache" / "kube"
GO_FALLBACK = Path("/usr/local/go/bin/go")
GO_MINIMUM = (1, 24)  # what k8s.io/kubernetes v1.34 needs


class HarnessError(RuntimeError):
    """The control plane could not be built or started (a test fails with this, never skips)."""


def source_digest() -> str:
    """Hash of go.mod, go.sum and the Go sources: a change to any of them rebuilds."""
    digest = hashlib.sha256()
    for path in sorted([SOURCE / "go.mod", SOURCE / "go.sum", *SOURCE.glob("*.go")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def kubernetes_release() -> str:
    """The k8s.io/kubernetes version pinned in go.mod (e.g. v1.34.4)."""
    match = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", (SOURCE / "go.mod").read_text(), re.M)
    if not match:
        raise HarnessError("go.mod does not pin k8s.io/kubernetes")
    return match.group(1)


def binary_path() -> Path:
    return CACHE / source_digest() / "kube-harness"


def _go_version(go: str) -> tuple[int, ...]:
    result = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True)
    match = re.match(r"go(\d+)\.(\d+)", result.stdout.strip())
    return tuple(int(part) for part in match.groups()) if match else (0,)


def go_command() -> str:
    """A Go toolchain new enough for the pinned release: `go` on PATH, else /usr/local/go."""
    candidates = [shutil.which("go"), str(GO_FALLBACK) if GO_FALLBACK.exists() else None]
    for go in filter(None, candidates):
        if _go_version(go) >= GO_MINIMUM:
            return go
    raise HarnessError(
        f"no Go {'.'.join(map(str, GO_MINIMUM))}+ toolchain (looked on PATH and at {GO_FALLBACK})"
    )


def build(verbose: bool = False) -> Path:
    """The harness binary, built once per source hash (Go's build cache makes rebuilds quick)."""
    target = binary_path()
    if target.exists():
        return target
    release = kubernetes_release()
    major, minor = release.lstrip("v").split(".")[:2]
    version_pkg = "k8s.io/component-base/version"
    ldflags = " ".join(
        [
            "-s -w",
            f"-X {version_pkg}.gitVersion={release}",
            f"-X {version_pkg}.gitMajor={major}",
            f"-X {version_pkg}.gitMinor={minor}",
            f"-X {version_pkg}.gitTreeState=clean",
            f"-X k8s.io/client-go/pkg/version.gitVersion={release}",
        ]
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    started = time.monotonic()
    result = subprocess.run(
        [go_command(), "build", "-buildvcs=false", "-ldflags", ldflags, "-o", str(partial), "."],
        cwd=SOURCE,
        env={**os.environ, "CGO_ENABLED": "0"},
        capture_output=not verbose,
        text=True,
    )
    if result.returncode != 0:
        raise HarnessError(f"building the control plane failed:\n{(result.stderr or '')[-4000:]}")
    partial.rename(target)
    for stale in CACHE.iterdir():  # binaries of earlier sources (120 MB each)
        if stale != target.parent:
            shutil.rmtree(stale, ignore_errors=True)
    if verbose:
        print(f"built {target} ({release}) in {time.monotonic() - started:.0f} s")
    return target


@dataclass
class ControlPlane:
    """A running control plane: its admin kubeconfig, server URL and state directory."""

    directory: Path
    process: subprocess.Popen
    ready: dict

    @property
    def kubeconfig(self) -> str:
        return self.ready["kubeconfig"]

    @property
    def server(self) -> str:
        return self.ready["server"]

    @property
    def ca_file(self) -> str:
        return self.ready["caFile"]

    def log(self, component: str) -> Path:
        return self.directory / "logs" / f"{component}.log"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start(directory: Path, controllers: bool = True, timeout: float = 120) -> ControlPlane:
    """Start the control plane on free ports with its state in `directory`; wait until ready."""
    binary = build()
    directory.mkdir(parents=True, exist_ok=True)
    args = [str(binary), "up", "--dir", str(directory), "--exit-with-parent"]
    if not controllers:
        args.append("--apiserver-only")
    log = open(directory / "up.log", "w")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ready_file = directory / "ready.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready_file.exists():
            return ControlPlane(directory, process, json.loads(ready_file.read_text()))
        if process.poll() is not None:
            break
        time.sleep(0.1)
    ControlPlane(directory, process, {}).stop()
    raise HarnessError(
        f"the control plane did not start (exit {process.poll()}):\n"
        + (directory / "up.log").read_text()[-4000:]
    )


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        print(build(verbose=True))
        return 0
    if argv[:1] == ["up"] and len(argv) == 2:
        plane = start(Path(argv[1]).resolve())
        print(
            f"ready in {plane.ready['startupSeconds']:.1f} s: export KUBECONFIG={plane.kubeconfig}"
        )
        try:
            plane.process.wait()
        except KeyboardInterrupt:
            plane.stop()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
