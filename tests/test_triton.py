"""The Triton backend against the torch backend (the reference math), kernel by kernel and through the modules.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by
conftest before Triton is imported); with one, on CUDA tensors. Shapes stay small and the interpreter's
tiles large, so the file runs in well under a minute on two cores; the ``small_tiles`` fixture shrinks the
tiles to force the paths large shapes take on a GPU (several row splits, several column tiles with the
non-finite pre-pass, a multi-program merge with its ticket counter).

Tolerances. The moment kernels widen every input to float64 exactly and differ from the reference only in
summation order: 1e-12 relative. The merge of a single part and the fold into the running statistics use
the reference's float64 operations in its order: bit-exact, and 1e-13 relative with several parts. Normalize
performs the reference's operations in its dtypes, every one correctly rounded: bit-exact, for every dtype,
against the reference run with a correctly rounded float32 root (``conftest.expected_normalize``; torch's
vectorised CPU ``sqrt`` is not always correctly rounded, its CUDA one is).
"""
from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import protonorm
from protonorm import reference
from protonorm.backends import torch_backend
from protonorm.diagnostics import HostSyncCounter

from conftest import assert_same, expected_normalize
from hard_data import (EXTREME_BATCHES, LONG_STREAMS, OUTLIER_FIRST_BATCHES, TWO_PASS_OUTLIER_RTOL,
                       assert_constant_columns_exact,
                       assert_long_stream_accurate, assert_moments_exact, extreme_batch, outlier_first_batch)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BENCH = Path(__file__).resolve().parent.parent / "bench"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels need a CUDA device or TRITON_INTERPRET=1 set before import", allow_module_level=True)

from protonorm.backends import triton_backend  # noqa: E402

if triton_backend.UNAVAILABLE_REASON is not None:
    if torch.cuda.is_available():  # what these tests are for: they must not pass by skipping
        pytest.fail(f"CUDA is present but the Triton backend is not: {triton_backend.UNAVAILABLE_REASON}",
                    pytrace=False)
    pytest.skip(triton_backend.UNAVAILABLE_REASON, allow_module_level=True)

from protonorm.kernels import merge as merge_kernels  # noqa: E402
from protonorm.kernels import moments as moment_kernels  # noqa: E402
from protonorm.kernels import normalize as normalize_kernels  # noqa: E402

