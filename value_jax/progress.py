"""Progress lines of long runs, for a researcher watching stderr.

  Progress      one line per `every` batches of a pass: done/total, examples/s, elapsed, ETA
  FitProgress   one line per trained prober of a probe's finalize: fits done, elapsed, ETA
  hms           seconds as H:MM:SS

This module imports nothing of value_jax, so any layer may use it.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """One line per `every` batches on stderr: done/total, items/s, elapsed and ETA.

    `skipped` batches (already counted by a resumed run) are not part of the rate or the ETA.
    """

    def __init__(
        self, total: int | None, label: str, every: int = 10, stream=sys.stderr, skipped: int = 0
    ):
        self.total, self.label, self.every, self.stream = total, label, every, stream
        self.skipped = skipped
        self.start = time.perf_counter()
        self.items = 0

    def update(self, done: int, items: int) -> None:
        self.items += items
        if not self.every or (done % self.every and done != self.total):
            return
        elapsed = time.perf_counter() - self.start
        rate = self.items / max(elapsed, 1e-9)
        eta = ""
        if self.total:
            per_batch = elapsed / max(done - self.skipped, 1)
            eta = f", ETA {hms(per_batch * (self.total - done))}"
        total = f"/{self.total}" if self.total else ""
        print(
            f"[{self.label}] batch {done}{total}, {rate:.1f} examples/s, "
            f"elapsed {hms(elapsed)}{eta}",
            file=self.stream,
            flush=True,
        )


class FitProgress:
    """One line on `log` (the runner's prints it on stderr, on the lead process, after the run
    and probe names) per finished prober fit of a probe's finalize, hours long at full size:
    what was trained (its task and control probers), how long it took, how many of the probe's
    `total` fits are done, the time elapsed and an ETA at the mean time per fit so far. `log`
    None: silent."""

    def __init__(self, log, total: int):
        self.log, self.total = log, int(total)
        self.done, self.start = 0, time.perf_counter()

    def run(self, what: str, fit, units: int = 1):
        """`fit()` (a dict: a prober's results, or `{"skipped": why}`), reported as `units` of
        the total (a fit of several layers at once)."""
        begin = time.perf_counter()
        out = fit()
        self.done += units
        if self.log is not None:
            now = time.perf_counter()
            elapsed = now - self.start
            eta = elapsed / self.done * max(self.total - self.done, 0)
            skipped = f" (skipped: {out['skipped']})" if "skipped" in out else ""
            self.log(
                f"{what}{skipped}: {hms(now - begin)}; {self.done} of "
                f"{self.total} fits done, elapsed {hms(elapsed)}, ETA {hms(eta)}"
            )
        return out


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
