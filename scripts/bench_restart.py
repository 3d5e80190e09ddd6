"""Restart latency: SIGKILL a child by PID, time until its replacement is up.

    python scripts/bench_restart.py [--kills 200] [--systems fork,exec,otpd,supervisord,circus]

Every system runs the same child program and is measured the same way: the
child (``bench_child.py``; under otpd ``bench_agents.ReadyAgent``, whose
``init()`` runs the same code) sends one datagram with its PID to a Unix
socket the bench listens on.  The clock starts just before ``os.kill(pid,
SIGKILL)`` and stops when the datagram of a different PID arrives.

Systems, in one run:

* ``fork``: the floor for a warm forking supervisor: the bench itself kills,
  ``waitpid``s and ``os.fork()``s a copy of itself that signals readiness;
* ``exec``: the floor for an exec-ing supervisor: ``subprocess.Popen`` of
  ``python bench_child.py``;
* ``otpd``: one child, ``max_restarts = 1000000`` in ``max_seconds = 1`` so
  intensity never trips; also timed to otpd's own ``ready`` event (a second
  connection subscribed to ``events``), with a breakdown from the daemon's
  event timestamps;
* ``supervisord`` and ``circus``: installed from PyPI into a separate bench
  virtualenv (var/bench-venv, made on first use), every setting at its
  default but paths and endpoints.  supervisord counts a process as started
  only after ``startsecs`` (1 s) and backs off a process that dies sooner, so
  each supervisord kill waits until it reports the new PID RUNNING (pacing,
  outside the timed window).

Before each kill of a supervised system the bench sleeps a random
0..--jitter-ms (circus: 0..--circus-jitter-ms, as its check_delay is 5 s with an
INI config; supervisord polls with a 1 s timeout), pacing outside the timed
window, so kills land at random phases of any periodic timer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import benchlib as bl
from bench_child import signal_ready

ALL_SYSTEMS = ("fork", "exec", "otpd", "otpd-cold", "supervisord", "circus")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=200, help="timed kills per system (default 200)")
    p.add_argument("--other-kills", type=int, default=None,
                   help="timed kills for supervisord and circus (default: --kills; they take ~1-3 s each)")
    p.add_argument("--warmup", type=int, default=5, help="untimed kills first, per system (default 5)")
    p.add_argument("--jitter-ms", type=float, default=1000.0,
                   help="random pause 0..J ms before each kill of otpd and supervisord (default 1000: "
                        "supervisord's poll timeout)")
    p.add_argument("--circus-jitter-ms", type=float, default=5000.0,
                   help="the same for circus (default 5000: its check_delay with an INI config)")
    p.add_argument("--timeout", type=float, default=30.0, help="give up on one restart after this many s")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma list of {', '.join(ALL_SYSTEMS)}")
    p.add_argument("--bench-venv", type=Path, default=bl.BENCH_VENV, help="virtualenv for supervisord and circus")
    p.add_argument("--seed", type=int, default=1, help="seed of the jitter")
    p.add_argument("--output", help="also write the markdown here")
    p.add_argument("--raw", help="write every sample (JSON) here")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (configs, logs)")
    args = p.parse_args()
    args.systems = bl.parse_systems(p, args.systems, ALL_SYSTEMS)
    if args.other_kills is None:
        args.other_kills = args.kills
    return args


# -- baselines -------------------------------------------------------------------------


def _fork_child(ready: str) -> int:
    pid = os.fork()
    if pid == 0:  # the child: signal readiness, idle until killed; never returns
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal_ready(ready)
            while True:
                signal.pause()
        finally:
            os._exit(0)
    return pid


def bench_fork(listener: bl.ReadyListener, args: argparse.Namespace) -> dict[str, Any]:
    ready = str(listener.path)
    pid = _fork_child(ready)
    out: list[float] = []
    faults: list[int] = []
    try:
        listener.wait(args.timeout, lambda p: p == pid)
        for i in range(args.warmup + args.kills):
            old = pid
            t0 = time.perf_counter()
            os.kill(old, signal.SIGKILL)
            os.waitpid(old, 0)
            pid = _fork_child(ready)
            _, t1 = listener.wait(args.timeout, lambda p, want=pid: p == want)
            if i >= args.warmup:
                out.append(t1 - t0)
                faults.append(bl.minor_faults(pid))
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    return {"dgram": out, "faults": faults}


def bench_exec(listener: bl.ReadyListener, args: argparse.Namespace) -> dict[str, Any]:
    argv = [bl.PY, str(bl.CHILD), str(listener.path)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    out: list[float] = []
    faults: list[int] = []
    try:
        listener.wait(args.timeout, lambda p: p == proc.pid)
        for i in range(args.warmup + args.kills):
            t0 = time.perf_counter()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            _, t1 = listener.wait(args.timeout, lambda p, want=proc.pid: p == want)
            if i >= args.warmup:
                out.append(t1 - t0)
                faults.append(bl.minor_faults(proc.pid))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"dgram": out, "faults": faults}


# -- otpd --------------------------------------------------------------------------------


def bench_otpd(listener: bl.ReadyListener, args: argparse.Namespace, rng: random.Random,
               spare: str = "on_restart") -> dict[str, Any]:
    from otpd.client import Client

    folder = bl.temp_dir("otpd-bench-restart-")
    config = bl.write_otpd_config(folder, [{"id": "bench", "agent": "bench_agents:ReadyAgent",
                                            "args": {"ready": str(listener.path)}, "spare": spare}],
                                  max_restarts=1_000_000, max_seconds=1)
    daemon, sock, _ = bl.start_otpd(folder, config)
    res: dict[str, Any] = {"dgram": [], "event": [], "faults": [], "kill_exited": [], "exited_started": [],
                           "started_dgram": [], "dgram_ready": [], "ready_event": [], "config": config.read_text()}
    try:
        with Client(sock, timeout=args.timeout) as ctl:
            pid = ctl.request("wait", {"id": "bench", "state": "running", "timeout": args.timeout})["pid"]
        listener.wait(args.timeout, lambda p: p == pid, check=daemon.check_alive)
        events = bl.EventStream(sock, timeout=args.timeout)
        sel = selectors.DefaultSelector()
        sel.register(listener.sock, selectors.EVENT_READ)
        sel.register(events.sock, selectors.EVENT_READ)
        events.read()
        cpu0 = bl.cpu_seconds(daemon.pid)
        flt0 = bl.minor_faults(daemon.pid)
        for i in range(args.warmup + args.kills):
            time.sleep(rng.uniform(0, args.jitter_ms / 1000.0))  # pacing: a random timer phase
            old = pid
            seen: dict[str, dict[str, Any]] = {}
            got_d: tuple[int, float, float] | None = None
            got_e: tuple[int, float, float] | None = None
            tw0 = time.time()
            t0 = time.perf_counter()
            os.kill(old, signal.SIGKILL)
            deadline = t0 + args.timeout
            while got_d is None or got_e is None:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise TimeoutError(f"otpd restart {i}: no ready after {args.timeout}s (seen {sorted(seen)})")
                sel.select(left)
                now, now_w = time.perf_counter(), time.time()
                for p in listener.read():
                    if p != old and got_d is None:
                        got_d = (p, now, now_w)
                for f in events.read():
                    if f.get("id") != "bench":
                        continue
                    seen.setdefault(f["event"], f)
                    if f["event"] == "ready" and f.get("pid") != old and got_e is None:
                        got_e = (f["pid"], now, now_w)
                    if f["event"] == "escalated":
                        raise RuntimeError(f"otpd escalated: {f}")
                daemon.check_alive()
            if got_d[0] != got_e[0]:
                raise RuntimeError(f"readiness from pid {got_d[0]} but otpd says {got_e[0]} is ready")
            pid = got_d[0]
            if i < args.warmup:
                if i == args.warmup - 1:
                    cpu0 = bl.cpu_seconds(daemon.pid)
                    flt0 = bl.minor_faults(daemon.pid)
                continue
            res["dgram"].append(got_d[1] - t0)
            res["event"].append(got_e[1] - t0)
            res["faults"].append(bl.minor_faults(pid))
            if {"exited", "started", "ready"} <= seen.keys():
                res["kill_exited"].append(seen["exited"]["time"] - tw0)
                res["exited_started"].append(seen["started"]["time"] - seen["exited"]["time"])
                res["started_dgram"].append(got_d[2] - seen["started"]["time"])
                res["dgram_ready"].append(seen["ready"]["time"] - got_d[2])
                res["ready_event"].append(got_e[2] - seen["ready"]["time"])
        res["daemon_cpu_ms_per_restart"] = 1000.0 * (bl.cpu_seconds(daemon.pid) - cpu0) / max(1, args.kills)
        res["daemon_faults_per_restart"] = (bl.minor_faults(daemon.pid) - flt0) / max(1, args.kills)
        with Client(sock, timeout=args.timeout) as ctl:
            child = next(c for c in ctl.request("status")["children"] if c["id"] == "bench")
        res["restarts_counted"] = child["restarts"]
        res["rss_mib"] = bl.rss_bytes(daemon.pid) / 2**20
        events.close()
        sel.close()
    finally:
        daemon.stop(timeout=30.0)
    return res


# -- supervisord and circus -----------------------------------------------------------------


def _kill_loop(name: str, listener: bl.ReadyListener, daemon: bl.Managed, args: argparse.Namespace,
               rng: random.Random, jitter_ms: float, pace: Any = None) -> tuple[list[float], list[int]]:
    pid, _ = listener.wait(60.0, check=daemon.check_alive)
    if pace:
        pace(pid)
    out: list[float] = []
    faults: list[int] = []
    for i in range(args.warmup + args.other_kills):
        time.sleep(rng.uniform(0, jitter_ms / 1000.0))
        old = pid
        t0 = time.perf_counter()
        os.kill(old, signal.SIGKILL)
        pid, t1 = listener.wait(args.timeout, lambda p, o=old: p != o, check=daemon.check_alive)
        if i >= args.warmup:
            out.append(t1 - t0)
            faults.append(bl.minor_faults(pid))
        if pace:
            pace(pid)
        if (i + 1) % 50 == 0:
            bl.progress(f"{name}: {i + 1}/{args.warmup + args.other_kills} kills")
    return out, faults


def bench_supervisord(listener: bl.ReadyListener, args: argparse.Namespace, venv: bl.BenchVenv,
                      rng: random.Random) -> dict[str, Any]:
    folder = bl.temp_dir("otpd-bench-supervisord-")
    conf, sock = bl.write_supervisord_conf(folder, [("bench", [bl.PY, str(bl.CHILD), str(listener.path)])])
    daemon = bl.Managed("supervisord", [venv.bin("supervisord"), "-n", "-c", str(conf)], folder / "supervisord.out",
                        cwd=folder)
    pace_s: list[float] = []
    try:
        bl.wait_for_unix_socket(sock, 60.0, daemon)
        rpc = bl.supervisor_rpc(sock)

        def until_running(pid: int) -> None:
            """supervisord backs off a process that dies before startsecs: wait for RUNNING."""
            t0 = time.perf_counter()
            deadline = t0 + 30.0
            while True:
                info = rpc.supervisor.getProcessInfo("bench")
                if info["statename"] == "RUNNING" and info["pid"] == pid:
                    pace_s.append(time.perf_counter() - t0)
                    return
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"supervisord: pid {pid} not RUNNING after 30s: {info}")
                time.sleep(0.02)

        samples, faults = _kill_loop("supervisord", listener, daemon, args, rng, args.jitter_ms, until_running)
    finally:
        daemon.stop(timeout=30.0)
    return {"dgram": samples, "faults": faults, "pace_s": pace_s, "config": conf.read_text()}


def bench_circus(listener: bl.ReadyListener, args: argparse.Namespace, venv: bl.BenchVenv,
                 rng: random.Random) -> dict[str, Any]:
    folder = bl.temp_dir("otpd-bench-circus-")
    ini, endpoint = bl.write_circus_ini(folder, [("bench", [bl.PY, str(bl.CHILD), str(listener.path)])])
    daemon = bl.Managed("circusd", [venv.bin("circusd"), "--log-level", "warning", str(ini)], folder / "circusd.log",
                        cwd=folder)
    try:
        samples, faults = _kill_loop("circus", listener, daemon, args, rng, args.circus_jitter_ms)
    finally:
        daemon.stop(timeout=30.0)
    return {"dgram": samples, "faults": faults, "config": ini.read_text()}


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    report = bl.Report("Restart latency: SIGKILL by PID -> replacement ready")
    folder = bl.temp_dir("otpd-bench-ready-")
    listener = bl.ReadyListener(folder / "ready.sock")
    results: dict[str, Any] = {}
    notes: list[str] = []
    venv: bl.BenchVenv | None = None
    if {"supervisord", "circus"} & set(args.systems):
        venv = bl.ensure_bench_venv(args.bench_venv)
        if not venv.ok:
            notes.append(f"supervisord and circus: BLOCKED: {venv.reason}")
    runners = {
        "fork": lambda: bench_fork(listener, args),
        "exec": lambda: bench_exec(listener, args),
        "otpd": lambda: bench_otpd(listener, args, rng),
        "otpd-cold": lambda: bench_otpd(listener, args, rng, spare="never"),
        "supervisord": lambda: bench_supervisord(listener, args, venv, rng),  # type: ignore[arg-type]
        "circus": lambda: bench_circus(listener, args, venv, rng),  # type: ignore[arg-type]
    }
    for system in args.systems:
        if system in ("supervisord", "circus") and not (venv and venv.ok):
            continue
        n = args.other_kills if system in ("supervisord", "circus") else args.kills
        bl.progress(f"{system}: {args.warmup} warm-up + {n} timed kills")
        try:
            results[system] = runners[system]()
        except Exception as exc:  # report what failed and go on with the other systems
            notes.append(f"{system}: FAILED: {type(exc).__name__}: {exc}")
            bl.progress(f"{system}: failed: {exc}")
        listener.read()  # drop anything a stopped system's children sent late
    listener.close()

    label = {
        "fork": "bare warm `os.fork()` (bench kills, `waitpid`s, forks itself)",
        "exec": "bare `subprocess.Popen` of `python bench_child.py`",
        "otpd": "otpd, default config (a warm spare from the first restart on; `ReadyAgent.init()` signals)",
        "otpd-cold": "otpd, `spare = \"never\"` (every restart forks the daemon)",
        "supervisord": f"supervisord {venv.versions.get('supervisor', '') if venv else ''} (defaults; fork+exec)",
        "circus": f"circus {venv.versions.get('circus', '') if venv else ''} (defaults; fork+exec)",
    }
    rows = []
    for system in args.systems:
        if system in results:
            s = bl.summary(results[system]["dgram"])
            faults = results[system].get("faults") or [-1]
            rows.append([label[system], s["n"], s["p50"], s["p90"], s["p99"], s["max"], s["mean"],
                         int(bl.percentile(faults, 50))])
    cols = ["system", "kills", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms"]
    report.table(cols + ["new child's page faults (p50)"], rows,
                 "**kill -> readiness datagram from the new process** (same child code, same clock, for every "
                 "system):")
    if "otpd" in results:
        r = results["otpd"]
        s = bl.summary(r["event"])
        report.table(cols, [["otpd, kill -> `ready` event on an `events` subscription", s["n"], s["p50"], s["p90"],
                             s["p99"], s["max"], s["mean"]]], "**otpd's own figure**:")
        parts = [("kill -> daemon emits `exited` (the victim's exit, SIGCHLD wake-up, waitpid, decision)",
                  "kill_exited"),
                 ("`exited` -> `started` (restart decision; `go` to the spare, no fork)", "exited_started"),
                 ("`started` -> readiness datagram (the spare reads the state, runs init)", "started_dgram"),
                 ("readiness datagram -> daemon emits `ready` (ready frame over the channel)", "dgram_ready"),
                 ("daemon emits `ready` -> event received by the bench", "ready_event")]
        brows = []
        for name, key in parts:
            s = bl.summary(r[key])
            brows.append([name, s["p50"], s["p90"], s["p99"], s["max"]])
        report.table(["otpd segment (daemon event timestamps vs the bench's wall clock)", "p50 ms", "p90 ms",
                      "p99 ms", "max ms"], brows, "**Where otpd's restart time goes**:")
        sd, se = bl.summary(r["dgram"]), bl.summary(r["event"])
        verdict = [["p50 <= 3 ms (readiness datagram)", sd["p50"], "pass" if sd["p50"] <= 3 else "MISS"],
                   ["p99 <= 10 ms (readiness datagram)", sd["p99"], "pass" if sd["p99"] <= 10 else "MISS"],
                   ["p50 <= 3 ms (`ready` event)", se["p50"], "pass" if se["p50"] <= 3 else "MISS"],
                   ["p99 <= 10 ms (`ready` event)", se["p99"], "pass" if se["p99"] <= 10 else "MISS"]]
        report.table(["otpd target", "measured ms", "verdict"], verdict)
        notes.append(f"otpd: daemon CPU {r['daemon_cpu_ms_per_restart']:.2f} ms and "
                     f"{r['daemon_faults_per_restart']:.0f} minor page faults per restart; the child's "
                     f"`restarts` counter reads {r['restarts_counted']} after {args.warmup + args.kills} kills; "
                     f"daemon RSS {r['rss_mib']:.1f} MiB")
    if "supervisord" in results and results["supervisord"]["pace_s"]:
        s = bl.summary(results["supervisord"]["pace_s"])
        notes.append(f"supervisord: after each readiness the bench waited (untimed) for RUNNING, p50 "
                     f"{s['p50']:.0f} ms (its startsecs = 1 s default)")
    notes.append(f"each kill of otpd and supervisord came after a random 0-{args.jitter_ms:.0f} ms pause, of circus "
                 f"0-{args.circus_jitter_ms:.0f} ms (its check_delay is 5 s with an INI config), so kills land at "
                 f"random phases of their periodic timers (seed {args.seed}); {args.warmup} untimed warm-up kills "
                 "per system")
    zero_fill, cow = bl.page_fault_cost()
    notes.append(f"this machine's page-fault cost: {zero_fill:.1f} us per zero-fill fault, {cow:.1f} us per "
                 "copy-on-write fault (a fork()ed child pays one per page it writes); page faults in the table "
                 "are the new child's minor faults when it was found ready")
    report.add("Notes:", "\n".join(f"- {n}" for n in notes))
    if args.raw:
        Path(args.raw).write_text(json.dumps(results, indent=1))
    if args.keep:
        bl.keep_temp_dirs()
    report.emit(args.output)
    return 0 if not any("FAILED" in n or "BLOCKED" in n for n in notes) else 1


if __name__ == "__main__":
    raise SystemExit(bl.guarded(main))
