"""Long runs: what a module or a thread keeps is bounded and goes with it. Dropped modules are freed by reference
counting alone (no cycle waits for the collector, holding recycled CPU outputs meanwhile), and the caches keyed by
shape stay within their bounds however many shapes a run brings (rollout and minibatch sizes, partial minibatches)."""
from __future__ import annotations

import copy
import gc
import threading
import weakref

import pytest
import torch

import protonorm
from protonorm import output_cache
from protonorm.backends import cpp_backend

from conftest import CPU_BACKENDS

D = 64
LARGE = 2048  # rows: 512 KB of float32 output, above output_cache.MIN_BYTES, so the module recycles it


def _trained(backend):
    norm = protonorm.RunningMeanStd(None, (D,), device="cpu", backend=backend)
    x = torch.randn(LARGE, D)
    norm.normalize(x)
    norm.record_moments(x)
    return norm


def _evaluated(backend):
    norm = _trained(backend).eval()
    norm.normalize(torch.randn(LARGE, D))
    return norm


def _in_inference_mode(backend):
    norm = _trained(backend)
    with torch.inference_mode():
        norm.normalize(torch.randn(LARGE, D))
    return norm


def _copied(backend):
    norm = copy.deepcopy(_trained(backend))
    norm.normalize(torch.randn(LARGE, D))
    return norm


def _loaded(backend):
    norm = protonorm.RunningMeanStd(device="cpu", backend=backend)  # lazy: takes its shape from the checkpoint
    norm.load_state_dict(_trained(backend).state_dict())
    norm.normalize(torch.randn(LARGE, D))
    return norm


def _on_another_thread(backend):
    norm = _trained(backend)
    worker = threading.Thread(target=lambda: norm.normalize(torch.randn(LARGE, D)))
    worker.start()
    worker.join()
    return norm


def _rewarded(backend):
    norm = protonorm.RewardRunningMeanStd(None, (1,), 0.99, device="cpu", backend=backend)
    for _ in range(3):
        norm.record_reward(torch.randn(LARGE * D), torch.rand(LARGE * D) > 0.9)
    norm.normalize(torch.randn(LARGE * D))
    return norm


@pytest.mark.skipif(not output_cache.enabled(), reason="this torch has no storage reference count")
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])  # (the interpreter makes cycles)
@pytest.mark.parametrize("make", [_trained, _evaluated, _in_inference_mode, _copied, _loaded, _on_another_thread,
                                  _rewarded])
def test_a_dropped_module_is_freed_at_once_with_its_recycled_outputs(make, backend):
    norm = make(backend)
    storages = [weakref.ref(slot.storage) for slot in norm._outputs._slots]
    assert storages  # the module kept the memory of an output it handed out
    module = weakref.ref(norm)
    gc.disable()  # freed by reference counting alone: nothing of it waits in a cycle for the collector
    try:
        del norm
        assert module() is None
        assert all(storage() is None for storage in storages)
    finally:
        gc.enable()


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ extension is not built")
def test_shape_keyed_caches_stay_bounded_over_many_shapes():
    # A run of many batch sizes (partial minibatches) and many feature widths (models built and dropped).
    norm = protonorm.RunningMeanStd(None, (3,), device="cpu", backend="cpp")
    for rows in range(1, 1001):
        x = torch.randn(rows, 3)
        norm.normalize(x)
        norm.record_moments(x)
    assert len(cpp_backend._known_layouts) <= 256
    for width in range(1, 41):
        protonorm.RunningMeanStd(None, (width,), device="cpu", backend="cpp").eval().normalize(torch.randn(2, width))
    assert len(cpp_backend._scratch.stats) <= cpp_backend._MAX_SCRATCH_SIZES


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_what_a_thread_kept_goes_with_the_thread(backend):
    # An evaluation or rollout thread per episode: the moments and workspace a thread's training-mode normalize keeps
    # for its record are that thread's, and must not outlive it in a module that lives on.
    norm = _trained(backend)
    kept = []

    def work():
        x = torch.randn(LARGE, D)
        norm.normalize(x)
        kept.append(weakref.ref(norm._stash.moments[2]))  # the parts stashed for this thread's record

    for _ in range(3):
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
    assert len(kept) == 3 and all(parts() is None for parts in kept)
