"""The ``cpp`` backend: the C++ CPU kernels of ``protonorm._C`` (built from ``csrc/``) behind torch.library ops.

The extension is optional. If it fails to import, or was built from other sources than these (its
``INTERFACE_VERSION`` differs, as with an in-place build left from an older checkout), ``UNAVAILABLE_REASON`` says
why in one line and the registry falls back to the torch backend. The kernels see no torch types: each op hands
them data pointers, shapes, strides in elements and a dtype code, after checking devices, dtypes and shapes here (a
wrong pointer would be memory corruption, not an exception).

Each kernel is a ``protonorm::cpp_*`` operator with a fake (meta) implementation and its mutated arguments declared
in the schema, so ``torch.compile`` can trace calls and ``torch.library.opcheck`` passes. They are defined with
``torch.library.define`` / ``impl`` rather than the ``custom_op`` decorator: the decorator's Python wrapper costs
about 15 us per call, the plain registration about 2.5 us, which matters for a reward record of a few thousand
scalars.

Batch moments are reported as parts (see :mod:`protonorm.reference`): the rows are cut into at most 64 parts of at
least 32K elements each (a split that depends on the shape alone, so results do not depend on the thread count).

In eager mode, with no dispatch mode active and plain CPU tensors, the backend calls the kernels' Python
implementations directly, skipping the dispatcher (about 2.5 us per op, against 7-13 us for a whole reward record of
4096 environments in bench/RESULTS.md); under ``torch.compile``, FakeTensor tracing or a ``TorchDispatchMode`` it
always goes through the ops.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import threading
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..reference import parts_width
from .base import (Backend, as_reset_flags, check_elements_apart, check_in_place_or_apart, check_not_sharing,
                   eager_plain, elements_apart, exported, in_place_or_apart, mark_written, normalized_dtype,
                   outside_inference_mode, reference_normalize_moments, reference_reward_moments)

# The bindings these sources call; csrc/bindings.cpp sets the same number (INTERFACE_VERSION).
INTERFACE_VERSION = 4


def interface_problem(module) -> Optional[str]:
    """Why an imported ``protonorm._C`` cannot serve these sources (None if it can): built from other sources."""
    found = getattr(module, "INTERFACE_VERSION", None)
    if found == INTERFACE_VERSION:
        return None
    return (f"protonorm._C was built from other sources (interface {found}, these need {INTERFACE_VERSION}); "
            "reinstall protonorm to rebuild it")


try:
    _C = importlib.import_module("protonorm._C")
    UNAVAILABLE_REASON: Optional[str] = interface_problem(_C)
except Exception as exc:  # not built, built for another Python, or a broken shared library
    _C = None
    UNAVAILABLE_REASON = f"protonorm._C could not be imported ({type(exc).__name__}: {exc})"
if UNAVAILABLE_REASON is not None:
    _C = None

# Must match enum DType in csrc/common.h.
_DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.bool: 4,
    torch.uint8: 5,
    torch.int8: 6,
    torch.int16: 7,
    torch.int32: 8,
    torch.int64: 9,
}
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

MAX_PARTS = 64
MIN_ELEMENTS_PER_PART = 1 << 15  # below this, finishing a part costs more than the rows in it


def parts_layout(rows: int, cols: int) -> Tuple[int, int]:
    """``(num_parts, rows_per_part)`` for a batch of ``rows`` rows of ``cols`` features."""
    rows_per_part = max(-(-MIN_ELEMENTS_PER_PART // max(cols, 1)), -(-rows // MAX_PARTS), 1)
    return max(1, -(-rows // rows_per_part)), rows_per_part


_known_layouts: Dict[Tuple[int, int], Tuple[int, int]] = {}


def _cached_parts_layout(rows: int, cols: int) -> Tuple[int, int]:
    """``parts_layout`` remembered for eager calls, which come with the same few shapes over and over (a plain
    dict rather than ``functools.lru_cache``, which Dynamo warns about when it traces a backend method)."""
    key = (rows, cols)
    found = _known_layouts.get(key)
    if found is None:
        if len(_known_layouts) >= 256:
            _known_layouts.clear()
        found = _known_layouts[key] = parts_layout(rows, cols)
    return found


# ------------------------------------------------------------------------------------------------ checks
# Each condition is a predicate (``_is_*``); the op's check (``_check_*``) runs the predicate and, only when it
# fails, finds which part failed and raises saying so. The direct calls below use the predicates of the statistics,
# counters, parts and written rows as they are, and write the others out, reading each attribute of the batch once.
_F32, _F64, _I64 = torch.float32, torch.float64, torch.int64


def _check_cpu(name: str, t: Tensor) -> None:
    if not t.is_cpu:
        raise ValueError(f"{name}: the cpp backend expects a CPU tensor, got one on {t.device}")


def _is_float_rows(x: Tensor) -> bool:
    return x.is_cpu and x.dim() == 2 and x.dtype in _FLOAT_DTYPES


def _check_float_rows(name: str, x: Tensor) -> None:
    if _is_float_rows(x):
        return
    _check_cpu(name, x)
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [B, D] tensor, got shape {tuple(x.shape)}")
    raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {x.dtype}")


def _is_aligned(t: Tensor) -> bool:
    """Whether ``t`` starts on a boundary of its elements, as the kernels, which access whole elements, need (a view
    of a byte buffer at an odd offset does not; the bindings refuse such a tensor)."""
    return t.data_ptr() % t.element_size() == 0


def _unit_columns(x: Tensor) -> Tensor:
    """``x`` as the kernels read it: its values in memory (a lazily negated view resolved, since the kernels read
    raw memory), aligned to its elements and with contiguous columns; a copy only when needed."""
    if x.is_neg():
        x = x.resolve_neg()
    if not _is_aligned(x):
        return x.clone(memory_format=torch.contiguous_format)
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def _is_writable_rows(t: Tensor, shape, dtype: torch.dtype) -> bool:
    """``t`` of that shape and dtype on the CPU, with unit column stride where it has two dimensions, and
    separate elements: it holds its values in memory (no lazy negation) and no two of its elements share it
    (``_check_separate``'s conditions, written out for rows: the hot calls test their output or returns so)."""
    if not (t.dtype is dtype and t.is_cpu and t.shape == shape and not t.is_neg()):
        return False
    if len(shape) != 2:
        return (len(shape) < 2 or shape[1] <= 1 or t.stride(1) == 1) and elements_apart(t)
    rows, cols = shape
    row_stride, col_stride = t.stride()
    return (cols <= 1 or col_stride == 1) and (t.is_contiguous() or rows <= 1 or row_stride >= max(1, cols))


def _check_separate(name: str, t: Tensor) -> None:
    if t.is_neg():
        raise ValueError(f"{name}: expected a tensor holding its values, got a lazily negated view (resolve_neg())")
    check_elements_apart(name, t)


def _check_writable_rows(name: str, t: Tensor, shape, dtype: torch.dtype) -> None:
    if _is_writable_rows(t, shape, dtype):
        return
    _check_cpu(name, t)
    if t.shape != shape or t.dtype != dtype:
        raise ValueError(f"{name}: expected a {dtype} tensor of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
    if len(shape) == 2 and shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name}: expected contiguous columns (stride 1), got strides {t.stride()}")
    _check_separate(name, t)


def _is_stat(t: Tensor, cols: int) -> bool:
    """A float64 ``[cols]`` CPU tensor holding its values, no two elements in one place (``_check_separate``'s
    conditions for 1-D, written out: every hot call tests two of these)."""
    return (t.dtype is _F64 and t.is_cpu and t.shape == (cols,) and not t.is_neg()
            and (t.is_contiguous() or cols <= 1 or t.stride()[0] >= 1))


def _check_stats(mean: Tensor, var: Tensor, cols: int) -> None:
    for name, t in (("mean", mean), ("var", var)):
        if not _is_stat(t, cols):
            _check_cpu(name, t)
            if t.dtype is not _F64 or t.dim() != 1 or t.shape[0] != cols:
                raise ValueError(f"{name}: expected a float64 tensor of shape ({cols},), got {t.dtype} {tuple(t.shape)}")
            _check_separate(name, t)


def _are_counters(count: Tensor, dropped: Tensor) -> bool:
    """Both 0-d int64 CPU tensors."""
    return (count.dtype is _I64 and dropped.dtype is _I64 and count.is_cpu and dropped.is_cpu and count.dim() == 0
            and dropped.dim() == 0)


def _check_counters(count: Tensor, dropped: Tensor) -> None:
    if _are_counters(count, dropped):
        return
    for name, t in (("count", count), ("dropped", dropped)):
        _check_cpu(name, t)
        if t.dtype is not _I64 or t.dim() != 0:
            raise ValueError(f"{name}: expected a 0-d int64 tensor, got {t.dtype} {tuple(t.shape)}")


def _is_parts(parts: Tensor) -> bool:
    """A CPU float64 ``[K >= 1, 2 + 2D]`` tensor."""
    if not (parts.is_cpu and parts.dtype is _F64 and parts.dim() == 2):
        return False
    k, width = parts.shape
    return k >= 1 and width >= 2 and width % 2 == 0


def _check_parts(parts: Tensor) -> None:
    if not _is_parts(parts):
        _check_cpu("parts", parts)
        raise ValueError(f"parts: expected a float64 [K >= 1, 2 + 2D] tensor, got {parts.dtype} {tuple(parts.shape)}")


def _parts_out(parts: Tensor, rows: int, cols: int) -> Tuple[int, int]:
    num_parts, rows_per_part = _cached_parts_layout(rows, cols)
    _check_writable_rows("parts", parts, (num_parts, parts_width(cols)), torch.float64)
    if not parts.is_contiguous():
        raise ValueError("parts: expected a contiguous tensor")
    return num_parts, rows_per_part


def _threads() -> int:
    return torch.get_num_threads()


_scratch = threading.local()
_MAX_SCRATCH_SIZES = 8


# What _C.float32_stats says std32 holds (enum Float32Stats in csrc/bindings.cpp).
_ROOTS_KEPT, _ROOTS_TAKEN, _ROOTS_WANTED = 0, 1, 2

# The mode ATen passes to MKL's vector math (ATen/cpu/vml.h): VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
_VML_MODE = 0x2 | 0x140000 | 0x100
_torch_sqrt: Optional[int] = None  # the address float32_stats takes roots with; 0: none, None: not looked up yet


def _torch_sqrt_address() -> int:
    """The address of the float32 square root behind torch's own CPU ``sqrt`` (MKL's ``vmsSqrt``, which Linux builds
    of torch with MKL export), or 0 where there is none, or no extension to hand it to, or it does not reproduce
    ``torch.sqrt`` bit for bit.

    Taking the root in C++ saves the only torch op of the float32 statistics, which right after other work costs
    75-100 us (bench/RESULTS.md). A wrong root would silently change outputs, so the function is used only after
    it matched ``torch.sqrt`` on every probe: float32 values of every binade, subnormals, zeros, infinities, NaN
    and negatives, in arrays of many lengths and alignments, through the very call float32_stats makes."""
    global _torch_sqrt
    if _torch_sqrt is None:
        address = 0
        try:
            # The copy of torch's library this process has loaded, found by its soname; RTLD_NOLOAD never loads a
            # second one (which would run torch's static initializers again).
            library = ctypes.CDLL("libtorch_cpu.so", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            address = ctypes.cast(library.vmsSqrt, ctypes.c_void_p).value or 0
        except (OSError, AttributeError):  # not Linux, not an MKL build, or a torch that names it otherwise
            pass
        if _C is None or (address and not outside_inference_mode(lambda: _reproduces_torch_sqrt(address, _VML_MODE))):
            address = 0
        _torch_sqrt = address
    return _torch_sqrt


def _sqrt_probe() -> Tensor:
    """float64 variances whose float32 roots a candidate must get right: random bit patterns of every positive
    finite float32 (subnormals included), values of the order of real variances, and the special cases."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 0x7F800000, (4096,), generator=g, dtype=torch.int32, device="cpu")
    special = torch.tensor([0.0, -0.0, 1e-45, 1e-40, 1.0, 2.0, 4.0, 3.4028235e38, float("inf"), -float("inf"),
                            float("nan"), -1.0, -1e-45], device="cpu")
    values = torch.cat([bits.view(torch.float32), torch.rand(4096, generator=g, device="cpu") * 10, special]).double()
    return values[torch.randperm(values.shape[0], generator=g, device="cpu")]


def _reproduces_torch_sqrt(address: int, mode: int) -> bool:
    """Whether ``_C.float32_stats`` taking roots at ``address`` gives ``torch.sqrt(var.float() + 0.0)`` on every
    value of the probe, over many lengths and alignments of the input and the output."""
    values = _sqrt_probe()
    zeros = torch.zeros_like(values)
    buffers = torch.empty(3, values.shape[0] + 16, dtype=torch.float32, device="cpu")
    for n in (1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 64, 342, 1023, values.shape[0]):
        for offset in (0, 1, 3, 8):
            start = (offset * n) % max(1, values.shape[0] - n + 1)
            var = values[start:start + n]
            mean32, radicand = buffers[0, offset:offset + n], buffers[2, offset:offset + n]
            std32 = buffers[1, 8 - offset:8 - offset + n]  # another alignment than the radicand's
            taken = _C.float32_stats(zeros.data_ptr(), 1, var.data_ptr(), 1, n, 0.0, mean32.data_ptr(),
                                     std32.data_ptr(), radicand.data_ptr(), False, address, mode)
            want = torch.sqrt(var.float() + 0.0)
            if taken != _ROOTS_TAKEN or not torch.equal(std32.view(torch.int32), want.view(torch.int32)):
                return False
    return True


def _float32_stats(mean: Tensor, var: Tensor, epsilon: float) -> Tuple[Tensor, Tensor]:
    """The statistics as ``reference.normalize`` rounds them: ``mean.float()`` and ``torch.sqrt(var.float() +
    epsilon)``. ``_C.float32_stats`` does the rounding and the float32 addition, which are exact IEEE operations,
    and the square root with torch's own function where it found one (``_torch_sqrt_address``; otherwise torch's
    ``sqrt_`` takes it here). The root is taken only when the float32 ``var + epsilon`` differs in any bit from the
    previous call's on this thread: frozen statistics (evaluation, inference) then cost no root at all.

    They go to this thread's buffers rather than fresh tensors, for the reason the C++ kernels keep per-thread
    scratch (csrc/common.h): a fresh pair of a few KB freed at the end of each call can be the free that makes glibc
    trim its heap, unmapping there the memory that other code freed before."""
    cols = mean.shape[0]
    buffers: Dict[int, list] = getattr(_scratch, "stats", None)
    if buffers is None:
        buffers = _scratch.stats = {}
    entry = buffers.get(cols)
    if entry is None:
        if len(buffers) >= _MAX_SCRATCH_SIZES:
            buffers.clear()
        block = outside_inference_mode(lambda: torch.empty((3, cols), dtype=torch.float32, device="cpu"))
        # mean32, std32, the radicand std32 is the root of, whether that pair is set, and the three addresses; the
        # views and addresses are kept because indexing costs about 1.4 us a call, and each address read 0.05 us.
        entry = buffers[cols] = [block[0], block[1], block[2], False, block[0].data_ptr(), block[1].data_ptr(),
                                 block[2].data_ptr()]
    mean32, std32, radicand, primed, mean32_address, std32_address, radicand_address = entry
    root = _torch_sqrt if _torch_sqrt is not None else _torch_sqrt_address()
    held = _C.float32_stats(mean.data_ptr(), mean.stride()[0], var.data_ptr(), var.stride()[0], cols, float(epsilon),
                            mean32_address, std32_address, radicand_address, primed, root, _VML_MODE)
    if held == _ROOTS_WANTED:
        entry[3] = False  # std32 holds a radicand until the root is taken
        std32.sqrt_()
    entry[3] = True
    return mean32, std32


def _mkl_local_threads_setter():
    """MKL's ``MKL_Set_Num_Threads_Local`` in torch's library, or None (not Linux, or a torch without MKL, whose
    vector math then cannot hang). Looked up here, not in a forked child, where ``dlopen`` could wait on a lock that
    another of the parent's threads held at the fork."""
    try:
        library = ctypes.CDLL("libtorch_cpu.so", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        setter = library.MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    return setter


_mkl_set_local_threads = _mkl_local_threads_setter()
_forked_thread: Optional[int] = None  # in a forked child, the thread that forked (see _note_fork)
_float32_stats_anywhere = _float32_stats


def _float32_stats_after_fork(mean: Tensor, var: Tensor, epsilon: float) -> Tuple[Tensor, Tensor]:
    """``_float32_stats`` with MKL on one thread on the thread that forked."""
    if threading.get_ident() != _forked_thread:
        return _float32_stats_anywhere(mean, var, epsilon)
    previous = _mkl_set_local_threads(1)
    try:
        return _float32_stats_anywhere(mean, var, epsilon)
    finally:
        _mkl_set_local_threads(previous)  # 0, as a rule: the process-wide setting again


def _note_fork() -> None:
    """GNU OpenMP's workers do not survive fork(): in the child, the thread that forked hangs in its next parallel
    region, and MKL's vector math, which takes the float32 roots (``vmsSqrt``, torch's ``sqrt`` as well), starts one
    even for a few hundred values. So that thread takes them with MKL on one thread (the same bits); the C++ kernels
    run serially there by themselves (csrc/bindings.cpp). Rebinding ``_float32_stats`` keeps the check off the calls
    of a process that never forked."""
    global _forked_thread, _float32_stats
    _forked_thread = threading.get_ident()
    if _mkl_set_local_threads is not None:
        _float32_stats = _float32_stats_after_fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_note_fork)


# ------------------------------------------------------------------------------------------------ operators
def _define(name: str, schema: str):
    qualname = f"protonorm::{name}"
    torch.library.define(qualname, schema)

    def register(kernel):
        torch.library.impl(qualname, "cpu")(kernel)
        return kernel

    return register


@_define("cpp_moments", "(Tensor x, Tensor? mask, Tensor(a!) parts) -> ()")
def _moments_kernel(x: Tensor, mask: Optional[Tensor], parts: Tensor) -> None:
    _check_float_rows("x", x)
    x = _unit_columns(x)
    rows, cols = x.shape
    num_parts, rows_per_part = _parts_out(parts, rows, cols)
    mask_ptr, mask_stride = 0, 0
    if mask is not None:
        _check_cpu("mask", mask)
        if mask.dtype != torch.bool or tuple(mask.shape) != (rows,):
            raise ValueError(f"mask: expected a bool tensor of shape ({rows},), got {mask.dtype} {tuple(mask.shape)}")
        mask_ptr, mask_stride = mask.data_ptr(), mask.stride(0)
        if mask_ptr == 0 and rows > 0:  # a ZeroTensor: the kernel would take a null mask for no mask at all
            raise ValueError("mask: expected a tensor with memory, got a null data pointer (a ZeroTensor? clone() it)")
    _C.moments(x.data_ptr(), rows, cols, x.stride(0), _DTYPE_CODES[x.dtype], mask_ptr, mask_stride,
               parts.data_ptr(), num_parts, rows_per_part, _threads())


@_define("cpp_merge", "(Tensor parts, Tensor(a!) mean, Tensor(b!) var, Tensor(c!) count, Tensor(d!) dropped, "
         "float? ema_decay) -> ()")
def _merge_kernel(parts: Tensor, mean: Tensor, var: Tensor, count: Tensor, dropped: Tensor,
                  ema_decay: Optional[float]) -> None:
    _check_parts(parts)
    parts = _unit_columns(parts)
    num_parts, width = parts.shape
    cols = (width - 2) // 2
    _check_stats(mean, var, cols)
    _check_counters(count, dropped)
    _run_merge(parts, num_parts, cols, mean, var, count, dropped, ema_decay)


def _run_merge(parts: Tensor, num_parts: int, cols: int, mean: Tensor, var: Tensor, count: Tensor, dropped: Tensor,
               ema_decay: Optional[float]) -> None:
    # (``stride()[0]``: ``stride(0)`` takes torch's argument parser twice as long)
    _C.merge(parts.data_ptr(), num_parts, cols, parts.stride()[0], mean.data_ptr(), mean.stride()[0],
             var.data_ptr(), var.stride()[0], count.data_ptr(), dropped.data_ptr(), ema_decay is not None,
             0.0 if ema_decay is None else float(ema_decay), _threads())
    mark_written((mean, var, count, dropped))


@_define("cpp_combine", "(Tensor parts) -> Tensor")
def _combine_kernel(parts: Tensor) -> Tensor:
    _check_parts(parts)
    parts = _unit_columns(parts)
    out = torch.empty((1, parts.shape[1]), dtype=torch.float64, device="cpu")
    _C.combine(parts.data_ptr(), parts.shape[0], (parts.shape[1] - 2) // 2, parts.stride(0), out.data_ptr(),
               _threads())
    return out


def _is_normalize_args(x: Tensor, mean: Tensor, var: Tensor, epsilon: float, clamp_value, out: Tensor) -> bool:
    return (_is_float_rows(x) and _is_stat(mean, x.shape[1]) and _is_stat(var, x.shape[1])
            and _is_writable_rows(out, x.shape, normalized_dtype(x.dtype)) and epsilon >= 0.0
            and (clamp_value is None or clamp_value > 0.0))


def _check_normalize(x: Tensor, mean: Tensor, var: Tensor, epsilon: float, clamp_value, out: Tensor) -> None:
    if _is_normalize_args(x, mean, var, epsilon, clamp_value, out):
        return
    _check_float_rows("x", x)
    _check_stats(mean, var, x.shape[1])
    _check_writable_rows("out", out, x.shape, normalized_dtype(x.dtype))
    if not epsilon >= 0.0:
        raise ValueError(f"epsilon: expected a number >= 0, got {epsilon!r}")
    raise ValueError(f"clamp_value: expected None or a number > 0, got {clamp_value!r}")


@_define("cpp_normalize", "(Tensor x, Tensor mean, Tensor var, float epsilon, float? clamp_value, bool un_norm, "
         "bool center, Tensor(a!) out) -> ()")
def _normalize_kernel(x: Tensor, mean: Tensor, var: Tensor, epsilon: float, clamp_value: Optional[float],
                      un_norm: bool, center: bool, out: Tensor) -> None:
    _check_normalize(x, mean, var, epsilon, clamp_value, out)
    x = _unit_columns(x)
    check_in_place_or_apart("out", out, x)
    _run_normalize(_batch_of(x), mean, var, epsilon, clamp_value, un_norm, center, out)


# What the kernels take of the rows they read: ``(address, rows, cols, row stride, dtype code)``.
_Batch = Tuple[int, int, int, int, int]


def _batch_of(x: Tensor) -> _Batch:
    """The ``_Batch`` of ``[B, D]`` rows the kernels read as they are."""
    rows, cols = x.shape
    return x.data_ptr(), rows, cols, x.stride()[0], _DTYPE_CODES[x.dtype]


def _run_normalize(batch: _Batch, mean: Tensor, var: Tensor, epsilon: float, clamp_value: Optional[float],
                   un_norm: bool, center: bool, out: Tensor) -> None:
    address, rows, cols, row_stride, code = batch
    mean32, std32 = _float32_stats(mean, var, epsilon)
    _C.normalize(address, rows, cols, row_stride, code, out.data_ptr(), out.stride()[0], mean32.data_ptr(),
                 std32.data_ptr(), clamp_value is not None, 0.0 if clamp_value is None else float(clamp_value),
                 bool(un_norm), bool(center), _threads())


@_define("cpp_normalize_moments", "(Tensor x, Tensor mean, Tensor var, float epsilon, float? clamp_value, "
         "Tensor(a!) out, Tensor(b!) parts) -> ()")
def _normalize_moments_kernel(x: Tensor, mean: Tensor, var: Tensor, epsilon: float, clamp_value: Optional[float],
                              out: Tensor, parts: Tensor) -> None:
    _check_normalize(x, mean, var, epsilon, clamp_value, out)
    check_not_sharing("out", out, x)
    x = _unit_columns(x)
    batch = _batch_of(x)
    _run_normalize_moments(batch, mean, var, epsilon, clamp_value, out, parts, _parts_out(parts, batch[1], batch[2]))


def _run_normalize_moments(batch: _Batch, mean: Tensor, var: Tensor, epsilon: float, clamp_value: Optional[float],
                           out: Tensor, parts: Tensor, parts_layout: Tuple[int, int]) -> None:
    address, rows, cols, row_stride, code = batch
    mean32, std32 = _float32_stats(mean, var, epsilon)
    _C.normalize_moments(address, rows, cols, row_stride, code, out.data_ptr(), out.stride()[0],
                         mean32.data_ptr(), std32.data_ptr(), clamp_value is not None,
                         0.0 if clamp_value is None else float(clamp_value), parts.data_ptr(), parts_layout[0],
                         parts_layout[1], _threads())


def _is_returns(discounted: Tensor, shape) -> bool:
    """The discounted returns the reward kernel updates in place: float32 or float64 rows of ``shape``."""
    dtype = discounted.dtype
    return (dtype is _F32 or dtype is _F64) and _is_writable_rows(discounted, shape, dtype)


def _is_flags(terminated: Tensor, rows: int) -> bool:
    """``[rows]`` reset flags on the CPU, of any dtype the kernel reads (nonzero = reset)."""
    t = terminated
    return t.is_cpu and t.dtype in _DTYPE_CODES and t.dim() == 1 and t.shape[0] == rows


def _check_reward_inputs(reward: Tensor, terminated: Tensor, discounted: Tensor) -> Tuple[Tensor, Tensor]:
    """``reward`` with unit column stride and ``terminated``, both aligned to their elements, once they and
    ``discounted`` are known to fit the reward kernel; ``reward`` apart from ``discounted`` or ``discounted``
    itself."""
    _check_float_rows("reward", reward)
    reward = _unit_columns(reward)
    rows, cols = reward.shape
    if not _is_returns(discounted, reward.shape):
        if discounted.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"discounted: expected float32 or float64, got {discounted.dtype}")
        _check_writable_rows("discounted", discounted, (rows, cols), discounted.dtype)
    if not in_place_or_apart(discounted, reward):
        # The kernel writes the returns row by row and would read rows of the reward it had already advanced: the
        # step takes the reward as it was, as upstream's out-of-place arithmetic does.
        reward = reward.clone(memory_format=torch.contiguous_format)
    if not _is_flags(terminated, rows):
        _check_cpu("terminated", terminated)
        if terminated.dim() != 1 or terminated.shape[0] != rows or terminated.is_complex():
            raise ValueError(
                f"terminated: expected a real or bool tensor of shape ({rows},), got {terminated.dtype} "
                f"{tuple(terminated.shape)}"
            )
        terminated = as_reset_flags(terminated)  # a dtype the kernel does not load
    return reward, terminated if _is_aligned(terminated) else terminated.clone()


