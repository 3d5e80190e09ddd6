#!/usr/bin/env python3
"""Chaos: prove that nothing acknowledged is lost while processes are killed by PID under load.

    python scripts/chaos.py --seed 7 --duration 30 --kill-rate 5 --kill-daemon
    python scripts/chaos.py --mode sigstop|mapfull|corrupt|storm --seed 3

It starts its own daemon on a temp state dir (restarting it, as systemd would, when it
dies), runs --producers threads that add tasks (each with its own idempotency key, retried
until acknowledged) and start workflows through otpd.client, and meanwhile kills random
PIDs with SIGKILL: task agents, workflow processes, the coordinator, the monitor and, with
--kill-daemon, the daemon itself.  Every choice comes from --seed, so a failing run can be
replayed (timing, of course, cannot be).  Then it drains and checks the invariants, each
printed with its figure; the exit status is 1 if any fails.

Modes, beyond kills: ``sigstop`` stops agents instead (the heartbeat must kill them);
``mapfull`` runs on a tiny store (producers see store_full; nothing acknowledged is lost);
``corrupt`` starts with a corrupt record for a second task agent (it stays down with
store_corrupt, the rest runs); ``storm`` kills the coordinator faster than the root's
intensity allows (the daemon exits 4, is restarted, and nothing acknowledged is lost).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchlib as bl  # noqa: E402  (scripts/, next to this file)

from otpd.client import Client, Unreachable  # noqa: E402
from otpd.errors import OtpdError  # noqa: E402

RETRYABLE = ("agent_down", "agent_crashed", "timeout", "shutting_down", "internal")
CONFIG = """
[daemon]
state_dir = "lib"
runtime_dir = "run"
log_level = "warning"

[store]
map_size_mb = {map_mb}
map_size_max_mb = {map_mb}

[root]
max_restarts = {root_restarts}
max_seconds = 5

[[root.children]]
id = "tasks"
agent = "otpd.agents.task:TaskAgent"
heartbeat_timeout_ms = 1500
args = {{ handler = "otpd.examples.jobs:echo", concurrency = 8, max_attempts = 50 }}
{tasks2}
[[root.children]]
id = "workflows"
supervisor = "dynamic"
max_restarts = 1000
max_seconds = 1

[root.children.template]
agent = "otpd.agents.workflow:WorkflowProcess"
restart = "transient"
heartbeat_timeout_ms = 1500
args = {{ handlers = ["scripts.chaos_steps:*"] }}

[[root.children]]
id = "coordinator"
agent = "otpd.agents.coordinator:CoordinatorAgent"
heartbeat_timeout_ms = 1500
args = {{ handlers = ["scripts.chaos_steps:*"], poison_after = 50, retention = 1000000 }}

