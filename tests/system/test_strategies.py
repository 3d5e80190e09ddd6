"""Restart strategies with real processes: who comes back with a new pid after a SIGKILL."""

from __future__ import annotations

from tests.conftest import brief, wait_pid_exit

THREE = """
[root]
strategy = "{strategy}"
max_restarts = 10

[[root.children]]
id = "a"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "b"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "c"
agent = "agents_for_tests:Controlled"
"""


def test_permanent_child_restarted_after_sigkill_one_for_one(daemon):
    d = daemon(THREE.format(strategy="one_for_one"))
    before = d.pids("a", "b", "c")

    killed = d.kill("b")
    assert killed == before["b"]
    back = d.wait("b", "running", not_pid=killed)

    assert back["pid"] not in (None, killed)
    assert wait_pid_exit(killed, 5.0)
    after = d.pids("a", "b", "c")
    assert after["b"] == back["pid"]
    assert (after["a"], after["c"]) == (before["a"], before["c"])
    assert d.children()["b"]["restarts"] == 1
    assert d.request("call", {"id": "b", "request": "pid"}) == back["pid"]


def test_one_for_all_restarts_every_child_stopping_in_reverse_and_starting_in_order(daemon):
    d = daemon(THREE.format(strategy="one_for_all"))
    before = d.pids("a", "b", "c")

    with d.events() as events:
        d.kill("b")
        seen = events.until(("ready", "c"))

    after = d.pids("a", "b", "c")
    for child in "abc":
        assert after[child] not in (None, before[child]), f"{child} kept its pid"
        assert wait_pid_exit(before[child], 5.0)
    assert brief(seen, ("exited", "stopped", "started")) == [
        ("exited", "b"),
        ("stopped", "c"),
        ("stopped", "a"),
        ("started", "a"),
        ("started", "b"),
        ("started", "c"),
    ]
    # each child is ready before the next one is started
    assert brief(seen, ("started", "ready")) == [
        ("started", "a"), ("ready", "a"), ("started", "b"), ("ready", "b"), ("started", "c"), ("ready", "c"),
    ]
    restarts = {c: d.children()[c]["restarts"] for c in "abc"}
    assert restarts == {"a": 1, "b": 1, "c": 1}


def test_rest_for_one_restarts_the_killed_child_and_the_later_ones(daemon):
    d = daemon(THREE.format(strategy="rest_for_one"))
    before = d.pids("a", "b", "c")

    with d.events() as events:
        d.kill("b")
        seen = events.until(("ready", "c"))

    after = d.pids("a", "b", "c")
    assert after["a"] == before["a"]
    assert after["b"] not in (None, before["b"])
    assert after["c"] not in (None, before["c"])
    assert brief(seen, ("exited", "stopped", "started")) == [
        ("exited", "b"),
        ("stopped", "c"),
        ("started", "b"),
        ("started", "c"),
    ]
    assert d.children()["a"]["restarts"] == 0


def test_rest_for_one_killing_the_last_child_restarts_only_it(daemon):
    d = daemon(THREE.format(strategy="rest_for_one"))
    before = d.pids("a", "b", "c")

    killed = d.kill("c")
    d.wait("c", "running", not_pid=killed)

    after = d.pids("a", "b", "c")
    assert (after["a"], after["b"]) == (before["a"], before["b"])
    assert after["c"] != before["c"]


def test_nested_rest_for_one_pipeline_leaves_the_rest_of_the_tree_alone(daemon):
    d = daemon("""
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
""")
    before = d.pids("echo", "reader", "writer")

    killed = d.kill("reader")
    d.wait("reader", "running", not_pid=killed)
    d.wait("writer", "running", not_pid=before["writer"])
    d.wait("pipeline", "running")

    after = d.pids("echo", "reader", "writer")
    assert after["echo"] == before["echo"]
    assert after["reader"] != before["reader"] and after["writer"] != before["writer"]
    children = d.children()
    assert children["pipeline"]["restarts"] == 0
    assert children["pipeline"]["pid"] is None and children["pipeline"]["type"] == "supervisor"


def test_child_stopped_by_operator_stays_down_through_a_group_restart(daemon):
    d = daemon(THREE.format(strategy="one_for_all"))
    b = d.pid_of("b")
    d.request("stop", {"id": "b"})
    d.wait("b", "stopped")
    assert wait_pid_exit(b, 5.0)
    before = d.pids("a", "c")

    with d.events() as events:
        d.kill("a")
        events.until(("ready", "c"))

    children = d.children()
    assert children["a"]["pid"] not in (None, before["a"]) and children["c"]["pid"] not in (None, before["c"])
    assert (children["b"]["state"], children["b"]["pid"]) == ("stopped", None)
    assert "b" not in {e["id"] for e in events.seen if e["event"] in ("started", "restarted")}

    d.request("start", {"id": "b"})
    assert d.wait("b", "running")["pid"] is not None


def test_restart_op_gives_a_child_a_new_process(daemon):
    d = daemon(THREE.format(strategy="one_for_one"))
    before = d.pids("a", "b", "c")
    with d.events() as events:
        d.request("restart", {"id": "b"})
        seen = events.until(("ready", "b"))
    assert brief(seen, ("stopped", "restarted", "started")) == [
        ("stopped", "b"), ("restarted", "b"), ("started", "b"),
    ]
    assert seen[0]["reason"] == "shutdown"
    after = d.pids("a", "b", "c")
    assert after["b"] != before["b"] and (after["a"], after["c"]) == (before["a"], before["c"])


def test_one_for_all_leaves_siblings_alone_when_a_child_needs_no_restart(daemon):
    d = daemon(THREE.format(strategy="one_for_all").replace(
        'id = "b"\nagent = "agents_for_tests:Controlled"',
        'id = "b"\nagent = "agents_for_tests:Controlled"\nrestart = "temporary"'))
    before = d.pids("a", "b", "c")
    with d.events() as events:
        d.kill("b")
        events.until(("exited", "b"))
    children = d.children()  # a group restart would have begun in the loop turn that reaped b
    for sibling in ("a", "c"):
        assert (children[sibling]["pid"], children[sibling]["state"]) == (before[sibling], "running")
        assert children[sibling]["restarts"] == 0
    assert children["b"]["pid"] is None and children["b"]["restarts"] == 0


def test_escalation_under_a_one_for_all_root_restarts_the_whole_group(daemon):
    d = daemon("""
[root]
strategy = "one_for_all"
max_restarts = 10

[[root.children]]
id = "x"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "sub"
supervisor = "static"
max_restarts = 0

[[root.children.children]]
id = "s1"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "y"
agent = "agents_for_tests:Controlled"
""")
    before = d.pids("x", "s1", "y")
    with d.events() as events:
        d.kill("s1")  # max_restarts = 0: the first crash makes sub give up
        seen = events.until(("ready", "y"))
    assert ("escalated", "sub") in brief(seen)
    assert brief(seen, ("stopped",)) == [("stopped", "y"), ("stopped", "x")]
    assert brief(seen, ("started",)) == [("started", "x"), ("started", "s1"), ("started", "y")]
    after = d.pids("x", "s1", "y")
    assert all(after[i] not in (None, before[i]) for i in before)