@_define("cpp_reward_moments", "(Tensor reward, Tensor terminated, Tensor(a!) discounted, float gamma, "
         "Tensor(b!) parts) -> ()")
def _reward_moments_kernel(reward: Tensor, terminated: Tensor, discounted: Tensor, gamma: float,
                           parts: Tensor) -> None:
    reward, terminated = _check_reward_inputs(reward, terminated, discounted)
    rows, cols = reward.shape
    num_parts, rows_per_part = _parts_out(parts, rows, cols)
    _C.reward_moments(reward.data_ptr(), rows, cols, reward.stride(0), _DTYPE_CODES[reward.dtype],
                      terminated.data_ptr(), terminated.stride(0), _DTYPE_CODES[terminated.dtype],
                      discounted.data_ptr(), discounted.stride(0), _DTYPE_CODES[discounted.dtype], float(gamma),
                      parts.data_ptr(), num_parts, rows_per_part, _threads())
    mark_written((discounted,))


@_define("cpp_reward_record", "(Tensor reward, Tensor terminated, Tensor(a!) discounted, float gamma, "
         "Tensor(b!) mean, Tensor(c!) var, Tensor(d!) count, Tensor(e!) dropped, float? ema_decay) -> ()")
def _reward_record_kernel(reward: Tensor, terminated: Tensor, discounted: Tensor, gamma: float, mean: Tensor,
                          var: Tensor, count: Tensor, dropped: Tensor, ema_decay: Optional[float]) -> None:
    reward, terminated = _check_reward_inputs(reward, terminated, discounted)
    batch = _batch_of(reward)
    _check_stats(mean, var, batch[2])
    _check_counters(count, dropped)
    returns = (discounted.data_ptr(), discounted.stride()[0], _DTYPE_CODES[discounted.dtype])
    _run_reward_record(batch, terminated, returns, gamma, mean, var, count, dropped, ema_decay)
    mark_written((discounted, mean, var, count, dropped))


