"""The pure-torch reference math: batch moments, Chan merge, EMA, normalize / clamp / un_norm.

Every backend must agree with these functions; they are written for clarity, not speed, and they are
what runs under ``torch.jit.trace`` / ONNX export and where no compiled backend is available.

Moments travel between stages as *parts*: a float64 tensor of shape ``[K, 2 + 2 * D]`` whose rows are
independent partial results over disjoint sets of rows of a batch::

    part[0]            n        number of rows that entered the statistics (an exact integer in float64)
    part[1]            dropped  rows left out because they held a NaN or an inf
    part[2 : 2+D]      mean     per-feature mean of those rows
    part[2+D : 2+2D]   m2       per-feature sum of squared deviations from that mean

A part with ``n == 0`` is the neutral element. Parts are merged with Chan et al.'s pairwise formula.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

N_COL = 0
DROPPED_COL = 1
HEADER = 2


def parts_width(num_features: int) -> int:
    return HEADER + 2 * num_features


def split_parts(parts: Tensor):
    """View ``parts`` as ``(n [K], dropped [K], mean [K, D], m2 [K, D])``."""
    d = (parts.shape[-1] - HEADER) // 2
    return parts[:, N_COL], parts[:, DROPPED_COL], parts[:, HEADER : HEADER + d], parts[:, HEADER + d :]


def pack_parts(n: Tensor, dropped: Tensor, mean: Tensor, m2: Tensor) -> Tensor:
    """Pack 1-row moments (``n``/``dropped`` 0-d or [1], ``mean``/``m2`` [D]) into a ``[1, 2 + 2D]`` part."""
    return torch.cat([_f64(n.reshape(1)), _f64(dropped.reshape(1)), _f64(mean.reshape(-1)), _f64(m2.reshape(-1))]
                     ).unsqueeze(0)


def _f64(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.to(torch.float64)  # a no-op .to() still costs an op call


def batch_moments(x: Tensor, mask: Optional[Tensor] = None, rows_per_part: Optional[int] = None) -> Tensor:
    """Moments over dim 0 of a ``[B, D]`` batch, as one part, or as one part per ``rows_per_part`` rows.

    Rows whose ``mask`` entry is False are ignored; rows holding a non-finite value are left out and
    counted in ``dropped``. Accumulation is in float64 whatever the input dtype, with a two-pass
    variance of the deviations from the part's first valid row (as the kernels shift theirs), so large
    offsets lose nothing and a constant column has exactly its value as mean and exactly 0 as m2.
    """
    if rows_per_part is not None and x.shape[0] > rows_per_part:
        return torch.cat([
            _moments_part(x[i : i + rows_per_part], None if mask is None else mask.reshape(-1)[i : i + rows_per_part])
            for i in range(0, x.shape[0], rows_per_part)
        ])
    return _moments_part(x, mask)


def _moments_part(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    xf = x.to(torch.float64)
    finite = torch.isfinite(xf).all(dim=1)
    if mask is None:
        valid, dropped = finite, (~finite).sum()
    else:
        considered = mask.reshape(-1).to(torch.bool)
        valid, dropped = finite & considered, (considered & ~finite).sum()
    n = valid.sum().to(torch.float64)
    # Deviations from the first valid row (argmax gives the first True; with none, a shift of 0 that nothing
    # uses; index_select, as indexing with a 0-d tensor would read it on the host). Summing x itself would round
    # at the offset's scale, and leave a constant column a mean an ulp off its value and an m2 of n squared ulps.
    if x.shape[0] > 0:
        first = valid.to(torch.uint8).argmax().reshape(1)
        shift = torch.where(valid.index_select(0, first), xf.index_select(0, first)[0], 0.0)
    else:
        shift = xf.new_zeros(xf.shape[1:])
    shifted = torch.where(valid[:, None], xf - shift, 0.0)
    centered = shifted.sum(dim=0) / n.clamp(min=1.0)
    dev = torch.where(valid[:, None], shifted - centered, 0.0)
    m2 = (dev * dev).sum(dim=0)
    return pack_parts(n, dropped, shift + centered, m2)


def chan_merge(n_a: Tensor, mean_a: Tensor, m2_a: Tensor, n_b: Tensor, mean_b: Tensor, m2_b: Tensor):
    """Merge two sets of moments (float64). Either side may be empty (n == 0) and then adds nothing, also where the
    means differ by more than the square root of float64's range (the cross term's inf times a zero weight is NaN)."""
    n = n_a + n_b
    safe_n = torch.where(n > 0, n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe_n)
    weight = n_a * n_b / safe_n
    m2 = m2_a + m2_b + torch.where(weight > 0, delta * delta * weight, 0.0)
    return n, mean, m2


def combine_parts(parts: Tensor) -> Tensor:
    """Reduce ``[K, W]`` parts to one ``[1, W]`` part, pairwise in a fixed tree: at each level part ``2i`` merges
    with part ``2i + 1`` (all pairs of a level at once) and an odd last part moves up unchanged."""
    n, dropped, mean, m2 = split_parts(parts)
    n = n[:, None]
    while n.shape[0] > 1:
        paired = n.shape[0] // 2 * 2
        merged = chan_merge(n[0:paired:2], mean[0:paired:2], m2[0:paired:2],
                            n[1:paired:2], mean[1:paired:2], m2[1:paired:2])
        if paired < n.shape[0]:
            merged = [torch.cat([m, t[paired:]]) for m, t in zip(merged, (n, mean, m2))]
        n, mean, m2 = merged
    return pack_parts(n[0, 0], dropped.sum(), mean[0], m2[0])


def merge_into_running(
    parts: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    dropped: Tensor,
    ema_decay: Optional[float],
) -> None:
    """Fold ``parts`` into the running statistics, in place.

    ``mean``/``var`` are float64 ``[D]``, ``count`` and ``dropped`` int64 0-d. Welford mode (``ema_decay``
    None) merges with Chan's formula and adds the batch count exactly; EMA mode moves mean and var towards
    the batch mean and the batch's population variance and leaves ``count`` alone. A batch with no valid
    row leaves the statistics bit-for-bit unchanged.
    """
    n_b, dropped_b, mean_b, m2_b = split_parts(parts if parts.shape[0] == 1 else combine_parts(parts))
    n_b, dropped_b, mean_b, m2_b = n_b[0], dropped_b[0], mean_b[0], m2_b[0]
    has_rows = n_b > 0
    if ema_decay is not None:
        d = float(ema_decay)
        batch_var = m2_b / n_b.clamp(min=1.0)
        new_mean = d * mean + (1.0 - d) * mean_b
        new_var = d * var + (1.0 - d) * batch_var
    else:
        n_a = count.to(torch.float64)
        n, new_mean, m2 = chan_merge(n_a, mean, var * n_a, n_b, mean_b, m2_b)
        new_var = (m2 / torch.where(n > 0, n, 1.0)).clamp(min=0.0)
        count.add_(n_b.to(torch.int64))
    mean.copy_(torch.where(has_rows, new_mean, mean))
    var.copy_(torch.where(has_rows, new_var, var))
    dropped.add_(dropped_b.to(torch.int64))


def _clamp(x: Tensor, clamp_value: Optional[float]) -> Tensor:
    # torch.clamp keeps NaN as NaN, which is what every backend must do too.
    return x if clamp_value is None else torch.clamp(x, -clamp_value, clamp_value)


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    epsilon: float,
    clamp_value: Optional[float],
    un_norm: bool = False,
    center: bool = True,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``clamp((x - mean) / sqrt(var + eps))`` with the statistics rounded to float32 first, as upstream.

    ``un_norm`` clamps ``x`` first, then maps back: ``x * sqrt(var + eps) + mean``. ``center=False`` is the
    reward normalizer's scale-only variant (no mean shift either way). Broadcasts like upstream; the result
    dtype is ``promote_types(x.dtype, float32)``. With ``out`` (that dtype, ``x``'s shape) the result is written
    there, and normalizing writes each step into it instead of a temporary: the same operations, the same bits.
    """
    std = torch.sqrt(var.float() + epsilon)
    if not un_norm and out is not None:
        if center:
            torch.sub(x, mean.float(), out=out).div_(std)
        else:
            torch.div(x, std, out=out)
        return out if clamp_value is None else out.clamp_(-clamp_value, clamp_value)
    if not un_norm:
        y = (x - mean.float()) / std if center else x / std
        y = _clamp(y, clamp_value)
    else:
        y = _clamp(x, clamp_value) * std
        y = y + mean.float() if center else y
    return y if out is None else out.copy_(y)


def discounted_return_update(discounted: Tensor, reward: Tensor, terminated: Tensor, gamma: float) -> Tensor:
    """``discounted * gamma + reward``, restarted at ``reward`` where ``terminated`` is nonzero.

    For finite returns and flags of 0 and 1 this equals upstream's ``discounted * gamma * (1 - terminated) +
    reward``; unlike it, a reset also clears a non-finite return, so one bad reward cannot disable an environment
    forever.
    """
    carried = discounted * gamma
    carried = torch.where(terminated != 0, 0.0, carried)
    return carried + reward
