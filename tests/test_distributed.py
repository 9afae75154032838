"""Cross-rank statistics in real processes: Lightning Fabric (ddp_spawn, gloo, 2 and 4 ranks), a plain
``torch.distributed`` process group, and a duck-typed fabric (threads standing in for ranks).

Process start-up dominates, so each world size is spawned once (a module-scoped fixture) and every check runs
inside that one spawn; workers write what they saw to files that the tests below compare. A worker that raises
fails its launch with the worker's traceback. Workers are module-level functions because spawned children
import them by name.

Tolerances: distributed and single-process runs do the same float64 arithmetic in a different merge order
(rank-wise Chan merges instead of one batch), which on this well-conditioned data moves results by a few ulps,
so 1e-12 relative is the bar. Across ranks the bar is bitwise equality.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import os
import re
import socket
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import protonorm
from protonorm import backends, distributed
from protonorm.diagnostics import HostSyncCounter, OpCounter
from protonorm.normalizer import RewardRunningMeanStd, RunningMeanStd

from conftest import assert_same
from hard_data import MEAN_RTOL, STREAMS, VAR_RTOL, make_stream

D_OBS = 7
D_EMA = 5
STEPS = 6
RTOL = 1e-12
REDUCE_METHODS = ("all_gather", "all_reduce")
EMA_CHOICES = (None, 0.9)


def _cpu_backends():
    return [name for name, reason in backends.available(torch.device("cpu")).items() if reason is None]


def _worker_backends(world: int):
    """Backends checked in a run of ``world`` ranks. Triton runs in its (slow) CPU interpreter here; the
    distributed code path is the same for every backend, so the 2-rank run covers it."""
    return [name for name in _cpu_backends() if world == 2 or name != "triton"]


def _is_collective(name: str) -> bool:
    return name.startswith("c10d.")


# --------------------------------------------------------------------------------------------- data
def _obs_batch(rank: int, step: int, d: int = D_OBS) -> torch.Tensor:
    """Rank- and step-dependent float32 rows; uneven sizes, and empty for (0, 2), (3, 1) and (2, 5)."""
    rows = (3 + 5 * rank + 4 * step) % 11
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + d)
    scale = torch.linspace(0.5, 3.0, d)
    return (torch.randn(rows, d, generator=g, dtype=torch.float64) * scale + 100.0).to(torch.float32)


def _step_mask(batch: torch.Tensor) -> torch.Tensor:
    return torch.arange(batch.shape[0]) % 2 == 0


def _num_envs(rank: int) -> int:
    return (2 + 3 * rank) % 11  # rank 3 runs no environment at all


def _reward_step(rank: int, step: int):
    g = torch.Generator().manual_seed(7000 + 100 * rank + step)
    n = _num_envs(rank)
    reward = torch.randn(n, generator=g) + 0.5
    terminated = torch.rand(n, generator=g) < 0.3
    return reward, terminated


def _stats(m):
    return [m.mean.clone(), m.var.clone(), m.count.clone(), m.nonfinite_rows.clone()]


# --------------------------------------------------------------------------------------------- scenarios
# Each scenario runs either on one rank of a distributed run (fabric given) or as the single-process truth
# (fabric None, recording every rank's rows at once).
def _per_call_obs(fabric, rank, world, backend, ema):
    m = RunningMeanStd(fabric, shape=(D_OBS,), device="cpu", ema_decay=ema, backend=backend)
    for step in range(STEPS):
        ranks = range(world) if fabric is None else [rank]
        batches = [_obs_batch(r, step) for r in ranks]
        if step == 3:  # a masked record
            rows = [b[_step_mask(b)] for b in batches] if fabric is None else None
            if fabric is None:
                m.record_moments(torch.cat(rows))
            else:
                m.record_moments(batches[0], mask=_step_mask(batches[0]))
            continue
        batch = torch.cat(batches)
        if step % 2 == 0:  # ProtoMotions' normalize-then-record, which reuses normalize's moments
            m.normalize(batch)
        m.record_moments(batch)
    return _stats(m)


def _per_call_reward(fabric, rank, world, backend):
    m = RewardRunningMeanStd(fabric, (1,), 0.99, device="cpu", backend=backend)
    for step in range(STEPS):
        ranks = range(world) if fabric is None else [rank]
        parts = [_reward_step(r, step) for r in ranks]
        m.record_reward(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return _stats(m)


class _Agent(nn.Module):
    """A model holding several deferred normalizers (one lazy, one EMA) and an ordinary layer."""

    def __init__(self, fabric, backend):
        super().__init__()
        self.actor_obs = RunningMeanStd(fabric, shape=(D_OBS,), device="cpu", backend=backend, sync="deferred")
        self.policy = nn.Linear(3, 2)
        self.critic_obs = RunningMeanStd(
            fabric, shape=(D_EMA,), device="cpu", ema_decay=0.9, backend=backend, sync="deferred"
        )
        self.lazy_obs = RunningMeanStd(fabric, device="cpu", backend=backend, sync="deferred")
        self.reward = RewardRunningMeanStd(fabric, (1,), 0.99, device="cpu", backend=backend, sync="deferred")

    def record(self, ranks, step):
        obs = torch.cat([_obs_batch(r, step) for r in ranks])
        self.actor_obs.record_moments(obs)
        self.critic_obs.record_moments(torch.cat([_obs_batch(r, step, D_EMA) for r in ranks]))
        self.lazy_obs.record_moments(obs[:, :3] * 2.0)
        rewards = [_reward_step(r, step) for r in ranks]
        self.reward.record_reward(torch.cat([p[0] for p in rewards]), torch.cat([p[1] for p in rewards]))

    def all_stats(self):
        return {name: _stats(m) for name, m in self.named_modules() if isinstance(m, RunningMeanStd)}


DEFERRED_ROUNDS = (range(0, 3), range(3, 6))
RESUMED_ROUND = range(6, 9)


def _deferred_rank(fabric, rank, backend):
    """Two sync rounds, a checkpoint, a resume into fresh modules, one more round."""
    out = {"collectives_in_records": 0, "collectives_per_sync": [], "after_sync": [], "local_before_sync": []}
    agent = _Agent(fabric, backend)
    for rounds in DEFERRED_ROUNDS:
        with OpCounter(_is_collective) as ops, HostSyncCounter(strict=True):
            for step in rounds:
                agent.record([rank], step)
        out["collectives_in_records"] += ops.count
        out["local_before_sync"].append(agent.all_stats())
        with OpCounter(_is_collective) as ops:
            protonorm.sync(agent, fabric)
        out["collectives_per_sync"].append(ops.count)
        out["after_sync"].append(agent.all_stats())
    checkpoint = agent.state_dict()
    out["checkpoint"] = checkpoint
    resumed = _Agent(fabric, backend)
    resumed.load_state_dict(checkpoint)
    for step in RESUMED_ROUND:
        resumed.record([rank], step)
    with OpCounter(_is_collective) as ops:
        protonorm.sync(resumed, fabric)
    out["collectives_per_sync"].append(ops.count)
    out["resumed"] = resumed.all_stats()
    return out


def _nonfinite_raise_rank(fabric, rank, world):
    """A NaN row on the last rank: every rank raises together, nothing changes, and the next record still works."""
    m = RunningMeanStd(fabric, shape=(D_OBS,), device="cpu", nonfinite="raise")
    m.record_moments(_obs_batch(rank, 0) + 0.0)
    before = _stats(m)
    bad = torch.ones(4, D_OBS) * (rank + 1)
    if rank == world - 1:
        bad[1, 2] = float("nan")
    raised = None
    try:
        m.record_moments(bad)
    except ValueError as exc:
        raised = str(exc)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, _stats(m)))
    m.record_moments(torch.ones(2, D_OBS) * (rank + 1))
    return {"raised": raised, "unchanged": unchanged, "after": _stats(m)}


def _mismatched_tree_rank(fabric, rank):
    """Ranks whose trees have the same total size but a different layout must all raise, not mix stats."""
    dims = (3, 5) if rank == 0 else (5, 3)
    tree = nn.ModuleDict(
        {name: RunningMeanStd(fabric, shape=(d,), device="cpu", sync="deferred") for name, d in zip("ab", dims)}
    )
    for name, d in zip("ab", dims):
        tree[name].record_moments(torch.ones(2, d))
    try:
        protonorm.distributed.sync(tree, fabric)
    except ValueError as exc:
        return str(exc)
    return None


def _mismatched_size_rank(fabric, rank):
    """Ranks whose trees differ in size (a lazy normalizer fed on rank 0 only) must all raise too, and leave no
    collective half done: a sync of a tree every rank shares works right after."""
    tree = nn.ModuleDict({
        "a": RunningMeanStd(fabric, shape=(3,), device="cpu", sync="deferred"),
        "lazy": RunningMeanStd(fabric, device="cpu", sync="deferred"),
    })
    tree["a"].record_moments(torch.ones(2, 3) * (rank + 1))
    if rank == 0:
        tree["lazy"].record_moments(torch.ones(2, 4))
    try:
        protonorm.distributed.sync(tree, fabric)
        raised = None
    except ValueError as exc:
        raised = str(exc)
    protonorm.distributed.sync(tree["a"], fabric)
    return {"raised": raised, "after": _stats(tree["a"])}


def _deferred_interruptions(fabric, rank, world):
    """Between two syncs: a load_state_dict that leaves the normalizer out (strict=False, the policy only) and an
    update_from_moments with the same arguments on every rank. Neither may lose the records owed to the other
    ranks. With ``fabric`` None: one process doing the same with every rank's rows."""
    norm = RunningMeanStd(fabric, shape=(D_OBS,), device="cpu", sync="deferred")
    model = nn.ModuleDict({"norm": norm, "policy": nn.Linear(2, 2)})
    ranks = range(world) if fabric is None else [rank]
    norm.record_moments(torch.cat([_obs_batch(r, 1) for r in ranks]))
    policy = {k: v for k, v in model.state_dict().items() if k.startswith("policy.")}
    model.load_state_dict(policy, strict=False)
    norm.update_from_moments(torch.full((D_OBS,), 90.0), torch.full((D_OBS,), 4.0), 10)
    norm.record_moments(torch.cat([_obs_batch(r, 2) for r in ranks]))
    if fabric is not None:
        protonorm.sync(model, fabric)
    return _stats(norm)


