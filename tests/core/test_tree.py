"""The pure supervision core, driven with a fake clock and a pretend OS."""

from __future__ import annotations

import pytest

from otpd.core.intensity import BACKOFF_CAP_S, add_restart, backoff_delay
from otpd.core.spec import AgentSpec
from otpd.core.tree import EXIT_ESCALATED, EXIT_OK, IllegalTransition, should_restart
from otpd.errors import OtpdError
from tests.core.sim import Sim, agent, sup

# -- start order ------------------------------------------------------------


def test_children_start_in_order_each_ready_before_the_next() -> None:
    sim = Sim(sup("root", agent("a"), agent("b"), agent("c")), auto_ready=False).start()
    assert sim.spawns == ["a"]
    sim.ready("a")
    assert sim.spawns == ["a", "b"]
    sim.ready("b")
    sim.ready("c")
    assert sim.spawns == ["a", "b", "c"]
    assert [sim.state(c) for c in "abc"] == ["running"] * 3
    assert ("ready", "root", {}) in sim.events


def test_nested_supervisor_is_running_after_its_children() -> None:
    sim = Sim(sup("root", agent("a"), sup("s", agent("b"), agent("c")), agent("d"))).start()
    assert sim.spawns == ["a", "b", "c", "d"]
    assert sim.names("ready") == ["a", "b", "c", "s", "d", "root"]


def test_empty_nested_supervisors_do_not_stall_the_start() -> None:
    sim = Sim(sup("root", sup("s1"), sup("s2", sup("s3")), agent("a"))).start()
    assert sim.state("a") == "running"
    assert sim.state("s3") == "running"


def test_parallel_start_forks_every_child_before_any_is_ready() -> None:
    sim = Sim(sup("root", sup("pool", agent("a"), agent("b"), agent("c"), start="parallel"), agent("z")),
              auto_ready=False).start()
    assert sim.spawns == ["a", "b", "c"]
    sim.ready("b")
    sim.ready("a")
    assert sim.state("pool") == "starting" and sim.spawns == ["a", "b", "c"]
    sim.ready("c")
    assert sim.state("pool") == "running"
    assert sim.spawns == ["a", "b", "c", "z"]  # the pool's parent is serial: z waits for the whole pool


def test_parallel_pool_start_failure_is_retried_and_the_rest_keep_going() -> None:
    sim = Sim(sup("root", agent("a"), agent("b"), start="parallel"), auto_ready=False).start()
    sim.ready("a")
    sim.crash("b", "crash")  # before ready: a start failure, restarted after its backoff
    assert sim.state("a") == "running" and sim.state("b") == "restarting"
    sim.advance(10.0)
    assert sim.state("b") == "starting"
    sim.ready("b")
    assert sim.state("root") == "running"


def test_parallel_stop_waits_for_pending_starts_then_stops_all_at_once() -> None:
    sim = Sim(sup("root", agent("a"), agent("b"), agent("c"), start="parallel")).start()
    sim.auto_exit_on_term = False
    sim.apply(sim.tree.shutdown(sim.now))
    assert sorted(c for c, _ in sim.signals) == ["a", "b", "c"]  # all signalled before any exited
    for c in "abc":
        sim.crash(c, "shutdown")
    assert sim.exit == EXIT_OK


def test_parallel_one_for_all_restarts_the_group_in_parallel() -> None:
    sim = Sim(sup("root", agent("a"), agent("b"), agent("c"), strategy="one_for_all", start="parallel"),
              auto_ready=False).start()
    for c in "abc":
        sim.ready(c)
    sim.crash("b", "crash")  # a and c are stopped (serially, in reverse), then all three start together
    assert sim.spawns[3:] == ["a", "b", "c"]
    assert [sim.state(c) for c in "abc"] == ["starting"] * 3


# -- restart type x exit reason (OTP's table) ---------------------------------

RESTART_TABLE = [
    ("permanent", "normal", True), ("permanent", "shutdown", True), ("permanent", "crash", True),
    ("transient", "normal", False), ("transient", "shutdown", False), ("transient", "crash", True),
    ("temporary", "normal", False), ("temporary", "shutdown", False), ("temporary", "crash", False),
]


