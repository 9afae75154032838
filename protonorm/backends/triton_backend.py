"""The ``triton`` backend: the fused kernels of :mod:`protonorm.kernels`, registered as torch custom ops.

Each kernel is a ``torch.library.custom_op`` in the ``protonorm`` namespace with a fake implementation and
its mutated arguments declared, so ``torch.compile(fullgraph=True)`` traces through the backend and CUDA
graphs capture it (once an eager record has made the merge's counter: see ``_ticket_for``). In eager mode,
with no dispatch mode active and plain tensors, the backend calls the ops' bodies directly (the same launches;
the dispatcher's way to a custom op costs far more than a launch), and the module's hot calls come straight to
those bodies through the ``try_`` methods when their arguments need nothing converted. Launches per call:
``moments`` 1, ``merge`` 1, ``combine`` 1, ``normalize`` 1, ``normalize_moments`` 1, ``reward_moments`` 1; a record
is therefore two launches, with no host sync and, once the workspace holds its parts buffer, no allocation.

CUDA tensors always work; CPU tensors work only under the Triton interpreter (``TRITON_INTERPRET=1`` set
before Triton is imported), which is how the kernels are tested without a GPU.
"""
# No ``from __future__ import annotations`` here: torch 2.4's ``custom_op`` reads the ops' schemas from their
# annotations and takes only evaluated types, not their names as strings.

import os
import re
import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .base import (FLAG_DTYPES, Backend, as_reset_flags, check_elements_apart, check_in_place_or_apart,
                   check_not_sharing, eager_plain, elements_apart, exported, in_place_or_apart, is_negated_view,
                   mark_written, normalized_dtype, reference_normalize_moments, reference_reward_moments,
                   workspace_buffer)

try:
    import triton  # noqa: F401

    from protonorm.kernels import merge as _merge
    from protonorm.kernels import moments as _moments
    from protonorm.kernels import normalize as _normalize
    from protonorm.kernels import normalize_moments as _normalize_moments
    from protonorm.kernels import reward as _reward

    UNAVAILABLE_REASON: Optional[str] = None
except Exception as exc:  # triton missing or broken
    UNAVAILABLE_REASON = f"triton could not be imported ({type(exc).__name__}: {exc})"

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PARTS_KEY = "triton_parts"


