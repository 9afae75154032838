"""One ProtoMotions call per benchmark: every case on every shape, every contender (see ``conftest.py``)."""
import pytest

pytest.importorskip("pytest_benchmark")

WARMUP_ROUNDS = 3


def test_call(benchmark, case, contender, synchronized):
    call = synchronized(case.call(contender))
    benchmark.group = f"{case.name} {'x'.join(map(str, case.shape))}"
    benchmark.extra_info.update(bytes_moved=case.moved_bytes(), resolved=contender.resolved or contender.name)
    benchmark.pedantic(call, warmup_rounds=WARMUP_ROUNDS, rounds=_rounds(case), iterations=1)
    _record_gbps(benchmark, case.moved_bytes())


def test_copy_roofline(benchmark, case, synchronized):
    """``y.copy_(x)`` of each case's input: the bandwidth the calls are judged against."""
    call = synchronized(case.copy_call())
    benchmark.group = f"{case.name} {'x'.join(map(str, case.shape))}"
    benchmark.pedantic(call, warmup_rounds=WARMUP_ROUNDS, rounds=_rounds(case), iterations=1)
    _record_gbps(benchmark, case.copy_bytes())


def _record_gbps(benchmark, moved_bytes: int) -> None:
    """Bandwidth of the median call, when timings exist (``--benchmark-disable`` runs each call once, untimed)."""
    if benchmark.stats is not None:
        benchmark.extra_info["gbps"] = moved_bytes / benchmark.stats.stats.median / 1e9


def _rounds(case) -> int:
    # Enough rounds for a stable median without spending minutes on the largest CPU batches.
    return 20 if case.device.type == "cpu" and case.input_bytes > 2**24 else 100
