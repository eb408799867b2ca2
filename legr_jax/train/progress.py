"""A small progress printer (no dependencies): steps, metrics, rate, ETA."""

from __future__ import annotations

import sys
import time


def format_seconds(s: float) -> str:
  if s != s or s == float("inf"):
    return "?"
  s = int(round(s))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
  """Prints ``desc  step/total [bar] k=v ... 12.3 it/s ETA mm:ss``.

  On a terminal one line is redrawn in place; otherwise (logs, CI) a line is
  printed at most every ``min_interval`` seconds. The rate is measured from
  the first `update` on, so compilation time does not distort the ETA.
  """

  def __init__(self, total: int, *, initial: int = 0, desc: str = "",
               stream=None, min_interval: float | None = None, width: int = 20):
    self.total, self.n, self.desc, self.width = total, initial, desc, width
    self.stream = stream or sys.stderr
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.min_interval = (min_interval if min_interval is not None
                         else (0.2 if self.tty else 30.0))
    self._t0 = self._n0 = None
    self._last_print = -float("inf")
    self.postfix = ""

  def eta(self) -> float:
    if self._t0 is None or self.n <= self._n0:
      return float("nan")
    rate = (self.n - self._n0) / (time.perf_counter() - self._t0)
    return (self.total - self.n) / rate

  def line(self) -> str:
    frac = self.n / max(1, self.total)
    filled = int(frac * self.width)
    bar = "#" * filled + "." * (self.width - filled)
    rate = ""
    if self._t0 is not None and self.n > self._n0:
      rate = f" {(self.n - self._n0) / (time.perf_counter() - self._t0):.2f}it/s"
    return (f"{self.desc} {self.n}/{self.total} [{bar}] {self.postfix}{rate} "
            f"ETA {format_seconds(self.eta())}")

  def update(self, n: int, *, force: bool = False, **metrics) -> None:
    """Sets the position to ``n`` steps and the shown metrics."""
    now = time.perf_counter()
    if self._t0 is None:
      self._t0, self._n0 = now, n
    self.n = n
    if metrics:
      self.postfix = " ".join(
          f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
          for k, v in metrics.items())
    if force or now - self._last_print >= self.min_interval:
      self._last_print = now
      if self.tty:
        self.stream.write("\r" + self.line() + "\x1b[K")
      else:
        self.stream.write(self.line() + "\n")
      self.stream.flush()

  def write(self, msg: str) -> None:
    """Prints a message line without garbling the bar."""
    if self.tty:
      self.stream.write("\r\x1b[K")
    self.stream.write(msg + "\n")
    self.stream.flush()

  def close(self) -> None:
    self.update(self.n, force=True)
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()