def interpreter_problem(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why the Triton interpreter of ``triton_version`` cannot run the kernels beside numpy ``numpy_version``, or
    None: before Triton 3.2 its loads and stores do nothing with numpy 2 (no error; the outputs stay unwritten)."""
    def major_minor(version: str) -> Tuple[int, ...]:
        found = re.match(r"(\d+)\.(\d+)", version)  # "3.0.0", "3.1.0+git1a2b", "2.0.0rc1"
        return (int(found[1]), int(found[2])) if found else ()

    triton_release, numpy_release = major_minor(triton_version), major_minor(numpy_version)
    if triton_release and numpy_release and triton_release < (3, 2) and numpy_release >= (2,):
        return (f"the interpreter of Triton {triton_version} reads and writes nothing with numpy {numpy_version} "
                "(fixed in Triton 3.2): install numpy<2 or triton>=3.2")
    return None


if UNAVAILABLE_REASON is None:
    import numpy

    INTERPRETER_PROBLEM = interpreter_problem(triton.__version__, numpy.__version__)

# The multi-program merge needs an int32 counter that is zero between launches. One per set of statistics, keyed by
# device and the address of its ``count``, created on first use, with a weak reference to the memory of that count:
# a captured CUDA graph keeps pointing at the counter, so it lives as long as the count's memory (whichever tensor
# objects reach it), and goes when a new counter is made after that memory was freed (modules rebuilt, moved or
# loaded over a long run would otherwise leave one each behind).
_tickets: Dict[Tuple[str, int], Tuple[Tensor, "weakref.ref"]] = {}


def _ticket_for(count: Tensor) -> Tensor:
    key = (str(count.device), count.data_ptr())
    entry = _tickets.get(key)
    if entry is not None and entry[1]() is not None:
        return entry[0]
    if entry is not None:  # another count lives where a freed one did: the counter, zero, serves it now
        ticket = entry[0]
    else:
        if count.is_cuda and torch.cuda.is_current_stream_capturing():
            # Made during capture, the counter would be zeroed only when the graph replays: an eager record
            # before that would read uninitialized memory and could leave `count` unmerged for good.
            raise RuntimeError(
                "protonorm: the first record into these statistics was made while capturing a CUDA graph; "
                "record one batch eagerly before capturing (the usual warm-up)"
            )
        for stale in [k for k, (_, memory) in _tickets.items() if memory() is None]:
            del _tickets[stale]
        ticket = torch.zeros(1, dtype=torch.int32, device=count.device)
    _tickets[key] = (ticket, weakref.ref(count.untyped_storage()))
    return ticket


# ------------------------------------------------------------------------------------------ custom ops
# Each op's body is a plain function: the op wraps it for torch.compile, dispatch modes and fake tensors, and in
# eager mode the backend calls it directly (``eager_plain``), skipping the 23-30 us the dispatcher spends reaching a
# custom op's Python kernel on the CPUs measured, per launch (bench/RESULTS.md).
def _moments_impl(x: Tensor, mask: Optional[Tensor], parts: Tensor) -> None:
    _moments.launch(x, mask, parts)


def _merge_impl(parts: Tensor, mean: Tensor, var: Tensor, count: Tensor, dropped: Tensor,
                ema_decay: Optional[float]) -> None:
    ticket = _ticket_for(count) if _merge.needs_ticket(parts) else None
    _merge.launch_fold(parts, mean, var, count, dropped, ema_decay, ticket)
    mark_written((mean, var, count, dropped))


def _combine_impl(parts: Tensor) -> Tensor:
    out = parts.new_empty((1, parts.shape[1]))
    _merge.launch_combine(parts, out)
    return out


def _normalize_impl(x: Tensor, mean: Tensor, var: Tensor, epsilon: float, clamp_value: Optional[float],
                    un_norm: bool, center: bool, out: Tensor) -> None:
    _normalize.launch(x, mean, var, epsilon, clamp_value, un_norm, center, out)


def _normalize_moments_impl(x: Tensor, mean: Tensor, var: Tensor, epsilon: float, clamp_value: Optional[float],
                            out: Tensor, parts: Tensor) -> None:
    _normalize_moments.launch(x, mean, var, epsilon, clamp_value, out, parts)


def _reward_moments_impl(reward: Tensor, terminated: Tensor, discounted: Tensor, gamma: float, parts: Tensor) -> None:
    if discounted.shape[1] > _moments.MAX_BLOCK_D:
        # The reward kernel holds whole rows in one tile: wider than a column tile, that outgrows a program's
        # registers, and past 2^20 features Triton's largest tensor. Such rows advance with torch's elementwise ops
        # (the kernel's operations, in its dtypes), and the moments kernel takes them in column tiles.
        discounted.copy_(reference.discounted_return_update(discounted, reward, terminated.unsqueeze(1), gamma))
        _moments.launch(discounted, None, parts)
        return
    if not in_place_or_apart(discounted, reward):
        # Each program advances its rows of the returns and would read rows of the reward that another had already
        # advanced: the step takes the reward as it was, as upstream's out-of-place arithmetic does.
        reward = reward.clone(memory_format=torch.contiguous_format)
    _reward.launch(reward, terminated, discounted, gamma, parts)
    mark_written((discounted,))


if UNAVAILABLE_REASON is None:

    @torch.library.custom_op("protonorm::triton_moments", mutates_args=("parts",))
    def triton_moments(x: Tensor, mask: Optional[Tensor], parts: Tensor) -> None:
        _moments_impl(x, mask, parts)

    @triton_moments.register_fake
    def _(x, mask, parts):
        return None

    @torch.library.custom_op("protonorm::triton_merge", mutates_args=("mean", "var", "count", "dropped"))
    def triton_merge(
        parts: Tensor, mean: Tensor, var: Tensor, count: Tensor, dropped: Tensor, ema_decay: Optional[float]
    ) -> None:
        _merge_impl(parts, mean, var, count, dropped, ema_decay)

    @triton_merge.register_fake
    def _(parts, mean, var, count, dropped, ema_decay):
        return None

    @torch.library.custom_op("protonorm::triton_combine", mutates_args=())
    def triton_combine(parts: Tensor) -> Tensor:
        return _combine_impl(parts)

    @triton_combine.register_fake
    def _(parts):
        return parts.new_empty((1, parts.shape[1]))

    @torch.library.custom_op("protonorm::triton_normalize", mutates_args=("out",))
    def triton_normalize(
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        epsilon: float,
        clamp_value: Optional[float],
        un_norm: bool,
        center: bool,
        out: Tensor,
    ) -> None:
        _normalize_impl(x, mean, var, epsilon, clamp_value, un_norm, center, out)

    @triton_normalize.register_fake
    def _(x, mean, var, epsilon, clamp_value, un_norm, center, out):
        return None

    @torch.library.custom_op("protonorm::triton_normalize_moments", mutates_args=("out", "parts"))
    def triton_normalize_moments(
        x: Tensor, mean: Tensor, var: Tensor, epsilon: float, clamp_value: Optional[float], out: Tensor, parts: Tensor
    ) -> None:
        _normalize_moments_impl(x, mean, var, epsilon, clamp_value, out, parts)

    @triton_normalize_moments.register_fake
    def _(x, mean, var, epsilon, clamp_value, out, parts):
        return None

    @torch.library.custom_op("protonorm::triton_reward_moments", mutates_args=("discounted", "parts"))
    def triton_reward_moments(reward: Tensor, terminated: Tensor, discounted: Tensor, gamma: float, parts: Tensor) -> None:
        _reward_moments_impl(reward, terminated, discounted, gamma, parts)

    @triton_reward_moments.register_fake
    def _(reward, terminated, discounted, gamma, parts):
        return None


# ------------------------------------------------------------------------------------------ validation
# Each condition is a predicate (``_is_*``) that the direct calls use as it is; the checks of the general way run it
# and, only when it fails, convert the input or raise saying what was expected.
def _has_memory(t: Tensor) -> bool:
    """Whether ``t``'s elements have memory: torch's ZeroTensor (``torch._efficientzerotensor``, what some autograd
    formulas return) has a null data pointer, which Triton hands to a kernel as it is, and reading it is an illegal
    address, after which the CUDA context is lost. (Not checked inside a trace, whose tensors have no memory yet.)"""
    return torch.compiler.is_compiling() or type(t) is not Tensor or t.data_ptr() != 0 or t.numel() == 0


def _check_memory(name: str, t: Tensor) -> None:
    if not _has_memory(t):
        raise ValueError(f"{name}: expected a tensor with memory, got a null data pointer (a ZeroTensor? clone() it)")


def _is_kernel_rows(x: Tensor) -> bool:
    """``[B, D]`` rows the kernels read as they are: a dtype they load, unit column stride, values in memory (the
    kernels read raw memory, so a lazily negated view would be read unnegated, and a ZeroTensor not at all)."""
    return (x.dim() == 2 and x.dtype in KERNEL_DTYPES and (x.shape[1] <= 1 or x.stride(1) == 1)
            and not is_negated_view(x) and _has_memory(x))


def _check_rows(x: Tensor, what: str) -> Tensor:
    """``x`` as a kernel-ready ``[B, D]`` input: unit column stride and a dtype the kernels load."""
    if isinstance(x, Tensor) and _is_kernel_rows(x):
        return x
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D [B, D] tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in KERNEL_DTYPES:
        if x.is_complex():
            raise TypeError(f"{what}: expected a real tensor, got {x.dtype}")
        x = x.to(torch.float64)  # integers and exotic floats: exact in float64
    if is_negated_view(x):
        x = x.resolve_neg()
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    _check_memory(what, x)
    return x


def _is_stat(t: Tensor, device: torch.device, num_features: int) -> bool:
    return (t.dtype == torch.float64 and t.dim() == 1 and t.shape[0] == num_features and t.is_contiguous()
            and t.device == device)


def _check_stats(mean: Tensor, var: Tensor, device: torch.device, num_features: int) -> None:
    for name, t in (("mean", mean), ("var", var)):
        if _is_stat(t, device, num_features):
            continue
        if t.dtype != torch.float64 or t.dim() != 1 or t.shape[0] != num_features or not t.is_contiguous():
            raise ValueError(
                f"{name}: expected a contiguous float64 tensor of shape [{num_features}], "
                f"got {t.dtype} {tuple(t.shape)}"
            )
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")


def _is_counter(t: Tensor, device: torch.device) -> bool:
    return t.dtype == torch.int64 and t.dim() == 0 and t.device == device


def _is_merge_target(mean: Tensor, var: Tensor, count: Tensor, dropped: Tensor, device: torch.device,
                     num_features: int) -> bool:
    """The statistics a merge updates in place, as the kernel takes them."""
    return (_is_stat(mean, device, num_features) and _is_stat(var, device, num_features)
            and _is_counter(count, device) and _is_counter(dropped, device))


def _check_counters(count: Tensor, dropped: Tensor, device: torch.device) -> None:
    for name, t in (("count", count), ("dropped", dropped)):
        if not _is_counter(t, device):
            raise ValueError(f"{name}: expected a 0-d int64 tensor on {device}, got {t.dtype} {tuple(t.shape)}")


def _is_out_layout(out: Tensor, x: Tensor) -> bool:
    return (out.dtype == normalized_dtype(x.dtype) and out.shape == x.shape and out.device == x.device
            and out.stride(-1) == 1 and not is_negated_view(out))


def _is_out(out: Tensor, x: Tensor) -> bool:
    """An output the kernels write as it is: ``x``'s shape, the normalized dtype, unit column stride, and no two
    elements in one place (programs writing rows that share memory would leave the last write)."""
    return _is_out_layout(out, x) and elements_apart(out)


def _check_out(out: Tensor, x: Tensor) -> None:
    if not _is_out(out, x):
        if _is_out_layout(out, x):
            check_elements_apart("out", out)
        want = normalized_dtype(x.dtype)
        raise ValueError(
            f"out: expected a {want} tensor of shape {tuple(x.shape)} on {x.device} with unit column stride "
            "(and not a lazily negated view), "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def _is_parts(parts: Tensor, num_features: int) -> bool:
    """Float64 ``[K, 2 + 2D]`` parts (of ``num_features`` features unless that is negative), unit column stride."""
    return (parts.dim() == 2 and parts.dtype == torch.float64 and (parts.shape[1] - reference.HEADER) % 2 == 0
            and (num_features < 0 or parts.shape[1] == reference.parts_width(num_features))
            and (parts.shape[1] <= 1 or parts.stride(1) == 1))


def _is_returns(discounted: Tensor, reward: Tensor) -> bool:
    """The discounted returns the reward kernel updates in place, for ``reward``: each element in a place of its own,
    holding its value (not a lazily negated view, not a ZeroTensor)."""
    return (discounted.dtype in (torch.float32, torch.float64) and discounted.shape == reward.shape
            and discounted.device == reward.device and (discounted.shape[1] <= 1 or discounted.stride(1) == 1)
            and elements_apart(discounted) and not is_negated_view(discounted) and _has_memory(discounted))


def _parts_buffer(workspace: dict, x: Tensor, single_tile: bool = False) -> Tensor:
    num_rows, num_features = x.shape
    plan = _moments.tile_plan(num_rows, num_features, x.device, single_tile=single_tile)
    return workspace_buffer(
        workspace, PARTS_KEY, (plan.splits, reference.parts_width(num_features)), torch.float64, x.device
    )


# ------------------------------------------------------------------------------------------ devices
# Triton compiles for NVIDIA GPUs of compute capability 7.0 and newer (torch.compile asks the same); the kernels are
# written and tested for NVIDIA GPUs only. Decided once per device from what torch reports of it (its properties,
# which Dynamo folds to constants inside a trace), so that ``auto`` falls back before a kernel fails to compile.
MIN_CAPABILITY = (7, 0)
_gpu_problems: Dict[int, Optional[str]] = {}


def _gpu_problem(device: torch.device) -> Optional[str]:
    """Why the kernels cannot run on the CUDA device ``device``, in one line, or None."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _gpu_problems:
        if torch.version.hip is not None:
            problem = (f"the Triton kernels are written for NVIDIA GPUs, and this torch is a ROCm build "
                       f"(HIP {torch.version.hip})")
        else:
            props = torch.cuda.get_device_properties(index)
            problem = None
            if (props.major, props.minor) < MIN_CAPABILITY:
                problem = (f"Triton compiles for GPUs of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                           f"or newer, and cuda:{index} ({props.name}) is {props.major}.{props.minor}")
        _gpu_problems[index] = problem
    return _gpu_problems[index]


# ------------------------------------------------------------------------------------------ backend
class TritonBackend(Backend):
    name = "triton"

    def supports(self, device: torch.device) -> Optional[str]:
        if UNAVAILABLE_REASON is not None:
            return UNAVAILABLE_REASON
        device = torch.device(device)
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if interpreted and INTERPRETER_PROBLEM is not None and device.type in ("cuda", "cpu"):
            return INTERPRETER_PROBLEM
        if device.type == "cuda":
            return None if interpreted else _gpu_problem(device)
        if device.type == "cpu" and interpreted:
            return None
        if device.type == "cpu":
            return "Triton kernels run on CUDA devices (on the CPU only under TRITON_INTERPRET=1)"
        return f"Triton kernels run on CUDA devices, not {device.type}"

    def moments(self, x: Tensor, mask: Optional[Tensor], workspace: dict) -> Tensor:
        x = _check_rows(x, "moments")
        if mask is not None:
            if mask.dim() != 1 or mask.shape[0] != x.shape[0] or mask.device != x.device:
                raise ValueError(
                    f"mask: expected a [{x.shape[0]}] tensor on {x.device}, got {tuple(mask.shape)} on {mask.device}"
                )
            _check_memory("mask", mask)
        if exported(x):
            return reference.batch_moments(x, mask)
        parts = _parts_buffer(workspace, x)
        op = _moments_impl if eager_plain(x, mask, parts) else torch.ops.protonorm.triton_moments
        op(x, mask, parts)
        return parts

    def merge(self, parts, mean, var, count, dropped, ema_decay) -> None:
        parts = self._check_parts(parts, mean.shape[0] if mean.dim() == 1 else -1)
        _check_stats(mean, var, parts.device, (parts.shape[1] - reference.HEADER) // 2)
        _check_counters(count, dropped, parts.device)
        if parts.shape[0] == 0:
            return
        op = _merge_impl if eager_plain(parts, mean, var, count, dropped) else torch.ops.protonorm.triton_merge
        op(parts, mean, var, count, dropped, ema_decay)

    def combine(self, parts: Tensor) -> Tensor:
        parts = self._check_parts(parts, -1)
        if parts.shape[0] == 0:
            return parts.new_zeros((1, parts.shape[1]))
        return (_combine_impl if eager_plain(parts) else torch.ops.protonorm.triton_combine)(parts)

    def normalize(self, x, mean, var, epsilon, clamp_value, un_norm, center, out) -> None:
        x = _check_rows(x, "normalize")
        _check_stats(mean, var, x.device, x.shape[1])
        _check_out(out, x)
        check_in_place_or_apart("out", out, x)
        clamp_value = None if clamp_value is None else float(clamp_value)
        op = _normalize_impl if eager_plain(x, mean, var, out) else torch.ops.protonorm.triton_normalize
        op(x, mean, var, float(epsilon), clamp_value, bool(un_norm), bool(center), out)

    def normalize_moments(self, x, mean, var, epsilon, clamp_value, out, workspace) -> Tensor:
        x = _check_rows(x, "normalize")
        _check_stats(mean, var, x.device, x.shape[1])
        _check_out(out, x)
        check_not_sharing("out", out, x)
        if exported(x):
            return reference_normalize_moments(x, mean, var, epsilon, clamp_value, out)
        parts = _parts_buffer(workspace, x)
        clamp_value = None if clamp_value is None else float(clamp_value)
        direct = eager_plain(x, mean, var, out, parts)
        op = _normalize_moments_impl if direct else torch.ops.protonorm.triton_normalize_moments
        op(x, mean, var, float(epsilon), clamp_value, out, parts)
        return parts

    def reward_moments(self, reward, terminated, discounted, gamma, workspace) -> Tensor:
        reward = _check_rows(reward, "record_reward")
        if not _is_returns(discounted, reward):
            returns_dtypes = (torch.float32, torch.float64)
            if discounted.dim() != 2 or discounted.shape != reward.shape or discounted.dtype not in returns_dtypes:
                raise ValueError(
                    f"discounted: expected a float32/float64 tensor of shape {tuple(reward.shape)}, "
                    f"got {discounted.dtype} {tuple(discounted.shape)}"
                )
            if discounted.device != reward.device:
                raise ValueError(f"discounted: expected a tensor on {reward.device}, got {discounted.device}")
            if discounted.shape[1] > 1 and discounted.stride(1) != 1:
                raise ValueError("discounted: expected unit column stride (it is updated in place)")
            check_elements_apart("discounted", discounted)
            if is_negated_view(discounted):
                raise ValueError("discounted: expected a tensor holding its values, got a lazily negated view "
                                 "(resolve_neg())")
            _check_memory("discounted", discounted)
        terminated = terminated.reshape(-1)
        if terminated.shape[0] != reward.shape[0]:
            raise ValueError(f"terminated: expected {reward.shape[0]} entries, got {terminated.shape[0]}")
        if terminated.is_complex():
            raise TypeError(f"terminated: expected bool, integer or floating-point flags, got {terminated.dtype}")
        _check_memory("terminated", terminated)
        terminated = as_reset_flags(terminated)
        if exported(reward):
            return reference_reward_moments(reward, terminated, discounted, gamma)
        parts = _parts_buffer(workspace, discounted, single_tile=True)
        direct = eager_plain(reward, terminated, discounted, parts)
        op = _reward_moments_impl if direct else torch.ops.protonorm.triton_reward_moments
        op(reward, terminated, discounted, float(gamma), parts)
        return parts

    # ---------------------------------------------------------------------------------- direct calls
    # The module's hot calls, straight to the ops' bodies when every argument is what the kernels take as it is
    # (Backend.try_normalize_moments). The general way adds the module's own layers and the methods above.
    direct = True

    def try_normalize_moments(self, x, mean, var, epsilon, clamp_value, out, workspace):
        if not self._plain_normalize(x, mean, var, out):
            return None
        parts = _parts_buffer(workspace, x)
        clamp_value = None if clamp_value is None else float(clamp_value)
        _normalize_moments_impl(x, mean, var, float(epsilon), clamp_value, out, parts)
        return parts

    def try_normalize(self, x, mean, var, epsilon, clamp_value, out):
        if not self._plain_normalize(x, mean, var, out):
            return False
        clamp_value = None if clamp_value is None else float(clamp_value)
        _normalize_impl(x, mean, var, float(epsilon), clamp_value, False, True, out)
        return True

    def try_merge(self, parts, mean, var, count, dropped, ema_decay):
        if not (eager_plain(parts, mean, var, count, dropped) and _is_parts(parts, -1) and parts.shape[0] > 0):
            return False
        if not _is_merge_target(mean, var, count, dropped, parts.device, (parts.shape[1] - reference.HEADER) // 2):
            return False
        _merge_impl(parts, mean, var, count, dropped, ema_decay)
        return True

    def try_reward_record(self, reward, terminated, discounted, gamma, mean, var, count, dropped, ema_decay,
                          workspace):
        if not eager_plain(reward, terminated, discounted, mean, var, count, dropped):
            return False
        if reward.dim() == 1 and discounted.dim() == 1:  # [num_envs]: the kernel takes one-feature rows
            reward, discounted = reward.unsqueeze(1), discounted.unsqueeze(1)
        if not (_is_kernel_rows(reward) and reward.shape[0] > 0 and _is_returns(discounted, reward)
                and terminated.dim() == 1 and terminated.shape[0] == reward.shape[0]
                and terminated.device == reward.device and terminated.dtype in FLAG_DTYPES and _has_memory(terminated)):
            return False
        if not _is_merge_target(mean, var, count, dropped, reward.device, reward.shape[1]):
            return False
        parts = _parts_buffer(workspace, discounted, single_tile=True)
        _reward_moments_impl(reward, terminated, discounted, float(gamma), parts)
        _merge_impl(parts, mean, var, count, dropped, ema_decay)
        return True

    @staticmethod
    def _plain_normalize(x, mean, var, out) -> bool:
        return (eager_plain(x, mean, var, out) and _is_kernel_rows(x) and x.shape[0] > 0 and x.shape[1] > 0
                and _is_stat(mean, x.device, x.shape[1]) and _is_stat(var, x.device, x.shape[1]) and _is_out(out, x))

    @staticmethod
    def _check_parts(parts: Tensor, num_features: int) -> Tensor:
        if _is_parts(parts, num_features):
            return parts
        if parts.dim() != 2 or parts.dtype != torch.float64 or (parts.shape[1] - reference.HEADER) % 2:
            raise ValueError(f"parts: expected a float64 [K, 2 + 2D] tensor, got {parts.dtype} {tuple(parts.shape)}")
        if num_features >= 0 and parts.shape[1] != reference.parts_width(num_features):
            raise ValueError(
                f"parts: expected width {reference.parts_width(num_features)} for {num_features} features, "
                f"got {parts.shape[1]}"
            )
        return parts if parts.stride(1) == 1 else parts.contiguous()


BACKEND = TritonBackend()
