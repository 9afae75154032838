"""Runs cases against contenders and turns the timings into per-case records (what the table, JSON and plot show).

Per case: every contender and the copy of the case's input tensor are warmed up, calibrated and timed in the same
interleaved loop (:func:`protonorm.benchmark.timing.interleaved`). Host syncs are counted in an untimed warm-up call
and kernel launches in untimed calls after the loop, since the probes themselves cost time.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import timing
from .cases import BASELINE, COMPILE, Case, Contender

COPY = "copy"
WARMUP_CALLS = {"cuda": 3, "cpu": 1}  # CUDA: Triton compiles and the allocator settles in the first calls
# torch.compile-d code compiles on its first call and again on the first call that takes another branch (the
# reward normalizer's second step): that must happen before the host-sync probe and the calibration.
COMPILE_WARMUP_CALLS = 3
MIN_REPETITIONS = 5
MAX_REPETITIONS = 200
# Contenders that allocate and free tens of MB per call (upstream's op sequence, eager or compiled): on the CPU
# the next block waits until the kernel has taken that memory back (timing.interleaved).
MEMORY_RETURNING = (BASELINE, COMPILE)


def run_case(
    case: Case,
    contenders: Sequence[Contender],
    repetitions: Optional[int],
    budget_s: float,
    on_repetition: Optional[Callable[[], None]] = None,
) -> List[dict]:
    """Time one case; ``repetitions`` None fits as many as ``budget_s`` allows (at least MIN_REPETITIONS)."""
    device = case.device
    fns: Dict[str, Callable[[], object]] = {c.name: case.call(c) for c in contenders}
    fns[COPY] = case.copy_call()
    warmup = WARMUP_CALLS["cuda" if device.type == "cuda" else "cpu"]
    inner, per_call, host_syncs = {}, {}, {}
    for name, fn in fns.items():
        timing.warm_up(fn, device, max(warmup, COMPILE_WARMUP_CALLS) if name == COMPILE else warmup)
        # Counted once warm (a first call may take a different path, e.g. the reward normalizer's first step);
        # the probe call doubles as one more warm-up call.
        host_syncs[name] = timing.count_host_syncs(fn, device, calls=1, compiled=name == COMPILE)
        inner[name], per_call[name] = timing.calibrate_inner(fn, device)
    if repetitions is None:
        per_repetition = sum(inner[n] * per_call[n] for n in fns)
        settling = sum(1 for n in fns if n in MEMORY_RETURNING)
        if device.type != "cuda" and settling:
            # and the wait for quiet after each memory-returning block: one 10 ms window on an idle machine, up to
            # its full limit on one that other work keeps busy, so it is measured here rather than assumed.
            started = time.perf_counter()
            timing.wait_until_quiet()
            per_repetition += settling * (time.perf_counter() - started)
        repetitions = int(min(MAX_REPETITIONS, max(MIN_REPETITIONS, budget_s // max(per_repetition, 1e-9))))
    samples = timing.interleaved(fns, inner, repetitions, device, on_repetition, settle_after=MEMORY_RETURNING)

    copy_s = samples[COPY].median
    copy_gbps = case.copy_bytes() / copy_s / 1e9
    moved = case.moved_bytes()
    records = []
    for contender in contenders:
        fn, s = fns[contender.name], samples[contender.name]
        gbps = moved / s.median / 1e9
        records.append(
            {
                "case": case.name,
                "backend": contender.name,
                "resolved": contender.resolved or contender.name,
                "shape": list(case.shape),
                "dtype": str(case.dtype).replace("torch.", ""),
                "device": str(device),
                "ema_decay": case.ema_decay,
                "median_us": s.median * 1e6,
                "p20_us": s.percentile(20) * 1e6,
                "p80_us": s.percentile(80) * 1e6,
                "speedup": timing.paired_speedup(samples[BASELINE], s),
                "gbps": gbps,
                "pct_copy_bw": 100.0 * gbps / copy_gbps,
                "launches": timing.count_launches(fn, device),
                "host_syncs": host_syncs[contender.name],
                "bytes": moved,
                "input_bytes": case.input_bytes,
                "copy_us": copy_s * 1e6,
                "copy_gbps": copy_gbps,
                "repetitions": repetitions,
                "inner": inner[contender.name],
            }
        )
    return records


def run_suite(
    cases: Sequence[Case],
    contenders: Sequence[Contender],
    repetitions: Optional[int],
    budget_s: float,
    progress=None,
) -> List[dict]:
    """All cases in order. Without fixed ``repetitions``, the ``budget_s`` seconds of the whole run are shared
    among the cases still to run, so that one slow case leaves less, not more, to the others.
    ``progress`` (optional) is a rich ``Progress`` advanced once per case."""
    records: List[dict] = []
    task = progress.add_task("benchmark", total=len(cases)) if progress is not None else None
    started = time.perf_counter()
    for i, case in enumerate(cases):
        if progress is not None:
            shape = "x".join(str(s) for s in case.shape)
            progress.update(task, description=f"{case.name} {shape}")
        remaining = max(0.0, budget_s - (time.perf_counter() - started))
        records.extend(run_case(case, contenders, repetitions, remaining / (len(cases) - i)))
        if progress is not None:
            progress.advance(task)
        case.release()  # free the batch before the next (larger) one is built
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def default_budget_s(device: torch.device) -> float:
    """Seconds for the whole default run's timings; what is left after warm-up goes to repetitions."""
    return 15.0 if device.type == "cuda" else 20.0
