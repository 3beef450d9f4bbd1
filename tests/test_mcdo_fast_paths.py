"""The MC-dropout fast paths equal the plain ones; the mcdo benchmark's device plumbing."""

from __future__ import annotations

import json

import pytest
import torch

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


@pytest.mark.parametrize("kind", ["output", "input"])
def test_injected_vit_equals_the_copy_implementation(kind, monkeypatch):
    """A whole bf16 tower: in-place output masks and single-thread positions change no bit."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    vision = model.visual.eval().to(torch.bfloat16)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    outs = []
    for variant in ("new", "old"):
        if variant == "old":
            monkeypatch.setattr(mcdo, "_dropout", lambda t, p, g, inplace=False: _copy_dropout(t, p, g))
        g = torch.Generator()
        with torch.no_grad(), mcdo.inject_dropout(vision, 0.05, g, kind):
            g.manual_seed(3)
            outs.append(vision(x))
    assert torch.equal(outs[0], outs[1])


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
