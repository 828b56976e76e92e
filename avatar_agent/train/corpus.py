"""Synthetic training corpus: espeak-ng speech + the procedural teacher's motion, no network.

Per utterance (everything drawn from ``numpy.random.default_rng([seed, i])``, so a corpus is a
pure function of its seed and size, whatever the number of worker processes):

1. a sentence from a built-in template generator (or a line of a user text file);
2. espeak-ng speech with a random English voice, voice variant, speaking rate and pitch, padded
   with random leading/trailing silence (at least ``min_frames`` frames in total);
3. the target motion: :class:`~avatar_agent.motion.procedural.ProceduralMotion` (viseme lip-sync
   from the TTS phoneme events + idle layer) on a template avatar with a randomly perturbed face
   shape, head pose, scale and translation, with a random emotion label and intensity;
4. the model's input: the *augmented* audio (gain, additive white/pink/brown noise at a random
   SNR, reverberation through a synthetic exponentially decaying impulse response) → log-mel
   features per video frame (:func:`avatar_agent.audio.features.mel_frames`).

The teacher always sees the clean audio and the phonemes; the student only sees noisy audio.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from avatar_agent.motion import space
from avatar_agent.motion.moda_load import (DEFAULT_FEATURE, FEATURE_FPS, check_feature,
                                           extract_features)
from avatar_agent.train.shards import ShardError, ShardWriter, Stats, UtteranceRecord, compute_stats
from avatar_agent.types import EMOTION_NONE, SAMPLE_RATE, Avatar, Phoneme

FPS = FEATURE_FPS
SPF = SAMPLE_RATE // FPS


VOICES: tuple[str, ...] = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan",
                           "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS: tuple[str | None, ...] = (None, "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3",
                                    "f4", "f5", "klatt", "klatt2", "klatt3", "croak", "whisper")


class MotionExtractorRequired(ShardError):
    """Corpus input that needs a face-motion extractor which this build does not have."""


# --------------------------------------------------------------------------------------------
# Sentence generator
# --------------------------------------------------------------------------------------------

_W: dict[str, tuple[str, ...]] = {
    "name": ("Anna", "Marcus", "Priya", "Tom", "Olivia", "Kenji", "Fatima", "Luis", "Grace", "Omar",
             "Sophie", "Daniel", "Mei", "Jonas", "Amara", "Victor", "Elena", "Sam", "Nora", "Felix"),
    "noun": ("report", "garden", "meeting", "bicycle", "kitchen", "window", "project", "river",
             "computer", "letter", "station", "mountain", "museum", "ticket", "camera", "market",
             "recipe", "question", "weekend", "bridge", "concert", "library", "package", "forest",
             "harbour", "painting", "schedule", "festival", "bottle", "engine", "island", "village"),
    "adj": ("quiet", "bright", "strange", "careful", "enormous", "tiny", "beautiful", "broken",
            "famous", "simple", "difficult", "lovely", "busy", "cold", "warm", "yellow", "purple",
            "ancient", "modern", "friendly", "noisy", "gentle", "heavy", "smooth", "early"),
    "verb_past": ("found", "opened", "painted", "cleaned", "forgot", "visited", "repaired", "moved",
                  "bought", "described", "explained", "finished", "ignored", "carried", "checked",
                  "borrowed", "mentioned", "discovered", "cooked", "watched"),
    "verb": ("open", "paint", "clean", "visit", "repair", "move", "buy", "describe", "explain",
             "finish", "carry", "check", "borrow", "remember", "cook", "watch", "share", "build"),
    "place": ("in the morning", "near the station", "after lunch", "by the old bridge",
              "on the top shelf", "before the storm", "at the end of the street", "last Tuesday",
              "under the table", "behind the school", "every summer", "across the valley",
              "next to the bakery", "in the evening", "during the holidays", "on the way home"),
    "adverb": ("slowly", "quickly", "happily", "suddenly", "quietly", "carefully", "honestly",
               "probably", "certainly", "finally", "always", "rarely", "really", "almost"),
    "feeling": ("happy", "surprised", "tired", "worried", "excited", "curious", "proud", "calm",
                "annoyed", "grateful", "nervous", "confident", "disappointed", "relieved"),
    "number": ("two", "three", "seven", "twelve", "fifteen", "twenty", "forty two", "a hundred",
               "ninety nine", "eleven", "sixty", "a thousand"),
    "interj": ("Well,", "Oh,", "Look,", "Honestly,", "You know,", "Wow,", "Okay,", "So,", "Hmm,",
               "Right,", "Listen,", "Actually,"),
}

_TEMPLATES: tuple[str, ...] = (
    "{name} {verb_past} the {adj} {noun} {place}.",
    "Could you {verb} the {noun} {place}?",
    "I think the {noun} is {adverb} {adj}.",
    "{interj} I was {feeling} when {name} {verb_past} the {noun}.",
    "We need {number} {noun}s before {place}.",
    "Why did {name} {verb} the {adj} {noun}?",
    "The {adj} {noun} was {adverb} {verb_past} {place}.",
    "Please {verb} it {adverb}, and then {verb} the {noun}.",
    "{name} and {name} {verb_past} {number} {adj} {noun}s.",
    "Do you remember the {noun} {place}? It was {adj}.",
    "{interj} that is {adverb} the most {adj} {noun} I have ever seen!",
    "My {noun} costs {number} dollars, which is {adverb} {adj}.",
    "If you {verb} the {noun}, {name} will be {feeling}.",
    "Nobody {verb_past} the {noun}, so it stayed {adj}.",
    "Tomorrow we will {verb} a {adj} {noun} {place}.",
    "Is the {noun} {adj} or {adj}?",
    "{name} said the {noun} was {adj}, but I was not so sure.",
    "Yes. No. Maybe. I really do not know.",
    "Thank you, {name}. That was {adverb} {adj}.",
    "At {number} o'clock the {noun} {place} was {adverb} {adj}.",
    "{interj} let me {verb} the {noun} first.",
    "She {adverb} {verb_past} the {noun}, and he {verb_past} the {noun}.",
)


def sentence(rng: np.random.Generator, max_clauses: int = 3) -> str:
    """A random English sentence (1..max_clauses template clauses joined into one utterance)."""
    def fill(tpl: str) -> str:
        out, i = [], 0
        while i < len(tpl):
            j = tpl.find("{", i)
            if j < 0:
                out.append(tpl[i:])
                break
            k = tpl.index("}", j)
            out.append(tpl[i:j])
            words = _W[tpl[j + 1 : k]]
            out.append(words[int(rng.integers(len(words)))])
            i = k + 1
        return "".join(out)

    n = 1 + int(rng.integers(max_clauses))
    return " ".join(fill(_TEMPLATES[int(rng.integers(len(_TEMPLATES)))]) for _ in range(n))


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def colored_noise(rng: np.random.Generator, n: int, color: str) -> np.ndarray:
    """Unit-RMS noise [n]: "white", "pink" (1/f power) or "brown" (1/f² power)."""
    w = rng.standard_normal(n)
    if color != "white":
        spec = np.fft.rfft(w)
        f = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
        f[0] = f[1] if n > 1 else 1.0
        spec /= np.sqrt(f) if color == "pink" else f
        w = np.fft.irfft(spec, n)
    rms = np.sqrt(np.mean(w ** 2)) + 1e-12
    return (w / rms).astype(np.float32)


def synthetic_rir(rng: np.random.Generator, rt60: float) -> np.ndarray:
    """A room impulse response: direct path + exponentially decaying noise tail (60 dB in rt60 s)."""
    n = max(int(rt60 * SAMPLE_RATE), 16)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60)                # ln(1000) = 6.9078
    pre = int(rng.integers(int(0.002 * SAMPLE_RATE), int(0.01 * SAMPLE_RATE)))
    tail[:pre] = 0.0                                                          # gap before reflections
    ir = 0.3 * tail / (np.sqrt(np.sum(tail ** 2)) + 1e-12)
    ir[0] = 1.0
    return ir.astype(np.float32)


@dataclass(frozen=True)
class AugmentParams:
    """Augmentation probabilities and ranges (all applied to the student's audio only).

    Attributes:
        p_noise: probability of additive noise; snr_db: its SNR range.
        p_reverb: probability of reverberation; rt60: its decay-time range in seconds.
        gain_db: range of an overall gain change (the result is clipped to [-1, 1]).
    """

    p_noise: float = 0.5
    snr_db: tuple[float, float] = (5.0, 40.0)
    p_reverb: float = 0.3
    rt60: tuple[float, float] = (0.1, 0.7)
    gain_db: tuple[float, float] = (-18.0, 6.0)


def augment(audio: np.ndarray, rng: np.random.Generator, p: AugmentParams = AugmentParams()
            ) -> tuple[np.ndarray, dict[str, Any]]:
    """Noisy/reverberant copy of 16 kHz audio (same length) and a record of what was done."""
    from scipy.signal import fftconvolve

    x = np.asarray(audio, np.float64)
    info: dict[str, Any] = {}
    if rng.random() < p.p_reverb:
        rt60 = float(rng.uniform(*p.rt60))
        x = fftconvolve(x, synthetic_rir(rng, rt60))[: x.shape[0]]
        info["rt60"] = round(rt60, 3)
    gain = float(rng.uniform(*p.gain_db))
    x = x * 10 ** (gain / 20)
    info["gain_db"] = round(gain, 2)
    if rng.random() < p.p_noise:
        snr = float(rng.uniform(*p.snr_db))
        color = ("white", "pink", "brown")[int(rng.integers(3))]
        speech = x[np.abs(x) > 1e-4]
        level = np.sqrt(np.mean(speech ** 2)) if speech.size else 1e-3
        x = x + colored_noise(rng, x.shape[0], color) * level * 10 ** (-snr / 20)
        info.update(snr_db=round(snr, 2), noise=color)
    return np.clip(x, -1.0, 1.0).astype(np.float32), info


# --------------------------------------------------------------------------------------------
# One utterance
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusParams:
    """What a corpus draws from.

    Attributes:
        voices / variants: espeak-ng voices and variants (None = default); unavailable ones are
            skipped.
        rate_wpm: speaking-rate range; pitch: base-pitch range (espeak 0..100).
        lead_s / tail_s: silence ranges before and after the speech.
        min_frames: pad the tail with silence up to this many video frames.
        p_no_emotion: probability of the null emotion (label 8); otherwise uniform over 0..7.
        intensity: emotion-intensity range.
        feature: audio feature config (:data:`DEFAULT_FEATURE`).
        augment: augmentation settings; None = clean student audio.
    """

    voices: tuple[str, ...] = VOICES
    variants: tuple[str | None, ...] = VARIANTS
    rate_wpm: tuple[int, int] = (120, 260)
    pitch: tuple[int, int] = (25, 80)
    lead_s: tuple[float, float] = (0.05, 0.8)
    tail_s: tuple[float, float] = (0.2, 1.0)
    min_frames: int = 80
    p_no_emotion: float = 0.3
    intensity: tuple[float, float] = (0.4, 1.0)
    feature: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_FEATURE))
    augment: AugmentParams | None = AugmentParams()


@lru_cache(maxsize=None)
def _voice_ok(voice: str, variant: str | None) -> bool:
    from avatar_agent.audio.tts import VoiceNotFoundError, synthesize

    try:
        synthesize("a", voice, variant=variant)
        return True
    except VoiceNotFoundError:
        return False


def available_voices(p: CorpusParams) -> tuple[list[str], list[str | None]]:
    """The configured voices and variants this espeak-ng installation has."""
    voices = [v for v in p.voices if _voice_ok(v, None)]
    variants = [v for v in p.variants if v is None or _voice_ok("en-us", v)]
    if not voices:
        raise ShardError(f"none of the voices {p.voices} exist in espeak-ng; "
                         "see `espeak-ng --voices=en`")
    return voices, variants


def random_avatar(rng: np.random.Generator) -> Avatar:
    """A template avatar with a perturbed face shape, rest head pose, scale and translation."""
    from avatar_agent.motion.template import neutral_template, template_avatar, template_rest_motion

    kp = neutral_template().astype(np.float64)
    kp *= rng.uniform([0.88, 0.88, 0.8], [1.12, 1.12, 1.2])                   # face proportions
    kp += rng.normal(0.0, 0.006, kp.shape)                                    # individual shape
    rest = template_rest_motion(pitch=float(rng.normal(0, 5)), yaw=float(rng.normal(0, 8)),
                                roll=float(rng.normal(0, 3)))
    rest[space.SCALE] = float(rng.uniform(0.85, 1.15))
    rest[64:66] = rng.normal(0.0, 0.03, 2)
    av = template_avatar(size=16, rest_motion=rest)
    return dataclasses.replace(av, kp_canonical=kp.astype(np.float32))


@dataclass
class Sample:
    """Everything made for one utterance (the record plus what the record does not keep).

    Attributes:
        record: what goes into the shards.
        clean: float32 16 kHz speech the teacher saw (with the silence padding).
        student: the augmented audio the features were computed from.
        phonemes: TTS phoneme events, times relative to ``clean``.
        avatar: the randomised template avatar the teacher animated.
    """

    record: UtteranceRecord
    clean: np.ndarray
    student: np.ndarray
    phonemes: list[Phoneme]
    avatar: Avatar


def make_sample(seed: int, index: int, p: CorpusParams = CorpusParams(),
                text: str | None = None) -> Sample:
    """Utterance ``index`` of the corpus with ``seed``, with its audio, phonemes and avatar.

    Everything random comes from ``default_rng([seed, index])``; espeak-ng's own state makes the
    audio depend slightly on what the process synthesised before (see :func:`build_corpus`).
    """
    from avatar_agent.audio.tts import synthesize
    from avatar_agent.motion.procedural import ProceduralMotion

    rng = np.random.default_rng([seed, index])
    voices, variants = available_voices(p)
    text = text if text is not None else sentence(rng)
    voice = voices[int(rng.integers(len(voices)))]
    variant = variants[int(rng.integers(len(variants)))]
    rate = int(rng.integers(p.rate_wpm[0], p.rate_wpm[1] + 1))
    pitch = int(rng.integers(p.pitch[0], p.pitch[1] + 1))
    utt = synthesize(text, voice, rate, pitch, variant)

    lead = int(rng.uniform(*p.lead_s) * SAMPLE_RATE)
    tail = int(rng.uniform(*p.tail_s) * SAMPLE_RATE)
    total = lead + utt.audio.shape[0] + tail
    total = max(-(-total // SPF), p.min_frames) * SPF                         # whole frames
    clean = np.zeros(total, np.float32)
    clean[lead : lead + utt.audio.shape[0]] = utt.audio
    off = lead / SAMPLE_RATE
    phon = [Phoneme(ph.symbol, ph.start + off, ph.end + off) for ph in utt.phonemes]

    if rng.random() < p.p_no_emotion:
        emotion, intensity = EMOTION_NONE, 1.0
    else:
        emotion, intensity = int(rng.integers(8)), float(rng.uniform(*p.intensity))
    avatar = random_avatar(rng)
    teacher_seed = int(rng.integers(2 ** 31 - 1))
    teacher = ProceduralMotion(seed=teacher_seed)
    teacher.prepare(avatar)
    motion = teacher.generate_utterance(clean, phon, seed=teacher_seed, emotion=emotion,
                                        intensity=intensity)

    student, aug = augment(clean, rng, p.augment) if p.augment is not None else (clean, {})
    feats = extract_features(student, p.feature)
    if feats.shape[0] != motion.shape[0]:
        raise ShardError(f"features ({feats.shape[0]}) and motion ({motion.shape[0]}) frames differ")
    meta = {"index": index, "seed": seed, "text": text, "voice": voice, "variant": variant,
            "rate_wpm": rate, "pitch": pitch, "lead_s": round(off, 4),
            "speech_s": round(utt.duration, 4), "teacher_seed": teacher_seed, **aug}
    rec = UtteranceRecord(audio=feats.astype(np.float16), motion=motion,
                          identity=np.asarray(avatar.kp_canonical, np.float32).reshape(-1),
                          rest=teacher.rest_pose, emotion=emotion, intensity=intensity, meta=meta)
    return Sample(rec, clean, student, phon, avatar)


def make_utterance(seed: int, index: int, p: CorpusParams = CorpusParams(),
                   text: str | None = None) -> UtteranceRecord:
    """The shard record of utterance ``index`` of the corpus with ``seed`` (see :func:`make_sample`)."""
    return make_sample(seed, index, p, text).record


def _block_job(args: tuple[int, list[int], CorpusParams, list[str | None]]) -> list[UtteranceRecord]:
    seed, indices, params, texts = args
    return [make_utterance(seed, i, params, t) for i, t in zip(indices, texts, strict=True)]


def _write(out_dir: str | Path, seed: int, texts: Sequence[str | None], params: CorpusParams,
           workers: int, shard_size: int, block: int, progress: bool) -> Stats:
    """Synthesise utterances 0..len(texts)-1 in blocks, each block in a fresh worker process.

    libespeak-ng keeps state from one synthesis to the next (its output depends on everything
    spoken before in the process), so each block of ``block`` utterances starts from a freshly
    initialised engine: the corpus then depends only on (seed, params, block), not on ``workers``
    or on what the calling process did before.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    writer = ShardWriter(out_dir, params.feature, shard_size)
    writer.index["corpus"] = {"seed": seed, "block": block, "utterances": len(texts)}
    jobs = [(seed, list(range(a, min(a + block, len(texts)))), params,
             list(texts[a : a + block])) for a in range(0, len(texts), block)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(texts), desc="corpus", unit="utt")
    # spawn + one task per process: a fresh interpreter (and espeak-ng engine) per block.
    ctx = mp.get_context("spawn")
    with ctx.Pool(max(1, min(workers, len(jobs))), maxtasksperchild=1) as pool:
        for recs in pool.imap(_block_job, jobs):          # imap keeps order → deterministic
            for rec in recs:
                writer.add(rec)
            if bar is not None:
                bar.update(len(recs))
    writer.close()
    if bar is not None:
        bar.close()
    return compute_stats(out_dir)


def build_corpus(out_dir: str | Path, n_utterances: int, seed: int = 0, workers: int = 1,
                 params: CorpusParams = CorpusParams(), shard_size: int = 256, block: int = 32,
                 progress: bool = False) -> Stats:
    """Write a synthetic corpus of ``n_utterances`` to ``out_dir`` and compute its statistics.

    Deterministic for (seed, n_utterances, params, block), independent of ``workers``.  Runs in
    worker processes (spawn): a script calling this needs the ``if __name__ == "__main__":`` guard.
    """
    if n_utterances < 1:
        raise ValueError(f"n_utterances must be >= 1, got {n_utterances}")
    check_feature(params.feature)
    return _write(out_dir, seed, [None] * n_utterances, params, workers, shard_size, block, progress)


def read_sentences(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (lines starting with ``#`` are comments)."""
    p = Path(path)
    if not p.is_file():
        raise ShardError(f"text file {p} not found")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    out = [ln for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise ShardError(f"{p} holds no sentences (one per line)")
    return out


def build_corpus_from_texts(out_dir: str | Path, texts: Iterable[str], seed: int = 0,
                            workers: int = 1, repeats: int = 1,
                            params: CorpusParams = CorpusParams(), shard_size: int = 256,
                            block: int = 32, progress: bool = False) -> Stats:
    """Like :func:`build_corpus` with given sentences; each is spoken ``repeats`` times with
    different random voices/augmentation."""
    texts = list(texts)
    if not texts or repeats < 1:
        raise ValueError("need at least one sentence and repeats >= 1")
    check_feature(params.feature)
    spoken = [texts[i % len(texts)] for i in range(len(texts) * repeats)]
    return _write(out_dir, seed, spoken, params, workers, shard_size, block, progress)


VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")


def prep_video(path: str | Path, out_dir: str | Path) -> Stats:
    """Corpus from recorded talking-head video: not available yet.

    Raises:
        MotionExtractorRequired: always; target motion from real video needs a face-motion
            extractor (the official profile's LivePortrait motion extractor, or FaceMesh fitting
            for the embedded profile), which is not wired into data preparation.
    """
    raise MotionExtractorRequired(
        f"building a corpus from video ({path}) needs a motion extractor (official profile: "
        "LivePortrait motion extractor) to turn frames into target motion; it is not implemented "
        "yet. Use synthetic speech (--n) or a text file of sentences (--texts) instead.")


__all__ = ["build_corpus", "build_corpus_from_texts", "make_utterance", "make_sample", "Sample", "sentence", "augment",
           "CorpusParams", "AugmentParams", "prep_video",
           "read_sentences", "MotionExtractorRequired", "random_avatar"]
