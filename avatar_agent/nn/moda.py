"""MoDA motion DiT: multi-modal diffusion transformer predicting rectified-flow velocity.

Structure (the release's ``talking_head_dit.py``; paper: coarse-to-fine fusion):

    motion ‖ prev ─ MotionEmbedder ─┐ x [B,N,C]
    audio features ─ AudioEmbedder ─┤ y1 [B,N,C]
    emotion label ─ LabelEmbedder ──┤ y2 = emo_emb repeated over N
    canonical kp ── identity MLP ───┘ y3 = id_emb repeated over N
    c = time_emb + emo_emb  → adaLN of every block and the final layer
    n4 × FourStreamBlock  (x, y1, y2, y3: own weights, one joint attention over 4N tokens)
    n2 × TwoStreamBlock   (x, y = [y1|y2|y3]: two weight sets, joint attention over 4N tokens)
    n1 × SingleStreamBlock (h = [x|y]: one weight set, parallel attention+MLP)
    FinalLayer on h[:, :N] → velocity [B, N, out_dim]

RoPE (θ = 256, head dim) is applied to q/k with frame positions: motion and audio tokens get 0..N-1;
in the four-stream stage the emotion and identity streams get none; in the later stages the
condition stream gets ``[0..N-1] × 3`` (audio | emotion | identity segments).

State-dict keys equal the release's (without the ``talking_head_dit.`` prefix of its wrapper), so
``net-200.pth`` loads through :mod:`avatar_agent.nn.weights`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from avatar_agent.nn.layers import (
    AdaLN, LabelEmbedder, Mlp, MlpEmbedder, RMSNorm, TimestepEmbedder, apply_rope, attention,
    modulate, rope_tables,
)

RELEASE_PREFIX = "talking_head_dit."
"""Key prefix of the DiT inside the release's ``MotionDiffusion`` state dict."""


