"""Probes shared by the tests and the benchmark: host-sync and collective counters."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The one aten op through which every host read of a tensor value goes (.item(), bool(t), int(t), ...).
_HOST_READ = torch.ops.aten._local_scalar_dense.default


class HostSyncCounter(TorchDispatchMode):
    """Counts host reads of tensor values made inside the ``with`` block; ``strict=True`` raises at the first.

    ``.cpu()`` / ``.tolist()`` of a CUDA tensor also sync; they show up as copies to the CPU device, which
    ``count_device_to_host`` adds when enabled.
    """

    def __init__(self, strict: bool = False, count_device_to_host: bool = True):
        super().__init__()
        self.strict = strict
        self.count_device_to_host = count_device_to_host
        self.count = 0
        self.ops = []

    def _is_sync(self, func, args, kwargs) -> bool:
        if func is _HOST_READ:
            return True
        if self.count_device_to_host and func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst_device = (
                args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device", None)
            )
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_device is not None:
                return torch.device(dst_device).type == "cpu"
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._is_sync(func, args, kwargs):
            self.count += 1
            self.ops.append(str(func))
            if self.strict:
                raise AssertionError(f"host sync on the hot path: {func}")
        return func(*args, **kwargs)


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten/c10d ops whose name satisfies ``predicate`` (e.g. collectives)."""

    def __init__(self, predicate: Optional[Callable[[str], bool]] = None):
        super().__init__()
        self.predicate = predicate or (lambda name: True)
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if self.predicate(name):
            self.names.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return len(self.names)