def _copied_mid_stream(fabric, rank, world):
    """A model deep-copied (as callers copy models) while its deferred normalizer has records pending since the last
    sync; the copy records more and syncs. The copy must send the rows recorded before the copy too, and share the
    fabric (a process group cannot be copied). With ``fabric`` None: one process recording every rank's rows."""
    ranks = range(world) if fabric is None else [rank]
    model = nn.ModuleDict({"norm": RunningMeanStd(fabric, shape=(D_OBS,), device="cpu", sync="deferred")})
    for step in range(2):
        model["norm"].record_moments(torch.cat([_obs_batch(r, step) for r in ranks]))
        if step == 0 and fabric is not None:
            protonorm.sync(model, fabric)
    copied = copy.deepcopy(model)
    assert copied["norm"].fabric is fabric
    copied["norm"].record_moments(torch.cat([_obs_batch(r, 2) for r in ranks]))
    if fabric is not None:
        protonorm.sync(copied, fabric)
    return _stats(copied["norm"])


ONE_RANK_CALLS = ("load_state_dict", "update_from_moments")


def _call_on_one_rank(fabric, rank, call):
    """A per-call normalizer on which rank 0 alone makes ``call`` between two records (run on the all_reduce path):
    the rows of the record after it that this rank's count gains."""
    m = RunningMeanStd(fabric, shape=(D_OBS,), device="cpu", backend="torch")
    m.record_moments(_obs_batch(rank, 0))
    checkpoint = {k: v.clone() for k, v in m.state_dict().items()}
    m.record_moments(_obs_batch(rank, 1))
    if rank == 0:
        if call == "load_state_dict":
            m.load_state_dict(checkpoint)
        else:
            m.update_from_moments(torch.full((D_OBS,), 90.0), torch.full((D_OBS,), 4.0), 10)
    before = m.count.item()
    m.record_moments(_obs_batch(rank, 2))
    return m.count.item() - before


def _deferred_on_one_rank(fabric, rank):
    """A tree whose normalizer is deferred on rank 0 only, synced with fabric=; then per-call on every rank, synced
    again: what the first sync raised, and whether the second left the statistics alone."""
    obs = RunningMeanStd(fabric, shape=(3,), device="cpu", sync="deferred" if rank == 0 else "per_call")
    tree = nn.ModuleDict({"obs": obs})
    try:
        protonorm.sync(tree, fabric)
        raised = ""
    except ValueError as exc:
        raised = str(exc)
    obs.sync = "per_call"
    before = _stats(obs)
    protonorm.sync(tree, fabric)
    return raised, all(torch.equal(a, b) for a, b in zip(before, _stats(obs)))


def _per_call_rank(fabric, rank, world):
    """Every backend x reduce method x (Welford, EMA) observation stream, plus the reward stream."""
    out = {}
    for backend in _worker_backends(world):
        for method in REDUCE_METHODS:
            os.environ[distributed.REDUCE_ENV_VAR] = method
            for ema in EMA_CHOICES:
                with OpCounter(_is_collective) as ops, HostSyncCounter(strict=True) as syncs:
                    stats = _per_call_obs(fabric, rank, world, backend, ema)
                out[(backend, method, ema)] = {"stats": stats, "collectives": ops.names, "syncs": syncs.count}
            with OpCounter(_is_collective) as ops, HostSyncCounter(strict=True) as syncs:
                stats = _per_call_reward(fabric, rank, world, backend)
            out[(backend, method, "reward")] = {"stats": stats, "collectives": ops.names, "syncs": syncs.count}
    os.environ.pop(distributed.REDUCE_ENV_VAR, None)
    return out


