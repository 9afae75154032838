"""Static counts of the Triton moment kernels compiled for a GPU, without one: registers, spills and instructions.

    python bench/triton_sass.py [--archs 90,89] [--shapes 8192x342:float32,16384x1000:float32,16384x512:bfloat16]

For each architecture (sm_90: H100/H200; sm_89: Ada, e.g. RTX 4090, L40; sm_86: Ampere consumer cards, A10, A40)
and each observation batch, ``moments`` and ``normalize_moments`` are built by ``triton.compile`` as a launch would
specialize them (the launcher's block sizes, warps and grid for a device of 132 SMs; 16-byte aligned tensors), with
ptxas's report, and their SASS is disassembled with the ``nvdisasm`` that Triton ships. Printed per kernel: registers
per thread, spilled bytes, and the count of each instruction class in the whole kernel (the row-block loop is nearly
all of it). Those are properties of the code, not timings: ``DADD``/``DMUL``/``DFMA`` are float64 operations, which
data-centre GPUs run at half the float32 rate and consumer GPUs at 1/64 of it (1/32 on some), so on the latter their
count bounds the kernels' speed; ``SHFL`` and ``BAR`` are the reductions across threads.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Tuple

import torch

CLASSES = ("DADD", "DMUL", "DFMA", "F2F", "FADD", "FMUL", "SHFL", "BAR", "LDG", "STG", "LDS", "STS")


def compile_kernel(kernel, args, meta, arch: int):
    """``(compiled, ptxas report, specialization)`` of ``kernel`` built for ``sm_<arch>`` as a launch with
    ``args``/``meta`` would specialize it. The report needs ``TRITON_DUMP_PTXAS_LOG=1`` in the environment and is
    empty where the build came from Triton's cache (a specialization built before, in this cache directory). Drives
    Triton's compiler through internals of Triton 3.8 and newer (``create_function_from_signature``,
    ``_pack_args``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    bound, spec, options = create_function_from_signature(kernel.signature, kernel.params, backend)(*args, **meta)
    options, sig, consts, attrs = kernel._pack_args(backend, meta, bound, spec, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=target, options=options.__dict__)
    return compiled, log.getvalue(), (kernel.__name__, arch, str(sig), str(consts), str(attrs), str(options))


def resources(report: str) -> Tuple[int, int]:
    """``(registers, spilled bytes stored)`` from a ptxas report; ``(-1, -1)`` where there is none."""
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return (int(regs.group(1)) if regs else -1), (int(spills.group(1)) if spills else -1)


def sass_counts(compiled) -> Dict[str, int]:
    """Instructions of the compiled kernel by opcode (without modifiers: ``DADD.RZ`` counts as ``DADD``)."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    counts = collections.Counter()
    for line in sass.splitlines():
        # "/*0120*/  @!P0 DADD.RZ R4, R2, R6 ;" -> DADD
        found = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if found:
            counts[found.group(1)] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="90,89", help="comma-separated compute capabilities, e.g. 90,89,86")
    parser.add_argument("--shapes", default="8192x342:float32,16384x1000:float32,16384x512:bfloat16",
                        help="comma-separated ROWSxFEATURES:DTYPE")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_sass.py compiles for a GPU: unset TRITON_INTERPRET")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton_sass_"))

    from protonorm.kernels import moments, normalize_moments

    moments.compiled_for = lambda device: True  # plan tiles for a compiled kernel although no GPU is here
    moments.sm_count = lambda device: 132
    import triton

    print(f"triton {triton.__version__}, torch {torch.__version__}; whole-kernel SASS instruction counts")
    for arch in (int(a) for a in args.archs.split(",")):
        for spec in args.shapes.split(","):
            size, dtype_name = spec.split(":")
            rows, features = (int(n) for n in size.split("x"))
            dtype = getattr(torch, dtype_name)
            x = torch.empty(rows, features, dtype=dtype)
            parts = torch.empty(moments.tile_plan(rows, features, x.device).splits, 2 + 2 * features,
                                dtype=torch.float64)
            mean, var = torch.empty(features, dtype=torch.float64), torch.empty(features, dtype=torch.float64)
            out = torch.empty(rows, features, dtype=torch.promote_types(dtype, torch.float32))
            for name, (kernel, _, kargs, meta) in (
                ("moments", moments.launch_args(x, None, parts)),
                ("normalize_moments", normalize_moments.launch_args(x, mean, var, 1e-5, 5.0, out, parts)),
            ):
                compiled, report, _ = compile_kernel(kernel, kargs, meta, arch)
                regs, spilled = resources(report)
                counts = sass_counts(compiled)
                print(f"sm_{arch} {name} {size} {dtype_name}: registers {regs}, spilled {spilled} bytes, "
                      f"{sum(counts.values())} instructions: " + " ".join(f"{k} {counts[k]}" for k in CLASSES),
                      flush=True)


if __name__ == "__main__":
    main()
