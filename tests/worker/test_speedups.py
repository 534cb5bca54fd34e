"""The worker's start-up speed-up: py-cpuinfo's subprocess probe answered from /proc/cpuinfo."""

from __future__ import annotations

import subprocess
import sys

import pytest

from handler_worker import speedups
from tests.conftest import subprocess_env

X86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6248\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4\n"


@pytest.mark.parametrize(
    ("text", "brand"),
    [(X86, "Intel(R) Xeon(R) Gold 6248"), (ARM, "Raspberry Pi 4"), ("model name\t:\n", None)],
    ids=["x86", "arm", "empty"],
)
def test_cpu_brand_from_proc_cpuinfo(text, brand):
    found = speedups.cpu_brand(text)
    assert found == brand if brand else found


def test_install_replaces_the_probe_and_can_be_turned_off(monkeypatch):
    cpuinfo = pytest.importorskip("cpuinfo")
    original = cpuinfo.get_cpu_info
    monkeypatch.setattr(cpuinfo, "get_cpu_info", original)
    assert speedups.install({speedups.PROBE_ENV: "1"}) is False
    assert cpuinfo.get_cpu_info is original
    assert speedups.install({}) is True
    assert cpuinfo.get_cpu_info is not original
    assert cpuinfo.get_cpu_info()["brand_raw"]


def test_the_sdk_sees_the_processor_name_without_probing():
    code = (
        "from handler_worker import speedups; speedups.install(); "
        "import cpuinfo; cpuinfo.get_cpu_info_json = None; "  # the probe must not run
        "from runpod.serverless.utils import rp_debugger; print(rp_debugger.PROCESSOR)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "Unable" not in result.stdout
