"""Stopping: the shutdown ladder, reverse order, SIGTERM to the daemon, and the daemon's own death."""

from __future__ import annotations

import os
import signal

from tests.conftest import brief, wait_pid_exit, wait_stopped

LADDER = """
[[root.children]]
id = "polite"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "stubborn"
agent = "agents_for_tests:IgnoresTerm"
shutdown_ms = 300

[[root.children]]
id = "brutal"
agent = "agents_for_tests:Controlled"
shutdown_ms = "brutal_kill"
"""

TREE = """
[[root.children]]
id = "a"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "sub"
supervisor = "static"

[[root.children.children]]
id = "s1"
agent = "agents_for_tests:Controlled"

[[root.children.children]]
id = "s2"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "c"
agent = "agents_for_tests:Controlled"
"""


def test_shutdown_ladder_term_then_kill_after_timeout_brutal_kill_at_once(daemon):
    d = daemon(LADDER)
    pids = d.pids("polite", "stubborn", "brutal")

    with d.events() as events:
        assert d.request("shutdown")["pid"] == d.pid
        seen = events.until_closed(timeout=20.0)
    assert d.wait_exit(10.0) == 0

    stopped = {e["id"]: e for e in seen if e["event"] == "stopped"}
    assert brief(seen, ("stopped",)) == [("stopped", "brutal"), ("stopped", "stubborn"), ("stopped", "polite")]
    # brutal_kill: SIGKILL, no SIGTERM first (a SIGTERM would have ended it with status 79)
    assert stopped["brutal"]["signal"] == signal.SIGKILL and stopped["brutal"]["reason"] == "crash"
    # stubborn ignored SIGTERM: it is SIGKILLed once its 300 ms are up, not before
    assert stopped["stubborn"]["signal"] == signal.SIGKILL
    assert stopped["stubborn"]["time"] - stopped["brutal"]["time"] >= 0.3 * 0.95
    # polite took the SIGTERM and exited with the shutdown status
    assert stopped["polite"]["reason"] == "shutdown" and stopped["polite"]["status"] == 79
    for pid in pids.values():
        assert wait_pid_exit(pid, 5.0)
    assert not d.socket.exists()


def test_sigterm_to_daemon_stops_children_in_reverse_start_order_and_exits_0(daemon):
    d = daemon(TREE)
    pids = d.pids("a", "s1", "s2", "c")

    with d.events() as events:
        d.proc.send_signal(signal.SIGTERM)
        seen = events.until_closed(timeout=20.0)
    assert d.wait_exit(10.0) == 0

    assert brief(seen, ("stopped",)) == [
        ("stopped", "c"), ("stopped", "s2"), ("stopped", "s1"), ("stopped", "sub"), ("stopped", "a"),
    ]
    assert all(e["reason"] == "shutdown" for e in seen if e["event"] == "stopped")
    assert not [e for e in seen if e["event"] in ("exited", "restarted", "started")]
    for pid in pids.values():
        assert wait_pid_exit(pid, 5.0)
    assert not d.socket.exists()
    assert d.log.wait_for("stop requested by signal")
    assert d.log.wait_closed(10.0)


def test_sigint_to_daemon_is_an_ordered_stop_too(daemon):
    d = daemon(TREE)
    d.proc.send_signal(signal.SIGINT)
    assert d.wait_exit(10.0) == 0
    assert not d.socket.exists()


def test_children_start_in_order_each_ready_before_the_next(daemon):
    # the daemon's own log records the start order from the very beginning
    d = daemon(TREE)
    d.log.wait_for(r"root: ready")  # the log is read by a thread: let it catch up
    ours = [line.split(": ", 1)[1] for line in d.log.lines if line.startswith(f"otpd[{d.pid}] info: ")]
    starts = [line.split()[0:2] for line in ours if line.split()[1] in ("started", "ready")]
    assert starts == [
        ["a:", "started"], ["a:", "ready"],
        ["s1:", "started"], ["s1:", "ready"], ["s2:", "started"], ["s2:", "ready"], ["sub:", "ready"],
        ["c:", "started"], ["c:", "ready"],
        ["root:", "ready"],
    ]


