"""Judging a selection method: its scores against a ground truth, per task and on average.

Inputs are plain tables. The ground truth is a CSV ``candidate,task,accuracy`` (the accuracy of
the VLM built from ``candidate`` on ``task``). A method's scores come either as a CSV
``candidate,task,score`` (one method per file) or as the ``scores.csv`` that
``python -m vlmsel_jax.score`` writes (columns ``candidate``, one column per metric and
``rank_<metric>``; every metric becomes a method, and the file covers one task, named by the
caller). For every method and task ``judge`` computes the metrics of ``vlmsel_jax.scoring.metrics``
(Pearson, Spearman, Kendall, weighted τ, R², NDCG@k, Recall@k, top-1 regret) of the accuracy
against the score oriented so that larger = predicted better, then the mean over tasks.

Nothing is silently dropped: a candidate present in the scores and not in the ground truth (or
the reverse), a task present in one and not the other, a duplicate row, a non-finite value: each
is a ``JudgeError`` whose one-line message names the file, line, task or candidate.

``select --method=judge`` (``judge_cli``) runs ``judge_files``; its markdown and plot are
``reports.judge_markdown`` and ``figures.judge_bars``. With ``--bootstrap`` / ``--permutations``
each task's judgement gets intervals and p-values (``vlmsel_jax.scoring.uncertainty``).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from vlmsel_jax.runtime import atomic
from vlmsel_jax.scoring import metrics as rank_metrics
from vlmsel_jax.scoring import pool as scoring
from vlmsel_jax.scoring import uncertainty as unc

DEFAULT_KS = (1, 3, 5)


class JudgeError(ValueError):
  """A bad input table or an inconsistency between tables; the message is one line."""


@dataclasses.dataclass
class MethodScores:
  """One selection method's scores: task → candidate → score.

  Attributes:
    name: The method's name in reports.
    higher_is_better: Whether a larger score means "predicted better" (False for GW distances).
    values: task → candidate → score.
    sources: task → the file the task's scores came from (for error messages).
  """
  name: str
  higher_is_better: bool
  values: dict[str, dict[str, float]]
  sources: dict[str, str]


def parse_float(text: str | None, where: str, what: str,
                error: type[ValueError] = JudgeError) -> float:
  """``text`` as a finite float, or ``error`` naming ``where`` (file:line) and ``what``."""
  try:
    value = float(text)  # type: ignore[arg-type]
  except (TypeError, ValueError):
    raise error(f"{where}: {what} {text!r} is not a number") from None
  if not math.isfinite(value):
    raise error(f"{where}: {what} is {text.strip()} (scores and accuracies must be finite)")
  return value


def _open_csv(path: str, needed: Sequence[str]) -> tuple[csv.DictReader, Any]:
  # The tables may be results written to a bucket (``score``'s scores.csv): read through atomic.
  if not atomic.isfile(path):
    raise JudgeError(f"{path}: file not found")
  f = atomic.open_text(path, newline="", encoding="utf-8")
  reader = csv.DictReader(f)
  fields = reader.fieldnames or []
  for column in needed:
    if column not in fields:
      f.close()
      raise JudgeError(f"{path}: no '{column}' column (columns: {', '.join(fields) or 'none'})")
  return reader, f


def read_long_table(path: str, value_column: str) -> dict[str, dict[str, float]]:
  """Reads a ``candidate,task,<value_column>`` CSV as task → candidate → value.

  Raises:
    JudgeError: a missing file or column, an empty name, a duplicate (candidate, task), a value
      that is not a finite number, or no rows.
  """
  reader, f = _open_csv(path, ("candidate", "task", value_column))
  table: dict[str, dict[str, float]] = {}
  with f:
    for line, row in enumerate(reader, start=2):
      candidate, task = (row["candidate"] or "").strip(), (row["task"] or "").strip()
      if not candidate or not task:
        raise JudgeError(f"{path}:{line}: empty candidate or task name")
      per_task = table.setdefault(task, {})
      if candidate in per_task:
        raise JudgeError(f"{path}:{line}: candidate {candidate!r} appears twice for task {task!r}")
      per_task[candidate] = parse_float(row[value_column], f"{path}:{line}", value_column)
  if not table:
    raise JudgeError(f"{path}: no rows")
  return table


def read_truth(path: str, column: str = "accuracy") -> dict[str, dict[str, float]]:
  """The ground truth ``candidate,task,accuracy`` as task → candidate → accuracy."""
  return read_long_table(path, column)


def read_truth_sd(path: str, column: str = "accuracy") -> dict[str, dict[str, float]]:
  """task → candidate → standard error over seeds of the ground truth (0 where unknown).

  ``<column>_std`` / √(number of entries of ``seeds``), as the groundtruth binary writes them;
  a table without a ``<column>_std`` column gives {}.
  """
  reader, f = _open_csv(path, ("candidate", "task"))
  out: dict[str, dict[str, float]] = {}
  with f:
    if column + "_std" not in (reader.fieldnames or []):
      return {}
    for line, row in enumerate(reader, start=2):
      text = (row[column + "_std"] or "").strip()
      std = parse_float(text, f"{path}:{line}", column + "_std") if text else 0.0
      seeds = max(1, len((row.get("seeds") or "").split()))
      out.setdefault(row["task"].strip(), {})[row["candidate"].strip()] = std / math.sqrt(seeds)
  return out


def is_score_binary_csv(path: str) -> bool:
  """Whether ``path`` has the layout of ``vlmsel_jax.score``'s scores.csv (rank_<metric> columns)."""
  reader, f = _open_csv(path, ("candidate",))
  with f:
    fields = reader.fieldnames or []
  metric_columns = [c for c in fields[1:] if not c.startswith("rank_")]
  return "task" not in fields and bool(metric_columns) and all(
      f"rank_{c}" in fields for c in metric_columns)


