"""The dropout sites: output dropout on every linear map, the seed's own site (seed002), no stacking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vlmrel.mcdo.dropout import KINDS, inject_dropout, run_trial
from vlmrel.models import load_encoder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vit_b32():
    """open_clip's ViT-B/32 architecture with seeded random weights (no download)."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model.visual


def _x(seed: int = 0, size: int = 224) -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
    )


def _linear_maps(vision: nn.Module) -> set[str]:
    """Every nn.Linear module, and every MHA in-projection (a parameter, not a module)."""
    names = {n for n, m in vision.named_modules() if isinstance(m, nn.Linear)}
    names |= {f"{n}.in_proj" for n, m in vision.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return names


def _modules_run_in_a_plain_pass(vision: nn.Module, x: torch.Tensor) -> set[str]:
    ran: set[str] = set()
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=n: ran.add(name))
        for n, m in vision.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad():
            vision(x)
    finally:
        for h in hooks:
            h.remove()
    return ran


def test_kinds_list_every_site():
    assert set(KINDS) == {"output", "seed002", "input", "dropconnect", "gaussian"}


def test_output_dropout_perturbs_every_linear_map_of_vit_b32(vit_b32):
    x = _x()
    with torch.no_grad():
        base = vit_b32(x)
    expected = _linear_maps(vit_b32)
    assert sum(t.endswith(".in_proj") for t in expected) == 12
    assert sum(t.endswith("attn.out_proj") for t in expected) == 12
    assert sum(t.endswith("mlp.c_fc") or t.endswith("mlp.c_proj") for t in expected) == 24
    gen = torch.Generator().manual_seed(0)
    with inject_dropout(vit_b32, 0.1, gen, kind="output") as inj, torch.no_grad():
        assert set(inj.targets) == expected
        vit_b32(x)
        assert all(inj.calls[t] == 1 for t in inj.targets), inj.calls
    # counted per module: each linear map alone perturbs the features
    for target in sorted(expected):
        with inject_dropout(vit_b32, 0.1, gen, kind="output", only=[target]) as inj, torch.no_grad():
            out = vit_b32(x)
            assert inj.calls[target] == 1
        assert (out - base).abs().max() > 1e-5, target
    with torch.no_grad():
        assert torch.equal(vit_b32(x), base)


def test_output_dropout_zeroes_outputs_not_inputs():
    lin = nn.Linear(64, 256)
    seq = nn.Sequential(lin)
    x = torch.randn(8, 64)
    with torch.no_grad():
        ref = lin(x)
        with inject_dropout(seq, 0.3, torch.Generator().manual_seed(3), kind="output"):
            y = lin(x)
    dropped = y == 0
    assert 0.2 < dropped.float().mean() < 0.4
    torch.testing.assert_close(y[~dropped], ref[~dropped] / 0.7)


def test_seed002_perturbs_exactly_the_linear_modules_that_run(vit_b32):
    x = _x(1)
    ran = _modules_run_in_a_plain_pass(vit_b32, x)
    linear = {n for n, m in vit_b32.named_modules() if isinstance(m, nn.Linear)}
    assert ran and ran < linear
    assert not any(t.endswith("out_proj") for t in ran)  # open_clip's MHA never calls out_proj as a module
    with torch.no_grad():
        base = vit_b32(x)
    gen = torch.Generator().manual_seed(0)
    with inject_dropout(vit_b32, 0.1, gen, kind="seed002") as inj, torch.no_grad():
        assert set(inj.targets) == linear  # the seed wrapped every nn.Linear ...
        vit_b32(x)
        assert {t for t, c in inj.calls.items() if c > 0} == ran  # ... but only these run
    perturbed = set()
    for target in sorted(linear):
        with inject_dropout(vit_b32, 0.1, gen, kind="seed002", only=[target]), torch.no_grad():
            if (vit_b32(x) - base).abs().max() > 0:
                perturbed.add(target)
    assert perturbed == ran


def test_trial_k_is_not_affected_by_trial_k_minus_1():
    """The seed re-wrapped the layers on every trial (trial k: k dropouts in series); here it doesn't."""
    px = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    batches = [(["a", "b", "c"], px)]
    kw = {"p": 0.05, "seed": 3, "T_list": [4], "progress": False, "kind": "output"}
    used = load_encoder("tiny_clip")
    run_trial(used, batches, trial=0, **kw)
    run_trial(used, batches, trial=1, **kw)
    after = run_trial(used, batches, trial=2, **kw)
    fresh = run_trial(load_encoder("tiny_clip"), batches, trial=2, **kw)
    assert np.array_equal(after.trace_pre, fresh.trace_pre)
    assert not any("forward" in m.__dict__ for m in used.vision.modules())
