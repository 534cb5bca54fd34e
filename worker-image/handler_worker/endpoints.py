"""The arguments `@remote` takes: what the decorator and `handlerctl build`'s AST scan agree
on. Pure."""

from __future__ import annotations

# name -> (accepted literal types, what it means); all literals, so the build can read them.
REMOTE_OPTIONS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "endpoint": (str, "endpoint name (default: the function or class name)"),
    "gpu": (int, "GPUs per worker (default 0)"),
    "gpu_vendor": (str, "nvidia or amd"),
    "gpu_product": (str, "GPU product label, e.g. NVIDIA-A100-SXM4-80GB"),
    "cpu": ((str, int, float), "CPU request, e.g. '4'"),
    "memory": (str, "memory request, e.g. '16Gi'"),
    "min_workers": (int, "workers kept at all times (default 0)"),
    "max_workers": (int, "most workers at once (default 1)"),
    "dependencies": (list, "pip requirements of the function (list of strings)"),
}
