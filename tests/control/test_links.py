"""Attached links (``attach``): a client's connection handed to an agent, its calls answered there.

A real daemon, the real socket, real SIGKILLs; the fd goes over the agent's channel (SCM_RIGHTS)."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from otpd import codec
from otpd.client import Link
from otpd.control import protocol
from otpd.errors import OtpdError
from otpd.store.lmdb_store import Store, encode

KV = """
[root]
max_restarts = 1000
max_seconds = 1

[[root.children]]
id = "kv"
agent = "otpd.agents.kv:KVAgent"

[[root.children]]
id = "echo"
agent = "otpd.agents.echo:EchoAgent"
"""


def raw_attached(d: Any, after: bytes = b"") -> tuple[socket.socket, Any]:
    """A bare socket attached to kv (``after``: bytes sent with the attach, before its reply)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(d.socket))
    s.sendall(codec.pack({"id": 7, "op": "attach", "args": {"id": "kv"}}) + after)
    unpacker = protocol.unpacker()
    welcome = next_frame(s, unpacker)
    assert welcome["id"] == 7 and welcome["ok"] and welcome["result"]["id"] == "kv", welcome
    return s, unpacker


def next_frame(s: socket.socket, unpacker: Any) -> Any:
    while True:
        for frame in unpacker:
            return frame
        try:
            data = s.recv(65536)
        except ConnectionResetError:  # closed with our bytes unread
            data = b""
        if not data:
            return None  # the link closed
        unpacker.feed(data)


def test_a_link_calls_the_agent_directly_on_the_same_state(daemon: Any) -> None:
    d = daemon(KV)
    with d.attach("kv") as kv:
        assert kv.pid == d.pid_of("kv")
        assert kv.call({"op": "put", "key": "a", "value": 1}) == {"ok": True, "len": 1}
        assert kv.pipeline([{"op": "put", "key": i, "value": i} for i in range(100)])[-1] == {"ok": True, "len": 101}
        with pytest.raises(OtpdError) as err:
            kv.call({"op": "nope"})
        assert err.value.code == "bad_request"
        # the daemon's path and the link see one state
        assert d.request("call", {"id": "kv", "request": {"op": "get", "key": 42}}) == {"found": True, "value": 42}
        d.request("call", {"id": "kv", "request": {"op": "put", "key": "b", "value": 2}})
        assert kv.call({"op": "get", "key": "b"}) == {"found": True, "value": 2}
        assert d.request("status")["daemon"]["connections"] == 1  # the link is not the daemon's


def test_calls_sent_with_the_attach_are_answered_after_it(daemon: Any) -> None:
    d = daemon(KV)
    calls = b"".join(codec.pack([i, {"op": "put", "key": i, "value": -i}]) for i in range(1, 51))
    s, unpacker = raw_attached(d, after=calls)
    with s:
        replies = [next_frame(s, unpacker) for _ in range(50)]
    assert [r[0] for r in replies] == list(range(1, 51)) and all(r[1] is True for r in replies)
    assert d.request("call", {"id": "kv", "request": {"op": "len"}}) == {"len": 50, "puts": 50}


@pytest.mark.parametrize("frame", [
    {"id": 1, "op": "call", "args": {"id": "kv", "request": {"op": "len"}}},  # a map: not on a link
    {"t": "flags", "flags": {"x": 100.0}},  # a channel frame: never taken from a client
    ["x", {"op": "len"}],
    [1, {"op": "len"}, "extra"],
    [-1, {"op": "len"}],
])
def test_a_frame_of_another_shape_is_refused_and_the_link_goes_on(daemon: Any, frame: Any) -> None:
    d = daemon(KV)
    pid = d.pid_of("kv")
    s, unpacker = raw_attached(d)
    with s:
        s.sendall(codec.pack(frame) + codec.pack([5, {"op": "len"}]))
        refused = next_frame(s, unpacker)
        assert refused[1] is False and refused[2]["code"] == "bad_request", refused
        assert next_frame(s, unpacker) == [5, True, {"len": 0, "puts": 0}]
    assert d.pid_of("kv") == pid


