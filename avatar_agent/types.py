"""Data objects that cross stage boundaries, and the plug-in protocols.

Data flows one way: source → chunker → motion → renderer → player → sinks.  Audio, chunks and
output frames cross as the frozen dataclasses below; motion crosses from the motion generator to
the renderer as a bare float32 ``[n, 70]`` array laid out as :data:`DIM` and the slices after it
say, and images as uint8 ``[H, W, 3]`` arrays.  Every stage is one of the small protocols.  Audio
inside the pipeline is always 16 kHz mono float32 in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 16_000
"""The pipeline's one audio rate; sources resample to it."""

FRAME_MS = 20
"""Audio frame length produced by every source."""

FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000

MOTION_FPS = 25
"""Frames per second of the motion space (MoDA's rate: one motion row per 640 samples)."""

# The 70-d motion layout: the contract between motion generators and renderers (raw, i.e.
# denormalised, values; motion/space.py documents the keypoint transform that reads them).
DIM = 70
"""Length of one motion row."""
N_KP = 21
"""Keypoints in the expression block."""
EXP = slice(0, 63)
"""Expression: 21 keypoints × (x, y, z), row-major (index = 3·k + axis)."""
SCALE = 63
"""Scale of the driven keypoints."""
T = slice(64, 67)
"""Translation (tx, ty, tz); tz is never used by the transform (as in LivePortrait)."""
POSE = slice(67, 70)
"""Head pose (pitch, yaw, roll) in degrees."""
PITCH, YAW, ROLL = 67, 68, 69

Profile = Literal["embedded", "official"]
EMOTIONS: tuple[str, ...] = (
    "anger", "contempt", "disgust", "fear", "happiness", "neutral", "sadness", "surprise",
)
"""MoDA's 8 emotion classes in label order (label 8 = "none", the CFG null class)."""
EMOTION_NONE = 8


@dataclass(frozen=True, slots=True)
class Phoneme:
    """One phoneme event: from the TTS engine that spoke it, or heard by a speech recogniser.

    Attributes:
        symbol: IPA symbol as espeak-ng reports it (e.g. "oʊ").
        start: start time in seconds from the start of the utterance's audio.
        end: end time in seconds (start of the next phoneme, or end of audio).
        heard: True when a recogniser estimated it from the audio (a guess that may be wrong),
            False when the TTS reported what it said.
    """

    symbol: str
    start: float
    end: float
    heard: bool = False


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """A 20 ms block of 16 kHz mono audio, stamped from the source's sample counter.

    Attributes:
        samples: float32 [320] in [-1, 1].
        index: sample index of samples[0] since the source started (the timeline).
        phonemes: phoneme events overlapping this frame (TTS only), times relative to the
            source's sample counter (seconds = index / 16000).
    """

    samples: np.ndarray
    index: int
    phonemes: tuple[Phoneme, ...] = ()

    @property
    def t(self) -> float:
        """Start time of the frame in seconds on the source timeline."""
        return self.index / SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class SpeechChunk:
    """A hop of audio to animate, with context.

    The chunk's *new* audio is ``audio[left : left + n_new]``; the samples before are left context
    (already animated), the ones after are lookahead (animated by the next chunk).

    Attributes:
        audio: float32 [left + n_new + right] 16 kHz mono.
        start: sample index (source timeline) of the first *new* sample.
        n_new: number of new samples; always a whole number of video frames' worth.
        left: samples of left context before the new audio.
        right: samples of lookahead after the new audio.
        speech: True when the VAD says this hop holds speech (False: silence/idle hop).
        phonemes: phoneme events, times in seconds on the source timeline.
        utterance: id of the utterance (increments on each speech start).
        final: True on the last chunk of an utterance.
    """

    audio: np.ndarray
    start: int
    n_new: int
    left: int
    right: int
    speech: bool
    phonemes: tuple[Phoneme, ...] = ()
    utterance: int = 0
    final: bool = False

    @property
    def new_audio(self) -> np.ndarray:
        """The samples this chunk must animate."""
        return self.audio[self.left : self.left + self.n_new]


@dataclass(frozen=True, slots=True)
class SegmentStarted:
    """The first audio of a speech segment (utterance) plays in this frame."""

    utterance: int


