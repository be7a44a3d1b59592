"""How the decode engine's Triton kernels are launched, shared by every kernel module: whether Triton runs here
(on CUDA, or on the CPU in its interpreter: CI's path), programmatic dependent launch (`pdl` on the host,
`await_inputs` in every kernel), the step stamps bench/step_timeline.py reads, arrival counters, launch
configurations given in the environment by the benches, and reusable work buffers that captured graphs point at."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without Triton: only the PyTorch paths
    triton = None


def interpreting() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1): kernels on CPU tensors, one program at a time."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_CAPABILITY: dict = {}


def pdl(tensor: torch.Tensor) -> bool:
    """Whether to launch with programmatic dependent launch (Hopper and later, not in the interpreter; RANA_PDL=0
    turns it off): a launch's programs start while the launch before it drains, and every kernel here waits
    (griddepcontrol.wait) for the one before it to finish, and its writes to land, before it reads or writes
    anything. Every kernel waits before it can finish, so a kernel also sees what earlier launches wrote."""
    if tensor.device.type != "cuda" or interpreting() or os.environ.get("RANA_PDL", "1") == "0":
        return False
    if tensor.device not in _CAPABILITY:
        _CAPABILITY[tensor.device] = torch.cuda.get_device_capability(tensor.device)[0] >= 9
    return _CAPABILITY[tensor.device]


def use_triton(tensor: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors in its interpreter (CI's CPU path)."""
    return triton is not None and (tensor.device.type == "cuda" or interpreting())


def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessors, which launches are sized by (4 for the interpreter's CPU runs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def launch_ints(name: str, text: str, lengths: tuple[int, ...], expected: str) -> tuple[int, ...]:
    """A launch configuration the benches give as dash-separated integers in environment variable `name`, or a
    ValueError naming the variable."""
    try:
        values = tuple(int(v) for v in text.split("-"))
    except ValueError:
        values = ()
    if len(values) not in lengths:
        raise ValueError(f"{name}={text}: expected {expected}")
    return values


_BUFFERS: dict = {}


def work_buffer(name: str, size: int, dtype, device: torch.device, zero: bool = False) -> torch.Tensor:
    """A reusable work buffer (allocated once per size and device, so that a captured CUDA graph keeps pointing
    at live memory). Launches run in stream order, so one buffer serves every call of one size. `zero`: made of
    zeros (arrival counters, which the kernels leave at zero)."""
    key = (name, size, dtype, str(device))
    if key not in _BUFFERS:
        _BUFFERS[key] = (torch.zeros if zero else torch.empty)(size, dtype=dtype, device=device)
    return _BUFFERS[key]


if triton is not None:
    # bench/step_timeline.py puts a device address in RANA_STEP_STAMPS before this module is imported: every kernel
    # then stamps the GPU's timer there as its wait for the launch before releases. 0 (always, elsewhere): no code.
    STEP_STAMPS = tl.constexpr(int(os.environ.get("RANA_STEP_STAMPS", "0")))
    STEP_STAMP_SLOTS = tl.constexpr(1 << 20)  # × 256 ns: a 268 ms ring, far beyond a step

    @triton.jit
    def await_inputs(PDL: tl.constexpr):
        """With PDL: wait until the launch before has finished and its writes are visible, then let the next
        launch's programs start (they too wait before touching memory, so starting them early is safe)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if STEP_STAMPS != 0:
            _stamp_release()

    @triton.jit
    def _stamp_release():
        """Program (0, 0, 0) writes the GPU's nanosecond timer into the stamp buffer at the slot of its 256 ns
        bucket: the launches of a step are the nonzero slots in time order (two launches never release within
        256 ns: each waits for the one before to finish). A store and nothing else: a counter taken with an atomic
        (its value broadcast through shared memory, a barrier) changed how ptxas scheduled the GEMV's loop (105
        registers instead of 122, its next chunk's loads no longer issued together) and made a stamped 7B dense
        step 30% slower."""
        first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0) & (tl.program_id(2) == 0)
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        stamps = tl.full([], STEP_STAMPS, tl.int64).to(tl.pointer_type(tl.int64))
        tl.store(stamps + ((now >> 8) & (STEP_STAMP_SLOTS - 1)), now, mask=first)

    @triton.jit
    def arrives_last(counter_ptr, ARRIVALS: tl.constexpr):
        """Count this program's arrival at a counter shared by ARRIVALS programs, after every thread's stores so
        far (release), and whether it came last; the last one then sees every other program's stores (acquire;
        read them with .cg loads, from L2) and must set the counter back to zero for the next launch (graph
        replays reuse it)."""
        tl.debug_barrier()  # every thread's stores before the release
        last = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == ARRIVALS - 1
        tl.debug_barrier()  # the acquire before any thread's loads
        return last
