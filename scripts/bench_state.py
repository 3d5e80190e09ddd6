#!/usr/bin/env python3
"""Benchmarks of persistent state (issue 3): restore time, persistence overhead, fsync throughput.

    python scripts/bench_state.py                 # everything, the figures of BENCHMARKS.md
    python scripts/bench_state.py --only restore --sizes 1000,100000

Each part starts its own daemon(s) on a temp dir and stops them (by PID) when done.

* restore: a QueueAgent-like agent with N items in its persistent queue is
  SIGKILLed by PID; the time until its replacement sent ``ready`` (state
  loaded) is taken from the daemon's event stream (the kill is timed just
  before os.kill).  Median / p90 / max over --kills kills per size.
* overhead: acknowledged puts per second to KVAgent with durability=process
  against durability=none, same agent, same client, rounds alternated in one
  run; the ratio of medians.
* fsync: 32 concurrent clients (one connection each, one call outstanding
  each) putting to one KVAgent with durability=fsync; acknowledged writes/s, and the
  agent's CPU µs per put (/proc; its sync helper not counted) and puts per commit.
"""

from __future__ import annotations

import argparse
import os
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from otpd.client import Client  # noqa: E402
from otpd.control import protocol  # noqa: E402

QUEUE_AGENT = "scripts.bench_state_agents:BenchQueue"


class Daemon:
    """One otpd on a temp dir, stopped by PID on exit."""

    def __init__(self, body: str, root: Path, name: str) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "otpd.toml"
        self.config.write_text(f'[daemon]\nstate_dir = "lib"\nruntime_dir = "run"\nlog_level = "warning"\n\n{body}')
        self.socket = self.dir / "run" / "otpd.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = open(self.dir / "otpd.log", "ab")  # noqa: SIM115
        # -m puts the cwd first on sys.path: this checkout's, or a bench run from a worktree
        # would measure the otpd of wherever it was started.
        self.proc = subprocess.Popen([sys.executable, "-m", "otpd.cli.otpd_main", "run", "--config",
                                      str(self.config)], stdout=self.log, stderr=self.log, env=env, cwd=REPO)
        deadline = time.monotonic() + 30
        while True:  # bounded: until the socket answers
            try:
                with Client(self.socket, timeout=5) as c:
                    c.request("wait", {"id": "root", "state": "running", "timeout": 30})
                return self
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"otpd did not start; see {self.dir / 'otpd.log'}") from None
                time.sleep(0.02)  # polling a socket that does not exist yet: nothing to wait on

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- restore --------------------------------------------------------------------


def fill_queue(state_dir: Path, agent_id: str, n: int) -> None:
    """Write n queue items straight into the store, as the agent would (batches of 10,000)."""
    from otpd.agent.state import StateKeeper
    from otpd.store.lmdb_store import Store
    from scripts.bench_state_agents import BenchQueue

    store = Store(state_dir / "store", map_size_mb=4096)
    agent = BenchQueue(agent_id, {})
    keeper = StateKeeper(agent, store)
    keeper.load()
    for start in range(0, n, 10_000):
        for i in range(start, min(n, start + 10_000)):
            agent.items.append({"task": i, "payload": "x" * 64})
        agent.added += min(n, start + 10_000) - start
        keeper.commit()
    store.close()


def restore_times(d: Daemon, child: str, kills: int, jitter_ms: float = 0.0) -> list[float]:
    """SIGKILL ``child`` ``kills`` times, each right after the last restart was ready, or after
    a random pause of 0..``jitter_ms`` (the daemon's spare for the next restart has booted by then)."""
    out = []
    rng = random.Random(1)
    with Client(d.socket) as ctl, Client(d.socket, timeout=30) as ev:
        ev.request("events")
        for _ in range(kills):
            if jitter_ms:
                time.sleep(rng.uniform(0, jitter_ms / 1000))  # pacing: a crash at a random moment
            pid = next(c["pid"] for c in ctl.request("ps")["children"] if c["id"] == child)
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while True:
                frame = ev.receive()
                if frame.get("event") == "ready" and frame.get("id") == child:
                    out.append((time.perf_counter() - t0) * 1000)
                    break
    return out


