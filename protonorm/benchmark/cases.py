"""What is benchmarked: the cases (ProtoMotions' calls) and the contenders (the implementations that make them).

A *contender* is a name plus a factory of normalizer objects that speak ProtoMotions' API (``normalize``,
``record_moments``, ``record_reward``, ``train``/``eval``): protonorm's modules on each backend, the upstream
baseline (:mod:`protonorm.benchmark.baseline`) and, on request, ``torch.compile`` of the reference math. A *case*
builds its inputs once and turns a contender into a zero-argument callable that makes one ProtoMotions call.
New backends therefore need no change here: every name :func:`protonorm.backends.available` reports usable
becomes a contender.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import backends, reference
from ..backends.base import normalized_dtype
from .baseline import BaselineRewardRunningMeanStd, BaselineRunningMeanStd

# ProtoMotions' defaults: obs normalizers clamp at 5 with ema_decay 0.999 (``record_ema`` and ``norm_record``),
# reward normalizers are Welford with gamma 0.99 and clamp 5.
CLAMP = 5.0
EMA_DECAY = 0.999
GAMMA = 0.99
EPSILON = 1e-5
TERMINATION_RATE = 0.02  # share of environments that reset on a step

DEFAULT_SHAPES: Tuple[Tuple[int, int], ...] = ((8192, 342), (16384, 1024))
DEFAULT_ENVS = 4096

# name -> (what it runs, running-statistics mode)
CASE_KINDS: Dict[str, Tuple[str, Optional[float]]] = {
    "record_welford": ("record", None),
    "record_ema": ("record", EMA_DECAY),
    "norm_record": ("norm_record", EMA_DECAY),
    "normalize": ("normalize", EMA_DECAY),
    "reward": ("reward", None),
}
DEFAULT_CASES = ("record_welford", "record_ema", "norm_record", "reward")
CASE_HELP = {
    "record_welford": "record_moments(obs), all-time statistics",
    "record_ema": "record_moments(obs), ema_decay=0.999",
    "norm_record": "normalize(obs) then record_moments(obs), training mode (ProtoMotions' minibatch order)",
    "normalize": "normalize(obs), eval mode (rollout steps)",
    "reward": "record_reward(reward, terminated) on num_envs environments",
}

BASELINE = "baseline"
COMPILE = "compile"

_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX*]\s*(\d+)\s*$")


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    """``"8192x342,16384x1024"`` -> ``[(8192, 342), (16384, 1024)]``; ValueError names the bad entry."""
    shapes = []
    for entry in text.split(","):
        match = _SHAPE_RE.match(entry)
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
            raise ValueError(f"bad shape {entry.strip()!r} in {text!r}: expected ROWSxFEATURES, e.g. 8192x342")
        shapes.append((int(match.group(1)), int(match.group(2))))
    return shapes


# ------------------------------------------------------------------------------------------------ contenders
@dataclass
class Contender:
    """A named implementation: ``obs(features, ema_decay)`` and ``reward()`` build fresh normalizers on ``device``."""

    name: str
    obs: Callable[[int, Optional[float]], object]
    reward: Callable[[], object]
    resolved: Optional[str] = None  # for "auto": the backend it picked on this device

    @property
    def label(self) -> str:
        return f"auto ({self.resolved})" if self.resolved and self.name == "auto" else self.name


def protonorm_contender(name: str, device: torch.device) -> Contender:
    """protonorm's modules with ``backend=name`` (``"auto"`` or a backend name)."""
    from .. import RewardRunningMeanStd, RunningMeanStd

    def obs(features, ema_decay):
        return RunningMeanStd(None, (features,), EPSILON, device, CLAMP, ema_decay, backend=name)

    def reward():
        return RewardRunningMeanStd(None, (1,), GAMMA, EPSILON, CLAMP, device, backend=name)

    resolved = auto_backend(device) if name == "auto" else None
    return Contender(name, obs, reward, resolved)


def auto_backend(device: torch.device) -> str:
    """The backend that protonorm's modules built with ``backend="auto"`` run on ``device``: the one the environment
    variable ``PROTONORM_BACKEND`` names where it is set (ValueError or RuntimeError where that cannot run)."""
    return backends.resolve(backends.check_choice(None), device).name


