"""Feature flags and the agent version switch, with a real daemon and a real store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otpd import flags
from otpd.errors import OtpdError
from tests.conftest import run_cli

SWITCHED = """
[features]
v3 = "off"
beta = 25

[[root.children]]
id = "person"
agent = "tests.flags.agents:{v1}"
agent_next = "tests.flags.agents:{v3}"
switch = "v3"

[[root.children]]
id = "reader"
agent = "tests.flags.agents:FlagReader"
"""


def call(d: Any, child: str, request: Any) -> Any:
    return d.request("call", {"id": child, "request": request})


def switch(d: Any, value: str, child: str = "person") -> dict[str, Any]:
    pid = d.pid_of(child)
    result = d.request("flags.set", {"name": "v3", "value": value})
    assert result["restarted"] == [child]
    d.wait(child, not_pid=pid)
    return call(d, child, {"op": "get"})  # type: ignore[no-any-return]


# -- flags -------------------------------------------------------------------------------


def test_a_flag_set_at_run_time_survives_a_daemon_sigkill(daemon: Any) -> None:
    d = daemon(SWITCHED.format(v1="V1", v3="V3"))
    assert d.request("flags.list")["flags"]["beta"] == {"value": "25%", "source": "config", "config": "25%"}
    d.request("flags.set", {"name": "beta", "value": "60"})
    d.sigkill()
    d.wait_exit()
    d2 = daemon("", config_path=d.config_path)
    assert d2.request("flags.list")["flags"]["beta"]["value"] == "60%"
    assert d2.request("flags.list")["flags"]["beta"]["source"] == "set"
    d2.request("flags.set", {"name": "beta", "value": "default"})
    assert d2.request("flags.list")["flags"]["beta"] == {"value": "25%", "source": "config", "config": "25%"}


def test_agents_read_flags_and_changes_are_pushed_and_announced(daemon: Any) -> None:
    d = daemon(SWITCHED.format(v1="V1", v3="V3"))
    keys = [f"wf-{i}" for i in range(200)]
    at25 = {k for k in keys if call(d, "reader", {"name": "beta", "key": k})}
    assert at25 == {k for k in keys if flags.enabled("beta", 25, k)}  # the agent and the daemon agree
    with d.events() as ev:
        d.request("flags.set", {"name": "beta", "value": "on"})
        event = ev.until(("flag_changed", "beta"))[-1]
    assert event["value"] == "on"
    assert all(call(d, "reader", {"name": "beta", "key": k}) for k in keys[:20])


def test_unknown_flags_and_bad_values_are_refused(daemon: Any) -> None:
    d = daemon(SWITCHED.format(v1="V1", v3="V3"))
    for args, code in (({"name": "nope", "value": "on"}, "not_found"),
                       ({"name": "beta", "value": "lots"}, "bad_request"),
                       ({"name": "beta", "value": 101}, "bad_request")):
        with pytest.raises(OtpdError) as err:
            d.request("flags.set", args)
        assert err.value.code == code


@settings(max_examples=200)
@given(name=st.text(min_size=1, max_size=10), key=st.text(max_size=20),
       low=st.floats(0, 100), high=st.floats(0, 100))
def test_a_percentage_rollout_is_stable_and_only_grows(name: str, key: str, low: float, high: float) -> None:
    low, high = min(low, high), max(low, high)
    assert flags.enabled(name, low, key) == flags.enabled(name, low, key)
    if flags.enabled(name, low, key):
        assert flags.enabled(name, high, key)  # raising the percentage never turns a key off


def test_the_hash_is_the_same_in_every_process_and_near_the_percentage() -> None:
    out = subprocess.run(["python3", "-c", "import hashlib; print(int.from_bytes(hashlib.blake2b("
                          "b'beta\\x00wf-1', digest_size=8).digest(), 'big') % 10000 / 100)"],
                         capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"})
    assert float(out.stdout) == flags.bucket("beta", "wf-1")
    on = sum(flags.enabled("beta", 30, f"wf-{i}") for i in range(10_000))
    assert 2700 < on < 3300


# -- the version switch ------------------------------------------------------------------------


def test_switching_on_migrates_and_rolling_back_with_downgrades_keeps_every_change(daemon: Any) -> None:
    d = daemon(SWITCHED.format(v1="V1", v3="V3"))
    call(d, "person", {"op": "set", "name": "Ada Lovelace"})
    call(d, "person", {"op": "inc"})
    assert switch(d, "on") == {"class": "V3", "state": {"first": "Ada", "last": "Lovelace", "count": 1,
                                                        "title": "dr"}}
    call(d, "person", {"op": "inc"})  # acknowledged under V3
    assert switch(d, "off") == {"class": "V1", "state": {"name": "Ada Lovelace", "count": 2}}


def test_rolling_back_without_downgrades_restores_the_old_state_and_keeps_the_new(daemon: Any) -> None:
    d = daemon(SWITCHED.format(v1="V1", v3="V3NoDowngrades"))
    call(d, "person", {"op": "set", "name": "Ada Lovelace"})
    switch(d, "on")
    call(d, "person", {"op": "inc"})
    assert switch(d, "off") == {"class": "V1", "state": {"name": "Ada Lovelace", "count": 0}}
    call(d, "person", {"op": "inc"})
    call(d, "person", {"op": "inc"})
    assert switch(d, "on")["state"]["count"] == 2  # forward again: from the current record
    d.request("shutdown")
    d.wait_exit()
    from otpd.config import load
    from otpd.store.lmdb_store import Store, decode

    store = Store(load(d.config_path).store_settings().path, readonly=True)
    kept = store.kept_version("person", "tests.flags.agents:V3NoDowngrades")  # what V3 had when rolled back
    store.close()
    assert kept is not None and decode(kept[0])["state"]["count"] == 1


def test_a_switch_under_load_loses_no_acknowledged_call(daemon: Any) -> None:
    d = daemon("""
