"""Fixtures for the systemd tests: a stand-in for systemd's notify socket around a real ``otpd run``.

``NotifyListener`` binds an AF_UNIX SOCK_DGRAM socket with SO_PASSCRED, so every
datagram carries its sender's pid (SCM_CREDENTIALS), as systemd sees it; a thread
records each message with its arrival time, and tests wait on a Condition.

``notify_otpd(body, ...)`` starts ``otpd run`` the way systemd does (NOTIFY_SOCKET,
WATCHDOG_USEC, WATCHDOG_PID = the daemon's own pid via ``sh -c 'exec'``) and
returns an ``Otpd``; teardown stops it with a ladder of deadlines and checks that
every agent pid it saw is gone.  Nothing sleeps: waits are on the notify socket,
the control socket (``wait`` op), pidfds and the daemon's stderr.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from otpd.client import Client
from tests.conftest import LogReader, child_env, console, wait_pid_exit

CRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
# SO_TIMESTAMPNS (= its SCM_ type) from asm-generic/socket.h; Python does not export it.
SO_TIMESTAMPNS = 35
TIMESPEC = struct.Struct("qq")  # struct timespec on a 64-bit Linux: tv_sec, tv_nsec


@dataclass
class Message:
    at: float  # time.monotonic() when the listener's thread read it
    stamp: float | None  # when the kernel queued it (CLOCK_REALTIME, SO_TIMESTAMPNS): exact under load
    pid: int | None  # the sender, from SCM_CREDENTIALS
    fields: dict[str, str]
    raw: str = field(repr=False)


class NotifyListener:
    def __init__(self, directory: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if abstract:
            name = f"otpd-test-notify-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = directory / "notify"
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.messages: list[Message] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(
                    65536, socket.CMSG_SPACE(CRED.size) + socket.CMSG_SPACE(TIMESPEC.size))
            except OSError:
                break
            if not data and self.closed:
                break
            pid = stamp = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = CRED.unpack(cdata[: CRED.size])[0]
                elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = TIMESPEC.unpack(cdata[: TIMESPEC.size])
                    stamp = sec + nsec / 1e9
            text = data.decode("utf-8", "replace")
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            with self.cond:
                self.messages.append(Message(time.monotonic(), stamp, pid, fields, text))
                self.cond.notify_all()

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5.0)

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float = 10.0, start: int = 0) -> Message | None:
        """The first message from index ``start`` on that matches; None if none comes in ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            seen = start
            while True:
                for msg in self.messages[seen:]:
                    if predicate(msg):
                        return msg
                seen = max(seen, len(self.messages))
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def wait_field(self, key: str, value: str | None = None, timeout: float = 10.0, start: int = 0) -> Message:
        msg = self.wait_for(lambda m: key in m.fields and (value is None or m.fields[key] == value), timeout, start)
        assert msg is not None, f"no {key}={value or '*'} within {timeout}s; got: {self.brief()}"
        return msg

    def wait_count(self, key: str, value: str, count: int, timeout: float = 10.0) -> list[Message]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for m in self.messages if m.fields.get(key) == value]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                assert left > 0, f"{len(found)} of {count} {key}={value} within {timeout}s; got: {self.brief()}"
                self.cond.wait(left)

    def snapshot(self) -> list[Message]:
        with self.cond:
            return list(self.messages)

    def brief(self) -> str:
        return " | ".join(m.raw.replace("\n", " ") for m in self.snapshot()[:40])


