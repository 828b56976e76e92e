"""Synthetic "recipe" weights for the LivePortrait conformance tests (test-only helper).

Implements the rule in tests/fixtures/liveportrait/README.md (and its amendment): every tensor
depends only on its key and shape, seeded by crc32(key), so our modules filled from the same
manifest get exactly the weights the release's code ran with when the fixtures were made.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch


def _tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key.endswith("running_var"):
        return torch.ones(shape)
    if key.endswith("running_mean"):
        return torch.zeros(shape)
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()) & 0x7FFFFFFF)
    r = torch.randn(shape, generator=gen, dtype=torch.float32)
    if key.endswith(".weight") and len(shape) == 1:
        return 1.0 + 0.02 * r
    if key.endswith(".bias"):
        return 0.02 * r
    if key.endswith((".weight_u", ".weight_v")):
        return r / r.norm()
    if len(shape) >= 2:
        return r * (1.0 / math.sqrt(math.prod(shape[1:])))
    return 0.02 * r


def recipe_state_dict(manifest: str | Path | list) -> dict[str, torch.Tensor]:
    """State dict for a manifest (list of [key, shape] or a JSON file path)."""
    if not isinstance(manifest, list):
        manifest = json.loads(Path(manifest).read_text())
    sd = {k: _tensor(k, tuple(int(s) for s in shape)) for k, shape in manifest}
    # Amendment: u = normalise(W v) so sigma = ||W v|| > 0 (spectral-norm buffers).
    for k in list(sd):
        if k.endswith(".weight_orig"):
            p = k[: -len("weight_orig")]
            if p + "weight_u" in sd and p + "weight_v" in sd:
                u = sd[k].reshape(sd[k].shape[0], -1) @ sd[p + "weight_v"]
                sd[p + "weight_u"] = u / u.norm()
    return sd
