"""The public modules on every backend that runs here: accuracy, API behaviour, bad input, host syncs."""
import copy
import gc
import io
import os
import pickle
import re
import subprocess
import sys
import textwrap
import types
import warnings
import weakref

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import protonorm
from protonorm import RewardRunningMeanStd, RunningMeanStd, backends, reference
from protonorm.diagnostics import HostSyncCounter

from conftest import CPU_BACKENDS, assert_same, expected_normalize, in_forked_child
from hard_data import (MEAN_RTOL, STREAM_CASES, STREAM_EMA_DECAY, STREAM_MODES, VAR_RTOL, assert_close_rel,
                       ema_truth, make_stream, stream_truth, truth)


def make(shape=None, backend="torch", **kwargs):
    return RunningMeanStd(None, shape, device="cpu", backend=backend, **kwargs)


def stats(m):
    return m.mean.clone(), m.var.clone(), m.count.clone()


def assert_stats_equal(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_backends_present():
    # CI builds the C++ extension and installs triton: every backend must run on CPU tensors there.
    reasons = backends.available(torch.device("cpu"))
    assert reasons["torch"] is None
    missing = {name: why for name, why in reasons.items() if why is not None}
    assert not missing, f"backends unavailable on CPU: {missing}"


# ------------------------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("stream,dtype", STREAM_CASES)
@pytest.mark.parametrize("mode", STREAM_MODES)
def test_stream_accuracy_through_module(backend_name, stream, dtype, mode):
    """The hard streams in every dtype, from upstream's prior pseudo-sample (mean 0, var 1, count 1: merged with data
    at an offset of 1e6 it dominates the variance), without it (the statistics are then the data's own), or as EMA."""
    batches, shape = make_stream(stream, dtype)
    m = make(shape, backend_name, ema_decay=STREAM_EMA_DECAY if mode == "ema" else None)
    if mode == "no_prior":
        m.count.zero_()
    for b in batches:
        m.record_moments(b)
    t_mean, t_var, t_count = stream_truth(batches, mode)
    assert_close_rel(m.mean.reshape(-1), t_mean.reshape(-1), MEAN_RTOL, "mean", floor=1e-12)
    assert_close_rel(m.var.reshape(-1), t_var.reshape(-1), VAR_RTOL, "var", floor=1e-12)
    assert int(m.count) == t_count


def test_long_stream_matches_numpy(backend_name):
    g = torch.Generator().manual_seed(3)
    m = make((5,), backend_name, ema_decay=None)
    batches = [torch.randn(97, 5, generator=g) * 0.05 + 2e4 for _ in range(300 if backend_name != "triton" else 40)]
    for b in batches:
        m.record_moments(b)
    t_mean, t_var, t_count = truth(batches)
    assert_close_rel(m.mean, t_mean, MEAN_RTOL, "mean")
    assert_close_rel(m.var, t_var, VAR_RTOL, "var")
    assert int(m.count) == t_count


def test_count_and_weights_are_exact_past_float32_precision(backend_name):
    """A long stream's count passes 2^24, past which upstream's float32 counts round. Here the count stays exact and
    the merge weighs the running statistics by it: from c = 2^24 + 1 (float32: 2^24) a batch of n = 2 rows moves the
    mean to mean_b * n / (c + n), which a count rounded to float32 would miss by 6e-8 of it. The expectation is
    computed in exact rationals; 1e-12 leaves room for the backends' float64 summation orders."""
    from fractions import Fraction

    m = make((3,), backend_name)
    c = 2**24 + 1
    m.count.fill_(c)
    x = torch.tensor([[1e6, -3.0, 0.5], [1e6 + 2.0, 5.0, 0.5]], dtype=torch.float64)
    m.record_moments(x)
    assert m.count.dtype == torch.int64 and int(m.count) == c + 2  # 2^24 + 3: not a float32 number
    rows = [[Fraction(v) for v in row] for row in x.tolist()]
    n = len(rows)
    for j in range(3):
        mean_b = sum(r[j] for r in rows) / n
        m2_b = sum((r[j] - mean_b) ** 2 for r in rows)
        mean = mean_b * n / (c + n)  # the prior: mean 0, var 1 over c rows
        var = (c + m2_b + mean_b**2 * c * n / (c + n)) / (c + n)
        assert float(m.mean[j]) == pytest.approx(float(mean), rel=1e-12, abs=0)
        assert float(m.var[j]) == pytest.approx(float(var), rel=1e-12, abs=0)


@pytest.mark.parametrize("sync", ["per_call", "deferred"])
def test_update_from_moments_adds_counts_past_float64_precision_exactly(backend_name, sync):
    """Counts given to update_from_moments beyond 2^53, where float64 stops holding every integer, as a Python int and
    as an int64 tensor: the count grows by exactly them (deferred: in the synced base too, seen after a sync). The
    weights may round (by 1e-16); the statistics are checked against exact rationals within 1e-15."""
    from fractions import Fraction

    m = make((2,), backend_name, sync=sync)
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5], [2.0, 4.0]], dtype=torch.float64)
    m.record_moments(x)  # the deferred module takes its synced base here
    counts = [1 + 2**53, torch.tensor(3 + 2**60)]
    for c in counts:
        m.update_from_moments(torch.tensor([2.0, -1.0], dtype=torch.float64), torch.tensor([3.0, 0.25]), c)
    protonorm.sync(m)
    total = 1 + 3 + sum(int(c) for c in counts)
    assert int(m.count) == total
    for j, (batch_mean, batch_var) in enumerate([(2, 3), (-1, Fraction(1, 4))]):
        rows = [Fraction(r[j]) for r in x.tolist()]
        n, mean, m2 = 1 + len(rows), sum(rows) / 4, 1 + sum(r * r for r in rows) - sum(rows) ** 2 / 4
        for c in counts:
            c = int(c)
            delta = batch_mean - mean
            mean, m2, n = mean + delta * c / (n + c), m2 + batch_var * c + delta**2 * n * c / (n + c), n + c
        assert float(m.mean[j]) == pytest.approx(float(mean), rel=1e-15, abs=0)
        assert float(m.var[j]) == pytest.approx(float(m2 / n), rel=1e-15, abs=0)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("count", [3001.0, 2.0**24 + 1, 2.5])
def test_update_from_moments_takes_a_float_count_whatever_the_default_dtype(backend_name, default_dtype, count):
    """A Python float batch_count is a float64 number: torch.set_default_dtype (float16 under mixed-precision
    scripts) must not round it, as it does not in combine_moments. Fractional counts weigh the moments as given; the
    count grows by their truncation, as combine_moments' total does (so 1 + 2.5 -> 3)."""
    m = make((2,), backend_name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        m.update_from_moments(torch.tensor([2.0, -1.0], dtype=torch.float64),
                              torch.tensor([3.0, 0.25], dtype=torch.float64), count)
    finally:
        torch.set_default_dtype(previous)
    assert int(m.count) == 1 + int(count)
    # mean = 0 * 1/(1 + c) + batch_mean * c/(1 + c): within 2 float64 ulps of the exact value
    torch.testing.assert_close(m.mean, torch.tensor([2.0, -1.0], dtype=torch.float64) * count / (1 + count),
                               rtol=4.5e-16, atol=0)


@pytest.mark.parametrize("sync", ["per_call", "deferred"])
@pytest.mark.parametrize("count", [-1, -3, -0.5, float("nan"), float("inf"), np.int64(-2)], ids=repr)
def test_update_from_moments_refuses_a_count_that_is_no_number_of_rows(backend_name, sync, count):
    """A negative or non-finite ``batch_count`` given as a number raises and changes nothing: it left the mean and
    variance alone but moved the count (a NaN one to -2^63 + 1), or, as upstream's merge does, turned the mean
    into -inf."""
    m = make((3,), backend_name, sync=sync)
    m.record_moments(torch.randn(5, 3))
    before = stats(m)
    with pytest.raises(ValueError, match=r"^update_from_moments: expected batch_count >= 0 \(a number of rows\), got "):
        m.update_from_moments(torch.zeros(3), torch.ones(3), count)
    assert_stats_equal(stats(m), before)
    m.update_from_moments(torch.zeros(3), torch.ones(3), 0)  # an empty batch is still taken (a no-op)
    assert_stats_equal(stats(m), before)


@pytest.mark.parametrize("ema", [None, 0.9], ids=["welford", "ema"])
@pytest.mark.parametrize("count,error,message", [
    (torch.tensor([2, 3]), ValueError, r"as one real number of rows, got a torch.int64 tensor of shape \(2,\)"),
    (torch.tensor([2, 3, 4]), ValueError, r"as one real number of rows, got a torch.int64 tensor of shape \(3,\)"),
    (torch.tensor(2 + 0j), ValueError, r"as one real number of rows, got a torch.complex64 tensor of shape \(\)"),
    (None, TypeError, r"as a number of rows \(an int or a one-element tensor\), got None"),
    ("5", TypeError, r"as a number of rows \(an int or a one-element tensor\), got '5'"),
], ids=["two", "one_per_feature", "complex", "none", "str"])
def test_update_from_moments_refuses_a_count_that_is_not_one_number(backend_name, ema, count, error, message):
    """A ``batch_count`` that is not one real number raises saying what was expected, and changes nothing: torch's
    own errors (a size mismatch, "Could not infer dtype of NoneType") or none at all (complex counts) came instead."""
    m = make((3,), backend_name, ema_decay=ema)
    m.record_moments(torch.randn(5, 3))
    before = stats(m)
    with pytest.raises(error, match=r"^update_from_moments: expected batch_count " + message):
        m.update_from_moments(torch.zeros(3), torch.ones(3), count)
    assert_stats_equal(stats(m), before)


@pytest.mark.parametrize("sync", ["per_call", "deferred"])
@pytest.mark.parametrize("ema", [None, 0.9], ids=["welford", "ema"])
@pytest.mark.parametrize("bad", ["nan_mean", "inf_var", "neg_inf_mean_one_value"])
def test_update_from_moments_leaves_nonfinite_moments_out(backend_name, ema, sync, bad):
    """Moments holding NaN/inf are refused whole, as a batch's rows are: with nonfinite='drop' the statistics stay
    bit for bit as they were and ``nonfinite_rows`` grows by the update's count (counts past 2^53 included); with
    'raise' a ValueError leaves everything untouched. A finite update afterwards merges as if the refused one had
    never been made."""
    mean = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    var = torch.tensor([3.0, 0.25, 1.0], dtype=torch.float64)
    bad_mean, bad_var = mean.clone(), var.clone()
    if bad == "nan_mean":
        bad_mean[1] = float("nan")
    elif bad == "inf_var":
        bad_var[2] = float("inf")
    else:
        bad_mean, bad_var = torch.tensor(float("-inf")), var
    x = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, 1.0]], dtype=torch.float64)
    clean, m = (make((3,), backend_name, ema_decay=ema, sync=sync) for _ in range(2))
    for module in (clean, m):
        module.record_moments(x)
    m.update_from_moments(bad_mean, bad_var, 5)
    m.update_from_moments(bad_mean, bad_var, torch.tensor(2**60 + 1))
    for module in (clean, m):
        module.update_from_moments(mean, var, 4)
    protonorm.sync(m)
    protonorm.sync(clean)
    for name in ("mean", "var", "count"):
        assert torch.equal(getattr(m, name), getattr(clean, name)), name
    assert int(m.nonfinite_rows) == int(clean.nonfinite_rows) + 5 + 2**60 + 1

    strict = make((3,), backend_name, ema_decay=ema, sync=sync, nonfinite="raise")
    strict.record_moments(x)
    before = {k: v.clone() for k, v in strict.state_dict().items()} | {"dropped": strict.nonfinite_rows.clone()}
    with pytest.raises(ValueError, match="update_from_moments: expected finite batch_mean and batch_var"):
        strict.update_from_moments(bad_mean, bad_var, 5)
    after = {k: v for k, v in strict.state_dict().items()} | {"dropped": strict.nonfinite_rows}
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("ema", [None, 0.99])
def test_backends_agree_with_reference(backend_name, ema):
    g = torch.Generator().manual_seed(0)
    ref, m = make((7,), "torch", ema_decay=ema, clamp_value=3.0), make((7,), backend_name, ema_decay=ema, clamp_value=3.0)
    for b in (1, 7, 64):
        x = torch.randn(b, 7, generator=g) * 4 + 10
        # The statistics differ from the reference's in their last bits: the output is checked with its own.
        assert_same(m.normalize(x), expected_normalize(backend_name, x, m.mean, m.var, m.epsilon, 3.0))
        ref.record_moments(x)
        m.record_moments(x)
    # float64 moments summed in other orders: a few ulps (a lost row or a float32 sum would be 1e-2 or 1e-7 off)
    torch.testing.assert_close(m.mean, ref.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.var, ref.var, rtol=1e-10, atol=1e-12)
    assert torch.equal(m.count, ref.count)


# Random inputs against numpy float64 (hypothesis; few, small examples: Triton runs interpreted here).
_EXAMPLES = {"triton": 25}
_OFFSETS = [0.0, -40.0, 1e4, 1e6]  # float16 holds no 1e6: it gets 1e4
_SPREADS = [1e-2, 1.0, 300.0]


def _random_rows(g, shape, dtype, offset, spread):
    """float64 values at ``offset`` with spread ``spread``, rounded once to ``dtype``."""
    offset = min(offset, 1e4) if dtype == torch.float16 else offset
    return torch.from_numpy(offset + spread * g.standard_normal(shape)).to(dtype)


def test_random_records_match_numpy(backend_name):
    """Records of random batches (0-40 rows, 1-9 features, every dtype, offsets up to 1e6 with spreads down to 1e-2,
    masks, NaN and inf rows), Welford from no prior or EMA: the statistics keep the hard-data bounds against numpy
    float64 on the same rounded values, the counts are exact, and normalize writes the reference's bits."""

    @settings(max_examples=_EXAMPLES.get(backend_name, 100), deadline=None)
    @given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=3), d=st.integers(1, 9),
           dtype=st.sampled_from(_DTYPES), offset=st.sampled_from(_OFFSETS), spread=st.sampled_from(_SPREADS),
           masked=st.booleans(), ema=st.sampled_from([None, 0.9]), seed=st.integers(0, 2**16))
    def check(sizes, d, dtype, offset, spread, masked, ema, seed):
        g = np.random.default_rng(seed)
        m = make((d,), backend_name, clamp_value=3.0, ema_decay=ema)
        m.count.zero_()
        kept, dropped = [], 0
        for rows in sizes:
            x = _random_rows(g, (rows, d), dtype, offset, spread)
            bad = torch.from_numpy(g.random(rows) < 0.15)
            x[bad, int(g.integers(d))] = torch.where(torch.from_numpy(g.random(rows) < 0.5), np.inf, np.nan)[bad].to(dtype)
            mask = torch.from_numpy(g.random(rows) < 0.7) if masked else torch.ones(rows, dtype=torch.bool)
            m.record_moments(x, mask if masked else None)
            kept.append(x[mask & ~bad])
            dropped += int((mask & bad).sum())
        assert int(m.nonfinite_rows) == dropped
        if ema is not None:
            t_mean, t_var, t_count = *ema_truth(kept, ema), 0
        elif sum(k.shape[0] for k in kept):
            t_mean, t_var, t_count = truth(kept, with_prior=False)
        else:  # no row at all: the statistics are as made
            t_mean, t_var, t_count = np.zeros(d), np.ones(d), 0
        assert int(m.count) == t_count
        assert_close_rel(m.mean, t_mean, MEAN_RTOL, "mean", floor=1e-12)
        assert_close_rel(m.var, t_var, VAR_RTOL, "var", floor=1e-12)
        m.eval()
        assert_same(m.normalize(x), expected_normalize(backend_name, x, m.mean, m.var, m.epsilon, 3.0))

    check()


