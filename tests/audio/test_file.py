"""FileSource decoding real files of many formats through PyAV."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf

from avatar_agent.audio.file import AudioFileError, FileSource
from avatar_agent.clock import FakeClock
from avatar_agent.types import FRAME_SAMPLES, SAMPLE_RATE

ONSET_S = 0.6
DUR_S = 1.5


def tone_with_onset(rate: int, channels: int) -> np.ndarray:
    """Silence, then a 440 Hz tone from exactly ONSET_S; right channel at half level."""
    t = np.arange(int(DUR_S * rate)) / rate
    x = np.where(t >= ONSET_S, 0.5 * np.sin(2 * np.pi * 440 * t), 0.0).astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


async def decode(src: FileSource) -> tuple[list, np.ndarray]:
    frames = [f async for f in src.frames()]
    assert [f.index for f in frames] == [k * FRAME_SAMPLES for k in range(len(frames))]
    assert all(f.samples.shape == (FRAME_SAMPLES,) and f.samples.dtype == np.float32
               for f in frames)
    y = np.concatenate([f.samples for f in frames]) if frames else np.zeros(0, np.float32)
    return frames, y


FORMATS = [("WAV", "PCM_16", "wav"), ("WAV", "FLOAT", "wav"), ("WAV", "PCM_U8", "wav"),
           ("WAV", "PCM_32", "wav"), ("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg"),
           ("MP3", "MPEG_LAYER_III", "mp3")]


@pytest.mark.parametrize("fmt,subtype,ext", FORMATS,
                         ids=[f[1].lower() + "." + f[2] for f in FORMATS])
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
async def test_formats_rates_channels(tmp_path, fmt, subtype, ext, rate, channels):
    path = tmp_path / f"x.{ext}"
    sf.write(path, tone_with_onset(rate, channels), rate, format=fmt, subtype=subtype)
    src = FileSource(path)
    assert (src.rate, src.channels) == (rate, channels)
    _, y = await decode(src)
    # Right duration: 1.5 s → 75 frames (lossy codecs may add at most one frame of padding).
    assert abs(y.size - DUR_S * SAMPLE_RATE) <= FRAME_SAMPLES
    # The onset lands at the right sample (±1 frame); before it: silence.
    onset = np.flatnonzero(np.abs(y) > 0.05)[0]
    assert abs(onset - ONSET_S * SAMPLE_RATE) <= FRAME_SAMPLES
    assert np.abs(y[: int((ONSET_S - 0.03) * SAMPLE_RATE)]).max() < 0.02
    # Stereo is averaged: (1 + 0.5) / 2 of 0.5 amplitude.
    peak = np.abs(y[int(0.8 * SAMPLE_RATE):int(1.4 * SAMPLE_RATE)]).max()
    expected = 0.5 * (0.75 if channels == 2 else 1.0)
    lossy = subtype in ("VORBIS", "MPEG_LAYER_III")
    assert abs(peak - expected) < (0.1 if lossy else 0.03) * expected + (
        0.01 if subtype == "PCM_U8" else 0.0)
    if subtype in ("PCM_16", "FLOAT", "PCM_32"):  # lossless: sample-accurate against soxr
        t = np.arange(y.size) / SAMPLE_RATE
        ref = np.where(t >= ONSET_S, 0.5 * np.sin(2 * np.pi * 440 * t), 0.0) * (expected / 0.5)
        sl = slice(int(0.7 * SAMPLE_RATE), int(1.4 * SAMPLE_RATE))
        assert np.abs(y[sl] - ref[sl]).max() < 2e-3


def _encode_av(path, *, audio: bool, video: bool, container_fmt: str | None = None) -> None:
    import av

    rate = 44100
    with av.open(str(path), "w", format=container_fmt) as out:
        a_st = v_st = None
        if video:
            v_st = out.add_stream("mpeg4", rate=25)
            v_st.width, v_st.height, v_st.pix_fmt = 64, 64, "yuv420p"
        if audio:
            a_st = out.add_stream("aac", rate=rate)
            a_st.layout = "stereo"
        if v_st is not None:
            for i in range(25):
                img = np.full((64, 64, 3), i * 8, np.uint8)
                for pkt in v_st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(pkt)
            for pkt in v_st.encode():
                out.mux(pkt)
        if a_st is not None:
            x = tone_with_onset(rate, 2).T.copy()  # planar [2, n]
            for k in range(0, x.shape[1], 1024):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, k:k + 1024]),
                                                format="fltp", layout="stereo")
                fr.sample_rate = rate
                fr.pts = k
                fr.time_base = Fraction(1, rate)
                for pkt in a_st.encode(fr):
                    out.mux(pkt)
            for pkt in a_st.encode():
                out.mux(pkt)


async def test_m4a_and_video_soundtrack(tmp_path):
    for name, video in (("a.m4a", False), ("v.mp4", True)):
        path = tmp_path / name
        _encode_av(path, audio=True, video=video)
        _, y = await decode(FileSource(path))
        assert abs(y.size - DUR_S * SAMPLE_RATE) <= 2 * FRAME_SAMPLES, name
        onset = np.flatnonzero(np.abs(y) > 0.05)[0]
        assert abs(onset - ONSET_S * SAMPLE_RATE) <= FRAME_SAMPLES, name


def test_video_without_audio_is_a_clear_error(tmp_path):
    path = tmp_path / "silent.mp4"
    _encode_av(path, audio=False, video=True)
    with pytest.raises(AudioFileError, match="no audio stream.*video"):
        FileSource(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(AudioFileError, match="does not exist"):
        FileSource(tmp_path / "nope.wav")
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(b"this is not audio at all " * 100)
    with pytest.raises(AudioFileError, match="cannot be decoded"):
        FileSource(bad)
    with pytest.raises(AudioFileError, match="directory"):
        FileSource(tmp_path)


async def test_truncated_file_decodes_what_is_there(tmp_path):
    path = tmp_path / "x.flac"
    sf.write(path, tone_with_onset(44100, 1), 44100, subtype="PCM_16")
    data = path.read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: len(data) // 2])
    try:
        _, y = await decode(FileSource(cut))
    except AudioFileError as e:  # FFmpeg may also report the damage: then clearly
        assert "corrupt" in str(e)
    else:
        assert 0 < y.size < DUR_S * SAMPLE_RATE


async def test_empty_files_end_immediately(tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000, subtype="PCM_16")
    frames, _ = await decode(FileSource(empty))
    assert frames == []
    zero = tmp_path / "zero.wav"
    zero.write_bytes(b"")
    frames, _ = await decode(FileSource(zero))
    assert frames == []


async def test_nan_and_inf_become_silence(tmp_path):
    x = tone_with_onset(16000, 1)
    x[int(0.9 * 16000):int(0.9 * 16000) + 50] = np.nan
    x[int(1.2 * 16000)] = np.inf
    x[int(1.3 * 16000)] = -np.inf
    x[int(0.2 * 16000)] = 3.0  # over full scale: clipped
    path = tmp_path / "nan.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    src = FileSource(path)
    _, y = await decode(src)
    assert np.isfinite(y).all() and np.abs(y).max() <= 1.0
    assert src.nonfinite == 52
    assert y[int(0.9 * 16000) + 10] == 0.0
    assert y[int(0.2 * 16000)] == 1.0


async def test_realtime_pacing_on_a_fake_clock(tmp_path):
    path = tmp_path / "x.wav"
    sf.write(path, tone_with_onset(22050, 1), 22050, subtype="PCM_16")
    clock = FakeClock(start=100.0)
    src = FileSource(path, realtime=True, clock=clock)
    lag = []
    async for f in src.frames():
        # Like a microphone: a frame arrives once it has finished playing.
        lag.append(clock.now() - (100.0 + (f.index + FRAME_SAMPLES) / SAMPLE_RATE))
    assert len(lag) == 75
    assert max(abs(v) for v in lag) < 1e-9
    assert clock.now() == pytest.approx(100.0 + DUR_S)


async def test_fast_mode_does_not_wait_and_close_stops(tmp_path):
    path = tmp_path / "x.wav"
    sf.write(path, tone_with_onset(16000, 1), 16000, subtype="PCM_16")
    clock = FakeClock(start=5.0)
    src = FileSource(path, realtime=False, clock=clock)
    n = 0
    async for _ in src.frames():
        n += 1
        if n == 10:
            await src.close()
    assert clock.now() == 5.0
    assert n <= 60  # stopped well before the 75 frames of the file
