"""Presenting results: a rich table (plain text when rich is missing), the JSON file and the PNG plot."""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

COLUMNS = ("case", "shape", "backend", "median us", "p20-p80 us", "speedup", "GB/s", "% copy", "launches", "syncs")
WORKLOAD_COLUMNS = ("backend", "ms / epoch", "p20-p80 ms", "speedup", "launches", "syncs")

LEGEND = (
    "median us: per call; p20-p80: spread over repetitions; speedup: median of paired ratios against the "
    "baseline (upstream's operation sequence) timed in the same loop; GB/s: least bytes the call must move / "
    "median time; % copy: that rate against y.copy_(x) of the same tensor timed alongside; launches: device "
    "kernels + copies per call (CUDA only); syncs: host syncs per call."
)


# ------------------------------------------------------------------------------------------------ formatting
def _sig(value: float, digits: int = 3) -> str:
    if value >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if value >= 1 else f"{value:.2g}"


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def _count(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.2f}"


def _shape(record: dict) -> str:
    return "x".join(str(s) for s in record["shape"])


def _backend(record: dict) -> str:
    if record["backend"] == "auto" and record.get("resolved") not in (None, "auto"):
        return f"auto ({record['resolved']})"
    return record["backend"]


def case_rows(records: Sequence[dict]) -> List[List[List[str]]]:
    """Table cells grouped by case: one group per (case, shape), a copy row closing each group."""
    groups, current, key = [], None, None
    for r in records:
        this = (r["case"], tuple(r["shape"]))
        if this != key:
            current, key = [], this
            groups.append((current, r))
        current.append(
            [
                r["case"],
                _shape(r),
                _backend(r),
                _sig(r["median_us"]),
                f"{_sig(r['p20_us'])}-{_sig(r['p80_us'])}",
                _ratio(r["speedup"]),
                _sig(r["gbps"]),
                f"{r['pct_copy_bw']:.0f}%",
                _count(r["launches"]),
                _count(r["host_syncs"]),
            ]
        )
    out = []
    for rows, first in groups:
        rows.append(["", "", "copy", _sig(first["copy_us"]), "", "", _sig(first["copy_gbps"]), "100%", "", ""])
        out.append(rows)
    return out


def workload_rows(records: Sequence[dict]) -> List[List[str]]:
    return [
        [
            _backend(r),
            _sig(r["median_us"] / 1e3),
            f"{_sig(r['p20_us'] / 1e3)}-{_sig(r['p80_us'] / 1e3)}",
            _ratio(r["speedup"]),
            _count(r["launches"]),
            _count(r["host_syncs"]),
        ]
        for r in records
    ]


# ------------------------------------------------------------------------------------------------ tables
def print_table(title: str, columns: Sequence[str], groups: Sequence[Sequence[Sequence[str]]], notes: Sequence[str], stream=None):
    """A rich table when rich imports, else aligned plain text; ``groups`` are separated by a rule. Rows of
    the yardsticks (baseline, copy) are dimmed."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        _print_plain(title, columns, groups, notes, stream)
        return
    console = Console(file=stream, width=None if _is_terminal(stream) else 160, highlight=False)
    console.print(title, soft_wrap=True)
    table = Table()
    label = columns.index("backend")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i <= label else "right")
    for g, rows in enumerate(groups):
        if g:
            table.add_section()
        for row in rows:
            table.add_row(*row, style="dim" if row[label] in ("copy", "baseline") else None)
    console.print(table)
    for note in notes:
        console.print(note, style="dim")


def _print_plain(title, columns, groups, notes, stream):
    import sys

    stream = stream or sys.stdout
    label = columns.index("backend")
    rows = [list(columns)] + [row for group in groups for row in group]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    line = "  ".join("-" * w for w in widths)
    print(title, file=stream)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), file=stream)
    for group in groups:
        print(line, file=stream)
        for row in group:
            cells = (c.ljust(w) if i <= label else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            print("  ".join(cells).rstrip(), file=stream)
    for note in notes:
        print(note, file=stream)


def _is_terminal(stream) -> bool:
    import sys

    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty()


# ------------------------------------------------------------------------------------------------ files
def write_json(path: str, records: Sequence[dict]) -> None:
    _ensure_parent(path)
    with open(path, "w") as f:
        json.dump(list(records), f, indent=2)
        f.write("\n")


def write_plot(path: str, records: Sequence[dict], title: str) -> None:
    """PNG: speedup over the baseline (left) and percent of copy bandwidth (right) against input size; for
    workload records (no size axis), bars of time per epoch and speedup per backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if any(r.get("pct_copy_bw") is None for r in records):
        figure = Figure(figsize=(10, 4), layout="constrained")
        FigureCanvasAgg(figure)
        time_ax, speed_ax = figure.subplots(1, 2)
        names = [_backend(r) for r in records]
        time_ax.bar(names, [r["median_us"] / 1e3 for r in records], color="C0")
        time_ax.set(ylabel="ms per epoch (median)", title="normalizer time per epoch")
        speed_ax.bar(names, [r["speedup"] for r in records], color="C1")
        speed_ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        speed_ax.set(ylabel="speedup over baseline (x)", title="speedup (median of paired ratios)")
        figure.suptitle(title)
        _ensure_parent(path)
        figure.savefig(path, format="png", dpi=110)
        return

    from matplotlib.ticker import StrMethodFormatter

    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    speed_ax, roof_ax = figure.subplots(1, 2)
    series = {}
    for r in records:
        series.setdefault((r["case"], _backend(r)), []).append(r)
    # Colour names the backend, the marker names the case, so both panels read with one legend.
    backend_names = sorted({backend for _, backend in series})
    case_names = sorted({case for case, _ in series})
    colours = [f"C{i % 10}" for i in range(len(backend_names))]
    markers = "os^vD<>ph*"
    for (case, backend), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["input_bytes"])
        sizes = [r["input_bytes"] / 2**20 for r in rs]
        style = dict(
            color=colours[backend_names.index(backend)],
            marker=markers[case_names.index(case) % len(markers)],
            linestyle="-" if len(rs) > 1 else "",
            label=f"{case} / {backend}",
        )
        speed_ax.plot(sizes, [r["speedup"] for r in rs], **style)
        roof_ax.plot(sizes, [r["pct_copy_bw"] for r in rs], **style)
    speed_ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    speed_ax.set(xscale="log", yscale="log", xlabel="input size (MiB)", ylabel="speedup over baseline (x)")
    # Plain numbers (0.5, 2, 10) read better than powers of ten for ratios; "{x:g}" gives each tick its own
    # decimals (ScalarFormatter gives all ticks the same number: matplotlib 3.7's labelled 0.2-0.4 "0").
    speed_ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    speed_ax.yaxis.set_minor_formatter(StrMethodFormatter("{x:g}"))
    speed_ax.set_title("speedup (median of paired ratios)")
    roof_ax.set(xscale="log", xlabel="input size (MiB)", ylabel="% of copy bandwidth")
    roof_ax.set_title("percent of roofline (y.copy_(x) of the same tensor)")
    for ax in (speed_ax, roof_ax):
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = speed_ax.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize="small")
    figure.suptitle(title)
    _ensure_parent(path)
    figure.savefig(path, format="png", dpi=110)


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
