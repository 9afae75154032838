"""Normalize a ``[B, D]`` tensor with the current statistics and take its moments, reading it once.

One launch with the grid, tiling and accuracy of :mod:`protonorm.kernels.moments`; every tile it loads is
also normalized exactly as :mod:`protonorm.kernels.normalize` does and stored to ``out``. The statistics are
read before the caller's merge kernel updates them (stream order), so the output uses the statistics of
before this batch, as upstream's normalize-then-record does.
"""

import triton
import triton.language as tl

from .moments import (
    compute_is_f64,
    device_guard,
    f64_bits,
    fold_block,
    kernel_for,
    take_shift,
    num_warps_for,
    rows_finite,
    split_rows,
    store_part,
    tile_plan,
)
from .normalize import load_scale, normalize_values


def _normalize_moments(
    x_ptr, mean_ptr, var_ptr, out_ptr, parts_ptr,
    B, D, stride_x, stride_out, stride_p, rows_per_split, blocks_per_split,
    eps_bits: tl.int64, clamp_bits: tl.int64,
    F64: tl.constexpr, HAS_CLAMP: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mu, std = load_scale(mean_ptr, var_ptr, cols, col_ok, eps_bits)
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
        ok = row_ok[:, None] & col_ok[None, :]
        raw = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
        finite = rows_finite(raw, x_ptr, rows, row_ok, stride_x, D, ONE_TILE, BLOCK_R, BLOCK_D)
        y = normalize_values(raw, mu, std, clamp_bits, F64, HAS_CLAMP, False, True)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y, mask=ok)
        x = raw.to(tl.float64)
        shift, have_shift = take_shift(x, row_ok & finite, rows, shift, have_shift)
        n, mean, m2, dropped = fold_block(x, row_ok, finite, shift, n, mean, m2, dropped)
    store_part(parts_ptr, stride_p, split, tile, D, cols, col_ok, n, dropped, mean, m2, shift)


# As moments: 16-bit inputs take a build that assumes neither ``x`` nor ``out`` aligned (vectorized, it needs ~180
# registers on sm_90).
_normalize_moments_kernel = triton.jit(do_not_specialize=["eps_bits", "clamp_bits"])(_normalize_moments)
_normalize_moments_kernel_16bit = triton.jit(do_not_specialize=["x_ptr", "out_ptr", "eps_bits", "clamp_bits"])(
    _normalize_moments
)


def launch_args(x, mean, var, epsilon, clamp_value, out, parts):
    num_rows, num_features = x.shape
    plan = tile_plan(num_rows, num_features, x.device)
    splits = parts.shape[0]
    rows_per_split, blocks_per_split = split_rows(num_rows, plan.block_r, splits)
    grid = (plan.col_tiles, splits)
    args = (
        x, mean, var, out, parts,
        num_rows, num_features, x.stride(0), out.stride(0), parts.stride(0), rows_per_split, blocks_per_split,
        f64_bits(epsilon), f64_bits(clamp_value if clamp_value is not None else 0.0),
    )
    meta = dict(
        F64=compute_is_f64(x.dtype), HAS_CLAMP=clamp_value is not None, ONE_TILE=plan.col_tiles == 1,
        BLOCK_R=plan.block_r, BLOCK_D=plan.block_d, num_warps=num_warps_for(plan.block_r * plan.block_d),
        enable_fp_fusion=False,
    )
    return kernel_for(x, _normalize_moments_kernel, _normalize_moments_kernel_16bit), grid, args, meta


def launch(x, mean, var, epsilon, clamp_value, out, parts) -> None:
    """Normalize ``x`` into ``out`` and write its moments into ``parts`` ``[K, 2 + 2D]``."""
    kernel, grid, args, meta = launch_args(x, mean, var, epsilon, clamp_value, out, parts)
    with device_guard(x):
        kernel[grid](*args, **meta)
