"""Training the MoDA DiT: rectified-flow objective, condition dropout, EMA, checkpoints, export.

Objective (paper eq. 4–5, arXiv 2507.03256; release flow_matching.py):

* σ ~ U(σ_min, 1), t = 1000·σ, ε ~ N(0, I); x_t = σ·ε + (1 − σ)·x0; the DiT predicts the velocity
  v̂ ≈ ε − x0:  L_RF = ‖v̂ − (ε − x0)‖².
* The clean motion implied by the prediction, x̂0 = x_t − σ·v̂, must move like the target:
  L_vel = ‖Δx̂0 − Δx0‖² + ‖Δ²x̂0 − Δ²x0‖² (first and second temporal differences).  The previous
  frame (the continuity condition) is prepended to both sequences so the seam is supervised too.
* L = L_RF + w_vel·‖Δ‖² + w_acc·‖Δ²‖² (all means over elements).
* Condition dropout (paper: speech 0.5, emotion 0.1): a dropped audio condition becomes the learned
  null audio feature (saved with the model; the CFG unconditional pass uses it), a dropped emotion
  becomes the null class 8.  Identity and the previous frame are never dropped (as at inference).

Optimiser AdamW, linear warm-up then cosine decay, gradient clipping, EMA of the weights (exported),
bf16 autocast on GPU.  All randomness comes from two generators owned by the :class:`Trainer` (data:
numpy, noise/σ/dropout: torch CPU), saved in the checkpoint, so a resumed run continues exactly as an
uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from avatar_agent.motion.moda_load import (EXPORT_FORMAT, EXPORT_VERSION, INFERENCE_DEFAULTS,
                                           export_paths)
from avatar_agent.motion.template import neutral_template
from avatar_agent.nn.layers import AdaLN
from avatar_agent.nn.moda import PRESETS, MoDADiT, MoDAParams, count_parameters
from avatar_agent.train.shards import ShardDataset, Stats

CHECKPOINT = "checkpoint.pt"
LOSS_KEYS = ("loss", "rf", "vel", "acc")


class TrainError(ValueError):
    """Bad training configuration, checkpoint or export file."""


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters.

    Attributes:
        preset: :data:`avatar_agent.nn.moda.PRESETS` name.
        overrides: MoDAParams fields replacing the preset's (e.g. ``{"hidden": 64}``); the audio
            layout (blocks, dim) always comes from the dataset.
        seq_len: frames per training segment N (default: the preset's ``seq_len``).
        batch_size, steps: segments per step, optimiser steps in total.
        lr, weight_decay, betas: AdamW settings; warmup_steps of linear warm-up, then cosine decay
            to ``min_lr_ratio · lr`` at ``steps``.
        grad_clip: max global gradient norm (0 = off).
        ema_decay: EMA decay (with the usual (1+n)/(10+n) warm-up).
        sigma_min: smallest σ drawn (the release's 1/1000).
        p_drop_audio, p_drop_emotion: condition dropout probabilities.
        p_tail_zero: probability that a segment's audio features are zeroed from a random frame on
            (kept frames 1..N−1).  Streaming inference (``MoDAMotion``) and the release's last
            segment pad the window's unknown future with zero features; this teaches the model
            what that means.  Only with ``dropout``.
        w_vel, w_acc: weights of the first/second-difference consistency losses.
        relative: learn motion relative to the avatar's rest pose, with a fixed identity
            condition (see :func:`avatar_agent.train.shards.compute_stats`); the export records it
            and inference adds the portrait's rest pose back.  The embedded tiny model uses it.
        seed: seeds the initial weights and both training generators.
        device: "cpu", "cuda", ...; bf16: autocast the forward pass to bfloat16 (GPU).
        threads: torch intra-op threads on CPU (0 = leave torch's default).
        log_every, ckpt_every, val_every: steps between loss rows, checkpoints, validation.
        val_fraction: utterances held out for validation loss.
        val_batch: segments in the (fixed) validation batch.
        max_minutes: stop (checkpoint + export) after this wall time; None = no limit.
    """

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    seq_len: int | None = None
    batch_size: int = 32
    steps: int = 20000
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    sigma_min: float = 0.001
    p_drop_audio: float = 0.5
    p_drop_emotion: float = 0.1
    p_tail_zero: float = 0.25
    w_vel: float = 1.0
    w_acc: float = 1.0
    relative: bool = False
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    threads: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    val_every: int = 250
    val_fraction: float = 0.02
    val_batch: int = 64
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise TrainError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name in ("batch_size", "steps", "log_every", "ckpt_every", "val_every"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("p_drop_audio", "p_drop_emotion", "p_tail_zero"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise TrainError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.sigma_min < 1.0:
            raise TrainError(f"sigma_min must be within (0, 1), got {self.sigma_min}")
        bad = set(self.overrides) - {f.name for f in dataclasses.fields(MoDAParams)}
        if bad:
            raise TrainError(f"overrides name unknown MoDAParams fields {sorted(bad)}")

    def params(self, audio_blocks: int, audio_dim: int) -> MoDAParams:
        """The model's hyper-parameters for a dataset with (blocks, dim) audio features."""
        p = dataclasses.replace(PRESETS[self.preset], **self.overrides)
        return dataclasses.replace(p, audio_unit_len=1, audio_blocks=audio_blocks,
                                   audio_dim=audio_dim, seq_len=self.seq_len or p.seq_len)


def init_weights(model: MoDADiT) -> None:
    """adaLN-Zero initialisation (DiT): zero the modulation and output projections.

    Every block then starts as the identity and the network outputs 0, a stable starting point;
    everything else keeps PyTorch's default initialisation.
    """
    for mod in model.modules():
        if isinstance(mod, AdaLN):
            linear = cast(nn.Linear, mod[1])                  # AdaLN is (SiLU, Linear)
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based): warm-up, then cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def flow_losses(model: MoDADiT, null_audio: torch.Tensor, batch: dict[str, torch.Tensor],
                gen: torch.Generator, cfg: TrainConfig, dropout: bool = True
                ) -> dict[str, torch.Tensor]:
    """The training objective on one batch (see module docstring); returns the loss terms.

    Random draws (ε, σ, dropout masks) come from the CPU generator ``gen`` in a fixed order, so
    they do not depend on the device.
    """
    dev = next(model.parameters()).device
    x0 = batch["motion"].to(dev)                                                 # [B, N, 70]
    prev = batch["prev"].to(dev)                                                 # [B, 1, 70]
    audio = batch["audio"].to(dev)                                               # [B, N, U, L, D]
    emo = batch["emotion"].to(dev)                                               # [B]
    ident = batch["identity"].to(dev)                                            # [B, 63]
    b, n, _ = x0.shape
    eps = torch.randn(x0.shape, generator=gen).to(dev)                           # [B, N, 70]
    sigma = (cfg.sigma_min + (1 - cfg.sigma_min) * torch.rand(b, generator=gen)).to(dev)  # [B]
    drop_a = (torch.rand(b, generator=gen) < cfg.p_drop_audio).to(dev)           # [B]
    drop_e = (torch.rand(b, generator=gen) < cfg.p_drop_emotion).to(dev)         # [B]
    tail = torch.rand(b, generator=gen) < cfg.p_tail_zero                        # [B]
    keep = torch.randint(1, max(n, 2), (b,), generator=gen)                      # [B] frames kept
    if dropout:
        future = (torch.arange(n)[None] >= keep[:, None]) & tail[:, None]        # [B, N]
        audio = audio.masked_fill(future.to(dev)[:, :, None, None, None], 0.0)
        audio = torch.where(drop_a[:, None, None, None, None],
                            null_audio.to(audio.dtype).expand_as(audio), audio)
        emo = torch.where(drop_e, torch.full_like(emo, model.params.null_emotion), emo)
    s = sigma[:, None, None]                                                     # [B, 1, 1]
    x_t = s * eps + (1 - s) * x0                                                 # [B, N, 70]
    motion_in = torch.cat([prev.expand(-1, n, -1), x_t], dim=-1)                 # [B, N, 140]
    use_bf16 = cfg.bf16 and dev.type != "cpu"
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
        v = model(motion_in, 1000.0 * sigma, audio, emo, ident)                  # [B, N, 70]
    v = v.float()
    rf = ((v - (eps - x0)) ** 2).mean()
    x0_hat = x_t - s * v                                                         # [B, N, 70]
    seq_hat = torch.cat([prev, x0_hat], dim=1)                                   # [B, N+1, 70]
    seq = torch.cat([prev, x0], dim=1)                                           # [B, N+1, 70]
    d1h, d1 = seq_hat.diff(dim=1), seq.diff(dim=1)                               # [B, N, 70]
    vel = ((d1h - d1) ** 2).mean()
    acc = ((d1h.diff(dim=1) - d1.diff(dim=1)) ** 2).mean()                       # [B, N-1, 70]
    loss = rf + cfg.w_vel * vel + cfg.w_acc * acc
    return {"loss": loss, "rf": rf, "vel": vel, "acc": acc}


class Trainer:
    """Model + null audio feature + EMA + AdamW + generators: one training run's whole state.

    Args:
        cfg: hyper-parameters.
        audio_shape: (blocks, dim) of the dataset's audio features.
        stats: the dataset's normalisation statistics (saved in checkpoints and exports).
        feature: the dataset's feature config (saved likewise).
    """

    def __init__(self, cfg: TrainConfig, audio_shape: tuple[int, int], stats: Stats,
                 feature: dict[str, Any]) -> None:
        self.cfg, self.stats, self.feature = cfg, stats, dict(feature)
        if cfg.threads > 0 and cfg.device == "cpu":
            torch.set_num_threads(cfg.threads)
        self.params = cfg.params(*audio_shape)
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)  # weight init; the training generators are separate
        model = MoDADiT(self.params)
        init_weights(model)
        self.model = model.to(self.device).train()
        # The dropped-audio feature: learned (starts at 0 = the standardised feature mean).
        self.null_audio = nn.Parameter(torch.zeros(1, 1, 1, audio_shape[0], audio_shape[1],
                                                   device=self.device))
        self.opt = torch.optim.AdamW(list(self.model.parameters()) + [self.null_audio], lr=cfg.lr,
                                     betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.ema = {k: v.detach().clone().float() for k, v in self._named_state().items()}
        self.step = 0
        self.rng = np.random.default_rng(cfg.seed)              # data sampling
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # ε, σ, dropout
        self.history: list[dict[str, float]] = []
        self.elapsed = 0.0

    def _named_state(self) -> dict[str, torch.Tensor]:
        d = dict(self.model.state_dict())
        d["null_audio"] = self.null_audio.data
        return d

    @property
    def n_params(self) -> int:
        """Number of scalars in the model's parameters."""
        return count_parameters(self.model)

    def train_step(self, batch: dict[str, torch.Tensor],
                   gen: torch.Generator | None = None) -> dict[str, float]:
        """One optimiser step on ``batch``; returns the loss terms (before the update)."""
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = lr_at(cfg, self.step)
        self.model.train()
        parts = flow_losses(self.model, self.null_audio, batch, gen or self.gen, cfg)
        self.opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if cfg.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(
                list(self.model.parameters()) + [self.null_audio], cfg.grad_clip))
        else:
            gnorm = float("nan")
        self.opt.step()
        self.step += 1
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for k, v in self._named_state().items():
                e = self.ema[k]
                if v.dtype.is_floating_point:
                    e.mul_(decay).add_(v.detach().float(), alpha=1 - decay)
                else:
                    e.copy_(v)
        out = {k: float(t.detach()) for k, t in parts.items()}
        out["grad_norm"] = gnorm
        return out

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor], seed: int = 0, use_ema: bool = False
                  ) -> dict[str, float]:
        """Loss terms on ``batch`` with fixed noise/σ (``seed``) and no condition dropout."""
        null: torch.Tensor  # the parameter, or the EMA's plain tensor
        model, null = self.model, self.null_audio
        if use_ema:
            model = MoDADiT(self.params).to(self.device)
            model.load_state_dict({k: v for k, v in self.ema.items() if k != "null_audio"})
            null = self.ema["null_audio"]
        model.eval()
        parts = flow_losses(model, null, batch, torch.Generator().manual_seed(seed), self.cfg,
                            dropout=False)
        return {k: float(t) for k, t in parts.items()}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: config, weights, EMA, optimiser, step and RNG state."""
        return {
            "format": "avatar-agent-train", "version": 1,
            "cfg": dataclasses.asdict(self.cfg), "params": dataclasses.asdict(self.params),
            "model": self.model.state_dict(), "null_audio": self.null_audio.detach().cpu(),
            "ema": {k: v.cpu() for k, v in self.ema.items()}, "opt": self.opt.state_dict(),
            "step": self.step, "rng": json.dumps(self.rng.bit_generator.state),
            "gen": self.gen.get_state(), "history": self.history, "elapsed": self.elapsed,
            "stats": self.stats.to_json(), "feature": self.feature,
        }

    def save(self, path: str | Path) -> Path:
        """Write the full training state atomically."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(p)
        return p

    def load(self, path: str | Path) -> None:
        """Restore the full training state written by :meth:`save` (same config required)."""
        st = _load_train_state(path)
        if st["params"] != dataclasses.asdict(self.params):
            raise TrainError(f"checkpoint {path} was trained with different model parameters "
                             f"({st['params']}); use a fresh output directory or the same config")
        self.model.load_state_dict(st["model"])
        with torch.no_grad():
            self.null_audio.copy_(st["null_audio"].to(self.device))
        self.opt.load_state_dict(st["opt"])
        self.ema = {k: v.to(self.device).float() for k, v in st["ema"].items()}
        self.step = int(st["step"])
        self.rng.bit_generator.state = json.loads(st["rng"])
        self.gen.set_state(st["gen"])
        self.history = list(st["history"])
        self.elapsed = float(st.get("elapsed", 0.0))


