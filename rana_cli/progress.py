"""Progress of an in-process run on stderr: a bar on a terminal, plain lines in a log.

A bar redraws one line with carriage returns, which a log file or a scheduler's capture turns into noise, so tqdm
draws nothing there (`disable=None`) and a long `rana compress` looked hung. Where stderr is not a terminal the
same reports become a line when the run has moved on by LINE_STEP, entered a new stage, or gone LINE_SECONDS
without one: `[ 35%] calibration: layer 9/30  (1:02 elapsed, about 1:55 left)`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, TextIO

LINE_STEP = 0.05  # a line every 5% of the run at most…
LINE_SECONDS = 30.0  # …and at least one every 30 s while it reports


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class ProgressLines:
    """A progress callback (fraction, message) that prints a line when it says something new (see the module)."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic):
        self.stream, self.clock = stream, clock
        self.start = clock()
        self.last_time, self.last_fraction, self.last_stage = self.start, -1.0, None
        self.message = ""

    def __call__(self, fraction: float, message: str) -> None:
        now = self.clock()
        self.message = message
        stage = message.split(":", 1)[0]
        if (fraction - self.last_fraction < LINE_STEP and stage == self.last_stage
                and now - self.last_time < LINE_SECONDS and fraction < 1.0):
            return
        if fraction >= 1.0 and self.last_fraction >= 1.0:
            return
        elapsed = now - self.start
        left = f", about {_clock(elapsed * (1 - fraction) / fraction)} left" if 0.01 <= fraction < 1.0 else ""
        print(f"[{fraction:4.0%}] {message}  ({_clock(elapsed)} elapsed{left})", file=self.stream, flush=True)
        self.last_time, self.last_fraction, self.last_stage = now, fraction, stage


@contextlib.contextmanager
def progress_reporter(stream: TextIO = sys.stderr) -> Iterator:
    """(callback, what it was doing last): a tqdm bar where `stream` is a terminal, ProgressLines elsewhere."""
    if not stream.isatty():
        lines = ProgressLines(stream)
        yield lines, lambda: lines.message
        return
    from tqdm import tqdm

    with tqdm(total=1000, file=stream, bar_format="{l_bar}{bar}| {elapsed}<{remaining}") as bar:
        def progress(fraction: float, message: str) -> None:
            bar.set_description_str(message[:60], refresh=False)
            bar.update(round(fraction * 1000) - bar.n)

        yield progress, lambda: bar.desc or ""
