"""MC-dropout injection, nested-T trials, stable accumulation and trial files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from vlmrel.mcdo import dropout as mcdo
from vlmrel.mcdo.dropout import (
    MomentAccumulator,
    TrialResult,
    drop_positions,
    inject_dropout,
    load_trial,
    mha_functional,
    run_trial,
    save_trial,
)
from vlmrel.models import load_encoder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core box two OpenMP threads stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoders():
    return {name: load_encoder(name) for name in ("tiny_clip", "tiny_siglip")}


def _pixels(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _batches(n: int, batch_size: int, seed: int = 0) -> list[tuple[list[str], np.ndarray]]:
    px = _pixels(n, seed=seed)
    ids = [f"im{i}" for i in range(n)]
    return [(ids[i : i + batch_size], px[i : i + batch_size]) for i in range(0, n, batch_size)]


# --------------------------------------------------------------------------- random draws


def test_drop_positions_is_a_bernoulli_process():
    n, p = 400_000, 0.01
    pos = drop_positions(n, p, torch.Generator().manual_seed(3)).numpy()
    assert np.all(np.diff(pos) > 0) and pos.min() >= 0 and pos.max() < n
    # count: Binomial(n, p) within 5 sigma
    assert abs(len(pos) - n * p) < 5 * math.sqrt(n * p * (1 - p))
    # positions uniform over [0, n): chi-square over 20 bins
    counts = np.bincount(pos * 20 // n, minlength=20)
    assert stats.chisquare(counts).pvalue > 1e-4
    # gaps (failures between drops) are Geometric(p)
    gaps = np.diff(pos) - 1
    assert stats.kstest(gaps, stats.geom(p, loc=-1).cdf).pvalue > 1e-3
    # deterministic, and rates other than 0.01 are right too
    assert np.array_equal(pos, drop_positions(n, p, torch.Generator().manual_seed(3)).numpy())
    half = drop_positions(10_000, 0.5, torch.Generator().manual_seed(4))
    assert abs(len(half) - 5000) < 5 * 50
    assert drop_positions(1000, 0.0, torch.Generator()).numel() == 0


def test_masks_do_not_depend_on_dtype():
    x = torch.randn(8, 50, 96, dtype=torch.float64) + 3.0
    outs = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        y = mcdo._dropout(x.to(dtype), 0.1, torch.Generator().manual_seed(11))
        outs[dtype] = y
    zero64 = outs[torch.float64] == 0
    assert 0.05 < zero64.double().mean() < 0.15
    for y in outs.values():
        assert torch.equal(y == 0, zero64)
    # survivors are scaled by 1/(1-p), in bf16 without rounding the scale first
    torch.testing.assert_close(outs[torch.float64][~zero64], (x / 0.9)[~zero64])
    ref = (x.to(torch.bfloat16).double() / 0.9).to(torch.bfloat16)
    assert torch.equal(outs[torch.bfloat16][~zero64], ref[~zero64])


def test_gaussian_and_dropout_noise_have_the_same_variance():
    p = 0.1
    ones = torch.ones(400_000)
    inj = mcdo.Injection(p, torch.Generator().manual_seed(0), "gaussian", None)
    g = inj.noise_input(ones).double()
    inj_d = mcdo.Injection(p, torch.Generator().manual_seed(0), "input", None)
    d = inj_d.noise_input(ones).double()
    target = p / (1 - p)
    for noise in (g, d):
        assert noise.mean().item() == pytest.approx(1.0, abs=5e-3)
        assert noise.var().item() == pytest.approx(target, rel=0.02)
    assert not torch.any(g == 0)  # gaussian noise is not a mask


# --------------------------------------------------------------------------- injection


def _expected_targets(vision: nn.Module) -> set[str]:
    names = set()
    for name, module in vision.named_modules():
        if isinstance(module, nn.Linear):
            names.add(name)
        if isinstance(module, nn.MultiheadAttention):
            names.add(f"{name}.in_proj")
    return names


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_siglip"])
def test_injection_reaches_every_linear_map(name, encoders):
    enc = encoders[name]
    x = _pixels(3)
    base = enc.encode_image(x)
    gen = torch.Generator().manual_seed(0)
    mha = [n for n, m in enc.vision.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert mha, "the tiny models must exercise nn.MultiheadAttention"
    with inject_dropout(enc.vision, 0.2, gen) as inj:
        assert set(inj.targets) == _expected_targets(enc.vision)
        assert any(t.endswith(".in_proj") for t in inj.targets)
        assert any(t.endswith("attn.out_proj") or t.endswith("attention.out_proj") for t in inj.targets)
        noisy = enc.encode_image(x)
        assert all(inj.calls[t] >= 1 for t in inj.targets), inj.calls
        assert not torch.allclose(noisy, base)
    # each single target, alone, perturbs the features
    for target in sorted(_expected_targets(enc.vision)):
        with inject_dropout(enc.vision, 0.2, gen, only=[target]) as inj:
            out = enc.encode_image(x)
            assert inj.calls[target] == 1
            assert (out - base).abs().max() > 1e-4, target
    # p = 0: bit-identical to the unpatched model, calls still counted
    with inject_dropout(enc.vision, 0.0, gen) as inj:
        assert torch.equal(enc.encode_image(x), base)
        assert all(c == 1 for c in inj.calls.values())
    # removed: no patched forward left, outputs identical
    assert not any("forward" in m.__dict__ for m in enc.vision.modules())
    assert torch.equal(enc.encode_image(x), base)


@pytest.mark.parametrize("kind", ["dropconnect", "gaussian"])
def test_other_kinds_perturb_without_touching_weights(kind, encoders):
    enc = encoders["tiny_clip"]
    x = _pixels(2)
    base = enc.encode_image(x)
    weights = {k: v.clone() for k, v in enc.vision.state_dict().items()}
    with inject_dropout(enc.vision, 0.1, torch.Generator().manual_seed(1), kind=kind) as inj:
        out = enc.encode_image(x)
        assert all(inj.calls[t] >= 1 for t in inj.targets)
    assert (out - base).abs().max() > 1e-3
    for k, v in enc.vision.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_injection_rejects_bad_arguments(encoders):
    vision = encoders["tiny_clip"].vision
    gen = torch.Generator()
    with pytest.raises(ValueError, match="kind"):
        inject_dropout(vision, 0.1, gen, kind="spike")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        inject_dropout(vision, 1.0, gen)
    with pytest.raises(ValueError, match="unknown injection targets"):
        inject_dropout(vision, 0.1, gen, only=["nope"])
    assert not any("forward" in m.__dict__ for m in vision.modules())
    with inject_dropout(vision, 0.1, gen), pytest.raises(RuntimeError, match="already"):
        inject_dropout(vision, 0.1, gen)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_functional_matches_torch(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    cross = nn.MultiheadAttention(32, 4, kdim=24, vdim=20, batch_first=batch_first).eval()

    def lay(t):  # [B, L, E] -> module layout
        return t if batch_first else t.transpose(0, 1)

    q, kv = lay(torch.randn(3, 5, 32)), lay(torch.randn(3, 7, 32))
    k2, v2 = lay(torch.randn(3, 7, 24)), lay(torch.randn(3, 7, 20))
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, -2:] = True
    cases = [
        (mha, (q, q, q), {}),
        (mha, (q, q, q), {"attn_mask": causal}),
        (mha, (q, kv, kv), {"key_padding_mask": pad}),
        (mha, (q, kv, kv.clone()), {}),
        (mha, (q[:, :1] if batch_first else q[:1], kv, kv), {}),
        (cross, (q, k2, v2), {}),
    ]
    with torch.inference_mode():
        for module, args, kw in cases:
            ref = module(*args, need_weights=False, **kw)[0]
            torch.testing.assert_close(mha_functional(module, *args, **kw), ref, atol=2e-6, rtol=1e-5)
        # unbatched input
        u = torch.randn(6, 32)
        torch.testing.assert_close(mha_functional(mha, u, u, u), mha(u, u, u)[0], atol=2e-6, rtol=1e-5)


# --------------------------------------------------------------------------- trials


def test_nested_snapshots_equal_separate_runs(encoders):
    enc = encoders["tiny_siglip"]
    batches = _batches(5, 2)
    nested = run_trial(enc, batches, p=0.05, seed=7, trial=1, T_list=[16, 4, 8], progress=False)
    assert nested.T == [4, 8, 16]
    assert nested.trace_pre.shape == nested.trace_post.shape == (3, 5)
    assert nested.trace_pre.dtype == np.float64
    assert nested.image_id == [f"im{i}" for i in range(5)]
    alone = run_trial(enc, batches, p=0.05, seed=7, trial=1, T_list=[4], progress=False)
    assert np.array_equal(nested.trace_pre[0], alone.trace_pre[0])
    assert np.array_equal(nested.trace_post[0], alone.trace_post[0])
    assert np.all(nested.trace_pre > 0) and np.all(nested.trace_post > 0)
    again = run_trial(enc, batches, p=0.05, seed=7, trial=1, T_list=[4, 8, 16], progress=False)
    assert np.array_equal(again.trace_pre, nested.trace_pre)
    assert np.array_equal(again.trace_post, nested.trace_post)
    other = run_trial(enc, batches, p=0.05, seed=7, trial=2, T_list=[4, 8, 16], progress=False)
    assert not np.allclose(other.trace_pre, nested.trace_pre)
    # trial k's masks come from seed + k: trial 1 under seed 7 is trial 0 under seed 8
    shifted = run_trial(enc, batches, p=0.05, seed=8, trial=0, T_list=[4, 8, 16], progress=False)
    assert np.array_equal(shifted.trace_pre, nested.trace_pre)
    assert (
        nested.meta["model"] == "tiny_siglip" and nested.meta["trial"] == 1 and nested.meta["batch_size"] == 2
    )


def test_p_zero_gives_zero_trace(encoders):
    res = run_trial(
        encoders["tiny_clip"], _batches(3, 3), p=0.0, seed=0, trial=0, T_list=[2, 4], progress=False
    )
    assert np.array_equal(res.trace_pre, np.zeros((2, 3)))
    assert np.array_equal(res.trace_post, np.zeros((2, 3)))


def test_run_trial_rejects_mismatched_batches(encoders):
    bad = [(["a"], _pixels(2))]
    with pytest.raises(ValueError, match="1 image ids for 2 images"):
        run_trial(encoders["tiny_clip"], bad, p=0.1, seed=0, trial=0, T_list=[2], progress=False)
    with pytest.raises(ValueError, match="T_list"):
        run_trial(encoders["tiny_clip"], _batches(2, 2), p=0.1, seed=0, trial=0, T_list=[0], progress=False)


def test_moment_accumulator_is_stable_where_naive_float32_fails():
    rng = np.random.default_rng(0)
    T, n, d = 64, 6, 128
    feats = (1000.0 + 1e-3 * rng.standard_normal((T, n, d)) * rng.uniform(0.5, 2.0, (1, n, 1))).astype(
        np.float32
    )
    ref = feats.astype(np.float64).var(axis=0, ddof=0)  # two-pass float64
    acc = MomentAccumulator()
    for t in range(T):
        acc.add(torch.from_numpy(feats[t]))
    np.testing.assert_allclose(acc.variance().numpy(), ref, rtol=1e-9, atol=0)
    np.testing.assert_allclose(acc.trace().numpy(), ref.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(acc.mean().numpy(), feats.astype(np.float64).mean(axis=0), rtol=1e-12)
    # the seed's float32 sumsq/T - mean^2 is wrong by orders of magnitude here
    s = torch.zeros(n, d)
    sq = torch.zeros(n, d)
    for t in range(T):
        f = torch.from_numpy(feats[t])
        s += f
        sq += f * f
    naive = (sq / T - (s / T) ** 2).mean(dim=1).numpy()
    assert np.max(np.abs(naive - ref.mean(axis=1)) / ref.mean(axis=1)) > 1.0


class _OffsetEncoder:
    """A fake encoder: one Linear whose outputs sit on a large offset; records every pass."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.name, self.precision, self.device = "fake", "fp32", torch.device("cpu")
        self.vision = nn.Linear(12, 16)
        self.seen: list[torch.Tensor] = []

    def prepare(self, pixels):
        return torch.as_tensor(pixels, dtype=torch.float32)

    def encode_image(self, x):
        with torch.inference_mode():
            f = (self.vision(x.flatten(1)) * 1e-2 + 500.0).float()
        self.seen.append(f.clone())
        return f


