"""Start-up speed-ups applied before the runpod SDK is imported (every worker start pays them).

The SDK's `rp_debugger` calls py-cpuinfo's `get_cpu_info()` at import only to name the processor;
that probe runs a Python subprocess (about 1.1 s here). We answer it from /proc/cpuinfo instead.
HANDLER_CPUINFO_PROBE=1 keeps the original probe.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Any

PROBE_ENV = "HANDLER_CPUINFO_PROBE"


def cpu_brand(cpuinfo_text: str) -> str:
    """The processor's name from /proc/cpuinfo text (x86 `model name`, arm `Model`/`Hardware`)."""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in cpuinfo_text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def install(env: Mapping[str, str] | None = None) -> bool:
    """Replace py-cpuinfo's probe with a /proc read; False when kept (opt-out or no py-cpuinfo)."""
    env = os.environ if env is None else env
    if env.get(PROBE_ENV) == "1":
        return False
    try:
        import cpuinfo
    except ImportError:
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        text = ""
    info: dict[str, Any] = {"brand_raw": cpu_brand(text), "arch": platform.machine()}
    cpuinfo.get_cpu_info = lambda: dict(info)
    return True