@pytest.mark.parametrize("restart,reason,expected", RESTART_TABLE)
def test_should_restart_follows_otp(restart: str, reason: str, expected: bool) -> None:
    assert should_restart(restart, reason) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_all", "rest_for_one"])
@pytest.mark.parametrize("restart,reason,expected", RESTART_TABLE)
def test_each_strategy_applies_the_restart_table(strategy: str, restart: str, reason: str, expected: bool) -> None:
    sim = Sim(sup("root", agent("x", restart=restart), agent("y"), strategy=strategy)).start()
    old = sim.pid("x")
    sim.crash("x", reason)
    if expected:
        assert sim.state("x") == "running" and sim.pid("x") != old
    else:
        assert sim.state("x") == ("failed" if reason == "crash" else "stopped")
        assert sim.state("y") == "running"
        assert sim.names("restarted") == []


def test_transient_child_not_restarted_after_normal_exit() -> None:
    sim = Sim(sup("root", agent("t", restart="transient"))).start()
    sim.crash("t", "normal")
    assert sim.state("t") == "stopped"
    assert sim.exit is None


# -- strategies ------------------------------------------------------------------


def test_one_for_one_restarts_only_the_child() -> None:
    sim = Sim(sup("root", agent("a"), agent("b"), agent("c"))).start()
    pids = {c: sim.pid(c) for c in "abc"}
    sim.clear()
    sim.crash("b")
    assert sim.spawns == ["b"]
    assert sim.pid("a") == pids["a"] and sim.pid("c") == pids["c"] and sim.pid("b") != pids["b"]


def test_one_for_all_stops_survivors_in_reverse_then_starts_all_in_order() -> None:
    sim = Sim(sup("root", agent("a"), agent("b"), agent("c"), strategy="one_for_all")).start()
    sim.clear()
    sim.crash("b")
    assert sim.signals == [("c", "TERM"), ("a", "TERM")]
    assert sim.spawns == ["a", "b", "c"]
    assert all(sim.state(c) == "running" for c in "abc")


def test_rest_for_one_restarts_the_child_and_those_after_it() -> None:
    sim = Sim(sup("root", agent("a"), agent("b"), agent("c"), agent("d"), strategy="rest_for_one")).start()
    a = sim.pid("a")
    sim.clear()
    sim.crash("b")
    assert sim.signals == [("d", "TERM"), ("c", "TERM")]
    assert sim.spawns == ["b", "c", "d"]
    assert sim.pid("a") == a


def test_one_for_all_does_not_restart_temporary_siblings() -> None:
    sim = Sim(sup("root", agent("a"), agent("t", restart="temporary"), strategy="one_for_all")).start()
    sim.crash("a")
    assert sim.state("a") == "running"
    assert sim.state("t") == "stopped"


def test_crash_during_a_group_restart_restarts_the_group_again() -> None:
    sim = Sim(sup("root", agent("a"), agent("b"), agent("c"), strategy="one_for_all", max_restarts=10),
              auto_ready=False).start()
    for c in "abc":
        sim.ready(c)
    sim.crash("a")  # survivors b, c stopped (auto TERM ack), then a is spawned
    assert sim.state("a") == "starting"
    sim.ready("a")
    assert sim.state("b") == "starting"
    sim.crash("a")  # a dies while b is starting: b is stopped and everything restarts
    assert sim.state("b") == "stopping" or sim.state("b") in ("stopped", "starting")
    for _ in range(6):
        for c in "abc":
            if sim.state(c) == "starting":
                sim.ready(c)
    assert [sim.state(c) for c in "abc"] == ["running"] * 3


# -- intensity and escalation ---------------------------------------------------


def test_root_over_intensity_stops_everything_and_exits_escalated() -> None:
    sim = Sim(sup("root", agent("a"), agent("b"), max_restarts=3, max_seconds=5)).start()
    for _ in range(3):
        sim.crash("a")
        sim.advance(0.1)
    assert sim.exit is None
    sim.crash("a")
    assert ("escalated", "root") in [(e, c) for e, c, _ in sim.events]
    assert sim.state("b") == "stopped"
    assert sim.exit == EXIT_ESCALATED


