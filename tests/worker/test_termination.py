"""The termination-log writer: truncation to Kubernetes' limit and no exceptions on failure."""

from __future__ import annotations

from handler_worker.termination import TERMINATION_MESSAGE_LIMIT, write_termination_message


def test_writes_the_message(tmp_path):
    path = tmp_path / "log"
    assert write_termination_message("boom", str(path))
    assert path.read_text() == "boom"


def test_keeps_the_tail_of_long_messages(tmp_path):
    path = tmp_path / "log"
    write_termination_message("x" * 10_000 + "THE END", str(path))
    data = path.read_bytes()
    assert len(data) == TERMINATION_MESSAGE_LIMIT
    assert data.endswith(b"THE END") and data.startswith(b"...")


def test_unwritable_path_is_ignored(tmp_path):
    assert write_termination_message("boom", str(tmp_path / "missing-dir" / "log")) is False
