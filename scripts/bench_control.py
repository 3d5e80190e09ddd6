#!/usr/bin/env python3
"""Benchmarks of the control plane (issue 4), side by side with their floors.

    python scripts/bench_control.py [--calls 5000] [--pipelined 100000] [--window 1000] [--ctl-runs 30] [--no-installed]

* round trip: one client, one call at a time, client -> daemon -> EchoAgent -> back;
  p50/p99 in microseconds.  Floor, in the same run: a msgpack ping-pong between two
  processes over a socketpair (one hop; the call makes two).
* pipelined: one client keeping --window calls in flight (topped up once per read); calls per second.
* both in map frames (DESIGN §4) and in compact frames ([id, "call", agent, request]), alternated.
* otpctl status: wall time of the whole command, interpreter start included: the checkout's
  editable install and the package built and installed as a deployment has it, alternated,
  with a bare interpreter start beside them.

It starts its own daemon on a temp dir and stops it by PID.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from otpd.client import Client  # noqa: E402
from otpd.control import protocol  # noqa: E402
from scripts.bench_state import Daemon, pct  # noqa: E402


def socketpair_floor(n: int) -> list[float]:
    """One msgpack request/reply between two processes over a socketpair, in µs."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echoing peer
        a.close()
        unpacker = msgpack.Unpacker(raw=False)
        try:
            while data := b.recv(65536):
                unpacker.feed(data)
                for frame in unpacker:
                    b.sendall(msgpack.packb(frame))
        finally:
            os._exit(0)
    b.close()
    unpacker = msgpack.Unpacker(raw=False)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        a.sendall(msgpack.packb({"id": i, "op": "call", "args": {"request": i}}))
        while True:
            unpacker.feed(a.recv(65536))
            if next(unpacker, None) is not None:
                break
        out.append((time.perf_counter() - t0) * 1e6)
    a.close()
    os.waitpid(pid, 0)
    return out


def round_trips(sock: Path, n: int, compact: bool = False) -> list[float]:
    """One call at a time: ``request("call", ...)`` in map frames, or ``call()`` in compact ones."""
    out = []
    with Client(sock) as c:
        for i in range(n):
            t0 = time.perf_counter()
            if compact:
                c.call("echo", i)
            else:
                c.request("call", {"id": "echo", "request": i})
            out.append((time.perf_counter() - t0) * 1e6)
    return out


def pipelined(sock: Path, n: int, window: int, compact: bool = False) -> float:
    with Client(sock, timeout=60) as c:
        frame = bytearray()
        t0 = time.perf_counter()
        sent = done = 0
        while done < n:
            while sent < n and sent - done < window:
                if compact:
                    frame += protocol.pack([sent, "call", "echo", sent])
                else:
                    frame += protocol.pack({"id": sent, "op": "call", "args": {"id": "echo", "request": sent}})
                sent += 1
            if frame:
                c.sock.sendall(frame)
                frame.clear()
            reply = c.receive()  # blocks for one reply, then takes every reply that read brought:
            replies = [reply, *c.unpacker]  # the window is topped up once per read, not once per reply
            for reply in replies:
                if not (reply[1] if compact else reply.get("ok")):
                    raise RuntimeError(reply)
            done += len(replies)
        return n / (time.perf_counter() - t0)


