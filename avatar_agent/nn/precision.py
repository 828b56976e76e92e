"""Reduced-precision inference for the official networks: one autocast setting for the DiT,
HuBERT and LivePortrait, without touching the networks themselves.

``fp32`` is the release's precision for the DiT and HuBERT and the one the conformance fixtures
prove; ``fp16``/``bf16`` run matrix products and convolutions under ``torch.autocast`` (the
release already renders LivePortrait under fp16 autocast on CUDA).  Outputs handed to the rest of
the pipeline are always float32, so nothing downstream sees the reduced dtype.
tests/test_cuda_conformance.py states the accepted deviations on CUDA; on a CPU, bf16 autocast
works too (slower than fp32 there: only for tests).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

Precision = Literal["fp32", "fp16", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name; a clear error for anything else."""
    try:
        return DTYPES[precision]
    except KeyError:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(DTYPES)}") from None


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device``'s type (a no-op for fp32).

    fp16 on a CPU is refused: CPU autocast supports bf16 only.
    """
    dtype = autocast_dtype(precision)
    kind = torch.device(device).type
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if kind == "cpu" and dtype == torch.float16:
        raise ValueError("precision 'fp16' needs CUDA; on a CPU use 'bf16' or 'fp32'")
    return torch.autocast(kind, dtype=dtype)


class AutocastDiT(nn.Module):
    """A MoDA DiT run under autocast; returns float32 velocities.

    Args:
        model: the DiT (``params`` is forwarded, so :class:`~avatar_agent.motion.moda.MoDAMotion`
            takes the wrapper as its model).
        precision: "fp32", "fp16" or "bf16".
    """

    def __init__(self, model: nn.Module, precision: str) -> None:
        super().__init__()
        autocast_dtype(precision)
        self.model, self.precision = model, precision

    @property
    def params(self) -> Any:
        """The wrapped model's ``params``."""
        return self.model.params

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped model's output under autocast, as float32."""
        dev = next(self.model.parameters()).device
        with autocast(dev, self.precision):
            out = self.model(*args, **kwargs)
        return out.float()


class AutocastFeatures:
    """An audio feature callable (e.g. :class:`~avatar_agent.nn.hubert.HubertFeatures`) run under
    autocast; returns float32 features.

    Args:
        features: ``audio(float32 16 kHz [S]) -> [T, blocks, dim]``.
        device: where its network runs.
        precision: "fp32", "fp16" or "bf16".
    """

    def __init__(self, features: Callable[[np.ndarray], Any], device: torch.device | str,
                 precision: str) -> None:
        autocast(device, precision)                     # validate now, not on the first chunk
        self.features, self.device, self.precision = features, torch.device(device), precision

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        """The wrapped features of ``audio`` under autocast, as float32."""
        with autocast(self.device, self.precision):
            out = self.features(audio)
        return torch.as_tensor(out).float()