@dataclass(frozen=True)
class MoDAParams:
    """Hyper-parameters of the MoDA DiT.

    Attributes:
        hidden: model width C.
        heads: attention heads (head dim = hidden / heads).
        mlp_ratio: MLP hidden = mlp_ratio · hidden.
        motion_dim: motion channels per frame (70); the input is ``2·motion_dim`` (prev ‖ x_t).
        id_dim: identity condition width (63 = 21 canonical keypoints × xyz).
        audio_dim: audio feature width per layer/block (768 for HuBERT-base).
        audio_blocks: audio feature layers per frame (12 HuBERT layers).
        audio_unit_len: audio frames per motion frame window (1 in the release).
        n_emotions: emotion classes; label ``n_emotions`` is the null class.
        n_four / n_two / n_single: blocks per fusion stage.
        seq_len: frames per generated window N (the network itself works for any N).
        rope_theta: RoPE base.
        norm_eps: eps of the weight-free block RMSNorms; qk_norm_eps of the per-head q/k norms.
    """

    hidden: int = 768
    heads: int = 12
    mlp_ratio: float = 4.0
    motion_dim: int = 70
    id_dim: int = 63
    audio_dim: int = 768
    audio_blocks: int = 12
    audio_unit_len: int = 1
    n_emotions: int = 8
    n_four: int = 3
    n_two: int = 6
    n_single: int = 12
    seq_len: int = 80
    rope_theta: float = 256.0
    norm_eps: float = 1e-6
    qk_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"MoDAParams: hidden={self.hidden} must split into {self.heads} heads "
                             "of even size (RoPE rotates pairs)")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the MLPs (``hidden × mlp_ratio``)."""
        return int(self.hidden * self.mlp_ratio)

    @property
    def null_emotion(self) -> int:
        """The null/"None" emotion label (dropped condition, CFG unconditional pass)."""
        return self.n_emotions


PRESETS: dict[str, MoDAParams] = {
    # The public release (TalkingHeadDiT-B): 372,983,878 parameters.
    "release": MoDAParams(),
    # Small model for the embedded profile (1.41M parameters).  Sized for live use on one CPU
    # core: the DiT runs once per 160 ms hop over a 16-frame window (4 new frames + lookahead +
    # zero-padded future), 4 Euler steps ≈ 8 ms when traced (bench/bench_moda.py).  Per-op
    # overhead, not FLOPs, dominates at this size, hence few blocks rather than a narrow width.
    # Audio layout: 1 block × 80 log-mel bins (the exported model's JSON records the features).
    "tiny": MoDAParams(hidden=96, heads=4, audio_dim=80, audio_blocks=1, n_four=1, n_two=1,
                       n_single=2, seq_len=16),
}


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------


class AudioEmbedder(nn.Module):
    """Per-frame audio window [B, N, U, L, D] → one token per frame [B, N, C].

    Flatten U·L·D → Linear → ReLU → Linear → ReLU → Linear → RMSNorm (learnable weight).
    """

    def __init__(self, p: MoDAParams) -> None:
        super().__init__()
        in_dim = p.audio_unit_len * p.audio_blocks * p.audio_dim
        self.proj1 = nn.Linear(in_dim, p.hidden)
        self.proj2 = nn.Linear(p.hidden, p.hidden)
        self.proj3 = nn.Linear(p.hidden, p.hidden)
        self.norm = RMSNorm(p.hidden, eps=1e-6, affine=True)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """One token [B, N, C] per frame of audio windows [B, N, U, L, D]."""
        h = audio.flatten(2)                                                     # [B, N, U·L·D]
        h = torch.relu(self.proj1(h))                                            # [B, N, C]
        h = torch.relu(self.proj2(h))                                            # [B, N, C]
        return self.norm(self.proj3(h))                                          # [B, N, C]


# --------------------------------------------------------------------------------------------
# Joint attention across streams
# --------------------------------------------------------------------------------------------


class JointAttention(nn.Module):
    """Per-stream qkv + q/k RMSNorm + RoPE, one SDPA over all streams' tokens, per-stream out-proj.

    ``streams`` lists each stream's attribute suffixes ``(qkv, q_norm, k_norm, proj)`` so the
    state-dict names equal the release's (``qkv_xs``, ``au_q_norm1``, ...).
    """

    def __init__(self, p: MoDAParams, streams: list[tuple[str, str, str, str]]) -> None:
        super().__init__()
        self.heads, self.streams = p.heads, streams
        for qkv, _qn, _kn, _proj in streams:
            setattr(self, qkv, nn.Linear(p.hidden, 3 * p.hidden))
        for _qkv, qn, kn, _proj in streams:
            setattr(self, qn, RMSNorm(p.head_dim, eps=p.qk_norm_eps))
            setattr(self, kn, RMSNorm(p.head_dim, eps=p.qk_norm_eps))
        for _qkv, _qn, _kn, proj in streams:
            setattr(self, proj, nn.Linear(p.hidden, p.hidden))

    def forward(self, xs: list[torch.Tensor],
                ropes: list[tuple[torch.Tensor, torch.Tensor] | None]) -> list[torch.Tensor]:
        """Joint attention over all streams' tokens; one output per stream, in stream order."""
        qs, ks, vs, lens = [], [], [], []
        for x, rope, (qkv, qn, kn, _) in zip(xs, ropes, self.streams, strict=True):
            q, k, v = getattr(self, qkv)(x).unflatten(-1, (3, self.heads, -1)).unbind(2)  # [B, L, H, D]
            q, k = getattr(self, qn)(q), getattr(self, kn)(k)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            qs.append(q)
            ks.append(k)
            vs.append(v)
            lens.append(x.shape[1])
        out = attention(torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1))   # [B, ΣL, C]
        return [getattr(self, s[3])(o) for o, s in zip(out.split(lens, 1), self.streams, strict=True)]


