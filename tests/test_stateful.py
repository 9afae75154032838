"""Model-based tests: protonorm and upstream's module driven side by side through random sequences of what training
code does (construct, record, normalize then record, un_norm, update_from_moments, reward steps, checkpoints loaded
into a fresh module of the other kind or into the module in use, deepcopy, pickling, moves, train/eval switches,
hyperparameters, fabrics and sync modes assigned later, deferred syncs), compared after every step.

Three modules take every call: protonorm on the backend under test, protonorm on its torch reference backend, and
upstream's. Against the reference the statistics agree to float64 rounding (other summation orders). Against
upstream they agree to upstream's own accuracy, which is lower: it weighs each merge with float32 counts
(``count_b / total_count`` rounds to float32, 6e-8 relative, which moves the mean by that fraction of the distance
between batch and running mean and the variance by that fraction of the squared distance's term) and computes batch
moments in the input dtype. So counts stay far below 2^24, where its float32 counts are still exact, and float32
batches are well conditioned (offsets at most 50 spreads), where its float32 moments are good to about 1e-6.
Outputs are checked against upstream's formula applied to protonorm's statistics (an upstream module loaded with
protonorm's checkpoint): both round the statistics to float32, so the two modules' own outputs differ by an ulp of
the float32 mean over the standard deviation wherever their float64 means round apart.

Where protonorm differs from upstream by design (README), upstream is given what protonorm documents: rows holding
NaN are left out of its batches (protonorm drops them, or raises and records nothing), empty batches are not given
to it (a no-op here), and a reward normalizer is recorded before upstream's normalize, which does not initialize
a lazy module.

protonorm's fabric is None, a duck-typed one of one rank, or one of two ranks whose other rank records the same
batches (its ``all_gather`` returns this rank's tensor twice); upstream's is None. A record that reaches both ranks
then enters protonorm's statistics twice: upstream's module records those rows again. In EMA mode twice the rows
make the same step; in Welford mode, rows protonorm owes the other rank (deferred records, and per-call ones made
while owed rows wait for a fabric of two ranks) are given to upstream again when they reach it.
"""
import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

import protonorm

import upstream as upstream_locator
from conftest import CPU_BACKENDS

# (offset, spread) of generated data. float32 batches get only the well-conditioned ones: upstream's float32
# moments lose about (offset / spread)^2 * 6e-8 of the variance.
_WELL_CONDITIONED = [(0.0, 1.0), (-3.0, 0.5), (50.0, 2.0), (1.0, 0.1), (-20.0, 30.0)]
_ILL_CONDITIONED = [(1e3, 1e-2), (-4e4, 1.0), (1e5, 3.0)]
_CONDITIONS = _WELL_CONDITIONED + _ILL_CONDITIONED
_DTYPES = st.sampled_from([torch.float64, torch.float64, torch.float32, torch.float32, torch.bfloat16, torch.float16])
_LAYOUTS = st.sampled_from(["contiguous", "contiguous", "strided", "column_major"])
_CONTEXTS = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}

# Relative tolerances: the mean's to the scale |mean| + sqrt(var), the variance's to var + 1e-10 times that scale
# squared (a variance far below the mean's square inherits the mean's rounding through the merge's delta^2 term).
_REFERENCE_RTOL = 1e-12  # float64 sums in other orders; 3e-15 was the largest error seen in 400 sequences
_UPSTREAM_RTOL = 5e-6  # float32 weights and float32 batch moments; 2.5e-7 was the largest seen in 400 sequences
_OUTPUT_RTOL = 3e-7  # float32 roots: MKL's (torch, cpp) or correctly rounded (Triton) differ by an ulp
_RETURNS_RTOL = 1e-6  # the discounted returns: float32 arithmetic in either order of its two roundings


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


