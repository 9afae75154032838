"""Parity with upstream's module: checkpoints load both ways, and the same calls give the same results."""
import contextlib
import io

import pytest
import torch
from torch import nn

import protonorm
from protonorm import RewardRunningMeanStd, RunningMeanStd

import upstream as upstream_locator


@pytest.fixture(scope="module")
def upstream():
    return upstream_locator.load()


def _batches(seed, n=6, d=5, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(int(torch.randint(1, 40, (1,), generator=g)), d, generator=g) * 2 + offset for _ in range(n)]


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


def _assert_stats_close(a, b, rtol):
    # Upstream computes batch moments in float32 and merges with float32 counts; ours are float64 with exact
    # counts, so on well-conditioned data the two agree to float32 accuracy of the batch moments.
    torch.testing.assert_close(a.mean, b.mean, rtol=rtol, atol=rtol)
    torch.testing.assert_close(a.var, b.var, rtol=rtol, atol=rtol)
    assert int(a.count) == int(b.count)


@pytest.mark.parametrize("ema", [None, 0.99], ids=["welford", "ema"])
def test_obs_checkpoint_loads_both_ways_and_evolves_alike(upstream, ema, backend_name):
    up = upstream.RunningMeanStd(None, (5,), device="cpu", clamp_value=5.0, ema_decay=ema)
    for x in _batches(0):
        up.record_moments(x)
    ours = RunningMeanStd(None, (5,), device="cpu", clamp_value=5.0, ema_decay=ema, backend=backend_name)
    ours.load_state_dict(_roundtrip(up.state_dict()), strict=True)
    assert torch.equal(ours.mean, up.mean) and torch.equal(ours.var, up.var) and torch.equal(ours.count, up.count)
    for x in _batches(1):
        up.record_moments(x)
        ours.record_moments(x)
    _assert_stats_close(ours, up, rtol=1e-6)
    obs = torch.randn(7, 5) * 3
    torch.testing.assert_close(ours.eval().normalize(obs), up.normalize(obs), rtol=1e-6, atol=1e-6)
    back = upstream.RunningMeanStd(None, (5,), device="cpu", ema_decay=ema)
    back.load_state_dict(_roundtrip(ours.state_dict()), strict=True)
    assert torch.equal(back.mean, ours.mean) and torch.equal(back.count, ours.count)
    assert back.count.dtype == torch.int64 and back.mean.dtype == torch.float64


@pytest.mark.parametrize("ema", [None, 0.99], ids=["welford", "ema"])
def test_reward_checkpoint_loads_both_ways_and_evolves_alike(upstream, ema, backend_name):
    up = upstream.RewardRunningMeanStd(None, (1,), 0.99, clamp_value=5.0, device="cpu", ema_decay=ema)
    ours = RewardRunningMeanStd(None, (1,), 0.99, clamp_value=5.0, device="cpu", ema_decay=ema, backend=backend_name)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        rew, done = torch.rand(16, generator=g), (torch.rand(16, generator=g) < 0.2)
        up.record_reward(rew, done)
    ours.load_state_dict(_roundtrip(up.state_dict()), strict=True)
    ours.discounted_reward = up.discounted_reward.clone()  # a plain attribute on both sides, never checkpointed
    for _ in range(5):
        rew, done = torch.rand(16, generator=g), (torch.rand(16, generator=g) < 0.2)
        up.record_reward(rew, done)
        ours.record_reward(rew, done)
    torch.testing.assert_close(ours.discounted_reward, up.discounted_reward, rtol=1e-6, atol=1e-6)
    _assert_stats_close(ours, up, rtol=1e-6)
    buf = torch.randn(3, 16)
    torch.testing.assert_close(ours.normalize(buf), up.normalize(buf), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.normalize(buf, un_norm=True), up.normalize(buf, un_norm=True), rtol=1e-6, atol=1e-6)
    back = upstream.RewardRunningMeanStd(None, (1,), 0.99, device="cpu", ema_decay=ema)
    back.load_state_dict(_roundtrip(ours.state_dict()), strict=True)
    assert torch.equal(back.var, ours.var) and torch.equal(back.count, ours.count)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.bfloat16, torch.float16, torch.float64])
def test_discounted_returns_assigned_in_any_dtype_evolve_as_upstream(upstream, backend_name, dtype):
    """A caller may assign ``discounted_reward`` (a plain attribute upstream), e.g. ``torch.zeros_like(dones)``:
    returns that a dtype cannot hold (an integer one truncated them) continue in float32, as upstream's do."""
    ours = RewardRunningMeanStd(None, (1,), 0.9, device="cpu", backend=backend_name)
    up = upstream.RewardRunningMeanStd(None, (1,), 0.9, device="cpu")
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        if step == 1:
            start = (torch.arange(6) % 2).to(dtype)
            ours.discounted_reward, up.discounted_reward = start.clone(), start.clone()
        reward, done = torch.randn(6, generator=g), torch.rand(6, generator=g) < 0.3
        ours.record_reward(reward, done)
        up.record_reward(reward, done)
    assert ours.discounted_reward.dtype == up.discounted_reward.dtype
    # Upstream rounds the first `returns * gamma` to the half-precision dtype once (relative 2**-8 for bfloat16).
    tolerance = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6
    torch.testing.assert_close(ours.discounted_reward, up.discounted_reward, rtol=tolerance, atol=tolerance)
    _assert_stats_close(ours, up, rtol=tolerance)


