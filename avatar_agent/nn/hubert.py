"""Official-profile audio features: chinese-hubert-base at 25 fps, layers 1–12 → [T, 12, 768].

The network is transformers' ``HubertModel`` (lazy import); the release's preprocessing around it
(``audio_processer.py``, ``models/audio/hubert.py``) is reproduced here:

1. driving audio only (:func:`release_driving_audio`): librosa-style pre-emphasis (coef 0.97,
   initial state ``2·x[0] − x[1]``), 2 s of exact zeros appended, 16-bit PCM re-quantisation
   (the release writes a temporary wav);
2. pieces of at most 60 s, each processed independently;
3. per piece: ``(x − mean)/sqrt(var + 1e-7)`` over the whole piece, ``T = len // 640`` frames
   (the tail beyond 640·T is dropped);
4. reflect-pad 20 samples each side, twice (640·T + 80 samples);
5. CNN → 2T frames at 50 fps → linear interpolation (align_corners) to T frames *before* the
   feature projection ("presample") → projection → encoder (no mask, eager attention);
6. outputs of transformer layers 1..12 stacked → [T, 12, 768].
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16_000
FPS = 25
HOP = SAMPLE_RATE // FPS
"""Audio samples per video frame (640)."""
PIECE_SECONDS = 60
SILENCE_SECONDS = 2
SILENCE_FRAMES = SILENCE_SECONDS * SAMPLE_RATE // HOP
"""Frames of appended silence in the release's offline path (50)."""

