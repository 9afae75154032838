"""Per-call distributed sync latency: protonorm against upstream's call pattern, on gloo processes.

Upstream's ``record_moments`` with ``world_size > 1`` gathers the batch mean, variance and count with three
all_gathers, merges them on rank 0, and sends mean, var and count back with three pickled broadcasts
(``Fabric.broadcast`` is ``broadcast_object_list``). That pattern is reproduced below with plain
``torch.distributed`` calls, which is cheaper than going through ``Fabric.all_gather`` (a barrier and a size
exchange per gather), so the baseline is, if anything, flattered.

Two timings per feature count D, each interleaved call by call with barriers between calls (not timed):

* ``sync``: the merge of precomputed batch moments across ranks, i.e. what distribution adds to a record;
  protonorm's ``fold_parts`` (all_gather and all_reduce variants) against the upstream pattern.
* ``record``: a whole ``record_moments`` of a ``[rows, D]`` float32 batch on every rank.

Rank 0 reports medians and the median (p20-p80) of the per-iteration ratio upstream / protonorm.

    python bench/bench_distributed.py [--world 4] [--dims 342 1024] [--rows 1024] [--iters 300]
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from protonorm import backends, distributed
from protonorm.benchmark.baseline import BaselineRunningMeanStd, combine_moments
from protonorm.benchmark.timing import percentile
from protonorm.normalizer import RunningMeanStd


class UpstreamPatternSync:
    """Upstream's distributed record: 3 all_gathers, a rank-0 merge, 3 object broadcasts."""

    def __init__(self, num_features: int):
        self.stats = BaselineRunningMeanStd((num_features,), device="cpu")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def _gather(self, value: torch.Tensor):
        out = [torch.empty_like(value) for _ in range(self.world)]
        dist.all_gather(out, value)
        return out

    def sync(self, batch_mean: torch.Tensor, batch_var: torch.Tensor, batch_count: int) -> None:
        means = self._gather(batch_mean)
        variances = self._gather(batch_var)
        counts = self._gather(torch.tensor(batch_count))
        if self.rank == 0:
            self.stats.update_from_moments(*combine_moments(means, variances, counts))
        s = self.stats
        for buffer in (s.mean, s.var, s.count):
            box = [buffer]
            dist.broadcast_object_list(box, src=0)
            buffer.copy_(box[0])
        s.count.fill_(s.count.item())

    def record_moments(self, batch: torch.Tensor) -> None:
        mean = torch.mean(batch, dim=0)
        var = torch.var(batch, dim=0, unbiased=False)
        self.sync(mean, var, batch.shape[0])


def _time(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _summary(name, ours, theirs):
    ratios = [t / o for o, t in zip(ours, theirs)]
    return (
        f"{name:<34} protonorm {percentile(ours, 50) * 1e6:9.1f} us   upstream pattern "
        f"{percentile(theirs, 50) * 1e6:9.1f} us   ratio {percentile(ratios, 50):6.2f}x "
        f"(p20-p80 {percentile(ratios, 20):.2f}-{percentile(ratios, 80):.2f})"
    )


def _worker(rank, world, port, dims, rows, iters, warmup):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    group = dist.group.WORLD
    lines = []
    try:
        for d in dims:
            g = torch.Generator().manual_seed(rank * 7919 + d)
            batch = torch.randn(rows, d, generator=g) * 2.0 + 3.0
            backend = backends.resolve("auto", batch.device)
            parts = backend.moments(batch, None, {})
            mean, var = torch.mean(batch, dim=0), torch.var(batch, dim=0, unbiased=False)
            upstream = UpstreamPatternSync(d)
            for method in ("all_gather", "all_reduce"):
                os.environ[distributed.REDUCE_ENV_VAR] = method
                ours_module = RunningMeanStd(group, shape=(d,), device="cpu")
                samples = {"sync": ([], []), "record": ([], [])}
                for i in range(warmup + iters):
                    t_ours = _time(lambda: distributed.fold_parts(ours_module, parts, backend, None))
                    t_theirs = _time(lambda: upstream.sync(mean, var, rows))
                    r_ours = _time(lambda: ours_module.record_moments(batch))
                    r_theirs = _time(lambda: upstream.record_moments(batch))
                    if i >= warmup:
                        for key, pair in (("sync", (t_ours, t_theirs)), ("record", (r_ours, r_theirs))):
                            samples[key][0].append(pair[0])
                            samples[key][1].append(pair[1])
                for key in ("sync", "record"):
                    label = f"D={d} {key} ({method}{f', {rows} rows' if key == 'record' else ''})"
                    lines.append(_summary(label, *samples[key]))
        if rank == 0:
            print(f"{world} gloo processes, {iters} iterations after {warmup} warm-up, backend {backend.name}")
            print("\n".join(lines))
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--dims", type=int, nargs="+", default=[342, 1024])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(
        _worker, args=(args.world, port, args.dims, args.rows, args.iters, args.warmup), nprocs=args.world, join=True
    )


if __name__ == "__main__":
    main()
