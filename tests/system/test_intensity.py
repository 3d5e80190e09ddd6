"""Restart intensity, escalation and start failures, with real processes."""

from __future__ import annotations

import re

import pytest

from otpd.errors import OtpdError
from tests.conftest import brief, wait_pid_exit

NESTED = """
[root]
max_restarts = 10
max_seconds = 60

[[root.children]]
id = "before"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "sub"
supervisor = "static"
max_restarts = 2
max_seconds = 60

[[root.children.children]]
id = "s1"
agent = "agents_for_tests:Controlled"

[[root.children.children]]
id = "s2"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "after"
agent = "agents_for_tests:Controlled"
"""


def kill_and_wait_back(d, child_id):
    pid = d.kill(child_id)
    return d.wait(child_id, "running", not_pid=pid)["pid"]


def test_nested_supervisor_over_intensity_escalates_and_root_restarts_its_subtree(daemon):
    d = daemon(NESTED)
    before = d.pids("before", "s1", "s2", "after")

    kill_and_wait_back(d, "s1")  # restart 1 of 2
    kill_and_wait_back(d, "s1")  # restart 2 of 2
    s1 = d.pid_of("s1")
    s2 = d.pid_of("s2")
    assert s2 == before["s2"]

    with d.events() as events:
        d.kill("s1")  # restart 3 > max_restarts: sub gives up
        seen = events.until(("ready", "sub"))

    assert ("escalated", "sub") in brief(seen)
    escalated = next(e for e in seen if e["event"] == "escalated")
    assert escalated["child"] == "s1" and escalated["max_restarts"] == 2
    # sub stops what is left (s2), fails to root, and root starts it again, in order
    assert brief(seen, ("escalated", "stopped", "exited", "restarted", "started")) == [
        ("exited", "s1"),
        ("escalated", "sub"),
        ("stopped", "s2"),
        ("exited", "sub"),
        ("restarted", "sub"),
        ("restarted", "s1"),
        ("started", "s1"),
        ("restarted", "s2"),
        ("started", "s2"),
    ]
    sub_exit = next(e for e in seen if brief([e]) == [("exited", "sub")])
    assert sub_exit["reason"] == "crash"

    after = d.pids("before", "s1", "s2", "after")
    assert after["s1"] not in (None, s1) and after["s2"] not in (None, s2)
    assert (after["before"], after["after"]) == (before["before"], before["after"])
    assert wait_pid_exit(s1, 5.0) and wait_pid_exit(s2, 5.0)
    children = d.children()
    assert children["sub"]["state"] == "running" and children["sub"]["restarts"] == 1
    assert children["before"]["restarts"] == 0 and children["after"]["restarts"] == 0


def test_restarts_outside_the_window_do_not_escalate(daemon):
    d = daemon("""
[[root.children]]
id = "sub"
supervisor = "static"
max_restarts = 1
max_seconds = 0.2

[[root.children.children]]
id = "x"
agent = "agents_for_tests:Controlled"
""")
    first = d.kill("x")
    with d.events() as events:
        d.wait("x", "running", not_pid=first)
        # let the window pass, observed on the daemon's own clock: the previous restart
        # leaves the window once a wait for it has timed out
        with pytest.raises(OtpdError, match="timeout"):
            d.wait("x", "stopped", timeout=0.3)
        second = d.kill("x")
        d.wait("x", "running", not_pid=second)
    assert "escalated" not in [e["event"] for e in events.seen]
    assert d.children()["sub"]["restarts"] == 0


def test_root_over_intensity_exits_4_leaving_no_child(daemon):
    d = daemon("""
[root]
max_restarts = 1
max_seconds = 60

[[root.children]]
id = "a"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "b"
agent = "agents_for_tests:Controlled"
""")
    pids = d.pids("a", "b")
    kill_and_wait_back(d, "a")
    pids2 = d.pids("a", "b")

    d.kill("a")

    assert d.wait_exit(10.0) == 4
    for pid in list(pids.values()) + list(pids2.values()):
        assert wait_pid_exit(pid, 5.0)
    assert d.log.wait_closed(10.0), "an agent still holds the daemon's stderr open"
    assert re.search(r"root: escalated child=a max_restarts=1", d.log.text())
    assert not d.socket.exists()


def test_start_failures_back_off_exponentially_then_escalate(daemon, tmp_path):
    gate = tmp_path / "gate"
    d = daemon(f"""
[root]
max_restarts = 6
max_seconds = 60

[[root.children]]
id = "flaky"
agent = "agents_for_tests:CrashInInitWhenGated"
args = {{ gate = "{gate}" }}
""")
    gate.touch()  # from now on every start of flaky fails in init
    with d.events() as events:
        d.kill("flaky")
        seen = events.until_closed(timeout=20.0)
    assert d.wait_exit(10.0) == 4

    exits = [e for e in seen if e["event"] == "exited" and e["id"] == "flaky"]
    restarts = [e for e in seen if e["event"] == "restarted" and e["id"] == "flaky"]
    assert exits[0]["start_failure"] is False and exits[0]["signal"] == 9
    assert all(e["start_failure"] is True for e in exits[1:])
    assert all("gate is closed" in e["error"] for e in exits[1:])
    assert len(exits) == 7 and len(restarts) == 6
    # a crash of a running child restarts at once; each start failure in a row doubles the wait
    delays = [r["time"] - e["time"] for e, r in zip(exits[:-1], restarts, strict=True)]
    assert delays[0] < 0.5, delays  # no backoff: emitted in the same loop turn (the bound is for slow machines)
    for n, delay in enumerate(delays[1:]):
        assert delay >= 0.05 * 2**n * 0.9, f"restart {n + 2} came after {delay:.3f}s: {delays}"
    assert delays[-1] > delays[1]
    assert ("escalated", "root") in brief(seen)


def test_child_failing_every_start_makes_the_daemon_exit_4_with_one_line_errors(daemon):
    d = daemon("""
[[root.children]]
id = "ok"
agent = "otpd.agents.echo:EchoAgent"

[[root.children]]
id = "broken"
agent = "agents_for_tests:CrashInInit"
""", ready=False)

    assert d.wait_exit(10.0) == 4  # the default intensity: 3 restarts in 5 s, ~0.35 s of backoff
    assert d.log.wait_closed(10.0)
    lines = d.log.lines
    ours = [line for line in lines if line.startswith(f"otpd[{d.pid}]")]
    failures = [line for line in ours if re.search(r"broken: exited .*start_failure=True", line)]
    assert len(failures) == 4, "\n".join(ours)
    assert all("RuntimeError: boom in init" in line for line in failures)
    assert any("root: escalated child=broken" in line for line in ours)
    assert not any("internal error" in line for line in ours)
    # one traceback per failed start, from the child (raw or relayed by the daemon); none of the daemon's own
    assert d.log.text().count("Traceback (most recent call last)") == 4