def baseline_contender(device: torch.device) -> Contender:
    def obs(features, ema_decay):
        return BaselineRunningMeanStd((features,), EPSILON, device, CLAMP, ema_decay)

    def reward():
        return BaselineRewardRunningMeanStd((1,), GAMMA, EPSILON, CLAMP, device)

    return Contender(BASELINE, obs, reward)


class _CompiledReference:
    """ProtoMotions' API over ``torch.compile``-d functions of :mod:`protonorm.reference` (float64 statistics)."""

    def __init__(self, features: int, ema_decay: Optional[float], device, gamma: Optional[float] = None):
        self.mean = torch.zeros(features, dtype=torch.float64, device=device)
        self.var = torch.ones(features, dtype=torch.float64, device=device)
        self.count = torch.ones((), dtype=torch.int64, device=device)
        self.dropped = torch.zeros((), dtype=torch.int64, device=device)
        self.ema_decay = ema_decay
        self.gamma = gamma
        self.discounted_reward = None
        self.training = True
        self._record = torch.compile(self._record_eager, dynamic=False)
        self._normalize = torch.compile(self._normalize_eager, dynamic=False)
        self._reward_step = torch.compile(self._reward_step_eager, dynamic=False)

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def _record_eager(self, x):
        parts = reference.batch_moments(x.reshape(x.shape[0], -1))
        reference.merge_into_running(parts, self.mean, self.var, self.count, self.dropped, self.ema_decay)

    def _normalize_eager(self, x):
        return reference.normalize(x, self.mean, self.var, EPSILON, CLAMP, center=self.gamma is None)

    def _reward_step_eager(self, discounted, reward, terminated):
        discounted.copy_(reference.discounted_return_update(discounted, reward, terminated, self.gamma))
        self._record_eager(discounted)

    def record_moments(self, x):
        self._record(x)

    def normalize(self, x):
        return self._normalize(x)

    def record_reward(self, reward, terminated):
        if self.discounted_reward is None:
            self.discounted_reward = reward.to(normalized_dtype(reward.dtype), copy=True)
            self._record(self.discounted_reward)
        else:
            self._reward_step(self.discounted_reward, reward, terminated)


# Graphs that the compiled functions may hold: every case's shape and mode is one more graph of the same code, and
# past dynamo's limit (8 by default) a function runs eagerly from then on, which --compile would time as compiled.
COMPILE_GRAPH_LIMIT = 1024


def compile_contender(device: torch.device) -> Contender:
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "accumulated_recompile_limit"):
        if not hasattr(config, name):  # torch before 2.6 names them cache_size_limit, accumulated_cache_size_limit
            name = name.replace("recompile", "cache_size")
        setattr(config, name, max(getattr(config, name), COMPILE_GRAPH_LIMIT))
    return Contender(
        COMPILE,
        lambda features, ema_decay: _CompiledReference(features, ema_decay, device),
        lambda: _CompiledReference(1, None, device, gamma=GAMMA),
    )


def backend_names(device: torch.device, requested: Optional[Sequence[str]] = None) -> Tuple[List[str], Dict[str, str]]:
    """The protonorm contenders to run and, for each available-but-skipped or unavailable backend, why not.

    Default: ``auto`` plus every other backend usable on ``device`` (Triton on CPU runs only in the slow
    interpreter, so it is left out unless requested). ``requested`` names are validated by the caller.
    """
    usable = {name: reason for name, reason in backends.available(device).items()}
    skipped = {name: reason for name, reason in usable.items() if reason is not None}
    if requested is not None:
        return [name for name in requested if name not in (BASELINE, COMPILE)], skipped
    chosen = auto_backend(device)
    names = ["auto"]
    for name, reason in usable.items():
        if reason is None and name != chosen:
            if name == "triton" and device.type != "cuda":
                skipped[name] = "CPU tensors run Triton only in its interpreter; pass --backends triton to force it"
                continue
            names.append(name)
    return names, skipped


