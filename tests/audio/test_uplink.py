"""The WebRTC uplink feeder: decoded frames → 16 kHz pushes, cut into utterances by loudness."""

from __future__ import annotations

import av
import numpy as np
import pytest

from avatar_agent.audio.uplink import Uplink


class Pushes:
    def __init__(self, fail: type[Exception] | None = None) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.fail = fail

    def __call__(self, samples: np.ndarray, final: bool) -> int:
        assert samples.dtype == np.float32 and samples.ndim == 1
        if self.fail is not None:
            raise self.fail("full")
        self.calls.append((samples.size, final))
        return 1


def _block(amp: float, n: int = 320) -> np.ndarray:
    return (amp * np.sin(np.arange(n) * 0.3)).astype(np.float32)


async def test_loud_block_opens_with_preroll_and_hangover_silence_ends_it():
    p = Pushes()
    up = Uplink(p, hangover_s=0.06)                   # 3 blocks of 20 ms
    await up.feed(_block(0.0))                         # silence before: nothing pushed
    await up.feed(_block(0.001))                       # quiet: kept as pre-roll only
    assert p.calls == []
    await up.feed(_block(0.5))                         # opens: pre-roll first, then the block
    assert p.calls == [(320, False), (320, False)] and up.utterances == 1
    for _ in range(3):
        await up.feed(_block(0.0))                     # silence inside is passed on ...
    assert p.calls[-1] == (0, True)                    # ... until the hangover ends it
    assert len(p.calls) == 2 + 3 + 1
    await up.feed(_block(0.0))
    assert len(p.calls) == 6                           # silence between utterances is not


async def test_decoded_48k_stereo_frames_become_16k_mono_and_leaving_ends_the_utterance():
    p = Pushes()
    up = Uplink(p)
    up.begin("peer 1")
    t = np.arange(960) / 48_000
    for k in range(25):                                # 0.5 s of a loud 48 kHz stereo tone
        x = (0.5 * np.sin(2 * np.pi * 300 * (t + k * 0.02)) * 32767).astype(np.int16)
        f = av.AudioFrame.from_ndarray(np.repeat(x, 2)[None, :], format="s16", layout="stereo")
        f.sample_rate = 48_000
        await up.push_frame(f)
    await up.finish()
    assert up.frames == 25 and p.calls[-1][1] is True
    assert abs(up.samples - 8000) < 100                # 0.5 s at 16 kHz (soxr tail flushed)
    up.begin("peer 2")                                 # a new speaker starts from zero
    assert up.stats() == {"frames": 0, "samples": 0, "dropped": 0, "utterances": 0}


async def test_refusals_drop_a_block_or_disable_the_peer():
    full = Uplink(Pushes(fail=RuntimeError))
    await full.feed(_block(0.5))
    await full.feed(_block(0.5))
    assert full.dropped == 2                           # the queue was full: blocks lost, go on
    p = Pushes(fail=ValueError)
    refused = Uplink(p)
    await refused.feed(_block(0.5))
    p.fail = None
    await refused.feed(_block(0.5))
    assert p.calls == [] and refused.dropped == 0      # no pushed audio at all: ignored
    with pytest.raises(ValueError, match="hangover_s"):
        Uplink(p, hangover_s=0)
