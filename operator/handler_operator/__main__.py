"""Operator entry point: `python -m handler_operator` runs the kopf handlers.

Watches the namespaces in HANDLER_OPERATOR_NAMESPACES (comma separated) or the whole cluster;
serves kopf's liveness probe on HANDLER_OPERATOR_LIVENESS_PORT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from handler_operator.settings import ENV_PREFIX, OperatorSettings


def parser() -> argparse.ArgumentParser:
    """`--help` lists every setting (they all come from the environment)."""
    lines = []
    for name, field in OperatorSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        about = f" - {field.description}" if field.description else ""
        lines.append(f"  {ENV_PREFIX}{name.upper()} (default: {default!r}){about}")
    return argparse.ArgumentParser(
        prog="python -m handler_operator",
        description="Reconcile HandlerDeployments into worker Deployments and scale them on "
        "their gateway queues (kopf, standalone: one replica).",
        epilog="settings, from the environment:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: list[str] | None = None) -> int:
    parser().parse_args(argv)
    settings = OperatorSettings.from_env(os.environ)
    import kopf

    from handler_operator import handlers  # noqa: F401  (registers the handlers)

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