[features]
kv2 = "off"
[root]
max_restarts = 100
max_seconds = 5
[[root.children]]
id = "kv"
agent = "tests.flags.agents:KV1"
agent_next = "tests.flags.agents:KV2"
switch = "kv2"
""")
    acked: dict[int, int] = {}
    with d.client(timeout=30) as ctl:
        for i in range(600):
            if i % 100 == 50:
                ctl.request("flags.set", {"name": "kv2", "value": "on" if (i // 100) % 2 == 0 else "off"})
            try:
                d.request("call", {"id": "kv", "request": {"op": "put", "key": i, "value": i * 7}})
                acked[i] = i * 7
            except OtpdError as err:
                assert err.code in ("agent_down", "agent_crashed")
                d.wait("kv", "running")
    assert len(acked) > 500
    assert call(d, "kv", {"op": "len"})["len"] >= len(acked)
    for key, value in acked.items():
        assert call(d, "kv", {"op": "get", "key": key}) == {"found": True, "value": value}


def test_migrate_dry_run_then_write_then_back_through_an_export(daemon: Any, tmp_path: Path) -> None:
    body = '[[root.children]]\nid = "person"\nagent = "tests.flags.agents:{cls}"\n'
    d = daemon(body.format(cls="V1"))
    call(d, "person", {"op": "set", "name": "Grace Hopper"})
    d.request("shutdown")
    d.wait_exit()
    config = d.config_path
    config.write_text(config.read_text().replace("agents:V1", "agents:V3"))
    cli = ["--socket", str(d.socket), "--json", "state", "--config", str(config)]
    dry = json.loads(run_cli("otpctl", *cli, "migrate", "--dry-run").stdout)["results"]
    assert dry == [{"id": "person", "agent": "tests.flags.agents:V3", "from_version": 1, "to_version": 3,
                    "before": {"name": "Grace Hopper", "count": 0},
                    "after": {"first": "Grace", "last": "Hopper", "count": 0, "title": "dr"}}]
    backup = tmp_path / "backup.jsonl"
    backup.write_text(run_cli("otpctl", *cli, "export").stdout)
    out = run_cli("otpctl", *cli, "migrate")
    assert out.returncode == 0, out.stderr
    shown = json.loads(run_cli("otpctl", *cli, "person").stdout)
    assert shown["version"] == 3 and shown["state"]["first"] == "Grace"
    assert run_cli("otpctl", *cli, "import", str(backup)).returncode == 0
    shown = json.loads(run_cli("otpctl", *cli, "person").stdout)
    assert shown["version"] == 1 and shown["state"] == {"name": "Grace Hopper", "count": 0}


def test_a_switch_that_finds_no_room_to_keep_the_old_records_holds_that_agent_only(daemon: Any) -> None:
    """A switch keeps a copy of the records the other class left (for a rollback without
    downgrades); on a full store that copy does not fit.  The agent's start then failed with
    store_full at every restart, until its supervisor's intensity took the tree down; it is
    held ``failed`` instead, as a corrupt record holds it, its records untouched."""
    body = """
[store]
map_size_mb = 1
map_size_max_mb = 1

[features]
v3 = "{v3}"

[root]
max_restarts = 3
max_seconds = 5

[[root.children]]
id = "kvs"
agent = "tests.flags.agents:KV1"
agent_next = "tests.flags.agents:KV2"
switch = "v3"

