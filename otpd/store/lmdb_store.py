"""Agent state in LMDB: one main record per agent id, one record per collection item.

Layout (three named databases in one environment under ``state_dir/store``):

* ``main``: ``agent_id`` -> msgpack ``{"version", "state", "collections", "saved_at", "seq"}``.
  ``state`` holds the persistent scalar fields, ``collections`` each collection's
  markers (a queue's head/tail, a map's length), ``seq`` grows by one per commit.
* ``items``: ``agent_id NUL collection NUL key`` -> msgpack item, so changing a
  collection writes O(1) records and loading an agent reads O(1) records.
* ``quarantine``: records moved aside by an operator, never deleted by otpd.
* ``versions``: an agent's records as the other class of a version switch left them, for a
  rollback: ``agent_id NUL tag NUL`` -> its main record (``tag``: a hash of ``module:Class``),
  and that prefix followed by ``collection NUL key`` -> each item (``_kept_prefix``).
* ``meta``: the daemon's own small records (feature flags set at run time).

Beside them, ``logs/``: each agent's append-only log (``otpd.store.log``).  An agent's
commit is appended there before the reply and applied to LMDB at a checkpoint; every
read here (the agent's own, and the operator tools') sees LMDB with the log on top.

An environment is opened in the process that uses it, after fork, never
inherited.  ``durability="process"`` commits without fsync (the data is in the
page cache the moment the commit returns, so it survives SIGKILL of any
process) and syncs periodically; ``"fsync"`` syncs every commit.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import lmdb

from otpd import codec
from otpd.errors import OtpdError
from otpd.store import log as agent_log
from otpd.store.log import AgentLog

T = TypeVar("T")
MAX_READERS = 8192  # one slot per process that reads: every agent is a process
SEP = b"\x00"


encode = codec.pack
decode = codec.unpack


def agent_prefix(agent_id: str) -> bytes:
    return agent_id.encode() + SEP


def item_prefix(agent_id: str, collection: str) -> bytes:
    return agent_id.encode() + SEP + collection.encode() + SEP


class Store:
    def __init__(self, path: Path, map_size_mb: int = 1024, map_size_max_mb: int | None = None,
                 durability: str = "process", readonly: bool = False) -> None:
        self.path = path
        self.logs = path / "logs"
        self.fsync = durability == "fsync"
        self.own: AgentLog | None = None  # the log of the agent this process runs
        self.full = False  # a checkpoint found the map full: the log keeps what LMDB could not take
        self._room = 0
        self.map_size_max = (map_size_max_mb or max(map_size_mb, 65536)) << 20
        if not readonly:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.logs.is_dir():
                self.logs.mkdir(exist_ok=True, mode=0o700)
                if self.fsync:
                    agent_log.sync_dir(path)
        elif not (path / "data.mdb").exists():
            raise OtpdError("not_found", f"no store at {path}")
        self.env = lmdb.open(
            str(path), map_size=map_size_mb << 20, max_dbs=8, max_readers=MAX_READERS,
            sync=durability == "fsync", metasync=durability == "fsync", readonly=readonly,
            lock=True, readahead=False,
        )
        create = not readonly
        self.main = self.env.open_db(b"main", create=create)
        self.items = self.env.open_db(b"items", create=create)
        self.quarantined = self.env.open_db(b"quarantine", create=create)
        self.versions = self.env.open_db(b"versions", create=create)
        self.meta = self.env.open_db(b"meta", create=create)
        self._reads: lmdb.Transaction | None = None  # see get_item
        self._psize = int(self.env.stat()["psize"])

    def close(self) -> None:
        """Close, after applying the agent's log to LMDB if it can (a full map keeps it)."""
        self.end_reads()
        if self.own is not None:
            try:
                self.checkpoint()
            except OtpdError:
                pass
            self.own.close()
            self.own = None
        self.env.close()

    # -- reads -----------------------------------------------------------------

    def _read_txn(self) -> lmdb.Transaction:
        try:
            return self.env.begin()
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)  # another process grew the map: adopt its size
            return self.env.begin()

    def warm_up(self) -> None:
        """One empty read transaction: this process takes its reader slot now, not on its first real read."""
        with self._read_txn():
            pass

    def _lmdb_raw(self, agent_id: str) -> bytes | None:
        with self._read_txn() as txn:
            data = txn.get(agent_id.encode(), db=self.main)
            return bytes(data) if data is not None else None

    def read_raw(self, agent_id: str, log: bool = True) -> bytes | None:
        """The agent's newest main record: its log's, else LMDB's (``log=False``: LMDB's)."""
        own = self.own
        if log and own is not None and own.agent_id == agent_id:
            return own.record if own.record is not None else self._lmdb_raw(agent_id)
        with self.snapshot(agent_id, log) as (raw, _items):
            return raw

    @contextmanager
    def snapshot(self, agent_id: str, log: bool = True, salvage: list[str] | None = None
                 ) -> Iterator[tuple[bytes | None, Callable[[bytes], Iterator[tuple[bytes, bytes]]]]]:
        """The agent's main record and a reader of its items (``items(prefix)``: those under
        ``prefix``, in key order), both as of one commit (``log=False``: as LMDB has them).

        Read in one LMDB transaction, with the agent's log read once over it: a tool reading an
        agent that runs sees one state, not a record of one commit and items of a later one.  A
        checkpoint between the transaction's start and the read of the log (the log then starts
        past the record's seq) is read again.

        A corrupt log is ``store_corrupt``; with ``salvage`` (a list), what is said of it goes
        there instead, and the state is LMDB's with the log's entries up to the bad one: what
        was acknowledged before it (an export, so that a quarantine and an import keep it)."""
        for attempt in range(_SNAPSHOT_TRIES):
            with self._read_txn() as txn:
                data = txn.get(agent_id.encode(), db=self.main)
                raw = bytes(data) if data is not None else None
                overlay: dict[bytes, bytes | None] = {}
                if log:
                    found = self._log_over(agent_id, raw, attempt == _SNAPSHOT_TRIES - 1, salvage)
                    if found is None:
                        continue  # a checkpoint came between: again, in a new transaction
                    record, overlay = found
                    raw = record if record is not None else raw

                def items(prefix: bytes, txn: lmdb.Transaction = txn,
                          overlay: dict[bytes, bytes | None] = overlay) -> Iterator[tuple[bytes, bytes]]:
                    return _merged(_scan(txn, self.items, prefix),
                                   sorted((k, v) for k, v in overlay.items() if k.startswith(prefix)))
                yield raw, items
                return
        raise AssertionError("unreachable: the last try reads or raises")

    def _log_over(self, agent_id: str, raw: bytes | None, last: bool, salvage: list[str] | None = None
                  ) -> tuple[bytes | None, dict[bytes, bytes | None]] | None:
        """The newest record and the item changes that the agent's log holds above ``raw``;
        None if the log starts past it (a checkpoint since ``raw`` was read; ``last``: that is
        store_corrupt, as for the agent: entries are missing).  ``salvage``: see ``snapshot``."""
        own = self.own
        if own is not None and own.agent_id == agent_id:
            return own.record, own.overlay
        path = agent_log.log_path(self.logs, agent_id)
        try:
            if path.stat().st_size == 0:
                return None, {}
        except FileNotFoundError:
            return None, {}
        replay = agent_log.read(path, agent_id, salvage is not None)
        base = _seq_of(raw)
        if replay.entries and replay.entries[0][0] > base + 1:
            if not last:
                return None
            why = f"its log starts at seq {replay.entries[0][0]}, but LMDB's record is at seq {base}: the " \
                  "entries between are missing"
            if salvage is None:
                raise corrupt(agent_id, why)
            salvage.append(f"{why}; this is LMDB's state (seq {base}), without the log")
            return None, {}
        if replay.bad is not None and salvage is not None:
            last_good = replay.entries[-1][0] if replay.entries else base
            salvage.append(f"{replay.bad}; this is the state as of seq {max(base, last_good)}, with the entries "
                           "before it (the log is kept as it is)")
        return replay.after(base)

    def read(self, agent_id: str) -> dict[str, Any] | None:
        """The agent's main record, or None; ``store_corrupt`` if it does not decode."""
        data = self.read_raw(agent_id)
        return None if data is None else check_record(agent_id, data)

    def get_item(self, key: bytes) -> bytes | None:
        """One item: the log's change if it has one, else LMDB's, read in a transaction
        kept until ``end_reads`` or the next write to LMDB (a checkpoint).

        An agent reads items while it handles calls; one read transaction for many
        reads instead of one per read (a begin, a reader slot, an abort) is most of
        what a read costs.  Nothing of the agent's own changes in LMDB but at its
        checkpoints, so the snapshot stays right until then; it must not live much
        longer: an open reader keeps LMDB from reusing pages that later commits free,
        so the file would grow.  A batch that wrote schedules a checkpoint, and one
        that did not ends its reads (``StateKeeper.commit``)."""
        own = self.own
        if own is not None and key in own.overlay:
            return own.overlay[key]
        txn = self._reads
        if txn is None:
            txn = self._reads = self._read_txn()
        data = txn.get(key, db=self.items)
        return bytes(data) if data is not None else None

    def has_item(self, key: bytes) -> bool:
        return self.get_item(key) is not None

    def end_reads(self) -> None:
        """End the read transaction that ``get_item`` keeps, if any."""
        if self._reads is not None:
            self._reads.abort()
            self._reads = None

    def scan_items(self, prefix: bytes, log: bool = True) -> Iterator[tuple[bytes, bytes]]:
        """Every item under ``prefix`` (an agent's, or one collection's), in key order
        (``log=False``: as LMDB has them)."""
        with self.snapshot(prefix.split(SEP, 1)[0].decode(), log) as (_raw, items):
            yield from items(prefix)

    def agent_ids(self) -> list[str]:
        """Every agent with a record: in LMDB, or only in its log so far."""
        with self._read_txn() as txn:
            ids = {bytes(k).decode() for k in txn.cursor(db=self.main).iternext(values=False)}
        try:
            names = [entry.name for entry in os.scandir(self.logs) if entry.is_file() and entry.stat().st_size]
        except FileNotFoundError:
            names = []
        for name in names:
            agent_id = agent_log.agent_of(name)
            if agent_id is None or agent_id in ids:
                continue
            try:
                if self.read_raw(agent_id) is not None:
                    ids.add(agent_id)
            except OtpdError:  # a corrupt log is listed: reading it says what is wrong
                ids.add(agent_id)
        return sorted(ids)

    # -- writes ------------------------------------------------------------------

    # -- the agent's own log ------------------------------------------------------

    def open_log(self, agent_id: str) -> None:
        """Run ``agent_id`` here: take its log, and apply what a previous process left in it
        (a crash before its checkpoint).  A full map keeps the entries in the log."""
        if self.own is not None:
            if self.own.agent_id != agent_id:
                raise ValueError(f"this store runs {self.own.agent_id!r}, not {agent_id!r}")
            return
        own = AgentLog.take(self.logs, agent_id, self.fsync)
        try:
            found = own.replay(_seq_of(self._lmdb_raw(agent_id), agent_id))
        except BaseException:  # store_corrupt: the log stays as it is
            own.close()
            raise
        self.own = own
        self._measure_room()
        if found:
            try:
                self.checkpoint()
            except OtpdError:
                pass  # store_full: self.full is set, and the next commit says so
        elif own.size:
            own.applied()  # entries that LMDB has already

    def commit(self, agent_id: str, record: bytes, items: dict[bytes, bytes | None], seq: int | None = None) -> None:
        """Save the main record (whose seq is ``seq``) and item changes (None deletes):
        appended to the agent's log if this process runs it (see ``checkpoint``), else
        one LMDB transaction."""
        own = self.own
        if own is None or own.agent_id != agent_id:
            self._apply(agent_id, record, items)
            return
        seq = _seq_of(record) if seq is None else seq
        entry = agent_log.frame(seq, record, items)
        if self.full or own.size + len(entry) >= self._room:
            # Near the map's end LMDB must take a change before its reply, so that one
            # that does not fit is refused (store_full) rather than acknowledged: the
            # log is applied, then this change goes straight to LMDB.
            self.checkpoint()
            self._apply(agent_id, record, items)  # its reads end there
            self._measure_room()
            return
        own.append(entry, record, items)

    def defer_log_sync(self, defer: bool = True) -> None:
        """Under fsync, leave the log's syncs to the caller (``log_to_sync``): a commit then
        returns once its entry is written, durable only once the caller synced the fd.
        ``False``: each commit syncs its entry again."""
        if self.own is not None:
            self.own.defer = defer

    def log_to_sync(self) -> int | None:
        """The log's fd if it has writes not synced yet, which count as synced from now on:
        the caller syncs the fd (``os.fdatasync``) before it tells anyone they are."""
        own = self.own
        if own is None or not own.unsynced:
            return None
        own.unsynced = False
        return own.fd

    def checkpoint_due(self, entries: int = 1024, size: int = 4 << 20) -> bool:
        own = self.own
        return own is not None and (own.entries >= entries or own.size >= size)

    def pending_log(self) -> bool:
        return self.own is not None and self.own.entries > 0

    def checkpoint(self) -> None:
        """Apply the log to LMDB in one transaction, then empty it (``store_full`` keeps it)."""
        own = self.own
        if own is None or own.record is None:
            return
        try:
            self._apply(own.agent_id, own.record, own.overlay)
        except OtpdError:
            self.full = True
            raise
        self.full = False
        own.applied()
        self._measure_room()

    def _measure_room(self) -> None:
        """How much the log may hold before a commit must go to LMDB first: a quarter of
        what the map can still take, grown to its maximum (a copy-on-write B-tree writes
        each item's pages anew, and the free list is not counted)."""
        info = self.env.info()
        free = self.map_size_max - (int(info["last_pgno"]) + 1) * self._psize
        self._room = max(0, free // 4)

    def _apply(self, agent_id: str, record: bytes, items: dict[bytes, bytes | None]) -> None:
        """Write the main record and item changes (None deletes) in one transaction."""
        deletes = [key for key, value in items.items() if value is None] if None in items.values() else []
        puts = [(key, value) for key, value in items.items() if value is not None] if deletes \
            else cast("Iterable[tuple[bytes, bytes]]", items.items())  # (no None among them)

        def work(txn: lmdb.Transaction) -> None:
            txn.put(agent_id.encode(), record, db=self.main)
            # One C loop for the puts: a checkpoint's thousands of items cost 0.3 µs each
            # instead of 1.3 for a txn.put per item (measured here).
            txn.cursor(db=self.items).putmulti(puts)
            for key in deletes:
                txn.delete(key, db=self.items)
        self._write(work, agent_id)

    def _write(self, work: Callable[[lmdb.Transaction], T], agent_id: str = "") -> T:
        """``work(txn)`` in a write transaction, run again after the map grew (up to its
        maximum: ``store_full`` then), or after another process grew it.  Every write of the
        store goes through here: an agent's, and a tool's or the daemon's, whose freshly
        opened store maps only what is used."""
        self.end_reads()
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return work(txn)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.MapFullError:
                if not self._grow():
                    raise OtpdError("store_full", f"the store is full ({self.map_size() >> 20} MiB, the "
                                    "configured maximum); the change was not saved",
                                    {"id": agent_id} if agent_id else None) from None
            except lmdb.BadValsizeError as exc:  # a key LMDB cannot take (the collections refuse them first)
                raise OtpdError("bad_request", f"the store cannot take a key of agent {agent_id!r}: {exc}",
                                {"id": agent_id}) from None

    def _grow(self) -> bool:
        size = self.map_size()
        if size >= self.map_size_max:
            return False
        self.env.set_mapsize(min(size * 2, self.map_size_max))
        return True

    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def sync(self) -> None:
        if self.own is not None:
            self.own.sync()
        self.env.sync(True)

    # -- operator tools --------------------------------------------------------

    @contextmanager
    def _held(self, agent_id: str, settle: bool = True) -> Iterator[int | None]:
        """For a write to an agent's records: hold its log (refused while the agent runs
        elsewhere; made, empty, if it has none) and, with ``settle``, apply what the log
        holds to LMDB first.  Yields the log's fd; None for this process's own agent."""
        own = self.own
        if own is not None and own.agent_id == agent_id:
            self.checkpoint()
            yield None
            return
        log = AgentLog.take(self.logs, agent_id, self.fsync, tool=True)
        try:
            if settle:
                if log.replay(_seq_of(self._lmdb_raw(agent_id), agent_id)):
                    assert log.record is not None
                    self._apply(agent_id, log.record, log.overlay)
                if log.size:
                    log.applied()
            yield log.fd
        finally:
            log.close()

    def _prefixed(self, txn: lmdb.Transaction, prefix: bytes, db: Any = None) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of the items DB (or ``db``) under ``prefix``, in key order."""
        out = []
        cursor = txn.cursor(db=self.items if db is None else db)
        if cursor.set_range(prefix):
            for k, v in cursor:
                if not bytes(k).startswith(prefix):
                    break
                out.append((bytes(k), bytes(v)))
        return out

    def quarantine(self, agent_id: str) -> str:
        """Move an agent's records aside (never deleted); returns the quarantine key."""
        key = f"{agent_id}@{time.time():.6f}"
        prefix = agent_prefix(agent_id)
        path = agent_log.log_path(self.logs, agent_id)
        with self._held(agent_id, settle=False) as fd:
            logged = fd is not None and os.fstat(fd).st_size > 0

            def work(txn: lmdb.Transaction) -> None:
                main = txn.get(agent_id.encode(), db=self.main)
                if main is None and not logged:
                    if fd is not None:  # empty (made for the lock, maybe): nothing to keep
                        os.unlink(path)
                    raise OtpdError("not_found", f"no record for {agent_id!r}", {"id": agent_id})
                if main is not None:
                    txn.put(key.encode(), bytes(main), db=self.quarantined)
                for k, v in self._prefixed(txn, prefix):
                    txn.put(key.encode() + SEP + k[len(prefix):], v, db=self.quarantined)
                    txn.delete(k, db=self.items)
                txn.delete(agent_id.encode(), db=self.main)
            self._write(work, agent_id)
            if logged:  # its log goes aside with it, as it is (it may be what is corrupt)
                quarantined = agent_log.private_dir(self.logs / "quarantine")
                os.rename(path, quarantined / (path.name[: -len(agent_log.SUFFIX)] + f"@{key.rsplit('@', 1)[1]}.log"))
        return key

    def delete_agent(self, agent_id: str) -> bool:
        """Delete an agent's records for good (a finished workflow past its retention).
        Refused with ``bad_request`` while the agent runs: it holds its log, and what it
        acknowledged next would go to a file nobody reads."""
        if self.own is not None and self.own.agent_id == agent_id:
            raise OtpdError("bad_request", "an agent cannot delete its own records", {"id": agent_id})
        prefix = agent_prefix(agent_id)
        with self._held(agent_id, settle=False) as fd:
            assert fd is not None  # not our own agent (refused above)
            logged = os.fstat(fd).st_size > 0
            os.unlink(agent_log.log_path(self.logs, agent_id))  # under its lock: nobody appends

            def work(txn: lmdb.Transaction) -> bool:
                for k, _v in self._prefixed(txn, prefix):
                    txn.delete(k, db=self.items)
                return bool(txn.delete(agent_id.encode(), db=self.main))
            return self._write(work, agent_id) or logged

    # -- the daemon's records and version switches ----------------------------------

    def get_meta(self, key: str) -> Any:
        with self._read_txn() as txn:
            data = txn.get(key.encode(), db=self.meta)
        return decode(bytes(data)) if data is not None else None

    def put_meta(self, key: str, value: Any) -> None:
        self._write(lambda txn: txn.put(key.encode(), encode(value), db=self.meta))

    def _keep(self, txn: lmdb.Transaction, agent_id: str, was: str) -> bytes | None:
        """Copy the agent's records, as ``was`` left them, under versions/ (replacing an older
        copy of ``was``'s): its main record, then one record per item, streamed (an agent of
        a million items is copied in O(1) memory).  Returns the main record (None: nothing)."""
        main = txn.get(agent_id.encode(), db=self.main)
        if main is None:
            return None
        main = bytes(main)
        kept = _kept_prefix(agent_id, was)
        self._delete_prefixed(txn, self.versions, kept)
        txn.delete(_first_layout(agent_id, was), db=self.versions)  # a copy in the first layout, replaced too
        txn.put(kept, main, db=self.versions)
        prefix = agent_prefix(agent_id)

        def copies() -> Iterator[tuple[bytes, bytes]]:
            cursor = txn.cursor(db=self.items)
            if cursor.set_range(prefix):
                for key, v in cursor:
                    k = bytes(key)
                    if not k.startswith(prefix):
                        return
                    yield kept + k[len(prefix):], bytes(v)
        txn.cursor(db=self.versions).putmulti(copies())
        return main

    def _delete_prefixed(self, txn: lmdb.Transaction, db: Any, prefix: bytes) -> None:
        cursor = txn.cursor(db=db)
        if cursor.set_range(prefix):
            while bytes(cursor.key()).startswith(prefix) and cursor.delete():
                pass

    def kept_version(self, agent_id: str, was: str) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
        """The copy under versions/ of what ``was`` left: its main record and items (under
        their own keys), or None."""
        with self._read_txn() as txn:
            kept = self._kept(txn, agent_id, was)
            return None if kept is None else (kept[0], list(kept[1]))

    def _kept(self, txn: lmdb.Transaction, agent_id: str,
              was: str) -> tuple[bytes, Iterable[tuple[bytes, bytes]]] | None:
        kept = _kept_prefix(agent_id, was)
        main = txn.get(kept, db=self.versions)
        if main is None:
            old = txn.get(_first_layout(agent_id, was), db=self.versions)  # one value of them all
            if old is None:
                return None
            record = decode(bytes(old))
            return bytes(record["main"]), [(bytes(k), bytes(v)) for k, v in record["items"]]
        prefix = agent_prefix(agent_id)

        def items() -> Iterator[tuple[bytes, bytes]]:
            cursor = txn.cursor(db=self.versions)
            cursor.set_key(kept)  # the main record; its items follow it
            for key, v in cursor.iternext():
                k = bytes(key)
                if k == kept:
                    continue
                if not k.startswith(kept):
                    return
                yield prefix + k[len(kept):], bytes(v)
        return bytes(main), items()

    def keep_version(self, agent_id: str, was: str) -> None:
        """A copy of the agent's records as ``was`` left them, under versions/."""
        with _switch_needs_room(agent_id, was), self._held(agent_id):
            self._write(lambda txn: self._keep(txn, agent_id, was), agent_id)

    def switch_version(self, agent_id: str, was: str, now: str) -> bool:
        """Keep the records ``was`` left under versions/, and put back what ``now`` left, if any.

        One transaction: nothing is lost if the process dies in the middle.  Returns True
        if ``now`` had records (a rollback restored them), False if it starts from ``was``'s."""
        def work(txn: lmdb.Transaction) -> bool:
            main = self._keep(txn, agent_id, was)
            if main is None:
                return False
            saved = self._kept(txn, agent_id, now)
            if saved is None:
                return False
            old_main, old_items = saved
            self._delete_prefixed(txn, self.items, agent_prefix(agent_id))
            # what ``now`` left, with a seq past the one ``was`` reached: seq never goes back
            txn.put(agent_id.encode(), with_seq_past(old_main, _seq_of(main)), db=self.main)
            txn.cursor(db=self.items).putmulti(old_items)
            return True
        with _switch_needs_room(agent_id, was), self._held(agent_id):
            return self._write(work, agent_id)

    def put_main(self, agent_id: str, main: bytes) -> None:
        """Replace an agent's main record (a migration written by an operator)."""
        with self._held(agent_id):
            self._write(lambda txn: txn.put(agent_id.encode(), main, db=self.main), agent_id)

    def put_raw(self, agent_id: str, main: bytes, items: list[tuple[bytes, bytes]], replace: bool = True) -> None:
        """Restore an agent's records (import): its old items are replaced."""
        prefix = agent_prefix(agent_id)
        def work(txn: lmdb.Transaction) -> None:
            if not replace and txn.get(agent_id.encode(), db=self.main) is not None:
                raise OtpdError("already_exists", f"{agent_id!r} has a record", {"id": agent_id})
            for k, _v in self._prefixed(txn, prefix):
                txn.delete(k, db=self.items)
            txn.put(agent_id.encode(), main, db=self.main)
            for k, v in items:
                txn.put(k, v, db=self.items)
        with self._held(agent_id):
            self._write(work, agent_id)


def _first_layout(agent_id: str, was: str) -> bytes:
    return agent_id.encode() + SEP + was.encode()


def _kept_prefix(agent_id: str, was: str) -> bytes:
    """versions/: ``agent_id NUL tag NUL`` -> the main record; that and an item's key past the
    agent's prefix (``collection NUL key``) -> the item.  ``tag`` names the class ``was`` in
    16 bytes (a hash): an item key may take all but 32 of LMDB's 511 bytes (``MAX_ITEM_KEY``),
    so a class's whole name would not fit beside it.  (The main record says which class wrote
    it.  The first layout, still read: one value at ``agent_id NUL was``, msgpack
    ``{"main", "items"}``.)"""
    return agent_id.encode() + SEP + hashlib.blake2b(was.encode(), digest_size=8).hexdigest().encode() + SEP


@contextmanager
def _switch_needs_room(agent_id: str, was: str) -> Iterator[None]:
    """store_full in a version switch, said as what it is and what to do: the agent's records
    are as they were, and it cannot start under the switch until there is room."""
    try:
        yield
    except OtpdError as err:
        if err.code != "store_full":
            raise
        raise OtpdError("store_full", f"the version switch of {agent_id!r} keeps a copy of the records "
                        f"{was} left, for a rollback, and the store is full (its map_size_max_mb): nothing "
                        f"was changed. Free room (or raise [store] map_size_max_mb and restart otpd), or "
                        f"set the switch's flag back, then `otpctl start {agent_id}`",
                        {"id": agent_id, "switch": True}) from None


_SNAPSHOT_TRIES = 5  # a checkpoint is every checkpoint_ms (100 ms): five in a row between two reads is not luck


def check_record(agent_id: str, data: bytes) -> dict[str, Any]:
    """A main record decoded, or ``store_corrupt`` saying what is wrong with it: what a
    restart would trip on (the shape; each collection's markers, integers) is found here."""
    try:
        record = decode(data)
    except Exception as exc:  # any decoding failure means the bytes are not ours
        raise corrupt(agent_id, f"undecodable record ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("version"), int) \
            or not isinstance(record.get("state"), dict) or not isinstance(record.get("seq"), int):
        raise corrupt(agent_id, "record is not {version, state, saved_at, seq}")
    markers = record.get("collections")
    if markers is not None and not (isinstance(markers, dict) and all(
            isinstance(name, str) and isinstance(marks, dict)
            and all(isinstance(k, str) and type(v) is int for k, v in marks.items())
            for name, marks in markers.items())):
        raise corrupt(agent_id, "its collections are not {name: {marker: integer}}")
    return record


def _scan(txn: lmdb.Transaction, db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    cursor = txn.cursor(db=db)
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        k = bytes(key)
        if not k.startswith(prefix):
            return
        yield k, bytes(value)


def _merged(base: Iterator[tuple[bytes, bytes]], changes: list[tuple[bytes, bytes | None]]
            ) -> Iterator[tuple[bytes, bytes]]:
    """``base`` (in key order) with ``changes`` (sorted; None deletes) over it, in key order:
    a merge, so a million items and a few changes cost no copy of the million."""
    i = 0
    for key, value in base:
        while i < len(changes) and changes[i][0] < key:
            if changes[i][1] is not None:
                yield changes[i]  # type: ignore[misc]
            i += 1
        if i < len(changes) and changes[i][0] == key:
            if changes[i][1] is not None:
                yield changes[i]  # type: ignore[misc]
            i += 1
        else:
            yield key, value
    for key, change in changes[i:]:
        if change is not None:
            yield key, change


def _seq_of(raw: bytes | None, strict_for: str | None = None) -> int:
    """The seq of an encoded main record: 0 for none, and for one that does not decode
    (with ``strict_for``, an agent id, that is ``store_corrupt``: a log is never applied
    over a bad record, which would overwrite it)."""
    if raw is None:
        return 0
    try:
        record = decode(raw)
    except Exception:
        record = None
    seq = record.get("seq") if isinstance(record, dict) else None
    if isinstance(seq, int):
        return seq
    if strict_for is not None:
        raise corrupt(strict_for, "its main record in LMDB does not decode (its log is not applied over it)")
    return 0


def with_seq_past(main: bytes, seq: int) -> bytes:
    """``main`` with its seq set past its own and ``seq``, so that what replaces a record with a
    seq never brings it back (a restore, a version switch rolled back).  A record that does not
    decode (restored as raw bytes, say) is kept exactly."""
    try:
        record = decode(main)
    except Exception:
        return main
    if isinstance(record, dict) and isinstance(record.get("seq"), int):
        record["seq"] = max(record["seq"], seq) + 1
        return encode(record)
    return main


def corrupt(agent_id: str, why: str) -> OtpdError:
    return OtpdError("store_corrupt", f"agent {agent_id!r}: {why}; the record is kept (see `otpctl state "
                     f"quarantine {agent_id}`)", {"id": agent_id})


@dataclass(frozen=True)
class StoreSettings:
    """What a child needs to open the store after fork."""

    path: Path
    durability: str = "process"  # "process" | "fsync" | "none"
    map_size_mb: int = 1024
    map_size_max_mb: int | None = None
    sync_interval_ms: int = 1000
    checkpoint_ms: int = 100  # an agent's log is applied to LMDB this long after its first entry
    sync_helper: str = "auto"  # fsync: "auto" | "always" | "never" (otpd.agent.runtime.Syncer)