def test_random_reward_steps_match_numpy(backend_name):
    """Random reward streams (1-30 environments, one or three features, every reward dtype, gamma from 0 to 1, resets,
    the odd NaN reward): the discounted returns are numpy's recursion in the returns' dtype, bit for bit, and the
    statistics of the finite returns keep the hard-data bounds against numpy float64."""

    @settings(max_examples=_EXAMPLES.get(backend_name, 100), deadline=None)
    @given(envs=st.integers(1, 30), d=st.sampled_from([1, 3]), dtype=st.sampled_from(_DTYPES),
           steps=st.integers(1, 5), gamma=st.sampled_from([0.0, 0.5, 0.99, 1.0]), offset=st.sampled_from([0.0, 1e3]),
           seed=st.integers(0, 2**16))
    def check(envs, d, dtype, steps, gamma, offset, seed):
        g = np.random.default_rng(seed)
        r = RewardRunningMeanStd(None, (d,), gamma, device="cpu", backend=backend_name)
        r.count.zero_()
        rdt = np.float64 if dtype == torch.float64 else np.float32  # the returns' dtype: the reward's, promoted
        returns, seen = None, []
        for _ in range(steps):
            reward = _random_rows(g, (envs, d) if d > 1 else (envs,), dtype, offset, 1.0)
            reward.view(envs, -1)[torch.from_numpy(g.random(envs) < 0.05), 0] = float("nan")
            terminated = torch.from_numpy(g.random(envs) < 0.3)
            r.record_reward(reward, terminated)
            step = reward.double().numpy().astype(rdt)  # exact
            if returns is None:
                returns = step
            else:
                reset = terminated.numpy().reshape(-1, *[1] * (step.ndim - 1))
                returns = np.where(reset, rdt(0), returns * rdt(gamma)) + step
            assert np.array_equal(r.discounted_reward.numpy(), returns, equal_nan=True)
            seen.append(torch.from_numpy(returns.reshape(envs, -1).copy()))
        kept = [s[torch.isfinite(s).all(dim=1)] for s in seen]
        assert int(r.nonfinite_rows) == sum(s.shape[0] - k.shape[0] for s, k in zip(seen, kept))
        n = sum(k.shape[0] for k in kept)
        t_mean, t_var, _ = truth(kept, with_prior=False) if n else (np.zeros(d), np.ones(d), 0)
        assert int(r.count) == n
        assert_close_rel(r.mean, t_mean, MEAN_RTOL, "mean", floor=1e-12)
        assert_close_rel(r.var, t_var, VAR_RTOL, "var", floor=1e-12)

    check()


# ------------------------------------------------------------------------------------------------ upstream API
def test_buffers_and_state_dict_keys_match_upstream():
    m = make((3,))
    assert m.mean.dtype == torch.float64 and torch.equal(m.mean, torch.zeros(3, dtype=torch.float64))
    assert m.var.dtype == torch.float64 and torch.equal(m.var, torch.ones(3, dtype=torch.float64))
    assert m.count.dtype == torch.int64 and m.count.shape == () and int(m.count) == 1
    assert list(m.state_dict()) == ["mean", "var", "count"]
    assert m._initialized and m.shape == (3,) and m.epsilon == 1e-5 and m.clamp_value is None and m.ema_decay is None


def test_positional_arguments_follow_upstream_order():
    m = RunningMeanStd(None, (2,), 1e-3, "cpu", 4.0, 0.5)
    assert (m.epsilon, m.device, m.clamp_value, m.ema_decay) == (1e-3, "cpu", 4.0, 0.5)
    r = RewardRunningMeanStd(None, (1,), 0.9, 1e-4, 5.0, "cpu", 0.99)
    assert (r.gamma, r.epsilon, r.clamp_value, r.device, r.ema_decay) == (0.9, 1e-4, 5.0, "cpu", 0.99)
    assert r.discounted_reward is None


def test_lazy_shape_from_first_input(backend_name):
    m = make(None, backend_name)
    assert not m._initialized and "mean" not in m.state_dict()
    x = torch.randn(6, 2, 3)
    m.normalize(x)
    assert m._initialized and tuple(m.shape) == (2, 3) and m.mean.shape == (2, 3) and m.mean.device == x.device


def test_fabric_attribute_can_be_reassigned():
    m = make((2,))
    m.fabric = None
    m.record_moments(torch.ones(3, 2))
    assert int(m.count) == 4


def test_to_returns_self_and_records_device():
    m = make((2,))
    assert m.to("cpu") is m and m.device == "cpu"  # the argument as given, as upstream keeps it
    assert m.to(torch.device("cpu")).device == torch.device("cpu")
    assert m.to(device="cpu", non_blocking=True).device == "cpu"
    assert m.to(torch.zeros(1)).device == torch.device("cpu")


@pytest.mark.parametrize("backend", [name for name in CPU_BACKENDS if name != "torch"])  # (torch keeps no scratch)
@pytest.mark.parametrize("move", ["to", "cpu", "parent_to", "parent_cpu", "parent_half"])
def test_a_moved_module_lets_go_of_its_scratch_buffers(move, backend):
    """Scratch buffers (the record's workspace, a training-mode normalize's stash) belong to the device they were
    made on: whichever call moves the module (its own .to/.cpu/.cuda, or a model's), it lets go of them instead of
    holding device memory it no longer uses."""
    m = make((5,), backend)
    parent = nn.Sequential(m)
    x = torch.randn(64, 5)
    m.normalize(x)  # training mode: the fused kernel, its parts stashed for the record
    m.record_moments(x)
    m.record_moments(x)  # the separate record: its own workspace
    entries = list(m._workspace_record.values()) + list(m._stash.workspace.values())
    scratch = [t for e in entries for t in (e if isinstance(e, tuple) else (e,)) if isinstance(t, torch.Tensor)]
    assert scratch, "the calls above used no scratch buffer"
    kept = [weakref.ref(t) for t in scratch]
    del entries, scratch
    {"to": lambda: m.to("cpu"), "cpu": lambda: m.cpu(), "parent_to": lambda: parent.to("cpu"),
     "parent_cpu": lambda: parent.cpu(), "parent_half": lambda: parent.half()}[move]()
    gc.collect()
    assert all(ref() is None for ref in kept)
    before = m.mean.clone()
    m.record_moments(x)  # and records as before, in fresh scratch
    assert not torch.equal(m.mean, before) and int(m.count) == 1 + 3 * 64


@pytest.mark.parametrize("move", ["module", "parent", "parent_to_empty"])
def test_discounted_returns_follow_the_statistics_when_a_parent_moves_the_module(move):
    """The returns move with the statistics whether the module itself or a model holding it is moved (the next step
    would otherwise meet returns on the old device), and keep their dtype and values."""
    r = RewardRunningMeanStd(None, (1,), 0.5, device="cpu", backend="torch")
    r.record_reward(torch.tensor([1.0, 2.0]), torch.zeros(2))
    parent = nn.Sequential(nn.Linear(1, 1), r)
    {"module": lambda: r.to("meta"), "parent": lambda: parent.to("meta"),
     "parent_to_empty": lambda: parent.to_empty(device="meta")}[move]()
    assert r.discounted_reward.device.type == "meta" and r.discounted_reward.dtype == torch.float32
    r.record_reward(torch.ones(2, device="meta"), torch.zeros(2, device="meta"))
    assert r.discounted_reward.shape == (2,) and r.count.device.type == "meta"


