"""Deterministic "recipe" weights: a state dict that depends only on key names and shapes.

The conformance fixtures (tests/fixtures/moda, tests/fixtures/liveportrait) were produced by the
official code with weights built by this rule, so filling our own modules with the same rule and
matching the fixture outputs proves that the math (and the key layout) is the release's.

Rule, per key in manifest order:

* the generator is seeded with ``crc32(key) & 0x7fffffff`` (the *full* key, prefixes included);
* leaf ``running_var`` → ones, ``running_mean`` → zeros, ``num_batches_tracked`` → int64 zeros;
* a 1-D ``*.weight`` → ``1 + 0.02·randn``; any ``*.bias`` → ``0.02·randn``;
* ndim ≥ 2 → ``randn / sqrt(prod(shape[1:]))`` (fan-in scaled);
* anything else → ``0.02·randn``.

All draws are float32 ``torch.randn`` on a CPU generator.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import torch

Manifest = Sequence[tuple[str, Sequence[int]]]


def recipe_tensor(key: str, shape: Sequence[int]) -> torch.Tensor:
    """The recipe value of one state-dict entry (see the module docstring for the rule)."""
    shape = tuple(int(s) for s in shape)
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()) & 0x7FFFFFFF)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return torch.ones(shape)
    if leaf == "running_mean":
        return torch.zeros(shape)
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.long)
    if len(shape) == 1 and key.endswith(".weight"):
        return 1.0 + 0.02 * torch.randn(shape, generator=gen)
    if key.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    if len(shape) >= 2:
        return torch.randn(shape, generator=gen) * (1.0 / math.sqrt(math.prod(shape[1:])))
    return 0.02 * torch.randn(shape, generator=gen)


def load_manifest(path: str | Path) -> list[tuple[str, list[int]]]:
    """Read a JSON manifest (a list of ``[key, shape]``)."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return [(str(k), [int(s) for s in shape]) for k, shape in raw]


def recipe_state_dict(manifest: Iterable[tuple[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
    """Recipe tensors for every ``(key, shape)`` of ``manifest``, in manifest order."""
    return {key: recipe_tensor(key, shape) for key, shape in manifest}


def manifest_of(module: torch.nn.Module, prefix: str = "") -> list[tuple[str, list[int]]]:
    """The ``(key, shape)`` manifest of a module's state dict (keys prefixed with ``prefix``)."""
    return [(prefix + k, list(v.shape)) for k, v in module.state_dict().items()]
