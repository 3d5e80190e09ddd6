"""Fixtures that run a real otpd: forked agents, real signals, the real control socket.

``daemon(body)`` writes a config (a ``[daemon]`` table pointing at a short
runtime dir under /tmp, then ``body``), starts ``otpd run`` with tests/ on
PYTHONPATH (so configs can name ``agents_for_tests:...``), waits until the
root supervisor is running and returns a ``RunningDaemon``.

Nothing here sleeps.  Readiness comes from the daemon's own log line (its
stderr is a pipe read by a thread), child states from the ``wait`` op and the
``events`` stream, and process deaths from pidfds (``os.pidfd_open``), which
become readable the moment a process exits.  Time that must pass (an intensity
window, a heartbeat timeout that must not fire) passes on the daemon's own
clock, as a ``wait`` that times out.  The one poll is ``wait_stopped``: nothing
notifies a SIGSTOP to a process that is not our child.

Teardown stops every daemon (shutdown op, then SIGTERM, then SIGKILL, each
with a deadline) and then checks that nothing is left behind.  The test
process is a child subreaper (PR_SET_CHILD_SUBREAPER), so whatever a daemon
leaves when it exits is re-parented to us, where it can be seen precisely: a
zombie means the daemon exited without reaping it, a live process means an
agent outlived its daemon.  Every agent pid the test saw (status, events,
wait replies, the daemon's process children) must be gone afterwards.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from otpd.client import Client, Link, Unreachable
from otpd.errors import OtpdError

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
BIN_DIR = Path(sys.executable).parent
PR_SET_CHILD_SUBREAPER = 36

START_TIMEOUT = 20.0  # a loaded machine can take seconds to start an interpreter
STOP_TIMEOUT = 20.0


# -- processes -----------------------------------------------------------------


def console(name: str) -> list[str]:
    """The command line of one of otpd's console scripts (``otpd``, ``otpctl``)."""
    script = BIN_DIR / name
    if script.exists():
        return [str(script)]
    module = {"otpd": "otpd.cli.otpd_main", "otpctl": "otpd.cli.otpctl"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def child_env() -> dict[str, str]:
    """The environment of every otpd / otpctl the tests start.

    tests/ is importable (configs name ``agents_for_tests:...``) and the checkout's otpd comes
    first, so the daemon runs the same code the tests import; no socket is inherited.
    """
    env = dict(os.environ)
    # nothing from a service manager leaks in (journald prefixes, sd_notify, socket activation)
    for name in ("OTPD_SOCKET", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
                 "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    path = (str(TESTS_DIR), str(REPO_DIR), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    # stderr stays line-buffered (Python's default): the daemon and its agents share it, and one
    # write per line keeps their lines whole
    env.pop("PYTHONUNBUFFERED", None)
    return env


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def wait_pid_exit(pid: int, timeout: float) -> bool:
    """True once ``pid`` has terminated (a zombie or gone), False if it still runs after ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def poll_process(pid: int, done: Callable[[psutil.Process], bool], timeout: float) -> bool:
    """True once ``done(process)``; False if it is not within ``timeout``, or the process is gone.

    For what no notification exists (another process's stop: waitid only serves the parent;
    its title), this polls /proc with a deadline; such changes land within microseconds.
    """
    deadline = time.monotonic() + timeout
    try:
        proc = psutil.Process(pid)
        while not done(proc):
            if time.monotonic() > deadline:
                return False
    except psutil.NoSuchProcess:
        return False
    return True


def wait_stopped(pid: int, timeout: float = 5.0) -> bool:
    """True once ``pid`` is in the stopped state (SIGSTOP)."""
    return poll_process(pid, lambda proc: proc.status() == psutil.STATUS_STOPPED, timeout)


def is_live(pid: int, create_time: float | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when given, was created at ``create_time``."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.01
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def run_cli(name: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(console(name) + list(args), capture_output=True, text=True, env=child_env(),
                          timeout=timeout, check=False)


# -- the daemon's log ------------------------------------------------------------


class LogReader:
    """Reads the daemon's stderr (shared by its agents) line by line, so tests can wait on a line."""

    def __init__(self, stream: Any, path: Path) -> None:
        self.lines: list[str] = []
        self.closed = False
        self.cond = threading.Condition()
        self.path = path
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream: Any) -> None:
        with open(self.path, "w", encoding="utf-8") as copy:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                copy.write(line + "\n")
                copy.flush()
                with self.cond:
                    self.lines.append(line)
                    self.cond.notify_all()
        stream.close()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 10.0) -> str:
        """The first line matching ``pattern``; AssertionError if none comes in time or the log ends."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise AssertionError(f"no log line matches {pattern!r}; log:\n{self.text()}")
                self.cond.wait(left)

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Wait for EOF on stderr: every process holding it (the daemon and its agents) has exited."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def text(self) -> str:
        return "\n".join(self.lines)


# -- events ----------------------------------------------------------------------


class EventStream:
    """A connection subscribed to the daemon's events; subscribed when constructed."""

    def __init__(self, daemon: RunningDaemon) -> None:
        self.daemon = daemon
        self.client = Client(daemon.socket, timeout=10.0)
        self.client.request("events", {"follow": True, "last": 0})  # live once this returns; no history
        self.seen: list[dict[str, Any]] = []

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no event within {timeout}s; seen: {self._brief()}")
            self.client.sock.settimeout(left)
            try:
                frame = self.client.receive()
            except OtpdError as err:  # the client turns a socket timeout into OtpdError("timeout")
                raise AssertionError(f"no event within {timeout}s ({err}); seen: {self._brief()}") from None
            if "event" in frame:
                self.seen.append(frame)
                self.daemon.record_pid(frame.get("pid"))
                return frame

    def request(self, op: str, args: dict[str, Any] | None = None,
                timeout: float = 10.0) -> tuple[list[dict[str, Any]], Any]:
        """Send a request on the subscribed connection: (the events that came before its reply, its result).

        Frames on one connection keep the daemon's order, so the events after the reply
        happened after the request was handled.
        """
        req_id = self.client.send(op, args)
        before = []
        deadline = time.monotonic() + timeout
        while True:
            self.client.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                frame = self.client.receive()
            except OtpdError as err:
                raise AssertionError(f"no reply to {op} within {timeout}s ({err})") from None
            if "event" in frame:
                self.seen.append(frame)
                self.daemon.record_pid(frame.get("pid"))
                before.append(frame)
            elif frame.get("id") == req_id:
                if not frame.get("ok"):
                    raise OtpdError.from_wire(frame.get("error"))
                return before, frame.get("result")

    def until(self, predicate: Callable[[dict[str, Any]], bool] | tuple[str, str],
              timeout: float = 10.0) -> list[dict[str, Any]]:
        """Events up to and including the first matching one (``(event, id)`` or a predicate)."""
        if isinstance(predicate, tuple):
            kind, child = predicate
            predicate = lambda e: e["event"] == kind and e["id"] == child  # noqa: E731
        deadline = time.monotonic() + timeout
        out = []
        while True:
            event = self.next(max(0.0, deadline - time.monotonic()))
            out.append(event)
            if predicate(event):
                return out

    def until_closed(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every event until the daemon closes the connection (it exits)."""
        deadline = time.monotonic() + timeout
        out = []
        while True:
            try:
                out.append(self.next(max(0.0, deadline - time.monotonic())))
            except Unreachable:
                return out

    def _brief(self) -> str:
        return ", ".join(f"{e['id']}:{e['event']}" for e in self.seen)


def brief(events: list[dict[str, Any]], kinds: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """``[(event, id), ...]``, optionally only the given kinds of event."""
    return [(e["event"], e["id"]) for e in events if kinds is None or e["event"] in kinds]


# -- one daemon ------------------------------------------------------------------


class RunningDaemon:
    def __init__(self, proc: subprocess.Popen[bytes], config_path: Path, socket_path: Path, log: LogReader) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.config_path = config_path
        self.socket = socket_path
        self.log = log
        self.agent_pids: dict[int, float | None] = {}  # pid -> create time (None if it was already gone)
        self._ctl: Client | None = None
        self.killed_by_test = False

    # -- the control socket -------------------------------------------------------

    def client(self, timeout: float = 10.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def attach(self, child_id: str, timeout: float = 10.0) -> Link:
        """A link to ``child_id`` (``Client.attach``), its pid recorded."""
        link = self.client(timeout).attach(child_id)
        self.record_pid(link.pid)
        return link

    def request(self, op: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        if self._ctl is None:
            self._ctl = self.client()
        self._ctl.sock.settimeout(timeout)
        result = self._ctl.request(op, args)
        if isinstance(result, dict):
            self.record_pid(result.get("pid"))
        return result

    def status(self) -> dict[str, Any]:
        result = self.request("status")
        for child in result["children"]:
            self.record_pid(child["pid"])
        return result

    def children(self) -> dict[str, dict[str, Any]]:
        return {c["id"]: c for c in self.status()["children"]}

    def pid_of(self, child_id: str) -> int:
        pid = self.children()[child_id]["pid"]
        assert pid is not None, f"{child_id} has no pid"
        return int(pid)

    def pids(self, *ids: str) -> dict[str, int | None]:
        children = self.children()
        return {i: children[i]["pid"] for i in ids}

    def wait(self, child_id: str, state: str = "running", not_pid: int | None = None,
             timeout: float = 10.0) -> dict[str, Any]:
        args = {"id": child_id, "state": state, "not_pid": not_pid, "timeout": timeout}
        return self.request("wait", args, timeout=timeout + 10.0)  # type: ignore[no-any-return]

    def kill(self, child_id: str, sig: str = "KILL") -> int:
        """Signal a child through the daemon; returns the pid that got the signal."""
        return int(self.request("kill", {"id": child_id, "signal": sig})["pid"])

    def cast(self, child_id: str, message: Any) -> None:
        self.request("cast", {"id": child_id, "message": message})

    def events(self) -> EventStream:
        return EventStream(self)

    def write_config(self, body: str) -> None:
        """Replace the config's body (what a reload reads), keeping the fixture's ``[daemon]`` table."""
        text = self.config_path.read_text(encoding="utf-8")
        self.config_path.write_text(text[: text.index("\n\n") + 2] + body, encoding="utf-8")

    # -- the process -----------------------------------------------------------------

    def record_pid(self, pid: Any) -> None:
        if not isinstance(pid, int) or isinstance(pid, bool) or pid in self.agent_pids or pid == self.pid:
            return
        try:
            self.agent_pids[pid] = psutil.Process(pid).create_time()
        except psutil.Error:
            self.agent_pids[pid] = None

    def record_process_children(self) -> None:
        try:
            for proc in psutil.Process(self.pid).children(recursive=True):
                self.record_pid(proc.pid)
        except psutil.Error:
            pass

    def wait_exit(self, timeout: float = 10.0) -> int:
        """The daemon's exit status; AssertionError if it is still running after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"otpd pid {self.pid} still runs after {timeout}s; log:\n{self.log.text()}") from None

    def sigkill(self) -> None:
        """SIGKILL the daemon (a test of what happens then)."""
        self.killed_by_test = True
        self.record_process_children()
        self.proc.send_signal(signal.SIGKILL)

    def close_clients(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None

    def stop(self, problems: list[str]) -> None:
        """Stop the daemon with a ladder of deadlines; note what went wrong in ``problems``."""
        if self.proc.poll() is None:
            self.record_process_children()
            self.close_clients()
            try:
                with Client(self.socket, timeout=5.0) as c:
                    c.request("shutdown")
            except (Unreachable, OtpdError, OSError):
                pass
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"otpd pid {self.pid} did not stop after the shutdown op; SIGTERM")
                self.record_process_children()
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    problems.append(f"otpd pid {self.pid} ignored SIGTERM too; SIGKILL")
                    self.record_process_children()
                    self.proc.kill()
                    self.proc.wait()
        self.close_clients()


# -- the fixture -------------------------------------------------------------------


class DaemonFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.short_dir = Path(tempfile.mkdtemp(prefix="otpd-", dir="/tmp"))
        self.started: list[RunningDaemon] = []
        self.count = 0

    def config(self, body: str, *, runtime_dir: Path | None = None, log_level: str = "info") -> Path:
        """Write a config file: a ``[daemon]`` table, then ``body``; return its path."""
        self.count += 1
        runtime_dir = runtime_dir or self.short_dir / f"run{self.count}"
        path = self.tmp_path / f"otpd{self.count}.toml"
        header = (f'[daemon]\nruntime_dir = "{runtime_dir}"\nstate_dir = "{self.tmp_path}/lib{self.count}"\n'
                  f'log_level = "{log_level}"\n\n')
        path.write_text(header + body, encoding="utf-8")
        return path

    def socket_of(self, config_path: Path) -> Path:
        match = re.search(r'runtime_dir = "([^"]+)"', config_path.read_text(encoding="utf-8"))
        assert match
        return Path(match.group(1)) / "otpd.sock"

    def __call__(self, body: str, *, ready: bool = True, config_path: Path | None = None,
                 log_level: str = "info", import_from: Path | None = None) -> RunningDaemon:
        """Start ``otpd run`` on a config made of ``body``; with ``ready``, wait until the root runs.
        ``import_from``: a folder whose modules the config may name too."""
        config_path = config_path or self.config(body, log_level=log_level)
        env = child_env()
        if import_from is not None:
            env["PYTHONPATH"] = os.pathsep.join((str(import_from), env["PYTHONPATH"]))
        proc = subprocess.Popen(console("otpd") + ["run", "--config", str(config_path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env)
        log = LogReader(proc.stderr, self.tmp_path / f"otpd{self.count}-{proc.pid}.log")
        daemon = RunningDaemon(proc, config_path, self.socket_of(config_path), log)
        self.started.append(daemon)
        if ready:
            log.wait_for(r"listening on", timeout=START_TIMEOUT)
            daemon.wait("root", "running", timeout=START_TIMEOUT)
            daemon.status()
        return daemon

    def teardown(self) -> None:
        problems: list[str] = []
        for daemon in self.started:
            daemon.stop(problems)
        for daemon in self.started:
            self._check_left_behind(daemon, problems)
        self._check_adopted(problems)
        shutil.rmtree(self.short_dir, ignore_errors=True)
        if problems:
            logs = "\n\n".join(f"--- otpd pid {d.pid} log ---\n{d.log.text()}" for d in self.started)
            pytest.fail("after the test:\n  " + "\n  ".join(problems) + "\n" + logs, pytrace=False)

    def _check_left_behind(self, daemon: RunningDaemon, problems: list[str]) -> None:
        for pid, created in daemon.agent_pids.items():
            if created is not None and not wait_pid_exit(pid, 5.0 if daemon.killed_by_test else 0.0):
                if is_live(pid, created):
                    problems.append(f"agent pid {pid} of otpd {daemon.pid} is still running; SIGKILL")
                    os.kill(pid, signal.SIGKILL)

    def _check_adopted(self, problems: list[str]) -> None:
        """Processes the daemons left behind were re-parented to us (the subreaper): none may exist."""
        ours = {d.pid for d in self.started}
        killed = any(d.killed_by_test for d in self.started)
        recorded = {pid for d in self.started for pid in d.agent_pids}
        for proc in psutil.Process().children():
            if proc.pid in ours:
                continue
            try:
                zombie = proc.status() == psutil.STATUS_ZOMBIE
                title = " ".join(proc.cmdline()) if not zombie else ""
            except psutil.Error:
                continue
            if proc.pid not in recorded and not title.startswith(("otpd: agent", "otpd: spare")) and not zombie:
                continue  # not from any daemon of this test
            if not zombie and not (killed and wait_pid_exit(proc.pid, 5.0)):
                problems.append(f"pid {proc.pid} ({title}) outlived its otpd; SIGKILL")
                os.kill(proc.pid, signal.SIGKILL)
            elif zombie and not killed:
                problems.append(f"pid {proc.pid} was left unreaped (a zombie) by its otpd")
            try:
                os.waitpid(proc.pid, 0)
            except ChildProcessError:
                pass


@pytest.fixture(scope="session")
def _subreaper() -> None:
    become_subreaper()


@pytest.fixture
def daemon(tmp_path: Path, _subreaper: None) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.teardown()
