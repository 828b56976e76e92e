"""Voice activity detection: webrtcvad (the webrtcvad-wheels build) behind the Vad protocol."""

from __future__ import annotations

import math

import numpy as np

from avatar_agent.types import FRAME_MS, SAMPLE_RATE


class VadConfigError(ValueError):
    """A VAD parameter out of range."""


class WebRtcVad:
    """WebRTC's GMM voice detector on 16 kHz float32 audio.

    webrtcvad only accepts 10, 20 or 30 ms blocks of int16 PCM.  ``is_speech`` takes blocks of any
    length (normally the pipeline's 20 ms frames), keeps the remainder that does not fill a VAD
    frame for the next call, and answers "speech" if any VAD frame completed during this call was
    voiced.  If none completed (e.g. 20 ms input with 30 ms VAD frames, every third call), the
    previous decision is repeated; :attr:`decision_delay_ms` states the delay that implies.

    webrtcvad has a built-in overhang: after voiced audio it keeps answering "voiced" for another
    ~80-140 ms, even over digital silence, which turns a 20 ms click into 100 ms of "speech" and
    makes every end late.  An energy gate removes that where it is plainly wrong: a block whose RMS
    is below ``min_dbfs`` is never speech (real speech sits around -35..-15 dBFS; -60 dBFS is far
    below any voice but above digital/near-digital silence).
    """

    def __init__(self, aggressiveness: int = 2, frame_ms: int = 20,
                 sample_rate: int = SAMPLE_RATE, min_dbfs: float | None = -60.0) -> None:
        """
        Args:
            aggressiveness: 0 (keeps most audio as speech) .. 3 (rejects non-speech hardest).
            frame_ms: webrtcvad's decision frame, 10, 20 or 30 ms.
            sample_rate: rate of the audio passed in; 8000, 16000, 32000 or 48000.
            min_dbfs: energy gate (RMS in dB re full scale) below which a block is unvoiced;
                None disables the gate (raw webrtcvad decisions).
        """
        if isinstance(aggressiveness, bool) or not isinstance(aggressiveness, int) \
                or not 0 <= aggressiveness <= 3:
            raise VadConfigError(f"VAD aggressiveness {aggressiveness!r} must be an integer 0..3 "
                                 "(0 = least, 3 = most aggressive in rejecting non-speech)")
        if frame_ms not in (10, 20, 30):
            raise VadConfigError(f"VAD frame_ms {frame_ms!r} must be 10, 20 or 30 "
                                 "(the only frame lengths webrtcvad accepts)")
        if sample_rate not in (8000, 16000, 32000, 48000):
            raise VadConfigError(f"VAD sample_rate {sample_rate!r} must be 8000, 16000, 32000 "
                                 "or 48000 Hz")
        try:
            import webrtcvad
        except ImportError as e:  # pragma: no cover - core dependency
            raise ImportError("webrtcvad is missing: pip install webrtcvad-wheels==2.0.14.post1 "
                              "(not 'webrtcvad', which needs pkg_resources)") from e
        self.aggressiveness = aggressiveness
        self.frame_ms = frame_ms
        self.sample_rate = sample_rate
        self.min_dbfs = min_dbfs
        self._min_rms = None if min_dbfs is None else 10.0 ** (min_dbfs / 20.0)
        self._vad = webrtcvad.Vad(aggressiveness)
        self._n = sample_rate * frame_ms // 1000
        self._rest = np.zeros(0, np.int16)
        self._last = False

    @property
    def decision_delay_ms(self) -> int:
        """How late a decision can be relative to 20 ms input frames (0 for 10/20 ms frames)."""
        return max(0, self.frame_ms - FRAME_MS)

    def is_speech(self, samples: np.ndarray) -> bool:
        """True if the audio (float32 in [-1, 1]) completed at least one voiced VAD frame."""
        x = np.asarray(samples)
        if x.ndim != 1:
            raise ValueError(f"VAD input must be mono 1-D audio, got shape {x.shape}")
        if x.dtype.kind != "f":                          # (a float dtype; cheaper than issubdtype)
            raise ValueError(f"VAD input must be float audio in [-1, 1], got dtype {x.dtype}")
        # (called for every 20 ms frame of every session, under the GIL: the usual finite frame
        # takes a handful of ufunc calls; only a frame with NaN/inf pays for nan_to_num)
        if x.size and not math.isfinite(float(np.dot(x, x))):
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        x = np.maximum(x, -1.0)
        np.minimum(x, 1.0, out=x)
        quiet = (self._min_rms is not None and x.size > 0
                 and math.sqrt(float(np.dot(x, x)) / x.size) < self._min_rms)
        x *= 32767.0
        pcm = x.astype(np.int16)
        if self._rest.size:
            pcm = np.concatenate([self._rest, pcm])
        n_full = pcm.size // self._n
        if n_full == 0:
            self._rest = pcm
            return self._last and not quiet
        voiced = False
        for k in range(n_full):
            block = pcm[k * self._n:(k + 1) * self._n]
            if self._vad.is_speech(block.tobytes(), self.sample_rate):
                voiced = True
        self._rest = pcm[n_full * self._n:].copy()
        # The VAD still sees every block (its noise model adapts); the gate only vetoes.
        self._last = voiced
        return voiced and not quiet

    def reset(self) -> None:
        """Forget buffered samples (e.g. after a source restart)."""
        self._rest = np.zeros(0, np.int16)
        self._last = False