def test_dtype_casts_of_a_parent_keep_the_discounted_returns():
    r = RewardRunningMeanStd(None, (1,), 0.5, device="cpu", backend="torch")
    r.record_reward(torch.tensor([1.0, 2.0]), torch.zeros(2))
    returns = r.discounted_reward
    nn.Sequential(r).half().double().to("cpu")
    assert r.discounted_reward is returns and torch.equal(returns, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("lazy", [False, True])
def test_load_with_assign_keeps_statistics_dtypes(backend_name, lazy):
    """A checkpoint of an upstream model cast with .float() holds float32 mean/var; load_state_dict(assign=True)
    takes the checkpoint's tensors, which must not leave float32 statistics behind."""
    source = make((3,), "torch")
    source.record_moments(torch.randn(20, 3) * 2 + 1)
    checkpoint = {k: (v.float() if k != "count" else v.int()) for k, v in source.state_dict().items()}
    m = make(None if lazy else (3,), backend_name)
    m.load_state_dict(checkpoint, assign=True)
    assert (m.mean.dtype, m.var.dtype, m.count.dtype) == (torch.float64, torch.float64, torch.int64)
    assert torch.equal(m.mean, checkpoint["mean"].double()) and int(m.count) == int(source.count)
    m.train()
    x = torch.randn(5, 3)
    m.normalize(x)
    m.record_moments(x)
    assert int(m.count) == int(source.count) + 5


def _assigned(kind, value):
    """``value`` as a caller might assign it: in a narrower dtype, strided, or lazily negated."""
    if kind == "narrow":
        return value.float() if value.is_floating_point() else value.int()
    if kind == "strided":
        return torch.stack([value, torch.zeros_like(value)], dim=-1)[..., 0]
    return torch._neg_view(-value) if value.is_floating_point() else value  # mean and var only


def _used_alike(shape, backend_name, x):
    """Two modules that have normalized and recorded ``x`` in training mode (their caches made)."""
    modules = make(shape, backend_name), make(shape, backend_name)
    for m in modules:
        m.train()
        m.normalize(x)
        m.record_moments(x)
    return modules


def assert_go_on_alike(got, want, x):
    """``got`` and ``want`` normalize and record ``x`` with the same results, and then hold the same statistics."""
    outputs = []
    for m in (got, want):
        outputs.append(m.normalize(x))
        m.record_moments(x)
    assert_same(*outputs)
    assert_stats_equal(stats(got), stats(want))
    assert_same(got.normalize(x), want.normalize(x))


@pytest.mark.parametrize("shape", [(3,), (2, 3)])
@pytest.mark.parametrize("kind", ["narrow", "strided", "negated"])
def test_statistics_assigned_as_tensors_of_other_layouts_are_taken(backend_name, kind, shape):
    """Upstream's buffers are plain attributes: ``module.mean = t.float()`` (or a strided or lazily negated tensor)
    works there, and must here too, on every backend: the statistics become float64 / int64 tensors of their own,
    as load_state_dict(assign=True) makes them."""
    g = torch.Generator().manual_seed(3)
    values = {"mean": torch.randn(shape, generator=g).double(),  # (float32 values: exact in every layout)
              "var": (torch.rand(shape, generator=g) + 0.5).double(),
              "count": torch.tensor(7)}
    x = torch.randn(9, *shape, generator=g)
    got, want = _used_alike(shape, backend_name, x)
    for name, value in values.items():
        setattr(got, name, _assigned(kind, value))
        getattr(want, name).copy_(value)
    assert (got.mean.dtype, got.var.dtype, got.count.dtype) == (torch.float64, torch.float64, torch.int64)
    assert_go_on_alike(got, want, x)


@pytest.mark.parametrize("shape", [(3,), (2, 3)])
def test_statistics_given_new_data_in_place_are_the_ones_updated(backend_name, shape):
    """``module.mean.data = t`` replaces what the buffer holds, keeping the tensor object: the records that follow
    go into the new values, not into memory the module held before."""
    g = torch.Generator().manual_seed(4)
    new_mean = torch.randn(shape, generator=g, dtype=torch.float64)
    new_var = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    x = torch.randn(9, *shape, generator=g)
    got, want = _used_alike(shape, backend_name, x)
    got.mean.data, got.var.data = new_mean.clone(), new_var.clone()
    want.mean.copy_(new_mean)
    want.var.copy_(new_var)
    assert_go_on_alike(got, want, x)


@pytest.mark.parametrize("init", ["meta_assign", "to_empty", "to_empty_assign"])
def test_model_built_on_meta_then_loaded_counts_dropped_rows_from_zero(backend_name, init):
    """A model built under torch.device("meta") and given a checkpoint by load_state_dict(assign=True), or
    materialized by to_empty() first: the non-persistent count of dropped rows, which no checkpoint restores,
    starts at 0 on the statistics' device (not left on meta, nor holding uninitialized memory)."""
    source = make((3,), "torch")
    source.record_moments(torch.randn(20, 3))
    with torch.device("meta"):
        model = nn.Sequential(RunningMeanStd(None, (3,), device=None, backend=backend_name))
    if init != "meta_assign":
        model.to_empty(device="cpu")
    model.load_state_dict({f"0.{k}": v.clone() for k, v in source.state_dict().items()}, assign=init != "to_empty")
    m = model[0]
    assert m.nonfinite_rows.device.type == "cpu" and int(m.nonfinite_rows) == 0
    x = torch.randn(5, 3)
    x[0, 1] = float("nan")
    m.record_moments(x)
    assert int(m.nonfinite_rows) == 1 and int(m.count) == int(source.count) + 4


def _reward_model_run_on_meta(backend_name):
    """A model holding a reward normalizer, built under torch.device("meta") and run for a step on meta tensors (a
    dry run, as shape inference does), so that its discounted returns are a meta tensor."""
    with torch.device("meta"):
        model = nn.Sequential(RewardRunningMeanStd(None, (1,), 0.5, device=None, backend=backend_name))
    model[0].backend = "torch"  # (the compiled backends do not run on meta)
    model[0].record_reward(torch.ones(4, device="meta"), torch.zeros(4, device="meta"))
    model[0].backend = backend_name
    return model


@pytest.mark.parametrize("init", ["meta_assign", "to_empty", "to_empty_assign"])
def test_returns_of_a_dry_run_on_meta_start_afresh_where_the_statistics_are_loaded(backend_name, init):
    """Returns recorded on meta hold no values: once the model is materialized (to_empty) or given a checkpoint that
    moves its statistics (assign=True), the next step starts them at its reward on the statistics' device, as a
    fresh module would, instead of adding uninitialized memory to it or failing on every step for meta returns."""
    source = RewardRunningMeanStd(None, (1,), 0.5, device="cpu", backend="torch")
    source.record_reward(torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.zeros(4))
    checkpoint = {f"0.{k}": v.clone() for k, v in source.state_dict().items()}
    model = _reward_model_run_on_meta(backend_name)
    if init != "meta_assign":
        model.to_empty(device="cpu")
    model.load_state_dict(checkpoint, assign=init != "to_empty")
    r, fresh = model[0], RewardRunningMeanStd(None, (1,), 0.5, device="cpu", backend=backend_name)
    fresh.load_state_dict({k[2:]: v for k, v in checkpoint.items()})
    assert r.discounted_reward is None
    reward = torch.tensor([4.0, 1.0, -1.0, 2.0])
    for m in (r, fresh):
        m.record_reward(reward, torch.zeros(4))
    assert torch.equal(r.discounted_reward, reward)
    assert_stats_equal(stats(r), stats(fresh))


_CASTS = {"half": lambda m: m.half(), "float": lambda m: m.float(), "double": lambda m: m.double(),
          "bfloat16": lambda m: m.bfloat16(), "to_dtype": lambda m: m.to(torch.float16),
          "type": lambda m: m.type(torch.float64), "memory_format": lambda m: m.to(memory_format=torch.channels_last)}


@pytest.mark.parametrize("cast", list(_CASTS))
@pytest.mark.parametrize("load", ["helper", "load_state_dict"])
def test_dtype_casts_of_a_lazy_model_do_not_choose_where_a_checkpoint_goes(cast, load):
    """A cast moves nothing: a lazy normalizer in a model that was only cast takes a checkpoint's statistics on the
    checkpoint's device, as upstream's helper creates them and as a model never cast does (not on the CPU, which
    the cast's probe happened to be on). Meta stands in for CUDA."""
    model = nn.Sequential(nn.Linear(2, 2), make(None))
    _CASTS[cast](model)
    checkpoint = {f"1.{k}": v.to("meta") for k, v in make((3,)).state_dict().items()}
    if load == "helper":
        protonorm.materialize_lazy_running_stats_from_state_dict(model, checkpoint)
    else:
        model.load_state_dict({**checkpoint, **{f"0.{k}": v for k, v in model[0].state_dict().items()}})
    assert model[1].mean.device.type == "meta" and model[1].count.device.type == "meta"


@pytest.mark.parametrize("move", ["to", "cpu", "to_empty", "to_with_dtype"])
def test_lazy_model_moved_to_the_cpu_takes_a_checkpoint_there(move):
    """A move to the CPU is a move, even for a model already there: the statistics are created where the model was
    moved, whatever device the checkpoint's tensors are on."""
    model = nn.Sequential(make(None))
    {"to": lambda: model.to("cpu"), "cpu": lambda: model.cpu(), "to_empty": lambda: model.to_empty(device="cpu"),
     "to_with_dtype": lambda: model.to("cpu", torch.float16)}[move]()
    checkpoint = {f"0.{k}": v.to("meta") for k, v in make((3,)).state_dict().items()}
    protonorm.materialize_lazy_running_stats_from_state_dict(model, checkpoint)
    assert model[0].mean.device.type == "cpu"


def test_returns_follow_statistics_a_checkpoint_moves():
    """load_state_dict(assign=True) takes the checkpoint's tensors, on their device: the returns go along (in their
    dtype, with their values), or every later step would meet returns on the old device. Meta stands in for CUDA."""
    r = RewardRunningMeanStd(None, (1,), 0.5, device="cpu", backend="torch")
    r.record_reward(torch.tensor([1.0, 2.0]), torch.zeros(2))
    r.load_state_dict({k: v.to("meta") for k, v in r.state_dict().items()}, assign=True)
    assert r.discounted_reward.device.type == "meta" and r.discounted_reward.dtype == torch.float32
    r.record_reward(torch.ones(2, device="meta"), torch.zeros(2, device="meta"))
    assert r.discounted_reward.shape == (2,) and r.count.device.type == "meta"


@pytest.mark.parametrize("assign", [False, True])
def test_load_into_a_used_module_with_swapped_buffers(backend_name, assign):
    """Under torch.__future__.set_swap_module_params_on_conversion(True) the loader swaps each buffer with the
    checkpoint's tensor; a module that has normalized and recorded before takes the checkpoint and goes on from it."""
    source = make((3,), "torch")
    source.record_moments(torch.randn(20, 3) * 2 + 1)
    checkpoint = {k: v.clone() for k, v in source.state_dict().items()}
    m = make((3,), backend_name)
    x = torch.randn(6, 3)
    m.train()
    m.normalize(x)
    m.record_moments(x)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.load_state_dict(checkpoint, assign=assign)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert torch.equal(m.mean, source.mean) and int(m.count) == int(source.count)
    m.record_moments(x)
    source.record_moments(x)
    torch.testing.assert_close(m.mean, source.mean, rtol=1e-12, atol=1e-12)  # same rows, float64 merges
    assert int(m.count) == int(source.count)


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("lazy", [False, True])
def test_count_saved_as_one_element_vector_loads_as_torch_s_loader_takes_it(lazy, assign):
    """torch's loader (so upstream's module) takes a [1] entry for a 0-d buffer; a [2] one is still refused."""
    source = make((3,))
    source.record_moments(torch.randn(20, 3))
    checkpoint = dict(source.state_dict(), count=source.count.reshape(1))
    m = make(None if lazy else (3,))
    m.load_state_dict(checkpoint, assign=assign)
    assert m.count.shape == () and int(m.count) == 21 and torch.equal(m.mean, source.mean)
    with pytest.raises(RuntimeError, match=r"count: expected shape \(\), got \(2,\)"):
        m.load_state_dict(dict(checkpoint, count=torch.tensor([5, 6])))
    assert int(m.count) == 21


def test_parent_dtype_casts_keep_float64_statistics():
    model = nn.Sequential(nn.Linear(2, 2))
    model.norm = make((2,))
    model.norm.record_moments(torch.tensor([[1e6 + 0.125, 1.0], [1e6, 3.0]]))
    before = stats(model.norm)
    model.half()
    assert model.norm.mean.dtype == torch.float64 and model.norm.count.dtype == torch.int64
    assert_stats_equal(stats(model.norm), before)


@pytest.mark.parametrize("shape,memory_format", [((2, 3, 2, 2), torch.channels_last),
                                                ((2, 2, 3, 1, 2), torch.channels_last_3d)])
def test_parent_memory_format_change_keeps_statistics_usable(backend_name, shape, memory_format):
    """``model.to(memory_format=...)`` restrides every 4-D (5-D) buffer; statistics of such a feature shape must
    stay contiguous and give the results of a module that was never restrided (upstream's elementwise math does)."""
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(5, *shape, generator=g) * 2 + 1 for _ in range(2)]
    plain = make(shape, backend_name).train()
    model = nn.Module()
    model.norm = make(shape, backend_name).train()
    model.norm.record_moments(batches[0])
    plain.record_moments(batches[0])
    model.to(memory_format=memory_format)
    assert model.norm.mean.is_contiguous() and model.norm.var.is_contiguous()
    for m in (model.norm, plain):
        m.normalize(batches[1])
        m.record_moments(batches[1])
    assert_stats_equal(stats(model.norm), stats(plain))
    assert torch.equal(model.norm.eval().normalize(batches[0]), plain.eval().normalize(batches[0]))


def test_deepcopy_and_pickle_are_independent(backend_name):
    m = make((4,), backend_name).train()
    x = torch.randn(8, 4)
    m.normalize(x)  # leaves a stash with a weak reference behind
    clone = copy.deepcopy(m)
    clone.record_moments(torch.randn(5, 4))
    assert int(m.count) == 1 and int(clone.count) == 6
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert_stats_equal(stats(loaded), stats(m))
    assert pickle.loads(pickle.dumps(m)).backend == m.backend


def test_unpickling_fills_in_module_attributes_an_older_torch_lacked():
    m = make((4,), "torch")
    state = m.__getstate__()
    del state["_state_dict_pre_hooks"], state["_forward_hooks_always_called"]
    restored = RunningMeanStd.__new__(RunningMeanStd)
    restored.__setstate__(state)
    assert list(restored.state_dict()) == ["mean", "var", "count"]


def test_default_cuda_device_falls_back_to_cpu_with_warning():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fallback cannot happen")  # pragma: no cover
    with pytest.warns(UserWarning, match="CUDA is not available"):
        m = RunningMeanStd(None, (2,))
    assert m.mean.device.type == "cpu"


@pytest.mark.parametrize("make_default", [lambda: RunningMeanStd(None, (2,)),
                                          lambda: RewardRunningMeanStd(None, (1,), 0.99)], ids=["obs", "reward"])
