"""Reduce ``K`` partial moments and fold them into the running statistics, in one launch.

Programs own column tiles of ``D``. Each reduces the ``K`` parts of its columns in float64 with a fixed-order
two-pass form of Chan's merge (exactly equivalent algebraically, and deterministic: the same reduction tree
every call): ``n = sum n_k``, ``mean = c + sum n_k (mean_k - c) / n`` with ``c`` the mean of part 0, and
``m2 = sum m2_k + n_k (mean_k - mean)^2``. A single part therefore passes through bit for bit. The result
is then folded into ``mean``/``var`` (float64 ``[D]``) with the same float64 operations, in the same order, as
:func:`protonorm.reference.merge_into_running` (Welford, or EMA), and the kernels are compiled without FMA
contraction so that the fold matches it exactly.

``count`` and ``dropped`` are read by every program (the Welford weights need ``count``) but written once:
when several programs run, each takes a ticket from an int32 counter after its reads and stores, and the
program that draws the last ticket writes ``count``/``dropped`` and resets the counter to zero for the next
launch. With ``FOLD=False`` the kernel only combines: it writes one ``[1, 2 + 2D]`` part.
"""

import torch
import triton
import triton.language as tl

from .moments import check_features, compiled_for, device_guard, f64_bits, from_f64_bits, num_warps_for, sm_count

MAX_BLOCK_M = 256
MIN_BLOCK_M = 16
BLOCK_ELEMENTS = 2048
INTERPRET_MAX_BLOCK_M = 1 << 14


