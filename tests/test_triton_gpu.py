"""The compiled Triton backend on a CUDA device: launch counts, host syncs, CUDA-graph capture and agreement
with the torch backend at the benchmark sizes. Skipped without CUDA (run with ``pytest -m gpu``).

Tolerances: moments accumulate in float64 in both backends (1e-12 relative); normalize performs torch's
float32 operations with IEEE division and square root, as torch does on CUDA: bit-exact.
"""
from __future__ import annotations

import pytest
import torch

import protonorm
from protonorm import reference
from protonorm.diagnostics import HostSyncCounter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# The benchmark sizes, and one whose last row block and last column tile are partial (three tiles of 2048 columns,
# the last holding one): the masked edges and the multi-tile non-finite pre-pass as a GPU runs them.
OBS_SIZES = [(8192, 342), (16384, 1024), (4096, 4096), (2049, 4097)]
REWARD_ENVS = [1024, 8192]


@pytest.fixture(scope="module")
def triton_backend():
    from protonorm.backends import triton_backend as module

    if module.UNAVAILABLE_REASON is not None:
        pytest.fail(f"CUDA is present but the Triton backend is not: {module.UNAVAILABLE_REASON}")
    return module.BACKEND


def obs(b, d, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(b, d, device="cuda", generator=g) * 3 + 50).to(dtype)


def pair(d, **kwargs):
    return (
        protonorm.RunningMeanStd(None, (d,), device="cuda", backend="triton", **kwargs),
        protonorm.RunningMeanStd(None, (d,), device="cuda", backend="torch", **kwargs),
    )


