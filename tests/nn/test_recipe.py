"""The recipe filler reproduces the conformance reference values (recipe_check.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tests.reference.recipe import load_manifest, manifest_of, recipe_state_dict, recipe_tensor


FIX = Path(__file__).resolve().parent.parent / "fixtures" / "moda"


def test_recipe_matches_reference_sums_and_first_elements() -> None:
    torch.set_num_threads(1)
    manifest = load_manifest(FIX / "dit_state_dict_manifest.json")
    ref = json.loads((FIX / "recipe_check.json").read_text())
    assert [k for k, _ in manifest] == list(ref)
    for key, shape in manifest:
        t = recipe_tensor(key, shape)
        assert list(t.shape) == shape and t.dtype == torch.float32
        total, first = ref[key]
        assert math.isclose(t.double().sum().item(), total, rel_tol=1e-6, abs_tol=1e-6), key
        assert t.flatten()[0].item() == first, key


def test_recipe_rules_for_buffers_and_vectors() -> None:
    sd = recipe_state_dict([("a.bn.running_var", [4]), ("a.bn.running_mean", [4]),
                            ("a.bn.num_batches_tracked", []), ("a.norm.weight", [1000]),
                            ("a.lin.bias", [1000]), ("a.lin.weight", [10, 400]), ("a.scalar", [3])])
    assert torch.equal(sd["a.bn.running_var"], torch.ones(4))
    assert torch.equal(sd["a.bn.running_mean"], torch.zeros(4))
    assert sd["a.bn.num_batches_tracked"].dtype == torch.long
    assert abs(sd["a.norm.weight"].mean().item() - 1.0) < 0.01
    assert 0.015 < sd["a.lin.bias"].std().item() < 0.025
    assert abs(sd["a.lin.weight"].std().item() - 1 / 20) < 0.005
    # Seeds depend on the full key: the same shape under another name differs.
    assert not torch.equal(recipe_tensor("x.lin.weight", [10, 400]), sd["a.lin.weight"])
    assert torch.equal(recipe_tensor("a.lin.weight", [10, 400]), sd["a.lin.weight"])


def test_manifest_of_lists_module_state() -> None:
    m = torch.nn.Linear(3, 2)
    assert manifest_of(m, "p.") == [("p.weight", [2, 3]), ("p.bias", [2])]
