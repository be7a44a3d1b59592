"""Work that runs as branches side by side: each branch on a CUDA stream of its own, forked after what the current
stream has queued and joined before what it queues next, so that a captured graph holds them as parallel branches
(mlp_branches). Off CUDA the branches run one after another."""

from __future__ import annotations

from typing import Callable

import torch

_SIDE_STREAMS: dict = {}


def side_streams(device: torch.device, count: int) -> list:
    """`count` CUDA streams kept for branches (the same ones every step, so a captured graph forks and joins them
    the same way each time)."""
    streams = _SIDE_STREAMS.setdefault(device, [])
    while len(streams) < count:
        streams.append(torch.cuda.Stream(device))
    return streams[:count]


def run_in_branches(device: torch.device, count: int, branch: Callable[[int], object]) -> None:
    """branch(0), …, branch(count - 1), each on a stream of its own (the last on the current one), all after the
    work the current stream has queued so far; the current stream then waits for every one of them."""
    if device.type != "cuda":
        for b in range(count):
            branch(b)
        return
    main = torch.cuda.current_stream(device)
    sides = side_streams(device, count - 1)
    for b, stream in enumerate(sides):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            branch(b)
    branch(count - 1)
    for stream in sides:
        main.wait_stream(stream)
