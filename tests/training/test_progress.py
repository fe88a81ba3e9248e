"""The one-line progress reports of the long binaries (vlmsel_jax.training.progress)."""

from __future__ import annotations

import pytest

from vlmsel_jax.training import progress


@pytest.mark.parametrize("seconds,text", [
    (0, "0 s"), (-3, "0 s"), (0.4, "0 s"), (42.4, "42 s"), (59.4, "59 s"),
    (59.5, "1.0 min"), (246, "4.1 min"), (596, "9.9 min"), (597, "10 min"), (720, "12 min"),
    (3569, "59 min"), (3570, "1 h 00 min"), (7500, "2 h 05 min"), (100_000, "27 h 47 min")])
def test_format_duration(seconds, text):
  assert progress.format_duration(seconds) == text


def test_remaining_is_the_mean_time_per_timed_unit_times_the_units_left():
  assert progress.remaining_seconds([60.0, 120.0], 3) == pytest.approx(270.0)
  assert progress.remaining_seconds([60.0], 0) is None  # nothing left
  assert progress.remaining_seconds([], 5) is None  # nothing timed yet (all done before)


def test_format_line_counts_fields_and_times():
  line = progress.format_line(3, 26, ["efficientnet-lite0+smollm2-135m", "fraction 0.25",
                                      "accuracy 0.4120"], took_s=246, elapsed_s=720, left_s=5520)
  assert line == ("[3/26] efficientnet-lite0+smollm2-135m\tfraction 0.25\taccuracy 0.4120\t"
                  "(4.1 min; 12 min so far; about 1 h 32 min left)")
  # No total: a running count, and no estimate.
  assert progress.format_line(7, None, ["a", "b"], took_s=5, elapsed_s=65) == \
      "[7] a\tb\t(5 s; 1.1 min so far)"
  # Done before: no time at all; empty fields are left out.
  assert progress.format_line(1, 2, ["vit_a", None, "", "seed 0"], took_s=5, elapsed_s=5,
                              done_before=True) == "[1/2] vit_a\tseed 0\t(done before)"
  assert progress.format_line(2, 2, ["x"]) == "[2/2] x"


def test_progress_times_each_unit_since_the_last_and_estimates_from_the_timed_ones(capsys):
  now = [100.0]
  p = progress.Progress(4, clock=lambda: now[0])
  assert p.done_before(["a", "seed 0"]) == "[1/4] a\tseed 0\t(done before)"
  now[0] += 120.0
  assert p.done(["b"]) == "[2/4] b\t(2.0 min; 2.0 min so far; about 4.0 min left)"
  now[0] += 240.0
  # Mean of the timed units (2 and 4 min) times the one left.
  assert p.done(["c"]) == "[3/4] c\t(4.0 min; 6.0 min so far; about 3.0 min left)"
  now[0] += 30.0
  assert p.done(["d"]) == "[4/4] d\t(30 s; 6.5 min so far)"
  assert capsys.readouterr().out.splitlines() == [
      "[1/4] a\tseed 0\t(done before)",
      "[2/4] b\t(2.0 min; 2.0 min so far; about 4.0 min left)",
      "[3/4] c\t(4.0 min; 6.0 min so far; about 3.0 min left)",
      "[4/4] d\t(30 s; 6.5 min so far)"]


def test_progress_without_total_or_disabled(capsys):
  now = [0.0]
  p = progress.Progress(clock=lambda: now[0])
  now[0] = 90.0
  assert p.done(["x", "fraction 0.5"]) == "[1] x\tfraction 0.5\t(1.5 min; 1.5 min so far)"
  quiet = progress.Progress(2, enabled=False, clock=lambda: now[0])
  assert quiet.done(["y"]).startswith("[1/2] y\t")  # counted, not printed
  assert capsys.readouterr().out == "[1] x\tfraction 0.5\t(1.5 min; 1.5 min so far)\n"
