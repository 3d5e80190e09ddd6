"""WorkflowProcess: one OS process per workflow, its state saved after every step.

A definition is ``{"steps": [{"handler": "module:function", "args": {...}, "name": "..."}, ...],
"metadata": {...}}``.  A step handler is ``fn(args, results) -> result``: it receives its own
arguments and the results of the earlier steps, in order.

The process is a transient child of a dynamic supervisor (the coordinator adds it).  Its
state (``current_step``, ``task_results``, ``status``, ``started_at``, ``metadata``) is
committed after every step, and the step's attempt count is committed *before* the step
runs, so:

* after a crash it resumes at ``current_step``; a step whose result was saved never runs again;
* a step that failed ``poison_after`` times (it raised, or the process died in it) is not run
  again: the workflow is *parked* with the reason, and exits normally (the supervisor leaves it
  down);
* a normal finish is a normal exit.  Its record stays in the store for the coordinator.

Steps run on a worker thread, so the process keeps its heartbeat during a long step.  A step
that raises is a failed attempt: once why is committed, the same process tries again.  It is
no crash: crashes count against the supervisor's restart intensity, and one bad input given to
many workflows (a step that raises on it) would take the supervisor, then the root, down.

Which handlers may run is the config's: ``args.handlers`` (fnmatch patterns on
``module:function``, default ``["otpd.examples.steps:*"]``), set in the dynamic supervisor's
template and never by an ``add`` (``config_args``).  ``add`` refuses a definition naming another
(``check_args``), and the process checks each step before it runs it: one not allowed parks the
workflow, nothing run.

A step may take ``timeout_s`` (default: the coordinator's ``step_timeout_s``, given to the
process as ``args.step_timeout_s``; 0: no limit).  A thread cannot be stopped, so a step
still running past it ends the process (``EXIT_TIMEOUT``), as a crash: the attempt counts
towards ``poison_after`` like any other.  Why the last attempt of each step failed is kept
in ``errors`` (step index -> text) and named in the parked reason.
"""

from __future__ import annotations

import fnmatch
import time
from typing import Any

from otpd import codec
from otpd.agent.base import Agent
from otpd.agents import error_text, handler_patterns, int_arg, load_handler, timeout_arg, unknown_args
from otpd.errors import OtpdError
from otpd.posix import system

FINAL = ("completed", "parked", "cancelled")


def check_definition(definition: Any, patterns: list[str], whose: str = "the coordinator's") -> dict[str, Any]:
    """``definition`` if it is a workflow whose step handlers all match ``patterns`` (fnmatch on
    ``module:function``), else ``bad_request`` saying what is wrong."""
    if not isinstance(definition, dict) or not isinstance(definition.get("steps"), list) \
            or not definition["steps"]:
        raise OtpdError("bad_request", 'a workflow is {"steps": [{"handler": "module:function", '
                                       '"args": {...}}, ...], "metadata": {...}}')
    for i, step in enumerate(definition["steps"]):
        handler = step.get("handler") if isinstance(step, dict) else None
        if not isinstance(handler, str) or ":" not in handler:
            raise OtpdError("bad_request", f"step {i}: 'handler' must be \"module:function\"")
        if not allowed(handler, patterns):
            raise OtpdError("bad_request", f"step {i}: handler {handler!r} is not allowed by {whose} "
                                           f"config (handlers = {patterns})")
        if not isinstance(step.get("args", {}), dict):
            raise OtpdError("bad_request", f"step {i}: 'args' must be a map")
        if "timeout_s" in step:
            timeout_arg(step["timeout_s"], f"step {i}: timeout_s", "bad_request")
    if not isinstance(definition.get("metadata") or {}, dict):
        raise OtpdError("bad_request", "'metadata' must be a map")
    return definition


def allowed(handler: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(handler, p) for p in patterns)


