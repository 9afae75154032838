"""The pure-torch reference math against numpy float64, and combine_moments' algebraic properties."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protonorm import combine_moments, reference

from hard_data import (EXTREME_BATCHES, LONG_STREAMS, MEAN_RTOL, OUTLIER_FIRST_BATCHES, STREAM_CASES,
                       STREAM_EMA_DECAY, STREAM_MODES, TWO_PASS_OUTLIER_RTOL, VAR_RTOL, assert_close_rel,
                       assert_constant_columns_exact, assert_long_stream_accurate, assert_moments_exact,
                       extreme_batch, make_stream, outlier_first_batch, stream_truth, truth)


def _running(batches, d, with_prior=True, ema=None):
    mean = torch.zeros(d, dtype=torch.float64)
    var = torch.ones(d, dtype=torch.float64)
    count = torch.tensor(1 if with_prior else 0)
    dropped = torch.tensor(0)
    for b in batches:
        reference.merge_into_running(reference.batch_moments(b.reshape(b.shape[0], -1)), mean, var, count, dropped, ema)
    return mean, var, count, dropped


@pytest.mark.parametrize("stream,dtype", STREAM_CASES)
@pytest.mark.parametrize("mode", STREAM_MODES)
def test_stream_matches_numpy(stream, dtype, mode):
    batches, shape = make_stream(stream, dtype)
    ema = STREAM_EMA_DECAY if mode == "ema" else None
    mean, var, count, dropped = _running(batches, int(np.prod(shape)), mode != "no_prior", ema)
    t_mean, t_var, t_count = stream_truth(batches, mode)
    # The bounds hold for every input dtype because accumulation is float64 and the truth is taken on the
    # same rounded values; bf16/fp16 input is not allowed to lose accuracy.
    assert_close_rel(mean, t_mean.reshape(-1), MEAN_RTOL, "mean", floor=1e-12)
    assert_close_rel(var, t_var.reshape(-1), VAR_RTOL, "var", floor=1e-12)
    assert int(count) == t_count and int(dropped) == 0


def test_batch_moments_masks_and_drops_rows():
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    x[1, 0] = float("nan")
    x[4, 1] = float("inf")
    x[3, 1] = float("nan")  # masked out: neither counted nor dropped
    mask = torch.tensor([True, True, True, False, True, True])
    n, dropped, mean, m2 = reference.split_parts(reference.batch_moments(x, mask))
    kept = x[[0, 2, 5]].double()
    assert n.item() == 3 and dropped.item() == 2  # the masked NaN row is ignored, not counted as dropped
    torch.testing.assert_close(mean[0], kept.mean(0), rtol=0, atol=0)
    torch.testing.assert_close(m2[0], ((kept - kept.mean(0)) ** 2).sum(0), rtol=1e-15, atol=0)


@pytest.mark.parametrize("stream,dtype", STREAM_CASES)
@pytest.mark.parametrize("rows_per_part", [1, 7, 64])
def test_moments_in_parts_match_numpy(stream, dtype, rows_per_part):
    """The torch backend cuts a CPU batch into parts of rows (each part's float64 temporaries then stay in cache):
    merged, the parts hold the same statistics within the same bounds as one part."""
    batches, shape = make_stream(stream, dtype)
    d = int(np.prod(shape))
    mean, var = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
    count, dropped = torch.tensor(1), torch.tensor(0)
    for b in batches:
        parts = reference.batch_moments(b.reshape(b.shape[0], -1), None, rows_per_part)
        assert parts.shape[0] == -(-b.shape[0] // rows_per_part)
        reference.merge_into_running(parts, mean, var, count, dropped, None)
    t_mean, t_var, t_count = truth(batches, True)
    assert_close_rel(mean, t_mean.reshape(-1), MEAN_RTOL, "mean", floor=1e-12)
    assert_close_rel(var, t_var.reshape(-1), VAR_RTOL, "var", floor=1e-12)
    assert int(count) == t_count


def test_moments_in_parts_cut_the_mask_with_the_rows():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(23, 3, generator=g)
    x[4, 1], x[17, 0] = float("nan"), float("inf")
    mask = torch.rand(23, generator=g) < 0.7
    mask[4] = True
    for rows_per_part in (1, 5, 22, 23, 40):
        parts = reference.batch_moments(x, mask, rows_per_part)
        n, dropped, mean, m2 = reference.split_parts(reference.combine_parts(parts))
        kept = x[mask & torch.isfinite(x).all(1)].double()
        assert int(n) == kept.shape[0] and int(dropped) == int((mask & ~torch.isfinite(x).all(1)).sum())
        torch.testing.assert_close(mean[0], kept.mean(0), rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(m2[0], ((kept - kept.mean(0)) ** 2).sum(0), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("un_norm", [False, True])
@pytest.mark.parametrize("clamp_value", [None, 1.3])
def test_normalize_into_out_gives_the_same_bits(dtype, center, un_norm, clamp_value):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(37, 5, generator=g, dtype=torch.float64) * 4).to(dtype)
    x[3, 2] = float("nan")
    mean = torch.randn(5, generator=g, dtype=torch.float64)
    var = torch.rand(5, generator=g, dtype=torch.float64)
    want = reference.normalize(x, mean, var, 1e-5, clamp_value, un_norm, center)
    out = torch.full_like(want, 7.0)
    got = reference.normalize(x, mean, var, 1e-5, clamp_value, un_norm, center, out=out)
    assert got is out and got.dtype == want.dtype
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_combine_parts_is_the_pairwise_tree():
    """combine_parts merges each level's pairs at once; the result is the per-pair loop's, bit for bit."""
    g = torch.Generator().manual_seed(6)
    parts = torch.cat([reference.batch_moments(torch.randn(int(r), 4, generator=g) * 3 + 1)
                       for r in torch.randint(0, 9, (13,), generator=g)])
    ns, means, m2s = [list(t.unbind(0)) for t in reference.split_parts(parts)[0:1] + reference.split_parts(parts)[2:]]
    while len(ns) > 1:
        level = [reference.chan_merge(ns[i], means[i], m2s[i], ns[i + 1], means[i + 1], m2s[i + 1])
                 for i in range(0, len(ns) - 1, 2)]
        carry = [(ns[-1], means[-1], m2s[-1])] if len(ns) % 2 else []
        ns, means, m2s = (list(column) for column in zip(*(level + carry)))
    want = reference.pack_parts(ns[0], parts[:, reference.DROPPED_COL].sum(), means[0], m2s[0])
    assert torch.equal(reference.combine_parts(parts), want)


def test_empty_merge_is_bit_exact_noop():
    mean, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    count, dropped = torch.tensor(12345), torch.tensor(0)
    before = (mean.clone(), var.clone(), count.clone())
    empty = reference.batch_moments(torch.full((3, 5), float("nan")))
    for ema in (None, 0.9):
        reference.merge_into_running(empty, mean, var, count, dropped, ema)
        assert torch.equal(mean, before[0]) and torch.equal(var, before[1]) and torch.equal(count, before[2])
    assert int(dropped) == 6


def test_ema_follows_batch_mean_and_population_variance():
    x = torch.tensor([[1.0, 10.0], [3.0, 14.0]])
    mean, var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    count, dropped = torch.tensor(7), torch.tensor(0)
    reference.merge_into_running(reference.batch_moments(x), mean, var, count, dropped, 0.75)
    torch.testing.assert_close(mean, torch.tensor([0.25 * 2.0, 0.25 * 12.0], dtype=torch.float64))
    torch.testing.assert_close(var, torch.tensor([0.75 + 0.25 * 1.0, 0.75 + 0.25 * 4.0], dtype=torch.float64))
    assert int(count) == 7


def _normalize_in_numpy(x, mean, var, epsilon, clamp_value, un_norm, center):
    """``reference.normalize`` evaluated in numpy float64 from the statistics as upstream rounds them (mean and var
    to float32, ``var + eps`` added in float32), and each element's error bound (see the test below)."""
    xs = x.double().numpy()
    m = mean.numpy().astype(np.float32).astype(np.float64)
    std = np.sqrt((var.numpy().astype(np.float32) + np.float32(epsilon)).astype(np.float64))
    if not center:
        m = np.zeros_like(m)
    if un_norm:
        if clamp_value is not None:  # clamped in x's own dtype, as torch.clamp does: bound rounded to that dtype
            xs = torch.from_numpy(np.clip(xs, -clamp_value, clamp_value)).to(x.dtype).double().numpy()
        want = xs * std + m
        scale = np.abs(xs * std) + np.abs(m)
    else:
        want = (xs - m) / std
        if clamp_value is not None:
            want = np.clip(want, -clamp_value, clamp_value)
        scale = np.abs(want)
    return want, scale


# Against numpy float64, in units of u = 2^-24 of the result (of |x * std| + |mean| for un_norm, whose sum can
# cancel). The root is float32 for every dtype (upstream's var.float()): up to 2u, torch's vectorised CPU sqrt not
# being correctly rounded. float32, float16, bfloat16 input (16-bit input widens to float32 exactly): a float32
# output, whose subtraction (or product) and division (or sum) add 1u each: 4u. float64 input: the arithmetic is
# float64, so the root alone: 2u.
NORMALIZE_NUMPY_RTOL = {torch.float32: 4 * 2.0**-24, torch.float16: 4 * 2.0**-24, torch.bfloat16: 4 * 2.0**-24,
                        torch.float64: 2 * 2.0**-24}


@pytest.mark.parametrize("stream,dtype", STREAM_CASES)
@pytest.mark.parametrize("un_norm,center,clamp_value", [(False, True, None), (False, True, 1.3), (False, False, None),
                                                        (True, True, None), (True, True, 1.3), (True, False, 2.0)],
                         ids=["normalize", "clamp", "scale", "un_norm", "un_norm_clamp", "un_norm_scale"])
def test_normalize_matches_numpy(stream, dtype, un_norm, center, clamp_value):
    """normalize / clamp / scale-only / un_norm of the hard streams with their own statistics (offsets up to 1e6
    with small spread, constant columns whose root is sqrt(eps), one row, odd widths), and a NaN and infinities."""
    batches, shape = make_stream(stream, dtype)
    x = torch.cat(batches).reshape(-1, int(np.prod(shape)))
    x[0, 0] = float("nan")
    x[-1, -1] = float("inf")
    t_mean, t_var, _ = truth(batches, with_prior=False)
    mean, var = torch.from_numpy(t_mean.reshape(-1)), torch.from_numpy(t_var.reshape(-1))
    y = reference.normalize(x, mean, var, 1e-5, clamp_value, un_norm, center)
    assert y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want, scale = _normalize_in_numpy(x, mean, var, 1e-5, clamp_value, un_norm, center)
    got = y.double().numpy()
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite, infinite = np.isfinite(want), np.isinf(want)
    assert np.array_equal(got[infinite], want[infinite])
    err = np.abs(got[finite] - want[finite])
    assert np.all(err <= NORMALIZE_NUMPY_RTOL[dtype] * scale[finite]), np.max(err / np.maximum(scale[finite], 1e-300))


def test_normalize_matches_upstream_formula():
    x = torch.randn(9, 4) * 3
    mean, var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.1
    y = reference.normalize(x, mean, var, 1e-5, 2.0)
    expected = torch.clamp((x - mean.float()) / torch.sqrt(var.float() + 1e-5), -2.0, 2.0)
    assert torch.equal(y, expected)
    back = reference.normalize(y, mean, var, 1e-5, 2.0, un_norm=True)
    assert torch.equal(back, torch.clamp(y, -2.0, 2.0) * torch.sqrt(var.float() + 1e-5) + mean.float())
    assert torch.isnan(reference.normalize(torch.tensor([[float("nan")] * 4]), mean, var, 1e-5, 2.0)).all()


def test_discounted_return_resets_and_recovers_from_nonfinite():
    d = torch.tensor([1.0, float("nan"), 2.0])
    r = torch.tensor([0.5, 0.5, 0.5])
    t = torch.tensor([0.0, 1.0, 1.0])
    out = reference.discounted_return_update(d, r, t, 0.9)
    torch.testing.assert_close(out, torch.tensor([1.4, 0.5, 0.5]))


# ----------------------------------------------------------------------------------------------- combine_moments
def _groups(draw_sizes, d, seed):
    g = np.random.default_rng(seed)
    return [g.standard_normal((n, d)) * g.uniform(0.1, 5) + g.uniform(-100, 100) for n in draw_sizes]


def _moments(groups):
    return (
        [torch.from_numpy(x.mean(0)) for x in groups],
        [torch.from_numpy(x.var(0)) for x in groups],
        [x.shape[0] for x in groups],
    )


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=9),
    d=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=2**31),
    permutation_seed=st.integers(min_value=0, max_value=2**31),
)
def test_combine_moments_equals_concatenation_in_any_order(sizes, d, seed, permutation_seed):
    groups = _groups(sizes, d, seed)
    full = np.concatenate(groups)
    order = np.random.default_rng(permutation_seed).permutation(len(groups))
    for arrangement in (groups, [groups[i] for i in order]):
        mean, var, count = combine_moments(*_moments(arrangement))
        assert count.dtype == torch.int64 and int(count) == full.shape[0]
        np.testing.assert_allclose(mean.numpy(), full.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(var.numpy(), full.var(0), rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=30), min_size=2, max_size=8),
    split=st.integers(min_value=1, max_value=7),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_combine_moments_is_independent_of_grouping(sizes, split, seed):
    groups = _groups(sizes, 3, seed)
    split = min(split, len(groups) - 1)
    left = combine_moments(*_moments(groups[:split]))
    right = combine_moments(*_moments(groups[split:]))
    nested = combine_moments([left[0], right[0]], [left[1], right[1]], [left[2], right[2]])
    flat = combine_moments(*_moments(groups))
    torch.testing.assert_close(nested[0], flat[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nested[1], flat[1], rtol=1e-10, atol=1e-12)
    assert int(nested[2]) == int(flat[2])


def test_combine_moments_accepts_tensor_counts_and_keeps_counts_exact():
    big = 2**40 + 3
    mean, var, count = combine_moments(
        [torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)],
        [torch.ones(2, dtype=torch.float64)] * 2,
        torch.tensor([big, 1]),
    )
    assert int(count) == big + 1
    with pytest.raises(ValueError, match="equal length"):
        combine_moments([torch.zeros(2)], [], [1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("rows_per_part", [None, 1, 2, 32])
def test_constant_columns_keep_their_value_and_no_variance(dtype, rows_per_part):
    assert_constant_columns_exact(lambda x: reference.batch_moments(x, None, rows_per_part),
                                  reference.merge_into_running, dtype)


@pytest.mark.parametrize("offset,spread,dtype", LONG_STREAMS)
def test_long_stream_of_small_records(offset, spread, dtype):
    assert_long_stream_accurate(reference.batch_moments, reference.merge_into_running, offset, spread, dtype, 3000)


@pytest.mark.parametrize("name", EXTREME_BATCHES)
@pytest.mark.parametrize("rows_per_part", [None, 4])
def test_moments_at_the_edges_of_each_dtype(name, rows_per_part):
    x = extreme_batch(name)
    assert_moments_exact(reference.combine_parts(reference.batch_moments(x, None, rows_per_part)), x)


@pytest.mark.parametrize("name", OUTLIER_FIRST_BATCHES)
@pytest.mark.parametrize("rows_per_part", [None, 4096])
def test_moments_of_a_batch_whose_first_row_is_an_outlier(name, rows_per_part):
    x = outlier_first_batch(name)
    assert_moments_exact(reference.combine_parts(reference.batch_moments(x, None, rows_per_part)), x,
                         TWO_PASS_OUTLIER_RTOL)
