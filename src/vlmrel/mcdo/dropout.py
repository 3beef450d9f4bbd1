"""MC dropout on frozen vision towers: injection, nested-T trials and trial files (seed 002).

The dropout *site* (``kind``, :data:`KINDS`):

- ``output`` (the default of ``config/config.yaml``): inverted dropout (keep-mask / (1 - p)) on the
  *output* of every linear map of the tower, including the in-projection and ``out_proj`` of
  ``nn.MultiheadAttention``. MHA's forward reads ``in_proj_weight`` / ``out_proj.weight`` directly
  and so never calls ``out_proj`` as a module: the injection replaces the MHA forward with an
  equivalent that applies the in-projection itself and calls ``out_proj`` as a module.
- ``seed002``: the seed's own code, exactly. It wrapped every ``nn.Linear`` with a ``Dropout(p)``
  on its output and left ``nn.MultiheadAttention`` alone, so only the Linear modules whose forward
  runs as a module in a plain forward pass are perturbed: in open_clip's towers the MLP's
  ``c_fc`` / ``c_proj`` (and any other plain Linear), but neither the attention in-projection (a
  parameter, not a module) nor ``out_proj`` (never called as a module). This is the site of the
  seed's published numbers. Its one bug is not copied: the seed re-wrapped the layers on every
  trial, so trial k ran k dropouts in series; here each trial injects into the unpatched tower and
  removes its injection when done (:func:`inject_dropout` refuses a tower still patched).
- ``input``: inverted dropout on the *input* of every linear map (MHA included, as for ``output``).
- ``dropconnect``: a Bernoulli mask on each linear map's weight, scaled 1/(1 - p).
- ``gaussian``: multiplicative N(1, p/(1 - p)) noise on each linear map's input (the variance of
  input dropout at rate p).

CNNs (``effnet_lite0``): the sites are every ``nn.Linear`` plus every pointwise convolution
(``nn.Conv2d`` with a 1x1 kernel and ``groups == 1``: the expansion, projection and head convs).
A pointwise conv is a Linear map over channels applied at each position, so this is the ViT
rule carried over: "input" drops elements of its [B, C, H, W] input, "dropconnect" masks its
[C_out, C_in, 1, 1] weight (one mask for every position, as for a Linear's weight), "gaussian"
multiplies its input. Depthwise convolutions (``groups == in_channels > 1``: a spatial filter
per channel, not a channel mix) stay untouched unless ``depthwise=True`` (config
``mcdo.depthwise_dropout``); full spatial convs (the 3x3 stem) are never sites. BatchNorm stays
in eval mode: :func:`inject_dropout` refuses a tower with a BatchNorm in training mode, so the
running statistics cannot move during a trial (a dropped pass would otherwise shift them).

Random draws (the mask stream) are the same on every device and in every dtype. A pass's
masks come from one CPU ``torch.Generator`` seeded with :func:`pass_seed`; each injection site
(in call order) draws one int64 ``key`` from it (``torch.randint(-2^63, 2^63 - 1)``) and its
dropped positions follow from the key alone, computed on the tensor's device:

1. ``V_i = (splitmix64(key)_i >> 11) + 1`` for ``i = 0, 1, ...``: output ``i`` of SplitMix64 seeded
   with ``key`` (``mix(key + (i + 1) * 0x9E3779B97F4A7C15 mod 2^64)``, Steele et al. 2014), a
   uniform integer in ``[1, 2^53]`` (:func:`splitmix64_u53`).
2. Gap ``j`` between dropped positions is ``1 + c * A_j + B_j`` (a Geometric(p) number of kept
   elements, then the drop), ``q = 1 - p``, with the integer threshold tables of
   ``_gap_tables`` (computed once per rate on the CPU in float64 with Python's ``math``):
   ``A_j = max{a : TA[a] >= V}`` over ``TA[a] = floor(q^(c a) 2^53)`` and
   ``B_j = max{b < c : TB[b] >= V'}`` over ``TB[b] = floor((q^b - q^c) / (1 - q^c) 2^53)``.
   While ``K = ceil(53 ln 2 / -ln q) <= 2^16`` (p >= 5.6e-4), ``c = 1``: ``B = 0`` and
   ``V = V_j``. Below that rate ``c = ceil(sqrt(K))`` keeps both tables near ``sqrt(K)``
   entries, and ``V = V_2j``, ``V' = V_2j+1``. Each count is a float64 inverse-CDF guess
   corrected by two exact integer comparisons with the table.
3. Positions are the cumulative sums of the gaps minus one, below the site's element count
   ``n`` (row-major order of the tensor).

About ``p n`` stream outputs per site instead of ``n`` uniforms (at p = 0.01 a dense
``torch.rand(n) >= p`` mask costs more than a bf16 forward pass on CPU). Integer arithmetic
decides every count, so a device's ``log`` (CPU and CUDA can differ in the last bit, which
would move a ``floor``) only speeds the search; and no device generator is used (CUDA's Philox
and the CPU's Mersenne twister differ). So a
CPU and a GPU run, and an fp64, fp32 and bf16 run, with the same seed see identical masks;
``tests/test_mask_stream.py`` checks the positions against an independent numpy
implementation of this stream. The ``gaussian`` kind draws dense N(0, 1) noise from the same CPU generator and
copies it to the device.

Variances are accumulated as float64 sums of deviations from the first pass (shifted data),
not as ``sumsq/T - mean**2`` in float32, which cancels when the dropout noise is small against
the feature mean (seed 002, defect 8).

Performance (``python -m vlmrel.bench mcdo``: open_clip ViT-B/32, 224 px, bf16 weights, batch 32,
p = 0.01, kind ``output``; the 2-core AMD EPYC with avx512_bf16 this project is developed on).
Where a pass's time goes, by op (``torch.profiler``, one intra-op thread, so that the shares are
not distorted by other jobs on the shared cores):

============================================  ========  ========
op                                            before    now
============================================  ========  ========
linear maps (``addmm``, bias copy included)   74 %      76 %
QuickGELU (``mul``, ``sigmoid``, ``mul``)     ~9.5 %    9.7 %
output-dropout scale (``mul``, a copy)        ~3.5 %    0
attention (``scaled_dot_product_attention``)  5.7 %     5.9 %
patch embedding (``conv1``, 32x32 stride 32)  2.5 %     3.3 %
mask positions (the stream), ``index_fill_``  2 %       2.6 %
LayerNorm, residual adds                      1.6 %     1.3 %
float64 accumulation, casts of [B, 512]       < 0.1 %   < 0.1 %
============================================  ========  ========

So about three quarters of a pass are the GEMMs, and those run at the machine's matmul peak: at
batch 32 a linear map is a [1600, 768] x [768, N] product, and all four shapes (N = 2304, 768,
3072, and 768 from K = 3072) reach 400-430 GFLOP/s with 2 threads, as a 2048^3 product does
(410), so larger batches gain nothing. The ceiling of ``fraction_of_peak`` for this eager tower
is therefore about 0.75-0.8 on an idle machine; the rest is open_clip's QuickGELU (three bf16
elementwise passes over the [B, 50, 3072] MLP activation: the largest non-GEMM cost), the
attention (at 50 tokens the CPU flash kernel takes 6 ms per block at batch 32; a bmm-softmax-bmm
in bf16 takes 3 ms but rounds the logits and probabilities to bf16, four times the flash
kernel's error against float64, so the flash kernel stays), the patch convolution, and the masks.

What changed for speed (same masks; results as stated):

- ``output`` (and ``seed002``) kind in bf16/fp16: the 1/(1 - p) scale is folded into the GEMM
  (``torch.addmm``'s ``alpha`` and ``beta``, :func:`_linear_dropout`), so no pass over the
  output is made to scale it and the output is rounded once (``round(s (xW + b))`` instead of
  ``round(s round(xW + b))``; they differ by at most one bf16 ulp, and the bench's
  ``spearman_vs_fp64`` for this kind went from 0.988 to 0.997, since bf16 rounding of the
  activations is the error that reorders images whose traces differ by a few percent). float32
  and float64 are unchanged bit for bit. Other output-kind sites (a Linear subclass with its own
  forward, a Linear without bias) scale and mask the fresh output in place (no copy; same bits).
- Mask positions are computed with one intra-op thread on the CPU (:func:`_positions`): the
  stream is ~20 small ops per site on ~p n elements, above OpenMP's grain size at batch 32, so
  each is split over the threads and waits at a barrier; when another process holds one of the
  two cores, every such op waits a scheduler slice for the descheduled thread (milliseconds,
  against tens of microseconds of work). In a 2-thread profile at loadavg 2 the mask ops took
  29 % of a pass (the GEMMs 38 %); at loadavg 5, single-thread positions made the median pass
  1.4x faster (4.7 against 3.3 img/s, interleaved in one process).
- Not adopted: ``torch.compile`` of the injected tower (mask positions kept out of the graph with
  ``torch.compiler.disable``; 48 graph breaks per pass) compiled in 199 s and made a batch-16
  pass about 10 % faster (fused QuickGELU, LayerNorm, adds), but changes bf16 bits (max |diff|
  0.04 on features of magnitude 3.6) and recompiles per batch size and kind: it would need
  hundreds of passes to pay for itself and a second set of reference numbers.

On a shared machine the measured ``fraction_of_peak`` is mostly a measure of the load: the bench
records ``loadavg`` and measures the matmul peak before and after the timed runs (the larger
counts), and vlmrel's rate is sustained over the whole trial while the peak is a best-of-8 burst.
"""

