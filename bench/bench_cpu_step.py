"""The CPU normalizer inside a training step: normalize + record, then an MLP update on the normalized batch.

    python bench/bench_cpu_step.py [--iters 60] [--threads N] [--shapes 8192x1024,16384x342]

Each iteration runs, for protonorm (``backend="cpp"``), for the upstream-style baseline and for a plain copy in turn
(the order rotating), ProtoMotions' minibatch sequence ``y = norm.normalize(obs); norm.record_moments(obs)`` (for the
copy, ``y = out.copy_(obs)``: one read and one write of the batch) followed by a forward and backward pass of a
3-layer MLP on ``y`` and an optimizer step, as in a PPO update. It reports the normalizer's time (median, p20-p80)
and the whole step's, and the medians of the paired ratios.

Unlike ``bench_cpu.py``, which times each contender after the machine has gone quiet, here torch's own ops run
right before and after every normalizer call, as in training: the OpenMP workers they leave spinning are the ones
the C++ kernels use, and the caches hold whatever the MLP left there.
"""
from __future__ import annotations

import argparse
import time

import torch

import protonorm
from protonorm.benchmark.baseline import BaselineRunningMeanStd

from cpu_common import add_common_arguments, paired_ratio, setup, spread


def in_ms(seconds) -> str:
    median, between = spread(seconds, 1e3, 3)
    return f"{median:7.3f} ms ({between})"


def bench_step(rows: int, features: int, iters: int) -> None:
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(rows, features, generator=gen) * 2.0 + 3.0
    ours = protonorm.RunningMeanStd(None, (features,), device="cpu", clamp_value=5.0, backend="cpp")
    ours.train()
    baseline = BaselineRunningMeanStd((features,), clamp_value=5.0)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(features, 256), torch.nn.ELU(), torch.nn.Linear(256, 128),
                              torch.nn.ELU(), torch.nn.Linear(128, 1))
    opt = torch.optim.SGD(mlp.parameters(), lr=1e-5)
    copy_out = torch.empty_like(obs)
    times = {"protonorm": ([], []), "baseline": ([], []), "copy": ([], [])}

    def step(name, norm):
        start = time.perf_counter()
        if norm is None:  # the memory-traffic floor: one read and one write of the batch
            y = copy_out.copy_(obs)
        else:
            y = norm.normalize(obs)
            norm.record_moments(obs)
        normalized = time.perf_counter()
        loss = mlp(y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        end = time.perf_counter()
        return normalized - start, end - start

    for i in range(iters + 3):
        order = [("protonorm", ours), ("baseline", baseline), ("copy", None)]
        for name, norm in order[i % 3:] + order[: i % 3]:
            norm_time, step_time = step(name, norm)
            if i >= 3:  # warm-up
                times[name][0].append(norm_time)
                times[name][1].append(step_time)

    print(f"normalize+record + MLP step, {rows}x{features} fp32, {iters} iterations")
    for name, (norm_times, step_times) in times.items():
        print(f"    {name:10s} normalizer {in_ms(norm_times)}   whole step {in_ms(step_times)}")
    for label, num, den in (("baseline / protonorm", "baseline", "protonorm"), ("protonorm / copy", "protonorm", "copy")):
        print(f"    {label:21s} {paired_ratio(times[num][0], times[den][0])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=60)
    add_common_arguments(parser)
    args = parser.parse_args()
    header, shapes = setup(args)
    print(header)
    for rows, features in shapes:
        bench_step(rows, features, args.iters)


if __name__ == "__main__":
    main()