TB = triton_backend.BACKEND
RB = torch_backend.BACKEND
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MOMENT_RTOL = 1e-12

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 elements and 8 columns, interpreted or compiled, merges of 4 columns per interpreted program,
    and compiled moments split over as many programs as the device takes (not only batches of millions)."""
    for kernels in (moment_kernels, normalize_kernels):
        monkeypatch.setattr(kernels, "INTERPRET_TILE_ELEMENTS", 64)
        monkeypatch.setattr(kernels, "TILE_ELEMENTS", 64)
        monkeypatch.setattr(kernels, "MAX_BLOCK_D", 8)
    monkeypatch.setattr(moment_kernels, "MIN_ELEMENTS_PER_PROGRAM", 1)
    monkeypatch.setattr(merge_kernels, "INTERPRET_MAX_BLOCK_M", 4)


def batch(b, d, dtype=torch.float32, offset=10.0, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64) * scale + offset).to(dtype).to(DEVICE)


def stats(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    mean = (torch.randn(d, generator=g, dtype=torch.float64) * 2).to(DEVICE)
    var = (torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.01).to(DEVICE)
    return [mean, var, torch.tensor(5, device=DEVICE), torch.tensor(2, device=DEVICE)]


def assert_parts_close(parts, expected):
    got = TB.combine(parts)
    n, dropped, mean, m2 = reference.split_parts(got)
    en, edropped, emean, em2 = reference.split_parts(expected)
    assert torch.equal(n, en) and torch.equal(dropped, edropped)
    scale = emean.abs().max().clamp(min=1.0).item()
    torch.testing.assert_close(mean, emean, rtol=MOMENT_RTOL, atol=MOMENT_RTOL * scale)
    torch.testing.assert_close(m2, em2, rtol=MOMENT_RTOL, atol=MOMENT_RTOL * max(1.0, em2.abs().max().item()))


# ------------------------------------------------------------------------------------------ moments
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 7, 33, 1023])
@pytest.mark.parametrize("b", [1, 7, 1023])
def test_moments_match_reference(b, d, dtype):
    x = batch(b, d, dtype)
    assert_parts_close(TB.moments(x, None, {}), reference.batch_moments(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("b,d", [(1, 33), (7, 9), (301, 33), (64, 1)])
def test_moments_with_splits_and_column_tiles(small_tiles, b, d, dtype):
    x = batch(b, d, dtype)
    parts = TB.moments(x, None, {})
    row_blocks = -(-b // max(1, 64 // min(8, 1 << (d - 1).bit_length())))
    if moment_kernels.compiled_for(x.device):
        most = -(-moment_kernels.PROGRAMS_PER_SM * moment_kernels.sm_count(x.device) // -(-d // 8))
    else:
        most = moment_kernels.INTERPRET_SPLITS
    assert parts.shape[0] == min(most, row_blocks)
    assert_parts_close(parts, reference.batch_moments(x))


@pytest.mark.parametrize("tiles", ["large", "small"])
def test_nonfinite_rows_are_left_out_of_every_column_and_counted(request, tiles):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    x = batch(41, 33)
    x[2, 32] = float("nan")  # only the last column tile sees it
    x[5, 0] = float("inf")
    x[9, 17] = float("-inf")
    x[30, :] = float("nan")
    mask = torch.ones(41, dtype=torch.bool, device=DEVICE)
    mask[9] = False  # a masked non-finite row is ignored, not counted
    mask[11] = False
    for m in (None, mask):
        parts = TB.moments(x, m, {})
        expected = reference.batch_moments(x, m)
        assert_parts_close(parts, expected)
        assert TB.combine(parts)[0, reference.DROPPED_COL].item() == (4 if m is None else 3)
        assert torch.isfinite(parts).all()


@pytest.mark.parametrize("tiles", ["large", "small"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_constant_columns_keep_their_value_and_no_variance(request, tiles, dtype):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    assert_constant_columns_exact(lambda x: TB.moments(x, None, {}).clone(), TB.merge, dtype, DEVICE)


@pytest.mark.parametrize("tiles", ["large", "small"])
@pytest.mark.parametrize("name", EXTREME_BATCHES)
def test_moments_at_the_edges_of_each_dtype(request, tiles, name):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    x = extreme_batch(name, DEVICE)
    assert_moments_exact(TB.combine(TB.moments(x, None, {})), x)


@pytest.mark.parametrize("name", OUTLIER_FIRST_BATCHES)
def test_moments_of_a_batch_whose_first_row_is_an_outlier(small_tiles, name):
    x = outlier_first_batch(name, rows=301 if DEVICE == "cpu" else None, device=DEVICE)
    assert_moments_exact(TB.combine(TB.moments(x, None, {})), x, TWO_PASS_OUTLIER_RTOL)


@pytest.mark.parametrize("offset,spread,dtype", LONG_STREAMS[1:2])
def test_long_stream_of_small_records(offset, spread, dtype):
    """A short stream under the interpreter (the bounds in hard_data do not depend on its length)."""
    records = 40 if DEVICE == "cpu" else 20_000
    assert_long_stream_accurate(lambda x: TB.moments(x, None, {}), TB.merge, offset, spread, dtype, records, DEVICE)


def test_mask_rows_are_ignored():
    x = batch(1023, 7, seed=3)
    mask = torch.rand(1023, generator=torch.Generator().manual_seed(4)).to(DEVICE) < 0.3
    assert_parts_close(TB.moments(x, mask, {}), reference.batch_moments(x, mask))
    none = torch.zeros(1023, dtype=torch.bool, device=DEVICE)
    combined = TB.combine(TB.moments(x, none, {}))
    assert combined[0, reference.N_COL].item() == 0 and combined[0, reference.DROPPED_COL].item() == 0


def test_strided_rows_and_large_offsets(small_tiles):
    base = batch(300, 40, torch.float32, offset=1e6, scale=1e-1, seed=5)
    x = base[:, 3:36]  # row stride 40, unit column stride
    assert x.stride() == (40, 1)
    # Offset / spread = 1e7: the parts store absolute means (1 ulp = 1e-10 here), so merging several parts
    # costs ~1e-10 of the variance; far inside the 1e-7 (mean) / 1e-6 (var) bar against float64 truth.
    xs = x.double().cpu().numpy()
    n, dropped, mean, m2 = reference.split_parts(TB.combine(TB.moments(x, None, {})))
    assert n.item() == 300 and dropped.item() == 0
    np.testing.assert_allclose(mean[0].cpu().numpy(), xs.mean(0), rtol=1e-15)
    np.testing.assert_allclose((m2[0] / n[0]).cpu().numpy(), xs.var(0), rtol=1e-9)


def far_apart_rows(d, dtype=torch.float16):
    """Three ``[3, d]`` rows ``2^30 + 64`` elements apart, the last one past 2^31 elements: a row stride under 2^31 is
    passed as int32, so only 64-bit row offsets reach it. Views into 4 GiB (2-byte elements) of which only the rows'
    pages are ever touched; skipped where that much cannot be allocated."""
    stride = (1 << 30) + 64
    try:
        storage = torch.empty(2 * stride + d, dtype=dtype, device=DEVICE)
    except (RuntimeError, MemoryError):
        pytest.skip("needs 4 GiB of address space (of device memory on a GPU)")
    x = storage.as_strided((3, d), (stride, 1))
    x.copy_(batch(3, d, dtype, seed=11))
    x[2, d - 1] = 1000.0  # the row past 2^31 elements stands out in the moments
    return x


@pytest.mark.parametrize("kernel", ["moments", "normalize", "normalize_moments", "reward_moments"])
def test_row_offsets_past_2_31_elements_are_64_bit(kernel):
    """Every kernel computes row index times row stride in 64 bits (the GPU test of a 2^31-element batch needs tens of
    GB; this one reads three rows). 32-bit offsets wrap and read or write another place."""
    d = 5
    x = far_apart_rows(d)
    dense = x.clone()
    mean, var = stats(d)[:2]
    if kernel == "moments":
        assert_parts_close(TB.moments(x, None, {}), reference.batch_moments(dense))
    elif kernel == "reward_moments":
        done = torch.tensor([False, True, False], device=DEVICE)
        got, want = batch(3, d, seed=12), batch(3, d, seed=12)
        parts = TB.reward_moments(x, done, got, 0.99, {})
        expected = RB.reward_moments(dense, done, want, 0.99, {})
        assert_same(got, want)
        assert_parts_close(parts, expected)
    else:
        out = torch.empty(x.shape, device=DEVICE)
        if kernel == "normalize":
            TB.normalize(x, mean, var, 1e-5, None, False, True, out)
        else:
            assert_parts_close(TB.normalize_moments(x, mean, var, 1e-5, None, out, {}), reference.batch_moments(dense))
        assert_same(out, expected_normalize("triton", dense, mean, var, 1e-5, None))


def test_workspace_is_reused_across_calls():
    ws = {}
    first = TB.moments(batch(64, 5), None, ws)
    second = TB.moments(batch(64, 5, seed=1), None, ws)
    assert first.data_ptr() == second.data_ptr()


@pytest.mark.parametrize("wide", [2**31, 65535 * 2048 + 1])
def test_rows_too_wide_for_the_grid_or_32_bit_column_indices_are_refused(wide, monkeypatch):
    """Row offsets are 64-bit but column indices 32-bit, and normalize's column tiles are limited to 65535 (grid
    axis 1): a row of 2^31 features wrapped the indices, one of 65535 * 2048 + 1 overflowed the grid (meta tensors)."""
    x = torch.empty(1, wide, device="meta")
    stat = torch.empty(wide, dtype=torch.float64, device="meta")
    parts = torch.empty(1, reference.parts_width(wide), dtype=torch.float64, device="meta")
    counter = torch.empty((), dtype=torch.int64, device="meta")
    for build in (
        lambda: moment_kernels.tile_plan(1, wide, x.device),
        lambda: normalize_kernels.launch_args(x, stat, stat, 1e-5, None, False, True, x),
        lambda: merge_kernels.launch_args(parts, stat, stat, counter, counter, None, None),
    ):
        with pytest.raises(ValueError, match="features"):
            build()
    widest = x[:, : moment_kernels.MAX_FEATURES]
    monkeypatch.setattr(normalize_kernels, "compiled_for", lambda device: True)  # the grid on a GPU
    assert normalize_kernels.launch_args(widest, stat, stat, 1e-5, None, False, True, widest)[1][1] <= 65535


# ------------------------------------------------------------------------------------------ merge
def chunked_parts(x, k):
    return torch.cat([reference.batch_moments(c) for c in x.chunk(k)])


@pytest.mark.parametrize("tiles", ["large", "small"])
@pytest.mark.parametrize("ema", [None, 0.999])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_merge_matches_reference(request, tiles, ema, k):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    d = 33
    parts = chunked_parts(batch(40, d, torch.float64, offset=1e4), k)
    got, want = stats(d), stats(d)
    TB.merge(parts, *got, ema)
    RB.merge(parts, *want, ema)
    for g, w in zip(got, want):
        if k == 1:
            assert torch.equal(g, w)  # one part: the reference's operations in its order
        else:
            torch.testing.assert_close(g, w, rtol=1e-13, atol=0)
    torch.testing.assert_close(TB.combine(parts), reference.combine_parts(parts), rtol=1e-13, atol=1e-9)


def test_multi_program_merge_resets_its_ticket(small_tiles):
    d = 33
    count = torch.tensor(5, device=DEVICE)
    mean, var = stats(d)[:2]
    parts = chunked_parts(batch(40, d, torch.float64), 3)
    assert merge_kernels.needs_ticket(parts)
    for _ in range(3):
        TB.merge(parts, mean, var, count, torch.tensor(0, device=DEVICE), None)
        assert triton_backend._ticket_for(count).item() == 0
    assert count.item() == 5 + 3 * 40


def test_reward_rows_wider_than_a_tile_go_in_column_tiles(monkeypatch):
    """The reward kernel holds whole rows in one tile, which Triton refuses past 2^20 elements (and compiled registers
    give out long before): wider rows advance with torch's elementwise ops, bit for bit, and their moments are taken
    in column tiles (made 2^18 wide here, so that the interpreter covers 2^20 + 1 features in a few programs)."""
    monkeypatch.setattr(moment_kernels, "MAX_BLOCK_D", 1 << 18)
    d = (1 << 20) + 1
    reward = batch(2, d, torch.bfloat16, seed=2)
    terminated = torch.tensor([0.0, 1.0], device=DEVICE)
    got, want = batch(2, d), batch(2, d)
    parts = TB.reward_moments(reward, terminated, got, 0.99, {})
    expected = RB.reward_moments(reward, terminated, want, 0.99, {})
    assert_same(got, want)
    torch.testing.assert_close(reference.combine_parts(parts), reference.combine_parts(expected), rtol=MOMENT_RTOL,
                               atol=MOMENT_RTOL * 100)  # (means and m2 of the order of 10 and 100)


def test_merge_tickets_go_with_the_statistics_they_count_for(small_tiles):
    # Statistics made and dropped over a long run (modules rebuilt, moved, loaded with assign=True) must not leave a
    # ticket each behind; a ticket stays while its count's memory lives, whichever tensor object reaches it.
    d = 33
    mean, var = stats(d)[:2]
    parts = chunked_parts(batch(40, d, torch.float64), 3)
    kept = torch.tensor(5, device=DEVICE)
    TB.merge(parts, mean, var, kept.view(()), torch.tensor(0, device=DEVICE), None)  # through an alias, dropped
    ticket = triton_backend._ticket_for(kept)
    before = len(triton_backend._tickets)
    spacers = []  # hold each freed count's memory, so that the next count lives somewhere else
    for _ in range(12):
        count = torch.tensor(5, device=DEVICE)
        TB.merge(parts, mean, var, count, torch.tensor(0, device=DEVICE), None)
        assert count.item() == 45
        del count
        gc.collect()  # the interpreted launch leaves the count in a reference cycle: freed here, not at random
        spacers.append(torch.tensor(0, device=DEVICE))
    assert len(triton_backend._tickets) <= before + 1
    assert triton_backend._ticket_for(kept) is ticket


def test_merge_ticket_is_not_first_made_inside_cuda_graph_capture(small_tiles, monkeypatch):
    # A ticket zeroed by a captured memset holds garbage until the graph replays; refuse to make one there.
    d = 33
    count = torch.tensor(5, device=DEVICE)
    # The ticket of a freed count that lived at this address (still kept, a launch under the interpreter leaving its
    # arguments in a reference cycle) would serve this one, zero as it is: none here.
    triton_backend._tickets.pop((str(count.device), count.data_ptr()), None)
    mean, var = stats(d)[:2]
    parts = chunked_parts(batch(40, d, torch.float64), 3)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(RuntimeError, match="capturing a CUDA graph"):
        TB.merge(parts, mean, var, count, torch.tensor(0, device=DEVICE), None)
    monkeypatch.undo()
    assert count.item() == 5  # nothing merged
    key = (str(count.device), count.data_ptr())
    assert key not in triton_backend._tickets


@pytest.mark.parametrize("tiles", ["large", "small"])
@pytest.mark.parametrize("ema", [None, 0.9])
def test_batch_without_valid_rows_leaves_statistics_bit_exact(request, tiles, ema):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    x = batch(20, 33)
    x[:, 7] = float("nan")
    before = stats(33)
    after = [t.clone() for t in before]
    TB.merge(TB.moments(x, None, {}), *after, ema)
    for b, a in zip(before[:3], after[:3]):
        assert torch.equal(a, b)
    assert after[3].item() == before[3].item() + 20
    masked = torch.zeros(20, dtype=torch.bool, device=DEVICE)
    TB.merge(TB.moments(batch(20, 33), masked, {}), *after, ema)
    for b, a in zip(before[:3], after[:3]):
        assert torch.equal(a, b)
    assert after[3].item() == before[3].item() + 20


# ------------------------------------------------------------------------------------------ normalize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,d", [(37, 1), (1, 7), (37, 33), (7, 1023), (4097, 1)])
@pytest.mark.parametrize("clamp", [None, 0.7, 0.3])  # (a half tensor is clamped to the bound rounded down, up)
def test_normalize_matches_reference(dtype, b, d, clamp):
    x = batch(b, d, dtype, offset=0.5, scale=3.0)
    x[b // 2, 0] = float("nan")
    if b > 1:
        x[b - 1, d - 1] = -0.0
    mean, var = stats(d)[:2]
    for un_norm in (False, True):
        for center in (False, True):
            out = torch.empty(x.shape, dtype=torch.promote_types(dtype, torch.float32), device=DEVICE)
            TB.normalize(x, mean, var, 1e-5, clamp, un_norm, center, out)
            assert_same(out, expected_normalize("triton", x, mean, var, 1e-5, clamp, un_norm, center))


def test_normalize_with_column_tiles_and_strided_rows(small_tiles):
    x = batch(50, 40)[:, 2:35]
    mean, var = stats(33)[:2]
    out = torch.empty(x.shape, device=DEVICE)
    TB.normalize(x, mean, var, 1e-5, 2.0, False, True, out)
    assert_same(out, expected_normalize("triton", x, mean, var, 1e-5, 2.0))


@pytest.mark.parametrize("tiles", ["large", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_normalize_moments_equals_separate_calls(request, tiles, dtype):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    x = batch(97, 33, dtype)
    x[4, 20] = float("inf")
    mean, var = stats(33)[:2]
    out = torch.empty(x.shape, dtype=torch.promote_types(dtype, torch.float32), device=DEVICE)
    parts = TB.normalize_moments(x, mean, var, 1e-5, 5.0, out, {})
    separate = torch.empty_like(out)
    TB.normalize(x, mean, var, 1e-5, 5.0, False, True, separate)
    assert_same(out, separate)
    assert_parts_close(parts, reference.batch_moments(x))


@pytest.mark.parametrize("layout", ["x_rows_apart", "out_rows_apart"])
def test_normalize_moments_reads_and_writes_rows_each_with_its_own_stride(small_tiles, layout):
    """A batch that is a slice of wider rows, normalized into a contiguous output, and the other way round."""
    x = batch(50, 40)[:, 2:35] if layout == "x_rows_apart" else batch(50, 33)
    mean, var = stats(33)[:2]
    out = torch.full((50, 40), float("nan"), device=DEVICE)[:, 3:36] if layout == "out_rows_apart" else torch.empty(
        50, 33, device=DEVICE)
    assert x.stride(0) != out.stride(0)
    parts = TB.normalize_moments(x, mean, var, 1e-5, 2.0, out, {})
    assert_same(out, expected_normalize("triton", x, mean, var, 1e-5, 2.0))
    assert_parts_close(parts, reference.batch_moments(x))


# ------------------------------------------------------------------------------------------ reward
@pytest.mark.parametrize("reward_dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("returns_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("terminated_dtype", [torch.bool, torch.int64, torch.float32], ids=str)
@pytest.mark.parametrize("b,d", [(1, 1), (1023, 1), (7, 3)])
def test_reward_moments_match_reference(b, d, reward_dtype, returns_dtype, terminated_dtype):
    """The returns are float32 or float64 whatever the reward's dtype (a module's returns keep the dtype of its first
    reward): float32 returns with float64 rewards are summed in float64 and rounded once, as torch does."""
    g = torch.Generator().manual_seed(7)
    got = (torch.randn(b, d, generator=g, dtype=torch.float64) * 2).to(returns_dtype).to(DEVICE)
    want = got.clone()
    for step in range(2):
        reward = torch.randn(b, d, generator=g, dtype=torch.float64).to(reward_dtype).to(DEVICE)
        if step == 1 and b > 1:
            reward[b // 2, 0] = float("nan")  # that environment's return is dropped until it resets
        terminated = (torch.rand(b, generator=g) < 0.3).to(terminated_dtype).to(DEVICE)
        if step == 0 and b > 1:
            reward[1], terminated[1] = -0.0, 1  # restarts at 0.0 + -0.0 = +0.0, not at the reward's -0.0
        parts = TB.reward_moments(reward, terminated, got, 0.99, {})
        expected = RB.reward_moments(reward, terminated, want, 0.99, {})
        assert_same(got, want)
        assert_parts_close(parts, expected)


# ------------------------------------------------------------------------------------------ modules
def module_pair(shape, **kwargs):
    return (
        protonorm.RunningMeanStd(None, shape, device=DEVICE, backend="triton", **kwargs),
        protonorm.RunningMeanStd(None, shape, device=DEVICE, backend="torch", **kwargs),
    )


def assert_same_statistics(a, b, rtol=1e-12):
    torch.testing.assert_close(a.mean, b.mean, rtol=rtol, atol=rtol)
    torch.testing.assert_close(a.var, b.var, rtol=rtol, atol=rtol)
    assert torch.equal(a.count, b.count) and torch.equal(a.nonfinite_rows, b.nonfinite_rows)


@pytest.mark.parametrize("ema", [None, 0.99])
def test_module_with_3d_features_matches_torch_backend(ema):
    m, ref = module_pair((3, 5, 7), ema_decay=ema, clamp_value=3.0)
    for step, b in enumerate((1, 7, 64)):
        x = batch(b, 105, seed=step).reshape(b, 3, 5, 7)
        if b == 64:
            x[10, 2, 4, 6] = float("nan")
        # The modules' statistics differ in their last bits: each output is checked with its module's own.
        assert_same(m.normalize(x), expected_normalize("triton", x, m.mean, m.var, m.epsilon, 3.0))
        m.record_moments(x)
        ref.record_moments(x)
        assert_same_statistics(m, ref)
    m.eval(), ref.eval()
    y = batch(9, 105, seed=9).reshape(9, 3, 5, 7)
    assert_same(m.normalize(y, un_norm=True), expected_normalize("triton", y, m.mean, m.var, m.epsilon, 3.0, True))


def test_module_record_with_mask():
    m, ref = module_pair((33,))
    x = batch(200, 33)
    mask = torch.arange(200, device=DEVICE) % 3 == 0
    m.record_moments(x, mask)
    ref.record_moments(x, mask)
    assert_same_statistics(m, ref)


def test_normalize_then_record_reuses_moments_and_notices_in_place_changes():
    fused, separate = module_pair((33,)), module_pair((33,))
    x = batch(64, 33)
    out = fused[0].normalize(x)
    assert fused[0]._stash.moments is not None
    fused[0].record_moments(x)
    separate[0].record_moments(x)
    assert_same_statistics(fused[0], separate[0], rtol=0)
    assert_same(out, expected_normalize("triton", x, fused[1].mean, fused[1].var, fused[1].epsilon, None))
    # An in-place change between normalize and record must be seen by record.
    y = batch(64, 33, seed=2)
    fused[0].normalize(y)
    y.mul_(3.0)
    fused[0].record_moments(y)
    separate[0].record_moments(y)
    assert_same_statistics(fused[0], separate[0], rtol=0)


def test_reward_module_matches_torch_backend():
    m = protonorm.RewardRunningMeanStd(None, (1,), 0.99, clamp_value=5.0, device=DEVICE, backend="triton")
    ref = protonorm.RewardRunningMeanStd(None, (1,), 0.99, clamp_value=5.0, device=DEVICE, backend="torch")
    g = torch.Generator().manual_seed(11)
    for _ in range(4):
        reward = torch.randn(1024, generator=g).to(DEVICE)
        terminated = (torch.rand(1024, generator=g) < 0.05).to(DEVICE)
        m.record_reward(reward, terminated)
        ref.record_reward(reward, terminated)
        assert torch.equal(m.discounted_reward, ref.discounted_reward)
        assert_same_statistics(m, ref)
    buf = torch.randn(16, 1024, 1, generator=g).to(DEVICE)
    for un_norm in (False, True):  # scale only: no mean shift either way
        want = expected_normalize("triton", buf, m.mean, m.var, m.epsilon, 5.0, un_norm, center=False)
        assert_same(m.normalize(buf, un_norm=un_norm), want)


def test_hot_calls_make_no_host_sync():
    m = protonorm.RunningMeanStd(None, (33,), device=DEVICE, backend="triton", clamp_value=5.0, ema_decay=0.999)
    r = protonorm.RewardRunningMeanStd(None, (1,), 0.99, device=DEVICE, backend="triton")
    x = batch(64, 33)
    reward = torch.randn(256).to(DEVICE)
    done = torch.zeros(256, dtype=torch.bool, device=DEVICE)
    r.record_reward(reward, done)
    with HostSyncCounter(strict=True) as probe:
        m.normalize(x)
        m.record_moments(x)
        m.record_moments(x, torch.ones(64, dtype=torch.bool, device=DEVICE))
        m.eval()
        m.normalize(x)
        r.record_reward(reward, done)
        r.normalize(reward)
    assert probe.count == 0


def test_launches_per_entry_point(monkeypatch):
    """record: 2, normalize: 1, normalize then record: 2, reward record: 2 (counted at the Triton launch,
    ``kernel[grid](...)``: Triton 3.0's interpreter launches there without going through ``kernel.run``)."""
    launches = []
    kernels = (
        moment_kernels._moments_kernel,
        moment_kernels._moments_kernel_16bit,
        merge_kernels._merge_kernel,
        normalize_kernels._normalize_kernel,
        triton_backend._normalize_moments._normalize_moments_kernel,
        triton_backend._normalize_moments._normalize_moments_kernel_16bit,
        triton_backend._reward._reward_moments_kernel,
    )
    for kernel_type in {type(kernel) for kernel in kernels}:
        def launcher(kernel, grid, _original=kernel_type.__getitem__):
            launch = _original(kernel, grid)
            return lambda *a, **k: (launches.append(1) if kernel in kernels else None, launch(*a, **k))[1]

        monkeypatch.setattr(kernel_type, "__getitem__", launcher)
    m = protonorm.RunningMeanStd(None, (33,), device=DEVICE, backend="triton")
    r = protonorm.RewardRunningMeanStd(None, (1,), 0.99, device=DEVICE, backend="triton")
    x = batch(64, 33)
    reward, done = torch.randn(128).to(DEVICE), torch.zeros(128, device=DEVICE)
    r.record_reward(reward, done)

    def count(fn):
        launches.clear()
        fn()
        return len(launches)

    assert count(lambda: m.record_moments(x)) == 2
    assert count(lambda: m.normalize(x)) == 1
    assert count(lambda: m.record_moments(x)) == 1  # the stash from the normalize above: merge only
    assert count(lambda: r.record_reward(reward, done)) == 2
    m.eval()
    assert count(lambda: m.normalize(x)) == 1


# ------------------------------------------------------------------------------------------ direct way
@pytest.mark.parametrize("ema", [None, 0.9])
@pytest.mark.parametrize("shape,step_shape", [((1,), (96,)), ((3,), (96, 3))], ids=["envs", "envsx3"])
def test_direct_reward_record_matches_the_general_way(shape, step_shape, ema, monkeypatch):
    """The reward record offered to try_reward_record (from the second step on) gives the general way's bits."""
    g = torch.Generator().manual_seed(8)
    steps = []
    for i in range(5):
        reward = torch.randn(step_shape, generator=g)
        if i == 1:
            reward.view(96, -1)[4, 0] = float("nan")
        steps.append((reward.to(DEVICE), (torch.rand(96, generator=g) < 0.2).to(DEVICE)))
    taken = []
    original = TB.try_reward_record
    monkeypatch.setattr(TB, "try_reward_record", lambda *a: taken.append(original(*a)) or taken[-1])

    def run(direct):
        r = protonorm.RewardRunningMeanStd(None, shape, 0.99, device=DEVICE, backend="triton", ema_decay=ema)
        for reward, done in steps:
            (r.record_reward if direct else r._record_reward)(reward, done)
        return r

    direct, general = run(True), run(False)
    assert taken == [True] * (len(steps) - 1)
    for a, b in ((direct.discounted_reward, general.discounted_reward), (direct.mean, general.mean),
                 (direct.var, general.var), (direct.count, general.count),
                 (direct.nonfinite_rows, general.nonfinite_rows)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
    assert int(direct.nonfinite_rows) >= 1


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "general"])
@pytest.mark.parametrize("width,shift", [(1, -1), (1, 2), (1, 0), (3, -3), (3, -1), (3, 4), (3, 0)])
def test_reward_sharing_memory_with_the_returns_is_read_as_it_was(width, shift, direct, small_tiles):
    """A reward whose memory overlaps the discounted returns it advances (``shift`` elements from them in one
    buffer; 0: the returns themselves) is the reward as it was before the step, as for upstream's out-of-place
    arithmetic: the kernel's programs, each advancing its rows, must not read rows another one has already
    advanced (small tiles: several programs). Compared bit for bit with the same step given a copy of the
    reward."""
    envs = 150
    g = torch.Generator().manual_seed(width + shift)
    first = torch.randn((envs,) if width == 1 else (envs, width), generator=g).to(DEVICE)
    terminated = (torch.rand(envs, generator=g) < 0.2).to(DEVICE)
    buffer = torch.randn(envs * width + 8, generator=g).to(DEVICE)
    start = 4  # room for shifts either way
    returns = buffer[start:start + envs * width].view(first.shape)
    reward = buffer[start + shift:start + shift + envs * width].view(first.shape)
    modules = [protonorm.RewardRunningMeanStd(None, (width,), gamma=0.9, device=DEVICE, backend="triton")
               for _ in range(2)]
    for m in modules:
        m.record_reward(first, terminated)
    modules[0].discounted_reward = returns.clone()
    modules[1].discounted_reward = returns.copy_(modules[0].discounted_reward)
    expected_reward = reward.clone()
    for m, r in ((modules[0], expected_reward), (modules[1], reward)):
        (m.record_reward if direct else m._record_reward)(r, ~terminated)
    for a, b in zip(modules[1].state_dict().values(), modules[0].state_dict().values()):
        assert_same(a, b)
    assert_same(modules[1].discounted_reward, modules[0].discounted_reward)