def test_cuda_fallback_warning_names_the_callers_line(make_default):
    """The warning points at the line that built the module, not into protonorm (the reward normalizer's
    constructor passes through its parent's)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fallback cannot happen")  # pragma: no cover
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_default()
    assert [(w.filename, w.category) for w in caught] == [(__file__, UserWarning)], [str(w) for w in caught]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_cpu_modules_ignore_another_default_device(backend, monkeypatch):
    """Training scripts often call torch.set_default_device("cuda"); a module whose statistics live on the CPU must
    still make every tensor of its own there (scratch, recycled outputs, the square-root check) and give the same
    results. The meta device stands in for CUDA here."""
    if backends.load(backend)[0] is None:
        pytest.skip(f"{backend} backend unavailable")
    from protonorm.backends import cpp_backend

    monkeypatch.setattr(cpp_backend, "_torch_sqrt", None)  # the square-root check runs again, in the loop below
    monkeypatch.setattr(cpp_backend._scratch, "stats", {}, raising=False)  # and the statistics' scratch is made anew
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(3)
    large, small = torch.randn(3000, 40, generator=g) * 2 + 1, torch.randn(5, 40, generator=g)
    reward, done = torch.randn(64, generator=g), torch.rand(64, generator=g) < 0.1
    wanted, got = [], []
    for default in (cpu, torch.device("meta")):
        torch.set_default_device(default)
        try:
            m = RunningMeanStd(None, None, device="cpu", clamp_value=5.0, backend=backend)
            r = RewardRunningMeanStd(None, (1,), gamma=0.99, device="cpu", backend=backend)
            outs = []
            for x in (large, small, large):
                outs.append(m.normalize(x))
                m.record_moments(x)
            with torch.inference_mode():
                outs.append(m.normalize(large))
            r.record_reward(reward, done)
            outs.append(r.normalize(reward[:, None]))
            combined = protonorm.combine_moments([m.mean, r.mean.expand(40)], [m.var, r.var.expand(40)],
                                                 [m.count, r.count])
            results = outs + [*stats(m), *stats(r), *combined]
        finally:
            torch.set_default_device(None)
        assert all(t.device == cpu for t in results)
        (wanted if default == cpu else got).append(results)
    for a, b in zip(wanted[0], got[0]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ema", [None, 0.9])
def test_update_from_moments_matches_recording(ema):
    x = torch.randn(10, 3, dtype=torch.float64)
    a, b = make((3,), ema_decay=ema), make((3,), ema_decay=ema)
    a.record_moments(x)
    b.update_from_moments(x.mean(0), x.var(0, unbiased=False), 10)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(a.var, b.var, rtol=1e-12, atol=1e-14)
    assert torch.equal(a.count, b.count)


def test_maybe_clamp():
    assert torch.equal(make((1,), clamp_value=2.0).maybe_clamp(torch.tensor([-3.0, 1.0, 3.0])), torch.tensor([-2.0, 1.0, 2.0]))
    x = torch.tensor([100.0])
    assert make((1,)).maybe_clamp(x) is x


@pytest.mark.parametrize("training", [False, True])
def test_clamp_beyond_the_clamped_dtype_raises_as_upstream(backend_name, training):
    """torch.clamp (upstream) refuses a finite bound its tensor cannot hold: the output's dtype, or the input's for
    un_norm. The kernels would clamp at inf instead."""
    m = make((2,), backend_name, clamp_value=1e39).train(training)
    x = torch.randn(8, 2)
    m.record_moments(x)
    before = stats(m)
    for _ in range(2):  # the second call would take the direct way
        with pytest.raises(RuntimeError, match="float32 without overflow"):
            m.normalize(x)
    assert m.normalize(x.double()).dtype == torch.float64  # float64 holds 1e39
    m.clamp_value = 7e4
    with pytest.raises(RuntimeError, match="float16 without overflow"):
        m.normalize(x.half(), un_norm=True)
    assert m.normalize(x.half()).dtype == torch.float32
    m.clamp_value = float("inf")  # no bound, as torch.clamp takes it
    unbounded = m.normalize(x, un_norm=True)
    m.clamp_value = None
    assert torch.equal(unbounded, m.normalize(x, un_norm=True))
    assert_stats_equal(stats(m), before)  # nothing recorded by the refused (or any) normalize


@pytest.mark.parametrize("dtype,clamp_value", [
    (torch.float16, 1 + 2.0**-11), (torch.float16, 1 + 3 * 2.0**-11), (torch.float16, 2.0**-25),
    (torch.float16, 3 * 2.0**-25), (torch.float16, 3e-6), (torch.float16, 6e4),
    (torch.bfloat16, 1 + 2.0**-8), (torch.bfloat16, 1 + 3 * 2.0**-8), (torch.bfloat16, 0.7), (torch.bfloat16, 3e38),
], ids=str)
def test_un_norm_clamps_16_bit_input_at_the_bound_rounded_as_torch_rounds_it(backend_name, dtype, clamp_value):
    """un_norm clamps a float16 / bfloat16 input in its own dtype, as torch.clamp on it does: at the bound rounded to
    that dtype, to nearest with ties to even. Bounds halfway between two values (of either dtype), subnormal halves
    and large ones; the inputs are the values on both sides of the bound and at it. (No subnormal bfloat16: Triton's
    interpreter flushes them to zero as it loads them.)"""
    bound = torch.tensor(clamp_value, dtype=torch.float32)
    steps = torch.tensor([1 - 2.0**-7, 1 - 2.0**-9, 1 - 2.0**-11, 1.0, 1 + 2.0**-11, 1 + 2.0**-9, 1 + 2.0**-7, 2.0])
    near = (bound * steps).to(dtype)
    x = torch.cat([near, -near, torch.tensor([0.0, float("inf"), float("nan")], dtype=dtype)])[None, :].repeat(3, 1)
    m = make((x.shape[1],), backend_name, clamp_value=clamp_value).eval()
    assert_same(m.normalize(x, un_norm=True), expected_normalize(backend_name, x, m.mean, m.var, m.epsilon,
                                                                 clamp_value, un_norm=True))


@pytest.mark.parametrize("dtype,expected", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                            (torch.float16, torch.float32), (torch.float64, torch.float64)])
def test_normalize_output_dtype_is_upstreams(backend_name, dtype, expected):
    m = make((3,), backend_name).eval()
    assert m.normalize(torch.randn(4, 3).to(dtype)).dtype == expected


def test_normalize_broadcasts_leading_dims_and_unbatched_input(backend_name):
    m = make((3,), backend_name, clamp_value=5.0).eval()
    m.record_moments(torch.randn(50, 3) * 2 + 1)
    x = torch.randn(4, 5, 3)
    torch.testing.assert_close(m.normalize(x), m.normalize(x.reshape(20, 3)).reshape(4, 5, 3), rtol=0, atol=0)
    torch.testing.assert_close(m.normalize(x[0, 0]), m.normalize(x[:1, 0])[0], rtol=0, atol=0)
    torch.testing.assert_close(m.normalize(m.normalize(x), un_norm=True), x, rtol=1e-5, atol=1e-5)


def test_features_of_zero_width(backend_name):
    if backend_name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        import triton

        if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 3):
            # Before 3.3, tl.store asks ``if not mask``, which under the interpreter is the mask's value: a mask of
            # one false element stores unmasked, here through the null pointer of a zero-width buffer (a segfault).
            pytest.skip(f"Triton {triton.__version__}'s interpreter ignores a one-element false store mask")
    m = make((2, 0), backend_name)
    m.record_moments(torch.randn(17, 2, 0))
    assert int(m.count) == 18  # rows without features still count, as upstream's
    for un_norm in (False, True):
        assert m.normalize(torch.randn(3, 5, 2, 0), un_norm=un_norm).shape == (3, 5, 2, 0)
        assert m.normalize(torch.randn(2, 0), un_norm=un_norm).shape == (2, 0)


def test_strided_rows(backend_name):
    wide = torch.randn(33, 11) * 3 + 7
    view = wide[:, 2:9]  # row stride 11, last stride 1
    a, b = make((7,), backend_name), make((7,), "torch")
    a.record_moments(view)
    b.record_moments(view.contiguous())
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.var, b.var, rtol=1e-10, atol=1e-12)
    a.eval(), b.eval()
    assert_same(a.normalize(view), expected_normalize(backend_name, view.contiguous(), a.mean, a.var, a.epsilon, None))
    col = wide.t()[:7]  # last stride 11: copied, not misread
    assert_same(a.normalize(col.t()), expected_normalize(backend_name, col.t().contiguous(), a.mean, a.var, a.epsilon,
                                                         None))


# ------------------------------------------------------------------------------------------------ EMA and reward
def test_ema_mode_leaves_count_untouched(backend_name):
    m = make((2,), backend_name, ema_decay=0.5)
    m.record_moments(torch.tensor([[2.0, 4.0], [4.0, 8.0]]))
    torch.testing.assert_close(m.mean, torch.tensor([1.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(m.var, torch.tensor([1.0, 2.5], dtype=torch.float64))
    assert int(m.count) == 1


def test_reward_normalizer_semantics(backend_name):
    r = RewardRunningMeanStd(None, (1,), 0.5, device="cpu", backend=backend_name, clamp_value=100.0)
    ref = RewardRunningMeanStd(None, (1,), 0.5, device="cpu", backend="torch", clamp_value=100.0)
    rewards = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 4.0, 2.0])]
    dones = [torch.tensor([False, False, False]), torch.tensor([True, False, False]), torch.tensor([0.0, 0.0, 1.0])]
    returns = torch.zeros(3)
    seen = []
    for rew, done in zip(rewards, dones):
        returns = torch.where(done.bool(), torch.zeros(3), returns * 0.5) + rew if seen else rew.clone()
        seen.append(returns.clone())
        r.record_reward(rew, done)
        ref.record_reward(rew, done)
    torch.testing.assert_close(r.discounted_reward, seen[-1])
    all_returns = torch.cat(seen).double()
    t_mean, t_var, t_count = truth([all_returns[:, None]])
    torch.testing.assert_close(r.mean, torch.from_numpy(t_mean), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.var, torch.from_numpy(t_var), rtol=1e-10, atol=1e-12)
    assert int(r.count) == t_count
    buf = torch.randn(4, 3)  # (steps, envs): scale only, no mean shift
    for un_norm in (False, True):
        expected = expected_normalize(backend_name, buf, torch.zeros_like(r.mean), r.var, r.epsilon, None, un_norm)
        assert_same(r.normalize(buf, un_norm=un_norm), expected)
        assert_same(r.normalize(buf[..., None], un_norm=un_norm), expected[..., None])
    assert "discounted_reward" not in r.state_dict()


def test_a_reset_clears_a_nonfinite_return(backend_name):
    """An environment whose return went NaN or inf starts again at its reward when it terminates; the others are
    unaffected, and only the steps holding non-finite returns are left out of the statistics."""
    r = RewardRunningMeanStd(None, (1,), 0.5, device="cpu", backend=backend_name)
    r.record_reward(torch.tensor([1.0, float("nan"), float("inf"), 2.0]), torch.zeros(4, dtype=torch.bool))
    r.record_reward(torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.zeros(4, dtype=torch.bool))  # still NaN and inf
    r.record_reward(torch.tensor([1.0, 3.0, 4.0, 1.0]), torch.tensor([False, True, True, False]))
    assert torch.equal(r.discounted_reward, torch.tensor([1.75, 3.0, 4.0, 2.0]))
    assert int(r.nonfinite_rows) == 4
    expected = truth([torch.tensor([[1.0], [2.0], [1.5], [2.0], [1.75], [3.0], [4.0], [2.0]], dtype=torch.float64)])
    assert int(r.count) == expected[2]
    assert_close_rel(r.mean, expected[0], 1e-12, "mean")


# ------------------------------------------------------------------------------------------------ fused two-call path
def test_normalize_then_record_reuses_moments_and_matches_separate_calls(backend_name):
    g = torch.Generator().manual_seed(1)
    fused, plain = make((9,), backend_name, clamp_value=5.0).train(), make((9,), backend_name, clamp_value=5.0).eval()
    for _ in range(3):
        x = torch.randn(40, 9, generator=g) * 2 + 3
        y_fused = fused.normalize(x)
        assert fused._stash.moments is not None
        fused.record_moments(x)
        assert fused._stash.moments is None  # consumed
        y_plain = plain.normalize(x)
        plain.record_moments(x)
        torch.testing.assert_close(y_fused, y_plain, rtol=0, atol=0)
    torch.testing.assert_close(fused.mean, plain.mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(fused.var, plain.var, rtol=1e-11, atol=1e-13)
    assert torch.equal(fused.count, plain.count)


def test_in_place_change_between_normalize_and_record_is_noticed(backend_name):
    m, ref = make((3,), backend_name).train(), make((3,), "torch")
    x = torch.zeros(4, 3)
    m.normalize(x)
    x.add_(10.0)  # bumps the version counter: the stashed moments no longer describe x
    m.record_moments(x)
    ref.record_moments(x)
    torch.testing.assert_close(m.mean, ref.mean, rtol=1e-12, atol=0)


def test_record_after_normalize_of_another_tensor_recomputes(backend_name):
    m, ref = make((3,), backend_name).train(), make((3,), "torch")
    a, b = torch.zeros(4, 3), torch.ones(4, 3)
    m.normalize(a)
    m.record_moments(b)
    m.record_moments(b)  # the same tensor twice counts twice, as upstream
    ref.record_moments(b)
    ref.record_moments(b)
    assert torch.equal(m.count, ref.count) and torch.equal(m.mean, ref.mean)


# ------------------------------------------------------------------------------------------------ non-finite, mask, empty
def test_nonfinite_rows_are_dropped_and_counted(backend_name):
    x = torch.randn(10, 4)
    x[2, 1] = float("nan")
    x[7, 3] = float("-inf")
    m, ref = make((4,), backend_name), make((4,), "torch")
    m.record_moments(x)
    ref.record_moments(torch.cat([x[:2], x[3:7], x[8:]]))
    assert int(m.count) == 9 and int(m.nonfinite_rows) == 2
    torch.testing.assert_close(m.mean, ref.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.var, ref.var, rtol=1e-10, atol=1e-12)
    assert "nonfinite_rows" not in m.state_dict()


def test_nonfinite_raise_leaves_statistics_untouched(backend_name):
    m = make((2,), backend_name, nonfinite="raise")
    m.record_moments(torch.randn(5, 2))
    before = stats(m)
    with pytest.raises(ValueError, match="1 row"):
        m.record_moments(torch.tensor([[1.0, float("inf")], [0.0, 0.0]]))
    assert_stats_equal(stats(m), before)


def test_nonfinite_raise_after_a_training_normalize(backend_name):
    """The moments a training-mode normalize kept are checked like any others: a NaN row still raises at record."""
    m = make((3,), backend_name, nonfinite="raise").train()
    m.record_moments(torch.randn(5, 3))
    before = stats(m)
    x = torch.randn(6, 3)
    x[4, 1] = float("nan")
    m.normalize(x)
    with pytest.raises(ValueError, match="1 row"):
        m.record_moments(x)
    assert_stats_equal(stats(m), before)


def test_nonfinite_raise_refuses_the_whole_reward_step(backend_name):
    """The step is refused: statistics and discounted returns stay as they were, so a retry with good rewards
    advances the returns once."""
    r = RewardRunningMeanStd(None, (1,), 0.5, device="cpu", backend=backend_name, nonfinite="raise")
    with pytest.raises(ValueError, match="1 row"):
        r.record_reward(torch.tensor([1.0, float("nan")]), torch.zeros(2))
    assert r.discounted_reward is None
    r.record_reward(torch.tensor([1.0, 2.0]), torch.zeros(2))
    before, returns = stats(r), r.discounted_reward.clone()
    with pytest.raises(ValueError, match="1 row"):
        r.record_reward(torch.tensor([float("inf"), 1.0]), torch.zeros(2))
    assert_stats_equal(stats(r), before)
    assert torch.equal(r.discounted_reward, returns)
    r.record_reward(torch.tensor([1.0, 1.0]), torch.zeros(2))
    assert torch.equal(r.discounted_reward, torch.tensor([1.5, 2.0]))


def test_mask_ignores_rows(backend_name):
    x = torch.randn(12, 3)
    mask = torch.arange(12) % 3 != 0
    m, ref = make((3,), backend_name), make((3,), "torch")
    m.record_moments(x, mask=mask)
    ref.record_moments(x[mask])
    assert int(m.count) == 9 and int(m.nonfinite_rows) == 0
    torch.testing.assert_close(m.mean, ref.mean, rtol=1e-12, atol=1e-12)
    m.record_moments(x, mask=torch.zeros(12, dtype=torch.bool))
    assert int(m.count) == 9


@pytest.mark.parametrize("features", [5, 1])
def test_masks_with_a_row_stride_and_after_a_training_normalize(backend_name, features):
    """A mask that is a column of a wider bool tensor (row stride 2) selects the right rows, and a masked record
    after a training-mode normalize of the same batch counts only the rows the mask keeps."""
    x = torch.randn(37, features, generator=torch.Generator().manual_seed(5)) * 2 + 1
    flags = torch.rand(37, 2, generator=torch.Generator().manual_seed(6)) < 0.5
    mask = flags[:, 0]
    assert mask.stride() == (2,)
    expected = truth([x[mask].double()])
    for train_first in (False, True):
        m = make((features,), backend_name).train()
        if train_first:
            m.normalize(x)
        m.record_moments(x, mask=mask)
        assert int(m.count) == expected[2]
        assert_close_rel(m.mean, expected[0], 1e-12, "mean")
        assert_close_rel(m.var, expected[1], 1e-10, "var")


@pytest.mark.parametrize("call", ["masked", "dropped", "normalize_then_record", "reward"])
def test_rows_left_out_do_not_disturb_the_others(backend_name, call):
    """Rows a record leaves out (masked out, or dropped for a NaN) may hold anything else, here +-1e30: the other
    rows' moments keep the hard-data accuracy. The rows left out start the batch and the later row splits of
    every backend (Triton, interpreted, takes 128-row blocks of these 300 features, 3 splits of 384 rows), and
    fill the whole first block of one split."""
    rows, features = 1000, 300
    rng = np.random.default_rng(3)
    x = torch.from_numpy(1e4 + 1e-2 * rng.standard_normal((rows, features))).float()
    left_out = torch.zeros(rows, dtype=torch.bool)
    left_out[[0, 1, 383, 384, 767, 768, 999]] = True
    left_out[384:512] = True
    x[left_out] = torch.where(torch.arange(features) % 2 == 0, 1e30, -1e30)
    if call != "masked":
        x[left_out, 0] = float("nan")
    kept = x[~left_out]
    if call == "reward":
        clean = torch.from_numpy(1e4 + 1e-2 * rng.standard_normal((rows, features))).float()
        m = RewardRunningMeanStd(None, (features,), 0.99, device="cpu", backend=backend_name)
        m.record_reward(clean, torch.zeros(rows, dtype=torch.bool))
        m.record_reward(x, torch.ones(rows, dtype=torch.bool))  # every return restarts: the new ones are x
        expected = truth([clean, kept])
    else:
        m = make((features,), backend_name)
        if call == "masked":
            m.record_moments(x, mask=~left_out)
        elif call == "dropped":
            m.record_moments(x)
        else:
            m.train()
            m.normalize(x)
            m.record_moments(x)
        expected = truth([kept])
    assert int(m.count) == expected[2]
    assert int(m.nonfinite_rows) == (0 if call == "masked" else int(left_out.sum()))
    assert_close_rel(m.mean, expected[0], MEAN_RTOL, "mean")
    assert_close_rel(m.var, expected[1], VAR_RTOL, "var")


def test_lazily_negated_views_are_read_as_their_values(backend_name):
    """A view with torch's negative bit (``.conj().imag`` of a complex tensor, ``torch._neg_view``) holds its values
    unnegated in memory; every backend must see the values."""
    wide = (torch.randn(64, 5, dtype=torch.complex64, generator=torch.Generator().manual_seed(4)) * 3 + 5j).conj().imag
    column = wide[:, :1]
    unit = torch._neg_view(torch.randn(64, 5) - 5)
    for x in (wide, column, unit):
        m, ref = make((x.shape[1],), backend_name).train(), make((x.shape[1],), "torch").train()
        plain = x.resolve_neg().clone()
        for module, batch in ((m, x), (ref, plain)):
            module.record_moments(batch)
            module.record_moments(batch)  # the direct way, once the layout exists
            if module is m:
                want = expected_normalize(backend_name, plain, m.mean, m.var, m.epsilon, None)
                assert_same(m.normalize(batch), want)
            else:
                module.normalize(batch)
            module.record_moments(batch)
        torch.testing.assert_close(m.mean, ref.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.var, ref.var, rtol=1e-10, atol=1e-12)
    r, ref = (RewardRunningMeanStd(None, (1,), 0.9, device="cpu", backend=b) for b in (backend_name, "torch"))
    for step in range(3):
        reward = torch._neg_view(torch.full((8,), 2.0 + step))
        r.record_reward(reward, torch.zeros(8, dtype=torch.bool))
        ref.record_reward(reward.resolve_neg(), torch.zeros(8, dtype=torch.bool))
    assert torch.equal(r.discounted_reward, ref.discounted_reward)
    torch.testing.assert_close(r.mean, ref.mean, rtol=1e-12, atol=1e-12)


def test_loaded_statistics_sharing_memory_are_made_separate(backend_name):
    """load_state_dict(assign=True) of expanded (stride-0) statistics: the module holds separate elements, so the
    kernels' in-place updates stay per feature."""
    m, ref = make((4,), backend_name), make((4,), "torch")
    checkpoint = {"mean": torch.zeros(1, dtype=torch.float64).expand(4), "var": torch.ones(1, dtype=torch.float64).expand(4),
                  "count": torch.tensor(1)}
    m.load_state_dict(checkpoint, assign=True)
    x = torch.randn(30, 4) * torch.arange(1, 5) + torch.arange(4)
    m.record_moments(x)
    ref.record_moments(x)
    assert m.mean.stride() == (1,) and m.var.stride() == (1,)
    torch.testing.assert_close(m.mean, ref.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.var, ref.var, rtol=1e-10, atol=1e-12)


