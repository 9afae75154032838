"""Merging running statistics across ranks: per-call and deferred sync.

A normalizer whose ``fabric`` spans more than one rank calls :func:`fold_parts` instead of merging its batch
moments locally. Two modes (the module's ``sync`` attribute):

* ``"per_call"``: every ``record_moments`` / ``record_reward`` merges every rank's batch with one tensor
  collective and no host read. Each rank reduces its parts to one ``[1, 2 + 2D]`` part; the parts are either
  all-gathered and merged in rank order (exact, identical on every rank by construction) or, past
  :data:`ALL_GATHER_MAX_WORLD` ranks, all-reduced as sums shifted by the previous merged batch mean, which
  every rank shares (constant bytes in the world size; the first call after a reset gathers instead).
  ``PROTONORM_SYNC_REDUCE`` = ``auto`` | ``all_gather`` | ``all_reduce`` overrides the choice; it must be set
  identically on every rank.
* ``"deferred"``: records merge locally and are remembered; :func:`sync` at a point every rank reaches merges
  every deferred normalizer of a module tree with two collectives (the tree's layout, then the moments). Only
  what was recorded since the previous sync travels, on top of statistics every rank shares, so history is
  never counted twice.

``fabric`` may be a Lightning ``Fabric`` (its collectives are bypassed for ``torch.distributed`` on the default
group when that is initialized: ``Fabric.all_gather`` costs a barrier, a size exchange and a host read), a
``torch.distributed`` ``ProcessGroup``, the string ``"default"`` or the ``torch.distributed`` module (the
default group), or any object with ``world_size``, ``global_rank`` and ``all_gather(tensor)`` returning a
stacked ``[world, ...]`` tensor or a list of tensors. docs/DISTRIBUTED.md states the protocol and its costs.
"""
from __future__ import annotations

import itertools
import os
import sys
import types
import zlib
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from . import reference
from .backends.base import outside_inference_mode

REDUCE_ENV_VAR = "PROTONORM_SYNC_REDUCE"
REDUCE_CHOICES = ("auto", "all_gather", "all_reduce")
# Up to this many ranks the per-call all_gather costs about as much as an all_reduce (see the cost model in
# docs/DISTRIBUTED.md) and is exact; beyond it the all_gather's bytes and ring latency grow with every rank.
ALL_GATHER_MAX_WORLD = 16

_NOT_A_GROUP = object()


# --------------------------------------------------------------------------------------------- communicators
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def _is_lightning_fabric(fabric) -> bool:
    for name in ("lightning.fabric", "lightning_fabric"):
        module = sys.modules.get(name)
        if module is not None and isinstance(fabric, getattr(module, "Fabric", ())):
            return True
    return False


def _torch_group(fabric):
    """The ``torch.distributed`` group ``fabric`` stands for (None = the default group), or ``_NOT_A_GROUP``."""
    dist = _dist()
    if dist is None:
        if isinstance(fabric, str):
            raise ValueError("fabric='default' needs torch.distributed, which this torch build lacks")
        return _NOT_A_GROUP
    if isinstance(fabric, dist.ProcessGroup):
        return fabric
    if isinstance(fabric, str):
        if fabric != "default":
            raise ValueError(f"fabric: expected 'default' (the default process group) or an object, got {fabric!r}")
        return None
    if fabric is dist:
        return None
    # A Fabric's DDP-family strategies run on the default group; talk to it directly.
    if _is_lightning_fabric(fabric) and dist.is_initialized() and dist.get_world_size() == fabric.world_size:
        return None
    return _NOT_A_GROUP


def is_group_handle(fabric) -> bool:
    """Whether ``fabric`` is a ``torch.distributed`` process group or the module itself: a handle to the
    process's communicator, which a copied normalizer shares (neither can be copied)."""
    dist = _dist()
    return isinstance(fabric, types.ModuleType) or (dist is not None and isinstance(fabric, dist.ProcessGroup))


def check_fabric(fabric):
    """``fabric`` if it is one of the communicators the module docstring lists, else a TypeError or ValueError
    naming what came: checked when a normalizer is built or its ``fabric`` assigned, not at the first record,
    where a lazy module would already have taken its shape (``RunningMeanStd((342,))`` passes the shape as
    upstream's first argument, ``fabric``)."""
    if fabric is None or _torch_group(fabric) is not _NOT_A_GROUP:
        return fabric
    missing = [name for name in ("world_size", "global_rank", "all_gather") if not hasattr(fabric, name)]
    if missing:
        raise TypeError(
            "fabric: expected None, a Lightning Fabric, a torch.distributed ProcessGroup, 'default', or an object "
            f"with world_size, global_rank and all_gather; got {type(fabric).__name__} without "
            f"{', '.join(missing)}"
        )
    return fabric


