"""Workflows as processes: resume at the saved step through any kill, exactly once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from otpd.config import load
from otpd.errors import OtpdError
from otpd.store import tools
from otpd.store.lmdb_store import Store
from tests.conftest import wait_pid_exit

TREE = """
[[root.children]]
id = "workflows"
supervisor = "dynamic"
max_restarts = 10
max_seconds = 5

[root.children.template]
agent = "otpd.agents.workflow:WorkflowProcess"
restart = "transient"
args = { handlers = ["tests.workflow.steps:*", "otpd.examples.jobs:*"] }

[[root.children]]
id = "coordinator"
agent = "otpd.agents.coordinator:CoordinatorAgent"
args = { handlers = ["tests.workflow.steps:*", "otpd.examples.jobs:*"] }
"""
STEPS = "tests.workflow.steps:"


def three_steps(tmp: Path) -> tuple[dict[str, Any], Path, Path]:
    log, fifo = tmp / "steps.log", tmp / "gate.fifo"
    os.mkfifo(fifo)
    definition = {"metadata": {"test": True}, "steps": [
        {"name": "a", "handler": STEPS + "record", "args": {"name": "a", "log": str(log)}},
        {"name": "wait", "handler": STEPS + "gate", "args": {"fifo": str(fifo), "log": str(log)}},
        {"name": "c", "handler": STEPS + "record", "args": {"name": "c", "log": str(log)}},
    ]}
    return definition, log, fifo


def at_gate(fifo: Path) -> int:
    """Returns once a step has opened the FIFO to read: the writer's open is the event."""
    return os.open(fifo, os.O_WRONLY)


