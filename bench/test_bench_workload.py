"""A synthetic ProtoMotions PPO epoch per contender (``protonorm bench --workload ppo`` as a pytest-benchmark)."""
import pytest

from protonorm.benchmark.workload import PPOWorkload

pytest.importorskip("pytest_benchmark")


def test_ppo_epoch(benchmark, contender, device, synchronized, request):
    workload = PPOWorkload(envs=request.config.getoption("--bench-envs"), device=device)
    epoch = synchronized(workload.epoch(contender))
    benchmark.group = "ppo epoch"
    benchmark.extra_info["resolved"] = contender.resolved or contender.name
    benchmark.pedantic(epoch, warmup_rounds=1, rounds=5 if device.type == "cpu" else 20, iterations=1)