def otpctl_status(sock: Path, runs: int, otpctl: Path | None = None) -> list[float]:
    cmd = [str(otpctl or Path(sys.executable).parent / "otpctl"), "--socket", str(sock), "status"]
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def installed_otpctl() -> Path:
    """otpctl as a deployment has it: the package built and installed into a virtualenv of
    its own, as scripts/install-systemd does (not the checkout's editable install, whose
    import hook costs every command ~20 ms at interpreter start).  The venv is kept under
    var/ for its dependencies; otpd itself is rebuilt from a copy of the checkout each run."""
    venv = REPO / "var" / "bench-otpctl-venv"
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    with tempfile.TemporaryDirectory(prefix="otpd-src-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "var", "__pycache__", "build",
                                                                 "*.egg-info", ".mypy_cache", ".ruff_cache"))
        marker = venv / "deps-of-pyproject.toml"  # the pyproject its dependencies came from
        fresh = not marker.exists() or marker.read_bytes() != (REPO / "pyproject.toml").read_bytes()
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        if fresh:  # its dependencies
            subprocess.run(pip + [str(src)], check=True)
            shutil.copyfile(REPO / "pyproject.toml", marker)
        subprocess.run(pip + ["--no-deps", "--force-reinstall", str(src)], check=True)  # this checkout's otpd
    return venv / "bin" / "otpctl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--pipelined", type=int, default=100_000)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ctl-runs", type=int, default=30)
    ap.add_argument("--no-installed", action="store_true",
                    help="skip otpctl as installed from a built package (it needs PyPI the first time)")
    args = ap.parse_args()
    installed = None if args.no_installed else installed_otpctl()
    print("command: python scripts/bench_control.py " + " ".join(sys.argv[1:]), flush=True)
    body = '\n[[root.children]]\nid = "echo"\nagent = "otpd.agents.echo:EchoAgent"\n'
    with tempfile.TemporaryDirectory(prefix="otpd-bench-") as tmp:
        d = Daemon(body, Path(tmp), "control").start()
        try:
            floor, rtt, rtt_c, rates, rates_c = [], [], [], [], []
            for _ in range(args.rounds):  # alternate, so all see the same machine
                floor += socketpair_floor(args.calls)
                rtt += round_trips(d.socket, args.calls)
                rtt_c += round_trips(d.socket, args.calls, compact=True)
                rates.append(pipelined(d.socket, args.pipelined, args.window))
                rates_c.append(pipelined(d.socket, args.pipelined, args.window, compact=True))
            ctl, ctl_installed, floor_py = [], [], []
            for _ in range(args.ctl_runs):  # alternated, run by run
                ctl += otpctl_status(d.socket, 1)
                if installed is not None:
                    ctl_installed += otpctl_status(d.socket, 1, installed)
                    t0 = time.perf_counter()
                    subprocess.run([str(installed.parent / "python"), "-c", "pass"], check=True)
                    floor_py.append((time.perf_counter() - t0) * 1000)
        finally:
            d.stop()
    print("| figure | p50 | p99 | target |")
    print("|---|---:|---:|---|")
    print(f"| msgpack ping-pong over a socketpair (floor, one hop) | {statistics.median(floor):.0f} µs "
          f"| {pct(floor, 0.99):.0f} µs | |")
    print(f"| call round trip client → daemon → EchoAgent → client | {statistics.median(rtt):.0f} µs "
          f"| {pct(rtt, 0.99):.0f} µs | p50 ≤ 100 µs |")
    print(f"| the same, compact frames (`Client.call`) | {statistics.median(rtt_c):.0f} µs "
          f"| {pct(rtt_c, 0.99):.0f} µs | p50 ≤ 100 µs |")
    print(f"| pipelined calls/s, one client, {args.window} in flight (median of {args.rounds}) "
          f"| {statistics.median(rates):,.0f} /s | min {min(rates):,.0f} /s | ≥ 100,000 /s |")
    print(f"| the same, compact frames | {statistics.median(rates_c):,.0f} /s | min {min(rates_c):,.0f} /s "
          f"| ≥ 100,000 /s |")
    if ctl:  # (none with --ctl-runs 0)
        print(f"| `otpctl status` wall time, checkout's editable install ({args.ctl_runs} runs) "
              f"| {statistics.median(ctl):.0f} ms | {pct(ctl, 0.99):.0f} ms | ≤ 150 ms |")
    if ctl_installed:
        print(f"| `otpctl status` wall time, installed package ({args.ctl_runs} runs) "
              f"| {statistics.median(ctl_installed):.0f} ms | {pct(ctl_installed, 0.99):.0f} ms | ≤ 150 ms |")
    if ctl_installed:
        print(f"| `python -c pass` in the same run (interpreter floor) | {statistics.median(floor_py):.0f} ms | | |")


if __name__ == "__main__":
    main()
