"""TaskAgent: a persistent task queue run by a handler, at least once, with a dead-letter list.

The seed design's TaskAgent (``task_queue``, ``processing_tasks``,
``completed_count``, ``error_count``, ``status``), with its state on disk::

    [[root.children]]
    id = "tasks"
    agent = "otpd.agents.task:TaskAgent"
    args = { handler = "otpd.examples.jobs:echo", concurrency = 4, max_attempts = 3 }

Args: ``handler`` (``module:function``, imported in the agent's process when it
starts; ``fn(payload) -> result``, run on the runtime's worker threads),
``concurrency`` (tasks run at once, default 4), ``max_attempts`` (default 3),
``timeout_s`` (how long one attempt may run, default 0: no limit; an ``add`` may set its own),
``keep_completed`` (how many completed ids are remembered, default 100,000; see below),
``retry_delay_s`` (default 0: a failed attempt goes back to the queue at once) and
``retry_delay_max_s`` (default 300): after its k-th failed attempt a task waits
``min(retry_delay_s * 2**(k-1), retry_delay_max_s)`` seconds before it is queued again.

Calls (``otpctl task ...`` forwards to them)::

    {"op": "add", "payload": X, "task_id": "optional", "timeout_s": S} -> {"task_id": id}
    {"op": "stats"}                 -> {"queued", "processing", "completed_count", "error_count",
                                        "interrupted_count", "dead", "status", "concurrency", "max_attempts"}
    {"op": "list", "dead": false, "limit": 100} -> {"tasks": [...]}  (processing, queued, delayed; or dead letters)
    {"op": "get", "task_id": id}    -> {"task_id", "state": queued|processing|delayed|completed|dead, ...}
    {"op": "retry", "task_id": id}  -> {"task_id", "state": "queued"}   (a dead letter, attempts reset)
    {"op": "pause"} / {"op": "resume"} -> {"status": ...}

Guarantees:

* An ``add`` is answered after the task is on disk (the runtime commits before it replies).
  A task id is an idempotency key: adding an id the agent knows (queued, processing, completed
  or dead) is ``already_exists``, so a client that lost a reply can simply add again.
* Write before act: a task moves queue -> ``processing_tasks`` (attempts + 1) and is handed to a
  worker only after that move is committed (``after_commit``).
* At least once: every task found in ``processing_tasks`` when the agent starts was running when
  the previous process died.  That attempt counts: the task runs again with attempts + 1, or goes
  to the dead letters if it had used its ``max_attempts`` (a task that kills its agent cannot
  crash-loop it).
* A clean stop (``otpctl stop|restart``, daemon shutdown) interrupts the running tasks without
  using up their attempt: they run again at the next start with the same attempt number.
* A failure (the handler raised) below ``max_attempts`` goes back to the queue's tail, at once
  or, with ``retry_delay_s``, once its backoff is over: meanwhile it is ``delayed`` (its own
  record, with ``not_before`` in wall-clock time, so the wait survives a restart); at
  ``max_attempts`` the task goes to the dead letters with its last error.
* A completion removes the task from processing and is counted once (the id's state becomes
  ``completed``; results are not kept).  The last ``keep_completed`` completed ids are
  remembered (one record each, in completion order); an older one is forgotten as a newer one
  completes, so the store stays bounded: its ``get`` is ``not_found`` and an ``add`` of it is a
  new task.  The idempotency of a retried ``add`` holds within that window.  A lowered
  ``keep_completed`` is reached a step at a time: 1,000 ids per turn of the loop, each its own
  commit, never every extra id in one transaction.
* Paused: adds are accepted and queued, nothing new starts (running tasks finish).
* A timeout: a thread cannot be stopped, so an attempt past its ``timeout_s`` ends the
  agent's process (let it crash: the supervisor restarts it, with its intensity).  The attempt
  counts, like any attempt the agent died in, and its last error says it timed out; the other
  tasks that were running get their attempt back, as at a clean stop.

Every collection is one LMDB record per task, so adding, starting or finishing a task writes
O(1) records whatever the queue's length, and a restart reads only the markers and the
(at most ``concurrency``) tasks that were processing.
"""

