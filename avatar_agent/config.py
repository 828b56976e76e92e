"""Configuration: frozen dataclasses, one per section, parsed once from TOML.

Sources, lowest precedence first: the defaults below → a config file (``--config``, else
``$AVATAR_AGENT_CONFIG``, else ``$XDG_CONFIG_HOME/avatar-agent/config.toml`` when it exists) →
``--set section.key=value`` overrides.  Unknown sections/keys and wrong types are errors that name
the file, the line, the key and the expected type.  ``config.toml`` at the repository root
documents every key and equals these defaults (a test loads it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .chunker import ChunkerParams

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
DEFAULT_AVATAR = REPO_ROOT / "avatars" / "default.png"

SAMPLE_RATE_HZ = 16_000
"""The pipeline's audio rate (types.SAMPLE_RATE; repeated here so config imports nothing)."""
WEBRTC_AUDIO_HZ = 48_000
"""The rate the WebRTC and file sinks upsample each frame's audio to."""
MIN_RENDER_SIZE = 64
MAX_RENDER_SIZE = 2048
"""render.size bounds: beyond 2048 px a frame alone is 12 MB and the renderer needs GBs."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message says where and how to fix it."""


SinkName = Literal["auto", "virtualcam", "webrtc", "file", "vmic"]
"""The sinks ``sinks.enabled`` may name (the one list; wiring.make_sinks builds each)."""


@dataclass(frozen=True)
class AvatarConfig:
    """The portrait and how it is animated."""

    image: str = ""
    """Portrait image (any format OpenCV reads). Empty = the bundled default (avatars/default.png)."""
    profile: Literal["embedded", "official"] = "embedded"
    """Model profile: "embedded" (no download, CPU real time) or "official" (MoDA + LivePortrait weights)."""
    emotion: str = "neutral"
    """One of anger, contempt, disgust, fear, happiness, neutral, sadness, surprise, none."""
    intensity: float = 1.0
    """Emotion intensity, 0..1."""
    directories: list[str] = field(default_factory=list)
    """Directories the control API may load avatars from (besides the configured image)."""


@dataclass(frozen=True)
class AudioConfig:
    """Where speech comes from."""

    source: Literal["auto", "mic", "file", "tts", "pipe", "none"] = "auto"
    """auto = microphone if one exists, else typed text on stdin spoken by TTS."""
    device: str = ""
    """Microphone: a device name substring or index; empty = the system default input."""
    wait_for_device: bool = False
    """Microphone: if the device is missing at start, wait for it (with backoff) instead of failing."""
    file: str = ""
    """Audio file for source = "file" (anything PyAV decodes)."""
    realtime: bool = True
    """File source: pace in real time (true) or read as fast as possible."""
    voice: str = "en-us"
    """espeak-ng voice for the TTS source."""
    tts_rate: int = 175
    """TTS speaking rate in words per minute."""
    max_queued_s: float = 120.0
    """TTS/push source: most seconds of speech waiting to be played (more is refused)."""
    pipe_path: str = "-"
    """Pipe source: "-" = stdin, else the path of a Unix socket to listen on."""
    pipe_rate: int = 16000
    """Pipe source: sample rate of the raw s16le PCM."""
    pipe_channels: int = 1
    """Pipe source: channel count of the raw PCM."""
    recognizer: Literal["auto", "on", "off"] = "auto"
    """Live phone recognition (pocketsphinx) of speech that comes without phonemes (microphone, pushed audio), so its lips get visemes as TTS speech does. auto = on for one agent (start, bench) on the embedded profile, off for the session server's sessions (each would cost ≈ 0.04 of a core while talking and 30 MB, a third more CPU than a session's own) and the official profile; on = also there. Files (render) are always recognised whole, before they play."""


@dataclass(frozen=True)
class VadConfig:
    """Voice-activity gate (webrtcvad) and its hysteresis."""

    aggressiveness: int = 2
    """webrtcvad mode 0 (least) .. 3 (most aggressive in rejecting non-speech)."""
    frame_ms: int = 20
    """VAD decision frame: 10, 20 or 30 ms."""
    min_speech_ms: int = 40
    """Voiced time needed before speech starts (rejects clicks)."""
    pre_roll_ms: int = 40
    """Audio before the detected start that still belongs to the utterance."""
    hangover_ms: int = 300
    """Unvoiced time after which speech ends."""