def _overflowing_rows(rows):
    """Float64 rows whose first column deviates from its mean (1e200) by 5e199, whose square is past float64's
    range, the second a plain one."""
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(rows // 2)
    return torch.stack([1e200 + sign * 5e199, torch.arange(rows, dtype=torch.float64) % 7], dim=1)


@pytest.mark.parametrize("ema", [None, 0.9])
@pytest.mark.parametrize("case", ["rows", "masked", "reward"])
def test_squared_deviations_beyond_float64_give_an_infinite_variance(backend_name, case, ema):
    """Deviations of 1e154 and more square to inf in float64: the variance is then +inf, as the reference computes
    it for the batch in one part (and upstream's torch.var), on every backend, not NaN; an empty part (rows masked
    out ahead of them, in every backend's split of 70000 rows) merges as the neutral element it is. The other
    column and the mean are those of the reference, to 1e-12 of their scale (summation order differs)."""
    if case == "reward":
        m = RewardRunningMeanStd(None, (1,), 0.99, device="cpu", backend=backend_name, ema_decay=ema)
        x = _overflowing_rows(64)[:, :1]
        for _ in range(2):
            m.record_reward(x[:, 0], torch.ones(64, dtype=torch.bool))  # every step restarts: the returns are x
        parts = torch.cat([reference.batch_moments(x)] * 2)
    else:
        m = make((2,), backend_name, ema_decay=ema)
        x = _overflowing_rows(70000 if case == "masked" else 64)
        mask = torch.arange(x.shape[0]) >= 65536 if case == "masked" else None
        m.record_moments(x, mask)
        parts = reference.batch_moments(x if mask is None else x[mask])
    want = make((x.shape[1],), "torch", ema_decay=ema)
    for part in parts.split(1):
        reference.merge_into_running(part, want.mean, want.var, want.count, want.nonfinite_rows, ema)
    assert torch.isinf(want.var[0]) and want.var[0] > 0
    assert torch.equal(m.var[0], want.var[0]) and torch.equal(m.count, want.count)
    assert abs(float(m.mean[0] - want.mean[0])) <= 1e-12 * 1e200
    torch.testing.assert_close(m.mean[1:], want.mean[1:], rtol=1e-12, atol=0)
    torch.testing.assert_close(m.var[1:], want.var[1:], rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["rows", "one_column", "reward"])
def test_statistics_of_count_zero_take_a_batch_whose_mean_is_far_from_theirs(backend_name, case):
    """Statistics loaded with a count of 0 take the next batch as it is, also where its mean (1e160) is so far from
    theirs (0) that the squared difference overflows float64: the merge's cross term has weight 0 there, and adds 0,
    not inf * 0 = NaN, as the reference's chan_merge. The batch's own squares stay finite (deviations of 1e145)."""
    d = 1 if case == "one_column" else 2
    steps = torch.arange(64, dtype=torch.float64)
    x = torch.stack([1e160 * (1 + 2.0**-50 * (steps % 5)), steps % 7], dim=1)[:, :d]
    if case == "reward":
        m = RewardRunningMeanStd(None, (d,), 0.99, device="cpu", backend=backend_name)
    else:
        m = make((d,), backend_name)
    state = m.state_dict()
    state["count"] = torch.tensor(0)
    m.load_state_dict(state)
    mean, var = m.mean.clone(), m.var.clone()
    if case == "reward":  # the first step: the returns are the rewards
        m.record_reward(x, torch.zeros(64, dtype=torch.bool))
    else:
        m.record_moments(x)
    reference.merge_into_running(reference.batch_moments(x), mean, var, torch.tensor(0), torch.tensor(0), None)
    assert torch.isfinite(var).all() and int(m.count) == 64
    torch.testing.assert_close(m.mean, mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(m.var, var, rtol=1e-9, atol=0)


@pytest.mark.parametrize("ema", [None, 0.9])
def test_empty_batch_is_a_noop(backend_name, ema):
    m = make((3,), backend_name, ema_decay=ema)
    m.record_moments(torch.randn(4, 3))
    before = stats(m)
    m.record_moments(torch.empty(0, 3))
    assert_stats_equal(stats(m), before)
    assert m.normalize(torch.empty(0, 3)).shape == (0, 3)


# ------------------------------------------------------------------------------------------------ bad input
def _bad_calls():
    return [
        ("feature shape", lambda m: m.record_moments(torch.randn(4, 5)), ValueError, r"\(3,\)"),
        ("3-D record", lambda m: m.record_moments(torch.randn(2, 4, 3)), ValueError, "feature shape"),
        ("0-d", lambda m: m.record_moments(torch.tensor(1.0)), ValueError, "0-d"),
        ("normalize shape", lambda m: m.normalize(torch.randn(4, 5)), ValueError, "trailing dimensions"),
        ("mask dtype", lambda m: m.record_moments(torch.randn(4, 3), mask=torch.ones(4)), TypeError, "bool"),
        ("mask length", lambda m: m.record_moments(torch.randn(4, 3), mask=torch.ones(3, dtype=torch.bool)), ValueError, r"\[4\]"),
        ("mask device", lambda m: m.record_moments(torch.randn(4, 3), mask=torch.ones(4, dtype=torch.bool, device="meta")),
         ValueError, "mask: expected a tensor on cpu, got one on meta"),
        ("moments shape", lambda m: m.update_from_moments(torch.zeros(2), torch.ones(3), 4), ValueError, "batch_mean"),
        ("integer record", lambda m: m.record_moments(torch.ones(4, 3, dtype=torch.long)), TypeError, "int64"),
        ("bool record", lambda m: m.record_moments(torch.ones(4, 3, dtype=torch.bool)), TypeError, "floating-point"),
        ("complex record", lambda m: m.record_moments(torch.ones(4, 3, dtype=torch.complex64)), TypeError, "complex64"),
        ("bool normalize", lambda m: m.train().normalize(torch.ones(4, 3, dtype=torch.bool)), TypeError, "bool"),
        ("complex normalize", lambda m: m.normalize(torch.ones(4, 3, dtype=torch.complex64)), TypeError, "complex"),
        ("numpy normalize", lambda m: m.train().normalize(np.ones((4, 3), np.float32)), TypeError,
         "^normalize: expected a tensor, got ndarray$"),
        ("list eval normalize", lambda m: m.eval().normalize([1.0, 2.0, 3.0]), TypeError,
         "^normalize: expected a tensor, got list$"),
        ("numpy un_norm", lambda m: m.normalize(np.ones((4, 3), np.float32), un_norm=True), TypeError,
         "^normalize: expected a tensor, got ndarray$"),
        # (the backends' direct calls decline a device or dtype their kernels do not take; the module leaves it to them)
        ("normalize device", lambda m: m.train().normalize(torch.ones(4, 3, device="meta")), ValueError,
         "normalize: the input is on meta but the statistics are on cpu"),
    ]


@pytest.mark.parametrize("what,call,error,pattern", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_and_leaves_statistics(backend_name, what, call, error, pattern):
    m = make((3,), backend_name)
    m.record_moments(torch.randn(6, 3))
    before = stats(m)
    with pytest.raises(error, match=pattern):
        call(m)
    assert_stats_equal(stats(m), before)


def test_reward_bad_terminated_raises_and_leaves_statistics(backend_name):
    r = RewardRunningMeanStd(None, (1,), 0.99, device="cpu", backend=backend_name)
    r.record_reward(torch.ones(4), torch.zeros(4))
    before, returns = stats(r), r.discounted_reward.clone()
    with pytest.raises(ValueError, match="one entry per environment"):
        r.record_reward(torch.ones(4), torch.zeros(3))
    with pytest.raises(ValueError, match="like the previous steps"):
        r.record_reward(torch.ones(5), torch.zeros(5))
    with pytest.raises(TypeError, match="int64"):
        r.record_reward(torch.ones(4, dtype=torch.long), torch.zeros(4))
    with pytest.raises(TypeError, match="complex64"):
        r.record_reward(torch.ones(4), torch.zeros(4, dtype=torch.complex64))
    for flags in (None, "done", [None] * 4):  # (the direct way declines what is no tensor)
        with pytest.raises(TypeError, match=r"^record_reward: expected terminated as .*flags, got "):
            r.record_reward(torch.ones(4), flags)
    assert_stats_equal(stats(r), before)
    assert torch.equal(r.discounted_reward, returns)


@pytest.mark.parametrize("flag_dtype", [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
                                        torch.float8_e5m2], ids=str)
def test_reward_flags_of_any_real_dtype_restart_where_nonzero(backend_name, flag_dtype):
    """Flags of a dtype the kernels do not load (unsigned integers wider than a byte, float8) restart the returns
    where they are nonzero, as the same flags as bool do (upstream's ``1 - terminated.float()`` takes them all)."""
    got, want = (RewardRunningMeanStd(None, (1,), 0.5, device="cpu", backend=backend_name) for _ in range(2))
    g = torch.Generator().manual_seed(4)
    for _ in range(3):  # the first step takes no flags; the direct way serves the later ones
        reward, done = torch.randn(6, generator=g), torch.rand(6, generator=g) < 0.5
        got.record_reward(reward, done.to(flag_dtype))
        want.record_reward(reward, done)
    for a, b in zip(stats(got) + (got.discounted_reward,), stats(want) + (want.discounted_reward,)):
        assert_same(a, b)


@pytest.mark.parametrize("flag_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("features", [(1,), (3,)], ids=["one_feature", "three_features"])
def test_negative_zero_flags_do_not_restart_the_returns(backend_name, flag_dtype, features):
    """A flag of -0.0 is zero (``-0.0 != 0`` is False, and upstream's ``1 - terminated`` keeps the return), in every
    floating-point dtype the kernels load flags in, bit patterns and all."""
    got, want = (RewardRunningMeanStd(None, features, 0.5, device="cpu", backend=backend_name) for _ in range(2))
    g = torch.Generator().manual_seed(5)
    for _ in range(3):  # the first step takes no flags; the direct way serves the later ones
        reward = torch.randn(8, *features, generator=g).squeeze(-1) if features == (1,) else torch.randn(8, *features)
        flags = torch.tensor([-0.0, 0.0, 1.0, -0.0, -1.0, -0.0, 0.0, 2.0], dtype=flag_dtype)
        got.record_reward(reward, flags)
        want.record_reward(reward, flags != 0)
    for a, b in zip(stats(got) + (got.discounted_reward,), stats(want) + (want.discounted_reward,)):
        assert_same(a, b)


def test_integer_first_batches_leave_a_lazy_module_uninitialized():
    m = RunningMeanStd(None, None, device="cpu")
    with pytest.raises(TypeError, match="int64"):
        m.record_moments(torch.ones(4, 3, dtype=torch.long))
    m.record_moments(torch.ones(4, 5))
    assert m.mean.shape == (5,)
    r = RewardRunningMeanStd(None, (1,), 0.99, device="cpu")
    with pytest.raises(TypeError, match="int32"):
        r.record_reward(torch.ones(4, dtype=torch.int32), torch.zeros(4))
    assert r.discounted_reward is None


def _refused_first_calls():
    bool_rows, complex_rows = torch.ones(4, 3, dtype=torch.bool), torch.ones(4, 3, dtype=torch.complex64)
    nan_row = torch.ones(4, 3).index_fill_(0, torch.tensor([2]), float("nan"))
    return [
        ("bool normalize", {}, lambda m: m.train().normalize(bool_rows), TypeError, "bool"),
        ("bool eval normalize", {}, lambda m: m.eval().normalize(bool_rows), TypeError, "bool"),
        ("complex un_norm", {}, lambda m: m.normalize(complex_rows, un_norm=True), TypeError, "complex"),
        ("clamp beyond float32", {"clamp_value": 1e39}, lambda m: m.normalize(torch.ones(4, 3)), RuntimeError, "float32"),
        ("clamp beyond float16 un_norm", {"clamp_value": 1e5},
         lambda m: m.normalize(torch.ones(4, 3, dtype=torch.float16), un_norm=True), RuntimeError, "float16"),
        ("mask length", {}, lambda m: m.record_moments(torch.ones(4, 3), mask=torch.ones(3, dtype=torch.bool)),
         ValueError, r"\[4\]"),
        ("mask dtype", {}, lambda m: m.record_moments(torch.ones(4, 3), mask=torch.ones(4)), TypeError, "bool"),
        ("mask device", {}, lambda m: m.record_moments(torch.ones(4, 3), mask=torch.ones(4, dtype=torch.bool, device="meta")),
         ValueError, "mask: expected a tensor on cpu, got one on meta"),
        ("terminated length", {"gamma": 0.9}, lambda m: m.record_reward(torch.ones(4, 3), torch.zeros(3)),
         ValueError, "one entry per environment"),
        ("complex terminated", {"gamma": 0.9},
         lambda m: m.record_reward(torch.ones(4, 3), torch.zeros(4, dtype=torch.complex64)), TypeError, "complex64"),
        ("bool reward normalize", {"gamma": 0.9}, lambda m: m.normalize(bool_rows), TypeError, "bool"),
        ("numpy normalize", {}, lambda m: m.normalize(bool_rows.float().numpy()), TypeError, "got ndarray"),
        ("list reward normalize", {"gamma": 0.9}, lambda m: m.normalize([[1.0, 2.0, 3.0]]), TypeError, "got list"),
        ("non-finite record", {"nonfinite": "raise"}, lambda m: m.record_moments(nan_row), ValueError, "finite"),
        ("non-finite deferred record", {"nonfinite": "raise", "sync": "deferred"},
         lambda m: m.record_moments(nan_row), ValueError, "finite"),
        ("non-finite reward", {"gamma": 0.9, "nonfinite": "raise"},
         lambda m: m.record_reward(nan_row, torch.zeros(4)), ValueError, "finite"),
    ]


@pytest.mark.parametrize("what,kwargs,call,error,pattern", _refused_first_calls(),
                         ids=[c[0] for c in _refused_first_calls()])
def test_a_refused_first_call_leaves_a_lazy_module_lazy(backend_name, what, kwargs, call, error, pattern):
    """A lazy module takes its shape from its first batch only if the call goes through: after a refused one it
    has no statistics (none in its state_dict) and a batch of another shape still initializes it."""
    cls = RewardRunningMeanStd if "gamma" in kwargs else RunningMeanStd
    m = cls(None, shape=None, device="cpu", backend=backend_name, **kwargs)
    with pytest.raises(error, match=pattern):
        call(m)
    assert not m._initialized and m.shape is None and list(m.state_dict()) == []
    if cls is RewardRunningMeanStd:
        assert m.discounted_reward is None
        m.record_reward(torch.ones(4, 5), torch.zeros(4))
    else:
        m.record_moments(torch.ones(4, 5))
    assert m.mean.shape == (5,) and int(m.count) == 5


@pytest.mark.parametrize("call", ["normalize", "eval normalize", "record_moments", "record_reward", "reward normalize"])
def test_a_first_call_whose_backend_cannot_run_leaves_a_lazy_module_lazy(monkeypatch, call):
    """``backend="triton"`` on a CPU tensor without Triton's interpreter raises once the shape is known; the module
    is then as lazy as before the call, and takes the shape of a batch its backend can run."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reward = "reward" in call
    m = (RewardRunningMeanStd(None, None, 0.9, device="cpu", backend="triton") if reward
         else RunningMeanStd(None, None, device="cpu", backend="triton"))
    x = torch.ones(4, 3)
    calls = {"normalize": lambda: m.train().normalize(x), "eval normalize": lambda: m.eval().normalize(x),
             "record_moments": lambda: m.record_moments(x), "record_reward": lambda: m.record_reward(x, torch.zeros(4)),
             "reward normalize": lambda: m.normalize(x)}
    with pytest.raises((ValueError, RuntimeError), match="triton"):
        calls[call]()
    assert not m._initialized and m.shape is None and list(m.state_dict()) == [] and not list(m.buffers())
    if reward:
        assert m.discounted_reward is None
    m.backend = "torch"
    m.record_moments(torch.ones(2, 5))
    assert m.mean.shape == (5,) and int(m.count) == 3


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"clamp_value": 0.0}, "clamp_value"),
        ({"clamp_value": -1.0}, "clamp_value"),
        ({"epsilon": -1e-8}, "epsilon"),
        ({"ema_decay": 0.0}, "ema_decay"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"backend": "cuda"}, "backend"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"sync": "sometimes"}, "sync"),
    ],
)
def test_constructor_rejects_out_of_range_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        RunningMeanStd(None, (2,), device="cpu", **kwargs)


@pytest.mark.parametrize("fabric,error,pattern", [
    ((342,), TypeError, r"^fabric: expected None, a Lightning Fabric, .*got tuple without world_size, global_rank, "
                        r"all_gather$"),
    (object(), TypeError, r"got object without world_size"),
    (types.SimpleNamespace(world_size=2, global_rank=0), TypeError, r"got SimpleNamespace without all_gather$"),
    ("defualt", ValueError, r"^fabric: expected 'default'"),
], ids=["shape-first", "object", "no-all_gather", "misspelt"])
def test_a_fabric_of_no_accepted_kind_is_refused_when_built_or_assigned(fabric, error, pattern):
    """``RunningMeanStd((342,))`` passes the shape as upstream's first argument, ``fabric``: refused at once, not at
    the first record after a lazy module took its shape from the batch."""
    for make in (lambda: RunningMeanStd(fabric), lambda: RewardRunningMeanStd(fabric, (1,), 0.9, device="cpu")):
        with pytest.raises(error, match=pattern):
            make()
    m = RunningMeanStd(None, (2,), device="cpu")
    with pytest.raises(error, match=pattern):
        m.fabric = fabric
    assert m.fabric is None
    with pytest.raises(error, match=pattern):
        protonorm.sync(RunningMeanStd(None, (2,), device="cpu", sync="deferred"), fabric=fabric)
    good = types.SimpleNamespace(world_size=1, global_rank=0, all_gather=lambda t: t[None])
    m.fabric = good
    m.record_moments(torch.ones(3, 2))
    assert m.fabric is good and int(m.count) == 1 + 3  # upstream starts counting at 1


@pytest.mark.parametrize("shape", ["342", "1", (2.5,), 3.0, (3, "4"), b"12"], ids=str)
def test_constructor_refuses_a_shape_of_other_than_integer_sizes(shape):
    """A string's characters or a float are no sizes (upstream's ``torch.zeros(shape)`` refuses them); read as ints
    they made statistics of another shape, ``"342"`` three dims (3, 4, 2)."""
    for make in (lambda: RunningMeanStd(None, shape, device="cpu"), lambda: RewardRunningMeanStd(None, shape, 0.9)):
        with pytest.raises(TypeError, match=r"^shape: expected a tuple of ints, got "):
            make()


@pytest.mark.parametrize("shape,want", [(3, (3,)), (np.int64(3), (3,)), ([2, 3], (2, 3)), (torch.Size([4]), (4,)),
                                        ((np.int32(2), torch.tensor(5)), (2, 5)), ((), ())], ids=str)
def test_constructor_takes_the_integer_shapes_torch_takes(shape, want):
    m = RunningMeanStd(None, shape, device="cpu")
    assert m.shape == want and m.mean.shape == want == torch.zeros(shape).shape


@pytest.mark.parametrize(
    "name,bad,good",
    [
        ("clamp_value", 0.0, 3.0),
        ("clamp_value", float("nan"), None),
        ("epsilon", -1e-8, 0.0),
        ("ema_decay", 1.0, 0.9),
        ("gamma", 1.5, 0.5),
        ("nonfinite", "ignore", "raise"),
        ("sync", "sometimes", "deferred"),
    ],
)
def test_hyperparameters_assigned_later_are_checked_like_the_constructor_s(name, bad, good):
    """Upstream's hyperparameters are plain attributes that callers may change; a bad value raises on assignment
    (the backends rely on the checked ranges: a clamp of 0 or NaN gave different outputs per backend) and leaves
    the old value."""
    r = RewardRunningMeanStd(None, (1,), 0.99, device="cpu", clamp_value=5.0)
    before = getattr(r, name)
    with pytest.raises(ValueError, match=name):
        setattr(r, name, bad)
    assert getattr(r, name) == before
    setattr(r, name, np.float64(good) if isinstance(good, float) else good)
    assert getattr(r, name) == good and type(getattr(r, name)) is type(good)


@pytest.mark.parametrize("number", [np.float32, np.float64, lambda v: torch.tensor(v), lambda v: torch.tensor([v])],
                         ids=["np.float32", "np.float64", "tensor", "tensor[1]"])
def test_hyperparameters_may_be_numpy_or_torch_numbers(number):
    """Upstream takes them as they come; they are kept here as Python numbers (a tensor would be read on the host
    at every call)."""
    m = RunningMeanStd(None, (2,), number(1e-5), "cpu", number(5.0), number(0.5))
    r = RewardRunningMeanStd(None, (1,), number(0.5), device="cpu", clamp_value=np.int64(3))
    values = (m.epsilon, m.clamp_value, m.ema_decay, r.gamma, r.clamp_value)
    assert all(type(v) in (int, float) for v in values), values
    assert values == pytest.approx((1e-5, 5.0, 0.5, 0.5, 3))
    m.record_moments(torch.randn(4, 2))
    r.record_reward(torch.ones(3), torch.zeros(3))


@pytest.mark.parametrize("gamma", [-0.1, 1.5])
def test_reward_rejects_gamma_out_of_range(gamma):
    with pytest.raises(ValueError, match="gamma"):
        RewardRunningMeanStd(None, (1,), gamma, device="cpu")


# ------------------------------------------------------------------------------------------------ backend choice
def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("PROTONORM_BACKEND", "torch")
    assert make((2,), backend="auto").backend == "torch"
    monkeypatch.setenv("PROTONORM_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PROTONORM_BACKEND"):
        make((2,), backend="auto")


def test_auto_picks_cpp_for_cpu_tensors_when_built():
    chosen = backends.resolve("auto", torch.device("cpu")).name
    assert chosen == ("cpp" if "cpp" in CPU_BACKENDS else "torch")


def test_triton_on_cpu_requires_the_interpreter(monkeypatch):
    if "triton" not in CPU_BACKENDS:
        pytest.fail("triton must be installed for the test suite")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        make((2,), "triton").record_moments(torch.ones(2, 2))


def test_auto_without_triton_on_cuda_says_so_once(monkeypatch, capsys):
    # As on a CUDA machine whose triton is missing or broken: auto runs CUDA tensors on the torch backend.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(backends._loaded, "triton", (None, "ModuleNotFoundError: No module named 'triton'"))
    monkeypatch.setattr(backends, "_announced", set(), raising=False)
    for device in ("cuda", "cuda:0", "cpu"):
        backends.preload("auto", device)
    backends.preload("triton", "cuda")  # an explicit choice raises at the call instead
    notices = [line for line in capsys.readouterr().err.splitlines() if "Triton" in line]
    assert notices == [
        "protonorm: Triton unavailable (ModuleNotFoundError: No module named 'triton'); CUDA tensors use the torch path."
    ]


@pytest.mark.parametrize("env,notice", [(None, True), ("auto", True), ("", True), ("torch", False), ("cpp", False),
                                        ("CPP", False), ("bogus", False)])
def test_import_says_cpu_tensors_use_the_torch_path_only_where_auto_runs_them(monkeypatch, capsys, env, notice):
    """Without the C++ extension, ``import protonorm`` says that CPU tensors take the torch path: true of
    ``backend="auto"``, but not where ``PROTONORM_BACKEND`` names a backend (``cpp`` raises at the call instead)."""
    monkeypatch.setitem(backends._loaded, "cpp", (None, "simulated: extension not built"))
    monkeypatch.setattr(backends, "_announced", set())
    if env is None:
        monkeypatch.delenv(backends.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(backends.ENV_VAR, env)
    backends.announce_at_import()
    backends.announce_at_import()
    said = "protonorm: C++ CPU extension unavailable (simulated: extension not built); CPU tensors use the torch path.\n"
    assert capsys.readouterr().err == (said if notice else "")


@pytest.mark.parametrize("gpu,problem", [
    ("sm_61", "Triton compiles for GPUs of compute capability 7.0 or newer, and cuda:0 (Tesla P100-PCIE-16GB) is 6.1"),
    ("rocm", "the Triton kernels are written for NVIDIA GPUs, and this torch is a ROCm build (HIP 6.2.41133)"),
    ("sm_70", None),
])
def test_auto_on_a_gpu_triton_cannot_compile_for_says_so_once(monkeypatch, capsys, gpu, problem):
    """On a GPU older than Triton's compute capability 7.0 (a P100), or with a ROCm build of torch, auto runs CUDA
    tensors on the torch backend and says why once, instead of failing in the compiler at the first call; an
    explicit backend="triton" raises saying why. Decided from what torch reports of the device, without a launch."""
    from protonorm.backends import triton_backend

    if triton_backend.UNAVAILABLE_REASON is not None:
        pytest.fail("triton must be installed for the test suite")
    monkeypatch.delenv("TRITON_INTERPRET")  # compiled kernels, as on a GPU
    monkeypatch.setattr(triton_backend, "_gpu_problems", {}, raising=False)
    monkeypatch.setattr(backends, "_announced", set())
    major, minor = (6, 1) if gpu == "sm_61" else (7, 0)
    properties = types.SimpleNamespace(major=major, minor=minor, name="Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: properties)
    monkeypatch.setattr(torch.version, "hip", "6.2.41133" if gpu == "rocm" else None)
    cuda = torch.device("cuda", 0)
    assert triton_backend.BACKEND.supports(cuda) == problem
    for _ in range(2):
        assert backends.resolve("auto", cuda).name == ("torch" if problem else "triton")
    notices = [line for line in capsys.readouterr().err.splitlines() if "Triton" in line]
    if problem is None:
        assert notices == [] and backends.resolve("triton", cuda).name == "triton"
        return
    assert notices == [f"protonorm: Triton unavailable ({problem}); CUDA tensors use the torch path."]
    with pytest.raises(ValueError, match=re.escape(problem)):
        backends.resolve("triton", cuda)


# ------------------------------------------------------------------------------------------------ host syncs
def test_hot_calls_make_no_host_sync(backend_name):
    m = make((5,), backend_name, clamp_value=5.0, ema_decay=None).train()
    r = RewardRunningMeanStd(None, (1,), 0.99, device="cpu", backend=backend_name, clamp_value=5.0)
    x = torch.randn(16, 5)
    m.record_moments(x)  # lazy caches warmed outside the guard
    with HostSyncCounter(strict=True):
        for _ in range(2):
            y = m.normalize(x)
            m.record_moments(x)
            m.record_moments(x, mask=torch.ones(16, dtype=torch.bool))
            m.eval()
            m.normalize(y, un_norm=True)
            m.train()
            r.record_reward(torch.randn(8), torch.zeros(8, dtype=torch.bool))
            r.normalize(torch.randn(3, 8))
        protonorm.combine_moments([m.mean, m.mean], [m.var, m.var], [m.count, 3])


# ------------------------------------------------------------------------------------------------ tracing and export
class _Actor(nn.Module):
    def __init__(self, backend="torch"):
        super().__init__()
        self.norm = make((4,), backend, clamp_value=5.0)
        self.norm.record_moments(torch.randn(32, 4) * 3 + 1)
        self.linear = nn.Linear(4, 2)

    def forward(self, obs):
        return self.linear(self.norm.normalize(obs))


def test_jit_trace_of_normalize():
    actor = _Actor().eval()
    obs = torch.randn(6, 4)
    traced = torch.jit.trace(actor, obs)
    torch.testing.assert_close(traced(obs * 2), actor(obs * 2))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_of_normalize(tmp_path, backend_name, dynamo):
    """Both of torch.onnx's exporters (the TorchScript-based one, and torch.export + onnxscript, the default since
    torch 2.9) see the normalize of every backend as plain torch ops."""
    onnx = pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    actor = _Actor(backend_name).eval()
    path = tmp_path / "actor.onnx"
    torch.onnx.export(actor, (torch.randn(6, 4),), str(path), dynamo=dynamo, input_names=["obs"])
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert any(node.op_type in ("Sqrt", "Div") for node in model.graph.node)
    from onnx.reference import ReferenceEvaluator

    obs = torch.randn(6, 4) * 20  # beyond the clamp
    (got,) = ReferenceEvaluator(model).run(None, {"obs": obs.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), actor(obs), rtol=1e-6, atol=1e-6)


def test_strict_export_takes_the_statistics_as_buffers(backend_name):
    """torch.export(strict=True) lifts a tensor reached through a plain attribute as a constant. Once an eager call has
    cached the statistics' flat views, the exported program must still read the buffers themselves: the exported
    module then holds them in its state_dict, as it does when exported before any call."""
    actor = _Actor(backend_name).eval()
    obs = torch.randn(6, 4) * 3
    want = actor(obs)  # caches the views
    program = torch.export.export(actor, (obs,), strict=True)
    lifted = {spec.target: spec.kind.name for spec in program.graph_signature.input_specs if spec.target}
    assert lifted.get("norm.mean") == lifted.get("norm.var") == "BUFFER", lifted
    assert "CONSTANT_TENSOR" not in lifted.values(), lifted
    torch.testing.assert_close(program.module()(obs), want, rtol=0, atol=0)


class _Recorder(nn.Module):
    """ProtoMotions' training step on observations: normalize, then record the same batch."""

    def __init__(self, backend):
        super().__init__()
        self.norm = make((6,), backend, clamp_value=5.0)

    def forward(self, x):
        y = self.norm.normalize(x)
        self.norm.record_moments(x)
        return y


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_of_a_training_step_holds_for_any_batch_size(backend_name, strict):
    """torch.export with a dynamic batch size of a forward that records. The kernels' number of parts depends on
    the batch size through max() and ceilings: a non-strict export failed on it, and a strict one gave a program
    that refused batches of more than one part when run. Exports now record with the reference math: the program
    must match the eager module on batch sizes of one part and of many (the kernels' parts hold 5,462 rows of 6
    features, the torch backend's 10,922), within float64 rounding of another partition (1e-12 relative; counts
    exact)."""
    from torch.export import Dim

    gen = torch.Generator().manual_seed(0)
    eager = _Recorder(backend_name)
    exported = copy.deepcopy(eager)
    program = torch.export.export(exported, (torch.randn(10, 6),), dynamic_shapes=({0: Dim("B", min=2)},),
                                  strict=strict).module()
    for rows in (3, 7000, 12000, 5):
        x = torch.randn(rows, 6, generator=gen) * 3 + 1
        torch.testing.assert_close(program(x), eager(x), rtol=1e-6, atol=1e-6)
    got = dict(program.named_buffers())
    for name, want in eager.named_buffers():
        if want.is_floating_point():
            torch.testing.assert_close(got[name], want, rtol=1e-12, atol=0, msg=name)
        else:
            assert torch.equal(got[name], want), name


def test_first_calls_from_two_threads_look_up_the_export_flag_once(monkeypatch):
    """The first normalize finds the ONNX export flag by importing torch.onnx's modules. Two threads doing that at
    once can get a partly initialized module (ImportError), so one thread looks it up while the other waits. Here
    the first thread stays in the look-up until the second has started its call, or for half a second: the second
    must not enter the look-up meanwhile (a barrier that both would reach)."""
    import threading

    from protonorm import normalizer

    real = normalizer._onnx_export_flag
    inside, meet = threading.Event(), threading.Barrier(2, timeout=0.5)
    entered = []

    def slow_lookup():
        entered.append(threading.get_ident())
        inside.set()
        try:
            meet.wait()
        except threading.BrokenBarrierError:  # the other thread is held back from the look-up: as it should be
            pass
        return real()

    monkeypatch.setattr(normalizer, "_in_onnx_export", None)
    monkeypatch.setattr(normalizer, "_onnx_export_flag", slow_lookup)
    x = torch.randn(6, 4)
    results, errors = [None, None], []

    def work(i):
        if i == 1:
            inside.wait(timeout=5)
        try:
            results[i] = make((4,)).normalize(x)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not errors
    assert len(entered) == 1
    assert_same(results[0], results[1])


def _first_normalize_in_child(x):
    return make((4,)).normalize(x).numpy().copy()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_child_forked_during_another_threads_first_call_normalizes(monkeypatch):
    """Another thread of the parent is in its first call, looking up the ONNX export flag under its lock, at the
    moment of the fork: the child gets the lock held, with no thread of its own to release it."""
    from protonorm import normalizer

    monkeypatch.setattr(normalizer, "_in_onnx_export", None)
    x = torch.arange(24.0).reshape(6, 4)
    got = in_forked_child(_first_normalize_in_child, x, held=normalizer._onnx_flag_lock)
    assert_same(torch.from_numpy(got), make((4,)).normalize(x))


@pytest.mark.parametrize("backend_name", [b for b in CPU_BACKENDS if b != "triton"])
def test_threads_with_their_own_normalizers_get_the_single_threaded_results(backend_name):
    """Three threads, each with its own normalizers (Welford and EMA observations, rewards), get bit for bit what
    the same calls give one after another on one thread: no per-thread or per-module cache (float32 statistics,
    parts layouts, scratch, recycled outputs) hands one thread's data to another. Two threads share a batch shape,
    the third has its own; the batches are large enough for the kernels' helper threads and for recycled outputs."""
    import threading

    shapes = [(256, 256), (256, 256), (300, 17)]

    def run(i, results, start=None):
        g = torch.Generator().manual_seed(i)
        rows, cols = shapes[i]
        observations = [make((cols,), backend_name, clamp_value=5.0), make((cols,), backend_name, ema_decay=0.99)]
        rewards = RewardRunningMeanStd(None, (1,), 0.99, device="cpu", backend=backend_name)
        if start is not None:
            start.wait(timeout=10)
        for _ in range(5):
            x = torch.randn(rows, cols, generator=g) * (i + 1) + i
            for m in observations:
                results.append(m.train().normalize(x).clone())  # the output itself goes back to be recycled
                m.record_moments(x)
                results.append(m.eval().normalize(x).clone())
            rewards.record_reward(torch.randn(rows, generator=g), torch.rand(rows, generator=g) < 0.1)
            results.append(rewards.normalize(x[:, 0]).clone())
        for m in observations + [rewards]:
            results += [m.mean, m.var, m.count]

    expected = [[] for _ in shapes]
    for i in range(len(shapes)):
        run(i, expected[i])
    got = [[] for _ in shapes]
    start = threading.Barrier(len(shapes))
    threads = [threading.Thread(target=run, args=(i, got[i], start)) for i in range(len(shapes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for want, have in zip(expected, got):
        assert len(have) == len(want)
        for a, b in zip(want, have):
            assert_same(a, b)


@pytest.mark.parametrize("shape", [(8,), (2, 4)], ids=["direct", "general"])
def test_a_normalize_on_another_thread_leaves_this_threads_record_alone(backend_name, shape, monkeypatch):
    """A training-mode normalize keeps its batch's moments for the record that follows on its thread. Another
    thread normalizing a batch of the same shape with the same module meanwhile (an evaluation thread while the
    trainer trains), as upstream's normalize, must change nothing of that: the trainer's statistics are those of
    its own batches alone. The other thread's normalize is held, once its kernel has run, until the trainer has
    recorded (or for two seconds). Both the direct call of a [B, D] batch and the general way of a [B, 2, 4] one."""
    import threading

    from protonorm.backends.base import Backend

    backend = backends.resolve(backend_name, torch.device("cpu"))
    trainer, other = make(shape, backend_name).train(), make(shape, "torch")
    g = torch.Generator().manual_seed(5)
    mine = [torch.randn(64, *shape, generator=g) for _ in range(3)]
    theirs = torch.randn(64, *shape, generator=g) * 100 + 50
    computed, recorded = threading.Event(), threading.Event()
    evaluator = []

    def held(method):
        def run(*args, **kwargs):
            result = method(*args, **kwargs)
            if threading.get_ident() in evaluator:
                computed.set()
                recorded.wait(timeout=2)
            return result
        return run

    for name in ("try_normalize_moments", "normalize_moments"):
        # Wrapped where the backend's class or the base class defines it: the module calls one or the other.
        owner = type(backend) if name in vars(type(backend)) else Backend
        monkeypatch.setattr(owner, name, held(getattr(owner, name)))

    def evaluate():
        evaluator.append(threading.get_ident())
        trainer.normalize(theirs)

    for x in mine:
        computed.clear()
        recorded.clear()
        trainer.normalize(x)
        thread = threading.Thread(target=evaluate)
        thread.start()
        computed.wait(timeout=2)
        trainer.record_moments(x)
        recorded.set()
        thread.join(timeout=10)
        other.record_moments(x)
    torch.testing.assert_close(trainer.mean, other.mean, rtol=1e-12, atol=1e-12)  # (float64 sums in other orders)
    torch.testing.assert_close(trainer.var, other.var, rtol=1e-10, atol=1e-12)
    assert int(trainer.count) == int(other.count)


def test_a_normalize_nested_in_a_dispatch_mode_leaves_the_outer_record_alone(backend_name):
    """Under a dispatch mode a training-mode normalize reaches its kernel through an op, and the mode may run any
    code once the op is done, before the normalize returns: here it normalizes another batch of the same shape with
    the same module. The outer batch's moments, kept for its record, must still be its own."""
    from torch.utils._python_dispatch import TorchDispatchMode

    m, other = make((8,), backend_name).train(), make((8,), "torch")
    g = torch.Generator().manual_seed(6)
    theirs = torch.randn(64, 8, generator=g) * 100 + 50

    class NormalizeAfterEachOp(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            m.normalize(theirs)  # (the mode is not active inside its own handler: no recursion)
            return out

    for _ in range(3):
        x = torch.randn(64, 8, generator=g)
        with NormalizeAfterEachOp():
            m.normalize(x)
        m.record_moments(x)
        other.record_moments(x)
    torch.testing.assert_close(m.mean, other.mean, rtol=1e-12, atol=1e-12)  # (float64 sums in other orders)
    torch.testing.assert_close(m.var, other.var, rtol=1e-10, atol=1e-12)
    assert int(m.count) == int(other.count)


# The Triton ops are compiled in tests/test_triton.py (aot_eager): inductor over interpreted kernels is too slow here.
@pytest.mark.parametrize("backend_name", [b for b in CPU_BACKENDS if b != "triton"])
def test_compile_fullgraph_normalize_and_record(backend_name):
    m = make((6,), backend_name, clamp_value=5.0).train()
    ref = make((6,), "torch", clamp_value=5.0)

    def step(x):
        y = m.normalize(x)
        m.record_moments(x)
        return y

    compiled = torch.compile(step, fullgraph=True, backend="eager" if backend_name != "torch" else "inductor")
    for i in range(3):
        x = torch.randn(10, 6) + i
        y = compiled(x)
        torch.testing.assert_close(y, ref.normalize(x), rtol=1e-6, atol=1e-6)
        ref.record_moments(x)
    torch.testing.assert_close(m.mean, ref.mean, rtol=1e-12, atol=1e-12)
    assert torch.equal(m.count, ref.count)


def test_compiled_normalize_sees_hyperparameters_assigned_later(backend_name):
    """Dynamo turns a float attribute into a symbolic input (from the start with dynamic=True, after one change
    otherwise): the checks on clamp_value must trace with it, and the compiled call must use each new value."""
    m, ref = (make((5,), backend_name, clamp_value=5.0).eval() for _ in range(2))
    for n in (m, ref):
        n.record_moments(torch.arange(40.0).reshape(8, 5))
    compiled = torch.compile(m.normalize, fullgraph=True, dynamic=True, backend="eager")
    x = torch.randn(6, 5) * 20
    for name, value in (("clamp_value", 5.0), ("clamp_value", 0.5), ("epsilon", 3.0)):
        setattr(m, name, value)
        setattr(ref, name, value)
        assert_same(compiled(x), ref.normalize(x))


FIRST_CALLS_COMPILED = textwrap.dedent(
    """
    import sys, torch, protonorm
    from protonorm import RewardRunningMeanStd, RunningMeanStd

    def first_calls(backend):
        obs = RunningMeanStd(None, None, device="cpu", clamp_value=5.0, backend=backend).train()  # lazy shape
        rew = RewardRunningMeanStd(None, (1,), 0.99, device="cpu", backend=backend)

        def step(x, reward, done):
            y = obs.normalize(x)
            obs.record_moments(x)
            rew.record_reward(reward, done)
            return y

        x, reward, done = torch.randn(10, 6) + 3, torch.randn(8), torch.zeros(8, dtype=torch.bool)
        y = torch.compile(step, fullgraph=True, backend="eager")(x, reward, done)
        assert obs.count.item() == 11 and rew.count.item() == 9, (obs.count, rew.count)
        assert torch.allclose(obs.mean.float(), x.sum(0) / 11)
        assert y.shape == x.shape

    for backend in sys.argv[1:]:
        # The backend must not be imported yet: constructing the modules has to do it, outside the trace.
        assert f"protonorm.backends.{backend}_backend" not in sys.modules, backend
        first_calls(backend)
    first_calls("auto")
    print("traced")
    """
)


def test_first_calls_traced_by_compile():
    """A model compiled with fullgraph=True before any eager call: lazy shape inference, the first reward step
    and backends not imported yet (Dynamo cannot trace an import) all happen inside the trace. Run in a fresh
    interpreter, where nothing has been loaded by other tests."""
    names = [b for b in ("torch", "triton") if b in CPU_BACKENDS]
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", FIRST_CALLS_COMPILED, *names], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "traced" in result.stdout, result.stderr[-3000:]


def test_normalize_keeps_gradients_flowing(backend_name):
    m = make((3,), backend_name, clamp_value=10.0).eval()
    m.record_moments(torch.randn(20, 3) * 2)
    x = torch.randn(4, 3, requires_grad=True)
    m.normalize(x).sum().backward()
    torch.testing.assert_close(x.grad, (1 / torch.sqrt(m.var.float() + m.epsilon)).expand(4, 3))


@pytest.mark.parametrize("un_norm", [False, True])
def test_forward_mode_gradients_and_vmap_see_the_reference_math(backend_name, un_norm):
    """A dual tensor of torch.autograd.forward_ad, and the inputs of torch.func.jvp and vmap, carry a tangent or a
    batch dimension that the kernels know nothing of (they would drop the tangent, or fail on a tensor without
    memory): normalize gives them the reference math, whose plain torch ops these transforms handle, as upstream's."""
    import torch.autograd.forward_ad as fwAD

    m = make((3,), backend_name, clamp_value=10.0)
    m.record_moments(torch.randn(20, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1)
    before = stats(m)
    g = torch.Generator().manual_seed(1)
    x, t, batches = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    scale = torch.sqrt(m.var.float() + m.epsilon)
    want_tangent = t * scale if un_norm else t / scale
    for training in (True, False):
        m.train(training)
        want = reference.normalize(x, m.mean, m.var, m.epsilon, m.clamp_value, un_norm)
        with fwAD.dual_level():
            primal, tangent = fwAD.unpack_dual(m.normalize(fwAD.make_dual(x, t), un_norm))
        assert_same(primal, want)
        torch.testing.assert_close(tangent, want_tangent)
        primal, tangent = torch.func.jvp(lambda a: m.normalize(a, un_norm), (x,), (t,))
        assert_same(primal, want)
        torch.testing.assert_close(tangent, want_tangent)
        batched = torch.func.vmap(lambda a: m.normalize(a, un_norm))(batches)
        for got, b in zip(batched, batches):
            assert_same(got, reference.normalize(b, m.mean, m.var, m.epsilon, m.clamp_value, un_norm))
    assert_stats_equal(stats(m), before)


@pytest.mark.parametrize("train_in_inference", [False, True])
def test_batches_made_under_inference_mode(backend_name, train_in_inference):
    """A rollout buffer filled under torch.inference_mode() hands the training loop inference tensors, which have no
    version counter: normalize + record of them must work as for normal tensors, with the same results."""
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(50, 6, generator=g) * 2 + 1 for _ in range(3)]
    with torch.inference_mode():
        frozen = [b.clone() for b in batches]
    assert all(b.is_inference() for b in frozen)
    plain, inferred = (make((6,), backend_name, clamp_value=5.0).train() for _ in range(2))
    for x, x_inf in zip(batches, frozen):
        want = plain.normalize(x)
        plain.record_moments(x)
        with torch.inference_mode() if train_in_inference else torch.no_grad():
            got = inferred.normalize(x_inf)
            inferred.record_moments(x_inf)
        assert torch.equal(got, want)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, inferred.state_dict()[key]), key


@pytest.mark.parametrize("first_in_inference,train_in_inference", [(False, True), (True, False), (True, True)])
def test_inference_mode_anywhere_in_the_sequence(backend_name, first_in_inference, train_in_inference):
    """Rollouts often run under torch.inference_mode(): whichever call comes first there, and whether training calls
    run inside or outside it, later calls in the other mode must work, as upstream's do. (A tensor the module
    creates in inference mode and updates in place outside it raises in torch.)"""
    x = torch.randn(300, 7, generator=torch.Generator().manual_seed(0))
    reward = torch.randn(64, generator=torch.Generator().manual_seed(1))
    terminated = torch.arange(64) % 9 == 0
    obs = protonorm.RunningMeanStd(None, (7,), device="cpu", clamp_value=5.0, backend=backend_name)
    rew = protonorm.RewardRunningMeanStd(None, (1,), gamma=0.99, clamp_value=5.0, device="cpu", backend=backend_name)
    plain_obs = protonorm.RunningMeanStd(None, (7,), device="cpu", clamp_value=5.0, backend=backend_name)
    plain_rew = protonorm.RewardRunningMeanStd(None, (1,), gamma=0.99, clamp_value=5.0, device="cpu",
                                               backend=backend_name)

    def rollout_then_train(o, r, first_mode, train_mode):
        with first_mode():
            r.record_reward(reward, terminated)
            o.eval()
            o.normalize(x)
            r.normalize(reward)
        with train_mode():
            o.train()
            o.normalize(x)
            o.record_moments(x)
            r.record_reward(reward, terminated)
        with torch.inference_mode():
            o.eval()
            o.normalize(x)
            r.record_reward(reward, terminated)
        o.train()
        y = o.normalize(x)
        o.record_moments(x)
        r.record_reward(reward, terminated)
        return y

    got = rollout_then_train(obs, rew, torch.inference_mode if first_in_inference else torch.no_grad,
                             torch.inference_mode if train_in_inference else torch.no_grad)
    want = rollout_then_train(plain_obs, plain_rew, torch.no_grad, torch.no_grad)
    assert torch.equal(got, want)
    for a, b in ((obs, plain_obs), (rew, plain_rew)):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key


# ------------------------------------------------------------------------------------------------ direct way
_STEPS = st.lists(st.sampled_from(["train", "eval", "normalize", "record", "record new", "record masked",
                                   "add in place", "un_norm", "new batch"]), min_size=1, max_size=14)
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _call_sequences_match(backend_name, steps, d, dtype, ema, seed):
    g = torch.Generator().manual_seed(seed)

    def fresh(rows):
        x = (torch.randn(rows, d, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
        x[torch.rand(rows, generator=g) < 0.1, 0] = float("nan")
        return x

    direct, general = (make((d,), backend_name, clamp_value=4.0, ema_decay=ema) for _ in range(2))
    x = fresh(33)
    for step in steps:
        if step in ("train", "eval"):
            direct.train(step == "train")
            general.train(step == "train")
        elif step == "normalize":
            got, want = direct.normalize(x), general._normalize(x, False, True)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
        elif step == "un_norm":
            got, want = direct.normalize(x, un_norm=True), general._normalize(x, True, True)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
        elif step == "record":
            direct.record_moments(x)
            general._record_moments(x, None)
        elif step == "record new":
            other = fresh(20)
            direct.record_moments(other)
            general._record_moments(other, None)
        elif step == "record masked":
            mask = torch.rand(x.shape[0], generator=g) < 0.5
            direct.record_moments(x, mask)
            general._record_moments(x, mask)
        elif step == "add in place":
            x.add_(1.0)
        else:
            x = fresh(int(torch.randint(1, 70, (1,), generator=g)))
        for a, b in ((direct.mean, general.mean), (direct.var, general.var), (direct.count, general.count),
                     (direct.nonfinite_rows, general.nonfinite_rows)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend_name", [b for b in CPU_BACKENDS if backends.load(b)[0].direct])
def test_any_call_sequence_gives_the_general_ways_results(backend_name):
    """Two modules fed the same calls, one through the public methods (the direct way where it applies), one
    through the general way's own methods: outputs and statistics stay the same bits after every call, whatever
    the order of train/eval switches, records of the normalized batch or of another, masks, in-place changes in
    between, and batches with NaN rows. (Fewer examples for Triton, whose kernels run interpreted here.)"""

    @settings(max_examples=40 if backend_name == "cpp" else 12, deadline=None)
    @given(steps=_STEPS, d=st.sampled_from([1, 5, 40]), dtype=st.sampled_from(_DTYPES),
           ema=st.sampled_from([None, 0.9]), seed=st.integers(0, 2**16))
    def check(steps, d, dtype, ema, seed):
        _call_sequences_match(backend_name, steps, d, dtype, ema, seed)

    check()


def test_kernels_writing_in_place_move_the_version_counters(backend_name):
    """The C++ and Triton kernels write the statistics and the discounted returns through data pointers, which
    torch cannot see: the backends move the tensors' version counters as torch's own in-place ops do. Without that,
    a tensor saved for backward and then recorded into gave gradients of the new values silently, and a batch that
    changed under a kernel between normalize and record_moments was taken for the batch normalized."""
    torch.manual_seed(0)
    rms = RunningMeanStd(None, (5,), device="cpu", backend=backend_name).train()
    rms.record_moments(torch.randn(8, 5))
    versions = [t._version for t in (rms.mean, rms.var, rms.count)]
    weight = torch.ones(5, dtype=torch.float64, requires_grad=True)
    loss = (weight * rms.mean).sum()  # saves rms.mean for weight's gradient
    rms.normalize(torch.randn(8, 5))
    rms.record_moments(torch.randn(8, 5))
    assert all(t._version > v for t, v in zip((rms.mean, rms.var, rms.count), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    rms.update_from_moments(torch.zeros(5), torch.ones(5), 4)
    assert rms.mean._version > versions[0] + 1

    # One module normalizes another's discounted returns, which that module's record_reward then advances in place:
    # the moments kept from the normalize are of the returns before the step, and must not be merged.
    rewards = RewardRunningMeanStd(None, (1,), device="cpu", backend=backend_name, gamma=0.9)
    flags = torch.zeros(64, dtype=torch.bool)
    rewards.record_reward(torch.randn(64), flags)
    returns = rewards.discounted_reward
    before = returns._version
    other = RunningMeanStd(None, (1,), device="cpu", backend=backend_name).train()
    expected = RunningMeanStd(None, (1,), device="cpu", backend="torch")
    for module in (other, expected):
        module.record_moments(torch.randn(64, 1, generator=torch.Generator().manual_seed(1)))
    other.normalize(returns.unsqueeze(1))
    rewards.record_reward(torch.randn(64) + 3.0, flags)
    assert returns._version > before
    other.record_moments(returns.unsqueeze(1))
    expected.record_moments(returns.unsqueeze(1).clone())
    torch.testing.assert_close(other.mean, expected.mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(other.var, expected.var, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("how", ["mark_written", "_mark_each_written"])
def test_version_counters_of_inference_tensors_are_left_alone(how):
    """Tensors made under inference_mode have no version counter: marking them written skips them, and marks the
    others (``_mark_each_written`` is the way of torch 2.4, whose ``_increment_version`` takes one tensor a call)."""
    from protonorm.backends import base

    plain, other = torch.zeros(3), torch.zeros(2, 2)
    with torch.inference_mode():
        frozen = torch.zeros(3)
    getattr(base, how)((frozen, plain, other))
    # Moved is what counts (a stash compares versions for equality); a newer torch's _increment_version takes a
    # lone tensor as the sequence of its rows and moves it once a row.
    assert plain._version >= 1 and other._version >= 1


def test_device_none_follows_a_device_block_where_torch_s_default_device_does_not(monkeypatch):
    """torch 2.4 to 2.6 answer get_default_device() with the CPU inside ``with torch.device("meta")``, where
    upstream's ``torch.zeros(..., device=None)`` makes meta tensors: there the device comes from a factory call."""
    from protonorm import normalizer

    monkeypatch.setattr(normalizer, "_default_device", normalizer._factory_device)
    with torch.device("meta"):
        assert normalizer._factory_device().type == "meta"
        m = RunningMeanStd(None, (3,), device=None)
    assert m.mean.is_meta and m.count.is_meta
    assert normalizer._factory_device() == torch.device("cpu")


def test_a_torch_without_is_exporting_still_records(backend_name, monkeypatch):
    """torch 2.4 to 2.6 have no torch.compiler.is_exporting: eager calls go on without it, with the same
    statistics."""
    from protonorm.backends import base

    x = torch.randn(37, 5, dtype=torch.float64)
    expected = RunningMeanStd(None, (5,), device="cpu", backend=backend_name)
    expected.normalize(x)
    expected.record_moments(x)
    monkeypatch.setattr(base, "_is_exporting", None)
    norm = RunningMeanStd(None, (5,), device="cpu", backend=backend_name)
    norm.normalize(x)
    norm.record_moments(x)
    assert not base.exported(x)
    for key, value in expected.state_dict().items():
        assert_same(norm.state_dict()[key], value)


def _inference_statistics(module, how):
    """Give ``module`` statistics made under torch.inference_mode() the way ``how`` names (an assignment, a load of
    a checkpoint's tensors, a move); their values stay the same."""
    with torch.inference_mode():
        frozen = {key: value.clone() for key, value in module.state_dict().items()}
    if how in ("mean", "var", "count"):
        setattr(module, how, frozen[how])
    elif how == "load_assign":
        module.load_state_dict(frozen, assign=True)
    else:  # moved under inference mode: to meta and back, the values put back by a load (the returns, which
        # leave meta without values, by an assignment)
        returns = module.__dict__.get("discounted_reward")
        returns = None if returns is None else returns.clone()
        with torch.inference_mode():
            module.to("meta")
            module.to_empty(device="cpu")
        module.load_state_dict(frozen)
        if returns is not None:
            module.discounted_reward = returns


@pytest.mark.parametrize("how", ["mean", "var", "count", "load_assign", "to_empty"])
@pytest.mark.parametrize("call", ["record", "normalize_record", "update_from_moments", "record_reward"])
def test_statistics_made_under_inference_mode_are_updated(backend_name, how, call):
    """Statistics assigned, loaded or moved under torch.inference_mode() are inference tensors, which torch refuses
    to update in place outside it, and only after writing some of them (the count before the mean): they are taken
    as normal tensors, and every call then gives what it gives a module whose statistics are normal, on every
    backend."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 3, generator=g) * 2 + 1
    done = torch.arange(40) % 7 == 0

    def build():
        if call == "record_reward":
            m = RewardRunningMeanStd(None, (3,), 0.9, device="cpu", backend=backend_name)
            m.record_reward(x, done)
        else:
            m = make((3,), backend_name).train()
            m.record_moments(x)
        return m

    def step(m):
        if call == "record":
            m.record_moments(x * 3)
        elif call == "normalize_record":
            m.normalize(x * 3)
            m.record_moments(x * 3)
        elif call == "update_from_moments":
            m.update_from_moments(x.mean(0), x.var(0, unbiased=False), 40)
        else:
            m.record_reward(x * 3, done)

    got, want = build(), build()
    _inference_statistics(got, how)
    step(got)
    step(want)
    step(got)
    step(want)
    for key in ("mean", "var", "count", "nonfinite_rows"):
        assert not getattr(got, key).is_inference(), key
        assert_same(getattr(got, key), getattr(want, key))


@pytest.mark.parametrize("shape,reward_shape", [((1,), (24,)), ((3,), (24, 3)), ((2, 3), (24, 2, 3))])
@pytest.mark.parametrize("step_in_inference", [False, True])
def test_returns_assigned_under_inference_mode_advance(backend_name, shape, reward_shape, step_in_inference):
    """Discounted returns assigned as a tensor made under torch.inference_mode() advance as normal ones do, on every
    backend and in either mode (the torch backend's in-place update of them raised outside inference mode, after
    writing them)."""
    g = torch.Generator().manual_seed(6)
    rewards = [torch.randn(reward_shape, generator=g) for _ in range(3)]
    done = torch.arange(24) % 5 == 0
    got, want = (RewardRunningMeanStd(None, shape, 0.9, device="cpu", backend=backend_name) for _ in range(2))
    for m in (got, want):
        m.record_reward(rewards[0], done)
    with torch.inference_mode():
        got.discounted_reward = want.discounted_reward.clone()
    for reward in rewards[1:]:
        with torch.inference_mode() if step_in_inference else torch.no_grad():
            got.record_reward(reward, done)
        want.record_reward(reward, done)
    assert_same(got.discounted_reward, want.discounted_reward)
    for key in ("mean", "var", "count", "nonfinite_rows"):
        assert_same(getattr(got, key), getattr(want, key))
