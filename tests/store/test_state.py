"""The state API and the LMDB store, in one process: a real LMDB in a temp dir.

A "crash" here is dropping every object and loading from a fresh Store, which
is what a restarted agent does; the tests with real SIGKILLs are in tests/system.
"""

from __future__ import annotations

import base64
import collections
import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otpd.agent.base import Agent
from otpd.agent.state import PersistentMap, PersistentQueue, StateKeeper, validate_declaration
from otpd.errors import OtpdError
from otpd.store import tools
from otpd.store.lmdb_store import Store, _kept_prefix, agent_prefix, encode, item_prefix


class Counter(Agent):
    state_version = 1
    fields = {"count": 0, "seen": set, "recent": collections.deque, "at": None, "scratch": list}
    persistent_fields = ("count", "seen", "recent", "at")
    collections = {"queue": PersistentQueue, "table": PersistentMap}

    def on_before_save(self, state: dict[str, Any]) -> dict[str, Any]:
        return {**state, "seen": sorted(state["seen"]), "recent": list(state["recent"]),
                "at": state["at"].isoformat() if state["at"] else None}

    def on_after_load(self, state: dict[str, Any]) -> dict[str, Any]:
        return {**state, "seen": set(state["seen"]), "recent": collections.deque(state["recent"], maxlen=3),
                "at": datetime.datetime.fromisoformat(state["at"]) if state["at"] else None}


def boot(path: Path, cls: type[Agent] = Counter, **store_kw: Any) -> tuple[Any, StateKeeper]:
    agent = cls("c1", {})
    store = Store(path, **store_kw)
    keeper = StateKeeper(agent, store)
    try:
        keeper.load()
    except BaseException:
        store.close()
        raise
    return agent, keeper


def test_mutable_defaults_come_from_factories_and_are_not_shared(tmp_path: Path) -> None:
    a, _ = boot(tmp_path / "a")
    b, _ = boot(tmp_path / "b")
    a.seen.add(1)
    a.scratch.append(1)
    assert b.seen == set() and b.scratch == []


def test_state_survives_a_reload_with_hooks_for_non_msgpack_types(tmp_path: Path) -> None:
    agent, keeper = boot(tmp_path)
    agent.count = 7
    agent.seen |= {"x", "y"}
    agent.recent.extend([1, 2])
    agent.at = datetime.datetime(2026, 1, 2, 3, 4, 5)
    agent.scratch.append("not persistent")
    for i in range(10):
        agent.queue.append({"task": i})
    agent.table["k"] = b"\x00bytes"
    assert keeper.commit()
    keeper.store.close()  # type: ignore[union-attr]

    again, keeper2 = boot(tmp_path)
    assert again.count == 7 and again.seen == {"x", "y"}
    assert again.recent == collections.deque([1, 2]) and again.at == datetime.datetime(2026, 1, 2, 3, 4, 5)
    assert again.scratch == []
    assert list(again.queue) == [{"task": i} for i in range(10)]
    assert again.table["k"] == b"\x00bytes" and len(again.table) == 1
    assert keeper2.seq == 1


def test_nothing_changed_means_no_commit_and_seq_only_grows(tmp_path: Path) -> None:
    agent, keeper = boot(tmp_path)
    assert not keeper.commit()
    seqs = []
    for i in range(5):
        agent.count = i + 1
        assert keeper.commit()
        seqs.append(keeper.seq)
    assert seqs == [1, 2, 3, 4, 5]
    agent.scratch.append(1)  # not persistent: not a change
    assert not keeper.commit()


def test_queue_and_map_read_their_own_uncommitted_writes(tmp_path: Path) -> None:
    agent, keeper = boot(tmp_path)
    agent.queue.append("a")
    agent.queue.append("b")
    assert agent.queue.popleft() == "a" and len(agent.queue) == 1
    agent.table["x"] = 1
    agent.table["x"] = 2
    assert len(agent.table) == 1 and agent.table["x"] == 2
    del agent.table["x"]
    assert "x" not in agent.table and len(agent.table) == 0
    with pytest.raises(KeyError):
        del agent.table["x"]
    keeper.commit()
    assert list(agent.table.items()) == [] and list(agent.queue) == ["b"]


