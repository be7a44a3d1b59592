"""rana_cli.progress.ProgressLines: the plain-line progress a run prints where stderr is not a terminal."""

import io

from rana_cli.progress import ProgressLines


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def printed(reports, step_seconds=0.125):
    """The lines printed for (fraction, message) reports, the clock moving step_seconds between them."""
    stream, clock = io.StringIO(), Clock()
    lines = ProgressLines(stream, clock)
    for fraction, message in reports:
        clock.now += step_seconds
        lines(fraction, message)
    return stream.getvalue().splitlines()


def test_a_line_every_five_percent_with_the_time_left():
    out = printed([(i / 1000, f"calibration: layer {i}") for i in range(1, 1001)])
    # 1,000 reports of one stage, 0.125 s apart (exact in binary): the first, then one each 5% (20), the last at 100%
    assert 20 <= len(out) <= 22, out
    assert out[0].startswith("[  0%] calibration: layer 1")
    assert out[-1] == "[100%] calibration: layer 1000  (2:05 elapsed)"
    # at a steady rate the time left is the reports left times 0.125 s: layer 508 after 63.5 s, 61.5 s left
    assert "[ 51%] calibration: layer 508  (1:03 elapsed, about 1:01 left)" in out, out
    assert all("left)" in line for line in out[1:-1])


def test_a_new_stage_or_a_quiet_half_minute_prints_a_line():
    out = printed([(0.10, "calibration: layer 1"), (0.11, "calibration: layer 2"), (0.12, "allocation: 3/9"),
                   (0.13, "allocation: 4/9")], step_seconds=1.0)
    assert [line.split("]")[1].split("  (")[0].strip() for line in out] == ["calibration: layer 1", "allocation: 3/9"]
    out = printed([(0.10, "adapted eval: 1/8"), (0.11, "adapted eval: 2/8"), (0.12, "adapted eval: 3/8")],
                  step_seconds=31.0)
    assert len(out) == 3


def test_the_end_is_printed_once():
    out = printed([(0.5, "eval"), (1.0, "done"), (1.0, "done")])
    assert [line[:6] for line in out] == ["[ 50%]", "[100%]"]
