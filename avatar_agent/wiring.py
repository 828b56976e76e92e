"""Builds the plug-ins named by a config.  Imports lazily: each optional dependency is loaded only
when the config asks for the component that needs it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .clock import Clock
from .config import Config, ConfigError
from .types import AudioSource, MotionGenerator, Renderer, Sink, Vad

if TYPE_CHECKING:
    from .audio.recognizer import PhoneTracker

log = logging.getLogger(__name__)


def input_devices() -> list[dict[str, Any]]:
    """Audio input devices PortAudio sees (empty when PortAudio or a sound server is missing)."""
    try:
        import sounddevice as sd

        return [dict(d, index=i) for i, d in enumerate(sd.query_devices())
                if d.get("max_input_channels", 0) > 0]
    except Exception:
        return []


def make_source(cfg: Config, clock: Clock, *, realtime: bool | None = None) -> AudioSource:
    """The audio source.  ``auto`` = the microphone when one exists, else TTS from typed text."""
    a = cfg.audio
    kind = a.source
    if kind == "auto":
        kind = "mic" if input_devices() else "tts"
        if kind == "tts":
            log.warning("no microphone found: animating idle motion; type text on stdin and the "
                        "avatar speaks it (fix: plug in a microphone or start PulseAudio/PipeWire)")
    if kind == "mic":
        from .audio.mic import MicSource

        return MicSource(device=_device(a.device), clock=clock,
                         fail_if_missing=not a.wait_for_device)
    if kind == "file":
        from .audio.file import FileSource

        if not a.file:
            raise ConfigError("audio.source = \"file\" needs audio.file = \"path/to/audio\"")
        rt = a.realtime if realtime is None else realtime
        return FileSource(cfg.resolve(a.file), realtime=rt, clock=clock)
    if kind == "pipe":
        from .audio.pipe import PipeSource

        return PipeSource(rate=a.pipe_rate, channels=a.pipe_channels,
                          path=None if a.pipe_path == "-" else a.pipe_path, clock=clock)
    if kind in ("tts", "none"):
        from .audio.queue import SpeechQueueSource

        # A continuous timeline of silence that say() / push() fill with speech.
        return SpeechQueueSource(clock, voice=a.voice, rate_wpm=a.tts_rate,
                                 max_queued_s=a.max_queued_s)
    raise ConfigError(f"audio.source = {kind!r}: unknown")


def _device(d: str) -> str | int | None:
    if not d:
        return None
    return int(d) if d.isdigit() else d


def make_vad(cfg: Config) -> Vad:
    """webrtcvad with the configured aggressiveness."""
    from .audio.vad import WebRtcVad

    return WebRtcVad(aggressiveness=cfg.vad.aggressiveness, frame_ms=cfg.vad.frame_ms)


def make_phones(cfg: Config, *, shared: bool) -> PhoneTracker | None:
    """The live phone tracker ``audio.recognizer`` asks for (None: lip-sync from the audio alone).

    ``shared``: the agent is one of a session server's many (auto leaves it off there: its cost
    per talking session is a large share of what a session costs)."""
    mode = cfg.audio.recognizer
    if mode == "off" or (mode == "auto" and (shared or cfg.avatar.profile != "embedded")):
        return None
    from .audio.recognizer import make_tracker

    tracker = make_tracker()
    if tracker is None and mode == "on":
        log.warning("audio.recognizer = \"on\", but pocketsphinx is not installed: lips follow "
                    "speech from its loudness alone (pip install pocketsphinx==5.1.1)")
    return tracker


def make_renderer(cfg: Config) -> Renderer:
    """The profile's renderer."""
    if cfg.avatar.profile == "embedded":
        from .render.warp import WarpRenderer

        return WarpRenderer(size=cfg.render.size, output=cfg.render.output)
    from .render.liveportrait import LivePortraitRenderer

    import torch

    r = cfg.render
    cuda = torch.cuda.is_available()
    check_precision("render.precision", r.precision, cuda)
    d = require_official_files(cfg, ("liveportrait/",))
    compile_mode = r.compile
    if compile_mode != "off" and not cuda:
        log.warning("render.compile = %r is for CUDA and there is no GPU here: rendering without "
                    "it (fix: render.compile = \"off\")", compile_mode)
        compile_mode = "off"
    # W + G call size: render.batch frames on a CPU; on CUDA frames of several sessions share a
    # call (render/batching.py), so up to GPU_RENDER_BATCH (bench/gpu_check.sh reports the
    # memory a batch takes).
    batch = max(r.batch, GPU_RENDER_BATCH if cuda else 1)
    return LivePortraitRenderer.from_dir(d, size=r.size, output=r.output, max_batch=batch,
                                         channels_last=r.channels_last, compile=compile_mode,
                                         precision=r.precision)


