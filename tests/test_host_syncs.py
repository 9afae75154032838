"""No host syncs on the hot paths, on every backend, watched by :class:`sync_guard.SyncGuard`.

The guard flags what would stall a GPU's host (reads of values, data-dependent shapes, copies between host and
device, tensors made from Python data) when protonorm's Python issues it, so a CPU run shows what a CUDA run would
pay. The torch backend also runs on the ``meta`` device, where a copy from or to the CPU is visible as such. Each
scenario runs with the dispatch-level watch (the backends then go through their ops) and without it (the backends'
direct calls, which a dispatch mode turns off), on a fresh module (the first calls, lazy initialization included)
and on one warmed up by the same calls.

The documented reads: ``nonfinite="raise"`` reads the dropped-row count (checked to be its only read), and
``protonorm.sync`` compares the ranks' layouts on the host (it runs outside the guard). The C++ backend's first
normalize in a process probes torch's square root on CPU tensors (``torch.equal``), a CPU-only check of CPU values
done once per process; it is warmed up before the guard. No first call reads anything more than later calls.
"""
from __future__ import annotations

import pytest
import torch

import protonorm
from protonorm import RewardRunningMeanStd, RunningMeanStd, distributed
from protonorm.backends import cpp_backend

from conftest import CPU_BACKENDS
from sync_guard import SyncGuard

# (backend, device) pairs that run here.
PLACES = [(name, "cpu") for name in CPU_BACKENDS] + [("torch", "meta")]
PLACE_IDS = [f"{name}-{device}" for name, device in PLACES]


@pytest.fixture(autouse=True)
def _cpp_probe_done():
    if cpp_backend._C is not None:
        cpp_backend._torch_sqrt_address()


@pytest.fixture(params=PLACES, ids=PLACE_IDS)
def place(request):
    return request.param


@pytest.fixture(params=[True, False], ids=["ops", "direct"])
def dispatch(request):
    return request.param


def _batch(rows, cols, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * 3 + 1).to(dtype).to(device)


def _guarded_twice(make, calls, dispatch):
    """``calls(module)`` on a fresh module under the guard (first calls), then again (later calls)."""
    module = make()
    for _ in range(2):
        with SyncGuard(dispatch):
            calls(module)


@pytest.mark.parametrize("ema", [None, 0.9], ids=["welford", "ema"])
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "shaped"])
def test_observation_calls(place, dispatch, ema, lazy):
    backend, device = place
    x, other = _batch(16, 5, device), _batch(9, 5, device, seed=1)
    half = _batch(7, 5, device, torch.bfloat16, seed=2)
    mask = (torch.arange(16) % 3 != 0).to(device)
    wanting_grad = x.clone().requires_grad_()

    def calls(m):
        m.train()
        y = m.normalize(x)
        m.record_moments(x)  # the stashed moments of the same tensor
        m.record_moments(other)
        m.record_moments(x, mask)
        m.record_moments(half)
        m.record_moments(x[:0])
        m.eval()
        m.normalize(x)
        m.normalize(half)
        m.normalize(y, un_norm=True)
        m.normalize(x[:, None, :])  # broadcast over extra leading dims
        m.normalize(wanting_grad)  # the reference math, for autograd
        with torch.inference_mode():
            m.train()
            m.normalize(x)
            m.record_moments(x)

    _guarded_twice(lambda: RunningMeanStd(None, None if lazy else (5,), device=device, clamp_value=4.0,
                                          ema_decay=ema, backend=backend), calls, dispatch)


def test_observation_calls_with_a_feature_shape(place, dispatch):
    backend, device = place
    x = _batch(12, 6, device).reshape(12, 2, 3)

    def calls(m):
        m.train()
        m.normalize(x)
        m.record_moments(x)
        m.eval()
        m.normalize(x[0])

    _guarded_twice(lambda: RunningMeanStd(None, (2, 3), device=device, backend=backend), calls, dispatch)


