"""Soak: restart one child 10,000 times under otpd; the daemon must not leak.

    python scripts/soak_restarts.py [--restarts 10000] [--warmup 100]

One child (EchoAgent by default) under a root with ``max_restarts = 1000000``
in ``max_seconds = 1``.  Each restart: SIGKILL the child by PID, then the
``wait`` op (``state = running``, ``not_pid`` = the killed PID) returns the
new PID.  After ``--warmup`` restarts (caches, free lists and the allocator
settle) the daemon's open fds, RSS / USS and zombie children are recorded;
again after the soak, and once more after a settle window of ``--wait-timeout``
+ 1 s, once every ``wait`` op's timeout timer has expired (the daemon keeps a
satisfied wait's timer in its heap until then).  Targets: fds +0, RSS <= +1
MiB, zombies 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import benchlib as bl


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--restarts", type=int, default=10_000, help="timed restarts after the warm-up (default 10000)")
    p.add_argument("--warmup", type=int, default=100, help="restarts before the 'before' sample (default 100)")
    p.add_argument("--agent", default="otpd.agents.echo:EchoAgent", help="the child's agent class")
    p.add_argument("--wait-timeout", type=float, default=5.0, help="timeout of each wait op, s (default 5)")
    p.add_argument("--samples", type=int, default=10, help="intermediate samples of fds/RSS (default 10)")
    p.add_argument("--output", help="also write the markdown here")
    p.add_argument("--raw", help="write the samples (JSON) here")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (config, log)")
    return p.parse_args()


def sample(pid: int, done: int) -> dict[str, Any]:
    return {"restarts": done, "fds": bl.fd_count(pid), "rss": bl.rss_bytes(pid), "uss": bl.uss_bytes(pid),
            "zombies": bl.zombie_children(pid), "children": len(bl.psutil.Process(pid).children()),
            "cpu_s": bl.cpu_seconds(pid)}


def main() -> int:
    args = parse_args()
    from otpd.client import Client

    report = bl.Report(f"Soak: {args.restarts:,} restarts of one child under otpd")
    folder = bl.temp_dir("otpd-soak-")
    config = bl.write_otpd_config(folder, [{"id": "soak", "agent": args.agent}], max_restarts=1_000_000,
                                  max_seconds=1)
    daemon, sock, _ = bl.start_otpd(folder, config)
    samples: list[dict[str, Any]] = []
    latencies: list[float] = []
    max_zombies = 0
    try:
        with Client(sock, timeout=args.wait_timeout + 30) as ctl:
            pid = ctl.request("wait", {"id": "soak", "state": "running", "timeout": 30})["pid"]

            def restart(old: int) -> int:
                t0 = time.perf_counter()
                os.kill(old, signal.SIGKILL)
                reply = ctl.request("wait", {"id": "soak", "state": "running", "not_pid": old,
                                             "timeout": args.wait_timeout})
                latencies.append(time.perf_counter() - t0)
                return int(reply["pid"])

            for _ in range(args.warmup):
                pid = restart(pid)
            latencies.clear()
            # A round trip first: the daemon forks a restarted agent's next spare just after it
            # answered the wait, so a sample taken at once may see that fork's fds half made.
            ctl.request("ps")
            before = sample(daemon.pid, 0)
            samples.append(before)
            every = max(1, args.restarts // max(1, args.samples))
            t_start = time.perf_counter()
            for i in range(1, args.restarts + 1):
                pid = restart(pid)
                if i % every == 0 or i == args.restarts:
                    ctl.request("ps")
                    s = sample(daemon.pid, i)
                    samples.append(s)
                    max_zombies = max(max_zombies, s["zombies"])
                    bl.progress(f"{i:,} restarts: fds {s['fds']}, RSS {s['rss'] / 2**20:.2f} MiB, "
                                f"zombies {s['zombies']}")
            soak_s = time.perf_counter() - t_start
            after = samples[-1]
            time.sleep(args.wait_timeout + 1.0)  # the settle window: every wait's timer has expired
            settled = sample(daemon.pid, args.restarts)
            child = next(c for c in ctl.request("status")["children"] if c["id"] == "soak")
        daemon.check_alive()
        log_lines = len(daemon.log_path.read_text(errors="replace").splitlines())
    finally:
        stop_s = daemon.stop(timeout=30.0)

    mib = 2**20
    d_fds = after["fds"] - before["fds"]
    d_rss = (after["rss"] - before["rss"]) / mib
    d_rss_settled = (settled["rss"] - before["rss"]) / mib
    rows = [
        ["open fds", before["fds"], after["fds"], settled["fds"], f"{d_fds:+d}", "+0",
         "pass" if d_fds == 0 and settled["fds"] == before["fds"] else "MISS"],
        ["RSS (MiB)", before["rss"] / mib, after["rss"] / mib, settled["rss"] / mib,
         f"{d_rss:+.3f} / {d_rss_settled:+.3f}", "<= +1", "pass" if d_rss <= 1.0 else "MISS"],
        ["USS (MiB)", before["uss"] / mib, after["uss"] / mib, settled["uss"] / mib,
         f"{(after['uss'] - before['uss']) / mib:+.3f} / {(settled['uss'] - before['uss']) / mib:+.3f}", "-", ""],
        ["zombie children", before["zombies"], after["zombies"], settled["zombies"],
         f"max seen {max_zombies}", "0", "pass" if max(max_zombies, settled["zombies"]) == 0 else "MISS"],
        ["live children (the agent and its warm spare)", before["children"], after["children"], settled["children"], "",
         "2", ""],
    ]
    report.table(["daemon metric", f"before (after {args.warmup} warm-up restarts)",
                  f"after {args.restarts:,} more", f"after +{args.wait_timeout + 1:.0f} s settle",
                  "delta (after / settled)", "target", "verdict"], rows)
    trend = [[s["restarts"], s["fds"], s["rss"] / mib, s["uss"] / mib, s["zombies"]] for s in samples]
    report.table(["restarts", "fds", "RSS MiB", "USS MiB", "zombies"], trend, "Trend during the soak:")
    lat = bl.summary(latencies)
    report.table(["restart (kill -> `wait` reply)", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms"],
                 [["EchoAgent" if args.agent.endswith("EchoAgent") else args.agent, lat["n"], lat["p50"],
                   lat["p90"], lat["p99"], lat["max"], lat["mean"]]])
    cpu_ms = 1000.0 * (after["cpu_s"] - before["cpu_s"]) / max(1, args.restarts)
    stop_txt = f"{stop_s:.2f} s" if stop_s is not None else "did not stop on SIGTERM (killed)"
    report.add("Notes:", "\n".join([
        f"- {args.restarts:,} restarts in {soak_s:.1f} s ({args.restarts / soak_s:.0f}/s); daemon CPU "
        f"{cpu_ms:.2f} ms per restart",
        f"- otpd counted {child['restarts']:,} restarts of the child "
        f"(expected {args.warmup + args.restarts:,}); the child is {child['state']}",
        f"- the daemon logged {log_lines} line(s) at log_level warning; it stopped on SIGTERM in {stop_txt}",
        "- RSS/USS from psutil; fds = entries of /proc/PID/fd (one of them is the bench's control connection); "
        "zombies = the daemon's children in state Z, sampled at each trend point",
    ]))
    if args.raw:
        Path(args.raw).write_text(json.dumps({"samples": samples, "settled": settled, "latencies": latencies}))
    if args.keep:
        bl.keep_temp_dirs()
    report.emit(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(bl.guarded(main))
