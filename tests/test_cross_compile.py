"""The C++ extension's sources compiled for the CPUs it is installed on besides x86-64 Linux with g++ (the build the
other tests run): aarch64 Linux (Graviton, Jetson-class boxes) and Apple Silicon, every source, and the x86 kernel
files under clang (Intel Macs; clang takes their instruction sets from a target attribute, g++ from a pragma). The
compiler is zig's clang (the ``ziglang`` package of the dev extra), which carries each target's C and C++ library
headers; the flags are setup.py's for that platform. Objects only: nothing is linked or run (no arm64 machine is at
hand), so this shows that the sources compile there and what the compiler made of them, not that the results are
right. About 35 s of compiler time, spread over the cores."""
import os
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ziglang")
pybind11 = pytest.importorskip("pybind11")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(path.name for path in CSRC.glob("*.cpp"))
X86_KERNELS = ["kernels_avx2.cpp", "kernels_avx512.cpp"]
# target -> (setup.py's OpenMP flag there, the sources compiled); macOS builds have no OpenMP (Apple clang has none).
# The macOS versions are the oldest each CPU runs with C++17 (pybind11 asks for 10.14; arm64 starts at 11).
TARGETS = {
    "aarch64-linux-gnu": (True, SOURCES),
    "aarch64-macos.11.0": (False, SOURCES),
    "x86_64-macos.10.14": (False, X86_KERNELS),
}
# setup.py's flags, with the two Pybind11Extension adds (-fvisibility=hidden, -g0).
FLAGS = ["-std=c++17", "-O3", "-ffp-contract=off", "-fvisibility=hidden", "-g0"]
# clang finds <omp.h> only with LLVM's libomp, which zig does not ship: the two functions the kernels call.
OMP_H = "extern \"C\" int omp_get_thread_num(void);\nextern \"C\" int omp_get_num_threads(void);\n"


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """``{(target, source): (return code, stderr, output path)}``, compiled side by side, one per core. The aarch64
    Linux kernels are compiled to assembly (the test of their parallel regions reads it), the rest to objects."""
    out = tmp_path_factory.mktemp("cross")
    (out / "omp.h").write_text(OMP_H, encoding="ascii")
    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    jobs = [(target, source) for target, (_, sources) in TARGETS.items() for source in sources]

    def compile_one(job):
        target, source = job
        openmp = ["-fopenmp", f"-I{out}"] if TARGETS[target][0] else []
        assembly = (target, source) == ("aarch64-linux-gnu", "kernels_baseline.cpp")
        path = out / f"{target}-{source}.{'s' if assembly else 'o'}"
        command = [sys.executable, "-m", "ziglang", "c++", "-target", target, *FLAGS, *openmp, *includes,
                   "-S" if assembly else "-c", "-o", str(path), str(CSRC / source)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=out)
        return job, (done.returncode, done.stderr, path)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(pool.map(compile_one, jobs))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_sources_compile(builds, target):
    """Every source compiles for the target, with nothing of x86 reached on arm64 (intrinsics, target pragmas,
    CPUID): a failed compile would leave that platform, silently, without the C++ kernels."""
    for source in TARGETS[target][1]:
        code, errors, path = builds[(target, source)]
        assert code == 0 and path.stat().st_size > 0, f"{source} for {target}:\n{errors}"


def test_aarch64_parallel_regions_take_the_callers_fpcr(builds):
    """On aarch64 torch.set_flush_denormal sets the calling thread's FPCR; as with the MXCSR on x86-64, every
    parallel region of the kernels puts the caller's FPCR in force on its threads, or subnormal rows would be read
    as zero on the caller's thread only (results depending on the thread count). Read from the OpenMP build's
    assembly: each outlined parallel region writes the FPCR."""
    code, errors, path = builds[("aarch64-linux-gnu", "kernels_baseline.cpp")]
    assert code == 0, errors
    assembly = path.read_text(encoding="utf-8")
    functions = re.split(r"^.*-- Begin function ", assembly, flags=re.MULTILINE)
    regions = [body for body in functions if body.split("\n", 1)[0].endswith(".omp_outlined")]
    assert len(regions) >= 10, "no OpenMP parallel regions in the aarch64 build"
    missing = [body.split("\n", 1)[0] for body in regions if not re.search(r"\bmsr\s+fpcr,", body, re.IGNORECASE)]
    assert missing == [], missing
