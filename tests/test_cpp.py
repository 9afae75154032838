"""The C++ CPU backend (``protonorm._C`` behind the ``protonorm::cpp_*`` ops) against the torch reference backend.

Tolerances, and why:
* normalize / un_norm / scale-only / clamp: bit-exact. The kernels perform the reference's operations in the
  reference's dtypes (float32 statistics, one subtraction, one correctly rounded division, no FMA contraction).
* merge / combine of given parts: bit-exact. The kernels reduce parts in the reference's tree order with the
  reference's operation order in float64.
* the discounted return of the reward op: bit-exact (same dtype rules as the reference).
* batch moments: n and dropped exact; mean within 1e-12 of the column's scale and m2 within 1e-10 relative. Both
  sides accumulate in float64 but over different splits of the rows (the kernels use shifted sums per part), so
  the last few float64 bits differ; any real defect (a lost row, float32 accumulation) is far larger. Where a part's
  first row (the shift of its one-pass sums) is an outlier that dominates the variance, the sums cancel by about
  the part's row count: m2 is then within 2^-54 * rows_per_part^2 relative (hard_data.one_pass_outlier_rtol). A constant
  column has exactly its value as mean and 0 as m2 on both sides (both take deviations from the first valid row).
* hard data (offsets up to 1e6, tiny spread, constant columns): the project-wide bounds of ``hard_data``; the
  hard streams of every dtype run through the module in test_module.py, for every backend.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import protonorm
from protonorm import reference
from protonorm.backends import load
from protonorm.backends.base import normalized_dtype
from protonorm.diagnostics import HostSyncCounter

from conftest import assert_same, in_forked_child
from hard_data import (CONSTANT_BATCH_SIZES, EXTREME_BATCHES, LONG_STREAMS, MEAN_RTOL, OUTLIER_FIRST_BATCHES, VAR_RTOL,
                       assert_close_rel, assert_constant_columns_exact, assert_long_stream_accurate,
                       assert_moments_exact, extreme_batch, one_pass_outlier_rtol, outlier_first_batch, truth)

CPP, CPP_REASON = load("cpp")
TORCH = load("torch")[0]

pytestmark = pytest.mark.skipif(CPP is None, reason=f"C++ extension unavailable: {CPP_REASON}")

if CPP is not None:
    import protonorm._C as _C
    from protonorm.backends.cpp_backend import _DTYPE_CODES, parts_layout

    ISAS = _C.isas()
else:  # keeps collection working; every test is skipped above
    ISAS = []

SHAPES = [(b, d) for b in (1, 7, 1023, 4097) for d in (1, 7, 342, 1023)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SMALL_SHAPES = [(1, 1), (7, 7), (1023, 1), (33, 342), (260, 1023)]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run with the kernels of each instruction set this CPU supports (baseline, avx2, avx512)."""
    previous = _C.isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(previous)


