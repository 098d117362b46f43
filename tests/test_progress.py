"""The driver's progress lines (ken_dist/job/progress.py): counts, rate, ETA and per fine-tune
percentages, on a fake clock so every number is known in advance."""
import io

import pytest

from ken_dist.job import progress as progress_module
from ken_dist.job.progress import Progress, format_seconds


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (4.9, "0:04"), (59, "0:59"), (61, "1:01"),
                                           (3599, "59:59"), (3600, "1:00:00"), (3725, "1:02:05"),
                                           (-3, "0:00")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_lines_count_reused_work_and_measure_the_rate_from_the_first_block(monkeypatch):
    clock = Clock(100.0)
    monkeypatch.setattr(progress_module.time, "time", clock)
    out = io.StringIO()
    # a: 1M weights, half reused from an earlier run; b: 1M weights, none reused
    p = Progress({"a": 1_000_000, "b": 1_000_000}, {"a": 500_000, "b": 0}, stream=out, interval=2.0)
    p.note("2 fine-tunes, 3 blocks")
    clock.t = 110.0
    p.advance("a", 100_000)  # the first block: printed, but no rate yet (start-up is not throughput)
    clock.t = 111.0
    p.advance("b", 200_000)  # within the interval: no line
    clock.t = 112.5
    p.advance("b", 300_000)  # 500k weights in the 2.5 s since the first block: 0.2 M/s, 900k left: 4.5 s
    clock.t = 210.0
    p.close()  # the last line: 500k in 100 s since the first block, 900k left at that rate: 180 s
    assert out.getvalue().splitlines() == [
        "[ken-dist] 2 fine-tunes, 3 blocks",
        "[ken-dist]  30.0%  1 blocks  0.00 M weights/s  elapsed 0:10  ETA ?  | a 60%  b 0%",
        "[ken-dist]  55.0%  3 blocks  0.20 M weights/s  elapsed 0:12  ETA 0:04  | a 60%  b 50%",
        "[ken-dist]  55.0%  3 blocks  0.01 M weights/s  elapsed 1:50  ETA 3:00  | a 60%  b 50%",
    ]


def test_quiet_prints_nothing_and_close_without_blocks_prints_nothing(monkeypatch):
    monkeypatch.setattr(progress_module.time, "time", Clock(0.0))
    out = io.StringIO()
    p = Progress({"a": 10}, {"a": 0}, stream=out, quiet=True)
    p.note("hello")
    p.advance("a", 5)
    p.close()
    idle = Progress({"a": 10}, {"a": 10}, stream=out)
    idle.close()
    assert out.getvalue() == ""