def build_contenders(device: torch.device, names: Sequence[str], compile_reference: bool) -> List[Contender]:
    """Contenders in table order: protonorm's, then ``compile`` if asked, then the baseline (always last)."""
    contenders = [protonorm_contender(name, device) for name in names]
    if compile_reference:
        contenders.append(compile_contender(device))
    contenders.append(baseline_contender(device))
    return contenders


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One ProtoMotions call on one input shape. ``rows x features`` is the obs batch (``envs x 1`` for reward)."""

    name: str
    rows: int
    features: int
    dtype: torch.dtype
    device: torch.device
    seed: int = 0
    _inputs: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return CASE_KINDS[self.name][0]

    @property
    def ema_decay(self) -> Optional[float]:
        return CASE_KINDS[self.name][1]

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.rows,) if self.kind == "reward" else (self.rows, self.features)

    @property
    def input_bytes(self) -> int:
        return self.rows * self.features * _itemsize(self.dtype)

    def moved_bytes(self) -> int:
        """Bytes a call must move at the least: what the roofline (GB/s) is computed from."""
        elements = self.rows * self.features
        x = elements * _itemsize(self.dtype)
        out = elements * _itemsize(normalized_dtype(self.dtype))
        if self.kind == "record":
            return x
        if self.kind in ("norm_record", "normalize"):
            return x + out
        # reward: read reward and terminated, read and write the discounted returns
        return x + self.rows * _itemsize(torch.bool) + 2 * out

    def inputs(self) -> Dict[str, torch.Tensor]:
        if not self._inputs:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            if self.kind == "reward":
                reward = torch.randn(self.rows, generator=gen) * 0.5 + 0.1
                terminated = torch.rand(self.rows, generator=gen) < TERMINATION_RATE
                self._inputs = {"reward": reward.to(self.device, self.dtype), "terminated": terminated.to(self.device)}
            else:
                # Per-feature offsets and scales like robot state: positions, velocities, contact flags.
                offset = torch.randn(self.features, generator=gen) * 3
                scale = torch.rand(self.features, generator=gen) * 2 + 0.1
                x = torch.randn(self.rows, self.features, generator=gen) * scale + offset
                self._inputs = {"x": x.to(self.device, self.dtype)}
        return self._inputs

    def release(self) -> None:
        """Drop the inputs (they are rebuilt, identically, if needed again)."""
        self._inputs = {}

    def copy_call(self) -> Callable[[], object]:
        """``y.copy_(x)`` of the case's input tensor: the bandwidth it is judged against."""
        source = self.inputs()["reward" if self.kind == "reward" else "x"]
        target = torch.empty_like(source)
        return lambda: target.copy_(source)

    def copy_bytes(self) -> int:
        return 2 * self.input_bytes

    def call(self, contender: Contender) -> Callable[[], object]:
        """A fresh normalizer of ``contender`` and a zero-argument callable making this case's call on it."""
        inputs = self.inputs()
        if self.kind == "reward":
            normalizer = contender.reward()
            reward, terminated = inputs["reward"], inputs["terminated"]
            return lambda: normalizer.record_reward(reward, terminated)
        normalizer = contender.obs(self.features, self.ema_decay)
        x = inputs["x"]
        if self.kind == "record":
            return lambda: normalizer.record_moments(x)
        if self.kind == "normalize":
            normalizer.eval()
            return lambda: normalizer.normalize(x)
        normalizer.train()

        def normalize_then_record():
            y = normalizer.normalize(x)
            normalizer.record_moments(x)
            return y

        return normalize_then_record


def build_cases(
    names: Sequence[str],
    shapes: Sequence[Tuple[int, int]],
    envs: int,
    dtype: torch.dtype,
    device: torch.device,
) -> List[Case]:
    """Every obs case on every shape (smallest first), then the reward case on ``envs`` environments."""
    cases = []
    for rows, features in sorted(shapes, key=lambda s: s[0] * s[1]):
        for name in names:
            if CASE_KINDS[name][0] != "reward":
                cases.append(Case(name, rows, features, dtype, device))
    for name in names:
        if CASE_KINDS[name][0] == "reward":
            cases.append(Case(name, envs, 1, dtype, device))
    return cases


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
