"""start = "parallel": every child of the supervisor is forked before any is ready."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from otpd.errors import OtpdError

N = 6


def _config(fifo: Path, start: str) -> str:
    body = f'[[root.children]]\nid = "pool"\nsupervisor = "static"\nstart = "{start}"\n'
    for i in range(N):
        body += (f'\n[[root.children.children]]\nid = "w{i}"\nagent = "agents_for_tests:FifoInInit"\n'
                 f'args = {{ fifo = "{fifo}" }}\n')
    return body


def test_parallel_children_all_start_while_none_is_ready(daemon, tmp_path: Path) -> None:
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    d = daemon(_config(fifo, "parallel"), ready=False)
    d.log.wait_for(r"listening on")
    pids = [d.wait(f"w{i}", "starting")["pid"] for i in range(N)]  # every init is blocked on the FIFO
    assert all(pid is not None and psutil.Process(pid).ppid() == d.pid for pid in pids)
    for pid in pids:
        d.record_pid(pid)
    assert d.children()["pool"]["state"] == "starting"
    writer = os.open(fifo, os.O_WRONLY)  # held open: every reader's open, now or later, goes through
    try:
        d.wait("root", "running")
    finally:
        os.close(writer)
    assert {c: d.children()[c]["pid"] for c in (f"w{i}" for i in range(N))} == {f"w{i}": pids[i] for i in range(N)}


def test_serial_children_wait_for_the_one_before(daemon, tmp_path: Path) -> None:
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    d = daemon(_config(fifo, "serial"), ready=False)
    d.log.wait_for(r"listening on")
    d.record_pid(d.wait("w0", "starting")["pid"])
    with pytest.raises(OtpdError, match="timeout"):
        d.wait("w1", "starting", timeout=0.5)  # not started while w0's init is blocked
    for i in range(N):  # let each in turn through: a writer's open waits for the one reader there is
        os.close(os.open(fifo, os.O_WRONLY))
        d.record_pid(d.wait(f"w{i}", "running")["pid"])
    d.wait("root", "running")
