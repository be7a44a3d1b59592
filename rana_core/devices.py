"""The device a run names: its form, checked anywhere without torch, and its presence, asked of torch here.

The two checks are apart on purpose. A job is submitted on one machine and run on another (a laptop queues work for
a GPU host), so where a configuration enters (the CLI's submit and sweep, the dashboard, jobs.queue.submit) only
the *form* can be judged, and that path must stay torch-free (tests/test_layering.py). Whether the device *exists*
is a question for the machine that runs the model: `rana worker` asks at start, `rana compress` before loading.
"""

from __future__ import annotations

import re

from rana_core.errors import RanaError

DEVICE_FORMS = "cpu, cuda, cuda:N or mps"
_FORM = re.compile(r"cpu|mps|cuda(:[0-9]+)?")


def check_device_name(device) -> str:
    """`device` if it is one of DEVICE_FORMS, else a RanaError saying what would be."""
    if not isinstance(device, str) or not _FORM.fullmatch(device):
        raise RanaError(f"unknown device {device!r}: use {DEVICE_FORMS}")
    return device


def cuda_index(device) -> int:
    """The index CUDA's memory calls want: plain "cuda" is the current device. Imports torch."""
    import torch

    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def process_memory_limit(device) -> float:
    """Bytes this process may allocate on CUDA `device`: its memory times the process's fraction of it (a worker's
    or `rana compress`'s cap). Imports torch."""
    import torch

    index = cuda_index(device)
    return torch.cuda.get_device_properties(index).total_memory * torch.cuda.get_per_process_memory_fraction(index)


def check_device_present(device: str) -> str:
    """`device` if this machine has it, else a RanaError saying what it has. Imports torch unless it is "cpu"."""
    check_device_name(device)
    if device == "cpu":
        return device
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise RanaError("this machine has no MPS device")
        return device
    count = torch.cuda.device_count()  # 0, not an error, where torch has no CUDA or the host no GPU
    index = int(device.partition(":")[2] or 0)  # plain "cuda" is device 0 of those CUDA_VISIBLE_DEVICES shows
    if index >= count:
        which = f"CUDA device {index}" if ":" in device else "CUDA device"
        raise RanaError(f"this machine has no {which} (it has {count})")
    return device
