"""Advance the discounted returns in place and take their moments, in one launch.

``discounted = (terminated != 0 ? 0 : discounted * gamma) + reward`` (as
:func:`protonorm.reference.discounted_return_update`, with torch's dtype rules: the product in
``discounted``'s dtype, the sum in the promotion of both, stored back in ``discounted``'s dtype), then the
moments of the stored values with the accuracy of :mod:`protonorm.kernels.moments`.

Every program owns whole rows (a single column tile): the non-finite row test needs all columns of the new
values, and another column tile's values are being overwritten in place by its own program. The reward
normalizer has ``D = 1`` and ``B`` = the number of environments, so tiles run over rows only.
"""

import torch
import triton
import triton.language as tl

from .moments import (
    device_guard,
    f64_bits,
    fold_block,
    from_f64_bits,
    num_warps_for,
    split_rows,
    store_part,
    take_shift,
    tile_plan,
    zero_probe,
)


@triton.jit
def discounted_update(
    reward_ptr, terminated_ptr, discounted_ptr, rows, row_ok, cols, col_ok, stride_r, stride_t, stride_d, g, sum_t
):
    """New discounted returns of ``rows`` (not stored): the product in the returns' dtype, the sum in
    ``sum_t``, rounded back to the returns' dtype."""
    ok = row_ok[:, None] & col_ok[None, :]
    disc_t = discounted_ptr.dtype.element_ty
    old = tl.load(discounted_ptr + rows[:, None] * stride_d + cols[None, :], mask=ok, other=0.0)
    reward = tl.load(reward_ptr + rows[:, None] * stride_r + cols[None, :], mask=ok, other=0.0)
    flags = tl.load(terminated_ptr + rows * stride_t, mask=row_ok, other=0)
    if terminated_ptr.dtype.element_ty == tl.bfloat16:  # the interpreter would compare raw bits: -0.0 is not 0 there
        flags = flags.to(tl.float32)
    reset = flags != 0
    carried = tl.where(reset[:, None], 0.0, old * g).to(disc_t)
    return (carried.to(sum_t) + reward.to(sum_t)).to(disc_t)


@triton.jit(do_not_specialize=["gamma_bits"])
def _reward_moments_kernel(
    reward_ptr, terminated_ptr, discounted_ptr, parts_ptr,
    B, D, stride_r, stride_t, stride_d, stride_p, rows_per_split, blocks_per_split,
    gamma_bits: tl.int64,
    SUM_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    split = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    disc_t = discounted_ptr.dtype.element_ty
    sum_t = tl.float64 if SUM_F64 else tl.float32
    g = from_f64_bits(gamma_bits).to(disc_t)
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
        new = discounted_update(
            reward_ptr, terminated_ptr, discounted_ptr, rows, row_ok, cols, col_ok, stride_r, stride_t, stride_d, g, sum_t
        )
        tl.store(discounted_ptr + rows[:, None] * stride_d + cols[None, :], new, mask=row_ok[:, None] & col_ok[None, :])
        x = new.to(tl.float64)
        finite = tl.sum(zero_probe(new), axis=1) == 0.0
        shift, have_shift = take_shift(x, row_ok & finite, rows, shift, have_shift)
        n, mean, m2, dropped = fold_block(x, row_ok, finite, shift, n, mean, m2, dropped)
    store_part(parts_ptr, stride_p, split, 0, D, cols, col_ok, n, dropped, mean, m2, shift)


def launch_args(reward, terminated, discounted, gamma, parts):
    num_rows, num_features = discounted.shape
    plan = tile_plan(num_rows, num_features, discounted.device, single_tile=True)
    splits = parts.shape[0]
    rows_per_split, blocks_per_split = split_rows(num_rows, plan.block_r, splits)
    args = (
        reward, terminated, discounted, parts,
        num_rows, num_features, reward.stride(0), terminated.stride(0), discounted.stride(0), parts.stride(0),
        rows_per_split, blocks_per_split, f64_bits(gamma),
    )
    meta = dict(
        SUM_F64=torch.float64 in (reward.dtype, discounted.dtype),
        BLOCK_R=plan.block_r, BLOCK_D=plan.block_d, num_warps=num_warps_for(plan.block_r * plan.block_d),
        enable_fp_fusion=False,
    )
    return _reward_moments_kernel, (splits,), args, meta


def launch(reward, terminated, discounted, gamma, parts) -> None:
    """Update ``discounted`` ``[B, D]`` in place from ``reward`` ``[B, D]`` and ``terminated`` ``[B]``, and
    write the moments of its new value into ``parts`` ``[K, 2 + 2D]``."""
    kernel, grid, args, meta = launch_args(reward, terminated, discounted, gamma, parts)
    with device_guard(discounted):
        kernel[grid](*args, **meta)