[[root.children]]
id = "monitor"
agent = "otpd.agents.monitor:MonitorAgent"
heartbeat_timeout_ms = 1500
args = {{ interval_s = 1 }}
"""
TASKS2 = '\n[[root.children]]\nid = "tasks2"\nagent = "otpd.agents.task:TaskAgent"\n' \
         'args = { handler = "otpd.examples.jobs:echo" }\n'


class Harness:
    """The daemon of the run: started, watched, restarted when it dies (as systemd would)."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.dir = root
        self.config = root / "otpd.toml"
        self.config.write_text(CONFIG.format(
            map_mb=2 if args.mode == "mapfull" else 1024,
            root_restarts=3 if args.mode == "storm" else 1000,
            tasks2=TASKS2 if args.mode == "corrupt" else ""))
        self.socket = root / "run" / "otpd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exits: list[int] = []
        self.lock = threading.Lock()
        self.generation = 0
        self.pids_seen: set[int] = set()

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        log = open(self.dir / "otpd.log", "ab")  # noqa: SIM115 - the daemon holds it
        # -m puts the cwd first on sys.path: this checkout's, or a bench run from a worktree
        # would measure the otpd of wherever it was started.
        self.proc = subprocess.Popen([sys.executable, "-m", "otpd.cli.otpd_main", "run", "--config",
                                      str(self.config)], stdout=log, stderr=log, env=env, cwd=REPO)
        log.close()
        self.generation += 1
        deadline = time.monotonic() + 60
        while True:  # bounded: until the new daemon answers with its root running
            try:
                with Client(self.socket, timeout=10) as c:
                    c.request("wait", {"id": "root", "state": "running", "timeout": 30})
                return
            except (Unreachable, OtpdError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"otpd did not start; see {self.dir / 'otpd.log'}") from None
                time.sleep(0.01)  # the socket does not exist yet: nothing to wait on

    def restart_if_dead(self) -> bool:
        with self.lock:
            assert self.proc is not None
            if self.proc.poll() is None:
                return False
            self.exits.append(self.proc.returncode)
            self.start()
            return True

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Run:
    def __init__(self, args: argparse.Namespace, harness: Harness) -> None:
        self.args = args
        self.h = harness
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked_tasks: set[str] = set()
        self.acked_workflows: dict[str, str] = {}  # wf id -> token
        self.store_full = 0
        self.kills: list[tuple[float, str, int]] = []
        self.restart_ms: list[float] = []
        self.seq_regressed = 0
        self.log = harness.dir / "steps.log"
        self.finished: list[float] = []  # when each producer was done

    # -- load ------------------------------------------------------------------------

    def request(self, client: Client, op: str, args: dict[str, Any]) -> Any:
        return client.request(op, args)

    def producer(self, index: int) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        quota_tasks = self.args.tasks // self.args.producers
        quota_wf = self.args.workflows // self.args.producers
        made_tasks = made_wf = 0
        client: Client | None = None
        while not self.stop.is_set() and (made_tasks < quota_tasks or made_wf < quota_wf):
            try:
                if client is None:
                    client = Client(self.h.socket, timeout=30)
                if made_wf < quota_wf and (made_tasks >= quota_tasks or rng.random() < quota_wf / max(1, quota_tasks)):
                    self.start_workflow(client, f"p{index}-w{made_wf}")
                    made_wf += 1
                else:
                    task_id = f"p{index}-t{made_tasks}"
                    pad = 2048 if self.args.mode == "mapfull" else rng.randint(0, 64)
                    self.add_task(client, task_id, {"n": made_tasks, "pad": "x" * pad})
                    made_tasks += 1
            except Unreachable:
                if client is not None:
                    client.close()
                client = None
                self.wait_for_daemon()
        if client is not None:
            client.close()
        with self.lock:
            self.finished.append(time.monotonic())

    def start_workflow(self, client: Client, token: str) -> None:
        """Start until acknowledged: the workflow id is the idempotency key, as a task's is."""
        steps = [{"handler": "scripts.chaos_steps:step",
                  "args": {"token": token, "i": i, "log": str(self.log)}} for i in range(3)]
        while not self.stop.is_set():
            try:
                wf = client.request("workflow.start", {"definition": {"steps": steps}, "workflow_id": f"wf-{token}"})
            except OtpdError as err:
                if err.code not in RETRYABLE:
                    raise
                client.request("wait", {"id": "coordinator", "state": "running", "timeout": 30})
                continue
            with self.lock:
                self.acked_workflows[wf["workflow_id"]] = token
            return

    def add_task(self, client: Client, task_id: str, payload: Any) -> None:
        """Add until acknowledged: the id is the idempotency key, so a lost reply is harmless."""
        while not self.stop.is_set():
            try:
                client.request("task.add", {"id": "tasks", "payload": payload, "task_id": task_id})
            except OtpdError as err:
                if err.code == "already_exists":
                    pass  # it was durable; the reply was lost
                elif err.code == "store_full":
                    with self.lock:
                        self.store_full += 1
                    return  # refused, so not acknowledged
                elif err.code in RETRYABLE:
                    client.request("wait", {"id": "tasks", "state": "running", "timeout": 30})
                    continue
                else:
                    raise
            with self.lock:
                self.acked_tasks.add(task_id)
            return

    def wait_for_daemon(self) -> None:
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                with Client(self.h.socket, timeout=10) as c:
                    c.request("wait", {"id": "root", "state": "running", "timeout": 10})
                return
            except (Unreachable, OtpdError):
                time.sleep(0.02)  # the harness is restarting the daemon

    # -- faults ----------------------------------------------------------------------

    def killer(self) -> None:
        rng = random.Random(self.args.seed * 7919)
        targets = self.args.targets.split(",")
        daemon_kill_at = rng.uniform(0.3, 0.6) * self.args.duration if self.args.kill_daemon else None
        start = time.monotonic()
        while True:
            left = self.args.duration - (time.monotonic() - start)
            if self.args.kills:  # an exact number of faults: keep going past --duration if need be
                done = len([k for k in self.kills if k[1] not in ("storm", "daemon")])
                if done >= self.args.kills:
                    return
                pause = max(0.0, left / max(1, self.args.kills - done))
            elif left <= 0:
                return
            else:
                pause = min(left, 1.0 / self.args.kill_rate)
            if self.stop.wait(pause):  # pacing the faults, not waiting for one
                return
            now = time.monotonic() - start
            if daemon_kill_at is not None and now >= daemon_kill_at:
                daemon_kill_at = None
                self.kills.append((now, "daemon", self.h.proc.pid if self.h.proc else 0))
                self.h.kill()
                self.h.restart_if_dead()
                continue
            if self.args.mode == "storm" and now > self.args.duration / 2 and not any(
                    k[1] == "storm" for k in self.kills):
                self.storm()
                continue
            self.kill_one(rng, targets)

    def children(self) -> list[dict[str, Any]]:
        with Client(self.h.socket, timeout=10) as c:
            result: list[dict[str, Any]] = c.request("ps")["children"]
        for child in result:
            if child["pid"]:
                self.h.pids_seen.add(child["pid"])
        return result

    def kill_one(self, rng: random.Random, targets: list[str]) -> None:
        try:
            children = self.children()
        except (Unreachable, OtpdError):
            self.h.restart_if_dead()
            return
        kind = rng.choice(targets)
        pool = sorted((c["id"], c["pid"]) for c in children if c["pid"] and (
            c["id"] == kind or (kind == "workflows" and c["supervisor"] == "workflows")))
        if not pool:
            return
        child_id, pid = rng.choice(pool)
        sig = signal.SIGSTOP if self.args.mode == "sigstop" else signal.SIGKILL
        try:
            os.kill(pid, sig)
            self.kills.append((time.monotonic(), child_id, pid))
        except ProcessLookupError:
            pass

    def storm(self) -> None:
        """Kill the coordinator faster than the root allows: the daemon must exit 4."""
        self.kills.append((time.monotonic(), "storm", 0))
        for _ in range(10):
            try:
                pid = next(c["pid"] for c in self.children() if c["id"] == "coordinator" and c["pid"])
                os.kill(pid, signal.SIGKILL)
                with Client(self.h.socket, timeout=10) as c:
                    c.request("wait", {"id": "coordinator", "state": "running", "not_pid": pid, "timeout": 5})
            except (Unreachable, OtpdError, StopIteration, ProcessLookupError):
                break
        assert self.h.proc is not None
        self.h.proc.wait(30)
        self.h.restart_if_dead()

    def watch_events(self) -> None:
        """Restart latency: a child's exit to its replacement's ready, from the daemon's events."""
        down: dict[str, float] = {}
        while not self.stop.is_set():
            try:
                with Client(self.h.socket, timeout=1.0) as c:
                    c.request("events", {"follow": True, "last": 0})
                    while not self.stop.is_set():
                        try:
                            e = c.receive()
                        except OtpdError:
                            continue  # a quiet second
                        if e.get("pid"):
                            self.h.pids_seen.add(e["pid"])
                        if e.get("event") == "exited" and not e.get("start_failure"):
                            down[e["id"]] = e["time"]
                        elif e.get("event") == "ready" and e["id"] in down:
                            self.restart_ms.append((e["time"] - down.pop(e["id"])) * 1000)
                        elif e.get("event") == "seq_regressed":
                            self.seq_regressed += 1
            except (Unreachable, OtpdError):
                down.clear()
                time.sleep(0.05)  # the daemon is being restarted

    # -- the end ---------------------------------------------------------------------------

    def drain(self, client: Client) -> None:
        deadline = time.monotonic() + self.args.drain_timeout
        while time.monotonic() < deadline:
            try:
                stats = client.request("task.stats", {"id": "tasks"})
                open_wf = client.request("workflow.list", {"state": "running"})["workflows"]
            except OtpdError:
                time.sleep(0.1)  # an agent is restarting after the last kill
                continue
            if stats["queued"] == 0 and stats["processing"] == 0 and not open_wf:
                return
            time.sleep(0.1)  # polling with a deadline: draining has no single event to wait on
        raise AssertionError("not drained before --drain-timeout")

    def check(self, client: Client) -> list[tuple[str, str, bool]]:
        out: list[tuple[str, str, bool]] = []
        states: dict[str, int] = {}
        missing = []
        ids = sorted(self.acked_tasks)
        for start in range(0, len(ids), 2000):
            batch = ids[start:start + 2000]
            replies = client.pipeline([("task.get", {"id": "tasks", "task_id": t}) for t in batch])
            for task_id, reply in zip(batch, replies, strict=True):
                state = reply.get("state") if isinstance(reply, dict) else "missing"
                states[state] = states.get(state, 0) + 1
                present = ("completed", "dead", "queued", "processing") if self.args.mode == "mapfull" \
                    else ("completed", "dead")  # a full store cannot drain: the task must still be there
                if state not in present:
                    missing.append(task_id)
        out.append(("acknowledged tasks completed or dead-lettered", f"{len(ids) - len(missing)}/{len(ids)} "
                    f"({states.get('completed', 0)} completed, {states.get('dead', 0)} dead, "
                    f"{len(missing)} missing)", not missing))
        stats = client.request("task.stats", {"id": "tasks"})
        if self.args.mode != "mapfull":
            out.append(("completed counted once", f"completed_count {stats['completed_count']} = "
                        f"{states.get('completed', 0)} completed ids",
                        stats["completed_count"] == states.get("completed", 0)))
        listing = client.request("workflow.list", {})
        by_status: dict[str, int] = {}
        for w in listing["workflows"]:
            by_status[w["status"]] = by_status.get(w["status"], 0) + 1
        finals = {w["workflow_id"]: w["status"] for w in listing["workflows"]}
        lost = [wf for wf in self.acked_workflows if finals.get(wf) not in ("completed", "parked")]
        out.append(("acknowledged workflows completed or parked",
                    f"{len(self.acked_workflows) - len(lost)}/{len(self.acked_workflows)}", not lost))
        out.append(("coordinator counts match its records",
                    f"completed {listing['completed_count']}={by_status.get('completed', 0)}, "
                    f"failed {listing['failed_count']}={by_status.get('parked', 0)}",
                    listing["completed_count"] == by_status.get("completed", 0)
                    and listing["failed_count"] == by_status.get("parked", 0)))
        reruns = 0
        tokens = set(self.acked_workflows.values())
        if self.log.exists():
            for line in self.log.read_text().splitlines():
                rec = json.loads(line)
                if rec["token"] in tokens and rec["seen"] != rec["i"]:
                    reruns += 1
        out.append(("no step ran again after its result was saved", f"{reruns} steps saw the wrong results",
                    reruns == 0))
        out.append(("no seq went backwards", f"{self.seq_regressed} regressions", self.seq_regressed == 0))
        return out


