"""An agent's append-only log: its commits reach disk here before the reply.

A commit is one ``write`` of one entry (and one ``fdatasync`` under ``durability =
"fsync"``) instead of an LMDB transaction; the entries are applied to LMDB later, many
at once (a *checkpoint*), and the log is emptied.  A crash between the two loses
nothing: the next start replays the entries whose ``seq`` is above the main record's.

File: ``store/logs/<quoted agent id>.log``, written only by the agent's own process,
which holds an exclusive ``flock`` on it while it runs (the lock dies with the
process).  Entry: ``u32 length, u32 crc32`` (little endian) then the payload, msgpack
``[seq, main record bytes, {item key: value or nil}]``.  Seqs follow each other
by one.  A last entry that is cut short or fails its checksum is a write that never
returned (so never acknowledged): it is ignored, and the file is kept aside, never
deleted.  A bad entry followed by more bytes, or a gap in the seqs, is corruption:
``store_corrupt``, and the file is kept as it is.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import msgpack

from otpd import codec
from otpd.errors import OtpdError

HEADER = struct.Struct("<II")
SUFFIX = ".log"


def log_path(logs: Path, agent_id: str) -> Path:
    return logs / (quote(agent_id, safe="@:") + SUFFIX)  # a valid id (config.ID_RE) is its own name


def agent_of(name: str) -> str | None:
    return unquote(name[: -len(SUFFIX)]) if name.endswith(SUFFIX) else None


def frame(seq: int, record: bytes, items: dict[bytes, bytes | None]) -> bytes:
    payload = codec.pack([seq, record, items])
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass
class Replay:
    """What a log holds: its entries, in order, and whether a cut-short write ends it."""

    entries: list[tuple[int, bytes, list[tuple[bytes, bytes | None]]]] = field(default_factory=list)
    end: int = 0  # bytes of whole entries
    torn: bool = False
    bad: str | None = None  # (``salvage``) why it stops short: the corruption found

    def after(self, seq: int) -> tuple[bytes | None, dict[bytes, bytes | None]]:
        """The newest main record and the item changes of the entries above ``seq``."""
        record: bytes | None = None
        items: dict[bytes, bytes | None] = {}
        for entry_seq, entry_record, entry_items in self.entries:
            if entry_seq > seq:
                record = entry_record
                items.update(entry_items)
        return record, items


def parse(data: bytes, agent_id: str, salvage: bool = False) -> Replay:
    """The entries of a log.  Corruption is ``store_corrupt``; with ``salvage``, the entries
    before it, and what it is in ``bad`` (for an export: what was acknowledged up to there)."""
    out = Replay()
    try:
        _parse(data, agent_id, out)
    except OtpdError as err:
        if not salvage:
            raise
        out.bad = err.message.split("; the log is kept")[0]
    return out


def _parse(data: bytes, agent_id: str, out: Replay) -> None:
    pos, size = 0, len(data)
    while pos < size:
        if size - pos < HEADER.size:
            out.torn = True
            break
        length, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        if length == 0 and not data[pos:].strip(b"\0"):  # zeros to the end: a power cut after the file grew
            out.torn = True
            break
        if end > size:
            if _entry_after(data, pos, out.entries[-1][0] if out.entries else 0):
                # Not the last write cut short: its length is wrong (a bad byte), and an entry
                # written after it follows. Taken as torn, the ones after it would be dropped.
                raise _corrupt(agent_id, f"log entry at byte {pos} has a length past the end of the log, "
                                         "and whole entries follow it")
            out.torn = True
            break
        payload = data[pos + HEADER.size:end]
        if zlib.crc32(payload) != crc:
            if end == size:
                out.torn = True
                break
            raise _corrupt(agent_id, f"log entry at byte {pos} fails its checksum")
        try:
            seq, record, items = codec.unpack(payload)
            entry = (int(seq), bytes(record), [(bytes(k), None if v is None else bytes(v)) for k, v in items.items()])
        except Exception as exc:  # a checksum that matches bytes that are not ours
            raise _corrupt(agent_id, f"log entry at byte {pos} does not decode ({type(exc).__name__})") from None
        if out.entries and entry[0] != out.entries[-1][0] + 1:
            raise _corrupt(agent_id, f"log entry at byte {pos} has seq {entry[0]} after {out.entries[-1][0]}")
        out.entries.append(entry)
        pos = out.end = end


def _entry_after(data: bytes, pos: int, last_seq: int) -> bool:
    """Is there a whole entry in ``data`` after the one at ``pos`` (whose length reaches past
    the end), written after it: the entry of the next seq, its checksum right?  A write cut
    short holds part of one entry only (a zero-filled tail, as a power cut leaves, neither).

    The next seq is the one after this entry's own (read from its payload's first bytes, or
    after ``last_seq``); its entry's payload begins with those bytes, found by ``bytes.find``:
    a few candidates, not a checksum at every offset."""
    start = pos + HEADER.size
    seq = last_seq + 1
    try:
        head = msgpack.Unpacker()
        head.feed(data[start:start + 16])
        if head.read_array_header() == 3:
            seq = int(head.unpack())
    except Exception:  # its payload's first bytes are bad too: the seq after the last good one
        pass
    needle = b"\x93" + codec.pack(seq + 1)
    size = len(data)
    at = data.find(needle, start + HEADER.size)
    while at >= 0:
        length, crc = HEADER.unpack_from(data, at - HEADER.size)
        if at + length <= size and zlib.crc32(data[at:at + length]) == crc:
            return True
        at = data.find(needle, at + 1)
    return False


def read(path: Path, agent_id: str, salvage: bool = False) -> Replay:
    """The log of an agent this process does not own (it may be appending meanwhile:
    a write in progress shows as a torn tail and is left out)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Replay()
    return parse(data, agent_id, salvage)


