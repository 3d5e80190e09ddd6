"""permanent / transient / temporary with real exits: Agent.stop(), os._exit(n), SIGKILL.

The restart decision is taken in the same loop turn that reaps the child, so
once the ``exited`` event has arrived a ``status`` shows the decision: if a
restart were coming, the child would already be ``starting`` (or later).
"""

from __future__ import annotations

import pytest

from tests.conftest import wait_pid_exit


def one_child(restart: str) -> str:
    return f"""
[[root.children]]
id = "keeper"
agent = "otpd.agents.echo:EchoAgent"

[[root.children]]
id = "x"
agent = "agents_for_tests:Controlled"
restart = "{restart}"
"""


def exit_and_watch(d, message):
    """Cast ``message`` to x; return the ``exited`` event and the status right after it."""
    pid = d.pid_of("x")
    with d.events() as events:
        d.cast("x", message)
        exited = events.until(("exited", "x"))[-1]
    assert wait_pid_exit(pid, 5.0)
    return pid, exited, d.children()


def test_transient_child_not_restarted_after_normal_exit(daemon):
    d = daemon(one_child("transient"))
    keeper = d.pid_of("keeper")

    pid, exited, children = exit_and_watch(d, {"do": "stop"})

    assert exited["reason"] == "normal" and exited["start_failure"] is False
    assert exited.get("status") == 0
    x = children["x"]
    assert (x["state"], x["pid"], x["restarts"]) == ("stopped", None, 0)
    assert d.wait("x", "stopped", timeout=1)["pid"] is None
    assert children["keeper"]["pid"] == keeper


def test_transient_child_restarted_after_crash_exit(daemon):
    d = daemon(one_child("transient"))

    pid, exited, _ = exit_and_watch(d, {"do": "exit", "code": 3})

    assert exited["reason"] == "crash" and exited["status"] == 3
    back = d.wait("x", "running", not_pid=pid)
    assert back["pid"] != pid
    assert d.children()["x"]["restarts"] == 1


def test_transient_child_restarted_after_exception_in_callback(daemon):
    d = daemon(one_child("transient"))

    pid, exited, _ = exit_and_watch(d, {"do": "raise"})

    assert exited["reason"] == "crash"
    assert d.wait("x", "running", not_pid=pid)["pid"] != pid


def test_transient_child_restarted_after_sigkill(daemon):
    d = daemon(one_child("transient"))
    pid = d.kill("x")
    assert d.wait("x", "running", not_pid=pid)["pid"] != pid


@pytest.mark.parametrize("message", [{"do": "stop"}, {"do": "exit", "code": 3}], ids=["normal", "crash"])
def test_temporary_child_never_restarted(daemon, message):
    d = daemon(one_child("temporary"))

    _, exited, children = exit_and_watch(d, message)

    assert exited["reason"] == ("normal" if message["do"] == "stop" else "crash")
    x = children["x"]
    assert x["pid"] is None and x["restarts"] == 0
    assert x["state"] in ("stopped", "failed")
    assert children["keeper"]["state"] == "running"


def test_temporary_child_not_restarted_after_sigkill(daemon):
    d = daemon(one_child("temporary"))
    with d.events() as events:
        d.kill("x")
        exited = events.until(("exited", "x"))[-1]
    assert exited["reason"] == "crash" and exited["signal"] == 9
    x = d.children()["x"]
    assert x["pid"] is None and x["restarts"] == 0 and x["state"] in ("stopped", "failed")


@pytest.mark.parametrize("message", [{"do": "stop"}, {"do": "exit", "code": 3}], ids=["normal", "crash"])
def test_permanent_child_restarted_after_any_exit(daemon, message):
    d = daemon(one_child("permanent"))
    pid = d.pid_of("x")
    d.cast("x", message)
    assert d.wait("x", "running", not_pid=pid)["pid"] != pid
    assert d.children()["x"]["restarts"] == 1


def test_operator_stop_keeps_a_permanent_child_down_until_start(daemon):
    d = daemon(one_child("permanent"))
    pid = d.pid_of("x")

    assert d.request("stop", {"id": "x"})["state"] in ("stopping", "stopped")
    d.wait("x", "stopped")
    assert wait_pid_exit(pid, 5.0)
    assert d.children()["x"]["pid"] is None

    d.request("start", {"id": "x"})
    assert d.wait("x", "running")["pid"] not in (None, pid)