[[root.children]]
id = "echo"
agent = "otpd.agents.echo:EchoAgent"
"""
    d = daemon(body.format(v3="off"))
    acked = 0
    with pytest.raises(OtpdError) as err:
        for i in range(10_000):
            call(d, "kvs", {"op": "put", "key": i, "value": "x" * 3000})
            acked += 1
    assert err.value.code == "store_full" and acked > 50
    d.request("shutdown")
    d.wait_exit()
    d.write_config(body.format(v3="on"))  # its next start is under KV2: the switch
    d2 = daemon("", config_path=d.config_path, ready=False)
    d2.log.wait_for(r"kvs: .*store_full")
    d2.wait("kvs", "failed")
    assert d2.wait("root", "running")["state"] == "running"
    assert call(d2, "echo", "still here") == "still here"
    assert d2.children()["kvs"]["restarts"] == 0, "held after its first failed start, not restarted"
    from otpd.config import load
    from otpd.store.lmdb_store import Store

    store = Store(load(d.config_path).store_settings().path, readonly=True)
    try:
        record = store.read("kvs")
        assert record is not None and record["state"]["puts"] == acked  # every acknowledged put kept
        assert record["agent"] == "tests.flags.agents:KV1"
    finally:
        store.close()
    # What the message says to do: the flag back, then start it (it runs as before the switch) ...
    d2.request("flags.set", {"name": "v3", "value": "off"})
    d2.request("start", {"id": "kvs"})
    d2.wait("kvs", "running")
    assert call(d2, "kvs", {"op": "len"}) == {"len": acked, "puts": acked}
    # ... or more room and a restart of otpd: the switch goes through.
    d2.request("shutdown")
    d2.wait_exit()
    d2.write_config(body.format(v3="on").replace("map_size_max_mb = 1", "map_size_max_mb = 64"))
    d3 = daemon("", config_path=d.config_path)
    pid = d3.pid_of("kvs")  # under KV1: the run-time "off" set above is kept
    assert d3.request("flags.set", {"name": "v3", "value": "default"})["restarted"] == ["kvs"]
    d3.wait("kvs", not_pid=pid)
    assert call(d3, "kvs", {"op": "len"}) == {"len": acked, "puts": acked}
    assert call(d3, "kvs", {"op": "get", "key": acked - 1}) == {"found": True, "value": "x" * 3000}
    call(d3, "kvs", {"op": "put", "key": "under", "value": "KV2"})
    d3.request("shutdown")
    d3.wait_exit()
    store = Store(load(d.config_path).store_settings().path, readonly=True)
    try:
        assert store.read("kvs")["agent"] == "tests.flags.agents:KV2"  # type: ignore[index]
        kept = store.kept_version("kvs", "tests.flags.agents:KV1")  # the copy for a rollback, made this time
        assert kept is not None and len(kept[1]) == acked
    finally:
        store.close()


def test_after_a_switch_the_record_is_the_new_classs_even_before_a_change(daemon: Any) -> None:
    """Left as the old class wrote it, every restart of the agent switched again (and copied
    its records under versions/ again, O(n)) until its first change."""
    d = daemon(SWITCHED.format(v1="V1", v3="V3"))
    call(d, "person", {"op": "set", "name": "Ada Lovelace"})
    switch(d, "on")  # no change under V3
    d.request("shutdown")
    d.wait_exit()
    from otpd.config import load
    from otpd.store.lmdb_store import Store

    store = Store(load(d.config_path).store_settings().path, readonly=True)
    try:
        record = store.read("person")
        assert record is not None
        assert (record["agent"], record["version"]) == ("tests.flags.agents:V3", 3)
        assert record["state"] == {"first": "Ada", "last": "Lovelace", "count": 0, "title": "dr"}
    finally:
        store.close()


def test_a_start_refused_store_full_for_another_reason_restarts_once_there_is_room(daemon: Any) -> None:
    """Only a switch's store_full holds the agent failed: a store_full its init met (a sibling's
    reply, say) may pass, and such a start fails and restarts as any other (found by a review
    helper: every start-time store_full was held for good)."""
    d = daemon("""
[store]
map_size_mb = 1
map_size_max_mb = 1

[root]
max_restarts = 1000000
max_seconds = 1

[[root.children]]
id = "kvs"
agent = "otpd.agents.kv:KVAgent"

[[root.children]]
id = "caller"
agent = "tests.flags.agents:BootCaller"
""")
    with pytest.raises(OtpdError) as err:
        for i in range(10_000):
            call(d, "kvs", {"op": "put", "key": i, "value": "x" * 3000})
    assert err.value.code == "store_full"
    with d.events() as events:
        d.kill("caller")  # its next start's init is refused store_full, and the next, ...
        events.until(lambda e: e["event"] == "exited" and e["id"] == "caller" and e["start_failure"])
        for i in range(40):  # room again
            call(d, "kvs", {"op": "delete", "key": i})
        d.wait("caller", "running")
    assert call(d, "caller", "hello") == "ok"
    assert "fatal=True" not in d.log.text()
