"""The supervision tree as a pure state machine: events in, actions out.

Theory of operation
-------------------
Inputs are events with a monotonic ``now``: a child was spawned, sent
``ready``, exited with a reason; a timer fired; an operator command.  Outputs
are actions for the shell: ``Spawn``, ``Signal``, ``SetTimer``, ``CancelTimer``,
``Emit`` and ``Exit``.  Nothing here touches the OS or reads a clock.

OTP's supervisor starts and stops children synchronously: starting waits for
the child's init to return, stopping waits for its exit or the shutdown
timeout.  Here every supervisor owns a queue of operations (``start X``,
``stop X``) and runs them one at a time, each waiting for its matching event
(``ready`` / exit) before the next.  That gives OTP's order without blocking
the loop: children start in order, each ready before the next, and stop in
reverse order.  A dynamic supervisor stops its children all at once, as
Elixir's DynamicSupervisor does.  Operations are idempotent (starting a
running child or stopping a stopped one does nothing), so a decision can
re-queue what it needs without tracking what is already queued.

On an exit the decision is: restart type x exit reason (``should_restart``),
then the intensity window (``add_restart``), then the strategy's group
(one_for_one: the child; one_for_all: every child; rest_for_one: the child
and those after it).  The group's survivors are stopped in reverse order and
the group is started again in order.  A child that failed to start (it exited
before ``ready``) is restarted after a capped exponential backoff.  A
supervisor over its intensity stops its children and fails to its parent; the
root failing ends with ``Exit(EXIT_ESCALATED)``.

Supervisors are nodes of this tree, not processes: their "exit" is the moment
their last child is down after they gave up or were asked to stop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from otpd.core.intensity import add_restart, backoff_delay
from otpd.core.spec import AgentSpec, ChildSpec, Restart, SupervisorSpec, walk
from otpd.errors import OtpdError

EXIT_OK = 0
EXIT_ESCALATED = 4  # the root supervisor exceeded its intensity

Reason = Literal["normal", "shutdown", "crash"]
State = Literal["starting", "running", "stopping", "restarting", "stopped", "failed"]

# Legal moves of a child's state; anything else is a bug in this module.
TRANSITIONS: dict[str, frozenset[str]] = {
    "stopped": frozenset({"starting", "restarting"}),
    "starting": frozenset({"running", "stopping", "restarting", "stopped", "failed"}),
    "running": frozenset({"stopping", "restarting", "stopped", "failed"}),
    "stopping": frozenset({"stopped", "failed"}),
    "restarting": frozenset({"starting", "stopped"}),
    "failed": frozenset({"starting", "restarting", "stopped"}),
}
UP_STATES = frozenset({"starting", "running"})


class IllegalTransition(RuntimeError):
    pass


def should_restart(restart: Restart, reason: Reason) -> bool:
    """OTP's rule: permanent always, transient only after a crash, temporary never."""
    if restart == "permanent":
        return True
    if restart == "transient":
        return reason == "crash"
    return False


