"""What the CPU benchmark scripts share: the C++ backend check, thread setup, shape lists and paired ratios."""
from __future__ import annotations

import argparse
from typing import List, Sequence, Tuple

import torch

from protonorm.backends import load
from protonorm.benchmark.cases import parse_shapes
from protonorm.benchmark.timing import percentile


def add_common_arguments(parser: argparse.ArgumentParser, shapes: str = "8192x1024,16384x342") -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--shapes", default=shapes, help="comma-separated ROWSxFEATURES")


def setup(args: argparse.Namespace) -> Tuple[str, List[Tuple[int, int]]]:
    """Applies ``--threads``, exits with the reason if the C++ backend is missing, and returns a header line (torch
    version, threads, kernel instruction set) and the parsed ``--shapes``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    backend, reason = load("cpp")
    if backend is None:
        raise SystemExit(f"the C++ backend is not available: {reason}")
    import protonorm._C as _C

    header = f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels: {_C.isa()}"
    return header, parse_shapes(args.shapes)


def spread(seconds: Sequence[float], scale: float, digits: int) -> Tuple[float, str]:
    """The median of ``seconds`` times ``scale``, and ``"p20-p80 a-b"`` in the same unit with ``digits`` decimals."""
    low, high = percentile(seconds, 20) * scale, percentile(seconds, 80) * scale
    return percentile(seconds, 50) * scale, f"p20-p80 {low:.{digits}f}-{high:.{digits}f}"


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> str:
    """Median of the per-round ratios and their 20th-80th percentile spread: ``"  2.50x  (p20-p80 2.10-2.90)"``."""
    median, between = spread([n / d for n, d in zip(numerators, denominators)], 1.0, 2)
    return f"{median:6.2f}x  ({between})"
