"""TaskAgent on a real daemon: real forks, SIGKILL by PID, a real LMDB, the control socket's task.* ops.

Nothing sleeps.  A task's progress is seen through a FIFO (``handlers.gate``): the handler
opens it for reading, so the test's open for writing returns exactly when the task is running;
closing the test's end lets the task finish.  Counters are polled with a deadline (no event
exists for a task's completion), child states come from ``wait`` and the event stream.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from otpd.errors import OtpdError
from otpd.examples import jobs
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(60)


def tasks_config(handler: str = "otpd.examples.jobs:echo", concurrency: int = 4, max_attempts: int = 3,
                 agent_id: str = "tasks") -> str:
    return f"""
[root]
max_restarts = 100
max_seconds = 5

[[root.children]]
id = "{agent_id}"
agent = "otpd.agents.task:TaskAgent"
args = {{ handler = "{handler}", concurrency = {concurrency}, max_attempts = {max_attempts} }}
"""


# -- helpers ------------------------------------------------------------------------


def add(d: Any, payload: Any, task_id: str | None = None, agent: str = "tasks") -> str:
    args: dict[str, Any] = {"id": agent, "payload": payload}
    if task_id is not None:
        args["task_id"] = task_id
    return str(d.request("task.add", args)["task_id"])


def stats(d: Any, agent: str = "tasks") -> dict[str, Any]:
    return d.request("task.stats", {"id": agent})  # type: ignore[no-any-return]


def listing(d: Any, dead: bool = False, limit: int = 1000, agent: str = "tasks") -> list[dict[str, Any]]:
    return d.request("task.list", {"id": agent, "dead": dead, "limit": limit})["tasks"]  # type: ignore[no-any-return]


def call(d: Any, request: dict[str, Any], agent: str = "tasks") -> Any:
    return d.request("call", {"id": agent, "request": request})


def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 20.0) -> Any:
    """Call ``fetch`` until ``done(result)``; AssertionError with the last result after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = fetch()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"still not there after {timeout}s: {result}")


def until_stats(d: Any, timeout: float = 20.0, agent: str = "tasks", **want: Any) -> dict[str, Any]:
    return poll(lambda: stats(d, agent), lambda s: all(s[k] == v for k, v in want.items()), timeout)  # type: ignore[no-any-return]


def kill_agent(d: Any, agent: str = "tasks") -> int:
    """SIGKILL the agent by PID and wait for its replacement to run; returns the old pid."""
    pid: int = d.pid_of(agent)
    os.kill(pid, signal.SIGKILL)
    d.wait(agent, "running", not_pid=pid, timeout=20)
    return pid


