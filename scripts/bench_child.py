"""The tiny child program every supervisor runs in the benchmarks (stdlib only).

    python scripts/bench_child.py [READY_SOCKET]

With a path, it first sends one datagram holding its PID to that Unix
datagram socket (the bench listens there), then idles in ``signal.pause()``
until a signal ends it.  otpd runs the same code: ``bench_agents.ReadyAgent``
calls ``signal_ready`` from its ``init()``.  So every supervisor's child
signals readiness the same way, and the bench measures them the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import sys


def signal_ready(path: str) -> None:
    """Tell the bench this process is up: one datagram with our PID."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(str(os.getpid()).encode(), path)
    finally:
        s.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1]:
        signal_ready(sys.argv[1])
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