# --------------------------------------------------------------------------------------------- workers
def _fabric_worker(fabric, out_dir):
    torch.set_num_threads(1)
    rank, world = fabric.global_rank, fabric.world_size
    result = {
        "rank": rank,
        "world_size": distributed.world_size(fabric),
        "rank_seen": distributed.rank(fabric),
        "per_call": _per_call_rank(fabric, rank, world),
        "deferred": {backend: _deferred_rank(fabric, rank, backend) for backend in _worker_backends(world)},
        "nonfinite_raise": _nonfinite_raise_rank(fabric, rank, world),
        "mismatch": _mismatched_tree_rank(fabric, rank),
        "mismatched_size": _mismatched_size_rank(fabric, rank),
        "interruptions": _deferred_interruptions(fabric, rank, world),
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@contextlib.contextmanager
def _gloo_group(rank, world, port):
    """The default process group of a spawned worker, on gloo, destroyed on the way out."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _process_group_worker(rank, world, port, out_dir):
    with _gloo_group(rank, world, port):
        result = {}
        for label, fabric in (("group", dist.group.WORLD), ("default", "default"), ("module", dist)):
            with OpCounter(_is_collective) as ops, HostSyncCounter(strict=True):
                stats = _per_call_obs(fabric, rank, world, "torch", None)
            sizes = (distributed.world_size(fabric), distributed.rank(fabric))
            result[label] = {"stats": stats, "collectives": ops.count, "sizes": sizes}
        result["deferred"] = _deferred_rank(dist.group.WORLD, rank, "torch")
        result["copied"] = [_copied_mid_stream(fabric, rank, world) for fabric in (dist.group.WORLD, dist)]
        # Calls made on rank 0 alone, which must not leave a rank waiting (the group's timeout fails the run).
        os.environ[distributed.REDUCE_ENV_VAR] = "all_reduce"
        result["one_rank"] = [_call_on_one_rank(dist.group.WORLD, rank, call) for call in ONE_RANK_CALLS]
        os.environ.pop(distributed.REDUCE_ENV_VAR)
        result["deferred_one_rank"] = _deferred_on_one_rank(dist.group.WORLD, rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


class _DdpPolicy(nn.Module):
    """A policy holding its normalizers, as callers hand it to DistributedDataParallel (or ``fabric.setup``)."""

    def __init__(self, fabric, sync, lazy):
        super().__init__()
        shape = None if lazy else (D_OBS,)
        self.head = nn.Linear(D_OBS, 1)
        self.obs = RunningMeanStd(fabric, shape, device="cpu", sync=sync)
        self.obs_ema = RunningMeanStd(fabric, shape, device="cpu", ema_decay=0.9, sync=sync)
        self.reward = RewardRunningMeanStd(fabric, (1,), 0.99, device="cpu", sync=sync)
        self.reward_ema = RewardRunningMeanStd(fabric, (1,), 0.99, device="cpu", ema_decay=0.9, sync=sync)

    def forward(self, x):
        return self.head(self.obs.normalize(x) + self.obs_ema.normalize(x))

    def record(self, rank, step):
        batch = _obs_batch(rank, step)
        self.obs.record_moments(batch)
        self.obs_ema.record_moments(batch)
        self.reward.record_reward(*_reward_step(rank, step))
        self.reward_ema.record_reward(*_reward_step(rank, step))


def _ddp_worker(rank, world, port, out_dir):
    """Each sync mode, with buffers made at construction or lazily by the first forward, run plainly and wrapped
    in DistributedDataParallel with its default broadcast_buffers=True, which copies rank 0's buffers into every
    rank before each forward: between records in per-call mode, between records and syncs in deferred mode."""
    with _gloo_group(rank, world, port):
        result = {}
        for sync in ("per_call", "deferred"):
            for lazy in (False, True):
                for wrapped in (False, True):
                    torch.manual_seed(0)
                    policy = _DdpPolicy(dist.group.WORLD, sync, lazy)
                    model = nn.parallel.DistributedDataParallel(policy) if wrapped else policy
                    for step in range(4):
                        model(_obs_batch(rank, step))
                        policy.record(rank, step)
                        if sync == "deferred" and step % 2:
                            protonorm.sync(policy)
                    result[sync, lazy, wrapped] = {
                        name: _stats(m) for name, m in policy.named_children() if isinstance(m, RunningMeanStd)
                    }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_ranks(out_dir, world):
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def fabric_run(request, tmp_path_factory):
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    world = request.param
    out_dir = str(tmp_path_factory.mktemp(f"fabric{world}"))
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    try:
        # ddp_spawn, with a short collective timeout so a protocol bug fails the test instead of hanging it.
        strategy = DDPStrategy(start_method="spawn", timeout=datetime.timedelta(seconds=60))
        fabric = Fabric(accelerator="cpu", devices=world, strategy=strategy)
        fabric.launch(_fabric_worker, out_dir)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return world, _load_ranks(out_dir, world)


# --------------------------------------------------------------------------------------------- checks
def assert_close_rel(actual, expected, rtol=RTOL):
    scale = expected.abs().clamp(min=1e-300)
    err = ((actual - expected).abs() / scale).max().item()
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.0e}"


def assert_same_on_every_rank(per_rank):
    first = per_rank[0]
    for r, other in enumerate(per_rank[1:], start=1):
        for a, b in zip(first, other):
            assert torch.equal(a, b), f"rank {r} differs from rank 0: {b} vs {a}"


def assert_matches_truth(stats, truth):
    mean, var, count, dropped = stats
    assert_close_rel(mean, truth[0])
    assert_close_rel(var, truth[1])
    assert torch.equal(count, truth[2])
    assert torch.equal(dropped, truth[3])


def _total_rows(world, steps, d=D_OBS):
    return sum(_obs_batch(r, s, d).shape[0] for r in range(world) for s in steps)


def test_fabric_world_size_and_rank(fabric_run):
    world, ranks = fabric_run
    assert [r["world_size"] for r in ranks] == [world] * world
    assert [r["rank_seen"] for r in ranks] == list(range(world))


def test_empty_batches_are_exercised(fabric_run):
    # The data must contain empty batches on some ranks (but never on all) for the checks below to mean something.
    world, _ = fabric_run
    sizes = [[_obs_batch(r, s).shape[0] for r in range(world)] for s in range(STEPS)]
    assert any(0 in row for row in sizes) and all(sum(row) > 0 for row in sizes)


def _expected_collectives(method):
    """The c10d ops of STEPS per-call records: the all_reduce path gathers once to learn its shared shift."""
    gather, reduce = "c10d._allgather_base_.default", "c10d.allreduce_.default"
    return [gather] * STEPS if method == "all_gather" else [gather] + [reduce] * (STEPS - 1)


@pytest.mark.parametrize("ema", EMA_CHOICES, ids=["welford", "ema"])
@pytest.mark.parametrize("method", REDUCE_METHODS)
def test_per_call_matches_single_process(fabric_run, method, ema):
    world, ranks = fabric_run
    for backend in _worker_backends(world):
        seen = [r["per_call"][(backend, method, ema)] for r in ranks]
        assert_same_on_every_rank([s["stats"] for s in seen])
        assert_matches_truth(seen[0]["stats"], _per_call_obs(None, 0, world, backend, ema))
        # One collective per record (empty batches included, or ranks would wait on each other) and no host read.
        for s in seen:
            assert s["collectives"] == _expected_collectives(method)
        assert [s["syncs"] for s in seen] == [0] * world


@pytest.mark.parametrize("method", REDUCE_METHODS)
def test_reward_normalizer_per_call(fabric_run, method):
    world, ranks = fabric_run
    for backend in _worker_backends(world):
        seen = [r["per_call"][(backend, method, "reward")] for r in ranks]
        assert_same_on_every_rank([s["stats"] for s in seen])
        assert_matches_truth(seen[0]["stats"], _per_call_reward(None, 0, world, backend))
        for s in seen:
            assert s["collectives"] == _expected_collectives(method)
        assert [s["syncs"] for s in seen] == [0] * world


def _single_process_deferred(world, backend):
    """What the deferred tree must hold after each sync: one process recording every rank's rows (Welford
    normalizers), and the row-weighted average of the ranks' EMA movements (the EMA normalizer)."""
    agent = _Agent(None, backend)
    expected = []
    for rounds in DEFERRED_ROUNDS:
        base = agent.critic_obs.mean.clone(), agent.critic_obs.var.clone()
        locals_ = []
        for r in range(world):
            m = RunningMeanStd(None, shape=(D_EMA,), device="cpu", ema_decay=0.9, backend=backend)
            m.load_state_dict(agent.critic_obs.state_dict())
            for step in rounds:
                m.record_moments(_obs_batch(r, step, D_EMA))
            locals_.append((m.mean, m.var, sum(_obs_batch(r, s, D_EMA).shape[0] for s in rounds)))
        for step in rounds:
            agent.record(range(world), step)
        total = sum(n for _, _, n in locals_)
        ema_mean = base[0] + sum((n / total) * (mu - base[0]) for mu, _, n in locals_)
        ema_var = base[1] + sum((n / total) * (v - base[1]) for _, v, n in locals_)
        agent.critic_obs.mean.copy_(ema_mean)
        agent.critic_obs.var.copy_(ema_var)
        expected.append(agent.all_stats())
    return expected