@pytest.mark.parametrize("garbage", [
    b"\xc1",  # never valid msgpack
    b"\xdb" + (8 << 20).to_bytes(4, "big") + b"x" * (2 << 20),  # a str header of 8 MiB, 2 MiB of it sent
])
def test_garbage_ends_the_link_not_the_agent(daemon: Any, garbage: bytes) -> None:
    d = daemon(KV)
    pid = d.pid_of("kv")
    s, unpacker = raw_attached(d)
    with s:
        s.sendall(codec.pack([1, {"op": "put", "key": "a", "value": 1}]))
        assert next_frame(s, unpacker) == [1, True, {"ok": True, "len": 1}]
        try:
            s.sendall(garbage)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: the same outcome
        assert next_frame(s, unpacker) is None
    assert d.pid_of("kv") == pid
    assert d.request("call", {"id": "kv", "request": {"op": "get", "key": "a"}}) == {"found": True, "value": 1}


def test_a_frame_up_to_the_limit_is_taken_on_a_link(daemon: Any) -> None:
    d = daemon(KV)
    big = "v" * (protocol.MAX_FRAME - 100)
    s, unpacker = raw_attached(d)
    with s:
        s.sendall(codec.pack([1, {"op": "put", "key": "big", "value": big}]) + codec.pack([2, {"op": "len"}]))
        assert next_frame(s, unpacker) == [1, True, {"ok": True, "len": 1}]
        assert next_frame(s, unpacker) == [2, True, {"len": 1, "puts": 1}]


def test_a_frame_of_small_elements_over_the_limit_ends_the_link(daemon: Any) -> None:
    """Found by a review helper: the decoder's buffer limit bounds only bytes it has not parsed,
    so one frame of many small elements was taken whatever its size, and built in the agent's
    memory (16 MiB sent: +128 MiB RSS; 256 MiB: 2 GB)."""
    import struct

    import psutil

    d = daemon(KV)
    agent = psutil.Process(d.pid_of("kv"))
    before = agent.memory_info().rss
    s, _unpacker = raw_attached(d)
    inner = b"\xdc\xff\xff" + b"\xc0" * 65535  # [nil x 65535]
    sent = 0
    with s:
        s.sendall(b"\x92\x05\xdd" + struct.pack(">I", 1_000_000))  # [5, [a million of them]]: 65 GB
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while sent < 16 << 20:
                s.sendall(inner * 16)
                sent += len(inner) * 16
    assert sent < 4 * protocol.MAX_FRAME  # (the socket's buffers hold some: the agent read ~1 MiB)
    assert agent.memory_info().rss - before < 32 << 20
    with d.attach("kv") as kv:  # the agent is unharmed
        assert kv.pid == agent.pid and kv.call({"op": "len"}) == {"len": 0, "puts": 0}


def test_attach_is_refused_with_a_stable_code_and_the_connection_stays_the_daemons(daemon: Any) -> None:
    d = daemon(KV + '\n[[root.children]]\nid = "later"\nagent = "otpd.agents.echo:EchoAgent"\nrestart = "temporary"\n')
    d.request("stop", {"id": "later"})
    with d.client() as c:
        for args, code in (({"id": "nobody"}, "not_found"), ({"id": "later"}, "agent_down"), ({}, "bad_request")):
            with pytest.raises(OtpdError) as err:
                c.request("attach", args)
            assert err.value.code == code, args
        assert c.request("ps")["children"]  # still the daemon's connection
    with d.client() as c:
        c.request("events", {"follow": True})
        with pytest.raises(OtpdError) as err:
            c.request("attach", {"id": "kv"})
        assert err.value.code == "bad_request" and "subscription" in err.value.message


