"""Scale: 1,000 children under one daemon: otpd vs supervisord vs circus.

    python scripts/bench_scale.py [--n 1000] [--systems otpd,supervisord,circus]

For each system, one after the other (each is stopped before the next starts):

* time to all up: from just before the daemon is started to every child up.
  otpd: every child's ``ready`` event (its agent's ``init()`` returned; an
  ``events`` subscription plus one ``status`` for those up before it); its
  own view confirmed by ``status``.  supervisord and circus run a tiny idle
  Python program (``bench_child.py``) that sends a readiness datagram with
  its PID: all up = N distinct PIDs received; their own view = supervisord's
  ``getAllProcessInfo`` all RUNNING (which takes ``startsecs`` = 1 s by
  default), circus's ``status`` all ``active``;
* status query time: the median of --status-reps calls through the API on
  one connection (otpd ``Client.request("status")``; supervisord XML-RPC
  ``supervisor.getAllProcessInfo``; circus zmq ``status``), and the median
  wall time of --cli-reps runs of the CLI (``otpctl status``,
  ``supervisorctl status``, ``circusctl status``), Python start-up included;
* the master process's RSS, open fds and fds per child; the children's
  total PSS (their real memory cost, shared pages split);
* CPU while idle: the master's user+system CPU over an --idle-s window with
  nobody talking to it (and the children's, summed), in % of one core;
* time to stop everything on SIGTERM.

Every setting of every system is its default except paths, endpoints and
otpd's log_level (warning).  The soft fd limit is raised to the hard one for
the daemons this starts.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import statistics
import time
from pathlib import Path
from typing import Any

import benchlib as bl

ALL_SYSTEMS = ("otpd", "supervisord", "circus")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="children per daemon (default 1000)")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma list of {', '.join(ALL_SYSTEMS)}")
    p.add_argument("--otpd-agent", default="otpd.agents.echo:EchoAgent", help="otpd's agent class")
    p.add_argument("--otpd-start", default="parallel,serial",
                   help="otpd rounds, one per start order of the root supervisor (default parallel,serial)")
    p.add_argument("--checks-off-variant", action="store_true",
                   help="one more otpd round with heartbeat_timeout_ms = 0 (no liveness sweep at all), "
                        "to show what the sweep costs while idle")
    p.add_argument("--status-reps", type=int, default=20, help="API status calls to time (default 20)")
    p.add_argument("--cli-reps", type=int, default=5, help="CLI status runs to time (default 5)")
    p.add_argument("--idle-s", type=float, default=10.0, help="idle CPU window, s (default 10)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="give up starting after this many s")
    p.add_argument("--stop-timeout", type=float, default=60.0,
                   help="SIGKILL a daemon (and its children) that has not stopped this long after SIGTERM")
    p.add_argument("--no-child-memory", action="store_true", help="skip the children's PSS (reads N smaps)")
    p.add_argument("--bench-venv", type=Path, default=bl.BENCH_VENV, help="virtualenv for supervisord and circus")
    p.add_argument("--output", help="also write the markdown here")
    p.add_argument("--raw", help="write the results (JSON) here")
    p.add_argument("--keep", action="store_true", help="keep the temp folders (configs, logs)")
    args = p.parse_args()
    args.systems = bl.parse_systems(p, args.systems, ALL_SYSTEMS)
    return args


def children_pss(pid: int) -> float:
    """Total PSS of pid's descendants, MiB (from /proc/PID/smaps_rollup)."""
    total = 0
    for c in bl.psutil.Process(pid).children(recursive=True):
        try:
            with open(f"/proc/{c.pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total / 1024.0


def measure_master(pid: int, n: int, args: argparse.Namespace, fds: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"rss_mib": bl.rss_bytes(pid) / 2**20, "fds": bl.fd_count(pid) if fds is None else fds}
    out["fds_per_child"] = out["fds"] / n
    out["children_pss_mib"] = None if args.no_child_memory else children_pss(pid)
    bl.progress(f"idle CPU window of {args.idle_s:.0f} s")
    out["idle"] = bl.idle_cpu(pid, args.idle_s)
    return out


def wait_ready_pids(listener: bl.ReadyListener, n: int, timeout: float, daemon: bl.Managed) -> float:
    """perf_counter when n distinct PIDs have signalled readiness."""
    seen: set[int] = set()
    deadline = time.perf_counter() + timeout
    last_report = time.perf_counter()
    while len(seen) < n:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise TimeoutError(f"only {len(seen)}/{n} children signalled readiness in {timeout}s")
        try:
            pid, _ = listener.wait(min(left, 5.0), check=daemon.check_alive)
        except TimeoutError:
            continue
        seen.add(pid)
        seen.update(listener.read())
        if time.perf_counter() - last_report > 5:
            bl.progress(f"{daemon.name}: {len(seen)}/{n} children up")
            last_report = time.perf_counter()
    return time.perf_counter()


# -- otpd ------------------------------------------------------------------------------------


def otpd_settled_fds(pid: int, sock: Path) -> int:
    """The daemon's open fds with no client connected: counted while one connection is open,
    after a reply on it (the daemon handles every event of a loop turn before it writes a
    reply, so the connections closed before this one are closed in the daemon too), minus
    that connection.  Counted at once, a connection just closed could still be open there."""
    from otpd.client import Client

    with Client(sock, timeout=60) as ctl:
        ctl.request("ps")
        return bl.fd_count(pid) - 1


def otpd_base_fds(args: argparse.Namespace, k: int = 10) -> int:
    """Open fds of an otpd with k children minus k x its fds per child: the daemon's own."""
    folder = bl.temp_dir("otpd-scale-base-")
    counts = []
    for kids in (k, 2 * k):
        config = bl.write_otpd_config(folder, [{"id": f"c{i:04d}", "agent": args.otpd_agent} for i in range(kids)],
                                      max_restarts=3, max_seconds=5)
        daemon, sock, _ = bl.start_otpd(folder, config)
        try:
            from otpd.client import Client

            with Client(sock, timeout=60) as ctl:
                ctl.request("wait", {"id": f"c{kids - 1:04d}", "state": "running", "timeout": 60})
            counts.append(otpd_settled_fds(daemon.pid, sock))
        finally:
            daemon.stop(timeout=args.stop_timeout)
    per_child = (counts[1] - counts[0]) / k
    return int(round(counts[0] - per_child * k))


def start_timeline(frames: list[dict[str, Any]]) -> dict[str, Any]:
    """From started/ready events: each child's boot (started -> ready) and the daemon's turnaround
    (one child's ready -> the next child's started: fork and bookkeeping), first and last 100."""
    started: dict[str, float] = {}
    ready: dict[str, float] = {}
    for f in frames:
        if f["event"] == "started":
            started.setdefault(f["id"], f["time"])
        elif f["event"] == "ready" and f["id"] != "root":
            ready.setdefault(f["id"], f["time"])
    order = sorted((t, i) for i, t in started.items() if i in ready)
    boot = [ready[i] - started[i] for _, i in order]
    turn = [started[b] - ready[a] for (_, a), (_, b) in zip(order, order[1:], strict=False)]
    return {"seen": len(order), "boot_first": bl.summary(boot[:100]), "boot_last": bl.summary(boot[-100:]),
            "turn_first": bl.summary(turn[:100]), "turn_last": bl.summary(turn[-100:])}


def bench_otpd(args: argparse.Namespace, label: str = "otpd", extra: dict[str, Any] | None = None,
               start: str = "parallel") -> dict[str, Any]:
    from otpd.client import Client

    n = args.n
    folder = bl.temp_dir("otpd-scale-")
    ids = [f"c{i:04d}" for i in range(n)]
    config = bl.write_otpd_config(folder, [{"id": i, "agent": args.otpd_agent, **(extra or {})} for i in ids],
                                  max_restarts=3, max_seconds=5, start=start)
    res: dict[str, Any] = {"system": label}
    frames: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    daemon, sock, res["socket_s"] = bl.start_otpd(folder, config, timeout=args.start_timeout)
    try:
        flt0 = bl.minor_faults(daemon.pid)
        events = bl.EventStream(sock, timeout=60)
        running: set[str] = set()
        with Client(sock, timeout=60) as ctl:
            snap = ctl.request("status")
        running.update(c["id"] for c in snap["children"] if c["state"] == "running")
        root_ready = snap["daemon"]["state"] == "running"
        sel = selectors.DefaultSelector()
        sel.register(events.sock, selectors.EVENT_READ)
        deadline = t0 + args.start_timeout
        while len(running) < n and not root_ready:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"otpd: only {len(running)}/{n} children running after {args.start_timeout}s")
            sel.select(min(left, 1.0))
            for f in events.read():
                frames.append(f)
                if f["event"] == "ready":
                    if f["id"] == "root":
                        root_ready = True
                    else:
                        running.add(f["id"])
                elif f["event"] in ("escalated", "exited"):
                    raise RuntimeError(f"otpd: child event during start: {f}")
            daemon.check_alive()
        res["all_up_s"] = time.perf_counter() - t0
        res["start_cpu_s"] = bl.cpu_seconds(daemon.pid)  # the daemon's CPU from its exec to all running
        sel.close()
        events.close()
        res["timeline"] = start_timeline(frames)
        # per child of the tree: a parallel start forks them all before the socket accepts, so
        # the events seen here may hold no "started" at all (and flt0 comes after those forks)
        res["timeline"]["daemon_faults_per_child"] = (bl.minor_faults(daemon.pid) - flt0) / n
        with Client(sock, timeout=60) as ctl:
            snap = ctl.request("status")
            res["own_view_s"] = time.perf_counter() - t0
            res["children_cpu_s"] = sum(bl.cpu_seconds(c["pid"]) for c in snap["children"] if c.get("pid"))
            up = sum(1 for c in snap["children"] if c["state"] == "running")
            if up != n:
                raise RuntimeError(f"otpd: status shows {up}/{n} running")
            times = []
            for _ in range(args.status_reps):
                t = time.perf_counter()
                ctl.request("status")
                times.append(time.perf_counter() - t)
        res["status_api"] = times
        res["status_api_what"] = "`Client.request('status')`, one connection"
        res["status_cli"], res["cli_head"] = bl.timed_run(bl.otpctl_argv(sock, "status"), args.cli_reps)
        res["status_cli_what"] = "`otpctl status`"
        res.update(measure_master(daemon.pid, n, args, fds=otpd_settled_fds(daemon.pid, sock)))
        res["log_lines"] = len(daemon.log_path.read_text(errors="replace").splitlines())
    finally:
        res["stop_s"] = daemon.stop(timeout=args.stop_timeout)
    return res