class MultiStreamBlock(nn.Module):
    """Blocks of stage A (four streams) and B (two streams): per-stream adaLN(6), Mlp, joint attention.

    Args:
        p: model hyper-parameters.
        attn_streams: attention attribute names per stream (see :class:`JointAttention`).
        mlps: Mlp attribute name per stream; ada: adaLN attribute name per stream.
    """

    def __init__(self, p: MoDAParams, attn_streams: list[tuple[str, str, str, str]],
                 mlps: list[str], ada: list[str]) -> None:
        super().__init__()
        self.norm_eps = p.norm_eps
        self.attn1 = JointAttention(p, attn_streams)
        self.mlps, self.ada = mlps, ada
        for name in mlps:
            setattr(self, name, Mlp(p.hidden, p.mlp_hidden))
        for name in ada:
            setattr(self, name, AdaLN(p.hidden, 6))
        self.norm = RMSNorm(p.hidden, eps=p.norm_eps, affine=False)

    def forward(self, xs: list[torch.Tensor], c: torch.Tensor,
                ropes: list[tuple[torch.Tensor, torch.Tensor] | None]) -> list[torch.Tensor]:
        """One block over the streams ``xs`` (conditioned on ``c``); returns the updated streams."""
        mods = [getattr(self, a)(c).chunk(6, dim=-1) for a in self.ada]          # 6 × [B, C] each
        hs = [modulate(self.norm(x), m[0], m[1]) for x, m in zip(xs, mods, strict=True)]  # [B, L, C] each
        attn = self.attn1(hs, ropes)
        out = []
        for x, a, m, mlp in zip(xs, attn, mods, self.mlps, strict=True):
            x = x + m[2][:, None] * a                                            # [B, L, C]
            x = x + m[5][:, None] * getattr(self, mlp)(modulate(self.norm(x), m[3], m[4]))
            out.append(x)
        return out


def four_stream_block(p: MoDAParams) -> MultiStreamBlock:
    """Stage A block: motion, audio, emotion, identity streams."""
    streams = [("qkv_xs", "xs_q_norm", "xs_k_norm", "xs_proj")] + [
        (f"qkv_au{i}", f"au_q_norm{i}", f"au_k_norm{i}", f"au_proj{i}") for i in (1, 2, 3)]
    return MultiStreamBlock(p, streams, ["xs_mlp", "audio_mlp1", "audio_mlp2", "audio_mlp3"],
                            ["adaLN_modulation_xs", "adaLN_modulation_audio1",
                             "adaLN_modulation_audio2", "adaLN_modulation_audio3"])


def two_stream_block(p: MoDAParams) -> MultiStreamBlock:
    """Stage B block: motion stream and the merged condition stream."""
    streams = [("qkv_xs", "xs_q_norm", "xs_k_norm", "xs_proj"),
               ("qkv_au", "au_q_norm", "au_k_norm", "au_proj")]
    return MultiStreamBlock(p, streams, ["xs_mlp", "audio_mlp"],
                            ["adaLN_modulation_xs", "adaLN_modulation_audio"])


class _QKNorm(nn.Module):
    """Holder for the single-stream block's q/k norms (keys ``attn1.xs_{q,k}_norm``)."""

    def __init__(self, p: MoDAParams) -> None:
        super().__init__()
        self.xs_q_norm = RMSNorm(p.head_dim, eps=p.qk_norm_eps)
        self.xs_k_norm = RMSNorm(p.head_dim, eps=p.qk_norm_eps)


