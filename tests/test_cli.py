"""``protonorm bench``: arguments, the JSON records, the plot, clean errors, the PPO workload, and the harness
pieces the numbers rest on (the upstream baseline, percentiles, paired ratios, the host-sync probe).

Shapes are tiny and repetitions few: these tests check what the command produces, never how fast anything is.
"""
import io
import json
import subprocess
import sys
import time
import types
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from protonorm import backends
from protonorm.benchmark import cases, report, suite, timing
from protonorm.benchmark.baseline import BaselineRewardRunningMeanStd, BaselineRunningMeanStd
from protonorm.benchmark.cases import parse_shapes
from protonorm.cli import main

import upstream as upstream_locator

REQUIRED_KEYS = {
    "case", "backend", "shape", "dtype", "device", "median_us", "p20_us", "p80_us",
    "speedup", "gbps", "pct_copy_bw", "launches", "host_syncs",
}
TINY = ["bench", "--device", "cpu", "--iters", "3", "--no-progress"]


def _default_contenders():
    """What a run without --backends must time on CPU: auto, every other usable backend but Triton (CPU
    tensors reach it only through its interpreter), and the baseline."""
    cpu = torch.device("cpu")
    chosen = backends.resolve("auto", cpu).name
    others = {n for n, reason in backends.available(cpu).items() if reason is None and n not in (chosen, "triton")}
    return {"auto", "baseline"} | others


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One in-process run over two shapes and every default case, with --json and --plot."""
    folder = tmp_path_factory.mktemp("bench")
    json_path, plot_path = folder / "out" / "bench.json", folder / "bench.png"
    out = io.StringIO()
    argv = TINY + ["--shapes", "7x3,33x5", "--envs", "17", "--json", str(json_path), "--plot", str(plot_path)]
    with redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue(), json.loads(json_path.read_text()), plot_path


# ------------------------------------------------------------------------------------------------ bench
def test_bench_exits_zero_and_prints_every_case(tiny_run):
    code, text, _, _ = tiny_run
    assert code == 0
    for word in ("record_welford", "record_ema", "norm_record", "reward", "baseline", "copy", "speedup", "7x3", "33x5"):
        assert word in text


def test_json_records_cover_every_case_shape_and_contender(tiny_run):
    _, _, records, _ = tiny_run
    assert all(REQUIRED_KEYS <= set(r) for r in records)
    seen = {(r["case"], tuple(r["shape"])) for r in records}
    obs_cases = {"record_welford", "record_ema", "norm_record"}
    assert seen == {(c, s) for c in obs_cases for s in ((7, 3), (33, 5))} | {("reward", (17,))}
    for case, shape in seen:
        names = {r["backend"] for r in records if (r["case"], tuple(r["shape"])) == (case, shape)}
        assert names == _default_contenders()


def test_json_values_are_consistent(tiny_run):
    _, _, records, _ = tiny_run
    for r in records:
        assert r["dtype"] == "float32" and r["device"] == "cpu"
        assert 0 < r["p20_us"] <= r["median_us"] <= r["p80_us"]
        assert r["speedup"] > 0 and r["gbps"] > 0 and r["pct_copy_bw"] > 0
        # GB/s is the least traffic over the median time, in the record's own units.
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_us"] * 1e-6) / 1e9)
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"])
        assert r["launches"] is None  # only counted on CUDA
        assert r["host_syncs"] >= 0
        assert r["repetitions"] == 3
        if r["backend"] == "baseline":
            assert r["speedup"] == 1.0  # paired with itself
        if r["backend"] == "auto":
            assert r["resolved"] == backends.resolve("auto", torch.device("cpu")).name


def test_plot_is_a_png(tiny_run):
    _, _, _, plot_path = tiny_run
    data = plot_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(str(plot_path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_labels_speedups_below_one(tmp_path, monkeypatch):
    """The speedup axis is logarithmic with plain-number labels, each tick its own shortest form: 0.3 reads "0.3"
    and 1 reads "1" (ScalarFormatter gave every tick one number of decimals: "0.0" for 0.02 and "1.00" with
    matplotlib 3.7, where the bench's own plots labelled 0.2-0.4 "0"; "1.0" with newer ones)."""
    from matplotlib.figure import Figure

    from protonorm.benchmark import report

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    records = [dict(case="record_welford", backend=backend, resolved=None, input_bytes=2**20 * size, speedup=speedup,
                    pct_copy_bw=10.0)
               for backend, speedup in (("auto", 6.0), ("torch", 0.3), ("baseline", 1.0)) for size in (1, 8)]
    report.write_plot(str(tmp_path / "p.png"), records, "title")
    speed_ax = figures[0].axes[0]
    figures[0].canvas.draw()
    labels = {round(tick.get_loc(), 6): tick.label1.get_text()
              for tick in speed_ax.yaxis.get_major_ticks() + speed_ax.yaxis.get_minor_ticks()}
    assert {0.3, 1.0, 2.0} <= set(labels), labels
    assert all(text == f"{loc:g}" for loc, text in labels.items()), labels


def test_cases_backends_and_dtype_select_what_runs(tmp_path):
    path = tmp_path / "r.json"
    argv = TINY + ["--cases", "reward,normalize", "--backends", "torch", "--dtype", "float64", "--shapes", "5x2",
                   "--envs", "9", "--json", str(path)]
    assert main(argv) == 0
    records = json.loads(path.read_text())
    assert {(r["case"], tuple(r["shape"])) for r in records} == {("normalize", (5, 2)), ("reward", (9,))}
    assert {r["backend"] for r in records} == {"torch", "baseline"}
    assert {r["dtype"] for r in records} == {"float64"}


def test_triton_can_be_forced_on_cpu(tmp_path):
    if backends.available(torch.device("cpu"))["triton"] is not None:
        pytest.skip("the Triton backend does not run here")
    path = tmp_path / "t.json"
    argv = TINY + ["--backends", "triton", "--cases", "norm_record,reward", "--shapes", "4x3", "--envs", "5",
                   "--json", str(path)]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    assert "CPU interpreter" in out.getvalue()
    assert {r["backend"] for r in json.loads(path.read_text())} == {"triton", "baseline"}


def test_workload_ppo_reports_epoch_time_per_backend(tmp_path):
    path, plot = tmp_path / "ppo.json", tmp_path / "ppo.png"
    argv = TINY[:-3] + ["--workload", "ppo", "--envs", "16", "--obs-dims", "4,6,3", "--iters", "2", "--no-progress",
                        "--json", str(path), "--plot", str(plot)]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    assert "PPO epoch" in out.getvalue() and "ms / epoch" in out.getvalue()
    records = json.loads(path.read_text())
    assert {r["backend"] for r in records} == _default_contenders()
    for r in records:
        assert REQUIRED_KEYS <= set(r)
        assert r["case"] == "ppo_epoch" and r["shape"] == [32, 16] and r["obs_dims"] == [4, 6, 3]
        assert 0 < r["p20_us"] <= r["median_us"] <= r["p80_us"]
        assert r["repetitions"] == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_auto_contender_runs_and_names_what_the_environment_picks(tmp_path, monkeypatch):
    # PROTONORM_BACKEND replaces "auto" in the modules, so the auto row runs that backend: its label, its JSON
    # record and the other rows (the backend auto would otherwise pick is then timed on its own) must say so.
    monkeypatch.setenv("PROTONORM_BACKEND", "torch")
    cpu = torch.device("cpu")
    contender = cases.protonorm_contender("auto", cpu)
    assert contender.resolved == "torch" and contender.label == "auto (torch)"
    assert backends.resolve(contender.obs(3, None).backend, cpu).name == "torch"
    path = tmp_path / "env.json"
    assert main(TINY + ["--cases", "record_ema", "--shapes", "5x2", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    assert [r["resolved"] for r in records if r["backend"] == "auto"] == ["torch"]
    usable = {n for n, reason in backends.available(cpu).items() if reason is None and n != "triton"}
    assert {r["backend"] for r in records} == {"auto", "baseline"} | (usable - {"torch"})


@pytest.mark.parametrize("value, message", [
    ("bogus", "environment variable PROTONORM_BACKEND must be one of"),
    ("triton", "PROTONORM_BACKEND='triton', which backend=\"auto\" follows: backend 'triton' is not available"),
])
def test_unusable_environment_backend_is_a_clean_error(capsys, monkeypatch, value, message):
    monkeypatch.setenv("PROTONORM_BACKEND", value)
    monkeypatch.setitem(backends._loaded, "triton", (None, "ImportError: no triton here"))  # as where it is missing
    assert main(TINY + ["--cases", "reward"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("protonorm bench: error: ") and message in lines[0], captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "tpu9"], "unknown device"),
        (["--device", "meta"], "unsupported device"),
        (["--shapes", "8192x"], "bad shape"),
        (["--shapes", "0x4"], "bad shape"),
        (["--backends", "torch,fast"], "unknown backend fast"),
        (["--cases", "record"], "unknown case record"),
        (["--iters", "0"], "positive integer"),
        (["--dtype", "int8"], "invalid choice"),
        (["--obs-dims", "3,4"], "three positive"),
        (["--frobnicate"], "unrecognized arguments"),
        # Options the chosen mode would ignore (small sizes, so that a run that ignored them would end soon).
        (["--workload", "ppo", "--envs", "4", "--obs-dims", "2,2,2", "--iters", "1", "--shapes", "4x3"],
         "--shapes: not used by --workload"),
        (["--workload", "ppo", "--envs", "4", "--obs-dims", "2,2,2", "--iters", "1", "--cases", "reward",
          "--shapes", "4x3"], "--shapes and --cases: not used by --workload"),
        (["--obs-dims", "3,4,5", "--cases", "reward", "--envs", "4", "--iters", "1"], "--obs-dims: used only by --workload"),
        (["--cases", "reward", "--shapes", "4x3", "--envs", "4", "--iters", "1"], "--shapes: not used by the reward case"),
        (["--cases", "record_ema,normalize", "--envs", "4", "--shapes", "4x3", "--iters", "1"],
         "--envs: used only by the reward case and --workload; record_ema,normalize are sized by --shapes"),
    ],
)
def test_bad_input_is_one_clean_line_and_exit_2(capsys, extra, message):
    assert main(["bench"] + extra) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("protonorm bench: error:"), captured.err
    assert message in lines[0]
    assert captured.out == ""


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_unwritable_output_is_a_clean_error_before_anything_runs(capsys, tmp_path, flag):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for path, message in ((tmp_path, "Is a directory"), (blocker / "out.json", f"{str(blocker)!r} is not a directory")):
        assert main(["bench", flag, str(path), "--cases", "reward", "--iters", "1"]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert lines == [f"protonorm bench: error: {flag}: cannot write {str(path)!r}: {message}"], captured.err
        assert captured.out == ""  # nothing was timed
    fresh = tmp_path / "made" / "for" / "it.out"
    assert main(TINY + [flag, str(fresh), "--shapes", "4x3", "--envs", "5"]) == 0 and fresh.stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clean_error(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "protonorm bench: error: device 'cuda' requested but CUDA is not available in this torch build or machine"


@pytest.mark.parametrize("text, index", [("cuda", None), ("cuda:0", 0), ("cuda:1", 1)])
def test_cuda_device_is_accepted_with_or_without_an_index(monkeypatch, text, index):
    # CUDA faked at the driver calls: two devices, current device 0. "cuda" (what bench/run_gpu.sh passes) is the
    # current device; "cuda:N" makes N the current device, on which the timing events then record.
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", chosen.append, raising=False)  # absent from CPU builds
    from protonorm.cli import _parse_device

    assert _parse_device(text) == torch.device(text)
    assert chosen == ([] if index is None else [index])


def test_unavailable_backend_is_a_clean_error(capsys, monkeypatch):
    # As on a machine where the C++ extension did not build.
    monkeypatch.setitem(backends._loaded, "cpp", (None, "ImportError: extension not built"))
    assert main(TINY + ["--backends", "cpp", "--shapes", "3x2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["protonorm bench: error: backend 'cpp' is not available on cpu: ImportError: extension not built"]


def test_unavailable_backend_with_a_multi_line_import_error_is_one_line(capsys, monkeypatch):
    # A broken optional dependency may raise with a message of several lines (triton's often do).
    def broken(name):
        raise RuntimeError("triton is broken:\n  libcuda.so: cannot open shared object file\n\n")

    monkeypatch.setattr(backends, "importlib", types.SimpleNamespace(import_module=broken))
    monkeypatch.setattr(backends, "_loaded", {k: v for k, v in backends._loaded.items() if k != "triton"})
    reason = "RuntimeError: triton is broken: libcuda.so: cannot open shared object file"
    assert backends.load("triton") == (None, reason)
    assert main(TINY + ["--backends", "triton", "--shapes", "3x2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"protonorm bench: error: backend 'triton' is not available on cpu: {reason}"]


def test_help_in_process(capsys):
    assert main(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--shapes", "--dtype", "--device", "--iters", "--backends", "--cases", "--json", "--plot",
                   "--compile", "--workload"):
        assert option in text
    assert "(default: None)" not in text


def test_version_and_top_level_errors(capsys):
    import protonorm

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"protonorm {protonorm.__version__}"
    assert main(["--frobnicate"]) == 2
    assert capsys.readouterr().err.strip() == "protonorm: error: unrecognized arguments: --frobnicate"


def test_console_script_help():
    script = Path(sys.executable).with_name("protonorm")  # installed beside the interpreter by pip
    command = [str(script)] if script.exists() else [sys.executable, "-m", "protonorm.cli"]
    done = subprocess.run(command + ["bench", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: protonorm bench" in done.stdout


def test_plain_text_table_without_rich(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    out = io.StringIO()
    report.print_table("title", ("case", "shape", "backend", "x"), [[["a", "1x2", "torch", "3.5"]]], ["note"], out)
    assert "┃" not in out.getvalue()  # no rich box drawing
    lines = out.getvalue().splitlines()
    assert lines[0] == "title" and lines[1].split() == ["case", "shape", "backend", "x"]
    assert lines[3].split() == ["a", "1x2", "torch", "3.5"] and lines[-1] == "note"


# torch.compile's first import touches torch.jit.script_method, which warns about its own deprecation.
COMPILE_IMPORT_WARNING = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(COMPILE_IMPORT_WARNING)
def test_compile_adds_a_compiled_reference_contender(tmp_path):
    path = tmp_path / "c.json"
    argv = TINY + ["--compile", "--backends", "torch", "--cases", "norm_record,reward", "--shapes", "6x3",
                   "--envs", "5", "--json", str(path)]
    assert main(argv) == 0
    records = json.loads(path.read_text())
    assert {r["backend"] for r in records} == {"torch", "compile", "baseline"}


@pytest.mark.filterwarnings(COMPILE_IMPORT_WARNING)
def test_compiled_reference_computes_what_protonorm_computes():
    device = torch.device("cpu")
    compiled = cases.compile_contender(device)
    eager = cases.protonorm_contender("torch", device)
    g = torch.Generator().manual_seed(5)
    ours, ref = compiled.obs(4, cases.EMA_DECAY), eager.obs(4, cases.EMA_DECAY)
    for _ in range(3):
        x = torch.randn(10, 4, generator=g) * 2 + 7
        torch.testing.assert_close(ours.normalize(x), ref.normalize(x))
        ours.record_moments(x)
        ref.record_moments(x)
    torch.testing.assert_close(ours.mean, ref.mean)
    torch.testing.assert_close(ours.var, ref.var)
    ours, ref = compiled.reward(), eager.reward()
    for _ in range(3):
        reward, terminated = torch.randn(9, generator=g), torch.rand(9, generator=g) < 0.3
        ours.record_reward(reward, terminated)
        ref.record_reward(reward, terminated)
    torch.testing.assert_close(ours.var, ref.var.view(-1))
    assert torch.equal(ours.count, ref.count)


@pytest.mark.filterwarnings(COMPILE_IMPORT_WARNING)
def test_compiled_reference_stays_compiled_past_dynamos_recompile_limit(monkeypatch):
    # Each shape is one more graph of the same functions; past dynamo's limit they ran eagerly from then on, so a
    # --shapes list of more entries than that timed eager code in the compile rows. The limit is lowered to 2 here
    # so that three shapes pass it; dynamo's eager backend makes the same choices quickly.
    import torch._dynamo

    from protonorm import reference

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "eager"}))
    eager_runs = []
    normalize = reference.normalize

    def spy(*args, **kwargs):
        if not torch.compiler.is_compiling():
            eager_runs.append(args[0].shape)
        return normalize(*args, **kwargs)

    monkeypatch.setattr(reference, "normalize", spy)
    # (monkeypatch would delete the setting when undone; torch before 2.6 names it cache_size_limit)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 2}):
        contender = cases.compile_contender(torch.device("cpu"))
        for rows in (3, 4, 5):
            contender.obs(2, cases.EMA_DECAY).normalize(torch.ones(rows, 2))
    assert eager_runs == []


# ------------------------------------------------------------------------------------------------ harness
def test_parse_shapes():
    assert parse_shapes("8192x342, 16384X1024") == [(8192, 342), (16384, 1024)]
    for bad in ("", "8192", "8x3x2", "ax3", "-1x3"):
        with pytest.raises(ValueError, match="bad shape"):
            parse_shapes(bad)


def test_percentile_matches_numpy():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.5]
    for q in (0, 20, 50, 80, 100):
        assert timing.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_paired_speedup_is_the_median_of_per_repetition_ratios():
    # A machine whose speed drifts: the per-repetition ratios are 4, 2, 8, 4, 4 (median 4), while the ratio of the
    # medians, 8 / 4, is 2.
    baseline = timing.Samples([4.0, 8.0, 40.0, 80.0, 4.0])
    contender = timing.Samples([1.0, 4.0, 5.0, 20.0, 1.0])
    assert timing.paired_speedup(baseline, contender) == 4.0


def test_host_sync_probe_counts_reads_per_call():
    t = torch.ones(3)
    assert timing.count_host_syncs(lambda: t.sum().item(), torch.device("cpu"), calls=4) == 1.0
    assert timing.count_host_syncs(lambda: t.sum(), torch.device("cpu"), calls=4) == 0.0


@pytest.mark.filterwarnings(COMPILE_IMPORT_WARNING)
@pytest.mark.parametrize("probes_leave_compiled_code", [True, False], ids=["torch-now", "torch-2.6-and-older"])
def test_host_sync_probe_leaves_compiled_code_compiled(monkeypatch, probes_leave_compiled_code):
    # torch.compile runs a function eagerly under a dispatch mode, and from then on, everywhere: the compile
    # contender, probed before it is timed, was timed as eager code. Its host reads must still be counted where the
    # mode can let compiled code run (torch.compile of torch 2.4 to 2.6 cannot be told: there it is not probed).
    if probes_leave_compiled_code and not timing.PROBES_LEAVE_COMPILED_CODE:
        pytest.skip("this torch's dispatch modes cannot let compiled code run; the other case covers it")
    monkeypatch.setattr(timing, "PROBES_LEAVE_COMPILED_CODE", probes_leave_compiled_code)
    eager_runs = []

    def scale(x):
        if not torch.compiler.is_compiling():
            eager_runs.append(x)
        return x * x.sum().item()  # the read breaks the graph and runs eagerly

    compiled = torch.compile(scale, backend="eager", dynamic=False)  # dynamo alone decides what runs eagerly
    x = torch.ones(3)
    compiled(x)
    counted = timing.count_host_syncs(lambda: compiled(x), torch.device("cpu"), calls=2, compiled=True)
    assert counted == (1.0 if probes_leave_compiled_code else None)
    compiled(x)
    assert eager_runs == []


def test_repetitions_fit_the_budget_on_a_machine_that_is_never_quiet(monkeypatch):
    # There every wait for quiet after a baseline block lasts its full limit (1 s): sized as one 10 ms window, a
    # case's repetitions could take up to 200 such waits against its share of the run's 20 s.
    monkeypatch.setattr(timing, "wait_until_quiet", lambda: time.sleep(0.05))
    cpu = torch.device("cpu")
    case = cases.Case("record_ema", 4, 3, torch.float32, cpu)
    records = suite.run_case(case, cases.build_contenders(cpu, ["torch"], False), None, budget_s=0.5)
    assert all(r["repetitions"] <= 0.5 / 0.05 for r in records), records[0]["repetitions"]


def test_interleaved_rotates_and_times_every_contender():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    samples = timing.interleaved(fns, {"a": 1, "b": 2, "c": 1}, 3, torch.device("cpu"))
    assert order == ["a", "b", "b", "c", "b", "b", "c", "a", "c", "a", "b", "b"]
    assert all(len(s.seconds) == 3 and min(s.seconds) >= 0 for s in samples.values())


def test_interleaved_reports_seconds_per_call_not_per_block():
    import time

    samples = timing.interleaved({"sleep": lambda: time.sleep(0.002)}, {"sleep": 5}, 3, torch.device("cpu"))
    assert all(0.002 <= s < 0.008 for s in samples["sleep"].seconds), samples["sleep"].seconds


def _slowing_down_then_steady(seconds):
    """A callable whose calls sleep ``seconds[i]`` in turn, then 0; it records how often it was called."""
    import time

    def fn():
        i = fn.calls
        fn.calls += 1
        if i < len(seconds):
            time.sleep(seconds[i])

    fn.calls = 0
    return fn


def test_warm_up_goes_on_while_calls_still_get_much_faster():
    # Compiled code: a compiling call, then first runs each several times faster than the one before.
    fn = _slowing_down_then_steady([0.08, 0.02, 0.005, 0.001])
    timing.warm_up(fn, torch.device("cpu"), calls=1)
    assert 5 <= fn.calls <= 6  # the four slow calls, the first steady one, at most one more
    steady = _slowing_down_then_steady([])
    timing.warm_up(steady, torch.device("cpu"), calls=3)
    assert steady.calls == 4


def test_calibration_is_not_set_by_one_slow_call():
    # One slow call (compiling, a page fault) must not leave a fast contender timed one cold call per block.
    fn = _slowing_down_then_steady([0.005])
    inner, per_call = timing.calibrate_inner(fn, torch.device("cpu"))
    assert per_call < 0.001 and inner > 10, (inner, per_call)


# ------------------------------------------------------------------------------------------------ baseline
@pytest.fixture(scope="module")
def upstream():
    return upstream_locator.load()


def _calls(method, *args):
    """The names of the Python functions and of the C functions (torch's ops among them) that ``method(*args)``
    calls, in order."""
    names = []

    def profile(frame, event, arg):
        if event == "call":
            names.append(frame.f_code.co_name)
        elif event == "c_call":
            names.append(getattr(arg, "__qualname__", repr(arg)))

    sys.setprofile(profile)
    try:
        method(*args)
    finally:
        sys.setprofile(None)
    return names[:-1]  # the last is setprofile's own


@pytest.mark.parametrize("ema_decay", [None, 0.99])
def test_baseline_makes_upstreams_calls(upstream, ema_decay):
    """The same ops and the same Python calls (the module's buffer lookups, its checks) per call as upstream's
    module: the same cost per call, which on small batches is most of it. The baseline's lookups were plain
    attributes and its merge took other ops, which made it faster than upstream's module by up to a fifth."""
    x = torch.randn(6, 5)
    ours = BaselineRunningMeanStd((5,), 1e-5, "cpu", 5.0, ema_decay)
    theirs = upstream.RunningMeanStd(None, (5,), 1e-5, "cpu", 5.0, ema_decay)
    for name, args in (("record_moments", (x,)), ("normalize", (x,)), ("normalize", (x, True))):
        assert _calls(getattr(ours, name), *args) == _calls(getattr(theirs, name), *args), name
    reward, terminated = torch.randn(7), torch.rand(7) < 0.3
    ours = BaselineRewardRunningMeanStd((1,), 0.99, 1e-5, 5.0, "cpu", ema_decay)
    theirs = upstream.RewardRunningMeanStd(None, (1,), 0.99, 1e-5, 5.0, "cpu", ema_decay)
    for name, args in (("record_reward", (reward, terminated)),) * 2 + (("normalize", (reward,)),):
        assert _calls(getattr(ours, name), *args) == _calls(getattr(theirs, name), *args), name


@pytest.mark.parametrize("ema_decay", [None, 0.99])
def test_baseline_repeats_upstream_bit_for_bit(upstream, ema_decay):
    """The baseline is only a fair yardstick if it computes exactly what upstream computes."""
    g = torch.Generator().manual_seed(3)
    ours = BaselineRunningMeanStd((5,), 1e-5, "cpu", 5.0, ema_decay)
    theirs = upstream.RunningMeanStd(None, (5,), 1e-5, "cpu", 5.0, ema_decay)
    for rows in (1, 7, 64, 3):
        x = torch.randn(rows, 5, generator=g) * 3 + 100
        ours.record_moments(x)
        theirs.record_moments(x)
        assert torch.equal(ours.normalize(x), theirs.normalize(x))
        assert torch.equal(ours.normalize(x, un_norm=True), theirs.normalize(x, un_norm=True))
    assert torch.equal(ours.mean, theirs.mean) and torch.equal(ours.var, theirs.var)
    assert torch.equal(ours.count, theirs.count)


def test_baseline_reward_repeats_upstream_bit_for_bit(upstream):
    g = torch.Generator().manual_seed(4)
    ours = BaselineRewardRunningMeanStd((1,), 0.99, 1e-5, 5.0, "cpu")
    theirs = upstream.RewardRunningMeanStd(None, (1,), 0.99, 1e-5, 5.0, "cpu")
    for _ in range(6):
        reward = torch.randn(33, generator=g)
        terminated = torch.rand(33, generator=g) < 0.2
        ours.record_reward(reward, terminated)
        theirs.record_reward(reward, terminated)
    assert torch.equal(ours.discounted_reward, theirs.discounted_reward)
    assert torch.equal(ours.mean, theirs.mean) and torch.equal(ours.var, theirs.var)
    assert torch.equal(ours.count, theirs.count)
    buffer = torch.randn(4, 33, generator=g) * 10
    assert torch.equal(ours.normalize(buffer), theirs.normalize(buffer))
