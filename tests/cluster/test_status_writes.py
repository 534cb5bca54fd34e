"""Conditions are written per type against the real apiserver: concurrent writers of different
condition types (the reconcile, the pod and Deployment watches, the scaler) never lose each
other's conditions, thanks to the resourceVersion precondition and a re-read on conflict."""

from __future__ import annotations

import asyncio

from handler_operator import conditions
from handler_operator.clients import KubeApi
from tests.cluster.conftest import make_namespace

HD = "handlerops.dev/v1alpha1"


def test_concurrent_writers_of_different_conditions_lose_nothing(
    crd_installed, kubectl, control_plane
):
    assert crd_installed
    ns = make_namespace(kubectl)
    kubectl.apply(
        {
            "apiVersion": HD,
            "kind": "HandlerDeployment",
            "metadata": {"name": "busy"},
            "spec": {"handler": {"module": "handler"}},
        },
        ns,
    )

    async def write_all() -> int:
        kube = await KubeApi.connect(control_plane.kubeconfig)
        try:
            writes = [
                kube.update_conditions(
                    HD,
                    "HandlerDeployment",
                    ns,
                    "busy",
                    [
                        conditions.condition(
                            type_, True, "Testing", f"{type_} write {n}", "2026-12-03T00:00:00Z", 1
                        )
                    ],
                    {"replicas": n} if type_ == conditions.READY else None,
                    attempts=50,
                )  # fmt: skip
                for n in range(6)
                for type_ in conditions.TYPES
            ]
            assert all(await asyncio.gather(*writes))
            return kube.writes
        finally:
            await kube.close()

    writes = asyncio.run(write_all())
    stored = kubectl.get("hd", "busy", ns)["status"]
    assert [c["type"] for c in stored["conditions"]] == list(conditions.TYPES)
    assert all(c["observedGeneration"] == 1 for c in stored["conditions"])
    assert writes >= len(conditions.TYPES) * 6  # every write went through (conflicts: again)
