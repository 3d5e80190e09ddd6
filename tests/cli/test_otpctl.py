"""``otpctl`` against a real daemon: exit codes 0/1/2/3, ``--json`` documents, the everyday commands."""

from __future__ import annotations

import json
import queue
import subprocess
import threading

import psutil
import pytest

from tests.conftest import child_env, console, run_cli, wait_pid_exit

CONFIG = """
[[root.children]]
id = "echo"
agent = "otpd.agents.echo:EchoAgent"

[[root.children]]
id = "pipeline"
supervisor = "static"
strategy = "rest_for_one"

[[root.children.children]]
id = "reader"
agent = "otpd.agents.echo:EchoAgent"

[[root.children.children]]
id = "writer"
agent = "otpd.agents.echo:EchoAgent"

[[root.children]]
id = "workers"
supervisor = "dynamic"

[root.children.template]
agent = "otpd.agents.echo:EchoAgent"
"""


def otpctl(d, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return run_cli("otpctl", "--socket", str(d.socket), *args, timeout=timeout)


@pytest.mark.parametrize("command", [["status"], ["events", "--follow"]])
def test_unreachable_socket_exits_3(tmp_path, command):
    """(``events --follow`` exits 0 when the daemon stops under it, but 3 when there is none.)"""
    missing = tmp_path / "no" / "otpd.sock"
    result = run_cli("otpctl", "--socket", str(missing), *command)
    assert result.returncode == 3
    assert "cannot reach otpd" in result.stderr and str(missing) in result.stderr
    assert result.stdout == ""


def test_unreachable_socket_from_the_environment_exits_3(tmp_path):
    env = dict(child_env(), OTPD_SOCKET=str(tmp_path / "otpd.sock"))
    result = subprocess.run(console("otpctl") + ["ps"], capture_output=True, text=True, env=env, timeout=30,
                            check=False)
    assert result.returncode == 3
    assert str(tmp_path / "otpd.sock") in result.stderr


def test_daemon_error_exits_1_and_prints_its_code(daemon):
    d = daemon(CONFIG)
    result = otpctl(d, "kill", "nosuch")
    assert result.returncode == 1
    assert "error not_found:" in result.stderr
    assert result.stdout == ""


def test_daemon_error_with_json_prints_the_error_document(daemon):
    d = daemon(CONFIG)
    result = otpctl(d, "--json", "call", "nosuch", "1")
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["error"]["code"] == "not_found"
    assert set(document["error"]) == {"code", "message", "details"}


@pytest.mark.parametrize("args", [
    ["call", "echo", "{not json"],
    ["cast", "echo", "[1,"],
    ["add", "workers", "w1", "--args", "{oops"],
    ["add", "workers", "w1", "--args", "[1]"],
    ["kill", "echo", "--signal"],
    ["nosuchcommand"],
], ids=["call-bad-json", "cast-bad-json", "add-bad-json", "add-args-not-object", "missing-option-value", "unknown"])
def test_usage_errors_exit_2(daemon, args):
    d = daemon(CONFIG)
    result = otpctl(d, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "w1" not in d.children()


def test_bad_json_in_call_names_the_argument(daemon):
    d = daemon(CONFIG)
    result = otpctl(d, "call", "echo", "{not json")
    assert result.returncode == 2
    assert "REQUEST_JSON is not valid JSON" in result.stderr


def test_json_status_is_one_document_with_the_design_fields(daemon):
    d = daemon(CONFIG)
    result = otpctl(d, "--json", "status")
    assert result.returncode == 0, result.stderr

    document = json.loads(result.stdout)  # exactly one document: json.loads rejects trailing data
    daemon_part = document["daemon"]
    assert daemon_part["pid"] == d.pid
    assert daemon_part["version"] == "0.1.0"
    assert isinstance(daemon_part["uptime_s"], (int, float)) and daemon_part["uptime_s"] >= 0
    children = document["children"]
    assert [c["id"] for c in children] == ["echo", "pipeline", "reader", "writer", "workers"]
    for child in children:
        assert {"id", "type", "supervisor", "pid", "state", "restarts", "restart"} <= set(child)
        assert child["state"] == "running" and child["restarts"] == 0 and child["restart"] == "permanent"
    by_id = {c["id"]: c for c in children}
    assert by_id["echo"]["type"] == "agent" and by_id["echo"]["supervisor"] == "root"
    assert by_id["reader"]["supervisor"] == "pipeline" and by_id["writer"]["supervisor"] == "pipeline"
    for sup in ("pipeline", "workers"):
        assert by_id[sup]["type"] == "supervisor" and by_id[sup]["pid"] is None
        assert "seq" not in by_id[sup] and "links" not in by_id[sup]
    assert (by_id["echo"]["seq"], by_id["echo"]["links"]) == (0, 0)  # (agents only)
    agent_pids = {by_id[i]["pid"] for i in ("echo", "reader", "writer")}
    assert agent_pids == {c.pid for c in psutil.Process(d.pid).children()}


def test_human_status_ps_and_tree(daemon):
    d = daemon(CONFIG)
    status = otpctl(d, "status")
    assert status.returncode == 0
    assert f"pid {d.pid} running" in status.stdout and "5/5 children running" in status.stdout
    ps = otpctl(d, "ps")
    assert ps.returncode == 0 and ps.stdout.splitlines()[0].split() == [
        "ID", "TYPE", "SUPERVISOR", "PID", "STATE", "RESTARTS", "RESTART", "SEQ", "LINKS"]
    tree = otpctl(d, "tree")
    assert tree.returncode == 0
    assert "\n    reader [agent] running" in tree.stdout


def test_call_prints_the_reply(daemon):
    d = daemon(CONFIG)
    result = otpctl(d, "call", "echo", '{"hello": [1, 2]}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"hello": [1, 2]}


def test_kill_then_wait_for_a_new_pid(daemon):
    d = daemon(CONFIG)
    old = d.pid_of("reader")
    writer = d.pid_of("writer")

    killed = otpctl(d, "--json", "kill", "reader")
    assert killed.returncode == 0, killed.stderr
    assert json.loads(killed.stdout) == {"id": "reader", "pid": old, "signal": "SIGKILL"}
    waited = otpctl(d, "--json", "wait", "reader", "--state", "running", "--not-pid", str(old), "--timeout", "10")
    assert waited.returncode == 0, waited.stderr
    new = json.loads(waited.stdout)["pid"]
    assert new != old and wait_pid_exit(old, 5.0)
    d.record_pid(new)
    assert d.wait("writer", "running", not_pid=writer)["pid"] != writer  # rest_for_one


def test_wait_timeout_exits_1_with_timeout_code(daemon):
    d = daemon(CONFIG)
    result = otpctl(d, "wait", "echo", "--state", "stopped", "--timeout", "0.2")
    assert result.returncode == 1
    assert "error timeout:" in result.stderr


def test_add_and_remove_a_dynamic_child(daemon):
    d = daemon(CONFIG)
    added = otpctl(d, "add", "workers", "w1", "--args", '{"x": 1}')
    assert added.returncode == 0, added.stderr
    assert "w1 added to workers" in added.stdout
    pid = d.wait("w1", "running")["pid"]
    duplicate = otpctl(d, "add", "workers", "w1")
    assert duplicate.returncode == 1 and "error already_exists:" in duplicate.stderr
    with d.events() as events:
        removed = otpctl(d, "remove", "w1")
        assert removed.returncode == 0, removed.stderr
        events.until(("removed", "w1"))
    assert wait_pid_exit(pid, 5.0)
    assert "w1" not in d.children()


def test_shutdown_waits_for_the_daemon_to_exit(daemon):
    d = daemon(CONFIG)
    pids = [c["pid"] for c in d.status()["children"] if c["pid"]]
    result = otpctl(d, "shutdown")
    assert result.returncode == 0, result.stderr
    assert f"otpd (pid {d.pid}) stopped" in result.stdout
    assert d.wait_exit(10.0) == 0
    assert all(wait_pid_exit(pid, 5.0) for pid in pids)
    again = otpctl(d, "status")
    assert again.returncode == 3


def test_events_prints_the_recent_history_as_one_document(daemon):
    d = daemon(CONFIG)
    result = otpctl(d, "--json", "events", "--last", "3")
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)["events"]
    assert [(e["event"], e["id"]) for e in events] == [("ready", "pipeline"), ("ready", "workers"), ("ready", "root")]


def test_events_follow_prints_history_then_live_events_one_json_line_each(daemon):
    d = daemon(CONFIG)
    follower = subprocess.Popen(
        console("otpctl") + ["--socket", str(d.socket), "--json", "events", "--follow", "--last", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True)
    reader.start()
    try:
        # The history and the subscription are taken together, so the probe's events are printed
        # whether they happen before or after the follower connects.
        d.request("add", {"supervisor": "workers", "id": "probe"})
        seen = []
        while ("ready", "probe") not in seen:
            event = json.loads(lines.get(timeout=10.0))
            assert isinstance(event["time"], float)
            seen.append((event["event"], event["id"]))
        assert seen[:2] == [("started", "echo"), ("ready", "echo")]
        assert seen[-2:] == [("started", "probe"), ("ready", "probe")]
        d.request("shutdown")
        assert d.wait_exit(10.0) == 0
        assert follower.wait(10.0) == 0  # the stream ends cleanly when the daemon stops
        reader.join(10.0)
        rest = [json.loads(lines.get_nowait()) for _ in range(lines.qsize())]
        assert ("stopped", "echo") in [(e["event"], e["id"]) for e in rest]
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def test_shutdown_with_timeout_0_does_not_wait_for_the_daemon_to_exit(daemon):
    d = daemon(CONFIG)
    result = otpctl(d, "shutdown", "--timeout", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"otpd (pid {d.pid}) stopping\n"
    assert d.wait_exit(10.0) == 0