def bench_restore(root: Path, sizes: list[int], kills: int, jitter_ms: float = 0.0) -> list[str]:
    body = "[store]\nmap_size_mb = 4096\n[root]\nmax_restarts = 1000000\nmax_seconds = 1\n"
    for n in [0] + sizes:
        body += f'\n[[root.children]]\nid = "q{n}"\nagent = "{QUEUE_AGENT}"\n'
    d = Daemon(body, root, "restore")
    for n in sizes:
        fill_queue(d.dir / "lib", f"q{n}", n)
    rows = ["| items in the queue | restore p50 (ms) | p90 | max | kills |", "|---:|---:|---:|---:|---:|"]
    try:
        d.start()
        with Client(d.socket) as c:
            for n in sizes:
                assert c.request("call", {"id": f"q{n}", "request": {"op": "len"}})["len"] == n
        for n in [0] + sizes:
            times = restore_times(d, f"q{n}", kills, jitter_ms)
            rows.append(f"| {n:,} | {statistics.median(times):.2f} | {pct(times, 0.9):.2f} | {max(times):.2f} "
                        f"| {kills} |")
            print(rows[-1], flush=True)
    finally:
        d.stop()
    return rows


# -- overhead ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_pid(sock_path: Path, child: str) -> int:
    with Client(sock_path) as c:
        return int(next(ch["pid"] for ch in c.request("ps")["children"] if ch["id"] == child))


def puts_per_second(sock_path: Path, n: int, window: int, start_key: int,
                    cpu: dict[str, list[float]] | None = None, pids: dict[str, int] | None = None,
                    attached: bool = False) -> float:
    """Acknowledged puts/s from one client keeping ``window`` calls in flight (``attached``: on
    a link to the agent, ``Client.attach``, the daemon's hop skipped).

    With ``pids`` ({"agent": pid, "daemon": pid}), each one's CPU µs per put is appended to ``cpu``."""
    c = Client(sock_path, timeout=60)
    link = c.attach("kv") if attached else None
    with c:
        before = {name: cpu_seconds(pid) for name, pid in (pids or {}).items()}
        t0 = time.perf_counter()
        sent = done = 0
        while done < n:
            burst = bytearray()
            while sent < n and sent - done < window:
                request = {"op": "put", "key": start_key + sent, "value": sent}
                burst += protocol.pack([c.next_id, request] if link else {"id": c.next_id, "op": "call", "args": {
                    "id": "kv", "request": request}})
                c.next_id += 1
                sent += 1
            if burst:
                c.sock.sendall(burst)
            frame = link.receive() if link else c.receive()
            if not (frame[1] if link else frame.get("ok")):
                raise RuntimeError(frame)
            done += 1
        rate = n / (time.perf_counter() - t0)
        if cpu is not None and pids:
            for name, pid in pids.items():
                cpu.setdefault(name, []).append((cpu_seconds(pid) - before[name]) / n * 1e6)
        return rate


def bench_overhead(root: Path, rounds: int, n: int) -> list[str]:
    body = '\n[[root.children]]\nid = "kv"\nagent = "otpd.agents.kv:KVAgent"\n'
    on = Daemon('[store]\ndurability = "process"\n' + body, root, "persist-on").start()
    off = Daemon('[store]\ndurability = "none"\n' + body, root, "persist-off").start()
    rows = ["| load | durability=process (puts/s) | durability=none (puts/s) | ratio "
            "| CPU µs/put agent process / none | daemon process / none |", "|---|---:|---:|---:|---:|---:|"]
    assert on.proc is not None and off.proc is not None
    on_pids = {"agent": agent_pid(on.socket, "kv"), "daemon": on.proc.pid}
    off_pids = {"agent": agent_pid(off.socket, "kv"), "daemon": off.proc.pid}
    try:
        for window, label, attached in ((1, "one call at a time", False), (64, "64 in flight", False),
                                        (1000, "1,000 in flight", False), (1, "one call at a time, attached", True),
                                        (1000, "1,000 in flight, attached", True)):
            a: list[float] = []
            b: list[float] = []
            ca: dict[str, list[float]] = {}
            cb: dict[str, list[float]] = {}
            for r in range(rounds):
                a.append(puts_per_second(on.socket, n, window, r * n, ca, on_pids, attached))
                b.append(puts_per_second(off.socket, n, window, r * n, cb, off_pids, attached))
            ma, mb = statistics.median(a), statistics.median(b)
            med = statistics.median
            rows.append(f"| {label} | {ma:,.0f} | {mb:,.0f} | {ma / mb:.3f} "
                        f"| {med(ca['agent']):.1f} / {med(cb['agent']):.1f} "
                        f"| {med(ca['daemon']):.1f} / {med(cb['daemon']):.1f} |")
            print(rows[-1], flush=True)
    finally:
        on.stop()
        off.stop()
    return rows


