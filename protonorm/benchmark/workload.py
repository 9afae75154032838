"""A synthetic ProtoMotions PPO epoch: the normalizer calls one epoch makes, in ProtoMotions' order.

Rollout: ``steps`` environment steps, each recording the reward (``record_reward`` on ``envs`` environments)
and normalizing three observation batches in eval mode (actor, critic and a third observer, e.g. a
discriminator), no recording. Then the reward buffer ``[steps, envs]`` is normalized once. Update:
``minibatches`` minibatches of ``steps * envs / minibatches`` rows, each normalized then recorded in training
mode by the actor's and the critic's normalizer. Only normalizer calls run, so an epoch's time is the
normalizer's share of a real epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import timing
from .cases import BASELINE, EMA_DECAY, TERMINATION_RATE, Contender

WARMUP_EPOCHS = 1


@dataclass
class PPOWorkload:
    envs: int = 4096
    obs_dims: Tuple[int, int, int] = (342, 1024, 342)  # actor, critic, third observer
    steps: int = 32
    minibatches: int = 16
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    seed: int = 0

    @property
    def minibatch_rows(self) -> int:
        return max(1, self.steps * self.envs // self.minibatches)

    def describe(self) -> str:
        return (
            f"PPO epoch: {self.steps} steps x {self.envs} envs (reward record + {len(self.obs_dims)} eval normalizes "
            f"of D={','.join(map(str, self.obs_dims))}), then {self.minibatches} minibatches of "
            f"{self.minibatch_rows} rows (normalize + record, actor and critic)"
        )

    def epoch(self, contender: Contender) -> Callable[[], None]:
        """Fresh normalizers of ``contender`` and a callable that runs one epoch of their calls."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)

        def batch(rows, cols):
            return (torch.randn(rows, cols, generator=gen) * 2 + 1).to(self.device, self.dtype)

        step_obs = [batch(self.envs, d) for d in self.obs_dims]
        actor_dim, critic_dim = self.obs_dims[0], self.obs_dims[1]
        minibatch = {"actor": batch(self.minibatch_rows, actor_dim), "critic": batch(self.minibatch_rows, critic_dim)}
        reward = (torch.randn(self.envs, generator=gen) * 0.5).to(self.device, self.dtype)
        terminated = (torch.rand(self.envs, generator=gen) < TERMINATION_RATE).to(self.device)
        reward_buffer = (torch.randn(self.steps, self.envs, generator=gen)).to(self.device, self.dtype)

        reward_norm = contender.reward()
        obs_norms = [contender.obs(d, EMA_DECAY) for d in self.obs_dims]
        actor, critic = obs_norms[0], obs_norms[1]

        def run_epoch():
            for norm in obs_norms:
                norm.eval()
            for _ in range(self.steps):
                reward_norm.record_reward(reward, terminated)
                for norm, obs in zip(obs_norms, step_obs):
                    norm.normalize(obs)
            reward_norm.normalize(reward_buffer)
            actor.train()
            critic.train()
            for _ in range(self.minibatches):
                for norm, obs in ((actor, minibatch["actor"]), (critic, minibatch["critic"])):
                    norm.normalize(obs)
                    norm.record_moments(obs)

        return run_epoch


def run_workload(
    workload: PPOWorkload,
    contenders: Sequence[Contender],
    repetitions: int,
    on_repetition: Optional[Callable[[], None]] = None,
) -> List[dict]:
    """Epoch time per contender (interleaved epochs), speedup against the baseline, launches and syncs per epoch."""
    device = workload.device
    epochs = {c.name: workload.epoch(c) for c in contenders}
    for run_epoch in epochs.values():
        for _ in range(WARMUP_EPOCHS):
            run_epoch()
    timing.synchronize(device)
    samples = timing.interleaved(epochs, {name: 1 for name in epochs}, repetitions, device, on_repetition)
    records = []
    for c in contenders:
        s = samples[c.name]
        records.append(
            {
                "case": "ppo_epoch",
                "backend": c.name,
                "resolved": c.resolved or c.name,
                "shape": [workload.steps, workload.envs],
                "obs_dims": list(workload.obs_dims),
                "minibatches": workload.minibatches,
                "dtype": str(workload.dtype).replace("torch.", ""),
                "device": str(device),
                "median_us": s.median * 1e6,
                "p20_us": s.percentile(20) * 1e6,
                "p80_us": s.percentile(80) * 1e6,
                "speedup": timing.paired_speedup(samples[BASELINE], s),
                "gbps": None,
                "pct_copy_bw": None,
                "launches": timing.count_launches(epochs[c.name], device, calls=1),
                "host_syncs": timing.count_host_syncs(epochs[c.name], device, calls=1),
                "repetitions": repetitions,
            }
        )
    return records


def default_repetitions(device: torch.device) -> int:
    return 20 if device.type == "cuda" else 3
