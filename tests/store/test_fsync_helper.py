"""durability = "fsync": the log synced by a helper process while the agent goes on (runtime.Syncer).

Real processes and signals: the helper is SIGSTOPped to hold a sync, SIGKILLed to lose it."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psutil
import pytest

from otpd.errors import OtpdError
from tests.conftest import wait_pid_exit

FSYNC_KV = """
[store]
durability = "fsync"
sync_helper = "always"  # (auto syncs inline when nothing waits: a test's lone call would)

[root]
max_restarts = 1000
max_seconds = 1

[[root.children]]
id = "kv"
agent = "otpd.agents.kv:KVAgent"
"""


def helper_of(agent_pid: int) -> psutil.Process:
    helpers = [p for p in psutil.Process(agent_pid).children() if "otpd: sync kv" in " ".join(p.cmdline())]
    assert len(helpers) == 1, helpers
    return helpers[0]


def test_the_helper_keeps_only_its_socket_and_the_log_and_dies_with_the_agent(daemon: Any) -> None:
    d = daemon(FSYNC_KV)
    with d.attach("kv") as kv:
        kv.call({"op": "put", "key": "a", "value": 1})
        helper = helper_of(kv.pid)
        fds = {f.path for f in helper.open_files()}
        assert [p for p in fds if p.endswith("kv.log")] and len(fds) == 1, fds  # no LMDB, no other file
        assert len(os.listdir(f"/proc/{helper.pid}/fd")) == 3 + 2  # stdio, its socket, the log
        os.kill(kv.pid, signal.SIGKILL)
    assert wait_pid_exit(helper.pid, 10)  # PR_SET_PDEATHSIG; reaped by the daemon (a subreaper)
    d.wait("kv", "running", not_pid=kv.pid)
    with d.attach("kv") as kv:
        assert kv.call({"op": "get", "key": "a"}) == {"found": True, "value": 1}


def test_no_reply_goes_out_before_the_sync_that_covers_it(daemon: Any) -> None:
    d = daemon(FSYNC_KV)
    with d.attach("kv") as kv, d.client(timeout=10) as other:
        kv.call({"op": "put", "key": "a", "value": 1})
        helper = helper_of(kv.pid)
        os.kill(helper.pid, signal.SIGSTOP)  # the next sync is asked for but not done
        try:
            put = kv.send({"op": "put", "key": "b", "value": 2})
            kv.client.sock.settimeout(0.5)
            with pytest.raises(OtpdError) as err:
                kv.receive()  # a reply now would acknowledge what a power cut could take back
            assert err.value.code == "timeout"
            # a read that comes after it waits too: it would show the unsynced put
            with pytest.raises(OtpdError) as err:
                other.call("kv", {"op": "get", "key": "b"}, timeout=0.5)
            assert err.value.code == "timeout"
        finally:
            os.kill(helper.pid, signal.SIGCONT)
        kv.client.sock.settimeout(10)
        assert kv.receive() == [put, True, {"ok": True, "len": 2}]
        assert other.call("kv", {"op": "get", "key": "b"}) == {"found": True, "value": 2}


def test_without_its_helper_the_agent_syncs_inline_and_keeps_what_it_acknowledged(daemon: Any) -> None:
    d = daemon(FSYNC_KV)
    with d.attach("kv") as kv:
        kv.call({"op": "put", "key": "a", "value": 1})
        helper = helper_of(kv.pid)
        os.kill(helper.pid, signal.SIGKILL)
        assert wait_pid_exit(helper.pid, 10)
        replies = kv.pipeline([{"op": "put", "key": i, "value": i} for i in range(50)])
        assert replies[-1] == {"ok": True, "len": 51}
        d.log.wait_for(r"kv: .*the sync helper \(pid \d+\) is gone; syncing the log inline")
        assert kv.pid == d.pid_of("kv")  # the same agent goes on
        assert psutil.Process(kv.pid).children() == []  # and it reaped its helper
        os.kill(kv.pid, signal.SIGKILL)
    d.wait("kv", "running", not_pid=kv.pid)
    with d.attach("kv") as kv:
        assert kv.call({"op": "len"}) == {"len": 51, "puts": 51}


def test_a_sync_that_hangs_ends_the_agent_as_a_hung_agent_would(daemon: Any) -> None:
    d = daemon(FSYNC_KV + "heartbeat_timeout_ms = 300\n")
    with d.attach("kv") as kv:
        kv.call({"op": "put", "key": "a", "value": 1})
        os.kill(helper_of(kv.pid).pid, signal.SIGSTOP)
        kv.send({"op": "put", "key": "b", "value": 2})
        with pytest.raises(OtpdError) as err:
            kv.receive()  # never answered: the agent ends once the sync is 300 ms late
        assert err.value.code == "agent_down"
    d.wait("kv", "running", not_pid=kv.pid)
    d.log.wait_for(r"the log's sync has not finished in 300 ms")
    with d.attach("kv") as kv:
        assert kv.call({"op": "get", "key": "a"}) == {"found": True, "value": 1}


def test_the_sync_helper_does_not_take_the_agents_signals(daemon: Any) -> None:
    """A signal to the helper must not reach the agent's loop (through the wake-up fd they shared)."""
    d = daemon(FSYNC_KV)
    with d.attach("kv") as kv:
        kv.call({"op": "put", "key": "a", "value": 1})
        helper = helper_of(kv.pid)
        os.kill(helper.pid, signal.SIGTERM)  # default action: the helper ends, alone
        assert wait_pid_exit(helper.pid, 10)
        assert kv.call({"op": "put", "key": "b", "value": 2}) == {"ok": True, "len": 2}
        assert kv.pid == d.pid_of("kv")


