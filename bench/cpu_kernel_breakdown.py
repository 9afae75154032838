"""Where the C++ fused normalize+moments kernel spends its time, next to a copy of the same tensor.

    python bench/cpu_kernel_breakdown.py [--shapes 16384x342] [--threads N] [--rounds 200]

Times a copy and three kernels of ``protonorm._C`` side by side, round-robin in one process: ``copy``
(``out.copy_(x)``, one read and one write), ``normalize`` (clamped, into ``out``), ``moments`` (the batch moments
alone) and ``fused`` (``normalize_moments``, what a training-mode ``normalize`` followed by ``record_moments`` runs),
in two settings:

* cache-resident, one thread: a batch small enough for the L2 cache (256 rows), repeated; the time per 16 elements
  in nanoseconds is the kernel's compute cost, with memory out of the picture;
* streaming: the full batch on the given threads, with the caches emptied (a 96 MB buffer written) before every
  call, as in a training step where the batch comes from the simulator. When input plus output exceed the
  last-level cache, the kernels write the output with non-temporal stores (x86 builds); ``normalize, plain``
  and ``fused, plain`` are then the same kernels with plain stores.

The fused kernel's streaming time is about its normalize time plus the moments' compute on cached rows, since the
moments of a block of rows run while no memory traffic is pending; see bench/RESULTS.md for figures.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict

import torch

from cpu_common import add_common_arguments, setup, spread


def _placed_output(x: torch.Tensor) -> torch.Tensor:
    """An output buffer 2 KB away from ``x`` modulo 4 KB. Loads that share their address's low 12 bits with a
    pending store wait for it (4K aliasing), so where torch happens to place the output could show up as a kernel
    cost. With the compiler-vectorized normalize loop, an output 64-448 bytes after the input measured up to 1.4x
    slower with the rows in cache; the hand-written loops now load two steps ahead of their stores for outputs
    1-256 bytes after the input, where torch's allocator often puts them (bench/cpu_build_ab.py compares builds at
    chosen offsets)."""
    spare = 1024  # floats: 4 KB
    buffer = torch.empty(x.numel() + spare, dtype=x.dtype)
    offset = ((x.data_ptr() + 2048 - buffer.data_ptr()) % 4096) // x.element_size()
    return buffer[offset: offset + x.numel()].view_as(x)


def contenders(x: torch.Tensor, threads: int) -> Dict[str, Callable[[], None]]:
    """The kernels of ``protonorm._C`` called directly with precomputed float32 statistics, so that the figures are
    the kernels' own (the ops add argument checks and the statistics' float32 rounding, about 10 us a call)."""
    import protonorm._C as _C
    from protonorm.backends.cpp_backend import parts_layout
    from protonorm.reference import parts_width

    rows, features = x.shape
    out = _placed_output(x)
    mean32, std32 = torch.zeros(features), torch.ones(features)
    num_parts, rows_per_part = parts_layout(rows, features)
    parts = torch.empty(num_parts, parts_width(features), dtype=torch.float64)
    # The kernels get raw pointers: every tensor they touch must stay referenced by the closures below.
    buffers = (x, out, mean32, std32, parts)
    xp, op, mp, sp, pp = (t.data_ptr() for t in buffers)

    def kernel(call):
        def run(buffers=buffers):
            call()
        return run

    calls = {
        "copy": lambda: out.copy_(x),
        "normalize": kernel(lambda: _C.normalize(xp, rows, features, features, 0, op, features, mp, sp, True, 5.0,
                                                 False, True, threads)),
        "moments": kernel(lambda: _C.moments(xp, rows, features, features, 0, 0, 0, pp, num_parts, rows_per_part,
                                             threads)),
        "fused": kernel(lambda: _C.normalize_moments(xp, rows, features, features, 0, op, features, mp, sp, True,
                                                     5.0, pp, num_parts, rows_per_part, threads)),
    }
    if 2 * x.numel() * x.element_size() >= _C.stream_threshold():
        # The batch is larger than the last-level cache, so the kernels write the output with non-temporal stores
        # where they have them: the same two kernels with plain stores, for comparison.
        def plain_stores(call):
            def run():
                threshold = _C.set_stream_threshold(2**62)
                try:
                    call()
                finally:
                    _C.set_stream_threshold(threshold)
            return run

        calls["normalize, plain"] = plain_stores(calls["normalize"])
        calls["fused, plain"] = plain_stores(calls["fused"])
    return calls


def measure(calls: Dict[str, Callable[[], None]], rounds: int, repeat: int, evict) -> Dict[str, list]:
    for fn in calls.values():
        for _ in range(3):
            fn()
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if evict is not None:
                evict.add_(1.0)
            else:  # cache-resident: bring this contender's own data back into the cache first
                for _ in range(5):
                    calls[name]()
            start = time.perf_counter()
            for _ in range(repeat):
                calls[name]()
            times[name].append((time.perf_counter() - start) / repeat)
    return times


def report(title: str, times: Dict[str, list], elements: int) -> None:
    print(title)
    for name, values in times.items():
        median, between = spread(values, 1e6, 1)
        to_copy = spread([v / c for v, c in zip(values, times["copy"])], 1.0, 2)[0]
        print(f"    {name:16s} {median:9.1f} us  ({between})  {median * 1e3 / (elements / 16):6.2f} ns / 16 elements"
              f"  {to_copy:5.2f}x copy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--stream-threshold", type=int, default=None,
                        help="bytes of input plus output from which outputs are written with non-temporal stores "
                             "(default: the size of the last-level cache)")
    add_common_arguments(parser, shapes="16384x342")
    args = parser.parse_args()
    header, shapes = setup(args)
    if args.stream_threshold is not None:
        import protonorm._C as _C

        _C.set_stream_threshold(args.stream_threshold)
    threads = torch.get_num_threads()
    print(f"{header}, float32")
    gen = torch.Generator().manual_seed(0)
    for rows, features in shapes:
        torch.set_num_threads(1)
        small = torch.randn(256, features, generator=gen) * 2.0 + 3.0
        report(f"cache-resident: 256x{features}, 1 thread, 50 calls per round",
               measure(contenders(small, 1), max(args.rounds // 4, 2), 50, None), small.numel())
        torch.set_num_threads(threads)
        x = torch.randn(rows, features, generator=gen) * 2.0 + 3.0
        evict = torch.empty(96 * 2**20 // 4)
        report(f"streaming: {rows}x{features}, {threads} threads, caches emptied before each call",
               measure(contenders(x, threads), args.rounds, 1, evict), x.numel())


if __name__ == "__main__":
    main()
