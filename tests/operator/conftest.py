"""Operator test helpers: example CRs, and loading them through the pydantic models."""

from __future__ import annotations

from pathlib import Path

import yaml

from handler_operator.models import HandlerDeployment
from tests.conftest import EXAMPLES

GOLDEN = Path(__file__).resolve().parent / "golden"
EXAMPLE_CRS = sorted(EXAMPLES.glob("*/handlerdeployment.yaml"))


def load_cr(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def parse_cr(body: dict, namespace: str = "default") -> HandlerDeployment:
    body = {**body, "metadata": {"namespace": namespace, **body["metadata"]}}
    return HandlerDeployment.model_validate(body)
