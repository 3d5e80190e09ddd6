"""MonitorAgent on a real daemon: psutil on real agent processes, the ring buffer on a real LMDB,
alerts and the memory action against an agent that really holds memory (``handlers.Hog``).

Samples come every ``interval_s`` (small here); the tests poll ``health`` with a deadline until
the sample they need exists (no event marks a sample), and wait on the event stream for
restarts.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from otpd.errors import OtpdError
from otpd.store.lmdb_store import Store, item_prefix

pytestmark = pytest.mark.timeout(60)

HOG_MB = 200
LIMIT_MB = 120  # a forked agent starts far below this; a hog holding HOG_MB more is far above


def monitor_config(interval_s: float = 0.05, max_history: int = 1000, thresholds: str = "",
                   actions: str = "", extra: str = "") -> str:
    return f"""
[root]
max_restarts = 100
max_seconds = 5

[[root.children]]
id = "echo"
agent = "otpd.agents.echo:EchoAgent"

[[root.children]]
id = "kv"
agent = "otpd.agents.kv:KVAgent"

[[root.children]]
id = "hog"
agent = "tests.agents.handlers:Hog"
{extra}
[[root.children]]
id = "monitor"
agent = "otpd.agents.monitor:MonitorAgent"
[root.children.args]
interval_s = {interval_s}
max_history = {max_history}
thresholds = {{ {thresholds} }}
actions = {{ {actions} }}
"""


def health(d: Any, agent_id: str | None = None, **extra: Any) -> Any:
    args = {"id": agent_id, **extra} if agent_id is not None else {}
    return d.request("health", args)


def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = fetch()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"still not there after {timeout}s: {result}")


def after_samples(d: Any, n: int, timeout: float = 20.0) -> dict[str, Any]:
    """Health once the monitor has taken ``n`` samples in all."""
    return poll(lambda: health(d), lambda h: h["samples"] >= n, timeout)  # type: ignore[no-any-return]


def alerts_of(h: dict[str, Any], agent_id: str) -> set[str]:
    return {a["metric"] for a in h["alerts"] if a["id"] == agent_id}


def state_dir(config: Path) -> Path:
    return Path(next(line.split('"')[1] for line in config.read_text().splitlines() if "state_dir" in line))


def test_every_agent_is_sampled_with_real_figures(daemon: Any) -> None:
    d = daemon(monitor_config())
    h = after_samples(d, 3)
    status = d.status()
    agents = {c["id"]: c for c in status["children"] if c["type"] == "agent"}
    by_id = {a["id"]: a for a in h["agents"]}
    assert set(by_id) == set(agents) == {"echo", "kv", "hog", "monitor"}
    for agent_id, entry in by_id.items():
        assert entry["pid"] == agents[agent_id]["pid"] and entry["state"] == "running"
        assert entry["restarts"] == 0 and entry["restart_rate"] == 0
        assert 1 < entry["rss_mb"] < LIMIT_MB, entry
        assert entry["fds"] >= 1 and entry["threads"] >= 1
        assert entry["cpu_percent"] >= 0 and entry["uptime_s"] >= 0
        assert entry["alerts"] == {}
    assert h["daemon"]["pid"] == status["daemon"]["pid"] and h["daemon"]["rss_mb"] > 1
    assert h["history_len"] == h["samples"] >= 3 and h["alerts"] == []

    one = health(d, "echo", limit=1000)
    assert one["agent"]["pid"] == agents["echo"]["pid"] and one["agents"] == [one["agent"]]
    times = [s["t"] for s in one["history"]]
    assert len(times) >= 3 and times == sorted(times)
    assert len(health(d, "echo", limit=2)["history"]) == 2
    with pytest.raises(OtpdError) as err:
        health(d, "nobody")
    assert err.value.code == "not_found"
    with pytest.raises(OtpdError) as err:
        d.request("call", {"id": "monitor", "request": {"op": "nope"}})
    assert err.value.code == "bad_request"

    # a restarted agent: its new pid, its restart count, its uptime from the new process
    with d.events() as ev:
        old = d.pid_of("echo")
        killed_at = time.time()
        os.kill(old, signal.SIGKILL)
        new = ev.until(("started", "echo"))[-1]["pid"]
    d.wait("echo", "running", not_pid=old)
    entry = poll(lambda: health(d, "echo")["agent"], lambda e: e["pid"] == new and e["state"] == "running")
    assert entry["restarts"] == 1 and entry["restart_rate"] == 1
    assert entry["uptime_s"] <= time.time() - killed_at + 0.05  # 0.05: the kernel's start time is in ticks


def test_the_ring_buffer_stays_at_max_history_on_disk_and_across_a_restart(daemon: Any) -> None:
    d = daemon(monitor_config(interval_s=0.02, max_history=5))
    h = after_samples(d, 12)
    assert h["history_len"] == 5
    assert len(health(d, "kv", limit=100)["history"]) == 5

    prefix = item_prefix("monitor", "health_history")

    def on_disk() -> list[Any]:
        store = Store(state_dir(d.config_path) / "store", readonly=True)
        try:
            return [k for k, _ in store.scan_items(prefix)]
        finally:
            store.close()

    assert len(on_disk()) == 5  # each sample's append and drop are one commit
    before = h["samples"]
    old = d.pid_of("monitor")
    os.kill(old, signal.SIGKILL)
    d.wait("monitor", "running", not_pid=old)
    h = after_samples(d, before + 10)  # the count goes on from what was saved
    assert h["history_len"] == 5
    assert len(on_disk()) == 5

    # a smaller max_history in the config: the next start trims the buffer to it
    d.write_config(monitor_config(interval_s=0.02, max_history=3))
    old = d.pid_of("monitor")
    assert d.request("reload")["restarted"] == ["monitor"]
    d.wait("monitor", "running", not_pid=old)
    h = after_samples(d, h["samples"] + 3)
    assert (h["history_len"], h["max_history"]) == (3, 3)
    assert len(on_disk()) == 3


def test_alerts_are_set_over_a_threshold_and_cleared_under_it(daemon: Any) -> None:
    d = daemon(monitor_config(thresholds=f"memory_mb = {LIMIT_MB}, restart_rate = 1"))
    after_samples(d, 2)
    d.cast("hog", {"alloc_mb": HOG_MB})
    h = poll(lambda: health(d), lambda h: "memory_mb" in alerts_of(h, "hog"))
    [alert] = [a for a in h["alerts"] if a["id"] == "hog"]
    assert alert["threshold"] == LIMIT_MB and alert["value"] > LIMIT_MB
    assert alerts_of(h, "echo") == alerts_of(h, "kv") == set()
    d.log.wait_for(rf"alert set: hog memory_mb = [\d.]+ \(threshold {LIMIT_MB}\)")

    # the alert is persisted: a restarted monitor still has it, since the same time
    old = d.pid_of("monitor")
    os.kill(old, signal.SIGKILL)
    d.wait("monitor", "running", not_pid=old)
    again = [a for a in health(d)["alerts"] if a["id"] == "hog"]
    assert [a["since"] for a in again] == [alert["since"]]

    d.cast("hog", {"free": True})
    h = poll(lambda: health(d), lambda h: alerts_of(h, "hog") == set())
    events = [(e["id"], e["metric"], e["alert"]) for e in h["alert_events"]]
    assert events[-2:] == [("hog", "memory_mb", "set"), ("hog", "memory_mb", "cleared")]
    d.log.wait_for(r"alert cleared: hog memory_mb")

    # two restarts within a minute: over a restart rate of 1 per minute
    with d.events() as ev:
        for _ in range(2):
            old = d.pid_of("echo")
            os.kill(old, signal.SIGKILL)
            ev.until(("started", "echo"))
            d.wait("echo", "running", not_pid=old)
    h = poll(lambda: health(d), lambda h: "restart_rate" in alerts_of(h, "echo"))
    assert [a["value"] for a in h["alerts"] if a["id"] == "echo"] == [2]


def test_an_agent_over_its_memory_limit_for_k_samples_is_restarted(daemon: Any) -> None:
    d = daemon(monitor_config(interval_s=0.05, actions=f"hog = {{ restart_over_memory_mb = {LIMIT_MB}, "
                                                       "for_samples = 3 }"))
    after_samples(d, 2)
    pid = d.pid_of("hog")
    with d.events() as ev:
        d.cast("hog", {"alloc_mb": HOG_MB})
        events = ev.until(("started", "hog"), timeout=30)
    hog = [(e["event"], e.get("pid")) for e in events if e["id"] == "hog"]
    assert hog[0] == ("stopped", pid) and hog[1][0] == "restarted"  # stopped by the daemon, started anew
    d.wait("hog", "running", not_pid=pid)
    assert d.request("call", {"id": "hog", "request": "held_mb"}) == 0

    h = health(d)
    [action] = h["actions"]
    assert (action["id"], action["action"], action["pid"], action["limit_mb"], action["samples"]) == \
        ("hog", "restart", pid, LIMIT_MB, 3)
    assert action["rss_mb"] > LIMIT_MB and "error" not in action
    d.log.wait_for(rf"restart hog \(pid {pid}\): RSS [\d.]+ MiB over {LIMIT_MB} MiB for 3 samples")
    assert health(d, "hog")["actions"] == [action]
    # the replacement is under the limit: sampled a few times, it is left alone
    new = d.pid_of("hog")
    poll(lambda: health(d, "hog")["history"], lambda hist: sum(1 for s in hist if s["pid"] == new) >= 4)
    assert d.pid_of("hog") == new and len(health(d)["actions"]) == 1