@pytest.mark.parametrize("flags", [torch.bool, torch.float32, torch.int64])
@pytest.mark.parametrize("features", [1, 3])
def test_reward_calls(place, dispatch, flags, features):
    backend, device = place
    shape = (11,) if features == 1 else (11, features)
    steps = [(_batch(11, features, device, seed=s).reshape(shape),
              (torch.arange(11) % (s + 2) == 0).to(flags).to(device)) for s in range(3)]

    def calls(r):
        for reward, terminated in steps:
            r.record_reward(reward, terminated)
        r.normalize(steps[0][0])
        r.normalize(steps[0][0], un_norm=True)
        with torch.inference_mode():
            r.record_reward(*steps[1])

    for ema in (None, 0.9):
        _guarded_twice(lambda: RewardRunningMeanStd(None, (features,), 0.99, device=device, clamp_value=5.0,
                                                    ema_decay=ema, backend=backend), calls, dispatch)


def test_reward_of_one_environment_with_a_python_flag(place, dispatch):
    backend, device = place
    reward = _batch(1, 1, device)[:, 0]
    _guarded_twice(lambda: RewardRunningMeanStd(None, (1,), 0.99, device=device, backend=backend),
                   lambda r: (r.record_reward(reward, False), r.record_reward(reward, True)), dispatch)


@pytest.mark.parametrize("ema", [None, 0.9], ids=["welford", "ema"])
def test_update_from_moments(place, dispatch, ema):
    """Upstream's signature takes ``batch_count: int``: a Python count must not become a host-to-device copy."""
    backend, device = place
    mean, var = _batch(1, 4, device)[0], _batch(1, 4, device, seed=1)[0].abs()

    def calls(m):
        m.update_from_moments(mean, var, 7)
        m.update_from_moments(mean, var, m.count)
        m.update_from_moments(mean[0], var[0], 3)  # one-element moments broadcast

    _guarded_twice(lambda: RunningMeanStd(None, (4,), device=device, ema_decay=ema, backend=backend), calls, dispatch)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_combine_moments(device, dispatch):
    """Upstream combines ``[self.count, batch_count]`` with a Python ``batch_count``, and all-gathered counts."""
    m = RunningMeanStd(None, (4,), device=device, backend="torch")
    mean, var = _batch(1, 4, device)[0], _batch(1, 4, device, seed=1)[0].abs()
    with SyncGuard(dispatch):
        protonorm.combine_moments([m.mean, mean], [m.var, var], [m.count, 7])
        protonorm.combine_moments([m.mean, mean, mean], [m.var, var, var], [3, 4, 5])
        protonorm.combine_moments([m.mean, mean], [m.var, var], [2.5, 1.5])
        protonorm.combine_moments([m.mean, mean], [m.var, var], torch.stack([m.count, m.count]))
        protonorm.combine_moments([m.mean], [m.var], [m.count])


def test_state_dict_round_trip(place, dispatch):
    backend, device = place
    source = RunningMeanStd(None, (4,), device=device, backend=backend)
    source.record_moments(_batch(8, 4, device))
    state = source.state_dict()
    model = torch.nn.ModuleDict({"obs": RunningMeanStd(None, None, device=device, backend=backend)})
    with SyncGuard(dispatch):
        source.state_dict()
        protonorm.materialize_lazy_running_stats_from_state_dict(model, {f"obs.{k}": v for k, v in state.items()})
        model.load_state_dict({f"obs.{k}": v for k, v in state.items()})
        RunningMeanStd(None, None, device=device, backend=backend).load_state_dict(state)
        model["obs"].record_moments(_batch(8, 4, device))


class _MirrorWorld:
    """A fabric of two ranks that hold the same data: ``all_gather`` returns two copies of the tensor."""

    world_size, global_rank = 2, 0

    def all_gather(self, tensor):
        return torch.stack([tensor, tensor])


