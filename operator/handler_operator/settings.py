"""Operator settings (pydantic): from HANDLER_OPERATOR_* environment variables or flags.

Pure model; `from_env` reads a mapping you pass in.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, Field

from handler_operator import images

ENV_PREFIX = "HANDLER_OPERATOR_"
FIELD_MANAGER = "handler-operator"


class OperatorSettings(BaseModel):
    gateway_url: str = Field(
        "http://handler-gateway.handler-operator.svc:8080",
        description="Gateway URL as workers reach it (in-cluster Service)",
    )
    gateway_admin_url: str | None = Field(
        None, description="Gateway URL the operator calls (default: gateway_url)"
    )
    gateway_admin_key: str = ""
    default_image: str = Field(
        images.DEFAULT_WORKER_IMAGE, description="worker image of HandlerDeployments naming none"
    )
    namespaces: list[str] = Field(default_factory=list, description="watched; empty: cluster-wide")
    gpu_tolerations: bool = Field(True, description="tolerate the vendor's GPU taint by default")
    termination_grace_extra_seconds: int = 30
    termination_grace_max_seconds: int = Field(
        3600,
        description="cap of a worker pod's termination grace period (execution timeout + extra): "
        "node drains and cluster autoscalers wait for it",
    )
    metrics_port: int = Field(8081, description="0 turns the metrics server off")
    liveness_port: int = 8080
    purge_on_delete: bool = Field(
        False, description="cancel queued jobs when a HandlerDeployment is deleted (else drain)"
    )
    drain_timeout_seconds: int = 600
    deregister_timeout_seconds: int = Field(
        60,
        description="seconds a deleted HandlerDeployment waits for an unreachable gateway; then "
        "it is removed anyway, with a Warning event (uninstalls never hang)",
    )
    log_level: str = Field("INFO", description="INFO, or DEBUG for kopf's debug lines")

    @property
    def admin_url(self) -> str:
        return self.gateway_admin_url or self.gateway_url

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorSettings:
        values: dict[str, object] = {}
        for name, field in cls.model_fields.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            if field.annotation is bool:
                values[name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif name == "namespaces":
                values[name] = [n.strip() for n in raw.split(",") if n.strip()]
            else:
                values[name] = raw
        return cls.model_validate(values)
