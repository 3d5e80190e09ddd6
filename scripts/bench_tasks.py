#!/usr/bin/env python3
"""TaskAgent end to end: tasks/s (add -> durable -> run -> completed), then the same with the agent
SIGKILLed by PID every second; the ratio and the count of lost tasks (must be 0).

    python scripts/bench_tasks.py                    # the figures of BENCHMARKS.md
    python scripts/bench_tasks.py --tasks 5000 --rounds 1

One daemon on a temp dir (stopped by PID at the end) runs two TaskAgents with the no-op handler
``otpd.examples.jobs:echo``: "plain" is left alone, "chaos" is SIGKILLed every --kill-every
seconds by a thread of this script (its pid from ``status``, then ``os.kill``) for the whole run.

One client adds --tasks tasks with explicit ids, --window adds in flight.  An add the crash
answered with ``agent_crashed`` / ``agent_down`` is sent again with the same id once the agent
runs again: the id is the idempotency key, so ``already_exists`` means "it was saved before the
crash" and counts as acknowledged.  The clock stops when the agent reports every task completed
(``completed_count`` reaches N with nothing queued or processing).

Then the check, per run: ``completed_count`` must equal N (so no completion was counted twice),
no task may be dead, and every one of the N ids must be in state ``completed`` (``get`` each):
lost = ids not completed.  "re-run" is how many attempts were interrupted by a kill and run
again (at least once).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from otpd.client import Client  # noqa: E402
from scripts.bench_state import Daemon  # noqa: E402

RETRYABLE = ("agent_crashed", "agent_down", "timeout")


def config(concurrency: int) -> str:
    body = "[root]\nmax_restarts = 1000000\nmax_seconds = 1\n"
    for agent in ("plain", "chaos"):
        body += (f'\n[[root.children]]\nid = "{agent}"\nagent = "otpd.agents.task:TaskAgent"\n'
                 f'args = {{ handler = "otpd.examples.jobs:echo", concurrency = {concurrency} }}\n')
    return body


class Killer(threading.Thread):
    """SIGKILL the agent by its PID every ``every`` seconds until stopped."""

    def __init__(self, sock: Path, agent: str, every: float) -> None:
        super().__init__(daemon=True)
        self.sock, self.agent, self.every = sock, agent, every
        self.halt = threading.Event()
        self.kills = 0
        self.down_ms: list[float] = []  # from each SIGKILL until the replacement runs (state loaded)

    def run(self) -> None:
        with Client(self.sock, timeout=30) as c:
            while not self.halt.wait(self.every):
                c.request("wait", {"id": self.agent, "state": "running", "timeout": 30})
                pid = next(ch["pid"] for ch in c.request("status")["children"] if ch["id"] == self.agent)
                t0 = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                self.kills += 1
                c.request("wait", {"id": self.agent, "state": "running", "not_pid": pid, "timeout": 30})
                self.down_ms.append((time.perf_counter() - t0) * 1000)


def stats(c: Client, agent: str) -> dict[str, Any]:
    while True:  # the agent may be restarting (chaos): ask again once it runs
        try:
            return c.request("task.stats", {"id": agent})  # type: ignore[no-any-return]
        except Exception as exc:
            if getattr(exc, "code", None) not in RETRYABLE:
                raise
            c.request("wait", {"id": agent, "state": "running", "timeout": 30})


def one_run(sock: Path, agent: str, n: int, window: int, prefix: str, kill_every: float | None) -> dict[str, Any]:
    ids = [f"{prefix}-{i}" for i in range(n)]
    killer = Killer(sock, agent, kill_every) if kill_every else None
    with Client(sock, timeout=60) as c, Client(sock, timeout=60) as ctl:
        base = stats(ctl, agent)
        todo = deque(ids)
        inflight: dict[int, str] = {}
        acked = resent = 0
        t0 = time.perf_counter()
        if killer:
            killer.start()
        while acked < n:
            while todo and len(inflight) < window:
                task_id = todo.popleft()
                inflight[c.send("task.add", {"id": agent, "payload": {"task": task_id}, "task_id": task_id})] = task_id
            frame = c.receive()
            task_id = inflight.pop(frame["id"])
            code = None if frame.get("ok") else frame["error"]["code"]
            if code is None or code == "already_exists":
                acked += 1
                continue
            if code not in RETRYABLE:
                raise RuntimeError(f"add {task_id}: {frame['error']}")
            todo.appendleft(task_id)
            resent += 1
            if code == "agent_down":  # between a kill and the replacement's ready
                ctl.request("wait", {"id": agent, "state": "running", "timeout": 30})
        t_acked = time.perf_counter()
        while True:
            s = stats(ctl, agent)
            if s["completed_count"] - base["completed_count"] >= n and s["queued"] == 0 and s["processing"] == 0:
                break
            time.sleep(0.002)  # a poll of the agent's counters: no event marks a completion
        t_done = time.perf_counter()
        if killer:
            killer.halt.set()
            killer.join()
        ctl.request("wait", {"id": agent, "state": "running", "timeout": 30})
        final = stats(ctl, agent)
        # every id, one get each (pipelined): lost = not completed
        states: dict[str, int] = {}
        pending: dict[int, str] = {}
        for task_id in ids:
            pending[c.send("call", {"id": agent, "request": {"op": "get", "task_id": task_id}})] = task_id
            if len(pending) >= 512:
                _collect(c, pending, states)
        while pending:
            _collect(c, pending, states)
    completed = final["completed_count"] - base["completed_count"]
    return {
        "tasks": n, "kills": killer.kills if killer else 0, "resent": resent,
        "down_ms": statistics.median(killer.down_ms) if killer and killer.down_ms else None,
        "completed_count": completed, "lost": n - states.get("completed", 0),
        "duplicates": completed - n, "dead": final["dead"] - base["dead"],
        "rerun": final["interrupted_count"] - base["interrupted_count"],
        "ack_s": t_acked - t0, "seconds": t_done - t0, "rate": n / (t_done - t0), "states": states,
    }


def _collect(c: Client, pending: dict[int, str], states: dict[str, int]) -> None:
    frame = c.receive()
    pending.pop(frame["id"])
    state = frame["result"]["state"] if frame.get("ok") else "error:" + frame["error"]["code"]
    states[state] = states.get(state, 0) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=100_000, help="tasks per run")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each kind (alternated); medians")
    ap.add_argument("--window", type=int, default=256, help="adds in flight")
    ap.add_argument("--concurrency", type=int, default=4, help="the TaskAgent's concurrency")
    ap.add_argument("--kill-every", type=float, default=1.0, help="seconds between SIGKILLs of the chaos agent")
    args = ap.parse_args()
    command = "python scripts/bench_tasks.py " + " ".join(sys.argv[1:])
    print("command: " + command, flush=True)
    rows = ["| run | tasks | SIGKILLs | down per kill (ms, median) | adds re-sent | completed_count | lost "
            "| counted twice | dead | attempts re-run | all acked (s) | all completed (s) | tasks/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    plain: list[float] = []
    chaos: list[float] = []
    lost = duplicates = 0
    with tempfile.TemporaryDirectory(prefix="otpd-bench-tasks-") as tmp:
        d = Daemon(config(args.concurrency), Path(tmp), "tasks").start()
        try:
            for r in range(args.rounds):
                for agent, every, out in (("plain", None, plain), ("chaos", args.kill_every, chaos)):
                    res = one_run(d.socket, agent, args.tasks, args.window, f"r{r}", every)
                    out.append(res["rate"])
                    lost += res["lost"]
                    duplicates += res["duplicates"]
                    label = "no kills" if every is None else f"SIGKILL every {every:g} s"
                    down = "" if res["down_ms"] is None else f"{res['down_ms']:.1f}"
                    rows.append(f"| {label} | {res['tasks']:,} | {res['kills']} | {down} | {res['resent']} "
                                f"| {res['completed_count']:,} | {res['lost']} | {res['duplicates']} | {res['dead']} "
                                f"| {res['rerun']} | {res['ack_s']:.2f} | {res['seconds']:.2f} "
                                f"| {res['rate']:,.0f} |")
                    print(rows[-1], flush=True)
                    if res["lost"] or res["duplicates"] or res["dead"]:
                        print(f"  states: {res['states']}", flush=True)
        finally:
            d.stop()
    mp, mc = statistics.median(plain), statistics.median(chaos)
    print()
    print(f"command: `{command}` (handler otpd.examples.jobs:echo, concurrency {args.concurrency}, "
          f"{args.window} adds in flight, durability=process, {os.cpu_count()} CPUs)")
    print()
    print("\n".join(rows))
    print()
    print("| | tasks/s (median of runs) |\n|---|---:|")
    print(f"| no kills | {mp:,.0f} |\n| SIGKILL every {args.kill_every:g} s | {mc:,.0f} |")
    print(f"| ratio | {mc / mp:.3f} |")
    print()
    print(f"lost tasks: {lost}; completions counted twice: {duplicates}")
    if lost or duplicates:
        sys.exit(1)


if __name__ == "__main__":
    main()
