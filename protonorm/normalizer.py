"""The normalizer modules: drop-ins for ProtoMotions' ``RunningMeanStd`` and ``RewardRunningMeanStd``.

They keep upstream's constructor arguments, buffers (``mean``/``var`` float64, ``count`` int64), state_dict keys,
lazy shape and methods, and add keyword-only extras after upstream's arguments. All arithmetic happens in a backend
(see :mod:`protonorm.backends`), chosen per call from the tensor's device; this file validates input, owns the
buffers and routes calls. Nothing here reads a tensor value on the host, except ``nonfinite="raise"`` and a
hyperparameter given as a one-element tensor (read once, when it is set).
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
import operator
import os
import sys
import threading
import warnings
import weakref
from typing import Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor, nn
from torch.fx import Proxy

from . import backends, distributed, reference
from .backends.base import Backend, normalized_dtype, outside_inference_mode
from .distributed import _DeferredState
from .output_cache import OutputCache

NONFINITE_POLICIES = ("drop", "raise")
_RETURNS_DTYPES = (torch.float32, torch.float64)  # what the discounted returns are kept in, updated in place
SYNC_MODES = ("per_call", "deferred")


def _factory_device() -> torch.device:
    """Where ``torch.zeros(..., device=None)`` puts a tensor. torch.get_default_device() of torch 2.4 to 2.6 does
    not see a ``with torch.device(...)`` block, whose factory calls still make their tensors there."""
    return torch.empty(0).device


def _sees_device_blocks() -> bool:
    with torch.device("meta"):
        return torch.get_default_device().type == "meta"


_default_device = torch.get_default_device if _sees_device_blocks() else _factory_device


def _resolve_default_device(device):
    """Upstream defaults to ``cuda:0``; on a machine without CUDA fall back to the CPU instead of failing. None is
    torch's default device, as upstream's ``torch.zeros(..., device=None)`` takes it."""
    if device is None:
        return _default_device()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"protonorm: device {device!r} requested but CUDA is not available; using the CPU",
                      stacklevel=_caller_stacklevel())
        return "cpu"
    return device


def _moved_to(fn, device: Optional[torch.device]) -> Optional[torch.device]:
    """Where ``fn`` (what ``nn.Module._apply`` maps tensors with) moves a tensor on ``device``; ``device`` itself,
    None included, when ``fn`` moves nothing (a dtype cast, a memory format)."""
    probe = torch.empty(0, device=device or "cpu")
    moved = fn(probe).device
    if device is not None or moved != probe.device:
        return moved
    # CPU in, CPU out: a move to the CPU or none. A tensor without data tells them apart: a cast keeps it on meta,
    # a move to the CPU fails to copy it (or, as to_empty does, makes it there).
    try:
        return None if fn(torch.empty(0, device="meta")).is_meta else moved
    except Exception:
        return moved


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by this function's caller name the first line outside this
    module: the user's, whichever of the constructors here (one calls the other) it passed through."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level


def _onnx_export_flag():
    """``torch.onnx.is_in_onnx_export`` imports two modules on every call (about 1 us); read the same two flags
    directly where this torch has them."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        GLOBALS.in_onnx_export, _flags._is_onnx_exporting  # private: fall back if this torch names them otherwise
    except (ImportError, AttributeError):
        return torch.onnx.is_in_onnx_export
    return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting


_in_onnx_export = None
# The first calls of several threads must not import torch.onnx at once: its submodules import one another, and a
# thread reaching one while another thread is still initializing it gets a partly initialized module (ImportError).
_onnx_flag_lock = threading.Lock()


def _unlock_after_fork() -> None:
    """Another thread of the parent may have held the lock at the fork (it was in its first call): the child would
    get it held, with no thread to release it. The child has only the thread that forked, so a fresh lock is safe."""
    global _onnx_flag_lock
    _onnx_flag_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_unlock_after_fork)


def _is_exporting(compiling: bool) -> bool:
    """Whether a JIT trace or an ONNX export is recording this call; ``compiling`` is ``_is_compiling()``."""
    global _in_onnx_export
    if compiling:  # Dynamo knows the public functions, not the flags behind them
        return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if _is_tracing():
        return True
    if _in_onnx_export is None:
        with _onnx_flag_lock:
            if _in_onnx_export is None:
                _in_onnx_export = _onnx_export_flag()
    return _in_onnx_export()


_is_compiling = torch.compiler.is_compiling  # (itself, not a wrapper: the hot calls ask it several times each)


# torch.jit.is_tracing() minus its is_scripting() check: these methods are never scripted.
_is_tracing = torch._C._is_tracing
_peek_functorch_transform = torch._C._functorch.peek_interpreter_stack


def _is_transformed() -> bool:
    """Whether forward-mode AD (a ``torch.autograd.forward_ad`` dual level) or a ``torch.func`` transform (vmap, jvp,
    grad) is active: a dual tensor's tangent or a vmapped batch dimension means nothing to the kernels, which would
    drop the tangent or fail on a tensor without memory. (Not asked while compiling.)"""
    return _forward_ad._current_level >= 0 or _peek_functorch_transform() is not None


