"""The ``torch`` backend: the reference math of :mod:`protonorm.reference`, run eagerly on any device."""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .base import Backend, exported, reference_normalize_moments, reference_reward_moments

# On the CPU the reference's float64 temporaries for a whole large batch are tens of MB each: fresh memory whose
# pages fault in one by one, several times over per call. Parts of 64K elements keep them in cache (moments 3.6x faster
# at 8192x342 and 7.1x at 16384x1024, bench/RESULTS.md). On a GPU one part is one set of launches, and memory is cached.
_PART_ELEMENTS = 1 << 16


def _rows_per_part(x) -> Optional[int]:
    # Not in a program torch.export traces (see base.exported; it has no memory to keep in cache either).
    if x.device.type != "cpu" or exported(x):
        return None
    return max(1, _PART_ELEMENTS // max(x.shape[-1], 1))


class TorchBackend(Backend):
    name = "torch"

    def supports(self, device: torch.device) -> Optional[str]:
        return None

    def moments(self, x, mask, workspace):
        return reference.batch_moments(x, mask, _rows_per_part(x))

    def merge(self, parts, mean, var, count, dropped, ema_decay):
        reference.merge_into_running(parts, mean, var, count, dropped, ema_decay)

    def combine(self, parts):
        return reference.combine_parts(parts)

    def normalize(self, x, mean, var, epsilon, clamp_value, un_norm, center, out):
        reference.normalize(x, mean, var, epsilon, clamp_value, un_norm, center, out=out)

    def normalize_moments(self, x, mean, var, epsilon, clamp_value, out, workspace):
        return reference_normalize_moments(x, mean, var, epsilon, clamp_value, out, _rows_per_part(x))

    def reward_moments(self, reward, terminated, discounted, gamma, workspace):
        return reference_reward_moments(reward, terminated, discounted, gamma, _rows_per_part(discounted))


BACKEND = TorchBackend()