@pytest.mark.parametrize("layout", ["columns_apart", "negated_view"])
def test_assigned_returns_of_any_layout_are_written_into_as_upstream_evolves_them(upstream, backend_name, layout):
    """Float32 returns assigned with their columns apart in memory (a transposed tensor) or as a lazily negated view
    evolve as upstream's, and the assigned tensor holds them after every step (it is written into, as documented),
    on every backend: the kernels update a copy of such returns, never a stale one."""
    d = 2 if layout == "columns_apart" else 1
    ours = RewardRunningMeanStd(None, (d,), 0.9, device="cpu", backend=backend_name)
    up = upstream.RewardRunningMeanStd(None, (d,), 0.9, device="cpu")
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        if step == 1:
            start = torch.randn(d, 6, generator=g).t() if d > 1 else torch.randn(6, generator=g)._neg_view()
            ours.discounted_reward, up.discounted_reward = start, start.clone()
        reward = torch.randn(6, d, generator=g) if d > 1 else torch.randn(6, generator=g)
        done = (torch.rand(6, 1, generator=g) < 0.3).reshape(reward.shape[:1] + (1,) * (d > 1))  # upstream's broadcast
        ours.record_reward(reward, done)
        up.record_reward(reward, done)
        torch.testing.assert_close(ours.discounted_reward, up.discounted_reward, rtol=1e-6, atol=1e-6)
        if step >= 1:
            assert torch.equal(start, ours.discounted_reward)
    _assert_stats_close(ours, up, rtol=1e-6)


@pytest.mark.parametrize("d,start", [(1, lambda: torch.zeros(()).expand(6)), (1, lambda: torch.ones(1).expand(6)),
                                     (2, lambda: torch.ones(1, 2).expand(6, 2)), (2, lambda: torch.ones(6, 1).expand(6, 2))],
                         ids=["scalar", "one", "rows", "columns"])
def test_assigned_returns_whose_elements_share_memory_evolve_as_upstream(upstream, backend_name, d, start):
    """Returns assigned as an ``expand``ed tensor (one value for every environment) cannot be written into: they are
    replaced by a copy at the next step, as returns of a dtype that cannot hold them are, and evolve as upstream's."""
    ours = RewardRunningMeanStd(None, (d,), 0.9, device="cpu", backend=backend_name)
    up = upstream.RewardRunningMeanStd(None, (d,), 0.9, device="cpu")
    g = torch.Generator().manual_seed(6)
    for step in range(4):
        if step == 1:
            ours.discounted_reward, up.discounted_reward = start(), start().clone()
        reward = torch.randn(6, d, generator=g) if d > 1 else torch.randn(6, generator=g)
        done = (torch.rand(6, 1, generator=g) < 0.3).reshape(reward.shape[:1] + (1,) * (d > 1))  # upstream's broadcast
        ours.record_reward(reward, done)
        up.record_reward(reward, done)
        torch.testing.assert_close(ours.discounted_reward, up.discounted_reward, rtol=1e-6, atol=1e-6)
    assert ours.discounted_reward.is_contiguous()
    _assert_stats_close(ours, up, rtol=1e-6)


class _Agent(nn.Module):
    def __init__(self, norm_cls):
        super().__init__()
        self.actor_norm = norm_cls(None, device="cpu")  # lazy, as ProtoMotions builds them
        self.critic = nn.Sequential(nn.Linear(3, 3))
        self.critic_norm = norm_cls(None, device="cpu")


def test_lazy_model_checkpoints_with_upstream_helper(upstream):
    source = _Agent(upstream.RunningMeanStd)
    source.actor_norm.record_moments(torch.randn(8, 3) + 2)
    source.critic_norm.record_moments(torch.randn(4, 3) - 2)
    state = _roundtrip(source.state_dict())
    target = _Agent(RunningMeanStd)
    protonorm.materialize_lazy_running_stats_from_state_dict(target, state)
    assert target.actor_norm._initialized and target.actor_norm.mean.shape == (3,)
    target.load_state_dict(state, strict=True)
    assert torch.equal(target.critic_norm.mean, source.critic_norm.mean)
    # protonorm's lazy modules also load without the helper
    direct = _Agent(RunningMeanStd)
    direct.load_state_dict(state, strict=True)
    assert torch.equal(direct.actor_norm.var, source.actor_norm.var) and direct.actor_norm._initialized
    assert tuple(direct.actor_norm.shape) == (3,)
    # and back into upstream's, through its own helper
    back = _Agent(upstream.RunningMeanStd)
    back_state = _roundtrip(direct.state_dict())
    upstream.materialize_lazy_running_stats_from_state_dict(back, back_state)
    back.load_state_dict(back_state, strict=True)
    assert torch.equal(back.actor_norm.count, source.actor_norm.count)


