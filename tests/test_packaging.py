"""What the packaging files make of the project, read from setuptools' own metadata step (``setup.py egg_info``, about
a second; no build, no install): the version, the metadata, and the files a source distribution carries."""
import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from email.parser import HeaderParser
from pathlib import Path

import pytest

import protonorm

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("setuptools")
pytest.importorskip("pybind11")  # setup.py skips the extension without it, and says so: the metadata is the same


@pytest.fixture(scope="module")
def egg_info(tmp_path_factory):
    """``(PKG-INFO headers, the source distribution's file list, what setuptools said on stderr)``."""
    base = tmp_path_factory.mktemp("egg")
    done = subprocess.run([sys.executable, "setup.py", "egg_info", "--egg-base", str(base)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    info = base / "protonorm.egg-info"
    headers = HeaderParser().parsestr((info / "PKG-INFO").read_text(encoding="utf-8"))
    sources = set((info / "SOURCES.txt").read_text(encoding="utf-8").split("\n")) - {""}
    return headers, sources, done.stderr


def _pyproject():
    from setuptools.config.pyprojecttoml import read_configuration

    return read_configuration(ROOT / "pyproject.toml", expand=False)


def test_version_has_one_source(egg_info):
    """pyproject.toml takes the version from ``protonorm.__version__``, which ``protonorm --version`` prints, so the
    two cannot drift apart; it is a literal, which setuptools reads without importing protonorm (and torch, which
    the build environment lacks)."""
    config = _pyproject()
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "protonorm.__version__"}
    tree = ast.parse((ROOT / "protonorm" / "__init__.py").read_text(encoding="utf-8"))
    literals = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and [getattr(target, "id", None) for target in node.targets] == ["__version__"]]
    assert literals == [protonorm.__version__]
    assert egg_info[0]["Version"] == protonorm.__version__


def test_metadata_takes_no_deprecated_form(egg_info):
    """setuptools reads pyproject.toml without a deprecation warning: each one announces a date after which builds
    with a newer setuptools (which an isolated build installs) fail. The licence is an SPDX expression, and its text
    ships with every distribution."""
    headers, _, stderr = egg_info
    assert "SetuptoolsDeprecationWarning" not in stderr, stderr
    assert headers["License-Expression"] == "Apache-2.0"
    assert headers["License-File"] == "LICENSE"
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").lstrip().startswith("Apache License\n")


def test_lightning_minimum_imports_without_pkg_resources():
    """Lightning before 2.4 imports ``pkg_resources`` when ``lightning`` is imported; setuptools 82 removed it (and
    the dev extra's ``setuptools>=77`` installs a newer one), so its Fabric could not even be imported there."""
    from packaging.requirements import Requirement

    extras = _pyproject()["project"]["optional-dependencies"]
    for extra in ("fabric", "dev"):
        (lightning,) = [Requirement(r) for r in extras[extra] if Requirement(r).name == "lightning"]
        assert not lightning.specifier.contains("2.3.3") and lightning.specifier.contains("2.4.0"), (extra, lightning)


def _files_under(folder):
    return {path.relative_to(ROOT).as_posix() for path in (ROOT / folder).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


def test_source_distribution_carries_the_test_suite_and_linked_documents(egg_info):
    """The test suite runs from an unpacked source distribution: its helpers (conftest.py, hard_data.py, ...) and
    the bench/ scripts some tests run are there, not only the test_*.py files setuptools adds by itself; so are the
    files README.md links to, and the C++ headers the extension compiles."""
    sources = egg_info[1]
    wanted = _files_under("tests") | _files_under("bench") | _files_under("csrc")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = {link for link in re.findall(r"\]\(([^)#:]+)\)", readme)}
    assert links and all((ROOT / link).is_file() for link in links)
    assert sorted((wanted | links) - sources) == []


@pytest.mark.skipif(shutil.which("clang++") is None, reason="no clang++ on this machine")
def test_extension_sources_compile_with_clang():
    """setup.py builds with the compiler the environment names (CC/CXX=clang++): clang accepts every source. Older
    clang knows fewer CPU features in __builtin_cpu_supports than gcc, and rejects an unknown one at compile time.
    Syntax only, without OpenMP (whose header clang finds only with LLVM's libomp installed)."""
    import pybind11

    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    checks = [subprocess.Popen(["clang++", "-fsyntax-only", "-std=c++17", *includes, str(source)],
                               stderr=subprocess.PIPE, text=True) for source in sorted((ROOT / "csrc").glob("*.cpp"))]
    for check in checks:
        _, errors = check.communicate(timeout=120)
        assert check.returncode == 0, errors


# Runs setup.py with setuptools' setup() and pybind11's ParallelCompile replaced by recorders: what the build would
# compile, and on how many parallel jobs, or the message it stops with. No compiler runs.
_SETUP_PLAN = """
import sys, setuptools, pybind11.setup_helpers as helpers
plan = {}
setuptools.setup = lambda **kwargs: plan.update(extensions=len(kwargs["ext_modules"]))
class Recorder:
    def __init__(self, envvar=None, default=0, **kwargs):
        plan.update(jobs=default, envvar=envvar)
    def install(self):
        return self
helpers.ParallelCompile = Recorder
sys.argv = ["setup.py", "build_ext"]
try:
    exec(compile(open("setup.py").read(), "setup.py", "exec"), {"__name__": "__main__"})
except SystemExit as exc:
    plan = {"exit": str(exc)}
print(plan)
"""


def _setup_plan(**settings):
    env = {k: v for k, v in os.environ.items() if k not in ("PROTONORM_NO_EXTENSION", "PROTONORM_BUILD_JOBS")}
    env.update(settings)
    done = subprocess.run([sys.executable, "-c", _SETUP_PLAN], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip())


@pytest.mark.parametrize("value,built", [("", 1), ("0", 1), ("False", 1), (" off ", 1), ("no", 1),
                                         ("1", 0), ("TRUE", 0), (" yes\n", 0), ("On", 0)])
def test_no_extension_takes_the_usual_spellings(value, built):
    assert _setup_plan(PROTONORM_NO_EXTENSION=value)["extensions"] == built


@pytest.mark.parametrize("value,jobs", [("", 0), ("0", 0), ("3", 3), (" 2\n", 2)])
def test_build_jobs_sets_the_parallel_compiles(value, jobs):
    plan = _setup_plan(PROTONORM_BUILD_JOBS=value)
    assert plan["extensions"] == 1 and plan["jobs"] == jobs and plan["envvar"] is None  # (never read again later)


@pytest.mark.parametrize("variable,value,expected", [
    ("PROTONORM_NO_EXTENSION", "2", "1, true, yes, on or 0, false, no, off"),
    ("PROTONORM_NO_EXTENSION", "skip", "1, true, yes, on or 0, false, no, off"),
    ("PROTONORM_BUILD_JOBS", "four", "a number of parallel compiles (0 or empty: one per core)"),
    ("PROTONORM_BUILD_JOBS", "-1", "a number of parallel compiles (0 or empty: one per core)"),
    ("PROTONORM_BUILD_JOBS", "1.5", "a number of parallel compiles (0 or empty: one per core)"),
])
def test_a_bad_build_setting_stops_the_build_naming_it(variable, value, expected):
    assert _setup_plan(**{variable: value}) == {
        "exit": f"protonorm: environment variable {variable} must be {expected}, got {value!r}"}
