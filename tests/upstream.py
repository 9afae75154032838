"""Locates ProtoMotions' normalization module (the specification protonorm is checked against).

It is not part of protonorm: tests look for it in ``$PROTONORM_UPSTREAM_DIR`` or in ``shared/upstream`` beside
the repository. Without it the parity tests are skipped, unless ``PROTONORM_REQUIRE_UPSTREAM=1`` (as in CI)
turns the absence into a failure.
"""
import importlib.util
import os
from pathlib import Path

import pytest

FILENAME = "protomotions_normalization.py"


def _candidates():
    env = os.environ.get("PROTONORM_UPSTREAM_DIR")
    if env:
        yield Path(env)
    repo = Path(__file__).resolve().parent.parent
    yield repo.parent / "shared" / "upstream"
    yield repo / "shared" / "upstream"


def load():
    for folder in _candidates():
        path = folder / FILENAME
        if path.is_file():
            spec = importlib.util.spec_from_file_location("protomotions_normalization", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    message = f"upstream {FILENAME} not found (set PROTONORM_UPSTREAM_DIR)"
    if os.environ.get("PROTONORM_REQUIRE_UPSTREAM") == "1":
        pytest.fail(message)
    pytest.skip(message)
