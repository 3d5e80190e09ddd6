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


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
