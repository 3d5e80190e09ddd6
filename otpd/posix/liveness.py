"""Liveness without messages: every child stamps its progress into a shared page.

A heartbeat message per child per interval costs the daemon a wake-up each
time, and wakes every idle child: with 1,000 children and 2 s heartbeats that
was 1.7 % of a core spent on nothing.  Here the daemon maps one anonymous
shared region before it forks anything; each child gets a slot of two stamps
(CLOCK_MONOTONIC seconds, the same clock in every process):

* ``busy[slot]``: when the child's loop last woke to work (input, a timer, a
  worker's result), or +inf while it waits in ``select``;
* ``woke[slot]``: when it last woke, kept while it waits.

A third value per slot, ``seq[slot]``, is the seq of the child's last commit, stored before the
replies it covers go out: calls on an attached link (``otpctl``'s protocol, ``attach``) are
answered by the agent itself, and the daemon reads what they committed here when the child
exits, to check that its replacement loaded no less (a commit costs a store, not a message).
A fourth, ``links[slot]``, is how many links the child has open; ``status`` and ``ps`` show
both.

An idle child writes nothing and is never woken.  The daemon's sweep finds a
child that is hung by three rules, each with the child's
``heartbeat_timeout_ms`` as the limit:

1. busy for longer than the limit (stuck in a callback, a deadlock, a loop);
2. input the daemon wrote to it is older than the limit and the child has not
   woken since (it does not read its channel);
3. stopped (SIGSTOP, SIGTSTP) for longer than the limit: the kernel tells the
   daemon through SIGCHLD (``waitpid(WUNTRACED)``), no polling.

A child that waits in ``select`` with nothing to do is healthy whatever the
time: it is waiting for the daemon.  The sweep itself reads the busy stamps
with one ``min()`` over the used part of the region and looks at single
children only when that finds something old.
"""

from __future__ import annotations

import math
import mmap

CAPACITY = 1 << 18  # slots; the region is virtual memory, touched only as far as slots are used
_INF = math.inf


class Beats:
    """The shared stamps; made by the daemon before its first fork, inherited by children."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self.region = mmap.mmap(-1, capacity * 32, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        view = memoryview(self.region).cast("d")
        self.busy = view[:capacity]
        self.woke = view[capacity:2 * capacity]
        self.seq = view[2 * capacity:3 * capacity]
        self.links = view[3 * capacity:]
        self.high = 0  # slots below this have been handed out at least once
        self.free: list[int] = []

    def take(self, now: float) -> int:
        """A slot for a child about to be forked, stamped busy from now (its start counts). -1 if full."""
        if self.free:
            slot = self.free.pop()
        elif self.high < self.capacity:
            slot = self.high
            self.high += 1
        else:
            return -1
        self.busy[slot] = now
        self.woke[slot] = now
        self.seq[slot] = 0.0
        self.links[slot] = 0.0
        return slot

    def give_back(self, slot: int) -> None:
        if slot >= 0:
            self.busy[slot] = _INF
            self.free.append(slot)

    def oldest_busy(self) -> float:
        """The earliest busy stamp of any slot in use (+inf if every child waits)."""
        return min(self.busy[: self.high]) if self.high else _INF


class Stamp:
    """The child's end: two stores per loop iteration, one per commit, one per link opened or
    closed, nothing else."""

    __slots__ = ("busy", "woke", "seq", "links", "slot")

    def __init__(self, beats: Beats | None, slot: int) -> None:
        self.busy = beats.busy if beats is not None and slot >= 0 else None
        self.woke = beats.woke if beats is not None and slot >= 0 else None
        self.seq = beats.seq if beats is not None and slot >= 0 else None
        self.links = beats.links if beats is not None and slot >= 0 else None
        self.slot = slot

    def linked(self, count: int) -> None:
        """How many links the child has open now."""
        if self.links is not None:
            self.links[self.slot] = count

    def committed(self, seq: int) -> None:
        """The seq of a commit whose replies are about to go out (exact as a double below 2**53)."""
        if self.seq is not None:
            self.seq[self.slot] = seq

    def waiting(self) -> None:
        if self.busy is not None:
            self.busy[self.slot] = _INF

    def working(self, now: float) -> None:
        if self.busy is not None and self.woke is not None:
            self.woke[self.slot] = now
            self.busy[self.slot] = now