def test_restarts_spread_beyond_the_window_never_escalate() -> None:
    sim = Sim(sup("root", agent("a"), max_restarts=3, max_seconds=5)).start()
    for _ in range(50):
        sim.crash("a")
        sim.advance(2.0)
    assert sim.exit is None
    assert sim.tree.nodes["a"].restarts == 50


def test_nested_supervisor_escalates_and_its_parent_restarts_it() -> None:
    sim = Sim(sup("root", agent("x"), sup("s", agent("a"), agent("b"), max_restarts=1), agent("y"),
                  max_restarts=5)).start()
    x, y, b = sim.pid("x"), sim.pid("y"), sim.pid("b")
    sim.crash("a")
    sim.crash("a")  # second restart within the window: s gives up
    assert ("escalated", "s") in [(e, c) for e, c, _ in sim.events]
    assert sim.state("s") == "running" and sim.tree.nodes["s"].restarts == 1
    assert sim.state("a") == "running" and sim.pid("b") != b
    assert sim.pid("x") == x and sim.pid("y") == y
    assert sim.exit is None


def test_supervisor_over_intensity_stops_its_children_before_failing() -> None:
    sim = Sim(sup("root", sup("s", agent("a"), agent("b"), agent("c"), max_restarts=0), max_restarts=0)).start()
    sim.clear()
    sim.crash("b")
    assert sim.signals[:2] == [("c", "TERM"), ("a", "TERM")]
    assert sim.exit == EXIT_ESCALATED


# -- start failures and backoff ---------------------------------------------------


def test_start_failure_is_restarted_after_a_growing_capped_backoff() -> None:
    sim = Sim(sup("root", agent("a"), max_restarts=100, max_seconds=1000), auto_ready=False).start()
    delays = []
    for _ in range(10):
        sim.crash("a")  # dies before ready
        (key, at), = [(k, at) for k, at in sim.timers.items() if k[0] == "restart"]
        delays.append(round(at - sim.now, 6))
        sim.advance(at - sim.now)
        assert sim.state("a") == "starting"
    assert delays == [backoff_delay(n) for n in range(1, 11)]
    assert delays == sorted(delays) and delays[-1] == BACKOFF_CAP_S
    assert all(e[2]["start_failure"] for e in sim.events if e[0] == "exited")


def test_backoff_resets_once_the_child_is_ready() -> None:
    sim = Sim(sup("root", agent("a"), max_restarts=100), auto_ready=False).start()
    sim.crash("a")
    sim.advance(1)
    sim.ready("a")
    sim.crash("a")  # a crash of a running child restarts at once
    assert sim.state("a") == "starting"


def test_a_child_crashing_in_init_escalates_within_the_intensity() -> None:
    sim = Sim(sup("root", agent("a")), auto_ready=False).start()
    for _ in range(10):
        if sim.exit is not None:
            break
        sim.crash("a")  # fails as soon as it is started again
        sim.advance(max((at - sim.now for k, at in sim.timers.items() if k[0] == "restart"), default=0))
    assert sim.exit == EXIT_ESCALATED
    assert sim.now < 1.0  # 4 start failures: 0.05 + 0.1 + 0.2 s of backoff


# -- shutdown ladder ---------------------------------------------------------------


def test_shutdown_stops_children_in_reverse_order_and_exits_ok() -> None:
    sim = Sim(sup("root", agent("a"), sup("s", agent("b"), agent("c")), agent("d"))).start()
    sim.clear()
    sim.apply(sim.tree.shutdown(sim.now))
    assert [c for c, _ in sim.signals] == ["d", "c", "b", "a"]
    assert sim.names("stopped") == ["d", "c", "b", "s", "a"]
    assert sim.exit == EXIT_OK


