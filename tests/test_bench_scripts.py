"""The standalone CPU benchmark scripts in ``bench/`` run end to end on tiny shapes and print every line they promise.

Timings are not checked (speed is shown by the benchmarks, not by tests); this keeps the scripts from rotting as the
package changes under them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from protonorm.backends import load

BENCH = Path(__file__).resolve().parent.parent / "bench"
CPP, CPP_REASON = load("cpp")

pytestmark = pytest.mark.skipif(CPP is None, reason=f"C++ extension unavailable: {CPP_REASON}")


def run_script(name: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bench_cpu_prints_every_ratio():
    out = run_script("bench_cpu.py", "--rounds", "3", "--shapes", "64x7", "--envs", "33")
    for mode in ("Welford", "EMA 0.999"):
        assert f"normalize+record 64x7 fp32, {mode}:" in out
    assert out.count("eager / protonorm") == 3  # two normalize cases and the reward case
    assert out.count("kernel / copy") == 2
    assert out.count("compiled / protonorm") == 4  # alongside the eager contender, then without it
    assert out.count("without the eager contender") == 2
    assert "reward record, 33 envs" in out


@pytest.mark.parametrize("between", ["evict", "none"])
def test_bench_cpu_without_compile(between):
    out = run_script("bench_cpu.py", "--rounds", "2", "--no-compile", "--shapes", "5x3", "--envs", "7",
                     "--between", between)
    assert f"before each call: {between}" in out
    assert out.count("eager / protonorm") == 3
    assert "compiled" not in out


def test_bench_cpu_compiles_one_graph_per_shape(compiled_graphs_dynamic, monkeypatch):
    # The compiled contender must time what a model of fixed shapes runs, not a graph compiled for any shape (what
    # torch.compile makes of a function by default once it has seen a second shape).
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_cpu

    for rows in (5, 6):
        bench_cpu.bench_normalize_record(rows, 3, None, 1, True, "none")
    assert compiled_graphs_dynamic and not any(compiled_graphs_dynamic), compiled_graphs_dynamic


def test_bench_cpu_step_prints_both_ratios():
    out = run_script("bench_cpu_step.py", "--iters", "3", "--shapes", "64x7,5x3")
    for shape in ("64x7", "5x3"):
        assert f"normalize+record + MLP step, {shape} fp32" in out
    assert out.count("baseline / protonorm") == 2
    assert out.count("protonorm / copy") == 2


def test_cpu_kernel_breakdown_prints_every_kernel():
    out = run_script("cpu_kernel_breakdown.py", "--rounds", "8", "--shapes", "96x7")
    assert "cache-resident: 256x7" in out and "streaming: 96x7" in out
    for kernel in ("copy", "normalize", "moments", "fused"):
        assert out.count(f"    {kernel} ") == 2, kernel
    assert "plain" not in out  # too small to stream


def test_cpu_kernel_breakdown_compares_plain_stores_when_outputs_stream():
    out = run_script("cpu_kernel_breakdown.py", "--rounds", "4", "--shapes", "96x7", "--stream-threshold", "0")
    assert out.count("    normalize, plain ") == 2 and out.count("    fused, plain ") == 2


@pytest.mark.parametrize("dtype, cache", [("float32", []), ("bfloat16", ["--in-cache"])])
def test_cpu_build_ab_compares_this_build_with_another(tmp_path, dtype, cache):
    # A copy of this build's own shared object stands in for the other build: a separate file, loaded beside it.
    import protonorm._C as _C

    other = tmp_path / Path(_C.__file__).name
    other.write_bytes(Path(_C.__file__).read_bytes())
    out = run_script("cpu_build_ab.py", str(other), "--rounds", "3", "--shapes", "40x37,5x3", "--offsets", "64,2048",
                     "--dtype", dtype, *cache)
    assert f"{dtype}; this build:" in out and f"other: {other}" in out
    for shape in ("40x37", "5x3"):
        assert f"{shape}, " in out
    for kernel in ("fused", "normalize"):
        for build in ("this", "other"):
            for offset in (64, 2048):
                assert out.count(f"    {kernel} {build} @{offset} ") == 2, (kernel, build, offset)
        for offset in (64, 2048):
            assert out.count(f"    {kernel} this / other @{offset}: ") == 2
    assert out.count("    copy ") == 2