def test_daemon_sigkill_takes_every_agent_with_it(daemon):
    d = daemon(TREE)
    pids = list(d.pids("a", "s1", "s2", "c").values())

    d.sigkill()
    assert d.wait_exit(10.0) == -signal.SIGKILL

    for pid in pids:
        assert wait_pid_exit(pid, 10.0), f"agent {pid} outlived the SIGKILLed daemon"
    # we are the subreaper: the orphans came to us.  Each died of PR_SET_PDEATHSIG's SIGKILL, or,
    # when it saw its channel close first (the kernel closes the dead daemon's fds before it sends
    # the death signal), by exiting with status 0 on its own.
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        left = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert killed or left, f"agent {pid}: wait status {status:#x}"
    assert d.log.wait_closed(10.0), "a process still holds the dead daemon's stderr"


def test_daemon_sigkill_kills_even_agents_that_cannot_see_their_channel_close(daemon):
    # a stopped process cannot read its channel's EOF: only PR_SET_PDEATHSIG's SIGKILL ends it
    d = daemon(TREE)
    pids = d.pids("a", "s1", "c")
    for child_id in pids:
        d.kill(child_id, "STOP")
    assert all(wait_stopped(pid) for pid in pids.values())

    d.sigkill()
    assert d.wait_exit(10.0) == -signal.SIGKILL

    for child_id, pid in pids.items():
        assert wait_pid_exit(pid, 10.0), f"{child_id} (pid {pid}) outlived the SIGKILLed daemon"
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, child_id


def test_new_daemon_starts_over_the_stale_socket_of_a_killed_one(daemon):
    d = daemon(TREE)
    pids = list(d.pids("a", "s1", "s2", "c").values())
    d.sigkill()
    assert d.wait_exit(10.0) == -signal.SIGKILL
    for pid in pids:
        assert wait_pid_exit(pid, 10.0)
        os.waitpid(pid, 0)
    assert d.socket.exists()  # left behind by the SIGKILL

    again = daemon("", config_path=d.config_path)
    assert again.socket == d.socket
    assert again.request("call", {"id": "a", "request": "hi"}) == "hi"


def test_shutdown_during_a_restart_backoff_exits_0_without_starting_the_child(daemon, tmp_path):
    gate = tmp_path / "gate"
    d = daemon(f"""
[root]
max_restarts = 100
max_seconds = 60

[[root.children]]
id = "other"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "flaky"
agent = "agents_for_tests:CrashInInitWhenGated"
args = {{ gate = "{gate}" }}
""")
    gate.touch()
    with d.events() as events:
        d.kill("flaky")
        # wait until flaky has failed to start a few times: its backoff is now 0.2 s and growing
        for _ in range(3):
            events.until(lambda e: e["event"] == "exited" and e["id"] == "flaky" and e["start_failure"])
        assert d.wait("flaky", "restarting", timeout=1.0)["pid"] is None
        events.request("shutdown")
        after = events.until_closed(timeout=20.0)  # everything that happened once shutdown was handled
    assert d.wait_exit(10.0) == 0
    assert not [e for e in after if e["event"] in ("restarted", "started")], brief(after)
    assert ("stopped", "other") in brief(after)
    assert brief(events.seen, ("stopped",))[-1] == ("stopped", "other")


def test_operator_stop_and_start_of_a_nested_supervisor(daemon):
    d = daemon(TREE)
    before = d.pids("a", "s1", "s2", "c")
    with d.events() as events:
        d.request("stop", {"id": "sub"})
        seen = events.until(("stopped", "sub"))
    assert brief(seen, ("stopped",)) == [("stopped", "s2"), ("stopped", "s1"), ("stopped", "sub")]
    children = d.children()
    assert [children[i]["state"] for i in ("sub", "s1", "s2")] == ["stopped"] * 3
    assert (children["a"]["pid"], children["c"]["pid"]) == (before["a"], before["c"])

    d.request("start", {"id": "sub"})
    d.wait("sub", "running")
    after = d.pids("a", "s1", "s2", "c")
    assert after["s1"] not in (None, before["s1"]) and after["s2"] not in (None, before["s2"])
    assert (after["a"], after["c"]) == (before["a"], before["c"])