def _corrupt(agent_id: str, why: str) -> OtpdError:
    return OtpdError("store_corrupt", f"agent {agent_id!r}: {why}; the log is kept (see `otpctl state "
                     f"quarantine {agent_id}`)", {"id": agent_id})


def lock(path: Path, agent_id: str, wait: bool, create: Callable[[], int] | None = None) -> int | None:
    """Open ``path`` and take its exclusive lock: the fd, or None if there is no log (and no
    ``create`` to make one).  Without ``wait``, a lock held elsewhere (the agent runs) is a
    ``bad_request``.  Whoever held the lock may have moved the file away meanwhile (a
    quarantine, a torn log set aside): then the log at ``path`` is opened anew."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            if create is None:
                return None
            fd = create()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise OtpdError("bad_request", f"agent {agent_id!r} is running (it holds its log); stop it first "
                            f"(`otpctl stop {agent_id}`)", {"id": agent_id, "running": True}) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def own_like_parent(path: Path, fd: int | None = None) -> None:
    """Made by root (a tool, say): give it to whoever owns the folder it is in, the store's
    owner, whose agents must open it (under systemd, a DynamicUser)."""
    if os.geteuid() == 0:
        owner = os.stat(path.parent)
        if fd is not None:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        else:
            os.chown(path, owner.st_uid, owner.st_gid)


def private_dir(path: Path) -> Path:
    """``path`` as a folder of the store (0700, its owner's), made if missing."""
    if not path.is_dir():
        path.mkdir(exist_ok=True, mode=0o700)
        own_like_parent(path)
    return path


def keep_aside(path: Path, why: str) -> Path:
    """A second name for a log, kept for good: ``logs/aside/<name>.<time>.<why>`` (a hard link:
    the log's own name is left to whoever replaces it)."""
    aside = private_dir(path.parent / "aside")
    target = aside / f"{path.name}.{time.time():.6f}.{why}"
    os.link(path, target)
    return target


class AgentLog:
    """The log of the agent this process runs: appended to, then emptied at a checkpoint.

    ``overlay`` holds the item changes of the entries not yet applied to LMDB (None:
    deleted) and ``record`` the newest main record, so reads see them first."""

    def __init__(self, logs: Path, agent_id: str, fsync: bool, fd: int) -> None:
        self.agent_id = agent_id
        self.path = log_path(logs, agent_id)
        self.fsync = fsync
        self.fd = fd
        self.overlay: dict[bytes, bytes | None] = {}
        self.record: bytes | None = None
        self.entries = 0
        self.size = 0
        self.unsynced = False
        self.defer = False  # fsync, but the caller syncs (``Store.log_to_sync``), not each write

    @classmethod
    def take(cls, logs: Path, agent_id: str, fsync: bool, tool: bool = False) -> AgentLog:
        """The agent's log, locked, made empty if there is none.  The agent's process waits
        for a tool that holds it for a moment; a tool (``tool``) is refused while the agent
        runs.  A tool makes a missing log too: the lock is what keeps an agent that starts
        meanwhile from reading records the tool is about to change."""
        log = cls(logs, agent_id, fsync, -1)
        fd = lock(log.path, agent_id, wait=not tool, create=log._create)
        assert fd is not None  # with ``create`` there is always a log
        log.fd = fd
        return log

    def _create(self) -> int:
        """A new, empty log; under fsync its directory entry is synced too, or a power cut
        could take the file, and every entry in it, with it."""
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        own_like_parent(self.path, fd)
        if self.fsync:
            sync_dir(self.path.parent)
        return fd

    def replay(self, applied_seq: int) -> bool:
        """Take up what a previous process logged above ``applied_seq``; True if there was any.
        A torn tail is kept aside and the log rewritten with its whole entries."""
        size = os.fstat(self.fd).st_size
        if size == 0:
            return False
        data = os.pread(self.fd, size, 0)
        replay = parse(data, self.agent_id)
        if replay.entries and replay.entries[0][0] > applied_seq + 1:
            # Entries missing between LMDB's record and the log (a quarantine killed between
            # moving the records and moving the log, say): applying the rest would give an
            # agent the newer markers without the items they count.
            raise _corrupt(self.agent_id, f"its log starts at seq {replay.entries[0][0]}, but LMDB's record "
                                          f"is at seq {applied_seq}: the entries between are missing")
        if replay.torn:
            self._drop_torn_tail(data[:replay.end])
        record, items = replay.after(applied_seq)
        self.size = replay.end
        if record is None:
            return False
        self.record, self.overlay = record, items
        self.entries = sum(1 for entry in replay.entries if entry[0] > applied_seq)
        return True

    def _drop_torn_tail(self, whole: bytes) -> None:
        """Replace the log by its whole entries, the torn file kept aside.  At every moment
        the log's name holds either the torn file or its whole replacement: the entries are
        written (and synced) to a new file first, the torn one gets a second name in
        ``aside/``, and the new file is renamed over the log.  A crash at any step leaves a
        log to replay again (at worst one more copy aside); nothing acknowledged is lost."""
        new = self.path.with_name(self.path.name + ".new")  # not a ``.log``: no tool reads it
        fd = os.open(new, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            own_like_parent(new, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)  # held before it has the log's name: whoever opens it then waits
            done = 0
            while done < len(whole):
                done += os.write(fd, whole[done:])
            if self.fsync:
                os.fdatasync(fd)
            aside = keep_aside(self.path, "torn")
            os.rename(new, self.path)
            if self.fsync:
                sync_dir(aside.parent)
                sync_dir(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        os.close(self.fd)  # the torn file, kept aside under its other name
        self.fd = fd

    def append(self, data: bytes, record: bytes, items: dict[bytes, bytes | None]) -> None:
        """Write ``data`` (``frame(seq, record, items)``) and take its changes up."""
        self._write(data)
        self.overlay.update(items)
        self.record = record
        self.entries += 1
        self.size += len(data)

    def _write(self, data: bytes) -> None:
        done = os.write(self.fd, data)
        while done < len(data):  # a regular file takes it whole but on a full disk or a signal
            done += os.write(self.fd, data[done:])
        if self.fsync and not self.defer:
            os.fdatasync(self.fd)
        else:
            self.unsynced = True

    def applied(self) -> None:
        """The entries are in LMDB: empty the log."""
        os.ftruncate(self.fd, 0)
        self.overlay = {}
        self.record = None
        self.entries = self.size = 0

    def sync(self) -> None:
        if self.unsynced:
            os.fdatasync(self.fd)
            self.unsynced = False

    def close(self) -> None:
        os.close(self.fd)