# -- actions ---------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Fork a process for ``id``, unless ``Tree.spawn_is_current(id, token)`` says the
    node was replaced by later actions of the same batch."""

    id: str
    spec: AgentSpec
    token: int


@dataclass(frozen=True)
class Signal:
    id: str
    signal: Literal["TERM", "KILL"]


@dataclass(frozen=True)
class SetTimer:
    key: tuple[Any, ...]
    at: float


@dataclass(frozen=True)
class CancelTimer:
    key: tuple[Any, ...]


@dataclass(frozen=True)
class Emit:
    event: str
    id: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Exit:
    status: int


Action = Spawn | Signal | SetTimer | CancelTimer | Emit | Exit


# -- nodes -----------------------------------------------------------------


@dataclass
class Node:
    spec: ChildSpec
    parent: str | None
    state: str = "stopped"
    pid: int | None = None
    restarts: int = 0
    start_failures: int = 0
    started_once: bool = False
    token: int = 0  # which start this is: a Spawn with an older token is stale
    held: bool = False  # stopped by an operator: group restarts leave it down
    removing: bool = False  # a dynamic child to forget once it is down
    # supervisor nodes only
    children: list[str] = field(default_factory=list)
    queue: deque[tuple[str, str]] = field(default_factory=deque)
    waiting: set[str] = field(default_factory=set)
    window: tuple[float, ...] = ()
    failing: bool = False
    overlap: bool = False  # what it waits for are starts that a parallel start may join
    delayed: dict[int, list[str]] = field(default_factory=dict)
    timer_seq: int = 0

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def is_supervisor(self) -> bool:
        return isinstance(self.spec, SupervisorSpec)

    @property
    def sup(self) -> SupervisorSpec:
        assert isinstance(self.spec, SupervisorSpec)
        return self.spec


class Tree:
    """The whole supervision tree. Every public method returns the actions to run."""

    def __init__(self, root: SupervisorSpec) -> None:
        self.root_id = root.id
        self.nodes: dict[str, Node] = {}
        self._out: list[Action] = []
        self._advancing: set[str] = set()
        self.changed: set[str] = set()  # ids whose state changed (or that left): the shell drains it
        self._token = 0
        self._target: SupervisorSpec | None = None  # the last reload's spec, until its moves are done
        self._add(root, None)

    def _add(self, spec: ChildSpec, parent: str | None) -> Node:
        if spec.id in self.nodes:
            raise OtpdError("already_exists", f"a child named {spec.id!r} exists")
        node = Node(spec=spec, parent=parent)
        self.nodes[spec.id] = node
        if parent is not None:
            self.nodes[parent].children.append(spec.id)
        if isinstance(spec, SupervisorSpec):
            for child in spec.children:
                self._add(child, spec.id)
        return node

    # -- queries -----------------------------------------------------------

    def get(self, child_id: str) -> Node:
        node = self.nodes.get(child_id)
        if node is None:
            raise OtpdError("not_found", f"no child named {child_id!r}", {"id": child_id})
        return node

    def settled(self) -> bool:
        """Nothing in flight: no supervisor has work queued or awaited, and no reload is
        waiting for a removal to finish."""
        return self._target is None and all(not n.queue and not n.waiting for n in self.nodes.values())

    def snapshot(self) -> list[dict[str, Any]]:
        """Every node below the root, depth first in start order."""
        out: list[dict[str, Any]] = []
        stack = list(reversed(self.nodes[self.root_id].children))
        while stack:
            node = self.nodes[stack.pop()]
            out.append(
                {
                    "id": node.id,
                    "type": "supervisor" if node.is_supervisor else "agent",
                    "supervisor": node.parent,
                    "pid": node.pid,
                    "state": node.state,
                    "restarts": node.restarts,
                    "restart": node.spec.restart,
                }
            )
            stack.extend(reversed(node.children))
        return out

    # -- events from the shell ---------------------------------------------

    def start(self, now: float) -> list[Action]:
        root = self.nodes[self.root_id]
        self._set(root, "starting")
        root.queue.extend(("start", c) for c in root.children)
        self._advance(root, now)
        return self._flush()

    def spawn_is_current(self, child_id: str, token: int) -> bool:
        """Should the shell fork for this Spawn? Not if its node is gone or started anew."""
        node = self.nodes.get(child_id)
        return node is not None and node.token == token and node.pid is None \
            and node.state in ("starting", "stopping")

    def spawned(self, child_id: str, pid: int, now: float) -> list[Action]:
        node = self.nodes.get(child_id)
        if node is not None:
            node.pid = pid
            self._emit("started", node, pid=pid)
        return self._flush()

    def ready(self, child_id: str, now: float) -> list[Action]:
        node = self.nodes.get(child_id)
        if node is None or node.state != "starting":
            return self._flush()  # late: it is already being stopped
        self._set(node, "running")
        node.start_failures = 0
        self._emit("ready", node, pid=node.pid)
        self._up(node, now)
        return self._flush()

    def exited(self, child_id: str, reason: Reason, now: float, fatal: bool = False,
               **details: Any) -> list[Action]:
        """A child process ended. ``fatal``: it failed to start for a reason a restart
        cannot fix (its stored state is corrupt, or its start must write what a full store
        cannot take); it stays ``failed`` until an operator starts it, and its siblings keep
        running."""
        node = self.nodes.get(child_id)
        live = ("starting", "running", "stopping")
        if node is not None and not node.is_supervisor and node.state in live:
            self._cancel(("kill", child_id))
            if fatal and node.state == "starting":
                node.held = True
                details["fatal"] = True
            self._down(node, reason, now, details)
        return self._flush()

    def timer(self, key: tuple[Any, ...], now: float) -> list[Action]:
        kind = key[0]
        if kind == "kill":
            node = self.nodes.get(key[1])
            if node is not None and node.state == "stopping" and node.pid is not None:
                self._out.append(Signal(node.id, "KILL"))
        elif kind == "restart":
            sup = self.nodes.get(key[1])
            if sup is not None:
                targets = sup.delayed.pop(key[2], [])
                if sup.state in UP_STATES:
                    sup.queue.extend(("start", c) for c in targets)
                    self._advance(sup, now)
        return self._flush()

    # -- operator commands -------------------------------------------------

    def stop_child(self, child_id: str, now: float) -> list[Action]:
        node, parent = self._child_and_parent(child_id)
        node.held = True
        self._requeue(parent, child_id, [("stop", child_id)])
        self._advance(parent, now)
        return self._flush()

    def _not_removing(self, node: Node) -> None:
        if self._doomed(node):
            raise OtpdError("bad_request", f"{node.id!r} is being removed (a reload, or remove): it is not "
                            "started again", {"id": node.id, "state": node.state})

    def start_child(self, child_id: str, now: float) -> list[Action]:
        node, parent = self._child_and_parent(child_id)
        self._not_removing(node)
        node.held = False
        node.start_failures = 0
        if parent.state in UP_STATES:
            self._requeue(parent, child_id, [("start", child_id)])
            self._advance(parent, now)
        return self._flush()

    def restart_child(self, child_id: str, now: float) -> list[Action]:
        node, parent = self._child_and_parent(child_id)
        self._not_removing(node)
        node.held = False
        if parent.state in UP_STATES:
            self._requeue(parent, child_id, [("stop", child_id), ("start", child_id)])
            self._advance(parent, now)
        return self._flush()

    def add_child(self, sup_id: str, spec: AgentSpec, now: float) -> list[Action]:
        sup = self.get(sup_id)
        if not sup.is_supervisor or sup.sup.kind != "dynamic":
            raise OtpdError("bad_request", f"{sup_id!r} is not a dynamic supervisor")
        if sup.state not in UP_STATES:
            raise OtpdError("shutting_down", f"supervisor {sup_id!r} is {sup.state}")
        self._add(spec, sup_id)
        sup.queue.append(("start", spec.id))
        self._advance(sup, now)
        return self._flush()

    def remove_child(self, child_id: str, now: float) -> list[Action]:
        node, parent = self._child_and_parent(child_id)
        if parent.sup.kind != "dynamic":
            raise OtpdError("bad_request", f"{child_id!r} is not a child of a dynamic supervisor")
        node.held = node.removing = True
        if node.state in UP_STATES or node.state == "stopping":
            self._requeue(parent, child_id, [("stop", child_id)])
            self._advance(parent, now)
        else:
            self._forget(node, now)
        return self._flush()

    def reload(self, root: SupervisorSpec, now: float, new_code: frozenset[str] = frozenset(),
               config_args: Callable[[str], tuple[str, ...]] | None = None
               ) -> tuple[list[Action], dict[str, list[str]]]:
        """Move the running tree to a new spec; return its actions and what changed.

        Added children start, removed ones stop and are forgotten, agents whose
        process would differ (``agent``, ``args``, or a module of ``new_code`` that
        the shell imported anew) are restarted,
        and anything else (restart type, shutdown, heartbeat timeout, a
        supervisor's flags or template) is updated in place.  Untouched children
        keep their processes.  A node that moved to another supervisor, or a
        supervisor that changed kind, is removed and added.  Children of dynamic
        supervisors are not in the config and keep their specs, but for the args that only
        the config sets (``config_args(agent)``: which code a workflow may run): those follow
        their template's, and a child whose change restarts.
        """
        self.check_reload(root)
        summary: dict[str, list[str]] = {"added": [], "removed": [], "restarted": [], "updated": []}
        new: dict[str, tuple[ChildSpec, str | None]] = {}
        stack: list[tuple[ChildSpec, str | None]] = [(root, None)]
        while stack:
            spec, parent = stack.pop()
            new[spec.id] = (spec, parent)
            if isinstance(spec, SupervisorSpec):
                stack.extend((c, spec.id) for c in spec.children)
        for node in reversed(list(self.nodes.values())):  # (removed ones stop in reverse start order)
            if self.nodes.get(node.id) is not node or self._is_dynamic_child(node):
                continue
            spec_parent = new.get(node.id)
            if spec_parent is None or spec_parent[1] != node.parent or not _same_kind(node.spec, spec_parent[0]):
                if node.parent is not None:
                    self._remove_static(node, now)
                    summary["removed"].append(node.id)
        for child_id, (spec, _parent) in new.items():
            current = self.nodes.get(child_id)
            if current is None or self._doomed(current):
                continue
            new_version = isinstance(spec, AgentSpec) and spec.agent.partition(":")[0] in new_code
            if current.spec != spec or new_version:
                restart = new_version or _needs_new_process(current.spec, spec)
                differs, current.spec = _own(current.spec) != _own(spec), spec
                if restart and self._restart_for_reload(current):
                    summary["restarted"].append(child_id)
                elif differs:  # (down, or its next start is queued: that start runs it, new code too)
                    summary["updated"].append(child_id)
        if config_args is not None:
            self._follow_templates(config_args, summary)
        self._target = root
        self._add_missing(root, new, summary, now)
        if not any(n.removing for n in self.nodes.values()):
            self._target = None  # no removal to wait for, so nothing to add after one: settled can be true
        for node in self.nodes.values():  # converge: a permanent child that is, or is going, down comes up
            if node.parent is not None and not node.held and not node.removing and node.spec.restart == "permanent" \
                    and not self._is_dynamic_child(node) and self.nodes[node.parent].state in UP_STATES \
                    and not self._will_be_up(self.nodes[node.parent], node):
                self.nodes[node.parent].queue.append(("start", node.id))
        for sup in [n for n in self.nodes.values() if n.is_supervisor]:
            if sup.id in self.nodes:
                self._advance(sup, now)
        self._emit("reloaded", self.nodes[self.root_id], **{k: v for k, v in summary.items() if v})
        return self._flush(), summary

    def _pending(self, sup: Node, child_id: str) -> list[str]:
        """The ops ``sup`` has queued for ``child_id`` (a start held back by a backoff counts)."""
        ops = [op for op, c in sup.queue if c == child_id]
        if any(child_id in targets for targets in sup.delayed.values()):
            ops.append("start")
        return ops

    def _will_be_up(self, sup: Node, node: Node) -> bool:
        ops = self._pending(sup, node.id)
        if ops:
            return ops[-1] == "start"
        return node.state in UP_STATES

    def _restart_for_reload(self, node: Node) -> bool:
        """Restart ``node`` on its new spec, if it runs under a supervisor that is up and does
        not stop it already; False: it is down, or its supervisor stops it (a group restart, an
        escalation), and the start to come, if any, takes the new spec.  (A start queued for a
        child that is up does nothing: that is no restart.)"""
        if node.parent is None or node.state not in UP_STATES:
            return False
        sup = self.nodes[node.parent]
        if sup.state not in UP_STATES or "stop" in self._pending(sup, node.id):
            return False
        self._requeue(sup, node.id, [("stop", node.id), ("start", node.id)])
        return True

    def _follow_templates(self, config_args: Callable[[str], tuple[str, ...]], summary: dict[str, list[str]]) -> None:
        """A dynamic child's config-only args as its template has them now (set, or dropped)."""
        for sup in [n for n in self.nodes.values() if n.is_supervisor and n.sup.template is not None]:
            template = sup.sup.template
            assert template is not None
            if self._doomed(sup):
                continue
            for child_id in sup.children:
                node = self.nodes[child_id]
                spec = node.spec
                if not isinstance(spec, AgentSpec) or node.removing:
                    continue
                locked = config_args(spec.agent)
                args = {k: v for k, v in spec.args.items() if k not in locked}
                args.update((k, template.args[k]) for k in locked if k in template.args)
                if args == spec.args:
                    continue
                node.spec = replace(spec, args=args)
                summary["restarted" if self._restart_for_reload(node) else "updated"].append(child_id)

    def check_reload(self, root: SupervisorSpec) -> None:
        """``config_invalid`` if the new config names a child whose id a dynamic supervisor's
        added child has: a reload would otherwise take that child over in its place."""
        taken = sorted(spec.id for spec in walk(root)
                       if spec.id in self.nodes and self._is_dynamic_child(self.nodes[spec.id]))
        if taken:
            raise OtpdError("config_invalid", f"the new config is refused, nothing changed: "
                            f"{', '.join(taken)} {'is' if len(taken) == 1 else 'are'} already the id of a child added "
                            "to a dynamic supervisor (remove it first, or choose another id)", {"ids": taken})

    def _doomed(self, node: Node) -> bool:
        """True if the node or an ancestor is being removed."""
        at: Node | None = node
        while at is not None:
            if at.removing:
                return True
            at = self.nodes.get(at.parent) if at.parent is not None else None
        return False

    def _is_dynamic_child(self, node: Node) -> bool:
        return node.parent is not None and self.nodes[node.parent].sup.kind == "dynamic"

    def _remove_static(self, node: Node, now: float) -> None:
        node.removing = node.held = True
        if node.state in UP_STATES or node.state == "stopping":
            assert node.parent is not None
            self._requeue(self.nodes[node.parent], node.id, [("stop", node.id)])
        else:
            self._forget(node, now)

    def _add_missing(self, sup_spec: SupervisorSpec, new: dict[str, tuple[ChildSpec, str | None]],
                     summary: dict[str, list[str]], now: float) -> None:
        """Create the nodes the running tree lacks and put each supervisor's children in config order."""
        sup = self.nodes[sup_spec.id]
        for spec in sup_spec.children:
            existing = self.nodes.get(spec.id)
            if existing is None:
                subtree = walk(spec) if isinstance(spec, SupervisorSpec) else [spec]
                if not any(n.id in self.nodes for n in subtree):
                    self._add(spec, sup.id)
                    if sup.state in UP_STATES:
                        sup.queue.append(("start", spec.id))
                # else: an id of its subtree is still on its way out; added when it is gone
                summary["added"].append(spec.id)
            elif existing.removing:
                summary["added"].append(spec.id)  # moved here: added once the old one is gone
            elif isinstance(spec, SupervisorSpec) and existing.parent == sup.id:
                self._add_missing(spec, new, summary, now)
        _sort_children(sup)

    def shutdown(self, now: float) -> list[Action]:
        root = self.nodes[self.root_id]
        if root.state in UP_STATES:
            self._begin_stop(root, now)
        elif root.state != "stopping":
            self._out.append(Exit(EXIT_OK))
        return self._flush()

    # -- the machinery -----------------------------------------------------

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _set(self, node: Node, state: str) -> None:
        if state != node.state and state not in TRANSITIONS[node.state]:
            raise IllegalTransition(f"{node.id}: {node.state} -> {state}")
        if state != node.state:
            self.changed.add(node.id)
        node.state = state

    def _emit(self, event: str, node: Node, **details: Any) -> None:
        self._out.append(Emit(event, node.id, details))

    def _cancel(self, key: tuple[Any, ...]) -> None:
        self._out.append(CancelTimer(key))

    def _child_and_parent(self, child_id: str) -> tuple[Node, Node]:
        node = self.get(child_id)
        if node.parent is None:
            raise OtpdError("bad_request", "the root supervisor is stopped by shutdown")
        return node, self.nodes[node.parent]

    def _requeue(self, sup: Node, child_id: str, ops: list[tuple[str, str]]) -> None:
        """Replace whatever was pending for ``child_id`` with ``ops``."""
        sup.queue = deque(op for op in sup.queue if op[1] != child_id)
        if child_id in sup.waiting and self.nodes[child_id].state == "starting":
            sup.waiting.discard(child_id)  # its stop preempts the start we waited on
        sup.queue.extend(ops)

    def _advance(self, sup: Node, now: float) -> None:
        # A start or stop can finish at once (an empty nested supervisor) and
        # call back into this supervisor's _advance: the outer loop goes on.
        if sup.id in self._advancing:
            return
        self._advancing.add(sup.id)
        try:
            parallel = sup.is_supervisor and sup.sup.start == "parallel"
            while sup.queue and (not sup.waiting or (sup.overlap and sup.queue[0][0] == "start")):
                op, child_id = sup.queue.popleft()
                child = self.nodes.get(child_id)
                if child is None or child.parent != sup.id:
                    continue  # gone, or moved to another supervisor by a reload
                if op == "start":
                    if not sup.waiting:
                        sup.overlap = parallel
                    self._do_start(sup, child, now)
                elif self._stop_now(child, now):
                    sup.overlap = False
                    sup.waiting.add(child_id)
        finally:
            self._advancing.discard(sup.id)
        if not sup.waiting and not sup.queue and sup.id in self.nodes:
            self._settle(sup, now)

    def _do_start(self, sup: Node, child: Node, now: float) -> None:
        if child.held or child.state in UP_STATES or child.state == "stopping" or sup.state not in UP_STATES:
            return  # (a supervisor that is stopping starts nothing: what it stops stays down)
        self._set(child, "starting")
        if child.started_once:
            child.restarts += 1
            self._emit("restarted", child, restarts=child.restarts)
        child.started_once = True
        sup.waiting.add(child.id)
        if isinstance(child.spec, AgentSpec):
            self._token += 1
            child.token = self._token
            self._out.append(Spawn(child.id, child.spec, child.token))
        else:
            child.window = ()
            child.failing = False
            child.queue.extend(("start", c) for c in child.children)
            self._advance(child, now)

    def _stop_now(self, child: Node, now: float) -> bool:
        """Begin stopping ``child``; True if the caller must wait for it to be down."""
        if child.state == "stopping":
            return True
        if child.state not in UP_STATES:
            if child.state == "restarting":
                self._set(child, "stopped")
            return False
        if child.is_supervisor:
            self._begin_stop(child, now)
            return child.state == "stopping"
        self._set(child, "stopping")
        spec = child.spec
        assert isinstance(spec, AgentSpec)
        if spec.shutdown_ms is None:
            self._out.append(Signal(child.id, "KILL"))
        else:
            self._out.append(Signal(child.id, "TERM"))
            self._out.append(SetTimer(("kill", child.id), now + spec.shutdown_ms / 1000.0))
        return True

    def _begin_stop(self, sup: Node, now: float) -> None:
        """Stop every child of ``sup``: in reverse order, or all at once if dynamic or parallel."""
        self._set(sup, "stopping")
        sup.queue.clear()
        sup.waiting.clear()
        sup.delayed.clear()
        sup.overlap = False
        if sup.sup.kind == "dynamic" or sup.sup.start == "parallel":
            for child_id in reversed(sup.children):
                if self._stop_now(self.nodes[child_id], now):
                    sup.waiting.add(child_id)
        else:
            sup.queue.extend(("stop", c) for c in reversed(sup.children))
        self._advance(sup, now)

    def _settle(self, sup: Node, now: float) -> None:
        """The supervisor's queue is empty: it is now up, or down."""
        if sup.state == "starting":
            self._set(sup, "running")
            if sup.parent is not None:
                self._emit("ready", sup)
                self._up(sup, now)
            else:
                self._emit("ready", sup)
        elif sup.state == "stopping":
            reason: Reason = "crash" if sup.failing else "shutdown"
            if sup.parent is None:
                self._set(sup, "failed" if sup.failing else "stopped")
                self._out.append(Exit(EXIT_ESCALATED if sup.failing else EXIT_OK))
            else:
                self._down(sup, reason, now, {})

    def _up(self, node: Node, now: float) -> None:
        assert node.parent is not None
        parent = self.nodes[node.parent]
        if node.id in parent.waiting:
            parent.waiting.discard(node.id)
            self._advance(parent, now)

    def _down(self, node: Node, reason: Reason, now: float, details: dict[str, Any]) -> None:
        assert node.parent is not None
        parent = self.nodes[node.parent]
        was = node.state
        node.pid = None
        parent.waiting.discard(node.id)
        if node.failing:
            self._set(node, "failed")  # a supervisor that gave up: a crash to its parent
        elif was == "stopping":
            self._set(node, "stopped")
            self._emit("stopped", node, reason=reason, **details)
            if node.removing:
                self._forget(node, now)
            self._advance(parent, now)
            return
        start_failure = was == "starting"
        self._emit("exited", node, reason=reason, start_failure=start_failure, **details)
        restart = should_restart(node.spec.restart, reason) and not node.held
        if parent.state == "stopping" or node.removing or not restart:
            self._set(node, "failed" if reason == "crash" else "stopped")
            if node.removing or (parent.sup.kind == "dynamic" and not restart and not details.get("fatal")):
                self._forget(node, now)
            self._advance(parent, now)
            return
        node.start_failures = node.start_failures + 1 if start_failure else 0
        self._restart(parent, node, now)
        self._advance(parent, now)

    def _restart(self, sup: Node, child: Node, now: float) -> None:
        spec = sup.sup
        sup.window, within = add_restart(sup.window, now, spec.max_restarts, spec.max_seconds)
        if not within:
            self._set(child, "failed")
            self._emit(
                "escalated",
                sup,
                child=child.id,
                max_restarts=spec.max_restarts,
                max_seconds=spec.max_seconds,
            )
            sup.failing = True
            self._begin_stop(sup, now)
            return
        group = self._group(sup, child)
        in_group = set(group)
        sup.queue = deque(op for op in sup.queue if op[1] not in in_group)
        sup.waiting -= in_group
        sup.queue.extend(("stop", c) for c in reversed(group) if c != child.id)
        self._set(child, "restarting")
        targets = [
            c for c in group if c == child.id or self.nodes[c].spec.restart != "temporary"
        ]
        delay = backoff_delay(child.start_failures)
        if delay == 0.0:
            sup.queue.extend(("start", c) for c in targets)
        else:
            sup.timer_seq += 1
            sup.delayed[sup.timer_seq] = targets
            self._out.append(SetTimer(("restart", sup.id, sup.timer_seq), now + delay))

    def _group(self, sup: Node, child: Node) -> list[str]:
        strategy = sup.sup.strategy
        if strategy == "one_for_all":
            return list(sup.children)
        if strategy == "rest_for_one":
            return sup.children[sup.children.index(child.id) :]
        return [child.id]

    def _forget(self, node: Node, now: float) -> None:
        """Delete a node that is down, with its whole subtree."""
        assert node.parent is not None
        parent = self.nodes[node.parent]
        parent.children.remove(node.id)
        parent.waiting.discard(node.id)
        parent.queue = deque(op for op in parent.queue if op[1] != node.id)
        stack = [node.id]
        while stack:
            gone = self.nodes.pop(stack.pop())
            self.changed.add(gone.id)
            stack.extend(gone.children)
        self._emit("removed", node)
        if self._target is not None and not any(n.removing for n in self.nodes.values()):
            # The last removal of a reload is done: add what moved (from the newest config).
            target, self._target = self._target, None
            self._add_missing(target, {}, {"added": []}, now)
            for sup in [n for n in self.nodes.values() if n.is_supervisor and n.queue]:
                self._advance(sup, now)


def _same_kind(old: ChildSpec, new: ChildSpec) -> bool:
    if isinstance(old, SupervisorSpec) and isinstance(new, SupervisorSpec):
        return old.kind == new.kind
    return isinstance(old, AgentSpec) and isinstance(new, AgentSpec)


def _own(spec: ChildSpec) -> ChildSpec:
    """A spec without its children: what is a supervisor's own (a change below it is not its)."""
    return replace(spec, children=()) if isinstance(spec, SupervisorSpec) else spec


def _needs_new_process(old: ChildSpec, new: ChildSpec) -> bool:
    """An agent must be restarted when what its process runs would differ."""
    if isinstance(old, AgentSpec) and isinstance(new, AgentSpec):
        return (old.agent, old.args) != (new.agent, new.args)
    return False


def _sort_children(sup: Node) -> None:
    """Config order for a static supervisor's children (a reload may have changed it)."""
    if sup.sup.kind == "static":
        order = {spec.id: i for i, spec in enumerate(sup.sup.children)}
        sup.children.sort(key=lambda c: order.get(c, len(order)))
