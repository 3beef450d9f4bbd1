"""The MC-dropout mask stream against an independent numpy implementation of its documentation.

``vlmrel.mcdo.dropout`` documents the stream (module docstring, "Random draws"): SplitMix64
outputs as 53-bit integers, geometric gaps by integer threshold tables. Masks must be the same
on every device; only the CPU exists here, so the positions are checked bit for bit against
this file's own reading of the documented stream, which a CUDA run computes the same way.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from vlmrel.mcdo import dropout as mcdo
from vlmrel.mcdo.dropout import drop_positions, splitmix64_u53

MASK64 = (1 << 64) - 1


def splitmix64_python(seed: int, count: int) -> list[int]:
    """Vigna's splitmix64.c, in Python integers."""
    state, out = seed & MASK64, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        out.append(z ^ (z >> 31))
    return out


def u53_numpy(key: int, start: int, count: int) -> np.ndarray:
    """Outputs ``start ..`` of SplitMix64(key) as ``(z >> 11) + 1``, in numpy uint64."""
    with np.errstate(over="ignore"):
        i = np.arange(start + 1, start + count + 1, dtype=np.uint64)
        z = i * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key & MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.int64) + 1


def positions_numpy(key: int, n: int, p: float) -> np.ndarray:
    """The documented stream, read literally: tables by their formulas, counts by comparison."""
    log_q = math.log1p(-p)
    k = math.ceil(53 * math.log(2) / -log_q)
    c = 1 if k <= 2**16 else math.ceil(math.sqrt(k))
    ta = []
    while (t := math.floor(math.exp(c * (len(ta) + 1) * log_q) * 2**53)) >= 1:
        ta.append(t)
    qc = math.exp(c * log_q)
    tb = [math.floor((math.exp(b * log_q) - qc) / (1 - qc) * 2**53) for b in range(1, c)]
    ta_np, tb_np = np.array(ta, dtype=np.int64), np.array(tb, dtype=np.int64)
    gaps_needed = int(n * p + 10 * math.sqrt(n * p) + 50)
    if c == 1:
        va = u53_numpy(key, 0, gaps_needed)
        vb = np.zeros(0, dtype=np.int64)
    else:
        v = u53_numpy(key, 0, 2 * gaps_needed)
        va, vb = v[0::2], v[1::2]
    a = (va[:, None] <= ta_np[None, :]).sum(1)  # #{a >= 1 : V <= TA[a]} = max{a : TA[a] >= V}
    b = (vb[:, None] <= tb_np[None, :]).sum(1) if c > 1 else 0
    pos = np.cumsum(1 + c * a + b) - 1
    assert pos[-1] >= n, "reference drew too few gaps"
    return pos[pos < n]


def key_of(seed: int, draw: int = 0) -> int:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(-(1 << 63), (1 << 63) - 1, (draw + 1,), generator=g, dtype=torch.int64)
    return int(keys[draw])


def test_splitmix64_matches_the_reference_algorithm():
    for seed in (0, 1234567, (1 << 64) - 1, 0x9E3779B97F4A7C15):
        want = [(z >> 11) + 1 for z in splitmix64_python(seed, 64)]
        assert splitmix64_u53(seed - (1 << 64) if seed >= 1 << 63 else seed, 0, 64).tolist() == want
        assert u53_numpy(seed, 0, 64).tolist() == want
    # outputs do not depend on where a block starts
    assert splitmix64_u53(7, 10, 5).tolist() == splitmix64_u53(7, 0, 15)[10:].tolist()


@pytest.mark.parametrize(
    ("n", "p"),
    [(400_000, 0.01), (10_000, 0.5), (5_000, 0.9), (3_000_000, 0.001), (4_000_000, 2e-4), (1_000, 0.3)],
)
def test_positions_equal_the_documented_stream(n, p):
    g = torch.Generator().manual_seed(11)
    got = drop_positions(n, p, g).numpy()
    assert np.array_equal(got, positions_numpy(key_of(11, 0), n, p))
    # the next site's key is the generator's next draw
    got2 = drop_positions(n, p, g, device="cpu").numpy()
    assert np.array_equal(got2, positions_numpy(key_of(11, 1), n, p))


def test_two_level_regime_is_geometric():
    n, p = 50_000_000, 1e-4  # K = 366k steps > 2^16: c = ceil(sqrt(K)) two-level draws
    assert mcdo._gap_tables(p)[0] > 1
    pos = drop_positions(n, p, torch.Generator().manual_seed(5)).numpy()
    assert abs(len(pos) - n * p) < 5 * math.sqrt(n * p)
    assert stats.kstest(np.diff(pos) - 1, stats.geom(p, loc=-1).cdf).pvalue > 1e-3
    assert np.array_equal(pos, positions_numpy(key_of(5), n, p))


@pytest.mark.parametrize("p", [0.01, 0.3, 1e-4])
def test_table_count_is_exact_at_every_threshold(p):
    """The float64 guess is corrected by integer comparisons: V at, just above and just below each
    threshold gets the brute-force count."""
    c, ta, tb, log_q, qc = mcdo._gap_tables(p)
    for table, guess in (
        (ta, lambda v: torch.log(v.double() * 2.0**-53) / (c * log_q)),
        (tb, lambda v: torch.log(v.double() * ((1 - qc) * 2.0**-53) + qc) / log_q),
    ):
        inner = table[1:-1]
        v = torch.cat([inner - 1, inner, inner + 1, torch.tensor([1, 2**53])]).clamp(1, 2**53)
        brute = (v[:, None] <= table[None, 1:-1]).sum(1)
        assert torch.equal(mcdo._table_count(v, table, guess(v)), brute)


def test_rates_zero_and_one():
    g = torch.Generator().manual_seed(0)
    assert drop_positions(10, 1.0, g).tolist() == list(range(10))
    assert drop_positions(10, 0.0, g).numel() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_positions_equal_cpu_positions_and_device_generators_are_refused():
    assert torch.equal(
        drop_positions(3_000_000, 0.01, torch.Generator().manual_seed(2), device="cuda").cpu(),
        drop_positions(3_000_000, 0.01, torch.Generator().manual_seed(2)),
    )
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        drop_positions(10, 0.5, torch.Generator(device="cuda"))
