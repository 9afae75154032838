"""Interleaved timing and the per-call probes (kernel launches, host syncs).

Contenders are timed round-robin: every repetition times each of them once, in an order rotated from one
repetition to the next, so slow drift of the machine (clocks, other load) hits all of them alike and the
per-repetition ratios stay meaningful. Each timed block runs ``inner`` calls back to back (enough to last 0.2 ms
on CUDA and 1 ms elsewhere, at most MAX_INNER calls) and is divided by ``inner``. On CUDA the blocks are timed
with events, each starting on an idle device (a block queued behind another's work would hide its own launch
costs); elsewhere with ``time.perf_counter``, and after a contender that frees tens of MB (the upstream-style
baseline) the next block waits until the machine is quiet: the kernel returns that memory on the same cores for
tens of ms after the call, which would be timed as part of whatever runs next.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..diagnostics import HostSyncCounter

MIN_BLOCK_S = {"cuda": 2e-4, "cpu": 1e-3}
MAX_INNER = 1000
CALIBRATION_CALLS = 3
MAX_EXTRA_WARMUP = 20
WARMED_UP_BELOW_S = 1e-4


@dataclass
class Samples:
    """Per-call seconds of one contender, one value per repetition."""

    seconds: List[float]

    def percentile(self, q: float) -> float:
        return percentile(self.seconds, q)

    @property
    def median(self) -> float:
        return percentile(self.seconds, 50)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of a non-empty sequence."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def paired_speedup(baseline: Samples, contender: Samples) -> float:
    """Median over repetitions of ``baseline / contender``: each ratio compares calls timed side by side."""
    return percentile([b / c for b, c in zip(baseline.seconds, contender.seconds)], 50)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _BlockTimer:
    """Times ``inner`` calls of a function; CUDA events on CUDA, the wall clock elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started) -> Callable[[], float]:
        """A thunk giving the elapsed seconds; on CUDA it is read after the repetition's synchronize."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return lambda: started.elapsed_time(end) / 1e3
        elapsed = time.perf_counter() - started
        return lambda: elapsed


def _cpu_busy_ticks():
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def wait_until_quiet(max_seconds: float = 1.0, window: float = 0.01, busy_share: float = 0.1) -> None:
    """Sleep until the machine has been nearly idle (at most ``busy_share`` of its CPU time busy) for one
    ``window``, or ``max_seconds`` have passed (Linux; elsewhere a single window)."""
    deadline = time.perf_counter() + max_seconds
    before = _cpu_busy_ticks()
    while True:
        time.sleep(window)
        after = _cpu_busy_ticks()
        if before is None or after is None:
            return
        busy, total = after[0] - before[0], after[1] - before[1]
        if total > 0 and busy <= busy_share * total or time.perf_counter() > deadline:
            return
        before = after


def warm_up(fn: Callable[[], object], device: torch.device, calls: int) -> None:
    """Make ``calls`` untimed calls, then more (at most MAX_EXTRA_WARMUP) while each still takes under half the
    time of the one before, if that one took over WARMED_UP_BELOW_S (below it the clock's jitter decides):
    compiled code compiles again on a later call (a reward normalizer's second step takes another branch), and
    its first runs after compiling are several times slower than the rest."""
    previous = None
    for i in range(calls + MAX_EXTRA_WARMUP):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - started
        if i >= calls and (previous < WARMED_UP_BELOW_S or not elapsed < 0.5 * previous):
            return
        previous = elapsed


def calibrate_inner(fn: Callable[[], object], device: torch.device) -> Tuple[int, float]:
    """Time single calls (at least CALIBRATION_CALLS, together at least the device's minimum block length) and
    return ``(inner, seconds per call)``: how many calls one timed block needs to last that long. The median call
    sets it, so that one slow call does not leave a fast contender timed one cold call at a time."""
    synchronize(device)
    timer = _BlockTimer(device)
    min_block = MIN_BLOCK_S[_kind(device)]
    seconds: List[float] = []
    while len(seconds) < CALIBRATION_CALLS or (sum(seconds) < min_block and len(seconds) < MAX_INNER):
        started = timer.start()
        fn()
        read = timer.stop(started)
        synchronize(device)
        seconds.append(read())
    per_call = percentile(seconds, 50)
    inner = max(1, min(MAX_INNER, math.ceil(min_block / max(per_call, 1e-9))))
    return inner, per_call


def interleaved(
    fns: Dict[str, Callable[[], object]],
    inner: Dict[str, int],
    repetitions: int,
    device: torch.device,
    progress: Optional[Callable[[], None]] = None,
    settle_after: Sequence[str] = (),
) -> Dict[str, Samples]:
    """Time every function once per repetition, round-robin with a rotating start; per-call seconds. On the CPU,
    the block after one of ``settle_after`` waits until the machine is quiet."""
    names = list(fns)
    timer = _BlockTimer(device)
    readings: Dict[str, List[Callable[[], float]]] = {name: [] for name in names}
    for rep in range(repetitions):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn, k = fns[name], inner[name]
            if timer.cuda:
                synchronize(device)
            started = timer.start()
            for _ in range(k):
                fn()
            readings[name].append(timer.stop(started))
            if name in settle_after and not timer.cuda:
                wait_until_quiet()
        synchronize(device)
        if progress is not None:
            progress()
    return {name: Samples([read() / inner[name] for read in readings[name]]) for name in names}


# Whether a dispatch mode can say that compiled code may run under it (torch 2.4 and 2.6 have no such hook: probed
# under any mode, a compiled function ran eagerly from then on).
PROBES_LEAVE_COMPILED_CODE = hasattr(HostSyncCounter, "ignore_compile_internals")


class _CompiledCodeSyncCounter(HostSyncCounter):
    """HostSyncCounter that leaves torch.compile-d code compiled: under any other dispatch mode dynamo runs a
    function eagerly and marks its code to be run eagerly from then on, which would leave a compiled contender
    timed as eager code. Its graphs' host reads break the graph and run eagerly, so they are still seen."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True


def count_host_syncs(fn: Callable[[], object], device: torch.device, calls: int = 3,
                     compiled: bool = False) -> Optional[float]:
    """Host syncs per call: host reads of tensor values seen by the dispatcher and, on CUDA, every
    synchronizing CUDA operation (which also catches reads the dispatcher never sees, such as
    ``torch.tensor([cuda_scalar, ...])``). The larger of the two counts is reported. None for a ``compiled``
    function where probing it would leave it running eagerly (``PROBES_LEAVE_COMPILED_CODE``): not counted."""
    if compiled and not PROBES_LEAVE_COMPILED_CODE:
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else None
        if previous is not None:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with _CompiledCodeSyncCounter(strict=False) as counter:
                for _ in range(calls):
                    fn()
        finally:
            if previous is not None:
                torch.cuda.set_sync_debug_mode(previous)
    cuda_syncs = sum(1 for w in caught if "synchronizing" in str(w.message))
    return max(counter.count, cuda_syncs) / calls


def count_launches(fn: Callable[[], object], device: torch.device, calls: int = 5) -> Optional[float]:
    """Device work items (kernels, memcpys, memsets) per call, from torch.profiler; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    launched = sum(
        1
        for event in prof.events()
        if event.device_type == DeviceType.CUDA and "annotation" not in str(getattr(event, "activity_type", ""))
    )
    return launched / calls


def _kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"
