"""Batch moments of a ``[B, D]`` tensor as split partials in the *parts* format (one launch).

Grid and tiling. The grid is ``(column tiles, row splits)``: program ``(t, s)`` owns the columns of tile ``t``
and the contiguous rows of split ``s``, walks them in row blocks of ``BLOCK_R`` rows and writes row ``s`` of
the parts (``n`` and ``dropped`` from the tile-0 program, ``mean``/``m2`` of its columns). The batch dimension
is split only as far as it takes to fill the device (about two programs per SM, at least a few row blocks
each, so the parts stay a small fraction of the data); on the CPU interpreter a small fixed number of splits
keeps the multi-part merge exercised.

Accuracy. Every element is widened to float64 on load (exact for every input dtype) and shifted by a
per-program reference row (the split's first valid row: considered by the mask and finite, so that
``x - shift`` is exact for data with a large offset, whatever a masked-out or dropped row holds); each row block gets two-pass moments of the shifted values (block mean, then the sum of squared
deviations about it), folded into per-program float64 accumulators with Chan's formula, and the shift is
added back once, when the part is stored. Running means of the order of the offset never enter the
accumulation, so a small spread on a large offset keeps float64 precision; parts are merged in float64 by
:mod:`protonorm.kernels.merge`. The cost is five float64 operations per element (shift, block sum, deviation,
square, sum of squares) and a float64 division per column per row block: at half the float32 rate on data-centre GPUs
that is within memory speed, while consumer GPUs run float64 at 1/64 of it (1/32 on some), where it bounds the
kernels' speed (``bench/triton_sass.py`` counts the instructions).

Non-finite rows. A row holding a NaN or an inf anywhere must be left out of every column. The test is
``sum(x * 0) == 0`` over the row (``inf * 0`` and ``NaN * 0`` are NaN, any finite value gives an exact zero),
taken in float32 for 16- and 32-bit rows (:func:`zero_probe`). When ``D`` fits one column tile (``D <= 2048``:
every observation size in practice) the test runs on the tile already in registers and costs a float32 multiply
and add per element. With several column tiles, each program
first sweeps its row block across all columns (a pre-pass that the programs of the other tiles of the same
rows are sweeping at the same time, so it is served by L2, not DRAM), then loads its own tile again.
"""

import contextlib
import functools
import os
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Tile shapes. Compiled kernels hold a tile in float64 registers: 4K elements over 8 warps keeps a program at
# 100-128 registers per thread for float32 and 16-bit rows of 257-1024 features (sm_90 ptxas; see
# _moments_kernel_16bit), so two programs fit an SM (narrower and wider rows take 140-230: one). The
# interpreter runs each program with numpy, where fewer, larger tiles are much faster. Column tiles are wide
# so that D <= 2048 needs none of the non-finite pre-pass.
MAX_BLOCK_D = 2048
TILE_ELEMENTS = 4096
INTERPRET_TILE_ELEMENTS = 1 << 16
# Row splits: programs per SM to aim for, and the least data one program should own (parts overhead).
PROGRAMS_PER_SM = 2
MIN_ELEMENTS_PER_PROGRAM = 1 << 15
INTERPRET_SPLITS = 3
# Widest rows: normalize puts its column tiles on grid axis 1, which CUDA limits to 65535 programs (this also keeps
# the kernels' int32 column indices far from overflow; row offsets are int64).
MAX_FEATURES = 65535 * MAX_BLOCK_D


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def compiled_for(device: torch.device) -> bool:
    """Whether kernels for ``device`` run compiled (tile for registers) rather than interpreted."""
    return device.type == "cuda" and not interpreting()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_features(num_features: int) -> None:
    """Refuse rows wider than ``MAX_FEATURES``: a clear error rather than wrapped indices or a failed launch."""
    if num_features > MAX_FEATURES:
        raise ValueError(f"triton kernels: expected at most {MAX_FEATURES} features per row, got {num_features}")


