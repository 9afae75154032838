"""The C++ kernels' tests again, on a build with AddressSanitizer and UndefinedBehaviorSanitizer.

A copy of the sources is built with both sanitizers and with PROTONORM_EXACT_SCRATCH (every per-thread scratch
buffer sized to the call's request, so that an overrun leaves the buffer), then tests/test_cpp.py runs against it
in a child process with the sanitizer runtimes preloaded (the interpreter itself is not instrumented), less the
tests marked ``unsanitized``. Any report fails the child, and so this test. The tests that do not run every
instruction set's kernels themselves run again with each of the others, less those marked ``sanitize_once``.
About two minutes of one core.

``unsanitized``: tests whose address-space limit leaves no room for the sanitizer's shadow memory, that run none
of the extension's code in their own process, or that only repeat calls other tests make. ``sanitize_once``:
tests that pick the kernels themselves, run the extension only in processes of their own (which read the
instruction set from their own environment), or check what surrounds kernel calls that other tests make
directly (torch.compile, opcheck, fork, concurrent threads, host reads).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protonorm.backends import load

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("csrc", "protonorm", "kernels", "tests", "setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in",
           "README.md")


def _runtime(name: str) -> str | None:
    """The path of gcc's sanitizer runtime `name` (libasan.so, libubsan.so), or None."""
    try:
        found = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return found if os.path.isabs(found) and os.path.exists(found) else None


RUNTIMES = [_runtime("libasan.so"), _runtime("libubsan.so")]

AVX512_STAND_IN = """// The sanitizer build's stand-in on a CPU without AVX-512, which never runs this table.
#include "kernels_isa.h"
namespace protonorm {
extern const KernelTable kAvx512Kernels;
const KernelTable kAvx512Kernels = {"avx512", nullptr, nullptr, nullptr, nullptr, nullptr};
}  // namespace protonorm
"""


def _has_pybind11() -> bool:
    try:
        import pybind11  # noqa: F401  (the build needs it; pip's own build environment is gone by now)
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(load("cpp")[0] is None, reason="the C++ extension is not built here")
@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="the sanitizer build is set up for gcc on x86-64 Linux")
@pytest.mark.skipif(None in RUNTIMES, reason="gcc's libasan/libubsan are not installed")
@pytest.mark.skipif(not _has_pybind11(), reason="pybind11 is not installed (the dev extra brings it)")
def test_cpp_tests_pass_under_address_and_undefined_behavior_sanitizers(tmp_path):
    copy = tmp_path / "src"
    copy.mkdir()
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "build", "*.egg-info", ".pytest_cache")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=ignore, symlinks=False)
        elif source.exists():
            shutil.copy2(source, copy / name)
    # Where an installed package has the Triton kernels (package_dir); a checkout may hold a link there instead.
    inside = copy / "protonorm" / "kernels"
    if inside.is_symlink() or inside.is_file():
        inside.unlink()
    elif inside.is_dir():
        shutil.rmtree(inside)
    shutil.copytree(copy / "kernels", inside)

    # -O1, the sanitizers' own advice, in place of setup.py's -O3 (which would come after CPPFLAGS and win): the
    # checks are of the source's accesses and arithmetic, which the optimization level does not change, and the
    # instrumented kernels compile in less than half the time (75 against 177 s of compiler time).
    setup_py = copy / "setup.py"
    text = setup_py.read_text(encoding="utf-8")
    assert text.count('"-O3"') == 1, "setup.py's optimization flag is not where this test expects it"
    setup_py.write_text(text.replace('"-O3"', '"-O1"'), encoding="utf-8")
    # Kernels this CPU cannot run cannot be checked here either: a table without kernels stands in for the AVX-512
    # ones (bindings.cpp hands it out only where CPUID reports AVX-512), a quarter less to compile.
    from protonorm import _C

    runs_avx512 = "avx512" in _C.isas()
    if not runs_avx512:
        (copy / "csrc" / "kernels_avx512.cpp").write_text(AVX512_STAND_IN, encoding="utf-8")
    flags = "-fsanitize=address,undefined -fno-omit-frame-pointer -DPROTONORM_EXACT_SCRATCH"
    env = dict(os.environ, CPPFLAGS=flags, LDFLAGS="-fsanitize=address,undefined")
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy,
                           env=env, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    built = list((copy / "protonorm").glob("_C*.so"))
    assert built, build.stdout[-3000:] + build.stderr[-3000:]
    symbols = subprocess.run(["nm", "-D", str(built[0])], capture_output=True, text=True).stdout
    assert "__asan_" in symbols, "the extension was built without the address sanitizer"

    # Reports go to files, and the child runs pytest with -s: pytest would otherwise hold its stderr while a test
    # runs, and the sanitizer ends the process before pytest could show it.
    logs = tmp_path / "reports"
    logs.mkdir()
    # OMP_WAIT_POLICY=passive: the suite may run beside this child on every core (-n auto), and OpenMP threads that
    # spin at each barrier while a thread of theirs waits for a core made it take three times as long.
    env = dict(os.environ, PYTHONPATH=str(copy), LD_PRELOAD=" ".join(RUNTIMES), OMP_WAIT_POLICY="passive",
               ASAN_OPTIONS=f"detect_leaks=0:exitcode=86:log_path={logs / 'asan'}",
               UBSAN_OPTIONS=f"halt_on_error=1:print_stacktrace=1:exitcode=87:log_path={logs / 'ubsan'}")
    env.pop("PROTONORM_BACKEND", None)
    env.pop("PROTONORM_CPU_ISA", None)
    probe = subprocess.run([sys.executable, "-c", "import protonorm._C as c; print(c.__file__); print(*c.isas())"],
                           cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    lines = probe.stdout.splitlines()
    assert lines and lines[0] == str(built[0]), probe.stdout + probe.stderr[-3000:]
    isas = lines[1].split()
    assert ("avx512" in isas) == runs_avx512, probe.stdout
    # The file with the kernels this CPU prefers, less the tests marked `unsanitized`; then, for each other
    # instruction set, those that do not already run every one (tests parametrized by the `isa` fixture carry its
    # name in their ids) and are not marked `sanitize_once`.
    runs = [(None, ["-m", "not unsanitized"])]
    runs += [(isa, ["-m", "not unsanitized and not sanitize_once",
                    "-k", " and ".join(f"not {name}" for name in isas)]) for isa in isas[:-1]]
    for isa, selection in runs:
        run_env = env if isa is None else dict(env, PROTONORM_CPU_ISA=isa)
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-x", "-p", "no:cacheprovider",
                              "tests/test_cpp.py", *selection], cwd=copy, env=run_env, capture_output=True,
                             text=True, timeout=1800)
        reports = "".join(path.read_text(errors="replace")[:6000] for path in sorted(logs.iterdir()))
        message = f"kernels: {isa or 'default'}\n" + reports + run.stdout[-3000:] + run.stderr[-3000:]
        assert not reports and run.returncode == 0, message
        summary = run.stdout.strip().splitlines()[-1]
        assert " passed" in summary and "failed" not in summary and "error" not in summary, message