from __future__ import annotations

import time
from typing import Any

from otpd.agent.base import Agent
from otpd.agent.state import PersistentMap, PersistentQueue
from otpd.agents import check_handler, error_text, handler_parts, int_arg, load_handler, timeout_arg, unknown_args
from otpd.errors import OtpdError
from otpd.posix import system

DEFAULT_LIMIT = 100
DEFAULT_KEEP_COMPLETED = 100_000
RESYNC_S = 1.0  # after a failed commit, the tasks it left on no worker start again this much later
FORGET_CHUNK = 1000  # completed ids forgotten per turn of the loop when over keep_completed
MAX_LIMIT = 100_000


class TaskAgent(Agent):
    # 2: completed ids are ["completed", place] (and forgotten past keep_completed), and
    # failed tasks may wait in ``delayed``: code at version 1 would misread both, so it is
    # refused such a record (store_corrupt, nothing deleted) rather than run on it.
    state_version = 2
    migrations = {1: lambda state: state}  # nothing to change: the new collections start empty
    config_args = ("handler",)  # which code runs is the config's: an add to a dynamic supervisor cannot choose it
    fields = {"completed_count": 0, "error_count": 0, "interrupted_count": 0, "status": "active", "next_id": 1}
    persistent_fields = ("completed_count", "error_count", "interrupted_count", "status", "next_id")
    collections = {
        "task_queue": PersistentQueue,     # tasks waiting, FIFO: {id, payload, attempts, added_at, last_error?}
        "processing_tasks": PersistentMap,  # task_id -> task (attempts counts the running one)
        "dead_letters": PersistentMap,      # task_id -> task with last_error, attempts, dead_at
        "task_ids": PersistentMap,          # task_id -> "pending" (queued or processing) | "dead"
                                            # | ["completed", n] (n: its place in completed_ids)
        "completed_ids": PersistentQueue,   # the ids completed, oldest first: the last keep_completed
        "delayed": PersistentMap,           # task_id -> task waiting out its retry delay (not_before)
    }

    task_queue: PersistentQueue
    processing_tasks: PersistentMap
    dead_letters: PersistentMap
    task_ids: PersistentMap
    completed_ids: PersistentQueue
    delayed: PersistentMap
    completed_count: int
    error_count: int
    interrupted_count: int
    status: str
    next_id: int

    # -- start ------------------------------------------------------------------

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        check_handler(cls._settings(args)[0])

    @classmethod
    def check_template_args(cls, args: dict[str, Any]) -> None:
        cls.check_args(args)  # the handler, a config_arg, is the template's: so all of it is there

    @staticmethod
    def _settings(args: dict[str, Any]) -> tuple[str, int, int, float, int, float, float]:
        """(handler, concurrency, max_attempts, timeout_s, keep_completed, retry_delay_s,
        retry_delay_max_s) from the args, or ``config_invalid``."""
        unknown_args(args, {"handler", "concurrency", "max_attempts", "timeout_s", "keep_completed", "retry_delay_s",
                            "retry_delay_max_s"}, "TaskAgent")
        if "handler" not in args:
            raise OtpdError("config_invalid", 'TaskAgent needs args.handler = "module:function"')
        handler_parts(args["handler"])
        return (args["handler"], int_arg(args, "concurrency", 4, 1), int_arg(args, "max_attempts", 3, 1),
                timeout_arg(args.get("timeout_s", 0), "timeout_s", "config_invalid"),
                int_arg(args, "keep_completed", DEFAULT_KEEP_COMPLETED, 0),
                timeout_arg(args.get("retry_delay_s", 0), "retry_delay_s", "config_invalid"),
                timeout_arg(args.get("retry_delay_max_s", 300), "retry_delay_max_s", "config_invalid"))

    def init(self) -> None:
        (handler, self.concurrency, self.max_attempts, self.timeout_s, self.keep_completed, self.retry_delay_s,
         self.retry_delay_max_s) = self._settings(self.args)
        self.handler = load_handler(handler)
        self.due: dict[str, float] = {}  # delayed task -> its not_before (wall clock), as in ``delayed``
        self.retry_alarm: tuple[float, int] | None = None  # (due, timer ref) of the one retry timer
        self.scheduled: set[str] = set()  # moved to processing, handed to a worker once committed
        self.submitted: set[str] = set()  # on a worker now
        self.deadlines: dict[str, float] = {}  # task on a worker -> when its attempt times out
        self.alarm: tuple[float, int] | None = None  # (due, timer ref) of the one deadline timer
        self.resync = False
        self.loaded = self.processing_tasks  # a rollback (store_full) loads new collection objects
        self.exiting = False  # a timeout is ending this process: nothing new starts
        if len(self.completed_ids) > self.keep_completed:  # lowered since they were kept
            self.send_after(0, "forget")
        # Whatever is in processing was running when the last process died: that attempt counts.
        again = []
        for task_id, task in list(self.processing_tasks.items()):
            self.interrupted_count += 1
            timed_out = task.pop("timed_out", None)
            if task["attempts"] >= self.max_attempts:
                self.processing_tasks.pop(task_id)
                task["last_error"] = timed_out or f"the agent died during attempt {task['attempts']}"
                self._bury(task)
            else:
                if timed_out:
                    task["last_error"] = timed_out
                task["attempts"] += 1
                task["started_at"] = time.time()
                self.processing_tasks[task_id] = task
                again.append(task)
        if again:
            self._schedule(again)
        self._load_delays()
        self._pump()

    def terminate(self, reason: str) -> None:
        """A clean stop interrupts the running tasks through no fault of theirs: give their attempt
        back (the next start counts one again when it re-runs them)."""
        self._give_back()

    def _give_back(self, but: str | None = None) -> None:
        """The running tasks (but ``but``) are interrupted through no fault of theirs."""
        for task_id, task in list(self.processing_tasks.items()):
            if task_id != but:
                task["attempts"] = max(0, task["attempts"] - 1)
                self.processing_tasks[task_id] = task

    def on_rollback(self) -> None:
        # What was scheduled is in the queue again, and a completion may have been undone.
        self.resync = True
        # Tasks released from their delay may be delayed again: their timer, set again now
        # (no other event may come to run the resync).
        self.retry_alarm = None
        self._load_delays()
        # And tasks back in processing, on no worker, run again even if no call comes: a
        # second later, not at once (the store may still be full: no loop of failing commits).
        self.send_after(RESYNC_S, "pump")
        if len(self.completed_ids) > self.keep_completed:  # a chunk of forgetting was undone
            self.send_after(RESYNC_S, "forget")

    # -- calls --------------------------------------------------------------------

    def handle_call(self, request: Any) -> Any:
        return self.dispatch_op(request)

    def op_add(self, request: dict[str, Any]) -> Any:
        if "payload" not in request:
            raise OtpdError("bad_request", "missing 'payload'")
        task_id = request.get("task_id")
        if task_id is None:
            task_id = self._new_id()
        elif not isinstance(task_id, str) or not task_id or len(task_id.encode("utf-8", "surrogatepass")) > 256:
            raise OtpdError("bad_request", "task_id must be a non-empty string of at most 256 bytes (UTF-8)")
        else:
            state = self._state(task_id)
            if state is not None:
                raise OtpdError("already_exists", f"task {task_id!r} exists ({state})",
                                {"task_id": task_id, "state": state})
        task = {"id": task_id, "payload": request["payload"], "attempts": 0, "added_at": time.time()}
        if "timeout_s" in request:
            task["timeout_s"] = timeout_arg(request["timeout_s"], "timeout_s", "bad_request")
        self.task_queue.append(task)
        self.task_ids[task_id] = "pending"
        self._pump()
        return {"task_id": task_id}

    def op_stats(self, request: dict[str, Any]) -> Any:
        return {
            "queued": len(self.task_queue),
            "processing": len(self.processing_tasks),
            "completed_count": self.completed_count,
            "error_count": self.error_count,
            "interrupted_count": self.interrupted_count,
            "dead": len(self.dead_letters),
            "status": self.status,
            "concurrency": self.concurrency,
            "max_attempts": self.max_attempts,
            "delayed": len(self.due),
            "completed_kept": len(self.completed_ids),
            "keep_completed": self.keep_completed,
        }

    def op_list(self, request: dict[str, Any]) -> Any:
        dead = request.get("dead", False)
        limit = request.get("limit", DEFAULT_LIMIT)
        if not isinstance(dead, bool):
            raise OtpdError("bad_request", "'dead' must be true or false")
        if type(limit) is not int or not 0 <= limit <= MAX_LIMIT:
            raise OtpdError("bad_request", f"'limit' must be an integer from 0 to {MAX_LIMIT}")
        tasks: list[dict[str, Any]] = []
        if dead:
            for _task_id, task in self.dead_letters.items():
                if len(tasks) >= limit:
                    break
                tasks.append(self._view(task, "dead"))
            return {"tasks": tasks}
        for _task_id, task in self.processing_tasks.items():
            if len(tasks) >= limit:
                break
            tasks.append(self._view(task, "processing"))
        for offset in range(min(len(self.task_queue), limit - len(tasks))):
            tasks.append(self._view(self.task_queue.peek(offset), "queued"))
        for task_id in sorted(self.due, key=self.due.__getitem__)[:max(0, limit - len(tasks))]:
            task = self.delayed.get(task_id)
            if task is not None:
                tasks.append(self._view(task, "delayed"))
        return {"tasks": tasks}

    def op_get(self, request: dict[str, Any]) -> Any:
        task_id = self._task_id(request)
        state = self._state(task_id)
        if state is None:
            raise OtpdError("not_found", f"no task {task_id!r}", {"task_id": task_id})
        task = None
        if state == "processing":
            task = self.processing_tasks.get(task_id)
        elif state == "dead":
            task = self.dead_letters.get(task_id)
        elif state == "delayed":
            task = self.delayed.get(task_id)
        out = self._view(task, state) if task is not None else {"state": state}
        out["task_id"] = task_id
        return out

    def op_retry(self, request: dict[str, Any]) -> Any:
        task_id = self._task_id(request)
        task = self.dead_letters.get(task_id)
        if task is None:
            raise OtpdError("not_found", f"no dead task {task_id!r}", {"task_id": task_id,
                            "state": self._state(task_id)})
        del self.dead_letters[task_id]
        task["attempts"] = 0
        task.pop("dead_at", None)
        task.pop("started_at", None)
        self.task_queue.append(task)
        self.task_ids[task_id] = "pending"
        self._pump()
        return {"task_id": task_id, "state": self._state(task_id)}

    def op_pause(self, request: dict[str, Any]) -> Any:
        self.status = "paused"
        return {"status": self.status}

    def op_resume(self, request: dict[str, Any]) -> Any:
        self.status = "active"
        self._pump()
        return {"status": self.status}

    # -- running tasks --------------------------------------------------------------

    def _pump(self) -> None:
        """Start queued tasks while a slot is free: the move is committed before the work starts."""
        if self.exiting:
            return
        if self.resync or self.processing_tasks is not self.loaded:
            self._resync()
        if self.status != "active":
            return
        started: list[dict[str, Any]] = []
        while len(self.scheduled) + len(self.submitted) + len(started) < self.concurrency and self.task_queue:
            task = self.task_queue.popleft()
            task["attempts"] = task.get("attempts", 0) + 1
            task["started_at"] = time.time()
            self.processing_tasks[task["id"]] = task  # task_ids stays "pending": one write less per task
            started.append(task)
        if started:
            self._schedule(started)

    def _schedule(self, tasks: list[dict[str, Any]]) -> None:
        ids = [task["id"] for task in tasks]
        self.scheduled.update(ids)
        payloads = [(task["id"], task["payload"]) for task in tasks]
        self.after_commit(lambda: self._submit(payloads))

    def _submit(self, payloads: list[tuple[str, Any]]) -> None:
        for task_id, payload in payloads:
            self.scheduled.discard(task_id)
            self.submitted.add(task_id)
            self.run_in_worker(self.handler, payload, done=lambda result, error, t=task_id:
                               self._finished(t, error), workers=self.concurrency)
            task = self.processing_tasks.get(task_id)
            timeout = task.get("timeout_s", self.timeout_s) if task is not None else 0
            if timeout:
                self.deadlines[task_id] = time.monotonic() + timeout
        self._arm()

    def _arm(self) -> None:
        """One timer, for the earliest deadline of the attempts running now (at most
        ``concurrency`` of them, so a busy queue does not pile up timers)."""
        self.alarm = self._earliest(self.alarm, self.deadlines, time.monotonic(), "deadlines")

    def _earliest(self, alarm: tuple[float, int] | None, dues: dict[str, float], now: float,
                  message: str) -> tuple[float, int] | None:
        """The one timer (due, ref) for the earliest of ``dues`` (times on the clock that gave
        ``now``): ``alarm`` if it comes first already, else a new one in its place."""
        if not dues:
            return alarm
        due = min(dues.values())
        if alarm is not None:
            if alarm[0] <= due:
                return alarm
            self.cancel_timer(alarm[1])
        return due, self.send_after(max(0.0, due - now), message)

    def handle_info(self, message: Any) -> None:
        if message == "retries":
            self._release_delays()
        elif message == "pump":
            self._pump()
        elif message == "forget":
            if self._forget_completed(FORGET_CHUNK):  # the next chunk once this one is saved
                self.after_commit(lambda: self.send_after(0, "forget"))  # (dropped if its commit fails)
        elif message == "deadlines":
            self.alarm = None
            now = time.monotonic()
            late = [task_id for task_id, due in self.deadlines.items() if due <= now]
            if late:
                self._timed_out(late[0])
            else:
                self._arm()

    def _timed_out(self, task_id: str) -> None:
        """Its attempt is still running past its timeout: its thread cannot be stopped, so the
        process ends once this is committed, and the next start sees why."""
        task = self.processing_tasks.get(task_id)
        if task is None:  # not ours to record any more (a rollback put it back in the queue)
            self.deadlines.pop(task_id, None)
            self._arm()
            return
        attempt, timeout = task["attempts"], task.get("timeout_s", self.timeout_s)
        task["timed_out"] = f"timed out after {timeout:g} s in attempt {attempt}"
        self.processing_tasks[task_id] = task
        self._give_back(but=task_id)  # as at a clean stop
        self.log(f"task {task_id!r} {task['timed_out']}; ending this process to free its worker")
        # Before any new input is read (a task started meanwhile would die in its first
        # attempt), even if the commit fails: a stuck worker must not hold its slot for good.
        # Until then nothing new starts (another timer of this turn could start a task).
        self.exiting = True
        self.end_after_commit(system.EXIT_TIMEOUT)

    def _finished(self, task_id: str, error: BaseException | None) -> None:
        """On the agent's loop: record the outcome (committed with the rest of this batch)."""
        self.submitted.discard(task_id)
        self.deadlines.pop(task_id, None)
        task = self.processing_tasks.get(task_id)
        if task is None:  # cannot happen without a rollback; then the outcome is not ours to record
            self._pump()
            return
        del self.processing_tasks[task_id]
        if error is None:
            self._completed(task_id)
        else:
            self.error_count += 1
            task["last_error"] = error_text(error)
            task.pop("started_at", None)
            if task["attempts"] >= self.max_attempts:
                self._bury(task)
            elif self.retry_delay_s:
                self._delay(task)
            else:
                self.task_queue.append(task)
        self._pump()

    # -- retry delays ------------------------------------------------------------------

    def _delay(self, task: dict[str, Any]) -> None:
        """Hold a failed task for its backoff (doubling per failed attempt, capped)."""
        doublings = min(max(0, task["attempts"] - 1), 60)  # (2.0 ** 1025 overflows; the cap is long reached)
        wait = min(self.retry_delay_s * 2.0 ** doublings, self.retry_delay_max_s)
        task["not_before"] = time.time() + wait
        self.delayed[task["id"]] = task
        self.due[task["id"]] = task["not_before"]
        self._arm_retries()

    def _load_delays(self) -> None:
        """What ``delayed`` holds (at start, or after a rollback reloaded it), and its timer."""
        self.due = {task_id: float(task.get("not_before", 0)) for task_id, task in self.delayed.items()}
        self._arm_retries()

    def _arm_retries(self) -> None:
        """One timer, for the earliest end of a backoff (wall clock: ``not_before`` outlives the process)."""
        self.retry_alarm = self._earliest(self.retry_alarm, self.due, time.time(), "retries")

    def _release_delays(self) -> None:
        """The tasks whose backoff is over go back to the queue's tail, earliest first."""
        self.retry_alarm = None
        if self.resync or self.processing_tasks is not self.loaded:
            self._resync()  # after a rollback (whose on_rollback reloaded ``due``)
        now = time.time()
        for task_id in sorted((t for t, at in self.due.items() if at <= now), key=self.due.__getitem__):
            del self.due[task_id]
            task = self.delayed.pop(task_id, None)
            if task is not None:
                task.pop("not_before", None)
                self.task_queue.append(task)
        self._arm_retries()
        self._pump()

    def _completed(self, task_id: str) -> None:
        """Count it, remember its id, and forget the oldest ids past ``keep_completed``: O(1)."""
        place = self.completed_ids.tail
        self.completed_ids.append(task_id)
        self.task_ids[task_id] = ["completed", place]
        self.completed_count += 1
        self._forget_completed(2)

    def _forget_completed(self, most: int) -> bool:
        """Forget up to ``most`` of the oldest ids past ``keep_completed``; True if more are left.
        Bounded, so that a ``keep_completed`` lowered by a reload (or a restart with new args) is
        reached a step at a time (a timer's chunks, two per completion) instead of as one
        commit of every extra id."""
        while most > 0 and len(self.completed_ids) > self.keep_completed:
            old_place, old = self.completed_ids.head, self.completed_ids.popleft()
            if self.task_ids.get(old) == ["completed", old_place]:  # not added (and completed) again since
                del self.task_ids[old]
            most -= 1
        return len(self.completed_ids) > self.keep_completed

    def _bury(self, task: dict[str, Any]) -> None:
        task["dead_at"] = time.time()
        task.pop("started_at", None)
        self.dead_letters[task["id"]] = task
        self.task_ids[task["id"]] = "dead"
        self.log(f"task {task['id']!r} dead after {task['attempts']} attempts: "
             f"{task.get('last_error')}")

    def _resync(self) -> None:
        """After a rollback: re-run what is in processing but on no worker (its outcome was lost)."""
        self.resync = False
        self.loaded = self.processing_tasks
        self.scheduled.clear()  # their move was not committed: they are queued again
        again = []
        for task_id, task in list(self.processing_tasks.items()):
            if task_id not in self.submitted:
                again.append(task)
        if again:
            self._schedule(again)

    # -- helpers ---------------------------------------------------------------------

    def _state(self, task_id: str) -> str | None:
        """queued | processing | completed | dead, or None for an unknown id."""
        state = self.task_ids.get(task_id)
        if state == "pending":
            if task_id in self.processing_tasks:
                return "processing"
            return "delayed" if task_id in self.due else "queued"
        if isinstance(state, list):  # ["completed", place]; a bare "completed" before keep_completed
            return "completed"
        return state  # type: ignore[no-any-return]

    def _new_id(self) -> str:
        while True:
            task_id = f"t{self.next_id}"
            self.next_id += 1
            if task_id not in self.task_ids:
                return task_id

    @staticmethod
    def _task_id(request: dict[str, Any]) -> str:
        task_id = request.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise OtpdError("bad_request", "missing 'task_id' (a string)")
        return task_id

    @staticmethod
    def _view(task: dict[str, Any], state: str) -> dict[str, Any]:
        out = {"task_id": task["id"], "state": state, "attempts": task.get("attempts", 0),
               "payload": task.get("payload")}
        for key in ("added_at", "started_at", "dead_at", "timeout_s", "last_error", "not_before"):
            if task.get(key) is not None:
                out[key] = task[key]
        return out