def test_trial_trace_matches_float64_two_pass_reference():
    enc = _OffsetEncoder()
    px = np.random.default_rng(1).standard_normal((5, 3, 2, 2)).astype(np.float32)
    batches = [([f"i{k}" for k in range(3)], px[:3]), (["i3", "i4"], px[3:])]
    hooked: list[tuple[int, int, torch.Tensor]] = []
    res = run_trial(
        enc,
        batches,
        p=0.05,
        seed=0,
        trial=0,
        T_list=[8, 32],
        progress=False,
        on_pass=lambda start, t, f: hooked.append((start, t, f.clone())),
    )
    per_batch = [torch.stack(enc.seen[:32]), torch.stack(enc.seen[32:])]
    # the per-pass hook sees every pass, in order, with the batch's offset
    assert [(s, t) for s, t, _ in hooked] == [(0, t) for t in range(32)] + [(3, t) for t in range(32)]
    for (_, _, f), seen in zip(hooked, enc.seen, strict=True):
        torch.testing.assert_close(f, seen.double(), rtol=0, atol=0)
    for ti, T in enumerate(res.T):
        pre, post = [], []
        for feats in per_batch:
            f = feats[:T].double().numpy()
            pre.append(f.var(axis=0, ddof=0).mean(axis=1))
            g = f / np.linalg.norm(f, axis=-1, keepdims=True)
            post.append(g.var(axis=0, ddof=0).mean(axis=1))
        np.testing.assert_allclose(res.trace_pre[ti], np.concatenate(pre), rtol=1e-8)
        np.testing.assert_allclose(res.trace_post[ti], np.concatenate(post), rtol=1e-6)
    assert np.all(res.trace_pre > 0)