@pytest.mark.parametrize("durability", ["process", "fsync"])
def test_the_link_closes_with_the_agent_and_every_acknowledged_put_survives(daemon: Any, durability: str) -> None:
    """Under fsync the calls that come during a sync are applied meanwhile (the sync helper)
    and answered only once a later sync covers them: a kill between loses none it answered."""
    d = daemon(f'[store]\ndurability = "{durability}"\nsync_helper = "always"\n' + KV)
    kv = d.attach("kv")
    acked: list[int] = []
    first = kv.client.next_id
    kv.client.sock.sendall(b"".join(codec.pack([first + i, {"op": "put", "key": i, "value": i}])
                                    for i in range(20_000)))
    with pytest.raises(OtpdError) as err:
        while True:
            frame = kv.receive()
            assert frame[1] is True
            acked.append(frame[0] - first)
            if len(acked) == 200:
                os.kill(kv.pid, signal.SIGKILL)  # with thousands of calls in flight on the link
    assert err.value.code == "agent_down" and "attach again" in err.value.message
    assert 200 <= len(acked) < 20_000
    with pytest.raises(OtpdError):
        kv.call({"op": "len"})  # a closed link stays closed
    kv.close()
    d.wait("kv", "running", not_pid=kv.pid)
    with d.attach("kv") as again:
        assert again.pid != kv.pid
        for key in acked[:: 50] + [acked[-1]]:
            assert again.call({"op": "get", "key": key}) == {"found": True, "value": key}
        assert again.call({"op": "len"})["len"] >= len(acked)


def test_fsync_durability_on_a_link(daemon: Any) -> None:
    d = daemon('[store]\ndurability = "fsync"\n' + KV)
    with d.attach("kv") as kv:
        assert kv.pipeline([{"op": "put", "key": i, "value": i} for i in range(20)])[-1] == {"ok": True, "len": 20}
        os.kill(kv.pid, signal.SIGKILL)
    d.wait("kv", "running", not_pid=kv.pid)
    with d.attach("kv") as kv:
        assert kv.call({"op": "len"}) == {"len": 20, "puts": 20}


def test_the_daemon_knows_what_a_link_committed_and_catches_state_going_back(daemon: Any) -> None:
    """A link's calls never pass the daemon: the seq they committed reaches it through the
    shared liveness page.  A record put back with a lower seq is then caught at the next start."""
    d = daemon(KV)
    with d.attach("kv") as kv:
        for i in range(5):
            kv.call({"op": "put", "key": i, "value": i})  # 5 commits, seen by the daemon only as a stamp
    d.request("stop", {"id": "kv"})
    d.wait("kv", "stopped")
    state_dir = Path(next(line.split('"')[1] for line in d.config_path.read_text().splitlines()
                          if "state_dir" in line))
    store = Store(state_dir / "store")
    main = store.read("kv")
    assert main is not None and main["seq"] >= 5
    store.put_main("kv", encode({**main, "seq": 1}))  # what a bad restore would do
    store.close()
    with d.events() as events:
        d.request("start", {"id": "kv"})
        regressed = events.until(("seq_regressed", "kv"))[-1]
    assert regressed["seq"] == 1 and regressed["known"] == main["seq"]


def test_status_and_ps_show_each_agents_committed_seq_and_open_links(daemon: Any) -> None:
    d = daemon(KV)

    def kv(op: str = "ps") -> tuple[int, int]:
        row = next(c for c in d.request(op)["children"] if c["id"] == "kv")
        return row["seq"], row["links"]

    assert kv() == (0, 0)
    d.request("call", {"id": "kv", "request": {"op": "put", "key": "a", "value": 1}})
    assert kv() == (1, 0) == kv("status")
    with d.attach("kv") as one, d.attach("kv") as two:
        assert kv() == (1, 2)  # counted before the attach is answered
        one.call({"op": "put", "key": "b", "value": 2})
        two.call({"op": "put", "key": "c", "value": 3})
        assert kv() == (3, 2)  # the links' commits, which the daemon never saw pass
        pid = one.pid
        one.close()
        deadline = time.monotonic() + 10
        while kv()[1] != 1 and time.monotonic() < deadline:  # (the agent reads the EOF in its own time)
            pass
        assert kv() == (3, 1)
    os.kill(pid, signal.SIGKILL)
    d.wait("kv", "running", not_pid=pid)
    assert kv() == (3, 0)  # what the killed process committed, kept; its links gone with it


