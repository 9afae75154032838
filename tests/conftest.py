"""Shared test setup.

Without a CUDA device the Triton kernels run under Triton's CPU interpreter; the variable must be set before
triton is first imported, which is why it is set here, at collection time, before protonorm is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import protonorm  # noqa: E402,F401  (imported after TRITON_INTERPRET is set)
from protonorm import backends  # noqa: E402


def _usable_backends():
    device = torch.device("cpu")
    return [name for name, reason in backends.available(device).items() if reason is None]


# Backends that run on CPU tensors here. CI builds the C++ extension and installs triton, so all three run
# there; a missing one is reported by test_backends_present rather than silently skipped.
CPU_BACKENDS = _usable_backends()


@pytest.fixture(params=CPU_BACKENDS)
def backend_name(request):
    return request.param