def _run_reward_record(reward: _Batch, terminated: Tensor, returns: Tuple[int, int, int], gamma: float,
                       mean: Tensor, var: Tensor, count: Tensor, dropped: Tensor, ema_decay: Optional[float]) -> None:
    """``reward`` and the discounted returns (``returns``: their address, row stride and dtype code): rows of
    ``cols`` features, as ``[rows, cols]`` or, for one feature, ``[rows]`` (the kernel takes their row strides,
    ``stride(0)`` either way)."""
    address, rows, cols, row_stride, code = reward
    num_parts, rows_per_part = _cached_parts_layout(rows, cols)
    _C.reward_record(address, rows, cols, row_stride, code,
                     terminated.data_ptr(), terminated.stride()[0], _DTYPE_CODES[terminated.dtype],
                     *returns, float(gamma),
                     num_parts, rows_per_part, mean.data_ptr(), mean.stride()[0], var.data_ptr(), var.stride()[0],
                     count.data_ptr(), dropped.data_ptr(), ema_decay is not None,
                     0.0 if ema_decay is None else float(ema_decay), _threads())


# ------------------------------------------------------------------------------------------------ direct calls
# The module's hot calls (see Backend.try_normalize_moments) straight to the kernels. The general way to them runs
# the module's checks, then the backend method, ``eager_plain`` and the op's own checks, layer after layer of small
# Python functions. These take a call only when each argument meets, in one flat test, every condition that the
# op's checks and ``eager_plain`` would impose (on ``[B]`` reward vectors as well, which the kernel reads as one
# feature without the view the general way makes), and then run the very code the op runs. Each tensor attribute
# the test reads is read once and what the kernel needs of it is handed on: at a few hundred rows each read
# (0.05-0.15 us warm, microseconds cold) is a visible share of the call. Measured against the general way
# (bench/RESULTS.md): 7-12 us less per normalize + record of 256 x 342 with warm caches, 30-60 us less after other
# work has emptied them, and the reward record of a few thousand environments in about half the time.

