#!/usr/bin/env python3
"""Where one child's start goes, and what the daemon's fork() costs as children pile up.

    python scripts/bench_boot.py [--n 1000]

Runs the daemon in this process (its code unchanged; a few of its functions wrapped) with
``--n`` EchoAgents under a root with ``start = "parallel"``, as ``bench_scale`` does.  Each
child writes its own CPU time and minor page-fault count (both start at zero in a new
process) at the points of its boot to a file: right after fork() returned in the child and
CPython's after-fork work ran (``child_main``), around the PDEATHSIG set-up, the closing of
inherited fds, the process title, the Runtime's construction, ``_start`` (the store, the
state, ``init``) and the ``ready`` frame.  The daemon times each of its own os.fork() calls
(wall and CPU), reported by fifths of the start.  A forked watcher stops the daemon (SIGTERM, its
own pid) once every child wrote its ready mark.

This is the breakdown behind ``bench_scale``'s start time: the daemon's CPU per fork and the
children's CPU per boot, which on 2 cores bound how fast 1,000 can start.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import otpd.agent.runtime as runtime  # noqa: E402
import otpd.posix.daemon as daemon_mod  # noqa: E402
import otpd.posix.system as system  # noqa: E402
from otpd.config import load  # noqa: E402

MARKS: list[int] = [-1]  # the marks file's fd, inherited by every child


def mark(name: str) -> None:
    """One line: pid, point, CPU ns of this process, its minor faults so far, wall ns."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    os.write(MARKS[0], f"{os.getpid()} {name} {time.thread_time_ns()} {faults} {time.perf_counter_ns()}\n".encode())


def wrap(owner: object, name: str, label: str) -> None:
    original = getattr(owner, name)

    def wrapped(*args: object, **kwargs: object) -> object:
        mark(label + ">")
        try:
            return original(*args, **kwargs)
        finally:
            mark(label + "<")

    setattr(owner, name, wrapped)


def instrument(forks: list[tuple[int, int]]) -> None:
    plain_fork = os.fork

    def timed_fork() -> int:
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        pid = plain_fork()
        if pid:
            forks.append((time.perf_counter_ns() - t0, time.thread_time_ns() - c0))
        return pid

    os.fork = timed_fork  # the daemon's module calls os.fork: its forks (and only they) come here now
    child_main = daemon_mod.child_main

    def marked_child_main(*args: object, **kwargs: object) -> object:
        mark("child_main")
        return child_main(*args, **kwargs)  # type: ignore[arg-type]

    daemon_mod.child_main = marked_child_main  # type: ignore[assignment]
    wrap(system, "die_with_parent", "pdeathsig")

    def close_inherited_fds(keep: int) -> None:  # the same close_range calls, the marks file kept
        mark("close_fds>")
        low, high = sorted((keep, MARKS[0]))
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, os.sysconf("SC_OPEN_MAX"))
        mark("close_fds<")

    system.close_inherited_fds = close_inherited_fds  # type: ignore[assignment]
    wrap(system, "set_title", "title")
    wrap(runtime.Runtime, "__init__", "Runtime()")
    wrap(runtime.Runtime, "_start", "_start")
    send = runtime.Runtime.send

    def marked_send(self: runtime.Runtime, frame: dict[str, object]) -> None:
        if frame.get("t") == "ready":
            mark("ready")
        send(self, frame)

    runtime.Runtime.send = marked_send  # type: ignore[method-assign]


def stop_when_ready(marks: Path, n: int, daemon_pid: int) -> None:
    """In a forked child: once n children wrote their ``ready`` mark, SIGTERM the daemon."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if marks.read_bytes().count(b" ready ") >= n:
            break
        time.sleep(0.05)  # a benchmark's stop, not a measurement: the marks are the record
    os.kill(daemon_pid, signal.SIGTERM)


def report(marks_path: Path, forks: list[tuple[int, int]], n: int, took: float) -> None:
    per_pid: dict[int, list[tuple[str, int, int]]] = defaultdict(list)
    for line in marks_path.read_text().splitlines():
        pid, name, cpu, faults, _wall = line.split()
        per_pid[int(pid)].append((name, int(cpu), int(faults)))
    segments: dict[str, tuple[list[float], list[int]]] = {}
    totals: list[tuple[float, int]] = []
    for points in per_pid.values():
        if not any(p[0] == "ready" for p in points):
            continue
        prev = ("fork", 0, 0)
        for point in points:
            cpu, faults = segments.setdefault(f"{prev[0]} -> {point[0]}", ([], []))
            cpu.append((point[1] - prev[1]) / 1e3)
            faults.append(point[2] - prev[2])
            prev = point
            if point[0] == "ready":
                totals.append((point[1] / 1e3, point[2]))
                break
    print(f"{len(totals)} of {n} children ready in {took:.2f} s (the daemon's start and stop included)\n")
    print("| a child's boot, fork() to ready | CPU p50 µs | minor faults p50 |")
    print("|---|---:|---:|")
    for name, (cpu, faults) in segments.items():
        print(f"| {name} | {statistics.median(cpu):.0f} | {statistics.median(faults):.0f} |")
    print(f"| **total** | **{statistics.median(t[0] for t in totals):.0f}** | "
          f"**{statistics.median(t[1] for t in totals):.0f}** |\n")
    print("| the daemon's fork(), by fifths of the start | wall p50 µs | CPU p50 µs |")
    print("|---|---:|---:|")
    fifth = max(1, len(forks) // 5)
    for i in range(0, fifth * 5, fifth):
        chunk = forks[i:i + fifth]
        print(f"| forks {i + 1}-{i + len(chunk)} | {statistics.median(c[0] for c in chunk) / 1e3:.0f} | "
              f"{statistics.median(c[1] for c in chunk) / 1e3:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    opts = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    folder = Path(tempfile.mkdtemp(prefix="otpd-bench-boot-"))
    lines = ["[daemon]", 'state_dir = "var/lib"', 'runtime_dir = "var/run"', 'log_level = "warning"', "",
             "[root]", 'strategy = "one_for_one"', "max_restarts = 100", "max_seconds = 1", 'start = "parallel"', ""]
    for i in range(opts.n):
        lines += ["[[root.children]]", f'id = "echo{i}"', 'agent = "otpd.agents.echo:EchoAgent"', ""]
    (folder / "otpd.toml").write_text("\n".join(lines))
    marks_path = folder / "marks"
    MARKS[0] = os.open(marks_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    config = load(folder / "otpd.toml")
    daemon = daemon_mod.Daemon(config)
    me = os.getpid()
    watcher = os.fork()  # before the fork is wrapped: only the daemon's forks are timed
    if watcher == 0:
        try:
            stop_when_ready(marks_path, opts.n, me)
        finally:
            os._exit(0)
    forks: list[tuple[int, int]] = []
    instrument(forks)
    t0 = time.monotonic()
    try:
        daemon.run()
    finally:
        try:
            os.waitpid(watcher, 0)
        except ChildProcessError:
            pass  # the daemon's reaping loop (waitpid(-1)) took it
    took = time.monotonic() - t0
    report(marks_path, forks, opts.n, took)
    print(f"\ncommand: python scripts/bench_boot.py --n {opts.n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
