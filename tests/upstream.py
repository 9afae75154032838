"""Locates ProtoMotions' normalization module (the specification protonorm is checked against).

It is not part of protonorm: tests look for it in ``$PROTONORM_UPSTREAM_DIR`` where that is set (and nowhere
else: a folder named there that lacks it fails the tests that need it), otherwise in ``shared/upstream`` beside
the repository or in it. Without it the parity tests are skipped, unless ``PROTONORM_REQUIRE_UPSTREAM=1`` (as in
CI; also ``true``, ``yes``, ``on``) turns the absence into a failure.
"""
import importlib.util
import os
from pathlib import Path

import pytest

from protonorm.output_cache import env_switch

FILENAME = "protomotions_normalization.py"


def _candidates():
    named = os.environ.get("PROTONORM_UPSTREAM_DIR", "")
    if named.strip():
        return [Path(named)]  # not another copy found elsewhere: the one asked for
    repo = Path(__file__).resolve().parent.parent
    return [repo.parent / "shared" / "upstream", repo / "shared" / "upstream"]


def _required() -> bool:
    try:
        return env_switch("PROTONORM_REQUIRE_UPSTREAM", default=False)
    except ValueError as error:
        pytest.fail(str(error))


def load():
    required = _required()
    folders = _candidates()
    for folder in folders:
        path = folder / FILENAME
        if path.is_file():
            spec = importlib.util.spec_from_file_location("protomotions_normalization", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    if os.environ.get("PROTONORM_UPSTREAM_DIR", "").strip():
        pytest.fail(f"upstream {FILENAME} not found in PROTONORM_UPSTREAM_DIR={str(folders[0])!r}")
    message = f"upstream {FILENAME} not found (set PROTONORM_UPSTREAM_DIR)"
    if required:
        pytest.fail(message)
    pytest.skip(message)