# The dtypes of the rows the kernels read: their code, their size in bytes and what they normalize to.
_ROW_DTYPES = {dtype: (_DTYPE_CODES[dtype], dtype.itemsize, normalized_dtype(dtype)) for dtype in _FLOAT_DTYPES}
# The dtypes of the discounted returns the reward kernel updates: their code and size in bytes.
_RETURNS_DTYPES = {dtype: (_DTYPE_CODES[dtype], dtype.itemsize) for dtype in (_F32, _F64)}


def _direct_normalize_args(x: Tensor, mean: Tensor, var: Tensor, epsilon: float, clamp_value: Optional[float],
                           out: Tensor) -> Optional[_Batch]:
    """``_batch_of(x)`` when the normalize ops would take these arguments as they are (``_is_normalize_args``) and
    call the kernel on them (``eager_plain``; no strided columns to copy, no empty batch, no negated or misaligned
    rows), else None."""
    if not eager_plain(x, mean, var, out):
        return None
    found = _ROW_DTYPES.get(x.dtype)
    if found is None or not x.is_cpu or x.dim() != 2 or x.is_neg():
        return None
    rows, cols = x.shape
    row_stride, col_stride = x.stride()
    try:
        address = x.data_ptr()
    except RuntimeError:  # no memory of its own (sparse, MKL-DNN): the general way raises what it raises for it
        return None
    if (rows > 0 and cols > 0 and (cols == 1 or col_stride == 1) and address % found[1] == 0
            and _is_stat(mean, cols) and _is_stat(var, cols) and _is_writable_rows(out, (rows, cols), found[2])
            and epsilon >= 0.0 and (clamp_value is None or clamp_value > 0.0)):
        return address, rows, cols, row_stride, found[0]
    return None