def test_a_commit_writes_only_the_changed_items(tmp_path: Path) -> None:
    agent, keeper = boot(tmp_path)
    for i in range(1000):
        agent.queue.append(i)
    keeper.commit()
    agent.queue.append("one more")
    assert len(keeper.pending) == 1  # O(1) per change, whatever the queue's length
    keeper.commit()
    agent.queue.popleft()
    assert len(keeper.pending) == 1


def test_migrations_run_from_each_older_version(tmp_path: Path) -> None:
    class V1(Agent):
        state_version = 1
        fields = {"name": ""}
        persistent_fields = ("name",)

    class V3(Agent):
        state_version = 3
        fields = {"first": "", "last": "", "title": ""}
        persistent_fields = ("first", "last", "title")
        migrations = {
            1: lambda s: {"first": s["name"].split()[0], "last": s["name"].split()[-1]},
            2: lambda s: {**s, "title": "dr"},
        }

    old, keeper = boot(tmp_path, V1)
    old.name = "Ada Lovelace"
    keeper.commit()
    keeper.store.close()  # type: ignore[union-attr]
    new, keeper = boot(tmp_path, V3)
    assert (new.first, new.last, new.title) == ("Ada", "Lovelace", "dr")
    new.title = "countess"
    keeper.commit()
    assert keeper.store.read("c1")["version"] == 3  # type: ignore[union-attr,index]


def test_missing_migration_and_newer_record_are_store_corrupt_and_keep_the_record(tmp_path: Path) -> None:
    class V1(Agent):
        fields = {"n": 0}
        persistent_fields = ("n",)

    class V3(V1):
        state_version = 3
        migrations = {2: lambda s: s}  # nothing from 1

    agent, keeper = boot(tmp_path, V1)
    agent.n = 1
    keeper.commit()
    keeper.store.close()  # type: ignore[union-attr]
    with pytest.raises(OtpdError) as err:
        boot(tmp_path, V3)
    assert err.value.code == "store_corrupt" and "c1" in err.value.message
    assert "no migration from state_version 1" in err.value.message

    class V0(V1):
        state_version = 0

    with pytest.raises(OtpdError) as err:
        boot(tmp_path, V0)
    assert err.value.code == "store_corrupt"
    store = Store(tmp_path)
    assert store.read("c1")["state"] == {"n": 1}  # type: ignore[index]
    store.close()


def test_undecodable_record_is_store_corrupt_and_never_deleted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.put_raw("c1", b"\xc1\xc1 not msgpack", [])
    with pytest.raises(OtpdError) as err:
        StateKeeper(Counter("c1", {}), store).load()
    assert err.value.code == "store_corrupt"
    assert store.read_raw("c1") == b"\xc1\xc1 not msgpack"
    key = store.quarantine("c1")
    assert store.read_raw("c1") is None
    with store.env.begin() as txn:
        assert bytes(txn.get(key.encode(), db=store.quarantined)) == b"\xc1\xc1 not msgpack"
    store.close()
    agent, keeper = boot(tmp_path)  # starts fresh
    assert agent.count == 0


def test_store_full_rolls_back_to_the_last_commit_and_the_agent_goes_on(tmp_path: Path) -> None:
    agent, keeper = boot(tmp_path, map_size_mb=1, map_size_max_mb=1)
    agent.count = 1
    agent.queue.append("kept")
    keeper.commit()
    agent.count = 2
    for _ in range(200):
        agent.queue.append("x" * 10_000)  # 2 MB into a 1 MiB map
    with pytest.raises(OtpdError) as err:
        keeper.commit()
    assert err.value.code == "store_full"
    assert agent.count == 1 and list(agent.queue) == ["kept"]  # memory is back at the disk's state
    agent.count = 3
    assert keeper.commit()  # a small change still fits


def test_a_full_map_grows_up_to_its_maximum(tmp_path: Path) -> None:
    agent, keeper = boot(tmp_path, map_size_mb=1, map_size_max_mb=16)
    for _ in range(200):
        agent.queue.append("x" * 10_000)
    assert keeper.commit()  # into the agent's log; LMDB takes it at the checkpoint
    keeper.store.checkpoint()  # type: ignore[union-attr]
    assert keeper.store.map_size() > 1 << 20  # type: ignore[union-attr]


