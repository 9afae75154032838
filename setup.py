"""Build script: packages ``protonorm`` (with ``kernels/`` as ``protonorm.kernels``) and, when a C++17 compiler
is present, the optional CPU extension ``protonorm._C`` from ``csrc/``.

The extension includes no torch header: Python hands it data pointers, shapes and strides. A failed compile
leaves a working install that runs the torch path.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build extensions, but never fail the install because of them."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, or a broken toolchain
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        sys.stderr.write(f"protonorm: the C++ extension was not built ({exc}); the torch path will be used.\n")


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("PROTONORM_NO_EXTENSION") == "1":
        return []
    try:
        from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
    except ImportError:
        sys.stderr.write("protonorm: pybind11 missing, the C++ extension is skipped.\n")
        return []
    # The sources compile side by side, one per core (PROTONORM_BUILD_JOBS=N sets how many).
    ParallelCompile("PROTONORM_BUILD_JOBS").install()
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    return [
        Pybind11Extension(
            "protonorm._C",
            sources,
            depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),  # a changed header rebuilds the extension
            cxx_std=17,
            # No contraction into FMA: normalize must round exactly like the reference's separate operations.
            extra_compile_args=["-O3", "-ffp-contract=off"] + openmp,
            extra_link_args=openmp,
        )
    ]


setup(
    packages=["protonorm", "protonorm.backends", "protonorm.benchmark", "protonorm.kernels"],
    package_dir={"protonorm.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
