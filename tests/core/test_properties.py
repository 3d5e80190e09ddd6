"""Property-based tests of the core: intensity against a model, and invariants
that hold under any sequence of crashes, readiness, timers and commands."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from otpd.core.intensity import add_restart
from otpd.core.tree import EXIT_ESCALATED, EXIT_OK
from otpd.errors import OtpdError
from tests.core.sim import Sim, agent, sup


def escalates_at(times: list[float], max_restarts: int, max_seconds: float) -> int | None:
    """Model: the index of the first crash with more than max_restarts restarts in its window."""
    for i, t in enumerate(times):
        if sum(1 for u in times[: i + 1] if t - u <= max_seconds) > max_restarts:
            return i
    return None


@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=3.0, allow_nan=False), min_size=1, max_size=40),
    max_restarts=st.integers(min_value=0, max_value=6),
    max_seconds=st.floats(min_value=0.5, max_value=10.0),
)
def test_escalation_happens_exactly_when_the_model_says(gaps: list[float], max_restarts: int,
                                                         max_seconds: float) -> None:
    sim = Sim(sup("root", agent("a"), max_restarts=max_restarts, max_seconds=max_seconds)).start()
    times: list[float] = []
    for gap in gaps:
        sim.advance(gap)
        times.append(sim.now)
        sim.crash("a")
        if sim.exit is not None:
            break
    expected = escalates_at(times, max_restarts, max_seconds)
    if expected is None:
        assert sim.exit is None and sim.state("a") == "running"
    else:
        assert sim.exit == EXIT_ESCALATED and len(times) == expected + 1


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=30),
       st.integers(min_value=0, max_value=5), st.floats(min_value=0.1, max_value=20))
def test_add_restart_window_never_holds_stale_entries(times: list[float], max_restarts: int,
                                                      max_seconds: float) -> None:
    window: tuple[float, ...] = ()
    for now in sorted(times):
        window, ok = add_restart(window, now, max_restarts, max_seconds)
        assert all(now - t <= max_seconds for t in window)
        assert ok == (len(window) <= max_restarts)


def tree_spec(strategy: str, inner: str, variant: int = 0, start: str = "serial") -> Any:
    """The tree of the property tests; variants are what a reload may turn it into."""
    s_children = [agent("b"), agent("c", restart="transient"), agent("d", restart="temporary")]
    top = [agent("a"), sup("s", *s_children, strategy=inner, max_restarts=4, max_seconds=2, start=start),
           sup("dyn", kind="dynamic", max_restarts=4, max_seconds=2), agent("e", shutdown_ms=None)]
    if variant == 1:  # one removed, one added, one changed
        top = [agent("a", restart="transient"), sup("s", s_children[0], agent("x"), strategy=inner, start=start),
               top[2], agent("e", shutdown_ms=None), agent("f")]
    elif variant == 2:  # a moved child and a removed supervisor
        top = [agent("a"), sup("dyn", kind="dynamic"), agent("e", shutdown_ms=None), agent("b")]
    return sup("root", *top, strategy=strategy, max_restarts=6, max_seconds=3)


def build_tree(strategy: str, inner: str, start: str = "serial") -> Sim:
    return Sim(tree_spec(strategy, inner, start=start), auto_ready=False, auto_exit_on_term=False)


def check_invariants(sim: Sim) -> None:
    for node in sim.tree.nodes.values():
        if node.is_supervisor:
            if node.sup.kind == "static" and node.sup.start == "serial":
                assert len(node.waiting) <= 1, f"{node.id} waits on {node.waiting}"
            elif len(node.waiting) > 1 and node.state != "stopping":  # only starts overlap
                assert all(sim.tree.nodes[c].state == "starting" for c in node.waiting), node.waiting
            for cid in node.children:
                assert sim.tree.nodes[cid].parent == node.id
            continue
        live = node.state in ("starting", "running", "stopping")
        assert (node.pid is not None) == live, f"{node.id} {node.state} pid={node.pid}"


def check_settled(sim: Sim) -> None:
    for node in sim.tree.nodes.values():
        if node.is_supervisor:
            assert not node.queue and not node.waiting, f"{node.id} stuck: {node.queue} {node.waiting}"
        chain, up = node.parent, True
        while chain is not None:
            up = up and sim.tree.nodes[chain].state == "running"
            chain = sim.tree.nodes[chain].parent
        if up and node.spec.restart == "permanent" and not node.held:
            assert node.state == "running", f"{node.id} is {node.state}"


STRATEGIES = st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"])


@settings(max_examples=int(os.environ.get("OTPD_PROPERTY_EXAMPLES", "300")), deadline=None)
@given(strategy=STRATEGIES, inner=STRATEGIES, data=st.data())
def test_any_event_sequence_keeps_the_tree_consistent_and_shutdown_completes(strategy: str, inner: str,
                                                                            data: st.DataObject) -> None:
    start = data.draw(st.sampled_from(["serial", "parallel"]), label="start")
    sim = build_tree(strategy, inner, start).start()
    added = 0
    for _ in range(data.draw(st.integers(min_value=0, max_value=60), label="steps")):
        if sim.exit is not None:
            break
        nodes = sim.tree.nodes
        agents = sorted(n.id for n in nodes.values() if not n.is_supervisor)
        step = data.draw(st.sampled_from(["ready", "crash", "term_ack", "advance", "stop", "start",
                                          "restart", "add", "remove", "reload"]), label="step")
        cid = data.draw(st.sampled_from(agents), label="child") if agents else None
        node = nodes.get(cid) if cid else None
        try:
            if step == "ready" and node and node.state == "starting":
                sim.ready(cid)
            elif step == "crash" and node and node.pid is not None:
                sim.crash(cid, data.draw(st.sampled_from(["normal", "shutdown", "crash"]), label="reason"))
            elif step == "term_ack" and node and node.state == "stopping":
                sim.crash(cid, "shutdown")
            elif step == "advance":
                sim.advance(data.draw(st.sampled_from([0.01, 0.2, 1.0, 5.0]), label="dt"))
            elif step == "stop" and cid:
                sim.apply(sim.tree.stop_child(cid, sim.now))
            elif step == "start" and cid:
                sim.apply(sim.tree.start_child(cid, sim.now))
            elif step == "restart" and cid:
                sim.apply(sim.tree.restart_child(cid, sim.now))
            elif step == "add":
                added += 1
                sim.apply(sim.tree.add_child("dyn", agent(f"w{added}", restart="transient"), sim.now))
            elif step == "remove" and cid and node and node.parent == "dyn":
                sim.apply(sim.tree.remove_child(cid, sim.now))
            elif step == "reload":
                variant = data.draw(st.integers(0, 2), label="variant")
                sim.apply(sim.tree.reload(tree_spec(strategy, inner, variant, start), sim.now)[0])
        except OtpdError as err:
            assert err.code in ("shutting_down", "not_found", "bad_request")
        check_invariants(sim)

    # Liveness: with every process obeying, the tree settles with nothing stuck.
    for _ in range(50):
        if sim.exit is not None:
            break
        for n in list(sim.tree.nodes.values()):
            if not n.is_supervisor and n.state == "starting":
                sim.ready(n.id)
            elif not n.is_supervisor and n.state == "stopping":
                sim.crash(n.id, "shutdown")
        sim.advance(10.0)
    if sim.exit is None:
        check_settled(sim)

    # Whatever happened, a shutdown with every process obeying ends in Exit.
    if sim.exit is None:
        sim.apply(sim.tree.shutdown(sim.now))
    for _ in range(200):
        if sim.exit is not None:
            break
        live = [n for n in sim.tree.nodes.values() if not n.is_supervisor and n.state in ("starting", "stopping")]
        for n in live:
            if n.state == "starting":
                sim.ready(n.id)
            else:
                sim.crash(n.id, "shutdown")
        sim.advance(1.0)
        check_invariants(sim)
    assert sim.exit in (EXIT_OK, EXIT_ESCALATED)
    assert all(n.pid is None for n in sim.tree.nodes.values())