class SingleStreamBlock(nn.Module):
    """Stage C (Flux-style parallel) block over all tokens: one Linear yields qkv and the MLP input."""

    def __init__(self, p: MoDAParams) -> None:
        super().__init__()
        self.heads, self.hidden = p.heads, p.hidden
        self.attn1 = _QKNorm(p)
        self.qkv_xs = nn.Linear(p.hidden, 3 * p.hidden + p.mlp_hidden)
        self.linear2 = nn.Linear(p.hidden + p.mlp_hidden, p.hidden)
        self.adaLN_modulation_xs = AdaLN(p.hidden, 3)
        self.norm = RMSNorm(p.hidden, eps=p.norm_eps, affine=False)

    def forward(self, h: torch.Tensor, c: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One parallel attention + MLP block over all tokens ``h`` [B, L, C], conditioned on ``c``."""
        shift, scale, gate = self.adaLN_modulation_xs(c).chunk(3, dim=-1)       # 3 × [B, C]
        u = modulate(self.norm(h), shift, scale)                                 # [B, L, C]
        qkv, m = self.qkv_xs(u).split([3 * self.hidden, self.qkv_xs.out_features - 3 * self.hidden], -1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)               # [B, L, H, D]
        q, k = self.attn1.xs_q_norm(q), self.attn1.xs_k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a = attention(q, k, v)                                                   # [B, L, C]
        out = self.linear2(torch.cat([a, nn.functional.gelu(m, approximate="tanh")], -1))
        return h + gate[:, None] * out                                           # [B, L, C]


class FinalLayer(nn.Module):
    """RMSNorm → adaLN(2) modulation → Linear(C, out_dim)."""

    def __init__(self, p: MoDAParams) -> None:
        super().__init__()
        self.norm = RMSNorm(p.hidden, eps=p.norm_eps, affine=False)
        self.linear = nn.Linear(p.hidden, p.motion_dim)
        self.adaLN_modulation = AdaLN(p.hidden, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Project tokens ``x`` [B, N, C] to motion [B, N, motion_dim], modulated by ``c``."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)                 # 2 × [B, C]
        return self.linear(modulate(self.norm(x), shift, scale))                 # [B, N, out]


# --------------------------------------------------------------------------------------------
# The DiT
# --------------------------------------------------------------------------------------------


class MoDADiT(nn.Module):
    """Velocity network v(x_t, t | prev motion, audio, emotion, identity).

    Args:
        params: a :class:`MoDAParams` (see :data:`PRESETS`).
    """

    def __init__(self, params: MoDAParams = PRESETS["release"]) -> None:
        super().__init__()
        p = self.params = params
        self.motion_embedder = MlpEmbedder(2 * p.motion_dim, p.hidden)
        self.identity_embedder = MlpEmbedder(p.id_dim, p.hidden)
        self.time_embedder = TimestepEmbedder(p.hidden)
        self.audio_embedder = AudioEmbedder(p)
        self.emo_embedder = LabelEmbedder(p.n_emotions, p.hidden)
        self.blocks4 = nn.ModuleList(four_stream_block(p) for _ in range(p.n_four))
        self.blocks2 = nn.ModuleList(two_stream_block(p) for _ in range(p.n_two))
        self.blocks = nn.ModuleList(SingleStreamBlock(p) for _ in range(p.n_single))
        self.final_layer = FinalLayer(p)

    def forward(self, motion: torch.Tensor, t: torch.Tensor, audio: torch.Tensor,
                emotion: torch.Tensor, identity: torch.Tensor,
                intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Predict the flow velocity (≈ noise − x0) in normalised motion space.

        Args:
            motion: [B, N, 2·motion_dim] = previous frame (broadcast over N) ‖ noisy motion x_t.
            t: [B] float timesteps in [0, 1000] (σ·1000; not σ).
            audio: [B, N, audio_unit_len, audio_blocks, audio_dim] per-frame audio features
                (the null feature broadcast for a dropped audio condition).
            emotion: [B] int64 labels 0..n_emotions (n_emotions = null).
            identity: [B, id_dim] or [B, N, id_dim] canonical keypoints (averaged over N).
            intermediates: if given, filled with embedder and stage outputs (for conformance).

        Returns:
            [B, N, motion_dim] velocity.
        """
        p = self.params
        b, n, _ = motion.shape
        if motion.shape[-1] != 2 * p.motion_dim:
            raise ValueError(f"motion must be [B, N, {2 * p.motion_dim}] (prev ‖ x_t), got {tuple(motion.shape)}")
        if audio.shape[1:] != (n, p.audio_unit_len, p.audio_blocks, p.audio_dim):
            raise ValueError(f"audio must be [B, {n}, {p.audio_unit_len}, {p.audio_blocks}, {p.audio_dim}], "
                             f"got {tuple(audio.shape)}")
        if identity.dim() == 3:
            identity = identity.mean(dim=1)                                      # [B, id_dim]

        x = self.motion_embedder(motion)                                         # [B, N, C]
        t_emb = self.time_embedder(t)                                            # [B, C]
        e_emb = self.emo_embedder(emotion)                                       # [B, C]
        id_emb = self.identity_embedder(identity)                                # [B, C]
        c = t_emb + e_emb                                                        # [B, C]
        y1 = self.audio_embedder(audio)                                          # [B, N, C]
        y2 = e_emb[:, None].expand(b, n, -1)                                     # [B, N, C]
        y3 = id_emb[:, None].expand(b, n, -1)                                    # [B, N, C]

        pos = torch.arange(n, device=motion.device)
        rope = rope_tables(pos, p.head_dim, p.rope_theta)                        # 2 × [N, D]
        rope3 = rope_tables(pos.repeat(3), p.head_dim, p.rope_theta)             # 2 × [3N, D]
        rope4 = rope_tables(torch.cat([pos, pos.repeat(3)]), p.head_dim, p.rope_theta)  # 2 × [4N, D]

        if intermediates is not None:
            intermediates.update(time_emb=t_emb, emo_emb=e_emb, identity_emb=id_emb,
                                 motion_emb=x, audio_emb=y1)
        xs = [x, y1, y2, y3]
        for blk in self.blocks4:
            xs = blk(xs, c, [rope, rope, None, None])
        x, y = xs[0], torch.cat(xs[1:], dim=1)                                   # [B, N, C], [B, 3N, C]
        if intermediates is not None:
            intermediates["stage4_out"] = torch.cat([x, y], dim=1)
        for blk in self.blocks2:
            x, y = blk([x, y], c, [rope, rope3])
        h = torch.cat([x, y], dim=1)                                             # [B, 4N, C]
        if intermediates is not None:
            intermediates["stage2_out"] = h
        for blk in self.blocks:
            h = blk(h, c, rope4)
        if intermediates is not None:
            intermediates["stage1_out"] = h
        return self.final_layer(h[:, :n], c)                                     # [B, N, motion_dim]


class DiTRunner(Protocol):
    """What samplers call: a :class:`MoDADiT`, or a faster stand-in with its inputs and output
    (:class:`TracedDiT`; :class:`avatar_agent.nn.moda_onnx.OnnxDiT`)."""

    params: MoDAParams

    def __call__(self, motion: torch.Tensor, t: torch.Tensor, audio: torch.Tensor,
                 emotion: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """Velocity [B, N, motion_dim] (see :meth:`MoDADiT.forward`)."""
        ...


class TracedDiT:
    """Inference-only stand-in for a :class:`MoDADiT` with fixed weights: one frozen TorchScript
    trace per input-shape signature, eager fallback if tracing fails.

    Why: at the tiny preset's size the DiT is bound by per-op dispatch overhead, not FLOPs; a
    frozen, inference-optimised trace runs ~1.8× faster on CPU (bench/bench_moda.py).  The
    streaming generator always samples windows of one shape, so a handful of traces cover it.
    Weights are copied into the trace: do not train or reload the wrapped model afterwards.

    Args:
        model: the network (put in eval mode).
        max_shapes: traces kept; beyond that, new shapes run eagerly.
    """

    def __init__(self, model: MoDADiT, max_shapes: int = 4) -> None:
        self.model = model.eval()
        self.params = model.params
        self.max_shapes = max_shapes
        self._traces: dict[tuple, Any] = {}
        self.failed: str | None = None

    @property
    def traced(self) -> bool:
        """Whether at least one shape has been traced."""
        return bool(self._traces)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The wrapped model's parameters (device/dtype queries)."""
        return self.model.parameters()

    def __call__(self, motion: torch.Tensor, t: torch.Tensor, audio: torch.Tensor,
                 emotion: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """The model's output for these inputs, from the trace for their shapes (traced on first use) or eagerly."""
        args = (motion, t, audio, emotion, identity)
        if torch.is_grad_enabled() or self.failed is not None:
            return self.model(*args)
        key = tuple((tuple(a.shape), a.dtype, a.device.type) for a in args)
        fn = self._traces.get(key)
        if fn is None:
            if len(self._traces) >= self.max_shapes:
                return self.model(*args)
            try:
                with warnings.catch_warnings():
                    # Shape checks in forward() are constant for one shape signature: expected.
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    traced = torch.jit.trace(self.model, args, check_trace=False)
                    fn = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            except Exception as e:  # noqa: BLE001 - any tracing failure falls back to eager
                self.failed = f"{type(e).__name__}: {e}"
                return self.model(*args)
            self._traces[key] = fn
        return fn(*args)


def build_dit(params: MoDAParams | str = "release", device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> MoDADiT:
    """Construct a :class:`MoDADiT` from a preset name or params (uninitialised on ``meta``)."""
    p = PRESETS[params] if isinstance(params, str) else params
    with torch.device(device):
        model = MoDADiT(p)
    return model.to(dtype=dtype).eval()


def count_parameters(model: nn.Module) -> int:
    """Number of scalars in the model's parameters."""
    return sum(t.numel() for t in model.parameters())
