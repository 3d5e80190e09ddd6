"""The coordinator, workflows and tasks on input and events they were not ready for (found by a
review helper): an id that is another agent's, a supervisor stopped by an operator, a retry
cut short by a daemon SIGKILL, retention racing a skip, one bad input given to many workflows,
handlers that fail oddly.  A real daemon; each test waits on states and replies, never a sleep."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

import pytest

from otpd.errors import OtpdError
from tests.workflow.test_workflow import STEPS, TREE, until_status

pytestmark = pytest.mark.timeout(120)

KEEPING = """
[[root.children]]
id = "workflows"
supervisor = "dynamic"
max_restarts = 10
max_seconds = 5

[root.children.template]
agent = "otpd.agents.workflow:WorkflowProcess"
restart = "transient"
args = {{ handlers = ["tests.workflow.steps:*"] }}

[[root.children]]
id = "coordinator"
agent = "otpd.agents.coordinator:CoordinatorAgent"
args = {{ handlers = ["tests.workflow.steps:*"], retention = {retention} }}
"""

TASKS = """
[[root.children]]
id = "tasks"
agent = "otpd.agents.task:TaskAgent"
args = { handler = "otpd.examples.jobs:echo" }
"""
# The shipped config's tree (workflows: 3 restarts in 5 s, the root as many)
SHIPPED = "[root]" + (Path(__file__).resolve().parents[2] / "config" / "otpd.toml").read_text().split("[root]", 1)[1]


def _until(fn: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, "not in time"


def test_a_workflow_id_that_is_another_agents_is_refused_and_its_data_kept(daemon: Any) -> None:
    """It was taken: the workflow never ran, its status showed the TaskAgent's state, cancel
    crashed the coordinator, and past retention the TaskAgent's records were deleted."""
    d = daemon(KEEPING.format(retention=10) + TASKS)
    d.request("task.pause", {"id": "tasks"})
    d.request("task.add", {"id": "tasks", "payload": "keep me", "task_id": "precious"})
    coordinator = d.pid_of("coordinator")
    definition = {"steps": [{"handler": STEPS + "record", "args": {"name": "a", "log": "/dev/null"}}]}
    for taken in ("tasks", "workflows", "coordinator"):
        with pytest.raises(OtpdError) as err:
            d.request("workflow.start", {"definition": definition, "workflow_id": taken})
        assert err.value.code == "already_exists" and "another agent" in err.value.message
    with pytest.raises(OtpdError) as err:
        d.request("workflow.status", {"workflow_id": "tasks"})
    assert err.value.code == "not_found"
    assert d.request("task.get", {"id": "tasks", "task_id": "precious"})["state"] == "queued"
    assert d.pid_of("coordinator") == coordinator
    wf = d.request("workflow.start", {"definition": definition, "workflow_id": "mine"})["workflow_id"]
    until_status(d, wf, "completed")  # a free id is taken as before


def test_a_workflow_started_while_its_supervisor_is_stopped_waits_for_it(daemon: Any, tmp_path: Path) -> None:
    """Its launch raised shutting_down in the coordinator, at every restart of it, until the
    root gave up and the daemon exited 4."""
    d = daemon(SHIPPED)
    d.request("stop", {"id": "workflows"})
    d.wait("workflows", "stopped")
    coordinator = d.pid_of("coordinator")
    wf = d.request("workflow.start", {"definition": {"steps": [
        {"handler": "otpd.examples.steps:words", "args": {"text": "a b"}}]}})["workflow_id"]
    assert d.request("workflow.status", {"workflow_id": wf})["status"] == "running"
    d.request("start", {"id": "workflows"})
    until_status(d, wf, "completed")
    assert d.pid_of("coordinator") == coordinator and d.proc.poll() is None


