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
