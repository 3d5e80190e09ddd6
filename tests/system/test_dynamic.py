"""Dynamic supervisors: children added from the template at run time, restarted, removed."""

from __future__ import annotations

import pytest

from otpd.errors import OtpdError
from tests.conftest import brief, wait_pid_exit

CONFIG = """
[[root.children]]
id = "static1"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "workers"
supervisor = "dynamic"
max_restarts = 10
max_seconds = 60

[root.children.template]
agent = "agents_for_tests:Controlled"
shutdown_ms = 2000
args = { colour = "blue", size = 1 }

[[root.children]]
id = "pipeline"
supervisor = "static"

[[root.children.children]]
id = "reader"
agent = "agents_for_tests:Controlled"
"""


def add(d, child_id, **args):
    result = d.request("add", {"supervisor": "workers", "id": child_id, "args": args})
    assert result == {"id": child_id, "supervisor": "workers"}
    return d.wait(child_id, "running")["pid"]


def test_added_children_run_from_the_template_and_show_in_status(daemon):
    d = daemon(CONFIG)
    w1 = add(d, "w1")
    w2 = add(d, "w2", size=2)

    children = d.children()
    for child_id, pid in (("w1", w1), ("w2", w2)):
        child = children[child_id]
        assert (child["type"], child["supervisor"], child["state"]) == ("agent", "workers", "running")
        assert child["pid"] == pid
        assert child["restart"] == "transient"  # a template's default
    ids = [c["id"] for c in d.status()["children"]]
    assert ids.index("workers") < ids.index("w1") < ids.index("w2") < ids.index("pipeline")
    assert d.request("call", {"id": "w1", "request": "args"}) == {"colour": "blue", "size": 1}
    assert d.request("call", {"id": "w2", "request": "args"}) == {"colour": "blue", "size": 2}


def test_transient_dynamic_child_restarted_after_crash_siblings_untouched(daemon):
    d = daemon(CONFIG)
    w1 = add(d, "w1")
    w2 = add(d, "w2")
    static1 = d.pid_of("static1")

    d.kill("w1")
    back = d.wait("w1", "running", not_pid=w1)["pid"]

    assert back != w1 and wait_pid_exit(w1, 5.0)
    children = d.children()
    assert children["w1"]["restarts"] == 1
    assert children["w2"]["pid"] == w2 and children["static1"]["pid"] == static1


def test_transient_dynamic_child_exiting_normally_is_forgotten(daemon):
    d = daemon(CONFIG)
    w1 = add(d, "w1")
    with d.events() as events:
        d.cast("w1", {"do": "stop"})
        seen = events.until(("removed", "w1"))
    assert brief(seen) == [("exited", "w1"), ("removed", "w1")]
    assert seen[0]["reason"] == "normal"
    assert wait_pid_exit(w1, 5.0)
    assert "w1" not in d.children()


def test_remove_stops_the_child_and_forgets_it(daemon):
    d = daemon(CONFIG)
    w1 = add(d, "w1")
    w2 = add(d, "w2")

    with d.events() as events:
        d.request("remove", {"id": "w1"})
        seen = events.until(("removed", "w1"))

    assert brief(seen) == [("stopped", "w1"), ("removed", "w1")]
    assert seen[0]["reason"] == "shutdown"
    assert wait_pid_exit(w1, 5.0)
    children = d.children()
    assert "w1" not in children and children["w2"]["pid"] == w2
    with pytest.raises(OtpdError) as err:
        d.request("call", {"id": "w1", "request": 1})
    assert err.value.code == "not_found"
    # the id is free again
    assert add(d, "w1") not in (None, w1)


def test_add_with_a_duplicate_id_is_already_exists(daemon):
    d = daemon(CONFIG)
    w1 = add(d, "w1")
    for taken in ("w1", "static1", "reader", "workers"):
        with pytest.raises(OtpdError) as err:
            d.request("add", {"supervisor": "workers", "id": taken})
        assert err.value.code == "already_exists", taken
    assert d.children()["w1"]["pid"] == w1


@pytest.mark.parametrize(("args", "code"), [
    ({"supervisor": "pipeline", "id": "x1"}, "bad_request"),  # a static supervisor
    ({"supervisor": "static1", "id": "x1"}, "bad_request"),  # an agent
    ({"supervisor": "nosuch", "id": "x1"}, "not_found"),
    ({"supervisor": "workers", "id": "bad id!"}, "bad_request"),
    ({"supervisor": "workers"}, "bad_request"),
    ({"supervisor": "workers", "id": "x1", "args": [1]}, "bad_request"),
])
def test_add_rejects_bad_requests(daemon, args, code):
    d = daemon(CONFIG)
    with pytest.raises(OtpdError) as err:
        d.request("add", args)
    assert err.value.code == code
    assert "x1" not in d.children()