@pytest.mark.parametrize("method", distributed.REDUCE_CHOICES[1:])
@pytest.mark.parametrize("ema", [None, 0.9], ids=["welford", "ema"])
def test_distributed_per_call(place, dispatch, monkeypatch, method, ema):
    backend, device = place
    monkeypatch.setenv(distributed.REDUCE_ENV_VAR, method)
    x, mask = _batch(10, 4, device), (torch.arange(10) % 2 == 0).to(device)
    reward, terminated = _batch(6, 1, device)[:, 0], (torch.arange(6) % 4 == 0).to(device)

    def obs_calls(m):
        m.normalize(x)
        m.record_moments(x)
        m.record_moments(x, mask)
        m.record_moments(x[:0])  # an empty batch still joins the collective
        m.update_from_moments(m.mean, m.var, 3)

    def reward_calls(r):
        r.record_reward(reward, terminated)
        r.record_reward(reward, terminated)

    _guarded_twice(lambda: RunningMeanStd(_MirrorWorld(), None, device=device, ema_decay=ema, backend=backend),
                   obs_calls, dispatch)
    _guarded_twice(lambda: RewardRunningMeanStd(_MirrorWorld(), (1,), 0.99, device=device, ema_decay=ema,
                                                backend=backend), reward_calls, dispatch)


@pytest.mark.parametrize("ema", [None, 0.9], ids=["welford", "ema"])
def test_distributed_deferred(place, dispatch, ema):
    """Deferred records between syncs (``protonorm.sync`` itself reads on the host, as documented), and a switch
    back to per-call records, which send what the deferred ones owe."""
    backend, device = place
    x = _batch(10, 4, device)
    m = RunningMeanStd(_MirrorWorld(), (4,), device=device, ema_decay=ema, backend=backend, sync="deferred")
    for _ in range(2):
        with SyncGuard(dispatch):
            m.normalize(x)
            m.record_moments(x)
            m.update_from_moments(m.mean, m.var, 3)
        if device != "meta":  # (it compares the ranks' layouts on the host: meta tensors hold no values)
            protonorm.sync(m)
    with SyncGuard(dispatch):
        m.record_moments(x)
        m.sync = "per_call"
        m.record_moments(x)


@pytest.mark.parametrize("fabric", [None, _MirrorWorld()], ids=["local", "distributed"])
@pytest.mark.parametrize("place", PLACES[:-1], ids=PLACE_IDS[:-1])  # (not on meta: the read needs values)
def test_nonfinite_raise_reads_only_in_its_check(place, dispatch, fabric):
    """``nonfinite="raise"`` reads the dropped-row count on the host, as documented: that and nothing else."""
    backend, device = place
    x = _batch(10, 4, device)
    reward, terminated = _batch(6, 1, device)[:, 0], torch.zeros(6, device=device)

    def calls(modules):
        m, r = modules
        m.normalize(x)
        m.record_moments(x)
        r.record_reward(reward, terminated)

    modules = (RunningMeanStd(fabric, (4,), device=device, backend=backend, nonfinite="raise"),
               RewardRunningMeanStd(fabric, (1,), 0.99, device=device, backend=backend, nonfinite="raise"))
    for _ in range(2):
        with SyncGuard(dispatch, allow=["_raise_if_nonfinite"]) as guard:
            calls(modules)
        assert guard.found  # (the read is there, and seen)