def test_declarations_are_checked() -> None:
    class Bad(Agent):
        fields = {"a": 0}
        persistent_fields = ("a", "b")

    with pytest.raises(TypeError, match="b"):
        validate_declaration(Bad)


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(MSGPACK_VALUES, min_size=1, max_size=8))
def test_export_then_import_is_lossless(tmp_path_factory: pytest.TempPathFactory, values: list[Any]) -> None:
    path = tmp_path_factory.mktemp("exp")
    agent, keeper = boot(path)
    for v in values:
        agent.queue.append(v)
        agent.table[len(agent.table)] = v
    agent.count = len(values)
    keeper.commit()
    store = keeper.store
    assert store is not None
    before = {k: v for k, v in store.scan_items(b"c1\x00")}
    main_before = store.read("c1")
    lines = list(tools.export(store, ["c1"]))
    store.quarantine("c1")
    tools.import_records(store, tools.parse_export(lines))
    assert {k: v for k, v in store.scan_items(b"c1\x00")} == before
    assert store.read("c1") == main_before
    edited = [line.replace('"raw"', '"unused"') for line in lines]  # import from the JSON view
    tools.import_records(store, tools.parse_export(edited))
    assert store.read("c1")["state"] == main_before["state"]  # type: ignore[index]
    store.close()


def test_import_keeps_seq_growing(tmp_path: Path) -> None:
    agent, keeper = boot(tmp_path)
    agent.count = 1
    keeper.commit()
    lines = list(tools.export(keeper.store, ["c1"]))  # type: ignore[arg-type]
    for i in range(3):
        agent.count = i + 2
        keeper.commit()
    tools.import_records(keeper.store, tools.parse_export(lines))  # type: ignore[arg-type]
    record = keeper.store.read("c1")  # type: ignore[union-attr]
    assert record["state"]["count"] == 1 and record["seq"] == 5  # type: ignore[index]


def test_a_broken_export_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    good = base64.b64encode(encode({"version": 1, "state": {}, "seq": 1})).decode()
    with pytest.raises(OtpdError) as err:
        tools.parse_export([f'{{"type": "agent", "id": "a", "raw": "{good}"}}', "{not json"])
    assert err.value.code == "bad_request" and "line 2" in err.value.message
    with pytest.raises(OtpdError):
        tools.parse_export(['{"type": "item", "id": "a", "key": "AA==", "raw": "AQ=="}'])
    assert encode(1) == b"\x01"


def test_item_reads_share_one_transaction_that_ends_with_the_batch(tmp_path: Path) -> None:
    # An open reader pins the pages later commits free, so it must not outlive a batch,
    # also a batch that only read (commit() writes nothing then).
    agent, keeper = boot(tmp_path)
    store = keeper.store
    assert store is not None
    agent.table["a"] = 1
    keeper.commit()
    assert agent.table.get("a") == 1 and "b" not in agent.table
    assert store._reads is not None  # the batch's reads went through one transaction
    assert not keeper.commit()
    assert store._reads is None


def test_a_read_after_a_commit_sees_the_commit(tmp_path: Path) -> None:
    agent, keeper = boot(tmp_path)
    assert "k" not in agent.table  # opens the batch's read transaction
    agent.table["k"] = "v"
    keeper.commit()
    keeper.pending.clear()  # only the store can answer now
    assert agent.table["k"] == "v" and len(agent.table) == 1
    keeper.commit()


def test_an_item_that_does_not_decode_is_store_corrupt_and_kept(tmp_path: Path) -> None:
    """One bad item used to crash the agent with the decoder's own exception (a start failure
    coded ``internal`` when init read it); it is ``store_corrupt`` naming the agent, and kept."""
    from otpd.store.lmdb_store import item_prefix

    agent, keeper = boot(tmp_path)
    agent.table["good"] = 1
    agent.table["bad"] = 2
    keeper.commit()
    store = keeper.store
    assert store is not None
    store.checkpoint()
    bad_key = item_prefix("c1", "table") + encode("bad")
    with store.env.begin(write=True) as txn:
        txn.put(bad_key, b"\xc1 not msgpack", db=store.items)
    store.end_reads()
    assert agent.table.get("good") == 1
    for read in (lambda: agent.table.get("bad"), lambda: dict(agent.table.items())):
        with pytest.raises(OtpdError) as err:
            read()
        assert err.value.code == "store_corrupt" and "'c1'" in err.value.message
    assert store.get_item(bad_key) == b"\xc1 not msgpack"
    store.close()


