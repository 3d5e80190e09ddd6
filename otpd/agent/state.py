"""An agent's persistent state: declared fields, persistent collections, migrations.

An agent class declares::

    state_version = 2
    fields = {"count": 0, "tags": set}        # default, or a zero-argument factory
    persistent_fields = ("count", "tags")
    collections = {"queue": PersistentQueue}  # one LMDB record per item
    migrations = {1: upgrade_v1}              # version n -> n + 1, a function of the state dict

    def on_before_save(self, state): ...      # -> msgpack-able dict (a set -> a list)
    def on_after_load(self, state): ...       # and back (a list -> a set)

The ``StateKeeper`` loads that into the agent before ``init`` and commits it
after every batch of messages in which something changed: the encoded
persistent fields differ from the last commit, or a collection was touched.
A commit that fails (``store_full``) rolls the agent back to the last commit,
so memory never holds what disk does not.
"""

from __future__ import annotations

import copy
import struct
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from otpd.errors import OtpdError
from otpd.store.lmdb_store import Store, corrupt, decode, encode, item_prefix

if TYPE_CHECKING:
    from otpd.agent.base import Agent

_MISSING = object()
# The longest item key (agent id, collection, encoded key): LMDB takes at most 511 bytes, and a
# quarantine puts its records under the agent id plus "@<time>" (18 bytes more), a version
# switch's copy under the agent id plus a 16-byte tag of the class (17 more).
MAX_ITEM_KEY = 511 - 32
_COLLECTIONS, _SAVED_AT, _SEQ = encode("collections"), encode("saved_at"), encode("seq")


class PersistentCollection:
    """Base of the collections: items are LMDB records under the agent's prefix."""

    def __init__(self, keeper: StateKeeper, name: str) -> None:
        self._keeper = keeper
        self.name = name
        self._prefix = item_prefix(keeper.agent_id, name)

    def markers(self) -> dict[str, int]:
        raise NotImplementedError

    def load_markers(self, markers: dict[str, int]) -> None:
        raise NotImplementedError


class PersistentQueue(PersistentCollection):
    """A FIFO queue: ``append`` / ``popleft`` / ``peek`` write or read one record each."""

    def __init__(self, keeper: StateKeeper, name: str) -> None:
        super().__init__(keeper, name)
        self.head = 0
        self.tail = 0

    def markers(self) -> dict[str, int]:
        return {"head": self.head, "tail": self.tail}

    def load_markers(self, markers: dict[str, int]) -> None:
        self.head, self.tail = int(markers.get("head", 0)), int(markers.get("tail", 0))

    def _key(self, index: int) -> bytes:
        return self._prefix + struct.pack(">Q", index)

    def __len__(self) -> int:
        return self.tail - self.head

    def __bool__(self) -> bool:
        return self.tail > self.head

    def append(self, item: Any) -> None:
        self._keeper.put(self._key(self.tail), item)
        self.tail += 1

    def popleft(self) -> Any:
        if self.tail == self.head:
            raise IndexError("pop from an empty queue")
        item = self.peek()
        self._keeper.delete(self._key(self.head))
        self.head += 1
        return item

    def peek(self, offset: int = 0) -> Any:
        if not 0 <= offset < len(self):
            raise IndexError("queue index out of range")
        item = self._keeper.get(self._key(self.head + offset))
        if item is _MISSING:
            raise corrupt(self._keeper.agent_id, f"queue {self.name!r} lost item {self.head + offset}")
        return item

    def __iter__(self) -> Iterator[Any]:
        for offset in range(len(self)):
            yield self.peek(offset)


class PersistentMap(PersistentCollection):
    """A dict whose entries are LMDB records; keys are any msgpack-able value."""

    def __init__(self, keeper: StateKeeper, name: str) -> None:
        super().__init__(keeper, name)
        self.length = 0

    def markers(self) -> dict[str, int]:
        return {"len": self.length}

    def load_markers(self, markers: dict[str, int]) -> None:
        self.length = int(markers.get("len", 0))

    def _key(self, key: Any) -> bytes:
        k = self._prefix + encode(key)
        if len(k) > MAX_ITEM_KEY:  # refused before anything is acknowledged, never by LMDB later
            raise OtpdError("bad_request", f"key too long for {self.name!r}: {len(k) - len(self._prefix)} bytes "
                            f"encoded, at most {MAX_ITEM_KEY - len(self._prefix)}", {"collection": self.name})
        return k

    def __len__(self) -> int:
        return self.length

    def __contains__(self, key: Any) -> bool:
        return self._keeper.has(self._key(key))

    def get(self, key: Any, default: Any = None) -> Any:
        value = self._keeper.get(self._key(key))
        return default if value is _MISSING else value

    def __getitem__(self, key: Any) -> Any:
        value = self._keeper.get(self._key(key))
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        k = self._key(key)
        if not self._keeper.has(k):
            self.length += 1
        self._keeper.put(k, value)

    def __delitem__(self, key: Any) -> None:
        k = self._key(key)
        if not self._keeper.has(k):
            raise KeyError(key)
        self._keeper.delete(k)
        self.length -= 1

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        del self[key]
        return value

    def items(self) -> Iterator[tuple[Any, Any]]:
        """Every entry, in key-byte order (reads them all: O(n))."""
        merged: dict[bytes, bytes | None] = {}
        if self._keeper.store is not None:
            merged.update(self._keeper.store.scan_items(self._prefix))
        merged.update((k, v) for k, v in self._keeper.pending.items() if k.startswith(self._prefix))
        for k in sorted(merged):
            v = merged[k]
            if v is not None:
                yield self._keeper._decode(k, k[len(self._prefix):]), self._keeper._decode(k, v)

    def keys(self) -> Iterator[Any]:
        return (k for k, _ in self.items())


