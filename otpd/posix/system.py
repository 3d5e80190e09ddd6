"""The OS seam: the few process-level calls otpd makes that the stdlib lacks.

Everything here is loaded in the daemon before any fork, so a child pays
nothing to use it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
from collections.abc import Callable
from typing import Any

from otpd.core.tree import Reason

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

_setproctitle: Callable[[str], None] | None
try:  # a well-kept C extension; without it only the 15-byte comm name changes
    from setproctitle import setproctitle as _setproctitle
except ImportError:  # pragma: no cover - it is a dependency
    _setproctitle = None

# Child exit statuses the daemon decodes (see decode_status).
EXIT_NORMAL = 0
EXIT_CRASH = 70  # EX_SOFTWARE: an exception escaped the agent
EXIT_SHUTDOWN = 79  # stopped cleanly on SIGTERM (OTP's reason `shutdown`)
EXIT_TIMEOUT = 75  # a task's or a workflow step's attempt ran past its timeout (a crash)


def die_with_parent(parent_pid: int) -> bool:
    """Ask the kernel to SIGKILL us when the parent dies; False if it already has.

    PR_SET_PDEATHSIG fires on the parent's death only from now on: a parent
    that died between fork() and this call would be missed, so check
    getppid() after arming it (the parent is then init or a subreaper).
    """
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    return os.getppid() == parent_pid


def set_title(title: str) -> None:
    if _setproctitle is not None:
        _setproctitle(title)
    else:  # pragma: no cover
        _prctl(PR_SET_NAME, ctypes.cast(ctypes.c_char_p(title.encode()[:15]), ctypes.c_void_p).value or 0, 0, 0, 0)


def prepare_titles() -> None:
    """Let setproctitle move the environment aside now, once, in the daemon: each forked child
    inherits that work and its own ``set_title`` costs a third (~0.05 ms instead of 0.15).
    The daemon's title stays what it was."""
    if _setproctitle is not None:
        from setproctitle import getproctitle

        _setproctitle(getproctitle())


def close_inherited_fds(*keep: int) -> None:
    """Close every fd above stderr except those in ``keep`` (close_range(2) under the hood)."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def become_subreaper() -> bool:
    """Orphans of our children (an agent's helper, a process an agent started) are re-parented
    to us, not to init, and reaped here: none of them is left a zombie outside the daemon."""
    return bool(_prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def scrub_exec_environ(names: tuple[str, ...]) -> None:
    """Zero the ``NAME=value`` entries of ``names`` in the environment block the kernel
    shows as /proc/PID/environ.  unsetenv(3) only drops libc's pointer to an entry: its
    bytes stay in the block, and every forked child shares them.  Call it once the names
    are unset (nothing points at those bytes any more) and before any fork; a block that
    has been moved or rewritten (setproctitle) just does not match."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50 and 51)
        if not 0 < start < end:
            return
        block = ctypes.string_at(start, end - start)
    except (OSError, IndexError, ValueError):  # pragma: no cover - an old kernel or no /proc
        return
    prefixes = tuple(name.encode() + b"=" for name in names)
    offset = 0
    for entry in block.split(b"\0"):
        if entry.startswith(prefixes):
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1


def trim_heap() -> None:
    """Give free malloc memory back to the kernel (glibc's malloc_trim); smaller forks and exits."""
    try:
        _libc.malloc_trim(0)
    except AttributeError:  # pragma: no cover - not glibc
        pass


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def decode_status(status: int) -> tuple[Reason, dict[str, Any]]:
    """A wait status as OTP's exit reason plus the raw facts (status or signal)."""
    if os.WIFSIGNALED(status):
        return "crash", {"signal": os.WTERMSIG(status)}
    code = os.WEXITSTATUS(status)
    if code == EXIT_NORMAL:
        return "normal", {"status": code}
    if code == EXIT_SHUTDOWN:
        return "shutdown", {"status": code}
    return "crash", {"status": code}


def signal_number(name: str | int) -> int:
    """'KILL', 'SIGKILL', 'kill' or 9 -> 9; ValueError for anything else."""
    if isinstance(name, int) and not isinstance(name, bool):
        return int(signal.Signals(name))
    if isinstance(name, str):
        upper = name.upper()
        if upper.isdigit():
            return int(signal.Signals(int(upper)))
        return int(signal.Signals[upper if upper.startswith("SIG") else "SIG" + upper])
    raise ValueError(f"not a signal: {name!r}")