GPU_RENDER_BATCH = 32
"""Most frames per LivePortrait W + G call on CUDA (official profile)."""


def check_precision(key: str, value: str, cuda: bool) -> None:
    """fp16 needs CUDA (CPU autocast is bf16 only): a one-line ConfigError naming ``key``."""
    if value == "fp16" and not cuda:
        raise ConfigError(f"{key} = \"fp16\" needs a CUDA GPU and there is none here: use "
                          "\"bf16\" or \"fp32\" on a CPU")


def make_motion(cfg: Config) -> MotionGenerator:
    """The profile's motion generator."""
    if cfg.avatar.profile == "embedded":
        from .motion.procedural import ProceduralMotion

        procedural = ProceduralMotion(seed=cfg.motion.seed)
        if procedural.fps != cfg.player.fps:
            raise ConfigError(f"player.fps = {cfg.player.fps}: the embedded generators run at "
                              f"{procedural.fps} fps")
        if uses_embedded_moda(cfg):
            return embedded_moda(cfg, procedural)
        return procedural
    return official_motion(cfg)


def require_official_files(cfg: Config, prefixes: tuple[str, ...]) -> Path:
    """The models directory, after checking the official files under ``prefixes`` exist."""
    from .models import list_models, models_dir

    d = models_dir(cfg)
    missing = [st.file.name for st in list_models(d)
               if st.state == "missing" and st.file.name.startswith(prefixes)]
    if missing:
        raise ConfigError(f"avatar.profile = \"official\" needs these files in {d}: "
                          f"{', '.join(missing)}. Get them with: avatar-agent models fetch official "
                          "(or set motion.models_dir)")
    return d


RELEASE_STEPS = 10
"""Euler steps of the release sampler (its CLI)."""
RELEASE_CFG_AUDIO = 0.2
"""The release CLI's CFG scale 1.2 as an eq. 8 weight."""


def official_motion(cfg: Config) -> MotionGenerator:
    """MoDA release DiT + chinese-hubert-base features (CUDA when available) for speech, the idle
    layer in LivePortrait's motion space for silence (motion/compose.py).

    HuBERT streams (:class:`~avatar_agent.nn.hubert.StreamingHubert`): each live hop encodes its
    chunk plus the session's last 3.2 s of audio, the context the release's features have.
    ``motion.precision`` puts the DiT and HuBERT under autocast (bf16/fp16)."""
    import torch

    from .motion.compose import LivePortraitIdle, SpeechAndIdle
    from .motion.moda import MoDAMotion
    from .nn.hubert import HubertFeatures, StreamingHubert
    from .nn.sampling import Guidance
    from .nn.weights import load_hubert, load_mean_std, load_moda_release

    m = cfg.motion
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_precision("motion.precision", m.precision, device == "cuda")
    d = require_official_files(cfg, ("moda/", "audio/"))
    model: Any
    model, null_audio = load_moda_release(d / "moda" / "net-200.pth", device)
    mean, std = load_mean_std(d / "moda" / "mean.pt")
    features: Any = HubertFeatures(load_hubert(d / "audio" / "chinese-hubert-base", device), device)
    if m.precision != "fp32":
        from .nn.precision import AutocastDiT, AutocastFeatures

        model, features = AutocastDiT(model, m.precision), AutocastFeatures(features, device, m.precision)
    features = StreamingHubert(features)
    guidance = Guidance(audio=m.cfg_audio if m.cfg_audio >= 0 else RELEASE_CFG_AUDIO,
                        emotion=m.cfg_emotion)
    moda = MoDAMotion(model, features, mean, std, profile="official", null_audio=null_audio,
                      guidance=guidance, steps=m.steps or RELEASE_STEPS, device=device,
                      seed=cfg.motion.seed, **_window_overrides(cfg))
    return SpeechAndIdle(moda, LivePortraitIdle(seed=cfg.motion.seed, fps=cfg.player.fps))


def _window_overrides(cfg: Config) -> dict[str, Any]:
    """``MoDAMotion`` keyword arguments for the window settings the config sets (others: the
    generator's defaults)."""
    keys = ("window", "hop", "crossfade", "context", "min_hop_ms")
    return {k: v for k, v in moda_overrides(cfg).items() if k in keys and v is not None}


EMBEDDED_MODA = Path(__file__).resolve().parent.parent / "models" / "embedded" / "moda-tiny.safetensors"
"""The tiny MoDA trained by this project (bench/train_tiny.sh; model card beside it)."""


