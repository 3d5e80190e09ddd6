"""msgpack, once for the whole process: one Packer reused for every frame and record.

``msgpack.packb`` builds a Packer per call, three times the cost of reusing one.
Every otpd process is single-threaded (a forked child has its own copy), and a
Packer resets itself after a failed pack, so one per process is safe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

_packer = msgpack.Packer(use_bin_type=True)

# How much one socket read asks for.  ``sock.recv(n)`` allocates n bytes before the call: at
# n = 256 KiB, above glibc's mmap threshold (128 KiB), a fresh process maps and unmaps that much
# for every read, 12 µs for a 40-byte message against 2 µs at 64 KiB (measured here).  The
# daemon's glibc had raised its threshold (no difference in the round trip, A/B), but a client
# in a short-lived process has not.  Every socket read of otpd asks for this much.
READ_SIZE = 64 * 1024

# Encode an object; TypeError / ValueError / OverflowError when msgpack cannot.
# The bound method itself, not a wrapper: every call and reply is packed at least
# twice on its way, and a Python-level call costs as much as packing a small frame.
pack: Callable[[Any], bytes] = _packer.pack


def unpacker(max_frame: int) -> msgpack.Unpacker:
    """A streaming decoder whose buffer starts small and grows up to ``max_frame``.

    (msgpack's default first buffer is min(max_frame, 1 MiB): a MiB for every
    connection and every child channel, whether it ever carries a big frame or not.)"""
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max_frame,
                            read_size=min(max_frame, 16 * 1024))


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Streams:
    """Frames from many byte streams through one shared msgpack Unpacker.

    An Unpacker costs ~43 KiB of memory the moment it exists (its decoding stack
    is embedded and zeroed), so one per child channel made a daemon with 1,000
    children 43 MiB bigger, and every fork() slower.  Here a stream borrows the
    shared Unpacker; only a stream left holding half a frame keeps the Unpacker
    that holds those bytes (the pool gets a new one), until the frame is done.
    """

    __slots__ = ("max_frame", "shared", "fed")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.shared = unpacker(max_frame)
        self.fed = 0  # bytes fed to ``shared`` since it was made

    def decode(self, held: tuple[msgpack.Unpacker, int, int] | None, data: bytes
               ) -> tuple[list[Any], tuple[msgpack.Unpacker, int, int] | None]:
        """Frames complete in ``held`` + ``data``, and what the stream holds now.

        ``held`` is the stream's own (Unpacker, bytes fed, end of its last whole
        frame) or None.  Raises what msgpack raises for garbage (the stream is
        then unusable)."""
        if held is None:
            own, fed = self.shared, self.fed
            end = fed
        else:
            own, fed, end = held
        fed += len(data)
        frames = []
        try:
            own.feed(data)
            for frame in own:  # tell() after a frame is where it ended; after OutOfData it is not
                frames.append(frame)
                end = own.tell()
        except Exception:
            if held is None:
                self.shared, self.fed = unpacker(self.max_frame), 0
            raise
        if end == fed:  # nothing left over
            if held is None:
                self.fed = fed
            return frames, None
        if held is None:  # the stream keeps this Unpacker; the pool starts a new one
            self.shared, self.fed = unpacker(self.max_frame), 0
        return frames, (own, fed, end)
