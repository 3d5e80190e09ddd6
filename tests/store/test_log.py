"""The agent's append-only log: written before the reply, applied to LMDB at a checkpoint.

The writer is a real forked process that commits, says so over a pipe, and is SIGKILLed
(by itself, so no checkpoint can run); the reader is this process, with a fresh Store.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from otpd.errors import OtpdError
from otpd.store import log as agent_log
from otpd.store import tools
from otpd.store.lmdb_store import Store
from tests.store.test_state import Counter, boot


def in_child(path: Path, work: Callable[[Any, Any], None], hold: bool = False) -> tuple[int, int]:
    """Fork a process that boots agent c1, runs ``work(agent, keeper)``, writes one byte to
    the pipe and then dies by SIGKILL (or, with ``hold``, waits for its stdin pipe to close).
    Returns (pid, fd to close to let a holding child go)."""
    r, w = os.pipe()
    hr, hw = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.close(hw)
            agent, keeper = boot(path)
            work(agent, keeper)
            os.write(w, b"!")
            if hold:
                os.read(hr, 1)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(w)
    os.close(hr)
    assert os.read(r, 1) == b"!", "the child failed before its commits"
    os.close(r)
    return pid, hw


def reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def crash_after(path: Path, work: Callable[[Any, Any], None]) -> None:
    pid, hw = in_child(path, work)
    os.close(hw)
    reap(pid)


def counting(n: int) -> Callable[[Any, Any], None]:
    def work(agent: Any, keeper: Any) -> None:
        for i in range(n):
            agent.count += 1
            agent.queue.append(i)
            agent.table[f"k{i}"] = i
            keeper.commit()
        if n:
            del agent.table["k0"]
            keeper.commit()
    return work


def log_file(path: Path) -> Path:
    return agent_log.log_path(path / "logs", "c1")


def test_acknowledged_commits_are_in_the_log_not_yet_in_lmdb_and_a_restart_replays_them(tmp_path: Path) -> None:
    crash_after(tmp_path, counting(5))
    assert log_file(tmp_path).stat().st_size > 0
    lmdb_only = Store(tmp_path)
    assert lmdb_only._lmdb_raw("c1") is None  # the crash came before any checkpoint
    assert lmdb_only.read("c1")["seq"] == 6  # type: ignore[index]  # readers see the log on top
    lmdb_only.close()
    agent, keeper = boot(tmp_path)
    assert agent.count == 5 and list(agent.queue) == [0, 1, 2, 3, 4]
    assert dict(agent.table.items()) == {f"k{i}": i for i in range(1, 5)} and len(agent.table) == 4
    assert keeper.seq == 6
    assert log_file(tmp_path).stat().st_size == 0  # applied to LMDB at load
    assert keeper.store._lmdb_raw("c1") is not None
    keeper.store.close()


def test_entries_already_in_lmdb_are_skipped_by_seq(tmp_path: Path) -> None:
    def work(agent: Any, keeper: Any) -> None:
        counting(3)(agent, keeper)
        data = log_file(tmp_path).read_bytes()
        keeper.store.checkpoint()  # LMDB has seq 4 ...
        os.write(keeper.store.own.fd, data)  # ... and the log the same entries again: a crash before the truncate
    crash_after(tmp_path, work)
    agent, keeper = boot(tmp_path)
    assert agent.count == 3 and list(agent.queue) == [0, 1, 2] and keeper.seq == 4
    keeper.store.close()


def test_a_torn_last_entry_is_ignored_and_kept_aside(tmp_path: Path) -> None:
    crash_after(tmp_path, counting(2))
    whole = log_file(tmp_path).read_bytes()
    torn = agent_log.frame(99, b"never acknowledged", {b"c1\x00x": b"y"})[:-3]
    with log_file(tmp_path).open("ab") as f:
        f.write(torn)
    agent, keeper = boot(tmp_path)
    assert agent.count == 2 and keeper.seq == 3
    aside = list((tmp_path / "logs" / "aside").iterdir())
    assert len(aside) == 1 and aside[0].read_bytes() == whole + torn  # never deleted
    keeper.store.close()



@pytest.mark.parametrize("step", ["write", "link", "rename"])
def test_a_crash_while_a_torn_tail_is_dropped_loses_nothing(tmp_path: Path, step: str) -> None:
    """The restart that drops a torn tail is SIGKILLed in the middle (writing the whole
    entries, before the torn file gets its second name aside, or before the whole entries
    are renamed over it): the next
    start still finds every acknowledged entry. (It used to move the log aside first and
    write the entries back after: a kill between the two lost them.)"""
    crash_after(tmp_path, counting(2))
    torn = agent_log.frame(99, b"never acknowledged", {b"c1\x00x": b"y"})[:-3]
    with log_file(tmp_path).open("ab") as f:
        f.write(torn)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: dies at the step
        try:
            setattr(agent_log.os, step, lambda *_a: os.kill(os.getpid(), signal.SIGKILL))
            boot(tmp_path)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    reap(pid)
    agent, keeper = boot(tmp_path)
    assert agent.count == 2 and keeper.seq == 3 and dict(agent.table.items()) == {"k1": 1}
    assert log_file(tmp_path).read_bytes() == b"" or not log_file(tmp_path).read_bytes().endswith(torn)
    assert any(f.read_bytes().endswith(torn) for f in (tmp_path / "logs" / "aside").iterdir())
    keeper.store.close()

def test_a_bad_entry_before_good_ones_is_store_corrupt_and_the_log_is_left_as_it_is(tmp_path: Path) -> None:
    crash_after(tmp_path, counting(3))
    data = bytearray(log_file(tmp_path).read_bytes())
    data[agent_log.HEADER.size + 2] ^= 0xFF  # inside the first entry's payload
    log_file(tmp_path).write_bytes(bytes(data))
    with pytest.raises(OtpdError) as err:
        boot(tmp_path)
    assert err.value.code == "store_corrupt" and "c1" in err.value.message
    assert log_file(tmp_path).read_bytes() == bytes(data)
    store = Store(tmp_path)
    key = store.quarantine("c1")  # the operator's way out: moved aside, as it is
    assert not log_file(tmp_path).exists()
    kept = list((tmp_path / "logs" / "quarantine").iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == bytes(data) and key.startswith("c1@")
    store.close()
    agent, keeper = boot(tmp_path)  # starts fresh
    assert agent.count == 0
    keeper.store.close()


def test_a_length_past_the_end_with_entries_after_it_is_store_corrupt_not_a_torn_tail(tmp_path: Path) -> None:
    """A bad byte in a length made an entry reach past the end: read as a last write cut short,
    the acknowledged entries after it were dropped (found by a review helper)."""
    crash_after(tmp_path, counting(3))
    good = log_file(tmp_path).read_bytes()
    data = bytearray(good)
    data[3] = 0x7F  # the first entry's length (little endian): now ~2 GB
    log_file(tmp_path).write_bytes(bytes(data))
    with pytest.raises(OtpdError) as err:
        boot(tmp_path)
    assert err.value.code == "store_corrupt" and "length past the end" in err.value.message
    assert log_file(tmp_path).read_bytes() == bytes(data)  # kept as it is
    # while a write cut short, even one a power cut left zero-filled, is still a torn tail
    for tail in (agent_log.HEADER.pack(5000, 1234) + b"\x00" * 700, b"\x00" * 700):  # (all zeros: found
        log_file(tmp_path).write_bytes(good + tail)                                 # by a review helper)
        agent, keeper = boot(tmp_path)
        assert agent.count == 3
        keeper.store.close()


def test_a_gap_in_the_seqs_is_store_corrupt(tmp_path: Path) -> None:
    crash_after(tmp_path, counting(1))
    with log_file(tmp_path).open("ab") as f:
        f.write(agent_log.frame(7, b"\x80", {}) + agent_log.frame(8, b"\x80", {}))
    with pytest.raises(OtpdError) as err:
        boot(tmp_path)
    assert err.value.code == "store_corrupt" and "seq 7" in err.value.message



def test_a_log_that_does_not_follow_lmdbs_record_is_store_corrupt_and_kept(tmp_path: Path) -> None:
    """LMDB's record gone (a quarantine killed between moving the records and the log, say)
    while the log holds entries above a checkpoint: applying them would give the agent the
    newer markers without the items they count."""
    def work(agent: Any, keeper: Any) -> None:
        counting(2)(agent, keeper)
        keeper.store.checkpoint()  # LMDB at seq 3, the log emptied
        agent.count += 1
        agent.table["later"] = 1
        keeper.commit()  # seq 4, in the log only
    crash_after(tmp_path, work)
    logged = log_file(tmp_path).read_bytes()
    store = Store(tmp_path)
    with store.env.begin(write=True) as txn:
        txn.delete(b"c1", db=store.main)
    store.close()
    with pytest.raises(OtpdError) as err:
        boot(tmp_path)
    assert err.value.code == "store_corrupt" and "starts at seq 4" in err.value.message
    assert log_file(tmp_path).read_bytes() == logged

def test_tools_read_a_running_agents_log_and_refuse_to_write_under_it(tmp_path: Path) -> None:
    pid, hw = in_child(tmp_path, counting(4), hold=True)
    try:
        store = Store(tmp_path)
        shown = tools.show(store, "c1")
        assert shown["state"]["count"] == 4 and shown["items"]["queue"] == [0, 1, 2, 3]
        assert store.agent_ids() == ["c1"]
        lines = list(tools.export(store, ["c1"]))
        for write in (lambda: store.quarantine("c1"), lambda: tools.import_records(store, tools.parse_export(lines)),
                      lambda: store.delete_agent("c1")):
            with pytest.raises(OtpdError) as err:
                write()
            assert err.value.code == "bad_request" and "running" in err.value.message
        assert tools.show(store, "c1")["state"]["count"] == 4  # nothing was touched
    finally:
        os.close(hw)
        reap(pid)
    tools.import_records(store, tools.parse_export(lines))  # the agent is gone: now it may
    assert log_file(tmp_path).stat().st_size == 0 and store.read("c1")["state"]["count"] == 4  # type: ignore[index]
    store.close()


def test_near_the_end_of_the_map_a_change_goes_to_lmdb_before_its_reply(tmp_path: Path) -> None:
    agent, keeper = boot(tmp_path, map_size_mb=1, map_size_max_mb=1)
    agent.count = 1
    keeper.commit()
    assert keeper.store.pending_log()  # small: the log takes it
    for _ in range(200):
        agent.queue.append("x" * 10_000)
    with pytest.raises(OtpdError) as err:
        keeper.commit()
    assert err.value.code == "store_full"
    assert not keeper.store.pending_log()  # the log was applied first: nothing acknowledged is only in it
    assert agent.count == 1 and len(agent.queue) == 0
    keeper.store.close()


def test_the_log_is_emptied_by_a_checkpoint_and_reads_stay_the_same(tmp_path: Path) -> None:
    agent, keeper = boot(tmp_path, cls=Counter)
    counting(3)(agent, keeper)
    store = keeper.store
    before = (store.read("c1"), list(store.scan_items(b"c1\x00")))
    assert store.pending_log() and log_file(tmp_path).stat().st_size > 0
    store.checkpoint()
    assert not store.pending_log() and log_file(tmp_path).stat().st_size == 0
    assert (store.read("c1"), list(store.scan_items(b"c1\x00"))) == before
    store.close()


def test_a_log_is_never_applied_over_a_corrupt_main_record(tmp_path: Path) -> None:
    crash_after(tmp_path, counting(2))
    store = Store(tmp_path)
    with store.env.begin(write=True) as txn:  # the LMDB record goes bad (bit rot, a bad tool)
        txn.put(b"c1", b"\xc1 not msgpack", db=store.main)
    store.close()
    logged = log_file(tmp_path).read_bytes()
    with pytest.raises(OtpdError) as err:
        boot(tmp_path)
    assert err.value.code == "store_corrupt" and "c1" in err.value.message
    store = Store(tmp_path, readonly=True)
    assert store.read_raw("c1", log=False) == b"\xc1 not msgpack"  # neither is touched
    store.close()
    assert log_file(tmp_path).read_bytes() == logged


def test_an_export_with_a_corrupt_log_keeps_going_and_says_so(tmp_path: Path) -> None:
    crash_after(tmp_path, counting(3))
    data = bytearray(log_file(tmp_path).read_bytes())
    data[agent_log.HEADER.size + 2] ^= 0xFF
    log_file(tmp_path).write_bytes(bytes(data))
    store = Store(tmp_path, readonly=True)
    assert store.agent_ids() == ["c1"]
    lines = list(tools.export(store))
    assert len(lines) == 1 and '"raw": null' in lines[0] and "checksum" in lines[0]  # nothing in LMDB yet
    with pytest.raises(OtpdError) as err:
        tools.parse_export(lines)
    assert err.value.code == "bad_request" and "no record here" in err.value.message
    store.close()


def test_an_export_with_a_corrupt_log_keeps_what_was_acknowledged_before_the_bad_entry(tmp_path: Path) -> None:
    """An export took LMDB's state alone, and quarantine and import then lost the good entries
    before the bad one (found by a review helper): now it takes them, and says from where."""
    crash_after(tmp_path, counting(5))  # five commits, all in the log
    data = bytearray(log_file(tmp_path).read_bytes())
    pos = 0
    for _ in range(3):
        pos += agent_log.HEADER.size + agent_log.HEADER.unpack_from(data, pos)[0]
    data[pos + agent_log.HEADER.size + 2] ^= 0xFF  # inside the fourth entry
    log_file(tmp_path).write_bytes(bytes(data))
    with pytest.raises(OtpdError):
        boot(tmp_path)  # the agent is store_corrupt, as before
    store = Store(tmp_path)
    lines = list(tools.export(store, ["c1"]))
    assert "checksum" in lines[0] and "as of seq 3" in lines[0]
    records = tools.parse_export(lines)
    store.quarantine("c1")
    tools.import_records(store, records)
    store.close()
    agent, keeper = boot(tmp_path)
    assert agent.count == 3  # the three commits before the bad entry
    keeper.store.close()


def test_an_agent_that_waited_for_a_tools_lock_does_not_write_into_the_file_the_tool_moved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crash_after(tmp_path, counting(1))
    path = log_file(tmp_path)
    moved = tmp_path / "logs" / "moved.log"
    real_flock = agent_log.fcntl.flock
    calls = []

    def flock_while_a_tool_moves_the_file(fd: int, op: int) -> None:
        if not calls:  # the agent opened the log; a tool holding it moves it away (quarantine) meanwhile
            os.rename(path, moved)
        calls.append(op)
        real_flock(fd, op)

    monkeypatch.setattr(agent_log.fcntl, "flock", flock_while_a_tool_moves_the_file)
    agent, keeper = boot(tmp_path)
    assert len(calls) == 2  # it saw the file was not the log any more, and opened the log anew
    assert agent.count == 0  # the moved state is not its own any more
    agent.count = 5
    keeper.commit()
    keeper.store.close()
    assert agent_log.read(moved, "c1").entries[-1][0] == 2  # untouched


def test_deleting_an_agent_takes_its_log_and_records_once_it_has_stopped(tmp_path: Path) -> None:
    crash_after(tmp_path, counting(3))  # its last commits only in the log
    store = Store(tmp_path)
    assert log_file(tmp_path).stat().st_size > 0 and store.read("c1") is not None
    assert store.delete_agent("c1")
    assert not log_file(tmp_path).exists() and store.read("c1") is None and store.agent_ids() == []
    assert not store.delete_agent("c1")  # nothing left: False, no error
    store.close()


def test_an_agent_cannot_delete_its_own_records(tmp_path: Path) -> None:
    def work(agent: Any, keeper: Any) -> None:
        agent.count = 1
        keeper.commit()
        with pytest.raises(OtpdError) as err:
            keeper.store.delete_agent("c1")
        assert err.value.code == "bad_request"
    crash_after(tmp_path, work)
    store = Store(tmp_path)
    assert store.read("c1")["state"]["count"] == 1  # type: ignore[index]
    store.close()


def test_a_tool_holds_an_agents_log_even_when_it_has_none_yet(tmp_path: Path) -> None:
    """Records imported for an agent that never ran have no log: a tool writing them must still
    hold one, or the agent starting meanwhile reads records half changed under it."""
    store = Store(tmp_path)
    store.put_raw("c1", _main(), [])
    path = agent_log.log_path(store.logs, "c1")
    path.unlink()  # as an import into a fresh state dir leaves it: records, no log
    with store._held("c1", settle=False):
        with pytest.raises(OtpdError) as err:
            agent_log.lock(path, "c1", wait=False)  # what the agent's start meets
        assert err.value.code == "bad_request" and err.value.details["running"] is True
    assert store.delete_agent("c1")
    assert not path.exists() and store.read("c1") is None
    assert not store.delete_agent("c1") and not path.exists()  # nothing to delete: no log left behind
    store.close()


def _main() -> bytes:
    from otpd.codec import pack

    return pack({"version": 1, "state": {"count": 3}, "saved_at": 0.0, "seq": 1})


def test_a_quarantine_of_an_unknown_agent_leaves_no_log_behind(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(OtpdError) as err:
        store.quarantine("ghost")
    assert err.value.code == "not_found"
    assert not agent_log.log_path(store.logs, "ghost").exists()
    store.close()


def test_a_log_made_by_root_belongs_to_the_owner_of_the_store(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file for another user")
    store = Store(tmp_path)
    os.chown(store.logs, 4321, 4321)  # the store of a daemon that runs as another user
    store.put_raw("c1", _main(), [])  # a tool run as root (an import) makes the agent's log
    st = agent_log.log_path(store.logs, "c1").stat()
    assert (st.st_uid, st.st_gid) == (4321, 4321), "the agent's process must be able to open it"
    agent_log.keep_aside(agent_log.log_path(store.logs, "c1"), "test")  # as a torn log is
    st = (store.logs / "aside").stat()
    assert (st.st_uid, st.st_gid) == (4321, 4321), "and the folder a torn log goes to"
    store.close()


@pytest.mark.parametrize("value", [
    b"".join(i.to_bytes(4, "little") for i in range(200_000)),  # little ints: every offset a "length"
    (0x20000).to_bytes(4, "little") * 196_608,  # 768 KiB of lengths that fit: a checksum at each offset
])
def test_a_torn_tail_is_read_at_once_whatever_it_holds(value: bytes) -> None:
    """Found by a review helper: the search for entries after a length past the end took a
    checksum at every offset (0.65 s per 190 KB; 9.7 s for 768 KiB, growing as the square), on
    the restart path after a SIGKILL mid-write."""
    import time

    whole = agent_log.frame(1, b"\x80", {b"x": b"y"})
    big = agent_log.frame(2, b"\x80", {b"a\x00m\x00k": value})
    began = time.monotonic()
    replay = agent_log.parse(whole + big[: len(big) * 3 // 4], "kv")
    assert replay.torn and len(replay.entries) == 1
    assert time.monotonic() - began < 0.5  # (a few ms: a bytes.find, no checksum per offset)
