"""msgpack, once for the whole process: one Packer reused for every frame and record.

``msgpack.packb`` builds a Packer per call, three times the cost of reusing one.
Every otpd process is single-threaded (a forked child has its own copy), and a
Packer resets itself after a failed pack, so one per process is safe.
"""

from __future__ import annotations

from typing import Any

import msgpack

_packer = msgpack.Packer(use_bin_type=True)


def pack(obj: Any) -> bytes:
    """Encode ``obj``; TypeError / ValueError / OverflowError when msgpack cannot."""
    data: bytes = _packer.pack(obj)
    return data


def unpacker(max_frame: int) -> msgpack.Unpacker:
    """A streaming decoder whose buffer starts small and grows up to ``max_frame``.

    (msgpack's default first buffer is min(max_frame, 1 MiB): a MiB for every
    connection and every child channel, whether it ever carries a big frame or not.)"""
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max_frame,
                            read_size=min(max_frame, 16 * 1024))


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