# -- fsync with concurrent clients --------------------------------------------------


def concurrent_puts(sock_path: Path, clients: int, seconds: float) -> float:
    sel = selectors.DefaultSelector()
    conns = []
    for i in range(clients):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock_path))
        s.setblocking(False)
        conns.append(s)
        sel.register(s, selectors.EVENT_READ, [protocol.unpacker(), i, 0])
    done = 0

    def send(s: socket.socket, state: list[Any]) -> None:
        state[2] += 1
        key = state[1] * 10_000_000 + state[2]
        s.send(protocol.pack({"id": state[2], "op": "call", "args": {
            "id": "kv", "request": {"op": "put", "key": key, "value": key}}}))

    t0 = time.perf_counter()
    end = t0 + seconds
    for key in sel.get_map().values():
        send(key.fileobj, key.data)  # type: ignore[arg-type]
    while time.perf_counter() < end:
        for key, _ in sel.select(1.0):
            data = key.fileobj.recv(65536)  # type: ignore[union-attr]
            key.data[0].feed(data)
            for frame in key.data[0]:
                if not frame.get("ok"):
                    raise RuntimeError(frame)
                done += 1
                send(key.fileobj, key.data)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - t0
    for s in conns:
        s.close()
    return done / elapsed


def concurrent_puts_lean(sock_path: Path, clients: int, seconds: float, compact: bool = False,
                         attached: bool = False) -> float:
    """The same load as ``concurrent_puts`` (``clients`` connections, one put outstanding on
    each, every reply checked), from a leaner load generator: one epoll, requests packed
    from a fixed prefix.  The clients share the daemon's 2 cores, so every µs they spend
    per call is a µs the daemon and the agent do not get.  ``compact``: the calls travel
    as compact frames (otpd/control/protocol.py), their replies too.  ``attached``: each
    connection is handed to the agent first (``Client.attach``), which answers the calls
    itself ([id, request] frames, otpd/agent/links.py): the daemon's hop is skipped."""
    import select

    pack = protocol.pack
    prefix = b"\x83\xa2op\xa4call\xa4args\x82\xa2id\xa2kv\xa7request\x83\xa2op\xa3put\xa3key"
    compact_put = b"\xa4call\xa2kv\x83\xa2op\xa3put\xa3key"  # [n, "call", "kv", {"op": "put", "key": k, "value": k}]
    link_put = b"\x83\xa2op\xa3put\xa3key"  # [n, {"op": "put", "key": k, "value": k}]
    ep = select.epoll()
    conns: dict[int, tuple[socket.socket, Any, int]] = {}
    counters: dict[int, int] = {}
    for i in range(clients):
        if attached:
            s = Client(sock_path).attach("kv").client.sock
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock_path))
        conns[s.fileno()] = (s, protocol.unpacker(), i * 10_000_000)
        counters[s.fileno()] = 0
        ep.register(s.fileno(), select.EPOLLIN)
    done = 0

    def send(fd: int) -> None:
        n = counters[fd] = counters[fd] + 1
        s, _, base = conns[fd]
        key = pack(base + n)
        if attached:
            s.send(b"\x92" + pack(n) + link_put + key + b"\xa5value" + key)
        elif compact:
            s.send(b"\x94" + pack(n) + compact_put + key + b"\xa5value" + key)
        else:
            s.send(prefix + key + b"\xa5value" + key + b"\xa2id" + pack(n))

    t0 = time.perf_counter()
    end = t0 + seconds
    for fd in conns:
        send(fd)
    while time.perf_counter() < end:
        for fd, _ in ep.poll(1.0):
            s, unpacker, _ = conns[fd]
            unpacker.feed(s.recv(65536))
            for frame in unpacker:
                if (frame[1] if compact or attached else frame.get("ok")) is not True:
                    raise RuntimeError(frame)
                done += 1
                send(fd)
    elapsed = time.perf_counter() - t0
    for s, _, _ in conns.values():
        s.close()
    ep.close()
    return done / elapsed


