"""Backend registry and the ``auto`` rule.

``auto`` follows the device of each call's tensor: ``triton`` for CUDA tensors when Triton imports and compiles for
the GPU (NVIDIA, compute capability 7.0 or newer), ``cpp`` for CPU tensors when the compiled extension
``protonorm._C`` loaded, ``torch`` otherwise. An explicit name
must be able to run on the tensor's device, or the call raises. ``PROTONORM_BACKEND`` replaces ``auto``.
Where ``auto`` has to run the torch backend instead of a compiled one, it says so once, in one line on stderr.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Dict, Optional, Tuple

import torch

from .base import Backend

NAMES = ("torch", "cpp", "triton")
CHOICES = ("auto",) + NAMES
ENV_VAR = "PROTONORM_BACKEND"

_loaded: Dict[str, Tuple[Optional[Backend], Optional[str]]] = {}

# The compiled backends ``auto`` prefers, and what to call them in the notice when it has to do without one.
_FALLBACK_NOTICE = {"cpp": ("C++ CPU extension", "CPU"), "triton": ("Triton", "CUDA")}
_announced = set()


def load(name: str) -> Tuple[Optional[Backend], Optional[str]]:
    """``(backend, None)`` if ``name`` imports, else ``(None, one-line reason)``; cached."""
    if name not in _loaded:
        try:
            module = importlib.import_module(f"{__name__}.{name}_backend")
            _loaded[name] = (module.BACKEND, getattr(module, "UNAVAILABLE_REASON", None))
        except Exception as exc:  # an optional dependency missing or broken
            _loaded[name] = (None, f"{type(exc).__name__}: {exc}")
        if _loaded[name][1] is not None:
            # Import errors can span lines (a broken triton's often do); the reason goes into one-line messages.
            _loaded[name] = (None, " ".join(line.strip() for line in _loaded[name][1].splitlines() if line.strip()))
    return _loaded[name]


def announce_fallback(name: str, reason: Optional[str] = None) -> None:
    """Say once per process, in one line on stderr, that ``auto`` runs the torch backend where the compiled backend
    ``name`` would run: for ``reason``, or (None) if ``name`` cannot be loaded."""
    if reason is None:
        backend, reason = load(name)
        if backend is not None:
            return
    if name not in _announced:
        _announced.add(name)
        what, where = _FALLBACK_NOTICE[name]
        sys.stderr.write(f"protonorm: {what} unavailable ({reason}); {where} tensors use the torch path.\n")


def announce_at_import() -> None:
    """``import protonorm`` says at once where ``auto`` will run CPU tensors on the torch backend, unless
    ``PROTONORM_BACKEND`` names a backend: modules then follow it, a named ``cpp`` raising at the call."""
    if os.environ.get(ENV_VAR, "auto").strip().lower() in ("", "auto"):
        announce_fallback("cpp")


def check_choice(choice: Optional[str]) -> str:
    """Validate a ``backend=`` argument (None means the environment's choice or ``auto``)."""
    if choice is None or choice == "auto":
        choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        where = f"environment variable {ENV_VAR}"
    else:
        where = "backend="
    if choice not in CHOICES:
        raise ValueError(f"{where} must be one of {CHOICES}, got {choice!r}")
    return choice


def available(device: torch.device) -> Dict[str, Optional[str]]:
    """Every backend name mapped to None (usable on ``device``) or the reason it is not."""
    result = {}
    for name in NAMES:
        backend, reason = load(name)
        result[name] = reason if backend is None else backend.supports(device)
    return result


def _preferred(device: torch.device) -> str:
    """What ``auto`` tries first on ``device``."""
    return "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "torch"


def preload(choice: str, device) -> None:
    """Import the backends that a validated ``choice`` may resolve to on ``device`` (the fallback ``torch`` too),
    so that a first call traced by ``torch.compile`` finds them loaded: Dynamo cannot trace an import."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")  # where the module's buffers will be (normalizer._resolve_default_device)
    load("torch")
    name = _preferred(device) if choice == "auto" else choice
    if choice == "auto" and name in _FALLBACK_NOTICE:
        announce_fallback(name)  # the C++ one is announced at import; Triton's only where CUDA tensors are used
    load(name)


def resolve(choice: str, device: torch.device) -> Backend:
    """The backend that runs a call on ``device`` for a validated ``choice``."""
    if choice == "auto":
        name = _preferred(device)
        backend, reason = load(name)
        if backend is not None:
            reason = backend.supports(device)
            if reason is None:
                return backend
            if name in _FALLBACK_NOTICE and not torch.compiler.is_compiling():  # (a device it cannot run on)
                announce_fallback(name, reason)
        return load("torch")[0]
    backend, reason = load(choice)
    if backend is None:
        raise RuntimeError(f"backend {choice!r} is not available: {reason}")
    reason = backend.supports(device)
    if reason is not None:
        raise ValueError(f"backend {choice!r} cannot run on a {device.type} tensor: {reason}")
    return backend