def test_lazy_module_loads_onto_the_device_it_was_moved_to():
    model = _Agent(RunningMeanStd).to("cpu")
    state = {"actor_norm.mean": torch.zeros(3, dtype=torch.float64), "actor_norm.var": torch.ones(3, dtype=torch.float64),
             "actor_norm.count": torch.tensor(7)}
    model.load_state_dict(state, strict=False)
    assert model.actor_norm.mean.device.type == "cpu" and int(model.actor_norm.count) == 7
    assert not model.critic_norm._initialized


def test_upstream_helper_materializes_on_the_device_the_model_was_moved_to():
    # A checkpoint read onto the CPU for a model moved elsewhere ("meta" stands in for a GPU here).
    model = _Agent(RunningMeanStd).to("meta")
    state = {"actor_norm.mean": torch.zeros(3, dtype=torch.float64), "actor_norm.var": torch.ones(3, dtype=torch.float64),
             "actor_norm.count": torch.tensor(7)}
    protonorm.materialize_lazy_running_stats_from_state_dict(model, state)
    assert model.actor_norm.mean.device.type == "meta" and model.actor_norm.count.device.type == "meta"


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("lazy", [False, True])
def test_integer_statistics_load_as_upstream_takes_them(upstream, lazy, assign):
    """A hand-written checkpoint may hold integer mean/var; torch's copy (so upstream's module) takes their values."""
    state = {"mean": torch.tensor([0, -2, 5]), "var": torch.tensor([1, 3, 0]), "count": torch.tensor(4)}
    up = upstream.RunningMeanStd(None, (3,), device="cpu")
    up.load_state_dict(state)
    m = RunningMeanStd(None, None if lazy else (3,), device="cpu")
    m.load_state_dict(state, assign=assign)
    for name in ("mean", "var", "count"):
        assert getattr(m, name).dtype == getattr(up, name).dtype and torch.equal(getattr(m, name), getattr(up, name))
    with pytest.raises(RuntimeError, match=r"mean: expected a real-valued tensor .* got torch.complex64"):
        m.load_state_dict(dict(state, mean=torch.zeros(3, dtype=torch.complex64)))
    assert torch.equal(m.mean, up.mean)


@pytest.mark.parametrize("default", [None, "meta"])
def test_device_none_is_torch_s_default_device_as_upstream(upstream, default):
    """``device=None`` puts the buffers where ``torch.zeros(..., device=None)`` does (the meta device stands in for
    a default device set with ``torch.set_default_device``)."""
    with torch.device(default) if default else contextlib.nullcontext():
        up = upstream.RunningMeanStd(None, (3,), device=None)
        ours = [RunningMeanStd(None, (3,), device=None), RewardRunningMeanStd(None, (1,), 0.9, device=None)]
        lazy = RunningMeanStd(None, None, device=None)
    for m in ours:
        assert m.device is None and m.mean.device == up.mean.device and m.count.device == up.count.device
    if default is None:
        lazy.record_moments(torch.ones(4, 3))
        ours[0].record_moments(torch.ones(4, 3))
        ours[1].record_reward(torch.ones(4), torch.zeros(4))
        assert int(lazy.count) == int(ours[0].count) == int(ours[1].count) == 5


def test_mismatched_checkpoint_is_rejected_before_anything_is_copied():
    m = RunningMeanStd(None, (3,), device="cpu")
    m.record_moments(torch.randn(5, 3))
    before = (m.mean.clone(), m.var.clone(), m.count.clone())
    bad = {"mean": torch.zeros(4, dtype=torch.float64), "var": torch.ones(4, dtype=torch.float64), "count": torch.tensor(99)}
    with pytest.raises(RuntimeError, match=r"size mismatch for mean: expected shape \(3,\), got \(4,\)"):
        m.load_state_dict(bad)
    assert torch.equal(m.count, before[2]) and torch.equal(m.mean, before[0]) and torch.equal(m.var, before[1])
    lazy = RunningMeanStd(None, device="cpu")
    with pytest.raises(RuntimeError, match="size mismatch for var"):
        lazy.load_state_dict({"mean": torch.zeros(2, dtype=torch.float64), "var": torch.ones(3, dtype=torch.float64),
                              "count": torch.tensor(1)})
    assert not lazy._initialized


@pytest.mark.parametrize("partial", [
    {"var": torch.tensor([True, False, True])},
    {"var": torch.tensor([1 + 2j, 3j, 1])},
    {"count": torch.tensor(7 + 1j)},
    {"var": torch.ones(4, dtype=torch.float64), "count": torch.tensor(99)},
    {"count": torch.tensor([99, 1])},
], ids=["bool_var", "complex_var", "complex_count", "wrong_var_shape_with_count", "wrong_count_shape"])
def test_checkpoint_without_mean_is_validated_before_anything_is_copied(partial):
    """A partial checkpoint (``strict=False``, no ``mean``) is checked like a whole one: nothing is copied."""
    m = RunningMeanStd(None, (3,), device="cpu")
    m.record_moments(torch.randn(5, 3))
    before = (m.mean.clone(), m.var.clone(), m.count.clone())
    with pytest.raises(RuntimeError, match=r"expected a real-valued tensor|size mismatch for (var|count)"):
        m.load_state_dict(partial, strict=False)
    assert torch.equal(m.mean, before[0]) and torch.equal(m.var, before[1]) and torch.equal(m.count, before[2])


