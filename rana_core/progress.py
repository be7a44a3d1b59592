"""Progress of a long computation as (overall fraction, message), split into weighted stages.

Callers pass any ``callback(fraction, message)``: the CLI draws a bar, the worker writes the job row (and may raise
to cancel). Library code only calls the reporter a stage hands out.
"""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    pass


class StagedProgress:
    def __init__(self, callback: ProgressFn | None, weights: dict[str, float]):
        total = sum(weights.values())
        self.callback = callback or no_progress
        # Each stage ends exactly where the next starts (both acc / total): start + weight / total can round a
        # hair past the next start, and progress would step back.
        self.bounds: dict[str, tuple[float, float]] = {}
        acc = 0.0
        for name, weight in weights.items():
            self.bounds[name] = (acc / total, (acc + weight) / total)
            acc += weight

    def stage(self, name: str) -> ProgressFn:
        """A reporter for stage `name` taking the fraction done within the stage."""
        start, end = self.bounds[name]

        def report(fraction: float, message: str = "") -> None:
            fraction = min(max(fraction, 0.0), 1.0)
            done = end if fraction == 1.0 else min(end, start + (end - start) * fraction)
            self.callback(done, f"{name}: {message}" if message else name)

        return report

    def done(self, message: str = "done") -> None:
        self.callback(1.0, message)