class StateKeeper:
    """Loads, tracks and commits one agent's persistent state."""

    def __init__(self, agent: Agent, store: Store | None, agent_ref: str = "") -> None:
        self.agent = agent
        self.agent_ref = agent_ref or f"{type(agent).__module__}:{type(agent).__qualname__}"
        self.agent_id = agent.id
        self.store = store
        self.cls = type(agent)
        self.pending: dict[bytes, bytes | None] = {}
        self.seq = 0
        self.last_state = b""
        self.last_markers: dict[str, dict[str, int]] = {}
        self.collections: dict[str, PersistentCollection] = {}
        self.unsynced = False
        self.switched = False  # under a version switch (agent / agent_next)
        # The main record is a msgpack map assembled around the already-encoded state;
        # its first keys never change, so they are encoded once.
        self._record_head = b"".join((
            b"\x86", encode("agent"), encode(self.agent_ref), encode("version"),
            encode(getattr(self.cls, "state_version", 1)), encode("state"),
        ))

    # -- item access for collections (pending writes first) ----------------------

    def get(self, key: bytes) -> Any:
        raw: bytes | None
        if key in self.pending:
            raw = self.pending[key]
        elif self.store is not None:
            raw = self.store.get_item(key)
        else:
            raw = None
        return _MISSING if raw is None else self._decode(key, raw)

    def _decode(self, key: bytes, raw: bytes) -> Any:
        try:
            return decode(raw)
        except Exception:  # whatever the decoder raises: the record is kept, the agent is told
            raise corrupt(self.agent_id, f"item {bytes(key)!r} does not decode") from None

    def has(self, key: bytes) -> bool:
        """Is there an item at ``key`` (pending writes first)? Nothing is decoded."""
        if key in self.pending:
            return self.pending[key] is not None
        return self.store is not None and self.store.has_item(key)

    def put(self, key: bytes, value: Any) -> None:
        self.pending[key] = encode(value)

    def delete(self, key: bytes) -> None:
        self.pending[key] = None

    # -- load -------------------------------------------------------------------

    def load(self, writes: bool = True) -> None:
        """Set defaults, then the persisted state (migrated) on the agent.

        ``writes=False`` (a rollback, after a commit that found the store full): no write of
        a version switch (its copy is there from the start's load), and no rewrite of the record
        as this class's until a real change (every batch, reads too, would be store_full)."""
        agent = self.agent
        for name, default in getattr(self.cls, "fields", {}).items():
            setattr(agent, name, default() if callable(default) else copy.deepcopy(default))
        self.collections = {name: kind(self, name) for name, kind in getattr(self.cls, "collections", {}).items()}
        for name, coll in self.collections.items():
            setattr(agent, name, coll)
        if self.store is not None:
            self.store.open_log(self.agent_id)  # what a crash left in the log is applied first
        record = self.store.read(self.agent_id) if self.store is not None else None
        writer = record.get("agent") if record is not None else None
        downgraded = None
        if self.switched and record is not None and isinstance(writer, str) and writer != self.agent_ref:
            # A version switch.  The current record is the truth: a copy of it is kept under
            # versions/, then a newer class's record comes down by its downgrades and an older
            # one up by our migrations, every acknowledged change kept.  Only a rollback with no
            # downgrades goes back to our own record as we left it at the switch.
            assert self.store is not None
            if record["version"] > self.cls.state_version:
                downgraded = downgrade(writer, self.agent_id, record, self.cls.state_version)
            if writes:
                if downgraded is not None or record["version"] <= self.cls.state_version:
                    self.store.keep_version(self.agent_id, writer)
                elif self.store.switch_version(self.agent_id, writer, self.agent_ref):
                    record = self.store.read(self.agent_id)
        if record is not None:
            state = downgraded if downgraded is not None else self._migrate(record["version"], record["state"])
            state = agent.on_after_load(state)
            for name in self.cls.persistent_fields:
                if name in state:
                    setattr(agent, name, state[name])
            markers = record.get("collections") or {}
            for name, coll in self.collections.items():
                coll.load_markers(markers.get(name, {}))
            self.seq = record["seq"]
        self.pending.clear()
        self.last_state, self.last_markers = self._snapshot()
        if writes and record is not None and (writer != self.agent_ref or record["version"] != self.cls.state_version):
            # Written by another class (a version switch) or version: the next commit (init's)
            # writes it as this one, migrated, even if nothing changes.  Left as it was, every
            # restart would switch again, and copy all its records under versions/ again.
            self.last_state = b""

    def rollback(self) -> None:
        """After a failed commit: back to what is on disk (nothing unsaved survives in memory),
        then the agent's ``on_rollback``."""
        self.load(writes=False)
        self.agent.on_rollback()

    def _migrate(self, version: int, state: dict[str, Any]) -> dict[str, Any]:
        return migrate(self.cls, self.agent_id, version, state)

    # -- commit -----------------------------------------------------------------

    def _snapshot(self) -> tuple[bytes, dict[str, dict[str, int]]]:
        fields = {name: getattr(self.agent, name) for name in self.cls.persistent_fields}
        state = encode(self.agent.on_before_save(fields))
        return state, {name: coll.markers() for name, coll in self.collections.items()}

    def commit(self) -> bool:
        """Write what changed since the last commit in one transaction; True if it wrote.

        Raises ``store_full`` after rolling the agent back to the last commit."""
        if self.store is None:
            return False
        state, markers = self._snapshot()
        if state == self.last_state and markers == self.last_markers and not self.pending:
            self.store.end_reads()  # the batch is over: its read transaction too
            return False
        seq = self.seq + 1
        record = b"".join((self._record_head, state, _COLLECTIONS, encode(markers), _SAVED_AT, encode(time.time()),
                           _SEQ, encode(seq)))
        try:
            self.store.commit(self.agent_id, record, self.pending, seq)
        except OtpdError:
            self.rollback()
            raise
        self.seq = seq
        self.pending.clear()
        self.last_state, self.last_markers = state, markers
        self.unsynced = True
        return True


