"""Recycling of large CPU normalize outputs (protonorm/output_cache.py): memory is handed out again only when no
tensor, view, autograd graph, numpy array or storage object can reach it any more, and never changes a result."""
from __future__ import annotations

import copy
import os
import pickle
import re
import threading
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import protonorm
from protonorm import output_cache, reference

from conftest import in_forked_child

pytestmark = pytest.mark.skipif(not output_cache.enabled(), reason="this torch has no storage reference count")

B, D = 512, 256  # 512 KB of float32 output: above output_cache.MIN_BYTES


def make(backend="auto", **kwargs):
    norm = protonorm.RunningMeanStd(None, (D,), device="cpu", clamp_value=5.0, backend=backend, **kwargs)
    norm.record_moments(torch.randn(64, D, generator=torch.Generator().manual_seed(1)) * 2 + 1)
    return norm.eval()


def batch(seed=0, rows=B):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed)) * 3 - 1


def expected(norm, x):
    return reference.normalize(x, norm.mean, norm.var, norm.epsilon, norm.clamp_value, False, True)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_memory_of_a_dropped_output_is_reused_and_results_are_unchanged(backend):
    if backend == "cpp" and protonorm.backends.load("cpp")[0] is None:
        pytest.skip("C++ extension not built")
    norm = make(backend)
    first = norm.normalize(batch(0))
    address = first.data_ptr()
    del first
    x = batch(1)
    again = norm.normalize(x)
    assert again.data_ptr() == address
    assert again._base is None and again.is_contiguous() and not again.requires_grad
    torch.testing.assert_close(again, expected(norm, x), rtol=0, atol=0)