class _Holder(nn.Module):
    """A model holding one normalizer, as ProtoMotions' agents hold theirs."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm


class _Fabric:
    """A duck-typed fabric of ``world_size`` ranks, each of which records what this one does."""

    global_rank = 0

    def __init__(self, world_size):
        self.world_size = world_size

    def all_gather(self, value):
        return torch.stack([torch.as_tensor(value)] * self.world_size)


def _assert_stats_close(got, want, rtol, what):
    if not want._initialized:
        assert not got._initialized, what
        return
    assert got._initialized and tuple(got.shape) == tuple(want.shape), what
    assert got.mean.dtype == torch.float64 and got.var.dtype == torch.float64 and got.count.dtype == torch.int64
    assert int(got.count) == int(want.count), f"{what}: count {int(got.count)} != {int(want.count)}"
    scale = want.mean.abs() + want.var.clamp(min=0).sqrt()
    mean_ok = (got.mean - want.mean).abs() <= rtol * scale
    assert bool(mean_ok.all()), f"{what}: mean {got.mean.tolist()} != {want.mean.tolist()} (rtol {rtol})"
    var_ok = (got.var - want.var).abs() <= rtol * (want.var + 1e-10 * scale * scale)
    assert bool(var_ok.all()), f"{what}: var {got.var.tolist()} != {want.var.tolist()} (rtol {rtol})"


class NormalizerParity(RuleBasedStateMachine):
    """One protonorm module (``backend``), one on the torch reference backend, one of upstream's."""

    backend = "torch"
    max_rows = 65
    features = [1, 3, 5, 17]

    up_module = None  # upstream's module, set once per test (_machine) rather than loaded again for each example

    def __init__(self):
        super().__init__()
        self.ours = self.ref = self.up = None

    # ------------------------------------------------------------------------------------------- helpers
    def _make(self, kind, backend=None, lazy=None):
        """A fresh module of this machine's configuration: protonorm's on ``backend``, upstream's without."""
        c = self.config
        shape = None if (c["lazy"] if lazy is None else lazy) else c["shape"]
        if kind == "up":
            lib, fabric, extras = self.up_module, None, {}
        else:
            lib, fabric = protonorm, self.fabric
            extras = dict(backend=backend, nonfinite=c["nonfinite"], sync=self.sync)
        if c["reward"]:  # (upstream's reward normalizer takes clamp_value before device)
            return lib.RewardRunningMeanStd(fabric, shape, c["gamma"], c["epsilon"], c["clamp"], "cpu", self.ema,
                                            **extras)
        return lib.RunningMeanStd(fabric, shape, c["epsilon"], "cpu", c["clamp"], self.ema, **extras)

    def _modules(self):
        return [m for m in (self.ours, self.ref, self.up) if m is not None]

    def _ours(self):
        return [m for m in (self.ours, self.ref) if m is not None]

    @property
    def world(self):
        return 1 if self.fabric is None else self.fabric.world_size

    def _batch(self, seed, rows, conditioning, dtype, constant=False, shape=None):
        g = np.random.default_rng(seed)
        conditions = _CONDITIONS if dtype == torch.float64 else _WELL_CONDITIONED
        offset, spread = conditions[conditioning % len(conditions)]
        shape = self.config["shape"] if shape is None else shape
        x = offset + spread * g.standard_normal((min(rows, self.max_rows), *shape))
        if constant and x.ndim > 1 and x.shape[0]:
            x[:, int(g.integers(x.shape[1]))] = offset + 0.25  # one column constant across the batch
        return torch.from_numpy(x).to(dtype)

    @staticmethod
    def _laid_out(x, layout):
        """``x``'s values with rows apart in memory (``strided``) or stored column by column (``column_major``)."""
        if layout == "strided":
            wide = torch.empty((x.shape[0], 2, *x.shape[1:]), dtype=x.dtype)
            wide[:, 1] = x
            return wide[:, 1]
        if layout == "column_major" and x.dim() == 2:
            return x.t().contiguous().t()
        return x

    @staticmethod
    def _for_upstream(x):
        """The rows as upstream's module must get them: its batch moments of half-precision input are computed in
        that precision (a documented difference), protonorm's in float64, as upstream's of the float64 values."""
        return x if x.dtype in (torch.float32, torch.float64) else x.double()

    def _can_normalize(self):
        # Upstream's reward normalize does not initialize a lazy module (its buffers are missing): record first.
        return self.ours is not None and (self.ours._initialized or not self.config["reward"])

    def _initialized(self):
        return self.ours is not None and self.ours._initialized

    def _check_output(self, x, un_norm, got):
        """``got`` is what upstream's formula gives with protonorm's statistics."""
        if not self.ours._initialized:
            return
        shadow = self._make("up", lazy=True)
        shadow.clamp_value, shadow.epsilon = self.ours.clamp_value, self.ours.epsilon  # (assigned later, maybe)
        state = self.ours.state_dict()
        self.up_module.materialize_lazy_running_stats_from_state_dict(shadow, state)
        shadow.load_state_dict(state)
        want = shadow.normalize(x, un_norm)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=_OUTPUT_RTOL, atol=0)

    def _recorded(self, rows, bad):
        """Book-keeping after protonorm's modules recorded ``rows`` (the valid rows, given to upstream once) and left
        out ``bad`` rows: what the other rank gets now, or is owed."""
        self.dropped += bad
        if self.sync == "deferred" or (self.owing and self.world == 1):
            self.owing = True
            self.owed.append((rows, bad))
        elif self.world > 1:  # a per-call record reaches the other rank, with the rows owed to it
            delivered, self.owed, self.owing = self.owed + [(rows, bad)], [], False
            self._deliver(delivered)

    def _deliver(self, batches):
        """The other rank's copies of ``batches`` enter protonorm's statistics: upstream records them again."""
        for rows, bad in batches:
            self.dropped += (self.world - 1) * bad
            if rows is not None and rows.shape[0] and self.ema is None:  # (EMA: twice the rows make the same step)
                for _ in range(self.world - 1):
                    self.up.record_moments(rows)

    def _forget_owed(self):
        """A checkpoint loaded or a pickle: protonorm starts a new synced base, and the owed rows stay local."""
        self.owing, self.owed = False, []

    # ------------------------------------------------------------------------------------------- construct
    @initialize(reward=st.booleans(), lazy=st.booleans(), ema=st.sampled_from([None, None, 0.9, 0.5]),
                clamp=st.sampled_from([None, 5.0, 0.75]), epsilon=st.sampled_from([1e-5, 1e-3]),
                d=st.integers(0, 3), reward_shape=st.sampled_from(["flat", "column", "three"]),
                gamma=st.sampled_from([0.0, 0.9, 0.99, 1.0]), envs=st.integers(1, 65),
                reward_dtype=st.sampled_from([torch.float32, torch.float64]), world=st.sampled_from([None, 1, 2]),
                sync=st.sampled_from(["per_call", "deferred"]), nonfinite=st.sampled_from(["drop", "raise"]))
    def construct(self, reward, lazy, ema, clamp, epsilon, d, reward_shape, gamma, envs, reward_dtype, world, sync,
                  nonfinite):
        if reward:
            # ProtoMotions' [N] rewards against (1,) statistics (not lazy: upstream's would take the shape (), which
            # its update cannot slice), and [N, 1] or [N, 3] rewards with [N, 1] flags.
            shape = (3,) if reward_shape == "three" else (1,)
            lazy = lazy and reward_shape != "flat"
        else:
            shape = (self.features[d % len(self.features)],)
        if world == 2 and sync == "deferred" and ema is not None:
            sync = "per_call"  # a deferred EMA sync averages the ranks' EMA states: not upstream's per-call EMA
        self.config = dict(reward=reward, lazy=lazy, flat=reward and reward_shape == "flat", clamp=clamp,
                           epsilon=epsilon, shape=shape, gamma=gamma, envs=min(envs, self.max_rows),
                           reward_dtype=reward_dtype, nonfinite=nonfinite)
        self.fabric, self.sync, self.ema = None if world is None else _Fabric(world), sync, ema
        self.ours = self._make("ours", self.backend)
        self.ref = self._make("ours", "torch") if self.backend != "torch" else None
        self.up = self._make("up")
        self.training = True
        self.dropped = 0  # rows protonorm's statistics must have left out
        self.owing, self.owed = False, []  # whether protonorm holds rows owed to the other rank, and which

    # ------------------------------------------------------------------------------------------- records
    @rule(seed=st.integers(0, 2**32 - 1), rows=st.integers(0, 65), conditioning=st.integers(0, 7), dtype=_DTYPES,
          constant=st.booleans(), layout=_LAYOUTS, nan_rows=st.sampled_from([0, 0, 0, 1, 3]), masked=st.booleans())
    def record(self, seed, rows, conditioning, dtype, constant, layout, nan_rows, masked):
        """A batch, with rows holding NaN (left out, or refused) and a mask (whose rows left out do not count)."""
        x = self._batch(seed, rows, conditioning, dtype, constant)
        g = np.random.default_rng(seed + 1)
        bad = torch.zeros(x.shape[0], dtype=torch.bool)
        bad[torch.from_numpy(g.permutation(x.shape[0])[:nan_rows])] = True
        if bad.any():
            x.view(x.shape[0], -1)[bad, 0] = float("nan")
        x = self._laid_out(x, layout)
        mask = torch.from_numpy(g.random(x.shape[0]) < 0.7) if masked else None
        counted = bad if mask is None else bad & mask
        valid = ~bad if mask is None else mask & ~bad
        if int(counted.sum()) and self.config["nonfinite"] == "raise":
            before = [{k: v.clone() for k, v in m.state_dict().items()} for m in self._ours()]
            for m in self._ours():
                with pytest.raises(ValueError, match="expected finite values"):
                    m.record_moments(x, mask)
            for m, state in zip(self._ours(), before):  # nothing changed, a lazy module is still lazy
                assert m.state_dict().keys() == state.keys()
                assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
            return
        for m in self._ours():
            m.record_moments(x, mask)
        if not self.up._initialized:
            self.up._lazy_init(x)  # as upstream's record would first (protonorm's takes the shape of any batch)
        kept = self._for_upstream(x[valid])
        if kept.shape[0]:
            self.up.record_moments(kept)
        if x.shape[0]:
            self._recorded(kept, int(counted.sum()))
        elif self.sync == "per_call" and self.world > 1:
            self._recorded(None, 0)  # an empty batch still joins the collective, and takes the owed rows along

    @precondition(lambda self: self._can_normalize())
    @rule(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 65), conditioning=st.integers(0, 7), dtype=_DTYPES,
          constant=st.booleans(), layout=_LAYOUTS, then=st.sampled_from(["same", "same", "changed", "other"]),
          context=st.sampled_from(["grad", "no_grad", "inference_mode"]))
    def normalize_then_record(self, seed, rows, conditioning, dtype, constant, layout, then, context):
        """ProtoMotions' order: normalize a batch, then record it (or record it changed in place, or another), with
        gradients on or off or in inference mode (once initialized: upstream's lazy buffers made in inference mode
        cannot be updated outside it)."""
        if context == "inference_mode" and not self.ours._initialized:
            context = "no_grad"
        with _CONTEXTS[context]():
            x = self._laid_out(self._batch(seed, rows, conditioning, dtype, constant), layout)
            outputs = [m.normalize(x) for m in self._ours()]
            self.up.normalize(self._for_upstream(x))
            self._check_output(x, False, outputs[0])
            if then == "changed":
                x.mul_(0.5).add_(1.0)
            elif then == "other":
                x = self._batch(seed + 1, rows, conditioning, dtype, constant)
            for m in self._ours():
                m.record_moments(x)
            self.up.record_moments(self._for_upstream(x))
        self._recorded(self._for_upstream(x), 0)

    @precondition(lambda self: self.config["reward"])
    @rule(seed=st.integers(0, 2**32 - 1), conditioning=st.integers(0, 4), done_rate=st.sampled_from([0.0, 0.3, 1.0]),
          flags=st.sampled_from([torch.bool, torch.float32, torch.int64]))
    def record_reward(self, seed, conditioning, done_rate, flags):
        g = np.random.default_rng(seed)
        c = self.config
        envs, shape = c["envs"], c["shape"]
        reward = self._batch(seed, envs, conditioning, c["reward_dtype"], shape=() if c["flat"] else None)
        # One flag per environment, [N, 1] beside [N, D] rewards, as upstream's arithmetic broadcasts them.
        done = torch.from_numpy(g.random((envs,) if c["flat"] else (envs, 1)) < done_rate).to(flags)
        for m in self._modules():
            m.record_reward(reward, done)
        self._recorded(self.up.discounted_reward.clone(), 0)
        torch.testing.assert_close(self.ours.discounted_reward, self.up.discounted_reward, rtol=_RETURNS_RTOL,
                                   atol=_RETURNS_RTOL)
        if self.ref is not None:
            assert torch.equal(self.ours.discounted_reward, self.ref.discounted_reward)

    @precondition(lambda self: self.config["reward"])
    @rule(start=st.sampled_from(["none", "zeros"]), envs=st.integers(1, 65))
    def assign_returns(self, start, envs):
        """Callers may restart the discounted returns (a plain attribute upstream): from None, with a new number of
        environments, or from zeros."""
        c = self.config
        if start == "none":
            c["envs"] = min(envs, self.max_rows)
        shape = (c["envs"],) if c["flat"] else (c["envs"], *c["shape"])
        for m in self._modules():
            m.discounted_reward = None if start == "none" else torch.zeros(shape, dtype=c["reward_dtype"])

    @precondition(lambda self: self._initialized())
    @rule(seed=st.integers(0, 2**32 - 1), count=st.sampled_from([1, 2, 7, 1000, 100_000]),
          conditioning=st.integers(0, 7), count_type=st.sampled_from(["int", "tensor"]),
          mean_dtype=st.sampled_from([torch.float64, torch.float32]), scalar=st.booleans())
    def update_from_moments(self, seed, count, conditioning, count_type, mean_dtype, scalar):
        """Applied alike on every rank: once, on both sides (moments per feature, or one for all features)."""
        g = np.random.default_rng(seed)
        offset, spread = _CONDITIONS[conditioning]
        shape = () if scalar else tuple(self.ours.shape)
        mean = torch.from_numpy(np.asarray(offset + spread * g.standard_normal(shape))).to(mean_dtype)
        var = torch.from_numpy(np.asarray(spread * spread * g.random(shape)))
        for m in self._modules():
            m.update_from_moments(mean.clone(), var.clone(), count if count_type == "int" else torch.tensor(count))

    @rule(through_model=st.booleans())
    def sync_deferred(self, through_model):
        for m in self._ours():
            protonorm.sync(_Holder(m) if through_model else m)
        if self.sync == "deferred" and self.world > 1:
            self._deliver(self.owed)
            self.owed = []

    # ------------------------------------------------------------------------------------------- outputs
    @precondition(lambda self: self._can_normalize())
    @rule(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 65), conditioning=st.integers(0, 7), dtype=_DTYPES,
          layout=_LAYOUTS, un_norm=st.booleans(), stacked=st.sampled_from(["no", "no", "stacked", "unbatched"]),
          needs_grad=st.booleans())
    def normalize(self, seed, rows, conditioning, dtype, layout, un_norm, stacked, needs_grad):
        """normalize / un_norm in the current mode (in training mode with nothing recorded after), of a batch that
        may need gradients."""
        # ProtoMotions normalizes its reward buffers as [steps, envs]; the obs batches as [B, *shape].
        x = self._batch(seed, rows, conditioning, dtype, shape=(self.config["envs"],) if self.config["flat"] else None)
        if un_norm:
            x = x / 4  # normalized values, some beyond the clamp
        if self.ours._initialized:  # leading dims broadcast (a lazy module would take them for features)
            x = {"no": x, "stacked": torch.stack([x, x.flip(0)]), "unbatched": x[0]}[stacked]
        x = self._laid_out(x, layout).requires_grad_(needs_grad)
        outputs = [m.normalize(x, un_norm) for m in self._modules()]
        assert outputs[0].requires_grad == needs_grad
        self._check_output(x, un_norm, outputs[0])

    @rule(value=st.sampled_from([0.0, 3.0, -100.0]))
    def maybe_clamp(self, value):
        x = torch.tensor([value, -value, 0.5])
        assert torch.equal(self.ours.maybe_clamp(x), self.up.maybe_clamp(x))

    # ------------------------------------------------------------------------------------------- assigned later
    @rule(name=st.sampled_from(["clamp_value", "epsilon", "gamma"]), value=st.sampled_from([0.5, 1.0, 1e-4]))
    def assign_hyperparameter(self, name, value):
        if name == "gamma" and not self.config["reward"]:
            return
        for m in self._modules():
            setattr(m, name, value)

    @precondition(lambda self: self.world == 1 and not self.owing)
    @rule(ema=st.sampled_from([None, 0.9, 0.5]))
    def assign_ema_decay(self, ema):
        """Welford <-> EMA on one rank (with rows owed, their later sync would mix the modes)."""
        self.ema = ema
        for m in self._modules():
            m.ema_decay = ema

    @precondition(lambda self: self.ema is None)
    @rule(world=st.sampled_from([None, 1, 2]))
    def assign_fabric(self, world):
        """Callers assign the fabric after construction."""
        self.fabric = None if world is None else _Fabric(world)
        for m in self._ours():
            m.fabric = self.fabric

    @precondition(lambda self: self.ema is None or self.world == 1)
    @rule(mode=st.sampled_from(["per_call", "deferred"]))
    def assign_sync(self, mode):
        self.sync = mode
        for m in self._ours():
            m.sync = mode

    # ------------------------------------------------------------------------------------------- module life
    @precondition(lambda self: self._initialized())
    @rule(helper=st.booleans(), fresh_lazy=st.booleans(), keep_returns=st.booleans())
    def checkpoint_into_the_other_kind(self, helper, fresh_lazy, keep_returns):
        """protonorm's checkpoint into a fresh upstream module and upstream's into fresh protonorm modules (lazy
        ones inside a model, through the materialize helper or, for protonorm's, without it)."""
        mine, theirs = self.ours.state_dict(), self.up.state_dict()
        assert list(mine) == list(theirs) == ["mean", "var", "count"]

        def load(kind, backend, state, use_helper):
            holder = _Holder(self._make(kind, backend, lazy=fresh_lazy))
            state = _roundtrip({f"norm.{k}": v for k, v in state.items()})
            if fresh_lazy and use_helper:
                lib = self.up_module if kind == "up" else protonorm
                lib.materialize_lazy_running_stats_from_state_dict(holder, state)
            holder.load_state_dict(state, strict=True)
            return holder.norm

        returns = [m.discounted_reward for m in self._modules()] if self.config["reward"] else None
        self.ours, self.up = load("ours", self.backend, theirs, helper), load("up", None, mine, True)
        if self.ref is not None:  # the reference continues from upstream's checkpoint too
            self.ref = load("ours", "torch", theirs, helper)
        if returns is not None and keep_returns:  # a plain attribute on both sides, never checkpointed
            for m, r in zip(self._modules(), returns):
                m.discounted_reward = None if r is None else r.clone()
        self._set_mode(self.training)
        self.dropped = 0  # nonfinite_rows is not part of a checkpoint
        self._forget_owed()

    @precondition(lambda self: self._initialized())
    @rule(assign=st.booleans())
    def load_into_the_module_in_use(self, assign):
        """Each module loads the other kind's checkpoint in place (a resume into the agent already built)."""
        mine, theirs = _roundtrip(self.ours.state_dict()), _roundtrip(self.up.state_dict())
        for m in self._ours():
            m.load_state_dict({k: v.clone() for k, v in theirs.items()}, assign=assign)
        self.up.load_state_dict(mine, assign=assign)
        # The records owed since the last sync are dropped with their NaN rows: nonfinite_rows is the sync's again.
        self.dropped -= sum(bad for _, bad in self.owed)
        self._forget_owed()

    @rule(how=st.sampled_from(["deepcopy", "deepcopy_and_use_original", "pickle"]))
    def copy(self, how):
        """A deep copy (which keeps the rows owed) or a pickled whole module (which does not), used from then on."""
        originals = self._modules()
        if how == "pickle":
            copies = [_roundtrip(m) for m in originals[:-1]] + [copy.deepcopy(self.up)]  # (upstream's file is no
            # importable module to unpickle from)
            self._forget_owed()
        else:
            copies = [copy.deepcopy(m) for m in originals]
        if how == "deepcopy_and_use_original" and originals[0]._initialized:  # the copies share nothing with them
            x = torch.full((3, *self.config["shape"]), 7.0, dtype=torch.float64)
            for m in originals:
                m.record_moments(x)
        self.ours, self.up = copies[0], copies[-1]
        self.ref = copies[1] if self.ref is not None else None
        for m in self._ours():  # (a pickle copies the fabric; the copies share this one, as ranks share theirs)
            m.fabric = self.fabric

    @rule(as_device=st.booleans(), parent=st.sampled_from(["none", "to", "double"]))
    def to_cpu(self, as_device, parent):
        """``.to("cpu")`` of the module or of a model holding it, or the model's ``.double()`` (which upstream's
        float64 statistics and int64 count survive too)."""
        target = torch.device("cpu") if as_device else "cpu"
        for m in self._modules():
            if parent == "double":
                _Holder(m).double()
            elif parent == "to":
                _Holder(m).to(target)
            else:
                assert m.to(target) is m
                assert m.device == target

    @rule(training=st.booleans())
    def switch_mode(self, training):
        self._set_mode(training)

    def _set_mode(self, training):
        self.training = training
        for m in self._modules():
            m.train(training)

    # ------------------------------------------------------------------------------------------- compare
    @invariant()
    def statistics_agree(self):
        if self.ours is None:
            return
        assert self.ours.training == self.training
        if self.ours._initialized:
            assert int(self.ours.nonfinite_rows) == self.dropped
        if self.ref is not None:
            _assert_stats_close(self.ours, self.ref, _REFERENCE_RTOL, f"{self.backend} vs reference")
            if self.ours._initialized:
                assert torch.equal(self.ours.nonfinite_rows, self.ref.nonfinite_rows)
        _assert_stats_close(self.ours, self.up, _UPSTREAM_RTOL, f"{self.backend} vs upstream")


def _machine(backend, up_module):
    fast = backend != "triton"  # Triton runs interpreted here: fewer, shorter sequences of tiny batches
    machine = type(f"Parity_{backend}", (NormalizerParity,),
                   {"backend": backend, "up_module": up_module, "max_rows": 65 if fast else 5,
                    "features": [1, 3, 5, 17] if fast else [1, 3]})
    machine.TestCase.settings = settings(
        max_examples=300 if fast else 120, stateful_step_count=30 if fast else 10, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    return machine


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_training_sequences_match_upstream(backend):
    up_module = upstream_locator.load()  # skips (or fails under PROTONORM_REQUIRE_UPSTREAM=1) without it
    _machine(backend, up_module).TestCase().runTest()