def test_a_version_switch_rolled_back_keeps_seq_growing(tmp_path: Path) -> None:
    """A -> B -> A with no downgrade puts back A's records: their seq is set past B's, or the
    daemon would see the agent's state go back (``seq_regressed``)."""
    store = Store(tmp_path)

    def main(seq: int) -> bytes:
        return encode({"agent": "m:A", "version": 1, "state": {}, "collections": {}, "saved_at": 0.0, "seq": seq})

    store.put_main("v", main(3))
    assert store.switch_version("v", "m:A", "m:B") is False  # B starts from A's records
    store.put_main("v", main(8))  # B commits on
    assert store.switch_version("v", "m:B", "m:A") is True  # back to A's records...
    assert store.read("v")["seq"] == 9  # ...past B's seq
    store.close()


def test_a_version_switch_keeps_one_record_per_item_and_rolls_back_to_them(tmp_path: Path) -> None:
    """The copy kept for a rollback was one LMDB value holding every item: an agent of a million
    items built and wrote a value of tens of MB in one piece.  It is now a record per item."""
    store = Store(tmp_path)

    def main(cls: str, seq: int) -> bytes:
        return encode({"agent": cls, "version": 1, "state": {}, "collections": {}, "saved_at": 0.0, "seq": seq})

    a_items = [(item_prefix("v", "data") + encode(i), encode(f"a{i}")) for i in range(1000)]
    store.put_raw("v", main("m:A", 3), a_items)
    store.put_raw("w", main("m:A", 1), [(item_prefix("w", "data") + encode(0), encode("w's"))])  # a neighbour
    assert store.switch_version("v", "m:A", "m:B") is False  # B starts from A's records, a copy kept
    with store.env.begin() as txn:
        kept = [bytes(k) for k, _v in txn.cursor(db=store.versions)]
    assert len(kept) == 1 + 1000 and all(k.startswith(_kept_prefix("v", "m:A")) for k in kept)
    assert store.kept_version("v", "m:A") == (main("m:A", 3), a_items)
    b_items = [(item_prefix("v", "data") + encode("b"), encode("b's"))]
    store.put_raw("v", main("m:B", 9), b_items)  # B commits on (its items replace A's)
    assert store.switch_version("v", "m:B", "m:A") is True  # back to A's items, B's kept
    assert sorted(store.scan_items(agent_prefix("v"))) == sorted(a_items)
    assert store.kept_version("v", "m:B") == (main("m:B", 9), b_items)
    assert list(store.scan_items(agent_prefix("w"))) == [(item_prefix("w", "data") + encode(0), encode("w's"))]
    assert store.read("v")["seq"] == 10  # type: ignore[index]
    store.close()


def test_a_version_switch_copies_item_keys_as_long_as_a_collection_takes(tmp_path: Path) -> None:
    """Found by a review helper: the copy's keys held the class's whole name, so with item keys
    near MAX_ITEM_KEY and a class name over ~31 bytes they passed LMDB's 511 (MDB_BAD_VALSIZE),
    and the agent could not start under the switch."""
    from otpd.agent.state import MAX_ITEM_KEY

    store = Store(tmp_path)
    was = "myapp.agents.counters_with_a_long_module_name:CounterAgent"
    prefix = item_prefix("v", "data")
    key = prefix + encode("k" * (MAX_ITEM_KEY - len(prefix) - 3))
    assert len(key) == MAX_ITEM_KEY
    store.put_raw("v", encode({"agent": was, "version": 1, "state": {}, "collections": {"data": {"len": 1}},
                               "saved_at": 0.0, "seq": 1}), [(key, encode(1))])
    assert store.switch_version("v", was, was + "V2") is False
    assert store.kept_version("v", was) == (store.read_raw("v"), [(key, encode(1))])
    store.close()