def test_child_ignoring_sigterm_is_killed_after_shutdown_ms() -> None:
    sim = Sim(sup("root", agent("a", shutdown_ms=300), agent("b", shutdown_ms=300)), auto_exit_on_term=False).start()
    sim.clear()
    sim.apply(sim.tree.shutdown(sim.now))
    assert sim.signals == [("b", "TERM")]
    sim.advance(0.299)
    assert sim.signals == [("b", "TERM")]
    sim.advance(0.002)
    assert sim.signals == [("b", "TERM"), ("b", "KILL"), ("a", "TERM")]
    sim.advance(0.301)
    assert sim.signals[-1] == ("a", "KILL")
    assert sim.exit == EXIT_OK


def test_brutal_kill_sends_sigkill_at_once() -> None:
    sim = Sim(sup("root", agent("a", shutdown_ms=None))).start()
    sim.clear()
    sim.apply(sim.tree.shutdown(sim.now))
    assert sim.signals == [("a", "KILL")]
    assert sim.exit == EXIT_OK


def test_dynamic_supervisor_stops_its_children_all_at_once() -> None:
    sim = Sim(sup("root", sup("dyn", kind="dynamic")), auto_exit_on_term=False).start()
    for i in range(3):
        sim.apply(sim.tree.add_child("dyn", agent(f"w{i}", restart="transient"), sim.now))
    sim.clear()
    sim.apply(sim.tree.shutdown(sim.now))
    assert sim.signals == [("w2", "TERM"), ("w1", "TERM"), ("w0", "TERM")]


def test_shutdown_during_start_stops_the_starting_child() -> None:
    sim = Sim(sup("root", agent("a"), agent("b")), auto_ready=False).start()
    sim.apply(sim.tree.shutdown(sim.now))
    assert sim.signals == [("a", "TERM")]
    assert sim.exit == EXIT_OK
    assert sim.spawns == ["a"]


# -- operator commands -------------------------------------------------------------


def test_stopped_child_stays_down_through_group_restarts_until_started() -> None:
    sim = Sim(sup("root", agent("a"), agent("b"), strategy="one_for_all")).start()
    sim.apply(sim.tree.stop_child("b", sim.now))
    assert sim.state("b") == "stopped"
    sim.crash("a")
    assert sim.state("a") == "running" and sim.state("b") == "stopped"
    sim.apply(sim.tree.start_child("b", sim.now))
    assert sim.state("b") == "running"


def test_restart_child_gives_a_new_process_without_counting_intensity() -> None:
    sim = Sim(sup("root", agent("a"), max_restarts=0)).start()
    old = sim.pid("a")
    for _ in range(5):
        sim.apply(sim.tree.restart_child("a", sim.now))
    assert sim.state("a") == "running" and sim.pid("a") != old and sim.exit is None


def test_dynamic_children_are_added_removed_and_forgotten_when_done() -> None:
    sim = Sim(sup("root", sup("dyn", kind="dynamic"))).start()
    sim.apply(sim.tree.add_child("dyn", agent("w1", restart="transient"), sim.now))
    sim.apply(sim.tree.add_child("dyn", agent("w2", restart="transient"), sim.now))
    assert sim.state("w1") == "running"
    with pytest.raises(OtpdError) as err:
        sim.tree.add_child("dyn", agent("w1"), sim.now)
    assert err.value.code == "already_exists"
    sim.crash("w1", "normal")  # a transient child done for good is forgotten
    assert "w1" not in sim.tree.nodes
    sim.apply(sim.tree.remove_child("w2", sim.now))
    assert "w2" not in sim.tree.nodes
    assert sim.tree.nodes["dyn"].children == []


def test_adding_to_a_static_supervisor_is_refused() -> None:
    sim = Sim(sup("root", agent("a"))).start()
    with pytest.raises(OtpdError) as err:
        sim.tree.add_child("root", agent("b"), sim.now)
    assert err.value.code == "bad_request"


def test_unknown_child_is_not_found() -> None:
    sim = Sim(sup("root", agent("a"))).start()
    with pytest.raises(OtpdError) as err:
        sim.tree.stop_child("nope", sim.now)
    assert err.value.code == "not_found"