def _direct_normalize_moments(x: Tensor, mean: Tensor, var: Tensor, epsilon: float, clamp_value: Optional[float],
                              out: Tensor, workspace: dict) -> Optional[Tensor]:
    batch = _direct_normalize_args(x, mean, var, epsilon, clamp_value, out)
    if batch is None:
        return None
    parts, parts_layout = _workspace_parts(workspace, batch[1], batch[2])
    _run_normalize_moments(batch, mean, var, epsilon, clamp_value, out, parts, parts_layout)
    return parts


def _direct_normalize(x: Tensor, mean: Tensor, var: Tensor, epsilon: float, clamp_value: Optional[float],
                      out: Tensor) -> bool:
    batch = _direct_normalize_args(x, mean, var, epsilon, clamp_value, out)
    if batch is None:
        return False
    _run_normalize(batch, mean, var, epsilon, clamp_value, False, True, out)
    return True


def _direct_merge(parts: Tensor, mean: Tensor, var: Tensor, count: Tensor, dropped: Tensor,
                  ema_decay: Optional[float]) -> bool:
    if not (eager_plain(parts, mean, var, count, dropped) and _is_parts(parts)):
        return False
    num_parts, width = parts.shape
    cols = (width - 2) // 2
    if not (parts.stride()[1] == 1 and parts.data_ptr() % 8 == 0 and _is_stat(mean, cols) and _is_stat(var, cols)
            and _are_counters(count, dropped)):  # (float64 parts: aligned at 8 bytes)
        return False
    _run_merge(parts, num_parts, cols, mean, var, count, dropped, ema_decay)
    return True