class Gate:
    """FIFOs a ``handlers.gate`` task blocks on, one per run: ``running()`` returns once the next
    run has its FIFO open (it is running now), ``release()`` lets that run finish (or fail)."""

    RUNS = 6

    def __init__(self, tmp: Path, n: int) -> None:
        self.n = n
        self.path = tmp / f"gate{n}"
        self.runs = tmp / f"runs{n}"
        for run in range(1, self.RUNS + 1):
            os.mkfifo(f"{self.path}.{run}")
        self.run = 0
        self.fd: int | None = None

    def payload(self) -> dict[str, Any]:
        return {"n": self.n, "fifo": str(self.path), "runs": str(self.runs)}

    def running(self, timeout: float = 20.0) -> None:
        """Return once the task's next run has its FIFO open for reading (it is running now)."""
        assert self.fd is None and self.run < self.RUNS
        self.run += 1
        path = f"{self.path}.{self.run}"
        box: list[int] = []
        opener = threading.Thread(target=lambda: box.append(os.open(path, os.O_WRONLY)), daemon=True)
        opener.start()
        opener.join(timeout)
        if not box:
            unblock = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets the opener return
            opener.join(5)
            os.close(unblock)
            for fd in box:
                os.close(fd)
            raise AssertionError(f"run {self.run} of task {self.n} did not start within {timeout}s")
        self.fd = box[0]

    def release(self, data: bytes = b"done") -> None:
        assert self.fd is not None
        os.write(self.fd, data)
        self.drop()

    def drop(self) -> None:
        """Close our end without a word (the reader is dead, or will see EOF)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def run_count(self) -> int:
        return len(self.runs.read_text().splitlines()) if self.runs.exists() else 0


# -- the design's test ------------------------------------------------------------------


def test_ten_queued_tasks_survive_sigkill_of_the_agent_and_then_complete_once(daemon: Any) -> None:
    d = daemon(tasks_config())
    assert d.request("task.pause", {"id": "tasks"}) == {"status": "paused"}
    ids = [add(d, {"work": f"task_{i}"}) for i in range(10)]
    assert len(set(ids)) == 10
    before = stats(d)
    assert (before["queued"], before["processing"], before["completed_count"]) == (10, 0, 0)
    queued = listing(d)
    assert [t["task_id"] for t in queued] == ids and {t["state"] for t in queued} == {"queued"}

    old = kill_agent(d)
    assert d.pid_of("tasks") != old
    assert stats(d) == before  # same counts, still paused
    assert listing(d) == queued  # the same 10, in order, with their payloads

    d.request("task.resume", {"id": "tasks"})
    after = until_stats(d, completed_count=10)
    assert (after["queued"], after["processing"], after["dead"], after["error_count"]) == (0, 0, 0, 0)
    for task_id in ids:
        assert call(d, {"op": "get", "task_id": task_id}) == {"task_id": task_id, "state": "completed"}
    assert stats(d)["completed_count"] == 10  # counted once, and nothing else ran


# -- at least once -------------------------------------------------------------------------


def test_a_task_in_progress_when_the_agent_is_killed_runs_again_with_its_attempt_counted(
        daemon: Any, tmp_path: Path) -> None:
    d = daemon(tasks_config("tests.agents.handlers:gate", max_attempts=3))
    gate = Gate(tmp_path, 1)
    task_id = add(d, gate.payload(), task_id="job-1")
    gate.running()  # attempt 1 holds the FIFO: it is in progress now
    [task] = listing(d)
    assert (task["task_id"], task["state"], task["attempts"]) == ("job-1", "processing", 1)

    kill_agent(d)
    gate.drop()
    gate.running()  # the replacement runs it again, by itself
    [task] = listing(d)
    assert (task["state"], task["attempts"]) == ("processing", 2)
    assert stats(d)["interrupted_count"] == 1

    gate.release()
    s = until_stats(d, completed_count=1)
    assert (s["processing"], s["queued"], s["dead"], s["error_count"]) == (0, 0, 0, 0)
    assert gate.run_count() == 2  # at least once: it ran twice, and completed once
    assert call(d, {"op": "get", "task_id": task_id})["state"] == "completed"


def test_a_clean_restart_reruns_the_running_task_without_using_up_an_attempt(daemon: Any, tmp_path: Path) -> None:
    d = daemon(tasks_config("tests.agents.handlers:gate", max_attempts=1))
    gate = Gate(tmp_path, 1)
    add(d, gate.payload(), task_id="long")
    gate.running()
    pid = d.pid_of("tasks")
    d.request("restart", {"id": "tasks"})  # SIGTERM: a clean stop, then a new process
    d.wait("tasks", "running", not_pid=pid)
    gate.drop()
    gate.running()  # run 2, still attempt 1 of 1: not dead-lettered
    [task] = listing(d)
    assert (task["task_id"], task["attempts"]) == ("long", 1)
    gate.release()
    s = until_stats(d, completed_count=1)
    assert (s["dead"], s["interrupted_count"]) == (0, 1)


def test_concurrency_bounds_the_tasks_running_at_once(daemon: Any, tmp_path: Path) -> None:
    d = daemon(tasks_config("tests.agents.handlers:gate", concurrency=2))
    gates = [Gate(tmp_path, n) for n in range(3)]
    d.request("task.pause", {"id": "tasks"})
    for g in gates:
        add(d, g.payload(), task_id=f"g{g.n}")
    d.request("task.resume", {"id": "tasks"})  # one pump, three queued tasks, two slots
    gates[0].running()
    gates[1].running()
    s = stats(d)
    assert (s["processing"], s["queued"]) == (2, 1)
    gates[0].release()
    gates[2].running()  # a slot came free: the third starts
    until_stats(d, completed_count=1, processing=2, queued=0)
    gates[1].release()
    gates[2].release()
    until_stats(d, completed_count=3, processing=0)


# -- failures, dead letters, retry --------------------------------------------------------------


def test_failures_retry_then_dead_letter_with_the_last_error_then_retry_from_dead(
        daemon: Any, tmp_path: Path) -> None:
    d = daemon(tasks_config("tests.agents.handlers:fail_unless_file", max_attempts=3))
    marker = tmp_path / "ok"
    task_id = add(d, {"file": str(marker)}, task_id="flaky")
    s = until_stats(d, dead=1)
    assert (s["error_count"], s["completed_count"], s["queued"], s["processing"]) == (3, 0, 0, 0)
    [dead] = listing(d, dead=True)
    assert dead["task_id"] == task_id and dead["state"] == "dead" and dead["attempts"] == 3
    assert dead["last_error"] == f"FileNotFoundError: {marker} is not there yet"
    assert dead["payload"] == {"file": str(marker)}
    assert listing(d) == []
    d.log.wait_for(r"tasks: task 'flaky' dead after 3 attempts")

    # a dead letter survives a SIGKILL of the agent
    kill_agent(d)
    assert listing(d, dead=True) == [dead]

    marker.write_text("now")
    # back in the queue with its attempts reset, and started at once (the agent is active)
    assert d.request("task.retry", {"id": "tasks", "task_id": task_id}) == {"task_id": task_id,
                                                                            "state": "processing"}
    s = until_stats(d, completed_count=1)
    assert (s["dead"], s["error_count"]) == (0, 3)
    assert listing(d, dead=True) == []
    with pytest.raises(OtpdError) as err:
        d.request("task.retry", {"id": "tasks", "task_id": task_id})
    assert err.value.code == "not_found"


def test_a_failure_below_max_attempts_goes_back_to_the_queue(daemon: Any, tmp_path: Path) -> None:
    d = daemon(tasks_config("tests.agents.handlers:gate", max_attempts=2))
    gate = Gate(tmp_path, 1)
    add(d, gate.payload(), task_id="twice")
    gate.running()
    gate.release(b"fail")
    gate.running()  # run 2, after the failure
    [task] = listing(d)
    assert (task["attempts"], task["last_error"]) == (2, "RuntimeError: gate 1 told to fail")
    assert stats(d)["error_count"] == 1
    gate.release()
    s = until_stats(d, completed_count=1)
    assert (s["dead"], s["error_count"]) == (0, 1)


def test_a_task_that_kills_its_agent_is_dead_lettered_instead_of_crash_looping(daemon: Any) -> None:
    d = daemon(tasks_config("tests.agents.handlers:exit_agent", max_attempts=2))
    with d.events() as ev:
        add(d, {"boom": True}, task_id="poison")
        ev.until(("restarted", "tasks"), timeout=20)  # attempt 1 killed it
        ev.until(("restarted", "tasks"), timeout=20)  # attempt 2 (the rerun) killed it again
        d.wait("tasks", "running", timeout=20)
    s = until_stats(d, dead=1)
    assert (s["processing"], s["queued"], s["completed_count"], s["interrupted_count"]) == (0, 0, 0, 2)
    [dead] = listing(d, dead=True)
    assert (dead["task_id"], dead["attempts"]) == ("poison", 2)
    assert dead["last_error"] == "the agent died during attempt 2"
    assert d.children()["tasks"]["restarts"] == 2  # and it stays up


# -- idempotency, pause ---------------------------------------------------------------------------


def test_a_duplicate_task_id_is_already_exists_and_a_completion_counts_once(daemon: Any) -> None:
    d = daemon(tasks_config())
    d.request("task.pause", {"id": "tasks"})
    assert add(d, {"n": 1}, task_id="order-42") == "order-42"
    for _ in range(2):  # while queued
        with pytest.raises(OtpdError) as err:
            add(d, {"n": 2}, task_id="order-42")
        assert err.value.code == "already_exists"
        assert err.value.details == {"task_id": "order-42", "state": "queued"}
    assert stats(d)["queued"] == 1
    d.request("task.resume", {"id": "tasks"})
    until_stats(d, completed_count=1)
    with pytest.raises(OtpdError) as err:  # and once completed, even after a restart
        add(d, {"n": 3}, task_id="order-42")
    assert err.value.details["state"] == "completed"
    kill_agent(d)
    with pytest.raises(OtpdError) as err:
        add(d, {"n": 4}, task_id="order-42")
    assert err.value.code == "already_exists"
    s = stats(d)
    assert (s["completed_count"], s["queued"], s["processing"]) == (1, 0, 0)
    generated = add(d, {"n": 5})  # a generated id never collides with a known one
    assert generated != "order-42"
    until_stats(d, completed_count=2)


def test_paused_accepts_adds_and_starts_nothing_until_resumed(daemon: Any, tmp_path: Path) -> None:
    d = daemon(tasks_config("tests.agents.handlers:gate", concurrency=4))
    running = Gate(tmp_path, 0)
    add(d, running.payload())
    running.running()
    d.request("task.pause", {"id": "tasks"})
    gates = [Gate(tmp_path, n) for n in range(1, 4)]
    for g in gates:
        add(d, g.payload())
    s = stats(d)  # each add was answered after its batch, where an active agent starts the task
    assert (s["status"], s["queued"], s["processing"]) == ("paused", 3, 1)
    running.release()  # a task that was running finishes while paused
    s = until_stats(d, completed_count=1)
    assert (s["queued"], s["processing"]) == (3, 0)
    assert d.request("task.resume", {"id": "tasks"}) == {"status": "active"}
    for g in gates:
        g.running()
    for g in gates:
        g.release()
    s = until_stats(d, completed_count=4)
    assert (s["status"], s["queued"], s["processing"]) == ("active", 0, 0)


# -- the whole daemon killed --------------------------------------------------------------------


def test_state_survives_sigkill_of_the_daemon(daemon: Any, tmp_path: Path) -> None:
    d = daemon(tasks_config("tests.agents.handlers:fail_unless_file", max_attempts=1))
    marker = tmp_path / "ok"
    add(d, {"file": str(tmp_path / "never")}, task_id="doomed")
    until_stats(d, dead=1)
    marker.write_text("yes")
    for i in range(5):
        add(d, {"file": str(marker)}, task_id=f"done-{i}")
    until_stats(d, completed_count=5)
    d.request("task.pause", {"id": "tasks"})
    for i in range(7):
        add(d, {"file": str(marker)}, task_id=f"later-{i}")
    before, queued, dead = stats(d), listing(d), listing(d, dead=True)
    assert (before["queued"], before["completed_count"], before["dead"], before["error_count"]) == (7, 5, 1, 1)

    d.sigkill()
    d.wait_exit()
    d2 = daemon("", config_path=d.config_path)
    assert stats(d2) == before
    assert listing(d2) == queued and listing(d2, dead=True) == dead
    with pytest.raises(OtpdError) as err:
        add(d2, {}, task_id="done-3")
    assert err.value.code == "already_exists"
    d2.request("task.resume", {"id": "tasks"})
    s = until_stats(d2, completed_count=12)
    assert (s["queued"], s["dead"]) == (0, 1)


# -- contract and config --------------------------------------------------------------------------


def test_bad_requests_are_bad_request_and_the_agent_keeps_running(daemon: Any) -> None:
    d = daemon(tasks_config())
    pid = d.pid_of("tasks")
    bad = [
        {"op": "nope"},
        {"op": "add"},  # no payload
        {"op": "add", "payload": 1, "task_id": ""},
        {"op": "add", "payload": 1, "task_id": 7},
        {"op": "list", "limit": -1},
        {"op": "list", "dead": "yes"},
        {"op": "retry"},
        {"op": "get"},
        "stats",
    ]
    for request in bad:
        with pytest.raises(OtpdError) as err:
            call(d, request)  # type: ignore[arg-type]
        assert err.value.code == "bad_request", request
    for op, code in (("retry", "not_found"), ("get", "not_found")):
        with pytest.raises(OtpdError) as err:
            call(d, {"op": op, "task_id": "missing"})
        assert err.value.code == code
    s = stats(d)
    assert s == {"queued": 0, "processing": 0, "completed_count": 0, "error_count": 0, "interrupted_count": 0,
                 "dead": 0, "status": "active", "concurrency": 4, "max_attempts": 3, "delayed": 0, "completed_kept": 0,
                 "keep_completed": 100_000}
    assert d.pid_of("tasks") == pid


def test_a_handler_that_fails_to_import_is_a_start_failure_with_a_clear_message(daemon: Any) -> None:
    # check-config finds the module without running it (a missing module is exit 2 there);
    # only the agent's process runs its code
    d = daemon(tasks_config("tests.agents.broken_handler:run") + """