@pytest.mark.parametrize("durability", ["process", "fsync"])
@pytest.mark.parametrize("with_attach", [False, True])
def test_a_link_that_half_closes_after_its_calls_gets_every_reply(daemon: Any, durability: str,
                                                                  with_attach: bool) -> None:
    """``nc -N``: calls, then shutdown(SHUT_WR).  Under fsync the replies wait for their sync
    (in the helper) after the EOF was read: the link stays open until they are out.  The calls
    sent in the same write as the attach count too (found by a review helper)."""
    d = daemon(f'[store]\ndurability = "{durability}"\nsync_helper = "always"\n' + KV)
    first = b"".join(codec.pack([1000 + i, {"op": "put", "key": 1000 + i, "value": i}]) for i in range(50))
    s, unpacker = raw_attached(d, after=first if with_attach else b"")
    rounds = 0 if with_attach else 3  # (with the attach: its calls alone, then SHUT_WR)
    with s:
        for round_ in range(rounds):  # each round a batch of its own while the last one may sync
            s.sendall(b"".join(codec.pack([round_ * 100 + i, {"op": "put", "key": round_ * 100 + i, "value": i}])
                               for i in range(100)))
        s.shutdown(socket.SHUT_WR)
        replies = []  # (raw_attached read the attach's reply only: what came with it is still due)
        while (frame := next_frame(s, unpacker)) is not None:
            replies.append(frame)
    expected = [r * 100 + i for r in range(rounds) for i in range(100)]
    expected += list(range(1000, 1050)) if with_attach else []
    assert sorted(r[0] for r in replies) == expected
    assert all(r[1] is True for r in replies)


def test_an_agent_out_of_fds_drops_that_attach_only(daemon: Any) -> None:
    import psutil

    d = daemon(KV)
    pid = d.pid_of("kv")
    agent = psutil.Process(pid)
    soft, hard = agent.rlimit(psutil.RLIMIT_NOFILE)
    try:
        used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = next(n for n in range(len(used) + 1) if n not in used)
        agent.rlimit(psutil.RLIMIT_NOFILE, (lowest_free, hard))  # no fd left for a client
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(d.socket))
        s.sendall(codec.pack({"id": 3, "op": "attach", "args": {"id": "kv"}}))
        assert next_frame(s, protocol.unpacker()) is None  # its fd was dropped: closed, unanswered
        s.close()
        d.log.wait_for(r"kv: attach: its descriptor was dropped")
    finally:
        agent.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    with d.attach("kv") as kv:  # the next one gets its own connection
        assert kv.pid == pid and kv.call({"op": "len"}) == {"len": 0, "puts": 0}


def test_links_beyond_half_the_agents_fd_limit_are_refused_with_an_error(daemon: Any) -> None:
    """Found by a review helper: attaching again and again took every fd of the agent, whose
    own next fd (a worker's pipe) then failed and crashed it."""
    import psutil

    d = daemon(KV)
    pid = d.pid_of("kv")
    agent = psutil.Process(pid)
    soft, hard = agent.rlimit(psutil.RLIMIT_NOFILE)
    held: list[Link] = []
    try:
        agent.rlimit(psutil.RLIMIT_NOFILE, (agent.num_fds() + 40, hard))
        limit = (agent.num_fds() + 40) // 2
        for _ in range(limit):
            held.append(d.attach("kv"))
        with pytest.raises(OtpdError) as err:
            d.attach("kv")
        assert err.value.code == "internal" and err.value.details["limit"] == limit
        held.pop().close()
        for link in held[:3]:
            assert link.call({"op": "len"}) == {"len": 0, "puts": 0}
        held.append(d.attach("kv"))  # a closed link's place is free again
    finally:
        for link in held:
            link.close()
        agent.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    assert d.pid_of("kv") == pid