def test_count_beyond_float32_precision_survives_a_checkpoint(upstream):
    ours = RunningMeanStd(None, (1,), device="cpu")
    ours.count.fill_(2**24 + 1)
    ours.record_moments(torch.ones(3, 1))
    assert int(ours.count) == 2**24 + 4
    up = upstream.RunningMeanStd(None, (1,), device="cpu")
    up.load_state_dict(ours.state_dict())
    assert int(up.count) == 2**24 + 4
    up.record_moments(torch.ones(3, 1))
    assert int(up.count) != 2**24 + 7  # upstream's float32 counts round; protonorm's do not
    ours.record_moments(torch.ones(3, 1))
    assert int(ours.count) == 2**24 + 7


def test_combine_moments_matches_upstream(upstream):
    g = torch.Generator().manual_seed(5)
    groups = [torch.randn(n, 4, generator=g, dtype=torch.float64) * 3 + 1 for n in (3, 10, 1, 7, 20)]
    args = ([x.mean(0) for x in groups], [x.var(0, unbiased=False) for x in groups], [x.shape[0] for x in groups])
    ours, theirs = protonorm.combine_moments(*args), upstream.combine_moments(*args)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-7, atol=1e-9)  # upstream weighs with float32 counts
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-9)
    assert ours[0].dtype == theirs[0].dtype and ours[2].dtype == theirs[2].dtype and int(ours[2]) == int(theirs[2])


@pytest.mark.parametrize(
    "dtypes,counts",
    [
        ((torch.float32, torch.float64), [4, 5]),  # the result dtype follows every group, not the first
        ((torch.float64, torch.float32, torch.bfloat16), [3, 1, 6]),
        ((torch.float32, torch.float32), [2.5, 3.5]),  # fractional counts weigh as they are
        ((torch.float32, torch.float32), [0.5, 0.5]),
        ((torch.float64, torch.float64), torch.tensor([1.5, 2.0, 0.25])[:2]),
        ((torch.bfloat16,), [7]),  # one group: returned in its own dtypes
        ((torch.bfloat16, torch.bfloat16), [2, 5]),  # bfloat16 groups stay bfloat16 (0-d float32 counts)
        ((torch.bfloat16, torch.float16), [2, 5]),
        ((torch.float64, torch.float64), [3, 2.5]),  # an integer count among fractional ones weighs as it is too
    ],
)
def test_combine_moments_dtypes_and_counts_match_upstream(upstream, dtypes, counts):
    g = torch.Generator().manual_seed(9)
    means = [(torch.randn(3, generator=g) * 2 + 1).to(dt) for dt in dtypes]
    vars_ = [(torch.rand(3, generator=g) + 0.5).to(dt) for dt in dtypes]
    ours = protonorm.combine_moments(means, vars_, counts)
    theirs = upstream.combine_moments(means, vars_, counts)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
    tolerance = 1e-2 if torch.bfloat16 in dtypes else 1e-6  # upstream weighs in float32 (and bf16 groups round)
    torch.testing.assert_close(ours[0], theirs[0], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(ours[1], theirs[1], rtol=tolerance, atol=tolerance)
    assert int(ours[2]) == int(theirs[2])


@pytest.mark.parametrize(
    "mean_shapes,var_shapes,counts",
    [
        (((3,), ()), ((3,), ()), [2, 5]),  # a scalar group beside a vector one
        (((1, 3), (2, 1), (3,)), ((3,), (2, 3), (1,)), [3, 4, 5]),
        (((3,), (3,)), ((2, 3), (3,)), [3, 4]),  # variances broadcast wider than the means: the mean does not
        (((2, 1),), ((2, 3),), [7]),  # one group: returned as it is, whatever its count
        (((3,),), ((3,),), [0]),
        (((3,),), ((3,),), [2.5]),
    ],
)
def test_combine_moments_broadcasts_and_returns_one_group_as_upstream(upstream, mean_shapes, var_shapes, counts):
    g = torch.Generator().manual_seed(11)
    means = [torch.randn(s, generator=g, dtype=torch.float64) * 2 + 1 for s in mean_shapes]
    vars_ = [torch.rand(s, generator=g, dtype=torch.float64) + 0.5 for s in var_shapes]
    ours = protonorm.combine_moments(means, vars_, counts)
    theirs = upstream.combine_moments(means, vars_, counts)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
    if len(means) == 1:  # no arithmetic on either side
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)  # upstream weighs in float32
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-6)
    assert int(ours[2]) == int(theirs[2])


