"""The parent watch: a worker handlerctl dev started ends, with its process group, once
handlerctl is gone; without HANDLER_PARENT_PID nothing is watched."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from handler_worker.parents import parent_gone, watch_parent
from tests.processes import alive, subprocess_env


def test_nothing_is_watched_without_a_parent_pid():
    assert watch_parent({}) is None
    assert watch_parent({"HANDLER_PARENT_PID": "not-a-pid"}) is None


def test_a_parent_is_gone_once_this_process_was_re_parented():
    assert not parent_gone(42, current=lambda: 42)
    assert parent_gone(42, current=lambda: 1)


def test_the_process_group_ends_when_the_parent_goes(tmp_path):
    """A parent starts a "worker" (its own session, watching the parent) that starts a child
    of its own; the parent exits: the worker and its child end."""
    pids = tmp_path / "pids"
    worker = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        from handler_worker.parents import watch_parent
        watch_parent(os.environ, interval=0.05)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(60)
        """
    )
    parent = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        env = dict(os.environ, HANDLER_PARENT_PID=str(os.getpid()))
        subprocess.Popen([sys.executable, "-c", {worker!r}], env=env, start_new_session=True)
        while not os.path.exists({str(pids)!r}) or not open({str(pids)!r}).read():
            time.sleep(0.05)
        """
    )
    subprocess.run([sys.executable, "-c", parent], env=subprocess_env(), timeout=60, check=True)
    started = [int(pid) for pid in pids.read_text().split()]
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in started if alive(pid)]
