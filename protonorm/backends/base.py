"""The interface every compute backend implements, and small helpers they share.

A backend works on 2-D views: ``x`` is ``[B, D]`` with ``x.stride(1) == 1`` (any row stride), the running
statistics are flat float64 ``[D]`` tensors plus int64 0-d ``count`` / ``dropped`` counters, all on the
device of ``x``. Moments travel as float64 *parts* (see :mod:`protonorm.reference`). No method may read a
tensor value on the host.

``workspace`` is a dict owned by the caller (one per normalizer and purpose); a backend may keep
buffers in it across calls, so steady-state calls allocate nothing but their outputs. Parts returned
from a workspace stay valid until the next call that is handed the same dict.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference


class Backend:
    """Base class: subclasses override every method below that raises ``NotImplementedError``; ``reward_record``
    composes two of them and the ``try_`` methods decline every call unless a subclass overrides them."""

    name: str = "?"

    def supports(self, device: torch.device) -> Optional[str]:
        """None if this backend can run on ``device``, otherwise a one-line reason why not."""
        raise NotImplementedError

    def moments(self, x: Tensor, mask: Optional[Tensor], workspace: dict) -> Tensor:
        """Parts ``[K, 2 + 2D]`` of the rows of ``x`` (``mask``: optional bool ``[B]``, False = ignore)."""
        raise NotImplementedError

    def merge(
        self,
        parts: Tensor,
        mean: Tensor,
        var: Tensor,
        count: Tensor,
        dropped: Tensor,
        ema_decay: Optional[float],
    ) -> None:
        """Reduce ``parts`` in a fixed order and fold them into the running statistics, in place."""
        raise NotImplementedError

    def combine(self, parts: Tensor) -> Tensor:
        """Reduce ``[K, W]`` parts to one ``[1, W]`` part (a fresh tensor)."""
        raise NotImplementedError

    def normalize(
        self,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        epsilon: float,
        clamp_value: Optional[float],
        un_norm: bool,
        center: bool,
        out: Tensor,
    ) -> None:
        """Write ``reference.normalize(x, ...)`` into ``out`` (``[B, D]``, contiguous, dtype as reference)."""
        raise NotImplementedError

    def normalize_moments(
        self,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        epsilon: float,
        clamp_value: Optional[float],
        out: Tensor,
        workspace: dict,
    ) -> Tensor:
        """``normalize(x, un_norm=False, center=True)`` into ``out`` *and* the parts of ``x``, in one read."""
        raise NotImplementedError

    def reward_moments(
        self, reward: Tensor, terminated: Tensor, discounted: Tensor, gamma: float, workspace: dict
    ) -> Tensor:
        """Update ``discounted`` ([B, D]) in place with ``reference.discounted_return_update`` and return the
        parts of its new value. ``reward`` is ``[B, D]``; ``terminated`` is ``[B]`` of any dtype (bool, int or
        float; nonzero = reset)."""
        raise NotImplementedError

    def reward_record(
        self,
        reward: Tensor,
        terminated: Tensor,
        discounted: Tensor,
        gamma: float,
        mean: Tensor,
        var: Tensor,
        count: Tensor,
        dropped: Tensor,
        ema_decay: Optional[float],
        workspace: dict,
    ) -> None:
        """``reward_moments`` then ``merge`` of its parts, for a caller that needs the parts for nothing else;
        a backend may fuse the two."""
        parts = self.reward_moments(reward, terminated, discounted, gamma, workspace)
        self.merge(parts, mean, var, count, dropped, ema_decay)

    # ---------------------------------------------------------------------------------------- direct calls
    # The module's per-call hot paths (normalize, the record that follows a training normalize, the per-step reward
    # record) first offer their call to these. A backend that can take such a call more cheaply than through the
    # methods above (``direct = True``) does so and reports it; otherwise it returns None / False having touched
    # nothing, and the module goes the general way, which raises the errors. (A try_ method may raise too, before
    # touching anything, but only an error the general way raises for the same call: Triton's width limit and its
    # refusal to start a merge counter inside CUDA graph capture.) The module
    # only offers calls whose inputs it has itself accepted: ``x`` ``[B, D]``, the statistics of its layout.

    direct: bool = False  # whether the try_ methods can take calls at all

    def try_normalize_moments(
        self,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        epsilon: float,
        clamp_value: Optional[float],
        out: Tensor,
        workspace: dict,
    ) -> Optional[Tensor]:
        """``normalize_moments``, returning its parts, or None."""
        return None

    def try_normalize(
        self, x: Tensor, mean: Tensor, var: Tensor, epsilon: float, clamp_value: Optional[float], out: Tensor
    ) -> bool:
        """``normalize(..., un_norm=False, center=True, out)``, or False."""
        return False

    def try_merge(
        self, parts: Tensor, mean: Tensor, var: Tensor, count: Tensor, dropped: Tensor, ema_decay: Optional[float]
    ) -> bool:
        """``merge`` of parts that this backend's ``normalize_moments`` returned, or False."""
        return False

    def try_reward_record(
        self,
        reward: Tensor,
        terminated: Tensor,
        discounted: Tensor,
        gamma: float,
        mean: Tensor,
        var: Tensor,
        count: Tensor,
        dropped: Tensor,
        ema_decay: Optional[float],
        workspace: dict,
    ) -> bool:
        """``reward_record`` with ``reward`` and ``discounted`` of one shape, ``[B]`` (one feature) or ``[B, D]``,
        and ``terminated`` ``[B]``; or False."""
        return False