PICKY = """
[[root.children]]
id = "picky"
supervisor = "dynamic"
max_restarts = 1
max_seconds = 60

[root.children.template]
agent = "agents_for_tests:Picky"
args = { size = 1 }

[[root.children]]
id = "workflows"
supervisor = "dynamic"

[root.children.template]
agent = "otpd.agents.workflow:WorkflowProcess"

[[root.children]]
id = "queues"
supervisor = "dynamic"

[root.children.template]
agent = "otpd.agents.task:TaskAgent"
args = { handler = "otpd.examples.jobs:echo" }
"""


@pytest.mark.parametrize(("sup", "args", "message"), [
    ("picky", {"size": "big"}, "size must be an integer, got 'big'"),
    ("picky", {"crash_check": True}, "check_args raised KeyError"),
    ("workflows", {}, "WorkflowProcess needs args.definition"),
    ("workflows", {"definition": {"steps": [{"handler": "nocolon"}]}}, "step 0: 'handler' must be"),
    ("workflows", {"definition": {"steps": [{"handler": "otpd.examples.steps:add"}]}, "resume": "later"},
     'resume is "retry" or "skip"'),
    ("workflows", {"definition": {"steps": [{"handler": "os:system"}]}}, "handler 'os:system' is not allowed"),
    ("workflows", {"definition": {"steps": [{"handler": "os:system"}]}, "handlers": ["*:*"]},
     "args handlers of otpd.agents.workflow:WorkflowProcess are set by the config only"),
    ("queues", {"handler": "os:system"}, "args handler of otpd.agents.task:TaskAgent are set by the config only"),
    ("queues", {"concurrency": 0}, "concurrency must be an integer >= 1"),
], ids=["user-check", "user-check-bug", "no-definition", "bad-step", "bad-resume", "handler-not-allowed",
        "handlers-from-the-wire", "task-handler-from-the-wire", "task-bad-arg"])
def test_add_with_args_its_agent_refuses_is_bad_request_and_forks_nothing(daemon, tmp_path, sup, args, message):
    """The template's class checks each add's args (``check_args``): refused at once, where a
    child that failed its init at every restart would trip its supervisor's intensity."""
    d = daemon(PICKY)
    marker = tmp_path / "started"
    with pytest.raises(OtpdError) as err:
        d.request("add", {"supervisor": sup, "id": "x1",
                          "args": {**args, "touch": str(marker)} if sup == "picky" else args})
    assert err.value.code == "bad_request"
    assert message in err.value.message and err.value.message.startswith("x1: "), err.value.message
    assert "x1" not in d.children() and not marker.exists()
    # the supervisor is as it was, and takes a good add
    assert d.children()[sup]["state"] == "running"
    if sup == "picky":
        pid = d.request("add", {"supervisor": sup, "id": "x2", "args": {"size": 2, "touch": str(marker)}})
        assert pid == {"id": "x2", "supervisor": sup}
        assert d.wait("x2", "running")["pid"] and marker.exists()
        assert d.request("call", {"id": "x2", "request": "args"}) == {"size": 2, "touch": str(marker)}


def test_remove_of_a_static_child_is_refused(daemon):
    d = daemon(CONFIG)
    with pytest.raises(OtpdError) as err:
        d.request("remove", {"id": "reader"})
    assert err.value.code == "bad_request"
    assert d.children()["reader"]["state"] == "running"


ESCALATING = """
[root]
max_restarts = 100
max_seconds = 5

[[root.children]]
id = "workers"
supervisor = "dynamic"
max_restarts = 1
max_seconds = 60

[root.children.template]
agent = "agents_for_tests:Controlled"
args = { colour = "blue" }
"""


def test_a_dynamic_supervisor_restarted_by_its_parent_comes_back_with_its_added_children(daemon):
    """Pinned on purpose (README, "Semantics worth knowing"): unlike OTP's simple_one_for_one,
    which restarts empty, the added children start again, each with its own args."""
    d = daemon(ESCALATING)
    before = {w: add(d, w, size=n) for n, w in enumerate(("w1", "w2"))}
    with d.events() as events:
        for crash in range(2):  # the second crash is over the intensity: workers escalates
            pid = d.pid_of("w1")
            d.request("cast", {"id": "w1", "message": {"do": "exit", "code": 3}})
            if crash == 0:
                d.wait("w1", "running", not_pid=pid)
        events.until(("escalated", "workers"))
        events.until(("ready", "workers"))
    for w, n in (("w1", 0), ("w2", 1)):
        child = d.wait(w, "running")
        assert child["pid"] != before[w]
        assert d.request("call", {"id": w, "request": "args"}) == {"colour": "blue", "size": n}
