"""Config → plug-ins: the embedded profile's generator choice, including the tiny MoDA path."""

import dataclasses

import numpy as np
import pytest

from avatar_agent import wiring
from avatar_agent.config import ConfigError, load_config
from avatar_agent.motion.procedural import ProceduralMotion
from avatar_agent.train.loop import export_checkpoint
from tests.train.test_loop import _trainer, data, small_cfg  # noqa: F401  (data is a fixture)


def test_embedded_auto_is_procedural_and_fps_is_checked():
    cfg = load_config(None, [], use_default_path=False)
    assert isinstance(wiring.make_motion(cfg), ProceduralMotion)
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