# How many TorchDispatchModes are active (private; None where this torch lacks it: then nothing is called directly).
dispatch_stack_depth = getattr(torch._C, "_len_torch_dispatch_stack", None)
# torch.autograd.graph.increment_version without its Python wrapper, which costs as much again.
_increment_version = getattr(torch._C, "_increment_version", None) or torch.autograd.graph.increment_version


def eager_plain(*tensors) -> bool:
    """True when calling an op's Python implementation directly is what the op would do anyway: not tracing or
    compiling, no dispatch mode to notify, and plain tensors (no FakeTensor or other subclass). Backends then skip
    the dispatcher, whose way to a Python kernel costs 2.5 us for a plainly registered op and 23-30 us for a
    ``torch.library.custom_op`` on the CPUs measured (the latter in bench/RESULTS.md, the Triton backend's eager
    calls)."""
    if torch.compiler.is_compiling() or dispatch_stack_depth is None or dispatch_stack_depth():
        return False
    for t in tensors:
        if type(t) is not Tensor and t is not None:
            return False
    return True


# torch.compiler.is_exporting, which torch 2.4 to 2.6 lack: there an export shows only where the batch size is a
# symbol (a dynamic batch dimension), and a static one records with the kernels, their parts fixed by its batch size.
_is_exporting = getattr(torch.compiler, "is_exporting", None)


def exported(x: Tensor) -> bool:
    """Whether torch.export is tracing this call on the batch ``x``. The kernels' number of parts depends on the
    batch size through max(), min() and ceilings, on which the trace places guards (a non-strict trace shows the
    batch size as a symbol and fails on them; a strict one, through Dynamo, keeps them as run-time checks): the
    program would hold for one range of batch sizes only. The backends then take the moments with the reference
    math below, in a single part that holds for any size, and the program records with it, portable as well: no
    protonorm op in it."""
    return (_is_exporting is not None and _is_exporting()) or not isinstance(x.shape[0], int)


def reference_normalize_moments(x: Tensor, mean: Tensor, var: Tensor, epsilon: float, clamp_value, out: Tensor,
                                rows_per_part: Optional[int] = None) -> Tensor:
    """``Backend.normalize_moments`` with the reference math (parts of ``rows_per_part`` rows, or one)."""
    reference.normalize(x, mean, var, epsilon, clamp_value, out=out)
    return reference.batch_moments(x, None, rows_per_part)


def reference_reward_moments(reward: Tensor, terminated: Tensor, discounted: Tensor, gamma: float,
                             rows_per_part: Optional[int] = None) -> Tensor:
    """``Backend.reward_moments`` with the reference math (parts of ``rows_per_part`` rows, or one)."""
    t = terminated.reshape(-1, *([1] * (discounted.dim() - 1)))
    discounted.copy_(reference.discounted_return_update(discounted, reward, t, gamma))
    return reference.batch_moments(discounted, None, rows_per_part)


def mark_written(tensors: Tuple[Tensor, ...]) -> None:
    """Tells torch that a kernel changed ``tensors`` in place through their data pointers, which torch cannot see:
    their version counters move on, as with torch's own in-place ops, so that autograd refuses a tensor saved for
    backward and since changed, and code comparing versions sees the change. (About 0.3 us a call.) Inference
    tensors have no version counter and are left out."""
    try:
        _increment_version(tensors)
    except RuntimeError:  # an inference tensor among them
        _increment_version(tuple(t for t in tensors if not t.is_inference()))


def _mark_each_written(tensors: Tuple[Tensor, ...]) -> None:
    """``mark_written`` one tensor a call, for torch 2.4, whose ``_increment_version`` takes no sequence (a newer
    one takes a lone tensor as the sequence of its rows)."""
    for t in tensors:
        if not t.is_inference():
            _increment_version(t)


def _increments_sequences() -> bool:
    try:
        _increment_version((torch.empty(0),))
    except RuntimeError:  # torch 2.4: "increment_version expect a Tensor as input"
        return False
    return True


if not _increments_sequences():
    mark_written = _mark_each_written  # noqa: F811