@dataclass(frozen=True, slots=True)
class SegmentEnded:
    """A speech segment finished at the output.

    Attributes:
        utterance: the segment's id (as returned by ``push_audio``/``say``).
        interrupted: False when it played to its end; True when an interrupt cut it.
        played_s: seconds of the segment that were played (its full length if not interrupted;
            0 when it was cut before it started).
    """

    utterance: int
    interrupted: bool
    played_s: float


SegmentMark = SegmentStarted | SegmentEnded


@dataclass(frozen=True, slots=True)
class VideoFrame:
    """One output frame with exactly its audio slice.

    Attributes:
        image: uint8 [H, W, 3] RGB.
        index: frame index on the player timeline (due at t0 + index / fps).
        audio: float32 [SAMPLE_RATE / fps] the audio that plays during this frame.
        speech: True if the frame animates speech (False: idle).
        segments: segment boundaries reached in this frame (a segment ends in the frame that
            plays its last sample, or in the first frame after an interrupt cut it).
    """

    image: np.ndarray
    index: int
    audio: np.ndarray
    speech: bool = False
    segments: tuple[SegmentMark, ...] = ()


@dataclass(frozen=True)
class Avatar:
    """A prepared portrait: everything the motion generator and renderer need about one face.

    Attributes:
        profile: which motion space the keypoints live in.
        image: uint8 [H, W, 3] RGB, the original portrait (for paste-back).
        crop: uint8 [S, S, 3] RGB, the aligned face crop.
        crop_to_image: float64 [3, 3] affine mapping crop pixel coords to image pixel coords.
        kp_canonical: float32 [21, 3] canonical keypoints x_c (identity condition).
        rest_motion: float32 [70] the portrait's own motion (rendering it reproduces the crop).
        extra: profile-specific cached data (mesh, appearance features, ...).
    """

    profile: Profile
    image: np.ndarray
    crop: np.ndarray
    crop_to_image: np.ndarray
    kp_canonical: np.ndarray
    rest_motion: np.ndarray
    extra: dict = field(default_factory=dict, compare=False)


# --------------------------------------------------------------------------------------------
# Plug-in protocols
# --------------------------------------------------------------------------------------------


@runtime_checkable
class AudioSource(Protocol):
    """Produces 20 ms AudioFrames, stamped from its own sample counter."""

    def frames(self) -> AsyncIterator[AudioFrame]:
        """Yield frames until the source ends (file/tts) or forever (mic/pipe)."""
        ...

    async def close(self) -> None:
        """Release the device or file."""
        ...


@runtime_checkable
class Interruptible(Protocol):
    """A source that can drop the speech it has not emitted yet."""

    def interrupt(self) -> tuple[int | None, int]:
        """Drop unplayed speech: (utterance cut or None, timeline sample of the cut)."""
        ...


@runtime_checkable
class SpeechSource(AudioSource, Interruptible, Protocol):
    """An audio source a chatbot fills: text (TTS) and pushed PCM on one timeline.

    Utterance boundaries are known exactly, so they (not the VAD) mark speech segments.
    """

    def say(self, text: str, voice: str | None = None) -> int:
        """Queue text to speak; returns the utterance id."""
        ...

    def push(self, pcm: np.ndarray | bytes, rate: float = SAMPLE_RATE, channels: int = 1,
             dtype: str | None = None, *, final: bool = True) -> int:
        """Queue PCM (``final=False`` opens/extends a stream); returns the utterance id."""
        ...

    def end_stream(self) -> int | None:
        """Close the open pushed stream; returns its id (None if none was open)."""
        ...

    @property
    def current(self) -> int | None:
        """Id of the utterance being emitted now (None while silent)."""
        ...

    def schedule(self, lead_s: float, rewind: Callable[[int, int], int] | None = None) -> None:
        """Emit frames ``lead_s`` ahead of real time; ``rewind(sample, buffered) -> sample``
        moves a new utterance after silence to the earliest sample the consumer can still show
        (``buffered``: samples of it already there, −1 = all)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Queue counters for the status API."""
        ...

    def subscribe(self, listener: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]:
        """``listener(kind, data)`` on speech_started / speech_finished; returns unsubscribe."""
        ...


@runtime_checkable
class Vad(Protocol):
    """Voice activity per audio frame."""

    def is_speech(self, samples: np.ndarray) -> bool:
        """True if this 10/20/30 ms block of 16 kHz float32 audio holds speech."""
        ...