def _direct_reward_record(reward: Tensor, terminated: Tensor, discounted: Tensor, gamma: float, mean: Tensor,
                          var: Tensor, count: Tensor, dropped: Tensor, ema_decay: Optional[float]) -> bool:
    """Also takes ``[B]`` rewards and returns (one feature), which the op would need as ``[B, 1]`` views."""
    if not eager_plain(reward, terminated, discounted, mean, var, count, dropped):
        return False
    found = _ROW_DTYPES.get(reward.dtype)
    if found is None or not reward.is_cpu or reward.is_neg():
        return False
    shape = reward.shape
    strides = reward.stride()
    if len(shape) == 1:
        rows, cols = shape[0], 1
    elif len(shape) == 2:
        rows, cols = shape
        if cols != 1 and strides[1] != 1:
            return False
    else:
        return False
    try:
        address = reward.data_ptr()
    except RuntimeError:  # no memory of its own (sparse, MKL-DNN): the general way raises what it raises for it
        return False
    flags = _DTYPE_CODES.get(terminated.dtype)
    returns_dtype = discounted.dtype
    returns = _RETURNS_DTYPES.get(returns_dtype)
    if not (
        rows > 0
        and cols > 0
        and address % found[1] == 0
        and returns is not None  # (``_is_returns``, its dtype read once)
        and _is_writable_rows(discounted, shape, returns_dtype)
        and flags is not None
        and terminated.is_cpu
        and terminated.dim() == 1
        and terminated.shape[0] == rows
        and terminated.data_ptr() % terminated.dtype.itemsize == 0
        and _is_stat(mean, cols)
        and _is_stat(var, cols)
        and _are_counters(count, dropped)
    ):
        return False
    returns_address, returns_stride = discounted.data_ptr(), discounted.stride()[0]
    if not (returns_address + ((rows - 1) * returns_stride + cols) * returns[1] <= address
            or address + ((rows - 1) * strides[0] + cols) * found[1] <= returns_address):
        return False  # the reward shares memory with the returns: the general way reads it from a copy
    _run_reward_record((address, rows, cols, strides[0], found[0]), terminated,
                       (returns_address, returns_stride, returns[0]), gamma, mean, var, count, dropped, ema_decay)
    mark_written((discounted, mean, var, count, dropped))
    return True