@dataclass(frozen=True)
class ChunkerConfig:
    """How audio is cut into hops for streaming motion generation."""

    hop_ms: int = 80
    """New audio per chunk (a multiple of the video frame, 40 ms at 25 fps); ≤ 200 for live use; raised to the motion generator's minimum (tiny MoDA: 160)."""
    window_ms: int = 3200
    """Longest chunk for offline/TTS use (the model's full window)."""
    left_context_ms: int = 400
    """Already-animated audio given to the motion model as context."""
    lookahead_ms: int = 40
    """Future audio the chunk waits for (adds to latency)."""
    max_utterance_s: float = 30.0
    """Force an utterance boundary after this long."""


@dataclass(frozen=True)
class MotionConfig:
    """Audio → motion."""

    generator: Literal["auto", "procedural", "moda"] = "auto"
    """auto = the profile's default (embedded: the shipped tiny MoDA + idle layer; official: MoDA release); procedural = rule-based lip-sync."""
    seed: int = 0
    """Seed of idle motion and sampling noise."""
    steps: int = 0
    """Rectified-flow Euler steps (MoDA); 0 = the model's own (release 10; tiny MoDA: its file's)."""
    cfg_audio: float = -1.0
    """MoDA guidance weight for audio (eq. 8 λ); negative = the model's own (release CLI 1.2 = λ 0.2)."""
    cfg_emotion: float = 0.0
    """MoDA guidance weight for the emotion condition."""
    window_frames: int = 0
    """MoDA: video frames per sampled DiT window; 0 = the model's own (its training length). `check` prints the effective MoDA settings."""
    hop_frames: int = 0
    """MoDA: most frames emitted per window; 0 = the model's own (tiny MoDA: its file's)."""
    crossfade_frames: int = -1
    """MoDA: frames blended across window seams; -1 = the model's own (tiny MoDA: its file's, release: 0)."""
    context_frames: int = -1
    """MoDA: frames already shown that each window re-uses as pinned context; -1 = the model's own (tiny MoDA: its file's, release: 0)."""
    min_hop_ms: int = -1
    """Shortest chunk hop the motion generator runs at (chunker.hop_ms is raised to it); -1 = the model's own (tiny MoDA: its file's, others: 0)."""
    expression_scale: float = 1.0
    """Multiplier on expression motion (0 = frozen face, >1 = exaggerated)."""
    head_scale: float = 1.0
    """Multiplier on head motion (sway, nods)."""
    models_dir: str = ""
    """Where official weights live; empty = $AVATAR_AGENT_MODELS or ~/.local/share/avatar-agent/models."""
    runtime: Literal["auto", "onnx", "torch"] = "auto"
    """Embedded profile: what runs the tiny MoDA's DiT (auto = ONNX Runtime when the model's .onnx export is present and made from its weights, else a TorchScript trace; onnx = ONNX Runtime or an error; torch = the trace)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Official profile: arithmetic of the MoDA DiT and HuBERT (fp32 = the release's; bf16/fp16 = autocast, faster on a GPU; fp16 needs CUDA)."""


@dataclass(frozen=True)
class RenderConfig:
    """Motion → frames."""

    size: int = 512
    """Output frame size in pixels (square)."""
    output: Literal["crop", "image"] = "crop"
    """crop = the aligned face crop; image = pasted back into the full portrait (resized to size)."""
    threads: int = 1
    """Torch/OpenCV threads of the single inference thread."""
    batch: int = 4
    """Frames rendered per inference job."""
    channels_last: bool = False
    """Official profile: run the LivePortrait decoder in channels-last layout (GPU speed-up)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Official profile: arithmetic of the LivePortrait networks; auto = fp16 autocast on CUDA (the release's), fp32 on a CPU; fp16 needs CUDA."""
    compile: Literal["off", "compile", "cudagraphs"] = "off"
    """Official profile, CUDA only: the LivePortrait warp + decoder under torch.compile (compile) or captured as CUDA graphs (cudagraphs); the first frames of each batch size pay the build."""


