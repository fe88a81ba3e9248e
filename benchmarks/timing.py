"""Wall-clock timing shared by the benchmarks: the best of several calls."""

from __future__ import annotations

import time
from typing import Any, Callable


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
  """Calls ``fn`` ``repeats`` times; returns (its last output, the fastest call's seconds).

  The caller warms up (compiles) first and blocks on asynchronous results inside ``fn``.
  """
  best, out = float("inf"), None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return out, best
