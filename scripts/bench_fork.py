#!/usr/bin/env python3
"""What fork() and a child's death cost here, against the forking process's size.

    python scripts/bench_fork.py [--forks 100] [--steps 0,20,40]

A process with otpd's daemon imported (and ``gc.freeze()``d, as the daemon does) forks
``--forks`` children one at a time; each says it is up over a pipe and waits, and is
then SIGKILLed and reaped.  Timed: ``os.fork()`` in the parent, and kill -> ``waitpid``
returns (the kernel tears the child's copy of the address space down before SIGCHLD).
Then the parent grows by N MB of small Python objects (``--steps``) and it runs again.
Both costs follow the parent's anonymous memory: its page tables are what a fork copies
and what an exit takes apart.  This is the floor under ``bench_restart`` (kill -> exited)
and ``bench_scale`` (1,000 forks by a growing daemon).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import otpd.posix.daemon  # noqa: E402,F401 - the daemon's imports: the size a fork starts from


def anon_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fork_and_kill(n: int) -> tuple[list[float], list[float]]:
    forks, deaths = [], []
    for _ in range(n):
        r, w = os.pipe()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: up, then wait for the kill
            try:
                os.write(w, b"!")
                while True:
                    signal.pause()
            finally:
                os._exit(0)
        forks.append((time.perf_counter() - t0) * 1e3)
        os.close(w)
        os.read(r, 1)  # it runs (and has touched what a child touches to get here)
        os.close(r)
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        deaths.append((time.perf_counter() - t0) * 1e3)
    return forks, deaths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forks", type=int, default=100)
    ap.add_argument("--steps", default="0,20,40", help="MB the parent grows by before each run (cumulative)")
    args = ap.parse_args()
    print("command: python scripts/bench_fork.py " + " ".join(sys.argv[1:]))
    gc.freeze()
    ballast: list[list[bytearray]] = []
    rows = []
    grown = 0
    for step in (int(s) for s in args.steps.split(",")):
        ballast.append([bytearray(1000) for _ in range((step - grown) * 1000)])
        grown = step
        gc.freeze()
        forks, deaths = fork_and_kill(args.forks)
        rows.append((anon_mib(), statistics.median(forks), statistics.median(deaths),
                     sorted(deaths)[int(len(deaths) * 0.9)]))
    print("| parent's anonymous memory | fork() p50 | kill -> reaped p50 | kill -> reaped p90 |")
    print("|---:|---:|---:|---:|")
    for mib, fork, death, death90 in rows:
        print(f"| {mib:.1f} MiB | {fork:.2f} ms | {death:.2f} ms | {death90:.2f} ms |")


if __name__ == "__main__":
    main()