@dataclass(frozen=True)
class PlayerConfig:
    """The master clock."""

    fps: int = 25
    """Output frame rate."""
    latency_ms: int = 280
    """Audio capture → frame due time; covers hop + lookahead + compute. Also the A/V delay."""
    speech_latency_ms: int = 60
    """For pushed or spoken speech (audio.source = "tts", the session API, LiveKit, pipecat):
    that audio is there before it plays, so the source runs ahead and a new utterance after
    silence starts in the first frame due this long after it arrives (compute time only; add
    ≤ 20 ms for the source's next frame and ≤ one video frame). 0 = treat it like the mic."""
    queue_frames: int = 50
    """Rendered frames buffered ahead of the clock (overflow: drop oldest, counted)."""


@dataclass(frozen=True)
class SinksConfig:
    """Where frames go (several at once)."""

    enabled: list[SinkName] = field(default_factory=lambda: ["auto"])
    """Any of virtualcam, webrtc, file, vmic; "auto" = virtualcam when a device exists + webrtc."""
    virtualcam_device: str = ""
    """v4l2loopback device (e.g. /dev/video10); empty = the first loopback device."""
    file: str = "avatar.mp4"
    """mp4 path for the file sink."""
    vmic_source: str = "avatar_agent_mic"
    """Virtual microphone: the PulseAudio/PipeWire source name meeting apps select."""
    vmic_description: str = "avatar-agent microphone"
    """Virtual microphone: the name shown in device lists."""
    vmic_latency_ms: int = 10
    """Virtual microphone: target buffering after each frame is sent (lower = tighter A/V sync)."""


@dataclass(frozen=True)
class ServerConfig:
    """The local web server: page, WebRTC signalling, control API, /metrics."""

    host: str = "127.0.0.1"
    """Bind address. Anything but loopback requires a token."""
    port: int = 8080
    """TCP port (0 = any free port)."""
    token: str = ""
    """Bearer token for the API (≥ 16 characters); required for a non-loopback bind."""
    cors_origins: list[str] = field(default_factory=list)
    """Origins (scheme://host[:port]) whose pages may call the API; empty = none."""
    max_body_kb: int = 64
    """Largest JSON request body."""
    max_upload_mb: float = 32.0
    """Largest audio upload (POST /api/audio)."""
    request_timeout_s: float = 30.0
    """Longest time a request may take (event streams excepted)."""
    rate_say_per_min: float = 60.0
    """say requests per minute per client."""
    rate_push_per_min: float = 120.0
    """Audio uploads / stream openings per minute per client."""
    max_sessions: int = 0
    """Sessions the session server admits (0 = as many as the measured cost allows); beyond it
    POST /v1/sessions answers 503 with Retry-After."""
    session_idle_s: float = 300.0
    """A session with no API call and no viewer for this long is closed (0 = never)."""
    max_viewers: int = 8
    """WebRTC viewers per session (each costs encoding CPU; beyond it an offer gets 503)."""
    inference_workers: int = 0
    """Inference threads of the session server, sharing one earliest-due-first queue (0 = automatic: for the embedded profile one per core of the process's share (the cores over server.shards), at most 2, for the official profile 1; measured on 2 cores with 10 sessions, one thread left a core idle and collapsed, three collapsed too)."""
    shards: int = 0
    """Processes the session server spreads its sessions over, each with its own engine (0 = automatic: for the embedded profile one per core, at most 8; for the official profile 1). Threads of one process share one interpreter lock, which limits a CPU engine to about one core: on 2 cores one engine held 10 sessions at the edge, two shards held 12 with none dropped. The parent process keeps the HTTP API, security and admission; each shard costs its own model memory (about 0.5 GB embedded)."""
    rate_offer_per_min: float = 30.0
    """WebRTC offers (POST /offer) per minute per client."""
    rate_interrupt_per_min: float = 120.0
    """Interrupt requests per minute per client."""
    audio_idle_s: float = 2.0
    """An /api/audio/ws stream whose audio runs out for this long is ended (what arrived plays; queued say() goes on)."""