def test_illegal_transition_raises() -> None:
    sim = Sim(sup("root", agent("a"))).start()
    node = sim.tree.nodes["a"]
    with pytest.raises(IllegalTransition):
        sim.tree._set(node, "stopping")  # fine from running
        sim.tree._set(node, "running")  # stopping -> running is not a move


def test_snapshot_is_depth_first_in_start_order() -> None:
    sim = Sim(sup("root", agent("a"), sup("s", agent("b")), agent("c"))).start()
    snap = sim.tree.snapshot()
    assert [(c["id"], c["supervisor"], c["type"]) for c in snap] == [
        ("a", "root", "agent"), ("s", "root", "supervisor"), ("b", "s", "agent"), ("c", "root", "agent")]
    assert snap[1]["pid"] is None


# -- intensity window ----------------------------------------------------------------


def test_add_restart_keeps_only_the_period() -> None:
    window, ok = add_restart((0.0, 1.0, 2.0), 6.5, 3, 5)
    assert window == (2.0, 6.5) and ok


# -- reload ------------------------------------------------------------------------


def test_reload_starts_added_stops_removed_restarts_changed_and_keeps_the_rest() -> None:
    sim = Sim(sup("root", agent("a"), agent("b"), agent("c"), sup("s", agent("d")))).start()
    pids = {c: sim.pid(c) for c in "abcd"}
    changed_b = AgentSpec(id="b", agent="otpd.agents.kv:KVAgent")
    new_root = sup("root", agent("a"), changed_b, sup("s", agent("d"), agent("e")), agent("f"))
    actions, summary = sim.tree.reload(new_root, sim.now)
    sim.apply(actions)
    # ("updated" names no supervisor whose only change is below it)
    assert summary == {"added": ["e", "f"], "removed": ["c"], "restarted": ["b"], "updated": []}
    assert "c" not in sim.tree.nodes
    assert sim.pid("a") == pids["a"] and sim.pid("d") == pids["d"]
    assert sim.pid("b") != pids["b"] and sim.tree.nodes["b"].spec == changed_b
    assert sim.state("e") == "running" and sim.state("f") == "running"
    assert [c["id"] for c in sim.tree.snapshot()] == ["a", "b", "s", "d", "e", "f"]


def test_reload_restarts_the_running_agents_of_a_module_imported_anew_and_only_them() -> None:
    new_code = AgentSpec(id="n", agent="newcode:Agent")
    ended = AgentSpec(id="t", agent="newcode:Agent", restart="temporary")
    root = sup("root", agent("a"), new_code, ended)
    sim = Sim(root).start()
    sim.crash("t", "normal")  # a temporary that ended: down, and it stays down
    pids = {c: sim.pid(c) for c in "an"}
    actions, summary = sim.tree.reload(root, sim.now, frozenset({"newcode"}))
    sim.apply(actions)
    assert summary["restarted"] == ["n"] and summary["updated"] == [] and sim.state("t") == "stopped"
    assert sim.pid("a") == pids["a"] and sim.pid("n") != pids["n"] and sim.state("n") == "running"


def test_reload_updates_supervision_settings_in_place() -> None:
    sim = Sim(sup("root", agent("a", restart="permanent"), max_restarts=3)).start()
    pid = sim.pid("a")
    actions, summary = sim.tree.reload(sup("root", agent("a", restart="transient"), max_restarts=9), sim.now)
    sim.apply(actions)
    assert summary["updated"] == ["root", "a"] and sim.pid("a") == pid
    sim.crash("a", "normal")
    assert sim.state("a") == "stopped"  # transient now


def test_reload_moves_a_child_between_supervisors() -> None:
    sim = Sim(sup("root", sup("s1", agent("a")), sup("s2"))).start()
    actions, summary = sim.tree.reload(sup("root", sup("s1"), sup("s2", agent("a"))), sim.now)
    sim.apply(actions)
    assert sim.tree.nodes["a"].parent == "s2" and sim.state("a") == "running"
    assert "a" in summary["removed"] and "a" in summary["added"]