def test_auto_syncs_inline_when_nothing_waits_and_never_forks_no_helper(daemon: Any) -> None:
    d = daemon(FSYNC_KV.replace('sync_helper = "always"', 'sync_helper = "auto"'))
    with d.attach("kv") as kv:
        kv.call({"op": "put", "key": "a", "value": 1})
        helper = helper_of(kv.pid)
        os.kill(helper.pid, signal.SIGSTOP)  # a lone call is synced by the agent itself
        try:
            assert kv.call({"op": "put", "key": "b", "value": 2}) == {"ok": True, "len": 2}
        finally:
            os.kill(helper.pid, signal.SIGCONT)
    d2 = daemon(FSYNC_KV.replace('sync_helper = "always"', 'sync_helper = "never"'))
    with d2.attach("kv") as kv:
        assert kv.pipeline([{"op": "put", "key": i, "value": i} for i in range(20)])[-1] == {"ok": True, "len": 20}
        assert psutil.Process(kv.pid).children() == []
        os.kill(kv.pid, signal.SIGKILL)
    d2.wait("kv", "running", not_pid=kv.pid)
    with d2.attach("kv") as kv:
        assert kv.call({"op": "len"}) == {"len": 20, "puts": 20}


def test_an_agent_that_ends_after_its_commit_answers_first_while_a_sync_is_in_flight(daemon: Any) -> None:
    """The batch that ends the agent waits for the sync in flight, then its own: its reply goes
    out before the process ends (it was lost when finishing the sync in flight ended it)."""
    from pathlib import Path

    d = daemon(FSYNC_KV.replace("otpd.agents.kv:KVAgent", "tests.store.state_agents:EndingKV"))
    state_dir = Path(next(line.split('"')[1] for line in d.config_path.read_text().splitlines()
                          if "state_dir" in line))
    log = state_dir / "store" / "logs" / "kv.log"
    with d.attach("kv") as kv:
        kv.call({"op": "put", "key": "a", "value": 1})
        helper = helper_of(kv.pid)
        os.kill(helper.pid, signal.SIGSTOP)
        try:
            size = log.stat().st_size
            put = kv.send({"op": "put", "key": "b", "value": 2})
            deadline = time.monotonic() + 10
            while log.stat().st_size == size:  # b's entry written: its sync is asked for, and held
                assert time.monotonic() < deadline, "the put was not committed"
            end = kv.send({"op": "end"})
        finally:
            os.kill(helper.pid, signal.SIGCONT)
        assert kv.receive() == [put, True, {"ok": True, "len": 2}]
        assert kv.receive() == [end, True, {"ending": True}]
    d.wait("kv", "running", not_pid=kv.pid)
    with d.attach("kv") as kv:
        assert kv.call({"op": "len"}) == {"len": 2, "puts": 3}
