"""Config → plug-ins: the embedded profile's generator choice, including the tiny MoDA path."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from avatar_agent import wiring
from avatar_agent.config import ConfigError, load_config
from avatar_agent.motion.procedural import ProceduralMotion
from avatar_agent.train.loop import export_checkpoint
from tests.train.test_loop import _trainer, data, small_cfg  # noqa: F401  (data is a fixture)


def test_embedded_auto_is_the_shipped_tiny_moda_and_fps_is_checked():
    from avatar_agent.motion.moda import EmbeddedMoDA

    cfg = load_config(None, [], use_default_path=False)
    assert wiring.uses_embedded_moda(cfg) and wiring.EMBEDDED_MODA.is_file()
    gen = wiring.make_motion(cfg)
    assert isinstance(gen, EmbeddedMoDA) and gen.moda.relative and gen.min_hop_ms == 160
    procedural = load_config(None, ["motion.generator=procedural"], use_default_path=False)
    assert isinstance(wiring.make_motion(procedural), ProceduralMotion)
    with pytest.raises(ConfigError, match="25 fps"):
        wiring.make_motion(load_config(None, ["player.fps=50", "chunker.hop_ms=80"],
                                       use_default_path=False))


def test_moda_without_a_trained_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(wiring, "EMBEDDED_MODA", tmp_path / "missing.safetensors")
    cfg = load_config(None, ["motion.generator=moda"], use_default_path=False)
    with pytest.raises(ConfigError, match="train_tiny.sh"):
        wiring.make_motion(cfg)


def test_embedded_moda_speaks_with_the_dit_and_idles_procedurally(data, tmp_path, monkeypatch):
    from avatar_agent.motion.template import template_avatar
    from avatar_agent.types import SpeechChunk

    tr, _ = _trainer(data, dataclasses.replace(small_cfg(), seq_len=16))
    path = export_checkpoint(tr, tmp_path / "tiny.safetensors")
    monkeypatch.setattr(wiring, "EMBEDDED_MODA", path)
    cfg = load_config(None, ["motion.generator=moda", "motion.steps=2"], use_default_path=False)
    gen = wiring.make_motion(cfg)
    avatar = template_avatar()
    gen.prepare(avatar)
    rest = gen.rest_pose
    audio = (0.2 * np.sin(np.arange(16000) * 0.07)).astype(np.float32)
    chunk = SpeechChunk(audio=audio, start=640 * 5, n_new=640 * 8, left=640 * 5,
                        right=16000 - 640 * 13, speech=True)
    m = gen.generate(chunk, rest)
    assert m.shape == (8, 70) and np.isfinite(m).all()
    idle = gen.idle(10, m[-1], 0.5)
    assert idle.shape == (10, 70)
    # Idle relaxes from where speech left off (no snap) towards the rest pose.
    assert np.abs(idle[0] - m[-1]).max() < np.abs(m[-1] - rest).max() + 1e-6
    assert np.abs(idle[-1] - rest).max() < np.abs(m[-1] - rest).max() + 1e-6


def test_generator_min_hop_raises_the_chunk_hop(data, tmp_path, monkeypatch):
    from avatar_agent.check import implied_latency_ms
    from avatar_agent.config import chunker_params

    cfg = load_config(None, [], use_default_path=False)
    assert chunker_params(cfg).hop_ms == 80
    assert chunker_params(cfg, 160).hop_ms == 160
    assert chunker_params(cfg, 150).hop_ms == 160                 # rounded up to whole frames
    assert chunker_params(load_config(None, ["chunker.hop_ms=200"], use_default_path=False), 160).hop_ms == 200
    # The tiny MoDA's hop comes from its model file and shows in `check`'s latency figures.
    tr, _ = _trainer(data, dataclasses.replace(small_cfg(), seq_len=16))
    monkeypatch.setattr(wiring, "EMBEDDED_MODA", export_checkpoint(tr, tmp_path / "tiny.safetensors"))
    moda_cfg = load_config(None, ["motion.generator=moda"], use_default_path=False)
    assert wiring.motion_min_hop_ms(moda_cfg) == 160 and wiring.motion_min_hop_ms(cfg) == 160
    assert implied_latency_ms(moda_cfg)["total"] - implied_latency_ms(
        load_config(None, ["motion.generator=procedural"], use_default_path=False))["total"] == 80
    gen = wiring.make_motion(moda_cfg)
    assert gen.min_hop_ms == 160


def test_check_reports_the_embedded_generator_and_a_missing_model(monkeypatch, tmp_path):
    from avatar_agent.check import Report, _check_models

    moda = load_config(None, ["motion.generator=moda"], use_default_path=False)
    r = Report()
    _check_models(r, moda)
    assert not r.problems and "tiny MoDA" in r.lines[-1]
    monkeypatch.setattr(wiring, "EMBEDDED_MODA", tmp_path / "gone.safetensors")
    r = Report()
    _check_models(r, moda)
    assert len(r.problems) == 1 and "procedural" in r.problems[0][1]
    r = Report()
    _check_models(r, load_config(None, ["motion.generator=procedural"], use_default_path=False))
    assert not r.problems and "procedural" in r.lines[-1]


def test_the_live_path_never_imports_the_trainer():
    # A fresh interpreter: building the default embedded motion (the shipped tiny MoDA) and
    # everything wiring needs must not pull in avatar_agent.train.
    code = ("import sys\n"
            "from avatar_agent import wiring\n"
            "from avatar_agent.config import Config\n"
            "gen = wiring.make_motion(Config())\n"
            "assert type(gen).__name__ == 'EmbeddedMoDA', gen\n"
            "print(sorted(m for m in sys.modules if m.startswith('avatar_agent.train')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_motion_config_overrides_the_model_files_inference_settings(capsys):
    from avatar_agent.check import run_check

    over = ["motion.steps=2", "motion.cfg_audio=0.5", "motion.window_frames=12",
            "motion.hop_frames=6", "motion.crossfade_frames=0", "motion.context_frames=2",
            "motion.min_hop_ms=200"]
    cfg = load_config(None, over, use_default_path=False)
    want = {"steps": 2, "cfg_audio": 0.5, "window": 12, "hop": 6, "crossfade": 0, "context": 2,
            "min_hop_ms": 200}
    settings = wiring.moda_settings(cfg)
    assert {k: settings[k] for k in want} == want
    gen = wiring.make_motion(cfg).moda
    assert (gen.steps, gen.guidance.audio, gen.window, gen.hop, gen.crossfade, gen.context,
            gen.min_hop_ms) == tuple(want.values())
    # One source for the hop floor: the built generator and the config-only path agree.
    assert wiring.motion_min_hop_ms(cfg) == gen.min_hop_ms == 200
    # Defaults = the model file's own values (what its JSON says), shown by `check`.
    default = wiring.moda_settings(load_config(None, [], use_default_path=False))
    import json

    own = json.loads(wiring.EMBEDDED_MODA.with_suffix(".json").read_text())
    assert {k: default[k] for k in own["inference"]} == own["inference"]
    assert default["window"] == own["params"]["seq_len"]
    run_check(cfg, out=print)
    text = capsys.readouterr().out
    assert "MoDA inference settings" in text
    assert any(line.split() == ["hop", "6"] for line in text.splitlines())
    # Settings the model cannot run with, or out of range: one clear config error each.
    with pytest.raises(ConfigError, match="context"):
        wiring.make_motion(load_config(None, ["motion.context_frames=20"], use_default_path=False))
    with pytest.raises(ConfigError, match="motion.hop_frames = -2"):
        load_config(None, ["motion.hop_frames=-2"], use_default_path=False)