class WorkflowProcess(Agent):
    state_version = 1
    fields = {
        "workflow_id": "", "definition": dict, "current_step": 0, "task_results": list,
        "status": "running", "started_at": None, "finished_at": None, "metadata": dict,
        "attempts": dict, "parked_reason": None, "errors": dict,
    }
    persistent_fields = tuple(fields)

    workflow_id: str
    definition: dict[str, Any]
    current_step: int
    task_results: list[Any]
    status: str
    started_at: float | None
    finished_at: float | None
    metadata: dict[str, Any]
    attempts: dict[str, int]
    parked_reason: str | None
    errors: dict[str, str]

    RETRY_S = 1.0  # after a commit that failed (store_full), the next try at the step
    config_args = ("handlers",)  # which code a workflow may run is the config's, never a request's

    @classmethod
    def check_template_args(cls, args: dict[str, Any]) -> None:
        """In the config's template: ``handlers`` (the rest comes with each add)."""
        unknown_args(args, {"handlers", "poison_after", "step_timeout_s"}, "WorkflowProcess (template)")
        cls._check_settings(args)

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        """At ``add`` (the coordinator's, or an operator's): what ``init`` and the steps read."""
        unknown_args(args, {"workflow_id", "definition", "poison_after", "step_timeout_s", "resume", "handlers"},
                     "WorkflowProcess")
        if "definition" not in args:
            raise OtpdError("config_invalid", "WorkflowProcess needs args.definition (the coordinator adds it)")
        check_definition(args["definition"], cls._check_settings(args), "the workflows template's")
        if args.get("workflow_id") is not None and not isinstance(args["workflow_id"], str):
            raise OtpdError("config_invalid", f"workflow_id must be a string, got {args['workflow_id']!r}")
        if args.get("resume") not in (None, "retry", "skip"):
            raise OtpdError("config_invalid", f"resume is \"retry\" or \"skip\", got {args['resume']!r}")

    def init(self) -> None:
        self.deadline: int | None = None  # the timer of the running step's timeout
        self.asked = False  # a step's attempt is counted, not yet committed: it runs once it is
        self.in_step = False  # a step runs on the worker
        self.succeeded = False  # a step's result is recorded, not yet committed
        self.redo = False  # a rollback lost that result: run the step again, as the same attempt...
        self.redos = 0  # ... up to poison_after times in a row; then as new attempts, which park it
        if not self.workflow_id:  # the first start: the definition comes with the args
            self.workflow_id = self.args.get("workflow_id") or self.id
            self.definition = self.args["definition"]
            self.metadata = dict(self.definition.get("metadata") or {})
            self.started_at = time.time()
        self._resume(self.args.get("resume"))
        if self.status in FINAL:
            self.stop()  # started again for a finished workflow: nothing to do
        else:
            self.send_after(0, "step")

    def _resume(self, how: str | None) -> None:
        """An operator's ``workflow retry`` / ``workflow skip`` of a parked workflow."""
        if self.status != "parked" or how not in ("retry", "skip"):
            return
        self.attempts.pop(str(self.current_step), None)
        self.errors.pop(str(self.current_step), None)
        if how == "skip":
            self.task_results.append(None)
            self.current_step += 1
        self.status, self.parked_reason = "running", None

    @property
    def steps(self) -> list[dict[str, Any]]:
        return list(self.definition.get("steps") or [])

    def handle_info(self, message: Any) -> None:
        if isinstance(message, tuple):
            if message[0] == "timeout":
                self._timed_out(message[1])
            return
        if message != "step" or self.status != "running" or self.asked or self.in_step:
            return  # (a retry that comes while the step it was for is asked or runs)
        if self.current_step >= len(self.steps):
            self.status, self.finished_at = "completed", time.time()
            self.after_commit(self.stop)  # a final status on disk first: a rollback keeps it running
            return
        if self.redo and self.redos < int(self.args.get("poison_after", 3)):
            # its attempt succeeded and is counted already: not one more, not a crash (but a
            # result that never fits, store_full every time, must not run again for ever)
            self.redo, self.asked, self.redos = False, True, self.redos + 1
            self.after_commit(self._run_step)
            return
        self.redo = False
        key = str(self.current_step)
        tries = self.attempts.get(key, 0)
        step = self.steps[self.current_step]
        handler = step.get("handler")
        patterns = handler_patterns(self.args)
        if not isinstance(handler, str) or not allowed(handler, patterns):  # only what the config allows runs
            self.status, self.finished_at = "parked", time.time()
            self.parked_reason = (f"step {self.current_step}: handler {handler!r} is not allowed by the workflows "
                                  f"template's config (handlers = {patterns})")
            self.after_commit(self.stop)
            return
        if tries >= int(self.args.get("poison_after", 3)):
            self.status, self.finished_at = "parked", time.time()
            self.parked_reason = (f"step {self.current_step} ({step.get('name') or step.get('handler')}) "
                                  f"failed {tries} times")
            if key in self.errors:
                self.parked_reason += f"; the last one {self.errors[key]}"
            self.after_commit(self.stop)
            return
        self.attempts = {**self.attempts, key: tries + 1}
        self.asked = True
        self.after_commit(self._run_step)  # the attempt is on disk before the step runs

    def on_rollback(self) -> None:
        if not self.in_step:
            # Dropped with the commit: what it asked for after it (the step's run, the move
            # to the next step, the stop after a final status): try again.
            self.asked = False
            self.redo, self.succeeded = self.redo or self.succeeded, False
            self.send_after(self.RETRY_S, "step")

    @staticmethod
    def _check_settings(args: dict[str, Any]) -> list[str]:
        """The args a template may set (``handlers``, ``poison_after``, ``step_timeout_s``),
        checked; the handler patterns."""
        int_arg(args, "poison_after", 3, 1)
        timeout_arg(args.get("step_timeout_s", 0), "step_timeout_s", "config_invalid")
        return handler_patterns(args)

    def _timeout(self, step: dict[str, Any]) -> float:
        return timeout_arg(step.get("timeout_s", self.args.get("step_timeout_s", 0)), "timeout_s", "bad_request")

    def _run_step(self) -> None:
        self.asked, self.in_step = False, True
        step = self.steps[self.current_step]
        try:
            fn = load_handler(step["handler"])
        except OtpdError as err:  # a failed attempt like a step that raised, with why in errors
            self.in_step = False
            self._attempt_failed(f"did not start: {err.message}")
            return
        timeout = self._timeout(step)
        self.run_in_worker(fn, dict(step.get("args") or {}), list(self.task_results), done=self._step_done,
                           workers=1)
        if timeout:
            self.deadline = self.send_after(timeout, ("timeout", self.current_step))

    def _timed_out(self, index: int) -> None:
        """The step is still running past its timeout: its thread cannot be stopped, so the
        process ends after why is committed, and the next start counts the attempt."""
        self.deadline = None
        if index != self.current_step or self.status != "running":
            return  # it finished meanwhile
        key = str(index)
        text = f"timed out after {self._timeout(self.steps[index]):g} s in attempt {self.attempts.get(key, 0)}"
        self.errors = {**self.errors, key: text}
        self.log(f"step {index} of {self.workflow_id} {text}; ending this process to free its worker")
        self.end_after_commit(system.EXIT_TIMEOUT)

    def _attempt_failed(self, why: str) -> None:
        """Record why the current step's attempt failed; once that is committed, the next
        attempt (its count is on disk already), or the park after ``poison_after``.  If the
        commit fails (store_full), ``on_rollback`` tries the step again later."""
        self.errors = {**self.errors, str(self.current_step): why}
        self.after_commit(lambda: self.send_after(0, "step"))

    def _step_done(self, result: Any, error: BaseException | None) -> None:
        self.in_step = False
        if self.deadline is not None:
            self.cancel_timer(self.deadline)
            self.deadline = None
        key = str(self.current_step)
        if error is not None:
            self._attempt_failed(f"raised {error_text(error)}")
            return
        try:
            codec.unpack(codec.pack(result))  # (a tuple as a map key packs, and does not load back)
        except Exception as exc:  # (a set, an object): saved, it would fail every commit after it
            self._attempt_failed(f"returned what cannot be saved ({type(exc).__name__}: {exc}; a step returns "
                                 "msgpack values: None, bool, int, float, str, bytes, list, dict)")
            return
        self.errors.pop(key, None)  # "why the last attempt failed": it did not
        self.task_results.append(result)
        self.current_step += 1
        self.succeeded = True
        self.after_commit(self._advance)  # the result is committed before the next step starts

    def _advance(self) -> None:
        self.succeeded, self.redos = False, 0
        self.send_after(0, "step")

    def handle_call(self, request: Any) -> Any:
        return {"workflow_id": self.workflow_id, "status": self.status, "current_step": self.current_step}
