#!/usr/bin/env python3
"""What one KVAgent put and its commit cost in a hot loop, in one process, on a real store.

    python scripts/bench_commit.py [--puts 20000] [--rounds 5]

The agent, its StateKeeper and the Store (durability ``process``, a temp dir) are driven
directly, as the runtime does after each batch: the put, then ``commit()`` (the log entry,
one ``write``), and a checkpoint to LMDB every 1,024 entries.  Alternated with puts that are
not committed.  The floor of ``bench_state --only overhead``, where each put wakes the agent.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otpd.agent.state import StateKeeper  # noqa: E402
from otpd.agents.kv import KVAgent  # noqa: E402
from otpd.store.lmdb_store import Store  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--puts", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    opts = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="otpd-bench-commit-"))
    try:
        store = Store(folder, 64, None, "process")
        agent = KVAgent("kv", {})
        keeper = StateKeeper(agent, store, "otpd.agents.kv:KVAgent")
        keeper.load()

        def run(commit: bool) -> float:
            t0 = time.perf_counter_ns()
            for i in range(opts.puts):
                agent.op_put({"op": "put", "key": f"k{i % 100}", "value": i})
                if commit:
                    keeper.commit()
                    if store.checkpoint_due():
                        store.checkpoint()
            return (time.perf_counter_ns() - t0) / opts.puts / 1e3

        bare, committed = [], []
        for _ in range(opts.rounds):
            bare.append(run(False))
            committed.append(run(True))
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    put, both = statistics.median(bare), statistics.median(committed)
    print("| one put, hot loop, one process (median of rounds) | µs |")
    print("|---|---:|")
    print(f"| the put alone | {put:.2f} |")
    print(f"| the put and its commit (log entry; a checkpoint every 1,024) | {both:.2f} |")
    print(f"| the commit | {both - put:.2f} |")
    print(f"\ncommand: python scripts/bench_commit.py --puts {opts.puts} --rounds {opts.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
