"""The store's operator tools on records and files that are not what they should be (found by a
review helper): an export of a running agent is one commit, an import takes only what otpd can
load, a record a restart would trip on is ``store_corrupt`` (held failed, the tree runs on), and
no input gives a traceback.  Real stores in temp dirs; ``otpctl`` run as a user runs it."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from otpd.agent.base import Agent
from otpd.agent.state import PersistentQueue, StateKeeper
from otpd.errors import OtpdError
from otpd.store import tools
from otpd.store.lmdb_store import Store, encode
from tests.conftest import run_cli

KV = "otpd.agents.kv:KVAgent"


class Q(Agent):
    fields = {"added": 0}
    persistent_fields = ("added",)
    collections = {"items": PersistentQueue}


class Q2(Q):
    state_version = 2
    migrations = {1: lambda state: {"added": state["count"]}}


def boot(path: Path, cls: type[Agent] = Q) -> tuple[Agent, StateKeeper, Store]:
    agent = cls("q", {})
    store = Store(path)
    keeper = StateKeeper(agent, store)
    try:
        keeper.load()
    except BaseException:
        store.close()
        raise
    return agent, keeper, store


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "otpd.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/lib"\nruntime_dir = "{tmp_path}/run"\n\n'
                    f'[[root.children]]\nid = "kv"\nagent = "{KV}"\n', encoding="utf-8")
    Store(tmp_path / "lib" / "store").close()
    return path


def otpctl(tmp_path: Path, config: Path, *args: str) -> Any:
    return run_cli("otpctl", "--socket", str(tmp_path / "no-daemon.sock"), "state", *args, "--config", str(config))


def kv_record(**state: Any) -> dict[str, Any]:
    return {"agent": KV, "version": 1, "state": {"puts": 0, "deletes": 0, **state}, "seq": 1}


# -- export ------------------------------------------------------------------------------


def _agent(path: Path, conn: Any) -> None:  # the running agent, in a process of its own (as under otpd)
    agent, keeper, store = boot(path)
    for i in range(3):
        agent.items.append(i)  # type: ignore[attr-defined]
        keeper.commit()
    conn.send("committed")
    conn.recv()
    agent.items.popleft()  # type: ignore[attr-defined]
    agent.items.append(3)  # type: ignore[attr-defined]
    keeper.commit()
    store.checkpoint()  # (applied to LMDB, the log emptied, between the export's two reads)
    agent.items.append(4)  # type: ignore[attr-defined]
    keeper.commit()
    conn.send("committed")
    conn.recv()
    store.close()


def test_an_export_of_a_running_agent_is_one_commit_and_restores(tmp_path: Path) -> None:
    """The export read the main record, then its items afresh: an agent that committed between
    gave a backup whose queue markers did not match its items (restored: ``lost item 0``)."""
    parent, child = multiprocessing.get_context("fork").Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_agent, args=(tmp_path / "s", child))
    proc.start()
    try:
        assert parent.recv() == "committed"
        tool = Store(tmp_path / "s", readonly=True)  # what `otpctl state export` opens
        lines = tools.export(tool, ["q"])
        first = next(lines)  # the main record: head 0, tail 3
        parent.send("go")
        assert parent.recv() == "committed"  # two commits and a checkpoint meanwhile
        backup = [first, *lines]
        tool.close()
    finally:
        parent.send("end")
        proc.join(10)
    restored = Store(tmp_path / "r")
    tools.import_records(restored, tools.parse_export(backup))
    restored.close()
    agent, _keeper, store = boot(tmp_path / "r")
    try:
        assert list(agent.items) == [0, 1, 2]  # type: ignore[attr-defined]  # one commit's state, whole
    finally:
        store.close()


# -- import ------------------------------------------------------------------------------


def test_an_import_refuses_an_id_that_is_no_agent_id_and_touches_nothing(tmp_path: Path, config: Path) -> None:
    """``kv\\0data`` was taken: its put replaced every item under ``kv\\0data\\0``, kv's map."""
    store = Store(tmp_path / "lib" / "store")
    key = b"kv\x00data\x00" + encode("k")
    store.commit("kv", encode({**kv_record(puts=1), "collections": {"data": {"len": 1}}}), {key: encode(1)})
    store.close()
    bad = tmp_path / "nul.jsonl"
    bad.write_text(json.dumps({"type": "agent", "id": "kv\u0000data", "value": kv_record()}) + "\n")
    result = otpctl(tmp_path, config, "import", str(bad))
    assert result.returncode == 1 and "error bad_request" in result.stderr and "not an agent id" in result.stderr
    store = Store(tmp_path / "lib" / "store", readonly=True)
    try:
        assert list(store.scan_items(b"kv\x00")) == [(key, encode(1))]
    finally:
        store.close()


