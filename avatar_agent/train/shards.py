"""Training data on disk: shards of utterances, a JSON index, corpus statistics, random segments.

Layout of a dataset directory::

    index.json          format, feature config, shard list, statistics (after compute_stats)
    shard-00000.npz     many utterances, concatenated along time
    shard-00001.npz     ...

One shard (``numpy.savez``, no pickles) holds, for n utterances with T_i frames each:

    audio      float16 [ΣT, L, D]   audio features per video frame (L blocks × D dims)
    motion     float32 [ΣT, 70]     raw motion (motion/space.py layout)
    offsets    int64   [n + 1]      utterance i = rows offsets[i] : offsets[i+1]
    identity   float32 [n, 63]      canonical keypoints (identity condition, raw)
    rest       float32 [n, 70]      the avatar's rest pose (previous frame of an utterance's start)
    emotion    int64   [n]          label 0..7, 8 = none
    intensity  float32 [n]          emotion intensity the teacher used
    meta       str     [n]          one JSON object per utterance (text, voice, seed, ...)

Normalisation ("model space") mirrors inference in :class:`avatar_agent.motion.moda.MoDAMotion`:
scale and t are divided by the rescale ratio ``rr = (s_rest + 1e-5)/(mean_scale + 1e-5)`` of the
utterance's avatar, then ``(x − mean)/(std + 1e-5)`` (the release's ``+1e-5``); or, with relative
statistics, ``(x − rest − mean)/(std + 1e-5)`` (see :func:`compute_stats`).  Audio features are
standardised per (block, dim) channel with the corpus mean/std.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from avatar_agent.motion import space
from avatar_agent.motion.moda import rescale_ratio, to_model_space

FORMAT = "avatar-agent-moda-shards"
VERSION = 1
INDEX = "index.json"


class ShardError(ValueError):
    """A dataset directory or shard is missing, malformed or inconsistent."""


@dataclass
class UtteranceRecord:
    """One training utterance.

    Attributes:
        audio: [T, L, D] audio features per video frame (stored as float16).
        motion: [T, 70] raw target motion.
        identity: [63] canonical keypoints of the avatar.
        rest: [70] the avatar's rest pose (the continuity condition before frame 0).
        emotion: emotion label 0..7, 8 = none.
        intensity: emotion intensity 0..1 used by the teacher.
        meta: free-form JSON-serialisable metadata (text, voice, augmentation, seed, ...).
    """

    audio: np.ndarray
    motion: np.ndarray
    identity: np.ndarray
    rest: np.ndarray
    emotion: int
    intensity: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        a, m = np.asarray(self.audio), np.asarray(self.motion)
        if a.ndim != 3:
            raise ShardError(f"record audio must be [T, blocks, dim], got shape {a.shape}")
        if m.shape != (a.shape[0], space.DIM):
            raise ShardError(f"record motion must be [T={a.shape[0]}, {space.DIM}], got {m.shape}")
        if np.asarray(self.identity).size != 3 * space.N_KP:
            raise ShardError(f"record identity must hold {3 * space.N_KP} values, got "
                             f"{np.asarray(self.identity).size}")
        if np.asarray(self.rest).shape != (space.DIM,):
            raise ShardError(f"record rest must be [{space.DIM}], got {np.asarray(self.rest).shape}")
        if not 0 <= int(self.emotion) <= 8:
            raise ShardError(f"record emotion must be 0..8, got {self.emotion}")
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(a))):
            raise ShardError("record audio/motion hold NaN or inf")

    @property
    def frames(self) -> int:
        """Number of 25 fps frames in the record."""
        return int(np.asarray(self.audio).shape[0])


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Appends utterances to numbered shards and keeps ``index.json`` up to date.

    Args:
        out_dir: dataset directory (created; must not already hold an index unless ``append``).
        feature: the audio feature config (e.g. ``{"kind": "mel", "n_mels": 80, "fps": 25}``);
            stored in the index so training and inference extract the same features.
        shard_size: utterances per shard.
        append: continue an existing dataset with the same feature config.
    """

    def __init__(self, out_dir: str | Path, feature: dict[str, Any], shard_size: int = 256,
                 append: bool = False) -> None:
        if shard_size < 1:
            raise ShardError(f"shard_size must be >= 1, got {shard_size}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        idx_path = self.dir / INDEX
        if idx_path.exists():
            if not append:
                raise ShardError(f"{idx_path} exists; choose an empty directory or pass append=True")
            self.index = load_index(self.dir)
            if self.index["feature"] != feature:
                raise ShardError(f"feature config {feature} differs from the dataset's "
                                 f"{self.index['feature']}")
            self.index.pop("stats", None)  # stale once data is added
        else:
            self.index = {"format": FORMAT, "version": VERSION, "feature": dict(feature),
                          "shards": [], "utterances": 0, "frames": 0}
        self._buf: list[UtteranceRecord] = []

    def add(self, rec: UtteranceRecord) -> None:
        """Queue one utterance; a full shard is written to disk at once."""
        if self._buf and np.asarray(rec.audio).shape[1:] != np.asarray(self._buf[0].audio).shape[1:]:
            raise ShardError(f"audio feature shape {np.asarray(rec.audio).shape[1:]} differs from "
                             f"{np.asarray(self._buf[0].audio).shape[1:]} earlier in the shard")
        self._buf.append(rec)
        if len(self._buf) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the queued utterances (if any) as one shard and update the index."""
        if not self._buf:
            return
        recs, self._buf = self._buf, []
        name = f"shard-{len(self.index['shards']):05d}.npz"
        lens = np.array([r.frames for r in recs], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        arrays: dict[str, Any] = dict(
            audio=np.concatenate([np.asarray(r.audio, np.float16) for r in recs]),
            motion=np.concatenate([np.asarray(r.motion, np.float32) for r in recs]),
            offsets=offsets,
            identity=np.stack([np.asarray(r.identity, np.float32).reshape(-1) for r in recs]),
            rest=np.stack([np.asarray(r.rest, np.float32) for r in recs]),
            emotion=np.array([int(r.emotion) for r in recs], np.int64),
            intensity=np.array([float(r.intensity) for r in recs], np.float32),
            meta=np.array([json.dumps(r.meta, sort_keys=True) for r in recs], dtype=np.str_),
        )
        tmp = self.dir / (name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(self.dir / name)
        self.index["shards"].append({"file": name, "utterances": len(recs),
                                     "frames": int(offsets[-1])})
        self.index["utterances"] += len(recs)
        self.index["frames"] += int(offsets[-1])
        _write_index(self.dir, self.index)

    def close(self) -> dict[str, Any]:
        """Flush the last shard; returns the index."""
        self.flush()
        _write_index(self.dir, self.index)
        return self.index

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_index(d: Path, index: dict[str, Any]) -> None:
    tmp = d / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    tmp.replace(d / INDEX)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_index(data_dir: str | Path) -> dict[str, Any]:
    """Read and check ``index.json`` of a dataset directory."""
    p = Path(data_dir) / INDEX
    if not p.is_file():
        raise ShardError(f"{p} not found; build a dataset first (avatar-agent data-prep --out {data_dir})")
    try:
        index = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShardError(f"{p} is not valid JSON ({e}); rebuild the dataset") from e
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ShardError(f"{p} is not a {FORMAT} v{VERSION} index")
    return index


def read_shard(path: str | Path) -> list[UtteranceRecord]:
    """All utterances of one shard file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arr = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read shard {path} ({e}); rebuild the dataset") from e
    off = arr["offsets"]
    out = []
    for i in range(off.shape[0] - 1):
        a, b = int(off[i]), int(off[i + 1])
        out.append(UtteranceRecord(audio=arr["audio"][a:b], motion=arr["motion"][a:b],
                                   identity=arr["identity"][i], rest=arr["rest"][i],
                                   emotion=int(arr["emotion"][i]),
                                   intensity=float(arr["intensity"][i]),
                                   meta=json.loads(str(arr["meta"][i]))))
    return out


def iter_records(data_dir: str | Path) -> Iterator[UtteranceRecord]:
    """Every utterance of a dataset, shard by shard."""
    index = load_index(data_dir)
    for sh in index["shards"]:
        yield from read_shard(Path(data_dir) / sh["file"])


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Corpus statistics used for normalisation (saved in the index and in exported models).

    Attributes:
        motion_mean, motion_std: float32 [70] of the rr-rescaled raw motion, or with ``relative``
            of the motion minus the utterance's rest pose (no rr).
        audio_mean, audio_std: float32 [L, D] per feature channel.
        relative: model space is relative to the avatar's rest pose (see :func:`compute_stats`).
    """

    motion_mean: np.ndarray
    motion_std: np.ndarray
    audio_mean: np.ndarray
    audio_std: np.ndarray
    relative: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (arrays as nested lists)."""
        d: dict[str, Any] = {k: np.asarray(getattr(self, k), np.float64).tolist()
                             for k in ("motion_mean", "motion_std", "audio_mean", "audio_std")}
        d["relative"] = self.relative
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Stats":
        """The inverse of :meth:`to_json`; a missing or malformed field is a :class:`ShardError`."""
        try:
            arrays = {k: np.asarray(d[k], np.float32)
                      for k in ("motion_mean", "motion_std", "audio_mean", "audio_std")}
        except KeyError as e:
            raise ShardError(f"statistics lack {e}; recompute them with compute_stats") from e
        return cls(**arrays, relative=bool(d.get("relative", False)))

    def model_space(self, motion: np.ndarray, rest: np.ndarray) -> np.ndarray:
        """Raw motion [..., 70] of an avatar with rest pose ``rest`` → normalised model space."""
        if self.relative:
            return space.normalise(np.asarray(motion, np.float32) - np.asarray(rest, np.float32),
                                   self.motion_mean, self.motion_std).astype(np.float32)
        rr = rescale_ratio(float(np.asarray(rest)[space.SCALE]), self.motion_mean)
        return to_model_space(motion, self.motion_mean, self.motion_std, rr)


def compute_stats(data_dir: str | Path, relative: bool = False) -> Stats:
    """Motion and audio mean/std over the whole corpus; written into ``index.json``.

    Absolute (the release's convention): two passes; the mean raw scale fixes rr for every
    utterance (as at inference, where rr comes from the saved mean), then mean/std of the
    rr-rescaled motion.  ``motion_mean[63]`` is kept at the raw mean scale so rr at training time
    equals rr here.

    Relative: statistics of ``motion − rest`` per utterance.  A model trained so predicts motion
    around whatever rest pose it is given, so a real portrait — whose rest expression, translation
    and canonical keypoints lie far outside a synthetic corpus' range — gets in-distribution input.
    """
    d = Path(data_dir)
    index = load_index(d)
    if index["utterances"] == 0:
        raise ShardError(f"{d} holds no utterances")
    s_sum, n = 0.0, 0
    for rec in iter_records(d):
        s_sum += float(np.asarray(rec.motion, np.float64)[:, space.SCALE].sum())
        n += rec.frames
    mean_scale = s_sum / n
    ref = np.zeros(space.DIM, np.float32)
    ref[space.SCALE] = mean_scale
    m1 = np.zeros(space.DIM)
    m2 = np.zeros(space.DIM)
    a1: np.ndarray | None = None
    a2: np.ndarray | None = None
    for rec in iter_records(d):
        m = np.asarray(rec.motion, np.float64).copy()
        if relative:
            m -= np.asarray(rec.rest, np.float64)
        else:
            m[:, 63:67] /= rescale_ratio(float(rec.rest[space.SCALE]), ref)
        m1 += m.sum(0)
        m2 += (m ** 2).sum(0)
        a = np.asarray(rec.audio, np.float64)
        a1 = a.sum(0) if a1 is None else a1 + a.sum(0)
        a2 = (a ** 2).sum(0) if a2 is None else a2 + (a ** 2).sum(0)
    assert a1 is not None and a2 is not None
    mean = m1 / n
    std = np.sqrt(np.maximum(m2 / n - mean ** 2, 0.0))
    if not relative:
        mean[space.SCALE] = mean_scale
    amean = a1 / n
    astd = np.sqrt(np.maximum(a2 / n - amean ** 2, 0.0))
    # A constant audio channel (e.g. a mel bin above the TTS bandwidth) must not blow up.
    astd = np.maximum(astd, 1e-3)
    stats = Stats(mean.astype(np.float32), std.astype(np.float32), amean.astype(np.float32),
                  astd.astype(np.float32), relative)
    index["stats"] = stats.to_json()
    _write_index(d, index)
    return stats


def load_stats(data_dir: str | Path) -> Stats:
    """The statistics saved by :func:`compute_stats`."""
    index = load_index(data_dir)
    if "stats" not in index:
        raise ShardError(f"{data_dir} has no statistics; run compute_stats({str(data_dir)!r})")
    return Stats.from_json(index["stats"])


# --------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------


class ShardDataset(torch.utils.data.Dataset):
    """Random N-frame training segments of a sharded corpus, normalised, held in memory.

    A segment of utterance u starting at frame s holds:

    * ``prev`` [1, 70]: motion frame s − 1, or the avatar's rest pose when s = 0 (the continuity
      condition, broadcast over the window by the model);
    * ``motion`` [N, 70]: frames s .. s+N−1 (the target x0);
    * ``audio`` [N, 1, L, D]: features of the same frames (one frame per window, as the release);
    * ``emotion`` (int64), ``identity`` [63], ``intensity``, ``utterance`` (index), ``start``.

    Motion is in model space (see the module docstring), audio standardised.  Utterances shorter
    than N frames are skipped.  ``__getitem__(i)`` draws a random start in utterance i from the
    dataset's own generator (for a DataLoader); :meth:`random_batch` draws a whole batch from a
    caller-owned generator (reproducible, resumable training).

    Args:
        data_dir: dataset directory with statistics (see :func:`compute_stats`).
        seq_len: N frames per segment.
        utterances: optional subset (global utterance indices) to use, e.g. a held-out split.
        stats: statistics to normalise with (default: the dataset's own).
        seed: seed of the generator used by ``__getitem__``.
    """

    def __init__(self, data_dir: str | Path, seq_len: int = 80, utterances: list[int] | None = None,
                 stats: Stats | None = None, seed: int = 0) -> None:
        if seq_len < 2:
            raise ShardError(f"seq_len must be >= 2, got {seq_len}")
        self.dir = Path(data_dir)
        self.index = load_index(self.dir)
        self.seq_len = seq_len
        self.stats = stats or load_stats(self.dir)
        self.feature = self.index["feature"]
        self._amean = torch.from_numpy(np.asarray(self.stats.audio_mean, np.float32))  # [L, D]
        self._astd = torch.from_numpy(np.asarray(self.stats.audio_std, np.float32))    # [L, D]
        want = set(utterances) if utterances is not None else None
        self.audio: list[torch.Tensor] = []
        self.motion: list[torch.Tensor] = []
        self.prev0: list[torch.Tensor] = []
        self.identity: list[torch.Tensor] = []
        self.emotion: list[int] = []
        self.intensity: list[float] = []
        self.ids: list[int] = []
        self.skipped = 0
        g = 0
        for rec in iter_records(self.dir):
            gid, g = g, g + 1
            if want is not None and gid not in want:
                continue
            if rec.frames < seq_len:
                self.skipped += 1
                continue
            # Audio stays float16 in memory (release-size features are 12 × 768 per frame) and is
            # standardised per segment.
            self.audio.append(torch.from_numpy(np.asarray(rec.audio, np.float16)))  # [T, L, D]
            self.motion.append(torch.from_numpy(self.stats.model_space(rec.motion, rec.rest)))
            self.prev0.append(torch.from_numpy(self.stats.model_space(rec.rest, rec.rest)))
            self.identity.append(torch.from_numpy(np.asarray(rec.identity, np.float32).reshape(-1)))
            self.emotion.append(int(rec.emotion))
            self.intensity.append(float(rec.intensity))
            self.ids.append(gid)
        if not self.motion:
            raise ShardError(f"{self.dir} has no utterance of at least {seq_len} frames "
                             f"({self.skipped} shorter ones skipped); build the corpus with "
                             f"min_frames >= {seq_len}")
        lens = np.array([m.shape[0] for m in self.motion], np.float64)
        # Sampling utterances ∝ number of possible starts makes every start equally likely.
        self._weights = (lens - seq_len + 1) / (lens - seq_len + 1).sum()
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.motion)

    @property
    def audio_shape(self) -> tuple[int, int]:
        """(blocks L, dim D) of the audio features."""
        return tuple(self.audio[0].shape[1:])  # type: ignore[return-value]

    def segment(self, i: int, start: int) -> dict[str, torch.Tensor]:
        """The segment of utterance i (dataset position) starting at frame ``start``."""
        n, m = self.seq_len, self.motion[i]
        if not 0 <= start <= m.shape[0] - n:
            raise IndexError(f"start={start} outside 0..{m.shape[0] - n} for utterance {i}")
        prev = m[start - 1] if start > 0 else self.prev0[i]
        return {
            "prev": prev[None].clone(),                                          # [1, 70]
            "motion": m[start : start + n].clone(),                              # [N, 70]
            "audio": ((self.audio[i][start : start + n].float() - self._amean)
                      / self._astd)[:, None],                                    # [N, 1, L, D]
            "emotion": torch.tensor(self.emotion[i], dtype=torch.int64),
            "identity": self.identity[i].clone(),                                # [63]
            "intensity": torch.tensor(self.intensity[i], dtype=torch.float32),
            "utterance": torch.tensor(self.ids[i], dtype=torch.int64),
            "start": torch.tensor(start, dtype=torch.int64),
        }

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = int(self._rng.integers(0, self.motion[i].shape[0] - self.seq_len + 1))
        return self.segment(i, start)

    def random_batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        """``batch_size`` uniformly random segments drawn with ``rng``; stacked tensors."""
        utt = rng.choice(len(self.motion), size=batch_size, p=self._weights)
        items = []
        for i in utt:
            start = int(rng.integers(0, self.motion[i].shape[0] - self.seq_len + 1))
            items.append(self.segment(int(i), start))
        return collate(items)


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack segment dicts into a batch (keys as :meth:`ShardDataset.segment`, leading B)."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def split_utterances(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) split of utterance indices 0..n-1."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * val_fraction))
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


__all__ = ["UtteranceRecord", "ShardWriter", "ShardDataset", "ShardError", "Stats", "load_index",
           "read_shard", "iter_records", "compute_stats", "load_stats", "collate",
           "split_utterances"]