# -- supervisord -------------------------------------------------------------------------------


def bench_supervisord(args: argparse.Namespace, venv: bl.BenchVenv) -> dict[str, Any]:
    n = args.n
    folder = bl.temp_dir("otpd-scale-supervisord-")
    listener = bl.ReadyListener(folder / "ready.sock")
    programs = [(f"c{i:04d}", [bl.PY, str(bl.CHILD), str(listener.path)]) for i in range(n)]
    conf, sock = bl.write_supervisord_conf(folder, programs)
    res: dict[str, Any] = {"system": f"supervisord {venv.versions.get('supervisor', '')}"}
    t0 = time.perf_counter()
    daemon = bl.Managed("supervisord", [venv.bin("supervisord"), "-n", "-c", str(conf)], folder / "supervisord.out",
                        cwd=folder)
    try:
        res["socket_s"] = bl.wait_for_unix_socket(sock, args.start_timeout, daemon)
        res["all_up_s"] = wait_ready_pids(listener, n, args.start_timeout, daemon) - t0
        rpc = bl.supervisor_rpc(sock, timeout=120)
        deadline = t0 + args.start_timeout
        while True:  # its own view: every process RUNNING (after startsecs)
            infos = rpc.supervisor.getAllProcessInfo()
            if sum(1 for i in infos if i["statename"] == "RUNNING") == n:
                res["own_view_s"] = time.perf_counter() - t0
                break
            if time.perf_counter() > deadline:
                raise TimeoutError("supervisord: not all RUNNING in time")
            daemon.check_alive()
            time.sleep(0.2)
        times = []
        for _ in range(args.status_reps):
            t = time.perf_counter()
            rpc.supervisor.getAllProcessInfo()
            times.append(time.perf_counter() - t)
        res["status_api"] = times
        res["status_api_what"] = "XML-RPC `supervisor.getAllProcessInfo`"
        res["status_cli"], res["cli_head"] = bl.timed_run([venv.bin("supervisorctl"), "-c", str(conf), "status"],
                                                          args.cli_reps)
        res["status_cli_what"] = "`supervisorctl status`"
        res.update(measure_master(daemon.pid, n, args))
    finally:
        res["stop_s"] = daemon.stop(timeout=args.stop_timeout)
        listener.close()
    return res


