"""Hard input streams and their numpy float64 ground truth, shared by the accuracy tests of every backend."""
from __future__ import annotations

import math

import numpy as np
import torch

# name -> (feature shape, batch sizes of the stream, how to fill a batch)
STREAMS = {
    "offset1e4_tiny_spread": ((7,), [64, 1, 33, 64], lambda g, b, s: 1e4 + 1e-2 * g.standard_normal((b, *s))),
    "offset1e6_unit_spread": ((5,), [64, 17, 64], lambda g, b, s: 1e6 + g.standard_normal((b, *s))),
    "mixed_offsets": ((3,), [40, 40], lambda g, b, s: np.array([1e4, -1e5, 1e6]) + g.standard_normal((b, *s))),
    "constant_columns": ((4,), [16, 16, 1], lambda g, b, s: np.broadcast_to(np.array([3.0, -2.5, 0.0, 7e5]), (b, *s))),
    "single_feature": ((1,), [1, 1, 9, 100], lambda g, b, s: 50.0 + 0.1 * g.standard_normal((b, *s))),
    "odd_features": ((33,), [1, 31, 65], lambda g, b, s: g.standard_normal((b, *s)) * 3 + 10),
    "three_d_features": ((2, 3), [8, 5, 1], lambda g, b, s: g.standard_normal((b, *s)) + 100.0),
}

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# float16 tops out at 65504: streams with larger offsets are not representable in it.
_BEYOND_FP16 = {"offset1e6_unit_spread", "mixed_offsets", "constant_columns"}
STREAM_CASES = [
    (name, dtype) for name in sorted(STREAMS) for dtype in DTYPES if not (dtype == torch.float16 and name in _BEYOND_FP16)
]

# Relative bounds promised for the running statistics against float64 truth on the same (already rounded) data.
MEAN_RTOL = 1e-7
VAR_RTOL = 1e-6


# Constant columns whose float64 sum over the rows rounds: a mean taken as sum / n lands an ulp off the value, and the
# squared deviations from it leave the variance n * ulp^2 instead of 0. Two NaN rows of one batch, its first
# among them, are dropped.
CONSTANT_VALUES = [0.1, 1 / 3, -2.7e-3, 7e5 + 0.1, 1e8 + 0.3]
CONSTANT_BATCH_SIZES = [3, 70, 1, 5, 33]


def assert_constant_columns_exact(moments, merge, dtype, device="cpu", batch_sizes=CONSTANT_BATCH_SIZES):
    """Record batches of constant columns (``CONSTANT_VALUES`` in ``dtype``) with ``moments(x) -> parts`` and
    ``merge(parts, mean, var, count, dropped, ema_decay)``. Truth by construction: every part's mean is each column's
    value and its m2 is 0, exactly; from nothing (count 0) Welford gives that mean and a variance of exactly +0, and
    EMA from a variance of 0 keeps it 0 (a tiny positive variance would be what normalize divides by where
    ``epsilon`` is 0 or tiny)."""
    row = torch.tensor(CONSTANT_VALUES, dtype=torch.float64).to(dtype).to(device)
    value = row.to(torch.float64)
    d = row.shape[0]
    zeros = torch.zeros(d, dtype=torch.float64, device=device)
    counts = [torch.tensor(c, device=device) for c in (0, 0, 1, 0)]
    welford = [zeros.clone(), zeros.clone(), *counts[:2]]
    ema = [value.clone(), zeros.clone(), *counts[2:]]
    for i, b in enumerate(batch_sizes):
        x = row.expand(b, d).clone()
        if i == 1:
            x[4, 2] = float("nan")
            x[0, 1] = float("nan")  # the first row dropped: the shift must be the first valid row, not row 0
        parts = moments(x)
        valid = parts[:, 0] > 0
        for what, got, want in (("mean", parts[valid, 2 : 2 + d], value), ("m2", parts[:, 2 + d :], zeros)):
            assert torch.equal(got, want.expand_as(got)), f"parts' {what}: {got} != {want}"
        merge(parts, *welford, None)
        merge(parts, *ema, 0.9)
    assert torch.equal(welford[0], value), f"mean {welford[0]} != {value}"
    assert torch.equal(welford[1], zeros) and not welford[1].signbit().any(), f"var {welford[1]}"
    assert int(welford[2]) == sum(batch_sizes) - 2 and int(welford[3]) == 2
    assert torch.equal(ema[1], zeros), f"EMA var {ema[1]}"


# Long streams of small records: (offset, spread, input dtype). Each record rounds the float64 running mean by up to
# half an ulp of the offset, and that rounding enters the next merge's variance term: the variance's relative error is
# up to about ulp(offset) / spread whatever the stream's length (measured 0.1-0.7 of it, single rows worst), 1.2e-7 at
# 1e6 +- 1e-3 and 1.5e-5 at 1e8 +- 1e-3 (float64 data); the mean's stays below 1e-13 (README.md).
LONG_STREAMS = [(1e6, 1e-3, torch.float64), (1e8, 1e-3, torch.float64), (1e4, 1e-2, torch.float32)]


