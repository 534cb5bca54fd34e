"""A project's Python sources as `handlerctl build` and `handlerctl dev` read them: relative
POSIX path -> text, without hidden, cache, virtualenv and build directories."""

from __future__ import annotations

from pathlib import Path

SKIPPED_DIRS = {"__pycache__", "venv", "site-packages", "node_modules", "build", "dist"}


def read_sources(project: Path, skip: Path | None = None) -> dict[str, str]:
    """The project's .py files (relative POSIX path -> text), without hidden and build dirs
    (nor anything under `skip`, the build's output)."""
    sources = {}
    for path in sorted(project.rglob("*.py")):
        relative = path.relative_to(project)
        if (skip is not None and path.is_relative_to(skip)) or any(
            part.startswith(".") or part in SKIPPED_DIRS for part in relative.parts[:-1]
        ):
            continue
        sources[relative.as_posix()] = path.read_text(encoding="utf-8", errors="replace")
    return sources