def migrate(cls: type, agent_id: str, version: int, state: dict[str, Any]) -> dict[str, Any]:
    """Run a record's state through ``cls.migrations`` up to ``cls.state_version``."""
    target = getattr(cls, "state_version", 1)
    if version > target:
        raise corrupt(agent_id, f"written at state_version {version}, newer than this class ({target})")
    migrations = getattr(cls, "migrations", {})
    while version < target:
        step = migrations.get(version)
        if step is None:
            raise corrupt(agent_id, f"no migration from state_version {version} (class is at {target})")
        try:
            state = step(state)
        except Exception as exc:  # this record is not what the migration expects: kept, and said so
            raise corrupt(agent_id, f"the migration from state_version {version} fails on it "
                                    f"({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict):
            raise corrupt(agent_id, f"the migration from state_version {version} gave a "
                                    f"{type(state).__name__}, not a dict of fields")
        version += 1
    return state


def downgrade(writer: str, agent_id: str, record: dict[str, Any], target: int) -> dict[str, Any] | None:
    """The record's state brought down to ``target`` by its writer class's ``downgrades``
    ({n: f(state at n) -> state at n - 1}), or None if it is not newer or cannot be."""
    if record["version"] <= target:
        return None
    from otpd.agent.runtime import load_class

    try:
        steps = getattr(load_class(writer), "downgrades", {})
    except Exception:  # the writer's code is gone: fall back on the kept copy
        return None
    state: dict[str, Any] = record["state"]
    version: int = record["version"]
    while version > target:
        step = steps.get(version)
        if step is None:
            return None
        state, version = step(state), version - 1
    return state


def validate_declaration(cls: type) -> None:
    """Check an agent class's state declaration at config load (a clear error, not a crash loop)."""
    fields = getattr(cls, "fields", {})
    persistent = getattr(cls, "persistent_fields", ())
    if not isinstance(fields, dict) or not isinstance(persistent, (tuple, list)):
        raise TypeError("fields must be a dict and persistent_fields a tuple")
    unknown = [name for name in persistent if name not in fields]
    if unknown:
        raise TypeError(f"persistent_fields not declared in fields: {', '.join(unknown)}")
    for name, kind in getattr(cls, "collections", {}).items():
        if not (isinstance(kind, type) and issubclass(kind, PersistentCollection)):
            raise TypeError(f"collection {name!r} is not a PersistentQueue or PersistentMap")
        if name in fields:
            raise TypeError(f"{name!r} is both a field and a collection")
    if not isinstance(getattr(cls, "state_version", 1), int):
        raise TypeError("state_version must be an integer")