def until_status(d: Any, wf_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
    """Poll the coordinator with a deadline: outcomes reach it through events, asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = d.request("workflow.status", {"workflow_id": wf_id})
        except OtpdError as err:  # the coordinator is being restarted: wait for it
            assert err.code in ("agent_crashed", "agent_down"), err
            d.wait("coordinator", "running", timeout=timeout)
            continue
        if result["status"] == status:
            return result  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"{wf_id} is {result['status']}, not {status}: {result}"


def test_a_workflow_survives_killing_its_process_and_the_coordinator_and_completes_once(
        daemon: Any, tmp_path: Path) -> None:
    d = daemon(TREE)
    definition, log, fifo = three_steps(tmp_path)
    wf = d.request("workflow.start", {"definition": definition})["workflow_id"]
    writer = at_gate(fifo)  # step 2 is running
    old = d.pid_of(wf)
    os.kill(old, signal.SIGKILL)
    os.kill(d.pid_of("coordinator"), signal.SIGKILL)
    # Closed before the new process can open the FIFO: a reader that opened while this writer
    # was still open would read EOF when it closed, and end step 2 with no data.  (The killed
    # reader runs no more code: SIGKILL is pending.)
    os.close(writer)
    d.wait(wf, "running", not_pid=old)
    writer = at_gate(fifo)  # the restarted process is back in step 2, not step 1
    os.write(writer, b"go")
    os.close(writer)
    result = until_status(d, wf, "completed")
    assert log.read_text().split() == ["a", "gate", "gate", "c"]  # a and c ran exactly once
    assert [r.get("name", r.get("gate")) for r in result["task_results"]] == ["a", "go", "c"]
    assert result["current_step"] == 3 and result["metadata"] == {"test": True}
    listing = d.request("workflow.list", {})
    assert listing["completed_count"] == 1 and listing["failed_count"] == 0


def test_after_a_daemon_sigkill_unfinished_workflows_resume_at_their_step(daemon: Any, tmp_path: Path) -> None:
    d = daemon(TREE)
    definition, log, fifo = three_steps(tmp_path)
    wf = d.request("workflow.start", {"definition": definition})["workflow_id"]
    writer = at_gate(fifo)
    old = d.pid_of(wf)
    d.sigkill()
    d.wait_exit()
    assert wait_pid_exit(old, 10)  # PR_SET_PDEATHSIG took the agents with the daemon
    os.close(writer)
    d2 = daemon("", config_path=d.config_path)
    writer = at_gate(fifo)  # the coordinator started it again; it resumed at step 2
    os.write(writer, b"again")
    os.close(writer)
    result = until_status(d2, wf, "completed")
    assert log.read_text().split() == ["a", "gate", "gate", "c"]
    assert d2.request("workflow.list", {})["completed_count"] == 1
    assert result["task_results"][1]["gate"] == "again"


def test_a_poison_step_parks_its_workflow_then_retry_and_skip(daemon: Any, tmp_path: Path) -> None:
    d = daemon(TREE)
    log = tmp_path / "steps.log"
    wf = d.request("workflow.start", {"definition": {"steps": [
        {"handler": STEPS + "boom", "args": {"log": str(log)}},
        {"handler": STEPS + "record", "args": {"name": "after", "log": str(log)}},
    ]}})["workflow_id"]
    parked = until_status(d, wf, "parked")
    assert parked["parked_reason"].endswith("failed 3 times; the last one raised RuntimeError: the poison step")
    assert parked["errors"] == {"0": "raised RuntimeError: the poison step"}
    assert log.read_text().split() == ["boom"] * 3
    assert d.request("workflow.list", {})["failed_count"] == 1
    d.request("workflow.retry", {"workflow_id": wf})
    until_status(d, wf, "parked")
    assert log.read_text().split() == ["boom"] * 6
    d.request("workflow.skip", {"workflow_id": wf})
    result = until_status(d, wf, "completed")
    assert result["task_results"][0] is None and log.read_text().split()[-1] == "after"
    listing = d.request("workflow.list", {})
    assert listing["completed_count"] == 1 and listing["failed_count"] == 0


def test_a_step_past_its_timeout_ends_the_process_and_counts_as_an_attempt(daemon: Any, tmp_path: Path) -> None:
    d = daemon(TREE.replace("handlers = [", "poison_after = 2, step_timeout_s = 1.0, handlers = ["))
    definition, log, fifo = three_steps(tmp_path)  # the gate: nobody writes, so it never returns
    wf = d.request("workflow.start", {"definition": definition})["workflow_id"]
    with d.events() as ev:
        first = ev.until(lambda e: e["event"] == "exited" and e["id"] == wf, timeout=30)[-1]
        assert first["reason"] == "crash" and first["status"] == 75, first  # EXIT_TIMEOUT
    parked = until_status(d, wf, "parked")
    assert parked["parked_reason"] == "step 1 (wait) failed 2 times; the last one timed out after 1 s in attempt 2"
    assert parked["errors"] == {"1": "timed out after 1 s in attempt 2"}
    assert parked["current_step"] == 1 and len(parked["task_results"]) == 1
    assert log.read_text().split() == ["a", "gate", "gate"]  # step 0 ran once: its result was saved


def test_a_steps_own_timeout_overrides_the_default_and_ends_with_its_step(daemon: Any, tmp_path: Path) -> None:
    d = daemon(TREE.replace("handlers = [", "step_timeout_s = 1.0, handlers = ["))
    definition, _log, fifo = three_steps(tmp_path)
    definition["steps"][1]["timeout_s"] = 0  # no limit for the gate, over the default
    wf = d.request("workflow.start", {"definition": definition})["workflow_id"]
    writer = at_gate(fifo)
    with d.events() as ev, pytest.raises(AssertionError, match="no event within"):
        # twice the default: neither the gate's default nor step 0's timer (due meanwhile) fires
        ev.until(("exited", wf), timeout=2.0)
    os.write(writer, b"open\n")
    os.close(writer)
    result = until_status(d, wf, "completed")
    assert result["task_results"][1]["gate"] == "open" and result["errors"] == {}
    assert result["attempts"] == {"0": 1, "1": 1, "2": 1}, "each step ran once: no restart"
    with pytest.raises(OtpdError) as err:
        d.request("workflow.start", {"definition": {"steps": [{"handler": STEPS + "record", "timeout_s": -1}]}})
    assert err.value.code == "bad_request" and "timeout_s" in err.value.message


def test_cancel_stops_a_running_workflow_for_good(daemon: Any, tmp_path: Path) -> None:
    d = daemon(TREE)
    definition, _log, fifo = three_steps(tmp_path)
    wf = d.request("workflow.start", {"definition": definition})["workflow_id"]
    writer = at_gate(fifo)
    pid = d.pid_of(wf)
    with d.events() as ev:
        assert d.request("workflow.cancel", {"workflow_id": wf})["status"] == "cancelled"
        ev.until(("removed", wf))
    os.close(writer)
    assert wf not in d.children()
    assert d.request("workflow.status", {"workflow_id": wf})["status"] == "cancelled"
    with pytest.raises(OtpdError) as err:
        d.request("workflow.cancel", {"workflow_id": wf})
    assert err.value.code == "bad_request"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: the daemon removed it before the event


def test_steps_outside_the_allowlist_are_refused(daemon: Any) -> None:
    d = daemon(TREE)
    with pytest.raises(OtpdError) as err:
        d.request("workflow.start", {"definition": {"steps": [{"handler": "os:system", "args": {}}]}})
    assert err.value.code == "bad_request" and "not allowed" in err.value.message
    with pytest.raises(OtpdError) as err:
        d.request("workflow.start", {"definition": {"steps": []}})
    assert err.value.code == "bad_request"


def test_workflows_past_retention_are_forgotten_with_their_records(daemon: Any, tmp_path: Path) -> None:
    head, sep, tail = TREE.rpartition('"otpd.examples.jobs:*"]')  # the coordinator's args
    d = daemon(head + sep + ", retention = 1" + tail)
    log = tmp_path / "steps.log"
    one_step = {"steps": [{"handler": STEPS + "record", "args": {"name": "x", "log": str(log)}}]}
    store = Store(load(d.config_path).store_settings().path, readonly=True)
    first = d.request("workflow.start", {"definition": one_step})["workflow_id"]
    until_status(d, first, "completed")
    assert store.read(first) is not None
    second = d.request("workflow.start", {"definition": one_step})["workflow_id"]
    until_status(d, second, "completed")
    with pytest.raises(OtpdError) as err:
        d.request("workflow.status", {"workflow_id": first})
    assert err.value.code == "not_found"
    deadline = time.monotonic() + 10  # deleted once its process let go of its log
    while store.read(first) is not None or tools.show(store, "coordinator")["items"].get("forgetting"):
        assert time.monotonic() < deadline, f"{first}'s records outlived its retention"
    assert store.read(second) is not None and d.request("workflow.list", {})["completed_count"] == 2
    store.close()


def _driven_workflow(tmp_path: Path, steps: list[dict[str, Any]], **args: Any) -> tuple[Any, Any, Any, Any]:
    """A WorkflowProcess run by hand on a real store: (agent, its FakeRuntime, keeper, store)."""
    from otpd.agents.workflow import WorkflowProcess
    from tests.agents.test_task import driven

    agent, rt, keeper, store = driven(WorkflowProcess, "wf", {"definition": {"steps": steps},
                                                             "handlers": ["tests.workflow.steps:*"], **args}, tmp_path)
    keeper.commit()
    return agent, rt, keeper, store


def _commit(rt: Any, keeper: Any) -> None:
    """What the runtime does after a batch that committed: the after-commit callbacks."""
    keeper.commit()
    callbacks, rt.after[:] = list(rt.after), []
    for callback in callbacks:
        callback()


def _fail_commit(rt: Any, keeper: Any) -> None:
    """What it does after a batch whose commit failed (store_full): roll back, drop the callbacks."""
    keeper.rollback()
    rt.after.clear()


def _record(tmp_path: Path, name: str) -> dict[str, Any]:
    return {"handler": STEPS + "record", "args": {"name": name, "log": str(tmp_path / "log")}}


def test_after_a_failed_commit_the_step_is_asked_again_and_runs_once(tmp_path: Path) -> None:
    """A commit that fails (store_full) rolls the workflow back and drops what it asked for
    after the commit (the step's run): a retry asks again; one that comes while the step is
    asked or runs changes nothing."""
    agent, rt, keeper, store = _driven_workflow(tmp_path, [_record(tmp_path, "a")])
    assert list(rt.timers.values()) == ["step"]
    rt.fire(agent)  # its attempt is counted; the commit fails:
    _fail_commit(rt, keeper)
    assert agent.attempts == {} and list(rt.timers.values()) == ["step"]  # only the retry is due
    agent.handle_info("step")  # the retry
    agent.handle_info("step")  # another, while the step is asked: nothing
    _commit(rt, keeper)  # committed: the step runs
    assert agent.attempts == {"0": 1} and len(rt.work) == 1
    agent.handle_info("step")  # and one while it runs: nothing
    assert len(rt.work) == 1 and agent.attempts == {"0": 1}
    fn, args, done = rt.work[0]
    done(fn(*args), None)
    rt.timers.clear()
    _commit(rt, keeper)
    assert agent.current_step == 1 and (tmp_path / "log").read_text() == "a\n"
    store.close()


def test_a_success_whose_commit_fails_runs_again_as_the_same_attempt_and_stops_only_once_saved(
        tmp_path: Path) -> None:
    """poison_after 1: the step's one attempt succeeded, but the commit of its result failed.
    Not a crash: it runs again as that attempt, and the workflow stops only once it is
    recorded as completed (a stop before a failed commit left it running, with no process)."""
    agent, rt, keeper, store = _driven_workflow(tmp_path, [_record(tmp_path, "a")], poison_after=1)
    rt.fire(agent)
    _commit(rt, keeper)
    fn, args, done = rt.work[0]
    done(fn(*args), None)
    _fail_commit(rt, keeper)
    assert agent.current_step == 0 and list(rt.timers.values()) == ["step"], "no next step before the commit"
    rt.fire(agent)  # the retry
    _commit(rt, keeper)
    assert agent.status == "running" and agent.attempts == {"0": 1} and len(rt.work) == 2
    fn, args, done = rt.work[1]
    done(fn(*args), None)
    _commit(rt, keeper)
    rt.fire(agent)  # the next step: there is none
    _fail_commit(rt, keeper)  # the commit of "completed" fails
    assert agent.status == "running" and agent._rt().stopping is None
    rt.fire(agent)
    _commit(rt, keeper)
    assert agent.status == "completed" and store.read("wf")["state"]["status"] == "completed"
    assert agent._rt().stopping is not None
    store.close()


def test_a_step_timeout_that_comes_after_its_step_ended_does_nothing(tmp_path: Path) -> None:
    agent, rt, keeper, store = _driven_workflow(tmp_path, [_record(tmp_path, "a"), _record(tmp_path, "b")])
    agent.current_step = 1
    agent.handle_info(("timeout", 0))
    assert agent.errors == {} and rt.ending is None
    store.close()


def test_a_workflow_runs_only_handlers_the_template_allows_whatever_its_request_says(
        daemon: Any, tmp_path: Path) -> None:
    """The coordinator's patterns refuse early; the template's (config only: an add cannot set
    them) are what each workflow's process enforces.  Here the coordinator lets a handler
    through that the template does not: the workflow is parked, not started, and nothing ran."""
    template = 'restart = "transient"\nargs = { handlers = ["tests.workflow.steps:*", "otpd.examples.jobs:*"] }'
    tree = TREE.replace(template, 'restart = "transient"\nargs = { handlers = ["otpd.examples.jobs:*"] }')
    assert tree != TREE
    d = daemon(tree)
    coordinator = d.pid_of("coordinator")
    log = tmp_path / "steps.log"
    wf = d.request("workflow.start", {"definition": {"steps": [
        {"handler": STEPS + "record", "args": {"name": "a", "log": str(log)}}]}})["workflow_id"]
    parked = until_status(d, wf, "parked")
    assert parked["parked_reason"].startswith(f"not started: {wf}: bad args for otpd.agents.workflow:WorkflowProcess: "
                                              f"step 0: handler '{STEPS}record' is not allowed by the workflows "
                                              "template's config"), parked
    assert not log.exists() and wf not in d.children()
    assert d.pid_of("coordinator") == coordinator and d.request("workflow.list", {})["failed_count"] == 1


def test_a_step_the_template_does_not_allow_parks_the_workflow_without_running(tmp_path: Path) -> None:
    """The process checks each step before it runs it (its spec may predate the config's patterns)."""
    agent, rt, keeper, store = _driven_workflow(tmp_path, [_record(tmp_path, "a")], handlers=["otpd.examples.jobs:*"])
    rt.fire(agent)
    assert agent.status == "parked" and "is not allowed by the workflows template's config" in agent.parked_reason
    assert agent.attempts == {} and rt.work == []
    _commit(rt, keeper)  # the stop comes once the parked status is on disk
    assert not (tmp_path / "log").exists()
    store.close()


def test_a_step_whose_handler_cannot_be_loaded_is_a_failed_attempt_with_why(tmp_path: Path) -> None:
    """The allowlist's pattern matches, but the function is not there (a typo, code not yet
    deployed): the attempt fails like a step that raised, with the reason in ``errors`` (so
    in the parked reason at the end), and no worker ran."""
    agent, rt, keeper, store = _driven_workflow(tmp_path, [{"handler": STEPS + "no_such_step"}])
    rt.fire(agent)
    _commit(rt, keeper)  # the attempt is on disk: the step would run now
    assert rt.work == [] and agent.attempts == {"0": 1}
    assert agent.errors == {"0": f"did not start: handler '{STEPS}no_such_step': 'tests.workflow.steps' "
                                 "has no function 'no_such_step'"}
    for attempt in (2, 3):  # once why is committed, the next attempt, in the same process
        _commit(rt, keeper)
        rt.fire(agent)
        _commit(rt, keeper)
        assert agent.attempts == {"0": attempt} and rt.work == []
    _commit(rt, keeper)
    rt.fire(agent)
    assert agent.status == "parked" and "failed 3 times" in agent.parked_reason
    store.close()
