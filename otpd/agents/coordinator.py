"""CoordinatorAgent: the gateway that starts workflows and counts their outcomes.

The design's "God" coordinator is decomposed: each workflow is its own process
(``WorkflowProcess``) under a dynamic supervisor; this agent only

* validates a definition, records the workflow (``workflows``: id -> entry) and, once that is
  committed, adds the workflow's process to the supervisor (``args.supervisor``, default
  ``"workflows"``);
* learns outcomes from the supervisor's exit **events** and the workflow's own record, and
  finalises each workflow exactly once (``completed_count`` / ``failed_count`` /
  ``cancelled_count`` change only on a transition out of ``running``);
* reconciles at start and whenever the workflows supervisor comes back: a workflow recorded as
  running that has no process is either finished (its record says so) or started again, and it
  resumes at its saved step.  So after a restart of this agent, of the supervisor, or of the
  whole daemon, nothing is lost or run twice.

Step handlers must match ``args.handlers`` (fnmatch patterns on ``module:function``, default
``["otpd.examples.steps:*"]``): a ``start`` naming another is refused.  What a workflow's process
enforces is its template's ``args.handlers`` (config only: an ``add`` cannot set it), so an
``add`` to the supervisor that bypasses this agent cannot run other code either; keep these
patterns within the template's (a workflow they let through that the template does not is
parked, "not started").
Finished workflows are kept (``args.retention``, default 1000); older ones are forgotten
(their records deleted); the counters are lifetime counts.  ``args.step_timeout_s`` (default 0:
no limit) bounds each step of every workflow; a step's own ``timeout_s`` overrides it.
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

from otpd.agent.base import Agent
from otpd.agent.state import PersistentMap, PersistentQueue
from otpd.agents import handler_patterns, int_arg, timeout_arg, unknown_args
from otpd.agents.workflow import FINAL, WorkflowProcess, check_definition
from otpd.config import ID_RE
from otpd.errors import OtpdError


class CoordinatorAgent(Agent):
    RETRY_S = 1.0  # a launch or a removal the daemon could not take now: tried again after this
    state_version = 1
    fields = {"completed_count": 0, "failed_count": 0, "cancelled_count": 0, "started_count": 0}
    persistent_fields = tuple(fields)
    # forgetting: workflows past retention whose records are still to delete (a delete waits
    # for the workflow's process to let go of its log, and survives a restart of this agent)
    collections = {"workflows": PersistentMap, "finished": PersistentQueue, "forgetting": PersistentMap}

    workflows: PersistentMap
    finished: PersistentQueue
    forgetting: PersistentMap
    completed_count: int
    failed_count: int
    cancelled_count: int
    started_count: int

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        cls._settings(args)

    @staticmethod
    def _settings(args: dict[str, Any]) -> tuple[str, list[str], int, int, float]:
        """(supervisor, handlers, retention, poison_after, step_timeout_s) from the args,
        or ``config_invalid``."""
        unknown_args(args, {"supervisor", "handlers", "retention", "poison_after", "step_timeout_s"},
                     "CoordinatorAgent")
        supervisor = args.get("supervisor", "workflows")
        if not isinstance(supervisor, str) or not ID_RE.match(supervisor):
            raise OtpdError("config_invalid", f"supervisor must be the id of a dynamic supervisor, got {supervisor!r}")
        return (supervisor, handler_patterns(args), int_arg(args, "retention", 1000, 0),
                int_arg(args, "poison_after", 3, 1),
                timeout_arg(args.get("step_timeout_s", 0), "step_timeout_s", "config_invalid"))

    def init(self) -> None:
        self.supervisor, self.patterns, self.retention, self.poison_after, self.step_timeout_s = \
            self._settings(self.args)
        self.subscribe_events()
        self.send_after(0, "reconcile")
        for wf_id in list(self.forgetting.keys()):  # deletes a crash interrupted
            self.send_after(0, ("forget", wf_id))

    # -- requests ------------------------------------------------------------

    def handle_call(self, request: Any) -> Any:
        return self.dispatch_op(request)

    def op_start(self, request: dict[str, Any]) -> Any:
        """``workflow_id`` is optional: given, it is an idempotency key (a client that lost the
        reply starts again and gets the same workflow, not a second one)."""
        definition = self._check(request.get("definition"))
        wf_id = request.get("workflow_id")
        if wf_id is None:
            wf_id = f"wf-{uuid.uuid4().hex[:16]}"
        elif not isinstance(wf_id, str) or not ID_RE.match(wf_id):
            raise OtpdError("bad_request", f"{wf_id!r} is not a valid workflow id")
        elif wf_id in self.workflows:
            return {"workflow_id": wf_id, "existing": True}
        elif wf_id in self.forgetting:  # its records are still to delete: a new one would lose its own
            raise OtpdError("already_exists", f"{wf_id!r} was a workflow whose records are being deleted: "
                            "try again in a moment, or choose another id", {"workflow_id": wf_id})
        else:
            self._refuse_taken(wf_id)
        self.workflows[wf_id] = {"status": "running", "definition": definition, "created_at": time.time()}
        self.started_count += 1
        self.after_commit(lambda: self._launch(wf_id))  # recorded before its process exists
        return {"workflow_id": wf_id}

    def _refuse_taken(self, wf_id: str) -> None:
        """``already_exists`` for an id that is another child's, or has another agent's records:
        as a workflow, its records would be read as the workflow's, and deleted past retention."""
        taken = any(c["id"] == wf_id and c["supervisor"] != self.supervisor for c in self.system("ps")["children"])
        if taken or not self._a_workflows(wf_id):
            raise OtpdError("already_exists", f"{wf_id!r} is the id of another agent: choose another workflow id",
                            {"workflow_id": wf_id})

    def _a_workflows(self, wf_id: str) -> bool:
        """Are ``wf_id``'s records (if any) a workflow's?  Only those are ever deleted here."""
        try:
            record = self.read_state(wf_id)
        except OtpdError:  # corrupt: not ours to judge, and never to delete
            return False
        if record is None:
            return True
        # The writer's class, looked up among the modules imported already (the daemon imported
        # every agent class of the config before it forked this process): a name read from the
        # store is never imported here.
        module, _, name = str(record.get("agent")).partition(":")
        cls = getattr(sys.modules.get(module), name, None)
        return isinstance(cls, type) and issubclass(cls, WorkflowProcess)

    def op_status(self, request: dict[str, Any]) -> Any:
        wf_id = self._known(request)
        entry = self.workflows[wf_id]
        record = self.read_state(wf_id)
        state = record["state"] if record else {}
        steps = (entry.get("definition") or {}).get("steps") or []
        return {"workflow_id": wf_id, "status": entry["status"], "steps": len(steps),
                "current_step": state.get("current_step", 0), "task_results": state.get("task_results", []),
                "started_at": state.get("started_at"), "finished_at": state.get("finished_at"),
                "metadata": state.get("metadata", {}),
                "parked_reason": state.get("parked_reason", entry.get("parked_reason")),
                "attempts": state.get("attempts", {}), "errors": state.get("errors", {})}

    def op_list(self, request: dict[str, Any]) -> Any:
        wanted = request.get("state")
        rows = [{"workflow_id": k, "status": v["status"], "created_at": v.get("created_at")}
                for k, v in self.workflows.items() if wanted in (None, v["status"])]
        return {"workflows": rows, "completed_count": self.completed_count, "failed_count": self.failed_count,
                "cancelled_count": self.cancelled_count, "started_count": self.started_count}

    def op_cancel(self, request: dict[str, Any]) -> Any:
        wf_id = self._known(request)
        entry = self.workflows[wf_id]
        if entry["status"] in FINAL:
            raise OtpdError("bad_request", f"{wf_id} is already {entry['status']}")
        self._finalise(wf_id, "cancelled")
        self.after_commit(lambda: self._remove(wf_id))
        return {"workflow_id": wf_id, "status": "cancelled"}

    def op_retry(self, request: dict[str, Any]) -> Any:
        return self._unpark(request, "retry")

    def op_skip(self, request: dict[str, Any]) -> Any:
        return self._unpark(request, "skip")

    def _unpark(self, request: dict[str, Any], how: str) -> Any:
        wf_id = self._known(request)
        entry = self.workflows[wf_id]
        if entry["status"] != "parked":
            raise OtpdError("bad_request", f"{wf_id} is {entry['status']}, not parked")
        # (how is kept with it: a daemon killed before the workflow's process took it up
        # relaunches it the same way at the reconcile, not parked again)
        record = self.read_state(wf_id)
        self.workflows[wf_id] = {**entry, "status": "running", "resume": how,
                                 "resume_seq": (record or {}).get("seq", 0)}
        self.failed_count -= 1
        self.after_commit(lambda: self._launch(wf_id))
        return {"workflow_id": wf_id, "status": "running"}

    def _known(self, request: dict[str, Any]) -> str:
        wf_id = request.get("workflow_id")
        if not isinstance(wf_id, str) or wf_id not in self.workflows:
            raise OtpdError("not_found", f"no workflow {wf_id!r}", {"workflow_id": wf_id})
        return wf_id

    def _check(self, definition: Any) -> dict[str, Any]:
        return check_definition(definition, self.patterns)

    # -- processes and outcomes -----------------------------------------------

    def _launch(self, wf_id: str) -> None:
        entry = self.workflows.get(wf_id)
        if entry is None or entry["status"] != "running":
            return
        args = {"workflow_id": wf_id, "definition": entry["definition"], "poison_after": self.poison_after,
                "step_timeout_s": self.step_timeout_s}
        if entry.get("resume"):
            args["resume"] = entry["resume"]
        try:
            self.system("add", supervisor=self.supervisor, id=wf_id, args=args)
        except OtpdError as err:
            if err.details.get("refused_args"):  # refused by the template's class: it never runs
                self._park(wf_id, f"not started: {err.message}")
            elif err.code == "already_exists":  # running already, or the id is another child's
                if not self._ours(wf_id):
                    self._park(wf_id, f"not started: {wf_id!r} is the id of another child")
            elif err.code == "shutting_down":  # the supervisor is stopped: its "ready" reconciles
                self.log(f"workflow {wf_id} waits for {self.supervisor!r}: {err.message}")
            elif err.code in ("bad_request", "not_found", "config_invalid"):  # no retry would change it
                self._park(wf_id, f"not started: {err.message}")
            else:  # the daemon busy (timeout), a supervisor gone from the config: again later
                self.log(f"workflow {wf_id} not started yet ({err.code}: {err.message}); trying again")
                self.send_after(self.RETRY_S, ("launch", wf_id))

    def _ours(self, wf_id: str) -> bool:
        try:
            return any(c["id"] == wf_id and c["supervisor"] == self.supervisor
                       for c in self.system("ps")["children"])
        except OtpdError:
            return True  # cannot tell now: as before, taken as running already

    def _park(self, wf_id: str, why: str) -> None:
        self.workflows[wf_id] = {**self.workflows[wf_id], "parked_reason": why}
        self.log(f"workflow {wf_id} parked, {why}")
        self._finalise(wf_id, "parked")

    def _remove(self, wf_id: str) -> None:
        try:
            self.system("remove", id=wf_id)
        except OtpdError as err:
            if err.code in ("timeout", "shutting_down"):
                self.send_after(self.RETRY_S, ("remove", wf_id))
            elif err.code != "not_found":  # (refused: not a child of the supervisor; nothing to stop)
                self.log(f"workflow {wf_id}: its process not removed ({err.code}: {err.message})")

    def handle_event(self, event: dict[str, Any]) -> None:
        child, kind = event.get("id"), event.get("event")
        if child == self.supervisor and kind == "ready":
            self.send_after(0, "reconcile")  # the supervisor came back (empty): restart what runs
        elif isinstance(child, str) and kind in ("exited", "stopped") and child in self.workflows:
            if event.get("reason") != "crash":  # a crash is restarted by the supervisor
                self._settle(child, ended_itself=kind == "exited")

    def handle_info(self, message: Any) -> None:
        if message == "reconcile":
            self._reconcile()
        elif isinstance(message, tuple) and message[0] == "forget":
            self._forget(message[1])
        elif isinstance(message, tuple) and message[0] == "launch":
            self._launch(message[1])
        elif isinstance(message, tuple) and message[0] == "remove":
            self._remove(message[1])

    def _forget(self, wf_id: str) -> None:
        """Delete a workflow's records past retention; its process may still be finishing
        (it holds its log until it exits): then try again a little later."""
        if wf_id not in self.forgetting:
            return  # done already (a retry that was scheduled twice)
        if not self._a_workflows(wf_id):  # (an agent that took the id since): never deleted here
            self.log(f"workflow {wf_id} forgotten; the records under its id are not a workflow's: kept")
            del self.forgetting[wf_id]
            return
        try:
            self.delete_state(wf_id)
        except OtpdError as err:
            if err.details.get("running"):
                self.send_after(0.2, ("forget", wf_id))
            else:  # kept for the next start of this agent to try again
                self.log(f"workflow {wf_id}: its records not deleted yet ({err.code}: {err.message})")
            return
        del self.forgetting[wf_id]

    def _settle(self, wf_id: str, ended_itself: bool = False) -> None:
        """The workflow's process is down for good: its own record says how it ended.  One that
        ended on its own unfinished (a step that called ``os._exit(0)``, say) starts again: its
        attempt is on disk, so such a step is parked after ``poison_after`` of them."""
        entry = self.workflows.get(wf_id)
        if entry is None or entry["status"] != "running":
            return
        record = self._record(wf_id)
        status = self._outcome(entry, record)
        if status is not None:
            self._finalise(wf_id, status)
        elif ended_itself:
            self.log(f"workflow {wf_id} ended unfinished, at step {(record or {}).get('state', {}).get('current_step')}"
                     "; starting it again")
            self.after_commit(lambda: self._launch(wf_id))

    def _record(self, wf_id: str) -> dict[str, Any] | None:
        """A workflow's own record; one that does not load is read as parked, with why (its
        process cannot start on it either): one bad record must not stop this agent."""
        try:
            return self.read_state(wf_id)
        except OtpdError as err:
            self.workflows[wf_id] = {**self.workflows[wf_id], "parked_reason": f"its record: {err.message}"}
            return {"state": {"status": "parked"}, "seq": 1 << 62}

    @staticmethod
    def _outcome(entry: dict[str, Any], record: dict[str, Any] | None) -> str | None:
        """The final status a workflow's own record gives, or None if it is still to run: a
        retry or skip asked for and not yet taken up by its process (the record still parked,
        with no commit since the ask) is still to run."""
        status = (record or {}).get("state", {}).get("status")
        if status == "parked" and entry.get("resume") and (record or {}).get("seq", 0) <= entry.get("resume_seq", 0):
            return None
        return status if status in FINAL else None

    def _finalise(self, wf_id: str, status: str) -> None:
        """running -> a final status, once: the counters move only on this transition."""
        entry = self.workflows[wf_id]
        if entry["status"] != "running":
            return
        queued = entry.get("in_finished", False)  # parked before, then retried: its place is kept
        self.workflows[wf_id] = {**{k: v for k, v in entry.items() if k not in ("resume", "resume_seq")},
                                 "status": status, "finished_at": time.time(), "in_finished": True}
        if status == "completed":
            self.completed_count += 1
        elif status == "parked":
            self.failed_count += 1
        else:
            self.cancelled_count += 1
        if not queued:
            self.finished.append(wf_id)
        while len(self.finished) > self.retention:  # the counters stay lifetime counts
            old = self.finished.popleft()
            kept = self.workflows.get(old)
            if kept is not None and kept["status"] not in FINAL:  # parked, then retried: running again
                self.workflows[old] = {**kept, "in_finished": False}  # (queued again at its end)
                continue
            if self.workflows.pop(old, None) is not None:
                self.forgetting[old] = True
                self.after_commit(lambda old=old: self._forget(old))

    def _reconcile(self) -> None:
        """Match the recorded workflows with the processes that exist."""
        try:
            children = {c["id"]: c["state"] for c in self.system("ps")["children"]
                        if c["supervisor"] == self.supervisor}
        except OtpdError:
            self.send_after(0.5, "reconcile")  # the daemon is busy (shutting down?): later
            return
        for wf_id, entry in list(self.workflows.items()):
            if entry["status"] != "running" or wf_id in children:
                continue
            status = self._outcome(entry, self._record(wf_id))
            if status is not None:
                self._finalise(wf_id, status)
            else:
                self.after_commit(lambda wf_id=wf_id: self._launch(wf_id))