@triton.jit(do_not_specialize=["decay_bits"])
def _merge_kernel(
    parts_ptr, mean_ptr, var_ptr, count_ptr, dropped_ptr, out_ptr, ticket_ptr,
    K, D, stride_p,
    decay_bits: tl.int64,
    FOLD: tl.constexpr, EMA: tl.constexpr, MULTI_PROGRAM: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < D
    # Shift by part 0's mean: exact for a single part, and large offsets do not cancel.
    n0 = tl.load(parts_ptr)
    shift = tl.load(parts_ptr + 2 + cols, mask=col_ok, other=0.0)
    shift = tl.where(n0 > 0.0, shift, 0.0)

    n_b = tl.full([], 0.0, tl.float64)
    dropped_b = tl.full([], 0.0, tl.float64)
    weighted = tl.zeros([BLOCK_M], dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < K
        n_k = tl.load(parts_ptr + ks * stride_p, mask=k_ok, other=0.0)
        n_b += tl.sum(n_k, axis=0)
        dropped_b += tl.sum(tl.load(parts_ptr + ks * stride_p + 1, mask=k_ok, other=0.0), axis=0)
        has = (n_k > 0.0)[:, None] & col_ok[None, :]
        mean_k = tl.load(parts_ptr + ks[:, None] * stride_p + 2 + cols[None, :], mask=has, other=0.0)
        weighted += tl.sum(tl.where(has, n_k[:, None] * (mean_k - shift[None, :]), 0.0), axis=0)
    safe_b = tl.where(n_b > 0.0, n_b, 1.0)
    mean_b = shift + weighted / safe_b

    m2_b = tl.zeros([BLOCK_M], dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < K
        n_k = tl.load(parts_ptr + ks * stride_p, mask=k_ok, other=0.0)
        has = (n_k > 0.0)[:, None] & col_ok[None, :]
        mean_k = tl.load(parts_ptr + ks[:, None] * stride_p + 2 + cols[None, :], mask=has, other=0.0)
        m2_k = tl.load(parts_ptr + ks[:, None] * stride_p + 2 + D + cols[None, :], mask=has, other=0.0)
        dev = mean_k - mean_b[None, :]
        m2_b += tl.sum(tl.where(has, m2_k + n_k[:, None] * (dev * dev), 0.0), axis=0)

    if FOLD:
        old_mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        old_var = tl.load(var_ptr + cols, mask=col_ok, other=1.0)
        count = tl.load(count_ptr)
        if EMA:
            decay = from_f64_bits(decay_bits)
            batch_var = m2_b / safe_b
            new_mean = decay * old_mean + (1.0 - decay) * mean_b
            new_var = decay * old_var + (1.0 - decay) * batch_var
        else:
            n_a = count.to(tl.float64)
            n = n_a + n_b
            safe_n = tl.where(n > 0.0, n, 1.0)
            delta = mean_b - old_mean
            new_mean = old_mean + delta * (n_b / safe_n)
            weight = n_a * n_b / safe_n  # 0 for an empty side, which adds nothing (even where delta * delta is inf)
            m2 = old_var * n_a + m2_b + tl.where(weight > 0.0, delta * delta * weight, 0.0)
            new_var = m2 / safe_n
            new_var = tl.where(new_var < 0.0, 0.0, new_var)
        has_rows = n_b > 0.0
        tl.store(mean_ptr + cols, tl.where(has_rows, new_mean, old_mean), mask=col_ok)
        tl.store(var_ptr + cols, tl.where(has_rows, new_var, old_var), mask=col_ok)
        new_count = count  # EMA leaves count alone
        if not EMA:
            new_count = count + n_b.to(tl.int64)
        new_dropped = tl.load(dropped_ptr) + dropped_b.to(tl.int64)
        if MULTI_PROGRAM:
            tl.debug_barrier()  # every thread's read of count precedes the ticket
            ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
            if ticket == tl.num_programs(0) - 1:
                tl.store(count_ptr, new_count)
                tl.store(dropped_ptr, new_dropped)
                tl.store(ticket_ptr, 0)
        else:
            tl.store(count_ptr, new_count)
            tl.store(dropped_ptr, new_dropped)
    else:
        tl.store(out_ptr + 2 + cols, mean_b, mask=col_ok)
        tl.store(out_ptr + 2 + D + cols, m2_b, mask=col_ok)
        tl.store(out_ptr, n_b, mask=pid == 0)
        tl.store(out_ptr + 1, dropped_b, mask=pid == 0)


def _plan(num_parts: int, num_features: int, device: torch.device):
    """``(BLOCK_K, BLOCK_M, programs)``: spread the columns over about one program per SM."""
    check_features(num_features)
    full = triton.next_power_of_2(max(1, num_features))
    if compiled_for(device):
        per_sm = triton.next_power_of_2(triton.cdiv(num_features, sm_count(device)))
        block_m = min(full, max(MIN_BLOCK_M, min(MAX_BLOCK_M, per_sm)))
        block_k = max(1, min(triton.next_power_of_2(max(1, num_parts)), max(1, BLOCK_ELEMENTS // block_m)))
    else:  # interpreted: few, large programs
        block_m = min(full, INTERPRET_MAX_BLOCK_M)
        block_k = triton.next_power_of_2(max(1, num_parts))
    return block_k, block_m, triton.cdiv(max(1, num_features), block_m)


def launch_args(parts, mean, var, count, dropped, ema_decay, ticket, out=None):
    """``(kernel, grid, args, meta)``: fold (``out`` None) or combine into ``out`` ``[1, W]``."""
    num_parts, width = parts.shape
    num_features = (width - 2) // 2
    block_k, block_m, programs = _plan(num_parts, num_features, parts.device)
    fold = out is None
    placeholder = parts  # pointer arguments a mode does not touch
    args = (
        parts,
        mean if fold else placeholder, var if fold else placeholder,
        count if fold else placeholder, dropped if fold else placeholder,
        placeholder if fold else out,
        ticket if ticket is not None else placeholder,
        num_parts, num_features, parts.stride(0),
        f64_bits(ema_decay if ema_decay is not None else 0.0),
    )
    meta = dict(
        FOLD=fold, EMA=ema_decay is not None, MULTI_PROGRAM=fold and programs > 1,
        BLOCK_K=block_k, BLOCK_M=block_m, num_warps=num_warps_for(block_k * block_m),
        enable_fp_fusion=False,
    )
    return _merge_kernel, (programs,), args, meta


def needs_ticket(parts: torch.Tensor) -> bool:
    """Whether folding ``parts`` runs several programs (and so needs an int32 ticket counter, zeroed once)."""
    num_parts, width = parts.shape
    return _plan(num_parts, (width - 2) // 2, parts.device)[2] > 1


def launch_fold(parts, mean, var, count, dropped, ema_decay, ticket) -> None:
    """Merge ``parts`` into ``mean``/``var``/``count``/``dropped`` in place (``ticket``: see :func:`needs_ticket`)."""
    kernel, grid, args, meta = launch_args(parts, mean, var, count, dropped, ema_decay, ticket)
    with device_guard(parts):
        kernel[grid](*args, **meta)


def launch_combine(parts, out) -> None:
    """Reduce ``parts`` ``[K, W]`` into ``out`` ``[1, W]``."""
    kernel, grid, args, meta = launch_args(parts, None, None, None, None, None, None, out=out)
    with device_guard(parts):
        kernel[grid](*args, **meta)