@pytest.mark.parametrize("counts", [[4], [4, 6], [3, 1, 2]], ids=["one_group", "two_groups", "three_groups"])
def test_combine_moments_clamps_negative_variances_at_zero_as_upstream(upstream, counts):
    """Upstream clamps the combined variance at 0, that of a single group too: a group's negative variance (from
    other code's rounding) does not come back negative."""
    means = [torch.ones(3, dtype=torch.float64) for _ in counts]  # equal means: no spread between the groups
    vars_ = [torch.tensor([-0.5, -1e-12, 0.25], dtype=torch.float64) for _ in counts]
    ours, theirs = protonorm.combine_moments(means, vars_, counts), upstream.combine_moments(means, vars_, counts)
    assert torch.equal(ours[1][:2], torch.zeros(2, dtype=torch.float64)) and not ours[1].signbit().any()
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=0)
    assert torch.equal(ours[0], theirs[0]) and int(ours[2]) == int(theirs[2])


@pytest.mark.parametrize("counts", [torch.tensor([[1, 2, 3], [4, 5, 6]]), [torch.tensor([1, 2, 3]), 4]],
                         ids=["tensor", "list"])
def test_combine_moments_refuses_per_feature_counts_clearly(counts):
    means, vars_ = [torch.zeros(3), torch.ones(3)], [torch.ones(3)] * 2
    with pytest.raises(ValueError, match=r"one count per group, got per-group counts of shape \(3,\)"):
        protonorm.combine_moments(means, vars_, counts)
    mean, _, count = protonorm.combine_moments(means, vars_, torch.tensor([[1], [3]]))  # one per group, as [K, 1]
    assert torch.equal(mean, torch.full((3,), 0.75)) and int(count) == 4


def _normalizers_with_set_statistics(upstream, backend_name, reward, stats_shape):
    """Ours and upstream's normalizer (the reward one if ``reward``), clamping at 1.5, with the same statistics."""
    if reward:
        ours = RewardRunningMeanStd(None, stats_shape, 0.9, clamp_value=1.5, device="cpu", backend=backend_name)
        up = upstream.RewardRunningMeanStd(None, stats_shape, 0.9, clamp_value=1.5, device="cpu")
    else:
        ours = RunningMeanStd(None, stats_shape, clamp_value=1.5, device="cpu", backend=backend_name)
        up = upstream.RunningMeanStd(None, stats_shape, clamp_value=1.5, device="cpu")
    for m in (ours, up):
        m.mean.copy_(torch.linspace(-1, 1, m.mean.numel(), dtype=torch.float64).reshape(stats_shape))
        m.var.fill_(0.5)
    return ours, up


@pytest.mark.parametrize("reward", [False, True], ids=["obs", "reward"])
@pytest.mark.parametrize("stats_shape,input_shape", [((1,), ()), ((1, 1), (7,)), ((1, 1), ()), ((1, 3), (3,)),
                                                     ((1, 3), (2, 1, 3)), ((1,), (4, 7))])
def test_normalize_of_fewer_dims_than_the_statistics_broadcasts_as_upstream(upstream, backend_name, reward,
                                                                            stats_shape, input_shape):
    """Upstream's arithmetic gives the result the statistics' leading 1s (a scalar reward normalized by (1,)
    statistics comes back as [1]), in either direction."""
    ours, up = _normalizers_with_set_statistics(upstream, backend_name, reward, stats_shape)
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(1)) * 2
    for un_norm in (False, True):
        expected = up.normalize(x, un_norm)
        got = ours.normalize(x, un_norm)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reward", [False, True], ids=["obs", "reward"])
@pytest.mark.parametrize("stats_shape,permuted", [((5,), lambda g: torch.randn(5, 6, generator=g).t()),
                                                  ((4, 5), lambda g: torch.randn(3, 5, 4, generator=g).transpose(1, 2)),
                                                  ((5,), lambda g: torch.randn(5, 4, 3, generator=g).permute(2, 1, 0))],
                         ids=["transposed", "swapped", "reversed"])
def test_normalize_of_a_permuted_input_is_row_major_with_upstreams_values(upstream, backend_name, reward, stats_shape,
                                                                          permuted):
    """As documented: the kernels write a row-major output whatever the input's layout, where upstream's arithmetic
    follows a permuted input's; the values are upstream's. An input that requires grad goes through the same torch
    ops as upstream's, and gets its layout."""
    g = torch.Generator().manual_seed(9)
    ours, up = _normalizers_with_set_statistics(upstream, backend_name, reward, stats_shape)
    x = permuted(g) * 2
    for un_norm in (False, True):
        expected = up.normalize(x, un_norm)
        assert not expected.is_contiguous()
        for train in (True, False):
            got = ours.train(train).normalize(x, un_norm)
            assert got.is_contiguous() and got.shape == expected.shape and got.dtype == expected.dtype
            # (Triton's root is correctly rounded, upstream's is torch's: one float32 ulp apart at most, which with
            # the quotient's own rounding is at most 2.4e-7 relative)
            torch.testing.assert_close(got, expected, rtol=2.4e-7 if backend_name == "triton" else 0, atol=0)
        tracked = ours.normalize(x.detach().requires_grad_(), un_norm)
        assert tracked.stride() == expected.stride()
        torch.testing.assert_close(tracked, expected, rtol=0, atol=0)


