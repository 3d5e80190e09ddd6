"""Shared helpers of the benchmark scripts (bench_restart, soak_restarts, bench_scale).

Not part of otpd.  What lives here:

* process hygiene: every daemon a bench starts is a ``Managed`` process in
  its own session; ``guarded(main)`` runs a bench so that, on a normal end,
  an error, Ctrl-C or SIGTERM alike, each daemon is stopped by its PID
  (SIGTERM, then SIGKILL after a deadline) and any process left below the
  bench is killed by PID and reaped.  The bench makes itself a child
  subreaper (PR_SET_CHILD_SUBREAPER), so a daemon's orphans come back to it
  rather than to init and cannot be missed;
* readiness: ``ReadyListener``, the Unix datagram socket ``bench_child.py``
  and ``bench_agents.ReadyAgent`` send their PID to;
* otpd: config writer, start, ``EventStream`` (the ``events`` subscription,
  readable from a selector);
* supervisord / circus: the separate bench virtualenv (var/bench-venv), their
  config files, supervisord's XML-RPC over its Unix socket, circus's zmq API
  through a helper run by the bench venv's Python;
* numbers: percentiles, markdown tables, /proc metrics.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import os
import platform
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
CHILD = SCRIPTS / "bench_child.py"
PY = sys.executable
BENCH_VENV = REPO / "var" / "bench-venv"
BENCH_PACKAGES = ("supervisor", "circus")

_MANAGED: list[Managed] = []
_TEMP_DIRS: list[Path] = []


# -- process hygiene ----------------------------------------------------------


class Stop(SystemExit):
    """Raised in the bench by SIGTERM / SIGHUP so that every finally block runs."""


def _raise_stop(signum: int, _frame: Any) -> None:
    raise Stop(128 + signum)


def parse_systems(parser: argparse.ArgumentParser, value: str, known: Sequence[str]) -> list[str]:
    """A ``--systems a,b`` value as a list; a usage error for a name not in ``known``."""
    systems = [s.strip() for s in value.split(",") if s.strip()]
    bad = set(systems) - set(known)
    if bad:
        parser.error(f"unknown systems: {', '.join(sorted(bad))}")
    return systems


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def raise_nofile() -> tuple[int, int]:
    """Raise the soft fd limit to the hard one; the daemons we start inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def guarded(main: Callable[[], int]) -> int:
    """Run a bench's main; always stop what it started, by PID, on any way out."""
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)
    become_subreaper()
    raise_nofile()
    try:
        return main()
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup_all()


def cleanup_all() -> None:
    for m in reversed(_MANAGED):
        try:
            m.stop(timeout=30.0)
        except Exception as exc:  # keep going: the sweep below still runs
            print(f"cleanup: stopping {m.name} (pid {m.pid}): {exc}", file=sys.stderr)
    left = sweep_leftovers()
    if left:
        print(f"cleanup: killed {len(left)} leftover process(es) by PID: {left[:20]}", file=sys.stderr)
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def sweep_leftovers() -> list[int]:
    """SIGKILL every process still below the bench (all of them started by it), then reap."""
    try:
        left = psutil.Process().children(recursive=True)
    except psutil.Error:
        left = []
    for p in left:
        try:
            p.kill()  # psutil checks the PID still names the same process
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
    reap_adopted()
    return [p.pid for p in left]


