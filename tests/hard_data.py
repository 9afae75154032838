"""Hard input streams and their numpy float64 ground truth, shared by the accuracy tests of every backend."""
from __future__ import annotations

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
# squared deviations from it leave the variance n * ulp^2 instead of 0. A NaN row in one batch is dropped.
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
        parts = moments(x)
        valid = parts[:, 0] > 0
        for what, got, want in (("mean", parts[valid, 2 : 2 + d], value), ("m2", parts[:, 2 + d :], zeros)):
            assert torch.equal(got, want.expand_as(got)), f"parts' {what}: {got} != {want}"
        merge(parts, *welford, None)
        merge(parts, *ema, 0.9)
    assert torch.equal(welford[0], value), f"mean {welford[0]} != {value}"
    assert torch.equal(welford[1], zeros) and not welford[1].signbit().any(), f"var {welford[1]}"
    assert int(welford[2]) == sum(batch_sizes) - 1 and int(welford[3]) == 1
    assert torch.equal(ema[1], zeros), f"EMA var {ema[1]}"


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