@dataclass(frozen=True)
class ServiceConfig:
    """Running as a systemd service."""

    drain_s: float = 1.0
    """On SIGTERM, how long queued frames may still play before sinks are finalised."""
    frozen_s: float = 10.0
    """A session whose face got no new frame for this long is unhealthy: /healthz says so and
    the systemd watchdog is no longer fed (so systemd restarts a frozen agent)."""
    log_format: Literal["auto", "plain", "journal"] = "auto"
    """journal = "<level>message" lines journald understands; auto = journal under systemd."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log verbosity."""


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    avatar: AvatarConfig = field(default_factory=AvatarConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    chunker: ChunkerConfig = field(default_factory=ChunkerConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    player: PlayerConfig = field(default_factory=PlayerConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    source_path: str = ""
    """The file this config was read from ("" = defaults only). Not a TOML key."""

    def avatar_path(self) -> Path:
        """The portrait to use (relative paths resolve against the config file's folder)."""
        return self.resolve(self.avatar.image) if self.avatar.image else DEFAULT_AVATAR

    def resolve(self, p: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        path = Path(os.path.expanduser(p))
        if not path.is_absolute() and self.source_path:
            path = Path(self.source_path).parent / path
        return path

    def validate(self) -> None:
        """Cross-field checks; raises ConfigError.

        Everything ``start`` could only discover by failing (or by running frozen) is refused
        here, so ``start`` and ``check`` reject the same configs with the same message.
        """
        fps = self.player.fps
        if not 1 <= fps <= 60 or SAMPLE_RATE_HZ % fps or WEBRTC_AUDIO_HZ % fps:
            # Each frame carries exactly its own audio: 16 kHz (and the 48 kHz the WebRTC and
            # file sinks upsample to) must split into whole samples per frame.
            ok = [f for f in range(1, 61) if SAMPLE_RATE_HZ % f == 0 and WEBRTC_AUDIO_HZ % f == 0]
            raise ConfigError(f"player.fps = {fps}: must divide 16000 and 48000 (each frame "
                              f"carries whole audio samples); use one of "
                              f"{', '.join(map(str, ok[ok.index(10):]))}")
        frame_ms = 1000 / fps
        for key in ("hop_ms", "window_ms"):
            v = getattr(self.chunker, key)
            if v <= 0 or abs(v / frame_ms - round(v / frame_ms)) > 1e-6:
                raise ConfigError(f"chunker.{key} = {v}: must be a positive multiple of the video "
                                  f"frame ({frame_ms:g} ms at player.fps = {fps})")
        _positive(self, "chunker.lookahead_ms", self.chunker.lookahead_ms, zero_ok=True)
        _positive(self, "chunker.left_context_ms", self.chunker.left_context_ms, zero_ok=True)
        _positive(self, "chunker.max_utterance_s", self.chunker.max_utterance_s)
        p = self.player
        if p.latency_ms <= 0:
            raise ConfigError(f"player.latency_ms = {p.latency_ms}: must be > 0 (frames are due "
                              "this long after their audio; the default is 280)")
        need = self.chunker.hop_ms + self.chunker.lookahead_ms
        if p.latency_ms < need:
            raise ConfigError(f"player.latency_ms = {p.latency_ms}: must be at least "
                              f"chunker.hop_ms + chunker.lookahead_ms = {need} ms (no frame could "
                              "ever be ready in time); `avatar-agent check` shows the budget")
        if not 0 <= p.speech_latency_ms <= 1000:
            raise ConfigError(f"player.speech_latency_ms = {p.speech_latency_ms}: must be 0..1000 "
                              "(0 = pushed speech waits like the mic; the default is 60)")
        if p.queue_frames < 1:
            raise ConfigError(f"player.queue_frames = {p.queue_frames}: must be ≥ 1 (the default "
                              "is 50)")
        for key in ("min_speech_ms", "pre_roll_ms", "hangover_ms"):
            _positive(self, f"vad.{key}", getattr(self.vad, key), zero_ok=True)
        a = self.audio
        _positive(self, "audio.max_queued_s", a.max_queued_s)
        if not 80 <= a.tts_rate <= 450:
            raise ConfigError(f"audio.tts_rate = {a.tts_rate}: must be 80..450 words per minute")
        from .audio.resample import PCM_CHANNELS, PCM_RATES  # the one PCM table (numpy only)

        if not PCM_RATES[0] <= a.pipe_rate <= PCM_RATES[1]:
            raise ConfigError(f"audio.pipe_rate = {a.pipe_rate}: must be "
                              f"{PCM_RATES[0]}..{PCM_RATES[1]} Hz")
        if not PCM_CHANNELS[0] <= a.pipe_channels <= PCM_CHANNELS[1]:
            raise ConfigError(f"audio.pipe_channels = {a.pipe_channels}: must be "
                              f"{PCM_CHANNELS[0]}..{PCM_CHANNELS[1]}")
        _positive(self, "motion.steps", self.motion.steps, zero_ok=True)
        for key in ("expression_scale", "head_scale"):
            v = getattr(self.motion, key)
            if not 0.0 <= v <= 3.0:
                raise ConfigError(f"motion.{key} = {v}: must be 0..3")
        r = self.render
        if not MIN_RENDER_SIZE <= r.size <= MAX_RENDER_SIZE or r.size % 16:
            raise ConfigError(f"render.size = {r.size}: must be a multiple of 16 within "
                              f"{MIN_RENDER_SIZE}..{MAX_RENDER_SIZE} pixels (512 is the "
                              "models' native size)")
        if not 1 <= r.threads <= 256:
            raise ConfigError(f"render.threads = {r.threads}: must be 1..256")
        if not 1 <= r.batch <= 64:
            raise ConfigError(f"render.batch = {r.batch}: must be 1..64")
        _positive(self, "sinks.vmic_latency_ms", self.sinks.vmic_latency_ms)
        if "file" in self.sinks.enabled and not self.sinks.file.strip():
            raise ConfigError("sinks.file is empty but sinks.enabled has \"file\": set sinks.file "
                              "to an .mp4 path")
        _positive(self, "service.drain_s", self.service.drain_s, zero_ok=True)
        _positive(self, "service.frozen_s", self.service.frozen_s)
        sv = self.server
        _positive(self, "server.max_sessions", sv.max_sessions, zero_ok=True)
        _positive(self, "server.session_idle_s", sv.session_idle_s, zero_ok=True)
        if not 1 <= sv.max_viewers <= 64:
            raise ConfigError(f"server.max_viewers = {sv.max_viewers}: must be 1..64")
        if not 0 <= sv.inference_workers <= 64:
            raise ConfigError(f"server.inference_workers = {sv.inference_workers}: must be 0..64 "
                              "(0 = automatic)")
        if not 0 <= sv.shards <= 64:
            raise ConfigError(f"server.shards = {sv.shards}: must be 0..64 (0 = automatic, "
                              "1 = one process)")
        if not 0 <= sv.port <= 65535:
            raise ConfigError(f"server.port = {sv.port}: must be 0..65535 (0 = any free port)")
        if sv.max_body_kb < 1:
            raise ConfigError(f"server.max_body_kb = {sv.max_body_kb}: must be ≥ 1 (kB of the "
                              "largest JSON request body; the default is 64)")
        for key in ("max_upload_mb", "request_timeout_s", "rate_say_per_min", "rate_push_per_min",
                    "rate_offer_per_min", "rate_interrupt_per_min", "audio_idle_s"):
            _positive(self, f"server.{key}", getattr(sv, key))
        for o in sv.cors_origins:
            if o == "*" or "://" not in o or o.endswith("/"):
                raise ConfigError(f"server.cors_origins: {o!r} is not an exact origin; give "
                                  "scheme://host[:port] like 'https://app.example.com' (no '*', "
                                  "no trailing slash)")
        if self.vad.frame_ms not in (10, 20, 30):
            raise ConfigError(f"vad.frame_ms = {self.vad.frame_ms}: must be 10, 20 or 30")
        if not 0 <= self.vad.aggressiveness <= 3:
            raise ConfigError(f"vad.aggressiveness = {self.vad.aggressiveness}: must be 0..3")
        if not 0.0 <= self.avatar.intensity <= 1.0:
            raise ConfigError(f"avatar.intensity = {self.avatar.intensity}: must be 0..1")
        m = self.motion
        for key, lo in (("window_frames", 0), ("hop_frames", 0), ("crossfade_frames", -1),
                        ("context_frames", -1), ("min_hop_ms", -1)):
            if getattr(m, key) < lo:
                raise ConfigError(f"motion.{key} = {getattr(m, key)}: must be ≥ {lo} "
                                  f"({lo} = the model's own value)")
        known_sinks = set(typing.get_args(SinkName))
        bad = [s for s in self.sinks.enabled if s not in known_sinks]
        if bad:
            raise ConfigError(f"sinks.enabled: unknown sink(s) {bad}; choose from {sorted(known_sinks)}")
        from .motion.emotion import EmotionError, emotion_label
        try:
            emotion_label(self.avatar.emotion)
        except EmotionError as e:
            raise ConfigError(f"avatar.emotion = {self.avatar.emotion!r}: {e}") from None
        if self.server.token and len(self.server.token) < 16:
            raise ConfigError("server.token is too short: use at least 16 random characters "
                              "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(24))')")
        loopback = self.server.host in ("127.0.0.1", "localhost", "::1")
        if not loopback and not self.server.token:
            raise ConfigError(f"server.host = {self.server.host!r} is not loopback: set server.token "
                              "(a long random string) so the API is not open to the network")


def _positive(cfg: Config, key: str, value: float, zero_ok: bool = False) -> None:
    """A numeric key that must be > 0 (or ≥ 0): a ConfigError naming it otherwise."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key} = {value}: must be {'≥ 0' if zero_ok else '> 0'}")


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {type(value).__name__}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected bool (true/false), got {type(value).__name__} {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """Best-effort line number of ``[section]`` / ``key`` in a TOML text (tomllib keeps none)."""
    lines = text.splitlines()
    start = 0
    for i, line in enumerate(lines):
        if re.match(rf"^\s*\[\s*{re.escape(section)}\s*\]", line):
            start = i
            if key is None:
                return i + 1
            break
    else:
        return None
    for j in range(start + 1, len(lines)):
        if re.match(r"^\s*\[", lines[j]):
            break
        if re.match(rf"^\s*{re.escape(key)}\s*=", lines[j]):
            return j + 1
    return None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(data: dict[str, Any], origin: str, text: str = "") -> Config:
    sections: dict[str, Any] = {}
    hints = _hints(Config)
    for name, body in data.items():
        if name not in hints or name == "source_path":
            line = _line_of(text, name, None)
            raise ConfigError(f"{origin}{f':{line}' if line else ''}: unknown section [{name}]; "
                              f"known: {', '.join(k for k in hints if k != 'source_path')}")
        if not isinstance(body, dict):
            raise ConfigError(f"{origin}: [{name}] must be a table")
        cls = hints[name]
        fhints = _hints(cls)
        kwargs = {}
        for key, value in body.items():
            line = _line_of(text, name, key)
            where = f"{origin}{f':{line}' if line else ''}: {name}.{key}"
            if key not in fhints:
                raise ConfigError(f"{where}: unknown key; [{name}] has {', '.join(fhints)}")
            kwargs[key] = _coerce(value, fhints[key], where)
        sections[name] = cls(**kwargs)
    return Config(**sections)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set {item!r}: expected section.key=value (e.g. player.fps=30)")
    dotted, raw = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings need no quotes on the command line
    return section, key, value


def default_config_path() -> Path | None:
    """$AVATAR_AGENT_CONFIG, else the XDG config file if it exists, else None."""
    env = os.environ.get("AVATAR_AGENT_CONFIG")
    if env:
        return Path(env)
    xdg = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    p = xdg / "avatar-agent" / "config.toml"
    return p if p.exists() else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                use_default_path: bool = True) -> Config:
    """Load and validate the configuration.

    Args:
        path: a TOML file; None = :func:`default_config_path` (when ``use_default_path``).
        overrides: ``section.key=value`` strings applied after the file.
    """
    data: dict[str, Any] = {}
    text = ""
    origin = "<defaults>"
    if path is None and use_default_path:
        path = default_config_path()
    if path is not None:
        p = Path(path)
        origin = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist (check --config / "
                              "$AVATAR_AGENT_CONFIG)") from None
        except UnicodeDecodeError as e:
            line = p.read_bytes()[:e.start].count(b"\n") + 1
            raise ConfigError(f"{p}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x} at "
                              f"offset {e.start}); save the config file as UTF-8") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {p} is a directory; pass the .toml file") from None
        except OSError as e:
            raise ConfigError(f"config file {p} cannot be read: {e.strerror}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    cfg = _build(data, origin, text)
    over: dict[str, Any] = {}
    for item in overrides or []:
        section, key, value = _parse_override(item)
        over.setdefault(section, {})[key] = value
    if over:
        merged = _merge({k: dataclasses.asdict(getattr(cfg, k)) for k in data}, over)
        # Re-validate overridden sections against their types; keep untouched file sections.
        try:
            cfg = _build(merged, origin, text)
        except ConfigError as e:
            raise ConfigError(f"{e} (from --set)") from None
    cfg = dataclasses.replace(cfg, source_path=str(Path(path).resolve()) if path else "")
    cfg.validate()
    return cfg


def config_from_toml(text: str, source_path: str = "") -> Config:
    """The configuration :func:`to_toml` wrote (a ``serve`` shard gets its parent's this way);
    relative paths resolve as if read from ``source_path``."""
    cfg = _build(tomllib.loads(text), source_path or "<parent config>", text)
    cfg = dataclasses.replace(cfg, source_path=source_path)
    cfg.validate()
    return cfg


def to_toml(cfg: Config) -> str:
    """The effective configuration as TOML (printed by ``check``)."""
    out = []
    for f in dataclasses.fields(Config):
        if f.name == "source_path":
            continue
        out.append(f"[{f.name}]")
        for k, v in dataclasses.asdict(getattr(cfg, f.name)).items():
            out.append(f"{k} = {_toml_value(v)}")
        out.append("")
    return "\n".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def field_docs() -> dict[str, dict[str, str]]:
    """Docstrings under each config field (read from this module's source), per section."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(__import__(__name__, fromlist=["_"])))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields: dict[str, str] = {"": ast.get_docstring(node) or ""}
            body = node.body
            for a, b in zip(body, body[1:], strict=False):
                if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                        and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                        and isinstance(b.value.value, str)):
                    fields[a.target.id] = " ".join(b.value.value.split())
            docs[node.name] = fields
    return docs


def sample_toml() -> str:
    """The documented sample config (= the defaults): what config.toml at the repo root holds."""
    docs = field_docs()
    cfg = Config()
    out = ["# avatar-agent configuration. Every key, with its default value.",
           "# Load order: this file via --config, $AVATAR_AGENT_CONFIG or",
           "# $XDG_CONFIG_HOME/avatar-agent/config.toml; then --set section.key=value overrides.",
           "# Relative paths resolve against this file's folder. Unknown keys are errors.",
           "# Regenerate: avatar-agent config --sample > config.toml", ""]
    hints = _hints(Config)
    for f in dataclasses.fields(Config):
        if f.name == "source_path":
            continue
        cls_docs = docs[hints[f.name].__name__]
        out.append(f"[{f.name}]")
        out.append(f"# {cls_docs['']}")
        for k, v in dataclasses.asdict(getattr(cfg, f.name)).items():
            out.append(f"# {cls_docs.get(k, '')}")
            out.append(f"{k} = {_toml_value(v)}")
        out.append("")
    return "\n".join(out)


def chunker_params(cfg: Config, min_hop_ms: int = 0) -> "ChunkerParams":
    """The chunker's settings from the [chunker] and [vad] sections.

    ``min_hop_ms``: the motion generator's shortest useful hop (the tiny MoDA samples one DiT
    window per hop); ``chunker.hop_ms`` is raised to it, rounded up to whole video frames.
    """
    from .chunker import ChunkerParams

    c, v = cfg.chunker, cfg.vad
    frame_ms = 1000 / cfg.player.fps
    hop = c.hop_ms
    if min_hop_ms > hop:
        hop = int(math.ceil(min_hop_ms / frame_ms - 1e-9) * frame_ms)
    return ChunkerParams(fps=cfg.player.fps, hop_ms=hop, window_ms=max(c.window_ms, hop),
                         left_context_ms=c.left_context_ms, lookahead_ms=c.lookahead_ms,
                         min_speech_ms=v.min_speech_ms, pre_roll_ms=v.pre_roll_ms,
                         hangover_ms=v.hangover_ms, max_utterance_s=c.max_utterance_s)