def test_deferred_sync_two_collectives_and_exact(fabric_run):
    world, ranks = fabric_run
    for backend in _worker_backends(world):
        seen = [r["deferred"][backend] for r in ranks]
        assert [s["collectives_in_records"] for s in seen] == [0] * world
        assert [s["collectives_per_sync"] for s in seen] == [[2, 2, 2]] * world  # the layout, then the moments
        expected = _single_process_deferred(world, backend)
        for round_index, truth in enumerate(expected):
            for name, truth_stats in truth.items():
                assert_same_on_every_rank([s["after_sync"][round_index][name] for s in seen])
                assert_matches_truth(seen[0]["after_sync"][round_index][name], truth_stats)


def test_deferred_records_stay_local_until_sync(fabric_run):
    world, ranks = fabric_run
    for rank, seen in enumerate(r["deferred"]["torch"] for r in ranks):
        local = seen["local_before_sync"][1]["actor_obs"]
        synced_first = seen["after_sync"][0]["actor_obs"]
        own_rows = sum(_obs_batch(rank, s).shape[0] for s in DEFERRED_ROUNDS[1])
        assert local[2].item() == synced_first[2].item() + own_rows


def test_deferred_resume_does_not_inflate_counts(fabric_run):
    world, ranks = fabric_run
    for backend in _worker_backends(world):
        seen = [r["deferred"][backend] for r in ranks]
        all_steps = [s for rounds in DEFERRED_ROUNDS for s in rounds] + list(RESUMED_ROUND)
        # 1 pseudo-sample plus every row any rank recorded, each exactly once.
        assert seen[0]["resumed"]["actor_obs"][2].item() == 1 + _total_rows(world, all_steps)
        assert seen[0]["resumed"]["critic_obs"][2].item() == 1  # EMA leaves the count alone
        truth = _Agent(None, backend)
        truth.load_state_dict(seen[0]["checkpoint"])
        for step in RESUMED_ROUND:
            truth.record(range(world), step)
        for name, truth_stats in truth.all_stats().items():
            assert_same_on_every_rank([s["resumed"][name] for s in seen])
            if name != "critic_obs":  # the EMA merge rule is checked in test_deferred_sync_two_collectives_and_exact
                assert_matches_truth(seen[0]["resumed"][name], truth_stats)


def test_nonfinite_raise_raises_on_every_rank(fabric_run):
    world, ranks = fabric_run
    seen = [r["nonfinite_raise"] for r in ranks]
    for s in seen:
        assert s["raised"] is not None and "NaN or inf" in s["raised"]
        assert s["unchanged"]
    assert_same_on_every_rank([s["after"] for s in seen])


def test_mismatched_trees_raise_on_every_rank(fabric_run):
    world, ranks = fabric_run
    for r in ranks:
        assert r["mismatch"] is not None and "different trees" in r["mismatch"]
        assert r["mismatched_size"]["raised"] is not None and "different trees" in r["mismatched_size"]["raised"]
    assert_same_on_every_rank([r["mismatched_size"]["after"] for r in ranks])
    assert ranks[0]["mismatched_size"]["after"][2].item() == 1 + 2 * world


def test_deferred_records_survive_a_partial_load_and_update_from_moments(fabric_run):
    world, ranks = fabric_run
    seen = [r["interruptions"] for r in ranks]
    assert_same_on_every_rank(seen)
    assert_matches_truth(seen[0], _deferred_interruptions(None, 0, world))