def long_stream_var_rtol(offset: float, spread: float) -> float:
    return max(math.ulp(offset) / spread, 1e-12)


def assert_long_stream_accurate(moments, merge, offset, spread, dtype, records, device="cpu", seed=0):
    """Record ``records`` batches of 1-4 rows (single rows first, the worst case) at ``offset`` +- ``spread`` from
    nothing (count 0) with ``moments(x) -> parts`` and ``merge``. Truth: numpy float64 two-pass over all the rows at
    once (of the data as rounded to ``dtype``): its mean is off by a few ulps at most (pairwise sums), which moves its
    variance by the square of that, 1e-9 of the bound or less. The mean is held to ``MEAN_RTOL``, the variance to
    ``long_stream_var_rtol``, the count exactly."""
    g = np.random.default_rng(seed)
    sizes = np.where(np.arange(records) < records // 2, 1, g.integers(1, 5, records))
    d = 3
    x = torch.from_numpy(offset + spread * g.standard_normal((int(sizes.sum()), d))).to(dtype).to(device)
    mean, var = (torch.zeros(d, dtype=torch.float64, device=device) for _ in range(2))
    count, dropped = torch.tensor(0, device=device), torch.tensor(0, device=device)
    start = 0
    for size in sizes.tolist():
        merge(moments(x[start : start + size]), mean, var, count, dropped, None)
        start += size
    t_mean, t_var, t_count = truth([x.cpu()], with_prior=False)
    assert int(count) == t_count
    assert_close_rel(mean, t_mean, MEAN_RTOL, "mean")
    assert_close_rel(var, t_var, long_stream_var_rtol(offset, spread), "var")


# Batches at the edges of their dtype: name -> (rows, dtype). Float16 sums overflow past 65504, float32 squares past
# 1.8e19 and its sums past 3.4e38, subnormals lose bits when squared, -0.0 must act as 0. Repeated to 15 rows and 10
# columns, so that the kernels' vector loops and their tails both see them.
EXTREME_BATCHES = {
    "fp16_near_max": ([[65504.0, -65504.0], [65504.0, 65504.0], [-65504.0, 60000.0]], torch.float16),
    "bf16_near_max": ([[3e38, -3e38], [1e38, 2e38], [-3.3e38, 1e30]], torch.bfloat16),
    "fp32_near_max": ([[3.4e38, -3.4e38], [3.4e38, 3.3e38], [-3.4e38, 1e38]], torch.float32),
    "fp32_subnormal": ([[1e-45, -1e-44], [3e-42, 1e-40], [0.0, 1e-39]], torch.float32),
    "fp16_subnormal": ([[6e-8, -6e-8], [3e-6, 1e-5], [0.0, 5e-5]], torch.float16),
    "fp64_subnormal": ([[5e-324, -5e-324], [1e-310, 2e-308], [0.0, 1e-320]], torch.float64),
    # Finite float64 values past float32's range, which a test for NaN/inf in float32 would take for infinities.
    "fp64_beyond_fp32": ([[1e100, -1e100], [4e39, 1e50], [-3e99, -7e40]], torch.float64),
    "negative_zero": ([[-0.0, -0.0], [-0.0, 0.0], [-0.0, 1.0]], torch.float32),
}


def extreme_batch(name: str, device="cpu") -> torch.Tensor:
    rows, dtype = EXTREME_BATCHES[name]
    return torch.tensor(rows, dtype=torch.float64).to(dtype).repeat(5, 5).to(device)


def assert_moments_exact(part: torch.Tensor, x: torch.Tensor, rtol: float = 1e-14):
    """One combined part of ``x`` against its exact moments (``fractions.Fraction``, then rounded once): the m2 within
    ``rtol`` relative, the mean within ``rtol`` of its magnitude plus the standard deviation (its error scales with
    the deviations summed: with an outlier as the shift, with the outlier), each plus 2 ulps of the smallest float64
    subnormal, as a subnormal mean or the square of one cannot hold more (the m2 of float64 subnormals underflows to
    0). 1e-14 for a few rows of float64 sums."""
    from fractions import Fraction

    rows = x.to(torch.float64).cpu().tolist()
    part = part.reshape(-1).to(torch.float64).cpu()
    d = x.shape[1]
    assert float(part[0]) == len(rows) and float(part[1]) == 0.0
    for j in range(d):
        column = [Fraction(r[j]) for r in rows]
        mean = sum(column) / len(column)
        m2 = sum((v - mean) ** 2 for v in column)
        std = Fraction(math.sqrt(float(m2 / len(column))))
        for what, got, want, scale in (("mean", part[2 + j], mean, abs(mean) + std), ("m2", part[2 + d + j], m2, m2)):
            err = abs(Fraction(float(got)) - want) if math.isfinite(float(got)) else math.inf
            bound = Fraction(rtol) * scale + 2 * Fraction(5e-324)
            assert err <= bound, f"{what}[{j}]: {float(got)!r} != {float(want)!r}"


# Batches whose first row, the shift of every backend's sums, is an outlier that dominates the variance: name ->
# (offset, spread, outlier, rows, features). The two-pass sums of the reference and the Triton kernels hold m2 within
# 1e-12 relative (their merge of several parts takes the parts' means rounded at the offset: 1.2e-13 measured); the
# C++ kernels' one-pass sums (s2 - s1^2 / n about the shift) cancel there by about the rows of a part, and round
# systematically when the other rows are alike: within one_pass_outlier_rtol.
OUTLIER_FIRST_BATCHES = {
    "offset_1e6": (1e6, 1e-3, 1e3, 13109, 5),
    "unit_data_1e8": (0.0, 1.0, 1e8, 13109, 5),
    "alike_rows_two_columns": (0.3, 0.0, 1e15, 20000, 2),
    "one_column_1e15": (0.0, 1e-3, 1e15, 40000, 1),
}
TWO_PASS_OUTLIER_RTOL = 1e-12


def one_pass_outlier_rtol(rows_per_part: int) -> float:
    """2^-54 * rows_per_part^2 (1.5e-8 at 16384 rows; measured up to 5e-9 there), and never below 1e-10."""
    return max(1e-10, 2.0**-54 * rows_per_part**2)


def outlier_first_batch(name: str, rows=None, device="cpu") -> torch.Tensor:
    offset, spread, outlier, default_rows, d = OUTLIER_FIRST_BATCHES[name]
    x = offset + spread * np.random.default_rng(5).standard_normal((rows or default_rows, d))
    x[0] += outlier
    return torch.from_numpy(x).to(device)


def make_stream(name: str, dtype: torch.dtype, seed: int = 0):
    """The batches of stream ``name`` as tensors of ``dtype`` (values rounded to that dtype once)."""
    shape, sizes, fill = STREAMS[name]
    g = np.random.default_rng(seed)
    return [torch.from_numpy(np.array(fill(g, b, shape), dtype=np.float64)).to(dtype) for b in sizes], shape


def truth(batches, with_prior: bool = True):
    """float64 mean, population variance and count of all rows of ``batches``, optionally merged with upstream's
    prior pseudo-sample (mean 0, var 1, count 1), computed in numpy by the direct two-pass formula."""
    data = np.concatenate([b.to(torch.float64).numpy() for b in batches], axis=0)
    n = data.shape[0]
    mean = data.mean(axis=0)
    m2 = ((data - mean) ** 2).sum(axis=0)
    if not with_prior:
        return mean, m2 / n, n
    total = n + 1
    merged_mean = mean * n / total
    merged_m2 = 1.0 + m2 + mean**2 * n / total
    return merged_mean, merged_m2 / total, total


def ema_truth(batches, decay: float):
    """float64 mean and population variance after an EMA record of each batch in turn from upstream's prior (mean 0,
    var 1): ``mean <- decay * mean + (1 - decay) * batch mean``, the variance likewise with each batch's population
    variance, computed in numpy by the direct two-pass formula; a batch without rows changes nothing."""
    mean = var = None
    for b in batches:
        data = b.to(torch.float64).numpy().reshape(b.shape[0], int(np.prod(b.shape[1:])))
        if mean is None:
            mean, var = np.zeros(data.shape[1]), np.ones(data.shape[1])
        if data.shape[0] == 0:
            continue
        batch_mean = data.mean(axis=0)
        mean = decay * mean + (1.0 - decay) * batch_mean
        var = decay * var + (1.0 - decay) * ((data - batch_mean) ** 2).mean(axis=0)
    return mean, var


# How a stream is recorded: from upstream's prior pseudo-sample, from nothing (count 0), or as an EMA (from the prior).
STREAM_MODES = ["prior", "no_prior", "ema"]
STREAM_EMA_DECAY = 0.9


def stream_truth(batches, mode: str):
    """``(mean, var, count)`` in float64 after recording ``batches`` in ``mode`` (one of ``STREAM_MODES``)."""
    if mode == "ema":
        return (*ema_truth(batches, STREAM_EMA_DECAY), 1)  # EMA leaves the prior's count alone
    return truth(batches, mode == "prior")


def assert_close_rel(actual: torch.Tensor, expected: np.ndarray, rtol: float, what: str, floor: float = 1e-300):
    """|actual - expected| <= rtol * max(|expected|, floor), elementwise."""
    a = actual.detach().to(torch.float64).cpu().numpy()
    e = np.asarray(expected, dtype=np.float64)
    err = np.abs(a - e)
    bound = rtol * np.maximum(np.abs(e), floor)
    worst = np.max(err / np.maximum(np.abs(e), floor)) if err.size else 0.0
    assert np.all(err <= bound), f"{what}: relative error {worst:.3e} exceeds {rtol:.0e}\nactual={a}\nexpected={e}"
