"""The ``protonorm`` command. ``protonorm bench`` times protonorm's backends against upstream's operation sequence
on ProtoMotions' calls and prints a table (see ``protonorm bench --help``)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import List, Optional, Sequence

DTYPES = ("float32", "float16", "bfloat16", "float64")


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clean line instead of argparse's usage dump
        raise UsageError(message)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not "(default: None)")."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _names(text: str) -> List[str]:
    return [name.strip().lower() for name in text.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    from .benchmark.cases import CASE_HELP, DEFAULT_CASES, DEFAULT_ENVS, DEFAULT_SHAPES
    from .benchmark.workload import PPOWorkload

    from . import __version__

    parser = _Parser(prog="protonorm", description="protonorm: fast running mean/std normalizers for RL.")
    parser.add_argument("--version", action="version", version=f"protonorm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    bench = commands.add_parser(
        "bench",
        help="benchmark every available backend against upstream's operation sequence",
        description=(
            "Time ProtoMotions' normalizer calls with protonorm's automatic backend choice, every other available "
            "backend and a baseline that repeats the upstream module's operations, side by side (interleaved "
            "repetitions). Cases: "
            + "; ".join(f"{name}: {text}" for name, text in CASE_HELP.items())
            + "."
        ),
        formatter_class=_DefaultsFormatter,
    )
    bench.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    bench.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the observation and reward batches")
    # --shapes, --envs, --cases and --obs-dims default to None so that one given where it does not apply is refused.
    bench.add_argument(
        "--shapes",
        help="observation batches, comma-separated ROWSxFEATURES (default: "
        + ",".join(f"{r}x{d}" for r, d in DEFAULT_SHAPES) + ")",
    )
    bench.add_argument(
        "--envs", type=_positive_int, help=f"environments of the reward case and of --workload (default: {DEFAULT_ENVS})"
    )
    bench.add_argument(
        "--cases", help=f"comma-separated, from: {', '.join(CASE_HELP)} (default: {','.join(DEFAULT_CASES)})"
    )
    bench.add_argument(
        "--backends",
        help="comma-separated protonorm backends to time, from: auto, torch, cpp, triton (default: auto and every "
        "other backend available on the device, triton on the CPU only when named; the baseline is always timed). "
        "auto runs what the modules' backend=\"auto\" runs: the backend PROTONORM_BACKEND names, where it is set",
    )
    bench.add_argument(
        "--iters",
        type=_positive_int,
        help="timed repetitions per case (default: as many as fit a short per-case time budget, at least 5) or "
        "epochs with --workload (default 3 on CPU, 20 on CUDA)",
    )
    bench.add_argument("--compile", action="store_true", help="also time torch.compile of the reference math")
    bench.add_argument("--workload", choices=("ppo",), help="time a synthetic ProtoMotions PPO epoch instead of single calls")
    bench.add_argument(
        "--obs-dims",
        type=_obs_dims,
        help="--workload: feature sizes of the actor, critic and third observation (default: "
        + ",".join(map(str, PPOWorkload.obs_dims)) + ")",
    )
    bench.add_argument("--json", metavar="PATH", help="write the per-case records as JSON")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG of speedup and percent of copy bandwidth against size")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "protonorm bench" if argv[:1] == ["bench"] else "protonorm"
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return _bench(args)
    except UsageError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


# ------------------------------------------------------------------------------------------------ bench
def _bench(args) -> int:
    import torch

    _check_applicable(args)
    device = _parse_device(args.device)
    dtype = getattr(torch, args.dtype)
    requested = _parse_backends(args.backends, device)
    # Outputs are written after the benchmark has run: find out now whether they can be.
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            _check_output_path(flag, path)
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'protonorm[bench]'")

    from . import backends
    from .benchmark import cases as case_defs
    from .benchmark import report, suite, workload

    envs = args.envs or case_defs.DEFAULT_ENVS
    if requested is None or "auto" in requested:
        _check_auto(device, case_defs.auto_backend)
    names, skipped = case_defs.backend_names(device, requested)
    for name in names:
        if name != "auto":
            reason = backends.available(device)[name]
            if reason is not None:
                raise UsageError(f"backend {name!r} is not available on {device}: {reason}")
    contenders = case_defs.build_contenders(device, names, args.compile)
    header = _header(device, dtype, contenders, skipped)

    if args.workload:
        obs_dims = args.obs_dims or workload.PPOWorkload.obs_dims
        spec = workload.PPOWorkload(envs=envs, obs_dims=obs_dims, dtype=dtype, device=device)
        repetitions = args.iters or workload.default_repetitions(device)
        with _progress(not args.no_progress, repetitions) as advance:
            records = workload.run_workload(spec, contenders, repetitions, advance)
        report.print_table(
            f"{header}\n{spec.describe()}; {repetitions} interleaved epochs",
            report.WORKLOAD_COLUMNS,
            [report.workload_rows(records)],
            ["ms / epoch: normalizer time per epoch; launches, syncs: per epoch; speedup: against the baseline."],
        )
    else:
        shapes, case_names = list(case_defs.DEFAULT_SHAPES), list(case_defs.DEFAULT_CASES)
        if args.shapes is not None:
            try:
                shapes = case_defs.parse_shapes(args.shapes)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if args.cases is not None:
            case_names = _parse_cases(args.cases, case_defs.CASE_KINDS)
        cases = case_defs.build_cases(case_names, shapes, envs, dtype, device)
        with _case_progress(not args.no_progress and len(cases) > 1) as progress:
            records = suite.run_suite(cases, contenders, args.iters, suite.default_budget_s(device), progress)
        repetitions = sorted({r["repetitions"] for r in records})
        span = f"{repetitions[0]}" if len(repetitions) == 1 else f"{repetitions[0]}-{repetitions[-1]}"
        report.print_table(
            f"{header}\n{span} interleaved repetitions per case",
            report.COLUMNS,
            report.case_rows(records),
            [report.LEGEND],
        )
    if args.json:
        report.write_json(args.json, records)
    if args.plot:
        report.write_plot(args.plot, records, header.splitlines()[0])
    return 0


def _check_applicable(args) -> None:
    """Raise UsageError for an option that the chosen mode would silently ignore."""
    if args.workload:
        given = [flag for flag, value in (("--shapes", args.shapes), ("--cases", args.cases)) if value is not None]
        if given:
            raise UsageError(f"{' and '.join(given)}: not used by --workload, whose epoch is sized by --envs and "
                             "--obs-dims")
    elif args.obs_dims is not None:
        raise UsageError("--obs-dims: used only by --workload; single calls are sized by --shapes and --envs")
    else:
        from .benchmark.cases import CASE_KINDS, DEFAULT_CASES

        names = DEFAULT_CASES if args.cases is None else _parse_cases(args.cases, CASE_KINDS)
        kinds = {CASE_KINDS[name][0] for name in names}
        if args.shapes is not None and kinds == {"reward"}:
            raise UsageError("--shapes: not used by the reward case, which is sized by --envs")
        if args.envs is not None and "reward" not in kinds:
            raise UsageError(f"--envs: used only by the reward case and --workload; {','.join(names)} "
                             "are sized by --shapes")


def _check_output_path(flag: str, path: str) -> None:
    """Raise UsageError unless ``path`` can be written, by opening it for appending (its missing folders are made,
    as the writer would make them; a file made only for this test is removed)."""
    existed = os.path.exists(path)
    parent = folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UsageError(f"{flag}: cannot write {path!r}: {folder!r} is not a directory")
    try:
        os.makedirs(parent, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag}: cannot write {path!r}: {exc.strerror or exc}") from None
    if not existed:
        os.remove(path)


def _parse_device(text: Optional[str]):
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"unknown device {text!r} ({str(exc).splitlines()[0]}); expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {text!r} requested but CUDA is not available in this torch build or machine")
        if device.index is not None:
            if device.index >= torch.cuda.device_count():
                raise UsageError(f"device {text!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
            # The timing events record on the current device. A plain "cuda" is the current device already (and
            # set_device refuses a device without an index).
            torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {text!r}: protonorm bench runs on cpu or cuda")
    return device


def _parse_backends(text: Optional[str], device) -> Optional[List[str]]:
    from .backends import CHOICES

    if text is None:
        return None
    names = _names(text)
    unknown = [name for name in names if name not in CHOICES]
    if unknown or not names:
        raise UsageError(f"unknown backend {', '.join(unknown) or repr(text)}: expected a comma-separated list from {', '.join(CHOICES)}")
    if "triton" in names and device.type != "cuda":
        # Triton reaches CPU tensors only through its interpreter, which must be chosen before it is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return list(dict.fromkeys(names))


def _check_auto(device, auto_backend) -> None:
    """Raise UsageError unless the auto contender can run: it runs what ``PROTONORM_BACKEND`` names, as the modules
    built with ``backend="auto"`` do."""
    from .backends import ENV_VAR

    try:
        auto_backend(device)
    except (ValueError, RuntimeError) as exc:
        message = str(exc)
        if ENV_VAR not in message:
            message = f"{ENV_VAR}={os.environ.get(ENV_VAR)!r}, which backend=\"auto\" follows: {message}"
        raise UsageError(message) from None


def _parse_cases(text: str, known) -> List[str]:
    names = _names(text)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UsageError(f"unknown case {', '.join(unknown) or repr(text)}: expected a comma-separated list from {', '.join(known)}")
    return list(dict.fromkeys(names))


def _obs_dims(text: str):
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive feature sizes, e.g. 342,1024,342, got {text!r}")
    return dims


def _header(device, dtype, contenders, skipped) -> str:
    import torch

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    timed = ", ".join(c.label for c in contenders)
    line = f"protonorm bench: {device} ({where}), torch {torch.__version__}, {str(dtype).replace('torch.', '')}"
    if device.type != "cuda" and any(c.name == "triton" for c in contenders):
        timed += " (triton in its CPU interpreter: a correctness tool, far slower than compiled code)"
    unused = "; ".join(f"{name}: {reason}" for name, reason in skipped.items() if not any(c.name == name for c in contenders))
    return f"{line}\ntimed: {timed}" + (f"\nnot timed: {unused}" if unused else "")


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _rich_progress():
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        return None
    console = Console(stderr=True)
    if not console.is_terminal:
        return None
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )


def _case_progress(enabled: bool):
    progress = _rich_progress() if enabled else None
    return progress if progress is not None else _NoProgress()


class _progress:
    """Context manager yielding a callable advanced once per repetition (or None without a terminal)."""

    def __init__(self, enabled: bool, total: int):
        self.bar = _rich_progress() if enabled else None
        self.total = total

    def __enter__(self):
        if self.bar is None:
            return None
        self.bar.__enter__()
        task = self.bar.add_task("epochs", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc) if self.bar is not None else False


if __name__ == "__main__":
    sys.exit(main())