def cuda_kernel_launches(fn) -> int:
    """Device kernels launched by ``fn`` (after a warm-up call that compiles and allocates)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("b,d", OBS_SIZES)
@pytest.mark.parametrize("ema", [None, 0.999])
def test_agrees_with_torch_backend_at_benchmark_sizes(triton_backend, b, d, dtype, ema):
    m, ref = pair(d, clamp_value=5.0, ema_decay=ema)
    for step in range(3):
        x = obs(b, d, dtype, seed=step)
        if step == 1:
            x[7, d - 1] = float("nan")
        out, out_ref = m.normalize(x), ref.normalize(x)
        if step == 0:  # identical statistics so far: identical output
            assert torch.equal(out, out_ref)
        else:  # float64 statistics equal to ~1e-15 may round to float32 an ulp apart
            torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-5, equal_nan=True)
        m.record_moments(x)
        ref.record_moments(x)
        torch.testing.assert_close(m.mean, ref.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.var, ref.var, rtol=1e-12, atol=1e-12)
        assert torch.equal(m.count, ref.count) and torch.equal(m.nonfinite_rows, ref.nonfinite_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("b,d", OBS_SIZES)
def test_normalize_is_bit_exact_with_torch(triton_backend, b, d, dtype):
    x = obs(b, d, dtype)
    mean = torch.randn(d, device="cuda", dtype=torch.float64)
    var = torch.rand(d, device="cuda", dtype=torch.float64) + 0.1
    for un_norm, center, clamp in ((False, True, 5.0), (True, True, 5.0), (False, False, None), (True, False, 0.3)):
        out = torch.empty(x.shape, dtype=torch.promote_types(dtype, torch.float32), device="cuda")
        triton_backend.normalize(x, mean, var, 1e-5, clamp, un_norm, center, out)
        assert torch.equal(out, reference.normalize(x, mean, var, 1e-5, clamp, un_norm, center))


@pytest.mark.parametrize("envs", REWARD_ENVS)
def test_reward_agrees_with_torch_backend(triton_backend, envs):
    kwargs = dict(clamp_value=5.0, device="cuda")
    m = protonorm.RewardRunningMeanStd(None, (1,), 0.99, backend="triton", **kwargs)
    ref = protonorm.RewardRunningMeanStd(None, (1,), 0.99, backend="torch", **kwargs)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(20):
        reward = torch.randn(envs, device="cuda", generator=g)
        done = torch.rand(envs, device="cuda", generator=g) < 0.02
        m.record_reward(reward, done)
        ref.record_reward(reward, done)
    assert torch.equal(m.discounted_reward, ref.discounted_reward)
    torch.testing.assert_close(m.var, ref.var, rtol=1e-12, atol=1e-12)
    assert torch.equal(m.count, ref.count)


@pytest.mark.parametrize("b,d", OBS_SIZES)
def test_launch_counts(triton_backend, b, d):
    m = protonorm.RunningMeanStd(None, (d,), device="cuda", backend="triton", clamp_value=5.0)
    x = obs(b, d)
    assert cuda_kernel_launches(lambda: m.record_moments(x)) <= 2

    def fused():
        m.normalize(x)
        m.record_moments(x)

    assert cuda_kernel_launches(fused) <= 2
    m.eval()
    assert cuda_kernel_launches(lambda: m.normalize(x)) == 1


@pytest.mark.parametrize("envs", REWARD_ENVS)
def test_reward_record_launch_count(triton_backend, envs):
    r = protonorm.RewardRunningMeanStd(None, (1,), 0.99, device="cuda", backend="triton")
    reward = torch.randn(envs, device="cuda")
    done = torch.zeros(envs, device="cuda", dtype=torch.bool)
    r.record_reward(reward, done)
    assert cuda_kernel_launches(lambda: r.record_reward(reward, done)) <= 2


def test_no_host_sync_on_hot_path(triton_backend):
    m = protonorm.RunningMeanStd(None, (342,), device="cuda", backend="triton", clamp_value=5.0, ema_decay=0.999)
    r = protonorm.RewardRunningMeanStd(None, (1,), 0.99, device="cuda", backend="triton")
    x = obs(8192, 342)
    reward, done = torch.randn(4096, device="cuda"), torch.zeros(4096, device="cuda")
    r.record_reward(reward, done)
    m.normalize(x)
    m.record_moments(x)
    with HostSyncCounter(strict=True) as probe:
        m.normalize(x)
        m.record_moments(x)
        r.record_reward(reward, done)
        r.normalize(reward)
    assert probe.count == 0


class _MirrorWorld:
    """Two ranks holding the same data."""

    world_size, global_rank = 2, 0

    def all_gather(self, tensor):
        return torch.stack([tensor, tensor])


def test_no_synchronizing_cuda_operation_on_hot_paths(triton_backend):
    """What CUDA itself waits for, with torch's sync debug mode raising at it: also where no dispatch mode looks (the
    backend's direct calls), blocking host-to-device copies (a Python count) and data-dependent shapes."""
    m = protonorm.RunningMeanStd(None, (342,), device="cuda", backend="triton", clamp_value=5.0)
    shared = protonorm.RunningMeanStd(_MirrorWorld(), (342,), device="cuda", backend="triton", ema_decay=0.99)
    r = protonorm.RewardRunningMeanStd(None, (1,), 0.99, device="cuda", backend="triton")
    x = obs(4096, 342)
    mask = torch.rand(4096, device="cuda") < 0.5
    reward, done = torch.randn(4096, device="cuda"), torch.rand(4096, device="cuda") < 0.1

    def calls():
        m.train()
        m.normalize(x)
        m.record_moments(x)
        m.record_moments(x, mask)
        m.eval()
        m.normalize(x)
        m.normalize(x, un_norm=True)
        m.train()
        r.record_reward(reward, done)
        r.normalize(reward)
        m.update_from_moments(m.mean, m.var, 7)
        protonorm.combine_moments([m.mean, m.mean], [m.var, m.var], [m.count, 7])
        shared.record_moments(x)

    calls()  # compiles the kernels and makes the merges' counters
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_cuda_graph_capture_and_replay_of_normalize_and_record(triton_backend):
    d = 342
    m, ref = pair(d, clamp_value=5.0)
    static_x = obs(8192, d)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile kernels, fill the workspaces
        for _ in range(2):
            m.normalize(static_x)
            m.record_moments(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.no_grad():  # back to the prior, without dropping the warmed-up workspaces
        m.mean.zero_(), m.var.fill_(1.0), m.count.fill_(1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = m.normalize(static_x)
        m.record_moments(static_x)
    for step in range(5):
        x = obs(8192, d, seed=10 + step)
        static_x.copy_(x)
        graph.replay()
        expected = ref.normalize(x)
        ref.record_moments(x)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, expected, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(m.mean, ref.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.var, ref.var, rtol=1e-12, atol=1e-12)
        assert torch.equal(m.count, ref.count)


def test_large_batch_uses_64_bit_offsets(triton_backend):
    """B * D beyond 2^31 elements: row offsets must be computed in 64 bits, by every kernel that reads or writes rows
    (the last row, past 2^31 elements, would be read from or written to a wrapped address)."""
    free, _ = torch.cuda.mem_get_info()
    b, d = (1 << 21) + 3, 1025  # 2.1e9 elements, 8.6 GB in float32
    if free < 3 * b * d * 4:
        pytest.skip(f"needs {3 * b * d * 4 / 2**30:.0f} GiB of free device memory")
    x = torch.ones(b, d, device="cuda")
    x[-1] = 3.0
    parts = triton_backend.moments(x, None, {})
    n, dropped, mean, m2 = reference.split_parts(triton_backend.combine(parts))
    assert n.item() == b and dropped.item() == 0
    torch.testing.assert_close(mean[0], torch.full((d,), 1.0 + 2.0 / b, device="cuda", dtype=torch.float64))
    del parts
    # mean 0, var 1, epsilon 0: the normalized rows are the rows themselves.
    zero, one = torch.zeros(d, device="cuda", dtype=torch.float64), torch.ones(d, device="cuda", dtype=torch.float64)
    out = torch.zeros_like(x)
    parts = triton_backend.normalize_moments(x, zero, one, 0.0, None, out, {})
    assert torch.equal(out[0], x[0]) and torch.equal(out[-1], x[-1])
    n, dropped, mean, _ = reference.split_parts(triton_backend.combine(parts))
    assert n.item() == b and dropped.item() == 0
    torch.testing.assert_close(mean[0], torch.full((d,), 1.0 + 2.0 / b, device="cuda", dtype=torch.float64))
    out.zero_()
    triton_backend.normalize(x, zero, one, 0.0, None, False, True, out)
    assert torch.equal(out[0], x[0]) and torch.equal(out[-1], x[-1])
