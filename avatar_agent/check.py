"""``avatar-agent check``: devices, models, config and the latency the settings imply.

Each problem is printed with its fix; the exit code is 1 when there is any problem (something the
configured agent needs and does not have), 0 otherwise.  Notes are informational.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Callable

from .config import Config, to_toml


@dataclasses.dataclass
class Report:
    """Collected lines of a check run."""

    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    lines: list[str] = dataclasses.field(default_factory=list)

    def ok(self, what: str) -> None:
        """Record a passed check."""
        self.lines.append(f"  ok       {what}")

    def note(self, what: str) -> None:
        """Record information that is neither a pass nor a problem."""
        self.lines.append(f"  note     {what}")

    def problem(self, what: str, fix: str) -> None:
        """Record a problem and the fix to show for it."""
        self.problems.append((what, fix))
        self.lines.append(f"  PROBLEM  {what}\n           fix: {fix}")


def implied_latency_ms(cfg: Config) -> dict[str, float]:
    """The delay the settings add between speech and its frame, before any compute."""
    from .chunker import Chunker
    from .config import chunker_params
    from .wiring import motion_min_hop_ms

    c = Chunker(chunker_params(cfg, motion_min_hop_ms(cfg)))
    parts = {"chunker (hop + hold for lookahead/pre-roll + grid)": float(c.latency_ms),
             "audio capture block (20 ms)": 20.0}
    parts["total"] = sum(parts.values())
    return parts


def run_check(cfg: Config, out: Callable[[str], None] = print) -> int:
    """Run every check, print the report, return the exit code."""
    r = Report()
    _check_packages(r, cfg)
    _check_audio(r, cfg)
    _check_vcam(r, cfg)
    _check_gpu(r, cfg)
    _check_models(r, cfg)
    _check_avatar(r, cfg)
    _check_sinks(r, cfg)
    lat = implied_latency_ms(cfg)
    budget = cfg.player.latency_ms
    out("avatar-agent check")
    out("\n".join(r.lines))
    out("\nlatency implied by the chunk settings:")
    for k, v in lat.items():
        out(f"  {k:<36} {v:7.0f} ms")
    compute = budget - lat["total"]
    out(f"  player.latency_ms (A/V delay)        {budget:7d} ms  → {compute:.0f} ms left for compute")
    if cfg.audio.source in ("tts", "none") and cfg.player.speech_latency_ms > 0:
        # A speech queue runs ahead of the clock: the capture budget above is the microphone's.
        out(f"  (audio.source = {cfg.audio.source}: typed and pushed speech is queued ahead of the "
            f"clock; its first frame is due player.speech_latency_ms = "
            f"{cfg.player.speech_latency_ms} ms after it arrives. The budget above applies to a "
            "microphone.)")
    if compute < 40:
        r.problem(f"player.latency_ms = {budget} leaves {compute:.0f} ms for motion + render",
                  f"raise player.latency_ms to ≥ {lat['total'] + 80:.0f} or lower chunker.hop_ms / "
                  "chunker.lookahead_ms")
        out(r.lines[-1])
    settings = _moda_settings(r, cfg)
    if settings:
        out("\nMoDA inference settings (the model's own, then [motion] overrides):")
        for name, value in settings.items():
            out(f"  {name:<24} {value}")
    running = _running_agent(cfg)
    if running:
        out(f"\nrunning agent at {running[0]}:")
        for k, v in running[1].items():
            out(f"  {k:<24} {v}")
    out("\neffective config:")
    out(to_toml(cfg))
    if r.problems:
        out(f"{len(r.problems)} problem(s):")
        for what, fix in r.problems:
            out(f"  - {what}\n    fix: {fix}")
        return 1
    out("no problems found")
    return 0


def _moda_settings(r: Report, cfg: Config) -> dict[str, object]:
    from .motion.moda_load import ModelFileError
    from .wiring import moda_settings

    try:
        return moda_settings(cfg)
    except ModelFileError as e:
        r.problem(str(e), "restore models/embedded from the repository or set "
                          "motion.generator = \"procedural\"")
        return {}


def _check_packages(r: Report, cfg: Config) -> None:
    need = {"torch": "torch==2.13.0", "cv2": "opencv-python-headless==4.14.0.94",
            "mediapipe": "--no-deps mediapipe==0.10.21", "webrtcvad": "webrtcvad-wheels",
            "av": "av==18.1.0", "soxr": "soxr"}
    if "webrtc" in cfg.sinks.enabled or "auto" in cfg.sinks.enabled:
        need["aiortc"] = "'avatar-agent[webrtc]'"
    if "virtualcam" in cfg.sinks.enabled:
        need["pyvirtualcam"] = "'avatar-agent[vcam]'"
    if cfg.avatar.profile == "official":
        need["transformers"] = "'avatar-agent[official]'"
    for mod, pip in need.items():
        if importlib.util.find_spec(mod) is None:
            r.problem(f"python package {mod} is missing", f"pip install {pip}")
        else:
            r.ok(f"package {mod}")


def _check_audio(r: Report, cfg: Config) -> None:
    from .wiring import input_devices

    devs = input_devices()
    src = cfg.audio.source
    if devs:
        r.ok(f"{len(devs)} audio input(s): " + ", ".join(d["name"] for d in devs[:4]))
    elif src == "mic":
        r.problem("audio.source = \"mic\" but no audio input device exists",
                  "start PulseAudio/PipeWire or plug in a microphone (see `avatar-agent devices`)")
    elif src == "auto":
        r.note("no microphone: `start` animates idle motion and speaks text typed on stdin")
    if src == "file" and not cfg.resolve(cfg.audio.file).is_file():
        r.problem(f"audio.file {cfg.audio.file!r} does not exist", "set audio.file to an audio file")
    if src in ("tts", "auto"):
        try:
            from .audio.tts import synthesize

            synthesize("ok")
            r.ok("espeak-ng text to speech")
        except Exception as e:
            r.problem(f"espeak-ng is not usable: {e}", "sudo apt-get install espeak-ng")
    _check_recognizer(r, cfg)


def _check_recognizer(r: Report, cfg: Config) -> None:
    """Whether `start` recognises the phones of speech that comes without them."""
    from .audio.recognizer import available
    from .wiring import make_phones

    mode = cfg.audio.recognizer
    if not available():
        if mode == "on":
            r.problem("audio.recognizer = \"on\" but pocketsphinx or its English model is missing",
                      "pip install pocketsphinx==5.1.1 (or set audio.recognizer = \"auto\")")
        else:
            r.note("no pocketsphinx: lips follow microphone speech from its loudness alone")
        return
    live = make_phones(cfg, shared=False) is not None
    served = make_phones(cfg, shared=True) is not None
    r.ok(f"live phone recognition (pocketsphinx, audio.recognizer = {mode}): "
         f"{'on' if live else 'off'} for start, {'on' if served else 'off'} for serve's sessions")


def _check_vcam(r: Report, cfg: Config) -> None:
    from .wiring import virtualcam_available

    from .sinks.virtualcam import MODPROBE_LINE

    fix = f"{MODPROBE_LINE} (Chrome, Zoom and Meet need exclusive_caps=1)"
    if virtualcam_available():
        r.ok("v4l2loopback virtual camera present")
    elif "virtualcam" in cfg.sinks.enabled:
        r.problem("sinks.enabled has virtualcam but no v4l2loopback device exists", fix)
    else:
        r.note(f"no virtual camera (only the web page will show the avatar); to add one: {fix}")


def _check_gpu(r: Report, cfg: Config) -> None:
    try:
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            r.ok(f"GPU: {torch.cuda.get_device_name(0)}")
        else:
            r.note("no GPU: the embedded profile runs on CPU; the official profile needs a GPU "
                   "for real time")
    except Exception as e:  # pragma: no cover - torch import problems are reported above
        r.note(f"torch unavailable: {e}")
        return
    if cfg.avatar.profile != "official":
        return
    m, rc = cfg.motion, cfg.render
    lp = rc.precision if rc.precision != "auto" else ("fp16" if cuda else "fp32")
    compile_mode = rc.compile if cuda else "off"
    r.ok(f"official precision: DiT + HuBERT {m.precision}, LivePortrait {lp}; "
         f"W + G compile: {compile_mode}")
    for key, value in (("motion.precision", m.precision), ("render.precision", rc.precision)):
        if value == "fp16" and not cuda:
            r.problem(f"{key} = \"fp16\" needs a CUDA GPU and there is none here",
                      f"set {key} = \"bf16\" or \"fp32\"")
    if rc.compile != "off" and not cuda:
        r.note(f"render.compile = \"{rc.compile}\" is for CUDA: ignored without a GPU")


def _check_moda_runtime(r: Report, cfg: Config, path: Path) -> None:
    from .motion.moda_load import ModelFileError, onnx_problem

    if cfg.motion.runtime == "torch":
        r.ok("tiny MoDA runtime: torch (motion.runtime = \"torch\")")
        return
    try:
        why = onnx_problem(path)
    except ModelFileError as e:
        why = str(e)
    if why is None:
        r.ok(f"tiny MoDA runtime: ONNX Runtime ({path.with_suffix('.onnx').name})")
    elif cfg.motion.runtime == "onnx":
        r.problem(f"motion.runtime = \"onnx\" cannot be used: {why}",
                  "re-export the graph (python -m avatar_agent.nn.moda_onnx "
                  f"{path}) or set motion.runtime = \"auto\"")
    else:
        r.ok(f"tiny MoDA runtime: torch, slower ({why})")


def _check_models(r: Report, cfg: Config) -> None:
    if cfg.avatar.profile == "embedded":
        from .wiring import EMBEDDED_MODA, uses_embedded_moda

        if not uses_embedded_moda(cfg):
            r.ok("embedded profile, procedural motion: no weights needed")
        elif EMBEDDED_MODA.is_file() and EMBEDDED_MODA.with_suffix(".json").is_file():
            r.ok(f"embedded profile, tiny MoDA: {EMBEDDED_MODA} (shipped, no download)")
            _check_moda_runtime(r, cfg, EMBEDDED_MODA)
        else:
            r.problem(f"embedded tiny MoDA missing: {EMBEDDED_MODA} (+ .json)",
                      "restore models/embedded from the repository, retrain it with "
                      "bench/train_tiny.sh, or set motion.generator = \"procedural\"")
        return
    from .models import models_dir

    d = models_dir(cfg)
    try:
        from .models import list_models

        missing = [st.file.name for st in list_models(d) if st.state == "missing"]
    except Exception as e:
        missing = [f"(cannot list: {e})"]
    if missing:
        r.problem(f"official weights missing in {d}: {', '.join(missing)}",
                  "avatar-agent models fetch official (needs internet), or set motion.models_dir")
    else:
        r.ok(f"official weights in {d}")


def _check_avatar(r: Report, cfg: Config) -> None:
    path = cfg.avatar_path()
    if not path.is_file():
        r.problem(f"avatar image {path} does not exist", "set avatar.image to a portrait photo")
        return
    try:
        from .face.landmarks import detect_landmarks, load_portrait

        lm = detect_landmarks(load_portrait(path))   # as the agent loads it
        r.ok(f"avatar {path.name}: face found" + (f" ({'; '.join(lm.warnings)})" if lm.warnings else ""))
    except Exception as e:
        r.problem(f"avatar {path}: {e}", "use a frontal portrait with one clearly visible face")


def _check_sinks(r: Report, cfg: Config) -> None:
    """What would keep a sink (or the web server) from starting, found before `start` does."""
    from .wiring import virtualcam_available

    enabled = set(cfg.sinks.enabled)
    usable = set()
    if "auto" in enabled:
        usable.add("webrtc")
        if virtualcam_available():
            usable.add("virtualcam")
    if "file" in enabled:
        from .offline import OutputError, check_output

        path = cfg.resolve(cfg.sinks.file)
        inputs = [cfg.avatar_path()] + ([cfg.resolve(cfg.audio.file)] if cfg.audio.file else [])
        try:
            check_output(path, inputs, name="sinks.file =")
            r.ok(f"file sink can write {path}")
            usable.add("file")
        except OutputError as e:
            r.problem(f"file sink: {e}",
                      "set sinks.file to an .mp4 path in a writable folder")
    if "virtualcam" in enabled and virtualcam_available():
        usable.add("virtualcam")
    usable |= enabled & {"webrtc", "vmic"}
    if not usable:
        r.problem(f"no sink of sinks.enabled = {sorted(enabled)} can start: the avatar would be "
                  "shown nowhere", "fix the problems above or add \"webrtc\" (the local web page)")
    if "webrtc" in usable:
        _check_port(r, cfg)


def _check_port(r: Report, cfg: Config) -> None:
    """The web server's port must be free (or held by an agent running this config)."""
    import errno
    import socket

    host, port = cfg.server.host, cfg.server.port
    if port == 0:
        return
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(info[0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as aiohttp binds
            sock.bind(info[4])
    except OSError as e:
        if e.errno == errno.EADDRINUSE and _running_agent(cfg):
            r.note(f"server port {host}:{port} is in use by a running agent (shown below)")
        elif e.errno == errno.EADDRINUSE:
            r.problem(f"server.port {port} on {host} is in use by another program",
                      "stop that program or set server.port to a free port (0 = any)")
        else:
            r.problem(f"the web server cannot listen on {host}:{port} ({e.strerror or e})",
                      "set server.host / server.port to an address of this machine")
    else:
        r.ok(f"web server port {host}:{port} is free")


def _running_agent(cfg: Config) -> tuple[str, dict] | None:
    """Figures of an agent already running with this config (GET /api/status), if any."""
    import json
    import urllib.request

    host = "127.0.0.1" if cfg.server.host in ("0.0.0.0", "::") else cfg.server.host
    url = f"http://{host}:{cfg.server.port}/api/status"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {cfg.server.token}"}
                                 if cfg.server.token else {})
    try:
        with urllib.request.urlopen(req, timeout=0.5) as r:
            return url, json.loads(r.read())
    except Exception:
        return None
