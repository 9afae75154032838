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


def pytest_collection_modifyitems(config, items):
    """Slow tests first: under ``-n auto`` a worker takes the sanitizer build at once instead of at the end, when the
    other worker would sit idle waiting for it."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort keeps the rest in order


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it, nothing to set
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most four (each imports torch and triton, and the multi-process tests
    start more processes of their own)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


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


@pytest.fixture
def compiled_graphs_dynamic(monkeypatch):
    """``torch.compile`` made to compile with a backend that runs the traced graph as it is and records, per graph,
    whether it takes symbolic sizes (a graph for any size); the list of those records."""
    compile_, dynamic = torch.compile, []

    def backend(graph, inputs):
        sizes = [n for t in inputs for n in (t.shape if isinstance(t, torch.Tensor) else [t])]
        dynamic.append(any(isinstance(n, torch.SymInt) for n in sizes))
        return graph.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": backend}))
    return dynamic


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


def _put_result(target, args, results):
    results.put(target(*args))


def in_forked_child(target, *args, held=None):
    """``target(*args)`` in a child forked from this process, with the lock ``held`` (if any) held by another thread
    at the moment of the fork; returns what the child returned (numpy arrays, by value). Fails the test when the
    child does not answer within a minute: it hangs."""
    import multiprocessing
    import queue as queues
    import threading

    locked, release = threading.Event(), threading.Event()

    def hold():
        with held:
            locked.set()
            release.wait(60)

    thread = threading.Thread(target=hold) if held is not None else None
    child = None
    try:
        if thread is not None:
            thread.start()
            assert locked.wait(60)
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        child = ctx.Process(target=_put_result, args=(target, args, results))
        child.start()
        release.set()
        try:
            got = results.get(timeout=60)
        except queues.Empty:
            pytest.fail(f"{target.__name__} did not return in a forked child (it hangs)")
        child.join(60)
    finally:
        release.set()
        if thread is not None:
            thread.join(60)
        if child is not None and child.is_alive():
            child.kill()
    assert child.exitcode == 0
    return got
