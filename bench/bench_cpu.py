"""CPU benchmark of the C++ backend against the upstream-style eager code, torch.compile of it, and a plain copy.

    python bench/bench_cpu.py [--rounds 40] [--threads N] [--no-compile] [--keep-freed-memory]
                              [--shapes 8192x1024,16384x342] [--envs 4096] [--between quiet|evict|none]

What runs (all in one process, contenders interleaved round by round so that a noisy neighbour hits them alike):

* normalize + record in ProtoMotions' order (``y = norm.normalize(obs)`` then ``norm.record_moments(obs)``) on float32
  observations of 8192 x 1024 and 16384 x 342, Welford and EMA (0.999), clamp 5:
    - ``protonorm``: ``protonorm.RunningMeanStd(..., backend="cpp")`` in training mode (the fused one-pass path);
    - ``eager``: the upstream-style sequence (torch.mean, torch.var(unbiased=False), a float32-count Chan merge built
      with torch.tensor([...]), then (x - mean.float()) / sqrt(var.float() + eps) and clamp): the baseline of
      ``protonorm bench`` (``protonorm.benchmark.baseline``);
    - ``compiled``: torch.compile of that same function; it is timed twice: alongside the eager contender, whose
      freed temporaries make the compiled code's own fresh memory fault in again in some rounds, and then once more
      with protonorm and the copy alone, where its memory stays mapped (its fastest);
    - ``copy``: ``y.copy_(obs)``, the memory traffic floor (one read, one write) on the same threads;
    - ``kernel``: the backend's fused call and merge writing into a preallocated output (what ``copy`` does), and
      ``alloc+copy``: ``torch.empty_like(obs).copy_(obs)``, what a fresh output costs: a fresh 32 MB tensor is a
      fresh mapping whose page faults cost several copies on a VM. The module returns a new tensor per call, like
      upstream, but recycles the memory of an output the caller has dropped (protonorm/output_cache.py), as the
      benchmark loop does.
* reward record of 4096 environments (``record_reward(reward, terminated)``): protonorm vs the upstream-style
  sequence.

For each pair the script reports the median of the per-round time ratios and their 20th-80th percentile spread.
By default each contender starts once the machine is quiet (``wait_until_quiet``): the kernel's page-freeing work
after an upstream-style call would otherwise run during, and be timed as part of, whichever contender comes next.
``--between`` picks what comes before each timed call instead: ``evict`` writes 96 MB with torch first (as a
training step's other work would: the caches emptied, torch's threads awake), ``none`` runs the contenders back to
back (whatever the previous one left in the caches), ``quiet`` is the default.
``--keep-freed-memory`` also makes glibc keep freed memory, which spares the upstream-style code its page faults.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

import protonorm
from protonorm.backends import load
from protonorm.benchmark.baseline import BaselineRewardRunningMeanStd, BaselineRunningMeanStd
from protonorm.benchmark.timing import wait_until_quiet

from cpu_common import add_common_arguments, paired_ratio, setup


def baseline_step(norm: BaselineRunningMeanStd, x):
    """ProtoMotions' minibatch order on the upstream-style baseline: normalize, then record the same batch."""
    y = norm.normalize(x)
    norm.record_moments(x)
    return y


