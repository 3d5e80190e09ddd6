#!/usr/bin/env python3
"""What a version switch's copy of an agent's records costs: time and peak memory.

    python scripts/bench_switch.py [--items 1000000] [--rounds 3]

A store in a temp dir holds one agent with N map items (30-byte values); ``keep_version``
(what the first start under ``agent_next`` runs, to keep the old class's records for a
rollback) copies them under ``versions/``.  Each round runs in a fresh process of its own
(its peak RSS is the round's), against this checkout's code.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_round(items: int) -> dict[str, float]:
    sys.path.insert(0, str(REPO))
    from otpd.store.lmdb_store import Store, encode, item_prefix

    with tempfile.TemporaryDirectory(prefix="otpd-bench-switch-") as folder:
        store = Store(Path(folder), 4096)
        main = encode({"agent": "m:A", "version": 1, "state": {}, "collections": {"data": {"len": items}},
                       "saved_at": 0.0, "seq": 1})
        prefix = item_prefix("v", "data")
        store.put_raw("v", main, ((prefix + encode(i), encode("x" * 30)) for i in range(items)))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        began = time.perf_counter()
        store.keep_version("v", "m:A")
        took = time.perf_counter() - began
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        store.close()
    return {"seconds": took, "peak_rss_mib": grown / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a round, in its own process
    opts = ap.parse_args()
    if opts.one:
        print(json.dumps(one_round(opts.items)))
        return 0
    rounds = [json.loads(subprocess.run([sys.executable, __file__, "--one", "--items", str(opts.items)],
                                        check=True, capture_output=True, text=True, cwd=REPO).stdout)
              for _ in range(opts.rounds)]
    print(f"| keep_version of {opts.items:,} items (median of {opts.rounds} processes) | figure |")
    print("|---|---:|")
    print(f"| time | {statistics.median(r['seconds'] for r in rounds):.2f} s |")
    print(f"| peak RSS growth | {statistics.median(r['peak_rss_mib'] for r in rounds):.0f} MiB |")
    print(f"\ncommand: python scripts/bench_switch.py --items {opts.items} --rounds {opts.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