def test_an_acknowledged_skip_survives_a_daemon_sigkill_before_the_workflow_took_it(daemon: Any,
                                                                                   tmp_path: Path) -> None:
    """The skip lived only in the add's args, in the daemon's memory: after a SIGKILL the
    reconcile found the workflow's own record still parked, and it stayed parked."""
    d = daemon(TREE)
    log = tmp_path / "log"
    wf = d.request("workflow.start", {"definition": {"steps": [
        {"handler": STEPS + "boom", "args": {"log": str(log)}},
        {"handler": STEPS + "record", "args": {"name": "after", "log": str(log)}}]}})["workflow_id"]
    until_status(d, wf, "parked")
    state_dir = Path(d.config_path.read_text().split('state_dir = "')[1].split('"')[0])
    fd = os.open(state_dir / "store" / "logs" / f"{wf}.log", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # its next process waits in its load, before any commit
    try:
        assert d.request("workflow.skip", {"workflow_id": wf})["status"] == "running"  # acknowledged
        d.sigkill()
        d.wait_exit()
    finally:
        os.close(fd)
    d2 = daemon("", config_path=d.config_path)
    result = until_status(d2, wf, "completed")
    assert result["current_step"] == 2 and log.read_text().split() == ["boom"] * 3 + ["after"]


def test_retention_does_not_forget_a_workflow_running_again_after_a_skip(daemon: Any, tmp_path: Path) -> None:
    """Parked, it was among the finished; skipped, it ran again, and one other workflow ending
    forgot it (retention 1): its records were deleted under it, its completion never counted."""
    d = daemon(KEEPING.format(retention=1))
    log, fifo = tmp_path / "log", tmp_path / "gate.fifo"
    os.mkfifo(fifo)
    a = d.request("workflow.start", {"definition": {"steps": [
        {"handler": STEPS + "boom", "args": {"log": str(log)}},
        {"handler": STEPS + "gate", "args": {"fifo": str(fifo), "log": str(log)}}]}})["workflow_id"]
    until_status(d, a, "parked")
    d.request("workflow.skip", {"workflow_id": a})
    writer = os.open(fifo, os.O_WRONLY)  # a runs its gate step now
    try:
        b = d.request("workflow.start", {"definition": {"steps": [
            {"handler": STEPS + "record", "args": {"name": "b", "log": str(log)}}]}})["workflow_id"]
        until_status(d, b, "completed")
        assert d.request("workflow.status", {"workflow_id": a})["status"] == "running"
    finally:
        os.write(writer, b"go")
        os.close(writer)
    until_status(d, a, "completed")
    assert d.request("workflow.list")["completed_count"] == 2


def test_one_bad_input_given_to_many_workflows_parks_them_and_nothing_else(daemon: Any) -> None:
    """A step that raised crashed its process; a dozen such workflows took the workflows
    supervisor past its intensity, then the root: the shipped config's daemon exited 4."""
    d = daemon(SHIPPED)
    coordinator = d.pid_of("coordinator")
    bad = {"steps": [{"name": "count", "handler": "otpd.examples.steps:count", "args": {}}]}  # IndexError
    ids = [d.request("workflow.start", {"definition": bad})["workflow_id"] for _ in range(12)]
    for wf in ids:
        assert "failed 3 times" in until_status(d, wf, "parked")["parked_reason"]
    assert d.proc.poll() is None and d.pid_of("coordinator") == coordinator
    assert d.children()["workflows"]["restarts"] == 0


@pytest.mark.parametrize("step, why", [
    ("raises_bad_str", "raised BadStr: <its message could not be read: ValueError>"),
    ("returns_a_set", "returned what cannot be saved (TypeError"),
    ("tuple_key", "returned what cannot be saved (TypeError"),  # (it packed: its record did not load, exit 4)
])
def test_a_step_that_fails_oddly_is_parked_with_why(daemon: Any, tmp_path: Path, step: str, why: str) -> None:
    d = daemon(TREE)
    log = tmp_path / "log"
    wf = d.request("workflow.start", {"definition": {"steps": [
        {"handler": STEPS + step, "args": {"log": str(log)}}]}})["workflow_id"]
    parked = until_status(d, wf, "parked")
    assert parked["errors"]["0"].startswith(why), parked
    assert len(log.read_text().split()) == 3  # three attempts, each run once


def test_a_step_that_ends_its_process_as_a_normal_exit_is_run_again_then_parked(daemon: Any, tmp_path: Path) -> None:
    """``os._exit(0)`` looked like a normal end: the transient child was forgotten, and the
    workflow stayed running for ever."""
    d = daemon(TREE)
    log = tmp_path / "log"
    wf = d.request("workflow.start", {"definition": {"steps": [
        {"handler": STEPS + "exits_0", "args": {"log": str(log)}}]}})["workflow_id"]
    parked = until_status(d, wf, "parked")
    assert "failed 3 times" in parked["parked_reason"] and log.read_text().split() == ["exit0"] * 3


@pytest.mark.parametrize("handler, error", [("raises_bad_str", "_BadStr: <its message could not be read: ValueError>"),
                                            ("raises_not_str", "_NotStr: <its message could not be read: TypeError>")])
def test_a_task_whose_error_has_no_readable_message_fails_without_crashing_its_agent(daemon: Any, handler: str,
                                                                                    error: str) -> None:
    """Its error's text was read on the agent's loop: the agent crashed at each attempt, and so
    cost every task running beside it an attempt too."""
    d = daemon(f"""
[[root.children]]
id = "tasks"
agent = "otpd.agents.task:TaskAgent"
args = {{ handler = "tests.agents.handlers:{handler}", max_attempts = 3 }}
""")
    pid = d.pid_of("tasks")
    d.request("task.add", {"id": "tasks", "payload": 1, "task_id": "odd"})
    task = _until(lambda: (t := d.request("task.get", {"id": "tasks", "task_id": "odd"}))["state"] == "dead" and t)
    assert d.pid_of("tasks") == pid, task
    assert task["last_error"] == error and task["attempts"] == 3


def test_a_result_the_store_can_never_take_is_parked_not_run_for_ever(daemon: Any, tmp_path: Path) -> None:
    """Found by a review helper: each store_full ran the step again as the same attempt, once a
    second for ever.  Now as the same attempt poison_after times in a row at most."""
    d = daemon("[store]\nmap_size_mb = 1\nmap_size_max_mb = 1\n" + TREE)
    log = tmp_path / "log"
    wf = d.request("workflow.start", {"definition": {"steps": [
        {"handler": STEPS + "big", "args": {"log": str(log)}}]}})["workflow_id"]
    parked = until_status(d, wf, "parked", timeout=60)
    assert "failed 3 times" in parked["parked_reason"] and len(log.read_text().split()) <= 2 * 3


def test_retention_counts_a_workflow_parked_then_skipped_once(daemon: Any, tmp_path: Path) -> None:
    """It was queued among the finished at its park and again at its end: two workflows ended,
    retention 2, and the first was forgotten (found by a review helper)."""
    d = daemon(KEEPING.format(retention=2))
    log = tmp_path / "log"
    a = d.request("workflow.start", {"definition": {"steps": [
        {"handler": STEPS + "boom", "args": {"log": str(log)}},
        {"handler": STEPS + "record", "args": {"name": "a", "log": str(log)}}]}})["workflow_id"]
    until_status(d, a, "parked")
    d.request("workflow.skip", {"workflow_id": a})
    until_status(d, a, "completed")
    b = d.request("workflow.start", {"definition": {"steps": [
        {"handler": STEPS + "record", "args": {"name": "b", "log": str(log)}}]}})["workflow_id"]
    until_status(d, b, "completed")
    assert {r["workflow_id"] for r in d.request("workflow.list")["workflows"]} == {a, b}


def test_the_id_of_a_workflow_being_forgotten_is_taken_only_once_it_is(daemon: Any, tmp_path: Path) -> None:
    """Taken at once, the new workflow's launch met the old process, and the old one's pending
    deletion took the new one's records (found by a review helper)."""
    d = daemon(KEEPING.format(retention=0))
    log, fifo = tmp_path / "log", tmp_path / "gate.fifo"
    os.mkfifo(fifo)
    d.request("workflow.start", {"workflow_id": "reuse", "definition": {"steps": [
        {"handler": STEPS + "gate", "args": {"fifo": str(fifo), "log": str(log)}}]}})
    writer = os.open(fifo, os.O_WRONLY)  # its step runs: the process holds its records
    second = {"steps": [{"handler": STEPS + "record", "args": {"name": "second", "log": str(log)}}]}
    try:
        d.request("workflow.cancel", {"workflow_id": "reuse"})  # retention 0: forgotten once it is down
        with pytest.raises(OtpdError) as err:
            d.request("workflow.start", {"workflow_id": "reuse", "definition": second})
        assert err.value.code == "already_exists" and "being deleted" in err.value.message
    finally:
        os.close(writer)

    def taken() -> bool:
        try:
            d.request("workflow.start", {"workflow_id": "reuse", "definition": second})
        except OtpdError as exc:
            assert exc.code == "already_exists", exc
            return False
        return True
    _until(taken)
    assert d.request("workflow.status", {"workflow_id": "reuse"})["status"] in ("running", "completed")
    assert _until(lambda: "second" in log.read_text().split())


def test_a_launch_the_daemon_refuses_for_good_parks_the_workflow(daemon: Any) -> None:
    """The coordinator's supervisor is not a dynamic one: the launch was retried every second
    for ever, the workflow running (found by a review helper)."""
    d = daemon("""
[[root.children]]
id = "static"
supervisor = "static"

[[root.children.children]]
id = "echo"
agent = "otpd.agents.echo:EchoAgent"

[[root.children]]
id = "coordinator"
agent = "otpd.agents.coordinator:CoordinatorAgent"
args = { supervisor = "static" }
""")
    wf = d.request("workflow.start", {"definition": {"steps": [
        {"handler": "otpd.examples.steps:words", "args": {"text": "a"}}]}})["workflow_id"]
    parked = until_status(d, wf, "parked")
    assert "not a dynamic supervisor" in parked["parked_reason"]