# -- circus --------------------------------------------------------------------------------------


def bench_circus(args: argparse.Namespace, venv: bl.BenchVenv) -> dict[str, Any]:
    n = args.n
    folder = bl.temp_dir("otpd-scale-circus-")
    listener = bl.ReadyListener(folder / "ready.sock")
    watchers = [(f"c{i:04d}", [bl.PY, str(bl.CHILD), str(listener.path)]) for i in range(n)]
    ini, endpoint = bl.write_circus_ini(folder, watchers)
    res: dict[str, Any] = {"system": f"circus {venv.versions.get('circus', '')}"}
    t0 = time.perf_counter()
    daemon = bl.Managed("circusd", [venv.bin("circusd"), "--log-level", "warning", str(ini)], folder / "circusd.log",
                        cwd=folder)
    try:
        res["all_up_s"] = wait_ready_pids(listener, n, args.start_timeout, daemon) - t0
        deadline = t0 + args.start_timeout
        while True:  # its own view: every watcher active
            _, reply = bl.circus_call(venv, endpoint, "status", reps=1, timeout=120)
            statuses = reply.get("statuses", {})  # also lists circus's own circusd-stats watcher
            if sum(1 for name, _ in watchers if statuses.get(name) == "active") == n:
                res["own_view_s"] = time.perf_counter() - t0
                break
            if time.perf_counter() > deadline:
                raise TimeoutError(f"circus: not all active in time: {reply}")
            daemon.check_alive()
            time.sleep(0.2)
        res["status_api"], _ = bl.circus_call(venv, endpoint, "status", reps=args.status_reps, timeout=120)
        res["status_api_what"] = "zmq `status` (circus.client.CircusClient)"
        res["status_cli"], res["cli_head"] = bl.timed_run([venv.bin("circusctl"), "--endpoint", endpoint, "status"],
                                                          args.cli_reps)
        res["status_cli_what"] = "`circusctl status`"
        res.update(measure_master(daemon.pid, n, args))
    finally:
        res["stop_s"] = daemon.stop(timeout=args.stop_timeout)
        listener.close()
    return res


