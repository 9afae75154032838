"""The ``torch`` backend: the reference math of :mod:`protonorm.reference`, run eagerly on any device."""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def supports(self, device: torch.device) -> Optional[str]:
        return None

    def moments(self, x, mask, workspace):
        return reference.batch_moments(x, mask)

    def merge(self, parts, mean, var, count, dropped, ema_decay):
        reference.merge_into_running(parts, mean, var, count, dropped, ema_decay)

    def combine(self, parts):
        return reference.combine_parts(parts)

    def normalize(self, x, mean, var, epsilon, clamp_value, un_norm, center, out):
        out.copy_(reference.normalize(x, mean, var, epsilon, clamp_value, un_norm, center))

    def normalize_moments(self, x, mean, var, epsilon, clamp_value, out, workspace):
        out.copy_(reference.normalize(x, mean, var, epsilon, clamp_value))
        return reference.batch_moments(x)

    def reward_moments(self, reward, terminated, discounted, gamma, workspace):
        t = terminated.reshape(-1, *([1] * (discounted.dim() - 1)))
        discounted.copy_(reference.discounted_return_update(discounted, reward, t, gamma))
        return reference.batch_moments(discounted)


BACKEND = TorchBackend()
