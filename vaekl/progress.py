"""Progress of long work as absl INFO lines at a fixed cadence: done, rate, time left.

    progress = Progress("eval (IWAE-5000)", total=100, unit="batches")
    for batch in batches:
        ...
        progress.advance(1)

logs `eval (IWAE-5000): 7/100 batches (7%), 3.2 batches/s, ETA 29 s` at most once every
`every_s` seconds, always the first update and the last. The lines are absl INFO lines, so
they reach stderr wherever absl logging is at INFO (`app.run`, or a notebook once the
verbosity is set). By default the first update is treated as warm-up: its time includes
one-off work such as compiling a jitted function, so the rate and the time left count
from it on, not from the start.
"""

import time
from collections.abc import Callable

from absl import logging


def format_duration(seconds: float) -> str:
    """4.2 s, 3 min 05 s or 2 h 03 min."""
    if seconds < 60:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _format_field(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """Counts units of work done towards `total` and logs how far along it is.

    Args:
      what: names the work at the start of each line.
      total: the units of work in all.
      unit: their name, plural ("steps", "batches").
      done: units already done before this process (a resumed run).
      every_s: the least time between two lines, except the last.
      quiet_s: no line at all until this much time has passed since the start, so
        that short work stays silent (the last line only follows an earlier one).
      first_is_warmup: whether the rate counts from the first update (True) or from
        the start (False, when one-off work was done before the start).
      clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, what: str, total: int, *, unit: str, done: int = 0,
                 every_s: float = 10.0, quiet_s: float = 0.0, first_is_warmup: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self._what, self._total, self._unit, self._done = what, total, unit, done
        self._every_s, self._quiet_s, self._clock = every_s, quiet_s, clock
        self._warmup = first_is_warmup
        self._start = clock()
        self._base = None if first_is_warmup else (self._start, done)
        self._last_line = None  # When the last line was logged.

    def advance(self, count: int = 1, **fields) -> bool:
        """Adds `count` units done; logs a line when one is due. Returns whether it logged.

        `fields` follow the figures on the line (floats to 4 digits), e.g. loss=95.3.
        """
        now = self._clock()
        self._done += count
        first = self._base is None
        if first:
            self._base = (now, self._done)
        if self._last_line is None:
            due = now - self._start >= self._quiet_s
        else:
            due = now - self._last_line >= self._every_s or self._done >= self._total
        if due:
            self._last_line = now
            logging.info("%s", self._line(now, first, fields))
        return due

    def _line(self, now: float, first: bool, fields: dict) -> str:
        done, total = self._done, self._total
        line = f"{self._what}: {done}/{total} {self._unit} ({100 * done / max(total, 1):.0f}%)"
        base_time, base_done = self._base
        rate = ((done - base_done) / (now - base_time)
                if done > base_done and now > base_time else None)
        if done >= total or rate is None:
            line += f" in {format_duration(now - self._start)}"
            if first and self._warmup:
                line += " (with compilation)"
        if rate is not None:
            line += (f", {rate:.3g} {self._unit}/s" if rate >= 1
                     else f", {format_duration(1 / rate)} each")
            if done < total:
                line += f", ETA {format_duration((total - done) / rate)}"
        if fields:
            line += "; " + ", ".join(f"{k} {_format_field(v)}" for k, v in fields.items())
        return line
