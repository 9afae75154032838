"""The baseline every benchmark compares against: the upstream module's operation sequence, re-implemented.

It reproduces what ProtoMotions' normalizer does per call, op for op, so that its cost (kernels, the host sync,
the float32 count) is what the speedups are measured against:

* ``record_moments``: ``torch.mean`` and ``torch.var(unbiased=False)`` of the batch in its own dtype, then either
  an EMA update or a pairwise merge whose counts are gathered with ``torch.tensor([count, n])`` (a blocking
  device-to-host read when the count lives on a GPU) and turned into float32, and a ``fill_`` of the count.
* ``normalize``: ``(x - mean.float()) / torch.sqrt(var.float() + eps)``, then the clamp.
* ``record_reward``: ``discounted * gamma * (1 - terminated.float()) + reward.clone()``, then ``record_moments``.

It is a benchmark fixture, not an implementation to use: it keeps upstream's weaknesses on purpose.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def pairwise_merge(means, variances, counts) -> Tuple[Tensor, Tensor, Tensor]:
    """Upstream's merge of lists of moments: counts become one float32 tensor, pairs merge in tree order."""
    if not isinstance(counts, Tensor):
        counts = torch.tensor(counts)  # reads a device-resident count on the host
    counts = counts.float()
    means, variances, counts = list(means), list(variances), list(counts)
    while len(means) > 1:
        merged_means, merged_vars, merged_counts = [], [], []
        for i in range(0, len(means) - 1, 2):
            n_a, n_b = counts[i], counts[i + 1]
            total = n_a + n_b
            delta = means[i + 1] - means[i]
            merged_means.append(means[i] + delta * (n_b / total))
            m2 = variances[i] * n_a + variances[i + 1] * n_b + delta**2 * (n_a * n_b / total)
            merged_vars.append(m2 / total)
            merged_counts.append(total)
        if len(means) % 2:
            merged_means.append(means[-1])
            merged_vars.append(variances[-1])
            merged_counts.append(counts[-1])
        means, variances, counts = merged_means, merged_vars, merged_counts
    return means[0], torch.clamp(variances[0], min=0.0), counts[0].long()


class BaselineRunningMeanStd:
    """Observation normalizer with upstream's per-call operation sequence (same method names)."""

    def __init__(
        self,
        shape: Tuple[int, ...],
        epsilon: float = 1e-5,
        device="cpu",
        clamp_value: Optional[float] = None,
        ema_decay: Optional[float] = None,
    ):
        self.epsilon = epsilon
        self.clamp_value = clamp_value
        self.ema_decay = ema_decay
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.var = torch.ones(shape, dtype=torch.float64, device=device)
        self.count = torch.ones((), dtype=torch.long, device=device)
        self.training = True

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def maybe_clamp(self, x: Tensor) -> Tensor:
        return x if self.clamp_value is None else torch.clamp(x, -self.clamp_value, self.clamp_value)

    @torch.no_grad()
    def update_from_moments(self, batch_mean: Tensor, batch_var: Tensor, batch_count: int) -> None:
        if self.ema_decay is not None:
            d = self.ema_decay
            self.mean[:] = d * self.mean + (1 - d) * batch_mean
            self.var[:] = d * self.var + (1 - d) * batch_var
            return
        mean, var, count = pairwise_merge([self.mean, batch_mean], [self.var, batch_var], [self.count, batch_count])
        self.mean[:] = mean
        self.var[:] = var
        self.count.fill_(count)

    @torch.no_grad()
    def record_moments(self, arr: Tensor) -> None:
        batch_mean = torch.mean(arr, dim=0)
        batch_var = torch.var(arr, dim=0, unbiased=False)
        self.update_from_moments(batch_mean, batch_var, arr.shape[0])

    def normalize(self, arr: Tensor, un_norm: bool = False) -> Tensor:
        std = torch.sqrt(self.var.float() + self.epsilon)
        if not un_norm:
            return self.maybe_clamp((arr - self.mean.float()) / std)
        return self.maybe_clamp(arr) * std + self.mean.float()


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

    @torch.no_grad()
    def record_reward(self, reward: Tensor, terminated: Tensor) -> None:
        if self.discounted_reward is None:
            self.discounted_reward = reward.clone()
        else:
            self.discounted_reward = self.discounted_reward * self.gamma * (1 - terminated.float()) + reward.clone()
        self.record_moments(self.discounted_reward)

    def normalize(self, arr: Tensor, un_norm: bool = False) -> Tensor:
        std = torch.sqrt(self.var.float() + self.epsilon)
        if not un_norm:
            return self.maybe_clamp(arr / std)
        return self.maybe_clamp(arr) * std