def _load_train_state(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"checkpoint {p} not found")
    try:
        st = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt/foreign files
        raise TrainError(f"{p} is not a readable training checkpoint ({e})") from e
    if not isinstance(st, dict) or st.get("format") != "avatar-agent-train":
        raise TrainError(f"{p} is not an avatar-agent training checkpoint")
    return st


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _write_curves(out_dir: Path, history: list[dict[str, float]]) -> None:
    """losses.csv (every logged row) and losses.png (train/val curves, log scale)."""
    if not history:
        return
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "step", k))
    with open(out_dir / "losses.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow(row)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in ("loss", "rf", "vel", "acc", "val_loss"):
        pts = [(r["step"], r[k]) for r in history if k in r and np.isfinite(r[k])]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=k, lw=1.5 if k in ("loss", "val_loss") else 0.8,
                    marker="o" if k == "val_loss" else None, ms=3)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "losses.png", dpi=100)
    plt.close(fig)


def train(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = True,
          progress: bool = True, export: str | Path | None = None) -> Trainer:
    """Train on a sharded corpus; checkpoints, loss curves (and optionally the export) in out_dir.

    Resumes from ``out_dir/checkpoint.pt`` when it exists and ``resume`` is set.  Stops at
    ``cfg.steps`` or after ``cfg.max_minutes``; always leaves a checkpoint behind.
    """
    from avatar_agent.train.shards import compute_stats, load_index, split_utterances

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = load_index(data_dir)
    if "stats" not in index or Stats.from_json(index["stats"]).relative != cfg.relative:
        compute_stats(data_dir, relative=cfg.relative)                          # the space asked for
        index = load_index(data_dir)
    n_utt = int(index["utterances"])
    train_ids, val_ids = split_utterances(n_utt, cfg.val_fraction if n_utt > 20 else 0.0, cfg.seed)
    seq_len = cfg.params(1, 1).seq_len
    data = ShardDataset(data_dir, seq_len, utterances=train_ids)
    val = ShardDataset(data_dir, seq_len, utterances=val_ids, stats=data.stats) if val_ids else None
    val_batch = val.random_batch(np.random.default_rng(12345), cfg.val_batch) if val else None

    trainer = Trainer(cfg, data.audio_shape, data.stats, data.feature)
    ckpt = out / CHECKPOINT
    if resume and ckpt.exists():
        trainer.load(ckpt)
    (out / "config.json").write_text(json.dumps(
        {"cfg": dataclasses.asdict(cfg), "params": dataclasses.asdict(trainer.params),
         "n_params": trainer.n_params, "data": str(data_dir), "train_utterances": len(data),
         "val_utterances": len(val) if val else 0}, indent=1) + "\n", encoding="utf-8")

    bar = None
    if progress:
        from tqdm import tqdm

        import sys

        bar = tqdm(total=cfg.steps, initial=trainer.step, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    t0, base = time.monotonic(), trainer.elapsed
    acc: dict[str, list[float]] = {}
    try:
        while trainer.step < cfg.steps:
            batch = data.random_batch(trainer.rng, cfg.batch_size)
            parts = trainer.train_step(batch)
            for k, v in parts.items():
                acc.setdefault(k, []).append(v)
            trainer.elapsed = base + time.monotonic() - t0
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{parts['loss']:.4f}", rf=f"{parts['rf']:.4f}")
            last = trainer.step >= cfg.steps
            timed_out = cfg.max_minutes is not None and trainer.elapsed > 60 * cfg.max_minutes
            if trainer.step % cfg.log_every == 0 or last or timed_out:
                row = {"step": float(trainer.step), "lr": lr_at(cfg, trainer.step - 1),
                       "elapsed_s": round(trainer.elapsed, 2)}
                row.update({k: float(np.mean(v)) for k, v in acc.items()})
                acc = {}
                if val_batch is not None and (trainer.step % cfg.val_every == 0 or last or timed_out):
                    row["val_loss"] = trainer.eval_loss(val_batch, use_ema=True)["loss"]
                trainer.history.append(row)
            if trainer.step % cfg.ckpt_every == 0 or last or timed_out:
                trainer.save(ckpt)
                _write_curves(out, trainer.history)
            if timed_out:
                break
    finally:
        if bar is not None:
            bar.close()
    if export is not None:
        export_checkpoint(trainer, export)
    return trainer


# --------------------------------------------------------------------------------------------
# Export (loaded by avatar_agent.motion.moda_load)
# --------------------------------------------------------------------------------------------


def export_checkpoint(source: Trainer | str | Path, path: str | Path, use_ema: bool = True) -> Path:
    """Write ``<path>.safetensors`` (the DiT's state dict) and ``<path>.json`` (everything else).

    The JSON holds: ``params`` (MoDAParams fields), ``feature`` (audio feature config),
    ``motion_mean``/``motion_std`` [70], ``audio_mean``/``audio_std`` [L][D], ``null_audio``
    [L][D] (the CFG null feature), ``profile`` ("embedded") and training provenance.

    Args:
        source: a :class:`Trainer`, or a training checkpoint path (``checkpoint.pt``).
        path: output path (with or without the ``.safetensors`` suffix).
        use_ema: export the EMA weights (default) instead of the raw ones.
    """
    from safetensors.torch import save_file

    if isinstance(source, Trainer):
        st = source.state_dict()
    else:
        st = _load_train_state(source)
    if use_ema:
        weights = {k: v for k, v in st["ema"].items() if k != "null_audio"}
        null = st["ema"]["null_audio"]
    else:
        weights, null = st["model"], st["null_audio"]
    w_path, j_path = export_paths(path)
    w_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in weights.items()}, str(w_path))
    stats = st["stats"]
    meta = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "profile": "embedded",
        "params": st["params"], "feature": st["feature"],
        "motion_mean": stats["motion_mean"], "motion_std": stats["motion_std"],
        "relative": bool(stats.get("relative", False)),
        "audio_mean": stats["audio_mean"], "audio_std": stats["audio_std"],
        "null_audio": null.detach().float().cpu().reshape(null.shape[-2], null.shape[-1]).tolist(),
        "inference": dict(INFERENCE_DEFAULTS),
        # Relative models are identity-agnostic: inference feeds this fixed shape (the corpus'
        # template, the centre of its identity range) instead of a portrait's keypoints.
        "identity": (neutral_template().reshape(-1).astype(float).tolist()
                     if stats.get("relative") else None),
        "train": {"step": st["step"], "ema": use_ema, "cfg": st["cfg"],
                  "elapsed_s": round(float(st.get("elapsed", 0.0)), 1)},
    }
    j_path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return w_path


__all__ = ["TrainConfig", "Trainer", "train", "flow_losses", "lr_at", "init_weights",
           "export_checkpoint", "TrainError"]
