"""Shared test setup.

Without a CUDA device the Triton kernels run under Triton's CPU interpreter; the variable must be set before
triton is first imported, which is why it is set here, at collection time, before protonorm is imported.
"""
import os
from unittest import mock

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import protonorm  # noqa: E402,F401  (imported after TRITON_INTERPRET is set)
from protonorm import backends, reference  # noqa: E402


def _usable_backends():
    device = torch.device("cpu")
    return [name for name, reason in backends.available(device).items() if reason is None]


# Backends that run on CPU tensors here. CI builds the C++ extension and installs triton, so all three run
# there; a missing one is reported by test_backends_present rather than silently skipped.
CPU_BACKENDS = _usable_backends()


@pytest.fixture(params=CPU_BACKENDS)
def backend_name(request):
    return request.param


def assert_same(a, b):
    """Bitwise equality (so -0.0 differs from 0.0), except that any two NaNs are equal: the sign and payload of a
    NaN carry no meaning, and torch itself does not preserve them across dtype conversions."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if not a.is_floating_point():
        assert torch.equal(a, b)
        return
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), "NaN positions differ"
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    a_bits, b_bits = a.reshape(-1).view(bits), b.reshape(-1).view(bits)
    keep = ~nan_a.reshape(-1)
    differ = (a_bits != b_bits) & keep
    assert not differ.any(), f"{int(differ.sum())} values differ, e.g. {a.reshape(-1)[differ][:4].tolist()} vs " \
        f"{b.reshape(-1)[differ][:4].tolist()}"


def _correctly_rounded_sqrt(t):
    return torch.from_numpy(np.sqrt(t.numpy()))  # numpy's float32 root is IEEE's, correctly rounded


def expected_normalize(backend_name, x, mean, var, epsilon, clamp_value, un_norm=False, center=True):
    """What backend ``backend_name`` must write, bit for bit: ``reference.normalize``, with the float32 root that
    backend takes. The torch and C++ backends take torch's (on the CPU, MKL's, which is not always correctly
    rounded); the Triton kernels take the correctly rounded one (``sqrt_rn``): torch's on CUDA, numpy's here."""
    if backend_name != "triton" or x.is_cuda:
        return reference.normalize(x, mean, var, epsilon, clamp_value, un_norm, center)
    with mock.patch.object(torch, "sqrt", _correctly_rounded_sqrt):
        return reference.normalize(x, mean, var, epsilon, clamp_value, un_norm, center)