def reap_adopted() -> None:
    """Reap zombies handed to us as subreaper (never blocks)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def temp_dir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    _TEMP_DIRS.append(d)
    return d


def keep_temp_dirs() -> None:
    _TEMP_DIRS.clear()


class Managed:
    """A daemon this bench started, in its own session, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd=cwd, start_new_session=True)
        self.pid = self.proc.pid
        _MANAGED.append(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} (pid {self.pid}) exited with {self.proc.returncode}; "
                               f"log {self.log_path}:\n{self.tail()}")

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> float | None:
        """Stop it by PID: ``sig``, then SIGKILL (and its remaining descendants) after ``timeout``.

        Returns the seconds it took to exit on ``sig``; None if it was already
        gone or had to be killed.
        """
        if self.proc.poll() is not None:
            return None
        t0 = time.perf_counter()
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout)
            return time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            print(f"cleanup: {self.name} (pid {self.pid}) ignored {signal.Signals(sig).name} for {timeout:.0f}s; "
                  "SIGKILL", file=sys.stderr)
            self.kill_tree()
            return None

    def kill_tree(self) -> None:
        kids: list[psutil.Process] = []
        try:
            me = psutil.Process(self.pid)
            me.suspend()  # no more spawning while we list its children
            kids = me.children(recursive=True)
        except psutil.Error:
            pass
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for k in kids:
            try:
                k.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(kids, timeout=10)
        reap_adopted()

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def wait_for_unix_socket(path: Path, timeout: float, proc: Managed | None = None,
                         kind: int = socket.SOCK_STREAM) -> float:
    """Bounded retry of connect() until the socket accepts; returns the seconds it took."""
    t0 = time.perf_counter()
    deadline = t0 + timeout
    delay = 0.001
    while True:
        if proc is not None:
            proc.check_alive()
        s = socket.socket(socket.AF_UNIX, kind)
        try:
            s.connect(str(path))
            return time.perf_counter() - t0
        except OSError:
            pass
        finally:
            s.close()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{path} did not accept a connection within {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# -- readiness ------------------------------------------------------------------


class ReadyListener:
    """The Unix datagram socket children send their PID to once they are up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.pending: list[tuple[int, float]] = []  # (pid, perf_counter at receipt), not yet taken

    def fileno(self) -> int:
        return self.sock.fileno()

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            self.pending.append((int(data), time.perf_counter()))

    def read(self) -> list[int]:
        """Every PID received and not yet taken (non-blocking); takes them all."""
        self._drain()
        out = [pid for pid, _ in self.pending]
        self.pending.clear()
        return out

    def wait(self, timeout: float, want: Callable[[int], bool] = lambda _pid: True,
             check: Callable[[], None] | None = None) -> tuple[int, float]:
        """Block until a PID with want(pid) arrives; return (pid, perf_counter at receipt).

        PIDs before it that ``want`` refuses are dropped; those after it stay queued.
        """
        deadline = time.perf_counter() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        try:
            while True:
                self._drain()
                while self.pending:
                    pid, at = self.pending.pop(0)
                    if want(pid):
                        return pid, at
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise TimeoutError(f"no readiness signal within {timeout}s")
                sel.select(min(left, 1.0))
                if check is not None:
                    check()
        finally:
            sel.close()

    def close(self) -> None:
        self.sock.close()


# -- numbers and output ---------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of unsorted values."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of durations given in seconds, in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        return {k: float("nan") for k in ("n", "min", "p50", "p90", "p99", "max", "mean")}
    return {"n": len(ms), "min": min(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99), "max": max(ms), "mean": statistics.fmean(ms)}


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    body = [[fmt(c) for c in r] for r in rows]
    head = "| " + " | ".join(headers) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"
    return "\n".join([head, rule] + ["| " + " | ".join(r) + " |" for r in body])


def command_line() -> str:
    return shlex.join(sys.orig_argv)


def environment_lines() -> list[str]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    load = os.getloadavg()
    return [
        f"- host: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; load average at start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"- Python {platform.python_version()} ({PY}); RLIMIT_NOFILE {soft}/{hard}",
        f"- otpd commit {git_commit()}",
    ]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Report:
    """Collects the markdown a bench prints; also written to --output if given."""

    def __init__(self, title: str) -> None:
        self.parts: list[str] = [f"## {title}", "", "Command (from the repo root):", "",
                                 "```", command_line(), "```", ""] + environment_lines() + [""]

    def add(self, *text: str) -> None:
        self.parts.extend(text)
        self.parts.append("")

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None) -> None:
        if caption:
            self.parts.append(caption)
            self.parts.append("")
        self.parts.append(md_table(headers, rows))
        self.parts.append("")

    def text(self) -> str:
        return "\n".join(self.parts).rstrip() + "\n"

    def emit(self, output: str | None) -> None:
        load = os.getloadavg()
        self.parts.append(f"(load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
        out = self.text()
        print(out, flush=True)
        if output:
            Path(output).write_text(out)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- /proc metrics ----------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def uss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_full_info().uss)


def zombie_children(pid: int) -> int:
    n = 0
    for c in psutil.Process(pid).children():
        try:
            if c.status() == psutil.STATUS_ZOMBIE:
                n += 1
        except psutil.NoSuchProcess:
            pass
    return n


def minor_faults(pid: int) -> int:
    """Minor page faults a process has taken so far (copy-on-write faults after fork among them)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return -1


def page_fault_cost(pages: int = 4096) -> tuple[float, float]:
    """This machine's cost of one first-touch (zero-fill) and one copy-on-write page fault, in microseconds."""
    import mmap

    m = mmap.mmap(-1, pages * 4096)
    t0 = time.perf_counter()
    for i in range(0, pages * 4096, 4096):
        m[i] = 1
    zero_fill = (time.perf_counter() - t0) / pages * 1e6
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes every page once: each write is a COW fault
        try:
            t0 = time.perf_counter()
            for i in range(0, pages * 4096, 4096):
                m[i] = 2
            os.write(w, repr((time.perf_counter() - t0) / pages * 1e6).encode())
        finally:
            os._exit(0)
    os.close(w)
    cow = float(os.read(r, 64) or b"nan")
    os.close(r)
    os.waitpid(pid, 0)
    m.close()
    return zero_fill, cow


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of pid, from /proc/PID/task/*/schedstat (nanoseconds, not 10 ms ticks)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float(sum(psutil.Process(pid).cpu_times()[:2]))
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def children_cpu_seconds(pid: int) -> tuple[float, int]:
    """CPU time summed over every live descendant of pid, and how many there are."""
    total, n = 0.0, 0
    for c in psutil.Process(pid).children(recursive=True):
        total += cpu_seconds(c.pid)
        n += 1
    return total, n


def idle_cpu(pid: int, window_s: float) -> dict[str, float]:
    """CPU used by pid (and by its descendants) over an idle window; percent of one core.

    CPU time is the scheduler's (schedstat, ns): a tick-based count would read 0 for a daemon that
    wakes often but briefly.
    """
    kids0, _ = children_cpu_seconds(pid)
    c0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    time.sleep(window_s)  # the measurement window itself
    c1 = cpu_seconds(pid)
    elapsed = time.perf_counter() - t0
    kids1, nkids = children_cpu_seconds(pid)
    return {"master_pct": 100.0 * (c1 - c0) / elapsed, "master_cpu_s": c1 - c0,
            "children_pct": 100.0 * (kids1 - kids0) / elapsed, "children": nkids, "window_s": elapsed}


# -- otpd ---------------------------------------------------------------------------


def otpd_argv(config: Path) -> list[str]:
    script = Path(PY).with_name("otpd")
    if script.exists():
        return [str(script), "run", "--config", str(config)]
    return [PY, "-c", "import sys; from otpd.cli.otpd_main import main; sys.argv[0] = 'otpd'; main()",
            "run", "--config", str(config)]


def otpctl_argv(sock: Path, *args: str) -> list[str]:
    script = Path(PY).with_name("otpctl")
    base = [str(script)] if script.exists() else [
        PY, "-c", "import sys; from otpd.cli.otpctl import main; sys.argv[0] = 'otpctl'; main()"]
    return base + ["--socket", str(sock), *args]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_otpd_config(folder: Path, children: Sequence[dict[str, Any]], max_restarts: int = 1_000_000,
                      max_seconds: float = 1, log_level: str = "warning", strategy: str = "one_for_one",
                      start: str = "serial") -> Path:
    lines = ["[daemon]", 'state_dir = "var/lib"', 'runtime_dir = "var/run"', f"log_level = {_toml(log_level)}", "",
             "[root]", f"strategy = {_toml(strategy)}", f"max_restarts = {max_restarts}",
             f"max_seconds = {max_seconds}", f"start = {_toml(start)}", ""]
    for child in children:
        lines.append("[[root.children]]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in child.items())
        lines.append("")
    path = folder / "otpd.toml"
    path.write_text("\n".join(lines))
    return path


def otpd_env() -> dict[str, str]:
    env = dict(os.environ)
    # This checkout's otpd first, ahead of the venv's (an editable install may point at another
    # checkout: a bench run from a worktree would otherwise measure the main one's code).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(SCRIPTS), env.get("PYTHONPATH", "")) if p)
    env.pop("OTPD_SOCKET", None)
    return env


def start_otpd(folder: Path, config: Path, name: str = "otpd", timeout: float = 60.0) -> tuple[Managed, Path, float]:
    """Start ``otpd run``; return it, its socket, and the seconds until the socket accepted."""
    sock = folder / "var" / "run" / "otpd.sock"
    daemon = Managed(name, otpd_argv(config), folder / f"{name}.log", env=otpd_env(), cwd=REPO)
    took = wait_for_unix_socket(sock, timeout, daemon)
    return daemon, sock, took


class EventStream:
    """An otpd ``events`` subscription whose socket can sit in a selector."""

    def __init__(self, sock_path: Path, timeout: float = 30.0) -> None:
        from otpd.client import Client

        self.client = Client(sock_path, timeout=timeout)
        self.client.request("events")
        self.sock = self.client.sock
        self.sock.setblocking(False)
        self._buffered = [f for f in self.client.unpacker if "event" in f]

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[dict[str, Any]]:
        out, self._buffered = self._buffered, []
        while True:
            try:
                data = self.sock.recv(65536)  # (over 128 KiB, each recv maps its buffer: codec.READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return out
            if not data:
                raise ConnectionError("otpd closed the event stream")
            self.client.unpacker.feed(data)
            out.extend(f for f in self.client.unpacker if "event" in f)

    def close(self) -> None:
        self.client.close()


# -- the bench virtualenv (supervisord, circus) --------------------------------------


class BenchVenv:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.python = path / "bin" / "python"
        self.ok = False
        self.reason = ""
        self.versions: dict[str, str] = {}

    def bin(self, name: str) -> str:
        return str(self.path / "bin" / name)


def ensure_bench_venv(path: Path = BENCH_VENV, packages: Sequence[str] = BENCH_PACKAGES) -> BenchVenv:
    """Create (once) a virtualenv with supervisor and circus from PyPI; never a project dependency."""
    venv = BenchVenv(path)
    probe = ("import importlib.metadata as m, json; "
             f"print(json.dumps({{p: m.version(p) for p in {list(packages)!r}}}))")

    def versions() -> dict[str, str] | None:
        if not venv.python.exists():
            return None
        r = subprocess.run([str(venv.python), "-c", probe], capture_output=True, text=True, timeout=60)
        return json.loads(r.stdout) if r.returncode == 0 else None

    found = versions()
    if found is None:
        progress(f"creating the bench virtualenv {path} and installing {' '.join(packages)} from PyPI")
        path.parent.mkdir(parents=True, exist_ok=True)
        steps = [[sys.executable, "-m", "venv", str(path)],
                 [str(venv.python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *packages]]
        for step in steps:
            r = subprocess.run(step, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "is ignored" not in ln]
                venv.reason = f"`{shlex.join(step)}` failed ({r.returncode}): " + " / ".join(lines[-6:])
                return venv
        found = versions()
        if found is None:
            venv.reason = f"installed, but `{venv.python} -c 'import {', '.join(packages)}'` fails"
            return venv
    venv.versions = found
    venv.ok = True
    return venv


# -- supervisord -------------------------------------------------------------------------


def write_supervisord_conf(folder: Path, programs: Sequence[tuple[str, Sequence[str]]]) -> tuple[Path, Path]:
    """A config with every setting at its default but the paths; returns (conf, socket)."""
    sock = folder / "supervisor.sock"
    (folder / "childlogs").mkdir(exist_ok=True)
    lines = [
        "[unix_http_server]", f"file = {sock}", "",
        "[supervisord]", "nodaemon = true", f"logfile = {folder / 'supervisord.log'}",
        f"pidfile = {folder / 'supervisord.pid'}", f"childlogdir = {folder / 'childlogs'}", "loglevel = warn", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl = unix://{sock}", "",
    ]
    for name, argv in programs:
        lines += [f"[program:{name}]", f"command = {shlex.join(argv)}", ""]
    conf = folder / "supervisord.conf"
    conf.write_text("\n".join(lines))
    return conf, sock


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self.unix_path = path
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixHTTPConnection(self.unix_path, self.timeout)


def supervisor_rpc(sock: Path, timeout: float = 60.0) -> Any:
    """supervisord's XML-RPC API over its Unix socket (stdlib only: a fresh connection per call)."""
    return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=_UnixTransport(str(sock), timeout))


# -- circus --------------------------------------------------------------------------------


def write_circus_ini(folder: Path, watchers: Sequence[tuple[str, Sequence[str]]]) -> tuple[Path, str]:
    """A config with every setting at its default but the endpoints (ipc, not TCP ports); returns (ini, endpoint)."""
    endpoint = f"ipc://{folder / 'circus-ctl.sock'}"
    lines = ["[circus]", f"endpoint = {endpoint}", f"pubsub_endpoint = ipc://{folder / 'circus-pub.sock'}",
             f"stats_endpoint = ipc://{folder / 'circus-stats.sock'}", ""]
    for name, argv in watchers:
        lines += [f"[watcher:{name}]", f"cmd = {argv[0]}", f"args = {shlex.join(argv[1:])}", ""]
    ini = folder / "circus.ini"
    ini.write_text("\n".join(lines))
    return ini, endpoint


CIRCUS_HELPER = r'''
import json, sys, time
from circus.client import CircusClient
endpoint, command, reps, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
props = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
client = CircusClient(endpoint=endpoint, timeout=timeout)
times, reply = [], None
deadline = time.monotonic() + timeout
while True:  # bounded: the first call may come before circusd listens
    try:
        t0 = time.perf_counter(); reply = client.call({"command": command, "properties": props})
        times.append(time.perf_counter() - t0); break
    except Exception as exc:
        if time.monotonic() > deadline: raise
        time.sleep(0.1)
for _ in range(reps - 1):
    t0 = time.perf_counter(); reply = client.call({"command": command, "properties": props})
    times.append(time.perf_counter() - t0)
client.stop()
print(json.dumps({"times": times, "reply": reply}))
'''


def circus_call(venv: BenchVenv, endpoint: str, command: str, reps: int = 1, timeout: float = 60.0,
                props: dict[str, Any] | None = None) -> tuple[list[float], Any]:
    """Time ``reps`` calls of a circus command through its zmq API (in the bench venv's Python)."""
    argv = [str(venv.python), "-c", CIRCUS_HELPER, endpoint, command, str(reps), str(timeout), json.dumps(props or {})]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout * (reps + 1) + 30)
    if r.returncode != 0:
        raise RuntimeError(f"circus {command} failed: {r.stderr.strip()[-800:]}")
    data = json.loads(r.stdout)
    return data["times"], data["reply"]


def timed_run(argv: Sequence[str], reps: int, timeout: float = 120.0) -> tuple[list[float], str]:
    """Wall time of running a command ``reps`` times; returns the times and the last output's first line."""
    times, first = [], ""
    for _ in range(reps):
        t0 = time.perf_counter()
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
        times.append(time.perf_counter() - t0)
        if r.returncode not in (0, 3):  # supervisorctl status exits 3 if any process is not running
            raise RuntimeError(f"`{shlex.join(argv)}` exited {r.returncode}: {(r.stderr or r.stdout)[-500:]}")
        first = (r.stdout.splitlines() or [""])[0]
    return times, first
