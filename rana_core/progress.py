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
        self.starts: dict[str, float] = {}
        self.spans: dict[str, float] = {}
        acc = 0.0
        for name, weight in weights.items():
            self.starts[name], self.spans[name] = acc / total, weight / total
            acc += weight

    def stage(self, name: str) -> ProgressFn:
        """A reporter for stage `name` taking the fraction done within the stage."""
        start, span = self.starts[name], self.spans[name]

        def report(fraction: float, message: str = "") -> None:
            fraction = min(max(fraction, 0.0), 1.0)
            self.callback(start + span * fraction, f"{name}: {message}" if message else name)

        return report

    def done(self, message: str = "done") -> None:
        self.callback(1.0, message)
