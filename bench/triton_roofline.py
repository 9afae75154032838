"""Roofline microbenchmark of the Triton backend against the torch backend and ``torch.compile`` of the
reference math, on one CUDA device.

For each observation size (float32) and reward batch it reports the median time per call, eager and under
CUDA-graph replay, the achieved bandwidth (the bytes an ideal kernel must move) and that bandwidth as a
percentage of ``y.copy_(x)`` on the same tensor (the practical roofline). Operations: ``fused`` (training
``normalize`` then ``record_moments`` of the same tensor), ``record`` (``record_moments`` alone),
``normalize`` (eval-mode ``normalize``) and, for rewards, ``reward`` (``record_reward``).

    python bench/triton_roofline.py [--quick] [--json PATH]

Writes a markdown table to stdout and, when ``$OUT`` is set (or ``--json`` given), ``triton_roofline.json``
and ``triton_roofline.md`` there, rewritten after each measurement. Exits 1 when a measurement of protonorm's
backends raised (each is reported in its row and on stderr, and the sweep goes on).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Callable, Dict, List

import torch

import protonorm
from protonorm import reference

OBS_SIZES = [(8192, 342), (16384, 1024), (4096, 4096), (65536, 4096)]
REWARD_ENVS = [1024, 2048, 4096, 8192]
IMPLS = ("triton", "torch", "compile")


# ------------------------------------------------------------------------------------------ timing
def _median_us(run_batch: Callable[[], None], calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the time of ``run_batch`` (which makes ``calls`` calls), per call, in us."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_batch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    return statistics.median(times)


def time_eager(fn: Callable[[], None], calls: int = 20, repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()

    def run_batch():
        for _ in range(calls):
            fn()

    return _median_us(run_batch, calls, repeats)


def time_graph(fn: Callable[[], None], calls: int = 20, repeats: int = 15) -> float:
    """``calls`` calls captured in one CUDA graph, replayed ``repeats`` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return _median_us(graph.replay, calls, repeats)