from __future__ import annotations

import functools
import json
import math
import os
import zipfile
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmrel.io import write_npz

__all__ = [
    "KINDS",
    "Injection",
    "MomentAccumulator",
    "TrialResult",
    "drop_positions",
    "inject_dropout",
    "load_trial",
    "pass_seed",
    "run_trial",
    "save_trial",
    "splitmix64_u53",
]

KINDS = ("output", "input", "dropconnect", "gaussian", "seed002")
#: kinds whose noise is inverted dropout on a linear map's output
OUTPUT_KINDS = ("output", "seed002")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- random draws
#
# The mask stream (documented in the module docstring, "Random draws"): SplitMix64 outputs as
# 53-bit integers, turned into geometric gaps by integer threshold tables, in int64 arithmetic
# that every torch device computes bit for bit alike.

_U64 = 1 << 64
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_TWO53 = 1 << 53
_ONE_LEVEL_MAX = 1 << 16  # up to this many geometric steps (p >= 5.6e-4), one table: G = A


def _signed64(v: int) -> int:
    """The int64 whose two's-complement bits are the unsigned 64-bit ``v``."""
    v %= _U64
    return v - _U64 if v >= 1 << 63 else v


def _shr(z: torch.Tensor, s: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` on int64 is arithmetic)."""
    r = torch.bitwise_right_shift(z, s, out=out) if out is not None else z >> s
    return r.bitwise_and_((1 << (64 - s)) - 1)


def splitmix64_u53(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Outputs ``start .. start + count - 1`` of SplitMix64 seeded with ``key``, as 53-bit integers + 1.

    Output ``i`` is ``mix(key + (i + 1) * 0x9E3779B97F4A7C15 mod 2^64) >> 11``, plus one, i.e. an
    int64 in ``[1, 2^53]``; ``mix`` is SplitMix64's finaliser. Integer ops only, so any device
    gives the same bits.
    """
    z = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z.mul_(_signed64(_GAMMA)).add_(_signed64(key))  # int64 multiply and add wrap mod 2^64
    t = torch.empty_like(z)
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        z.bitwise_xor_(_shr(z, shift, out=t))
        if mult is not None:
            z.mul_(_signed64(mult))
    return _shr(z, 11, out=t).add_(1)


@functools.lru_cache(maxsize=64)
def _gap_tables(p: float) -> tuple[int, torch.Tensor, torch.Tensor, float, float]:
    """``(c, TA, TB, log_q, q^c)`` of the two-level geometric draw at rate ``p``.

    With ``q = 1 - p``, a Geometric(p) count of kept elements before a drop is ``G = c*A + B``,
    ``A`` and ``B`` independent: ``P(A >= a) = q^(c a)`` and ``P(B >= b) = (q^b - q^c) / (1 - q^c)``
    on ``[0, c)``. ``TA[a] = floor(q^(c a) 2^53)`` for ``a = 1 .. KA`` (the last positive one) and
    ``TB[b] = floor(P(B >= b) 2^53)`` for ``b = 1 .. c - 1``; both padded with ``2^53`` at index 0
    and ``0`` at the end, so they are descending. A uniform integer ``V`` in ``[1, 2^53]`` gives
    ``A = max{a : TA[a] >= V}`` (``P(V <= t) = t / 2^53``). With ``K`` the steps until
    ``q^k 2^53 < 1`` (K = 3,656 at p = 0.01, 36.7M at p = 1e-6): ``c = 1`` (so ``B = 0``, one
    table of ``K`` entries) while ``K <= 2^16``, else ``c = ceil(sqrt(K))``, which keeps both
    tables near ``sqrt(K)`` entries at any rate.
    """
    log_q = math.log1p(-p)
    k_max = math.ceil(53.0 * math.log(2.0) / -log_q)
    c = 1 if k_max <= _ONE_LEVEL_MAX else math.isqrt(k_max - 1) + 1
    ta = [_TWO53]
    while True:
        t = math.floor(math.exp(c * len(ta) * log_q) * _TWO53)
        if t < 1:
            break
        ta.append(t)
    qc = math.exp(c * log_q)
    tb = [_TWO53] + [math.floor((math.exp(b * log_q) - qc) / (1.0 - qc) * _TWO53) for b in range(1, c)]
    return c, torch.tensor(ta + [0], dtype=torch.int64), torch.tensor(tb + [0], dtype=torch.int64), log_q, qc


def _table_count(v: torch.Tensor, table: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """``max{k : table[k] >= v}`` (``table`` descending, ``table[0] >= v``, last entry 0).

    ``estimate`` is a float64 inverse-CDF guess, within one of the answer; the two integer
    comparisons make the result exact whatever the device's ``log`` rounds to.
    """
    k = estimate.floor_().to(torch.int64).clamp_(0, table.numel() - 2)
    high = table.index_select(0, k) < v  # the guess is one too high
    low = table.index_select(0, k + 1) >= v  # one too low
    return k.sub_(high.to(torch.int64)).add_(low.to(torch.int64))


def drop_positions(
    n: int, p: float, generator: torch.Generator, device: torch.device | str | None = None
) -> torch.Tensor:
    """Sorted flat positions in ``[0, n)``, each included independently with probability ``p``.

    One int64 key is drawn from ``generator`` (a CPU ``torch.Generator``); the positions follow
    from the key alone by the documented stream (module docstring), computed on ``device``
    (default CPU) with integer ops, so every device and dtype gets the same positions. On a GPU
    the count of positions below ``n`` is read back once per call (one synchronisation).
    """
    if generator.device.type != "cpu":
        raise ValueError(
            f"dropout masks are drawn from a CPU torch.Generator (got one on {generator.device}); "
            "the positions are then computed on the tensor's device"
        )
    dev = torch.device("cpu") if device is None else torch.device(device)
    key = int(torch.randint(-(1 << 63), (1 << 63) - 1, (1,), generator=generator, dtype=torch.int64))
    if p <= 0.0 or n <= 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    if p >= 1.0:
        return torch.arange(n, dtype=torch.int64, device=dev)
    c, ta, tb, log_q, qc = _gap_tables(float(p))
    ta, tb = ta.to(dev), tb.to(dev)
    chunks: list[torch.Tensor] = []
    start = 0  # first position not yet covered
    drawn = 0  # gaps drawn so far
    while start < n:
        mean = (n - start) * p
        m = int(mean + 6.0 * math.sqrt(mean) + 16)
        if c == 1:  # gap j from stream output j
            va = splitmix64_u53(key, drawn, m, dev)
        else:  # gap j from stream outputs 2j (A) and 2j + 1 (B)
            v = splitmix64_u53(key, 2 * drawn, 2 * m, dev).view(m, 2).T
            va, vb = v[0].contiguous(), v[1].contiguous()
        u = va.to(torch.float64).mul_(2.0**-53)  # exact: va <= 2^53
        gaps = _table_count(va, ta, u.log_().div_(c * log_q))
        if c > 1:
            u = vb.to(torch.float64).mul_((1.0 - qc) * 2.0**-53).add_(qc)
            gaps.mul_(c).add_(_table_count(vb, tb, u.log_().div_(log_q)))
        gaps.add_(1)
        drawn += m
        pos = torch.cumsum(gaps, 0).add_(start - 1)  # sorted
        k = int(torch.searchsorted(pos, n))  # positions < n
        chunks.append(pos[:k])
        if k < m:
            break
        start = int(pos[-1]) + 1
    return torch.cat(chunks)


def _positions(n: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """:func:`drop_positions` on ``device``; on the CPU with one intra-op thread.

    The mask stream is ~20 small ops per site (about ``p n`` elements each). Split over OpenMP
    threads they gain microseconds on an idle machine, but every one of them waits at a barrier
    for its slowest thread, and on a shared machine a descheduled thread stalls each op for a
    scheduler slice (milliseconds): see "Performance" in the module docstring. Integer ops, and a
    float guess corrected exactly, so the positions do not depend on the thread count.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        return drop_positions(n, p, generator, device=device)
    torch.set_num_threads(1)
    try:
        return drop_positions(n, p, generator, device=device)
    finally:
        torch.set_num_threads(threads)


def _dropout(x: torch.Tensor, p: float, generator: torch.Generator, *, inplace: bool = False) -> torch.Tensor:
    """Inverted dropout of ``x``: a new tensor (``x`` untouched), or ``x`` itself when ``inplace``.

    ``inplace`` is for a fresh tensor no one else holds (a linear map's output): it is scaled and
    masked where it lies, saving an allocation and a copy per site; the values are the same bit
    for bit (the same scalar multiply; a non-contiguous ``x`` falls back to the copy, since the
    positions index the row-major order).
    """
    # a Python-float scalar multiplies bf16/fp16 in float32 (opmath), so 1/(1-p) is not rounded
    if inplace and x.is_contiguous():
        y = x.mul_(1.0 / (1.0 - p))
    else:
        y = x.mul(1.0 / (1.0 - p)).contiguous()
    return _zero_dropped(y, p, generator)


def _zero_dropped(y: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Zero, in place, the elements of contiguous ``y`` that the mask stream drops; ``y``."""
    y.view(-1).index_fill_(0, _positions(y.numel(), p, generator, y.device), 0)
    return y


def _scaled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``F.linear(x, weight, bias) * scale`` with the scale folded into the GEMM (addmm's alpha, beta).

    One rounding: a bf16 result is ``round(scale * (x W^T + b))`` from the float32 accumulator,
    where ``F.linear(...).mul_(scale)`` gives ``round(scale * round(x W^T + b))`` (within one
    bf16 ulp of each other), and the separate pass over the output is saved.
    """
    out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.t(), beta=scale, alpha=scale)
    return out.view(*x.shape[:-1], weight.shape[0])


def _linear_dropout(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: float, generator: torch.Generator
) -> torch.Tensor:
    """Inverted dropout on the output of ``F.linear(x, weight, bias)`` (the ``output`` kind).

    In bf16/fp16 (with a bias) the 1/(1-p) scale is folded into the GEMM (:func:`_scaled_linear`)
    and only the zeros are written after it; in float32/float64 this is exactly
    ``_dropout(F.linear(x, weight, bias), p, generator)`` (the same bits). The mask is the same
    in every dtype.
    """
    if x.dtype in _LOW_PRECISION and bias is not None and x.dim() >= 2 and p > 0.0:
        return _zero_dropped(_scaled_linear(x, weight, bias, 1.0 / (1.0 - p)), p, generator)
    return _dropout(F.linear(x, weight, bias), p, generator, inplace=True)


def _gaussian(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Multiplicative N(1, p/(1-p)) noise: the variance of inverted dropout at rate p.

    The noise is drawn on the CPU generator and copied to ``x``'s device (same numbers on every
    device; on a GPU this kind costs a host-to-device copy of a dense tensor per site).
    """
    sigma = math.sqrt(p / (1.0 - p))
    noise = torch.randn(tuple(x.shape), generator=generator, dtype=torch.float32)
    noise = noise.to(x.device).mul_(sigma).add_(1.0)
    if x.dtype == torch.float32 or x.dtype in _LOW_PRECISION:
        return (x.float() * noise).to(x.dtype)
    return x * noise.to(x.dtype)


# --------------------------------------------------------------------------- injection


class Injection:
    """Handle of an injected dropout: ``targets``, per-target ``calls``, ``remove()``.

    Also a context manager (removes on exit).
    """

    def __init__(
        self,
        p: float,
        generator: torch.Generator,
        kind: str,
        active: Collection[str] | None,
        rates: Mapping[str, float] | None = None,
    ) -> None:
        self.p = float(p)
        self.rates = {str(k): float(v) for k, v in (rates or {}).items()}
        self.generator = generator
        self.kind = kind
        self.targets: list[str] = []
        self.calls: dict[str, int] = {}
        self._active = None if active is None else set(active)
        self._patched: list[nn.Module] = []

    def rate(self, target: str | None) -> float:
        """The dropout rate at ``target``: its own rate (exp11's layer-wise rates), else ``p``
        (also for ``None``, a site without a target name)."""
        return self.rates.get(target, self.p)

    def any_active(self) -> bool:
        return self.p > 0.0 or any(r > 0.0 for r in self.rates.values())

    def is_active(self, target: str) -> bool:
        """Whether noise is applied at ``target`` (its rate > 0 and the target is selected)."""
        return self.rate(target) > 0.0 and (self._active is None or target in self._active)

    def reset_calls(self) -> None:
        for key in self.calls:
            self.calls[key] = 0

    def noise_input(self, x: torch.Tensor, target: str | None = None) -> torch.Tensor:
        p = self.rate(target)
        if self.kind == "gaussian":
            return _gaussian(x, p, self.generator)
        return _dropout(x, p, self.generator)

    def noise_weight(self, w: torch.Tensor, target: str | None = None) -> torch.Tensor:
        return _dropout(w, self.rate(target), self.generator)

    def noise_output(self, y: torch.Tensor, target: str | None = None) -> torch.Tensor:
        """Inverted dropout of a linear map's output ``y``, in place (``y`` must be fresh)."""
        return _dropout(y, self.rate(target), self.generator, inplace=True)

    def linear_output(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: str | None = None
    ) -> torch.Tensor:
        """``noise_output(F.linear(x, weight, bias))``, the scale folded into the GEMM in bf16."""
        return _linear_dropout(x, weight, bias, self.rate(target), self.generator)

    def remove(self) -> None:
        """Restore every patched module's own forward."""
        for module in self._patched:
            if "forward" in module.__dict__:
                del module.forward
        self._patched.clear()

    def __enter__(self) -> Injection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _count(self, target: str) -> None:
        self.calls[target] += 1


def _linear_forward(inj: Injection, module: nn.Linear, target: str) -> Callable[[torch.Tensor], torch.Tensor]:
    original = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        inj._count(target)
        if not inj.is_active(target):
            return original(x)
        if inj.kind == "dropconnect":
            return F.linear(x, inj.noise_weight(module.weight, target), module.bias)
        if inj.kind in OUTPUT_KINDS:
            if type(module).forward is nn.Linear.forward:  # a plain Linear: F.linear, scale folded in
                return inj.linear_output(x, module.weight, module.bias, target)
            return inj.noise_output(original(x), target)
        return original(inj.noise_input(x, target))

    return forward


def _conv_forward(inj: Injection, module: nn.Conv2d, target: str) -> Callable[[torch.Tensor], torch.Tensor]:
    original = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        inj._count(target)
        if not inj.is_active(target):
            return original(x)
        if inj.kind == "dropconnect":
            if type(module).forward is not nn.Conv2d.forward:
                raise NotImplementedError(
                    f"dropconnect on {target} ({type(module).__name__}): only plain nn.Conv2d is supported"
                )
            return module._conv_forward(x, inj.noise_weight(module.weight), module.bias)
        return original(inj.noise_input(x))

    return forward


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 ``nn.Conv2d`` without groups: a Linear map over channels at each position."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1


def is_depthwise_conv(module: nn.Module) -> bool:
    """An ``nn.Conv2d`` with one group per input channel (a spatial filter per channel)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def _mha_forward(inj: Injection, mha: nn.MultiheadAttention, prefix: str) -> Callable[..., Any]:
    original = mha.forward
    in_targets = _mha_in_targets(mha, prefix)
    out_target = f"{prefix}.out_proj" if prefix else "out_proj"

    def forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not inj.any_active():  # exact no-op: the module's own forward, calls still counted
            for t in in_targets:
                inj._count(t)
            inj._count(out_target)
            return original(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        out = mha_functional(
            mha,
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            injection=inj,
            prefix=prefix,
        )
        return out, None  # attention weights are not computed

    return forward


def _mha_in_targets(mha: nn.MultiheadAttention, prefix: str) -> list[str]:
    dot = f"{prefix}." if prefix else ""
    if mha._qkv_same_embed_dim:
        return [f"{dot}in_proj"]
    return [f"{dot}q_proj", f"{dot}k_proj", f"{dot}v_proj"]


def mha_functional(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    injection: Injection | None = None,
    prefix: str = "",
) -> torch.Tensor:
    """``nn.MultiheadAttention`` forward (attention output only) with explicit projections.

    The in-projection is applied here, with ``injection``'s noise on its input(s) (or its
    weight, for dropconnect); ``out_proj`` is called as a module so its own patched forward
    runs. Without an injection the result equals ``mha(query, key, value)[0]`` to float
    tolerance.
    """
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        raise NotImplementedError("MultiheadAttention with bias_k/bias_v/add_zero_attn is not supported")
    if mha.dropout > 0.0 and mha.training:
        raise NotImplementedError("MultiheadAttention attention-dropout in training mode is not supported")
    inj = injection

    def on_input(target: str, x: torch.Tensor) -> torch.Tensor:
        if inj is not None and inj.kind in ("input", "gaussian") and inj.is_active(target):
            return inj.noise_input(x, target)
        return x

    def project(target: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, w, b)`` of ``target`` with its noise: input noise before the map, or
        output dropout after it (the scale folded into the GEMM in bf16)."""
        if inj is not None and inj.kind in OUTPUT_KINDS and inj.is_active(target):
            return inj.linear_output(x, w, b, target)
        return F.linear(on_input(target, x), w, b)

    def on_weight(target: str, w: torch.Tensor) -> torch.Tensor:
        if inj is None:
            return w
        inj._count(target)
        if inj.kind == "dropconnect" and inj.is_active(target):
            return inj.noise_weight(w, target)
        return w

    same_kv = key is value
    self_attn = same_kv and query is key
    unbatched = query.dim() == 2
    if unbatched:  # [L, E] -> [1, L, E]
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not mha.batch_first:  # [L, B, E] -> [B, L, E]
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

    embed, heads = mha.embed_dim, mha.num_heads
    targets = _mha_in_targets(mha, prefix)
    bias = mha.in_proj_bias
    b_q, b_k, b_v = (None, None, None) if bias is None else bias.split([embed, embed, embed])
    if mha._qkv_same_embed_dim:
        t = targets[0]
        w = on_weight(t, mha.in_proj_weight)
        if self_attn:
            q, k, v = project(t, query, w, bias).chunk(3, dim=-1)
        else:
            w_q, w_kv = w.split([embed, 2 * embed])
            b_kv = None if bias is None else bias[embed:]
            q = project(t, query, w_q, b_q)
            if same_kv:
                k, v = project(t, key, w_kv, b_kv).chunk(2, dim=-1)
            else:
                w_k, w_v = w_kv.split([embed, embed])
                k = project(t, key, w_k, b_k)
                v = project(t, value, w_v, b_v)
    else:
        w_q = on_weight(targets[0], mha.q_proj_weight)
        w_k = on_weight(targets[1], mha.k_proj_weight)
        w_v = on_weight(targets[2], mha.v_proj_weight)
        q = project(targets[0], query, w_q, b_q)
        k = project(targets[1], key, w_k, b_k)
        v = project(targets[2], value, w_v, b_v)

    bsz, tgt_len, _ = q.shape
    src_len = k.shape[1]
    head_dim = embed // heads
    q = q.reshape(bsz, tgt_len, heads, head_dim).transpose(1, 2)
    k = k.reshape(bsz, src_len, heads, head_dim).transpose(1, 2)
    v = v.reshape(bsz, src_len, heads, head_dim).transpose(1, 2)
    mask = _merge_masks(attn_mask, key_padding_mask, bsz, heads, tgt_len, src_len, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
    out = mha.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, embed))
    if unbatched:
        return out.squeeze(0)
    return out if mha.batch_first else out.transpose(0, 1)


def _merge_masks(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    bsz: int,
    heads: int,
    tgt_len: int,
    src_len: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """MHA's masks (bool True = masked, or additive float) as one additive [B, H, L, S] mask."""
    merged: torch.Tensor | None = None

    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    if attn_mask is not None:
        am = additive(attn_mask)
        am = am.view(1, 1, tgt_len, src_len) if am.dim() == 2 else am.view(bsz, heads, tgt_len, src_len)
        merged = am
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).view(bsz, 1, 1, src_len)
        merged = kpm if merged is None else merged + kpm
    return merged


def inject_dropout(
    vision: nn.Module,
    p: float,
    generator: torch.Generator,
    kind: str = "input",
    *,
    only: Collection[str] | None = None,
    depthwise: bool = False,
    rates: Mapping[str, float] | None = None,
) -> Injection:
    """Inject MC dropout into every linear map of ``vision``; returns the :class:`Injection`.

    ``kind`` (module docstring): "output" (inverted dropout on each linear map's output),
    "seed002" (the seed's code: output dropout on the ``nn.Linear`` modules only, MHA left alone,
    so ``out_proj`` is a target that is never called), "input" (inverted dropout on each
    linear map's input), "dropconnect" (Bernoulli mask on the weight, scaled 1/(1-p)) or
    "gaussian" (multiplicative N(1, p/(1-p)) noise on the input). ``only`` restricts the noise to
    the named targets (the others still count calls); ``rates`` gives targets their own rate
    (exp11's layer-wise search), the others keep ``p``. The linear maps are every Linear,
    MultiheadAttention projection and pointwise (1x1) convolution; ``depthwise`` adds the depthwise
    convolutions. p == 0 (and no positive rate) is an exact no-op. ``vision`` may be any module
    (exp10 injects into a text tower).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown dropout kind {kind!r}; choose one of {KINDS}")
    if not (0.0 <= float(p) < 1.0) or math.isnan(float(p)):
        raise ValueError(f"dropout rate p must be in [0, 1), got {p!r}")
    if any("forward" in m.__dict__ for m in vision.modules()):
        raise RuntimeError("vision tower already has patched forwards (an injection not removed?)")
    training_bn = [
        n or type(vision).__name__ for n, m in vision.named_modules() if _is_batchnorm(m) and m.training
    ]
    if training_bn:
        raise RuntimeError(
            f"BatchNorm in training mode ({training_bn[:3]}): MC dropout needs the tower in eval mode, "
            "or every pass would update the running statistics"
        )
    for target, rate in (rates or {}).items():
        if not (0.0 <= float(rate) < 1.0):
            raise ValueError(f"dropout rate of {target!r} must be in [0, 1), got {rate!r}")
    inj = Injection(p, generator, kind, only, rates)
    for name, module in vision.named_modules():
        if isinstance(module, nn.MultiheadAttention) and kind != "seed002":
            module.forward = _mha_forward(inj, module, name)
            inj._patched.append(module)
            inj.targets.extend(_mha_in_targets(module, name))
        elif isinstance(module, nn.Linear):
            module.forward = _linear_forward(inj, module, name)
            inj._patched.append(module)
            inj.targets.append(name)
        elif is_pointwise_conv(module) or (depthwise and is_depthwise_conv(module)):
            module.forward = _conv_forward(inj, module, name)
            inj._patched.append(module)
            inj.targets.append(name)
    inj.calls = dict.fromkeys(inj.targets, 0)
    for selected in (only, rates):
        if selected is None:
            continue
        unknown = sorted(set(selected) - set(inj.targets))
        if unknown:
            inj.remove()
            raise ValueError(f"unknown injection targets {unknown}; targets are {inj.targets}")
    return inj


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


# --------------------------------------------------------------------------- trials


class MomentAccumulator:
    """Per-row mean and population variance of a stream of ``[N, D]`` samples, stably.

    float64 sums of deviations from the first sample (shifted data): no cancellation when the
    spread is tiny against the mean.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift: torch.Tensor | None = None
        self._s1: torch.Tensor | None = None
        self._s2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = torch.as_tensor(x).to(torch.float64)
        if self._shift is None:
            self._shift = x.clone()
            self._s1 = torch.zeros_like(x)
            self._s2 = torch.zeros_like(x)
        assert self._s1 is not None and self._s2 is not None
        d = x - self._shift
        self._s1 += d
        self._s2 += d * d
        self.n += 1

    def mean(self) -> torch.Tensor:
        if self._shift is None or self._s1 is None:
            raise ValueError("no samples accumulated")
        return self._shift + self._s1 / self.n

    def variance(self) -> torch.Tensor:
        """Population variance (ddof = 0) per element."""
        if self._s1 is None or self._s2 is None:
            raise ValueError("no samples accumulated")
        m = self._s1 / self.n
        return (self._s2 / self.n - m * m).clamp_min_(0.0)

    def trace(self) -> torch.Tensor:
        """Per-row trace of the (diagonal) covariance divided by D: the mean variance."""
        return self.variance().mean(dim=-1)


@dataclass
class TrialResult:
    """Trace snapshots of one MC trial: ``trace_pre`` / ``trace_post`` are ``[len(T), N]``."""

    T: list[int]
    trace_pre: np.ndarray
    trace_post: np.ndarray
    image_id: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def pass_seed(seed: int, trial: int, batch: int, t: int) -> int:
    """Seed of the generator for pass ``t`` of batch ``batch`` of trial ``trial``.

    Trial k's stream is a function of ``seed + k`` alone (so trial k under seed s is trial k-1 under
    seed s+1), spread over (batch, pass) by a SeedSequence so that a pass's masks do not depend on
    T_max: the T=4 snapshot of a T_max=16 run equals a T=4 run, and batches are independent.
    """
    state = np.random.SeedSequence([int(seed) + int(trial), int(batch), int(t)]).generate_state(
        2, dtype=np.uint32
    )
    return (int(state[0]) << 31) ^ int(state[1])


def _batch_len(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def run_trial(
    encoder: Any,
    batches: Iterable[tuple[Sequence[str], Any]],
    *,
    p: float,
    seed: int,
    trial: int,
    T_list: Sequence[int],
    kind: str = "input",
    progress: bool = True,
    on_pass: Callable[[int, int, torch.Tensor], None] | None = None,
    depthwise: bool = False,
    rates: Mapping[str, float] | None = None,
) -> TrialResult:
    """One MC-dropout trial: T_max passes per batch, trace snapshots at every T in ``T_list``.

    The (CPU) generator is re-seeded for pass t of batch b with
    ``pass_seed(seed, trial, b, t)``, so the T=4 snapshot of a T_max=16 run equals a T=4 run,
    and a trial does not depend on T_max. Masks do depend on the batching (batch size).

    ``on_pass(batch_start, t, features)`` is called after every stochastic pass with the batch's
    position in the trial's image order, the 0-based pass index and its features [B, D] before
    normalisation (e.g. :class:`vlmrel.geometry.GeometryCollector` for exp0b/exp4).
    ``depthwise`` makes depthwise convolutions injection sites too (CNNs; see the module docstring).
    """
    from tqdm.auto import tqdm

    Ts = sorted({int(t) for t in T_list})
    if not Ts or Ts[0] < 1:
        raise ValueError(f"T_list must hold positive pass counts, got {list(T_list)}")
    t_max = Ts[-1]
    snap_index = {t: i for i, t in enumerate(Ts)}
    generator = torch.Generator()  # CPU: the mask stream is device-independent (module docstring)
    generator.manual_seed(int(seed) + int(trial))
    pre_chunks: list[np.ndarray] = []
    post_chunks: list[np.ndarray] = []
    ids: list[str] = []
    n_batches = _batch_len(batches)
    total = None if n_batches is None else n_batches * t_max
    bar = tqdm(total=total, disable=not progress, unit="pass", desc=f"{encoder.name} p={p} trial {trial}")
    batch_size = 0
    with inject_dropout(encoder.vision, p, generator, kind, depthwise=depthwise, rates=rates) as inj:
        n_sites = len(inj.targets)
        for b, (batch_ids, pixels) in enumerate(batches):
            x = encoder.prepare(pixels)
            if len(batch_ids) != x.shape[0]:
                raise ValueError(f"batch {b}: {len(batch_ids)} image ids for {x.shape[0]} images")
            batch_size = max(batch_size, int(x.shape[0]))
            acc_pre, acc_post = MomentAccumulator(), MomentAccumulator()
            pre = np.empty((len(Ts), x.shape[0]))
            post = np.empty((len(Ts), x.shape[0]))
            for t in range(1, t_max + 1):
                generator.manual_seed(pass_seed(seed, trial, b, t - 1))
                feats = encoder.encode_image(x).to(torch.float64)
                if on_pass is not None:
                    on_pass(len(ids), t - 1, feats)
                acc_pre.add(feats)
                acc_post.add(feats / feats.norm(dim=-1, keepdim=True))
                if t in snap_index:
                    pre[snap_index[t]] = acc_pre.trace().cpu().numpy()
                    post[snap_index[t]] = acc_post.trace().cpu().numpy()
                bar.update(1)
            pre_chunks.append(pre)
            post_chunks.append(post)
            ids.extend(str(i) for i in batch_ids)
    bar.close()
    empty = np.empty((len(Ts), 0))
    meta = {
        "model": encoder.name,
        "p": float(p),
        "seed": int(seed),
        "trial": int(trial),
        "kind": kind,
        "sites": n_sites,
        "depthwise": bool(depthwise),
        "precision": encoder.precision,
        "device": str(encoder.device),
        "batch_size": batch_size,
        "T": Ts,
        "num_images": len(ids),
        "rng": (
            "SeedSequence([seed + trial, batch, t]) -> CPU torch.Generator per pass -> one key per site;"
            " SplitMix64 + integer geometric gaps (device-independent Bernoulli masks)"
        ),
    }
    return TrialResult(
        T=Ts,
        trace_pre=np.concatenate(pre_chunks, axis=1) if pre_chunks else empty,
        trace_post=np.concatenate(post_chunks, axis=1) if post_chunks else empty.copy(),
        image_id=ids,
        meta=meta,
    )


# --------------------------------------------------------------------------- files


def versions() -> dict[str, str]:
    """Versions of the packages that shape a trial's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    import vlmrel

    out = {"torch": torch.__version__, "numpy": np.__version__, "vlmrel": vlmrel.__version__}
    for pkg, dist in (("open_clip", "open_clip_torch"), ("transformers", "transformers")):
        try:
            out[pkg] = version(dist)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def save_trial(path: str | os.PathLike[str], result: TrialResult, meta: dict[str, Any] | None = None) -> None:
    """Write ``result`` to ``path`` (.npz) atomically; ``meta`` extends the result's provenance.

    A ``meta`` key that contradicts the result's own provenance (model, p, seed, ...) is an error.
    """
    full: dict[str, Any] = dict(result.meta)
    full["T"] = [int(t) for t in result.T]
    for key, value in (meta or {}).items():
        if key in full and full[key] != value:
            raise ValueError(f"{path}: meta[{key!r}]={value!r} contradicts the trial's own {full[key]!r}")
        full[key] = value
    full["versions"] = versions()
    n = len(result.image_id)
    shape = (len(result.T), n)
    for key in ("trace_pre", "trace_post"):
        arr = getattr(result, key)
        if arr.shape != shape:
            raise ValueError(f"{path}: {key} has shape {arr.shape}, expected {shape}")
    arrays = {
        "T": np.asarray(result.T, dtype=np.int64),
        "trace_pre": np.asarray(result.trace_pre, dtype=np.float64),
        "trace_post": np.asarray(result.trace_post, dtype=np.float64),
        "image_id": np.asarray(result.image_id, dtype=np.str_).reshape(n),
    }
    write_npz(path, arrays, full)


def load_trial(path: str | os.PathLike[str]) -> tuple[TrialResult, dict[str, Any]]:
    """Read a trial file written by :func:`save_trial` (no pickles: ``allow_pickle=False``)."""
    required = ("T", "trace_pre", "trace_post", "image_id", "meta")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k in required}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # unreadable, or holds pickled objects
        raise ValueError(f"{path}: cannot read trial file: {exc}") from exc
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ValueError(f"{path}: not a trial file, missing arrays {missing}")
    try:
        meta = json.loads(str(arrays["meta"][()]))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: meta is not JSON: {exc}") from exc
    T = [int(t) for t in arrays["T"]]
    pre = arrays["trace_pre"].astype(np.float64)
    post = arrays["trace_post"].astype(np.float64)
    ids = [str(i) for i in arrays["image_id"]]
    if pre.shape != (len(T), len(ids)) or post.shape != pre.shape:
        raise ValueError(
            f"{path}: trace shapes {pre.shape}/{post.shape} do not match T={T} and {len(ids)} ids"
        )
    return TrialResult(T=T, trace_pre=pre, trace_post=post, image_id=ids, meta=meta), meta