def test_a_send_that_times_out_on_a_link_is_a_timeout_not_a_closed_link(daemon: Any) -> None:
    """The agent stopped (SIGSTOP): the link's socket fills, the client's send timeout fires.
    That says nothing about the agent's life (found by a review helper: it said agent_down)."""
    d = daemon(KV)
    link = d.attach("kv", timeout=0.5)
    with link:
        os.kill(link.pid, signal.SIGSTOP)
        try:
            with pytest.raises(OtpdError) as err:
                link.pipeline([{"op": "put", "key": i, "value": "x" * 1000} for i in range(20_000)])
            assert err.value.code == "timeout" and not link.closed
        finally:
            os.kill(link.pid, signal.SIGCONT)
    assert d.pid_of("kv") == link.pid


def test_attaches_piling_up_for_an_agent_that_does_not_read_count_against_its_cap(daemon: Any) -> None:
    """Each waiting attach holds the bytes its client sent after it.  They count with the
    channel's queue against CHILD_OUT_CAP (64 MiB): past it the agent is hung, killed, and
    every waiting client's connection closed (found by a review helper: 3,000 waiting attaches
    took the daemon to 211 MB)."""
    d = daemon(KV.replace('agent = "otpd.agents.kv:KVAgent"', 'agent = "otpd.agents.kv:KVAgent"\n'
                                                                'heartbeat_timeout_ms = 0', 1))
    pid = d.pid_of("kv")
    call = codec.pack([1, {"op": "len"}])
    tail = call * (60_000 // len(call))  # calls after the attach: the daemon reads them with it
    clients = []
    os.kill(pid, signal.SIGSTOP)  # reads nothing from now on; liveness is off for it
    try:
        for _ in range(1_500):  # 90 MB of waiting attaches at most
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.socket))  # blocking: waits while the listen backlog is full
            s.settimeout(30)
            s.sendall(codec.pack({"id": 1, "op": "attach", "args": {"id": "kv"}}) + tail)
            clients.append(s)
        d.log.wait_for(rf"kv: not reading its channel; SIGKILL pid {pid}")
        d.wait("kv", "running", not_pid=pid)
        for s in clients:  # waiting or handed over: closed unanswered; later: agent_down, or the new agent's
            frame = next_frame(s, protocol.unpacker())
            assert frame is None or frame.get("error", {}).get("code") == "agent_down" \
                or frame["result"]["pid"] != pid, frame
    finally:
        for s in clients:
            s.close()
        if d.pid_of("kv") == pid:
            os.kill(pid, signal.SIGCONT)
    assert d.log.text().count("kv: not reading its channel") == 1, "judged once, not at every attach after"
    with d.attach("kv") as kv:
        assert kv.call({"op": "len"}) == {"len": 0, "puts": 0}


ENDER = '[[root.children]]\nid = "ender"\nagent = "tests.control.agents:Ender"\nrestart = "temporary"\n'


def _slow_reader(d: Any, last: str = "cue") -> Link:
    """A link to ender holding 4 MB of replies it has not read (more than the socket takes), the
    40 calls that made them and ``last`` (``"end"``: the agent ends after it) read by the agent."""
    link = d.attach("ender", timeout=30)
    for _ in range(40):
        link.send({"big": 100_000})
    link.send(last)
    d.log.wait_for(rf"ender: {last} read")
    return link