def test_a_copy_kept_in_the_first_layout_still_rolls_back(tmp_path: Path) -> None:
    """Copies made before the layout changed (one value of main and items) are read as they are."""
    store = Store(tmp_path)
    a_main = encode({"agent": "m:A", "version": 1, "state": {"n": 1}, "collections": {}, "saved_at": 0.0, "seq": 2})
    a_items = [(item_prefix("v", "data") + encode("k"), encode("a's"))]
    store._write(lambda txn: txn.put(b"v\x00m:A", encode({"main": a_main, "items": a_items}), db=store.versions))
    store.put_raw("v", encode({"agent": "m:B", "version": 1, "state": {}, "collections": {}, "saved_at": 0.0,
                               "seq": 5}), [])
    assert store.switch_version("v", "m:B", "m:A") is True
    assert store.read("v")["state"] == {"n": 1}  # type: ignore[index]
    assert list(store.scan_items(agent_prefix("v"))) == a_items
    assert store.switch_version("v", "m:A", "m:B") is True  # A's copy again, now in the new layout
    with store.env.begin() as txn:
        assert txn.get(b"v\x00m:A", db=store.versions) is None  # the old one replaced, not left beside
        assert txn.get(_kept_prefix("v", "m:A"), db=store.versions) is not None
    store.close()


def test_tools_and_the_daemon_grow_the_map_too(tmp_path: Path) -> None:
    """A store opened afresh maps only what is used; the writes of tools (quarantine, import)
    and of the daemon (flags, version switches) grow it as an agent's commits do."""
    agent, keeper = boot(tmp_path, map_size_mb=1, map_size_max_mb=64)
    for _ in range(40):
        agent.queue.append("x" * 100_000)  # 4 MB: grown past 1 MiB
        keeper.commit()
    assert keeper.store is not None
    keeper.store.close()
    store = Store(tmp_path, map_size_mb=1, map_size_max_mb=64)
    size = store.map_size()
    store.put_meta("big", "y" * (size // 2))  # more than the map has room for
    assert store.map_size() > size and len(store.get_meta("big")) == size // 2
    assert store.quarantine("c1").startswith("c1@")
    store.close()


def test_a_rollback_after_a_switch_keeps_the_committed_state_and_writes_nothing(tmp_path: Path) -> None:
    """Found by a review helper: a commit refused store_full right after a version switch rolls
    back with a reload, which ran the switch again: a second copy of the old records, which
    on a full store raised, after the reload had set every field to its default.  The agent
    then ran on defaults, the ``len`` of 60 acknowledged puts answered 0.  A rollback writes
    nothing, and leaves the record's rewrite as the new class to the next real change."""
    from tests.flags.agents import KV1, KV2

    store = Store(tmp_path, map_size_mb=1, map_size_max_mb=1)
    old = KV1("kvs", {})
    keeper = StateKeeper(old, store, "tests.flags.agents:KV1")
    keeper.load()
    for i in range(60):
        old.data[i] = "x" * 3000
        old.puts += 1
    keeper.commit()
    store.checkpoint()

    agent = KV2("kvs", {})
    keeper = StateKeeper(agent, store, "tests.flags.agents:KV2")
    keeper.switched = True
    copies: list[str] = []
    keep_version = store.keep_version
    store.keep_version = lambda agent_id, was: (copies.append(was), keep_version(agent_id, was))[1]  # type: ignore[method-assign]
    keeper.load()
    assert copies == ["tests.flags.agents:KV1"]
    agent.data["big"] = "y" * (2 << 20)  # (init's change, say) more than the whole map
    with pytest.raises(OtpdError) as err:
        keeper.commit()
    assert err.value.code == "store_full"
    assert copies == ["tests.flags.agents:KV1"], "the rollback made no second copy"
    assert (agent.puts, len(agent.data), "big" in agent.data) == (60, 60, False)
    assert keeper.commit() is False  # a batch of reads: nothing to write, not store_full
    assert agent.data[59] == "x" * 3000
    store.close()