def test_process_group_fabrics(tmp_path):
    world = 2
    mp.spawn(_process_group_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = _load_ranks(str(tmp_path), world)
    truth = _per_call_obs(None, 0, world, "torch", None)
    for label in ("group", "default", "module"):
        seen = [r[label] for r in ranks]
        assert [s["sizes"] for s in seen] == [(world, r) for r in range(world)]
        assert_same_on_every_rank([s["stats"] for s in seen])
        assert_matches_truth(seen[0]["stats"], truth)
        assert [s["collectives"] for s in seen] == [STEPS] * world
    deferred = [r["deferred"] for r in ranks]
    assert [d["collectives_per_sync"] for d in deferred] == [[2, 2, 2]] * world
    expected = _single_process_deferred(world, "torch")
    for name, truth_stats in expected[-1].items():
        assert_same_on_every_rank([d["after_sync"][-1][name] for d in deferred])
        assert_matches_truth(deferred[0]["after_sync"][-1][name], truth_stats)
    truth = _copied_mid_stream(None, 0, world)
    for copied in zip(*(r["copied"] for r in ranks)):  # a ProcessGroup, then the torch.distributed module
        assert_same_on_every_rank(copied)
        assert_matches_truth(copied[0], truth)
    assert [r["one_rank"] for r in ranks] == [[_total_rows(world, [2])] * len(ONE_RANK_CALLS)] * world
    for raised, unchanged in (r["deferred_one_rank"] for r in ranks):
        assert "different trees" in raised and unchanged


def test_ddp_buffer_broadcasts_leave_the_statistics_alone(tmp_path):
    """DDP's broadcast of rank 0's mean/var/count/nonfinite_rows before each forward changes nothing that a sync
    produces: per-call statistics are already equal on every rank, and a deferred sync sends what each rank
    recorded (its pending moments, and in EMA mode its own movement), not what its buffers hold."""
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = _load_ranks(str(tmp_path), world)
    for sync, lazy, wrapped in ranks[0]:
        if not wrapped:
            continue
        for name, plain in ranks[0][sync, lazy, False].items():
            seen = [r[sync, lazy, True][name] for r in ranks]
            assert_same_on_every_rank(seen)
            for got, want in zip(seen[0], plain):
                assert torch.equal(got, want), f"{sync} {name} (lazy={lazy}) under DDP: {got} != {want}"


# --------------------------------------------------------------------------------------------- duck-typed fabric
class _ThreadWorld:
    """Ranks played by threads of one process, exchanging tensors through shared slots."""

    def __init__(self, world: int, as_list: bool = False, timeout: float = 30):
        self.world = world
        self.as_list = as_list
        self.slots = [None] * world
        self.barrier = threading.Barrier(world, timeout=timeout)  # a rank left waiting fails the test
        self.gathers = [0] * world

    def fabric(self, rank: int):
        return _ThreadFabric(self, rank)


class _ThreadFabric:
    def __init__(self, world: _ThreadWorld, rank: int):
        self._world, self.global_rank, self.world_size = world, rank, world.world

    def all_gather(self, tensor):
        w = self._world
        w.slots[self.global_rank] = tensor.clone()
        w.barrier.wait()
        gathered = [t.clone() for t in w.slots]
        w.barrier.wait()
        w.gathers[self.global_rank] += 1
        return gathered if w.as_list else torch.stack(gathered)

    def __deepcopy__(self, memo):  # a handle to the world, shared by copies like a process group
        return self

    def broadcast(self, obj, src=0):  # part of upstream's duck type; protonorm never calls it
        raise AssertionError("broadcast must not be used")


def _run_threads(world, target):
    results, errors = [None] * world.world, []

    def run(rank):
        try:
            results[rank] = target(world.fabric(rank), rank)
        except BaseException as exc:  # surfaced below with its rank
            errors.append((rank, exc))
            world.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world.world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        rank, exc = errors[0]
        raise AssertionError(f"rank {rank} failed: {exc!r}") from exc
    return results


@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
@pytest.mark.parametrize("method", REDUCE_METHODS)
def test_duck_typed_fabric_per_call(monkeypatch, method, as_list):
    monkeypatch.setenv(distributed.REDUCE_ENV_VAR, method)
    world = _ThreadWorld(3, as_list)
    for ema in EMA_CHOICES:
        world.gathers = [0] * 3
        results = _run_threads(world, lambda fabric, rank: _per_call_obs(fabric, rank, 3, "torch", ema))
        assert_same_on_every_rank(results)
        assert_matches_truth(results[0], _per_call_obs(None, 0, 3, "torch", ema))
        assert world.gathers == [STEPS] * 3


@pytest.mark.parametrize("stream", sorted(STREAMS))
@pytest.mark.parametrize("method", REDUCE_METHODS)
def test_per_call_hard_data(monkeypatch, method, stream):
    # The accuracy bar of the hard streams (large offsets, tiny spread, constant columns) holds across ranks too;
    # this is what the all_reduce path's shared shift is for. Rows of each batch are dealt out to 3 ranks.
    monkeypatch.setenv(distributed.REDUCE_ENV_VAR, method)
    batches, shape = make_stream(stream, torch.float64, seed=1)
    for ema in EMA_CHOICES:

        def run(fabric, rank):
            m = RunningMeanStd(fabric, shape=shape, device="cpu", ema_decay=ema, backend="torch")
            for b in batches:
                m.record_moments(b[rank::3])
            return _stats(m)

        results = _run_threads(_ThreadWorld(3), run)
        single = RunningMeanStd(None, shape=shape, device="cpu", ema_decay=ema, backend="torch")
        for b in batches:
            single.record_moments(torch.cat([b[r::3] for r in range(3)]))
        assert_same_on_every_rank(results)
        assert_close_rel(results[0][0], single.mean, MEAN_RTOL)
        assert_close_rel(results[0][1], single.var, VAR_RTOL)
        assert torch.equal(results[0][2], single.count)


def test_duck_typed_fabric_deferred():
    world = _ThreadWorld(3)
    results = _run_threads(world, lambda fabric, rank: _deferred_rank(fabric, rank, "torch"))
    assert world.gathers == [6] * 3  # three syncs, two gathers each; records gather nothing
    expected = _single_process_deferred(3, "torch")
    for round_index, truth in enumerate(expected):
        for name, truth_stats in truth.items():
            assert_same_on_every_rank([r["after_sync"][round_index][name] for r in results])
            assert_matches_truth(results[0]["after_sync"][round_index][name], truth_stats)


def _ema_with_update(fabric, rank, sync):
    """EMA records of equal-sized batches with an update_from_moments (the same on every rank) in between."""
    norm = RunningMeanStd(fabric, shape=(D_OBS,), device="cpu", ema_decay=0.8, sync=sync)
    g = torch.Generator().manual_seed(rank)
    for step in range(3):
        norm.record_moments(torch.randn(4, D_OBS, generator=g, dtype=torch.float64) + 100.0 + 3 * rank)
        if step == 1:
            norm.update_from_moments(torch.full((D_OBS,), 90.0), torch.full((D_OBS,), 4.0), 10)
    protonorm.sync(norm)
    return norm.mean.clone()


def test_deferred_ema_sync_keeps_update_from_moments():
    # With equal rows per rank the synced EMA mean is the per-call one (the EMA and the update are linear in the
    # batch means), to float64 rounding: 1e-12 relative at means near 100.
    per_call = _run_threads(_ThreadWorld(2), lambda fabric, rank: _ema_with_update(fabric, rank, "per_call"))
    deferred = _run_threads(_ThreadWorld(2), lambda fabric, rank: _ema_with_update(fabric, rank, "deferred"))
    assert torch.equal(deferred[0], deferred[1])
    assert_close_rel(deferred[0], per_call[0])


def test_deep_copy_keeps_the_rows_a_deferred_sync_owes():
    results = _run_threads(_ThreadWorld(2), lambda fabric, rank: _copied_mid_stream(fabric, rank, 2))
    assert_same_on_every_rank(results)
    assert_matches_truth(results[0], _copied_mid_stream(None, 0, 2))


# (Triton's CPU interpreter is not thread-safe; the record paths this checks are chosen before any backend runs.)
@pytest.mark.parametrize("backend", [name for name in _cpu_backends() if name != "triton"])
@pytest.mark.parametrize("switch", [None, "per_call", "deferred"], ids=["deferred", "to_per_call", "and_back"])
@pytest.mark.parametrize("before", ["none", "world_of_one"])
def test_deferred_rows_recorded_before_the_fabric_is_assigned_are_synced(before, switch, backend):
    """Callers assign ``fabric`` after construction. Rows a deferred normalizer recorded while its fabric was None
    (or a world of one) enter the next sync like any other: were they merged untracked, each rank would keep its
    own as the shared base and the ranks would differ after the sync. Switched to per-call meanwhile, its per-call
    records cannot reach the other ranks either and join those rows: none is lost to the stale synced base when the
    fabric arrives, whether its first use is a per-call record (``switch="per_call"``) or a sync after switching back
    to deferred. Covers normalize-then-record and rewards (whose per-call records take the direct calls)."""

    def run(fabric, rank, world=2):
        ranks = range(world) if fabric is None else [rank]
        local = None if before == "none" else _FakeWorld()
        kind = "per_call" if fabric is None else "deferred"
        obs = RunningMeanStd(local, shape=(D_OBS,), device="cpu", backend=backend, sync=kind)
        reward = RewardRunningMeanStd(local, (1,), 0.99, device="cpu", backend=backend, sync=kind)
        for step in range(4):
            if step == 1 and switch and fabric is not None:
                obs.sync = reward.sync = "per_call"
            if step == 3:
                obs.fabric = reward.fabric = fabric
                if switch and fabric is not None:
                    obs.sync = reward.sync = switch
            batch = torch.cat([_obs_batch(r, step) for r in ranks])
            obs.normalize(batch)
            obs.record_moments(batch)
            steps = [_reward_step(r, step) for r in ranks]
            reward.record_reward(torch.cat([p[0] for p in steps]), torch.cat([p[1] for p in steps]))
        if fabric is not None:
            protonorm.sync(nn.ModuleDict({"obs": obs, "reward": reward}), fabric)
        return _stats(obs), _stats(reward)

    results = _run_threads(_ThreadWorld(2), run)
    truth = run(None, 0)
    for index in range(2):
        assert_same_on_every_rank([r[index] for r in results])
        assert_matches_truth(results[0][index], truth[index])


@pytest.mark.parametrize("ema", EMA_CHOICES, ids=["welford", "ema"])
def test_deferred_sync_keeps_dropped_row_counts(ema):
    """A deferred sync's nonfinite_rows is the base's plus every rank's rows dropped since (rank r drops r + 1
    per batch), on every rank, in the EMA merge as well as Welford's; the second round keeps the first's."""

    def run(fabric, rank):
        m = RunningMeanStd(fabric, shape=(D_OBS,), device="cpu", ema_decay=ema, backend="torch", sync="deferred")
        after = []
        for rounds in DEFERRED_ROUNDS:
            for step in rounds:
                bad = torch.ones(rank + 1, D_OBS)
                bad[:, step % D_OBS] = float("nan")
                m.record_moments(torch.cat([bad, _obs_batch(rank, step)]))
            protonorm.sync(m, fabric)
            after.append(m.nonfinite_rows.clone())
        return after

    results = _run_threads(_ThreadWorld(3), run)
    first, second = (len(rounds) * sum(r + 1 for r in range(3)) for rounds in DEFERRED_ROUNDS)
    for result in results:
        assert [n.item() for n in result] == [first, first + second]


def test_all_reduce_shift_follows_the_data(monkeypatch):
    """The all_reduce path sums around the previous merged batch mean, so it must move the shift with the data.
    The first batch (mean ~0) leaves a shift of ~0; the batches at 1e6 with std 1e-2 that follow lose their whole
    variance to cancellation when summed around it (eps64 * 1e12 / 1e-4 ~ 2). The first of them pays that in any
    case (a jump of 1e8 standard deviations); EMA forgets it over 200 batches (0.9^199 ~ 1e-9), but a stale shift
    would spoil every batch. (Welford's variance is dominated by the 1e6 offset, so only EMA shows this.)"""
    monkeypatch.setenv(distributed.REDUCE_ENV_VAR, "all_reduce")
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(6, 3, generator=g, dtype=torch.float64)]
    batches += [1e6 + 1e-2 * torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(200)]
    for ema in EMA_CHOICES:

        def run(fabric, rank):
            m = RunningMeanStd(fabric, shape=(3,), device="cpu", ema_decay=ema, backend="torch")
            for b in batches:
                m.record_moments(b[rank::3])
            return _stats(m)

        results = _run_threads(_ThreadWorld(3), run)
        single = RunningMeanStd(None, shape=(3,), device="cpu", ema_decay=ema, backend="torch")
        for b in batches:
            single.record_moments(b)
        assert_same_on_every_rank(results)
        assert_close_rel(results[0][0], single.mean, MEAN_RTOL)
        assert_close_rel(results[0][1], single.var, VAR_RTOL)
        assert torch.equal(results[0][2], single.count)