def data(b, d, dtype, seed=0, offset=3.0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def stats(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    var = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1
    return mean, var


def assert_parts_close(parts, expected):
    """Combined parts against the reference's single part (tolerances in the module docstring)."""
    got = CPP.combine(parts)[0]
    want = expected[0]
    d = (want.shape[0] - 2) // 2
    assert got[0] == want[0] and got[1] == want[1], f"n/dropped {got[:2].tolist()} != {want[:2].tolist()}"
    mean_g, mean_w = got[2 : 2 + d], want[2 : 2 + d]
    m2_g, m2_w = got[2 + d :], want[2 + d :]
    n = max(float(want[0]), 1.0)
    scale = mean_w.abs() + (m2_w / n).sqrt() + 1e-300
    assert ((mean_g - mean_w).abs() <= 1e-12 * scale).all(), (mean_g - mean_w).abs().max()
    assert ((m2_g - m2_w).abs() <= 1e-10 * m2_w.abs()).all(), ((m2_g - m2_w).abs() / m2_w.abs()).max()


# ------------------------------------------------------------------------------------------------ moments
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,d", SHAPES)
def test_moments_match_reference(b, d, dtype):
    x = data(b, d, dtype)
    if b > 3:
        x[1, d // 2] = float("nan")
        x[b - 1, 0] = float("-inf")
    parts = CPP.moments(x, None, {})
    assert parts.shape == (parts_layout(b, d)[0], 2 + 2 * d)
    assert_parts_close(parts, reference.batch_moments(x))


def test_single_feature_spread_over_many_parts():
    x = data(70001, 1, torch.float32, offset=1e4)
    x[40000, 0] = float("nan")
    parts = CPP.moments(x, None, {})
    assert parts.shape[0] > 1
    assert_parts_close(parts, reference.batch_moments(x))


@pytest.mark.parametrize("b,d", SMALL_SHAPES)
def test_each_instruction_set(isa, b, d):
    for dtype in DTYPES:
        x = data(b, d, dtype, seed=b + d)
        if b > 2:
            x[b // 2, d - 1] = float("inf")
        mask = torch.arange(b) % 3 != 1
        assert_parts_close(CPP.moments(x, mask, {}), reference.batch_moments(x, mask))
        mean, var = stats(d)
        out, want = (torch.empty(b, d, dtype=normalized_dtype(dtype)) for _ in range(2))
        parts = CPP.normalize_moments(x, mean, var, 1e-5, 2.0, out, {})
        TORCH.normalize(x, mean, var, 1e-5, 2.0, False, True, want)
        assert_same(out, want)
        assert_parts_close(parts, reference.batch_moments(x))


def test_instruction_sets_with_fma_give_the_same_moments():
    """The AVX2 and AVX-512 kernels (and any build with a hardware FMA) take the same moments bit for bit; the
    x86 baseline, for CPUs without FMA, rounds squares separately and is held to the reference's tolerance by
    test_each_instruction_set."""
    fused = [name for name in ISAS if name != "baseline"]
    if len(fused) < 2:
        pytest.skip(f"this CPU runs one instruction set with FMA: {fused}")
    previous = _C.isa()
    results = {}
    try:
        for name in fused:
            _C.set_isa(name)
            got = []
            for dtype in DTYPES:
                for b, d in SMALL_SHAPES:
                    x = data(b, d, dtype, seed=b * d, offset=1e3)
                    mean, var = stats(d)
                    got.append(CPP.moments(x, torch.arange(b) % 4 != 2, {}).clone())
                    got.append(CPP.normalize_moments(x, mean, var, 1e-5, 2.0, torch.empty(b, d, dtype=normalized_dtype(dtype)), {}).clone())
            reward, returns = data(4099, 1, torch.float32, seed=1), data(4099, 1, torch.float32, seed=2)
            got.append(CPP.reward_moments(reward, torch.arange(4099) % 7 == 0, returns, 0.99, {}).clone())
            results[name] = got
    finally:
        _C.set_isa(previous)
    first, *others = fused
    for name in others:
        for a, b in zip(results[first], results[name]):
            assert_same(a, b)


def test_ops_refuse_what_they_would_write_wrongly():
    """Statistics or outputs whose elements share memory (threads would race, later writes would win), lazily
    negated outputs (the kernels write memory, not values), a fused output sharing the batch's memory (its
    moments are read after the output is written) and a plain output over part of the batch, other than the batch
    itself (rows still to be read would be written first) raise, saying what was expected."""
    x = data(8, 4, torch.float32)
    mean, var = stats(4)
    shared_mean = torch.zeros(1, dtype=torch.float64).expand(4)
    with pytest.raises(ValueError, match="mean: expected elements that do not share memory"):
        CPP.merge(CPP.moments(x, None, {}), shared_mean, var.clone(), torch.tensor(1), torch.tensor(0), None)
    with pytest.raises(ValueError, match="out: expected elements that do not share memory"):
        CPP.normalize(x, mean, var, 1e-5, None, False, True, torch.empty(1, 4).expand(8, 4))
    with pytest.raises(ValueError, match="lazily negated"):
        CPP.normalize(x, mean, var, 1e-5, None, False, True, torch._neg_view(torch.empty(8, 4)))
    with pytest.raises(ValueError, match="out: expected contiguous columns"):
        CPP.normalize_moments(x, mean, var, 1e-5, 2.0, torch.empty(8, 8)[:, ::2], {})
    with pytest.raises(ValueError, match="discounted: expected contiguous columns"):
        CPP.reward_moments(x, torch.zeros(8, dtype=torch.bool), torch.empty(8, 8)[:, ::2], 0.9, {})
    with pytest.raises(ValueError, match="shares no memory with x"):
        CPP.normalize_moments(x, mean, var, 1e-5, 2.0, x, {})
    rows = data(10, 4, torch.float32).reshape(-1)
    for shifted in (rows[4:36].view(8, 4), rows.as_strided((8, 4), (4, 1), 1), rows.as_strided((8, 4), (5, 1))):
        before = rows.clone()  # a row on, an element on, or the same start with rows further apart
        with pytest.raises(ValueError, match="out: expected x itself or memory apart from x's"):
            CPP.normalize(rows[:32].view(8, 4), mean, var, 1e-5, 2.0, False, True, shifted)
        assert_same(rows, before)
    before = x.clone()
    CPP.normalize(x, mean, var, 1e-5, 2.0, False, True, x)  # a plain normalize may write over its input
    want = torch.empty_like(before)
    TORCH.normalize(before, mean, var, 1e-5, 2.0, False, True, want)
    assert_same(x, want)


def assert_same_parts_as_float64(x):
    """The moments and the fused normalize's parts of ``x`` are bitwise those of the same values as float64."""
    b, d = x.shape
    wide = x.double()
    assert_same(CPP.moments(x, None, {}), CPP.moments(wide, None, {}))
    mean, var = stats(d)
    parts = CPP.normalize_moments(x, mean, var, 1e-5, 5.0, torch.empty(b, d), {})
    wide_parts = CPP.normalize_moments(wide, mean, var, 1e-5, 5.0, torch.empty(b, d, dtype=torch.float64), {})
    assert_same(parts, wide_parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,d", [(7, 3), (33, 7), (260, 342), (129, 1023)])
def test_narrow_rows_sum_exactly_as_their_float64_values(isa, dtype, b, d):
    """float32/16-bit rows take a hand-vectorized four-row step on x86-64-v3 (exact vector widening, a
    multiply-subtract by one instead of the subtraction); float64 rows the generic loop. Widening to float64 is
    exact and x * 1 - s rounds once like x - s, so the same values as float32/16-bit and as float64 must give
    bitwise the same parts, tails included."""
    offset = 1e4 if dtype == torch.float32 else 100.0  # a large offset with a spread each dtype can still hold
    x = data(b, d, dtype, seed=b * d, offset=offset, scale=offset * 1e-3)
    x[b // 2, d // 2] = float("nan")
    assert_same_parts_as_float64(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,d", [(7, 3), (10, 5), (13, 9), (35, 20), (260, 342), (129, 1023)])
def test_narrow_rows_round_in_the_same_order_as_float64_rows(isa, dtype, b, d):
    """As above, with values over six decades, so that the squares and the running sums round (with the data
    above, every sum is exact and any order passes): the hand-written four-row step must then do the float64
    loop's additions in its order, or a last bit moves. Row counts leave every number of rows (0-3) to the end of
    a part, column counts every vector tail."""
    g = torch.Generator().manual_seed(b * d + 1)
    decades = torch.randint(-3, 4, (b, d), generator=g).to(torch.float64)
    x = (torch.randn(b, d, generator=g, dtype=torch.float64) * 10.0 ** decades).to(dtype)
    assert_same_parts_as_float64(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [1, 7, 8, 9, 342])
def test_normalize_edges_on_each_instruction_set(isa, dtype, d):
    """float32 and 16-bit rows take hand-vectorized 256-bit loops on x86-64-v3: NaN, infinities, signed zeros,
    subnormals and values at and just past the clamp bounds must come out bitwise as from the torch path, in the
    vector body and the tail (a scalar loop on AVX2, a masked vector step on AVX-512)."""
    tiny = {torch.float32: 1e-40, torch.float16: 1e-6, torch.bfloat16: 1e-39}[dtype]  # subnormal in each dtype
    past = 2.0 * (1.0 + torch.finfo(dtype).eps)  # the next value above the bound in each dtype
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 2.0, -2.0, past,
                            -past, tiny, -tiny, 1e-3, 6e4])
    g = torch.Generator().manual_seed(d)
    x = torch.randn(40, d, generator=g) * 3
    picks = torch.randint(0, special.numel(), (40, d), generator=g)
    x = torch.where(torch.rand(40, d, generator=g) < 0.3, special[picks], x).to(dtype)
    mean, var = stats(d)
    var[0] = 1.0 - 1e-5  # a std of exactly 1 where the statistics reach column 0: values meet the bounds exactly
    mean[0] = 0.0
    for clamp in (2.0, None):
        for center in (True, False):
            out, want = torch.empty(40, d), torch.empty(40, d)
            CPP.normalize(x, mean, var, 1e-5, clamp, False, center, out)
            TORCH.normalize(x, mean, var, 1e-5, clamp, False, center, want)
            assert_same(out, want)
        out, want = torch.empty(40, d), torch.empty(40, d)
        parts = CPP.normalize_moments(x, mean, var, 1e-5, clamp, out, {})
        TORCH.normalize(x, mean, var, 1e-5, clamp, False, True, want)
        assert_same(out, want)
        assert_parts_close(parts, reference.batch_moments(x))


@pytest.fixture
def stream_everything():
    """Make the kernels write every normalized output with non-temporal stores, as they do for batches larger than
    the last-level cache, so that small batches exercise that path."""
    previous = _C.set_stream_threshold(0)
    yield
    _C.set_stream_threshold(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b, d", [(1, 16), (3, 17), (9, 31), (33, 342), (5, 1023)])
def test_streamed_outputs_are_the_same_bits(isa, stream_everything, dtype, b, d):
    """Non-temporal stores (whole 64-byte lines of a row, plain stores before and after them) write the same bits
    as the plain path, at every alignment of the output within a line, with NaN/inf and clamp edges in the rows."""
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 2.0, -2.0, 6e4])
    g = torch.Generator().manual_seed(b * d)
    x = torch.randn(b, d, generator=g) * 3
    x = torch.where(torch.rand(b, d, generator=g) < 0.2, special[torch.randint(0, 7, (b, d), generator=g)], x)
    x = x.to(dtype)
    mean, var = stats(d)
    buffer = torch.empty(b * d + 16)
    for offset in range(16):  # float32 elements: every 4-byte position within a 64-byte line
        out, want = buffer[offset: offset + b * d].view(b, d), torch.empty(b, d)
        CPP.normalize(x, mean, var, 1e-5, 2.0, False, True, out)
        TORCH.normalize(x, mean, var, 1e-5, 2.0, False, True, want)
        assert_same(out, want)
        out.fill_(7.0)
        parts = CPP.normalize_moments(x, mean, var, 1e-5, 2.0, out, {})
        assert_same(out, want)
        _C.set_stream_threshold(-1)  # the default: these small batches take the plain path
        plain = CPP.normalize_moments(x, mean, var, 1e-5, 2.0, torch.empty(b, d), {})
        _C.set_stream_threshold(0)
        assert_same(parts, plain)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_every_width_up_to_100_columns(isa, stream, dtype):
    """The row loops load columns ahead of the stores (16 at a time, two steps ahead) and finish with shorter
    steps where the output starts a few lines after the input modulo 4 KB: every width from 1 to 100 columns, with
    the output 64 bytes after the input (where torch puts it), 68 bytes (off a 64-byte line) and 2 KB (loaded in
    step), gives the reference's bits, and the fused moments see a NaN or inf in any one column."""
    previous = _C.set_stream_threshold(0 if stream else -1)
    try:
        for d in range(1, 101):
            x = data(3, d, dtype, seed=d)
            x[1, (5 * d) // 7] = float("inf")
            x[2, d - 1] = float("nan")
            mean, var = stats(d)
            want = torch.empty(3, d)
            TORCH.normalize(x, mean, var, 1e-5, 2.0, False, True, want)
            buffer = torch.empty(3 * d + 2048)
            for lead in (64, 68, 2048):  # bytes from the input to the output modulo 4 KB
                start = ((x.data_ptr() + lead - buffer.data_ptr()) % 4096) // 4
                out = buffer[start: start + 3 * d].view(3, d)
                CPP.normalize(x, mean, var, 1e-5, 2.0, False, True, out)
                assert_same(out, want)
                out.fill_(7.0)
                parts = CPP.normalize_moments(x, mean, var, 1e-5, 2.0, out, {})
                assert_same(out, want)
                assert_parts_close(parts, reference.batch_moments(x))
    finally:
        _C.set_stream_threshold(previous)


def test_stream_threshold_is_the_last_level_cache():
    """By default outputs stream once input plus output exceed the last-level cache; the setter restores it."""
    default = _C.stream_threshold()
    assert default > 0
    assert _C.set_stream_threshold(123) == default
    assert _C.set_stream_threshold(-1) == 123
    assert _C.stream_threshold() == default


def test_mask_ignores_rows_without_counting_them():
    x = data(1023, 7, torch.float32)
    x[5, 3] = float("nan")  # masked out: neither counted nor dropped
    x[6, 0] = float("inf")  # considered: dropped
    mask = torch.ones(1023, dtype=torch.bool)
    mask[::4] = False
    mask[5] = False
    parts = CPP.moments(x, mask, {})
    assert_parts_close(parts, reference.batch_moments(x, mask))
    combined = CPP.combine(parts)[0]
    assert combined[0] == int(mask.sum()) - 1 and combined[1] == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 7])
def test_nonfinite_rows_dropped_and_counted(dtype, d):
    x = data(300, d, dtype)
    bad_rows = [0, 31, 32, 33, 150, 299]
    for i, r in enumerate(bad_rows):
        x[r, i % d] = (float("nan"), float("inf"), float("-inf"))[i % 3]
    parts = CPP.moments(x, None, {})
    combined = CPP.combine(parts)[0]
    assert combined[0] == 300 - len(bad_rows) and combined[1] == len(bad_rows)
    assert_parts_close(parts, reference.batch_moments(x))
    mean, var, count, dropped = *stats(d), torch.tensor(4), torch.tensor(2)
    CPP.merge(parts, mean, var, count, dropped, None)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    assert int(count) == 4 + 300 - len(bad_rows) and int(dropped) == 2 + len(bad_rows)


def test_strided_rows_match_contiguous():
    wide = data(1023, 400, torch.float32)
    x = wide[:, 17:359]  # a column slice: row stride 400
    assert x.stride() == (400, 1)
    xc = x.contiguous()
    assert_same(CPP.moments(x, None, {}), CPP.moments(xc, None, {}))
    mean, var = stats(342)
    out_s, out_c = torch.empty(1023, 342), torch.empty(1023, 342)
    parts_s = CPP.normalize_moments(x, mean, var, 1e-5, 5.0, out_s, {}).clone()
    parts_c = CPP.normalize_moments(xc, mean, var, 1e-5, 5.0, out_c, {})
    assert_same(out_s, out_c)
    assert_same(parts_s, parts_c)
    column = wide[:, 5:6]  # one feature, row stride 400
    assert_same(CPP.moments(column, None, {}), CPP.moments(column.contiguous(), None, {}))
    # A non-unit column stride is copied (the contract gives stride 1, but the op must not misread).
    transposed = data(342, 64, torch.float32).t()
    assert_parts_close(CPP.moments(transposed, None, {}), reference.batch_moments(transposed))


def _every_kernel(x):
    """Outputs of each threaded kernel on ``x`` (moments, normalize, normalize+moments, merge)."""
    mean, var = stats(x.shape[1])
    out = torch.empty_like(x)
    fused_out = torch.empty_like(x)
    fused_parts = CPP.normalize_moments(x, mean, var, 1e-5, 5.0, fused_out, {}).clone()
    CPP.normalize(x, mean, var, 1e-5, 5.0, False, True, out)
    parts = CPP.moments(x, None, {}).clone()
    merged = [mean.clone(), var.clone(), torch.tensor(7), torch.tensor(0)]
    CPP.merge(parts, *merged, None)
    return [parts, out, fused_out, fused_parts, *merged]


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_results_do_not_depend_on_thread_count(threads):
    x = data(4097, 342, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _every_kernel(x)
        torch.set_num_threads(threads)
        many = _every_kernel(x)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert_same(a, b)


def test_caller_flush_to_zero_holds_on_every_thread():
    """torch.set_flush_denormal(True) sets the calling thread's floating-point state; the kernels' worker threads
    must compute under it as well, or rows of subnormals count as zero on some threads and not on others (results
    then depend on the thread count and on which thread took which rows), and the caller's state is left as it was."""
    x = data(1 << 14, 256, torch.float32, scale=1e-39, offset=0.0)  # float32 subnormals throughout
    mean, var = torch.zeros(256, dtype=torch.float64), torch.ones(256, dtype=torch.float64)
    before = torch.get_num_threads()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero control")
    try:
        torch.set_num_threads(1)
        want_out = torch.empty_like(x)
        TORCH.normalize(x, mean, var, 0.0, None, False, True, want_out)
        assert not want_out.any()  # the caller's state: subnormal input read as zero
        one = [CPP.moments(x, None, {}).clone()]
        torch.set_num_threads(4)
        for _ in range(3):  # which thread claims which rows varies from call to call
            out, fused = torch.empty_like(x), torch.empty_like(x)
            CPP.normalize(x, mean, var, 0.0, None, False, True, out)
            CPP.normalize_moments(x, mean, var, 0.0, None, fused, {})
            assert_same(out, want_out)
            assert_same(fused, want_out)
            assert_same(CPP.moments(x, None, {}), one[0])
        assert not (x[:1, :8] * 1.0).any()  # the caller's thread still flushes
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


def test_scratch_reused_across_shapes_leaves_nothing_behind():
    """The kernels keep grow-only per-thread scratch (row sums, column values, merge tree, reward parts): a call after
    a larger one reuses buffers that still hold the larger call's data, and must give exactly its own fresh-process
    result. The shapes alternate between large and small, one feature and many, before every result is compared."""
    shapes = [(4097, 1023), (7, 3), (70001, 1), (33, 342), (1, 1), (2049, 7)]
    fresh = {}
    for b, d in shapes:
        fresh[(b, d)] = _every_kernel_and_reward(b, d)
    for b, d in shapes[::-1] + shapes:
        for got, want in zip(_every_kernel_and_reward(b, d), fresh[(b, d)]):
            assert_same(got, want)


def _every_kernel_and_reward(b, d):
    x = data(b, d, torch.float32, seed=b + d)
    if b > 3:
        x[b // 2, d - 1] = float("nan")
    results = _every_kernel(x)
    g = torch.Generator().manual_seed(b * d)
    discounted = torch.randn(b, d, generator=g)
    reward, terminated = torch.randn(b, d, generator=g), torch.rand(b, generator=g) < 0.1
    record = [*stats(d), torch.tensor(5), torch.tensor(0)]
    CPP.reward_record(reward, terminated, discounted, 0.99, *record, None, {})
    return results + [discounted, *record, CPP.combine(CPP.moments(x, None, {}))]


@pytest.fixture(params=["root_in_cpp", "root_by_torch_op"])
def root_path(request, monkeypatch):
    """Both ways the cpp backend takes the float32 square root: in C++ through the function torch's own sqrt calls
    (where this torch has one that passed the check), or with torch's `sqrt_` where it has none."""
    from protonorm.backends import cpp_backend

    if request.param == "root_in_cpp":
        if cpp_backend._torch_sqrt_address() == 0:
            pytest.skip("this torch has no float32 root that reproduces torch.sqrt (see the test below)")
    else:
        monkeypatch.setattr(cpp_backend, "_torch_sqrt", 0)
    return request.param


def test_the_root_torch_uses_is_found_where_torch_has_one():
    """Linux builds of torch with MKL take float32 square roots with MKL's vmsSqrt, which libtorch_cpu exports;
    the backend must find it and accept it, or every changed statistic costs a torch op again."""
    from protonorm.backends import cpp_backend

    if not (sys.platform == "linux" and torch.backends.mkl.is_available()):
        pytest.skip("torch here is not a Linux build with MKL")
    assert cpp_backend._torch_sqrt_address() != 0


def test_a_root_that_differs_from_torchs_is_refused():
    """The check behind `_torch_sqrt_address` must reject a function with the right signature and the wrong results
    (MKL's vmsTrunc), and its probe must tell torch's root from the correctly rounded one, which differs from it
    in the last bit for some values."""
    import ctypes

    import numpy as np

    from protonorm.backends import cpp_backend

    if not (sys.platform == "linux" and torch.backends.mkl.is_available()):
        pytest.skip("torch here is not a Linux build with MKL")
    library = ctypes.CDLL("libtorch_cpu.so", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # the copy torch loaded
    wrong = ctypes.cast(library.vmsTrunc, ctypes.c_void_p).value
    assert not cpp_backend._reproduces_torch_sqrt(wrong, cpp_backend._VML_MODE)
    right = ctypes.cast(library.vmsSqrt, ctypes.c_void_p).value
    assert cpp_backend._reproduces_torch_sqrt(right, cpp_backend._VML_MODE)
    radicands = cpp_backend._sqrt_probe().float()
    correctly_rounded = torch.from_numpy(np.sqrt(radicands.numpy()))
    assert not torch.equal(torch.sqrt(radicands).view(torch.int32), correctly_rounded.view(torch.int32))


@pytest.mark.parametrize("epsilon", [1e-5, 1e-8, 0.0, 1e-3, 0.1, 3.0])
def test_float32_statistics_are_the_references_bit_for_bit(epsilon, root_path):
    """The backend rounds the statistics and adds epsilon in C++, and takes torch's square root: the pair must be
    exactly the reference's `mean.float()` and `torch.sqrt(var.float() + epsilon)`, over float64 values of every
    magnitude, halfway cases of the float32 rounding, float32 subnormals and overflow, zeros, NaN and infinities."""
    from protonorm.backends import cpp_backend

    cpp_backend._scratch.__dict__.clear()
    g = torch.Generator().manual_seed(int(epsilon * 1e9) % 1000)
    n = 200_000
    spread = torch.randn(n, generator=g, dtype=torch.float64) * torch.pow(
        10.0, torch.randint(-45, 45, (n,), generator=g).double())
    base = torch.randn(n, generator=g).float().double()
    halfway = base + base.abs() * 2.0**-24 * torch.randint(-1, 2, (n,), generator=g).double()  # float32 ties
    special = torch.tensor([0.0, -0.0, 1e-45, 1e-40, 3.5e38, 3.5e39, float("inf"), -float("inf"), float("nan"),
                            -1.0, 1.0 - 1e-5], dtype=torch.float64)
    values = torch.cat([spread, halfway, special])
    for mean, var in ((values, values.abs()), (values.flip(0), values), (values[::3], values[1::3])):
        for _ in range(2):  # the second call reuses the first's square root
            mean32, std32 = cpp_backend._float32_stats(mean, var, epsilon)
            assert_same(mean32, mean.float())
            assert_same(std32, torch.sqrt(var.float() + epsilon))


def test_unchanged_statistics_reuse_the_square_root_and_changed_ones_never_do(monkeypatch, root_path):
    """The square root of the float32 statistics is taken again only when `var + epsilon` changed in some bit
    (csrc/bindings.cpp, float32_stats): frozen statistics take none, a record takes one, and so do statistics
    written where no version counter sees it (through numpy), a variance one float32 ulp away and a second module
    of the same width on the same thread. Every output stays the reference's, bit for bit."""
    from protonorm.backends import cpp_backend

    cpp_backend._scratch.__dict__.clear()
    first = protonorm.RunningMeanStd(None, (9,), device="cpu", clamp_value=5.0, backend="cpp")
    second = protonorm.RunningMeanStd(None, (9,), device="cpu", clamp_value=5.0, backend="cpp").eval()
    first.record_moments(data(50, 9, torch.float32, seed=1))
    second.record_moments(data(50, 9, torch.float32, seed=2) * 3)
    first.eval()
    x = data(6, 9, torch.float32, seed=3)

    roots, torch_ops = [], []
    extension = cpp_backend._C

    class Counting:  # _C, counting the calls of float32_stats that took or asked for a root
        def __getattr__(self, name):
            return getattr(extension, name)

        @staticmethod
        def float32_stats(*args):
            held = extension.float32_stats(*args)
            if held != cpp_backend._ROOTS_KEPT:
                roots.append(held)
            return held

    monkeypatch.setattr(cpp_backend, "_C", Counting())
    sqrt_ = torch.Tensor.sqrt_
    monkeypatch.setattr(torch.Tensor, "sqrt_", lambda t: torch_ops.append(t.numel()) or sqrt_(t))

    def roots_for(norm):
        roots.clear()
        torch_ops.clear()
        out = norm.normalize(x)
        taken = len(roots)
        by_torch = root_path == "root_by_torch_op"
        assert roots == [cpp_backend._ROOTS_WANTED if by_torch else cpp_backend._ROOTS_TAKEN] * taken
        assert len(torch_ops) == (taken if by_torch else 0)
        want = reference.normalize(x, norm.mean, norm.var, norm.epsilon, norm.clamp_value, False, True)
        assert_same(out, want)
        return taken

    assert roots_for(first) == 1
    assert roots_for(first) == 0 and roots_for(first) == 0
    first.train().record_moments(data(20, 9, torch.float32, seed=4))
    first.eval()
    assert roots_for(first) == 1
    first.var.numpy()[4] *= 2.0  # a write no version counter sees
    assert roots_for(first) == 1
    var32 = first.var[7].float()
    first.var[7] = torch.nextafter(var32, var32 + 1).double()  # the float32 radicand changes in its last bits only
    assert roots_for(first) == 1
    assert roots_for(second) == 1 and roots_for(first) == 1 and roots_for(first) == 0
    first.epsilon = 1e-3
    assert roots_for(first) == 1


def test_scratch_first_made_in_inference_mode_serves_calls_outside_it():
    """The float32 statistics go to per-thread buffers that are written in place on every call: made under
    torch.inference_mode() they must still be normal tensors, or the next call outside it would raise."""
    from protonorm.backends import cpp_backend

    cpp_backend._scratch.__dict__.clear()  # this thread's buffers: the next call makes them afresh
    x = data(40, 13, torch.float32)
    mean, var = stats(13)
    with torch.inference_mode():
        inside = torch.empty(40, 13)
        CPP.normalize(x, mean, var, 1e-5, 5.0, False, True, inside)
    outside = torch.empty(40, 13)
    CPP.normalize(x, mean, var, 1e-5, 5.0, False, True, outside)
    parts = CPP.normalize_moments(x, mean, var, 1e-5, 5.0, torch.empty(40, 13), {})
    assert_same(outside, inside)
    assert_parts_close(parts, reference.batch_moments(x))


@pytest.mark.sanitize_once
def test_concurrent_callers_share_the_pool():
    """The kernels release the GIL; calls from several Python threads at once share the helper threads, and each
    call still gets exactly its single-threaded result."""
    import threading

    inputs = [data(2049, 342, torch.float32, seed=s) for s in range(4)]
    expected = [CPP.moments(x, None, {}).clone() for x in inputs]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    failures = []

    def worker(i):
        for _ in range(20):
            got = CPP.moments(inputs[i], None, {})
            if not torch.equal(got, expected[i]):
                failures.append(i)

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a kernel call did not return"
    finally:
        torch.set_num_threads(before)
    assert not failures


def _moments_in_child(x, queue):
    # What DataLoader workers do: torch's own OpenMP ops hang in a child forked after the parent used the GNU
    # OpenMP pool unless it runs on one thread.
    torch.set_num_threads(1)
    queue.put(CPP.moments(x, None, {}).numpy().copy())  # by value: a shared tensor would die with the child


@pytest.mark.sanitize_once
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_kernels_run_in_a_forked_child():
    """A child forked after the parent ran the kernels on several threads gets the same results on one thread."""
    import multiprocessing

    x = data(4097, 342, torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = CPP.moments(x, None, {}).clone()  # the parent's OpenMP team now exists
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_moments_in_child, args=(x, queue))
        child.start()
        got = torch.from_numpy(queue.get(timeout=120))
        child.join(timeout=60)
    finally:
        torch.set_num_threads(before)
    assert child.exitcode == 0
    assert_same(got, expected)


def _fork_inputs(rows, cols):
    """What ``_fork_kernels`` reads and writes, made before any fork: in a forked child torch's own parallel ops (a
    copy of this size) hang, so the child must run nothing but the kernels."""
    mean, var = stats(cols)
    return dict(x=data(rows, cols, torch.float32), mean=mean, var=var, out=torch.empty(rows, cols),
                fused=torch.empty(rows, cols), merged=[mean.clone(), var.clone(), torch.tensor(7), torch.tensor(0)],
                discounted=torch.linspace(-1.0, 1.0, rows * cols).reshape(rows, cols),
                terminated=torch.arange(rows) % 7 == 0,
                reward_stats=[mean.clone(), var.clone(), torch.tensor(3), torch.tensor(0)])


def _fork_kernels(a):
    """Every threaded kernel on the inputs of ``_fork_inputs``, updated in place, the outputs as numpy arrays (by
    value: a shared tensor would die with a child)."""
    x, mean, var = a["x"], a["mean"], a["var"]
    got = [CPP.normalize_moments(x, mean, var, 1e-5, 5.0, a["fused"], {}).numpy().copy()]
    CPP.normalize(x, mean, var, 1e-5, 5.0, False, True, a["out"])
    parts = CPP.moments(x, None, {})
    got.append(parts.numpy().copy())
    CPP.merge(parts, *a["merged"], None)
    CPP.reward_record(x, a["terminated"], a["discounted"], 0.99, *a["reward_stats"], None, {})
    tensors = [a["out"], a["fused"], *a["merged"], a["discounted"], *a["reward_stats"]]
    return got + [t.numpy().copy() for t in tensors]


def _in_forked_child(target, inputs):
    """``target(inputs)`` in a child forked after the parent ran the kernels on two threads (its OpenMP pool now
    exists), with two threads still set: no torch.set_num_threads(1) in the child."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _fork_kernels(_fork_inputs(4097, 342))
        return in_forked_child(target, inputs)
    finally:
        torch.set_num_threads(before)


@pytest.mark.sanitize_once
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_kernels_run_in_a_forked_child_with_several_threads():
    """GNU OpenMP's workers do not survive fork(): in a child forked after the parent ran parallel regions, the
    thread that forked hangs in its next one. The kernels run serially there, with the same bits as the parent's."""
    inputs = _fork_inputs(4097, 342)  # enough elements for two threads
    got = _in_forked_child(_fork_kernels, inputs)
    expected = _fork_kernels(_fork_inputs(4097, 342))
    for a, b in zip(got, expected):
        assert_same(torch.from_numpy(a), torch.from_numpy(b))


def _normalize_new_stats(a):
    CPP.normalize(a["x"], a["mean"], a["var"] * 2, 1e-5, None, False, True, a["out"])
    return a["out"].numpy().copy()


@pytest.mark.sanitize_once
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("cols", [1, 342, 5000])
def test_new_statistics_in_a_forked_child_with_several_threads(cols):
    """Statistics whose float32 roots this thread has not taken yet: MKL's vector square root (and torch's sqrt)
    starts a parallel region even for one value, which in a forked child would wait for dead workers."""
    inputs = _fork_inputs(64, cols)
    got = _in_forked_child(_normalize_new_stats, inputs)
    assert_same(torch.from_numpy(got), torch.from_numpy(_normalize_new_stats(inputs)))


# ------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("ema_decay", [None, 0.999, 0.5])
@pytest.mark.parametrize("b,d", [(1, 1), (7, 7), (4097, 1), (70001, 1), (1023, 342), (3000, 1023)])
def test_merge_matches_reference_bitwise(b, d, ema_decay):
    x = data(b, d, torch.float64, offset=50.0)
    parts = CPP.moments(x, None, {})
    mean, var = stats(d)
    assert_merge_as_reference(parts, [mean, var, torch.tensor(12345), torch.tensor(3)], ema_decay)


def _strided_copy(t):
    """A copy of ``t`` with its strides (``clone`` makes a strided vector contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)


def assert_merge_as_reference(parts, state, ema_decay, laid_out=None):
    """The merge of ``parts`` into copies of ``state`` (mean, var, count, dropped) and their combine, bitwise as the
    reference's; the C++ side gets ``laid_out`` instead where set (the same parts in another layout)."""
    laid_out = parts if laid_out is None else laid_out
    ours, theirs = [_strided_copy(t) for t in state], [_strided_copy(t) for t in state]
    CPP.merge(laid_out, *ours, ema_decay)
    reference.merge_into_running(parts, *theirs, ema_decay)
    for a, t in zip(ours, theirs):
        assert_same(a, t)
    assert_same(CPP.combine(laid_out), reference.combine_parts(parts))


def test_merge_many_parts_and_strided_stats():
    g = torch.Generator().manual_seed(7)
    k, d = 37, 9  # an odd count: the tree carries the last part up
    n = torch.randint(0, 50, (k,), generator=g).double()
    n[3] = 0.0  # a neutral part in the middle
    mean = torch.randn(k, d, generator=g, dtype=torch.float64) + 100
    m2 = torch.rand(k, d, generator=g, dtype=torch.float64) * n[:, None]
    parts = torch.cat([n[:, None], torch.zeros(k, 1, dtype=torch.float64), mean, m2], dim=1)
    run_var = torch.rand(d, generator=g, dtype=torch.float64)
    ours = [torch.randn(d, 2, generator=g, dtype=torch.float64)[:, 0], run_var.clone(), torch.tensor(10),
            torch.tensor(0)]
    theirs = [ours[0].clone(), run_var.clone(), torch.tensor(10), torch.tensor(0)]
    assert ours[0].stride() == (2,)
    CPP.merge(parts, *ours, None)
    reference.merge_into_running(parts, *theirs, None)
    for a, t in zip(ours, theirs):
        assert_same(a.contiguous(), t)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_merge_split_over_threads_matches_reference_bitwise(threads):
    """Enough parts times columns (129 x 1023, over 2^17 values) to merge on several threads, each a contiguous range
    of columns: every column is merged, bit for bit as the reference, whichever thread takes it."""
    g = torch.Generator().manual_seed(9)
    k, d = 129, 1023
    n = torch.randint(1, 50, (k,), generator=g).double()
    mean = torch.randn(k, d, generator=g, dtype=torch.float64) + 100
    m2 = torch.rand(k, d, generator=g, dtype=torch.float64) * n[:, None]
    parts = torch.cat([n[:, None], torch.ones(k, 1, dtype=torch.float64), mean, m2], dim=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for ema_decay in (None, 0.99):
            assert_merge_as_reference(parts, [*stats(d), torch.tensor(12345), torch.tensor(3)], ema_decay)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("ema_decay", [None, 0.99])
def test_batch_without_valid_rows_is_a_bitwise_no_op(ema_decay):
    mean, var = stats(7)
    for x, mask in [
        (torch.empty(0, 7), None),
        (data(9, 7, torch.float32), torch.zeros(9, dtype=torch.bool)),
        (torch.full((5, 7), float("nan")), None),
    ]:
        before = [mean.clone(), var.clone(), torch.tensor(11), torch.tensor(1)]
        after = [t.clone() for t in before]
        parts = CPP.moments(x, mask, {})
        CPP.merge(parts, *after, ema_decay)
        for a, t in zip(after[:3], before[:3]):
            assert_same(a, t)
        assert int(after[3]) == 1 + (5 if torch.isnan(x).any() else 0)


def test_empty_batch_through_module_leaves_stats_untouched():
    m = protonorm.RunningMeanStd(None, (3,), device="cpu", backend="cpp")
    m.record_moments(data(10, 3, torch.float32))
    before = [t.clone() for t in (m.mean, m.var, m.count)]
    m.record_moments(torch.empty(0, 3))
    for a, t in zip((m.mean, m.var, m.count), before):
        assert_same(a, t)


# ------------------------------------------------------------------------------------------------ normalize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,d", [(1, 1), (7, 7), (1023, 342), (4097, 1), (64, 1023)])
def test_normalize_variants_bitwise(b, d, dtype):
    x = data(b, d, dtype, scale=4.0)
    x[0, 0] = float("nan")
    if b > 1:
        x[1, d - 1] = float("inf")
        x[b - 1, 0] = -0.0
    mean, var = stats(d)
    mean[0] = 0.0
    out_dtype = normalized_dtype(dtype)
    for un_norm in (False, True):
        for center in (False, True):
            for clamp in (None, 5.0, 0.3):
                ours, want = torch.empty(b, d, dtype=out_dtype), torch.empty(b, d, dtype=out_dtype)
                CPP.normalize(x, mean, var, 1e-5, clamp, un_norm, center, ours)
                TORCH.normalize(x, mean, var, 1e-5, clamp, un_norm, center, want)
                assert_same(ours, want)


def test_normalize_extreme_statistics_bitwise():
    x = torch.tensor([[1e30, -1e-30, 0.0, -0.0, 3.0, float("nan")]]).repeat(40, 1)
    mean = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    var = torch.tensor([1e-30, 0.0, 0.0, 1e300, 0.0, 1.0], dtype=torch.float64)
    for eps in (0.0, 1e-5):
        ours, want = torch.empty_like(x), torch.empty_like(x)
        CPP.normalize(x, mean, var, eps, None, False, True, ours)
        TORCH.normalize(x, mean, var, eps, None, False, True, want)
        assert_same(ours, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,d", [(1, 1), (7, 7), (4097, 1), (1023, 342), (300, 1023)])
def test_normalize_moments_equals_separate_calls(b, d, dtype):
    x = data(b, d, dtype)
    if b > 2:
        x[2, 0] = float("nan")
    fused_equals_separate_calls(x)


def fused_equals_separate_calls(x):
    """The fused call's output and parts against normalize (C++ and torch) and moments, bit for bit."""
    b, d = x.shape
    mean, var = stats(d)
    out, want_cpp, want_torch = (torch.empty(b, d, dtype=normalized_dtype(x.dtype)) for _ in range(3))
    parts = CPP.normalize_moments(x, mean, var, 1e-5, 5.0, out, {})
    CPP.normalize(x, mean, var, 1e-5, 5.0, False, True, want_cpp)
    TORCH.normalize(x, mean, var, 1e-5, 5.0, False, True, want_torch)
    assert_same(out, want_cpp)
    assert_same(out, want_torch)
    assert_same(parts, CPP.moments(x, None, {}))
    return parts


@pytest.mark.parametrize("dtype,b,d", [(torch.float32, 16384, 300), (torch.float64, 4096, 257)], ids=str)
def test_normalize_moments_over_several_blocks_per_part(isa, dtype, b, d):
    """Parts of 256 KB and more: the fused kernel normalizes each part in at least two blocks (at most 128 KB of
    input each) before those rows enter the sums. NaN/inf rows sit at part and block edges, and one part holds no
    finite row at all; outputs and parts must still equal the separate calls bit for bit."""
    x = data(b, d, dtype)
    num_parts, rows_per_part = parts_layout(b, d)
    assert rows_per_part * d * x.element_size() >= 2 * 128 * 1024 and num_parts > 4
    bad_rows = [0, 1, rows_per_part - 1, rows_per_part, rows_per_part + 91, 2 * rows_per_part + 31, b - 1]
    for i, r in enumerate(bad_rows):
        x[r, (7 * i) % d] = (float("nan"), float("inf"), float("-inf"))[i % 3]
    x[3 * rows_per_part : 4 * rows_per_part, d // 2] = float("nan")
    parts = fused_equals_separate_calls(x)
    assert parts[3, 0] == 0 and parts[3, 1] == rows_per_part
    assert_parts_close(parts, reference.batch_moments(x))


# ------------------------------------------------------------------------------------------------ reward
@pytest.mark.parametrize("reward_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("term_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32,
                                        torch.float16, torch.bfloat16, torch.float64, torch.uint32,
                                        torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("disc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("b,d", [(1, 1), (4097, 1), (1023, 3)])
def test_reward_moments_match_reference(b, d, reward_dtype, term_dtype, disc_dtype):
    """The returns are float32 or float64 whatever the reward's dtype (a module's returns keep the dtype of its first
    reward): float32 returns with float64 rewards are summed in float64 and rounded once, as torch does."""
    g = torch.Generator().manual_seed(b + d)
    discounted = torch.randn(b, d, generator=g, dtype=torch.float64).to(disc_dtype) * 5
    if b > 10:
        discounted[10, 0] = float("nan")  # a poisoned return: dropped, then cleared by its reset below
    reward = torch.randn(b, d, generator=g, dtype=torch.float64).to(reward_dtype)
    terminated = (torch.rand(b, generator=g) < 0.3).to(torch.float64)
    if b > 10:
        terminated[10] = 1
        reward[11], terminated[11] = -0.0, 1  # restarts at 0.0 + -0.0 = +0.0, not at the reward's -0.0
    terminated = terminated.to(term_dtype)  # set in float64 first: torch 2.4 cannot fill float8 elements
    ours, theirs = discounted.clone(), discounted.clone()
    for step in range(3):
        parts = CPP.reward_moments(reward, terminated, ours, 0.99, {})
        expected = TORCH.reward_moments(reward, terminated, theirs, 0.99, {})
        assert_same(ours, theirs)
        assert_parts_close(parts, expected)
        terminated = terminated.roll(1)


def test_reward_strided_inputs():
    g = torch.Generator().manual_seed(5)
    wide_reward = torch.randn(4096, 3, generator=g)
    wide_term = torch.rand(4096, 2, generator=g) < 0.1
    reward, terminated = wide_reward[:, 1:2], wide_term[:, 1]
    assert reward.stride() == (3, 1) and terminated.stride() == (2,)
    ours = torch.randn(4096, 1, generator=g)
    theirs = ours.clone()
    parts = CPP.reward_moments(reward, terminated, ours, 0.9, {})
    expected = TORCH.reward_moments(reward, terminated, theirs, 0.9, {})
    assert_same(ours, theirs)
    assert_parts_close(parts, expected)


@pytest.mark.parametrize("ema_decay", [None, 0.99])
@pytest.mark.parametrize("b,d,disc_dtype", [(1, 1, torch.float32), (4097, 1, torch.float32),
                                            (70001, 1, torch.float64), (1023, 3, torch.float32)])
def test_fused_reward_record_equals_moments_then_merge(b, d, disc_dtype, ema_decay):
    g = torch.Generator().manual_seed(b + d)
    discounted = (torch.randn(b, d, generator=g, dtype=torch.float64) * 5).to(disc_dtype)
    if b > 10:
        discounted[10, 0] = float("nan")  # dropped this step, cleared by its reset on the next
    fused_disc, split_disc = discounted.clone(), discounted.clone()
    fused_stats = [*stats(d), torch.tensor(5), torch.tensor(1)]
    split_stats = [t.clone() for t in fused_stats]
    for step in range(3):
        reward = torch.randn(b, d, generator=g)
        terminated = torch.rand(b, generator=g) < 0.1
        if b > 10:
            terminated[10] = step == 1
        CPP.reward_record(reward, terminated, fused_disc, 0.99, *fused_stats, ema_decay, {})
        parts = CPP.reward_moments(reward, terminated, split_disc, 0.99, {})
        CPP.merge(parts, *split_stats, ema_decay)
        assert_same(fused_disc, split_disc)
        for a, e in zip(fused_stats, split_stats):
            assert_same(a, e)
    assert int(fused_stats[3]) == (2 if b > 10 else 1)


def test_reward_record_through_module_matches_torch():
    g = torch.Generator().manual_seed(9)
    mods = {name: protonorm.RewardRunningMeanStd(None, (1,), gamma=0.99, clamp_value=5.0, device="cpu", backend=name)
            for name in ("cpp", "torch")}
    for _ in range(20):
        reward, terminated = torch.randn(4096, generator=g), torch.rand(4096, generator=g) < 0.05
        for m in mods.values():
            m.record_reward(reward, terminated)
    a, b = mods["cpp"], mods["torch"]
    assert_same(a.discounted_reward, b.discounted_reward)
    assert int(a.count) == int(b.count)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.var, b.var, rtol=1e-12, atol=0)



@pytest.mark.parametrize("nonfinite", ["drop", "raise"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "general"])
@pytest.mark.parametrize("shape,shift", [((1,), -1), ((1,), 2), ((1,), 0), ((3,), -1), ((3,), -3), ((3,), 4),
                                         ((3,), 0)])
def test_reward_sharing_memory_with_the_returns_is_read_as_it_was(shape, shift, direct, nonfinite, monkeypatch):
    """A reward whose memory overlaps the discounted returns it advances (``shift`` elements from them in one
    buffer; 0: the returns themselves) is the reward as it was before the step, as for upstream's out-of-place
    arithmetic and the torch backend: the kernel, which writes the returns row by row, must not read rows it has
    already advanced. Compared bit for bit with the same step given a copy of the reward."""
    if not direct:
        _general_way(monkeypatch)
    envs, width = 37, shape[0]
    g = torch.Generator().manual_seed(width + shift)
    first = torch.randn((envs,) if width == 1 else (envs, width), generator=g)  # as the direct way takes them
    terminated = torch.rand(envs, generator=g) < 0.2
    buffer = torch.randn(envs * width + 8, generator=g)
    start = 4  # room for shifts either way
    returns = buffer[start:start + envs * width].view(first.shape)
    reward = buffer[start + shift:start + shift + envs * width].view(first.shape)
    modules = [protonorm.RewardRunningMeanStd(None, shape, gamma=0.9, device="cpu", nonfinite=nonfinite,
                                              backend="cpp") for _ in range(2)]
    for m in modules:
        m.record_reward(first, terminated)
    copy = returns.clone()
    modules[0].discounted_reward = copy
    modules[1].discounted_reward = returns.copy_(modules[0].discounted_reward)
    expected_reward = reward.clone()
    modules[0].record_reward(expected_reward, ~terminated)
    modules[1].record_reward(reward, ~terminated)
    for a, b in zip(modules[1].state_dict().values(), modules[0].state_dict().values()):
        assert_same(a, b)
    assert_same(modules[1].discounted_reward, modules[0].discounted_reward)
    assert_same(modules[1].nonfinite_rows, modules[0].nonfinite_rows)


# ------------------------------------------------------------------------------------------------ direct calls
# The module offers its hot calls to the backend's try_ methods (protonorm/backends/base.py), which take them
# straight to the kernels or decline. Taken or not, the results must be the general way's, bit for bit.
@pytest.fixture
def direct_calls(monkeypatch):
    """Counts, per direct function of the cpp backend, the calls it took and those it declined."""
    from protonorm.backends import cpp_backend

    seen = {}
    for name in ("_direct_normalize_moments", "_direct_normalize", "_direct_merge", "_direct_reward_record"):
        original = getattr(cpp_backend, name)
        seen[name] = {"taken": 0, "declined": 0}

        def counting(*args, _original=original, _seen=seen[name]):
            result = _original(*args)
            _seen["declined" if result is None or result is False else "taken"] += 1
            return result

        monkeypatch.setattr(cpp_backend, name, counting)
    return seen


def _general_way(monkeypatch):
    """From here on the module offers the cpp backend no direct calls."""
    monkeypatch.setattr(type(CPP), "direct", False)


@pytest.mark.parametrize("clamp_value,ema_decay", [(5.0, None), (None, 0.99)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,d", [(1, 1), (7, 7), (1023, 342), (300, 1023)])
def test_direct_normalize_and_record_match_the_general_way(b, d, dtype, clamp_value, ema_decay, direct_calls,
                                                           monkeypatch):
    """normalize + record in training (the fused kernel and the stash's merge) and normalize in evaluation, on
    batches with NaN/inf rows, row-strided batches and a batch with strided columns (which the direct way leaves
    to the general one)."""
    g = torch.Generator().manual_seed(b * d)
    wide = (torch.randn(b, d + 3, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    batches = [data(b, d, dtype, seed=s) for s in range(3)] + [wide[:, 1:d + 1]]
    batches[1][b // 2, d // 2] = float("nan")
    batches[2][0, 0] = float("inf")
    transposed = data(d, b, dtype, seed=9).t()  # stride(1) != 1 unless d == 1 or b == 1

    def run():
        m = protonorm.RunningMeanStd(None, (d,), device="cpu", clamp_value=clamp_value, ema_decay=ema_decay,
                                     backend="cpp")
        outs = []
        for x in batches + [transposed]:
            m.train()
            outs.append(m.normalize(x).clone())
            m.record_moments(x)
            m.eval()
            outs.append(m.normalize(x).clone())
        return m, outs

    direct, direct_outs = run()
    taken = {name: counts["taken"] for name, counts in direct_calls.items()}
    plain_batches = len(batches) if (b > 1 and d > 1) else len(batches) + 1
    # The first normalize makes the layout; every later one of a unit-column batch goes direct. Every record
    # merges what its normalize stashed, whichever way that went.
    assert taken["_direct_normalize_moments"] == plain_batches - 1
    assert taken["_direct_normalize"] == plain_batches
    assert taken["_direct_merge"] == len(batches) + 1
    _general_way(monkeypatch)
    general, general_outs = run()
    assert direct_calls["_direct_normalize_moments"]["taken"] == plain_batches - 1
    for a, e in zip(direct_outs, general_outs):
        assert_same(a, e)
    for a, e in ((direct.mean, general.mean), (direct.var, general.var), (direct.count, general.count),
                 (direct.nonfinite_rows, general.nonfinite_rows)):
        assert_same(a, e)
    assert int(direct.nonfinite_rows) == 2


def test_direct_normalize_declines_what_it_does_not_take():
    """Each argument the direct functions cannot take makes them decline with nothing written."""
    from protonorm.backends.cpp_backend import _direct_merge, _direct_normalize, _direct_normalize_moments

    x = data(33, 7, torch.float32)
    mean, var = stats(7)
    out = torch.full((33, 7), 7.0)
    good = dict(x=x, mean=mean, var=var, epsilon=1e-5, clamp_value=5.0, out=out)
    bad = {
        "x not a tensor": dict(x=x.tolist()),
        "x 1-D": dict(x=x[0], out=out[0]),
        "x integer": dict(x=x.int()),
        "x strided columns": dict(x=data(7, 33, torch.float32).t()),
        "x without rows": dict(x=x[:0], out=out[:0]),
        "x without columns": dict(x=x[:, :0], out=out[:, :0], mean=mean[:0], var=var[:0]),
        "x on meta": dict(x=torch.empty(33, 7, device="meta")),
        "out float64": dict(out=out.double()),
        "out of another shape": dict(out=out[:32]),
        "out strided columns": dict(out=torch.zeros(7, 33).t()),
        "mean float32": dict(mean=mean.float()),
        "var of another size": dict(var=var[:6]),
        "mean 2-D": dict(mean=mean.view(1, 7)),
        # (each condition of the ops' separate checks, as the direct way's one pass over each tensor tests it)
        "x negated": dict(x=torch._neg_view(x)),
        "x misaligned": dict(x=_misaligned(x)),
        "out negated": dict(out=torch._neg_view(out)),
        "out rows overlapping": dict(out=torch.zeros(33 * 6 + 1).as_strided((33, 7), (6, 1))),
        "out rows in one place": dict(out=torch.zeros(1, 7).expand(33, 7)),
        "out on meta": dict(out=torch.empty(33, 7, device="meta")),
        "mean in one place": dict(mean=torch.zeros(1, dtype=torch.float64).expand(7)),
        "var negated": dict(var=torch._neg_view(var)),
        "var on meta": dict(var=var.to("meta")),
        "epsilon negative": dict(epsilon=-1.0),
        "epsilon NaN": dict(epsilon=float("nan")),
        "clamp zero": dict(clamp_value=0.0),
    }
    kept = [t.clone() for t in (x, mean, var, out)]
    for name, change in bad.items():
        args = {**good, **change}
        assert _direct_normalize_moments(**args, workspace={}) is None, name
        assert _direct_normalize(**args) is False, name
        for a, e in zip((x, mean, var, out), kept):
            assert_same(a, e)
    with protonorm.diagnostics.HostSyncCounter():  # any dispatch mode: its ops must see every call
        assert _direct_normalize_moments(**good, workspace={}) is None
        assert _direct_normalize(**good) is False
    assert_same(out, kept[3])
    parts = _direct_normalize_moments(**good, workspace={})
    assert_same(out, reference.normalize(x, mean, var, 1e-5, 5.0, False, True))
    assert_parts_close(parts, reference.batch_moments(x))

    state = [mean.clone(), var.clone(), torch.tensor(3), torch.tensor(0)]
    good_merge = dict(parts=parts, mean=state[0], var=state[1], count=state[2], dropped=state[3], ema_decay=None)
    bad_merge = {
        "parts float32": dict(parts=parts.float()),
        "parts 1-D": dict(parts=parts[0]),
        "parts of another width": dict(parts=parts[:, :-2]),
        "parts odd width": dict(parts=parts[:, :-1]),
        "parts strided columns": dict(parts=parts.t().contiguous().t()),
        "no parts": dict(parts=parts[:0]),
        "count int32": dict(count=state[2].int()),
        "dropped not 0-d": dict(dropped=state[3].view(1)),
        "count on meta": dict(count=state[2].to("meta")),
        "mean float32": dict(mean=state[0].float()),
        "var in one place": dict(var=torch.ones(1, dtype=torch.float64).expand(7)),
        "mean negated": dict(mean=torch._neg_view(state[0])),
        "parts misaligned": dict(parts=_misaligned(parts, 4)),
    }
    kept = [t.clone() for t in state]
    for name, change in bad_merge.items():
        if name == "parts strided columns" and parts.shape[0] == 1:
            continue  # a single part has unit column stride whatever its layout
        assert _direct_merge(**{**good_merge, **change}) is False, name
        for a, e in zip(state, kept):
            assert_same(a, e)
    assert _direct_merge(**good_merge) is True
    assert int(state[2]) == 3 + 33


def _error_of(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 (the error itself is what is compared)
        return type(exc), str(exc)
    return None


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "mkldnn"])
@pytest.mark.parametrize("d", [1, 5])
def test_tensors_without_strided_memory_get_the_general_ways_error(layout, d, monkeypatch):
    """A batch or reward with no strided memory of its own (sparse, MKL-DNN) is refused, on the direct way with the
    general way's very error (the direct way read its data pointer first, which raised torch's own error), and
    leaves the statistics and returns as they were."""
    if layout == "mkldnn" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without MKL-DNN")
    convert = {"sparse_coo": torch.Tensor.to_sparse, "sparse_csr": torch.Tensor.to_sparse_csr,
               "mkldnn": torch.Tensor.to_mkldnn}[layout]
    g = torch.Generator().manual_seed(d)
    x, reward = torch.randn(6, d, generator=g), torch.randn(6, d, generator=g)
    terminated = torch.tensor([True, False] * 3)

    def errors():
        m = protonorm.RunningMeanStd(None, (d,), device="cpu", backend="cpp")
        r = protonorm.RewardRunningMeanStd(None, (d,), gamma=0.9, device="cpu", backend="cpp")
        m.normalize(x)
        m.record_moments(x)
        r.record_reward(reward.view(6) if d == 1 else reward, terminated)
        kept = [t.clone() for t in (*m.state_dict().values(), *r.state_dict().values(), r.discounted_reward)]
        found = []
        for training in (True, False):
            m.train(training)
            found.append(_error_of(lambda: m.normalize(convert(x))))
        found.append(_error_of(lambda: r.record_reward(convert(reward.view(6) if d == 1 else reward), terminated)))
        for a, b in zip((*m.state_dict().values(), *r.state_dict().values(), r.discounted_reward), kept):
            assert_same(a, b)
        return found

    direct = errors()
    assert all(found is not None for found in direct), direct
    _general_way(monkeypatch)
    assert errors() == direct


@pytest.mark.sanitize_once
def test_direct_calls_read_no_tensor_value(direct_calls):
    """No host read on the direct way either. A dispatch mode would make it decline, so this watches with the
    profiler (which records every aten op without one) and checks that the direct way was the one taken."""
    x = data(1023, 342, torch.float32)
    m = protonorm.RunningMeanStd(None, (342,), device="cpu", clamp_value=5.0, backend="cpp")
    r = protonorm.RewardRunningMeanStd(None, (1,), gamma=0.99, device="cpu", backend="cpp")
    reward, terminated = torch.randn(4096), torch.rand(4096) < 0.1
    m.normalize(x)
    m.record_moments(x)
    r.record_reward(reward, terminated)
    for counts in direct_calls.values():
        counts.update(taken=0, declined=0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            m.train()
            m.normalize(x)
            m.record_moments(x)
            m.eval()
            m.normalize(x)
            r.record_reward(reward, terminated)
    names = {event.name for event in prof.events()}
    assert not names & {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}, names
    assert all(counts == {"taken": 2, "declined": 0} for counts in direct_calls.values()), direct_calls


def _reward_stream(shape, reward_dtype, term_dtype, steps=6, seed=0):
    """Steps of (reward, terminated) for `steps` environment steps of 257 environments, with resets and NaN/inf
    rewards (dropped rows whose returns stay poisoned until their environment resets)."""
    g = torch.Generator().manual_seed(seed)
    envs = 257
    out = []
    for step in range(steps):
        reward = (torch.randn((envs, *shape), generator=g, dtype=torch.float64) * 3 + 1).to(reward_dtype)
        terminated = (torch.rand(envs, generator=g) < 0.2).to(term_dtype)
        if step == 1:
            reward.view(envs, -1)[5, 0] = float("nan")
            reward.view(envs, -1)[9, -1] = float("inf")
        if step == 3:
            terminated[5] = 1
        out.append((reward, terminated))
    return out


@pytest.mark.parametrize("ema_decay", [None, 0.99])
@pytest.mark.parametrize("term_dtype", [torch.bool, torch.float32, torch.int64], ids=str)
@pytest.mark.parametrize("reward_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,reward_shape", [((1,), ()), ((), ()), ((3,), (3,))], ids=["envs", "scalar", "envsx3"])
def test_direct_reward_record_matches_the_general_way(shape, reward_shape, reward_dtype, term_dtype, ema_decay,
                                                      direct_calls, monkeypatch):
    """The per-step reward record taken straight to the kernel gives the very bits of the general way, which
    itself is compared with the torch backend above; and the direct way is really taken from the second step on."""
    steps = _reward_stream(reward_shape, reward_dtype, term_dtype)

    def run():
        m = protonorm.RewardRunningMeanStd(None, shape, gamma=0.99, clamp_value=5.0, device="cpu",
                                           ema_decay=ema_decay, backend="cpp")
        for reward, terminated in steps:
            m.record_reward(reward, terminated)
        return m

    direct = run()
    assert direct_calls["_direct_reward_record"] == {"taken": len(steps) - 1, "declined": 0}
    _general_way(monkeypatch)
    general = run()
    assert direct_calls["_direct_reward_record"]["taken"] == len(steps) - 1
    for a, b in ((direct.discounted_reward, general.discounted_reward), (direct.mean, general.mean),
                 (direct.var, general.var), (direct.count, general.count),
                 (direct.nonfinite_rows, general.nonfinite_rows)):
        assert_same(a, b)
    assert int(direct.nonfinite_rows) >= 2


def test_direct_reward_record_declines_what_it_does_not_take():
    """Each argument the direct way cannot take makes it return False with nothing written; the general way then
    either serves the call or raises, and the statistics stay as they were on an error."""
    from protonorm.backends.cpp_backend import _direct_reward_record

    g = torch.Generator().manual_seed(3)
    reward, terminated = torch.randn(64, generator=g), torch.rand(64, generator=g) < 0.1
    discounted = torch.randn(64, generator=g)
    mean, var = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    count, dropped = torch.ones((), dtype=torch.long), torch.zeros((), dtype=torch.long)
    good = dict(reward=reward, terminated=terminated, discounted=discounted, gamma=0.9, mean=mean, var=var,
                count=count, dropped=dropped, ema_decay=None)
    wide = torch.randn(64, 3, generator=g)
    shared = torch.randn(65, generator=g)
    bad = {
        "reward not a tensor": dict(reward=reward.tolist()),
        "terminated a list": dict(terminated=terminated.tolist()),
        "reward 3-D": dict(reward=reward.view(64, 1, 1), discounted=discounted.view(64, 1, 1)),
        "strided columns": dict(reward=wide.t().contiguous().t(), discounted=torch.zeros(64, 3),
                                mean=torch.zeros(3, dtype=torch.float64), var=torch.ones(3, dtype=torch.float64)),
        "no rows": dict(reward=reward[:0], terminated=terminated[:0], discounted=discounted[:0]),
        "integer reward": dict(reward=torch.ones(64, dtype=torch.int32)),
        "float16 returns": dict(discounted=discounted.half()),
        "returns of another shape": dict(discounted=discounted[:63]),
        "terminated too short": dict(terminated=terminated[:63]),
        "terminated 2-D": dict(terminated=terminated.view(64, 1)),
        "complex terminated": dict(terminated=torch.zeros(64, dtype=torch.complex64)),
        "float32 mean": dict(mean=mean.float()),
        "var of another size": dict(var=torch.ones(2, dtype=torch.float64)),
        "int32 count": dict(count=count.int()),
        "count not 0-d": dict(count=count.view(1)),
        "meta reward": dict(reward=torch.empty(64, device="meta")),
        "reward sharing the returns' memory": dict(reward=shared[:64], discounted=shared[1:]),
    }
    before = {k: v.clone() for k, v in good.items() if isinstance(v, torch.Tensor)}
    for name, change in bad.items():
        assert _direct_reward_record(**{**good, **change}) is False, name
        for key, value in before.items():
            assert_same(good[key], value)
    with protonorm.diagnostics.HostSyncCounter():  # any dispatch mode: its ops must see every call
        assert _direct_reward_record(**good) is False
    assert _direct_reward_record(**good) is True

    m = protonorm.RewardRunningMeanStd(None, (1,), gamma=0.99, device="cpu", backend="cpp")
    m.record_reward(reward, terminated)
    m.record_reward(reward, terminated)
    state = [t.clone() for t in (m.mean, m.var, m.count, m.discounted_reward)]
    with pytest.raises(ValueError, match="one entry per environment"):
        m.record_reward(reward, terminated[:63])
    with pytest.raises(ValueError, match="like the previous steps"):
        m.record_reward(reward[:63], terminated[:63])
    for a, b in zip(state, (m.mean, m.var, m.count, m.discounted_reward)):
        assert_same(a, b)
    column = protonorm.RewardRunningMeanStd(None, (1,), gamma=0.99, device="cpu", backend="cpp")
    for _ in range(2):
        column.record_reward(reward.view(64, 1), terminated)  # [B, 1] for shape (1,): the general way takes it
    assert int(column.count) == 1 + 2 * 64


@pytest.mark.sanitize_once
def test_compiled_reward_record_matches_eager():
    steps = _reward_stream((), torch.float32, torch.bool, steps=4, seed=5)
    eager, traced = (protonorm.RewardRunningMeanStd(None, (1,), gamma=0.99, device="cpu", backend="cpp")
                     for _ in range(2))
    compiled = torch.compile(traced.record_reward, fullgraph=True, backend="eager")
    eager.record_reward(*steps[0])
    traced.record_reward(*steps[0])  # the first call creates the returns outside the graph
    for reward, terminated in steps[1:]:
        eager.record_reward(reward, terminated)
        compiled(reward, terminated)
    for a, b in ((eager.discounted_reward, traced.discounted_reward), (eager.mean, traced.mean),
                 (eager.var, traced.var), (eager.count, traced.count)):
        assert_same(a, b)


# ------------------------------------------------------------------------------------------------ module
def test_large_offset_wide_batch_against_numpy():
    # Many rows at a 1e6 offset with unit spread: the case that breaks sum/sum-of-squares accumulation.
    x = (torch.randn(4097, 342, dtype=torch.float64) + 1e6).float()
    x[:, 5] = 7e5  # a constant column
    m = protonorm.RunningMeanStd(None, (342,), device="cpu", backend="cpp")
    m.count.zero_()
    m.record_moments(x)
    t_mean, t_var, _ = truth([x], with_prior=False)
    assert_close_rel(m.mean, t_mean, MEAN_RTOL, "mean", floor=1e-12)
    assert_close_rel(m.var, t_var, VAR_RTOL, "var", floor=1e-12)
    assert float(m.var[5]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("fused", [False, True])
def test_constant_columns_keep_their_value_and_no_variance(isa, dtype, fused):
    def moments(x):
        if not fused:
            return CPP.moments(x, None, {}).clone()
        out = torch.empty(x.shape, dtype=normalized_dtype(x.dtype))
        return CPP.normalize_moments(x, *stats(x.shape[1]), 1e-5, None, out, {}).clone()

    # The last batch spans several parts (their merge must keep it exact too).
    assert_constant_columns_exact(moments, CPP.merge, dtype, batch_sizes=[*CONSTANT_BATCH_SIZES, 13109])


@pytest.mark.parametrize("name", EXTREME_BATCHES)
def test_moments_at_the_edges_of_each_dtype(isa, name):
    x = extreme_batch(name)
    assert_moments_exact(CPP.combine(CPP.moments(x, None, {})), x)
    assert_moments_exact(CPP.combine(CPP.moments(x[:, :1].contiguous(), None, {})), x[:, :1])  # the one-column path


@pytest.mark.parametrize("name", OUTLIER_FIRST_BATCHES)
def test_moments_of_a_batch_whose_first_row_is_an_outlier(name):
    x = outlier_first_batch(name)
    parts = CPP.moments(x, None, {})
    num_parts, rows_per_part = parts_layout(*x.shape)
    assert num_parts > 1
    assert_moments_exact(CPP.combine(parts), x, one_pass_outlier_rtol(rows_per_part))


@pytest.mark.unsanitized
@pytest.mark.parametrize("offset,spread,dtype", LONG_STREAMS)
def test_long_stream_of_small_records(offset, spread, dtype):
    """100,000 records of 1-4 rows, as a long training run makes them (the bounds in hard_data)."""
    workspace = {}
    assert_long_stream_accurate(lambda x: CPP.moments(x, None, workspace), CPP.merge, offset, spread, dtype, 100_000)


def test_three_d_features_through_module():
    shape = (2, 3, 4)
    mods = {name: protonorm.RunningMeanStd(None, shape, device="cpu", clamp_value=4.0, backend=name)
            for name in ("cpp", "torch")}
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(33, *shape, generator=g) * 3 + 1
        outs = {name: m.normalize(x) for name, m in mods.items()}
        assert_same(outs["cpp"], outs["torch"])
        for m in mods.values():
            m.record_moments(x)
    a, b = mods["cpp"], mods["torch"]
    assert a.mean.shape == shape and int(a.count) == int(b.count)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.var, b.var, rtol=1e-12, atol=0)
    y = torch.randn(5, *shape)
    assert_same(a.normalize(y, un_norm=True), b.normalize(y, un_norm=True))


@pytest.mark.parametrize("ema_decay", [None, 0.999])
def test_fused_stash_path_equals_separate_calls(ema_decay):
    fused = protonorm.RunningMeanStd(None, (342,), device="cpu", clamp_value=5.0, ema_decay=ema_decay, backend="cpp")
    separate = protonorm.RunningMeanStd(None, (342,), device="cpu", clamp_value=5.0, ema_decay=ema_decay,
                                        backend="cpp")
    g = torch.Generator().manual_seed(4)
    for step in range(4):
        x = torch.randn(1023, 342, generator=g) * 2 + step
        y_fused = fused.normalize(x)  # training mode: one pass, moments stashed
        fused.record_moments(x)  # uses the stash
        separate.eval()
        y_separate = separate.normalize(x)
        separate.train()
        separate.record_moments(x)
        assert_same(y_fused, y_separate)
        for a, b in zip((fused.mean, fused.var, fused.count), (separate.mean, separate.var, separate.count)):
            assert_same(a, b)


def test_in_place_change_between_normalize_and_record_is_noticed():
    a = protonorm.RunningMeanStd(None, (7,), device="cpu", backend="cpp")
    b = protonorm.RunningMeanStd(None, (7,), device="cpu", backend="cpp")
    x = data(64, 7, torch.float32)
    a.normalize(x)
    x.add_(10.0)  # after normalize stashed the moments of the old values
    a.record_moments(x)
    b.record_moments(x.clone())
    for s, t in zip((a.mean, a.var, a.count), (b.mean, b.var, b.count)):
        assert_same(s, t)


@pytest.mark.sanitize_once
def test_no_host_sync_on_hot_path():
    x = data(1023, 342, torch.float32)
    m = protonorm.RunningMeanStd(None, (342,), device="cpu", clamp_value=5.0, backend="cpp")
    r = protonorm.RewardRunningMeanStd(None, (1,), gamma=0.99, device="cpu", backend="cpp")
    reward, terminated = torch.randn(4096), torch.rand(4096) < 0.1
    r.record_reward(reward, terminated)
    mask = torch.rand(1023) < 0.5
    with HostSyncCounter(strict=True) as probe:
        m.normalize(x)
        m.record_moments(x)
        m.record_moments(x, mask)
        m.eval()
        m.normalize(x, un_norm=True)
        r.record_reward(reward, terminated)
        r.normalize(reward)
        CPP.combine(CPP.moments(x, None, {}))
    assert probe.count == 0


# ------------------------------------------------------------------------------------------------ random layouts
# Shapes around every vector width and tail (8 float32 lanes on AVX2, 16 on AVX-512, 64-byte lines) and past 1024
# features, besides any width up to 2100.
_EDGE_COLS = [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1023, 1024, 1025, 2047, 2048, 2049]
_TERM_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float16, torch.float64]


def _placed(values, layout, offset, pad):
    """``values`` ([B, D]) copied into a fresh buffer at element ``offset``: ``"rows"`` with rows ``D + pad``
    elements apart (a column slice of a wider tensor), ``"columns"`` as the transpose of a [D, B] tensor (columns
    B apart, which the ops copy). ``"overlap"`` makes a read-only batch whose rows start ``pad % D`` elements apart
    (0: one row broadcast, otherwise sliding windows over the buffer), holding ``values``' first elements instead."""
    b, d = values.shape
    if layout == "columns":
        buffer = torch.full((offset + b * d + 1,), 7.0, dtype=values.dtype)
        placed = buffer[offset:offset + b * d].view(d, b).t()
    elif layout == "overlap":
        stride = pad % d if d else 0
        buffer = torch.full((offset + b * d + 1,), 7.0, dtype=values.dtype)
        buffer[offset:offset + b * d] = values.reshape(-1)
        return buffer.as_strided((b, d), (stride, 1), offset)
    else:
        stride = d + pad
        buffer = torch.full((offset + b * stride + 1,), 7.0, dtype=values.dtype)
        placed = buffer.as_strided((b, d), (stride, 1), offset)
    placed.copy_(values)
    return placed


def _stat_vectors(d, seed, strided):
    mean, var = stats(d, seed)
    if strided:  # every other element of a longer vector
        mean = torch.stack([mean, mean * 3]).t().reshape(-1)[::2]
        var = torch.stack([var, var * 3]).t().reshape(-1)[::2]
    return mean, var


@pytest.mark.sanitize_once
@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(rows=st.integers(0, 300), cols=st.one_of(st.sampled_from(_EDGE_COLS), st.integers(0, 2100)),
       dtype=st.sampled_from(DTYPES), isa=st.sampled_from(ISAS or ["none"]), stream=st.booleans(),
       threads=st.integers(1, 3), x_layout=st.sampled_from(["rows", "columns", "overlap"]), x_offset=st.integers(0, 15),
       x_pad=st.integers(0, 9), out_offset=st.integers(0, 15), out_pad=st.integers(0, 9),
       density=st.sampled_from([None, 0.0, 0.1, 0.5, 0.9, 1.0]), mask_step=st.sampled_from([1, 3]),
       bad=st.lists(st.tuples(st.integers(0, 299), st.integers(0, 2100), st.sampled_from(["nan", "inf", "-inf"])),
                    max_size=6),
       clamp=st.sampled_from([None, 5.0, 0.3]), un_norm=st.booleans(), center=st.booleans(),
       stats_strided=st.booleans(), ema=st.sampled_from([None, 0.9]), gamma=st.sampled_from([0.0, 0.99, 1.0]),
       term_dtype=st.sampled_from(_TERM_DTYPES), disc_dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
def test_random_layouts_match_the_reference(rows, cols, dtype, isa, stream, threads, x_layout, x_offset, x_pad,
                                            out_offset, out_pad, density, mask_step, bad, clamp, un_norm, center,
                                            stats_strided, ema, gamma, term_dtype, disc_dtype, seed):
    """Every op on random layouts the fixed tests above do not reach: 0-300 rows of 0-2100 features, every dtype,
    rows further apart than their length, rows that overlap or repeat, transposed batches, starts misaligned by
    1-15 elements (input, output, returns, parts), masks of any density (strided too), NaN/inf rows anywhere, every
    instruction set, streamed or plain stores and 1-3 threads. Outputs, returns, merges and combines bitwise as the
    reference; moments within the module docstring's bounds of it, and bitwise those of a contiguous copy."""
    g = torch.Generator().manual_seed(seed)
    values = data(rows, cols, dtype, seed=seed)
    for r, c, kind in bad:
        if r < rows and cols:
            values[r, c % cols] = float(kind)
    x = _placed(values, x_layout, x_offset, x_pad)
    mask = None
    if density is not None:
        mask = (torch.rand(rows * mask_step, generator=g) < density)[::mask_step]
    mean, var = _stat_vectors(cols, seed, stats_strided)
    out_dtype = normalized_dtype(dtype)

    def fresh_out():
        return _placed(torch.zeros(rows, cols, dtype=out_dtype), "rows", out_offset, out_pad)

    previous = (_C.isa(), _C.set_stream_threshold(0 if stream else -1), torch.get_num_threads())
    try:
        _C.set_isa(isa)
        torch.set_num_threads(threads)

        parts = CPP.moments(x, mask, {}).clone()
        assert_parts_close(parts, reference.batch_moments(x, mask))
        assert_same(parts, CPP.moments(x.contiguous(), None if mask is None else mask.contiguous(), {}))

        out, want = fresh_out(), torch.empty(rows, cols, dtype=out_dtype)
        CPP.normalize(x, mean, var, 1e-5, clamp, un_norm, center, out)
        TORCH.normalize(x, mean, var, 1e-5, clamp, un_norm, center, want)
        assert_same(out, want)

        out, want = fresh_out(), torch.empty(rows, cols, dtype=out_dtype)
        fused = CPP.normalize_moments(x, mean, var, 1e-5, clamp, out, {}).clone()
        TORCH.normalize(x, mean, var, 1e-5, clamp, False, True, want)
        assert_same(out, want)
        assert_same(fused, CPP.moments(x, None, {}))
        direct_out = fresh_out()
        direct = CPP.try_normalize_moments(x, mean, var, 1e-5, clamp, direct_out, {})
        if direct is not None:
            assert_same(direct_out, want)
            assert_same(direct, fused)

        if x_layout == "rows" and out_dtype == dtype:  # a plain normalize may write over its input
            in_place = _placed(values, "rows", x_offset, x_pad)
            CPP.normalize(in_place, mean, var, 1e-5, clamp, False, True, in_place)
            assert_same(in_place, want)

        state = [mean, var, torch.tensor(seed % 50), torch.tensor(3)]
        assert_merge_as_reference(parts, state, ema)
        spread = _placed(parts, "rows", out_offset, out_pad)  # rows of parts further apart than their width
        assert_merge_as_reference(parts, state, ema, laid_out=spread)

        reward = x
        terminated = (torch.rand(rows * 2, generator=g) < 0.3).to(term_dtype)[::2]
        discounted = _placed((torch.randn(rows, cols, generator=g, dtype=torch.float64) * 5).to(disc_dtype), "rows",
                             out_offset, out_pad)
        ours, theirs = discounted, discounted.clone()
        fused_disc = _placed(discounted, "rows", out_offset, out_pad)
        reward_parts = CPP.reward_moments(reward, terminated, ours, gamma, {}).clone()
        want_parts = TORCH.reward_moments(reward, terminated, theirs, gamma, {})
        assert_same(ours.contiguous(), theirs)
        assert_parts_close(reward_parts, reference.combine_parts(want_parts))  # the reference's parts: 64K elements
        record = [_strided_copy(t) for t in (mean, var, torch.tensor(5), torch.tensor(0))]
        split = [_strided_copy(t) for t in record]
        CPP.reward_record(reward, terminated, fused_disc, gamma, *record, ema, {})
        CPP.merge(reward_parts, *split, ema)
        assert_same(fused_disc, theirs)
        for a, e in zip(record, split):
            assert_same(a, e)
    finally:
        _C.set_isa(previous[0])
        _C.set_stream_threshold(previous[1])
        torch.set_num_threads(previous[2])


# ------------------------------------------------------------------------------------------------ bad input
def _misaligned(t, by=1):
    """A copy of ``t`` that starts ``by`` bytes past an element boundary (a view of a byte buffer at an offset)."""
    raw = bytearray(t.numel() * t.element_size() + by)
    view = torch.frombuffer(raw, dtype=t.dtype, offset=by, count=t.numel()).view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % t.element_size() == by % t.element_size() != 0
    return view


def test_inputs_not_aligned_to_their_elements_are_read_from_an_aligned_copy(stream_everything):
    """The kernels read whole elements through pointers of their type: an input that starts between two of its
    elements (a view of a byte buffer at an odd offset, which torch's own ops accept) is read from an aligned copy,
    with the same results, on the general way and through the module's direct calls alike."""
    x, reward = data(8, 40, torch.float32), data(8, 40, torch.float32, seed=1)
    mean, var = stats(40)
    terminated = torch.arange(8) % 3 == 0
    flags = terminated.long()

    def state():
        return [mean.clone(), var.clone(), torch.tensor(3), torch.tensor(0)]

    parts = CPP.moments(x, None, {}).clone()
    assert_same(CPP.moments(_misaligned(x), None, {}), parts)
    assert_same(CPP.moments(_misaligned(x.half()), None, {}), CPP.moments(x.half(), None, {}))
    want, got = torch.empty(8, 40), torch.empty(8, 40)
    CPP.normalize(x, mean, var, 1e-5, 2.0, False, True, want)
    CPP.normalize(_misaligned(x), mean, var, 1e-5, 2.0, False, True, got)
    assert_same(got, want)
    got.fill_(7.0)
    assert_same(CPP.normalize_moments(_misaligned(x), mean, var, 1e-5, 2.0, got, {}), parts)
    assert_same(got, want)
    merged, merged_misaligned = state(), state()
    CPP.merge(parts, *merged, None)
    CPP.merge(_misaligned(parts, 4), *merged_misaligned, None)
    for a, b in zip(merged, merged_misaligned):
        assert_same(a, b)
    assert_same(CPP.combine(_misaligned(parts, 4)), CPP.combine(parts))
    for args in ((_misaligned(reward), terminated), (reward, _misaligned(flags, 4))):
        returns, returns_misaligned = torch.ones(8, 40), torch.ones(8, 40)
        assert_same(CPP.reward_moments(*args, returns_misaligned, 0.9, {}),
                    CPP.reward_moments(reward, terminated, returns, 0.9, {}))
        assert_same(returns_misaligned, returns)
        recorded, recorded_misaligned = state(), state()
        CPP.reward_record(reward, terminated, returns, 0.9, *recorded, None, {})
        CPP.reward_record(*args, returns_misaligned, 0.9, *recorded_misaligned, None, {})
        for a, b in zip(recorded + [returns], recorded_misaligned + [returns_misaligned]):
            assert_same(a, b)
    # Through the module (its direct calls, then the general way for a view it cannot take directly).
    for module_x in (_misaligned(x), _misaligned(x.double(), 4)):
        aligned = module_x.clone()
        one, other = (protonorm.RunningMeanStd(shape=(40,), device="cpu", backend="cpp") for _ in range(2))
        outputs = []
        for m, batch in ((one, aligned), (other, module_x)):
            m.train()
            m.record_moments(aligned)
            m.normalize(aligned)
            m.record_moments(aligned)
            outputs.append(m.normalize(batch))
            m.record_moments(batch)
        assert_same(outputs[1], outputs[0])
        for a, b in zip(other.state_dict().values(), one.state_dict().values()):
            assert_same(a, b)
    rewards = [protonorm.RewardRunningMeanStd(None, (1,), gamma=0.9, device="cpu", backend="cpp") for _ in range(2)]
    for step in range(3):
        r, t = data(8, 1, torch.float32, seed=step).reshape(8), torch.arange(8) % (step + 2) == 0
        rewards[0].record_reward(r, t)
        rewards[1].record_reward(_misaligned(r), _misaligned(t.long(), 4))
    for a, b in zip(rewards[1].state_dict().values(), rewards[0].state_dict().values()):
        assert_same(a, b)


def test_written_tensors_not_aligned_to_their_elements_are_refused(stream_everything):
    """What the kernels write (outputs, statistics, counters, returns, parts) is written in place and so cannot be
    copied: one that starts between two of its elements is refused, whichever argument it is, before anything is
    written (misaligned access is undefined behaviour, which UBSan reports, and aligned non-temporal stores there
    would fault). The bindings refuse a misaligned input as well, should any reach them."""
    x, reward = data(8, 40, torch.float32), data(8, 40, torch.float32, seed=1)
    mean, var = stats(40)
    terminated = torch.arange(8) % 3 == 0
    state = [mean.clone(), var.clone(), torch.tensor(3), torch.tensor(0)]
    parts = CPP.moments(x, None, {}).clone()
    out, discounted = torch.full((8, 40), 7.0), torch.ones(8, 40)
    kept = [t.clone() for t in state + [out, discounted]]
    expected = "expected a tensor aligned to its {}-byte elements"
    misaligned_x = _misaligned(x)
    cases = [
        ("parts", 8, lambda: CPP.moments(x, None, {"cpp_parts": (8, 40, _misaligned(parts, 4))})),
        ("out", 4, lambda: CPP.normalize(x, mean, var, 1e-5, 2.0, False, True, _misaligned(out))),
        ("out", 4, lambda: CPP.normalize_moments(x, mean, var, 1e-5, 2.0, _misaligned(out), {})),
        ("mean", 8, lambda: CPP.normalize(x, _misaligned(mean, 2), var, 1e-5, 2.0, False, True, out)),
        ("var", 8, lambda: CPP.merge(parts, *state[:1], _misaligned(state[1], 4), *state[2:], None)),
        ("count", 8, lambda: CPP.merge(parts, *state[:2], _misaligned(state[2], 4), state[3], None)),
        ("discounted", 4, lambda: CPP.reward_moments(reward, terminated, _misaligned(discounted), 0.9, {})),
        ("dropped", 8, lambda: CPP.reward_record(reward, terminated, discounted, 0.9, *state[:3],
                                                  _misaligned(state[3], 1), None, {})),
        ("x", 4, lambda: _C.moments(misaligned_x.data_ptr(), 8, 40, 40, _DTYPE_CODES[torch.float32], 0, 0,
                                    parts.data_ptr(), *parts_layout(8, 40), 1)),
    ]
    for name, size, call in cases:
        with pytest.raises(ValueError, match=f"^{name}: {expected.format(size)}"):
            call()
        for a, e in zip(state + [out, discounted], kept):
            assert_same(a, e)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "general"])
def test_tensors_without_memory_are_refused(direct, monkeypatch):
    """torch's ZeroTensor passes every shape, dtype and stride check but has a null data pointer: the kernels must
    refuse it, whichever argument it is, rather than read or write address 0 (which crashed the process); the
    module's direct calls and its general way say so alike."""
    zero = torch._efficientzerotensor
    x = data(8, 4, torch.float32)
    mean, var = stats(4)
    counters = [torch.tensor(3), torch.tensor(0)]
    with pytest.raises(ValueError, match="x: expected a tensor with memory"):
        CPP.moments(zero(8, 4), None, {})
    with pytest.raises(ValueError, match="mask: expected a tensor with memory"):
        CPP.moments(x, zero(8, dtype=torch.bool), {})
    with pytest.raises(ValueError, match="x: expected a tensor with memory"):
        CPP.normalize(zero(8, 4), mean, var, 1e-5, None, False, True, torch.empty(8, 4))
    with pytest.raises(ValueError, match="out: expected a tensor with memory"):
        CPP.normalize(x, mean, var, 1e-5, 2.0, False, True, zero(8, 4))
    with pytest.raises(ValueError, match="x: expected a tensor with memory"):
        CPP.normalize_moments(zero(8, 4), mean, var, 1e-5, None, torch.empty(8, 4), {})
    with pytest.raises(ValueError, match="out: expected a tensor with memory"):
        CPP.normalize_moments(x, mean, var, 1e-5, None, zero(8, 4), {})
    with pytest.raises(ValueError, match="mean: expected a tensor with memory"):
        CPP.normalize(x, zero(4, dtype=torch.float64), var, 1e-5, None, False, True, torch.empty(8, 4))
    with pytest.raises(ValueError, match="terminated: expected a tensor with memory"):
        CPP.reward_record(x, zero(8, dtype=torch.bool), torch.zeros(8, 4), 0.9, mean, var, *counters, None, {})
    with pytest.raises(ValueError, match="reward: expected a tensor with memory"):
        CPP.reward_moments(zero(8, 4), torch.zeros(8, dtype=torch.bool), torch.zeros(8, 4), 0.9, {})
    with pytest.raises(ValueError, match="parts: expected a tensor with memory"):
        CPP.merge(zero(2, 10, dtype=torch.float64), mean, var, *counters, None)
    with pytest.raises(ValueError, match="var: expected a tensor with memory"):
        CPP.merge(CPP.moments(x, None, {}), mean, zero(4, dtype=torch.float64), *counters, None)
    # Through the module, in training (the fused kernel) and evaluation, the direct way or the general one.
    if not direct:
        _general_way(monkeypatch)
    module = protonorm.RunningMeanStd(shape=(4,), device="cpu", backend="cpp")
    module.record_moments(x)
    module.normalize(x)
    kept = [t.clone() for t in module.state_dict().values()]
    for training in (True, False):
        module.train(training)
        with pytest.raises(ValueError, match="x: expected a tensor with memory"):
            module.normalize(zero(8, 4))
        with pytest.raises(ValueError, match="x: expected a tensor with memory"):
            module.record_moments(zero(8, 4))
    for a, b in zip(module.state_dict().values(), kept):
        assert_same(a, b)


def test_bad_input_is_rejected_before_any_write():
    mean, var = stats(5)
    count, dropped = torch.tensor(3), torch.tensor(0)
    parts_good = CPP.moments(data(9, 5, torch.float32), None, {}).clone()
    before = [t.clone() for t in (mean, var, count, dropped)]
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        CPP.moments(torch.ones(4, 5, dtype=torch.int32), None, {})
    with pytest.raises(ValueError, match="^mask: expected"):
        CPP.moments(torch.ones(4, 5), torch.ones(3, dtype=torch.bool), {})
    with pytest.raises(ValueError, match="^mean: expected"):
        CPP.merge(parts_good, mean.float(), var, count, dropped, None)
    with pytest.raises(ValueError, match="^count: expected"):
        CPP.merge(parts_good, mean, var, count.int(), dropped, None)
    with pytest.raises(ValueError, match="^parts: expected"):
        CPP.merge(parts_good[:, :5], mean, var, count, dropped, None)
    with pytest.raises(ValueError, match="^out: expected"):
        CPP.normalize(torch.ones(4, 5), mean, var, 1e-5, None, False, True, torch.empty(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="^terminated: expected"):
        CPP.reward_moments(torch.ones(4, 1), torch.ones(3), torch.zeros(4, 1), 0.9, {})
    for a, t in zip((mean, var, count, dropped), before):
        assert_same(a, t)
    assert CPP.supports(torch.device("meta")) is not None
    assert CPP.supports(torch.device("cpu")) is None


# ------------------------------------------------------------------------------------------------ torch.library
def _op_samples():
    x = data(70, 5, torch.float32)
    mean, var = stats(5)
    k = parts_layout(70, 5)[0]
    parts = CPP.moments(x, None, {}).clone()
    stats_args = lambda: (mean.clone(), var.clone(), torch.tensor(3), torch.tensor(0))  # noqa: E731
    reward = torch.randn(70, 1)
    ops = torch.ops.protonorm
    return [
        (ops.cpp_moments.default, (x, None, torch.empty(k, 12, dtype=torch.float64))),
        (ops.cpp_moments.default, (x, torch.rand(70) < 0.5, torch.empty(k, 12, dtype=torch.float64))),
        (ops.cpp_merge.default, (parts, *stats_args(), None)),
        (ops.cpp_merge.default, (parts, *stats_args(), 0.9)),
        (ops.cpp_combine.default, (parts,)),
        (ops.cpp_normalize.default, (x, mean, var, 1e-5, 5.0, True, True, torch.empty(70, 5))),
        (ops.cpp_normalize.default, (x.double(), mean, var, 1e-5, None, False, False,
                                     torch.empty(70, 5, dtype=torch.float64))),
        (ops.cpp_normalize_moments.default, (x.half(), mean, var, 1e-5, 5.0, torch.empty(70, 5),
                                             torch.empty(k, 12, dtype=torch.float64))),
        (ops.cpp_reward_moments.default, (reward, torch.rand(70) < 0.2, torch.randn(70, 1), 0.99,
                                          torch.empty(k, 4, dtype=torch.float64))),
        (ops.cpp_reward_record.default, (reward, torch.rand(70) < 0.2, torch.randn(70, 1), 0.99,
                                         *(t[:1] for t in stats_args()[:2]), *stats_args()[2:], None)),
        (ops.cpp_reward_record.default, (reward, torch.rand(70) < 0.2, torch.randn(70, 1).double(), 0.99,
                                         *(t[:1] for t in stats_args()[:2]), *stats_args()[2:], 0.99)),
    ]


@pytest.mark.sanitize_once
@pytest.mark.parametrize("index", range(11))
def test_opcheck(index):
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)


@pytest.mark.sanitize_once
def test_torch_compile_fullgraph():
    ops = torch.ops.protonorm

    def step(x, mean, var, count, dropped):
        out = torch.empty(x.shape, dtype=torch.float32)
        parts = torch.empty((parts_layout(x.shape[0], x.shape[1])[0], 2 + 2 * x.shape[1]), dtype=torch.float64)
        ops.cpp_normalize_moments(x, mean, var, 1e-5, 5.0, out, parts)
        ops.cpp_merge(parts, mean, var, count, dropped, None)
        return out * 2, ops.cpp_combine(parts)

    compiled = torch.compile(step, fullgraph=True)
    x = data(100, 6, torch.float32)
    eager_state = [*stats(6), torch.tensor(1), torch.tensor(0)]
    compiled_state = [t.clone() for t in eager_state]
    y_eager, c_eager = step(x, *eager_state)
    y_compiled, c_compiled = compiled(x, *compiled_state)
    assert_same(y_eager, y_compiled)
    assert_same(c_eager, c_compiled)
    for a, b in zip(eager_state, compiled_state):
        assert_same(a, b)


# ------------------------------------------------------------------------------------------------ out of memory
# Each kernel allocates per-thread scratch of a few doubles per feature. Here a batch is so wide (2 x 2^23
# features) that, under an address-space limit set just above what the process holds, that scratch cannot be had
# on every thread: the kernel must raise MemoryError on the calling thread (an exception leaving an OpenMP region
# ends the process), before anything is written in place. A fresh process each, as the scratch, once grown, stays.
_OUT_OF_MEMORY = """
import resource, sys, torch
from protonorm import _C
from protonorm.backends.cpp_backend import _DTYPE_CODES
torch.set_num_threads(2)
kind = sys.argv[1]
MB = 1 << 20
rows, cols = 2, 1 << 23
f32, f64 = _DTYPE_CODES[torch.float32], _DTYPE_CODES[torch.float64]
warm, warm_parts = torch.randn(rows, 40000), torch.empty(rows, 80002, dtype=torch.float64)
# starts the OpenMP workers (and their heaps) before the limit
_C.moments(warm.data_ptr(), rows, 40000, 40000, f32, 0, 0, warm_parts.data_ptr(), rows, 1, 2)
x = torch.randn(rows, cols)
terminated = torch.tensor([False, True])
discounted = torch.full((rows, cols), 0.5)
parts = torch.empty(rows, 2 + 2 * cols, dtype=torch.float64)
out = torch.zeros(rows, cols)
mean32, std32 = torch.zeros(cols), torch.ones(cols)
stats = [torch.zeros(cols, dtype=torch.float64), torch.ones(cols, dtype=torch.float64),
         torch.tensor([5], dtype=torch.int64), torch.tensor([0], dtype=torch.int64)]
before = [discounted.clone()] + [t.clone() for t in stats]

def call():
    if kind == "moments":
        _C.moments(x.data_ptr(), rows, cols, cols, f32, 0, 0, parts.data_ptr(), rows, 1, 2)
    elif kind == "normalize_moments":
        _C.normalize_moments(x.data_ptr(), rows, cols, cols, f32, out.data_ptr(), cols, mean32.data_ptr(),
                             std32.data_ptr(), True, 5.0, parts.data_ptr(), rows, 1, 2)
    elif kind == "reward_moments":
        _C.reward_moments(x.data_ptr(), rows, cols, cols, f32, terminated.data_ptr(), 1, _DTYPE_CODES[torch.bool],
                          discounted.data_ptr(), cols, f32, 0.9, parts.data_ptr(), rows, 1, 2)
    else:
        _C.reward_record(x.data_ptr(), rows, cols, cols, f32, terminated.data_ptr(), 1, _DTYPE_CODES[torch.bool],
                         discounted.data_ptr(), cols, f32, 0.9, rows, 1, stats[0].data_ptr(), 1,
                         stats[1].data_ptr(), 1, stats[2].data_ptr(), stats[3].data_ptr(), False, 0.0, 2)

margin = 250 * MB  # room for one thread's row sums (3 doubles per feature: 192 MB), not for both
if kind == "reward_record":
    # The row sums are there already (grown by a first, unlimited call of the kernel alone, which moves the
    # discounted returns: the baseline is taken after it); the record's own buffers on the calling thread, the
    # parts (256 MB) and the merge tree (128 MB), then fit only in part: they must be had before the discounted
    # returns are touched.
    _C.reward_moments(x.data_ptr(), rows, cols, cols, f32, terminated.data_ptr(), 1, _DTYPE_CODES[torch.bool],
                      discounted.data_ptr(), cols, f32, 0.9, parts.data_ptr(), rows, 1, 2)
    before[0] = discounted.clone()
    margin = 256 * MB + 64 * MB
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + margin, resource.RLIM_INFINITY))
try:
    call()
except MemoryError:
    print("MemoryError")
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
after = [discounted] + stats
print("untouched" if all(torch.equal(a, b) for a, b in zip(before, after)) else "changed")
call()  # with memory to spare the same call runs
print("then ran")
"""


@pytest.mark.unsanitized  # the address-space limit leaves no room for the sanitizer's shadow memory
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="address-space limits and /proc are Linux's")
@pytest.mark.skipif(CPP is None or not _C.openmp(), reason="the extension was built without OpenMP")
@pytest.mark.parametrize("kind", ["moments", "normalize_moments", "reward_moments", "reward_record"])
def test_out_of_memory_raises_and_writes_nothing(kind):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY, kind], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.split() == ["MemoryError", "untouched", "then", "ran"], proc.stdout + proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ fallback
_MISSING = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "protonorm._C":
            raise ImportError("simulated: extension not built")
        return None
sys.meta_path.insert(0, Block())
"""

# An extension built from older sources, as an in-place build left behind by a later checkout: calling it would
# raise (or worse) in the middle of a run.
_STALE = """
import sys, types
stale = types.ModuleType("protonorm._C")
stale.INTERFACE_VERSION = 1
def _refuse(*args, **kwargs):
    raise AssertionError("a stale extension was called")
for name in ("moments", "normalize", "normalize_moments", "reward_moments", "reward_record", "merge", "combine",
             "float32_stats"):
    setattr(stale, name, _refuse)
sys.modules["protonorm._C"] = stale
"""


@pytest.mark.unsanitized
@pytest.mark.parametrize("simulation,phrase", [(_MISSING, "simulated: extension not built"),
                                               (_STALE, "built from other sources (interface 1")],
                         ids=["missing", "stale"])
def test_missing_or_stale_extension_falls_back_to_torch(simulation, phrase):
    script = simulation + textwrap.dedent(
        """
        import torch, protonorm
        from protonorm import backends
        backend, reason = backends.load("cpp")
        assert backend is None and reason and "\\n" not in reason, reason
        assert backends.available(torch.device("cpu"))["cpp"] == reason
        m = protonorm.RunningMeanStd(None, (3,), device="cpu")
        x = torch.randn(50, 3)
        y = m.normalize(x)
        m.record_moments(x)
        assert int(m.count) == 51 and y.shape == (50, 3)
        r = protonorm.RewardRunningMeanStd(None, (1,), gamma=0.9, device="cpu")
        r.record_reward(torch.randn(8), torch.zeros(8))
        r.record_reward(torch.randn(8), torch.ones(8))
        assert int(r.count) == 17
        mean, var, count = protonorm.combine_moments([torch.zeros(3), torch.ones(3)], [torch.ones(3)] * 2, [2, 2])
        assert int(count) == 4
        from protonorm.backends import cpp_backend
        assert cpp_backend._torch_sqrt_address() == 0  # nothing to hand a square root to
        try:
            protonorm.RunningMeanStd(None, (3,), device="cpu", backend="cpp").record_moments(x)
        except RuntimeError as exc:
            assert "not available" in str(exc)
        else:
            raise AssertionError("backend='cpp' without the extension must raise")
        print("REASON:", reason)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("PROTONORM_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert phrase in proc.stdout
    announcements = [line for line in proc.stderr.splitlines() if "C++ CPU extension unavailable" in line]
    assert len(announcements) == 1 and phrase in announcements[0], proc.stderr


# ------------------------------------------------------------------------------------------------ environment
# Loads the extension file alone (no torch: a fraction of a second) and says what its import made of the
# environment: the instruction set and the streaming threshold, or the import's error.
_LOAD_EXTENSION = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("protonorm._C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
try:
    spec.loader.exec_module(module)
except ImportError as exc:
    print("ImportError:", exc)
else:
    print(module.isa(), module.stream_threshold())
"""
_NEVER_STREAM = 2**63 - 1


def _extension_under(**settings) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PROTONORM_CPU_ISA", "PROTONORM_STREAM_STORES")}
    env.update(settings)
    proc = subprocess.run([sys.executable, "-c", _LOAD_EXTENSION, _C.__file__], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.sanitize_once
@pytest.mark.parametrize("value", ["baseline", "AVX2", " avx2\n", "\tAvx512 ", "", "  "])
def test_cpu_isa_variable_takes_any_case_and_white_space(value):
    wanted = value.strip().lower() or ISAS[-1]  # unset or empty: the widest the CPU runs
    if wanted not in ISAS:
        pytest.skip(f"this CPU does not run {wanted}")
    assert _extension_under(PROTONORM_CPU_ISA=value).split()[0] == wanted


@pytest.mark.sanitize_once
@pytest.mark.parametrize("value", ["bogus", "avx", "sse4", "avx2,avx512", "0"])
def test_unknown_cpu_isa_fails_the_import_naming_the_variable_and_the_choices(value):
    said = _extension_under(PROTONORM_CPU_ISA=value)
    assert said.startswith("ImportError: environment variable PROTONORM_CPU_ISA must name an instruction set"), said
    assert f"({', '.join(ISAS)}), got {value!r}" in said


def test_set_isa_lists_the_choices():
    with pytest.raises(ValueError, match=rf"'AVX2' is not one this CPU and build run \({', '.join(ISAS)}\)"):
        _C.set_isa("AVX2")


@pytest.mark.sanitize_once
@pytest.mark.parametrize("value", ["0", "false", "FALSE", " off ", "No"])
def test_stream_stores_off_in_any_usual_spelling(value):
    assert _extension_under(PROTONORM_STREAM_STORES=value).split()[1] == str(_NEVER_STREAM)


@pytest.mark.sanitize_once
@pytest.mark.parametrize("value", ["1", "true", "Yes", " ON", ""])
def test_stream_stores_on_in_any_usual_spelling(value):
    assert _extension_under(PROTONORM_STREAM_STORES=value) == _extension_under()


@pytest.mark.sanitize_once
@pytest.mark.parametrize("value", ["2", "disable", "0 0", "-1"])
def test_bad_stream_stores_fails_the_import_naming_the_variable(value):
    said = _extension_under(PROTONORM_STREAM_STORES=value)
    assert said == ("ImportError: environment variable PROTONORM_STREAM_STORES must be 1, true, yes, on (the "
                    f"default) or 0, false, no, off, got {value!r}"), said


@pytest.mark.sanitize_once
def test_bad_cpu_isa_is_announced_and_refused_by_name():
    """Through protonorm: ``auto`` says in its one line why the extension is missing; ``backend="cpp"`` raises
    saying it."""
    script = textwrap.dedent(
        """
        import torch, protonorm
        protonorm.RunningMeanStd(None, (3,), device="cpu").record_moments(torch.randn(5, 3))
        try:
            protonorm.RunningMeanStd(None, (3,), device="cpu", backend="cpp").record_moments(torch.randn(5, 3))
        except RuntimeError as exc:
            print(exc)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PROTONORM_CPU_ISA="AVX-2")
    env.pop("PROTONORM_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = "environment variable PROTONORM_CPU_ISA must name an instruction set"
    assert proc.stdout.startswith("backend 'cpp' is not available") and expected in proc.stdout, proc.stdout
    assert expected in proc.stderr and "CPU tensors use the torch path" in proc.stderr, proc.stderr
