"""The baseline every benchmark compares against: the upstream module's operation sequence, re-implemented.

It reproduces what ProtoMotions' normalizer does per call, op for op and Python call for Python call, so that its
cost (kernels, the host sync, the float32 count, the module's attribute lookups) is what the speedups are measured
against:

* ``record_moments``: ``torch.mean`` and ``torch.var(unbiased=False)`` of the batch in its own dtype, then either
  an EMA update or a pairwise merge whose counts are gathered with ``torch.tensor([count, n])`` (a blocking
  device-to-host read when the count lives on a GPU) and turned into float32, and a ``fill_`` of the count.
* ``normalize``: ``(x - mean.float()) / torch.sqrt(var.float() + eps)``, then the clamp.
* ``record_reward``: ``discounted * gamma * (1 - terminated.float()) + reward.clone()``, then ``record_moments``.

Like upstream's, the modules are ``nn.Module``s whose statistics are buffers (each read goes through
``nn.Module.__getattr__``) and whose calls check for lazy initialization and a Fabric. It is a benchmark fixture,
not an implementation to use: it keeps upstream's weaknesses on purpose.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn


def combine_moments(means, vars, counts) -> Tuple[Tensor, Tensor, Tensor]:
    """Upstream's merge of lists of moments: counts become one float32 tensor, pairs merge in tree order."""
    if not isinstance(counts, Tensor):
        counts = torch.tensor(counts)  # reads a device-resident count on the host
    counts = counts.float()
    while len(means) > 1:
        new_means, new_vars, new_counts = [], [], []
        for i in range(0, len(means), 2):
            if i + 1 < len(means):
                mean_a, var_a, count_a = means[i], vars[i], counts[i]
                mean_b, var_b, count_b = means[i + 1], vars[i + 1], counts[i + 1]
                total_count = count_a + count_b
                delta = mean_b - mean_a
                combined_mean = mean_a + delta * (count_b / total_count)
                m_2_combined = var_a * count_a + var_b * count_b + (delta**2) * (count_a * count_b / total_count)
                new_means.append(combined_mean)
                new_vars.append(m_2_combined / total_count)
                new_counts.append(total_count)
            else:
                new_means.append(means[i])
                new_vars.append(vars[i])
                new_counts.append(counts[i])
        means, vars, counts = new_means, new_vars, new_counts
    return means[0], torch.clamp(vars[0], min=0.0), counts[0].long()


class BaselineRunningMeanStd(nn.Module):
    """Observation normalizer with upstream's per-call operation sequence (same method names)."""

    def __init__(
        self,
        shape: Tuple[int, ...],
        epsilon: float = 1e-5,
        device="cpu",
        clamp_value: Optional[float] = None,
        ema_decay: Optional[float] = None,
    ):
        super().__init__()
        self.fabric = None
        self.epsilon = epsilon
        self.clamp_value = clamp_value
        self.ema_decay = ema_decay
        self.shape = shape
        self.device = device
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64, device=device))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64, device=device))
        self.register_buffer("count", torch.ones((), dtype=torch.long, device=device))
        self._initialized = True

    def _lazy_init(self, x: Tensor) -> None:
        if not self._initialized:  # upstream's per-call check; the shape is always given here
            raise AssertionError("the baseline is built with its shape")

    def maybe_clamp(self, x: Tensor) -> Tensor:
        if self.clamp_value is None:
            return x
        return torch.clamp(x, -self.clamp_value, self.clamp_value)

    @torch.no_grad()
    def update_from_moments(self, batch_mean: Tensor, batch_var: Tensor, batch_count: int) -> None:
        if self.ema_decay is not None:
            d = self.ema_decay
            self.mean[:] = d * self.mean + (1 - d) * batch_mean
            self.var[:] = d * self.var + (1 - d) * batch_var
            return
        new_mean, new_var, new_count = combine_moments(
            [self.mean, batch_mean], [self.var, batch_var], [self.count, batch_count]
        )
        self.mean[:] = new_mean
        self.var[:] = new_var
        self.count.fill_(new_count)

    def normalize(self, arr: Tensor, un_norm: bool = False) -> Tensor:
        self._lazy_init(arr)
        if not un_norm:
            result = (arr - self.mean.float()) / torch.sqrt(self.var.float() + self.epsilon)
            result = self.maybe_clamp(result)
        else:
            arr = self.maybe_clamp(arr)
            result = arr * torch.sqrt(self.var.float() + self.epsilon) + self.mean.float()
        return result

    @torch.no_grad()
    def record_moments(self, arr: Tensor) -> None:
        self._lazy_init(arr)
        batch_mean = torch.mean(arr, dim=0)
        batch_var = torch.var(arr, dim=0, unbiased=False)
        batch_count = arr.shape[0]
        if self.fabric is not None and self.fabric.world_size > 1:
            raise NotImplementedError("the baseline times one process")
        self.update_from_moments(batch_mean, batch_var, batch_count)


class BaselineRewardRunningMeanStd(BaselineRunningMeanStd):
    """Reward normalizer with upstream's per-step sequence: discounted-return update, then record."""

    def __init__(
        self,
        shape: Tuple[int, ...],
        gamma: float,
        epsilon: float = 1e-5,
        clamp_value: Optional[float] = None,
        device="cpu",
        ema_decay: Optional[float] = None,
    ):
        super().__init__(shape, epsilon, device, clamp_value, ema_decay)
        self.gamma = gamma
        self.discounted_reward: Optional[Tensor] = None

    def record_reward(self, reward: Tensor, terminated: Tensor) -> None:
        if self.discounted_reward is None:
            self.discounted_reward = reward.clone()
        else:
            self.discounted_reward = self.discounted_reward * self.gamma * (1 - terminated.float()) + reward.clone()
        self.record_moments(self.discounted_reward)

    def normalize(self, arr: Tensor, un_norm: bool = False) -> Tensor:
        if not un_norm:
            result = arr / torch.sqrt(self.var.float() + self.epsilon)
            result = self.maybe_clamp(result)
        else:
            arr = self.maybe_clamp(arr)
            result = arr * torch.sqrt(self.var.float() + self.epsilon)
        return result