class Otpd:
    """One ``otpd run`` started the way systemd starts it."""

    def __init__(self, proc: subprocess.Popen[bytes], socket_path: Path, log: LogReader | None,
                 listener: NotifyListener | None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.socket = socket_path
        self.log = log
        self.listener = listener
        self.agent_pids: set[int] = set()

    def request(self, op: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        with Client(self.socket, timeout=timeout) as client:
            return client.request(op, args)

    def children(self) -> dict[str, dict[str, Any]]:
        out = {c["id"]: c for c in self.request("status")["children"]}
        self.agent_pids.update(c["pid"] for c in out.values() if c["pid"])
        return out

    def wait(self, child_id: str, state: str = "running", not_pid: int | None = None, timeout: float = 10.0) -> Any:
        result = self.request("wait", {"id": child_id, "state": state, "not_pid": not_pid, "timeout": timeout},
                              timeout=timeout + 10)
        if result.get("pid"):
            self.agent_pids.add(result["pid"])
        return result

    def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log = self.log.text() if self.log else ""
            raise AssertionError(f"otpd pid {self.pid} still runs after {timeout}s; log:\n{log}") from None

    def stop(self, problems: list[str]) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20.0)
            except subprocess.TimeoutExpired:
                problems.append(f"otpd pid {self.pid} ignored SIGTERM for 20 s; SIGKILL")
                self.proc.kill()
                self.proc.wait()
        for pid in self.agent_pids:
            if not wait_pid_exit(pid, 5.0):
                problems.append(f"agent pid {pid} outlived otpd {self.pid}; SIGKILL")
                os.kill(pid, signal.SIGKILL)


class NotifyFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.short = Path(tempfile.mkdtemp(prefix="otpd-sd-", dir="/tmp"))  # socket paths stay short
        self.started: list[Otpd] = []
        self.listeners: list[NotifyListener] = []
        self.count = 0

    def config(self, body: str) -> tuple[Path, Path]:
        self.count += 1
        run = self.short / f"run{self.count}"
        path = self.tmp_path / f"otpd{self.count}.toml"
        path.write_text(f'[daemon]\nruntime_dir = "{run}"\nstate_dir = "{self.tmp_path}/lib{self.count}"\n\n{body}',
                        encoding="utf-8")
        return path, run / "otpd.sock"

    def listener(self, abstract: bool = False) -> NotifyListener:
        listener = NotifyListener(self.short, abstract)
        self.listeners.append(listener)
        return listener

    def __call__(self, body: str, *, notify: bool = True, abstract: bool = False, watchdog_usec: int | None = None,
                 watchdog_pid: str = "self", env: dict[str, str] | None = None,
                 stderr: int | None = None) -> Otpd:
        """Start ``otpd run``; ``stderr`` an fd to write the log to (default: a pipe read by a LogReader)."""
        path, sock = self.config(body)
        listener = self.listener(abstract) if notify else None
        run_env = child_env()
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
            run_env.pop(name, None)
        if listener is not None:
            run_env["NOTIFY_SOCKET"] = listener.address
        if watchdog_usec is not None:
            run_env["WATCHDOG_USEC"] = str(watchdog_usec)
        run_env.update(env or {})
        # WATCHDOG_PID must be the daemon's own pid, known only once it runs: let the shell export $$ and exec
        pid_expr = '"$$"' if watchdog_pid == "self" else watchdog_pid
        script = 'exec "$@"'
        if watchdog_usec is not None:
            script = f"WATCHDOG_PID={pid_expr}; export WATCHDOG_PID; {script}"
        cmd = ["/bin/sh", "-c", script, "sh", *console("otpd"), "run", "--config", str(path)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE if stderr is None else stderr, env=run_env)
        log = LogReader(proc.stderr, self.tmp_path / f"otpd{self.count}.log") if stderr is None else None
        otpd = Otpd(proc, sock, log, listener)
        self.started.append(otpd)
        return otpd

    def teardown(self) -> None:
        problems: list[str] = []
        for otpd in self.started:
            otpd.stop(problems)
        for listener in self.listeners:
            listener.close()
        shutil.rmtree(self.short, ignore_errors=True)
        if problems:
            pytest.fail("after the test:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def notify_otpd(tmp_path: Path) -> Iterator[NotifyFactory]:
    factory = NotifyFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.teardown()