def committed_seq(d: Daemon) -> int:
    """The seq of kv's last commit, read from its store (LMDB with the log on top) as otpctl reads it."""
    from otpd.store.lmdb_store import Store

    store = Store(d.dir / "lib" / "store", readonly=True)
    try:
        record = store.read("kv")
        return int(record["seq"]) if record else 0
    finally:
        store.close()


def bench_fsync(root: Path, clients: int, seconds: float, rounds: int) -> list[str]:
    body = '\n[[root.children]]\nid = "kv"\nagent = "otpd.agents.kv:KVAgent"\n'
    d = Daemon('[store]\ndurability = "fsync"\n' + body, root, "fsync").start()
    p = Daemon('[store]\ndurability = "process"\n' + body, root, "fsync-process").start()
    rows = ["| durability | clients | acknowledged puts/s, lean load generator | the same, compact frames "
            "| the same, selectors-based generator | lean, attached links |", "|---|---:|---:|---:|---:|---:|"]
    gens: dict[str, Any] = {"lean": concurrent_puts_lean,
                            "compact": lambda *a: concurrent_puts_lean(*a, compact=True),
                            "selectors": concurrent_puts,
                            "attached": lambda *a: concurrent_puts_lean(*a, attached=True)}
    try:
        rates: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}  # the agent's CPU µs per put (its sync helper not counted)
        batch: dict[tuple[str, str], list[float]] = {}  # puts per commit
        pids = {"fsync": agent_pid(d.socket, "kv"), "process": agent_pid(p.socket, "kv")}
        for _ in range(rounds):  # alternated, so drift hits every column alike
            for name, daemon in (("fsync", d), ("process", p)):
                for gen, fn in gens.items():
                    seq0, cpu0, t0 = committed_seq(daemon), cpu_seconds(pids[name]), time.perf_counter()
                    rate = fn(daemon.socket, clients, seconds)
                    puts = rate * (time.perf_counter() - t0)  # (the generator's own elapsed time is within)
                    cpu.setdefault((name, gen), []).append((cpu_seconds(pids[name]) - cpu0) / puts * 1e6)
                    batch.setdefault((name, gen), []).append(puts / max(1, committed_seq(daemon) - seq0))
                    rates.setdefault((name, gen), []).append(rate)
        for name in ("fsync", "process"):
            rows.append(f"| {name} | {clients} | " + " | ".join(
                f"{statistics.median(rates[name, gen]):,.0f}" for gen in gens) + " |")
        rows += ["", "| durability | " + " | ".join(f"{gen}: agent CPU µs/put, puts/commit" for gen in gens) + " |",
                 "|---|" + "---:|" * len(gens)]
        for name in ("fsync", "process"):
            rows.append(f"| {name} | " + " | ".join(
                f"{statistics.median(cpu[name, gen]):.1f}, {statistics.median(batch[name, gen]):.1f}"
                for gen in gens) + " |")
        print("\n".join(rows), flush=True)
    finally:
        d.stop()
        p.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["restore", "overhead", "fsync"])
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--jitter-ms", type=float, default=0.0,
                    help="restore: a random pause of 0..N ms before each kill (0: kill at once after ready)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--puts", type=int, default=20_000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print("command: python scripts/bench_state.py " + " ".join(sys.argv[1:]), flush=True)
    with tempfile.TemporaryDirectory(prefix="otpd-bench-") as tmp:
        root = Path(tmp)
        out: list[str] = []
        if args.only in (None, "restore"):
            out += ["", "Restore after SIGKILL"] + bench_restore(root, [int(s) for s in args.sizes.split(",")],
                                                                  args.kills, args.jitter_ms)
        if args.only in (None, "overhead"):
            out += ["", "Persistence overhead (KVAgent puts)"] + bench_overhead(root, args.rounds, args.puts)
        if args.only in (None, "fsync"):
            out += ["", "Concurrent clients"] + bench_fsync(root, args.clients, args.seconds, args.rounds)
    print("\n".join(out))


if __name__ == "__main__":
    main()