def read_score_binary_csv(path: str, task: str, label: str | None = None) -> list[MethodScores]:
  """Every metric column of a ``vlmsel_jax.score`` scores.csv as one method, for ``task``.

  The direction of each metric (GW: lower is better) comes from the score binary's metric
  registry; a column it does not know is an error rather than a guess.
  """
  reader, f = _open_csv(path, ("candidate",))
  with f:
    fields = reader.fieldnames or []
    names = [c for c in fields[1:] if not c.startswith("rank_")]
    unknown = [m for m in names if m not in scoring.METRICS]
    if unknown:
      raise JudgeError(f"{path}: column(s) {', '.join(unknown)} are not metrics of "
                       "vlmsel_jax.score, so their direction is unknown; convert the file to "
                       "candidate,task,score and pass --judge_lower_is_better where needed")
    values: dict[str, dict[str, float]] = {m: {} for m in names}
    for line, row in enumerate(reader, start=2):
      candidate = (row["candidate"] or "").strip()
      if not candidate:
        raise JudgeError(f"{path}:{line}: empty candidate name")
      for m in names:
        if candidate in values[m]:
          raise JudgeError(f"{path}:{line}: candidate {candidate!r} appears twice")
        values[m][candidate] = parse_float(row[m], f"{path}:{line}", m)
  if not names or not values[names[0]]:
    raise JudgeError(f"{path}: no rows")
  prefix = f"{label}/" if label else ""
  return [MethodScores(prefix + m, scoring.METRICS[m].higher_is_better, {task: values[m]},
                       {task: path}) for m in names]


def parse_score_spec(spec: str) -> tuple[str | None, str, str | None]:
  """``[label=]path[:task]`` → (label, path, task); the label and task are optional."""
  label = None
  if "=" in spec:
    label, spec = spec.split("=", 1)
    label = label.strip() or None
  task = None
  if ":" in spec:
    spec, task = spec.rsplit(":", 1)
    task = task.strip() or None
  return label, spec.strip(), task


def load_methods(specs: Sequence[str], truth_tasks: Sequence[str],
                 lower_is_better: Iterable[str] = ()) -> list[MethodScores]:
  """Reads every score file named in ``specs`` (``[label=]path[:task]``) into methods.

  A long ``candidate,task,score`` file is one method, named by its label or its file name
  (without extension); ``:task`` keeps only that task's rows. A ``vlmsel_jax.score`` scores.csv
  gives one method per metric (``label/metric`` with a label) for the task after ``:`` (which
  may be left out only when the ground truth has a single task). Methods of the same name from
  several files are merged task by task (e.g. one scores.csv per task); a task given twice for
  one method is an error. Methods named in ``lower_is_better`` are flipped.
  """
  lower = set(lower_is_better)
  merged: dict[str, MethodScores] = {}
  for spec in specs:
    label, path, task = parse_score_spec(spec)
    if not path:
      raise JudgeError(f"empty path in score spec {spec!r}")
    if is_score_binary_csv(path):
      if task is None:
        if len(truth_tasks) != 1:
          raise JudgeError(f"{path}: a vlmsel_jax.score scores.csv holds one task; name it as "
                           f"{path}:TASK (ground-truth tasks: {', '.join(truth_tasks)})")
        task = truth_tasks[0]
      methods = read_score_binary_csv(path, task, label)
      for m in methods:
        if m.name in lower:
          m.higher_is_better = False
    else:
      values = read_long_table(path, "score")
      if task is not None:
        if task not in values:
          raise JudgeError(f"{path}: no rows for task {task!r} "
                           f"(tasks: {', '.join(sorted(values))})")
        values = {task: values[task]}
      name = label or os.path.splitext(os.path.basename(path))[0]
      methods = [MethodScores(name, name not in lower, values, {t: path for t in values})]
    for m in methods:
      if m.name not in merged:
        merged[m.name] = m
        continue
      into = merged[m.name]
      if into.higher_is_better != m.higher_is_better:
        raise JudgeError(f"method {m.name!r}: files disagree on its direction")
      for t, v in m.values.items():
        if t in into.values:
          raise JudgeError(f"method {m.name!r}: task {t!r} is given by both {into.sources[t]} "
                           f"and {m.sources[t]}")
        into.values[t] = v
        into.sources[t] = m.sources[t]
  unknown = sorted(lower - set(merged))
  if unknown:
    raise JudgeError(f"--judge_lower_is_better names unknown method(s) {', '.join(unknown)} "
                     f"(methods: {', '.join(merged)})")
  return list(merged.values())