# Fake implementations: shapes only, for torch.compile and FakeTensor tracing.
@torch.library.register_fake("protonorm::cpp_moments")
def _(x, mask, parts):
    return None


@torch.library.register_fake("protonorm::cpp_merge")
def _(parts, mean, var, count, dropped, ema_decay):
    return None


@torch.library.register_fake("protonorm::cpp_combine")
def _(parts):
    return parts.new_empty((1, parts.shape[1]))


@torch.library.register_fake("protonorm::cpp_normalize")
def _(x, mean, var, epsilon, clamp_value, un_norm, center, out):
    return None


@torch.library.register_fake("protonorm::cpp_normalize_moments")
def _(x, mean, var, epsilon, clamp_value, out, parts):
    return None


@torch.library.register_fake("protonorm::cpp_reward_moments")
def _(reward, terminated, discounted, gamma, parts):
    return None


@torch.library.register_fake("protonorm::cpp_reward_record")
def _(reward, terminated, discounted, gamma, mean, var, count, dropped, ema_decay):
    return None


# ------------------------------------------------------------------------------------------------ backend
def _parts_buffer(workspace: dict, x: Tensor) -> Tensor:
    rows, cols = x.shape
    if torch.compiler.is_compiling():  # a traced graph allocates its own; no cache side effects in the graph
        shape = (parts_layout(rows, cols)[0], parts_width(cols))
        return torch.empty(shape, dtype=torch.float64, device=x.device)
    if not x.is_cpu:  # refused by the op it goes to next
        shape = (_cached_parts_layout(rows, cols)[0], parts_width(cols))
        return torch.empty(shape, dtype=torch.float64, device=x.device)
    return _workspace_parts(workspace, rows, cols)[0]