def _without_grad(method):
    """``torch.no_grad()`` around a hot method, minus the context manager's ~2 us per call in eager mode."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return method(*args, **kwargs)
        if _is_compiling():
            with torch.no_grad():
                return method(*args, **kwargs)
        torch._C._set_grad_enabled(False)
        try:
            return method(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(True)

    return wrapper


class _Stash(threading.local):
    """One thread's normalize-then-record state: the moments a training-mode ``normalize`` keeps for the next
    ``record_moments`` of the same tensor (``moments``), and the scratch buffers they are computed in
    (``workspace``). Per thread, so that another thread normalizing with the same module (an evaluation thread
    while the trainer trains) neither writes over the moments this thread is about to record nor takes their
    place."""

    def __init__(self):
        self.moments = None  # (weak reference to the tensor, its version, parts, backend)
        self.workspace: dict = {}


class _Layout:
    """What every hot call needs of the statistics buffers, derived once per set of buffer tensors: reaching a
    buffer through ``nn.Module.__getattr__`` costs about 1 us, and so does each flat view."""

    __slots__ = ("mean", "var", "count", "dropped", "shape", "trailing", "num_features", "flat_mean", "flat_var",
                 "device", "choice", "backend")

    def __init__(self, mean: Tensor, var: Tensor, count: Tensor, dropped: Tensor):
        self.mean, self.var, self.count, self.dropped = mean, var, count, dropped
        self.shape = tuple(self.mean.shape)
        # The dims a normalized input must end with: the shape without its leading 1s, which broadcast. (A loop, not
        # next() with a default, which the Dynamo of torch 2.4 to 2.6 cannot trace: a first call under torch.compile.)
        lead = 0
        while lead < len(self.shape) and self.shape[lead] == 1:
            lead += 1
        self.trailing = self.shape[lead:]
        self.num_features = math.prod(self.shape)
        # The backends take 1-D statistics as they are and others as flat views. A view stays on the memory it was
        # made of, which ``module.mean.data = t`` replaces under the same tensor object: see ``current``.
        self.flat_mean = mean if mean.dim() == 1 else mean.view(-1)
        self.flat_var = var if var.dim() == 1 else var.view(-1)
        self.device = self.mean.device
        self.choice = None  # the backend= choice `backend` was resolved for (None: not resolved yet)
        self.backend = None

    def current(self, buffers: dict) -> bool:
        """Whether ``buffers`` still holds the very tensors this layout was derived from."""
        try:  # (subscripts: a fifth of a microsecond less than four dict.get calls, on every hot call)
            same = (self.mean is buffers["mean"] and self.var is buffers["var"] and self.count is buffers["count"]
                    and self.dropped is buffers["nonfinite_rows"])
        except KeyError:  # a buffer deleted (a failed first call unregisters them)
            return False
        return same and ((self.flat_mean is self.mean and self.flat_var is self.var) or self._views_current())

    def _views_current(self) -> bool:
        """Whether the flat views still lie on the memory of the statistics (not asked inside a trace, which makes a
        layout per call)."""
        return _is_compiling() or (self.flat_mean.data_ptr() == self.mean.data_ptr()
                                   and self.flat_var.data_ptr() == self.var.data_ptr())


class RunningMeanStd(nn.Module):
    """Running mean and variance of a stream of ``[B, *shape]`` batches, with normalize / un-normalize.

    Args (upstream's, same order and defaults):
        fabric: None, a Lightning ``Fabric``, a ``torch.distributed`` process group, or an object with
            ``world_size``, ``global_rank`` and ``all_gather``; with ``world_size > 1`` every rank's batch enters
            the statistics.
        shape: feature shape; None infers it from the first input (``x.shape[1:]``).
        epsilon: added to the variance inside the square root.
        device: where the buffers are created (``cuda:0`` falls back to the CPU when CUDA is absent).
        clamp_value: if set, normalized values are clamped to ``[-clamp_value, clamp_value]``.
        ema_decay: None for all-time (Welford) statistics; a float in (0, 1) for exponential moving averages of
            the batch mean and the within-batch variance (``count`` is then left untouched).

    Keyword-only extras:
        backend: ``"auto"`` (default; or the ``PROTONORM_BACKEND`` environment variable), ``"torch"``,
            ``"cpp"`` or ``"triton"``.
        nonfinite: ``"drop"`` (default) leaves rows holding NaN/inf out of the statistics and counts them in the
            ``nonfinite_rows`` buffer; ``"raise"`` raises ``ValueError`` instead (this reads a value on the host,
            so it synchronizes the device on every record).
        sync: ``"per_call"`` (default) merges all ranks on every record; ``"deferred"`` records locally and
            merges at :func:`protonorm.sync`.
    """

    def __init__(
        self,
        fabric=None,
        shape: Optional[Tuple[int, ...]] = None,
        epsilon: float = 1e-5,
        device="cuda:0",
        clamp_value: Optional[float] = None,
        ema_decay: Optional[float] = None,
        *,
        backend: str = "auto",
        nonfinite: str = "drop",
        sync: str = "per_call",
    ):
        super().__init__()
        epsilon, clamp_value, ema_decay = _check_arguments(epsilon, clamp_value, ema_decay, nonfinite, sync)
        self.fabric = fabric
        self.epsilon = epsilon
        self.clamp_value = clamp_value
        self.ema_decay = ema_decay
        self.shape = shape
        self.device = device
        self.backend = backends.check_choice(backend)
        backends.preload(self.backend, _default_device() if device is None else device)
        self.nonfinite = nonfinite
        self.sync = sync
        self._initialized = False
        self._lazy_device = None
        self._reset_transient_state()
        if shape is not None:
            shape = _as_shape(shape)
            self._create_buffers(shape, _resolve_default_device(device))
            self._initialized = True

    def __setattr__(self, name: str, value) -> None:
        check = _HYPERPARAMETER_CHECKS.get(name)
        if check is not None:
            value = check(value)
        elif name in _STATISTIC_DTYPES and isinstance(value, Tensor) and name in self.__dict__.get("_buffers", ()):
            # Upstream's statistics are plain buffers, which callers assign (``module.mean = t.float()``): they
            # become statistics the kernels can update in place, as a checkpoint's tensors do when loaded.
            value = _as_statistic(value, _STATISTIC_DTYPES[name])
        super().__setattr__(name, value)

    # ----------------------------------------------------------------------------------------- state
    def _create_buffers(self, shape, device) -> None:
        # Normal tensors even when the first call comes under torch.inference_mode(): they are updated in place.
        mean, var, count, nonfinite_rows = outside_inference_mode(lambda: (
            torch.zeros(shape, dtype=torch.float64, device=device),
            torch.ones(shape, dtype=torch.float64, device=device),
            torch.ones((), dtype=torch.long, device=device),
            torch.zeros((), dtype=torch.long, device=device),
        ))
        self.register_buffer("mean", mean)
        self.register_buffer("var", var)
        self.register_buffer("count", count)
        # Rows left out for holding NaN/inf. Not persistent: upstream's state_dict keys stay exactly mean/var/count.
        self.register_buffer("nonfinite_rows", nonfinite_rows, persistent=False)
        self.shape = shape
        self._reset_derived_state()  # (the output cache stays: a lazy module may be initialized inside a trace)

    def _reset_transient_state(self) -> None:
        self._reset_derived_state()
        self._outputs = OutputCache()  # large CPU outputs of normalize, recycled once the caller drops them

    def _reset_derived_state(self) -> None:
        # What was derived from the statistics buffers: scratch buffers reused across calls, the moments stashed by
        # a training-mode normalize, and the distributed module's per-normalizer state. None of it is part of the
        # statistics.
        self._workspace_record: dict = {}
        if not _is_compiling():  # (Dynamo cannot make one; a lazy module initialized in a trace has stashed nothing)
            self._stash = _Stash()
        self._sync_state = None
        self._layout_cache: Optional[_Layout] = None
        self._discounted_rows = None  # (discounted_reward, its [B, D] view)

    def _lazy_init(self, x: Tensor) -> None:
        if not self._initialized:
            if x.dim() == 0:
                raise ValueError("expected a batch of shape [B, *features], got a 0-d tensor")
            self._create_buffers(tuple(x.shape[1:]), x.device)
            self._initialized = True

    def _first_call(self, x: Tensor, call):
        """``call()`` on a lazy module, which takes its shape from the batch ``x`` first. If the call raises (a batch
        that ``nonfinite="raise"`` refuses, a backend that cannot run on ``x``'s device), the module is lazy again:
        no statistics, no shape, no discounted returns made by the call."""
        shape, returns = self.shape, self.__dict__.get("discounted_reward")
        self._lazy_init(x)
        if _is_compiling():  # (Dynamo would have to trace the handler; a compiled first call is not undone)
            return call()
        try:
            return call()
        except BaseException:
            for name in ("mean", "var", "count", "nonfinite_rows"):
                delattr(self, name)  # nn.Module's: unregisters the buffer
            self.shape, self._initialized = shape, False
            self._reset_derived_state()
            if "discounted_reward" in self.__dict__:
                self.discounted_reward = returns
            raise

    def _layout(self) -> _Layout:
        layout = self._layout_cache
        if layout is None or not layout.current(self._buffers) or _is_compiling():
            # Through the attributes: a module without buffers (lazy, never fed) raises AttributeError as before.
            # A trace takes the buffers themselves (torch.export(strict=True) lifts tensors reached through a plain
            # attribute, such as cached views, as constants apart from the module's state) and must not leave views
            # of its tensors behind.
            layout = _Layout(self.mean, self.var, self.count, self.nonfinite_rows)
            if not _is_compiling():
                self._layout_cache = layout
        return layout

    def _flat_stats(self):
        """``(mean [D], var [D], count, nonfinite_rows)``: the views backends work on."""
        layout = self._layout()
        return layout.flat_mean, layout.flat_var, layout.count, layout.dropped

    # torch.jit.script compiles every property of a submodule, even of one its forward never calls: a model that
    # only holds a normalizer must script, as it does with upstream's.
    __jit_unused_properties__ = ["num_features"]

    @property
    def num_features(self) -> int:
        return self._layout().num_features

    def __getstate__(self):
        # Caches hold weak references (unpicklable) and scratch buffers; a pickled module starts without them.
        state = self.__dict__.copy()
        for key in ("_workspace_record", "_stash", "_sync_state", "_layout_cache", "_discounted_rows",
                    "_outputs"):
            state[key] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)  # nn.Module's: fills in the attributes a pickle from an older torch lacks
        self._reset_transient_state()

    def __deepcopy__(self, memo):
        # A copy made in this process is the same rank's: it keeps the rows a deferred sync still owes the other
        # ranks, which a pickle drops (loaded on every rank, it would send them once per rank). A fabric that is a
        # process-group handle cannot be copied; the copy shares it.

        fabric = self.__dict__.get("fabric")
        if distributed.is_group_handle(fabric):
            memo.setdefault(id(fabric), fabric)
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        state = copy.deepcopy({**self.__getstate__(), "_sync_state": self._sync_state}, memo)
        copied.__setstate__(state)
        copied._sync_state = state["_sync_state"]
        return copied

    def _apply(self, fn, recurse=True):
        # model.half()/.double()/.to(dtype) on a parent must not round the float64 statistics or the int64
        # count: every buffer keeps its dtype and follows only the device change. Nor may
        # .to(memory_format=...) restride 4-D/5-D statistics: the backends work on their flat views.
        # A move under torch.inference_mode() (``.to(device)``, ``to_empty``) must not make inference tensors of
        # buffers that are updated in place.
        def keep_dtype(t):
            return outside_inference_mode(lambda: _keep_dtype(t))

        def _keep_dtype(t):
            out = fn(t)
            out = out if out.dtype == t.dtype else t.to(device=out.device)
            return out.contiguous()

        if not self._initialized:
            # A lazy module has no buffers yet; remember where the model was moved, so a checkpoint loaded
            # later materializes its statistics there.
            self._lazy_device = _moved_to(fn, self._lazy_device)
        self._layout_cache = None
        self._outputs.clear()  # CPU memory kept for outputs is not wanted once the module moves
        # Scratch buffers and the stash belong to the old device, whichever call moved the module (.to, .cuda,
        # .cpu, a parent's move); the deferred-sync state (rows recorded since the last sync) must survive the
        # move, and distributed.py moves its tensors on next use.
        self._workspace_record, self._stash = {}, _Stash()
        dropped = self._buffers.get("nonfinite_rows")
        result = super()._apply(keep_dtype, recurse)
        if dropped is not None and dropped.is_meta and not self.nonfinite_rows.is_meta:
            # to_empty() from meta: no checkpoint restores this non-persistent count, and no row was dropped yet.
            self.nonfinite_rows.zero_()
        returns = self.__dict__.get("discounted_reward")
        if isinstance(returns, Tensor):  # a reward normalizer's returns follow the statistics, in their dtype
            moved = outside_inference_mode(lambda: fn(returns))
            if moved.dtype != returns.dtype:
                moved = returns.to(device=moved.device)
            # Returns leaving meta (to_empty() after a dry run on meta tensors) had no values: the next step starts
            # them afresh, as in a new module, instead of adding uninitialized memory to its reward.
            self.discounted_reward = None if returns.is_meta and not moved.is_meta else moved
        where = self.mean.device if self._initialized else self._lazy_device
        if where is not None:  # (None: a lazy module that was never moved)
            backends.preload(self.backend, where)
        return result

    def to(self, *args, **kwargs):
        """Move the buffers (their dtypes never change) and remember the device, like upstream's ``to(device)``."""
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            super().to(device=device, non_blocking=non_blocking)
            given = kwargs.get("device", args[0] if args else None)
            self.device = given if isinstance(given, (str, torch.device)) else device  # as upstream keeps it
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        entry = state_dict.get(prefix + "mean")
        if self._initialized or isinstance(entry, Tensor):
            # Validate every key before creating or copying anything: a failed load leaves the module as it was
            # (a partial checkpoint without `mean` too; a lazy module has no buffers for its other keys to reach).
            shape = tuple(self.mean.shape) if self._initialized else tuple(entry.shape)
            problems = _state_dict_problems(state_dict, prefix, shape)
            if problems:
                error_msgs.extend(problems)
                return
            if not self._initialized:
                self._create_buffers(shape, self._lazy_device or entry.device)
                self._initialized = True
        if any(prefix + key in state_dict for key in ("mean", "var", "count")):
            # The cached flat views alias the buffers: under torch.__future__.set_swap_module_params_on_conversion
            # the loader swaps each buffer with the checkpoint's tensor, which torch refuses while views are alive.
            self._layout_cache = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for name, dtype in _STATISTIC_DTYPES.items():
            loaded = self._buffers.get(name)
            # load_state_dict(assign=True) takes the checkpoint's tensors as they are (swapped in, under
            # torch.__future__.set_swap_module_params_on_conversion, without passing __setattr__).
            if loaded is not None:
                self._buffers[name] = _as_statistic(loaded, dtype)
        dropped = self._buffers.get("nonfinite_rows")
        if dropped is not None and dropped.device != self.mean.device:
            # assign=True moved the statistics (a model built on meta takes the checkpoint's tensors); the
            # non-persistent count follows them, zero when it had no values (meta).
            moved = torch.zeros_like(dropped, device=self.mean.device) if dropped.is_meta else dropped.to(self.mean.device)
            self._buffers["nonfinite_rows"] = moved
        returns = self.__dict__.get("discounted_reward")
        if isinstance(returns, Tensor) and returns.device != self.mean.device:
            # So do a reward normalizer's returns (the next step would fail on every call for returns left behind),
            # started afresh by the next step when they had no values either (see _apply).
            self.discounted_reward = None if returns.is_meta else returns.to(self.mean.device)
        if entry is not None:
            self.shape = tuple(self.mean.shape)
        if any(prefix + key in state_dict for key in ("mean", "var", "count")):
            # New statistics: what was derived from the old ones goes. A load that leaves this module out
            # (strict=False, another part of the model) keeps it all, the records a deferred sync still owes too.

            synced = self._sync_state
            if self._owes_rows():
                # The records pending since the last sync go, and so do the rows they dropped: the count (which no
                # checkpoint holds) is the last sync's again, the same on every rank, as the next sync's base needs.
                self.nonfinite_rows.copy_(synced.dropped)
            self._reset_derived_state()
            self._outputs.clear()  # (not a new cache, which would read the environment again and might raise)
            if isinstance(synced, distributed._PerCallState):
                # The shift the per-call all_reduce sums around stays (any value the ranks share will do): without it
                # the next record gathers, and a load on some ranks only (a checkpoint loaded on rank 0 alone) would
                # have them gather while the others all_reduce, every rank waiting on the other collective.
                self._sync_state = synced

    # ----------------------------------------------------------------------------------------- routing
    def _backend_for(self, x: Tensor) -> Backend:
        layout = self._layout()
        if x.device != layout.device:
            return backends.resolve(self.backend, x.device)
        return self._resolved_backend(layout)

    def _resolved_backend(self, layout: _Layout) -> Backend:
        """The backend for tensors on the statistics' device, resolved once per layout (an unusable choice raises
        on every call)."""
        if layout.choice != self.backend:
            layout.backend = backends.resolve(self.backend, layout.device)
            layout.choice = self.backend
        return layout.backend

    def _rows(self, arr: Tensor, what: str, layout: _Layout) -> Tensor:
        """``arr`` as ``[B, D]`` rows for recording; raises if its feature shape is not this module's."""
        shape = layout.shape
        dim = arr.dim()
        if dim == 0:
            raise ValueError(f"{what}: expected a batch of shape [B, *{shape}], got a 0-d tensor")
        d = layout.num_features
        if not _same_features(arr, layout):
            features = tuple(arr.shape[1:])
            raise ValueError(
                f"{what}: expected a batch of shape [B, *{shape}], got {tuple(arr.shape)} "
                f"(feature shape {features} differs from {shape})"
            )
        _check_device(what, arr, layout)
        return _as_rows(arr, d)

    def _elementwise_rows(self, arr: Tensor, what: str, layout: _Layout) -> Tensor:
        """``arr`` as ``[N, D]`` for normalize, which broadcasts like upstream: trailing dims must be the shape (its
        leading 1s may be left out)."""
        trailing = layout.trailing
        if arr.shape[arr.dim() - len(trailing):] != trailing:
            raise ValueError(
                f"{what}: expected a tensor whose trailing dimensions are {layout.shape}, got {tuple(arr.shape)}"
            )
        _check_device(what, arr, layout)
        return _as_rows(arr, layout.num_features)

    def _fold(self, parts: Tensor, backend: Backend, layout: Optional[_Layout] = None) -> None:
        """Merge recorded moments into the statistics (all ranks' when distributed)."""
        check = self._raise_if_nonfinite if self.nonfinite == "raise" else None
        if self.fabric is not None or self.sync == "deferred" or self._owes_rows():

            # Deferred records are tracked whatever the fabric: callers assign the distributed one after
            # construction, and rows recorded before are owed to the other ranks at the next sync all the same.
            # So are per-call records while rows are owed (switched from deferred before a distributed fabric).
            if self.sync == "deferred" or self._owes_rows() or distributed.world_size(self.fabric) > 1:
                distributed.fold_parts(self, parts, backend, check)
                return
        if check is not None:
            check(parts)
        if layout is None:
            layout = self._layout()
        backend.merge(parts, layout.flat_mean, layout.flat_var, layout.count, layout.dropped, self.ema_decay)

    def _fold_empty(self, x: Tensor) -> None:
        """A batch without rows changes nothing, but in per-call sync every rank must still join the collective."""
        if self.fabric is not None and self.sync == "per_call":

            if distributed.world_size(self.fabric) > 1:
                parts = torch.zeros((1, reference.parts_width(self.num_features)), dtype=torch.float64, device=x.device)
                self._fold(parts, self._backend_for(x))

    def _merges_alone(self) -> bool:
        """Whether recorded moments go straight into this process's statistics and nowhere else (no other ranks, now
        or at a deferred sync, no check of the parts), so that a backend may fuse computing them with the merge."""
        if self.nonfinite != "drop" or self.sync == "deferred" or self._owes_rows():
            return False
        if self.fabric is None:
            return True

        return distributed.world_size(self.fabric) <= 1

    def _owes_rows(self) -> bool:
        """Whether this module holds a deferred-sync state: rows recorded since the last sync that the other ranks
        have not seen (kept when switched to per-call until a record reaches the other ranks)."""
        return type(self._sync_state) is _DeferredState

    @staticmethod
    def _raise_if_nonfinite(parts: Tensor) -> None:
        dropped = int(parts[:, reference.DROPPED_COL].sum().item())  # the documented sync of nonfinite="raise"
        if dropped:
            raise ValueError(
                f"record: expected finite values, got {dropped} row(s) holding NaN or inf "
                "(statistics left unchanged; pass nonfinite='drop' to skip such rows instead)"
            )

    # ----------------------------------------------------------------------------------------- public API
    @torch.no_grad()
    def update_from_moments(self, batch_mean: Tensor, batch_var: Tensor, batch_count) -> None:
        """Fold externally computed moments (population variance) of ``batch_count`` rows into the statistics."""
        if isinstance(batch_count, numbers.Real) and not (math.isfinite(batch_count) and batch_count >= 0):
            # (checked where it costs nothing: a number on the host; a tensor's value is not read)
            raise ValueError(f"update_from_moments: expected batch_count >= 0 (a number of rows), got {batch_count!r}")
        mean = self.mean
        batch_mean = _on_device(batch_mean, mean.device, torch.float64)
        batch_var = _on_device(batch_var, mean.device, torch.float64)
        try:  # (a Python float is a float64 number, not one of the default dtype, as in combine_moments)
            exact = _on_device(batch_count, mean.device, torch.float64 if isinstance(batch_count, float) else None)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise TypeError(f"update_from_moments: expected batch_count as a number of rows (an int or a one-element "
                            f"tensor), got {batch_count!r:.80}") from None
        if exact.numel() != 1 or exact.is_complex():
            raise ValueError(f"update_from_moments: expected batch_count as one real number of rows, got a "
                             f"{exact.dtype} tensor of shape {tuple(exact.shape)}")
        n = exact.to(torch.float64)
        # Shapes that broadcast to the statistics' are taken, as upstream's arithmetic and its copy into the
        # statistics (which drops leading 1s) take them: moments kept with their reduced dim, one value for all.
        shaped = []
        for name, value in (("batch_mean", batch_mean), ("batch_var", batch_var)):
            features = value.shape[_leading_ones(value.shape):]
            if len(features) > mean.dim() or any(f != 1 and f != s for f, s in zip(reversed(features),
                                                                                 reversed(mean.shape))):
                raise ValueError(f"update_from_moments: expected {name} of shape {tuple(mean.shape)} or one that "
                                 f"broadcasts to it, got {tuple(value.shape)}")
            shaped.append(value.reshape(features).expand(mean.shape))
        d = self.num_features
        batch_mean = shaped[0].reshape(d)
        batch_var = shaped[1].reshape(d)
        # Moments holding NaN/inf are refused whole, as a batch's rows are: "raise" raises before anything changes;
        # "drop" merges them as an empty part (decided on the device, no host read) and counts their rows as
        # dropped, instead of poisoning the statistics for good as upstream's update does.
        finite = torch.isfinite(batch_mean).all() & torch.isfinite(batch_var).all()
        if self.nonfinite == "raise" and not bool(finite):  # the documented host read of nonfinite="raise"
            raise ValueError(
                "update_from_moments: expected finite batch_mean and batch_var, got NaN or inf "
                "(statistics left unchanged; with nonfinite='drop' such moments are left out and counted instead)"
            )
        zero = torch.zeros((), dtype=torch.float64, device=mean.device)
        kept_n = torch.where(finite, n, zero)
        batch_mean = torch.where(finite, batch_mean, zero)
        batch_m2 = torch.where(finite, batch_var * kept_n, zero)
        parts = reference.pack_parts(kept_n, torch.where(finite, zero, n), batch_mean, batch_m2)
        flat_mean, flat_var, count, dropped = self._flat_stats()
        backend_merge = backends.resolve("torch", mean.device).merge
        # The parts hold the counts in float64, which rounds counts past 2^53: what they lost is added back.
        lost = (exact.to(torch.int64) - n.to(torch.int64)).reshape(())
        count_rounding = torch.where(finite, lost, torch.zeros_like(lost))
        dropped_rounding = lost - count_rounding

        def merge(parts, mean, var, count, dropped, ema_decay):
            backend_merge(parts, mean, var, count, dropped, ema_decay)
            if ema_decay is None:
                count.add_(count_rounding)
            dropped.add_(dropped_rounding)

        merge(parts, flat_mean, flat_var, count, dropped, self.ema_decay)
        if self._owes_rows():

            # Applied alike on every rank, so it goes into the base every rank shares too; the rows this rank
            # recorded since the last sync stay owed to the others (in either mode: see fold_parts).
            distributed.merge_into_base(self, parts, merge)
        # Else no base yet (the next deferred record takes the statistics, update included), or a per-call shift,
        # which stays for the reason a load keeps it (see _load_from_state_dict).

    def maybe_clamp(self, x: Tensor) -> Tensor:
        return x if self.clamp_value is None else torch.clamp(x, -self.clamp_value, self.clamp_value)

    def normalize(self, arr: Tensor, un_norm: bool = False) -> Tensor:
        """``clamp((arr - mean) / sqrt(var + epsilon))``; ``un_norm=True`` clamps ``arr`` then maps it back.

        In training mode the batch's moments are computed in the same pass, so that a following
        ``record_moments`` of the same, unmodified tensor costs only the merge.
        """
        if not un_norm:
            out = self._direct_normalize(arr)
            if out is not None:
                return out
        if not self._initialized:
            _check_normalizable(arr, un_norm, self.clamp_value)  # refused before the module takes a shape
            return self._first_call(arr, lambda: self._normalize(arr, un_norm, center=True))
        return self._normalize(arr, un_norm, center=True)

    def _direct_normalize(self, arr: Tensor) -> Optional[Tensor]:
        """The centered ``normalize`` of a ``[B, D]`` batch offered to the backend's direct call (see
        ``Backend.try_normalize_moments``), or None for the general way: first calls, other shapes, inputs that
        need gradients (forward-mode and torch.func transforms too), traces and exports, and whatever the backend
        declines (a dtype or device its kernels do not take, which the backend tests anyway)."""
        layout = self._layout_cache
        if (
            layout is None
            or _is_compiling()  # first: the Dynamo of torch 2.4 cannot trace the tests after it
            or layout.choice != self.backend
            or not layout.backend.direct
            or type(arr) is not Tensor
            or arr.requires_grad
            or arr.dim() != 2
            or len(layout.shape) != 1
            or not layout.current(self._buffers)
            or _is_exporting(False)
            or _is_transformed()
            or (self.clamp_value is not None and self.clamp_value > _FLOAT32_MAX)  # checked the general way
        ):
            return None
        out = self._outputs.empty(arr.shape, normalized_dtype(arr.dtype), layout.device)
        backend = layout.backend
        if self.training and not arr.is_inference():  # no version counter to stash with (see _normalize)
            stash = self._stash
            parts = backend.try_normalize_moments(arr, layout.flat_mean, layout.flat_var, self.epsilon,
                                                  self.clamp_value, out, stash.workspace)
            if parts is None:
                return None
            stash.moments = (weakref.ref(arr), arr._version, parts, backend)
            return out
        if backend.try_normalize(arr, layout.flat_mean, layout.flat_var, self.epsilon, self.clamp_value, out):
            return out
        return None

    def _normalize(self, arr: Tensor, un_norm: bool, center: bool) -> Tensor:
        if isinstance(arr, Proxy):
            # torch.fx.symbolic_trace: the reference math goes into the graph, with the statistics taken as they are
            # now (as constants, as upstream's arithmetic records them).
            return reference.normalize(arr, self.mean, self.var, self.epsilon, self.clamp_value, un_norm, center)
        _check_normalizable(arr, un_norm, self.clamp_value)
        compiling = _is_compiling()
        if (arr.requires_grad and torch.is_grad_enabled()) or _is_exporting(compiling) or (
                not compiling and _is_transformed()):
            # Traced / exported graphs (ProtoMotions exports its actor to ONNX) get the plain reference math, and
            # so does an input that needs gradients, forward-mode ones included: the fast kernels define none.
            return reference.normalize(arr, self.mean, self.var, self.epsilon, self.clamp_value, un_norm, center)
        if not arr.is_floating_point():
            arr = arr.float()
        layout = self._layout()
        x = self._elementwise_rows(arr, "normalize", layout)
        dtype = normalized_dtype(arr.dtype)
        shape = arr.shape
        if arr.dim() < len(layout.shape):  # upstream's result takes the statistics' leading 1s too
            shape = (1,) * (len(layout.shape) - arr.dim()) + tuple(shape)
        if compiling:
            out = arr.new_empty(shape, dtype=dtype)
        else:
            out = self._outputs.empty(shape, dtype, arr.device)
        if arr.numel() == 0:
            return out
        backend = self._resolved_backend(layout)
        # x is arr itself when arr already is [B, D] rows; out then needs no view either.
        out_rows = out if x is arr else out.view(-1, x.shape[1])
        # An inference tensor (made under torch.inference_mode()) has no version counter, so a later record could
        # not tell whether it changed in place: its moments are computed when it is recorded.
        stash = (self.training and center and not un_norm and not compiling and x.shape[1] == layout.num_features
                 and not arr.is_inference())
        if stash and _same_features(arr, layout):
            # The workspace is lent to this call alone: on this way the kernel may be reached through an op, after
            # which a dispatch mode may run any code, a normalize with this module included, before the parts are
            # kept. A call nested so gets buffers of its own.
            kept = self._stash
            workspace, kept.workspace = kept.workspace, {}
            try:
                parts = backend.normalize_moments(
                    x, layout.flat_mean, layout.flat_var, self.epsilon, self.clamp_value, out_rows, workspace
                )
            finally:
                kept.workspace = workspace
            kept.moments = (weakref.ref(arr), arr._version, parts, backend)
        else:
            backend.normalize(x, layout.flat_mean, layout.flat_var, self.epsilon, self.clamp_value, un_norm, center, out_rows)
        return out

    def record_moments(self, arr: Tensor, mask: Optional[Tensor] = None) -> None:
        """Fold the moments of the ``[B, *shape]`` batch ``arr`` over dim 0 into the statistics (``shape`` may have
        leading 1s more or fewer, as upstream takes it: ``[B, 1, D]`` batches record into ``(D,)`` statistics).

        ``mask`` (optional, ``[B]`` bool): rows where it is False are ignored and not counted.
        """
        # ProtoMotions' second call: the moments of this very batch are stashed by normalize (``_stashed_moments``,
        # written out here), and with the statistics this process's alone the backend may merge them directly
        # (Backend.try_merge).
        if (mask is None and self.fabric is None and self.nonfinite == "drop" and self.sync == "per_call"
                and type(self._sync_state) is not _DeferredState and not _is_compiling()):
            stash = self._stash
            stashed = stash.moments
            layout = self._layout_cache
            if (
                stashed is not None
                and stashed[0]() is arr
                and arr._version == stashed[1]
                and layout is not None
                and layout.current(self._buffers)
                and stashed[3].try_merge(stashed[2], layout.flat_mean, layout.flat_var, layout.count, layout.dropped,
                                         self.ema_decay)
            ):
                stash.moments = None
                return
        self._record_moments(arr, mask)

    @_without_grad
    def _record_moments(self, arr: Tensor, mask: Optional[Tensor]) -> None:
        _check_floating("record_moments", arr)
        if mask is not None and arr.dim() > 0:  # before a lazy module takes its shape from arr (0-d raises below)
            mask = _check_mask(mask, arr)
        if not self._initialized:
            return self._first_call(arr, lambda: self._record_moments(arr, mask))
        layout = self._layout()
        x = self._rows(arr, "record_moments", layout)
        if x.shape[0] == 0:
            self._fold_empty(x)
            return
        parts, backend = self._take_stash(arr, mask)
        if parts is None:
            backend = self._resolved_backend(layout)
            parts = backend.moments(x, mask, self._workspace_record)
        self._fold(parts, backend, layout)

    def _stashed_moments(self, arr: Tensor):
        """``(parts, backend)`` of the moments a training-mode ``normalize`` computed for this very tensor, if it
        is unchanged since, else ``(None, None)``."""
        if _is_compiling():
            return None, None
        stash = self._stash.moments
        if stash is None:
            return None, None
        ref, version, parts, backend = stash
        if ref() is arr and arr._version == version:
            return parts, backend
        return None, None

    def _take_stash(self, arr: Tensor, mask: Optional[Tensor]):
        """``_stashed_moments`` for an unmasked record, and the stash is gone either way."""
        found = (None, None) if mask is not None else self._stashed_moments(arr)
        if not _is_compiling():
            self._stash.moments = None
        return found


class RewardRunningMeanStd(RunningMeanStd):
    """Scale-only normalizer of discounted returns (upstream's reward normalizer; note its argument order).

    ``record_reward(reward, terminated)`` updates ``discounted_reward = discounted_reward * gamma + reward``
    (restarted at ``reward`` where ``terminated``) and records its moments across environments; ``normalize``
    divides by ``sqrt(var + epsilon)`` without shifting by the mean.
    """

    def __init__(
        self,
        fabric,
        shape: Tuple[int, ...],
        gamma: float,
        epsilon: float = 1e-5,
        clamp_value: Optional[float] = None,
        device="cuda:0",
        ema_decay: Optional[float] = None,
        *,
        backend: str = "auto",
        nonfinite: str = "drop",
        sync: str = "per_call",
    ):
        gamma = _check_gamma(gamma)
        super().__init__(
            fabric, shape, epsilon, device, clamp_value, ema_decay, backend=backend, nonfinite=nonfinite, sync=sync
        )
        self.gamma = gamma
        self.discounted_reward: Optional[Tensor] = None

    def record_reward(self, reward: Tensor, terminated: Tensor) -> None:
        """Advance the discounted returns by one environment step and record them."""
        # The call made on every environment step, taken straight to the backend when it can be: this module set
        # up the previous call (layout, backend and discounted returns in place), the statistics are this
        # process's alone, and the backend accepts every argument (try_reward_record checks them). Anything
        # else, first calls and errors included, goes the general way.
        layout = self._layout_cache
        previous = self.discounted_reward
        if (
            layout is not None
            and previous is not None
            and not _is_compiling()  # (the backend would decline; the Dynamo of torch 2.4 cannot trace its tests)
            and self.fabric is None
            and self.nonfinite == "drop"
            and self.sync == "per_call"
            and type(self._sync_state) is not _DeferredState
            and layout.choice == self.backend
            and layout.backend.direct
            and layout.current(self._buffers)
            and type(reward) is Tensor
            and type(terminated) is Tensor
            and (reward.dim() == 1 if layout.num_features == 1 else len(layout.shape) == 1 and reward.dim() == 2)
            and layout.backend.try_reward_record(reward, terminated, previous, self.gamma, layout.flat_mean,
                                                 layout.flat_var, layout.count, layout.dropped, self.ema_decay,
                                                 self._workspace_record)
        ):
            return
        self._record_reward(reward, terminated)

    @_without_grad
    def _record_reward(self, reward: Tensor, terminated: Tensor) -> None:
        _check_floating("record_reward", reward)
        # The flags are checked before a lazy module takes its shape from reward: one row per first-dim entry
        # (a 0-d reward raises below).
        num_rows = reward.shape[0] if reward.dim() > 0 else 1
        if not isinstance(terminated, Tensor):
            try:
                terminated = _on_device(terminated, reward.device)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise TypeError(f"record_reward: expected terminated as a tensor (or sequence) of bool, integer or "
                                f"floating-point flags, got {terminated!r:.80}") from None
        elif terminated.device != reward.device:
            raise ValueError(f"record_reward: expected terminated on {reward.device} like reward, got {terminated.device}")
        if terminated.is_complex():
            raise TypeError(f"record_reward: expected terminated as bool, integer or floating-point flags, got {terminated.dtype}")
        terminated_dim = terminated.dim()
        if terminated.numel() != num_rows or (terminated_dim > 0 and terminated.shape[0] != num_rows):
            raise ValueError(
                f"record_reward: expected terminated with one entry per environment ({num_rows}), "
                f"got shape {tuple(terminated.shape)}"
            )
        if not self._initialized:
            return self._first_call(reward, lambda: self._record_reward(reward, terminated))
        layout = self._layout()
        rows = self._rows(reward, "record_reward", layout)
        if num_rows == 0:
            self._fold_empty(rows)
            return
        previous = self.discounted_reward
        if previous is not None and previous.shape != reward.shape:
            raise ValueError(
                f"record_reward: expected reward of shape {tuple(previous.shape)} like the previous steps, "
                f"got {tuple(reward.shape)}"
            )
        if previous is not None and not previous.is_complex() and (previous.dtype not in _RETURNS_DTYPES
                                                                   or _shares_elements(previous)
                                                                   or (not _is_compiling()
                                                                       and previous.is_inference())):
            # Returns assigned in a dtype that cannot hold them (integer, bool, half precision), whose elements
            # share memory (an expand()) so that no step can be written into them, or made under inference mode
            # (which torch refuses to update in place outside it, after writing them; not asked while compiling, which
            # cannot trace the question): go on in a copy of the dtype
            # upstream's arithmetic gives the next step, instead of rounding every step into them.
            assigned = previous
            previous = self.discounted_reward = outside_inference_mode(
                lambda: assigned.to(dtype=normalized_dtype(assigned.dtype), copy=True,
                                   memory_format=torch.contiguous_format))
        backend = self._resolved_backend(layout)
        if previous is None:
            dtype = normalized_dtype(reward.dtype)
            self.discounted_reward = outside_inference_mode(
                lambda: reward.to(dtype=dtype, copy=True, memory_format=torch.contiguous_format))
            parts = backend.moments(_as_rows(self.discounted_reward, rows.shape[1]), None, self._workspace_record)
        else:
            cached = self._discounted_rows
            write_back = False
            if cached is not None and cached[0] is previous:
                discounted = cached[1]
            else:
                discounted = _as_rows(previous, rows.shape[1])
                # Returns that are no [B, D] rows of values in their own memory (columns apart, which _as_rows
                # copied; a lazily negated view, which the kernels would read unnegated): a plain copy is advanced,
                # then written back, so that the assigned tensor holds the returns.
                write_back = not _is_compiling() and (discounted.is_neg()
                                                      or discounted.data_ptr() != previous.data_ptr())
                if write_back:
                    discounted = discounted.resolve_neg().contiguous()
                elif not _is_compiling():
                    self._discounted_rows = (previous, discounted)
            flags = terminated if terminated_dim == 1 else terminated.reshape(-1)
            if self._merges_alone() and not write_back:  # nobody else needs the parts: one backend call
                backend.reward_record(rows, flags, discounted, float(self.gamma), layout.flat_mean, layout.flat_var,
                                      layout.count, layout.dropped, self.ema_decay, self._workspace_record)
                return
            # The merge may raise after the returns were advanced in place (nonfinite="raise" refusing the step, a
            # per-call collective failing; deferred records make none): keep them to put back.
            may_raise = self.nonfinite == "raise" or (self.fabric is not None and self.sync != "deferred")
            kept = previous.clone() if may_raise else None
            parts = backend.reward_moments(rows, flags, discounted, float(self.gamma), self._workspace_record)
            if write_back:  # before the merge: a write refused (an inference tensor) leaves the statistics as they were
                previous.copy_(discounted.view(previous.shape))
        try:
            self._fold(parts, backend, layout)
        except BaseException:
            # The step did not happen: the returns are as before it.
            if previous is None:
                self.discounted_reward = None
            elif kept is not None:
                previous.copy_(kept)
            raise

    def normalize(self, arr: Tensor, un_norm: bool = False) -> Tensor:
        """``clamp(arr / sqrt(var + epsilon))``; ``un_norm=True`` clamps ``arr`` then multiplies back."""
        if not self._initialized:
            _check_normalizable(arr, un_norm, self.clamp_value)
            return self._first_call(arr, lambda: self._normalize(arr, un_norm, center=False))
        return self._normalize(arr, un_norm, center=False)


def materialize_lazy_running_stats_from_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Give every lazy normalizer in ``model`` whose ``<name>.mean`` is in ``state_dict`` its buffers, shaped like
    that entry, before ``model.load_state_dict``; leave the others alone (upstream's helper).

    protonorm's modules also materialize themselves inside ``load_state_dict``; this stays for callers that
    follow upstream's sequence, and puts the buffers where ``load_state_dict`` would: on the device the model was
    moved to, else the entry's.
    """
    for name, module in model.named_modules():
        if isinstance(module, RunningMeanStd) and not module._initialized:
            key = f"{name}.mean" if name else "mean"
            if key in state_dict:
                entry = state_dict[key]
                module._create_buffers(tuple(entry.shape), module._lazy_device or entry.device)
                module._initialized = True


def combine_moments(means, vars, counts):
    """Merge lists of per-group moments pairwise (tree order): ``(mean, var, count)``.

    ``counts`` may be Python numbers, tensors, or one tensor. Integer counts give an exact int64 total; fractional
    ones (float counts, as weights) weigh the groups as they are and give the total truncated to int64, as upstream
    does. The merge runs in float64, the results take the dtypes and broadcast shapes upstream's arithmetic would
    give them (one group comes back as it is), and no value is read on the host.
    """
    if len(means) == 0 or len(means) != len(vars) or len(means) != len(counts):
        raise ValueError(
            f"combine_moments: expected non-empty lists of equal length, got {len(means)} means, "
            f"{len(vars)} vars, {len(counts)} counts"
        )
    # A tensor keeps its device (torch.as_tensor would move it to a default device set with set_default_device).
    first = means[0] if isinstance(means[0], Tensor) else torch.as_tensor(means[0])
    device = first.device
    means = [_on_device(m, device) for m in means]
    vars = [_on_device(v, device) for v in vars]
    n, total = _group_counts(counts, device)
    if len(means) == 1:  # upstream returns the one group's moments as they are (the variance clamped at 0)
        return means[0], vars[0].clamp(min=0.0), total
    # Upstream's arithmetic promotes the groups' dtypes (its float32 counts are 0-d, so they do not count) and
    # broadcasts their shapes: the mean's over the means, the variance's over means and variances.
    mean_dtype = functools.reduce(torch.promote_types, [m.dtype for m in means])
    var_dtype = functools.reduce(torch.promote_types, [v.dtype for v in vars], mean_dtype)
    mean_shape = torch.broadcast_shapes(*(m.shape for m in means))
    feature_shape = torch.broadcast_shapes(mean_shape, *(v.shape for v in vars))
    k = len(means)
    mean2 = torch.stack([m.to(torch.float64).expand(feature_shape) for m in means]).reshape(k, -1)
    var2 = torch.stack([v.to(torch.float64).expand(feature_shape) for v in vars]).reshape(k, -1)
    parts = torch.cat([n[:, None], torch.zeros_like(n)[:, None], mean2, var2 * n[:, None]], dim=1)
    combined_n, _, combined_mean, combined_m2 = reference.split_parts(reference.combine_parts(parts))
    safe_n = torch.where(combined_n > 0, combined_n, torch.ones_like(combined_n))
    combined_var = (combined_m2[0] / safe_n).clamp(min=0.0)
    combined_mean = combined_mean[0].reshape(feature_shape)
    if mean_shape != feature_shape:  # variances broadcast wider than the means: the mean repeats along those dims
        lead = len(feature_shape) - len(mean_shape)
        combined_mean = combined_mean[(0,) * lead + tuple(slice(None, 1) if s == 1 else slice(None) for s in mean_shape)]
    return combined_mean.to(mean_dtype), combined_var.reshape(feature_shape).to(var_dtype), total


def _group_counts(counts, device):
    """``(n, total)``: the groups' counts as float64 weights, and their total as an int64 scalar (exact for
    integer counts, truncated for fractional ones)."""
    shapes = [counts.shape[1:]] if isinstance(counts, Tensor) else [c.shape for c in counts if isinstance(c, Tensor)]
    wide = [tuple(shape) for shape in shapes if math.prod(shape) != 1]
    if wide:  # (upstream's arithmetic would weigh each feature apart; the parts hold one count per group)
        raise ValueError(f"combine_moments: expected one count per group, got per-group counts of shape {wide[0]}")
    if isinstance(counts, Tensor):
        raw = counts.to(device=device).reshape(-1)
    else:
        raw = [c.to(device=device).reshape(()) if isinstance(c, Tensor)
               else _on_device(c, device, torch.float64 if isinstance(c, float) else None).reshape(())
               for c in counts]
        fractional = any(c.is_floating_point() for c in raw)
        raw = torch.stack([c.to(torch.float64 if fractional else torch.int64) for c in raw])
    if raw.is_floating_point():
        n = raw.to(torch.float64)
        return n, n.sum().to(torch.int64)
    exact = raw.to(torch.int64)
    return exact.to(torch.float64), exact.sum()


# --------------------------------------------------------------------------------------------- helpers
_STATISTIC_DTYPES = {"mean": torch.float64, "var": torch.float64, "count": torch.int64}


def _as_statistic(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as a statistic the kernels update in place: of ``dtype`` (float64 or int64), contiguous (separate
    elements), holding its values (not a lazily negated view) and a normal tensor (torch refuses in-place updates of
    one made under ``torch.inference_mode()`` outside it, after writing some statistics already); ``t`` itself when
    it is so already."""
    if t.is_inference() and not _is_compiling():
        return outside_inference_mode(lambda: t.resolve_neg().to(dtype).clone(memory_format=torch.contiguous_format))
    if t.dtype != dtype or not t.is_contiguous() or t.is_neg():
        return t.resolve_neg().to(dtype).contiguous()
    return t


def _as_shape(shape) -> Tuple[int, ...]:
    """``shape`` as a tuple of ints; sizes must be integers, as ``torch.zeros`` takes them: ``int()`` would turn
    ``"342"`` into ``(3, 4, 2)`` and ``2.5`` into 2."""
    given = shape
    try:
        shape = (operator.index(shape),)
    except TypeError:
        pass
    try:
        if isinstance(shape, (str, bytes)):
            raise TypeError
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape: expected a tuple of ints, got {given!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: expected non-negative sizes, got {shape}")
    return shape


def _on_device(value, device, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.as_tensor(value, dtype=dtype, device=device)``, but a Python number becomes a fill: a tensor made from
    Python data reaches a GPU by a blocking copy (the host waits for the device), a fill takes the number as a kernel
    argument."""
    if type(value) in (int, float, bool):
        return torch.full((), value, dtype=dtype, device=device)
    return torch.as_tensor(value, dtype=dtype, device=device)


def _check_floating(what: str, arr: Tensor) -> None:
    """Statistics are taken of floating-point batches only, as upstream's ``torch.mean`` demands."""
    if not isinstance(arr, Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(arr).__name__}")
    if not arr.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor (float32, float64, float16 or bfloat16), got {arr.dtype}")


def _check_device(what: str, arr: Tensor, layout: _Layout) -> None:
    if arr.device != layout.device:
        raise ValueError(
            f"{what}: the input is on {arr.device} but the statistics are on {layout.device}; "
            f"move the module with .to({arr.device!s})"
        )


def _leading_ones(shape) -> int:
    """How many dims of size 1 ``shape`` starts with."""
    lead = 0
    while lead < len(shape) and shape[lead] == 1:
        lead += 1
    return lead


def _same_features(arr: Tensor, layout: _Layout) -> bool:
    """Whether the batch ``arr``'s feature shape (``arr.shape[1:]``) is the statistics' up to leading 1s: the same
    features, as upstream's copy of a batch's moments into the statistics takes them (it drops leading 1s)."""
    features = arr.shape[1:]
    return features[_leading_ones(features):] == layout.trailing


def _shares_elements(t: Tensor) -> bool:
    """Whether two elements of ``t`` are one place in memory as torch sees it (a dimension of stride 0, as an
    ``expand()`` makes): torch refuses to write into such a tensor, and a kernel would write each place many times."""
    return any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride()))


def _as_rows(arr: Tensor, d: int) -> Tensor:
    rows = arr
    if arr.dim() != 2 or arr.shape[1] != d:
        # Without features -1 is ambiguous to reshape; the rows are then the first dim's (nothing is read).
        rows = arr.reshape(-1, d) if d else arr.reshape(arr.shape[0], 0)
    return rows if rows.stride(1) == 1 or rows.shape[1] == 1 else rows.contiguous()


def _state_dict_problems(state_dict, prefix: str, shape) -> list:
    expected = {"mean": shape, "var": shape, "count": ()}
    problems = []
    for key, want in expected.items():
        entry = state_dict.get(prefix + key)
        if entry is None:
            continue
        if not isinstance(entry, Tensor):
            problems.append(f"{prefix}{key}: expected a tensor, got {type(entry).__name__}")
        elif tuple(entry.shape) != tuple(want) and not (want == () and tuple(entry.shape) == (1,)):
            # (torch's loader takes a one-element 1-d entry for a 0-d buffer, as in checkpoints of torch 0.3)
            problems.append(
                f"size mismatch for {prefix}{key}: expected shape {tuple(want)}, got {tuple(entry.shape)} in the checkpoint"
            )
        elif entry.is_complex() or entry.dtype == torch.bool:  # (integer statistics load as their values, as upstream's)
            problems.append(f"{prefix}{key}: expected a real-valued tensor (floating point or integer), got {entry.dtype}")
    return problems


def _check_mask(mask: Tensor, x: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a bool tensor of shape [{x.shape[0]}], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != (x.shape[0],):
        raise ValueError(f"mask: expected shape [{x.shape[0]}] (one entry per row), got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask: expected a tensor on {x.device}, got one on {mask.device}")
    return mask


def _plain_number(value):
    """``value`` as a Python int or float if it is a real number (a Python, numpy or one-element torch number), else
    None. Hyperparameters are kept as Python numbers: a tensor would be read on the host at every call."""
    if type(value) in (int, float):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):  # numpy scalars
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    if isinstance(value, Tensor) and value.numel() == 1 and not (value.is_complex() or value.dtype == torch.bool):
        return value.item()
    return None


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_clamp_fits(clamp_value, dtype: torch.dtype) -> None:
    """Upstream clamps with ``torch.clamp``, which refuses a finite bound beyond the clamped tensor's range (the
    output's dtype; the input's for ``un_norm``): the kernels would clamp at inf instead."""
    # (clamp_value > 0, so finite means != inf; Dynamo traces that comparison when it makes clamp_value a symbolic
    # float, but not math.isfinite)
    if clamp_value is not None and clamp_value != math.inf and clamp_value > torch.finfo(dtype).max:
        raise RuntimeError(
            f"clamp_value: {clamp_value!r} cannot be converted to {str(dtype).replace('torch.', '')} without "
            f"overflow (the dtype it clamps, as torch.clamp requires)"
        )


def _check_normalizable(arr: Tensor, un_norm: bool, clamp_value) -> None:
    """What ``normalize`` refuses whatever the statistics: bool and complex tensors, and a ``clamp_value`` beyond
    the range of the dtype it clamps (integer input is normalized as float32)."""
    if isinstance(arr, Proxy):  # (reached by a lazy module only)
        raise TypeError("normalize: a lazy normalizer cannot take its shape from a torch.fx symbolic trace; "
                        "give it a shape= or record a batch before tracing")
    if not isinstance(arr, Tensor):  # (upstream's arithmetic raises TypeError for a numpy array or a list too)
        raise TypeError(f"normalize: expected a tensor, got {type(arr).__name__}")
    if not arr.is_floating_point():
        if arr.dtype == torch.bool or arr.is_complex():
            raise TypeError(f"normalize: expected a real-valued tensor (floating point or integer), got {arr.dtype}")
        un_norm = False  # the float32 it becomes is what both ways clamp
    _check_clamp_fits(clamp_value, arr.dtype if un_norm else normalized_dtype(arr.dtype))


def _checked_number(name: str, expected: str, in_range, value, optional: bool = False):
    """``value`` as a Python number if ``in_range(number)``; None stays None when ``optional``."""
    if optional and value is None:
        return None
    number = _plain_number(value)
    if number is None or not in_range(number):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return number


_check_epsilon = functools.partial(
    _checked_number, "epsilon", "a finite number >= 0", lambda n: math.isfinite(n) and n >= 0
)
_check_clamp_value = functools.partial(
    _checked_number, "clamp_value", "None or a number > 0", lambda n: n > 0, optional=True
)
_check_ema_decay = functools.partial(
    _checked_number, "ema_decay", "None or a number in (0, 1)", lambda n: 0.0 < n < 1.0, optional=True
)
_check_gamma = functools.partial(_checked_number, "gamma", "a number in [0, 1]", lambda n: 0.0 <= n <= 1.0)


def _check_nonfinite(nonfinite):
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite: expected one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    return nonfinite


def _check_sync(sync):
    if sync not in SYNC_MODES:
        raise ValueError(f"sync: expected one of {SYNC_MODES}, got {sync!r}")
    return sync


# The hyperparameters and the communicator, checked when the constructor sets them and whenever they are assigned
# later (upstream's are plain attributes, so callers may change them): the backends rely on the checked ranges.
_HYPERPARAMETER_CHECKS = {
    "fabric": distributed.check_fabric,
    "epsilon": _check_epsilon,
    "clamp_value": _check_clamp_value,
    "ema_decay": _check_ema_decay,
    "gamma": _check_gamma,
    "nonfinite": _check_nonfinite,
    "sync": _check_sync,
}


def _check_arguments(epsilon, clamp_value, ema_decay, nonfinite, sync):
    """Validates the constructor's arguments, all before any is set; returns ``(epsilon, clamp_value, ema_decay)``
    as Python numbers."""
    checked = _check_epsilon(epsilon), _check_clamp_value(clamp_value), _check_ema_decay(ema_decay)
    _check_nonfinite(nonfinite)
    _check_sync(sync)
    return checked
