"""``bench/run_gpu.sh`` and ``bench/triton_roofline.py`` without a GPU: the script's steps run against a stand-in
Python (which logs its arguments and can fail or hang on request) and a stand-in ``nvidia-smi``; the roofline's
output and exit status are checked with its measurements replaced.

What is checked: results land under ``$OUT`` alone (a relative ``$OUT`` from the caller's directory), the
benchmark runs before the long test steps, a failing step leaves the rest to run and sets the exit status, and a
hung step is stopped within the run's budget with its printed output kept, the steps left out counted as failures;
the roofline saves each measurement as it is made and exits 1 when one of protonorm's backends failed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "run_gpu.sh"

FAKE_PYTHON = """#!{python}
import os, sys, time
line = " ".join(sys.argv[1:])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(line + "\\n")
if os.environ.get("FAKE_HANG") and os.environ["FAKE_HANG"] in line:
    print("started, then hung")  # not flushed: kept only if the step runs unbuffered
    time.sleep(600)
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in line:
    sys.exit(3)
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def run_script(tmp_path: Path, out: str = "out", **env) -> subprocess.CompletedProcess:
    """The script run from ``tmp_path`` with ``OUT=out``; the stand-ins log every call to ``tmp_path/argv.log``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _executable(bin_dir / "python", FAKE_PYTHON.format(python=sys.executable))
    _executable(bin_dir / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: stand-in'\n")
    full_env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=str(bin_dir / "python"),
                    FAKE_LOG=str(tmp_path / "argv.log"), OUT=out, **env)
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=60)


def calls(tmp_path: Path):
    return (tmp_path / "argv.log").read_text().splitlines()


def index_of(lines, fragment: str) -> int:
    return next(i for i, line in enumerate(lines) if fragment in line)


def test_results_go_under_out_from_the_callers_directory_and_the_benchmark_runs_first(tmp_path):
    done = run_script(tmp_path, out="results")
    assert done.returncode == 0, done.stdout + done.stderr
    out = (tmp_path / "results").resolve()
    assert re.match(r"=== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", (out / "steps.log").read_text())  # when measured
    assert not (ROOT / "results").exists()
    lines = calls(tmp_path)
    written = [arg for line in lines for arg in line.split() if arg.endswith((".json", ".md", ".log", ".xml"))]
    assert written, lines
    for path in written:
        assert Path(path).is_absolute() and out in Path(path).parents, (path, out)
    bench = index_of(lines, "protonorm.cli bench")
    gpu_tests = index_of(lines, "-m gpu")
    assert bench < gpu_tests < index_of(lines, "triton_roofline.py") < index_of(lines, "tests/test_triton.py")


def test_a_failing_step_leaves_the_rest_to_run_and_sets_the_exit_status(tmp_path):
    done = run_script(tmp_path, FAKE_FAIL="protonorm.cli bench")
    assert done.returncode == 3
    lines = calls(tmp_path)
    assert index_of(lines, "protonorm.cli bench") < index_of(lines, "tests/test_triton.py")
    assert "=== rc=3" in (tmp_path / "out" / "steps.log").read_text()


def test_a_hung_step_is_stopped_within_the_budget_and_keeps_its_output(tmp_path):
    # A 3 s budget: the hung benchmark is interrupted when it runs out, and the steps after it do not fit.
    done = run_script(tmp_path, FAKE_HANG="protonorm.cli bench", GPU_RUN_BUDGET_S="3", GPU_RUN_MIN_STEP_S="1")
    assert done.returncode in (124, 137), done.stdout + done.stderr  # 137: killed, where SIGINT is ignored
    log = (tmp_path / "out" / "steps.log").read_text()
    assert "started, then hung" in log
    assert "stopped at its" in log
    assert log.count("=== skipped") == 3  # the GPU tests, the roofline and the Triton tests
    assert not any("tests/test_triton.py" in line for line in calls(tmp_path))


def test_without_a_cuda_device_it_stops_before_any_step(tmp_path):
    # On a machine without one every step failed in turn, the Triton tests only after minutes in the interpreter.
    done = run_script(tmp_path, FAKE_FAIL="torch.cuda.is_available")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "=== no CUDA device" in done.stdout
    assert "=== no CUDA device" in (tmp_path / "out" / "steps.log").read_text()
    assert [line for line in calls(tmp_path) if "torch.cuda.is_available" not in line] == []


# ------------------------------------------------------------------------------------------ roofline
@pytest.fixture
def roofline_module():
    spec = importlib.util.spec_from_file_location("triton_roofline", ROOT / "bench" / "triton_roofline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def roofline(roofline_module, monkeypatch):
    module = roofline_module
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(module.torch.cuda, "get_device_name", lambda *a: "stand-in")
    return module


def row(impl, op="fused", error=None):
    r = dict(impl=impl, op=op, shape="obs 8x4", bytes=256, copy_gbs=1.0, eager_us=1.0, eager_gbs=1.0,
             eager_pct_copy=100.0)
    if error:
        r["graph_error"] = error
    else:
        r.update(graph_us=1.0, graph_gbs=1.0, graph_pct_copy=100.0)
    return r


@pytest.mark.parametrize("impl,status", [("triton", 1), ("torch", 1), ("compile", 0)])
def test_roofline_exit_status_counts_protonorms_failed_measurements(roofline, monkeypatch, tmp_path, impl, status):
    rows = [row("triton"), row(impl, error="RuntimeError: capture failed")]

    def run(quick, on_row=lambda rows: None):
        for i in range(len(rows)):
            on_row(rows[: i + 1])
        return rows

    monkeypatch.setattr(roofline, "run", run)
    path = tmp_path / "r.json"
    assert roofline.main(["--json", str(path)]) == status
    assert json.loads(path.read_text())["rows"] == rows
    assert path.with_suffix(".md").read_text().count("| obs 8x4 |") == 2


def test_roofline_compiles_one_graph_per_size(roofline_module, compiled_graphs_dynamic):
    # The compile rows must time what a model of fixed shapes runs, not a graph compiled for any size (what
    # torch.compile makes of a function by default once it has seen a second size).
    normalize = roofline_module._compiled_reference()["normalize"]  # run on the CPU, where dynamo decides alike
    for rows in (3, 4, 5):
        normalize(torch.ones(rows, 2), torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert compiled_graphs_dynamic == [False, False, False]


def test_roofline_keeps_the_rows_measured_before_it_was_stopped(roofline, monkeypatch, tmp_path):
    def run(quick, on_row=lambda rows: None):
        on_row([row("triton")])
        raise KeyboardInterrupt  # the run's time limit

    monkeypatch.setattr(roofline, "run", run)
    monkeypatch.setenv("OUT", str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        roofline.main([])
    saved = json.loads((tmp_path / "triton_roofline.json").read_text())
    assert saved["rows"] == [row("triton")] and saved["meta"]["device"] == "stand-in"