def test_bf16_keeps_the_ranking_of_a_float64_run(encoders):
    batches = _batches(24, 12, seed=5)
    kw = {"p": 0.05, "seed": 3, "trial": 0, "T_list": [8], "progress": False}
    fp64 = run_trial(load_encoder("tiny_clip", precision="fp64"), batches, **kw)
    bf16 = run_trial(load_encoder("tiny_clip", precision="bf16"), batches, **kw)
    rho = stats.spearmanr(bf16.trace_pre[0], fp64.trace_pre[0]).statistic
    assert rho > 0.98


# --------------------------------------------------------------------------- files


def _result() -> TrialResult:
    rng = np.random.default_rng(0)
    return TrialResult(
        T=[4, 16],
        trace_pre=rng.random((2, 3)),
        trace_post=rng.random((2, 3)),
        image_id=["a1", "b\u00e9", "c3"],
        meta={"model": "tiny_clip", "p": 0.01, "seed": 1, "trial": 2, "kind": "input", "precision": "bf16"},
    )


def test_save_load_round_trip_without_pickles(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "trial2.npz"
    res = _result()
    save_trial(path, res, {"experiment": "exp0", "model": "tiny_clip"})
    assert [p.name for p in path.parent.iterdir()] == ["trial2.npz"]  # no temp file left
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(mcdo.np, "load", spy)
    back, meta = load_trial(path)
    assert calls and all(c.get("allow_pickle") is False for c in calls)
    assert back.T == [4, 16] and back.image_id == res.image_id
    np.testing.assert_array_equal(back.trace_pre, res.trace_pre)
    np.testing.assert_array_equal(back.trace_post, res.trace_post)
    for key in ("model", "p", "seed", "trial", "kind", "precision"):
        assert meta[key] == res.meta[key]
    assert meta["T"] == [4, 16] and meta["experiment"] == "exp0"
    assert {"torch", "open_clip", "transformers", "vlmrel"} <= set(meta["versions"])
    with real_load(path, allow_pickle=False) as raw:
        assert raw["image_id"].dtype.kind == "U"
        assert json.loads(str(raw["meta"]))["model"] == "tiny_clip"


def test_save_refuses_contradicting_meta_and_load_names_bad_files(tmp_path):
    with pytest.raises(ValueError, match="meta\\['p'\\]"):
        save_trial(tmp_path / "t.npz", _result(), {"p": 0.5})
    assert not (tmp_path / "t.npz").exists()
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz.*missing arrays"):
        load_trial(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz"):
        load_trial(tmp_path / "junk.npz")
