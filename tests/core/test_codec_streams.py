"""codec.Streams: many channels decoded through one shared Unpacker, split frames included."""

from __future__ import annotations

import random

import msgpack
import pytest

from otpd import codec


def test_interleaved_streams_split_at_every_byte_decode_exactly() -> None:
    rng = random.Random(7)
    streams = codec.Streams(1 << 20)
    frames = {s: [{"t": "reply", "ref": i, "result": "x" * rng.randrange(0, 300), "s": s} for i in range(50)]
              for s in range(4)}
    wire = {s: b"".join(codec.pack(f) for f in fs) for s, fs in frames.items()}
    held: dict[int, object] = dict.fromkeys(frames)
    got: dict[int, list[object]] = {s: [] for s in frames}
    pos = dict.fromkeys(frames, 0)
    while any(pos[s] < len(wire[s]) for s in frames):
        s = rng.choice([s for s in frames if pos[s] < len(wire[s])])
        n = rng.randrange(1, 400)
        out, held[s] = streams.decode(held[s], wire[s][pos[s]:pos[s] + n])  # type: ignore[arg-type]
        got[s].extend(out)
        pos[s] += n
    assert got == frames
    assert all(h is None for h in held.values())  # every stream ended on a frame boundary


def test_garbage_raises_and_the_shared_decoder_still_works_for_others() -> None:
    streams = codec.Streams(1 << 20)
    with pytest.raises((msgpack.UnpackException, ValueError)):
        streams.decode(None, b"\xc1" * 8)  # 0xc1 is never valid msgpack
    assert streams.decode(None, codec.pack({"t": "hb"})) == ([{"t": "hb"}], None)
