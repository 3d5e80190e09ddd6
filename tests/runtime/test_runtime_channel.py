"""The child's loop on a real socketpair, without a daemon: what a read brings is never stranded."""

from __future__ import annotations

import socket

from otpd import codec
from otpd.agent.runtime import Runtime
from otpd.core.spec import AgentSpec


def test_frames_that_arrive_with_a_system_reply_join_the_backlog() -> None:
    ours, theirs = socket.socketpair()
    try:
        runtime = Runtime(theirs, AgentSpec(id="a", agent="otpd.agents.echo:EchoAgent"))
        call = {"t": "call", "ref": 7, "req": "ping"}
        # The reply to the agent's request and a client's call arrive in one read: before the fix
        # the call stayed in the decoder and the loop slept on a socket with nothing left to read.
        ours.sendall(codec.pack({"t": "sysreply", "ref": 1, "ok": True, "result": {"x": 1}}) + codec.pack(call))
        assert runtime.system("ps", {}, timeout=5.0) == {"x": 1}
        assert runtime.backlog == [call]
        assert list(runtime.unpacker) == []
    finally:
        ours.close()
        theirs.close()
