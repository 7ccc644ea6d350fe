"""Progress reporting for long loops: rate and ETA to absl logging, a bar on a terminal."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from absl import logging


def format_seconds(seconds: float) -> str:
  """Returns e.g. '42s', '3m05s', '1h02m'."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


class Progress:
  """Counts units of work toward `total`; logs `what: done/total, rate, ETA`.

  Logs at most every `log_every_s` seconds (and at the end) unless `quiet`;
  draws a one-line bar on `stream` when it is a terminal. `start` is the
  count already done when resuming (not counted in the rate).
  """

  def __init__(self, total: int, what: str, unit: str = "it", *, start: int = 0, quiet: bool = False,
               log_every_s: float = 5.0, stream: Optional[TextIO] = None):
    self.total, self.what, self.unit = int(total), what, unit
    self.done = self.start = int(start)
    self.quiet = quiet
    self.log_every_s = log_every_s
    self.stream = sys.stderr if stream is None else stream
    self.bar = (not quiet) and hasattr(self.stream, "isatty") and self.stream.isatty()
    self._t0 = self._last = time.perf_counter()
    if start and not quiet:
      logging.info("%s: resuming at %d/%d %s", what, start, self.total, unit)

  def rate(self) -> float:
    elapsed = time.perf_counter() - self._t0
    return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

  def message(self) -> str:
    rate = self.rate()
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    eta_s = format_seconds(eta) if rate > 0 else "?"
    return f"{self.what}: {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, ETA {eta_s}"

  def update(self, n: int = 1) -> None:
    self.done += n
    if self.quiet:
      return
    now = time.perf_counter()
    finished = self.done >= self.total
    if self.bar:
      width = 30
      filled = int(width * self.done / max(1, self.total))
      self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.message()}   ")
      if finished:
        self.stream.write("\n")
      self.stream.flush()
    if finished or now - self._last >= self.log_every_s:
      self._last = now
      logging.info("%s", self.message())