@runtime_checkable
class MotionGenerator(Protocol):
    """Audio → motion, continuing from the last emitted motion frame.

    Called only from the inference thread.
    """

    profile: Profile
    fps: int

    @property
    def min_hop_ms(self) -> int:
        """Shortest chunk hop it is meant for (0 = any); the chunker's hop is raised to it.

        Read-only here: a plain attribute or a property (a wrapper's) both satisfy it.
        """
        ...

    def prepare(self, avatar: Avatar) -> None:
        """Bind to an avatar (identity condition, rest pose)."""
        ...

    @property
    def rest_pose(self) -> np.ndarray:
        """float32 [70]: where silence relaxes to (after :meth:`prepare`)."""
        ...

    def set_emotion(self, emotion: int, intensity: float = 1.0) -> None:
        """Emotion label (8 = none) of idle frames; speech gets it per :meth:`generate` call."""
        ...

    def reset(self) -> None:
        """Forget speech history (after an interruption); the avatar binding stays."""
        ...

    def generate(self, chunk: SpeechChunk, prev: np.ndarray, emotion: int = EMOTION_NONE,
                 intensity: float = 1.0) -> np.ndarray:
        """Motion for the chunk's new audio: float32 [n_new / (16000 / fps), 70], raw space.

        ``prev`` [70] is the last emitted motion frame; the first generated frame must continue
        smoothly from it (first-frame continuity).
        """
        ...

    def idle(self, n: int, prev: np.ndarray, t0: float) -> np.ndarray:
        """n frames of idle motion (blinks, sway, breathing) continuing from ``prev``.

        ``t0`` is the time in seconds of the first frame on the player timeline.
        """
        ...


@runtime_checkable
class Renderer(Protocol):
    """Motion → frames for one prepared avatar.  Called only from the inference thread."""

    profile: Profile
    size: int

    def prepare(self, image: np.ndarray) -> Avatar:
        """Analyse a portrait (uint8 RGB) once: crop, keypoints, cached features."""
        ...

    def render(self, avatar: Avatar, motion: np.ndarray) -> np.ndarray:
        """uint8 [B, size, size, 3] frames for motion [B, 70]."""
        ...


@runtime_checkable
class Sink(Protocol):
    """Consumes the player's frames.  ``send`` must not block the event loop for long."""

    name: str

    async def start(self, width: int, height: int, fps: int) -> None:
        """Open the device/file/server track."""
        ...

    async def send(self, frame: VideoFrame) -> None:
        """Deliver one frame (and its audio slice)."""
        ...

    async def close(self) -> None:
        """Flush and release; a file sink finalises the file here."""
        ...



@dataclass(frozen=True, slots=True)
class Interrupted:
    """What an interrupt did.

    Attributes:
        utterance: the segment that was playing (None: nothing was playing).
        frame: the first frame index that shows the idle face.
        dropped_frames: rendered frames that were discarded.
    """

    utterance: int | None
    frame: int
    dropped_frames: int = 0


@runtime_checkable
class AvatarSession(Protocol):
    """One conversation's face: what LiveKit/pipecat adapters and the HTTP API drive.

    Audio goes in (pushed PCM, or text spoken by espeak-ng); frames come out of :meth:`frames`,
    paced at ``fps`` on the session's clock, each carrying exactly the audio that plays with it
    (16 kHz mono float32) and the segment boundaries reached in it.  Implemented by
    :class:`avatar_agent.session.Session`.
    """

    fps: int
    size: int

    def push_audio(self, pcm: np.ndarray | bytes, rate: int, channels: int = 1) -> int:
        """Append PCM (int16 array/bytes or float32 array) to the open segment; returns its id.

        Raises ``QueueFullError`` (nothing of the block kept) when the session already holds its
        maximum of unplayed audio.
        """
        ...

    def end_segment(self) -> int | None:
        """Close the open pushed segment (its ``SegmentEnded`` comes once it has played)."""
        ...

    def say(self, text: str, voice: str | None = None) -> int:
        """Queue text for espeak-ng; returns the segment id."""
        ...

    def interrupt(self) -> Interrupted:
        """Drop all unplayed speech: the next frame shows the idle face, with silence."""
        ...

    def set_emotion(self, name: str, intensity: float | None = None) -> None:
        """One of :data:`EMOTIONS` or "none"; intensity in [0, 1]."""
        ...

    def frames(self) -> AsyncIterator[VideoFrame]:
        """The session's output frames, one per 1/fps, until the session closes."""
        ...

    async def aclose(self) -> None:
        """End the session (drains nothing: frames() ends)."""
        ...