def _check_match(method: MethodScores, truth: Mapping[str, Mapping[str, float]], truth_path: str,
                 tasks: Sequence[str]):
  """Raises JudgeError unless ``method`` scores exactly the ground truth's candidates per task."""
  extra = sorted(set(method.values) - set(tasks))
  if extra:
    src = method.sources[extra[0]]
    raise JudgeError(f"{src}: task(s) {', '.join(extra)} of method {method.name!r} are not in the "
                     f"ground truth {truth_path} (tasks: {', '.join(tasks)})")
  missing = [t for t in tasks if t not in method.values]
  if missing:
    raise JudgeError(f"method {method.name!r} has no scores for task(s) {', '.join(missing)} of "
                     f"the ground truth {truth_path}")
  for t in tasks:
    src = method.sources[t]
    no_truth = sorted(set(method.values[t]) - set(truth[t]))
    if no_truth:
      raise JudgeError(f"{src}: task {t!r}: candidate(s) {', '.join(no_truth)} have no accuracy "
                       f"in {truth_path}")
    no_score = sorted(set(truth[t]) - set(method.values[t]))
    if no_score:
      raise JudgeError(f"{src}: task {t!r}: no score for candidate(s) {', '.join(no_score)} of "
                       f"{truth_path}")
    if len(truth[t]) < rank_metrics.MIN_CANDIDATES:
      raise JudgeError(f"{truth_path}: task {t!r} has {len(truth[t])} candidate(s); ranking "
                       f"metrics need at least {rank_metrics.MIN_CANDIDATES}")


def metric_names(ks: Sequence[int]) -> list[str]:
  """The keys ``metrics.all_metrics`` returns for ``ks``, in its order."""
  return (["pearson", "spearman", "kendall", "weighted_tau", "r2"] +
          [f"ndcg@{k}" for k in ks] + [f"recall@{k}" for k in ks] + ["top1_regret"])


