"""Operator entry point: `python -m handler_operator` runs the kopf handlers.

Watches the namespaces in HANDLER_OPERATOR_NAMESPACES (comma separated) or the whole cluster;
serves kopf's liveness probe on HANDLER_OPERATOR_LIVENESS_PORT.
"""

from __future__ import annotations

import asyncio
import os
import sys

import kopf

from handler_operator import handlers  # noqa: F401  (registers the handlers)
from handler_operator.settings import OperatorSettings


def main() -> int:
    settings = OperatorSettings.from_env(os.environ)
    # What `kopf run` does first: without it the operator's pod logs nothing at all.
    kopf.configure(verbose=settings.log_level.upper() == "DEBUG")
    asyncio.run(
        kopf.operator(
            # One replica with the Recreate strategy (the chart's Deployment): no kopf peering,
            # so no peering CRDs or permissions on them, even where other kopf operators run.
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
