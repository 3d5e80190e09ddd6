"""State across real crashes: a real daemon, real forks, SIGKILL by PID, a real LMDB."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otpd.errors import OtpdError
from otpd.store.lmdb_store import Store

QUEUE = """
[[root.children]]
id = "q"
agent = "tests.store.state_agents:QueueAgent"
"""
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


def call(d: Any, child: str, request: Any, timeout: float = 10.0) -> Any:
    return d.request("call", {"id": child, "request": request, "timeout": timeout}, timeout=timeout + 5)


def kill_and_wait(d: Any, child: str) -> None:
    pid = d.pid_of(child)
    os.kill(pid, signal.SIGKILL)
    d.wait(child, "running", not_pid=pid)


def test_ten_items_and_counters_survive_sigkill_of_the_agent(daemon: Any) -> None:
    d = daemon(QUEUE)
    for i in range(10):
        call(d, "q", {"op": "add", "item": {"n": i}})
    call(d, "q", {"op": "take"})
    before = call(d, "q", {"op": "list"})
    kill_and_wait(d, "q")
    assert call(d, "q", {"op": "list"}) == before
    assert before["items"] == [{"n": i} for i in range(1, 10)] and before["added"] == 10 and before["taken"] == 1


def test_state_survives_sigkill_of_the_daemon(daemon: Any) -> None:
    d = daemon(KV)
    for i in range(20):
        call(d, "kv", {"op": "put", "key": f"k{i}", "value": i})
    d.sigkill()
    d.wait_exit()
    d2 = daemon("", config_path=d.config_path)
    assert call(d2, "kv", {"op": "len"}) == {"len": 20, "puts": 20}
    assert call(d2, "kv", {"op": "get", "key": "k7"}) == {"found": True, "value": 7}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 5), st.integers(-(2**63), 2**64 - 1)),
    st.tuples(st.just("delete"), st.integers(0, 5), st.just(0)),
    st.tuples(st.just("kill_agent"), st.just(0), st.just(0)),
    st.tuples(st.just("kill_daemon"), st.just(0), st.just(0)),
), min_size=1, max_size=12))
@pytest.mark.timeout(300)
def test_state_equals_the_acknowledged_calls_after_any_crashes(daemon: Any, steps: list[Any]) -> None:
    d = daemon(KV)
    model: dict[str, int] = {}
    puts = 0
    for op, k, v in steps:
        key = f"k{k}"
        if op == "put":
            assert call(d, "kv", {"op": "put", "key": key, "value": v})["ok"]
            model[key] = v
            puts += 1
        elif op == "delete":
            assert call(d, "kv", {"op": "delete", "key": key})["deleted"] == (key in model)
            model.pop(key, None)
        elif op == "kill_agent":
            kill_and_wait(d, "kv")
        else:
            d.sigkill()
            d.wait_exit()
            d = daemon("", config_path=d.config_path)
        assert call(d, "kv", {"op": "len"}) == {"len": len(model), "puts": puts}
        for key, value in model.items():
            assert call(d, "kv", {"op": "get", "key": key}) == {"found": True, "value": value}
    assert "seq_regressed" not in d.log.text()
    d.request("shutdown")
    d.wait_exit()


def test_every_acknowledged_put_survives_a_kill_in_the_middle_of_a_pipeline(daemon: Any) -> None:
    d = daemon(KV)
    pid = d.pid_of("kv")
    acked: set[int] = set()
    with d.client(timeout=30) as c:
        ids = [c.send("call", {"id": "kv", "request": {"op": "put", "key": i, "value": i}}) for i in range(2000)]
        by_id = dict(zip(ids, range(2000), strict=True))
        replies = 0
        while replies < len(ids):
            frame = c.receive()
            replies += 1
            if frame["ok"]:
                acked.add(by_id[frame["id"]])
            else:
                assert frame["error"]["code"] in ("agent_crashed", "agent_down")
            if replies == 200:
                os.kill(pid, signal.SIGKILL)  # with ~1800 calls still in flight
    assert 200 <= len(acked) < 2000
    d.wait("kv", "running", not_pid=pid)
    for key in sorted(acked)[:: max(1, len(acked) // 100)] + [max(acked)]:
        assert call(d, "kv", {"op": "get", "key": key}) == {"found": True, "value": key}
    assert call(d, "kv", {"op": "len"})["len"] >= len(acked)


def test_corrupt_record_stops_only_that_agent_until_quarantined(daemon: Any, tmp_path: Path) -> None:
    config = daemon.config(KV)
    state_dir = Path(next(line.split('"')[1] for line in config.read_text().splitlines() if "state_dir" in line))
    store = Store(state_dir / "store")
    store.put_raw("kv", b"\xc1 garbage", [])
    store.close()
    d = daemon("", config_path=config, ready=False)
    d.log.wait_for(r"kv: exited .*store_corrupt", timeout=20)
    d.wait("kv", "failed")
    d.wait("echo", "running")  # the rest of the tree goes on
    assert call(d, "echo", "still here") == "still here"
    with pytest.raises(OtpdError) as err:
        call(d, "kv", {"op": "len"})
    assert err.value.code == "agent_down"
    store = Store(state_dir / "store", readonly=True)
    assert store.read_raw("kv") == b"\xc1 garbage"  # never deleted
    store.close()
    from tests.conftest import run_cli

    out = run_cli("otpctl", "--socket", str(d.socket), "state", "--config", str(config), "quarantine", "kv")
    assert out.returncode == 0, out.stderr
    d.request("start", {"id": "kv"})
    d.wait("kv", "running")
    assert call(d, "kv", {"op": "len"}) == {"len": 0, "puts": 0}


def test_store_full_is_an_error_reply_and_the_agent_keeps_what_it_acknowledged(daemon: Any) -> None:
    d = daemon('[store]\nmap_size_mb = 1\nmap_size_max_mb = 1\n' + KV)
    acked = 0
    with pytest.raises(OtpdError) as err:
        for i in range(10_000):
            call(d, "kv", {"op": "put", "key": i, "value": "x" * 4000})
            acked += 1
    assert err.value.code == "store_full"
    pid = d.pid_of("kv")
    assert call(d, "kv", {"op": "len"})["len"] == acked  # running, and the failed put is not there
    kill_and_wait(d, "kv")
    assert d.pid_of("kv") != pid
    assert call(d, "kv", {"op": "len"})["len"] == acked



def test_a_key_too_long_for_lmdb_is_refused_before_it_is_acknowledged(daemon: Any) -> None:
    """LMDB takes keys of at most 511 bytes. A longer one used to be acknowledged (the log
    took it), then fail the checkpoint and every restart's replay, until the root's
    intensity stopped the daemon. Now the put is refused and nothing else changes."""
    d = daemon(KV)
    pid = d.pid_of("kv")
    call(d, "kv", {"op": "put", "key": "short", "value": 1})
    with pytest.raises(OtpdError) as err:
        call(d, "kv", {"op": "put", "key": "x" * 600, "value": 1})
    assert err.value.code == "bad_request" and "key too long" in err.value.message
    call(d, "kv", {"op": "put", "key": "k" * 400, "value": 2})  # long, but within the limit
    kill_and_wait(d, "kv")  # the replay of its log and the checkpoint after it go through
    assert call(d, "kv", {"op": "len"})["len"] == 2 and d.pid_of("kv") != pid
    assert call(d, "kv", {"op": "get", "key": "k" * 400})["value"] == 2
    assert d.request("status")["daemon"]["state"] == "running"


def test_an_agent_whose_log_no_longer_fits_starts_and_answers_store_full(daemon: Any) -> None:
    """Its entries were in its log when another agent filled the map: at its restart the log
    cannot be applied, and neither can init's change. It used to fail its start at every
    restart, until the root's intensity stopped the daemon; it runs on its last state, and a
    change is answered store_full, as for any agent of a full store."""
    d = daemon('[store]\nmap_size_mb = 1\nmap_size_max_mb = 1\ncheckpoint_ms = 3600000\n' + KV
               + '\n[[root.children]]\nid = "counter"\nagent = "tests.store.state_agents:StartCounter"\n')
    for i in range(20):
        assert call(d, "counter", {"op": "add", "item": "c" * 2000})["items"] == i + 1  # in its log
    with pytest.raises(OtpdError) as err:
        for i in range(10_000):
            call(d, "kv", {"op": "put", "key": i, "value": "x" * 4000})
    assert err.value.code == "store_full"
    d.log.wait_for(r"counter: start 1 saved")  # init's after-commit action, its change saved
    kill_and_wait(d, "counter")  # the restart: replay and init's commit do not fit
    state = call(d, "counter", {"op": "get"})
    assert state["items"] == 20, "what it acknowledged is there (read through its log)"
    call(d, "counter", {"op": "say", "text": "after the restart"})
    d.log.wait_for(r"counter: after the restart")  # (the agent's stderr comes in order)
    assert "start 2 saved" not in d.log.text(), "an action waiting for a change never saved ran"
    with pytest.raises(OtpdError) as err:
        call(d, "counter", {"op": "add", "item": "more"})
    assert err.value.code == "store_full"
    assert d.request("status")["daemon"]["state"] == "running"

def test_fsync_durability_commits_and_reloads(daemon: Any) -> None:
    d = daemon('[store]\ndurability = "fsync"\n' + QUEUE)
    start = time.monotonic()
    for i in range(5):
        call(d, "q", {"op": "add", "item": i})
    assert time.monotonic() - start < 10
    kill_and_wait(d, "q")
    assert call(d, "q", {"op": "list"})["items"] == list(range(5))


def _state_dir(config: Path) -> Path:
    return Path(next(line.split('"')[1] for line in config.read_text().splitlines() if "state_dir" in line))


def test_acknowledged_puts_only_in_the_log_survive_sigkill_of_the_agent_and_of_the_daemon(daemon: Any) -> None:
    from otpd.store.log import log_path

    d = daemon('[store]\ncheckpoint_ms = 3600000\n' + KV)  # no checkpoint by time: the log holds them
    for i in range(50):
        call(d, "kv", {"op": "put", "key": i, "value": i})
    store_dir = _state_dir(d.config_path) / "store"
    log = log_path(store_dir / "logs", "kv")
    assert log.stat().st_size > 0
    store = Store(store_dir, readonly=True)
    assert store._lmdb_raw("kv") is None and store.read("kv")["state"]["puts"] == 50  # type: ignore[index]
    store.close()
    kill_and_wait(d, "kv")
    assert call(d, "kv", {"op": "len"}) == {"len": 50, "puts": 50}
    assert log.stat().st_size == 0  # applied to LMDB by the new process before its init
    for i in range(50, 60):
        call(d, "kv", {"op": "put", "key": i, "value": i})
    d.sigkill()
    d.wait_exit()
    d2 = daemon("", config_path=d.config_path)
    assert call(d2, "kv", {"op": "len"}) == {"len": 60, "puts": 60}
    assert call(d2, "kv", {"op": "get", "key": 55}) == {"found": True, "value": 55}


def test_a_clean_stop_applies_the_log_to_lmdb(daemon: Any) -> None:
    from otpd.store.log import log_path

    d = daemon('[store]\ncheckpoint_ms = 3600000\n' + KV)
    call(d, "kv", {"op": "put", "key": "a", "value": 1})
    store_dir = _state_dir(d.config_path) / "store"
    d.request("shutdown")
    d.wait_exit()
    assert log_path(store_dir / "logs", "kv").stat().st_size == 0
    store = Store(store_dir, readonly=True)
    assert store._lmdb_raw("kv") is not None and store.read("kv")["state"]["puts"] == 1  # type: ignore[index]
    store.close()