def test_reload_leaves_dynamic_children_alone() -> None:
    sim = Sim(sup("root", sup("dyn", kind="dynamic"))).start()
    sim.apply(sim.tree.add_child("dyn", agent("w1", restart="transient"), sim.now))
    pid = sim.pid("w1")
    actions, _ = sim.tree.reload(sup("root", sup("dyn", kind="dynamic", max_restarts=7)), sim.now)
    sim.apply(actions)
    assert sim.pid("w1") == pid



def test_a_reload_that_removes_nothing_is_settled_at_once() -> None:
    """settled() gates the daemon's READY=1 after a reload: one that removed nothing (no
    change at all, or only additions and restarts) must not leave it waiting for ever."""
    sim = Sim(sup("root", agent("a"))).start()
    sim.apply(sim.tree.reload(sup("root", agent("a")), sim.now)[0])
    assert sim.tree.settled()
    sim.apply(sim.tree.reload(sup("root", agent("a"), agent("b")), sim.now)[0])
    assert sim.state("b") == "running" and sim.tree.settled()


def test_a_reload_naming_a_dynamic_childs_id_is_refused_and_changes_nothing() -> None:
    sim = Sim(sup("root", sup("dyn", kind="dynamic"))).start()
    sim.apply(sim.tree.add_child("dyn", agent("w1", restart="transient"), sim.now))
    pid, spec = sim.pid("w1"), sim.tree.nodes["w1"].spec
    with pytest.raises(OtpdError) as err:
        sim.tree.reload(sup("root", sup("dyn", kind="dynamic"), agent("w1"), agent("x")), sim.now)
    assert err.value.code == "config_invalid" and err.value.details == {"ids": ["w1"]}
    assert sim.pid("w1") == pid and sim.tree.nodes["w1"].spec == spec and sim.tree.nodes["w1"].parent == "dyn"
    assert "x" not in sim.tree.nodes and sim.tree.settled()

def test_reload_removing_a_supervisor_stops_its_subtree() -> None:
    sim = Sim(sup("root", agent("a"), sup("s", agent("b"), agent("c")))).start()
    sim.clear()
    actions, summary = sim.tree.reload(sup("root", agent("a")), sim.now)
    sim.apply(actions)
    assert [c for c, _ in sim.signals] == ["c", "b"]
    assert set(sim.tree.nodes) == {"root", "a"}


# -- reload against what is in flight (found by a review helper) -------------------------------


def _echo(cid: str, restart: str = "permanent", v: int = 0) -> AgentSpec:
    return AgentSpec(id=cid, agent="otpd.agents.echo:EchoAgent", restart=restart, shutdown_ms=1000, args={"v": v})


def test_a_reload_restarts_nothing_inside_a_supervisor_that_is_stopping() -> None:
    """It queued [stop, start] whatever the parent's state, and a stopping supervisor started the
    child again: it ran on under a stopped (or failed) supervisor, and no shutdown stopped it."""
    sim = Sim(sup("root", sup("s", _echo("x"), _echo("y"))), auto_exit_on_term=False).start()
    sim.apply(sim.tree.stop_child("s", sim.now))  # s stops y, then x
    acts, summary = sim.tree.reload(sup("root", sup("s", _echo("x", v=1), _echo("y"))), sim.now)
    sim.apply(acts)
    assert summary["restarted"] == [] and summary["updated"] == ["x"]
    sim.apply(sim.tree.exited("y", "shutdown", sim.now))
    sim.apply(sim.tree.exited("x", "shutdown", sim.now))
    assert sim.state("s") == "stopped" and sim.state("x") == "stopped"
    sim.apply(sim.tree.start_child("s", sim.now))  # its next start takes the new spec
    assert sim.state("x") == "running" and sim.tree.nodes["x"].spec.args == {"v": 1}