def _workspace_parts(workspace: dict, rows: int, cols: int) -> Tuple[Tensor, Tuple[int, int]]:
    """The workspace's parts buffer for an eager call on ``rows`` CPU rows of ``cols`` features, and its
    ``parts_layout``."""
    layout = _cached_parts_layout(rows, cols)
    # Kept with the (rows, cols) it was made for: two ints compare faster than a buffer's shape and dtype read.
    found = workspace.get("cpp_parts")
    if found is not None and found[0] == rows and found[1] == cols:
        return found[2], layout
    buf = outside_inference_mode(lambda: torch.empty((layout[0], parts_width(cols)), dtype=torch.float64,
                                                     device="cpu"))
    workspace["cpp_parts"] = (rows, cols, buf)
    return buf, layout


class CppBackend(Backend):
    name = "cpp"

    def supports(self, device: torch.device) -> Optional[str]:
        if _C is None:
            return UNAVAILABLE_REASON
        device = torch.device(device)
        return None if device.type == "cpu" else f"the C++ kernels run on CPU tensors only, not on {device.type}"

    def moments(self, x, mask, workspace):
        if exported(x):
            return reference.batch_moments(x, mask)
        parts = _parts_buffer(workspace, x)
        op = _moments_kernel if eager_plain(x, mask) else torch.ops.protonorm.cpp_moments
        op(x, mask, parts)
        return parts

    def merge(self, parts, mean, var, count, dropped, ema_decay):
        op = _merge_kernel if eager_plain(parts, mean, var, count, dropped) else torch.ops.protonorm.cpp_merge
        op(parts, mean, var, count, dropped, ema_decay)

    def combine(self, parts):
        return torch.ops.protonorm.cpp_combine(parts)

    def normalize(self, x, mean, var, epsilon, clamp_value, un_norm, center, out):
        op = _normalize_kernel if eager_plain(x, mean, var, out) else torch.ops.protonorm.cpp_normalize
        op(x, mean, var, epsilon, clamp_value, un_norm, center, out)

    def normalize_moments(self, x, mean, var, epsilon, clamp_value, out, workspace):
        if exported(x):
            return reference_normalize_moments(x, mean, var, epsilon, clamp_value, out)
        parts = _parts_buffer(workspace, x)
        direct = eager_plain(x, mean, var, out)
        op = _normalize_moments_kernel if direct else torch.ops.protonorm.cpp_normalize_moments
        op(x, mean, var, epsilon, clamp_value, out, parts)
        return parts

    def reward_moments(self, reward, terminated, discounted, gamma, workspace):
        if exported(reward):
            return reference_reward_moments(reward, terminated, discounted, gamma)
        parts = _parts_buffer(workspace, reward)
        direct = eager_plain(reward, terminated, discounted)
        op = _reward_moments_kernel if direct else torch.ops.protonorm.cpp_reward_moments
        op(reward, terminated, discounted, gamma, parts)
        return parts

    def reward_record(self, reward, terminated, discounted, gamma, mean, var, count, dropped, ema_decay, workspace):
        direct = eager_plain(reward, terminated, discounted, mean, var, count, dropped)
        op = _reward_record_kernel if direct else torch.ops.protonorm.cpp_reward_record
        op(reward, terminated, discounted, gamma, mean, var, count, dropped, ema_decay)

    direct = True

    def try_normalize_moments(self, x, mean, var, epsilon, clamp_value, out, workspace):
        return _direct_normalize_moments(x, mean, var, epsilon, clamp_value, out, workspace)

    def try_normalize(self, x, mean, var, epsilon, clamp_value, out):
        return _direct_normalize(x, mean, var, epsilon, clamp_value, out)

    def try_merge(self, parts, mean, var, count, dropped, ema_decay):
        return _direct_merge(parts, mean, var, count, dropped, ema_decay)

    def try_reward_record(self, reward, terminated, discounted, gamma, mean, var, count, dropped, ema_decay,
                          workspace):
        return _direct_reward_record(reward, terminated, discounted, gamma, mean, var, count, dropped, ema_decay)


BACKEND = CppBackend()