def world_size(fabric) -> int:
    """Number of ranks ``fabric`` spans (1 for None or an uninitialized default group)."""
    if fabric is None:
        return 1
    group = _torch_group(fabric)
    if group is not _NOT_A_GROUP:
        dist = _dist()
        return dist.get_world_size(group) if dist.is_initialized() else 1
    try:
        return int(fabric.world_size)
    except AttributeError:
        check_fabric(fabric)  # raises, naming what the object lacks (a fabric passed to sync() comes unchecked)
        raise


def rank(fabric) -> int:
    """This process's rank in ``fabric`` (0 for None or an uninitialized default group)."""
    if fabric is None:
        return 0
    group = _torch_group(fabric)
    if group is not _NOT_A_GROUP:
        dist = _dist()
        return dist.get_rank(group) if dist.is_initialized() else 0
    return int(fabric.global_rank)


def _all_gather(fabric, tensor: Tensor, world: int) -> Tensor:
    """``[world, *tensor.shape]``: every rank's ``tensor``, in rank order. One collective."""
    tensor = tensor.contiguous()
    group = _torch_group(fabric)
    if group is not _NOT_A_GROUP:
        dist = _dist()
        shape = (world,) + tuple(tensor.shape)
        out = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather_single(out.view((world * tensor.shape[0],) + tuple(tensor.shape[1:])), tensor, group=group)
        return out
    gathered = fabric.all_gather(tensor)
    if isinstance(gathered, (list, tuple)):
        gathered = torch.stack(list(gathered))
    if not isinstance(gathered, Tensor) or gathered.numel() != world * tensor.numel():
        raise TypeError(
            f"fabric.all_gather: expected a [{world}, *{tuple(tensor.shape)}] tensor or a list of {world} tensors, "
            f"got {type(gathered).__name__} {tuple(getattr(gathered, 'shape', ()))}"
        )
    if gathered.dtype != tensor.dtype:
        # Checked before anything is merged: moments rounded on the way would be merged silently by some backends
        # and refused by others halfway through a merge.
        raise TypeError(f"fabric.all_gather: expected the gathered tensor in {tensor.dtype} like the one sent, "
                        f"got {gathered.dtype}")
    return gathered.reshape((world,) + tuple(tensor.shape)).to(tensor.device)


def _all_reduce_sum(fabric, tensor: Tensor, world: int) -> Tensor:
    """Elementwise sum over ranks (same result on every rank). One collective."""
    group = _torch_group(fabric)
    if group is not _NOT_A_GROUP:
        tensor = tensor.contiguous()
        _dist().all_reduce(tensor, group=group)
        return tensor
    # Duck-typed fabrics promise only all_gather; a fixed-order sum over it is identical on every rank.
    return _all_gather(fabric, tensor, world).sum(dim=0)


