"""What a scaling decision does through the gateway, shared by the operator's engine and
`handlerctl dev`: undrain, drain, and which workers are ready to go."""

from __future__ import annotations

from typing import Any

from handler_operator.scaling.policies import Decision


async def drain_workers(gateway: Any, endpoint: str, decision: Decision) -> list[str]:
    """Undrain and drain as `decision` says, on a gateway (admin client or in-process); returns
    the workers ready to go: the policy's `remove`, and drained ones that hold no job."""
    for worker in decision.undrain:
        await gateway.drain(endpoint, worker, False)
    ready_to_go = list(decision.remove)
    for worker in decision.drain:
        held = await gateway.drain(endpoint, worker, True)
        if not held and worker not in ready_to_go:
            ready_to_go.append(worker)
    return ready_to_go
