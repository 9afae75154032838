"""The documentation's code. Every ```python block of README.md, docs/ARCHITECTURE.md and docs/DISTRIBUTED.md runs, a
file's blocks in order in one namespace, as written; what a block takes from the reader's program (``fabric``, a batch)
comes from stand-ins named here, and a top-level ``...`` (code the block leaves out) is where the test runs its
stand-in for that code. What the blocks' comments say happens is checked. Every shell command the documents give names
a real script and real options: the commands are parsed by their own argument parsers, never run.
"""
import argparse
import ast
import datetime
import os
import re
import runpy
import shlex
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from protonorm import backends, cli
from protonorm.diagnostics import OpCounter

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/ARCHITECTURE.md", "docs/DISTRIBUTED.md")


def _read(doc: str) -> str:
    return (ROOT / doc).read_text()


def python_blocks(doc: str):
    return re.findall(r"^```python\n(.*?)^```", _read(doc), flags=re.M | re.S)


def _is_elision(stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis


def run_blocks(doc: str, namespace: dict, elided=None) -> int:
    """Runs ``doc``'s python blocks in order in ``namespace``; ``elided(namespace)`` runs at each top-level ``...``.
    Returns the number of blocks run."""
    blocks = python_blocks(doc)
    for i, block in enumerate(blocks):
        pending = []

        def flush():
            if pending:
                code = compile(ast.Module(body=list(pending), type_ignores=[]), f"{doc} block {i + 1}", "exec")
                exec(code, namespace)
                pending.clear()

        for stmt in ast.parse(block).body:
            if _is_elision(stmt) and elided is not None:
                flush()
                elided(namespace)
            else:
                pending.append(stmt)
        flush()
    return len(blocks)


def test_blocks_are_found():
    # Guards the extraction itself: a changed fence style would otherwise leave the tests below with nothing to run.
    assert [len(python_blocks(doc)) for doc in DOCS] == [1, 0, 1]


def test_architecture_blocks_run():
    run_blocks("docs/ARCHITECTURE.md", {})  # none today; a new one must run on its own


# --------------------------------------------------------------------------------------------- README.md
class _TensorOps(TorchDispatchMode):
    """Records each dispatched op with the data pointers of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ptrs = {a.data_ptr() for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)}
        self.calls.append((str(func), ptrs))
        return func(*args, **(kwargs or {}))


def test_readme_use_block_runs_and_fuses_normalize_and_record():
    """Stand-ins: ``fabric=None`` (one process), and a CPU batch, rewards and reset flags of ProtoMotions' shapes,
    smaller. The block's modules keep upstream's default ``device="cuda:0"``, which falls back to the CPU here."""
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(64, 342, generator=g) * 3.0 + 1.0
    rewards = torch.randn(16, generator=g)
    terminated = torch.arange(16) % 5 == 0
    ns = {"fabric": None, "obs": obs, "rewards": rewards, "terminated": terminated}
    with warnings.catch_warnings(record=True) as caught, _TensorOps() as seen:
        warnings.simplefilter("always")
        run_blocks("README.md", ns)
    if not torch.cuda.is_available():  # "the default device="cuda:0" falls back to the CPU with a warning"
        assert any("CUDA is not available" in str(w.message) for w in caught)
    obs_norm, rew_norm, y = ns["obs_norm"], ns["rew_norm"], ns["y"]
    assert obs_norm.mean.device.type == "cpu" and y.shape == obs.shape
    # EMA mode: count stays at its prior; the reward normalizer counts every environment's step.
    assert obs_norm.count.item() == 1 and rew_norm.count.item() == 1 + rewards.numel()

    if backends.available(obs.device).get("cpp", "missing") is None:  # auto runs the C++ backend
        # "training mode: also computes obs's moments in the same pass ... so this only merges them": of the
        # backend's ops, one reads obs (the fused normalize), and the record that follows only merges.
        kernels = [(name, ptrs) for name, ptrs in seen.calls if name.startswith("protonorm.")]
        reading_obs = [name for name, ptrs in kernels if obs.data_ptr() in ptrs]
        assert reading_obs == ["protonorm.cpp_normalize_moments.default"]
        names = [name for name, _ in kernels]
        first = names.index("protonorm.cpp_normalize_moments.default")
        assert names[first + 1] == "protonorm.cpp_merge.default"
        assert obs_norm.mean.data_ptr() in kernels[first + 1][1]

    # The same statistics as recording the batch alone, as upstream's pair of calls gives.
    from protonorm import RunningMeanStd
    ref = RunningMeanStd(None, (342,), device="cpu", clamp_value=5.0, ema_decay=0.999, backend="torch")
    ref.record_moments(obs)
    torch.testing.assert_close(obs_norm.mean, ref.mean, rtol=1e-12, atol=0)  # float64 sums in another order
    torch.testing.assert_close(obs_norm.var, ref.var, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------- DISTRIBUTED.md
STEPS, ENVS = 3, 4


def _rank_rewards(rank: int) -> torch.Tensor:
    return torch.arange(ENVS, dtype=torch.float32) + 10.0 * rank


def _distributed_rank(fabric, out_dir):
    """One rank of the DISTRIBUTED.md block. Stand-ins: a Lightning Fabric of 2 CPU processes (gloo, ddp_spawn) for
    ``fabric``; for the code at ``...``, ``agent`` holding the three normalizers, a rollout of 3 steps, and this rank's
    rewards and reset flags."""
    rank = fabric.global_rank
    ns = {"fabric": fabric}
    collectives = []

    def elided(ns):
        ns["agent"] = torch.nn.ModuleDict({k: ns[k] for k in ("actor_obs", "critic_obs", "reward")})
        ns["rollout"] = range(STEPS)
        ns["r"], ns["done"] = _rank_rewards(rank), torch.tensor([False, True, False, False])
        counter = OpCounter(lambda name: name.startswith("c10d."))
        counter.__enter__()  # counts what the rest of the block issues
        collectives.append(counter)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # device="cuda:0" without CUDA
        run_blocks("docs/DISTRIBUTED.md", ns, elided)
    counter = collectives[0]
    counter.__exit__(None, None, None)
    stats = {k: (m.mean, m.var, m.count) for k, m in ns["agent"].items()}
    torch.save({"collectives": counter.names, "stats": stats}, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_block_runs_on_two_ranks(tmp_path, monkeypatch):
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    strategy = DDPStrategy(start_method="spawn", timeout=datetime.timedelta(seconds=60))
    Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(_distributed_rank, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for seen in ranks:
        # "records stay on each rank" and "two collectives for all three": the sync's two all_gathers, nothing else.
        assert len(seen["collectives"]) == 2 and all("allgather" in n for n in seen["collectives"])
    for name in ("actor_obs", "critic_obs", "reward"):
        for a, b in zip(ranks[0]["stats"][name], ranks[1]["stats"][name]):
            assert torch.equal(a, b), name  # bitwise the same on both ranks
    mean, var, count = ranks[0]["stats"]["reward"]
    assert count.item() == 1 + 2 * STEPS * ENVS  # the prior and every rank's rows, each once
    assert ranks[0]["stats"]["actor_obs"][2].item() == 1  # recorded nothing


# --------------------------------------------------------------------------------------------- shell commands
def _code(doc: str):
    """Inline code spans and the lines of ``bash`` blocks."""
    text = _read(doc)
    lines = [ln for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S) for ln in block.splitlines()]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return [re.sub(r"\s+#.*", "", ln).strip() for ln in lines] + re.findall(r"`([^`\n]+)`", prose)


def _commands(doc: str):
    """Each command of ``doc`` (``a && b`` split) that runs protonorm, a bench script or pytest."""
    out = []
    for span in _code(doc):
        for part in span.split("&&"):
            words = shlex.split(part)
            if words and (words[0] in ("protonorm", "pytest", "pip") or words[:1] == ["python"]
                          or words[0].endswith(".sh")):
                out.append(words)
    return out


class _Parsed(Exception):
    pass


def _script_options(path: Path, argv):
    """Parses ``argv`` with the script's own parser, stopping before the script does anything with it."""
    original = argparse.ArgumentParser.parse_args
    parsers = []

    def parse_args(self, args=None, namespace=None):
        parsers.append(self)
        raise _Parsed(original(self, argv, namespace))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        mp.setattr(sys, "argv", [str(path)] + list(argv))
        mp.syspath_prepend(str(path.parent))  # as `python script.py` puts the script's folder first
        with pytest.raises(_Parsed):
            runpy.run_path(str(path), run_name="__main__")
    return {opt for action in parsers[0]._actions for opt in action.option_strings}


def _bench_options():
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {opt for action in sub.choices["bench"]._actions for opt in action.option_strings}


def _check_command(words, pytestconfig, monkeypatch, tmp_path):
    """Checks one command; returns the options its program takes."""
    if words[0] == "protonorm":
        assert words[1] == "bench", words
        argv = [w.replace("PATH", str(tmp_path / "out")) for w in words[1:]]
        from protonorm.benchmark import suite, workload

        def stop(*args, **kwargs):
            raise _Parsed()

        # Everything the command checks runs (cases, shapes, backends), then the benchmark is stopped.
        monkeypatch.setattr(suite, "run_suite", stop)
        monkeypatch.setattr(workload, "run_workload", stop)
        with pytest.raises(_Parsed):
            cli._bench(cli.build_parser().parse_args(argv))
        return _bench_options()
    if words[0] == "pip":
        from setuptools.config.pyprojecttoml import read_configuration

        extras = read_configuration(ROOT / "pyproject.toml", expand=False)["project"]["optional-dependencies"]
        for spec in words[2:]:
            m = re.fullmatch(r"\.\[(.*)\]", spec)
            if m:
                assert set(m.group(1).split(",")) <= set(extras), f"{words}: extras are {sorted(extras)}"
        return set()
    if words[0].endswith(".sh"):
        assert (ROOT / words[0]).is_file() and os.access(ROOT / words[0], os.X_OK), words
        return set()
    if words[0] == "python" and words[1:2] != ["-m"]:
        assert (ROOT / words[1]).is_file(), words
        return _script_options(ROOT / words[1], words[2:])
    args = words[3:] if words[0] == "python" else words[1:]  # python -m pytest ... / pytest ...
    assert words[0] == "pytest" or words[1:3] == ["-m", "pytest"], words
    for arg in args:
        if not arg.startswith("-") and not arg.isalpha():  # a path (and not a flag's value such as "auto")
            assert (ROOT / arg).exists(), words
    _, unknown = pytestconfig._parser.parse_known_and_unknown_args(args)  # with this run's plugins: xdist, benchmark
    assert not unknown, f"{words}: pytest does not take {unknown}"
    return set()


@pytest.mark.parametrize("doc", [d for d in DOCS])
def test_shell_commands_name_real_scripts_and_options(doc, pytestconfig, monkeypatch, tmp_path):
    commands = _commands(doc)
    options = set()
    for words in commands:
        options |= _check_command(words, pytestconfig, monkeypatch, tmp_path)
    # An option quoted alone (`--json PATH`) belongs to one of the commands the same document gives.
    for span in _code(doc):
        if span.startswith("--"):
            assert span.split()[0] in options, f"{doc}: {span!r} is not an option of {commands}"
            if span.split()[0] in _bench_options() and len(span.split()) > 1:  # its value too (a PATH is any path)
                cli.build_parser().parse_args(["bench"] + span.replace("PATH", str(tmp_path / "out")).split())
    # Markers given to -m exist.
    markers = {line.split(":")[0].strip() for line in pytestconfig.getini("markers")}
    for span in _code(doc):
        m = re.fullmatch(r'-m "(?:not )?(\w+)"', span)
        if m:
            assert m.group(1) in markers, span