def judge_scores(true: Mapping[str, float], scores: Mapping[str, float], higher_is_better: bool,
                 ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """``metrics.all_metrics`` of one task: candidate → accuracy vs candidate → score."""
  names = sorted(true)
  t = np.array([true[c] for c in names], np.float64)
  s = rank_metrics.orient([scores[c] for c in names], higher_is_better)
  return rank_metrics.all_metrics(t, s, ks)


def selects(scores: Mapping[str, float], higher_is_better: bool) -> list[str]:
  """The candidate(s) ``scores`` predicts best, sorted by name; several when they tie.

  A tie is reported as a tie: listing order or names never pick one of the tied candidates.
  """
  names = sorted(scores)
  s = rank_metrics.orient([scores[c] for c in names], higher_is_better)
  return [names[i] for i in rank_metrics.top_group(s)]


def fmt_pick(tied: Sequence[str]) -> str:
  """A pick for a table: the name, or "tie of N: a, b, ..." when the score cannot separate them."""
  return tied[0] if len(tied) == 1 else f"tie of {len(tied)}: {', '.join(tied)}"


def mean_over_tasks(per_task: Mapping[str, Mapping[str, float]], keys: Sequence[str]
                    ) -> dict[str, float]:
  """Per key, the mean over tasks where the value is defined (a constant score gives NaN)."""
  out = {}
  for key in keys:
    vals = [v[key] for v in per_task.values() if math.isfinite(v[key])]
    out[key] = float(np.mean(vals)) if vals else float("nan")
  return out


def judge(truth: Mapping[str, Mapping[str, float]], methods: Sequence[MethodScores], *,
          truth_path: str = "ground truth", tasks: Sequence[str] | None = None,
          ks: Sequence[int] = DEFAULT_KS, uncertainty: unc.UncertaintyOptions | None = None,
          truth_sd: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
  """Judges every method against the ground truth on every task.

  Args:
    truth: task → candidate → accuracy (non-negative: it is NDCG's gain).
    methods: the methods to judge; each must score exactly the ground truth's candidates on
      exactly the judged tasks.
    truth_path: names the ground truth in error messages.
    tasks: the tasks to judge on (default: every ground-truth task); each must be in the truth.
    ks: the k of NDCG@k and Recall@k.
    uncertainty: when enabled, each task's judgement also gets ``<correlation>_ci_low``,
      ``_ci_high`` and ``_p_value`` for Pearson, Spearman, Kendall and weighted τ and
      ``top1_regret_ci_low`` / ``_ci_high`` (``uncertainty.judgement_uncertainty``: a bootstrap
      over the candidates, the ground truth redrawn within ``truth_sd``, task → candidate →
      standard error over seeds, where given; permutation p-values).

  Returns:
    {"tasks", "ks", "metrics", "methods": {name: {"higher_is_better", "per_task": {task:
    {metric: value}}, "mean": {metric: mean over tasks}, "tasks_defined": {metric: count},
    "selects": {task: [the predicted best candidate, or every candidate tied for it]}}}}.
    Ties count as ties (``vlmsel_jax.scoring.metrics``): no value depends on the candidates' order.
  """
  if not methods:
    raise JudgeError("no score files given")
  names = [m.name for m in methods]
  if len(set(names)) != len(names):
    raise JudgeError(f"method names are not unique: {', '.join(names)}")
  if tasks is None:
    tasks = sorted(truth)
  else:
    absent = [t for t in tasks if t not in truth]
    if absent:
      raise JudgeError(f"{truth_path}: no rows for task(s) {', '.join(absent)} "
                       f"(tasks: {', '.join(sorted(truth))})")
    methods = [dataclasses.replace(m, values={t: v for t, v in m.values.items() if t in tasks})
               for m in methods]
  for t in tasks:
    if any(v < 0 for v in truth[t].values()):
      raise JudgeError(f"{truth_path}: task {t!r} has a negative accuracy; NDCG needs "
                       "non-negative gains")
  keys = metric_names(ks)
  out: dict[str, Any] = {"tasks": list(tasks), "ks": list(ks), "metrics": keys, "methods": {}}
  if uncertainty is not None and uncertainty.enabled:
    out["uncertainty"] = dataclasses.asdict(uncertainty)
  for m in methods:
    _check_match(m, truth, truth_path, tasks)
    per_task = {t: judge_scores(truth[t], m.values[t], m.higher_is_better, ks) for t in tasks}
    if uncertainty is not None and uncertainty.enabled:
      for t in tasks:
        names_t = sorted(truth[t])
        sd = (truth_sd or {}).get(t, {})
        per_task[t].update(unc.judgement_uncertainty(
            [m.values[t][c] for c in names_t], [truth[t][c] for c in names_t],
            higher_is_better=m.higher_is_better, options=uncertainty,
            truth_sd=[sd.get(c, 0.0) for c in names_t]))
    out["methods"][m.name] = {
        "higher_is_better": m.higher_is_better,
        "per_task": per_task,
        "mean": mean_over_tasks(per_task, keys),
        "tasks_defined": {k: sum(math.isfinite(v[k]) for v in per_task.values()) for k in keys},
        "selects": {t: selects(m.values[t], m.higher_is_better) for t in tasks},
    }
  return out


def cutoffs(k: int) -> tuple[int, ...]:
  """NDCG@k / Recall@k cut-offs: 1, 3, 5 and ``k``."""
  return tuple(sorted({1, 3, 5, int(k)}))


def judge_files(truth_path: str, score_specs: Sequence[str], *, column: str = "accuracy",
                lower_is_better: Iterable[str] = (), tasks: Sequence[str] | None = None,
                ks: Sequence[int] = DEFAULT_KS,
                uncertainty: unc.UncertaintyOptions | None = None) -> dict[str, Any]:
  """``judge`` of the score files ``score_specs`` (``[label=]path[:task]``, see ``load_methods``)
  against the ground-truth CSV ``truth_path`` (accuracy in ``column``); the result also names
  its inputs (``ground_truth``, ``scores``)."""
  if not truth_path:
    raise JudgeError("--ground_truth is required (CSV candidate,task,accuracy)")
  if not score_specs:
    raise JudgeError("--scores is required (one or more score files)")
  truth = read_truth(truth_path, column)
  methods = load_methods(score_specs, sorted(truth), lower_is_better)
  result = judge(truth, methods, truth_path=truth_path, tasks=tasks or None, ks=ks,
                 uncertainty=uncertainty,
                 truth_sd=read_truth_sd(truth_path, column) if uncertainty else None)
  result["ground_truth"] = truth_path
  result["scores"] = list(score_specs)
  return result