# -- main ------------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    limits = bl.raise_nofile()
    report = bl.Report(f"Scale: {args.n:,} children under one daemon")
    notes: list[str] = [f"RLIMIT_NOFILE for the daemons: {limits[0]}/{limits[1]} (soft raised to hard)"]
    venv = None
    if {"supervisord", "circus"} & set(args.systems):
        venv = bl.ensure_bench_venv(args.bench_venv)
        if not venv.ok:
            notes.append(f"supervisord and circus: BLOCKED: {venv.reason}")
    results: list[dict[str, Any]] = []
    base_fds = None
    for system in args.systems:
        if system != "otpd" and not (venv and venv.ok):
            continue
        bl.progress(f"{system}: starting {args.n} children")
        try:
            if system == "otpd":
                base_fds = otpd_base_fds(args)
                for order in args.otpd_start.split(","):
                    results.append(bench_otpd(args, f"otpd (root `start = \"{order}\"`)", start=order))
                if args.checks_off_variant:
                    bl.progress("otpd (liveness checks off): starting children")
                    results.append(bench_otpd(args, "otpd, heartbeat_timeout_ms = 0",
                                              {"heartbeat_timeout_ms": 0}))
            elif system == "supervisord":
                results.append(bench_supervisord(args, venv))  # type: ignore[arg-type]
            else:
                results.append(bench_circus(args, venv))  # type: ignore[arg-type]
        except Exception as exc:
            notes.append(f"{system}: FAILED: {type(exc).__name__}: {exc}")
            bl.progress(f"{system}: failed: {exc}")

    def med_ms(xs: list[float]) -> float:
        return statistics.median(xs) * 1000.0 if xs else float("nan")

    rows = []
    for r in results:
        idle = r["idle"]
        rows.append([r["system"], args.n, r["all_up_s"], r["own_view_s"], med_ms(r["status_api"]),
                     med_ms(r["status_cli"]), r["rss_mib"], r["fds"], r["fds_per_child"], idle["master_pct"],
                     idle["children_pct"],
                     r["children_pss_mib"] if r["children_pss_mib"] is not None else float("nan"),
                     r["stop_s"] if r["stop_s"] is not None else f"> {args.stop_timeout:.0f}, SIGKILLed"])
    report.table(["system", "children", "all up, s", "all running (own view), s", "status API p50, ms",
                  "status CLI p50, ms", "master RSS, MiB", "master fds", "fds / child", "idle CPU master, %",
                  "idle CPU children, %", "children PSS, MiB", "stop, s"], rows)
    detail = []
    for r in results:
        api = bl.summary(r["status_api"])
        cli = bl.summary(r["status_cli"])
        detail.append([r["system"], r["status_api_what"], api["n"], api["p50"], api["min"], api["max"],
                       r["status_cli_what"], cli["n"], cli["p50"], cli["min"], cli["max"]])
    report.table(["system", "status API", "n", "p50 ms", "min ms", "max ms", "CLI", "n", "p50 ms", "min ms",
                  "max ms"], detail, "Status queries in detail:")
    otpd = next((r for r in results if r["system"].startswith("otpd (")), None)  # the first start order
    if otpd:
        api50 = med_ms(otpd["status_api"])
        marginal = (otpd["fds"] - base_fds) / args.n if base_fds is not None else float("nan")
        verdict = [[f"<= 2 s to all running ({otpd['system']})", otpd["all_up_s"],
                    "pass" if otpd["all_up_s"] <= 2 else "MISS"],
                   ["status <= 20 ms (API)", api50, "pass" if api50 <= 20 else "MISS"],
                   [f"<= 2 fds per child ((fds, no client connected, - {base_fds} of its own) / n)", marginal,
                    "pass" if marginal <= 2 else "MISS"],
                   [f"idle CPU 0 % (master, {otpd['system']}, default liveness checks)", otpd["idle"]["master_pct"],
                    "pass" if otpd["idle"]["master_pct"] < 0.05 else "MISS"]]
        quiet = next((r for r in results if r["system"].startswith("otpd, heartbeat")), None)
        if quiet:
            verdict.append(["idle CPU 0 % (master, liveness checks off)", quiet["idle"]["master_pct"],
                            "pass" if quiet["idle"]["master_pct"] < 0.05 else "MISS"])
        report.table(["otpd target", "measured", "verdict"], verdict)
        trows = []
        for r in results:
            if "timeline" not in r:
                continue
            t = r["timeline"]
            for part, key in (("first 100", "first"), ("last 100", "last")):
                b, u = t[f"boot_{key}"], t[f"turn_{key}"]
                trows.append([r["system"], part, b["p50"], b["p90"], u["p50"], u["p90"], b["p50"] + u["p50"]])
        for r in results:
            if "timeline" in r:
                notes.append(f"{r['system']}: from its socket's first accept until all ran, the daemon took "
                             f"{r['timeline']['daemon_faults_per_child']:.0f} minor page faults per child "
                             "(copy-on-write after each fork among them)")
        report.table(["otpd start, children in start order", "which", "boot p50 ms", "boot p90 ms",
                      "turnaround p50 ms", "turnaround p90 ms", "per child p50 ms"], trows,
                     "Where otpd's start time goes (children start one after another, each ready before the next; "
                     "boot = `started` -> `ready` event times, turnaround = one child's `ready` -> the next one's "
                     "`started`, i.e. the daemon's fork and bookkeeping):")
        for r in results:
            if "start_cpu_s" in r:
                notes.append(f"{r['system']}: the daemon used {r['start_cpu_s']:.2f} s of CPU from its exec until "
                             f"every child was running, the {args.n} children {r.get('children_cpu_s', 0):.2f} s "
                             f"together ({r.get('children_cpu_s', 0) / args.n * 1e3:.2f} ms each, their boot "
                             f"included); on {os.cpu_count()} cores a start takes at least (daemon + children) / cores")
        notes.append(f"otpd: control socket accepted {otpd['socket_s']:.2f} s after start; agent "
                     f"`{args.otpd_agent}` with default liveness settings; `otpctl status` first line: "
                     f"`{otpd['cli_head']}`; daemon log lines at warning: {otpd['log_lines']}")
    notes.append(f"idle window {args.idle_s:.0f} s per system with no client connected; CPU = user+system of the "
                 "master (children summed separately) / wall time, % of one core")
    notes.append("supervisord's own view needs every process RUNNING, which its default startsecs = 1 s delays; "
                 "circus's own view is every watcher `active`")
    report.add("Notes:", "\n".join(f"- {n}" for n in notes))
    if args.raw:
        Path(args.raw).write_text(json.dumps(results, indent=1, default=str))
    if args.keep:
        bl.keep_temp_dirs()
    report.emit(args.output)
    return 0 if not any("FAILED" in n or "BLOCKED" in n for n in notes) else 1


if __name__ == "__main__":
    raise SystemExit(bl.guarded(main))