def test_direct_calls_decline_what_they_do_not_take():
    d = 5
    x = batch(20, d)
    mean, var, count, dropped = stats(d)
    out = torch.full((20, d), 7.0, device=DEVICE)
    kept = [t.clone() for t in (out, mean, var, count, dropped)]
    bad_normalize = [
        dict(x=x.double()),  # out would need float64
        dict(x=batch(d, 20).t()),  # strided columns: the general way copies
        dict(x=x.int()),
        dict(x=x[:0], out=out[:0]),
        dict(mean=mean.float()),
        dict(var=var[:4]),
        dict(out=out.double()),
        dict(out=torch.full((d, 20), 7.0, device=DEVICE).t()),
    ]
    for change in bad_normalize:
        args = {**dict(x=x, mean=mean, var=var, epsilon=1e-5, clamp_value=5.0, out=out), **change}
        assert TB.try_normalize_moments(**args, workspace={}) is None, change
        assert TB.try_normalize(**args) is False, change
    parts = chunked_parts(batch(30, d, torch.float64), 3)
    bad_merge = [dict(parts=parts.float()), dict(parts=parts[:0]), dict(parts=parts[:, :-2]), dict(count=count.int()),
                 dict(dropped=dropped.view(1)), dict(mean=mean[:4])]
    for change in bad_merge:
        args = {**dict(parts=parts, mean=mean, var=var, count=count, dropped=dropped, ema_decay=None), **change}
        assert TB.try_merge(**args) is False, change
    reward, done = torch.randn(20, 1).to(DEVICE), torch.zeros(20, dtype=torch.bool, device=DEVICE)
    disc = torch.ones(20, 1, device=DEVICE)
    one = [t[:1].clone() for t in (mean, var)]
    bad_reward = [dict(discounted=disc.half()), dict(discounted=disc[:19]), dict(terminated=done[:19]),
                  dict(terminated=done.view(20, 1)), dict(reward=reward.view(20, 1, 1)), dict(mean=mean)]
    for change in bad_reward:
        args = {**dict(reward=reward, terminated=done, discounted=disc, gamma=0.9, mean=one[0], var=one[1],
                       count=count, dropped=dropped, ema_decay=None, workspace={}), **change}
        assert TB.try_reward_record(**args) is False, change
    for a, b in zip((out, mean, var, count, dropped, disc), kept + [torch.ones(20, 1, device=DEVICE)]):
        assert torch.equal(a, b)
    with HostSyncCounter():  # under any dispatch mode the ops must see every call
        assert TB.try_normalize(x, mean, var, 1e-5, 5.0, out) is False
    assert TB.try_normalize(x, mean, var, 1e-5, 5.0, out) is True
    assert_same(out, expected_normalize("triton", x, mean, var, 1e-5, 5.0))