def test_the_same_memory_serves_another_shape_or_dtype_of_the_same_size():
    """A storage is kept by size; each output still gets the shape and dtype of its own call (the storage's
    template tensor is remade when they change), with the right values, and an in-place change of one output
    affects no later one."""
    norm = make()
    x = batch(0)
    first = norm.normalize(x)
    address = first.data_ptr()
    first.add_(100.0)  # bumps the version counter the outputs share with the template; harmless
    del first
    calls = [x.view(B // 2, 2, D), x.double()[: B // 2], x]
    for arr in calls:
        out = norm.normalize(arr)
        assert out.data_ptr() == address and out.shape == arr.shape and out.dtype == arr.dtype
        assert out.is_contiguous() and out._base is None and not out.requires_grad
        torch.testing.assert_close(out, expected(norm, arr), rtol=0, atol=0)
        del out


def _advised_for_huge_pages(address: int) -> bool:
    """Whether the mapping holding the first whole 2 MB page at or after ``address`` is advised for huge pages
    (``hg`` among its VmFlags in /proc/self/smaps)."""
    start = -(-address // output_cache.HUGE_PAGE) * output_cache.HUGE_PAGE
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(v, 16) for v in head.split("-"))
                inside = low <= start < high
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {start:#x}")


@pytest.mark.skipif(output_cache._madvise_function is None or not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
                    reason="transparent huge pages are a Linux feature this machine lacks")
def test_large_output_storage_is_advised_for_huge_pages():
    """A storage of 4 MB or more gets madvise(MADV_HUGEPAGE) before its first write: the kernel marks its mapping."""
    norm = make()
    x = batch(0, rows=output_cache.MIN_HUGE_PAGE_BYTES // (4 * D) + 8)
    out = norm.normalize(x)
    assert _advised_for_huge_pages(out.data_ptr())
    torch.testing.assert_close(out, expected(norm, x), rtol=0, atol=0)


@pytest.mark.parametrize("setting", ["default", "off", "small"])
def test_huge_page_advice_covers_whole_pages_inside_the_storage_only(setting, monkeypatch):
    """The advice asks for exactly the whole 2 MB pages inside the storage, is given once per storage, never for a
    storage under 4 MB, and never with PROTONORM_HUGE_PAGES=0."""
    calls = []
    monkeypatch.setattr(output_cache, "_madvise_function", lambda *args: calls.append(args) or 0)
    if setting == "off":
        monkeypatch.setenv("PROTONORM_HUGE_PAGES", "0")
    rows = output_cache.MIN_HUGE_PAGE_BYTES // (4 * D) + 8 if setting != "small" else B
    norm = make()
    for seed in range(3):
        out = norm.normalize(batch(seed, rows=rows))
        if seed < 2:
            del out  # the next call reuses the storage: no second advice
    if setting != "default":
        assert calls == []
        return
    (start, length, advice), = calls
    storage = out.untyped_storage()
    begin, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    assert advice == 14 and start % output_cache.HUGE_PAGE == 0 and length % output_cache.HUGE_PAGE == 0
    assert begin <= start < start + length <= end
    assert start - begin < output_cache.HUGE_PAGE and end - (start + length) < output_cache.HUGE_PAGE


def test_a_live_output_is_never_handed_out_again():
    norm = make()
    outputs = [norm.normalize(batch(i)) for i in range(5)]
    addresses = {o.data_ptr() for o in outputs}
    assert len(addresses) == 5
    for i, o in enumerate(outputs):
        torch.testing.assert_close(o, expected(norm, batch(i)), rtol=0, atol=0)


@pytest.mark.parametrize("holder", ["view", "numpy", "storage", "storage_weakref", "autograd", "clone_of_view_base"])
def test_anything_reaching_the_memory_keeps_it(holder):
    norm = make()
    x0 = batch(0)
    out = norm.normalize(x0)
    address = out.data_ptr()
    snapshot = out.clone()
    weight = torch.randn(D, 3, requires_grad=True)
    if holder == "view":
        kept = out[:, :5]
    elif holder == "numpy":
        kept = out.numpy()
    elif holder == "storage":
        kept = out.untyped_storage()
    elif holder == "storage_weakref":  # alive while the cache holds the storage: it reaches the memory through it
        kept = weakref.ref(out.untyped_storage())
    elif holder == "autograd":
        kept = (out @ weight).sum()  # the matmul saves `out` for the weight's gradient
    else:
        kept = out.view(-1)[10:]
    del out
    newer = [norm.normalize(batch(i)) for i in range(1, 4)]
    # Three live outputs evict the first storage from the cache (two slots): a weak reference alone then lets it go,
    # and the allocator may give its freed memory to a newer output, which nothing else reaches any more.
    freed = holder == "storage_weakref" and kept() is None
    assert freed or all(n.data_ptr() != address for n in newer)
    if holder == "autograd":
        kept.backward()
        torch.testing.assert_close(weight.grad, snapshot.sum(0, keepdim=True).T.expand(D, 3))
    elif holder == "view":
        assert torch.equal(kept, snapshot[:, :5])
    elif holder == "numpy":
        assert np.array_equal(kept, snapshot.numpy())
    elif holder == "storage_weakref" and kept() is not None:
        assert torch.equal(torch.empty(0).set_(kept()).view(torch.float32).view(B, D), snapshot)


def test_two_batch_sizes_alternate_without_fresh_allocations():
    norm = make()
    small, large = batch(0, rows=B), batch(1, rows=2 * B)
    addresses = {small.shape[0]: set(), large.shape[0]: set()}
    for _ in range(4):
        for x in (small, large):
            addresses[x.shape[0]].add(norm.normalize(x).data_ptr())
    assert all(len(a) == 1 for a in addresses.values())


def test_small_outputs_and_a_disabled_cache_keep_nothing(monkeypatch):
    norm = make()
    norm.normalize(torch.randn(4, D))
    assert norm._outputs._slots == []
    monkeypatch.setenv("PROTONORM_REUSE_OUTPUTS", "0")
    off = make()
    first = off.normalize(batch(0))
    assert off._outputs._slots == []
    torch.testing.assert_close(first, expected(off, batch(0)), rtol=0, atol=0)


@pytest.mark.parametrize("value", ["0", "false", "FALSE", " off ", "No"])
@pytest.mark.parametrize("variable", ["PROTONORM_REUSE_OUTPUTS", "PROTONORM_HUGE_PAGES"])
def test_settings_turn_off_in_any_usual_spelling(variable, value, monkeypatch):
    calls = []
    monkeypatch.setattr(output_cache, "_madvise_function", lambda *args: calls.append(args) or 0)
    monkeypatch.setenv(variable, value)
    norm = make()
    out = norm.normalize(batch(0, rows=output_cache.MIN_HUGE_PAGE_BYTES // (4 * D) + 8))
    assert calls == []
    assert (norm._outputs._slots == []) == (variable == "PROTONORM_REUSE_OUTPUTS")
    torch.testing.assert_close(out, expected(norm, batch(0, rows=out.shape[0])), rtol=0, atol=0)


@pytest.mark.parametrize("value", ["1", "true", "Yes", " ON", ""])
def test_settings_stay_on_in_any_usual_spelling(value, monkeypatch):
    calls = []
    monkeypatch.setattr(output_cache, "_madvise_function", lambda *args: calls.append(args) or 0)
    monkeypatch.setenv("PROTONORM_REUSE_OUTPUTS", value)
    monkeypatch.setenv("PROTONORM_HUGE_PAGES", value)
    norm = make()
    norm.normalize(batch(0, rows=output_cache.MIN_HUGE_PAGE_BYTES // (4 * D) + 8))
    assert len(calls) == 1 and len(norm._outputs._slots) == 1


@pytest.mark.parametrize("value", ["2", "disable", "0 0", "-1"])
@pytest.mark.parametrize("variable", ["PROTONORM_REUSE_OUTPUTS", "PROTONORM_HUGE_PAGES"])
def test_a_bad_setting_raises_when_the_module_is_made(variable, value, monkeypatch):
    monkeypatch.setenv(variable, value)
    message = (f"environment variable {variable} must be 1, true, yes, on (the default) or 0, false, no, off, "
               f"got {value!r}")
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_a_bad_setting_made_later_does_not_stop_a_checkpoint_loading(monkeypatch):
    """The settings are read when the module is made: a load, which drops the kept outputs, reads none."""
    norm = make()
    state = copy.deepcopy(norm.state_dict())
    norm.record_moments(batch(1))
    monkeypatch.setenv("PROTONORM_REUSE_OUTPUTS", "bogus")
    norm.load_state_dict(state)
    assert all(torch.equal(norm.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(norm.normalize(batch(2)), expected(norm, batch(2)), rtol=0, atol=0)


def test_inference_mode_and_grad_mode_get_their_own_kind_of_tensor():
    norm = make()
    with torch.inference_mode():
        inside = norm.normalize(batch(0))
    assert inside.is_inference()
    del inside
    outside = norm.normalize(batch(1))
    assert not outside.is_inference()
    (outside @ torch.randn(D, 2, requires_grad=True)).sum().backward()  # usable in autograd


def test_copies_and_pickles_start_without_cached_memory():
    norm = make()
    norm.normalize(batch(0))
    assert len(norm._outputs._slots) == 1
    for clone in (copy.deepcopy(norm), pickle.loads(pickle.dumps(norm))):
        assert clone._outputs._slots == []
        torch.testing.assert_close(clone.normalize(batch(2)), norm.normalize(batch(2)), rtol=0, atol=0)


def test_moving_the_module_releases_the_cache():
    norm = make()
    for move in (lambda m: m.to("cpu"), lambda m: m.float()):  # .float() from a parent keeps the float64 stats
        norm.normalize(batch(0))
        assert len(norm._outputs._slots) == 1
        move(norm)
        assert norm._outputs._slots == []
    assert norm.mean.dtype == torch.float64


def test_threads_sharing_a_module_never_share_an_output(monkeypatch):
    """Two threads asking for an output while one storage is idle: the one that finds it idle first claims it, and
    the other must not find it idle too. Each thread's idleness check waits (up to a second) for the other's, so
    that both checks overlap unless the cache lets one thread at a time through."""
    norm = make()
    norm.normalize(batch(0))  # dropped at once: an idle storage of the size asked for below
    inputs = [batch(1), batch(2)]
    meet = threading.Barrier(2, timeout=1.0)
    idle = output_cache._Slot.idle

    def idle_after_meeting(slot):
        found = idle(slot)
        try:
            meet.wait()
        except threading.BrokenBarrierError:  # the other thread is held back from its check: as it should be
            pass
        return found

    monkeypatch.setattr(output_cache._Slot, "idle", idle_after_meeting)
    outputs = [None, None]

    def work(i):
        outputs[i] = norm.normalize(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outputs[0].data_ptr() != outputs[1].data_ptr()
    for out, x in zip(outputs, inputs):
        torch.testing.assert_close(out, expected(norm, x), rtol=0, atol=0)


class _NormalizeOnDetach:
    """Mixed into a torch function or dispatch mode: the first time the mode sees a tensor made by ``detach`` (how
    the cache makes an output of its storage), it normalizes another batch with the same module, as a mode may run
    any code, and keeps that output."""

    def __init__(self, norm, x):
        super().__init__()
        self.norm, self.x, self.inner = norm, x, []

    def nested(self, func):
        if not self.inner and "detach" in str(func):
            self.inner.append(self.norm.normalize(self.x))


class _FunctionMode(_NormalizeOnDetach, torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.nested(func)
        return func(*args, **(kwargs or {}))


class _DispatchMode(_NormalizeOnDetach, TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.nested(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", [_FunctionMode, _DispatchMode])
def test_a_mode_normalizing_with_the_module_while_it_takes_an_output(mode):
    """An output is made of a claimed storage by a torch op, which torch function and dispatch modes see and which
    may run any code there, a normalize with the same module included. That nested call must neither wait for the
    outer one to finish taking its output (it would wait forever) nor get the storage the outer one claimed: both
    outputs right, in memory of their own."""
    norm = make()
    norm.normalize(batch(0))  # dropped at once: an idle storage the outer call claims
    outer_x, inner_x = batch(1), batch(2)
    active = mode(norm, inner_x)
    outputs = []

    def work():
        with active:
            outputs.append(norm.normalize(outer_x))

    thread = threading.Thread(target=work, daemon=True)  # (left waiting forever if the nested call waits)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the nested normalize waits for the outer one"
    (outer,), (inner,) = outputs, active.inner
    assert outer.untyped_storage().data_ptr() != inner.untyped_storage().data_ptr()
    torch.testing.assert_close(outer, expected(norm, outer_x), rtol=0, atol=0)
    torch.testing.assert_close(inner, expected(norm, inner_x), rtol=0, atol=0)


def test_an_output_moved_to_shared_memory_is_never_handed_out_again():
    """Sending an output to another process moves its storage into shared memory, which that process maps: once
    this process drops it, the memory must not be written again."""
    norm = make()
    out = norm.normalize(batch(0))
    out.share_memory_()  # what torch.multiprocessing does to a tensor put on a queue
    del out
    newer = [norm.normalize(batch(i)) for i in range(1, 4)]
    # (Addresses prove nothing here: the memory the storage had before it was shared is free for anyone.)
    assert not any(n.untyped_storage().is_shared() for n in newer)
    assert not any(slot.replaced() for slot in norm._outputs._slots)


@pytest.mark.parametrize("new_size", ["freed", "half"])
def test_an_output_whose_storage_was_shrunk_is_never_handed_out_again(new_size):
    """A caller may shrink its output's storage (torch's activation offloading frees memory with
    ``untyped_storage().resize_(0)``): the cache's storage is that same storage, and it must not be handed out again
    for outputs it no longer holds (the kernels would write past its end)."""
    norm = make()
    out = norm.normalize(batch(0))
    out.untyped_storage().resize_(0 if new_size == "freed" else out.untyped_storage().nbytes() // 2)
    del out
    again = norm._outputs.empty((B, D), torch.float32, torch.device("cpu"))
    assert again.untyped_storage().nbytes() >= B * D * 4
    del again
    x = batch(1)
    torch.testing.assert_close(norm.normalize(x), expected(norm, x), rtol=0, atol=0)


class _RecordingMode(TorchDispatchMode):
    """A dispatch mode that keeps the arguments of every op it sees (an op log for later inspection)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def test_a_mode_active_when_the_storage_is_made_does_not_skew_its_idle_counts():
    """A dispatch mode that holds on to the arguments of the first normalize (the storage object among them) must
    not make the storage's idle reference counts include its reference: once the mode is gone, a caller keeping
    the storage object in its place would find the memory handed out again."""
    norm = make()
    with _RecordingMode() as log:
        out = norm.normalize(batch(0))
    snapshot = out.clone()
    kept = out.untyped_storage()
    del out, log
    newer = norm.normalize(batch(1))
    assert newer.data_ptr() != kept.data_ptr()
    assert torch.equal(torch.empty(0).set_(kept).view(torch.float32).view(B, D), snapshot)


def _read_after_the_sender_moved_on(queue, results, go):
    received = queue.get()
    go.wait(60)
    results.put(bool(torch.equal(received[0], received[1])))


def test_an_output_read_by_another_process_stays_intact():
    """The same through a real queue: the other process compares the output with its clone after this process has
    dropped it and normalized four more batches."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_read_after_the_sender_moved_on, args=(queue, results, go))
    child.start()
    try:
        norm = make()
        out = norm.normalize(batch(0))
        queue.put((out, out.clone()))
        queue.close()
        queue.join_thread()  # the tensors are pickled, so their storages shared, by now
        del out
        for i in range(1, 5):
            norm.normalize(batch(i))
        go.set()
        assert results.get(timeout=60) is True
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()


def _normalize_in_child(norm, x):
    torch.set_num_threads(1)  # as DataLoader workers do: torch's own parallel ops would hang in a forked child
    return norm.normalize(x).numpy().copy()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_child_forked_while_another_thread_takes_an_output_normalizes():
    """Another thread of the parent is taking an output (it holds the cache's lock) at the moment of the fork: the
    child gets the lock held, with no thread of its own to release it."""
    norm, x = make(), batch(0)
    got = in_forked_child(_normalize_in_child, norm, x, held=norm._outputs._lock)
    assert torch.equal(torch.from_numpy(got), expected(norm, x))