# ------------------------------------------------------------------------------------------------ the guard itself
_SYNCING = {
    "item": "t.sum().item()",
    "if": "1 if (t > 0).any() else 0",
    "int": "int(t.sum())",
    "float": "float(t.sum())",
    "index": "[0, 1][(t[0] > 0).long()]",  # an index of 0 or 1 (t.long()[0] of a random t could be 2)
    "tolist": "t.tolist()",
    "cpu": "t.cpu()",
    "to cpu": "t.to('cpu')",
    "to from cpu": "torch.ones(3).to(t.device)",
    "copy_ from cpu": "t.copy_(torch.ones(t.shape))",
    "tensor of a list": "torch.tensor([1.0, 2.0], device=t.device)",
    "as_tensor of a number": "torch.as_tensor(3, device=t.device)",
    "nonzero": "t.nonzero()",
    "where(condition)": "torch.where(t > 0)",
    "mask index": "t[t > 0]",
    "mask assign": "u = t.clone(); u[u > 0] = 0.0",
    "masked_select": "t.masked_select(t > 0)",
    "unique": "t.unique()",
    "repeat_interleave": "t.repeat_interleave(torch.ones_like(t, dtype=torch.long))",
    "equal": "torch.equal(t, t)",
    "allclose": "torch.allclose(t, t)",
}
_NOT_SYNCING = {
    "reductions": "t.sum(); t.max(); (t > 0).all()",
    "fill": "torch.full((), 3, device=t.device); torch.zeros(2, device=t.device)",
    "where(condition, x, y)": "torch.where(t > 0, t, 0.0)",
    "index_select": "t.index_select(0, torch.zeros(1, dtype=torch.long, device=t.device))",
    "same-device to": "t.to(t.device, torch.float64)",
    "shapes": "t.shape[0] + t.dim() + t.numel()",
}


_PROBE_PATH = protonorm.__file__.replace("__init__.py", "probe.py")  # code compiled here passes for protonorm's


def _run_as_protonorm(code: str, t):
    """Run ``code`` as if it were a line of protonorm (the guard watches only what protonorm issues)."""
    try:
        exec(compile(code, _PROBE_PATH, "exec"), {"torch": torch, "t": t})
    except (NotImplementedError, RuntimeError):  # meta tensors hold no values to read
        pass


_BETWEEN_DEVICES = ("to cpu", "to from cpu", "copy_ from cpu")  # (no such copy when everything is on the CPU)


@pytest.mark.parametrize("name, device", [(name, device) for name in sorted(_SYNCING) for device in ("cpu", "meta")
                                          if device == "meta" or name not in _BETWEEN_DEVICES])
def test_guard_flags_what_syncs(name, device, dispatch):
    t = torch.randn(6, device=device)
    guard = SyncGuard(dispatch)
    with pytest.raises(AssertionError, match="host syncs"):
        with guard:
            _run_as_protonorm(_SYNCING[name], t)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name", sorted(_NOT_SYNCING))
def test_guard_passes_what_does_not_sync(name, device, dispatch):
    with SyncGuard(dispatch):
        _run_as_protonorm(_NOT_SYNCING[name], torch.randn(6, device=device))


def test_guard_ignores_what_the_caller_does():
    with SyncGuard():
        torch.randn(3).sum().item()


@pytest.mark.parametrize("backend_name", [name for name in CPU_BACKENDS if name != "torch"])
def test_guard_watches_inside_the_backends_ops(backend_name, dispatch, monkeypatch):
    """A host read inside a compiled backend's op body is flagged also when the op goes through the dispatcher,
    which would run its body past both modes."""
    namespace = {"torch": torch}
    exec(compile("def reading(*args):\n    return int(torch.ones(2).sum().item()) - 1\n", _PROBE_PATH, "exec"),
         namespace)
    if backend_name == "cpp":
        monkeypatch.setattr(cpp_backend, "_threads", namespace["reading"])  # called by every kernel, only there
    else:
        from protonorm.kernels import merge

        real = merge.needs_ticket
        monkeypatch.setattr(merge, "needs_ticket", lambda parts: (namespace["reading"](), real(parts))[1])
    m = RunningMeanStd(None, (3,), device="cpu", backend=backend_name)
    with pytest.raises(AssertionError, match="host syncs"):
        with SyncGuard(dispatch):
            m.record_moments(torch.randn(4, 3))