[[root.children]]
id = "echo"
agent = "otpd.agents.echo:EchoAgent"
""", ready=False)
    d.log.wait_for(r"tasks: .*config_invalid.*handler 'tests.agents.broken_handler:run': cannot import "
                   r"'tests.agents.broken_handler' \(RuntimeError: this module breaks on import\)", timeout=20)


def test_limit_and_order_of_list(daemon: Any) -> None:
    d = daemon(tasks_config())
    d.request("task.pause", {"id": "tasks"})
    ids = [add(d, i) for i in range(30)]
    assert [t["task_id"] for t in listing(d, limit=5)] == ids[:5]
    assert [t["payload"] for t in listing(d, limit=30)] == list(range(30))
    assert listing(d, limit=0) == []


# -- the example handlers, directly ----------------------------------------------------------------


def test_example_handlers() -> None:
    assert jobs.echo({"a": [1, 2]}) == {"a": [1, 2]}
    import hashlib

    once = hashlib.sha256(b"abc").digest()
    assert jobs.sha256({"data": "abc"}) == {"digest": once.hex(), "rounds": 1}
    assert jobs.sha256({"data": b"abc", "rounds": 2})["digest"] == hashlib.sha256(once).hexdigest()
    out = jobs.transform({"name": "  ada   lovelace ", "tags": ["B", "a", "b", " "],
                          "text": "The engine, the ENGINE and the numbers"})
    assert out == {"name": "Ada Lovelace", "tags": ["a", "b"], "words": 7,
                   "top": ["the", "engine", "and", "numbers"]}
    with pytest.raises(RuntimeError, match="nope"):
        jobs.fail({"message": "nope"})
    assert jobs.sleep({"seconds": 0}) == {"slept": 0.0}
    with pytest.raises(ValueError):
        jobs.sha256({"rounds": 1})


# -- a rollback (store_full), driven directly --------------------------------------------------------


class FakeRuntime:
    """What TaskAgent asks of the runtime, done by hand: after_commit callbacks and worker jobs."""

    def __init__(self) -> None:
        self.after: list[Callable[[], None]] = []
        self.work: list[tuple[Any, tuple[Any, ...], Callable[[Any, BaseException | None], None]]] = []

        self.timers: dict[int, Any] = {}  # ref -> message, of the timers not fired or cancelled
        self.delays: dict[int, float] = {}  # ref -> the delay it was set with
        self.refs = itertools.count(1)
        self.stopping: str | None = None  # what Agent.stop() sets
        self.ending: int | None = None  # what Agent.end_after_commit() sets

    def run_in_worker(self, fn: Any, args: tuple[Any, ...], done: Any, workers: int) -> None:
        self.work.append((fn, args, done))

    def add_timer(self, delay_s: float, message: Any, interval: float | None) -> int:
        ref = next(self.refs)
        self.timers[ref] = message
        self.delays[ref] = delay_s
        return ref

    def fire(self, agent: Any) -> None:
        """Deliver every timer set so far (as if they all came due), in the order they were set."""
        due, self.timers = self.timers, {}
        for message in due.values():
            agent.handle_info(message)

    def cancel_timer(self, ref: int) -> None:
        self.timers.pop(ref, None)


def driven(cls: Any, agent_id: str, args: dict[str, Any], tmp_path: Path) -> tuple[Any, FakeRuntime, Any, Any]:
    """An agent of ``cls`` run by hand on a real store, its state loaded and init run:
    (agent, its FakeRuntime, its StateKeeper, the Store)."""
    from otpd.agent.state import StateKeeper
    from otpd.store.lmdb_store import Store

    rt = FakeRuntime()
    agent = cls(agent_id, args, rt)
    store = Store(tmp_path / "store")
    keeper = StateKeeper(agent, store)
    keeper.load()
    agent.init()
    return agent, rt, keeper, store



def run_to_the_end(rt: FakeRuntime, keeper: Any) -> None:
    """What the runtime does until nothing is left: commit, run the after-commit callbacks (a
    worker's start), finish the work handed out, again."""
    while True:
        keeper.commit()
        callbacks, rt.after[:] = list(rt.after), []
        for callback in callbacks:
            callback()
        if not rt.work:
            return
        fn, job_args, done = rt.work.pop(0)
        done(fn(*job_args), None)

def test_after_a_rollback_lost_moves_are_forgotten_and_lost_completions_run_again(tmp_path: Path) -> None:
    from otpd.agents.task import TaskAgent

    agent, rt, keeper, store = driven(TaskAgent, "t", {"handler": "otpd.examples.jobs:echo", "concurrency": 2},
                                      tmp_path)

    def commit_ok() -> None:  # what the runtime does after a batch: commit, then the callbacks
        keeper.commit()
        callbacks, rt.after[:] = list(rt.after), []
        for callback in callbacks:
            callback()

    def finish(index: int) -> None:
        fn, args, done = rt.work[index]
        done(fn(*args), None)

    for i in range(3):
        agent.handle_call({"op": "add", "payload": i, "task_id": f"k{i}"})
    commit_ok()
    assert [args for _, args, _ in rt.work] == [(0,), (1,)]  # two slots

    finish(0)  # k0 completes and k2 is moved to processing; then the commit fails:
    keeper.rollback()  # the runtime's rollback (store_full): back to the last commit
    rt.after.clear()  # and the callbacks of the failed batch are dropped
    assert agent.processing_tasks.get("k0") is not None and len(agent.task_queue) == 1

    agent.handle_call({"op": "add", "payload": 3, "task_id": "k3"})
    commit_ok()
    assert [args for _, args, _ in rt.work][2:] == [(0,)]  # k0 again: its completion was lost; k1 still runs
    assert agent.op_stats({})["processing"] == 2
    finished = {0}
    while len(finished) < len(rt.work):  # run every job handed out, batch by batch, to the end
        for i in range(len(rt.work)):
            if i not in finished:
                finished.add(i)
                finish(i)
        commit_ok()
    s = agent.op_stats({})
    assert (s["completed_count"], s["queued"], s["processing"]) == (4, 0, 0)
    assert [agent.op_get({"task_id": f"k{i}"})["state"] for i in range(4)] == ["completed"] * 4
    store.close()



def test_after_a_failed_completion_commit_the_task_runs_again_with_no_call_to_wake_it(tmp_path: Path) -> None:
    """The rollback puts the task back in processing on no worker; if no add, retry or
    completion came after, it stayed there until the agent restarted."""
    from otpd.agents.task import TaskAgent

    agent, rt, keeper, store = driven(TaskAgent, "t", {"handler": "otpd.examples.jobs:echo"}, tmp_path)
    agent.handle_call({"op": "add", "payload": 1, "task_id": "t1"})
    keeper.commit()
    callbacks, rt.after[:] = list(rt.after), []
    for callback in callbacks:
        callback()
    fn, args, done = rt.work.pop(0)
    done(fn(*args), None)  # it completes; the commit of that fails (store_full):
    keeper.rollback()
    rt.after.clear()
    assert agent.op_stats({})["processing"] == 1 and rt.work == []
    assert "pump" in rt.timers.values()
    rt.fire(agent)  # a second later, with nothing else happening
    keeper.commit()
    callbacks, rt.after[:] = list(rt.after), []
    for callback in callbacks:
        callback()
    assert len(rt.work) == 1, "it runs again"
    fn, args, done = rt.work.pop(0)
    done(fn(*args), None)
    keeper.commit()
    assert agent.op_stats({})["completed_count"] == 1 and agent.op_stats({})["processing"] == 0
    store.close()

def test_a_timeout_whose_commit_fails_still_ends_the_process(tmp_path: Path) -> None:
    """The process must end even when the batch that records the timeout is rolled back
    (store_full): its callbacks are dropped then, and a stuck worker would be kept for good."""
    from otpd.agents.task import TaskAgent

    agent, rt, keeper, store = driven(TaskAgent, "t", {"handler": "otpd.examples.jobs:echo", "timeout_s": 5},
                                      tmp_path)
    agent.handle_call({"op": "add", "payload": 1, "task_id": "stuck"})
    keeper.commit()
    for callback in rt.after:
        callback()  # the task's attempt starts (on a worker that never finishes here)
    rt.after.clear()
    assert agent.deadlines.keys() == {"stuck"}
    agent.deadlines["stuck"] = 0.0  # past due
    agent.handle_info("deadlines")
    assert agent.processing_tasks.get("stuck")["timed_out"] == "timed out after 5 s in attempt 1"
    keeper.rollback()  # the runtime's rollback: the commit failed
    rt.after.clear()
    assert rt.ending == 75, "the process is still told to end (EXIT_TIMEOUT), committed or not"
    agent.handle_call({"op": "add", "payload": 2, "task_id": "innocent"})  # what else that turn does
    keeper.commit()
    assert rt.after == [] and agent.op_get({"task_id": "innocent"})["state"] == "queued", \
        "nothing new starts in a process about to end: its first attempt would die with it"
    store.close()


def test_an_attempt_past_its_timeout_ends_the_agent_and_the_other_running_task_keeps_its_attempt(
        daemon: Any, tmp_path: Path) -> None:
    d = daemon(tasks_config("tests.agents.handlers:gate", concurrency=2, max_attempts=2))
    hangs, waits = Gate(tmp_path, 1), Gate(tmp_path, 2)
    d.request("task.add", {"id": "tasks", "payload": hangs.payload(), "task_id": "hangs", "timeout_s": 0.5})
    add(d, waits.payload(), task_id="waits")  # no timeout (the config sets none)
    for attempt in (1, 2):
        hangs.running()
        waits.running()
        pid = d.pid_of("tasks")
        d.wait("tasks", "running", not_pid=pid, timeout=20)  # the timeout ended the process
        hangs.drop()
        waits.drop()
        d.log.wait_for(rf"task 'hangs' timed out after 0.5 s in attempt {attempt}")
    waits.running()  # its third run, still its first attempt: the timeouts were not its fault
    [task] = listing(d)
    assert (task["task_id"], task["attempts"]) == ("waits", 1)
    waits.release()
    until_stats(d, completed_count=1, dead=1)
    dead = call(d, {"op": "get", "task_id": "hangs"})
    assert dead["state"] == "dead" and dead["attempts"] == 2
    assert "timed out after 0.5 s in attempt 2" in dead["last_error"]
    assert call(d, {"op": "get", "task_id": "waits"})["state"] == "completed"


def test_timeouts_that_are_not_a_number_of_seconds_are_refused(daemon: Any) -> None:
    d = daemon(tasks_config())
    for bad in (-1, "5", True, float("nan")):
        with pytest.raises(OtpdError) as err:
            d.request("task.add", {"id": "tasks", "payload": 1, "timeout_s": bad})
        assert err.value.code == "bad_request" and "timeout_s" in err.value.message
    assert stats(d)["queued"] == 0



def test_task_ops_go_only_to_task_agents(daemon: Any) -> None:
    """``task.retry echo x`` reached the EchoAgent, which echoed it: otpctl said "x queued
    again". The daemon refuses task ops to an agent that is not a TaskAgent."""
    d = daemon(tasks_config() + '\n[[root.children]]\nid = "echo"\nagent = "otpd.agents.echo:EchoAgent"\n')
    for op, args in (("task.add", {"payload": 1}), ("task.retry", {"task_id": "x"}), ("task.list", {})):
        with pytest.raises(OtpdError) as err:
            d.request(op, {"id": "echo", **args})
        assert err.value.code == "bad_request" and "not a TaskAgent" in err.value.message
    assert add(d, 1) and stats(d)["completed_count"] >= 0

def test_otpctl_task_add_takes_a_timeout(daemon: Any) -> None:
    d = daemon(tasks_config())
    d.request("task.pause", {"id": "tasks"})
    out = run_cli("otpctl", "--socket", str(d.socket), "task", "add", "tasks", '{"x": 1}', "--task-id", "t1",
                  "--task-timeout", "2.5")
    assert out.returncode == 0 and "queued t1" in out.stdout, out
    [task] = listing(d)
    assert (task["task_id"], task["timeout_s"]) == ("t1", 2.5)
    out = run_cli("otpctl", "--socket", str(d.socket), "task", "add", "tasks", "1", "--task-timeout", "-3")
    assert out.returncode == 1 and "bad_request" in out.stderr and "timeout_s" in out.stderr, out


def test_only_the_last_keep_completed_ids_are_remembered_and_the_store_stays_bounded(tmp_path: Path) -> None:
    """Completed ids are the idempotency keys of adds; past keep_completed the oldest are
    forgotten, one record each, as newer ones complete (a restart keeps the window)."""
    from otpd.agent.state import StateKeeper
    from otpd.agents.task import TaskAgent
    from otpd.store import tools

    args = {"handler": "otpd.examples.jobs:echo", "concurrency": 1, "keep_completed": 3}
    agent, rt, keeper, store = driven(TaskAgent, "t", args, tmp_path)

    def run_all() -> None:
        run_to_the_end(rt, keeper)

    for i in range(5):
        agent.handle_call({"op": "add", "payload": i, "task_id": f"k{i}"})
    run_all()
    assert agent.op_stats({})["completed_count"] == 5 and agent.op_stats({})["completed_kept"] == 3
    for i in (0, 1):
        with pytest.raises(OtpdError) as err:
            agent.op_get({"task_id": f"k{i}"})
        assert err.value.code == "not_found"
    for i in (2, 3, 4):
        assert agent.op_get({"task_id": f"k{i}"})["state"] == "completed"
        with pytest.raises(OtpdError) as err:
            agent.handle_call({"op": "add", "payload": 0, "task_id": f"k{i}"})
        assert err.value.code == "already_exists"
    keys = tools.show(store, "t")["items"]
    assert sorted(k for k, _ in keys["task_ids"]) == ["k2", "k3", "k4"] and len(keys["completed_ids"]) == 3

    # a forgotten id added again is a new task, and takes its new place in the window
    agent.handle_call({"op": "add", "payload": 9, "task_id": "k0"})
    run_all()
    for i in range(5, 7):
        agent.handle_call({"op": "add", "payload": i, "task_id": f"k{i}"})
    run_all()
    assert [agent._state(f"k{i}") for i in (0, 5, 6)] == ["completed"] * 3
    assert [agent._state(f"k{i}") for i in (2, 3, 4)] == [None] * 3 and agent.op_stats({})["completed_count"] == 8

    # the window survives a restart: the same records, read again
    store.close()
    again = TaskAgent("t", args, FakeRuntime())
    store = type(store)(tmp_path / "store")
    StateKeeper(again, store).load()
    again.init()
    assert again.op_stats({})["completed_kept"] == 3 and again._state("k0") == "completed"
    assert again._state("k4") is None
    store.close()




def test_a_task_id_is_limited_in_bytes_not_characters(tmp_path: Path) -> None:
    """256 two-byte characters are 512 bytes: more than LMDB takes in a key."""
    from otpd.agents.task import TaskAgent

    agent, rt, keeper, store = driven(TaskAgent, "t", {"handler": "otpd.examples.jobs:echo"}, tmp_path)
    with pytest.raises(OtpdError) as err:
        agent.handle_call({"op": "add", "payload": 1, "task_id": "é" * 129})
    assert err.value.code == "bad_request" and "256 bytes" in err.value.message
    assert agent.handle_call({"op": "add", "payload": 1, "task_id": "é" * 128})["task_id"] == "é" * 128
    keeper.commit()
    store.checkpoint()  # LMDB takes it
    store.close()

def test_a_lowered_keep_completed_is_reached_in_bounded_steps_not_one_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restarted with a lower keep_completed (a reload restarts the agent with its new args),
    the extra ids are forgotten a chunk per turn of the loop, each chunk its own commit, and
    then two per completion: never all of them in one transaction."""
    from otpd.agent.state import StateKeeper
    from otpd.agents import task as task_module
    from otpd.agents.task import TaskAgent
    from otpd.store import tools

    args = {"handler": "otpd.examples.jobs:echo", "concurrency": 1, "keep_completed": 100}
    agent, rt, keeper, store = driven(TaskAgent, "t", args, tmp_path)
    for i in range(10):
        agent.handle_call({"op": "add", "payload": i, "task_id": f"k{i}"})
    run_to_the_end(rt, keeper)
    store.close()

    monkeypatch.setattr(task_module, "FORGET_CHUNK", 3)
    rt = FakeRuntime()
    again = TaskAgent("t", {**args, "keep_completed": 2}, rt)
    store = type(store)(tmp_path / "store")
    keeper = StateKeeper(again, store)
    keeper.load()
    again.init()
    assert list(rt.timers.values()) == ["forget"] and again.op_stats({})["completed_kept"] == 10
    kept = []
    while rt.timers:
        rt.fire(again)
        keeper.commit()
        callbacks, rt.after[:] = list(rt.after), []
        for callback in callbacks:  # the next chunk is armed once this one is saved
            callback()
        kept.append(len(tools.show(store, "t")["items"]["completed_ids"]))
    assert kept == [7, 4, 2], "three commits of at most 3 forgotten ids each"
    assert [again._state(f"k{i}") for i in range(10)] == [None] * 8 + ["completed"] * 2
    store.close()

def test_a_failed_attempt_waits_out_a_doubling_capped_backoff_that_survives_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from otpd.agent.state import StateKeeper
    from otpd.agents import task as task_module
    from otpd.agents.task import TaskAgent

    clock = [1_000_000.0]
    monkeypatch.setattr(task_module.time, "time", lambda: clock[0])
    args = {"handler": "tests.agents.handlers:fail_unless_file", "max_attempts": 5, "retry_delay_s": 10,
            "retry_delay_max_s": 25}
    agent, rt, keeper, store = driven(TaskAgent, "t", args, tmp_path)

    def settle() -> None:  # commit, then what waited for it (the worker's start)
        keeper.commit()
        callbacks, rt.after[:] = list(rt.after), []
        for callback in callbacks:
            callback()

    def fail_once() -> None:
        fn, job_args, done = rt.work.pop(0)
        with pytest.raises(Exception) as err:
            fn(*job_args)
        done(None, err.value)
        settle()

    gate = tmp_path / "gate"
    agent.handle_call({"op": "add", "payload": {"file": str(gate)}, "task_id": "x"})
    settle()
    waits = []
    for _attempt in (1, 2, 3):
        fail_once()
        assert agent.op_get({"task_id": "x"})["state"] == "delayed" and not rt.work
        assert agent.op_stats({})["delayed"] == 1 and agent.op_stats({})["queued"] == 0
        (ref,) = rt.timers
        waits.append(rt.delays[ref])
        assert agent.op_get({"task_id": "x"})["not_before"] == clock[0] + waits[-1]
        rt.fire(agent)  # early: nothing moves, the timer is set again
        assert agent.op_get({"task_id": "x"})["state"] == "delayed" and len(rt.timers) == 1
        clock[0] += waits[-1]
        rt.fire(agent)  # due: back in the queue, and started
        settle()
        assert agent.op_get({"task_id": "x"})["state"] == "processing" and len(rt.work) == 1
    assert waits == [10, 20, 25]  # doubling, capped

    fail_once()  # a fourth failure: delayed 25 s, then the agent restarts
    assert [t["task_id"] for t in agent.op_list({})["tasks"]] == ["x"]
    store.close()
    again = TaskAgent("t", args, FakeRuntime())
    store = type(store)(tmp_path / "store")
    StateKeeper(again, store).load()
    again.init()
    assert again.op_get({"task_id": "x"})["state"] == "delayed"
    (ref,) = again._rt().timers
    assert again._rt().delays[ref] == 25
    clock[0] += 25
    gate.touch()
    again._rt().fire(again)
    assert again.op_get({"task_id": "x"})["state"] == "processing"
    store.close()


def test_a_delayed_retry_runs_on_the_agents_own_timer_and_survives_a_kill(daemon: Any, tmp_path: Path) -> None:
    """With a real runtime: the failed task waits out its delay as ``delayed`` (across a
    SIGKILL of the agent), then runs again and completes."""
    d = daemon(tasks_config("tests.agents.handlers:fail_unless_file", max_attempts=10).replace(
        "max_attempts = 10 }", "max_attempts = 10, retry_delay_s = 0.5, retry_delay_max_s = 0.5 }"))
    gate = tmp_path / "gate"
    task_id = add(d, {"file": str(gate)})
    poll(lambda: d.request("task.get", {"id": "tasks", "task_id": task_id}), lambda t: t["state"] == "delayed")
    kill_agent(d)
    got = d.request("task.get", {"id": "tasks", "task_id": task_id})
    assert got["state"] in ("delayed", "processing", "queued") and got["attempts"] >= 1
    gate.touch()
    until_stats(d, completed_count=1, delayed=0, queued=0, processing=0)
    assert d.request("task.get", {"id": "tasks", "task_id": task_id})["state"] == "completed"


def test_released_delays_a_rollback_undoes_are_delayed_again_under_a_timer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch that moved due tasks back to the queue fails to commit (store_full): they are
    in ``delayed`` again on disk, and must get their timer again, with no other event to come."""
    from otpd.agents import task as task_module
    from otpd.agents.task import TaskAgent

    clock = [1_000_000.0]
    monkeypatch.setattr(task_module.time, "time", lambda: clock[0])
    args = {"handler": "tests.agents.handlers:fail_unless_file", "max_attempts": 5, "retry_delay_s": 10}
    agent, rt, keeper, store = driven(TaskAgent, "t", args, tmp_path)

    def settle() -> None:
        keeper.commit()
        callbacks, rt.after[:] = list(rt.after), []
        for callback in callbacks:
            callback()

    agent.handle_call({"op": "add", "payload": {"file": str(tmp_path / "gate")}, "task_id": "x"})
    settle()
    fn, job_args, done = rt.work.pop(0)
    done(None, RuntimeError("failed"))
    settle()
    assert agent.op_get({"task_id": "x"})["state"] == "delayed"
    clock[0] += 10
    rt.fire(agent)  # released: moved to processing, not yet committed; the commit fails:
    assert agent.op_get({"task_id": "x"})["state"] == "processing"
    keeper.rollback()
    rt.after.clear()
    assert agent.op_get({"task_id": "x"})["state"] == "delayed"
    assert sorted(rt.timers.values()) == ["pump", "retries"]  # (the pump: for processing left on no worker)
    rt.fire(agent)  # its timer: due already, so it runs
    settle()
    assert agent.op_get({"task_id": "x"})["state"] == "processing" and len(rt.work) == 1
    store.close()


def test_a_backoff_stops_doubling_long_before_it_could_overflow(tmp_path: Path) -> None:
    from otpd.agents.task import TaskAgent

    agent, rt, keeper, store = driven(TaskAgent, "t", {"handler": "otpd.examples.jobs:echo", "retry_delay_s": 1,
                                                       "retry_delay_max_s": 7}, tmp_path)
    agent._delay({"id": "x", "attempts": 5000, "payload": None})  # 2.0 ** 4999 would be OverflowError
    assert rt.delays[next(iter(rt.timers))] == pytest.approx(7, abs=0.5)
    store.close()
