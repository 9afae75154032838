"""Recycled storage for the large CPU tensors that ``normalize`` returns.

A fresh CPU tensor of a few MB is a fresh memory mapping from the C library, and its pages fault in one by one as
the kernel first writes them: on the machines measured that costs 3-5x the kernel's own time for an 8192 x 1024
float32 batch. GPU tensors do not pay it (torch's caching allocator reuses freed blocks), so this is for CPU tensors
only, and it does for them what the caching allocator does: hand out again memory that nothing uses any more.

"Nothing uses it" is decided by two reference counts of the storage, each compared with its value when the
cache alone held the storage. Every tensor that can reach the memory (the output, any view of it, an autograd
graph that saved it, the tensor behind a ``numpy()`` array or a DLPack capsule) holds a C++ reference to the
storage; a Python storage object (``out.untyped_storage()``) is one object per storage, which the cache holds too,
so a caller keeping it raises that object's Python reference count instead, and a weak reference to it (alive as
long as the cache holds the storage) keeps the storage too. A caller that keeps its outputs simply gets fresh ones.
An output sent to another process (``torch.multiprocessing`` moves its storage into shared memory, which the other
process maps) may be read there after every tensor of this process is gone: a storage found shared is dropped from
the cache, never handed out again, and so is one a caller resized (its memory then is no longer the size the cache
hands it out for).

On Linux the storages of 4 MB or more are advised for transparent huge pages before anything touches them
(``madvise(MADV_HUGEPAGE)`` on the 2 MB-aligned part; it takes effect where transparent huge pages are ``madvise``
or ``always``): with one 2 MB page instead of 512 small ones, the kernels writing the output miss the TLB far less.
Measured after cache-flushing work, paired in one process: normalize + record 2.8-3.8% faster at 16384 x 342 and
5.5% at 8192 x 1024 (bench/RESULTS.md). ``PROTONORM_HUGE_PAGES=0`` leaves the storages on small pages.

Each storage also keeps a tensor over it (its template) with the shape and dtype last handed out, and an output is
the template's ``detach()``: a new tensor of the same storage, shape and dtype made by one torch op. Right after
other work has emptied the caches that op costs about 25 us against 60 us for ``torch.empty(0).set_(...)``
(bench/RESULTS.md). Under ``torch.inference_mode()`` outputs are made with ``torch.empty(0).set_(...)`` instead,
so that they are inference tensors, as any tensor made there would be.
"""
from __future__ import annotations

import ctypes
import math
import os
import platform
import sys
import threading
import weakref
from typing import List, Tuple

import torch
from torch import Tensor

from .backends.base import outside_inference_mode

# torch's own count of the references to a storage (private, present since torch 1.x); without it nothing is reused.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)

# Every tensor made here is a CPU tensor, whatever torch.set_default_device says.
_CPU = torch.device("cpu")

# Below this size an allocation comes from the C library's heap without page faults: nothing to save.
MIN_BYTES = 256 * 1024
# Storages kept per module: enough for the two batch sizes a training loop alternates between (rollout and
# minibatch), and a bound on the memory held (at most this many outputs, freed with the module).
MAX_SLOTS = 2

# Storages this large get the huge-page advice: they hold at least one whole aligned 2 MB page.
HUGE_PAGE = 2 << 20
MIN_HUGE_PAGE_BYTES = 2 * HUGE_PAGE
_MADV_HUGEPAGE = 14
_GENERIC_MADVISE_MACHINES = ("x86_64", "aarch64", "ppc64le", "s390x", "riscv64")


def _madvise():
    """The C library's ``madvise`` on Linux machines whose ``MADV_HUGEPAGE`` is the generic 14, else None (advice is
    then never given)."""
    if not sys.platform.startswith("linux") or platform.machine() not in _GENERIC_MADVISE_MACHINES:
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_madvise_function = _madvise()


_SWITCH_ON = ("1", "true", "yes", "on")
_SWITCH_OFF = ("0", "false", "no", "off")


def env_switch(name: str, default: bool = True) -> bool:
    """An on/off environment variable, read as csrc/bindings.cpp reads one: 1, true, yes or on is on; 0, false, no
    or off is off (any case, white space around); unset or empty is ``default``; anything else raises, naming it."""
    value = os.environ.get(name, "")
    setting = value.strip().lower()
    if setting == "":
        return default
    if setting in _SWITCH_ON or setting in _SWITCH_OFF:
        return setting in _SWITCH_ON
    on, off = ", ".join(_SWITCH_ON), ", ".join(_SWITCH_OFF)
    raise ValueError(f"environment variable {name} must be {on}{' (the default)' if default else ''} or {off}"
                     f"{'' if default else ' (the default)'}, got {value!r}")


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Ask for transparent huge pages on the whole 2 MB pages inside ``[address, address + nbytes)``; whether the
    advice was given (a kernel without transparent huge pages refuses it, which changes nothing)."""
    if _madvise_function is None:
        return False
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    return end > start and _madvise_function(start, end - start, _MADV_HUGEPAGE) == 0


def enabled() -> bool:
    """Recycling is on unless ``PROTONORM_REUSE_OUTPUTS`` is off, and needs torch's storage reference count."""
    return env_switch("PROTONORM_REUSE_OUTPUTS") and _storage_use_count is not None


