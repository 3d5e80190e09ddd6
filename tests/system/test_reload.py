"""Reload (the ``reload`` op and SIGHUP): the running tree moves to the edited config file."""

from __future__ import annotations

import os
import signal

import pytest

from otpd.errors import OtpdError
from tests.conftest import brief, is_live, wait_pid_exit

BEFORE = """
[[root.children]]
id = "same"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "goes"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "new_args"
agent = "agents_for_tests:Controlled"
args = { v = 1 }

[[root.children]]
id = "new_restart"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "workers"
supervisor = "dynamic"

[root.children.template]
agent = "agents_for_tests:Controlled"
"""

AFTER = """
[[root.children]]
id = "same"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "new_args"
agent = "agents_for_tests:Controlled"
args = { v = 2 }

[[root.children]]
id = "new_restart"
agent = "agents_for_tests:Controlled"
restart = "transient"

[[root.children]]
id = "workers"
supervisor = "dynamic"

[root.children.template]
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "comes"
agent = "agents_for_tests:Controlled"
"""


def test_reload_adds_removes_restarts_and_updates_only_what_changed(daemon):
    d = daemon(BEFORE)
    d.request("add", {"supervisor": "workers", "id": "w1"})
    d.wait("w1", "running")
    before = d.pids("same", "goes", "new_args", "new_restart", "w1")

    d.write_config(AFTER)
    with d.events() as events:
        summary = d.request("reload")
        events.until(("ready", "comes"))
        if ("ready", "new_args") not in brief(events.seen):
            events.until(("ready", "new_args"))

    assert summary["added"] == ["comes"] and summary["removed"] == ["goes"]
    assert summary["restarted"] == ["new_args"] and "new_restart" in summary["updated"]
    children = d.children()
    assert "goes" not in children and wait_pid_exit(before["goes"], 5.0)
    assert children["comes"]["state"] == "running"
    assert children["new_args"]["pid"] not in (None, before["new_args"])
    assert d.request("call", {"id": "new_args", "request": "args"}) == {"v": 2}
    assert children["new_restart"]["pid"] == before["new_restart"]
    assert children["new_restart"]["restart"] == "transient"
    assert children["same"]["pid"] == before["same"]
    assert children["w1"]["pid"] == before["w1"]  # dynamic children are not in the config
    assert ("reloaded", "root") in brief(events.seen)


def test_reload_with_a_bad_config_is_refused_whole(daemon):
    d = daemon(BEFORE)
    before = d.pids("same", "goes", "new_args", "new_restart")
    d.write_config(AFTER.replace('restart = "transient"', 'restart = "sometimes"'))

    with pytest.raises(OtpdError) as err:
        d.request("reload")

    assert err.value.code == "config_invalid"
    assert any("root.children[2].restart" in e for e in err.value.details["errors"])
    children = d.children()
    assert "comes" not in children
    assert {i: children[i]["pid"] for i in before} == before


def test_sighup_reloads_the_config(daemon):
    d = daemon(BEFORE)
    same = d.pid_of("same")
    d.write_config(BEFORE + """
[[root.children]]
id = "comes"
agent = "agents_for_tests:Controlled"
""")
    with d.events() as events:
        d.proc.send_signal(signal.SIGHUP)
        seen = events.until(("ready", "comes"))
    assert ("reloaded", "root") in brief(seen)
    assert d.pid_of("same") == same


def test_sighup_with_a_bad_config_changes_nothing_and_the_daemon_goes_on(daemon):
    d = daemon(BEFORE)
    before = d.pids("same", "goes")
    d.write_config("this is not toml")
    d.proc.send_signal(signal.SIGHUP)
    d.log.wait_for(r"reload refused")
    assert d.status()["daemon"]["state"] == "running"
    assert d.pids("same", "goes") == before


def test_reload_during_shutdown_starts_nothing(daemon):
    d = daemon("""
[[root.children]]
id = "a"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "stubborn"
agent = "agents_for_tests:IgnoresTerm"
shutdown_ms = 1000

[[root.children]]
id = "c"
agent = "agents_for_tests:Controlled"
""")
    with d.events() as events:
        d.request("shutdown")
        events.until(("stopped", "c"))  # stubborn now holds the shutdown for 1 s
        try:
            d.request("reload")
        except OtpdError as err:
            assert err.code == "shutting_down"
        seen = events.until_closed(timeout=20.0)
    assert d.wait_exit(10.0) == 0
    started = [e["pid"] for e in seen if e["event"] == "started"]
    for pid in started:  # what the daemon left running died with it (PDEATHSIG); reap it here
        wait_pid_exit(pid, 10.0)
        os.waitpid(pid, 0)
        d.agent_pids.pop(pid, None)
    assert started == [], brief(seen)


def test_reload_applies_a_new_heartbeat_timeout_to_the_running_child(daemon):
    body = """
[[root.children]]
id = "hb"
agent = "agents_for_tests:Controlled"
heartbeat_ms = 50
heartbeat_timeout_ms = {timeout}
"""
    d = daemon(body.format(timeout=0))
    pid = d.pid_of("hb")
    d.write_config(body.format(timeout=300))
    summary = d.request("reload")
    assert "hb" in summary["updated"] and summary["restarted"] == []
    assert d.pid_of("hb") == pid  # updated in place: the same process
    d.kill("hb", "STOP")
    try:
        assert d.wait("hb", "running", not_pid=pid, timeout=3.0)["pid"] != pid
    finally:
        if is_live(pid):
            os.kill(pid, signal.SIGCONT)  # the daemon's child, reported by it: let the teardown stop it