def num_warps_for(elements: int) -> int:
    """About 16 elements per thread (float64 tiles: 32 registers each), 1 to 8 warps."""
    return max(1, min(8, triton.next_power_of_2(max(1, elements // 512))))


@dataclass(frozen=True)
class TilePlan:
    block_r: int
    block_d: int
    col_tiles: int
    splits: int  # suggested number of parts


def tile_plan(num_rows: int, num_features: int, device: torch.device, single_tile: bool = False) -> TilePlan:
    """Tile shape and suggested number of row splits for a ``[num_rows, num_features]`` moments pass.

    ``single_tile`` gives every program all the columns (the in-place reward update needs it).
    """
    check_features(num_features)
    interp = not compiled_for(device)
    target = INTERPRET_TILE_ELEMENTS if interp else TILE_ELEMENTS
    block_d = triton.next_power_of_2(max(1, num_features))
    if not single_tile:
        block_d = min(block_d, MAX_BLOCK_D)
    block_r = max(1, min(target // block_d, triton.next_power_of_2(max(1, num_rows))))
    col_tiles = triton.cdiv(max(1, num_features), block_d)
    row_blocks = max(1, triton.cdiv(num_rows, block_r))
    if interp:
        splits = min(INTERPRET_SPLITS, row_blocks)
    else:
        wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count(device), col_tiles)
        by_size = max(1, (num_rows * num_features) // (MIN_ELEMENTS_PER_PROGRAM * col_tiles))
        splits = max(1, min(wanted, by_size, row_blocks))
    return TilePlan(block_r, block_d, col_tiles, splits)


def split_rows(num_rows: int, block_r: int, splits: int) -> tuple:
    """``(rows_per_split, blocks_per_split)`` so that ``splits`` programs cover ``num_rows`` in whole blocks."""
    blocks = triton.cdiv(max(1, num_rows), block_r)
    per_split = triton.cdiv(blocks, max(1, splits))
    return per_split * block_r, per_split


def compute_is_f64(dtype: torch.dtype) -> bool:
    return dtype == torch.float64


def f64_bits(value: float) -> int:
    """A float64 scalar argument, passed as its bits: Triton (and its interpreter) hand Python floats to
    kernels as float32, which would round ``ema_decay``, ``gamma`` or a clamp bound."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


# ------------------------------------------------------------------------------------------ shared jit helpers
@triton.jit
def from_f64_bits(bits):
    """The float64 whose bits :func:`f64_bits` passed."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def zero_probe(v):
    """``v * 0``: NaN where ``v`` is NaN or inf, else an exact (signed) zero. In float32 unless ``v`` is float64
    (float32 holds every 16- and 32-bit value exactly; float64's finite values past float32's range would be inf): a
    row's sum of these is then a float32 sum and a float32 reduction across threads. Taken in float64, the test was
    two of the seven float64 operations per element of the moments, and half of their shuffles (bench/RESULTS.md)."""
    if v.dtype == tl.float64:
        probe = v * 0.0
    else:
        probe = v.to(tl.float32) * 0.0
    return probe


@triton.jit
def rows_all_finite(x_ptr, rows, row_ok, stride_x, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-row flag: no NaN/inf in any of the ``D`` columns of ``rows`` (the multi-tile pre-pass)."""
    probe = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        v = tl.load(
            x_ptr + rows[:, None] * stride_x + cols[None, :],
            mask=row_ok[:, None] & (cols < D)[None, :],
            other=0.0,
        )
        probe += tl.sum(zero_probe(v), axis=1).to(tl.float32)  # 0 or NaN, either way; the loop keeps one type
    return probe == 0.0


@triton.jit
def take_shift(x, valid, rows, shift, have):
    """A split's shift is its first valid row. Until one has been seen (``have`` 0), this looks for it among the
    rows of the float64 tile ``x`` where ``valid``; rows before it are invalid, so they added nothing relative to
    the old shift."""
    if have == 0:
        first = tl.min(tl.where(valid, rows, 2**62), axis=0)
        shift = tl.sum(tl.where((valid & (rows == first))[:, None], x, 0.0), axis=0)
        have = (first != 2**62).to(tl.int32)
    return shift, have


@triton.jit
def block_moments(x, valid, shift):
    """``(n, mean, m2)`` (float64) of ``x - shift`` over the rows of the float64 tile ``x`` where ``valid``."""
    keep = valid[:, None]
    nb = tl.sum(valid.to(tl.int32), axis=0)
    safe_n = tl.maximum(nb, 1).to(tl.float64)
    x = tl.where(keep, x - shift[None, :], 0.0)
    mean = tl.sum(x, axis=0) / safe_n
    dev = tl.where(keep, x - mean[None, :], 0.0)
    return nb.to(tl.float64), mean, tl.sum(dev * dev, axis=0)


@triton.jit
def chan_update(n, mean, m2, n_b, mean_b, m2_b):
    """Fold block moments into running float64 accumulators (Chan et al.); an empty block changes nothing, and neither
    do empty accumulators, also where the squared difference of the means overflows (inf times 0 would be NaN)."""
    n_new = n + n_b
    w = n_b / tl.maximum(n_new, 1.0)
    delta = mean_b - mean
    mean = mean + delta * w
    cross = n * w
    m2 = m2 + m2_b + tl.where(cross > 0.0, delta * delta * cross, 0.0)
    return n_new, mean, m2


@triton.jit
def rows_finite(raw, x_ptr, rows, row_ok, stride_x, D, ONE_TILE: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Per-row flag of the tile ``raw`` as loaded: no NaN/inf in the row, tested on the tile itself when it holds
    all ``D`` columns, else by the pre-pass over the whole rows."""
    if ONE_TILE:
        finite = tl.sum(zero_probe(raw), axis=1) == 0.0
    else:
        finite = rows_all_finite(x_ptr, rows, row_ok, stride_x, D, BLOCK_R, BLOCK_D)
    return finite


@triton.jit
def fold_block(x, considered, finite, shift, n, mean, m2, dropped):
    """One row block into a program's running moments: the rows of the float64 tile ``x`` that are
    ``considered`` enter ``(n, mean, m2)`` (about ``shift``) when ``finite``, and count in ``dropped`` when not."""
    valid = considered & finite
    dropped += tl.sum((considered & (finite == 0)).to(tl.int32), axis=0)
    n_b, mean_b, m2_b = block_moments(x, valid, shift)
    n, mean, m2 = chan_update(n, mean, m2, n_b, mean_b, m2_b)
    return n, mean, m2, dropped


@triton.jit
def store_part(parts_ptr, stride_p, split, tile, D, cols, col_ok, n, dropped, mean, m2, shift):
    """Write this program's share of parts row ``split`` (``mean`` relative to ``shift``): its columns, and
    the header from tile 0. An empty part stores mean 0."""
    row = parts_ptr + split * stride_p
    tl.store(row + 2 + cols, tl.where(n > 0.0, shift + mean, 0.0), mask=col_ok)
    tl.store(row + 2 + D + cols, m2, mask=col_ok)
    tl.store(row, n, mask=tile == 0)
    tl.store(row + 1, dropped.to(tl.float64), mask=tile == 0)


# ------------------------------------------------------------------------------------------ kernel
def _moments(
    x_ptr, mask_ptr, parts_ptr,
    B, D, stride_x, stride_mask, stride_p, rows_per_split, blocks_per_split,
    HAS_MASK: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    n = tl.full([], 0.0, tl.float64)
    dropped = tl.full([], 0, tl.int32)
    mean = tl.zeros([BLOCK_D], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_D], dtype=tl.float64)
    first_row = split * rows_per_split
    shift = tl.zeros([BLOCK_D], dtype=tl.float64)
    have_shift = tl.full([], 0, tl.int32)
    for i in range(0, blocks_per_split):
        rows = first_row + i * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < B
        raw = tl.load(
            x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
        )
        x = raw.to(tl.float64)
        considered = row_ok
        if HAS_MASK:
            considered = considered & (tl.load(mask_ptr + rows * stride_mask, mask=row_ok, other=0) != 0)
        finite = rows_finite(raw, x_ptr, rows, row_ok, stride_x, D, ONE_TILE, BLOCK_R, BLOCK_D)
        shift, have_shift = take_shift(x, considered & finite, rows, shift, have_shift)
        n, mean, m2, dropped = fold_block(x, considered, finite, shift, n, mean, m2, dropped)
    store_part(parts_ptr, stride_p, split, tile, D, cols, col_ok, n, dropped, mean, m2, shift)


# Two builds of one kernel. Where the rows are 16-byte aligned and D is a multiple of 16, Triton vectorizes the loads,
# which for 16-bit inputs gives each thread 8 columns of float64 accumulators and the rows of a tile to several warps:
# 140-180 registers on sm_90 (one 8-warp program per SM, not PROGRAMS_PER_SM), column sums across warps and more
# instructions than the scalar build takes (100-128 registers at 300-1000 features). 16-bit inputs take the build that
# does not assume aligned rows; for wider dtypes the vectorized build is the cheaper one.
_moments_kernel = triton.jit(_moments)
_moments_kernel_16bit = triton.jit(do_not_specialize=["x_ptr"])(_moments)


def kernel_for(x: torch.Tensor, kernel, kernel_16bit):
    """The build of a moments-family kernel for rows of ``x``'s dtype (see ``_moments_kernel_16bit``)."""
    return kernel_16bit if x.element_size() == 2 else kernel


def launch_args(x: torch.Tensor, mask, parts: torch.Tensor):
    """``(kernel, grid, args, meta)`` of the moments launch writing ``parts.shape[0]`` partials of ``x``."""
    num_rows, num_features = x.shape
    plan = tile_plan(num_rows, num_features, x.device)
    splits = parts.shape[0]
    rows_per_split, blocks_per_split = split_rows(num_rows, plan.block_r, splits)
    grid = (plan.col_tiles, splits)
    args = (
        x, mask if mask is not None else x, parts,
        num_rows, num_features, x.stride(0), mask.stride(0) if mask is not None else 0, parts.stride(0),
        rows_per_split, blocks_per_split,
    )
    meta = dict(
        HAS_MASK=mask is not None, ONE_TILE=plan.col_tiles == 1,
        BLOCK_R=plan.block_r, BLOCK_D=plan.block_d, num_warps=num_warps_for(plan.block_r * plan.block_d),
        enable_fp_fusion=False,  # as normalize_moments, so that both give the same parts bit for bit
    )
    return kernel_for(x, _moments_kernel, _moments_kernel_16bit), grid, args, meta


def launch(x: torch.Tensor, mask, parts: torch.Tensor) -> None:
    """Write the moments of the rows of ``x`` (``[B, D]``, unit column stride) into ``parts`` ``[K, 2 + 2D]``."""
    kernel, grid, args, meta = launch_args(x, mask, parts)
    with device_guard(x):
        kernel[grid](*args, **meta)


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