# ------------------------------------------------------------------------------------------ custom ops
def test_custom_ops_pass_opcheck():
    d = 7
    x = batch(23, d)
    mask = torch.arange(23, device=DEVICE) % 2 == 0
    parts = torch.empty(1, reference.parts_width(d), dtype=torch.float64, device=DEVICE)
    ops = torch.ops.protonorm
    torch.library.opcheck(ops.triton_moments, (x, mask, parts))
    torch.library.opcheck(ops.triton_moments, (x, None, parts))
    full = chunked_parts(batch(30, d, torch.float64), 3)
    torch.library.opcheck(ops.triton_merge, (full, *stats(d), None))
    torch.library.opcheck(ops.triton_merge, (full, *stats(d), 0.99))
    torch.library.opcheck(ops.triton_combine, (full,))
    out = torch.empty(23, d, device=DEVICE)
    torch.library.opcheck(ops.triton_normalize, (x, *stats(d)[:2], 1e-5, 5.0, False, True, out))
    torch.library.opcheck(ops.triton_normalize_moments, (x, *stats(d)[:2], 1e-5, None, out, parts))
    disc = torch.randn(23, 1).to(DEVICE)
    rparts = torch.empty(1, 4, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(
        ops.triton_reward_moments, (torch.randn(23, 1).to(DEVICE), mask, disc, 0.99, rparts)
    )


class _PassThrough(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that changes nothing: with one active, the backend must go through its ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_dispatcher_with_the_same_results(monkeypatch):
    """In eager mode the backend calls each op's body directly; through the op (as under a dispatch mode) the
    results are the same bits. Every entry point, both ways."""
    through = []

    class Counted:
        """The op, counting the backend's calls of it (everything else goes to the op itself)."""

        def __init__(self, op):
            self.op = op

        def __call__(self, *args):
            through.append(self.op)
            return self.op(*args)

        def __getattr__(self, name):
            return getattr(self.op, name)

    for name in ("triton_moments", "triton_merge", "triton_combine", "triton_normalize", "triton_normalize_moments",
                 "triton_reward_moments"):
        monkeypatch.setattr(torch.ops.protonorm, name, Counted(getattr(torch.ops.protonorm, name)))
    d = 9
    x = batch(50, d)
    x[7, 3] = float("nan")
    mask = torch.arange(50, device=DEVICE) % 3 != 0
    reward, done = torch.randn(40, 1).to(DEVICE), torch.arange(40, device=DEVICE) % 7 == 0

    def every_entry_point():
        mean, var, count, dropped = stats(d)
        results = [TB.moments(x, mask, {}).clone()]
        TB.merge(results[0], mean, var, count, dropped, None)
        results += [TB.combine(chunked_parts(batch(30, d, torch.float64), 3))]
        out = torch.empty(50, d, device=DEVICE)
        TB.normalize(x, mean, var, 1e-5, 5.0, False, True, out)
        results.append(out.clone())
        results.append(TB.normalize_moments(x, mean, var, 1e-5, None, out, {}).clone())
        results.append(out.clone())
        disc = torch.ones(40, 1, device=DEVICE)
        results.append(TB.reward_moments(reward, done, disc, 0.9, {}).clone())
        return results + [mean, var, count, dropped, disc]

    direct = every_entry_point()
    assert through == []
    with _PassThrough():
        through_ops = every_entry_point()
    assert len(through) == 6
    for a, b in zip(direct, through_ops):
        assert a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


def test_torch_compile_fullgraph_traces_through_the_ops():
    d = 7
    x = batch(40, d)

    def step(x, mean, var, count, dropped, ws_parts, out):
        torch.ops.protonorm.triton_normalize_moments(x, mean, var, 1e-5, 5.0, out, ws_parts)
        torch.ops.protonorm.triton_merge(ws_parts, mean, var, count, dropped, None)
        return out * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = stats(d), stats(d)
    parts_a = torch.empty(1, reference.parts_width(d), dtype=torch.float64, device=DEVICE)
    parts_b = parts_a.clone()
    out_a, out_b = torch.empty(40, d, device=DEVICE), torch.empty(40, d, device=DEVICE)
    ya = compiled(x, *got, parts_a, out_a)
    yb = step(x, *want, parts_b, out_b)
    assert torch.equal(ya, yb)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ------------------------------------------------------------------------------------------ misc
@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.0.0", "2.4.6", True), ("3.1.0", "2.0.0rc1", True), ("3.1.0+git1a2b", "2.2.6", True),
    ("3.2.0", "2.4.6", False), ("3.9.0", "2.4.6", False), ("3.0.0", "1.26.4", False), ("unknown", "2.0", False),
])
def test_an_interpreter_that_would_write_nothing_is_refused(monkeypatch, triton_version, numpy_version, refused):
    """Triton 3.0 and 3.1 (torch 2.4 and 2.5 pin them) interpret nothing beside numpy 2: every load and store is a
    no-op, so records left the statistics as they were and outputs unwritten, without an error. The backend then
    says why it cannot run, and only under the interpreter."""
    problem = triton_backend.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == refused
    if not refused:
        return
    assert f"Triton {triton_version}" in problem and f"numpy {numpy_version}" in problem and "numpy<2" in problem
    monkeypatch.setattr(triton_backend, "INTERPRETER_PROBLEM", problem)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for device in ("cpu", "cuda"):
        assert TB.supports(torch.device(device)) == problem
    m = protonorm.RunningMeanStd(None, (3,), device="cpu", backend="triton")
    with pytest.raises(ValueError, match=re.escape(problem)):
        m.record_moments(batch(4, 3).cpu())
    assert int(m.count) == 1
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in TB.supports(torch.device("cpu"))


