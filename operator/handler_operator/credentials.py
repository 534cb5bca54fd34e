"""The chart's install hook: `python -m handler_operator.credentials` makes each generated Secret
(gateway keys, Redis password) once, with random values, and marks it kept; an existing value is
never changed, so `helm template` renders no secret and upgrades or GitOps syncs rotate nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import string
import sys

from handler_operator.builders import build_kept_secret_write
from handler_operator.clients import Conflict, KubeApi, NotFound, Refused, Unavailable

ALPHABET = string.ascii_letters + string.digits  # safe in URLs, redis.conf and env values
VALUE_LENGTH = 40
ATTEMPTS = 5


def new_value() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(VALUE_LENGTH))


def parse_secret(text: str) -> tuple[str, list[str]]:
    """`NAME=KEY[,KEY...]` (a chart value, so a malformed one is a chart bug, said plainly)."""
    name, _, keys = text.partition("=")
    wanted = [key for key in keys.split(",") if key]
    if not name or not wanted:
        raise argparse.ArgumentTypeError(f"expected NAME=KEY[,KEY...], got {text!r}")
    return name, wanted


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m handler_operator.credentials",
        description="Create the chart's generated Secrets once (random values, "
        "helm.sh/resource-policy: keep); add only keys they lack; never change a value.",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", ""),
        help="namespace of the Secrets (default: $POD_NAMESPACE)",
    )
    parser.add_argument(
        "--secret", action="append", type=parse_secret, required=True, metavar="NAME=KEY[,KEY]"
    )
    parser.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="label a new Secret"
    )
    return parser


async def ensure(
    kube: KubeApi, namespace: str, name: str, keys: list[str], labels: dict[str, str]
) -> str:
    """Make one Secret complete; what was done: created, completed or unchanged. A concurrent
    writer (a second hook run, a GitOps sync) is met by reading again, never by overwriting."""
    for _ in range(ATTEMPTS):
        existing = await kube.get("v1", "Secret", namespace, name)
        write = build_kept_secret_write(namespace, name, keys, labels, existing, new_value)
        if write is None:
            return "unchanged"
        verb, body = write
        try:
            if verb == "create":
                await kube.create(body)
                return "created"
            await kube.merge_patch("v1", "Secret", namespace, name, body)
            return "completed"
        except (Conflict, NotFound):
            continue  # created or changed meanwhile: look again
    raise Unavailable(f"Secret {namespace}/{name} kept changing; try again")


async def run(args: argparse.Namespace) -> None:
    labels = dict(label.partition("=")[::2] for label in args.label)
    kube = await KubeApi.connect()
    try:
        for name, keys in args.secret:
            done = await ensure(kube, args.namespace, name, keys, labels)
            print(f"Secret {args.namespace}/{name}: {done} ({', '.join(keys)})", flush=True)
    finally:
        await kube.close()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.namespace:
        print("error: --namespace (or $POD_NAMESPACE) is required", file=sys.stderr)
        return 2
    try:
        asyncio.run(run(args))
    except (Refused, Unavailable) as exc:  # refused (RBAC, admission) or unreachable
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
