"""Warm spares: a restart hands the agent to a process forked and booted ahead."""

from __future__ import annotations

import psutil

from tests.conftest import poll_process, wait_pid_exit

CONFIG = """
[[root.children]]
id = "kv"
agent = "otpd.agents.kv:KVAgent"
spare = "{policy}"
"""


def _spare_pid(events, child_id: str) -> int:
    return int(events.until(("spare", child_id))[-1]["pid"])


def _first_spare(d, child_id: str) -> int:
    """The spare made at start (before any subscription could see it): from the event history."""
    history = d.request("events", {"follow": False})["events"]
    return int(next(e for e in history if e["event"] == "spare" and e["id"] == child_id)["pid"])


def _has_title(pid: int, title: str, timeout: float = 10.0) -> bool:
    """True once the process's title says ``title``.  A spare sets it early in its boot, which
    the daemon hears nothing of (its "spare" event comes at the fork)."""
    return poll_process(pid, lambda proc: title in " ".join(proc.cmdline()), timeout)


def test_always_keeps_a_spare_that_becomes_the_agent_with_its_state(daemon):
    d = daemon(CONFIG.format(policy="always"))
    spare = _first_spare(d, "kv")
    with d.events() as events:
        assert psutil.Process(spare).ppid() == d.pid
        assert _has_title(spare, "otpd: spare kv")
        d.request("call", {"id": "kv", "request": {"op": "put", "key": "a", "value": 1}})
        old = d.kill("kv")
        assert d.wait("kv", "running", not_pid=old)["pid"] == spare  # no fork on the restart path
        d.record_pid(spare)
        got = d.request("call", {"id": "kv", "request": {"op": "get", "key": "a"}})
        assert got == {"found": True, "value": 1}
        # Its title changes just after its ready (off the restart's path), before it reads any call:
        # asked after a reply, never before the change.
        assert "otpd: agent kv" in " ".join(psutil.Process(spare).cmdline())
        d.record_pid(_spare_pid(events, "kv"))  # and a new spare for the next one


def test_on_restart_makes_a_spare_only_after_the_first_restart(daemon):
    d = daemon(CONFIG.format(policy="on_restart"))
    agent = psutil.Process(d.pid_of("kv"))
    assert [p.pid for p in psutil.Process(d.pid).children()] == [agent.pid]
    with d.events() as events:
        old = d.kill("kv")
        first = d.wait("kv", "running", not_pid=old)["pid"]
        spare = _spare_pid(events, "kv")
        d.record_pid(spare)
        assert d.wait("kv", "running", not_pid=d.kill("kv"))["pid"] == spare != first


def test_never_forks_at_restart_and_keeps_no_spare(daemon):
    d = daemon(CONFIG.format(policy="never"))
    old = d.kill("kv")
    d.wait("kv", "running", not_pid=old)
    assert len(psutil.Process(d.pid).children()) == 1


def test_a_killed_spare_is_forgotten_and_the_next_restart_forks(daemon):
    d = daemon(CONFIG.format(policy="always"))
    spare = _first_spare(d, "kv")
    with d.events():
        psutil.Process(spare).kill()  # chaos may kill any child by PID, spares included
        assert wait_pid_exit(spare, 5.0)
        old = d.kill("kv")
        new = d.wait("kv", "running", not_pid=old)["pid"]
        assert new != spare
        assert d.children()["kv"]["restarts"] == 1


def test_stopping_an_agent_ends_its_spare(daemon):
    d = daemon(CONFIG.format(policy="always"))
    spare = _first_spare(d, "kv")
    d.request("stop", {"id": "kv"})
    d.wait("kv", "stopped")
    assert wait_pid_exit(spare, 5.0)
