"""Progress of a long job on the driver: overall and per fine-tune, rate and ETA, on stderr."""
from __future__ import annotations

import sys
import time


def format_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Counts weights done per fine-tune (reused blocks count as done from the start) and prints
    a line at most every `interval` seconds, with the rate of this run and the ETA."""

    def __init__(self, totals: dict[str, int], reused: dict[str, int], *, quiet=False,
                 stream=sys.stderr, interval=2.0):
        self.total = dict(totals)
        self.done = dict(reused)
        self.quiet = quiet
        self.stream = stream
        self.interval = interval
        self.start = time.time()
        self.last = 0.0
        self.run_weights = 0
        self.rate_weights = 0
        self.first: float | None = None
        self.blocks = 0

    def note(self, message: str) -> None:
        if not self.quiet:
            print(f"[ken-dist] {message}", file=self.stream, flush=True)

    def advance(self, name: str, weights: int) -> None:
        now = time.time()
        if self.first is None:  # the rate is measured from the first finished block: Ray and
            self.first = now    # actor start-up would otherwise inflate the ETA many times
        else:
            self.rate_weights += weights
        self.done[name] += weights
        self.run_weights += weights
        self.blocks += 1
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        if self.quiet:
            return
        total = sum(self.total.values())
        done = sum(self.done.values())
        elapsed = now - self.start
        window = now - self.first if self.first is not None else 0.0
        rate = self.rate_weights / window if window > 0 and self.rate_weights else 0.0
        eta = format_seconds((total - done) / rate) if rate > 0 else "?"
        per_ft = "  ".join(f"{n} {100 * self.done[n] / max(1, self.total[n]):.0f}%" for n in self.total)
        print(f"[ken-dist] {100 * done / max(1, total):5.1f}%  {self.blocks} blocks  "
              f"{rate / 1e6:.2f} M weights/s  elapsed {format_seconds(elapsed)}  ETA {eta}  | {per_ft}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.blocks:
            self._print(time.time())