def test_an_id_with_a_final_newline_is_no_agent_id() -> None:
    """Found by a review helper: the id pattern ended in "$", which matches before a final
    newline (in the config, an add and an import alike)."""
    line = json.dumps({"type": "agent", "id": "a\n", "value": kv_record()})
    with pytest.raises(OtpdError) as err:
        tools.parse_export([line])
    assert err.value.code == "bad_request" and "not an agent id" in err.value.message


@pytest.mark.parametrize("text", [
    '{"type": "agent", "id": "kv", "value": 18446744073709551616}\n',  # too large for msgpack
    '{"type": "agent", "id": "\\ud800", "raw": "AQ=="}\n',  # a lone surrogate
    "[" * 100_000 + "\n",  # deeper than the JSON decoder goes
    '{"type": "agent", "id": "kv", "value": {"version": 1, "state": {"x": "\\udc80"}, "seq": 1}}\n',
])
def test_an_import_of_a_bad_line_is_a_clear_error(tmp_path: Path, config: Path, text: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text, encoding="utf-8", errors="surrogatepass")
    result = otpctl(tmp_path, config, "import", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-600:]
    assert "error bad_request: line 1" in result.stderr and "nothing was imported" in result.stderr


def test_an_import_of_a_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path, config: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps({"type": "agent", "id": "kv", "value": kv_record()}).encode() + b"\n\xff\xfe\x00x\n")
    result = otpctl(tmp_path, config, "import", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-600:]
    assert "error bad_request: line 2" in result.stderr


def test_an_import_refuses_two_records_for_one_agent(tmp_path: Path, config: Path) -> None:
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"type": "agent", "id": "kv", "value": kv_record(puts=5)}) + "\n"
                   + json.dumps({"type": "agent", "id": "kv", "value": kv_record()}) + "\n")
    result = otpctl(tmp_path, config, "import", str(dup))
    assert result.returncode == 1 and "line 2" in result.stderr and "the first is on line 1" in result.stderr
    item = {"type": "item", "id": "kv", "key": "AA==", "raw": "AQ=="}
    dup.write_text("\n".join(json.dumps(line) for line in ({"type": "agent", "id": "kv", "value": kv_record()},
                                                           item, item)) + "\n")
    result = otpctl(tmp_path, config, "import", str(dup))
    assert result.returncode == 1 and "line 3" in result.stderr and "same key" in result.stderr


@pytest.mark.parametrize("value", [
    {"version": "1", "state": [], "seq": "x"},
    {**kv_record(), "collections": {"data": 5}},
    {**kv_record(), "collections": {"data": {"len": "many"}}},
])
def test_an_import_refuses_a_record_otpd_could_not_load(tmp_path: Path, config: Path, value: Any) -> None:
    """It was written, and the agent was then store_corrupt; with ``collections`` wrong, a crash
    loop (AttributeError, ``internal``) until the root gave up and the daemon exited 4."""
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"type": "agent", "id": "kv", "value": value}) + "\n")
    result = otpctl(tmp_path, config, "import", str(wrong))
    assert result.returncode == 1 and "not a record otpd can load" in result.stderr, result.stderr
    store = Store(tmp_path / "lib" / "store", readonly=True)
    try:
        assert store.read("kv") is None
    finally:
        store.close()