# ------------------------------------------------------------------------------------------------ measuring
def keep_freed_memory() -> str:
    """Ask glibc to keep freed memory instead of handing it back to the kernel (``--keep-freed-memory``; Linux/glibc
    only). The upstream-style code then reuses heap memory for its tens of MB of temporaries instead of faulting in
    fresh pages each call: a faster, harder baseline than the default allocator users run with."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return "allocator: default (no C library found)"
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        largest_heap_block = 32 * 1024 * 1024  # glibc's ceiling for the mmap threshold on 64-bit
        ok = libc.mallopt(m_mmap_threshold, largest_heap_block) and libc.mallopt(m_trim_threshold, 2**31 - 1)
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "allocator: default (mallopt unavailable)"
    return "allocator: glibc keeps freed memory (blocks below 32 MB from its never-trimmed heap)"


BETWEEN = ("quiet", "evict", "none")


def before_each_call(between: str) -> Callable[[], None]:
    """What runs (untimed) before each timed contender: see ``--between``."""
    if between == "quiet":
        return wait_until_quiet
    if between == "evict":
        buffer = torch.empty(96 * 2**20 // 4)
        return lambda: buffer.add_(1.0)
    return lambda: None


def interleaved(contenders: Dict[str, Callable[[], None]], rounds: int, calls: int = 1,
                between: str = "quiet") -> Dict[str, List[float]]:
    """Per-round seconds per call of every contender, run in turn (rotating the order) each round."""
    prepare = before_each_call(between)
    names = list(contenders)
    for fn in contenders.values():  # warm-up: allocations, compilation, caches
        for _ in range(3):
            fn()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = contenders[name]
            prepare()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def bench_normalize_record(batch: int, features: int, ema_decay, rounds: int, compile_too: bool,
                           between: str) -> None:
    x = torch.randn(batch, features) * 2.0 + 3.0
    norm = protonorm.RunningMeanStd(None, (features,), device="cpu", clamp_value=5.0, ema_decay=ema_decay,
                                    backend="cpp")
    norm.train()

    def ours():
        norm.normalize(x)
        norm.record_moments(x)

    def baseline():
        return BaselineRunningMeanStd((features,), clamp_value=5.0, ema_decay=ema_decay)

    eager = baseline()
    out = torch.empty_like(x)
    backend = load("cpp")[0]
    kstats = dict(mean=torch.zeros(features, dtype=torch.float64), var=torch.ones(features, dtype=torch.float64),
                  count=torch.ones((), dtype=torch.long))
    kdropped, workspace = torch.zeros((), dtype=torch.long), {}

    def kernel():
        parts = backend.normalize_moments(x, kstats["mean"], kstats["var"], 1e-5, 5.0, out, workspace)
        backend.merge(parts, kstats["mean"], kstats["var"], kstats["count"], kdropped, ema_decay)

    contenders = {
        "protonorm": ours,
        "eager": lambda: baseline_step(eager, x),
        "copy": lambda: out.copy_(x),
        "kernel": kernel,
        "alloc+copy": lambda: torch.empty_like(x).copy_(x),
    }
    if compile_too:
        # dynamic=False: one graph per shape, as a model of fixed shapes gets (by default the second shape would
        # compile baseline_step again for any shape, and the shapes after it would time that graph).
        compiled, compiled_norm = torch.compile(baseline_step, dynamic=False), baseline()
        contenders["compiled"] = lambda: compiled(compiled_norm, x)
    times = interleaved(contenders, rounds, between=between)
    mode = "Welford" if ema_decay is None else f"EMA {ema_decay}"
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"normalize+record {batch}x{features} fp32, {mode}: "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in median.items()))
    print(f"    eager / protonorm     {paired_ratio(times['eager'], times['protonorm'])}   (target >= 15x)")
    if compile_too:
        print(f"    compiled / protonorm  {paired_ratio(times['compiled'], times['protonorm'])}   (target >= 4x)")
    for ours_name, floor in (("kernel", "copy"), ("protonorm", "alloc+copy"), ("protonorm", "copy")):
        print(f"    {ours_name} / {floor}".ljust(26) + paired_ratio(times[ours_name], times[floor])
              + ("   (target <= 1.5x)" if floor == "copy" else ""))
    if compile_too:
        # Without the eager contender nothing hands tens of MB back to the kernel between calls, so the compiled
        # code's output and temporaries stay mapped: compiled code at its fastest.
        alone = interleaved({name: contenders[name] for name in ("protonorm", "compiled", "copy")}, rounds,
                            between=between)
        print(f"    without the eager contender: protonorm {statistics.median(alone['protonorm']) * 1e3:.3f} ms, "
              f"compiled {statistics.median(alone['compiled']) * 1e3:.3f} ms")
        print(f"    compiled / protonorm  {paired_ratio(alone['compiled'], alone['protonorm'])}   (target >= 4x)")
        print(f"    compiled / copy       {paired_ratio(alone['compiled'], alone['copy'])}")


def bench_reward(envs: int, rounds: int, between: str) -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = [torch.randn(envs, generator=gen) for _ in range(8)]
    terminated = [torch.rand(envs, generator=gen) < 0.02 for _ in range(8)]
    norm = protonorm.RewardRunningMeanStd(None, (1,), gamma=0.99, clamp_value=5.0, device="cpu", backend="cpp")
    eager = BaselineRewardRunningMeanStd((1,), gamma=0.99, clamp_value=5.0)
    step = {"i": 0}

    def ours():
        i = step["i"] = (step["i"] + 1) % 8
        norm.record_reward(rewards[i], terminated[i])

    def upstream():
        i = step["i"]
        eager.record_reward(rewards[i], terminated[i])

    times = interleaved({"protonorm": ours, "eager": upstream}, rounds, calls=50, between=between)
    median = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    print(f"reward record, {envs} envs: " + ", ".join(f"{k} {v:.1f} us" for k, v in median.items()))
    print(f"    eager / protonorm     {paired_ratio(times['eager'], times['protonorm'])}   (target >= 5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="make glibc keep freed memory: no page faults for the baseline's temporaries")
    parser.add_argument("--envs", type=int, default=4096, help="environments of the reward case")
    parser.add_argument("--between", choices=BETWEEN, default="quiet",
                        help="before each timed call: wait for a quiet machine (default), empty the caches with a "
                             "96 MB torch write, or nothing")
    add_common_arguments(parser)
    args = parser.parse_args()
    header, shapes = setup(args)
    allocator = keep_freed_memory() if args.keep_freed_memory else "allocator: default"
    print(f"{header}; {allocator}; before each call: {args.between}")
    for batch, features in shapes:
        for ema in (None, 0.999):
            bench_normalize_record(batch, features, ema, args.rounds, not args.no_compile, args.between)
    bench_reward(args.envs, args.rounds, args.between)


if __name__ == "__main__":
    main()