def copy_bandwidth(x: torch.Tensor) -> float:
    """GB/s of ``y.copy_(x)``: the practical roofline for a tensor of this size."""
    y = torch.empty_like(x)
    us = time_eager(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (us * 1e3)


# ------------------------------------------------------------------------------------------ workloads
def _compiled_reference():
    """``torch.compile`` of the reference math for record, normalize and the reward update."""

    def record(x, mean, var, count, dropped):
        reference.merge_into_running(reference.batch_moments(x), mean, var, count, dropped, None)

    def normalize(x, mean, var):
        return reference.normalize(x, mean, var, 1e-5, 5.0)

    def fused(x, mean, var, count, dropped):
        y = reference.normalize(x, mean, var, 1e-5, 5.0)
        reference.merge_into_running(reference.batch_moments(x), mean, var, count, dropped, None)
        return y

    def reward(r, done, disc, mean, var, count, dropped):
        disc.copy_(reference.discounted_return_update(disc, r, done.reshape(-1, 1), 0.99))
        reference.merge_into_running(reference.batch_moments(disc), mean, var, count, dropped, None)

    # dynamic=False: one graph per size, as a model of fixed shapes gets (by default the second size of a function
    # would compile it again for any size, and the sizes after it would time that graph).
    return {name: torch.compile(fn, dynamic=False) for name, fn in
            (("record", record), ("normalize", normalize), ("fused", fused), ("reward", reward))}


def obs_workloads(impl: str, b: int, d: int, compiled) -> Dict[str, Callable[[], None]]:
    x = torch.randn(b, d, device="cuda") * 3 + 10
    if impl == "compile":
        mean = torch.zeros(d, dtype=torch.float64, device="cuda")
        var = torch.ones(d, dtype=torch.float64, device="cuda")
        count = torch.ones((), dtype=torch.int64, device="cuda")
        dropped = torch.zeros((), dtype=torch.int64, device="cuda")
        return {
            "fused": lambda: compiled["fused"](x, mean, var, count, dropped),
            "record": lambda: compiled["record"](x, mean, var, count, dropped),
            "normalize": lambda: compiled["normalize"](x, mean, var),
        }
    train = protonorm.RunningMeanStd(None, (d,), device="cuda", clamp_value=5.0, backend=impl)
    evaluate = protonorm.RunningMeanStd(None, (d,), device="cuda", clamp_value=5.0, backend=impl).eval()

    def fused():
        train.normalize(x)
        train.record_moments(x)

    return {
        "fused": fused,
        "record": lambda: train.record_moments(x),
        "normalize": lambda: evaluate.normalize(x),
    }


def reward_workload(impl: str, envs: int, compiled) -> Callable[[], None]:
    reward = torch.randn(envs, device="cuda")
    done = torch.rand(envs, device="cuda") < 0.01
    if impl == "compile":
        disc = torch.zeros(envs, 1, device="cuda")
        stats = [torch.zeros(1, dtype=torch.float64, device="cuda"), torch.ones(1, dtype=torch.float64, device="cuda"),
                 torch.ones((), dtype=torch.int64, device="cuda"), torch.zeros((), dtype=torch.int64, device="cuda")]
        r2 = reward.reshape(-1, 1)
        return lambda: compiled["reward"](r2, done, disc, *stats)
    m = protonorm.RewardRunningMeanStd(None, (1,), 0.99, device="cuda", clamp_value=5.0, backend=impl)
    m.record_reward(reward, done)
    return lambda: m.record_reward(reward, done)


def ideal_bytes(op: str, b: int, d: int) -> int:
    """Bytes an ideal kernel moves: read x (float32), write the normalized output where there is one."""
    if op == "reward":  # read reward + terminated, read and write the returns
        return b * (4 + 1 + 4 + 4)
    return b * d * 4 * (2 if op in ("fused", "normalize") else 1)


# ------------------------------------------------------------------------------------------ main
def run(quick: bool, on_row: Callable[[List[dict]], None] = lambda rows: None) -> List[dict]:
    """Every measurement, in order; ``on_row(rows so far)`` after each, so that a run stopped part-way keeps them."""
    compiled = _compiled_reference()
    rows: List[dict] = []

    def add(row):
        rows.append(row)
        on_row(rows)

    obs_sizes = OBS_SIZES[:2] if quick else OBS_SIZES
    for b, d in obs_sizes:
        x = torch.empty(b, d, device="cuda")
        roof = copy_bandwidth(x)
        for impl in IMPLS:
            for op, fn in obs_workloads(impl, b, d, compiled).items():
                add(_measure(impl, op, f"obs {b}x{d}", fn, ideal_bytes(op, b, d), roof))
        del x
    for envs in REWARD_ENVS[::3] if quick else REWARD_ENVS:
        roof = copy_bandwidth(torch.empty(envs, device="cuda"))
        for impl in IMPLS:
            add(_measure(impl, "reward", f"reward {envs}", reward_workload(impl, envs, compiled),
                         ideal_bytes("reward", envs, 1), roof))
    return rows


def _measure(impl, op, shape, fn, nbytes, roof_gbs) -> dict:
    row = dict(impl=impl, op=op, shape=shape, bytes=nbytes, copy_gbs=round(roof_gbs, 1))
    for mode, timer in (("eager", time_eager), ("graph", time_graph)):
        try:
            us = timer(fn)
            gbs = nbytes / (us * 1e3)
            row[f"{mode}_us"] = round(us, 2)
            row[f"{mode}_gbs"] = round(gbs, 1)
            row[f"{mode}_pct_copy"] = round(100.0 * gbs / roof_gbs, 1)
        except Exception as exc:  # e.g. a path that cannot be captured: report it, keep going
            row[f"{mode}_error"] = f"{type(exc).__name__}: {exc}"[:200]
    print(f"  {shape:>18s} {op:>9s} {impl:>8s} eager {row.get('eager_us', float('nan')):9.2f} us "
          f"graph {row.get('graph_us', float('nan')):9.2f} us", file=sys.stderr, flush=True)
    return row


def markdown(rows: List[dict]) -> str:
    lines = [
        "| shape | op | impl | eager us | graph us | graph GB/s | % of copy | eager % of copy |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['op']} | {r['impl']} | {r.get('eager_us', 'err')} | {r.get('graph_us', 'err')} | "
            f"{r.get('graph_gbs', '')} | {r.get('graph_pct_copy', '')} | {r.get('eager_pct_copy', '')} |"
        )
    return "\n".join(lines)


def write(path: str, meta: dict, rows: List[dict]) -> None:
    """The JSON at ``path`` and the markdown table beside it (``.md``)."""
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(f"{meta}\n\n{markdown(rows)}\n")


def failures(rows: List[dict]) -> List[str]:
    """The measurements of protonorm's backends that raised (``compile``'s are reported, not counted: a path
    torch.compile cannot capture is its limit, not protonorm's)."""
    return [f"{r['shape']} {r['op']} {r['impl']}: {r[key]}" for r in rows for key in sorted(r)
            if key.endswith("_error") and r["impl"] != "compile"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two observation sizes and two reward sizes")
    parser.add_argument("--json", default=None, help="write the results here (default: $OUT/triton_roofline.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_roofline: needs a CUDA device", file=sys.stderr)
        return 2
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    out_dir = os.environ.get("OUT")
    path = args.json or (os.path.join(out_dir, "triton_roofline.json") if out_dir else None)
    rows = run(args.quick, (lambda rows: write(path, meta, rows)) if path else (lambda rows: None))
    print(markdown(rows))
    failed = failures(rows)
    for line in failed:
        print(f"triton_roofline: failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