CHINESE_HUBERT_BASE: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", layer_norm_eps=1e-5, feat_extract_norm="group", feat_extract_activation="gelu",
    conv_dim=(512,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    conv_bias=False, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
    feat_proj_layer_norm=True, do_stable_layer_norm=False, mask_time_prob=0.05,
    hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.0,
    layerdrop=0.1, vocab_size=32,
)
"""Hyper-parameters of chinese-hubert-base (HuBERT-base geometry, as its public config.json)."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - dependency is installed in the project venv
        raise ImportError("the official audio features need transformers: "
                          "pip install 'transformers>=4.57'") from e
    return transformers


def hubert_config(**overrides: Any) -> Any:
    """A ``HubertConfig`` with chinese-hubert-base values (eager attention), ``overrides`` applied."""
    tf = _transformers()
    cfg = tf.HubertConfig(**{**CHINESE_HUBERT_BASE, **overrides})
    cfg._attn_implementation = "eager"
    return cfg


def build_hubert(config: Any | None = None) -> torch.nn.Module:
    """An untrained ``HubertModel`` in eval mode (load weights with ``nn.weights.load_hubert``)."""
    tf = _transformers()
    model = tf.HubertModel(config if config is not None else hubert_config())
    return model.eval()


# --------------------------------------------------------------------------------------------
# Waveform preprocessing
# --------------------------------------------------------------------------------------------


def preemphasis(x: np.ndarray, coef: float = 0.97) -> np.ndarray:
    """``y[n] = x[n] − coef·x[n−1]`` with librosa's default initial state ``x[−1]·coef = −(2x[0] − x[1])``.

    (librosa feeds ``zi = 2·x[0] − x[1]`` to ``lfilter([1, −coef], [1])``, so y[0] = 3·x[0] − x[1].)
    """
    from scipy.signal import lfilter

    x = np.asarray(x, dtype=np.float32)
    if x.size < 2:
        raise ValueError(f"audio too short for pre-emphasis: {x.size} samples (need >= 2)")
    zi = np.atleast_1d(2 * x[0] - x[1]).astype(np.float32)
    y, _ = lfilter(np.array([1.0, -coef], np.float32), np.array([1.0], np.float32), x, zi=zi)
    return y.astype(np.float32)


def requantize_pcm16(x: np.ndarray) -> np.ndarray:
    """Round-trip through a 16-bit PCM wav (libsndfile's conversion), as the release's temp file."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(x, dtype=np.float32), SAMPLE_RATE, subtype="PCM_16", format="WAV")
    buf.seek(0)
    y, _ = sf.read(buf, dtype="float32")
    return y


def release_driving_audio(audio: np.ndarray) -> tuple[np.ndarray, int]:
    """The release's offline driving-audio preparation: pre-emphasis, +2 s silence, PCM16.

    Returns:
        (audio float32, number of appended silence frames = 50).
    """
    x = preemphasis(audio)
    x = np.concatenate([x, np.zeros(SILENCE_SECONDS * SAMPLE_RATE, np.float32)])
    return requantize_pcm16(x), SILENCE_FRAMES


def normalise_waveform(x: np.ndarray) -> np.ndarray:
    """Wav2Vec2FeatureExtractor's ``do_normalize``: ``(x − mean)/sqrt(var + 1e-7)`` in float32."""
    x = np.asarray(x, dtype=np.float32)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


def check_audio(audio: np.ndarray, min_samples: int = HOP) -> np.ndarray:
    """Validate mono float audio; raises ValueError naming the problem."""
    a = np.asarray(audio)
    if a.ndim != 1:
        raise ValueError(f"audio must be mono 1-D 16 kHz samples, got shape {a.shape}")
    if a.size < min_samples:
        raise ValueError(f"audio is shorter than one video frame: {a.size} samples < {min_samples} "
                         f"({min_samples / SAMPLE_RATE * 1000:.0f} ms at 16 kHz); pass more audio")
    if not np.all(np.isfinite(a)):
        raise ValueError("audio contains NaN or inf samples")
    return a.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------


class HubertFeatures:
    """``audio(float32 16 kHz [S]) -> features [S // 640, 12, 768]`` with the release's math.

    Args:
        model: a loaded ``HubertModel`` (see ``nn.weights.load_hubert``).
        device: where to run it.
        piece_seconds: the release processes ≤ 60 s pieces independently (normalisation too).
    """

    fps = FPS

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu",
                 piece_seconds: int = PIECE_SECONDS) -> None:
        # A transformers HubertModel: its submodules and config are reached by name (Any).
        self.model: Any = model.eval().to(device)
        self.device = torch.device(device)
        self.piece = piece_seconds * SAMPLE_RATE
        cfg: Any = model.config
        self.layers = cfg.num_hidden_layers
        self.dim = cfg.hidden_size

    @property
    def blocks(self) -> int:
        """Number of encoder layers whose outputs are returned (the ``layers`` axis)."""
        return self.layers

    def input_values(self, audio: np.ndarray) -> np.ndarray:
        """Normalised samples of one piece, trimmed to a whole number of frames [640·T]."""
        x = normalise_waveform(audio)
        return x[: (x.size // HOP) * HOP]

    @torch.no_grad()
    def encode(self, input_values: torch.Tensor) -> torch.Tensor:
        """Encoder features of normalised samples [640·T] → [T, layers, dim]."""
        n = input_values.shape[-1] // HOP
        x = input_values.reshape(1, 1, -1).to(self.device, torch.float32)        # [1, 1, 640T]
        for _ in range(2):                                                       # release pads twice
            x = F.pad(x, (20, 20), mode="reflect")                               # [1, 1, 640T+80]
        feats = self.model.feature_extractor(x[:, 0])                            # [1, 512, 2T]
        feats = F.interpolate(feats, size=n, mode="linear", align_corners=True)  # [1, 512, T]
        h = self.model.feature_projection(feats.transpose(1, 2))                 # [1, T, C]
        if isinstance(h, tuple):                                                 # transformers 4.x
            h = h[0]
        enc = self.model.encoder
        h = enc.layer_norm(h + enc.pos_conv_embed(h))                            # [1, T, C]
        outs = []
        for layer in enc.layers:
            h = layer(h, attention_mask=None)
            if isinstance(h, tuple):
                h = h[0]
            outs.append(h[0])
        return torch.stack(outs, dim=1)                                          # [T, layers, C]

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        """Features [T, layers, dim] (CPU) of float32 16 kHz audio, encoded piece by piece; a tail under one frame is dropped."""
        a = check_audio(audio)
        out = []
        for s in range(0, a.size, self.piece):
            piece = a[s : s + self.piece]
            if piece.size < HOP:
                break                                                            # < 1 frame: dropped
            out.append(self.encode(torch.from_numpy(self.input_values(piece))))
        return torch.cat(out, dim=0).cpu()                                       # [T, layers, C]


def streaming_features(extract: HubertFeatures, audio: np.ndarray, hop_frames: int = 8,
                       left_frames: int = 50, lookahead_frames: int = 5) -> torch.Tensor:
    """Features computed hop by hop from a sliding window, as a live stream would get them.

    Each hop of ``hop_frames`` new frames is encoded from the window
    ``[left context | hop | lookahead]`` (clipped at the signal's ends) and only the hop's frames
    are kept.  This differs from the offline (whole-utterance) features because HuBERT's
    normalisation, positional convolution and attention see only the window.  Measured on ~3 s of
    espeak-ng speech with recipe (random) weights and 1 s hops (tests/nn/test_hubert.py):
    relative RMS deviation 0.45 without context, 0.24 with 2 s left context + 200 ms lookahead,
    0 when the window covers the whole signal.  Trained weights will give other magnitudes, so the
    generator's left context and lookahead are config values.

    Returns:
        [len(audio) // 640, layers, dim], comparable to ``extract(audio)``.
    """
    a = check_audio(audio)
    total = a.size // HOP
    out = []
    for f0 in range(0, total, hop_frames):
        f1 = min(f0 + hop_frames, total)
        w0, w1 = max(0, f0 - left_frames), min(total, f1 + lookahead_frames)
        feats = extract(a[w0 * HOP : w1 * HOP])                                  # [w1-w0, L, C]
        out.append(feats[f0 - w0 : f1 - w0])
    return torch.cat(out, dim=0)


LIVE_CONTEXT_FRAMES = 80
"""Left context of live HuBERT features: one release DiT window (80 frames, 3.2 s)."""


class StreamingHubert:
    """Live HuBERT features of one session: each hop encodes its audio plus up to ``left_frames``
    of the audio heard just before it, and returns the rows of its own audio only.

    The release computes HuBERT over whole ≤ 60 s pieces, so every frame's features see seconds
    of context; a live hop carries only the chunker's short left context.  This keeps the
    session's recent audio (bounded: ``left_frames`` frames plus one chunk) and puts it in front
    of each hop's audio, so the network sees the release's context at a bounded cost per hop
    (``left_frames`` + the hop's frames), instead of re-encoding a growing utterance.  When the
    context covers the whole signal the rows equal the offline features exactly
    (tests/nn/test_hubert.py).

    Args:
        extract: ``audio(float32 16 kHz [S]) -> [S // 640, layers, dim]`` (e.g.
            :class:`HubertFeatures`, possibly under autocast).
        left_frames: frames of remembered audio put before each hop's audio.
    """

    fps = FPS

    def __init__(self, extract: Any, left_frames: int = LIVE_CONTEXT_FRAMES) -> None:
        if left_frames < 0:
            raise ValueError(f"left_frames must be ≥ 0, got {left_frames}")
        self.extract, self.left_frames = extract, left_frames
        self._hist = np.zeros(0, np.float32)
        self._hist_start = 0
        self.encoded_samples = 0
        """Samples given to ``extract`` so far (what the per-hop cost scales with)."""

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        """Stateless features of ``audio`` alone (offline use)."""
        return torch.as_tensor(self.extract(audio))

    def at(self, audio: np.ndarray, start: int) -> torch.Tensor:
        """Features [len(audio) // 640, layers, dim] of ``audio``, whose first sample is sample
        ``start`` of the session's audio timeline, with the remembered audio before it as
        context (none after a gap or a jump back)."""
        a = check_audio(audio)
        h0, h = self._hist_start, self._hist
        prefix = np.zeros(0, np.float32)
        if h.size and h0 <= start <= h0 + h.size:
            # whole frames only, so the returned rows line up with the audio's frames
            n = min(self.left_frames * HOP, start - h0) // HOP * HOP
            prefix = h[start - h0 - n : start - h0]
        x = np.concatenate([prefix, a]) if prefix.size else a
        self.encoded_samples += x.size
        feats = torch.as_tensor(self.extract(x))[prefix.size // HOP :]
        keep = self.left_frames * HOP + a.size
        self._hist, self._hist_start = x[-keep:], start + a.size - min(keep, x.size)
        return feats

    def remember(self, audio: np.ndarray, start: int) -> None:
        """Take ``audio`` (starting at sample ``start``) as the audio heard so far, without
        encoding it (benchmarks measure a hop in its steady state this way)."""
        a = np.asarray(audio, np.float32)
        keep = a[a.size - min(a.size, self.left_frames * HOP):]
        self._hist, self._hist_start = keep, start + a.size - keep.size

    def reset(self) -> None:
        """Forget the remembered audio (a new utterance after an interruption)."""
        self._hist, self._hist_start = np.zeros(0, np.float32), 0

    def fork(self) -> "StreamingHubert":
        """The same network for another session, with no remembered audio."""
        return StreamingHubert(self.extract, self.left_frames)