def assert_runs_equal(run):
    """``run(fabric, rank, flag)`` on 2 thread ranks with ``flag`` True gives, on every rank, bitwise what it gives
    with ``flag`` False."""
    results = _run_threads(_ThreadWorld(2), lambda fabric, rank: run(fabric, rank, True))
    expected = _run_threads(_ThreadWorld(2), lambda fabric, rank: run(fabric, rank, False))
    assert_same_on_every_rank(results)
    for got, want in zip(results[0], expected[0]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("ema", EMA_CHOICES, ids=["welford", "ema"])
@pytest.mark.parametrize("where", ["record", "sync"])
def test_deferred_state_made_under_inference_mode_takes_later_records(ema, where):
    """Rollouts run under torch.inference_mode(). The synced base and the EMA's own statistics that a deferred record
    or a sync makes there are updated in place by the records and update_from_moments made outside it, which torch
    refuses for inference tensors: the run must go on exactly as one made wholly outside inference mode."""

    def run(fabric, rank, inference):
        m = RunningMeanStd(fabric, shape=(D_OBS,), device="cpu", ema_decay=ema, backend="torch", sync="deferred")
        with torch.inference_mode(inference and where == "record"):
            m.record_moments(_obs_batch(rank, 0))
        if where == "sync":
            with torch.inference_mode(inference):
                protonorm.sync(m, fabric)
        m.record_moments(_obs_batch(rank, 1))
        m.update_from_moments(torch.full((D_OBS,), 90.0), torch.full((D_OBS,), 4.0), 10)
        m.record_moments(_obs_batch(rank, 2))
        protonorm.sync(m, fabric)
        return _stats(m)

    assert_runs_equal(run)


@pytest.mark.parametrize("ema", EMA_CHOICES, ids=["welford", "ema"])
def test_refused_record_leaves_the_all_reduce_shift(monkeypatch, ema):
    """A record that nonfinite="raise" refuses on every rank changes nothing, the shift the all_reduce path sums
    around included: a refused batch of rows at 1e6 (beside its NaN row) leaving its mean as the shift would cost the
    next batch, at ~0 with std 1e-2, its whole variance to cancellation (eps64 * 1e12 / 1e-4 ~ 2). The run must be
    bitwise the one without the refused record."""
    monkeypatch.setenv(distributed.REDUCE_ENV_VAR, "all_reduce")
    g = torch.Generator().manual_seed(5)
    batches = [1e-2 * torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    refused = 1e6 + torch.randn(6, 3, generator=g, dtype=torch.float64)
    refused[0, 1] = float("nan")

    def run(fabric, rank, refuse):
        m = RunningMeanStd(fabric, shape=(3,), device="cpu", ema_decay=ema, backend="torch", nonfinite="raise")
        for step, b in enumerate(batches):
            if refuse and step == 2:
                with pytest.raises(ValueError, match="NaN or inf"):
                    m.record_moments(refused[rank::2])
            m.record_moments(b[rank::2])
        return _stats(m)

    assert_runs_equal(run)


@pytest.mark.parametrize("call", ONE_RANK_CALLS)
def test_all_reduce_path_survives_a_call_on_one_rank_only(monkeypatch, call):
    """A load_state_dict or update_from_moments on one rank only (a checkpoint loaded on rank 0 alone, which upstream's
    broadcasts from rank 0 put right) must leave that rank on the all_reduce path with the others: were its shared
    shift reset, it would gather while they all_reduce, and in a process group every rank would wait (gloo times
    out; here the ranks' gathered tensors differ in shape and every rank fails). Its statistics then differ from the
    others', as documented; every rank's next batch still enters every rank's statistics. (Also run on gloo.)"""
    monkeypatch.setenv(distributed.REDUCE_ENV_VAR, "all_reduce")
    results = _run_threads(_ThreadWorld(2, timeout=10), lambda fabric, rank: _call_on_one_rank(fabric, rank, call))
    assert results == [_total_rows(2, [2])] * 2


@pytest.mark.parametrize("ema", EMA_CHOICES, ids=["welford", "ema"])
def test_deferred_load_state_dict_restarts_from_checkpoint(ema):
    """load_state_dict on a used deferred normalizer drops its records pending since the last sync and its synced
    base: a sync right after the load (no new records) leaves exactly the checkpoint, on every rank. The rows dropped
    as non-finite since the last sync (rank r drops r + 1 per record) go with the pending records: nonfinite_rows,
    which checkpoints do not hold, is the last sync's on every rank, and counts exactly the rows dropped after."""

    def batch(rank, step):
        bad = torch.ones(rank + 1, D_OBS)
        bad[:, step % D_OBS] = float("nan")
        return torch.cat([bad, _obs_batch(rank, step)])

    def run(fabric, rank):
        m = RunningMeanStd(fabric, shape=(D_OBS,), device="cpu", ema_decay=ema, backend="torch", sync="deferred")
        m.record_moments(batch(rank, 0))
        protonorm.sync(m, fabric)
        checkpoint = {k: v.clone() for k, v in m.state_dict().items()}
        m.record_moments(batch(rank, 1))
        protonorm.sync(m, fabric)  # the synced base moves past the checkpoint
        m.record_moments(batch(rank, 3))  # pending, never synced
        m.load_state_dict(checkpoint)
        protonorm.sync(m, fabric)
        after_load = _stats(m)
        m.record_moments(batch(rank, 4))
        protonorm.sync(m, fabric)
        return checkpoint, after_load, m.nonfinite_rows.clone()

    results = _run_threads(_ThreadWorld(2), run)
    assert_same_on_every_rank([stats for _, stats, _ in results])
    per_record = 1 + 2  # rows dropped by both ranks in one record
    for checkpoint, stats, dropped in results:
        for key, value in zip(("mean", "var", "count"), stats):
            assert torch.equal(value, checkpoint[key]), key
        assert (stats[3].item(), dropped.item()) == (2 * per_record, 3 * per_record)


# --------------------------------------------------------------------------------------------- single process
class _FakeWorld:
    def __init__(self, world_size=1, global_rank=0):
        self.world_size, self.global_rank = world_size, global_rank

    def all_gather(self, tensor):
        raise AssertionError("a world of one must not communicate")


def test_world_size_and_rank_forms():
    assert distributed.world_size(None) == 1 and distributed.rank(None) == 0
    assert not dist.is_initialized()
    assert distributed.world_size("default") == 1 and distributed.rank(dist) == 0
    assert distributed.world_size(_FakeWorld(4, 2)) == 4 and distributed.rank(_FakeWorld(4, 2)) == 2
    with pytest.raises(ValueError, match="'default'"):
        distributed.world_size("world")
    with pytest.raises(TypeError, match="world_size"):
        distributed.world_size(object())


def test_reduce_method_choice(monkeypatch):
    monkeypatch.delenv(distributed.REDUCE_ENV_VAR, raising=False)
    assert distributed.reduce_method(2) == "all_gather"
    assert distributed.reduce_method(distributed.ALL_GATHER_MAX_WORLD) == "all_gather"
    assert distributed.reduce_method(distributed.ALL_GATHER_MAX_WORLD + 1) == "all_reduce"
    monkeypatch.setenv(distributed.REDUCE_ENV_VAR, "all_reduce")
    assert distributed.reduce_method(2) == "all_reduce"
    monkeypatch.setenv(distributed.REDUCE_ENV_VAR, "ring")
    with pytest.raises(ValueError, match="all_gather"):
        distributed.reduce_method(2)


@pytest.mark.parametrize("sync_mode", ["per_call", "deferred"])
def test_world_of_one_is_local(sync_mode):
    m = RunningMeanStd(_FakeWorld(), shape=(D_OBS,), device="cpu", sync=sync_mode)
    ref = RunningMeanStd(None, shape=(D_OBS,), device="cpu")
    for step in range(3):
        m.record_moments(_obs_batch(0, step))
        ref.record_moments(_obs_batch(0, step))
    protonorm.distributed.sync(m)
    for a, b in zip(_stats(m), _stats(ref)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("local_on", [(0, 1), (1,)], ids=["every_rank", "one_rank"])
def test_sync_rejects_untracked_deferred_normalizer(local_on):
    """A deferred normalizer without the fabric (on every rank, or on one only) makes every rank raise after the
    layout check, none left waiting in a collective; the statistics stay as they were and a later sync works."""

    def run(fabric, rank):
        tree = nn.ModuleDict({
            "tracked": RunningMeanStd(fabric, shape=(3,), device="cpu", sync="deferred"),
            "local": RunningMeanStd(None if rank in local_on else fabric, shape=(3,), device="cpu", sync="deferred"),
        })
        tree["tracked"].record_moments(torch.ones(2, 3) * (rank + 1))
        before = _stats(tree["tracked"])
        with pytest.raises(ValueError) as raised:
            protonorm.distributed.sync(tree, fabric)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, _stats(tree["tracked"])))
        protonorm.distributed.sync(tree["tracked"], fabric)
        return str(raised.value), unchanged, _stats(tree["tracked"])

    results = _run_threads(_ThreadWorld(2), run)
    assert all(unchanged for _, unchanged, _ in results)
    assert_same_on_every_rank([stats for _, _, stats in results])
    assert results[0][2][2].item() == 5
    if len(local_on) == 2:
        assert all(re.search("'local'.*fabric=None", message) for message, _, _ in results)
    else:
        assert all("different trees" in message for message, _, _ in results)


def test_sync_with_fabric_takes_part_where_a_rank_holds_no_deferred_normalizer():
    """A tree with a deferred normalizer on one rank and none on the other (sync= switched on one rank only): with
    fabric= given, the rank without one takes part in the layout check, so every rank raises instead of the other
    waiting there for good (the barrier's timeout stands for the process group's). A tree without deferred
    normalizers on every rank passes the check and changes nothing. (Also run on gloo.)"""
    world = _ThreadWorld(2, timeout=10)
    for raised, unchanged in _run_threads(world, _deferred_on_one_rank):
        assert "different trees" in raised and unchanged
    assert world.gathers == [2, 2]


class _DeviceProbe(_FakeWorld):
    """A world of two that records where the sync's first collective was asked to travel, then stops the sync."""

    def __init__(self, device=None):
        super().__init__(2, 0)
        if device is not None:
            self.device = device
        self.seen = None

    def all_gather(self, tensor):
        self.seen = tensor.device
        raise _Stop


class _Stop(Exception):
    pass


@pytest.mark.parametrize("where", ["moved_model", "fabric_device", "no_deferred"])
def test_sync_of_lazy_normalizers_travels_on_their_device(where):
    """A tree whose deferred normalizers are all still lazy (a sync before the first record) has no buffer to take
    the device from; the CPU would do for gloo, but NCCL takes no CPU tensor (every rank would fail, or wait
    forever where another rank's normalizers are initialized). The device the model was moved to, else the
    fabric's, is used; for a tree without deferred normalizers (synced with fabric=), that of its tensors."""
    probe = _DeviceProbe(torch.device("meta") if where == "fabric_device" else None)
    if where == "no_deferred":
        tree = nn.ModuleDict({"obs": RunningMeanStd(probe, shape=(3,), device="cpu"), "policy": nn.Linear(2, 2)})
        tree.to("meta")
    else:
        tree = nn.ModuleDict({"lazy": RunningMeanStd(probe, device="cpu", sync="deferred")})
    if where == "moved_model":
        tree.to("meta")
    with pytest.raises(_Stop):
        protonorm.sync(tree, probe)
    assert probe.seen == torch.device("meta")


def test_sync_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        protonorm.distributed.sync([1, 2])


def test_deferred_state_is_not_persistent():
    m = RunningMeanStd(_FakeWorld(2), shape=(3,), device="cpu", sync="deferred")
    m.record_moments(torch.ones(4, 3))  # deferred records make no collective, so a fake world of two is enough
    assert m._sync_state is not None
    assert set(m.state_dict()) == {"mean", "var", "count"}


def test_update_from_moments_after_switching_to_deferred_counts_once(monkeypatch):
    """A normalizer recorded per call on the all_reduce path (which keeps a shared shift) then switched to deferred:
    an update_from_moments before its first deferred record must enter the synced base once, not twice."""
    monkeypatch.setenv(distributed.REDUCE_ENV_VAR, "all_reduce")

    def run(fabric, rank):
        m = RunningMeanStd(fabric, shape=(D_OBS,), device="cpu", backend="torch")
        m.record_moments(_obs_batch(rank, 0))
        m.sync = "deferred"
        m.update_from_moments(torch.full((D_OBS,), 90.0), torch.full((D_OBS,), 4.0), 100)
        protonorm.sync(m, fabric)
        return m.count.item()

    rows = sum(_obs_batch(r, 0).shape[0] for r in range(2))
    assert _run_threads(_ThreadWorld(2), run) == [1 + rows + 100] * 2


@pytest.mark.parametrize("method", REDUCE_METHODS)
def test_switching_sync_modes_keeps_every_row(monkeypatch, method):
    """deferred -> per_call with rows not yet synced, then back to deferred after a sync: every rank's rows enter
    once, on every rank alike (the pending rows travel with the first per-call record; the per-call records are
    not lost to a stale synced base)."""
    monkeypatch.setenv(distributed.REDUCE_ENV_VAR, method)

    def run(fabric, rank):
        m = RunningMeanStd(fabric, shape=(D_OBS,), device="cpu", backend="torch", sync="deferred")
        m.record_moments(_obs_batch(rank, 0))
        m.sync = "per_call"
        m.record_moments(_obs_batch(rank, 1))
        m.record_moments(_obs_batch(rank, 2))
        m.sync = "deferred"
        protonorm.sync(m, fabric)
        m.record_moments(_obs_batch(rank, 3))
        protonorm.sync(m, fabric)
        m.sync = "per_call"
        m.record_moments(_obs_batch(rank, 4))
        m.sync = "deferred"
        m.record_moments(_obs_batch(rank, 5))
        protonorm.sync(m, fabric)
        return _stats(m)

    results = _run_threads(_ThreadWorld(2), run)
    assert_same_on_every_rank(results)
    single = RunningMeanStd(None, shape=(D_OBS,), device="cpu", backend="torch")
    for step in range(6):
        single.record_moments(torch.cat([_obs_batch(r, step) for r in range(2)]))
    assert_matches_truth(results[0], _stats(single))


# --------------------------------------------------------------------------------------------- failed collectives
class _FailingFabric:
    """Two ranks whose collective echoes this rank's tensor, or fails on demand: ``"raise"`` (the collective
    itself errs) or ``"float32"`` (a gather that comes back rounded)."""

    world_size, global_rank = 2, 0

    def __init__(self):
        self.failure = None

    def all_gather(self, tensor):
        if self.failure == "raise":
            raise RuntimeError("collective failed")
        gathered = torch.stack([tensor, tensor])
        return gathered.float() if self.failure == "float32" else gathered


def _everything(m):
    """Every statistic a call could write: the buffers, the discounted returns and the deferred-sync state."""
    seen = {name: t.clone() for name, t in m.named_buffers()}
    if isinstance(m, RewardRunningMeanStd) and m.discounted_reward is not None:
        seen["discounted_reward"] = m.discounted_reward.clone()
    state = m._sync_state
    if isinstance(state, distributed._DeferredState):
        for name in ("mean", "var", "count", "dropped", "pending"):
            seen[f"state.{name}"] = getattr(state, name).clone()
        for i, t in enumerate(state.own or ()):
            seen[f"state.own{i}"] = t.clone()
    elif isinstance(state, distributed._PerCallState):
        seen["state.shift"] = state.shift.clone()
    return seen


def _assert_unchanged(before, m):
    after = _everything(m)
    assert before.keys() == after.keys()
    for name in before:
        assert_same(before[name], after[name])


@pytest.mark.parametrize("failure", ["raise", "float32"])
@pytest.mark.parametrize("call", ["per_call", "per_call owing rows", "sync"])
@pytest.mark.parametrize("ema_decay", [None, 0.9])
@pytest.mark.parametrize("method", REDUCE_METHODS)
def test_failed_collective_leaves_statistics_untouched(monkeypatch, backend_name, method, ema_decay, call, failure):
    """A record or sync whose collective fails, or gathers moments rounded to float32 (which some backends merged
    silently and others refused halfway through the merge, after the statistics were reset to the synced base and
    the rows owed to the other ranks dropped), raises and changes nothing."""
    monkeypatch.setenv(distributed.REDUCE_ENV_VAR, method)
    gen = torch.Generator().manual_seed(1)
    m = RunningMeanStd(_FailingFabric(), (3,), device="cpu", backend=backend_name, ema_decay=ema_decay,
                       sync="per_call" if call == "per_call" else "deferred")
    m.record_moments(torch.randn(4, 3, generator=gen))
    if call != "per_call":
        protonorm.sync(m)
        m.record_moments(torch.randn(5, 3, generator=gen) + 2.0)  # rows owed to the other ranks
    if call == "per_call owing rows":
        m.sync = "per_call"
    before = _everything(m)
    m.fabric.failure = failure
    with pytest.raises(RuntimeError if failure == "raise" else TypeError, match="collective failed|float32"):
        if call == "sync":
            protonorm.sync(m)
        else:
            m.record_moments(torch.randn(6, 3, generator=gen))
    _assert_unchanged(before, m)


@pytest.mark.parametrize("failure", ["raise", "float32"])
@pytest.mark.parametrize("steps_before", [0, 2])
@pytest.mark.parametrize("nonfinite", ["drop", "raise"])
@pytest.mark.parametrize("method", REDUCE_METHODS)
def test_failed_collective_leaves_reward_untouched(monkeypatch, backend_name, method, nonfinite, steps_before, failure):
    """A record_reward whose collective fails (or returns what cannot be merged) raises with the discounted returns
    as before the step, like every statistic, and the step made again once the collective works gives what it
    would have given the first time. (steps_before=0: the step that makes the returns.)"""
    monkeypatch.setenv(distributed.REDUCE_ENV_VAR, method)
    rewards = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.5, 3.0], [2.0, 1.0, -1.0, 0.5]])
    done = torch.tensor([False, True, False, False])

    def make():
        m = RewardRunningMeanStd(_FailingFabric(), (1,), gamma=0.9, device="cpu", backend=backend_name,
                                 nonfinite=nonfinite)
        m.record_moments(torch.randn(3, 1, generator=torch.Generator().manual_seed(0)))  # initialized, shift set
        for step in range(steps_before):
            m.record_reward(rewards[step], done)
        return m

    m, clean = make(), make()
    before = _everything(m)
    m.fabric.failure = failure
    with pytest.raises((RuntimeError, TypeError)):
        m.record_reward(rewards[steps_before], done)
    _assert_unchanged(before, m)
    m.fabric.failure = None
    m.record_reward(rewards[steps_before], done)
    clean.record_reward(rewards[steps_before], done)
    _assert_unchanged(_everything(clean), m)
