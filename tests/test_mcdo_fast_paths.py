"""The MC-dropout fast paths equal the plain ones; the mcdo benchmark's device plumbing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlmrel.mcdo import dropout as mcdo


@pytest.fixture(autouse=True)
def two_threads():
    """Two intra-op threads (the machine's cores), so the single-thread mask path is exercised."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _copy_dropout(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """The previous implementation: threaded positions, a scaled copy, then the zeros."""
    idx = mcdo.drop_positions(x.numel(), p, generator, device=x.device)
    y = x.mul(1.0 / (1.0 - p)).contiguous()
    y.view(-1).index_fill_(0, idx, 0)
    return y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
def test_in_place_output_dropout_equals_the_copy_bit_for_bit(dtype, p):
    x = (torch.randn(4, 50, 2304, dtype=torch.float64) * 3.0 + 0.5).to(dtype)
    ref = _copy_dropout(x, p, torch.Generator().manual_seed(5))
    fresh = x.clone()
    out = mcdo._dropout(fresh, p, torch.Generator().manual_seed(5), inplace=True)
    assert out.data_ptr() == fresh.data_ptr()  # no copy
    assert out.dtype == dtype and torch.equal(out, ref)
    # the default leaves its input alone
    kept = x.clone()
    assert torch.equal(mcdo._dropout(kept, p, torch.Generator().manual_seed(5)), ref)
    assert torch.equal(kept, x)


def test_in_place_dropout_of_a_non_contiguous_tensor_falls_back_to_the_copy():
    base = torch.randn(64, 96, dtype=torch.float32)
    x = base.t()  # positions index the row-major order of x, not base's memory
    ref = _copy_dropout(x, 0.2, torch.Generator().manual_seed(1))
    out = mcdo._dropout(x, 0.2, torch.Generator().manual_seed(1), inplace=True)
    assert torch.equal(out, ref) and out.is_contiguous()


def test_single_thread_positions_equal_threaded_ones():
    n = 32 * 50 * 3072  # c_fc's output at batch 32: the stream is above OpenMP's grain size
    for p in (0.01, 1e-4):
        threaded = mcdo.drop_positions(n, p, torch.Generator().manual_seed(9))
        single = mcdo._positions(n, p, torch.Generator().manual_seed(9), torch.device("cpu"))
        assert torch.equal(threaded, single)
    assert torch.get_num_threads() == 2  # restored


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_dropout_is_the_plain_path_bit_for_bit_in_float32_and_float64(dtype):
    x = torch.randn(3, 50, 96, dtype=dtype)
    w, b = torch.randn(288, 96, dtype=dtype), torch.randn(288, dtype=dtype)
    ref = _copy_dropout(F.linear(x, w, b), 0.05, torch.Generator().manual_seed(2))
    out = mcdo._linear_dropout(x, w, b, 0.05, torch.Generator().manual_seed(2))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("transposed", [False, True])
def test_bf16_linear_dropout_folds_the_scale_within_one_rounding(transposed):
    """bf16: round(s (xW + b)) once, within one bf16 ulp of the exact value (plus the float32
    accumulation's error); the same mask."""
    p = 0.01
    x64 = torch.randn(4, 50, 768, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if transposed:  # a [L, B, E] MHA input seen as [B, L, E] (torch's bf16 F.linear then rounds twice)
        x64 = x64.transpose(0, 1).contiguous().transpose(0, 1)
    w64 = torch.randn(2304, 768, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) / 28
    b64 = torch.randn(2304, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x, w, b = x64.bfloat16(), w64.bfloat16(), b64.bfloat16()
    idx = mcdo.drop_positions(x.numel() * 3, p, torch.Generator().manual_seed(4))
    old = _copy_dropout(F.linear(x, w, b), p, torch.Generator().manual_seed(4))
    new = mcdo._linear_dropout(x, w, b, p, torch.Generator().manual_seed(4))
    assert new.dtype == torch.bfloat16 and new.shape == old.shape and new.is_contiguous()
    dropped = torch.zeros(new.numel(), dtype=torch.bool)
    dropped[idx] = True
    dropped = dropped.view(new.shape)
    assert (new[dropped] == 0).all() and (old[dropped] == 0).all()
    exact = F.linear(x.double(), w.double(), b.double()) / (1 - p)
    ulp = exact.abs().clamp_min(2.0**-100).log2().floor().exp2() * 2.0**-7  # bf16 spacing at each value
    err_new = (new.double() - exact).abs()[~dropped]
    err_old = (old.double() - exact).abs()[~dropped]
    assert (err_new <= ulp[~dropped] + 1e-4).all()  # one rounding, plus the float32 accumulation
    # one rounding is at least as close to the exact value as two, on average
    assert err_new.mean() <= err_old.mean()


@pytest.mark.parametrize("kind", ["output", "input"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_injected_vit_equals_the_plain_implementation(kind, dtype, monkeypatch):
    """A whole tower: the same bits in float32; in bf16 the output kind's folded scale only rounds."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    vision = model.visual.eval().to(dtype)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(dtype)
    outs = []
    for variant in ("new", "old"):
        if variant == "old":
            monkeypatch.setattr(mcdo, "_dropout", lambda t, p, g, inplace=False: _copy_dropout(t, p, g))
            monkeypatch.setattr(
                mcdo, "_linear_dropout", lambda x, w, b, p, g: _copy_dropout(F.linear(x, w, b), p, g)
            )
        g = torch.Generator()
        with torch.no_grad(), mcdo.inject_dropout(vision, 0.05, g, kind):
            g.manual_seed(3)
            outs.append(vision(x).double())
    if dtype == torch.float32 or kind == "input":
        assert torch.equal(outs[0], outs[1])
    else:
        rel = (outs[0] - outs[1]).norm() / outs[1].norm()
        assert 0 < rel < 0.05


# --------------------------------------------------------------------------- the benchmark


def test_bench_mcdo_device_cuda_without_cuda_is_a_clear_error(capsys):
    from vlmrel.bench import mcdo as bench

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--json", "--device", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device is available" in err
    with pytest.raises(SystemExit):
        bench.main(["--device", "mps"])
    assert "--device 'mps': only cpu and cuda are supported" in capsys.readouterr().err


def test_bench_mcdo_small_run_on_cpu(capsys):
    """The whole benchmark at toy size, through the device plumbing (``--device cpu``)."""
    from vlmrel.bench import mcdo as bench

    bench.main(
        [
            "--json",
            "--device",
            "cpu",
            "--images",
            "3",
            "--passes",
            "2",
            "--batch-size",
            "2",
            "--fp64-passes",
            "2",
            "--peak-n",
            "128",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "output" and out["device"] == "cpu" and out["device_name"]
    assert out["matmul_n"] == 128 and len(out["matmul_peak_gflops_bf16_before_after"]) == 2
    assert out["matmul_peak_gflops_bf16"] == max(out["matmul_peak_gflops_bf16_before_after"])
    assert set(out["other_kinds"]) == {"input"}
    for key in ("vlmrel_ips", "reference_ips", "speedup", "fraction_of_peak", "spearman_vs_fp64"):
        assert isinstance(out[key], float), key
    # the reference loop saw run_trial's masks at the same site: same per-image ranking
    assert out["spearman_vlmrel_vs_reference"] > 0.4
