"""One line per finished unit of long work (a training run, a warm-up, a search step).

The binaries that train for minutes to hours (``groundtruth``, ``a_score``, Mordal live mode,
the LLM similarity) print, after each unit, a line (fields tab-separated) like

  [3/26] vit_a  seed 0  accuracy 0.4120  A -3.2100  (4.1 min; 12 min so far; about 1 h 32 min left)

the count over the known total (only the count where the total is not known in advance), the
unit's own fields, and the time it took, the time since the work began and, where the total is
known, an estimate of what is left. A unit found already done (a re-run that skips it) counts,
and says ``(done before)`` instead of times.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Sequence

SEP = "\t"
DONE_BEFORE = "(done before)"


def format_duration(seconds: float) -> str:
  """``42 s``, ``4.1 min``, ``12 min``, ``2 h 05 min``."""
  seconds = max(float(seconds), 0.0)
  if seconds < 59.5:
    return f"{round(seconds)} s"
  minutes = seconds / 60
  if minutes < 9.95:
    return f"{minutes:.1f} min"
  whole = round(minutes)
  if whole < 60:
    return f"{whole} min"
  hours, rest = divmod(whole, 60)
  return f"{hours} h {rest:02d} min"


def remaining_seconds(durations: Sequence[float], left: int) -> float | None:
  """A simple estimate of the time ``left`` more units take: the mean time of the units timed so
  far times ``left``. None when nothing was timed yet or nothing is left. (Units a re-run finds
  already done are not timed, so they do not pull the mean down; those still ahead are counted
  as if they will train, so the estimate errs long.)"""
  if left <= 0 or not durations:
    return None
  return sum(durations) / len(durations) * left


def format_line(count: int, total: int | None, fields: Sequence[str], *,
                took_s: float | None = None, elapsed_s: float | None = None,
                left_s: float | None = None, done_before: bool = False) -> str:
  """``[count/total] field<TAB>field<TAB>(took; elapsed so far; about left left)``.

  Without ``total`` the counter is ``[count]``; with ``done_before`` the times are replaced by
  ``(done before)``; a time that is None is left out (and the parentheses with all of them).
  """
  head = f"[{count}/{total}]" if total else f"[{count}]"
  parts = [str(f) for f in fields if f is not None and str(f) != ""]
  if done_before:
    tail = DONE_BEFORE
  else:
    times = []
    if took_s is not None:
      times.append(format_duration(took_s))
    if elapsed_s is not None:
      times.append(f"{format_duration(elapsed_s)} so far")
    if left_s is not None:
      times.append(f"about {format_duration(left_s)} left")
    tail = f"({'; '.join(times)})" if times else ""
  body = SEP.join(parts + ([tail] if tail else []))
  return f"{head} {body}" if body else head


class Progress:
  """Counts finished units and prints a ``format_line`` for each (flushed, to stdout).

  A unit's time is the time since the previous line (or since this object was made): the units
  run one after another, so that is the unit's own time.

  Args:
    total: The number of units, if known in advance (it gives the ``[k/n]`` counter and the
      estimate of the time left).
    enabled: False prints nothing (e.g. on all but the primary process), but still counts.
    clock: Seconds, monotonic (tests pass a fake).
  """

  def __init__(self, total: int | None = None, *, enabled: bool = True,
               clock: Callable[[], float] = time.monotonic):
    self.total = total
    self.enabled = enabled
    self.clock = clock
    self.count = 0
    self.durations: list[float] = []
    self.start = self._last = clock()

  def done(self, fields: Sequence[str]) -> str:
    """A unit finished here; returns (and prints) its line."""
    now = self.clock()
    took, self._last = now - self._last, now
    self.count += 1
    self.durations.append(took)
    left = remaining_seconds(self.durations, self.total - self.count) if self.total else None
    return self._print(format_line(self.count, self.total, fields, took_s=took,
                                   elapsed_s=now - self.start, left_s=left))

  def done_before(self, fields: Sequence[str]) -> str:
    """A unit found already done: it counts, and its time is not part of any unit's."""
    self._last = self.clock()
    self.count += 1
    return self._print(format_line(self.count, self.total, fields, done_before=True))

  def _print(self, line: str) -> str:
    if self.enabled:
      print(line, file=sys.stdout, flush=True)
    return line
