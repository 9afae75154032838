"""A detector of host syncs and blocking copies, for machines without a GPU.

On a GPU more than ``.item()`` stalls the host: every op whose output shape depends on the data (``nonzero``,
``masked_select``, boolean-mask indexing, ``unique``, ``repeat_interleave`` without ``output_size``, ...), every
copy between the device and the host (``.cpu()``, ``.tolist()``, ``.numpy()``, ``torch.tensor`` / ``as_tensor`` of
Python or numpy data, which is a blocking host-to-device copy), ``torch.equal`` / ``allclose`` and a Python ``if``
on a tensor. :class:`SyncGuard` flags each of these when protonorm's own Python issues it, whatever device the
tensors are on, so that a run on the CPU (where they cost nothing) shows what would stall a GPU.

It watches at two levels: a ``TorchFunctionMode`` sees every torch call that Python code makes (factories from
Python data and ``Tensor`` methods such as ``__bool__`` included, which never reach the dispatcher as ops), and an
optional ``TorchDispatchMode`` sees the aten ops underneath, also those that torch's own Python issues on
protonorm's behalf, and copies between devices (on the ``meta`` device, a copy from or to the CPU). A dispatch mode
makes the backends decline their direct calls (``base.eager_plain``), so run the hot calls both with and without it.

A call is protonorm's when the first frame outside torch (and outside this file and the standard library) is in
the protonorm package or its kernels; what Triton's interpreter does with the tensors it is handed (numpy copies),
and what the test itself does, is not. The bodies of protonorm's custom ops, which the dispatcher would run past
both modes, are run under them instead, so that their Python is watched too.
"""
from __future__ import annotations

import os
import sys
import sysconfig

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import protonorm
from protonorm.backends import cpp_backend, triton_backend

# ------------------------------------------------------------------------------------------------ origins
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep
_PROTONORM_DIRS = tuple({os.path.dirname(protonorm.__file__) + os.sep,
                         os.path.realpath(os.path.join(os.path.dirname(protonorm.__file__), "kernels")) + os.sep})
_THIS_FILE = os.path.abspath(__file__)


