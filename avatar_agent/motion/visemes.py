"""Visemes: IPA phonemes → mouth articulation, with Cohen–Massaro coarticulation, and the
articulation basis that turns articulation into embedded-space keypoint offsets.

Articulation is 5 numbers per frame (:data:`PARAMS`):

* ``open``   jaw/lip opening, 0 closed … 1 wide "a" (inner-lip gap 0.30 eye-distances);
* ``spread`` lip corners pulled out ("i", "s");
* ``round``  corners pulled in and lips protruded ("u", "w", "o");
* ``press``  lips pressed together (p, b, m); also forces ``open`` to 0;
* ``tuck``   lower lip drawn up under the upper teeth (f, v).

Coarticulation follows Cohen & Massaro (1993): every phoneme has, per parameter, a target and a
*dominance* that is strongest over the phoneme and decays exponentially before (anticipation) and
after (carry-over) it; the articulation at time t is the dominance-weighted mean of all targets.
Strong-dominance segments (bilabial closure, rounded vowels) impose themselves on neighbours;
weak ones (t, d, k, h) take their shape from the surrounding vowels.

All offsets are multiples of the face's eye distance measured on ``kp_canonical``, so they fit any
avatar size.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np

from avatar_agent.motion.space import KP
from avatar_agent.types import N_KP, Phoneme

PARAMS: tuple[str, ...] = ("open", "spread", "round", "press", "tuck")
OPEN, SPREAD, ROUND, PRESS, TUCK = range(5)
N_PARAMS = len(PARAMS)

GAP_PER_OPEN = 0.30
"""Inner-lip gap at open = 1, in eye distances (≈ 1.9 cm on an adult face)."""


@dataclass(frozen=True, slots=True)
class Viseme:
    """A mouth shape class.

    Attributes:
        name: short label.
        target: [5] articulation target (see :data:`PARAMS`).
        dominance: [5] peak dominance per parameter (0..1): how strongly the segment imposes
            that parameter on its neighbours.
        rate: decay of dominance in 1/s away from the segment (higher = more local).
    """

    name: str
    target: tuple[float, float, float, float, float]
    dominance: tuple[float, float, float, float, float]
    rate: float


VISEMES: dict[str, Viseme] = {v.name: v for v in (
    Viseme("sil", (0.0, 0.0, 0.0, 0.0, 0.0), (0.9, 0.4, 0.4, 0.2, 0.4), 25.0),
    Viseme("PP", (0.0, 0.0, 0.0, 1.0, 0.0), (1.0, 0.1, 0.1, 1.0, 0.5), 45.0),
    Viseme("FF", (0.08, 0.1, 0.0, 0.0, 1.0), (0.9, 0.2, 0.2, 0.3, 1.0), 42.0),
    Viseme("TH", (0.22, 0.15, 0.0, 0.0, 0.0), (0.5, 0.2, 0.1, 0.2, 0.3), 32.0),
    Viseme("DD", (0.22, 0.1, 0.0, 0.0, 0.0), (0.35, 0.08, 0.05, 0.2, 0.3), 32.0),
    Viseme("kk", (0.30, 0.0, 0.0, 0.0, 0.0), (0.25, 0.05, 0.05, 0.2, 0.3), 32.0),
    Viseme("CH", (0.20, 0.0, 0.55, 0.0, 0.0), (0.5, 0.4, 0.6, 0.2, 0.3), 32.0),
    Viseme("SS", (0.10, 0.45, 0.0, 0.0, 0.0), (0.6, 0.4, 0.2, 0.2, 0.3), 36.0),
    Viseme("RR", (0.20, 0.0, 0.45, 0.0, 0.0), (0.35, 0.3, 0.45, 0.2, 0.3), 28.0),
    Viseme("HH", (0.35, 0.0, 0.0, 0.0, 0.0), (0.05, 0.02, 0.02, 0.05, 0.05), 25.0),
    Viseme("aa", (1.00, 0.15, 0.0, 0.0, 0.0), (0.7, 0.35, 0.35, 0.2, 0.3), 22.0),
    Viseme("E", (0.60, 0.40, 0.0, 0.0, 0.0), (0.6, 0.45, 0.35, 0.2, 0.3), 22.0),
    Viseme("I", (0.28, 0.75, 0.0, 0.0, 0.0), (0.5, 0.6, 0.4, 0.2, 0.3), 22.0),
    Viseme("@", (0.45, 0.05, 0.0, 0.0, 0.0), (0.45, 0.15, 0.15, 0.2, 0.3), 25.0),
    Viseme("O", (0.62, 0.0, 0.65, 0.0, 0.0), (0.65, 0.5, 0.6, 0.2, 0.3), 22.0),
    Viseme("U", (0.22, 0.0, 1.00, 0.0, 0.0), (0.55, 0.6, 0.75, 0.2, 0.3), 22.0),
    Viseme("WW", (0.12, 0.0, 0.95, 0.0, 0.0), (0.5, 0.6, 0.8, 0.2, 0.3), 28.0),
)}
"""15 mouth classes (names loosely follow the common 15-viseme sets)."""

_IPA: dict[str, str] = {}
for _vis, _syms in {
    "sil": "",
    "PP": "p b m ɱ",
    "FF": "f v",
    "TH": "θ ð",
    "DD": "t d n l ɾ ɫ ʔ ɬ n̩ l̩",
    "kk": "k g ɡ ŋ x ɣ q ɢ χ",
    "CH": "ʃ ʒ tʃ dʒ ʧ ʤ ɕ ʑ",
    "SS": "s z ts dz",
    "RR": "ɹ r ɻ ʁ ʀ ɚ ɝ",
    "HH": "h ɦ ç",
    "aa": "a ɑ ɐ æ ʌ ɒ ä",
    "E": "ɛ e ɜ œ ø",
    "I": "i ɪ j ɨ ᵻ y ʏ ɯ",
    "@": "ə ɘ ɵ",
    "O": "o ɔ ɤ",
    "U": "u ʊ ʉ",
    "WW": "w ʍ ɥ",
}.items():
    for _s in _syms.split():
        _IPA[_s] = _vis

_STRIP = {"ˈ", "ˌ", "ː", "ˑ", "̃", "̩", "̯", "-", "_", "ʰ", "ʲ", "ʷ", "'", ",", "%", "=", "#"}
_MAX_SYM = max(len(s) for s in _IPA)


def ipa_to_visemes(symbol: str) -> list[str]:
    """Viseme names for one espeak-ng phoneme symbol (diphthongs give two: "aɪ" → aa, I).

    Stress and length marks are ignored; unknown characters map to the neutral "@" class, the
    empty symbol (an espeak pause) to "sil".
    """
    s = "".join(ch for ch in unicodedata.normalize("NFC", symbol) if ch not in _STRIP)
    if not s:
        return ["sil"]
    out: list[str] = []
    i = 0
    while i < len(s):
        for n in range(min(_MAX_SYM, len(s) - i), 0, -1):  # longest match first: "tʃ" before "t"
            if s[i : i + n] in _IPA:
                out.append(_IPA[s[i : i + n]])
                i += n
                break
        else:
            if not unicodedata.combining(s[i]):
                out.append("@")
            i += 1
    return out or ["@"]


@dataclass(frozen=True, slots=True)
class Segment:
    """One viseme on the timeline (seconds)."""

    viseme: Viseme
    start: float
    end: float


def phoneme_segments(phonemes: tuple[Phoneme, ...] | list[Phoneme]) -> list[Segment]:
    """Split phonemes into viseme segments; multi-viseme symbols share their interval (60/40)."""
    segs: list[Segment] = []
    for p in phonemes:
        names = ipa_to_visemes(p.symbol)
        if len(names) == 1:
            segs.append(Segment(VISEMES[names[0]], p.start, p.end))
            continue
        # First element of a diphthong holds longer than the glide.
        w = np.array([1.5] + [1.0] * (len(names) - 1))
        edges = p.start + (p.end - p.start) * np.concatenate([[0.0], np.cumsum(w) / w.sum()])
        for k, name in enumerate(names):
            segs.append(Segment(VISEMES[name], float(edges[k]), float(edges[k + 1])))
    return segs


SIL_PAD = 0.3
"""Seconds of implicit silence segment before the first phoneme."""

REST_DOMINANCE = 0.004
"""A constant weak pull to the closed rest shape, so far from any phoneme the mouth closes."""


def articulation_track(phonemes: tuple[Phoneme, ...] | list[Phoneme], times: np.ndarray,
                       anticipation: float = 1.0) -> np.ndarray:
    """Coarticulated articulation at ``times`` (seconds): float32 [T, 5].

    D_i(t) = α_i · exp(−θ_i · d_i(t)), with d_i the distance from t to the core of segment i (its
    middle 30 %, so long vowels hold their target) and θ_i the segment's rate (anticipation
    decays ``anticipation`` times as fast as carry-over).  Output = Σ D_i T_i / Σ D_i, with a weak
    rest segment everywhere.
    """
    t = np.asarray(times, dtype=np.float64)
    segs = phoneme_segments(sorted(phonemes, key=lambda p: p.start))
    # Silence before and between phonemes is a closed-mouth segment too: without it the first
    # phoneme would bleed its shape into the pause before it.  No pad is added after the last
    # one: in streaming the last *known* phoneme is rarely the last one spoken (espeak-ng ends
    # every utterance with its own pause event, which maps to "sil").
    sil = VISEMES["sil"]
    gaps = [Segment(sil, segs[0].start - SIL_PAD, segs[0].start)] if segs else []
    for a, b in zip(segs, segs[1:], strict=False):
        if b.start - a.end > 0.02:
            gaps.append(Segment(sil, a.end, b.start))
    segs = segs + gaps
    num = np.zeros((t.shape[0], N_PARAMS))
    den = np.full((t.shape[0], N_PARAMS), REST_DOMINANCE)
    if segs:
        start = np.array([s.start for s in segs])                                   # [S]
        end = np.array([s.end for s in segs])
        rate = np.array([s.viseme.rate for s in segs])
        dom = np.array([s.viseme.dominance for s in segs])                          # [S, 5]
        tgt = np.array([s.viseme.target for s in segs])                             # [S, 5]
        c, half = 0.5 * (start + end), 0.15 * (end - start)
        d = t[:, None] - c[None]                                                    # [T, S]
        dist = np.maximum(np.abs(d) - half[None], 0.0)
        theta = np.where(d < 0, rate[None] * anticipation, rate[None])
        w = np.exp(-theta * dist)[:, :, None] * dom[None]                           # [T, S, 5]
        num += (w * tgt[None]).sum(1)
        den += w.sum(1)
    return (num / den).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Geometry: articulation → keypoint offsets
# ---------------------------------------------------------------------------------------------


def face_unit(kp_canonical: np.ndarray) -> float:
    """The face's eye distance (between lid-midpoint eye centres) in canonical units.

    Falls back to mouth width / 0.85 when the eyes are degenerate (all offsets are multiples of
    this, so a face twice as large moves twice as far).
    """
    kp = np.asarray(kp_canonical, dtype=np.float64)
    if kp.shape != (N_KP, 3) or not np.all(np.isfinite(kp)):
        raise ValueError(f"kp_canonical must be finite [{N_KP}, 3], got {kp.shape}")
    eye_l = 0.5 * (kp[KP["upper_lid_l"]] + kp[KP["lower_lid_l"]])
    eye_r = 0.5 * (kp[KP["upper_lid_r"]] + kp[KP["lower_lid_r"]])
    d = float(np.linalg.norm((eye_r - eye_l)[:2]))
    if d > 1e-4:
        return d
    w = float(np.linalg.norm((kp[KP["lip_corner_r"]] - kp[KP["lip_corner_l"]])[:2]))
    if w > 1e-4:
        return w / 0.85
    raise ValueError("kp_canonical has neither distinct eyes nor lip corners; cannot size the face")


def face_offsets(spec: dict[str, tuple[float, float, float]], kp: np.ndarray,
                 unit: float) -> np.ndarray:
    """[21, 3] offsets from {keypoint: (dx, dy, dz)} in face units (multiples of ``unit``).

    dx > 0 means "away from the face's midline", so one spec serves both sides; dy > 0 is down.
    """
    out = np.zeros((N_KP, 3))
    mid_x = 0.5 * (kp[KP["lip_corner_l"], 0] + kp[KP["lip_corner_r"], 0])
    for name, (dx, dy, dz) in spec.items():
        side = np.sign(kp[KP[name], 0] - mid_x) if abs(kp[KP[name], 0] - mid_x) > 1e-6 else 0.0
        out[KP[name]] = (side * dx * unit, dy * unit, dz * unit)
    return out


def articulation_basis(kp_canonical: np.ndarray) -> np.ndarray:
    """Keypoint offsets per unit of each articulation parameter: float32 [5, 63] (exp layout).

    The geometry: opening drops the lower lip and chin (jaw rotation) while the upper lip lifts
    slightly and the corners follow halfway down and in; spreading pulls corners out; rounding
    pulls corners and lip sides in and pushes the lips forward (−z); pressing rolls the outer lips
    together; tucking lifts the lower lip back under the upper teeth.
    """
    kp = np.asarray(kp_canonical, dtype=np.float64)
    u = face_unit(kp)
    g = GAP_PER_OPEN
    specs: list[dict[str, tuple[float, float, float]]] = [
        {  # open: inner gap = g·open exactly (upper −0.12 g, lower +0.88 g)
            "upper_lip_inner": (0.0, -0.12 * g, 0.0),
            "upper_lip_outer": (0.0, -0.08 * g, 0.0),
            "upper_lip_outer_l": (0.0, -0.08 * g, 0.0),
            "upper_lip_outer_r": (0.0, -0.08 * g, 0.0),
            "lower_lip_inner": (0.0, 0.88 * g, 0.10 * g),
            "lower_lip_outer": (0.0, 0.92 * g, 0.12 * g),
            "lower_lip_outer_l": (-0.05 * g, 0.80 * g, 0.10 * g),
            "lower_lip_outer_r": (-0.05 * g, 0.80 * g, 0.10 * g),
            "lip_corner_l": (-0.08 * g, 0.38 * g, 0.05 * g),
            "lip_corner_r": (-0.08 * g, 0.38 * g, 0.05 * g),
            "chin": (0.0, 0.95 * g, 0.15 * g),
            "jaw_l": (-0.06 * g, 0.50 * g, 0.05 * g),
            "jaw_r": (-0.06 * g, 0.50 * g, 0.05 * g),
        },
        {  # spread
            "lip_corner_l": (0.085, -0.012, 0.02),
            "lip_corner_r": (0.085, -0.012, 0.02),
            "upper_lip_outer_l": (0.035, -0.004, 0.01),
            "upper_lip_outer_r": (0.035, -0.004, 0.01),
            "lower_lip_outer_l": (0.035, 0.0, 0.01),
            "lower_lip_outer_r": (0.035, 0.0, 0.01),
            "upper_lip_outer": (0.0, 0.004, 0.01),
            "lower_lip_outer": (0.0, -0.004, 0.01),
        },
        {  # round
            "lip_corner_l": (-0.13, 0.0, -0.05),
            "lip_corner_r": (-0.13, 0.0, -0.05),
            "upper_lip_outer_l": (-0.06, -0.012, -0.07),
            "upper_lip_outer_r": (-0.06, -0.012, -0.07),
            "lower_lip_outer_l": (-0.06, 0.012, -0.07),
            "lower_lip_outer_r": (-0.06, 0.012, -0.07),
            "upper_lip_outer": (0.0, -0.018, -0.08),
            "lower_lip_outer": (0.0, 0.018, -0.08),
            "upper_lip_inner": (0.0, 0.0, -0.07),
            "lower_lip_inner": (0.0, 0.0, -0.07),
        },
        {  # press
            "upper_lip_outer": (0.0, 0.022, 0.01),
            "lower_lip_outer": (0.0, -0.022, 0.01),
            "upper_lip_outer_l": (0.0, 0.015, 0.0),
            "upper_lip_outer_r": (0.0, 0.015, 0.0),
            "lower_lip_outer_l": (0.0, -0.015, 0.0),
            "lower_lip_outer_r": (0.0, -0.015, 0.0),
        },
        {  # tuck (labiodental): lower lip up and back; the inner gap is left to `open`
            "lower_lip_outer": (0.0, -0.035, 0.05),
            "lower_lip_outer_l": (0.0, -0.025, 0.04),
            "lower_lip_outer_r": (0.0, -0.025, 0.04),
            "lower_lip_inner": (0.0, 0.0, 0.04),
            "upper_lip_outer": (0.0, -0.01, -0.01),
        },
    ]
    # Opening offsets above are in gap units already (·g); all get scaled by the face unit.
    basis = np.stack([face_offsets(s, kp, u).reshape(-1) for s in specs])         # [5, 63]
    return basis.astype(np.float32)


def articulation_to_exp(art: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Exp offsets [T, 63] for articulation [T, 5]; ``press`` and ``tuck`` override ``open``.

    A closed-lip segment (press) must close the mouth even when blended with an open vowel, so the
    effective opening is open·(1 − press).
    """
    a = np.asarray(art, dtype=np.float32).copy()                                   # [T, 5]
    a[:, OPEN] = np.clip(a[:, OPEN], 0.0, 1.3) * (1.0 - np.clip(a[:, PRESS], 0.0, 1.0))
    a[:, 1:] = np.clip(a[:, 1:], 0.0, 1.0)
    return a @ basis                                                               # [T, 63]