@pytest.mark.parametrize("ema", [None, 0.9], ids=["welford", "ema"])
@pytest.mark.parametrize("stats_shape,batch_shape", [((5,), (8, 1, 5)), ((5,), (8, 1, 1, 5)), ((1, 5), (8, 5)),
                                                     ((2, 3), (8, 1, 2, 3)), ((1,), (8, 1, 1))])
def test_batches_whose_features_differ_by_leading_ones_record_as_upstream(upstream, backend_name, ema, stats_shape,
                                                                          batch_shape):
    """A ``[B, 1, D]`` batch into ``(D,)`` statistics (or ``[B, D]`` into ``(1, D)``) holds the same features:
    upstream's copy into the statistics drops the leading 1s, and records it; so does a training-mode normalize
    followed by a record here, on every backend (with the moments of the normalize)."""
    ours = RunningMeanStd(None, stats_shape, device="cpu", ema_decay=ema, backend=backend_name).train()
    up = upstream.RunningMeanStd(None, stats_shape, device="cpu", ema_decay=ema).train()
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = torch.randn(batch_shape, generator=g) * 2 + 1
        expected = up.normalize(x)
        torch.testing.assert_close(ours.normalize(x), expected, rtol=1e-6, atol=1e-6)
        ours.record_moments(x)
        up.record_moments(x)
        _assert_stats_close(ours, up, rtol=1e-6)
    ours.record_moments(torch.randn(batch_shape, generator=g), mask=torch.arange(8) % 2 == 0)
    assert int(ours.count) == int(up.count) + (4 if ema is None else 0)
    if stats_shape != (1,):
        with pytest.raises(ValueError, match="feature shape"):  # trailing 1s are other features, as upstream's fail
            ours.record_moments(torch.randn(batch_shape + (1,)))


@pytest.mark.parametrize("ema", [None, 0.9], ids=["welford", "ema"])
@pytest.mark.parametrize("stats_shape,mean_shape,var_shape", [((3,), (1, 3), (1, 3)), ((1, 3), (3,), (3,)),
                                                              ((2, 3), (1, 3), (3,)), ((3,), (1, 1, 3), (1, 1)),
                                                              ((3,), (1, 1), ()), ((2, 3), (2, 1), (1, 2, 3))])
def test_update_from_moments_of_shapes_that_broadcast_matches_upstream(upstream, ema, stats_shape, mean_shape,
                                                                       var_shape):
    """Moments kept with their reduced dim (``x.mean(0, keepdim=True)``) or shaped to broadcast over the statistics
    fold in as upstream's arithmetic and its copy into the statistics (which drops leading 1s) take them."""
    ours = RunningMeanStd(None, stats_shape, device="cpu", ema_decay=ema)
    up = upstream.RunningMeanStd(None, stats_shape, device="cpu", ema_decay=ema)
    g = torch.Generator().manual_seed(8)
    for count in (10, 3):
        batch_mean, batch_var = torch.randn(mean_shape, generator=g), torch.rand(var_shape, generator=g) + 0.5
        ours.update_from_moments(batch_mean, batch_var, count)
        up.update_from_moments(batch_mean, batch_var, count)
        _assert_stats_close(ours, up, rtol=1e-6)
    before = (ours.mean.clone(), ours.var.clone(), ours.count.clone())
    with pytest.raises(ValueError, match=r"batch_mean of shape \(.*\) or one that broadcasts to it, got \(3, 1\)"):
        ours.update_from_moments(torch.zeros(3, 1), torch.ones(()), 4)  # [3, 3] for upstream too, which fails
    assert all(torch.equal(a, b) for a, b in zip(before, (ours.mean, ours.var, ours.count)))