def _origin():
    """``"file:line (function)"`` of the protonorm frame that issued the current torch call, or None when the
    call came from elsewhere (the test, Triton's interpreter)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        skip = (name.startswith(_TORCH_DIR) or name.startswith("<") or os.path.abspath(name) == _THIS_FILE
                or (name.startswith(_STDLIB_DIR) and "site-packages" not in name))
        if not skip:
            if name.startswith(_PROTONORM_DIRS) or os.path.realpath(name).startswith(_PROTONORM_DIRS):
                return f"{os.path.basename(name)}:{frame.f_lineno} ({frame.f_code.co_name})"
            return None
        frame = frame.f_back
    return None


# ------------------------------------------------------------------------------------------------ rules
def _tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, Tensor)]


def _has_mask_index(index) -> bool:
    """Whether an index (a tensor, or a tuple / list of them) holds a boolean or uint8 mask: its result's shape is
    the count of its True entries, which a GPU must send to the host."""
    return any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(index))


# Python-level torch calls that read a value on the host, or take a shape from the data.
_SYNCING_CALLS = {
    "item", "tolist", "numpy", "cpu", "__array__", "__bool__", "__int__", "__float__", "__index__", "__complex__",
    "__contains__", "is_nonzero", "nonzero", "argwhere", "masked_select", "masked_scatter", "masked_scatter_",
    "unique", "unique_consecutive", "bincount", "equal", "allclose",
}
# Factories that copy their data to the device when it is Python or numpy data (a blocking copy from pageable memory).
_FROM_DATA = {"tensor", "as_tensor", "asarray", "from_numpy"}


def _syncing_call(name: str, args, kwargs):
    """Why the Python-level call ``name(*args, **kwargs)`` would stall a GPU, or None."""
    if name in _SYNCING_CALLS:
        return name
    if name in _FROM_DATA and args and not isinstance(args[0], Tensor):
        return f"torch.{name} of {type(args[0]).__name__} data (a blocking host-to-device copy)"
    if name in ("__getitem__", "__setitem__", "index_put", "index_put_") and len(args) > 1 and _has_mask_index(args[1]):
        return f"{name} with a boolean mask (a data-dependent shape)"
    if name == "repeat_interleave" and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), Tensor) \
            and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if name == "where" and len(args) + len(kwargs) == 1:
        return "where(condition) (nonzero)"
    if name in ("to", "copy_") and args and isinstance(args[0], Tensor):
        if name == "to":
            target = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})[0]
        else:
            target = args[1].device if len(args) > 1 and isinstance(args[1], Tensor) else None
        devices = {args[0].device.type, getattr(target, "type", args[0].device.type)}
        if len(devices) > 1 and "cpu" in devices:
            return f"{name} between {sorted(devices)} (a blocking copy)"
    return None


_aten = torch.ops.aten
_SYNCING_OPS = {
    _aten._local_scalar_dense.default, _aten.item.default, _aten.is_nonzero.default, _aten.equal.default,
    _aten.allclose.default, _aten.nonzero.default, _aten.argwhere.default, _aten.masked_select.default,
    _aten.masked_scatter.default, _aten.masked_scatter_.default, _aten._unique.default, _aten._unique2.default,
    _aten.unique_dim.default, _aten.unique_consecutive.default, _aten.unique_dim_consecutive.default,
    _aten.bincount.default,
    # A tensor made from Python or numpy data: on the CPU nothing more, on a device a copy from the host.
    _aten.lift_fresh.default, _aten.lift_fresh_copy.default,
}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
_COPY_OPS = {_aten._to_copy.default, _aten.copy_.default, _aten._copy_from.default,
             _aten._copy_from_and_resize.default}


def _syncing_op(func, args, kwargs, out):
    """Why the aten op ``func`` would stall a GPU, or None."""
    if func in _SYNCING_OPS:
        return str(func)
    if func in _INDEX_OPS and _has_mask_index(args[1]):
        return f"{func} with a boolean mask (a data-dependent shape)"
    if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return f"{func} without output_size"
    if func in _COPY_OPS:
        devices = {t.device.type for t in _tensors((args, kwargs, out))}
        if len(devices) > 1 and "cpu" in devices:
            return f"{func} between {sorted(devices)} (a blocking copy)"
    return None


# The Python bodies of protonorm's ops (what the dispatcher runs for them on these tensors).
_OP_BODIES = {
    "protonorm::cpp_moments": cpp_backend._moments_kernel,
    "protonorm::cpp_merge": cpp_backend._merge_kernel,
    "protonorm::cpp_combine": cpp_backend._combine_kernel,
    "protonorm::cpp_normalize": cpp_backend._normalize_kernel,
    "protonorm::cpp_normalize_moments": cpp_backend._normalize_moments_kernel,
    "protonorm::cpp_reward_moments": cpp_backend._reward_moments_kernel,
    "protonorm::cpp_reward_record": cpp_backend._reward_record_kernel,
}
if triton_backend.UNAVAILABLE_REASON is None:
    _OP_BODIES.update({
        "protonorm::triton_moments": triton_backend._moments_impl,
        "protonorm::triton_merge": triton_backend._merge_impl,
        "protonorm::triton_combine": triton_backend._combine_impl,
        "protonorm::triton_normalize": triton_backend._normalize_impl,
        "protonorm::triton_normalize_moments": triton_backend._normalize_moments_impl,
        "protonorm::triton_reward_moments": triton_backend._reward_moments_impl,
    })


def _op_body(func):
    name = getattr(func, "_qualified_op_name", None) or getattr(getattr(func, "_schema", None), "name", None)
    return _OP_BODIES.get(name)


# ------------------------------------------------------------------------------------------------ modes
class _FunctionWatch(TorchFunctionMode):
    def __init__(self, found):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = _op_body(func)
        if body is not None:
            with self:  # watch the op's body too, which the dispatcher would run past this mode
                return body(*args, **kwargs)
        why = _syncing_call(getattr(func, "__name__", str(func)), args, kwargs)
        if why is not None:
            where = _origin()
            if where is not None:
                self.found.append(f"{why} at {where}")
        return func(*args, **kwargs)


class _DispatchWatch(TorchDispatchMode):
    def __init__(self, found):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        why = _syncing_op(func, args, kwargs, out)
        if why is not None:
            where = _origin()
            if where is not None:
                self.found.append(f"{why} at {where}")
        return out


class SyncGuard:
    """``with SyncGuard(dispatch=...) as guard:`` records in ``guard.found`` every call protonorm makes inside
    that would stall a GPU's host; ``check()`` (run on a clean exit) fails listing them, except those made directly
    by a function named in ``allow`` (a documented read)."""

    def __init__(self, dispatch: bool = True, allow=()):
        self.found = []
        self.allow = tuple(f"({name})" for name in allow)
        self._modes = [_FunctionWatch(self.found)] + ([_DispatchWatch(self.found)] if dispatch else [])

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        if exc[0] is None:
            self.check()
        return False

    def unexpected(self):
        return [found for found in dict.fromkeys(self.found) if not (self.allow and found.endswith(self.allow))]

    def check(self) -> None:
        unexpected = self.unexpected()
        assert not unexpected, "host syncs on the hot path:\n  " + "\n  ".join(unexpected)
