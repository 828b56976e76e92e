"""Shared fixtures: a private PulseAudio daemon and espeak-ng speech.

``pulse_server``: a PulseAudio daemon of this test's own (own XDG_RUNTIME_DIR/HOME), with
  * sink ``mic_feed`` whose monitor is remapped to source ``vmic`` = the default source, so whatever
    is played into ``mic_feed`` (``paplay -d mic_feed``, ``PULSE_SINK=mic_feed espeak-ng ...``) is
    what a capture from the default input / PortAudio device "pulse" records;
  * sink ``speaker`` = the default sink.
  The environment (XDG_RUNTIME_DIR, HOME, PULSE_SERVER) is set for this process and its children,
  PortAudio is re-initialised so it sees the server, and the daemon is stopped by PID afterwards.
  Start recording before playing: PortAudio on Pulse can take up to ~2 s to deliver its first block.

``speech_wav``: a factory making espeak-ng speech WAVs (``espeak-ng -w``), cached per session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

PULSE_SCRIPT = """\
load-module module-native-protocol-unix auth-anonymous=1
load-module module-null-sink sink_name=speaker
load-module module-null-sink sink_name=mic_feed
load-module module-remap-source master=mic_feed.monitor source_name=vmic
set-default-sink speaker
set-default-source vmic
"""


def _reinit_portaudio() -> None:
    """Make PortAudio re-enumerate devices (it only does so at initialisation)."""
    try:
        import sounddevice as sd
    except (ImportError, OSError):
        return
    sd._terminate()
    sd._initialize()


def missing(reason: str) -> None:
    """A system component the tests need is absent: skip on a developer's machine, but fail in
    CI ($CI set), where install.sh must have installed it — a skip there would hide a broken
    install step."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI: install.sh should have installed it)")
    pytest.skip(reason)


class PulseServer:
    """A private PulseAudio daemon; ``stop()``/``start()`` let tests simulate a dying server."""

    def __init__(self, root: Path) -> None:
        self.runtime_dir = root / "run"
        self.home = root / "home"
        self.runtime_dir.mkdir(mode=0o700)
        self.home.mkdir()
        self.script = root / "test.pa"
        self.script.write_text(PULSE_SCRIPT)
        self.log_path = root / "pulse.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point clients at this daemon."""
        return {"XDG_RUNTIME_DIR": str(self.runtime_dir), "HOME": str(self.home),
                "PULSE_SERVER": f"unix:{self.runtime_dir}/pulse/native"}

    def start(self, timeout: float = 10.0) -> None:
        """Start the daemon and wait until it answers ``pactl info``."""
        assert self.proc is None, "already running"
        env = {**os.environ, **self.env}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["pulseaudio", "--daemonize=no", "-n", "-F", str(self.script),
             "--exit-idle-time=-1", "--log-target=stderr", "--use-pid-file=no"],
            env=env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pulseaudio exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace")[-2000:])
            if subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode == 0:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("pulseaudio did not become ready in time:\n"
                           + self.log_path.read_text(errors="replace")[-2000:])

    def stop(self, kill: bool = False) -> None:
        """Stop the daemon we started (SIGTERM, or SIGKILL to simulate a crash)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill() if kill else proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def play(self, wav: Path | str, sink: str = "mic_feed") -> subprocess.Popen[bytes]:
        """Start ``paplay`` of a WAV into a sink (default: the fake microphone); returns the
        process (wait on it)."""
        return subprocess.Popen(["paplay", "-d", sink, str(wav)], env={**os.environ, **self.env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def speak(self, text: str, sink: str = "mic_feed", voice: str = "en-us"
              ) -> subprocess.Popen[bytes]:
        """Start espeak-ng speaking straight into a sink (``PULSE_SINK``); returns the process."""
        return subprocess.Popen(["espeak-ng", "-v", voice, text],
                                env={**os.environ, **self.env, "PULSE_SINK": sink},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture
def pulse_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[PulseServer]:
    """A running private PulseAudio daemon (see module docstring)."""
    if not (shutil.which("pulseaudio") and shutil.which("pactl")):
        missing("needs apt packages pulseaudio pulseaudio-utils libasound2-plugins")
    root = Path(tempfile.mkdtemp(prefix="pulse-"))
    server = PulseServer(root)
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    server.start()
    _reinit_portaudio()
    try:
        yield server
    finally:
        server.stop()
        monkeypatch.undo()
        _reinit_portaudio()
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class SpeechWav:
    """An espeak-ng utterance on disk.

    Attributes:
        path: the WAV file (16-bit mono at ``rate``).
        samples: its audio as float32.
        rate: its sample rate (22050 for espeak-ng).
        speech_start / speech_end: seconds where the signal is above the silence floor (espeak's
            own leading/trailing silence and the requested padding excluded).
    """

    path: Path
    samples: np.ndarray
    rate: int
    speech_start: float
    speech_end: float

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.samples.size / self.rate


def _energy_bounds(x: np.ndarray, rate: int) -> tuple[float, float]:
    hop = rate // 100
    n = x.size // hop
    if n == 0:
        return 0.0, 0.0
    rms = np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1))
    active = np.flatnonzero(rms > 0.01)
    if active.size == 0:
        return 0.0, 0.0
    return active[0] * hop / rate, (active[-1] + 1) * hop / rate


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory
               ) -> Callable[..., SpeechWav]:
    """Factory: ``speech_wav(text, voice="en-us", wpm=175, lead_s=0, tail_s=0)`` → SpeechWav.

    ``lead_s``/``tail_s`` add exact digital silence before/after espeak-ng's output.
    """
    if not shutil.which("espeak-ng"):
        missing("needs apt package espeak-ng")
    import soundfile as sf

    root = tmp_path_factory.mktemp("speech")
    cache: dict[tuple, SpeechWav] = {}

    def make(text: str = "Hello there. This is a test of the talking avatar.",
             voice: str = "en-us", wpm: int = 175, lead_s: float = 0.0,
             tail_s: float = 0.0) -> SpeechWav:
        key = (text, voice, wpm, lead_s, tail_s)
        if key in cache:
            return cache[key]
        raw = root / f"raw{len(cache)}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(raw), text],
                       check=True, capture_output=True)
        x, rate = sf.read(raw, dtype="float32")
        if x.ndim > 1:
            x = x.mean(axis=1)
        x = np.concatenate([np.zeros(int(round(lead_s * rate)), np.float32), x,
                            np.zeros(int(round(tail_s * rate)), np.float32)])
        path = root / f"speech{len(cache)}.wav"
        sf.write(path, x, rate, subtype="PCM_16")
        x, _ = sf.read(path, dtype="float32")  # exactly what is on disk
        start, end = _energy_bounds(x, rate)
        cache[key] = SpeechWav(path, x, rate, start, end)
        return cache[key]

    return make
