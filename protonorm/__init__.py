"""protonorm: fast drop-in running mean/std normalizers for RL, compatible with ProtoMotions' API.

    from protonorm import RunningMeanStd, RewardRunningMeanStd, combine_moments
"""
from . import backends
from .normalizer import (
    RewardRunningMeanStd,
    RunningMeanStd,
    combine_moments,
    materialize_lazy_running_stats_from_state_dict,
)

__version__ = "0.1.0"

__all__ = [
    "RunningMeanStd",
    "RewardRunningMeanStd",
    "combine_moments",
    "materialize_lazy_running_stats_from_state_dict",
    "sync",
    "backends",
]


def sync(module, fabric=None):
    """Merge the statistics that every deferred-sync normalizer in ``module`` recorded since the last sync, across
    all ranks, with two collectives. Every rank must call it at the same point. See docs/DISTRIBUTED.md."""
    from .distributed import sync as _sync

    return _sync(module, fabric)


backends.announce_at_import()