class _Slot:
    """One cached storage and its template, with the storage's reference counts at the time nothing but the cache
    held it."""

    __slots__ = ("storage", "cdata", "address", "nbytes", "template", "template_key", "idle_uses", "idle_refs",
                 "claimed")

    def __init__(self, nbytes: int, shape: Tuple[int, ...], dtype: torch.dtype, huge_pages: bool):
        self.storage = torch.UntypedStorage(nbytes)
        self.address = self.storage.data_ptr()
        if huge_pages and nbytes >= MIN_HUGE_PAGE_BYTES:
            advise_huge_pages(self.address, nbytes)  # before the first write faults the pages in
        self.cdata = self.storage._cdata
        self.nbytes = nbytes
        self.template = self._over_storage(shape, dtype)
        self.template_key = (shape, dtype)  # compared instead of the template's attributes: no tensor reads
        # Measured here, where nothing but this object refers to the storage, exactly as idle() measures them.
        self.idle_uses = _storage_use_count(self.cdata)
        self.idle_refs = sys.getrefcount(self.storage)
        self.claimed = False  # by a call taking an output of it, until that output exists (see OutputCache.empty)

    def _on_storage(self, shape: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.empty(0, dtype=dtype, device=_CPU).set_(self.storage, 0, shape)

    def _over_storage(self, shape: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
        # A normal tensor even under inference mode: outputs made from it outside inference mode must be usable.
        # Made past any torch function or dispatch mode, which could keep the storage object (an op log does): a
        # reference held then would count in the idle counts measured below, and once dropped would let a caller's
        # storage object pass for the cache's own.
        with torch._C.DisableTorchFunction(), torch._C._DisableTorchDispatch():
            return outside_inference_mode(lambda: self._on_storage(shape, dtype))

    def idle(self) -> bool:
        # A weak reference to the storage object counts too: while the cache holds the storage it stays alive.
        return (not self.claimed and _storage_use_count(self.cdata) == self.idle_uses
                and sys.getrefcount(self.storage) == self.idle_refs and not weakref.getweakrefcount(self.storage))

    def replaced(self) -> bool:
        """Whether the storage no longer holds the memory allocated here: moved into shared memory, where another
        process may still read it, or resized by a caller (``untyped_storage().resize_(0)`` frees it)."""
        storage = self.storage
        return storage.data_ptr() != self.address or storage.nbytes() != self.nbytes or storage.is_shared()

    def tensor(self, shape: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A new tensor of ``shape`` and ``dtype`` on the storage."""
        if torch.is_inference_mode_enabled():
            return self._on_storage(shape, dtype)
        if self.template_key != (shape, dtype):
            # The new template takes the old one's reference to the storage: the idle counts stay as measured.
            self.template = self._over_storage(shape, dtype)
            self.template_key = (shape, dtype)
        return self.template.detach()


class OutputCache:
    """Up to ``MAX_SLOTS`` CPU storages, handed out again as new tensors once their previous tensor is gone."""

    __slots__ = ("_slots", "_lock", "_enabled", "_huge_pages", "__weakref__")

    def __init__(self):
        self._slots: List[_Slot] = []
        self._lock = threading.Lock()  # two threads must not both claim the same idle storage
        # Both settings are read here, when the module is made: a bad value raises before it holds any statistics.
        self._enabled = enabled()
        self._huge_pages = env_switch("PROTONORM_HUGE_PAGES")
        _caches.add(self)

    def empty(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialized contiguous tensor of ``shape`` and ``dtype`` on ``device``; recycled when it is a CPU
        tensor of at least ``MIN_BYTES``."""
        # (``device.type`` makes a new string, about 0.2 us; comparing devices takes a tenth of that)
        if (device != _CPU and device.type != "cpu") or not self._enabled:
            return torch.empty(shape, dtype=dtype, device=device)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES:
            # Sizes as separate arguments: a torch.Size argument takes torch's argument parser about 1 us longer.
            if shape:
                return torch.empty(*shape, dtype=dtype, device=device)
            return torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            slots = self._slots
            taken = None
            for i, slot in enumerate(slots):
                if slot.nbytes == nbytes and slot.idle():
                    del slots[i]
                    if not slot.replaced():
                        taken = slot
                    break
            if taken is None:
                taken = _Slot(nbytes, shape, dtype, self._huge_pages)
                if len(slots) >= MAX_SLOTS:
                    del slots[0]  # only forgotten here: its tensor, if still alive, keeps its memory
            taken.claimed = True
            slots.append(taken)  # most recently used last, so that the other size's storage is the one evicted
        # The tensor is made once the lock is released: the torch op that makes it runs whatever torch function or
        # dispatch mode is active, which may normalize with this very module (that call passes over the claimed
        # storage) or wait for another thread that does.
        try:
            return taken.tensor(shape, dtype)
        finally:
            taken.claimed = False  # the tensor, if made, now keeps the storage from being idle

    def clear(self) -> None:
        with self._lock:
            self._slots.clear()


# Every cache, for _unlock_after_fork.
_caches: "weakref.WeakSet[OutputCache]" = weakref.WeakSet()


def _unlock_after_fork() -> None:
    """Another thread of the parent may have held a cache's lock at the fork (it was taking an output): the child
    would get the lock held, with no thread to release it, and hang in its first large normalize. The child has
    only the thread that forked, so fresh locks are safe."""
    for cache in list(_caches):
        cache._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_unlock_after_fork)