def test_a_reload_during_a_group_restart_keeps_its_order() -> None:
    """rest_for_one: c depends on b.  The reload moved b's ops to the end of the queue: a and c
    started while b ran its old process, then b restarted under the running c."""
    sim = Sim(sup("root", _echo("a"), _echo("b"), _echo("c"), strategy="rest_for_one"),
              auto_exit_on_term=False).start()
    sim.crash("a")  # stop c (slow), stop b, start a, b, c
    acts, summary = sim.tree.reload(sup("root", _echo("a"), _echo("b", v=1), _echo("c"), strategy="rest_for_one"),
                                    sim.now)
    sim.apply(acts)
    assert summary["restarted"] == [] and summary["updated"] == ["b"]  # its restart is under way
    sim.clear()
    sim.apply(sim.tree.exited("c", "shutdown", sim.now))
    assert sim.state("b") == "stopping" and sim.state("c") == "stopped"
    sim.apply(sim.tree.exited("b", "shutdown", sim.now))
    assert sim.spawns == ["a", "b", "c"] and sim.tree.nodes["b"].spec.args == {"v": 1}
    assert [sim.state(c) for c in "abc"] == ["running"] * 3


def test_a_child_made_permanent_while_a_group_restart_stops_it_comes_back() -> None:
    """y is temporary, so the group restart stops it for good; a reload made it permanent before
    its stop ran, and it stayed stopped under a running root."""
    sim = Sim(sup("root", _echo("x"), _echo("z"), _echo("y", "temporary"), strategy="one_for_all"),
              auto_exit_on_term=False).start()
    sim.crash("x")  # stop y (waits), stop z, start x, z
    acts, _summary = sim.tree.reload(sup("root", _echo("x"), _echo("z"), _echo("y"), strategy="one_for_all"),
                                     sim.now)
    sim.apply(acts)
    for cid in ("y", "z"):
        sim.apply(sim.tree.exited(cid, "shutdown", sim.now))
    assert sim.state("root") == "running"
    assert [sim.state(c) for c in "xzy"] == ["running"] * 3


def test_a_child_being_removed_is_not_started_again() -> None:
    """A start (or restart) of a child a reload removes cleared its hold, the queued stop went,
    and it ran on out of the config while the reload waited for it for ever."""
    sim = Sim(sup("root", _echo("slow"), _echo("b")), auto_exit_on_term=False).start()
    acts, summary = sim.tree.reload(sup("root"), sim.now)
    sim.apply(acts)
    assert sorted(summary["removed"]) == ["b", "slow"]
    for op in (sim.tree.start_child, sim.tree.restart_child):
        with pytest.raises(OtpdError) as err:
            op("b", sim.now)
        assert err.value.code == "bad_request" and "being removed" in err.value.message
    for cid in ("b", "slow"):
        if cid in sim.tree.nodes and sim.state(cid) == "stopping":
            sim.apply(sim.tree.exited(cid, "shutdown", sim.now))
    assert set(sim.tree.nodes) == {"root"} and sim.tree.settled()


def test_removed_children_stop_in_reverse_start_order() -> None:
    sim = Sim(sup("root", _echo("a"), _echo("b"), _echo("c")), auto_exit_on_term=False).start()
    sim.clear()
    acts, _summary = sim.tree.reload(sup("root", _echo("b")), sim.now)
    sim.apply(acts)
    assert sim.signals[0] == ("c", "TERM")


def test_a_reload_restarts_a_running_child_whose_only_pending_op_is_a_start() -> None:
    """Found by a review helper: a start queued for a child that is up (``otpctl start`` while
    its supervisor waits on a sibling) counted as a restart to come; it does nothing, so the
    child ran its old spec for good."""
    sim = Sim(sup("root", _echo("b"), _echo("c")), auto_ready=False).start()
    sim.ready("b")  # b runs; c starts (a slow init)
    sim.apply(sim.tree.start_child("b", sim.now))  # queued behind c's start: nothing to do for b
    acts, summary = sim.tree.reload(sup("root", _echo("b", v=1), _echo("c")), sim.now)
    sim.apply(acts)
    assert summary["restarted"] == ["b"]
    sim.ready("c")
    sim.ready("b")
    assert sim.tree.settled() and sim.spawns.count("b") == 2 and sim.tree.nodes["b"].spec.args == {"v": 1}
