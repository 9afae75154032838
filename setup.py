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


def setting(name, expected, parse):
    """``parse`` of an environment variable's value, without white space around it and in lower case; a value it
    refuses (None) stops the build, naming the variable: ignored, it would leave an install without the extension,
    or with one nobody asked for."""
    value = os.environ.get(name, "")
    result = parse(value.strip().lower())
    if result is None:
        sys.exit(f"protonorm: environment variable {name} must be {expected}, got {value!r}")
    return result


def build_jobs(text):
    """A count of parallel compiles, 0 for one per core; None for text that is none."""
    return 0 if text == "" else int(text) if text.isascii() and text.isdigit() else None


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    switch = {"": False, "0": False, "false": False, "no": False, "off": False,
              "1": True, "true": True, "yes": True, "on": True}
    if not sources or setting("PROTONORM_NO_EXTENSION", "1, true, yes, on or 0, false, no, off", switch.get):
        return []
    try:
        from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
    except ImportError:
        sys.stderr.write("protonorm: pybind11 missing, the C++ extension is skipped.\n")
        return []
    # The sources compile side by side, one per core (PROTONORM_BUILD_JOBS=N sets how many). pybind11 would read the
    # variable only once compiling, where a value int() refuses (an empty one too) ends the build without the
    # extension, in one line of pip's output.
    jobs = setting("PROTONORM_BUILD_JOBS", "a number of parallel compiles (0 or empty: one per core)", build_jobs)
    ParallelCompile(default=jobs).install()
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
