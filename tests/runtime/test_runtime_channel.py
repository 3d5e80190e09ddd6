"""The child's loop on a real socketpair, without a daemon: what a read brings is never stranded."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from otpd import codec
from otpd.agent.runtime import Runtime
from otpd.core.spec import AgentSpec
from otpd.store.lmdb_store import StoreSettings


def test_frames_that_arrive_with_a_system_reply_join_the_backlog() -> None:
    ours, theirs = socket.socketpair()
    try:
        runtime = Runtime(theirs, AgentSpec(id="a", agent="otpd.agents.echo:EchoAgent"))
        call = [7, "ping"]
        # The reply to the agent's request and a client's call arrive in one read: before the fix
        # the call stayed in the decoder and the loop slept on a socket with nothing left to read.
        ours.sendall(codec.pack({"t": "sysreply", "ref": 1, "ok": True, "result": {"x": 1}}) + codec.pack(call))
        assert runtime.system("ps", {}, timeout=5.0) == {"x": 1}
        assert runtime.backlog == [call]
        assert list(runtime.unpacker) == []
    finally:
        ours.close()
        theirs.close()


def test_a_commit_schedules_a_checkpoint_and_the_checkpoint_empties_the_log(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    settings = StoreSettings(path=tmp_path / "store", checkpoint_ms=250)
    runtime = Runtime(theirs, AgentSpec(id="kv", agent="otpd.agents.kv:KVAgent"), settings)
    try:
        agent, keeper = runtime._start()
        assert runtime._timeout() is None  # nothing written: nothing to wake up for
        agent.handle_call({"op": "put", "key": "a", "value": 1})
        before = time.monotonic()
        runtime._commit_then_send([[1, True, "ok"]])
        ref, ok, result, seq = codec.unpack(ours.recv(4096))  # the reply carries the commit's seq
        assert (ref, ok, seq) == (1, True, keeper.seq)
        store = runtime.store
        assert store is not None and store.pending_log()
        assert before + 0.25 <= runtime.next_checkpoint <= time.monotonic() + 0.25
        timeout = runtime._timeout()
        assert timeout is not None and timeout <= 0.25  # the loop wakes for it
        runtime._checkpoint()
        assert not store.pending_log() and runtime.next_checkpoint == float("inf")
        assert store._lmdb_raw("kv") is not None
        store.close()
    finally:
        ours.close()
        theirs.close()


def test_a_timer_set_while_timers_fire_waits_for_the_next_turn_even_if_the_clock_stands_still(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """send_after(0, ...) from handle_info means "after this turn's commit": with a coarse
    clock (the same reading for the whole pass) it must still not fire in the same pass."""
    from otpd.agent import runtime as rt_module
    from otpd.agent.base import Agent

    seen: list[str] = []

    class Chain(Agent):
        def handle_info(self, message: object) -> None:
            seen.append(str(message))
            if message == "first":
                self.send_after(0, "second")

    ours, theirs = socket.socketpair()
    try:
        runtime = Runtime(theirs, AgentSpec(id="c", agent="x:Chain"))
        agent = Chain("c", {}, runtime)
        monkeypatch.setattr(rt_module.time, "monotonic", lambda: 100.0)  # a clock that does not move
        agent.send_after(0, "first")
        runtime._fire_timers(agent)
        assert seen == ["first"]
        runtime._fire_timers(agent)
        assert seen == ["first", "second"]
    finally:
        ours.close()
        theirs.close()


def test_end_after_commit_ends_the_process_even_when_the_commit_fails() -> None:
    """In a forked child: a batch whose commit raises store_full still ends the process with
    the status asked for, after its replies (errors now) went out, and runs no callback."""
    import os

    from otpd.errors import OtpdError

    class FailingKeeper:
        def commit(self) -> bool:
            raise OtpdError("store_full", "full")

    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            runtime = Runtime(theirs, AgentSpec(id="a", agent="otpd.agents.echo:EchoAgent"))
            runtime.keeper = FailingKeeper()  # type: ignore[assignment]
            runtime.ending = 75
            runtime.after.append(lambda: os._exit(1))
            runtime._commit_then_send([[3, True, "ok"]])
        finally:
            os._exit(2)
    theirs.close()
    try:
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 75
        ref, ok, error = codec.unpack(ours.recv(4096))
        assert (ref, ok, error["code"]) == (3, False, "store_full")
    finally:
        ours.close()


def test_a_spare_counts_its_limits_from_its_go_not_from_its_fork() -> None:
    """A spare waits, maybe for hours; the limits counted from the loop's last wake-up (the
    links' drain before an end: half of what is left of heartbeat_timeout_ms) counted from its
    fork, so its first batch found them spent and sent no queued reply."""
    ours, theirs = socket.socketpair()
    try:
        runtime = Runtime(theirs, AgentSpec(id="a", agent="otpd.agents.echo:EchoAgent"))
        runtime.woke_at -= 3600.0  # forked an hour ago
        ours.sendall(codec.pack({"t": "go", "flags": {}}))
        before = time.monotonic()
        assert runtime.await_go()
        assert before <= runtime.woke_at <= time.monotonic()
    finally:
        ours.close()
        theirs.close()


def test_a_stop_is_timed_from_its_sigterm_not_from_when_the_loop_reads_it() -> None:
    """The drain before a stopped agent ends gets half of what is left of shutdown_ms; that was
    counted from when the loop read the wake-up fd, so a loop busy in a long call when the
    SIGTERM came took more than the daemon would wait, and was SIGKILLed with replies queued."""
    ours, theirs = socket.socketpair()
    old = signal.getsignal(signal.SIGTERM)
    try:
        runtime = Runtime(theirs, AgentSpec(id="a", agent="otpd.agents.echo:EchoAgent"))
        signal.signal(signal.SIGTERM, runtime._on_sigterm)  # as run() sets it
        before = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)  # (Python runs the handler before the next line)
        assert runtime.stop_at is not None and before <= runtime.stop_at <= time.monotonic()
        came = runtime.stop_at
        runtime._on_signals(bytes([signal.SIGTERM]))  # the loop reads the wake-up fd, later
        assert runtime.stopping == "shutdown" and runtime.stop_at == came
    finally:
        signal.signal(signal.SIGTERM, old)
        ours.close()
        theirs.close()