@pytest.mark.parametrize("how", ["end_after_commit", "stop"])
def test_replies_queued_for_a_slow_reader_go_out_before_the_agent_ends(daemon: Any, how: str) -> None:
    """Found by a review helper: an agent ending after a commit (``end_after_commit``) exited
    with the replies its link had not taken yet still queued, and they were lost; a stopped
    one too."""
    d = daemon(ENDER)
    last = "end" if how == "end_after_commit" else "cue"
    with _slow_reader(d, last) as link, d.client() as control:
        if how == "stop":
            stopping = control.send("stop", {"id": "ender"})  # answered once it has ended
        replies = [link.receive() for _ in range(41)]
        assert [r[1] for r in replies] == [True] * 41
        assert replies[-1][2] == last and len(replies[0][2]) == 100_000
        if how == "stop":
            answer = control.receive()
            assert answer["id"] == stopping and answer["ok"], answer
    assert d.wait("ender", "stopped")["state"] == "stopped"


def test_a_stop_with_a_link_that_reads_nothing_ends_within_shutdown_ms(daemon: Any) -> None:
    """Found by a review helper: the drain took its 5 s whatever the daemon's shutdown_ms, so
    such a stop always ended in the daemon's SIGKILL (logged a crash, the checkpoint cut)."""
    d = daemon(ENDER + "shutdown_ms = 1000\n")
    link = _slow_reader(d)
    with link, d.events() as events:
        d.request("stop", {"id": "ender"}, timeout=20)
        stopped = events.until(("stopped", "ender"))[-1]
    assert stopped["reason"] == "shutdown" and stopped.get("signal") is None, stopped
    assert not re.search(r"ender: .*SIGKILL", d.log.text())


def test_an_agent_at_its_fd_limit_still_sends_its_queued_replies_as_it_ends(daemon: Any) -> None:
    """Found by a review helper: the drain made an epoll, an fd: at the limit, end_after_commit
    became a traceback (EMFILE) and the replies were lost."""
    import psutil

    d = daemon(ENDER)
    link = _slow_reader(d)
    with link:
        used = {int(fd) for fd in os.listdir(f"/proc/{link.pid}/fd")}
        lowest_free = next(n for n in range(len(used) + 1) if n not in used)
        agent = psutil.Process(link.pid)
        agent.rlimit(psutil.RLIMIT_NOFILE, (lowest_free, agent.rlimit(psutil.RLIMIT_NOFILE)[1]))
        assert d.request("call", {"id": "ender", "request": "end"}) == "end"
        replies = [link.receive() for _ in range(41)]
    assert [r[1] for r in replies] == [True] * 41 and replies[-1][2] == "cue"
    assert "Too many open files" not in d.log.text()


def test_attach_to_a_daemon_that_has_gone_says_so(daemon: Any) -> None:
    """A connection closed before the attach is answered is agent_down only if the daemon is
    still there (found by a review helper: a daemon gone was reported as the agent)."""
    from otpd.client import Unreachable

    d = daemon(KV)
    client = d.client()
    d.request("shutdown")
    d.wait_exit()
    with client, pytest.raises(Unreachable):
        client.attach("kv")


@pytest.mark.timeout(30)
def test_attach_closed_by_a_daemon_that_takes_no_connections_does_not_hang(tmp_path: Path) -> None:
    """Found by a review helper: the probe of whether the daemon lives was a blocking connect,
    which waits for ever on a listener whose backlog is full (a daemon stuck, or at its fd
    limit).  A full backlog says it lives: agent_down, at once."""
    import threading

    from otpd.client import Client

    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(0)
    client = Client(path, timeout=2)
    conn, _ = server.accept()
    fillers = []
    while True:  # the backlog, full
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        fillers.append(s)
        try:
            s.connect(str(path))
        except BlockingIOError:
            break

    def take_the_attach_and_close() -> None:
        conn.recv(65536)
        conn.close()

    taker = threading.Thread(target=take_the_attach_and_close)
    taker.start()
    try:
        with client, pytest.raises(OtpdError) as err:
            client.attach("kv")
        assert err.value.code == "agent_down"
    finally:
        taker.join()
        for s in fillers:
            s.close()
        server.close()
