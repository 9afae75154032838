"""Two builds of the C++ kernels side by side in one process: this checkout's ``protonorm._C`` against another.

    python bench/cpu_build_ab.py OTHER_SO [--shapes 16384x342] [--rounds 100] [--offsets 64,2048]
                                 [--dtype float32] [--in-cache] [--threads N]

``OTHER_SO`` is the ``_C`` shared object of another build (say, of the commit before a kernel change, built in a
second worktree with ``python setup.py build_ext --inplace``). Both are loaded at once, so that the fused
normalize+moments and the clamped normalize of each build run interleaved, round by round, on the same batch and
the same output buffers, and a machine whose speed drifts (a VM) hits both alike; ``copy`` (``out.copy_(x)``) runs
alongside as the memory floor. Each kernel is timed with its output placed ``--offsets`` bytes after the input
modulo 4 KB: torch's allocator puts an output of the input's size 64 or 128 bytes after it, and a load that shares
its low 12 bits with a pending store waits for it (4K aliasing), so the placement can be part of a kernel's cost.

By default the caches are emptied (a 96 MB write) before each call, as in a training step whose batch comes from
the simulator; ``--in-cache`` repeats each call 20 times after five untimed ones instead. The report gives each
contender's median time and, per kernel and offset, the median of the paired ratios this build / other build.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Callable, Dict, List

import torch

from cpu_common import add_common_arguments, setup, spread
from cpu_kernel_breakdown import measure

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_other_build(path: str):
    """The ``_C`` module in the shared object at ``path``, imported under a name of its own."""
    spec = importlib.util.spec_from_file_location("protonorm_other_build._C", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def contenders(x: torch.Tensor, builds: Dict[str, object], offsets: List[int], threads: int
               ) -> Dict[str, Callable[[], None]]:
    """``"<kernel> <build> @<offset>"`` for every kernel, build and offset, and ``copy``. The kernels are called
    directly with precomputed float32 statistics, as in cpu_kernel_breakdown.py."""
    from protonorm.backends.cpp_backend import _DTYPE_CODES, parts_layout
    from protonorm.reference import parts_width

    rows, features = x.shape
    code = _DTYPE_CODES[x.dtype]
    mean32, std32 = torch.zeros(features), torch.ones(features)
    num_parts, rows_per_part = parts_layout(rows, features)
    parts = torch.empty(num_parts, parts_width(features), dtype=torch.float64)
    buffer = torch.empty(rows * features + 1024)  # float32 outputs, placed anywhere within 4 KB
    copy_out = torch.empty(rows, features, dtype=x.dtype)
    keep = (x, mean32, std32, parts, buffer, copy_out)  # the kernels get raw pointers: the closures hold these
    calls: Dict[str, Callable[[], None]] = {}
    for offset in offsets:
        start = ((x.data_ptr() + offset - buffer.data_ptr()) % 4096) // 4
        out = buffer[start: start + rows * features].view(rows, features)
        args = (x.data_ptr(), rows, features, features, code, out.data_ptr(), features, mean32.data_ptr(),
                std32.data_ptr(), True, 5.0)
        for name, module in builds.items():
            calls[f"fused {name} @{offset}"] = (
                lambda m=module, a=args, keep=keep: m.normalize_moments(*a, parts.data_ptr(), num_parts,
                                                                         rows_per_part, threads))
            calls[f"normalize {name} @{offset}"] = (
                lambda m=module, a=args, keep=keep: m.normalize(*a, False, True, threads))
    calls["copy"] = lambda: copy_out.copy_(x)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", help="the _C shared object of the build to compare with")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--offsets", default="64,2048",
                        help="comma-separated bytes between input and output modulo 4 KB")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--in-cache", action="store_true", help="repeat calls instead of emptying the caches")
    add_common_arguments(parser, shapes="16384x342")
    args = parser.parse_args()
    header, shapes = setup(args)
    import protonorm._C as this

    other = load_other_build(args.other)
    offsets = [int(v) for v in args.offsets.split(",")]
    threads = torch.get_num_threads()
    print(f"{header}, {args.dtype}; this build: {Path(this.__file__).name} ({this.isa()}), "
          f"other: {args.other} ({other.isa()})")
    gen = torch.Generator().manual_seed(0)
    for rows, features in shapes:
        x = (torch.randn(rows, features, generator=gen) * 2.0 + 3.0).to(DTYPES[args.dtype])
        calls = contenders(x, {"this": this, "other": other}, offsets, threads)
        if args.in_cache:
            times = measure(calls, args.rounds, 20, None)
        else:
            times = measure(calls, args.rounds, 1, torch.empty(96 * 2**20 // 4))
        where = "repeated in cache" if args.in_cache else "caches emptied before each call"
        print(f"{rows}x{features}, {threads} threads, {where}, {args.rounds} rounds")
        for name, values in times.items():
            median, between = spread(values, 1e6, 0)
            print(f"    {name:24s} {median:9.0f} us  ({between})")
        for kernel in ("fused", "normalize"):
            for offset in offsets:
                ratios = [a / b for a, b in zip(times[f"{kernel} this @{offset}"], times[f"{kernel} other @{offset}"])]
                median, between = spread(ratios, 1.0, 3)
                print(f"    {kernel} this / other @{offset}: {median:.3f}  ({between})")


if __name__ == "__main__":
    main()