def fds(pid: int, client: Client) -> int:
    """The daemon's open fds, less the two (channel and output pipe) of each of its processes
    that ``status`` does not list as an agent: a warm spare (told apart that way, not by its
    title, which a spare still booting has not set yet).  Read once the daemon is quiet: no
    child dead and unreaped (its fds may or may not be closed yet), and the same figure twice
    in a row, each after a round trip (within 10 s; then the last reading stands)."""
    deadline = time.monotonic() + 10.0
    last = None
    while True:
        status = client.request("status")
        agents = {c["pid"] for c in status["children"] if c.get("pid")}
        try:
            kids = psutil.Process(pid).children()
            quiet = all(k.status() != psutil.STATUS_ZOMBIE for k in kids)
        except psutil.NoSuchProcess:  # one went while we looked
            kids, quiet = [], False
        count = bl.fd_count(pid) - 2 * sum(1 for k in kids if k.pid not in agents)
        if (quiet and count == last) or time.monotonic() > deadline:
            return count
        last = count if quiet else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of faults")
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--workflows", type=int, default=200)
    ap.add_argument("--kill-rate", type=float, default=5.0, help="faults per second")
    ap.add_argument("--kills", type=int, default=0, help="an exact number of faults, spread over --duration")
    ap.add_argument("--targets", default="tasks,workflows,coordinator,monitor")
    ap.add_argument("--kill-daemon", action="store_true")
    ap.add_argument("--mode", choices=["kill", "sigstop", "mapfull", "corrupt", "storm"], default="kill")
    ap.add_argument("--drain-timeout", type=float, default=300.0)
    args = ap.parse_args()
    replay = "python scripts/chaos.py " + " ".join(sys.argv[1:])
    print(f"command: {replay}", flush=True)
    bl.become_subreaper()  # whatever the daemons leave comes to us
    with tempfile.TemporaryDirectory(prefix="otpd-chaos-") as tmp:
        h = Harness(Path(tmp), args)
        if args.mode == "corrupt":
            from otpd.config import load
            from otpd.store.lmdb_store import Store

            store = Store(load(h.config).store_settings().path)
            store.put_raw("tasks2", b"\xc1 not msgpack", [])
            store.close()
        h.start()
        with Client(h.socket) as probe:  # measured holding one connection, after a round trip
            baseline_fds = fds(h.proc.pid, probe)  # type: ignore[union-attr]
        if args.mode == "mapfull":  # tasks stay queued, so the store fills up
            args.workflows = 0
            with Client(h.socket) as c:
                c.request("task.pause", {"id": "tasks"})
        run = Run(args, h)
        threads = [threading.Thread(target=run.watch_events, daemon=True)]
        threads += [threading.Thread(target=run.producer, args=(i,)) for i in range(args.producers)]
        killer = threading.Thread(target=run.killer)
        results: list[tuple[str, str, bool]] = []
        try:
            t0 = time.monotonic()
            for t in threads:
                t.start()
            killer.start()
            killer.join()
            fault_s = time.monotonic() - t0
            if args.mode == "sigstop":  # whatever is still stopped will be killed by its heartbeat
                pass
            for t in threads[1:]:
                t.join()
            load_s = max(run.finished) - t0
            h.restart_if_dead()
            with Client(h.socket, timeout=60) as c:
                if args.mode != "mapfull":
                    run.drain(c)
                total_s = time.monotonic() - t0
                results = run.check(c)
                if args.mode == "corrupt":
                    tasks2 = next(x for x in c.request("ps")["children"] if x["id"] == "tasks2")
                    results.append(("a corrupt record keeps only its agent down", f"tasks2 {tasks2['state']}",
                                    tasks2["state"] == "failed"))
                run.stop.set()  # the event watcher lets go of its connection
                threads[0].join()
                daemon_fds = fds(h.proc.pid, c)  # type: ignore[union-attr]  (the watcher's close seen)
                zombies = [p for p in psutil.Process(h.proc.pid).children()  # type: ignore[union-attr]
                           if p.status() == psutil.STATUS_ZOMBIE]  # unreaped by the daemon
                c.request("shutdown")
            run.stop.set()
            assert h.proc is not None
            status = h.proc.wait(60)
            bl.reap_adopted()  # agents of a killed daemon come to us (subreaper) as init would reap them
            left = [p for p in psutil.Process().children(recursive=True)
                    if p.status() != psutil.STATUS_ZOMBIE]
            alive = [p for p in sorted(h.pids_seen) if psutil.pid_exists(p)
                     and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                     and "otpd" in " ".join(psutil.Process(p).cmdline())]
            results.append(("clean shutdown", f"exit {status}", status == 0))
            results.append(("processes of the run left", f"{len(left) + len(alive)}", not left and not alive))
            results.append(("zombies", f"{len(zombies)}", not zombies))
            if args.mode == "storm":
                results.append(("the storm escalated and the daemon was restarted", f"exits {h.exits}",
                                4 in h.exits))
            if args.mode == "mapfull":
                results.append(("store_full reached the producers", f"{run.store_full} refusals",
                                run.store_full > 0))
            if args.mode == "sigstop":
                stopped = [pid for _t, _id, pid in run.kills if pid]
                frozen = [p for p in stopped if psutil.pid_exists(p)
                          and psutil.Process(p).status() == psutil.STATUS_STOPPED]
                results.append(("every stopped agent was killed by its heartbeat",
                                f"{len(stopped) - len(frozen)}/{len(stopped)}", not frozen))
            results.append(("daemon fds back to their level before the run",
                            f"{daemon_fds} after, {baseline_fds} before (one client each; spares' fds not counted)",
                            daemon_fds == baseline_fds))
        finally:
            run.stop.set()
            h.stop()
        lat = sorted(run.restart_ms)
        p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
        kills = len([k for k in run.kills if k[1] != "storm"])
        print(f"\nseed {args.seed}, mode {args.mode}: {kills} faults in {fault_s:.1f} s; "
              f"{len(run.acked_tasks)} tasks and {len(run.acked_workflows)} workflows acknowledged; "
              f"load {load_s:.1f} s ({len(run.acked_tasks) / load_s:,.0f} tasks/s acknowledged), "
              f"drained at {total_s:.1f} s; daemon exits {h.exits or 'none'}")
        if lat:
            print(f"restart latency (exit -> ready, ms): p50 {statistics.median(lat):.1f}, p90 {p(0.9):.1f}, "
                  f"p99 {p(0.99):.1f}, max {lat[-1]:.1f}, n={len(lat)}")
        print("\n| invariant | figure | ok |\n|---|---|---|")
        for name, figure, ok in results:
            print(f"| {name} | {figure} | {'yes' if ok else 'NO'} |")
        failed = [r for r in results if not r[2]]
        if failed:
            print(f"\nFAILED: {len(failed)} invariant(s). Replay: {replay}")
            return 1
        print(f"\n{len(results)} passed, 0 failed")
        return 0


if __name__ == "__main__":
    sys.exit(main())
