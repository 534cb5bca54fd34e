"""How long to wait before trying the gateway again: doubling with each failure in a row, capped,
and jittered so the workers of one endpoint do not retry in step after an outage."""

from __future__ import annotations

import random

JITTER = 0.5  # each wait is its base ± this share


def backoff(failures: int, first: float, most: float) -> float:
    """The wait after the `failures`-th failure in a row (1: the first): `first`, doubled with
    each further failure up to `most`, ± JITTER."""
    base = min(most, first * 2 ** (max(failures, 1) - 1))
    return base * random.uniform(1 - JITTER, 1 + JITTER)