def is_negated_view(t: Tensor) -> bool:
    """Whether ``t`` is a lazily negated view (its memory holds the values unnegated). Never inside a trace, which
    cannot follow ``is_neg`` and whose tensors reach the kernels materialized."""
    return not torch.compiler.is_compiling() and t.is_neg()


def check_not_sharing(name: str, out: Tensor, x: Tensor) -> None:
    """Raise unless ``out`` and ``x`` live in different storages: a fused normalize + moments reads the batch's
    moments after it has written the output. (Not checked inside a trace, which has no storages to compare, nor for
    a tensor without memory, a ZeroTensor, whose storage cannot be read: the kernel's own checks refuse it, saying
    so.)"""
    if torch.compiler.is_compiling() or not (out.numel() and x.numel() and out.data_ptr() and x.data_ptr()):
        return
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        raise ValueError(f"{name}: expected a tensor that shares no memory with x (the moments are taken of x)")


def elements_apart(t: Tensor) -> bool:
    """Whether no two elements of ``t`` (``[B, D]`` with unit column stride, or 1-D) share memory: its rows, or the
    elements of a 1-D tensor, at least a row's length apart. What a kernel writes must be so, or several programs or
    threads would write one place and the last write would win (a stride-0 ``expand``)."""
    if t.is_contiguous() or t.dim() == 0 or t.shape[0] <= 1:
        return True
    return t.stride(0) >= (max(1, t.shape[1]) if t.dim() == 2 else 1)


def check_elements_apart(name: str, t: Tensor) -> None:
    """Raise unless :func:`elements_apart`, saying what was expected."""
    if not elements_apart(t):
        raise ValueError(f"{name}: expected elements that do not share memory, got shape {tuple(t.shape)} "
                         f"with strides {t.stride()}")


def _byte_span(t: Tensor) -> Tuple[int, int]:
    """The bytes ``[start, end)`` from ``t``'s first element to the end of its last."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def in_place_or_apart(out: Tensor, x: Tensor) -> bool:
    """Whether ``out`` (of ``x``'s shape) is ``x`` itself or lies apart from x's memory: a kernel that reads each
    element of ``x`` before it writes that element of ``out`` may write over its input, but an output anywhere else
    within x's memory would be written over rows and elements still to be read."""
    if out.numel() == 0 or x.numel() == 0:
        return True
    if out.data_ptr() == x.data_ptr() and out.dtype == x.dtype and out.stride() == x.stride():
        return True
    (x_start, x_end), (out_start, out_end) = _byte_span(x), _byte_span(out)
    return out_end <= x_start or x_end <= out_start


def check_in_place_or_apart(name: str, out: Tensor, x: Tensor) -> None:
    """Raise unless :func:`in_place_or_apart`: a plain normalize may write over its input, but not over elements
    still to be read (torch's own ops refuse such a partial overlap). Not checked inside a trace, which has no
    memory to compare."""
    if torch.compiler.is_compiling() or in_place_or_apart(out, x):
        return
    (x_start, _), (out_start, _) = _byte_span(x), _byte_span(out)
    raise ValueError(f"{name}: expected x itself or memory apart from x's, got a tensor at offset "
                     f"{out_start - x_start} bytes from x with strides {out.stride()} (x: {x.stride()}); clone() x")


# The dtypes of reset flags that the reward kernels load as they are; flags of any other real dtype (unsigned
# integers wider than a byte, float8) reach them as ``terminated != 0``.
FLAG_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
               torch.float32, torch.float64)


def as_reset_flags(terminated: Tensor) -> Tensor:
    """Real ``terminated`` flags as the reward kernels load them: as they are, or where they are nonzero."""
    return terminated if terminated.dtype in FLAG_DTYPES else terminated != 0


def outside_inference_mode(factory):
    """``factory()``, run so that the tensor it creates is a normal one even under ``torch.inference_mode()``.

    For state and buffers that are later updated in place: torch refuses in-place updates of an inference tensor
    outside inference mode, and rollouts often run under it, so whatever is created first there would break the
    training calls that follow (in-place updates of a normal tensor inside inference mode are allowed)."""
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return factory()
    return factory()


def workspace_buffer(workspace: dict, key, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A buffer cached in ``workspace`` under ``key``; reallocated only when shape, dtype or device change."""
    buf = workspace.get(key)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype or buf.device != device:
        buf = outside_inference_mode(lambda: torch.empty(shape, dtype=dtype, device=device))
        workspace[key] = buf
    return buf


def normalized_dtype(dtype: torch.dtype) -> torch.dtype:
    """Result dtype of ``normalize``: what upstream's ``x - mean.float()`` gives."""
    found = _NORMALIZED_DTYPES.get(dtype)  # a dict lookup is a fifth of torch.promote_types' cost
    return torch.promote_types(dtype, torch.float32) if found is None else found


_NORMALIZED_DTYPES = {dtype: torch.promote_types(dtype, torch.float32)
                      for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