def moda_overrides(cfg: Config) -> dict[str, Any]:
    """The ``[motion]`` keys that override a MoDA model's own inference settings (None = keep
    the model's; see :func:`avatar_agent.motion.moda_load.inference_settings`)."""
    m = cfg.motion

    def own(v: int | float, unset: int | float) -> Any:
        return None if v == unset else v

    return {"steps": own(m.steps, 0), "cfg_audio": m.cfg_audio if m.cfg_audio >= 0 else None,
            "window": own(m.window_frames, 0), "hop": own(m.hop_frames, 0),
            "crossfade": own(m.crossfade_frames, -1), "context": own(m.context_frames, -1),
            "min_hop_ms": own(m.min_hop_ms, -1)}


def embedded_moda(cfg: Config, procedural: Any) -> MotionGenerator:
    """The tiny MoDA for speech + the procedural idle layer for silence."""
    if not EMBEDDED_MODA.is_file():
        raise ConfigError(f"motion.generator = \"moda\" needs {EMBEDDED_MODA} (train it with "
                          "bench/train_tiny.sh), or use motion.generator = \"procedural\"")
    from .motion.moda import EmbeddedMoDA
    from .motion.moda_load import ModelFileError, build_motion

    m = cfg.motion
    try:
        moda = build_motion(EMBEDDED_MODA, cfg_emotion=m.cfg_emotion, seed=m.seed,
                            runtime=m.runtime, **moda_overrides(cfg))
    except ModelFileError as e:
        raise ConfigError(f"{e} (or use motion.generator = \"procedural\")") from e
    except ValueError as e:  # a [motion] override the model cannot run with
        raise ConfigError(f"[motion] settings do not fit {EMBEDDED_MODA.name}: {e}") from e
    return EmbeddedMoDA(moda, procedural)


def uses_embedded_moda(cfg: Config) -> bool:
    """Whether the config's embedded profile animates speech with the tiny MoDA (the default)."""
    return cfg.avatar.profile == "embedded" and cfg.motion.generator in ("auto", "moda")


def moda_settings(cfg: Config) -> dict[str, Any]:
    """The effective inference settings of the configured MoDA generator, without loading it
    (empty for procedural motion): what ``check`` prints and where the chunk hop comes from."""
    over = {k: v for k, v in moda_overrides(cfg).items() if v is not None}
    if uses_embedded_moda(cfg):
        from .motion.moda_load import inference_settings, read_meta

        if not EMBEDDED_MODA.with_suffix(".json").is_file():
            return {}
        return inference_settings(read_meta(EMBEDDED_MODA), over)
    if cfg.avatar.profile == "official":
        return {"steps": RELEASE_STEPS, "cfg_audio": RELEASE_CFG_AUDIO, "min_hop_ms": 0, **over}
    return {}


def motion_min_hop_ms(cfg: Config) -> int:
    """The chunk hop the configured motion generator needs at least (0 = any)."""
    return int(moda_settings(cfg).get("min_hop_ms", 0))


def virtualcam_available() -> bool:
    """True if a v4l2loopback device exists."""
    try:
        from .sinks.virtualcam import available_devices

        return any(d.loopback and d.output for d in available_devices())
    except Exception:
        return False


def make_sinks(cfg: Config, *, file: str | None = None) -> tuple[list[Sink], Any]:
    """The sinks and the WebRTC sink (or None) for the web server."""
    names = list(cfg.sinks.enabled)
    if "auto" in names:
        names.remove("auto")
        if virtualcam_available():
            names.append("virtualcam")
        else:
            from .sinks.virtualcam import MODPROBE_LINE

            log.warning("no v4l2loopback device: virtual camera off (fix: %s)", MODPROBE_LINE)
        names.append("webrtc")
    if file:
        names.append("file")
    sinks: list[Sink] = []
    webrtc = None
    for name in dict.fromkeys(names):
        if name == "virtualcam":
            from .sinks.virtualcam import VirtualCamSink

            sinks.append(VirtualCamSink(device=cfg.sinks.virtualcam_device or None))
        elif name == "webrtc":
            from .sinks.webrtc import WebRtcSink

            webrtc = WebRtcSink(max_viewers=cfg.server.max_viewers)
            sinks.append(webrtc)
        elif name == "vmic":
            from .sinks.vmic import VirtualMicSink

            sinks.append(VirtualMicSink(source_name=cfg.sinks.vmic_source,
                                        description=cfg.sinks.vmic_description,
                                        latency_ms=cfg.sinks.vmic_latency_ms))
        elif name == "file":
            from .sinks.file import Mp4Sink

            sinks.append(Mp4Sink(cfg.resolve(file or cfg.sinks.file)))
    return sinks, webrtc
