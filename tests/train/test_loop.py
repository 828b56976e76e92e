"""Training loop: the objective learns, resume is exact, export/load round-trips; CLI; eval metrics."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar_agent.motion.moda_load import (INFERENCE_DEFAULTS, ModelFileError, build_motion,
                                           load_trained)
from avatar_agent.motion.template import template_avatar
from avatar_agent.nn.moda import MoDADiT
from avatar_agent.train.cli import prep_main, train_main
from avatar_agent.train.corpus import build_corpus
from avatar_agent.train.loop import (
    TrainConfig, Trainer, TrainError, export_checkpoint, flow_losses, lr_at, train,
)
from avatar_agent.train.shards import ShardDataset
from avatar_agent.types import SpeechChunk

torch.set_num_threads(1)
SMALL = {"hidden": 32, "heads": 2, "n_four": 1, "n_two": 1, "n_single": 1}
ROOT = Path(__file__).resolve().parents[2]


def small_cfg(**kw) -> TrainConfig:
    base = dict(preset="tiny", overrides=SMALL, seq_len=16, batch_size=4, steps=60, lr=3e-3,
                warmup_steps=1, min_lr_ratio=1.0, val_fraction=0.0, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    build_corpus(d, 3, seed=5, params=_short_params())
    return d


def _short_params():
    from avatar_agent.train.corpus import CorpusParams

    return CorpusParams(min_frames=40)


def _trainer(data, cfg: TrainConfig) -> tuple[Trainer, ShardDataset]:
    ds = ShardDataset(data, cfg.seq_len)
    return Trainer(cfg, ds.audio_shape, ds.stats, ds.feature), ds


def test_overfits_one_batch(data):
    cfg = small_cfg(p_drop_audio=0.0, p_drop_emotion=0.0, p_tail_zero=0.0)
    tr, ds = _trainer(data, cfg)
    batch = ds.random_batch(np.random.default_rng(0), 4)
    first = tr.eval_loss(batch, seed=0)["loss"]
    for _ in range(40):
        tr.train_step(batch, gen=torch.Generator().manual_seed(0))
    last = tr.eval_loss(batch, seed=0)["loss"]
    assert np.isfinite(first) and last < 0.5 * first, (first, last)


def test_objective_terms(data):
    # Zero-initialised output layer → v̂ = 0: L_RF = E‖ε − x0‖², x̂0 = x_t.
    cfg = small_cfg()
    tr, ds = _trainer(data, cfg)
    batch = ds.random_batch(np.random.default_rng(1), 4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        parts = flow_losses(tr.model, tr.null_audio, batch, g, cfg, dropout=False)
    g = torch.Generator().manual_seed(3)
    x0 = batch["motion"]
    eps = torch.randn(x0.shape, generator=g)
    sigma = cfg.sigma_min + (1 - cfg.sigma_min) * torch.rand(4, generator=g)
    torch.testing.assert_close(parts["rf"], ((eps - x0) ** 2).mean())
    x_t = sigma[:, None, None] * eps + (1 - sigma[:, None, None]) * x0
    seq_hat, seq = torch.cat([batch["prev"], x_t], 1), torch.cat([batch["prev"], x0], 1)
    torch.testing.assert_close(parts["vel"], ((seq_hat.diff(dim=1) - seq.diff(dim=1)) ** 2).mean())
    assert float(parts["loss"]) == pytest.approx(float(parts["rf"] + parts["vel"] + parts["acc"]),
                                                 rel=1e-6)


def test_condition_dropout_replaces_audio_and_emotion(data):
    cfg = small_cfg()
    tr, ds = _trainer(data, cfg)
    with torch.no_grad():
        tr.null_audio.normal_()
        for prm in tr.model.parameters():      # non-zero output layers so conditions matter
            prm.add_(0.05 * torch.randn_like(prm))
    batch = ds.random_batch(np.random.default_rng(2), 4)
    other = dict(batch, audio=torch.randn_like(batch["audio"]))
    other_emo = dict(batch, emotion=(batch["emotion"] + 1) % 8)

    def loss(c, b, dropout=True):
        with torch.no_grad():
            return float(flow_losses(tr.model, tr.null_audio, b, torch.Generator().manual_seed(0),
                                     c, dropout=dropout)["loss"])

    keep_all = small_cfg(p_drop_audio=0.0, p_drop_emotion=0.0, p_tail_zero=0.0)
    assert loss(keep_all, batch) != loss(keep_all, other)
    assert loss(keep_all, batch) != loss(keep_all, other_emo)
    drop_audio = small_cfg(p_drop_audio=1.0, p_drop_emotion=0.0, p_tail_zero=0.0)
    assert loss(drop_audio, batch) == loss(drop_audio, other)
    assert loss(drop_audio, batch, dropout=False) != loss(drop_audio, other, dropout=False)
    drop_emo = small_cfg(p_drop_audio=0.0, p_drop_emotion=1.0, p_tail_zero=0.0)
    assert loss(drop_emo, batch) == loss(drop_emo, other_emo)
    # Tail zeroing keeps at most N−1 frames: the last frame's audio never matters.
    last = batch["audio"].clone()
    last[:, -1] = 5.0
    tail = small_cfg(p_drop_audio=0.0, p_drop_emotion=0.0, p_tail_zero=1.0)
    assert loss(tail, batch) == loss(tail, dict(batch, audio=last))
    assert loss(keep_all, batch) != loss(keep_all, dict(batch, audio=last))


def test_resume_equals_uninterrupted(data, tmp_path):
    cfg6 = small_cfg(steps=6, ckpt_every=3, lr=1e-3, warmup_steps=2)
    full = train(cfg6, data, tmp_path / "full", progress=False)
    train(dataclasses_replace(cfg6, steps=3), data, tmp_path / "split", progress=False)
    resumed = train(cfg6, data, tmp_path / "split", progress=False)
    assert resumed.step == 6
    a = [r["loss"] for r in full.history]
    b = [r["loss"] for r in resumed.history]
    assert len(a) == len(b) == 6
    assert a[3] == b[3] and a == b          # bit-identical losses after the resume point
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0)
    rows = list(csv.DictReader(open(tmp_path / "split" / "losses.csv")))
    assert [int(float(r["step"])) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "split" / "losses.png").stat().st_size > 1000


def dataclasses_replace(cfg: TrainConfig, **kw) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_export_load_identical_outputs(data, tmp_path):
    cfg = small_cfg(ema_decay=0.9)
    tr, ds = _trainer(data, cfg)
    for _ in range(3):
        tr.train_step(ds.random_batch(tr.rng, 4))
    g = torch.Generator().manual_seed(0)
    b, n = 2, 16
    inputs = (torch.randn(b, n, 140, generator=g), torch.tensor([900.0, 10.0]),
              torch.randn(b, n, 1, 1, 80, generator=g), torch.tensor([3, 8]),
              torch.randn(b, 63, generator=g))
    raw_path = export_checkpoint(tr, tmp_path / "raw.safetensors", use_ema=False)
    model, meta = load_trained(raw_path)
    tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), tr.model(*inputs), rtol=0, atol=0)
    torch.testing.assert_close(meta["null_audio"], tr.null_audio.detach(), rtol=0, atol=0)
    np.testing.assert_array_equal(meta["mean"], ds.stats.motion_mean)
    np.testing.assert_array_equal(meta["std"], ds.stats.motion_std)
    assert meta["feature"] == ds.feature and meta["profile"] == "embedded"

    export_checkpoint(tr, tmp_path / "ema", use_ema=True)
    ema_model, _ = load_trained(tmp_path / "ema.safetensors")
    ref = MoDADiT(tr.params)
    ref.load_state_dict({k: v for k, v in tr.ema.items() if k != "null_audio"})
    with torch.no_grad():
        torch.testing.assert_close(ema_model(*inputs), ref.eval()(*inputs), rtol=0, atol=0)
        assert not torch.equal(ema_model(*inputs), model(*inputs))   # EMA lags the raw weights

    # The export drives the streaming generator.
    motion = build_motion(tmp_path / "ema.safetensors", steps=2, hop=8)
    motion.prepare(template_avatar())
    audio = np.random.default_rng(0).normal(0, 0.05, 16000).astype(np.float32)
    out = motion.generate(SpeechChunk(audio, 0, 16000, 0, 0, True), template_avatar().rest_motion)
    assert out.shape == (25, 70) and np.all(np.isfinite(out))
    # Inference settings come from the export's JSON; arguments override them.
    meta_path = tmp_path / "ema.json"
    meta_j = json.loads(meta_path.read_text())
    assert meta_j["inference"] == INFERENCE_DEFAULTS
    meta_j["inference"] = {"steps": 3, "cfg_audio": 0.5, "hop": 6, "crossfade": 2, "min_hop_ms": 200,
                           "final_step": True, "feature_context": None}
    meta_path.write_text(json.dumps(meta_j))
    tuned = build_motion(tmp_path / "ema.safetensors")
    assert (tuned.steps, tuned.guidance.audio, tuned.hop, tuned.crossfade, tuned.min_hop_ms,
            tuned.final_step, tuned.feature_context) == (3, 0.5, 6, 2, 200, True, None)
    assert type(tuned.model).__name__ == "TracedDiT"
    assert build_motion(tmp_path / "ema.safetensors", steps=5, cfg_audio=0.0, trace=False).steps == 5
    meta_j["inference"]["warp"] = 1
    meta_path.write_text(json.dumps(meta_j))
    with pytest.raises(ModelFileError, match="warp"):
        build_motion(tmp_path / "ema.safetensors")

    with pytest.raises(ModelFileError, match="missing"):
        load_trained(tmp_path / "nothing.safetensors")
    # Weights that do not match the JSON's params: every missing key is named.
    from safetensors.torch import load_file, save_file
    w = load_file(str(tmp_path / "ema.safetensors"))
    w.pop("final_layer.linear.bias")
    save_file(w, str(tmp_path / "ema.safetensors"))
    with pytest.raises(ModelFileError, match="final_layer.linear.bias"):
        load_trained(tmp_path / "ema.safetensors")
    (tmp_path / "ema.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ModelFileError, match="corrupt"):
        load_trained(tmp_path / "ema.safetensors")
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "bad.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="not an"):
        load_trained(tmp_path / "bad")


def test_lr_schedule_and_config_checks():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 60) == pytest.approx(0.55e-3)
    assert lr_at(cfg, 110) == pytest.approx(1e-4)
    with pytest.raises(TrainError, match="preset"):
        TrainConfig(preset="huge")
    with pytest.raises(TrainError, match="unknown MoDAParams"):
        TrainConfig(overrides={"widht": 3})
    with pytest.raises(TrainError, match="p_drop_audio"):
        TrainConfig(p_drop_audio=1.5)


def test_cli_prep_train_export(tmp_path, capsys):
    d, run = tmp_path / "d", tmp_path / "run"
    assert prep_main(["--out", str(d), "--n", "2", "--min-frames", "40", "--quiet"]) == 0
    args = ["--data", str(d), "--out", str(run), "--steps", "2", "--batch", "2", "--seq-len", "16",
            "--quiet", "--export", str(tmp_path / "m.safetensors")]
    args += [f"--override={k}={v}" for k, v in SMALL.items()]
    assert train_main(args) == 0
    model, meta = load_trained(tmp_path / "m")
    assert model.params.hidden == 32 and meta["train"]["step"] == 2
    assert meta["relative"] is False and meta["identity"] is None
    assert train_main(["--out", str(run), "--export-only", "--export", str(tmp_path / "n")]) == 0
    assert json.loads((tmp_path / "n.json").read_text())["train"]["step"] == 2
    # --relative: statistics recomputed relative to the rest pose; the export says so and
    # carries the fixed identity that inference feeds instead of a portrait's keypoints.
    rel = ["--data", str(d), "--out", str(tmp_path / "rel"), "--steps", "2", "--batch", "2",
           "--seq-len", "16", "--quiet", "--relative", "--export", str(tmp_path / "r.safetensors")]
    assert train_main(rel + [f"--override={k}={v}" for k, v in SMALL.items()]) == 0
    _, rmeta = load_trained(tmp_path / "r")
    assert rmeta["relative"] is True and len(rmeta["identity"]) == 63
    gen = build_motion(tmp_path / "r.safetensors")
    assert gen.relative and np.allclose(gen.fixed_identity, rmeta["identity"])
    assert prep_main(["--out", str(tmp_path / "v"), "--video", "talk.mp4"]) == 2
    assert "motion extractor" in capsys.readouterr().err
    assert train_main(["--out", str(run), "--data", str(tmp_path / "none")]) == 2
    assert "data-prep" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# bench/eval_moda_tiny.py metric functions, checked on the procedural generator
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evalmod():
    spec = importlib.util.spec_from_file_location("eval_moda_tiny", ROOT / "bench" / "eval_moda_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_best_lag_corr_finds_a_known_lag(evalmod):
    x = np.random.default_rng(0).normal(size=200)
    y = np.roll(x, 2)                                  # y[t] = x[t-2]: y lags x by 2 frames
    r, lag = evalmod.best_lag_corr(y, x, 2)
    assert lag == 2 and r == pytest.approx(1.0, abs=0.05)
    r, lag = evalmod.best_lag_corr(x, y, 2)
    assert lag == -2 and r > 0.95


def test_eval_metrics_on_the_procedural_generator(evalmod):
    from avatar_agent.train.corpus import CorpusParams, make_sample

    smp = make_sample(99, 0, CorpusParams(augment=None))
    kp = smp.avatar.kp_canonical
    audio_only = evalmod.procedural(smp.clean, smp.avatar, 0)
    m = evalmod.clip_metrics(audio_only, smp.clean, kp)
    assert m["r_env"] > 0.5 and abs(m["lag_ms"]) <= 80
    assert m["closed_silent_%"] > 80
    # A frozen face has no lip/pose jerk and no correlation with the audio.
    still = np.repeat(audio_only[:1], audio_only.shape[0], 0)
    s = evalmod.clip_metrics(still, smp.clean, kp)
    assert s["jerk_lip"] == 0 and s["jerk_pose"] == 0 and np.isnan(s["r_env"])
    assert m["jerk_lip"] > 0
    # Teacher error of the teacher is zero; the audio-only generator differs but correlates.
    e0 = evalmod.teacher_error(smp.record.motion, smp.record.motion, kp)
    assert e0["err_exp"] == 0 and e0["r_teacher"] == pytest.approx(1.0)
    e1 = evalmod.teacher_error(audio_only, smp.record.motion, kp)
    assert e1["err_exp"] > 0 and e1["r_teacher"] > 0.4
    assert evalmod.diversity([audio_only, audio_only]) == 0
    noisy = audio_only + np.random.default_rng(0).normal(0, 0.01, audio_only.shape).astype(np.float32)
    # Std of two samples differing by n is |n|/2; E|n| = 0.01·√(2/π).
    assert evalmod.diversity([audio_only, noisy]) == pytest.approx(0.005 * np.sqrt(2 / np.pi), rel=0.05)