def reduce_method(world: int) -> str:
    """``"all_gather"`` or ``"all_reduce"``: how a per-call sync over ``world`` ranks travels."""
    choice = os.environ.get(REDUCE_ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in REDUCE_CHOICES:
        raise ValueError(f"environment variable {REDUCE_ENV_VAR} must be one of {REDUCE_CHOICES}, got {choice!r}")
    if choice == "auto":
        return "all_gather" if world <= ALL_GATHER_MAX_WORLD else "all_reduce"
    return choice


# --------------------------------------------------------------------------------------------- per-call sync
class _PerCallState:
    """The shift of the all_reduce path: the last merged batch mean, identical on every rank."""

    __slots__ = ("shift",)

    def __init__(self, shift: Tensor):
        self.shift = shift


def fold_parts(module, parts: Tensor, backend, check: Optional[Callable[[Tensor], None]]) -> None:
    """Merge this rank's ``parts`` (and, per call, every other rank's) into ``module``'s statistics.

    ``check`` (None or a callable raising on dropped non-finite rows) sees the parts that will be merged: every
    rank's in per-call mode, so all ranks raise together; this rank's in deferred mode, where nothing waits on
    a collective. Called by the normalizers when their ``fabric`` spans more than one rank, and for every deferred
    record, and every record while rows are owed, whatever the fabric (it may be assigned later).
    """
    fabric = module.fabric
    if module.sync == "deferred" or (isinstance(module._sync_state, _DeferredState) and world_size(fabric) <= 1):
        # A per-call record that reaches no other rank while this rank owes them rows (switched from deferred
        # before the distributed fabric came) joins those rows: merged apart, it would be lost to the stale base.
        _record_deferred(module, parts, backend, check)
        return
    world = world_size(fabric)
    local = backend.combine(parts)
    owed = None
    if isinstance(module._sync_state, _DeferredState):
        # Switched from deferred mode since the last sync: this rank's statistics hold rows the other ranks have
        # not seen. They travel with this batch, and the merge starts from the synced base every rank shares.
        owed = _deferred_state(module)
        local = backend.combine(torch.cat([owed.pending, local]))
    method = reduce_method(world)
    if method == "all_reduce" and isinstance(module._sync_state, _PerCallState):
        merged, new_state = _all_reduce_shifted(module._sync_state, fabric, local, world)
    else:
        merged = _all_gather(fabric, local, world).reshape(world, local.shape[-1])
        new_state = None
        if method == "all_reduce":
            # No shift is shared yet (first call, or the statistics were reset): this call gathers, which is
            # exact, and leaves its merged batch mean as the shift of the all_reduces that follow. Which branch
            # runs depends only on the sequence of calls, the same on every rank.
            n, _, batch_mean, _ = reference.split_parts(backend.combine(merged))
            shared_mean = module._flat_stats()[0] if owed is None else owed.mean
            new_state = _PerCallState(torch.where(n > 0, batch_mean[0], shared_mean))
    if check is not None:
        check(merged)  # a refused record changes nothing, the shift of the all_reduces that follow included
    mean, var, count, dropped = module._flat_stats()
    if owed is not None:
        for stat, synced in zip((mean, var, count, dropped), (owed.mean, owed.var, owed.count, owed.dropped)):
            stat.copy_(synced)
    module._sync_state = new_state
    backend.merge(merged, mean, var, count, dropped, module.ema_decay)


def _all_reduce_shifted(state: _PerCallState, fabric, local: Tensor, world: int) -> Tuple[Tensor, _PerCallState]:
    """All ranks' moments as one ``[1, W]`` part, from one all_reduce of sums shifted by a shared reference, and the
    state holding the next call's shift.

    Sums of ``x - c`` and ``(x - c)^2`` lose ``eps * (mean - c)^2 / var`` relative accuracy to cancellation, so
    ``c`` is the previous merged batch mean: equal on every rank and, for a stream of batches, close to the next
    batch's mean.
    """
    shift = state.shift.to(local.device)
    n, dropped, mean, m2 = reference.split_parts(local)
    has_rows = n[:, None] > 0
    delta = torch.where(has_rows, mean - shift, torch.zeros_like(mean))
    sums = torch.cat([n, dropped, (n[:, None] * delta)[0], (m2 + n[:, None] * delta * delta)[0]])
    sums = _all_reduce_sum(fabric, sums, world)
    d = mean.shape[1]
    total, total_dropped, s1, s2 = sums[0:1], sums[1:2], sums[2 : 2 + d], sums[2 + d :]
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    batch_mean = shift + s1 / safe_total
    batch_m2 = (s2 - s1 * s1 / safe_total).clamp(min=0.0)
    merged = reference.pack_parts(total, total_dropped, batch_mean, batch_m2)
    return merged, _PerCallState(torch.where(total > 0, batch_mean, shift))


# --------------------------------------------------------------------------------------------- deferred sync
class _DeferredState:
    """Statistics as of the last sync (identical on every rank), the local moments recorded since, and, in EMA
    mode, this rank's own EMA statistics (``own``: mean, var, count, dropped)."""

    __slots__ = ("mean", "var", "count", "dropped", "pending", "own")

    def __init__(self, mean: Tensor, var: Tensor, count: Tensor, dropped: Tensor, ema: bool):
        self.mean, self.var, self.count, self.dropped = _copies(mean, var, count, dropped)
        self.pending = outside_inference_mode(lambda: torch.zeros(
            (1, reference.parts_width(mean.numel())), dtype=torch.float64, device=mean.device))
        # The EMA movement a sync sends is taken from this copy rather than the module's buffers: whatever rewrites
        # the buffers between syncs (DistributedDataParallel broadcasts rank 0's before every forward) would
        # otherwise replace this rank's movement with another's. Welford sends `pending`, kept apart already.
        self.own = _copies(mean, var, count, dropped) if ema else None

    def move(self, device: torch.device) -> None:
        for name in ("mean", "var", "count", "dropped", "pending"):
            setattr(self, name, getattr(self, name).to(device))
        if self.own is not None:
            self.own = tuple(t.to(device) for t in self.own)


def _copies(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """Clones that are normal tensors even when made under torch.inference_mode() (a record or a sync in a rollout):
    the deferred state is updated in place by the records and update_from_moments made outside it."""
    return outside_inference_mode(lambda: tuple(t.clone() for t in tensors))


def _deferred_state(module) -> _DeferredState:
    """The module's deferred-sync state; a missing one starts from the current statistics, which every rank
    shares at construction, after ``load_state_dict`` and after each sync."""
    state = module._sync_state
    mean, var, count, dropped = module._flat_stats()
    if not isinstance(state, _DeferredState) or state.mean.shape != mean.shape:
        state = _DeferredState(mean, var, count, dropped, module.ema_decay is not None)
        module._sync_state = state
    elif state.mean.device != mean.device:  # the module moved: its unsynced records move with it
        outside_inference_mode(lambda: state.move(mean.device))
    if (state.own is None) != (module.ema_decay is None):  # ema_decay was assigned since: the mode's own record
        state.own = _copies(mean, var, count, dropped) if module.ema_decay is not None else None
    return state


def merge_into_base(module, parts: Tensor, merge) -> None:
    """Merge ``parts``, moments every rank adds alike (``update_from_moments``), into the synced base of a deferred
    normalizer, as they were into its statistics: the base stays what every rank shares."""
    state = _deferred_state(module)
    merge(parts, state.mean, state.var, state.count, state.dropped, module.ema_decay)
    if state.own is not None:
        merge(parts, *state.own, module.ema_decay)


def _record_deferred(module, parts: Tensor, backend, check) -> None:
    if check is not None:
        check(parts)
    state = _deferred_state(module)
    local = backend.combine(parts)
    state.pending = backend.combine(torch.cat([state.pending, local]))
    mean, var, count, dropped = module._flat_stats()
    backend.merge(parts, mean, var, count, dropped, module.ema_decay)
    if state.own is not None:
        backend.merge(parts, *state.own, module.ema_decay)


def _deferred_normalizers(module_tree) -> List[Tuple[str, object]]:
    from .normalizer import RunningMeanStd

    if isinstance(module_tree, RunningMeanStd):
        return [("", module_tree)] if module_tree.sync == "deferred" else []
    if not isinstance(module_tree, torch.nn.Module):
        raise TypeError(f"sync: expected an nn.Module, got {type(module_tree).__name__}")
    return [
        (name, m) for name, m in module_tree.named_modules() if isinstance(m, RunningMeanStd) and m.sync == "deferred"
    ]


def _layout_signature(entries, untracked=frozenset()) -> float:
    """A number naming the tree's deferred normalizers (name, feature count, mode, whether the fabric is
    missing), exact in float64."""
    text = ";".join(
        f"{name}:{module.num_features if module._initialized else -1}:{'ema' if module.ema_decay is not None else 'w'}"
        + (":local" if name in untracked else "")
        for name, module in entries
    )
    return float(zlib.crc32(text.encode()))


@torch.no_grad()
def sync(module_tree, fabric=None) -> None:
    """Merge what every rank recorded since the last sync into every ``sync="deferred"`` normalizer of
    ``module_tree``, with two all_gathers (a layout signature, then the moments); afterwards their statistics are
    identical on every rank.

    Call it at a point every rank reaches (e.g. after each rollout). ``fabric`` defaults to the normalizers'
    own. Welford statistics become exactly those of one process that recorded every rank's batches; EMA
    statistics become the row-weighted average of the ranks' EMA states (docs/DISTRIBUTED.md). A tree that
    differs between ranks raises ``ValueError`` on every rank (with ``fabric`` given, also where some ranks' trees
    hold no deferred normalizer). This reads one value on the host (the layout check); it is meant for boundaries,
    not the hot path. A no-op on a single process.
    """
    check_fabric(fabric)
    entries = _deferred_normalizers(module_tree)
    if fabric is None:
        fabrics = {id(m.fabric): m.fabric for _, m in entries if m.fabric is not None}
        if len(fabrics) > 1:
            raise ValueError("sync: the deferred normalizers hold different fabrics; pass fabric= explicitly")
        if not fabrics:
            return
        (fabric,) = fabrics.values()
    world = world_size(fabric)
    if world <= 1:
        return
    # A tree without deferred normalizers goes on too when fabric= is given: ranks whose trees hold some (sync=
    # switched on some ranks only) would otherwise wait in the layout check for good. All raise there instead.
    untracked = [name for name, m in entries if m.fabric is None or world_size(m.fabric) <= 1]
    live = [(name, m) for name, m in entries if m._initialized]
    device = _sync_device(fabric, module_tree, entries, live)
    # First every rank's layout signature (fixed size), so that ranks whose trees differ, in size or in which
    # normalizers lack the fabric too, all raise before anything of a size that differs between them is sent.
    size = sum(reference.parts_width(m.num_features) for _, m in live)
    signature = torch.tensor([_layout_signature(entries, set(untracked)), float(size)],
                             dtype=torch.float64, device=device)
    _check_layouts(_all_gather(fabric, signature, world), signature, world)
    if untracked:
        name = untracked[0]
        fabric_held = dict(entries)[name].fabric
        raise ValueError(
            f"sync: normalizer {name or '<root>'!r} has sync='deferred' but fabric={fabric_held!r}, which does not "
            "span the ranks; give it the distributed fabric (the rows it recorded so far wait for its next sync)"
        )
    if not live:
        return
    rows, states = [], []
    for _, module in live:
        state = _deferred_state(module)
        states.append(state)
        rows.append(_outgoing_row(state).reshape(-1).to(device))
    gathered = _all_gather(fabric, torch.cat(rows), world)
    offset = 0
    for (_, module), state in zip(live, states):
        width = reference.parts_width(module.num_features)
        incoming = gathered[:, offset : offset + width].to(module.mean.device).contiguous()
        offset += width
        _apply_incoming(module, state, incoming)


def _sync_device(fabric, module_tree, entries, live) -> torch.device:
    """Where the sync's tensors travel: the first initialized normalizer's device; with none initialized, the device
    a lazy one was moved to, else the fabric's (a Lightning Fabric's), else that of the tree's first parameter or
    buffer, else the CPU. NCCL takes no CPU tensor."""
    if live:
        return live[0][1].mean.device
    moved = [m._lazy_device for _, m in entries if m._lazy_device is not None]
    if moved:
        return moved[0]
    device = getattr(fabric, "device", None)
    if isinstance(device, torch.device):
        return device
    for tensor in itertools.chain(module_tree.parameters(), module_tree.buffers()):
        return tensor.device
    return torch.device("cpu")


def _outgoing_row(state: _DeferredState) -> Tensor:
    """Welford: the parts recorded since the last sync. EMA: ``[rows, dropped, mean - base mean, var - base
    var]``, this rank's EMA movement since the last sync."""
    if state.own is None:
        return state.pending
    mean, var, _, _ = state.own
    return reference.pack_parts(
        state.pending[0, reference.N_COL], state.pending[0, reference.DROPPED_COL], mean - state.mean, var - state.var
    )


def _apply_incoming(module, state: _DeferredState, incoming: Tensor) -> None:
    mean, var, count, dropped = module._flat_stats()
    new_mean, new_var = state.mean.clone(), state.var.clone()
    new_count, new_dropped = state.count.clone(), state.dropped.clone()
    if module.ema_decay is None:
        backend = module._backend_for(mean)
        backend.merge(incoming, new_mean, new_var, new_count, new_dropped, None)
    else:
        rows, dropped_rows, mean_moves, var_moves = reference.split_parts(incoming)
        total = rows.sum()
        weights = (rows / torch.where(total > 0, total, torch.ones_like(total)))[:, None]
        new_mean += (weights * mean_moves).sum(dim=0)
        new_var += (weights * var_moves).sum(dim=0)
        new_dropped += dropped_rows.sum().to(torch.int64)
    mean.copy_(new_mean)
    var.copy_(new_var)
    count.copy_(new_count)
    dropped.copy_(new_dropped)
    module._sync_state = _DeferredState(mean, var, count, dropped, module.ema_decay is not None)


def _check_layouts(signatures: Tensor, signature: Tensor, world: int) -> None:
    expected = signature.expand(world, signature.numel())
    if torch.equal(signatures, expected):
        return
    bad = [r for r in range(world) if not torch.equal(signatures[r], expected[r])]
    raise ValueError(
        f"sync: the ranks hold different trees of deferred normalizers (ranks {bad} differ from this one in "
        "names, feature shapes, EMA mode, initialization or fabric); every rank must sync the same model"
    )
