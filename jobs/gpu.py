"""What a worker does about its GPU: cap the memory its jobs may take, and turn CUDA running out of memory into
one line that says what did not fit, then give the memory back so the next job starts clean.

Imported by the worker only when its device is a CUDA device (the queue and the app never load torch).
"""

from __future__ import annotations

import gc
import re

from rana_core.devices import cuda_index

GIB = 1 << 30
_ASKED = re.compile(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)")


def cap_memory(device: str, gib: float) -> None:
    """Let this process take at most `gib` GiB of `device` (PyTorch's caching allocator then raises CUDA's out of
    memory beyond it, as a smaller GPU would).

    Under a cap, memory the allocator holds in fixed segments but cannot reuse for a larger tensor counts against
    it (a 7B run had 8.2 GiB allocated and 9.4 GiB reserved); segments that grow in place avoid most of that, so
    they are asked for here unless the user configured the allocator. This works only before the process's first
    CUDA allocation, which is where the worker and `rana compress` cap their GPU."""
    import os

    if not any(name in os.environ for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    import torch

    index = cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), index)
    with torch.cuda.device(index):
        torch.cuda.empty_cache()  # the cap is checked when the allocator asks CUDA for more: hold nothing above it


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def out_of_memory_line(exc: BaseException, stage: str, device: str, cap_gib: float | None) -> str:
    """e.g. "CUDA out of memory on cuda:0 in 'build: curves of layer 3/32': asked for 2.00 GiB more with 7.80
    GiB in use (this worker's cap: 8 GiB)"."""
    import torch

    asked = _ASKED.search(str(exc))
    in_use = torch.cuda.memory_allocated(cuda_index(device)) / GIB
    limit = f"this worker's cap: {cap_gib:g} GiB" if cap_gib else (
        f"the GPU has {torch.cuda.get_device_properties(cuda_index(device)).total_memory / GIB:.1f} GiB")
    return (f"CUDA out of memory on {device} in {stage!r}: asked for {asked.group(1) if asked else 'more'} "
            f"with {in_use:.2f} GiB in use ({limit})")


def free(device: str) -> None:
    """Hand the cached blocks back once nothing refers to them (the failed job's tensors are gone by now)."""
    import torch

    gc.collect()
    with torch.cuda.device(cuda_index(device)):
        torch.cuda.empty_cache()
