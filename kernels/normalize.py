"""Normalize, un-normalize or scale a ``[B, D]`` tensor with the running statistics, in one launch.

Matches :func:`protonorm.reference.normalize` operation for operation: the float64 statistics are rounded
to float32 (``mean.float()``, ``sqrt(var.float() + eps)`` in float32), the data are computed in
``promote_types(x.dtype, float32)``, divisions and square roots are IEEE-rounded and the kernel is compiled
without FMA contraction, so results agree with torch bit for bit. Clamping is written with comparisons, so
NaN stays NaN like ``torch.clamp``; ``un_norm`` clamps in the input's own precision (what ``torch.clamp``
does on a half tensor) before mapping back.

The grid is ``(row blocks, column tiles)``, one tile per program; ``D = 1`` (reward buffers) is tiled over
rows only.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from .moments import (
    MAX_BLOCK_D,
    check_features,
    compiled_for,
    compute_is_f64,
    device_guard,
    f64_bits,
    from_f64_bits,
    num_warps_for,
)

TILE_ELEMENTS = 4096
INTERPRET_TILE_ELEMENTS = 1 << 16


@triton.jit
def load_scale(mean_ptr, var_ptr, cols, col_ok, eps_bits):
    """Float32 ``mean`` and ``sqrt(var + eps)`` of columns ``cols``, rounded as upstream does (``eps`` is
    rounded to float32 like the Python scalar in ``var.float() + eps``)."""
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)
    return mean, tl.sqrt_rn(var + from_f64_bits(eps_bits).to(tl.float32))


@triton.jit
def clamp_values(y, clamp_bits, HAS_CLAMP: tl.constexpr):
    """``torch.clamp(y, -c, c)`` that keeps NaN (comparisons are False for NaN); ``c`` as float64 bits."""
    if HAS_CLAMP:
        c = from_f64_bits(clamp_bits).to(y.dtype)
        y = tl.where(y > c, c, y)
        y = tl.where(y < -c, -c, y)
    return y


@triton.jit
def normalize_values(
    x, mean, std, clamp_bits,
    F64: tl.constexpr, HAS_CLAMP: tl.constexpr, UN_NORM: tl.constexpr, CENTER: tl.constexpr,
):
    """Normalized (or un-normalized) tile; ``x`` in its storage dtype, ``mean``/``std`` float32 per column."""
    ct = tl.float64 if F64 else tl.float32
    m = mean.to(ct)[None, :]
    s = std.to(ct)[None, :]
    if UN_NORM:
        xc = clamp_values(x.to(ct), clamp_bits, HAS_CLAMP)
        if HAS_CLAMP:
            xc = xc.to(x.dtype).to(ct)  # a half tensor is clamped to a half-rounded bound
        y = xc * s
        if CENTER:
            y = y + m
    else:
        y = x.to(ct)
        if CENTER:
            y = y - m
        if F64:
            y = y / s
        else:
            y = tl.div_rn(y, s)
        y = clamp_values(y, clamp_bits, HAS_CLAMP)
    return y


@triton.jit(do_not_specialize=["eps_bits", "clamp_bits"])
def _normalize_kernel(
    x_ptr, mean_ptr, var_ptr, out_ptr,
    B, D, stride_x, stride_out,
    eps_bits: tl.int64, clamp_bits: tl.int64,
    F64: tl.constexpr, HAS_CLAMP: tl.constexpr, UN_NORM: tl.constexpr, CENTER: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    mean, std = load_scale(mean_ptr, var_ptr, cols, col_ok, eps_bits)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    y = normalize_values(x, mean, std, clamp_bits, F64, HAS_CLAMP, UN_NORM, CENTER)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y, mask=ok)


def clamp_bound(clamp_value, un_norm, dtype) -> float:
    """The bound the kernel clamps with (0.0 without a clamp). ``un_norm`` clamps a half tensor in its own precision,
    to the bound ``torch.clamp`` rounds to that precision: rounded here, as torch rounds it (Triton's interpreter
    truncates float32 -> bfloat16 conversions), so that the kernel's rounding of the clamped values is exact."""
    if clamp_value is None:
        return 0.0
    if un_norm and dtype in (torch.float16, torch.bfloat16):
        return _rounded_bound(float(clamp_value), dtype)
    return clamp_value


@functools.lru_cache(maxsize=64)
def _rounded_bound(clamp_value: float, dtype: torch.dtype) -> float:
    # (on the CPU whatever the default device: no device sync)
    return torch.full((), math.inf, dtype=dtype, device="cpu").clamp(max=clamp_value).item()


def launch_args(x, mean, var, epsilon, clamp_value, un_norm, center, out):
    num_rows, num_features = x.shape
    check_features(num_features)
    target = TILE_ELEMENTS if compiled_for(x.device) else INTERPRET_TILE_ELEMENTS
    block_d = min(triton.next_power_of_2(max(1, num_features)), MAX_BLOCK_D)
    block_r = max(1, min(target // block_d, triton.next_power_of_2(max(1, num_rows))))
    grid = (triton.cdiv(num_rows, block_r), triton.cdiv(num_features, block_d))
    args = (
        x, mean, var, out, num_rows, num_features, x.stride(0), out.stride(0),
        f64_bits(epsilon), f64_bits(clamp_bound(clamp_value, un_norm, x.dtype)),
    )
    meta = dict(
        F64=compute_is_f64(x.dtype), HAS_CLAMP=clamp_value is not None, UN_NORM=bool(un_norm),
        CENTER=bool(center), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps_for(block_r * block_d),
        enable_fp_fusion=False,
    )
    return _normalize_kernel, grid, args, meta


def launch(x, mean, var, epsilon, clamp_value, un_norm, center, out) -> None:
    """Write ``reference.normalize(x, mean, var, ...)`` into ``out`` (``[B, D]``, dtype promote(x, float32))."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        return
    kernel, grid, args, meta = launch_args(x, mean, var, epsilon, clamp_value, un_norm, center, out)
    with device_guard(x):
        kernel[grid](*args, **meta)
