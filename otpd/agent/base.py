"""The Agent API: what a user writes, running inside its own OS process.

An agent is a class with callbacks, like an OTP gen_server:

* ``init()``: load and set up; the supervisor counts the agent as running
  only after it returned (persistent state is loaded before it, once the
  store exists).  An exception here is a start failure.
* ``handle_call(request)``: return the reply.  Raise ``OtpdError`` to send an
  error reply and keep running; any other exception crashes the process,
  which is what the supervisor is for.
* ``handle_cast(message)``: no reply.
* ``handle_info(message)``: timers set with ``send_after`` / ``send_interval``.
* ``terminate(reason)``: last words on a clean stop (``"shutdown"``).

Timers belong to the runtime's loop, never to threads of the agent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from otpd.errors import OtpdError

if TYPE_CHECKING:
    from otpd.agent.runtime import Runtime
    from otpd.store.lmdb_store import Store


class Agent:
    """Base class of every agent. Subclass it and name it in the config.

    State (see ``otpd.agent.state``): ``fields`` maps names to defaults (a
    zero-argument callable is a factory), ``persistent_fields`` lists those
    saved to the store, ``collections`` maps names to ``PersistentQueue`` /
    ``PersistentMap``, ``state_version`` and ``migrations`` ({n: f(state) ->
    state at n + 1}) upgrade old records.  Persistent state is loaded before
    ``init`` and committed after every batch of messages that changed it,
    before any reply of that batch is sent.
    """

    state_version: int = 1
    fields: dict[str, Any] = {}
    persistent_fields: tuple[str, ...] = ()
    collections: dict[str, type] = {}
    migrations: dict[int, Any] = {}
    # Args only the config may set: an ``add`` to a dynamic supervisor whose args name one is
    # refused (bad_request), so a template's value (or the class's default) holds for every child
    # added.  For what a request must never choose, like which code the agent runs.
    config_args: tuple[str, ...] = ()

    @classmethod
    def persists(cls) -> bool:
        return bool(cls.persistent_fields or cls.collections)

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        """Check a child's ``args`` before anything is forked; raise ``OtpdError("config_invalid",
        ...)`` (or ValueError / TypeError) saying what is wrong.  ``check-config``, ``run`` and
        ``reload`` report it at the child's ``args`` key (exit 2, or the reload refused); a dynamic
        supervisor's ``add`` refuses it with ``bad_request``.  Without it a bad value is found
        only by ``init``: a start failure at every restart, until the intensity gives up.

        It runs in the daemon: no side effects, nothing started, no heavy imports.  Check what
        ``init`` will read, best by the same function.  The default accepts anything."""

    @classmethod
    def check_template_args(cls, args: dict[str, Any]) -> None:
        """The same for a dynamic supervisor's template, at config load: its ``args`` are
        completed by each ``add``, so check only what they hold (and that ``config_args``,
        which no add can set, are right).  The default accepts anything."""

    def __init__(self, agent_id: str, args: dict[str, Any], runtime: Runtime | None = None) -> None:
        self.id = agent_id
        self.args = args
        self._runtime = runtime

    # -- callbacks -----------------------------------------------------------

    def init(self) -> None:
        """Called once in the child before ``ready`` is sent."""

    def handle_call(self, request: Any) -> Any:
        raise OtpdError("bad_request", f"agent {self.id!r} takes no calls")

    def dispatch_op(self, request: Any) -> Any:
        """For agents whose calls are ``{"op": NAME, ...}``: ``self.op_NAME(request)``, and
        ``bad_request`` naming the ops for anything else.  Use it as ``handle_call``."""
        op = request.get("op") if isinstance(request, dict) else None
        handler = getattr(self, "op_" + op, None) if isinstance(op, str) else None
        if handler is None:  # the list of ops is made only for the error (dir() costs ~10 µs)
            ops = sorted(name[3:] for name in dir(type(self)) if name.startswith("op_"))
            if not isinstance(op, str):
                raise OtpdError("bad_request", f"a request to {self.id!r} is {{\"op\": {'|'.join(ops)}, ...}}",
                                {"ops": ops})
            raise OtpdError("bad_request", f"{self.id!r} has no op {op!r}", {"ops": ops})
        return handler(request)

    def handle_cast(self, message: Any) -> None:
        """Called for each cast; nothing is sent back."""

    def handle_info(self, message: Any) -> None:
        """Called when a timer set by ``send_after`` / ``send_interval`` fires."""

    def handle_event(self, event: dict[str, Any]) -> None:
        """Called for each supervision event after ``subscribe_events()``
        (``{"event": "exited", "id": ..., "reason": ..., ...}``, as ``otpctl events`` shows)."""

    def terminate(self, reason: str) -> None:
        """Called on a clean stop, before the process exits (changes it makes are saved)."""

    def on_before_save(self, state: dict[str, Any]) -> dict[str, Any]:
        """Turn the persistent fields into msgpack-able values (a set -> a list, ...)."""
        return state

    def on_after_load(self, state: dict[str, Any]) -> dict[str, Any]:
        """The reverse of ``on_before_save``, after migrations."""
        return state

    def on_rollback(self) -> None:
        """A commit failed (``store_full``): the persistent fields are back at the last commit,
        and what was to run after it (``after_commit``) is dropped; timers and other attributes
        are as they were.  Redo here what must not be lost with them."""

    # -- services of the runtime ---------------------------------------------

    def send_after(self, delay_s: float, message: Any) -> int:
        """Deliver ``message`` to ``handle_info`` once, after ``delay_s``; returns a timer ref."""
        return self._rt().add_timer(delay_s, message, interval=None)

    def send_interval(self, every_s: float, message: Any) -> int:
        """Deliver ``message`` to ``handle_info`` every ``every_s`` until cancelled."""
        return self._rt().add_timer(every_s, message, interval=every_s)

    def cancel_timer(self, ref: int) -> None:
        self._rt().cancel_timer(ref)

    def log(self, message: str) -> None:
        """A line in the daemon's log (and the journal), prefixed with this agent's id."""
        from otpd.agent.runtime import log_line

        log_line(message)

    def stop(self) -> None:
        """Finish the current callback, then exit normally (a transient child stays down)."""
        self._rt().stopping = "normal"

    def system(self, op: str, timeout: float = 10.0, **args: Any) -> Any:
        """Ask the daemon, as otpctl would: ``self.system("add", supervisor="workflows",
        id="wf-1", args={...})``, ``self.system("status")``, ``self.system("call", id=..., request=...)``.
        Blocks until the answer; raises OtpdError.  Never call yourself this way (it would wait
        for its own reply until the timeout)."""
        return self._rt().system(op, args, timeout)

    def subscribe_events(self) -> None:
        """From now on, every supervision event reaches ``handle_event``."""
        self.system("events", follow=True, last=0)

    def end_after_commit(self, status: int) -> None:
        """End the process with ``status`` once the changes made so far are committed, or the
        commit failed (``store_full``): before any new input is read.  For a worker thread
        that cannot be stopped (a timeout): let it crash, the supervisor restarts the agent."""
        self._rt().ending = status

    def after_commit(self, callback: Any) -> None:
        """Run ``callback()`` once the changes made so far are committed (write before act)."""
        self._rt().after.append(callback)

    def run_in_worker(self, fn: Any, *args: Any, done: Any, workers: int = 4) -> None:
        """Run ``fn(*args)`` on one of ``workers`` threads; ``done(result, error)`` is then
        called on the agent's loop, where state may change (and is committed after it)."""
        self._rt().run_in_worker(fn, args, done, workers)

    def flag(self, name: str, key: str | None = None) -> bool:
        """Is feature ``name`` on for ``key`` (default: this agent's id)?  A percentage
        rollout answers by a stable hash, so one key always gets the same answer."""
        from otpd.flags import enabled

        return enabled(name, self._rt().flags.get(name, 0.0), key or self.id)

    def read_state(self, agent_id: str) -> dict[str, Any] | None:
        """Another agent's persisted main record (read-only), or None."""
        return self._store().read(agent_id)

    def delete_state(self, agent_id: str) -> bool:
        """Delete another agent's records for good; only for one that will not run again."""
        return self._store().delete_agent(agent_id)

    def _store(self) -> Store:
        keeper = self._rt().keeper
        if keeper is None or keeper.store is None:
            raise OtpdError("bad_request", "this needs a store: declare persistent state")
        return keeper.store

    def _rt(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the agent is not running under the otpd runtime")
        return self._runtime
