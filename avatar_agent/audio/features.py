"""Audio features that need no download: log-mel and per-video-frame speech cues.

Everything here is computed from one short-time Fourier transform (25 ms Hann window, 10 ms hop,
512-point FFT at 16 kHz) whose frames sit at *absolute* sample positions of the audio given:
STFT frame j of a video frame is centred on sample ``k·spf + hop/2 + j·hop`` (spf = samples per
video frame), and samples outside the array count as zeros.  That makes the features
streaming-consistent: a chunk analysed with ``left`` samples of left context (≥ n_fft/2 = 256) and,
for its last frame, 256 samples of lookahead (or the true end of the stream) gives exactly the
values of the offline analysis of the whole stream.

Per video frame (``fps`` frames per second, 640 samples at 25 fps) the STFT frames whose centres
fall inside the video frame are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from avatar_agent.types import SAMPLE_RATE

N_FFT = 512
WIN = 400
STFT_HOP = 160
"""STFT hop in samples (10 ms); not the video frame (nn/hubert.py's HOP, 640)."""
SPEECH_BAND = (300.0, 3400.0)
LOW_BAND = (250.0, 1000.0)
HIGH_BAND = (1500.0, 4000.0)
FRICATIVE_BAND = (4000.0, 8000.0)
EPS_DB_POWER = 1e-10  # −100 dB floor so digital silence gives a finite level


class AudioInputError(ValueError):
    """The audio handed to a feature function is unusable (wrong shape, NaN/inf, bad fps)."""


@dataclass(frozen=True, slots=True)
class FrameFeatures:
    """Speech cues per video frame (all float32 [T]).

    Attributes:
        energy: RMS of the speech band (300–3400 Hz), linear full-scale units.
        energy_db: the same in dBFS (20·log10), floored at −100 dB.
        centroid: spectral centroid of 100–8000 Hz in Hz (0 where the frame is silent).
        low_high_db: level of 250–1000 Hz minus level of 1500–4000 Hz in dB (high: rounded /
            back vowels, low: spread / front vowels and fricatives).
        fricative_db: level of 4–8 kHz minus speech-band level in dB (high for s, ʃ, f).
        f1: first formant in Hz (median over the frame's STFT frames of :func:`first_formant`;
            0 where no frame shows one: silence, noise).  F1 rises with jaw opening (≈ 300 Hz
            for i/u, 700–800 Hz for a), which makes it the acoustic cue to how far the mouth
            is open.
    """

    energy: np.ndarray
    energy_db: np.ndarray
    centroid: np.ndarray
    low_high_db: np.ndarray
    fricative_db: np.ndarray
    f1: np.ndarray

    def __len__(self) -> int:
        return int(self.energy.shape[0])


def check_audio(audio: np.ndarray, name: str = "audio") -> np.ndarray:
    """Validate 16 kHz mono float audio; returns it as contiguous float32 [N].

    Raises:
        AudioInputError: not 1-D, or holds NaN/inf.
    """
    a = np.asarray(audio)
    if a.ndim != 1:
        raise AudioInputError(f"{name} must be 1-D mono samples, got shape {a.shape}; "
                              "mix down to mono first")
    if not np.issubdtype(a.dtype, np.floating):
        raise AudioInputError(f"{name} must be float in [-1, 1], got dtype {a.dtype}; "
                              "convert int16 with x / 32768")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        raise AudioInputError(f"{name} holds NaN or inf samples; clean the source audio")
    return a


def samples_per_frame(fps: int, sr: int = SAMPLE_RATE) -> int:
    """Samples per video frame; fps must divide the sample rate and give whole STFT hops."""
    if fps <= 0 or sr % fps or (sr // fps) % STFT_HOP:
        raise AudioInputError(f"fps={fps} must divide {sr} into a whole number of {STFT_HOP}-sample "
                              "hops (e.g. 25, 50, 20)")
    return sr // fps


def hz_to_mel_slaney(f: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    lin = f / f_sp
    log = min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log, lin)


def mel_to_hz_slaney(m: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel_slaney`."""
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=8)
def slaney_mel_filterbank(n_mels: int = 80, n_fft: int = N_FFT, sr: int = SAMPLE_RATE,
                          fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Triangular mel filters on the Slaney scale, area-normalised; float32 [n_mels, n_fft/2+1].

    Each filter spans three consecutive mel-spaced edge frequencies and is scaled by
    2 / (bandwidth in Hz) so every filter has the same area (constant energy per band for white
    noise), the usual "slaney" normalisation.
    """
    fmax = sr / 2.0 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sr / 2:
        raise ValueError(f"mel band [{fmin}, {fmax}] Hz must lie within [0, {sr / 2}]")
    fft_hz = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    mels = np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2)
    edges = mel_to_hz_slaney(mels)                                               # [n_mels + 2]
    lower = (fft_hz[None, :] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    upper = (edges[2:, None] - fft_hz[None, :]) / (edges[2:, None] - edges[1:-1, None])
    fb = np.maximum(0.0, np.minimum(lower, upper))                              # [n_mels, F]
    fb *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[:, None]
    return fb.astype(np.float32)


def _power_frames(audio: np.ndarray, fps: int, left: int) -> tuple[np.ndarray, int]:
    """|STFT|² of the sub-frames of each video frame after ``left``: float32 [T, S, F], T."""
    a = check_audio(audio)
    if left < 0 or left > a.shape[0]:
        raise AudioInputError(f"left={left} must be within [0, len(audio)={a.shape[0]}]")
    spf = samples_per_frame(fps)
    n_frames = (a.shape[0] - left) // spf
    sub = spf // STFT_HOP
    if n_frames == 0:
        return np.zeros((0, sub, N_FFT // 2 + 1), np.float32), 0
    # Padded coordinates: sample i of `a` sits at i + N_FFT/2, so the STFT frame centred on sample c
    # starts at padded index c.  First centre: left + STFT_HOP/2.
    padded = np.zeros(a.shape[0] + N_FFT, np.float32)
    padded[N_FFT // 2 : N_FFT // 2 + a.shape[0]] = a
    start = left + STFT_HOP // 2
    n_stft = n_frames * sub
    need = start + (n_stft - 1) * STFT_HOP + N_FFT
    if need > padded.shape[0]:
        padded = np.pad(padded, (0, need - padded.shape[0]))
    seg = torch.from_numpy(padded[start:need])
    window = _hann()
    spec = torch.stft(seg, N_FFT, STFT_HOP, win_length=WIN, window=window, center=False,
                      return_complex=True)                                      # [F, n_stft]
    power = (spec.real ** 2 + spec.imag ** 2).T.numpy()[:n_stft]               # [n_stft, F]
    return power.reshape(n_frames, sub, -1).astype(np.float32), n_frames


@lru_cache(maxsize=1)
def _hann() -> torch.Tensor:
    return torch.hann_window(WIN, periodic=True)


@lru_cache(maxsize=16)
def _band_mask(lo: float, hi: float) -> np.ndarray:
    hz = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
    return (hz >= lo) & (hz < hi)


_WIN_ENERGY = float(np.sum(np.hanning(WIN + 1)[:-1] ** 2))  # Σ w² of the periodic Hann window


def _band_power(power: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Mean-square amplitude of the time signal within ``band`` (Parseval), per sub-frame."""
    sel = _band_mask(*band)
    return 2.0 * power[..., sel].sum(-1) / (N_FFT * _WIN_ENERGY)


def mel_frames(audio: np.ndarray, fps: int = 25, n_mels: int = 80, *, left: int = 0) -> np.ndarray:
    """Log-mel features per video frame: float32 [T, n_mels], T = (len(audio) − left) // spf.

    ln(mel power + 1e-6) of a Slaney filterbank (0–8 kHz), averaged over the STFT frames of each
    video frame (4 per frame at 25 fps).

    Args:
        audio: float32 16 kHz mono; its first ``left`` samples are context, not returned.
        fps: video frame rate (25 → 640 samples per frame).
        n_mels: number of mel bands.
        left: samples of left context; ≥ 256 makes the values equal to an offline analysis.
    """
    power, n = _power_frames(audio, fps, left)
    if n == 0:
        return np.zeros((0, n_mels), np.float32)
    fb = slaney_mel_filterbank(n_mels)
    mel = np.log(power @ fb.T + 1e-6)                                          # [T, S, n_mels]
    return mel.mean(1).astype(np.float32)


def frame_features(audio: np.ndarray, fps: int = 25, *, left: int = 0) -> FrameFeatures:
    """Speech-band energy envelope and spectral cues per video frame (see :class:`FrameFeatures`).

    Same framing and streaming rules as :func:`mel_frames`.
    """
    power, n = _power_frames(audio, fps, left)
    if n == 0:
        z = np.zeros(0, np.float32)
        return FrameFeatures(z, z, z, z, z, z)
    ms_speech = _band_power(power, SPEECH_BAND).mean(1)                        # [T]
    ms_low = _band_power(power, LOW_BAND).mean(1)
    ms_high = _band_power(power, HIGH_BAND).mean(1)
    ms_fric = _band_power(power, FRICATIVE_BAND).mean(1)
    hz = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
    sel = (hz >= 100.0) & (hz <= 8000.0)
    p = power[..., sel].mean(1)                                                 # [T, F']
    tot = p.sum(-1)
    centroid = np.where(tot > 1e-8, (p * hz[sel]).sum(-1) / np.maximum(tot, 1e-12), 0.0)

    def db(x: np.ndarray) -> np.ndarray:
        return 10.0 * np.log10(x + EPS_DB_POWER)

    return FrameFeatures(
        energy=np.sqrt(ms_speech).astype(np.float32),
        energy_db=db(ms_speech).astype(np.float32),
        centroid=centroid.astype(np.float32),
        low_high_db=(db(ms_low) - db(ms_high)).astype(np.float32),
        fricative_db=(db(ms_fric) - db(ms_speech)).astype(np.float32),
        f1=frame_formant(power),
    )


LPC_ORDER = 16
"""All-pole model order at 16 kHz (≈ 2 poles per kHz of bandwidth, plus 2 for the glottal tilt)."""
PRE_EMPHASIS = 0.97
F1_RANGE = (200.0, 1100.0)
"""Where a first formant may lie (adult and child voices, closed i/u to open a)."""
F1_MAX_BANDWIDTH = 500.0
"""Peaks broader than this (Hz at −3 dB) are spectral tilt or noise, not a formant."""
_F1_GRID = np.arange(F1_RANGE[0] - 50.0, F1_RANGE[1] + 50.0, 10.0)


@lru_cache(maxsize=1)
def _f1_kernels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pre-emphasis gain on the STFT bins, and cos/sin of the LPC polynomial on the F1 grid."""
    w = 2 * np.pi * np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE) / SAMPLE_RATE
    emph = np.abs(1.0 - PRE_EMPHASIS * np.exp(-1j * w)) ** 2                   # [F]
    wg = 2 * np.pi * _F1_GRID / SAMPLE_RATE
    k = np.arange(LPC_ORDER + 1)
    return emph, np.cos(np.outer(k, wg)), np.sin(np.outer(k, wg))             # [F], [P+1, G] ×2


def first_formant(power: np.ndarray) -> np.ndarray:
    """F1 in Hz of each STFT frame from its power spectrum ``[..., N_FFT/2 + 1]``; 0 = none.

    Linear prediction from the spectrum: pre-emphasis applied as a gain on the bins, the
    autocorrelation as the inverse FFT of the power (the 400-sample window in a 512-point FFT
    leaves the first 112 lags free of wrap-around), the normal equations to an order-16 all-pole
    envelope, then the lowest peak of that envelope within :data:`F1_RANGE` narrower than
    :data:`F1_MAX_BANDWIDTH`.  Works on whatever spectrum the caller already has, so it adds no
    window, no latency and no state: streaming equals offline.
    """
    p = np.asarray(power, np.float64)
    shape = p.shape[:-1]
    p = p.reshape(-1, p.shape[-1])
    emph, cos_k, sin_k = _f1_kernels()
    r = np.fft.irfft(p * emph, N_FFT)[:, : LPC_ORDER + 1]                       # [B, P+1]
    r[:, 0] = r[:, 0] * (1.0 + 1e-6) + 1e-12                                    # white-noise floor
    ok = r[:, 0] > 1e-10
    # The normal equations R·a = −r[1:] (R Toeplitz) as one batched solve: what Levinson–Durbin
    # computes, without a Python loop over the order.
    idx = np.abs(np.arange(LPC_ORDER)[:, None] - np.arange(LPC_ORDER)[None])     # [P, P]
    coef = np.linalg.solve(r[:, idx], -r[:, 1:, None])[..., 0]                   # [B, P]
    a = np.concatenate([np.ones((coef.shape[0], 1)), coef], 1)                   # [B, P+1]
    re, im = a @ cos_k, a @ sin_k
    env = 1.0 / np.maximum(re * re + im * im, 1e-12)                            # [B, G]
    # Local maxima inside the range, then the first one narrow enough to be a formant.
    g = _F1_GRID
    inside = (g > F1_RANGE[0]) & (g < F1_RANGE[1])
    peak = np.zeros_like(env, dtype=bool)
    peak[:, 1:-1] = (env[:, 1:-1] > env[:, :-2]) & (env[:, 1:-1] >= env[:, 2:])
    peak &= inside[None]
    # Bandwidth test: the envelope falls to half power within ±bw/2 on both sides.
    step = int(round(F1_MAX_BANDWIDTH / 2 / (g[1] - g[0])))
    lo = np.concatenate([env[:, :1].repeat(step, 1), env[:, :-step]], 1)
    hi = np.concatenate([env[:, step:], env[:, -1:].repeat(step, 1)], 1)
    peak &= (lo < 0.5 * env) & (hi < 0.5 * env)
    first = np.where(peak.any(1), peak.argmax(1), -1)
    f1 = np.where((first >= 0) & ok, g[np.maximum(first, 0)], 0.0)
    return f1.reshape(shape).astype(np.float32)


def frame_formant(power: np.ndarray) -> np.ndarray:
    """F1 per video frame from sub-frame power [T, S, F]: the median of the sub-frames that
    show a formant (0 when fewer than half do)."""
    f = first_formant(power)                                                     # [T, S]
    found = f > 0
    count = found.sum(1)
    # Median of the found values (np.nanmedian costs more than the whole analysis).
    srt = np.sort(np.where(found, f, np.inf), axis=1)
    rows = np.arange(f.shape[0])
    lo = srt[rows, np.maximum(count - 1, 0) // 2]
    hi = srt[rows, np.maximum(count, 1) // 2 - (count == 0)]
    m = 0.5 * (lo + hi)
    enough = count * 2 >= f.shape[1]
    return np.where(enough & np.isfinite(m), m, 0.0).astype(np.float32)