def test_supports_and_bad_input(monkeypatch):
    assert TB.supports(torch.device(DEVICE)) is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in TB.supports(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="2-D"):
        TB.moments(batch(4, 3).reshape(2, 2, 3), None, {})
    with pytest.raises(ValueError, match="^mask: expected"):
        TB.moments(batch(4, 3), torch.ones(5, dtype=torch.bool, device=DEVICE), {})
    with pytest.raises(ValueError, match="^out: expected"):
        TB.normalize(batch(4, 3), *stats(3)[:2], 1e-5, None, False, True, torch.empty(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="^parts: expected"):
        TB.merge(torch.zeros(1, 5, dtype=torch.float64, device=DEVICE), *stats(3), None)


def test_fused_output_must_not_share_the_batch_memory():
    x = batch(8, 4)
    mean, var, _, _ = stats(4)
    with pytest.raises(ValueError, match="shares no memory with x"):
        TB.normalize_moments(x, mean, var, 1e-5, 2.0, x, {})


def test_plain_output_is_the_batch_itself_or_apart_from_it():
    """A plain normalize may write over its input, but not over part of it: programs running side by side would
    write rows that others have still to read."""
    mean, var, _, _ = stats(4)
    rows = batch(10, 4).reshape(-1)
    for shifted in (rows[4:36].view(8, 4), rows.as_strided((8, 4), (4, 1), 1), rows.as_strided((8, 4), (5, 1))):
        before = rows.clone()  # a row on, an element on, or the same start with rows further apart
        with pytest.raises(ValueError, match="^out: expected x itself or memory apart from x's"):
            TB.normalize(rows[:32].view(8, 4), mean, var, 1e-5, 2.0, False, True, shifted)
        assert torch.equal(rows, before)
    x = batch(8, 4)
    want = torch.empty_like(x)
    TB.normalize(x, mean, var, 1e-5, 2.0, False, True, want)
    TB.normalize(x, mean, var, 1e-5, 2.0, False, True, x)
    assert torch.equal(x, want)


def test_written_tensors_whose_elements_share_memory_are_refused():
    """An output or discounted returns whose rows share memory (a stride-0 expand) would have several programs write
    one place, the last write winning: refused, saying what was expected, before anything is written (torch and the
    C++ backend refuse them too). (The module replaces such assigned returns by a copy first, as upstream evolves
    them: tests/test_upstream.py.)"""
    x = batch(8, 4)
    mean, var, _, _ = stats(4)
    shared = torch.zeros(1, 4, device=DEVICE).expand(8, 4)
    for call in (lambda: TB.normalize(x, mean, var, 1e-5, None, False, True, shared),
                 lambda: TB.normalize_moments(x, mean, var, 1e-5, None, shared, {})):
        with pytest.raises(ValueError, match=r"^out: expected elements that do not share memory.*\(8, 4\).*\(0, 1\)"):
            call()
        assert not shared.any()
    reward, done = batch(8, 1), torch.zeros(8, dtype=torch.bool, device=DEVICE)
    returns = torch.zeros(1, 1, device=DEVICE).expand(8, 1)
    with pytest.raises(ValueError, match="^discounted: expected elements that do not share memory"):
        TB.reward_moments(reward, done, returns, 0.9, {})
    assert not returns.any()


def test_inputs_without_memory_are_refused():
    """torch's ZeroTensor (what some autograd formulas return) passes every shape, dtype and stride check but has a
    null data pointer, which a compiled kernel would read: an illegal address, after which the CUDA context is lost.
    A batch, mask, reward or reset flags without memory is refused, saying so, with nothing written; through the
    module's direct calls as well."""
    zero = torch._efficientzerotensor
    x = batch(8, 4)
    mean, var, _, _ = stats(4)
    out = torch.zeros(8, 4, device=DEVICE)
    no_memory = "expected a tensor with memory, got a null data pointer"
    flags, returns = torch.zeros(8, dtype=torch.bool, device=DEVICE), torch.ones(8, 4, device=DEVICE)
    for what, call in (
        ("moments", lambda: TB.moments(zero(8, 4, device=DEVICE), None, {})),
        ("mask", lambda: TB.moments(x, zero(8, dtype=torch.bool, device=DEVICE), {})),
        ("normalize", lambda: TB.normalize(zero(8, 4, device=DEVICE), mean, var, 1e-5, None, False, True, out)),
        ("normalize", lambda: TB.normalize_moments(zero(8, 4, device=DEVICE), mean, var, 1e-5, None, out, {})),
        ("record_reward", lambda: TB.reward_moments(zero(8, 4, device=DEVICE), flags, returns, 0.9, {})),
        ("terminated", lambda: TB.reward_moments(x, zero(8, device=DEVICE), returns, 0.9, {})),
    ):
        with pytest.raises(ValueError, match=f"^{what}: {no_memory}"):
            call()
    assert not out.any() and torch.equal(returns, torch.ones(8, 4, device=DEVICE))
    m = protonorm.RunningMeanStd(None, (4,), device=DEVICE, backend="triton")
    r = protonorm.RewardRunningMeanStd(None, (1,), 0.9, device=DEVICE, backend="triton")
    m.record_moments(x)
    m.normalize(x)
    r.record_reward(x[:, 0], flags)
    before = [t.clone() for t in (m.mean, m.var, m.count, r.mean, r.var, r.count, r.discounted_reward)]
    for call in (lambda: m.normalize(zero(8, 4, device=DEVICE)), lambda: m.record_moments(zero(8, 4, device=DEVICE)),
                 lambda: r.record_reward(zero(8, device=DEVICE), flags),
                 lambda: r.record_reward(x[:, 0], zero(8, device=DEVICE))):
        with pytest.raises(ValueError, match=no_memory):
            call()
    for a, b in zip((m.mean, m.var, m.count, r.mean, r.var, r.count, r.discounted_reward), before):
        assert torch.equal(a, b)


def test_returns_the_kernel_cannot_update_in_place_are_refused():
    """Discounted returns as a lazily negated view (whose memory holds the values unnegated, which the kernel would
    read and overwrite as they are) or a ZeroTensor (no memory to write) are refused, saying so, with nothing
    written; the direct way declines them."""
    reward, flags = batch(8, 1), torch.zeros(8, dtype=torch.bool, device=DEVICE)
    mean, var, count, dropped = stats(1)
    negated = torch.ones(8, 1, device=DEVICE)._neg_view()
    for returns, message in ((negated, "^discounted: expected a tensor holding its values, got a lazily negated view"),
                             (torch._efficientzerotensor(8, 1, device=DEVICE),
                              "^discounted: expected a tensor with memory, got a null data pointer")):
        kept = [t.clone() for t in (returns, mean, var, count, dropped)]
        with pytest.raises(ValueError, match=message):
            TB.reward_moments(reward, flags, returns, 0.9, {})
        assert not TB.try_reward_record(reward, flags, returns, 0.9, mean, var, count, dropped, None, {})
        assert not TB.try_reward_record(reward[:, 0], flags, returns[:, 0], 0.9, mean, var, count, dropped, None, {})
        for a, b in zip((returns, mean, var, count, dropped), kept):
            assert torch.equal(a, b)
    assert torch.equal(negated.resolve_neg(), torch.full((8, 1), -1.0, device=DEVICE))


COMPILE_CHECK = textwrap.dedent(
    """
    import torch
    from triton_sass import compile_kernel, resources
    from protonorm.kernels import merge, moments, normalize, normalize_moments, reward

    for mod in (moments, merge, normalize):
        mod.compiled_for = lambda device: True
    for mod in (moments, merge):
        mod.sm_count = lambda device: 132

    def check(kernel, grid, args, meta, max_registers=None):
        # Specialized as a launch would be (16-byte aligned pointers and sizes divisible by 16 are what let Triton
        # vectorize, and vectorized layouts need the most registers).
        compiled, report, key = compile_kernel(kernel, args, meta, 90)
        # No contraction anywhere: a fused multiply-add rounds differently from the reference's two roundings,
        # and from the same helpers compiled without it (moments and normalize_moments must give equal parts).
        assert "fma." not in compiled.asm["ptx"], f"{kernel.__name__} contracts multiply-adds into FMA"
        regs, spilled = resources(report)
        if regs < 0 or spilled < 0:
            assert key in built, f"{kernel.__name__} {meta}: no ptxas report: {report[-500:]}"
            return  # built earlier in this run, so taken from the cache
        built.add(key)
        assert spilled == 0, f"{kernel.__name__} {meta}: ptxas spills {spilled} bytes"
        if max_registers is not None:
            assert regs <= max_registers, f"{kernel.__name__} {meta}: {regs} registers"

    built = set()
    e = torch.empty
    f64 = torch.float64
    # At observation sizes, two 8-warp programs per SM (moments.PROGRAMS_PER_SM) must fit its 64K registers: 128 each.
    # float64 rows both in one column tile and in several (whose non-finite pre-pass sums float64 probes); narrow
    # 16-bit rows (64 rows of 8 columns per tile on one warp: where normalize_moments once spilled).
    shapes = ((8192, 342, torch.float32, 128), (16384, 512, torch.bfloat16, 128), (4096, 4096, torch.bfloat16, None),
              (64, 7, torch.float64, None), (64, 2049, torch.float64, None), (64, 7, torch.bfloat16, None))
    for b, d, dt, max_registers in shapes:
        x = e(b, d, dtype=dt)
        parts = e(moments.tile_plan(b, d, x.device).splits, 2 + 2 * d, dtype=f64)
        mean, var, out = e(d, dtype=f64), e(d, dtype=f64), e(b, d, dtype=torch.promote_types(dt, torch.float32))
        check(*moments.launch_args(x, e(b, dtype=torch.bool), parts), max_registers)
        check(*normalize_moments.launch_args(x, mean, var, 1e-5, 5.0, out, parts), max_registers)
        check(*normalize.launch_args(x, mean, var, 1e-5, 5.0, True, True, out))
        check(*merge.launch_args(parts, mean, var, e((), dtype=torch.int64), e((), dtype=torch.int64), 0.99, e(1, dtype=torch.int32)))
        check(*merge.launch_args(parts, None, None, None, None, None, None, out=e(1, 2 + 2 * d, dtype=f64)))
    check(*reward.launch_args(e(8192, 1), e(8192, dtype=torch.bool), e(8192, 1), 0.99, e(1, 4, dtype=f64)))
    print("compiled")
    """
)


def test_kernel_annotations_are_objects_not_strings():
    """Triton 3.0's interpreter (the Triton torch 2.4 pins) takes a parameter as constexpr only where its annotation
    is ``tl.constexpr`` itself. Under ``from __future__ import annotations`` it got the string ``"tl.constexpr"``,
    made the block sizes tensors and failed in ``tl.arange`` on every launch."""
    import triton.language as tl

    from protonorm.kernels import merge, moments, normalize, normalize_moments, reward

    kernels = [obj for mod in (merge, moments, normalize, normalize_moments, reward) for obj in vars(mod).values()
               if hasattr(obj, "fn") and hasattr(obj, "arg_names")]
    assert len(kernels) >= 7
    for kernel in kernels:
        annotations = kernel.fn.__annotations__
        assert not [name for name, hint in annotations.items() if isinstance(hint, str)], kernel.fn.__qualname__
    assert normalize_moments._normalize_moments_kernel.fn.__annotations__["BLOCK_D"] is tl.constexpr


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter does not type-check like the compiler: build every kernel family to a cubin for sm_90, as a
    launch would specialize it, and read ptxas's report: no spills, and at observation sizes the moments kernels
    within the registers that let two programs share an SM."""
    import triton

    # Internals (create_function_from_signature, _pack_args) change between releases: Triton 3.0 lacks the backend
    # argument, 3.2 returns other values; the oldest seen to work is 3.8.
    if tuple(int(n) for n in re.findall(r"\d+", triton.__version__)[:2]) < (3, 8):
        pytest.skip(f"the check drives Triton's compiler through internals that Triton {triton.__version__} has in "
                    "another form (those of 3.8 and newer)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # so that ptxas runs and reports
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")])  # bench/triton_sass.py
    result = subprocess.run([sys.executable, "-c", COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def test_sass_count_script_reports_both_kernels(tmp_path):
    """bench/triton_sass.py (the static counts of bench/RESULTS.md) builds both moment kernels for a GPU without one
    and prints their registers, spills and float64 instruction counts."""
    import triton

    if tuple(int(n) for n in re.findall(r"\d+", triton.__version__)[:2]) < (3, 8):
        pytest.skip(f"the script drives Triton's compiler through internals of Triton 3.8 and newer, not "
                    f"{triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, str(BENCH / "triton_sass.py"), "--archs", "90", "--shapes",
                             "64x7:float32"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("sm_90 ")]
    assert [line.split(":")[0] for line in lines] == ["sm_90 moments 64x7 float32",
                                                      "sm_90 normalize_moments 64x7 float32"], result.stdout
    for line in lines:
        counts = dict(re.findall(r"([A-Z0-9]+) (\d+)", line.split("instructions:")[1]))
        assert re.search(r"registers \d+, spilled 0 bytes", line) and int(counts["DADD"]) > 0, line