@pytest.mark.parametrize("ema", [None, 0.9], ids=["welford", "ema"])
def test_update_from_moments_and_lazy_normalize_match_upstream(upstream, ema):
    up = upstream.RunningMeanStd(None, device="cpu", clamp_value=2.0, ema_decay=ema)
    ours = RunningMeanStd(None, device="cpu", clamp_value=2.0, ema_decay=ema)
    x = torch.randn(6, 3) * 4
    torch.testing.assert_close(ours.eval().normalize(x), up.normalize(x), rtol=0, atol=0)  # lazy init, prior stats
    for m in (up, ours):
        m.update_from_moments(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64), 9)
    _assert_stats_close(ours, up, rtol=1e-7)
    torch.testing.assert_close(ours.normalize(x), up.normalize(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.normalize(x, un_norm=True), up.normalize(x, un_norm=True), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.maybe_clamp(x), up.maybe_clamp(x), rtol=0, atol=0)


@pytest.mark.parametrize("ema", [None, 0.9], ids=["welford", "ema"])
@pytest.mark.parametrize("stats_shape,moments_shape", [
    ((3,), (1, 3)), ((3,), (1, 1, 3)), ((1, 3), (3,)), ((2, 3), (3,)), ((2, 3), (1, 3)), ((3,), (1,)), ((3,), ()),
])
def test_update_from_moments_takes_moments_shaped_as_upstream_takes_them(upstream, ema, stats_shape, moments_shape):
    """Moments that broadcast to the statistics' shape once their leading 1s are dropped (``keepdim=True`` moments,
    one value for every feature) are what upstream's ``buffer[:] = ...`` writes; protonorm takes them alike. Upstream
    merges with float32 counts (4/5 rounds by 1.5e-8 relative), hence 1e-7."""
    g = torch.Generator().manual_seed(0)
    batch_mean = torch.randn(moments_shape, generator=g, dtype=torch.float64)
    batch_var = torch.rand(moments_shape, generator=g, dtype=torch.float64)
    up = upstream.RunningMeanStd(None, stats_shape, device="cpu", ema_decay=ema)
    ours = RunningMeanStd(None, stats_shape, device="cpu", ema_decay=ema)
    for m in (up, ours):
        m.update_from_moments(batch_mean, batch_var, 4)
    _assert_stats_close(ours, up, rtol=1e-7)


@pytest.mark.parametrize("moments_shape", [(2,), (3, 1), (2, 3), (4, 1, 3)])
def test_update_from_moments_refuses_moments_that_do_not_fit_as_upstream(upstream, moments_shape):
    up = upstream.RunningMeanStd(None, (3,), device="cpu")
    ours = RunningMeanStd(None, (3,), device="cpu")
    moments = torch.ones(moments_shape, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        up.update_from_moments(moments, moments, 4)
    with pytest.raises(ValueError, match=r"batch_mean of shape \(3,\)"):
        ours.update_from_moments(moments, moments, 4)
    assert int(ours.count) == 1 and torch.equal(ours.mean, torch.zeros(3, dtype=torch.float64))


def test_documented_differences_at_zero_counts_and_per_element_flags(upstream):
    """README's differences: two empty groups merge into an empty one (upstream: 0/0), an EMA update of 0 rows is a
    no-op (upstream applies it), and a multi-feature reward takes one flag per environment, not per element."""
    means, vars_ = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0])], [torch.ones(2)] * 3
    ours, theirs = protonorm.combine_moments(means, vars_, [0, 0, 4]), upstream.combine_moments(means, vars_, [0, 0, 4])
    assert torch.equal(ours[0], means[2]) and torch.equal(ours[1], vars_[2]) and int(ours[2]) == 4
    assert theirs[0].isnan().all() and int(theirs[2]) == 4
    m = RunningMeanStd(None, (2,), device="cpu", ema_decay=0.9)
    up = upstream.RunningMeanStd(None, (2,), device="cpu", ema_decay=0.9)
    for norm in (m, up):
        norm.update_from_moments(torch.ones(2, dtype=torch.float64), torch.full((2,), 3.0, dtype=torch.float64), 0)
    assert torch.equal(m.mean, torch.zeros(2, dtype=torch.float64)) and not torch.equal(up.mean, m.mean)
    r = RewardRunningMeanStd(None, (2,), 0.9, device="cpu")
    with pytest.raises(ValueError, match=r"one entry per environment \(4\), got shape \(4, 2\)"):
        r.record_reward(torch.ones(4, 2), torch.zeros(4, 2))
    upstream.RewardRunningMeanStd(None, (2,), 0.9, device="cpu").record_reward(torch.ones(4, 2), torch.zeros(4, 2))
    r.record_reward(torch.ones(4, 2), torch.zeros(4, 1))
    assert r.discounted_reward is not None and int(r.count) == 5


@pytest.mark.parametrize("fused", [False, True], ids=["record", "normalize_then_record"])
def test_negative_variance_merges_to_zero_as_upstream(upstream, backend_name, fused):
    """Upstream's merge clamps the combined variance at 0, so a negative variance (a checkpoint written by other code
    or edited by hand) comes out of the next record as 0, never as a negative number that normalize would take the
    root of."""
    state = {"mean": torch.zeros(3, dtype=torch.float64),
             "var": torch.tensor([-1.0, -1e-3, 0.5], dtype=torch.float64), "count": torch.tensor(10)}
    up = upstream.RunningMeanStd(None, (3,), device="cpu")
    ours = RunningMeanStd(None, (3,), device="cpu", backend=backend_name)
    x = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 4.0]])
    for m in (up, ours):
        m.load_state_dict(state)
        if fused:
            m.normalize(x)
        m.record_moments(x)
    assert torch.equal(ours.var[:2], torch.zeros(2, dtype=torch.float64)) and not ours.var.signbit().any()
    _assert_stats_close(ours, up, rtol=1e-7)


# ------------------------------------------------------------------------------------------------ locating it
def _locate():
    """``(what load() did: "loaded", "skip" or "fail", the module or its message)``."""
    try:
        return "loaded", upstream_locator.load()
    except pytest.skip.Exception as exc:
        return "skip", str(exc)
    except pytest.fail.Exception as exc:
        return "fail", str(exc)


