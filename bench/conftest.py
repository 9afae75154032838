"""pytest-benchmark suites over the same cases and contenders as ``protonorm bench``.

Run with ``pytest bench/ --benchmark-only`` (they are outside the default test run). Results group by case, so
``--benchmark-compare`` and ``--benchmark-histogram`` line the contenders of one case up side by side.
Options: ``--bench-device`` (default: cuda when available), ``--bench-shapes`` (default: ProtoMotions' obs
batches), ``--bench-envs``.
"""
import pytest
import torch

from protonorm.benchmark import cases


def pytest_addoption(parser):
    group = parser.getgroup("protonorm")
    group.addoption("--bench-device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    group.addoption(
        "--bench-shapes",
        default=",".join(f"{r}x{d}" for r, d in cases.DEFAULT_SHAPES),
        help="observation batches, comma-separated ROWSxFEATURES",
    )
    group.addoption("--bench-envs", type=int, default=cases.DEFAULT_ENVS, help="environments of the reward case")


def _device(config) -> torch.device:
    name = config.getoption("--bench-device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = _device(config)
    if "contender_name" in metafunc.fixturenames:
        names, _ = cases.backend_names(device)
        metafunc.parametrize("contender_name", names + [cases.BASELINE])
    if "case" in metafunc.fixturenames:
        shapes = cases.parse_shapes(config.getoption("--bench-shapes"))
        built = cases.build_cases(cases.CASE_KINDS, shapes, config.getoption("--bench-envs"), torch.float32, device)
        metafunc.parametrize("case", built, ids=[f"{c.name}-{'x'.join(map(str, c.shape))}" for c in built])


@pytest.fixture
def device(request) -> torch.device:
    return _device(request.config)


@pytest.fixture
def contender(contender_name, device):
    if contender_name == cases.BASELINE:
        return cases.baseline_contender(device)
    return cases.protonorm_contender(contender_name, device)


@pytest.fixture
def synchronized(device):
    """Wrap a callable so that it returns only when the device has finished its work (pytest-benchmark times
    with the host clock)."""

    def wrap(fn):
        if device.type != "cuda":
            return fn

        def call():
            fn()
            torch.cuda.synchronize(device)

        return call

    return wrap