def test_an_import_that_fails_midway_says_which_agents_it_wrote(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", map_size_mb=1, map_size_max_mb=1)
    big = [(b"b\x00data\x00" + encode(i), encode("x" * 10_000)) for i in range(200)]  # 2 MB: over the map
    records = {"a": (encode(kv_record()), []), "b": (encode(kv_record()), big), "c": (encode(kv_record()), [])}
    with pytest.raises(OtpdError) as err:
        tools.import_records(store, records)
    assert err.value.code == "store_full"
    assert err.value.details["imported"] == ["a"] and err.value.details["not_imported"] == ["b", "c"]
    assert "imported: a; not imported: b, c" in err.value.message
    assert store.read("a") is not None and store.read("b") is None
    store.close()


# -- show, migrate -------------------------------------------------------------------------


@pytest.mark.parametrize("collections, key, shown", [
    (5, b"xx", False),
    ({"q": 7}, b"q\x00x", False),
    (None, b"\xff\x00x", True),  # an item key that is not UTF-8: shown, escaped (its b"x" is msgpack 120)
])
def test_state_of_an_odd_record_is_a_clear_error_or_shown(tmp_path: Path, config: Path, collections: Any,
                                                         key: bytes, shown: bool) -> None:
    main = {"version": 1, "state": {}, "seq": 1, **({"collections": collections} if collections else {})}
    store = Store(tmp_path / "lib" / "store")
    store.put_raw("a1", encode(main), [(b"a1\x00" + key, encode(1))])  # (no tool writes these: a hand at LMDB)
    store.close()
    result = otpctl(tmp_path, config, "a1")
    assert "Traceback" not in result.stderr, result.stderr[-400:]
    if shown:
        assert result.returncode == 0 and json.loads(result.stdout)["items"] == {"\\xff": [[120, 1]]}
    else:
        assert result.returncode == 1 and "error store_corrupt" in result.stderr and "collections" in result.stderr


def test_a_dry_run_reports_a_migration_that_raises_as_that_records_error(tmp_path: Path) -> None:
    (tmp_path / "inbox_agents.py").write_text(
        "from otpd.agent.base import Agent\n"
        "class InboxV2(Agent):\n"
        "    state_version = 2\n"
        "    fields = {'items': list}\n"
        "    persistent_fields = ('items',)\n"
        "    migrations = {1: lambda state: {'items': state['messages']}}\n")
    config = tmp_path / "otpd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}/lib"\nruntime_dir = "{tmp_path}/run"\n\n'
                      '[[root.children]]\nid = "inbox"\nagent = "inbox_agents:InboxV2"\n')
    store = Store(tmp_path / "lib" / "store")
    store.put_raw("inbox", encode({"agent": "inbox_agents:InboxV2", "version": 1, "state": {"msgs": [1]},
                                   "seq": 1}), [])
    store.close()
    import os
    import subprocess

    from tests.conftest import child_env, console

    env = {**child_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), child_env().get("PYTHONPATH", "")])}
    result = subprocess.run(console("otpctl") + ["--json", "--socket", str(tmp_path / "none.sock"), "state",
                                                 "migrate", "--dry-run", "--config", str(config)],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-300:]
    (row,) = json.loads(result.stdout)["results"]
    assert row["id"] == "inbox" and row["error"]["code"] == "store_corrupt"
    assert "KeyError" in row["error"]["message"] and "messages" in row["error"]["message"]


# -- load: what a restart would trip on is store_corrupt --------------------------------------


@pytest.mark.parametrize("markers", [5, {"items": 5}, {"items": {"head": "x", "tail": 1}}])
def test_a_record_whose_markers_are_not_integers_is_store_corrupt(tmp_path: Path, markers: Any) -> None:
    store = Store(tmp_path / "s")
    store.put_raw("q", encode({"version": 1, "state": {"added": 1}, "seq": 1, "collections": markers}), [])
    store.close()
    with pytest.raises(OtpdError) as err:  # AttributeError, TypeError, ValueError: internal, restarted
        boot(tmp_path / "s")
    assert err.value.code == "store_corrupt" and "'q'" in err.value.message


def test_a_record_its_migration_fails_on_is_store_corrupt(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.put_raw("q", encode({"version": 1, "state": {"n": 1}, "seq": 1}), [])
    store.close()
    with pytest.raises(OtpdError) as err:  # KeyError: internal, restarted until the root gave up
        boot(tmp_path / "s", Q2)
    assert err.value.code == "store_corrupt" and "migration from state_version 1" in err.value.message
    assert "KeyError" in err.value.message
    store = Store(tmp_path / "s", readonly=True)
    try:
        assert store.read("q")["state"] == {"n": 1}  # type: ignore[index]  # kept as it was
    finally:
        store.close()


def test_an_agent_whose_record_would_crash_its_start_is_held_failed_and_the_tree_runs_on(daemon: Any) -> None:
    d = daemon(f'[[root.children]]\nid = "kv"\nagent = "{KV}"\n\n'
               '[[root.children]]\nid = "echo"\nagent = "otpd.agents.echo:EchoAgent"\n')
    d.request("stop", {"id": "kv"})
    d.wait("kv", "stopped")
    state_dir = Path(next(line.split('"')[1] for line in d.config_path.read_text().splitlines()
                          if "state_dir" in line))
    store = Store(state_dir / "store")
    store.put_raw("kv", encode({**kv_record(), "collections": {"data": 5}}), [])
    store.close()
    d.request("start", {"id": "kv"})
    failed = d.wait("kv", "failed")
    assert failed["state"] == "failed"
    assert d.request("call", {"id": "echo", "request": "still here"}) == "still here"
    assert d.status()["daemon"]["state"] == "running"
    assert "store_corrupt" in d.log.text()