def test_a_named_upstream_folder_is_the_only_one_looked_in(tmp_path, monkeypatch):
    """A folder named in PROTONORM_UPSTREAM_DIR that lacks the module fails, rather than testing against another copy
    found elsewhere; one that has it is the one loaded."""
    monkeypatch.setenv("PROTONORM_UPSTREAM_DIR", str(tmp_path))
    missing = f"upstream {upstream_locator.FILENAME} not found in PROTONORM_UPSTREAM_DIR='{tmp_path}'"
    assert _locate() == ("fail", missing)
    (tmp_path / upstream_locator.FILENAME).write_text("WHERE = 'named'\n")
    outcome, module = _locate()
    assert outcome == "loaded" and module.WHERE == "named"


@pytest.mark.parametrize("value,outcome", [("", "skip"), ("0", "skip"), ("False", "skip"), ("1", "fail"),
                                           ("true", "fail"), (" YES ", "fail"), ("2", "bad"), ("required", "bad")])
def test_require_upstream_takes_the_usual_spellings(tmp_path, monkeypatch, value, outcome):
    monkeypatch.delenv("PROTONORM_UPSTREAM_DIR", raising=False)
    monkeypatch.setattr(upstream_locator, "_candidates", lambda: [tmp_path])  # where nothing is found
    monkeypatch.setenv("PROTONORM_REQUIRE_UPSTREAM", value)
    did, said = _locate()
    assert did == ("skip" if outcome == "skip" else "fail"), said
    bad = "environment variable PROTONORM_REQUIRE_UPSTREAM must be 1, true, yes, on or 0, false, no, off"
    assert (said.startswith(bad) and said.endswith(f"got {value!r}")) == (outcome == "bad"), said


# ------------------------------------------------------------------------------------------------ program transforms
def _normalizer(lib, reward, shape=(3,), **kwargs):
    if reward:
        return lib.RewardRunningMeanStd(None, shape, 0.9, device="cpu", **kwargs)
    return lib.RunningMeanStd(None, shape, device="cpu", **kwargs)


class _Holder(nn.Module):
    """A model that keeps a normalizer for its rollouts but whose forward does not call it."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("reward, lazy", [(False, False), (False, True), (True, False)], ids=["obs", "lazy", "reward"])
def test_jit_script_of_a_model_holding_a_normalizer_works_as_upstream(upstream, reward, lazy):
    """torch.jit.script compiles the properties of every submodule; upstream's module has none, so a model that merely
    holds one scripts. Ours must too, and the scripted model must carry the statistics in its state_dict."""
    x = torch.randn(4, 3)
    scripted = {}
    for lib in (upstream, protonorm):
        torch.manual_seed(0)
        norm = _normalizer(lib, reward, shape=None if lazy else (3,))
        if not lazy:
            norm.record_moments(torch.randn(8, 3) * 2 + 1)
        scripted[lib] = torch.jit.script(_Holder(norm))
    torch.testing.assert_close(scripted[protonorm](x), scripted[upstream](x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.jit.save(scripted[protonorm], buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    want, got = scripted[upstream].state_dict(), loaded.state_dict()
    # (TorchScript keeps non-persistent buffers in a scripted state_dict: nonfinite_rows comes along)
    assert set(got) - set(want) <= {"norm.nonfinite_rows"} and set(want) <= set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)  # upstream's moments are float32's


class _Normalizing(nn.Module):
    def __init__(self, norm, un_norm):
        super().__init__()
        self.norm = norm
        self.un_norm = un_norm

    def forward(self, x):
        return self.norm.normalize(x * 2, un_norm=self.un_norm) + 1


@pytest.mark.parametrize("reward", [False, True], ids=["obs", "reward"])
@pytest.mark.parametrize("un_norm", [False, True], ids=["normalize", "un_norm"])
@pytest.mark.parametrize("clamp_value", [None, 1.5])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fx_symbolic_trace_of_normalize_as_upstream(upstream, reward, un_norm, clamp_value, training):
    """Upstream's normalize is plain tensor arithmetic, which torch.fx.symbolic_trace records; ours must trace too and
    give upstream's graph's results, on inputs other than the one traced (same float32 operations: exact)."""
    data = torch.randn(16, 3) * 2 + 1
    graphs = {}
    for lib in (upstream, protonorm):
        norm = _normalizer(lib, reward, clamp_value=clamp_value)
        norm.record_moments(data)
        graphs[lib] = torch.fx.symbolic_trace(_Normalizing(norm, un_norm).train(training))
    for x in (torch.randn(5, 3) * 3, torch.randn(2, 7, 3)):
        torch.testing.assert_close(graphs[protonorm](x), graphs[upstream](x), rtol=1e-6, atol=1e-6)


def test_fx_symbolic_trace_of_a_lazy_normalizer_says_why_it_fails():
    """A lazy module takes its shape from its first input, which a symbolic trace does not have (upstream's fails too)."""
    model = _Normalizing(RunningMeanStd(None, device="cpu"), un_norm=False)
    with pytest.raises(TypeError, match="lazy normalizer cannot take its shape from a torch.fx symbolic trace"):
        torch.fx.symbolic_trace(model)
    assert not model.norm._initialized
