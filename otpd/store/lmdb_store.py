"""Agent state in LMDB: one main record per agent id, one record per collection item.

Layout (three named databases in one environment under ``state_dir/store``):

* ``main``: ``agent_id`` -> msgpack ``{"version", "state", "collections", "saved_at", "seq"}``.
  ``state`` holds the persistent scalar fields, ``collections`` each collection's
  markers (a queue's head/tail, a map's length), ``seq`` grows by one per commit.
* ``items``: ``agent_id NUL collection NUL key`` -> msgpack item, so changing a
  collection writes O(1) records and loading an agent reads O(1) records.
* ``quarantine``: records moved aside by an operator, never deleted by otpd.
* ``versions``: an agent's records as the other class of a version switch left them
  (``agent_id NUL module:Class`` -> its main record and items), for a rollback.
* ``meta``: the daemon's own small records (feature flags set at run time).

An environment is opened in the process that uses it, after fork, never
inherited.  ``durability="process"`` commits without fsync (the data is in the
page cache the moment the commit returns, so it survives SIGKILL of any
process) and syncs periodically; ``"fsync"`` syncs every commit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from otpd import codec
from otpd.errors import OtpdError

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
        self.map_size_max = (map_size_max_mb or max(map_size_mb, 65536)) << 20
        if not readonly:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
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

    def close(self) -> None:
        self.end_reads()
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

    def read_raw(self, agent_id: str) -> bytes | None:
        with self._read_txn() as txn:
            data = txn.get(agent_id.encode(), db=self.main)
            return bytes(data) if data is not None else None

    def read(self, agent_id: str) -> dict[str, Any] | None:
        """The agent's main record, or None; ``store_corrupt`` if it does not decode."""
        data = self.read_raw(agent_id)
        if data is None:
            return None
        try:
            record = decode(data)
        except Exception as exc:  # any decoding failure means the bytes are not ours
            raise corrupt(agent_id, f"undecodable record ({type(exc).__name__}: {exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("version"), int) \
                or not isinstance(record.get("state"), dict) or not isinstance(record.get("seq"), int):
            raise corrupt(agent_id, "record is not {version, state, saved_at, seq}")
        return record

    def get_item(self, key: bytes) -> bytes | None:
        """One item, read in a transaction kept until ``end_reads`` (or the next write).

        An agent reads items while it handles a batch of calls; one read transaction
        for the whole batch instead of one per read (a begin, a reader slot, an abort)
        is most of what a read costs.  It must not outlive the batch: an open reader
        keeps LMDB from reusing pages that later commits free, so the file would grow."""
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

    def scan_items(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        with self._read_txn() as txn:
            cursor = txn.cursor(db=self.items)
            if not cursor.set_range(prefix):
                return
            for key, value in cursor:
                key = bytes(key)
                if not key.startswith(prefix):
                    return
                yield key, bytes(value)

    def agent_ids(self) -> list[str]:
        with self._read_txn() as txn:
            return [bytes(k).decode() for k in txn.cursor(db=self.main).iternext(values=False)]

    # -- writes ------------------------------------------------------------------

    def commit(self, agent_id: str, record: bytes, items: dict[bytes, bytes | None]) -> None:
        """Write the main record and item changes (None deletes) in one transaction."""
        self.end_reads()
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    txn.put(agent_id.encode(), record, db=self.main)
                    for key, value in items.items():
                        if value is None:
                            txn.delete(key, db=self.items)
                        else:
                            txn.put(key, value, db=self.items)
                return
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.MapFullError:
                if not self._grow():
                    raise OtpdError("store_full", f"the store is full ({self.map_size() >> 20} MiB, the "
                                    "configured maximum); the change was not saved", {"id": agent_id}) from None

    def _grow(self) -> bool:
        size = self.map_size()
        if size >= self.map_size_max:
            return False
        self.env.set_mapsize(min(size * 2, self.map_size_max))
        return True

    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def sync(self) -> None:
        self.env.sync(True)

    # -- operator tools --------------------------------------------------------

    def _prefixed(self, txn: lmdb.Transaction, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of the items DB under ``prefix``, in key order."""
        out = []
        cursor = txn.cursor(db=self.items)
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
        with self.env.begin(write=True) as txn:
            main = txn.get(agent_id.encode(), db=self.main)
            if main is None:
                raise OtpdError("not_found", f"no record for {agent_id!r}", {"id": agent_id})
            txn.put(key.encode(), bytes(main), db=self.quarantined)
            for k, v in self._prefixed(txn, prefix):
                txn.put(key.encode() + SEP + k[len(prefix):], v, db=self.quarantined)
                txn.delete(k, db=self.items)
            txn.delete(agent_id.encode(), db=self.main)
        return key

    def delete_agent(self, agent_id: str) -> bool:
        """Delete an agent's records for good (a finished workflow past its retention)."""
        prefix = agent_prefix(agent_id)
        with self.env.begin(write=True) as txn:
            for k, _v in self._prefixed(txn, prefix):
                txn.delete(k, db=self.items)
            return bool(txn.delete(agent_id.encode(), db=self.main))

    # -- the daemon's records and version switches ----------------------------------

    def get_meta(self, key: str) -> Any:
        with self._read_txn() as txn:
            data = txn.get(key.encode(), db=self.meta)
        return decode(bytes(data)) if data is not None else None

    def put_meta(self, key: str, value: Any) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), encode(value), db=self.meta)

    def _records(self, txn: lmdb.Transaction, agent_id: str) -> tuple[bytes | None, list[tuple[bytes, bytes]]]:
        main = txn.get(agent_id.encode(), db=self.main)
        return (bytes(main) if main is not None else None), self._prefixed(txn, agent_prefix(agent_id))

    def keep_version(self, agent_id: str, was: str) -> None:
        """A copy of the agent's records as ``was`` left them, under versions/."""
        with self.env.begin(write=True) as txn:
            main, items = self._records(txn, agent_id)
            if main is not None:
                txn.put(f"{agent_id}\x00{was}".encode(), encode({"main": main, "items": items}), db=self.versions)

    def switch_version(self, agent_id: str, was: str, now: str) -> bool:
        """Keep the records ``was`` left under versions/, and put back what ``now`` left, if any.

        One transaction: nothing is lost if the process dies in the middle.  Returns True
        if ``now`` had records (a rollback restored them), False if it starts from ``was``'s."""
        with self.env.begin(write=True) as txn:
            main, items = self._records(txn, agent_id)
            if main is None:
                return False
            txn.put(f"{agent_id}\x00{was}".encode(), encode({"main": main, "items": items}), db=self.versions)
            saved = txn.get(f"{agent_id}\x00{now}".encode(), db=self.versions)
            if saved is None:
                return False
            old = decode(bytes(saved))
            for k, _v in items:
                txn.delete(k, db=self.items)
            txn.put(agent_id.encode(), old["main"], db=self.main)
            for k, v in old["items"]:
                txn.put(k, v, db=self.items)
            return True

    def put_raw(self, agent_id: str, main: bytes, items: list[tuple[bytes, bytes]], replace: bool = True) -> None:
        """Restore an agent's records (import): its old items are replaced."""
        prefix = agent_prefix(agent_id)
        with self.env.begin(write=True) as txn:
            if not replace and txn.get(agent_id.encode(), db=self.main) is not None:
                raise OtpdError("already_exists", f"{agent_id!r} has a record", {"id": agent_id})
            for k, _v in self._prefixed(txn, prefix):
                txn.delete(k, db=self.items)
            txn.put(agent_id.encode(), main, db=self.main)
            for k, v in items:
                txn.put(k, v, db=self.items)


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
