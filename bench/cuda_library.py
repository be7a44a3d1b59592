"""How the CUDA benches (stream_ahead, cluster_layer) build their kernels: nvcc for sm_90a into a temporary shared
library, loaded through ctypes (no PyTorch headers, no extension build); and how they time one launch."""

import ctypes
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch


def compile_library(source: Path) -> ctypes.CDLL:
    """`source` (.cu) compiled for sm_90a and loaded; one clear line and exit when nvcc is missing or fails."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit(f"{source.stem}: nvcc not found (CUDA's compiler is needed to build its kernels)")
    library = Path(tempfile.mkdtemp()) / f"{source.stem}.so"
    built = subprocess.run([nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", "-gencode",
                            "arch=compute_90a,code=sm_90a", "-o", str(library), str(source)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise SystemExit(f"{source.stem}: nvcc failed: {built.stderr.strip().splitlines()[-1]}")
    return ctypes.CDLL(str(library))


def events_us(fn, calls: int = 20) -> float:
    """Median µs of one call of fn over five rounds of `calls` back-to-back calls (CUDA events)."""
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]
