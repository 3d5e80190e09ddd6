"""sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET.

A no-op when NOTIFY_SOCKET is unset.  The variables are removed from the
environment at start (as sd_notify's ``unset_environment`` does), and their bytes
zeroed in the exec-time block /proc/PID/environ shows, so agents never inherit them
and cannot speak for the daemon.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        if address:
            if address.startswith("@"):  # an abstract socket
                address = "\0" + address[1:]
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.target = address
        # Ping at half the watchdog period, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None

    @classmethod
    def from_env(cls) -> Notifier:
        address = os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", None)
        wd_pid = os.environ.pop("WATCHDOG_PID", None)
        if address or usec or wd_pid:  # not even in the exec-time block agents share
            from otpd.posix.system import scrub_exec_environ

            scrub_exec_environ(("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"))
        watchdog = None
        if usec and usec.isdigit() and (wd_pid is None or wd_pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *fields: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode(), self.target)
        except OSError:
            pass  # the manager is gone or busy: never a reason to stop supervising

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", "STATUS=reloading the config")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping children in reverse order")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def extend_timeout(self, usec: int) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={usec}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
