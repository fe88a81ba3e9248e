"""Writes a scored pool: scores.csv, scores.json, report.md and scores.png, as one unit.

All files are written into a staging directory beside ``output_dir``, which then replaces it
in one atomic exchange (``runtime/result_dir``); what else the directory held (a bank cache,
a user's files) is kept. On ``gs://`` and other epath file systems the files are published one
by one, each atomically, the manifest last.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import result_dir
from vlmsel_jax.scoring import pool as scoring

EVAL_COLUMNS = ("pearson", "spearman", "kendall", "weighted_tau", "r2", "ndcg@1", "ndcg@3",
                "ndcg@5", "recall@1", "recall@3", "recall@5", "top1_regret")


def _fmt(v: Any, digits: int = 4) -> str:
  if isinstance(v, float):
    if math.isnan(v):
      return "nan"
    return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
  return str(v)


def scores_csv(result: scoring.PoolScores) -> str:
  """One row per candidate: its value and its rank (1 = predicted best) under every metric.

  Written with the csv module, so a name with a comma or a quote (``a@layer=-4,res=128``) stays
  one field. The ranks are competition ranks (tied values share the best of their ranks), as in
  the report.
  """
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["candidate"] + result.metrics + [f"rank_{m}" for m in result.metrics])
  ranks = result.ranks
  for c in result.candidates:
    w.writerow([c] + [repr(result.values[m][c]) for m in result.metrics] +
               [ranks[m][c] for m in result.metrics])
  return buf.getvalue()


def _names(names: Sequence[str]) -> str:
  """One name in bold, or tied names with their count: a tie is reported, never broken."""
  if len(names) == 1:
    return f"**{names[0]}**"
  return ", ".join(f"**{n}**" for n in names) + f" (tie of {len(names)})"


def _truths(result: scoring.PoolScores, names: Sequence[str]) -> str:
  return ", ".join(_fmt(result.ground_truth[n]) for n in names)


def report_markdown(result: scoring.PoolScores, *, title: str, preamble: str = "",
                    run_info: Mapping[str, Any] | None = None) -> str:
  lines = [f"# {title}", ""]
  if preamble:
    lines += [preamble.strip(), ""]
  if result.ground_truth is not None:
    top = max(result.ground_truth.values())
    best = [c for c in result.candidates if result.ground_truth[c] == top]
    lines += ["## Headline", ""]
    trained = (f"the candidate{'s' if len(best) > 1 else ''} that actually trained best "
               f"{'are' if len(best) > 1 else 'is'} {_names(best)} ({_fmt(top)}).")
    if "gw" in result.metrics:
      pick = result.selected["gw"]
      lines.append(f"GW selects {_names(pick)} (ground truth {_truths(result, pick)}); "
                   + trained)
    else:
      lines.append(trained[0].upper() + trained[1:])
    lines += ["", "| score | selects | its ground truth | Pearson | Spearman | weighted τ |",
              "|---|---|---|---|---|---|"]
    for m in result.metrics:
      pick, ev = result.selected[m], result.evaluation[m]
      lines.append(f"| {m} | {_names(pick).replace('**', '')} | {_truths(result, pick)} | "
                   f"{_fmt(ev['pearson'], 3)} | {_fmt(ev['spearman'], 3)} | "
                   f"{_fmt(ev['weighted_tau'], 3)} |")
    lines.append("")
  lines += ["## Selection", "", "| metric | predicted best | direction |", "|---|---|---|"]
  for m in result.metrics:
    direction = "higher is better" if scoring.METRICS[m].higher_is_better else "lower is better"
    lines.append(f"| {m} ({scoring.METRICS[m].description}) | {_names(result.selected[m])} | "
                 f"{direction} |")
  if result.ground_truth is not None:
    lines += ["", f"Best candidate by ground truth: {_names(best)} ({_fmt(top)})."]
  lines += ["", "## Scores (rank in parentheses)", ""]
  header = ["candidate"] + (["ground truth"] if result.ground_truth is not None else []) + result.metrics
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  ranks = result.ranks
  order = (sorted(result.candidates, key=lambda c: -result.ground_truth[c])
           if result.ground_truth is not None else result.candidates)
  for c in order:
    row = [c] + ([_fmt(result.ground_truth[c])] if result.ground_truth is not None else [])
    row += [f"{_fmt(result.values[m][c])} ({ranks[m][c]})" for m in result.metrics]
    lines.append("| " + " | ".join(row) + " |")
  if result.evaluation is not None:
    lines += ["", "## How well each score predicts the ground truth", "",
              "Correlations use each score oriented so that larger = predicted better "
              "(GW is negated). R² is that of a least-squares line; NDCG@k uses the ground truth "
              "as gains; Recall@k = 1 if the truly best candidate is in the predicted top k; "
              "top-1 regret = best ground truth − ground truth of the predicted best.", "",
              "| metric | " + " | ".join(EVAL_COLUMNS) + " |", "|---|" + "---|" * len(EVAL_COLUMNS)]
    for m in result.metrics:
      ev = result.evaluation[m]
      lines.append(f"| {m} | " + " | ".join(_fmt(ev[k], 3) for k in EVAL_COLUMNS) + " |")
  if result.diagnostics:
    unconverged = [c for c, r in result.diagnostics.items() if not r.converged]
    solver = next(iter(result.diagnostics.values())).solver
    lines += ["", f"GW solver: `{solver}`; " + (
        f"did not meet its convergence tolerance within the iteration budget for: "
        f"{', '.join(unconverged)} (values are still the GW objective of the returned coupling)."
        if unconverged else "converged for every candidate.")]
  if run_info:
    lines += ["", "## Run", "", "```"] + [f"{k} = {v}" for k, v in run_info.items()] + ["```"]
  lines += ["", "Plot: `scores.png`. Machine-readable: `scores.csv`, `scores.json`.", ""]
  return "\n".join(lines)


def plot_png(result: scoring.PoolScores, path: str):
  """Per metric: score vs ground truth (when given), else the score per candidate."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  k = len(result.metrics)
  cols = min(4, k)
  rows = int(math.ceil(k / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
  for ax in axes.flat[k:]:
    ax.axis("off")
  for ax, m in zip(axes.flat, result.metrics):
    vals = np.array([result.values[m][c] for c in result.candidates])
    if result.ground_truth is not None:
      truth = np.array([result.ground_truth[c] for c in result.candidates])
      ax.scatter(vals, truth, s=18)
      for c, v, t in zip(result.candidates, vals, truth):
        ax.annotate(c, (v, t), fontsize=6, alpha=0.7)
      ev = result.evaluation[m]
      ax.set_title(f"{m}: Spearman {_fmt(ev['spearman'], 2)}, "
                   f"w-τ {_fmt(ev['weighted_tau'], 2)}", fontsize=9)
      ax.set_xlabel(m + (" (lower = closer)" if not scoring.METRICS[m].higher_is_better else ""),
                    fontsize=8)
      ax.set_ylabel("ground truth", fontsize=8)
    else:
      ax.barh(range(len(vals)), vals)
      ax.set_yticks(range(len(vals)), result.candidates, fontsize=6)
      ax.invert_yaxis()
      ax.set_title(m, fontsize=9)
    ax.tick_params(labelsize=7)
    # Scores such as GW can be ~1e-4: an offset exponent keeps the tick labels short.
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def similarity_csv(names: Sequence[str], matrix: np.ndarray) -> str:
  """A square matrix as CSV: a header row of names, then one row per name (Mordal's format).

  Written with the csv module: variant names carry commas (``enc@layer=-4,res=128``), which
  must be quoted to stay one field for ``selection.tables.read_similarity``.
  """
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["name", *names])
  for name, row in zip(names, matrix):
    w.writerow([name, *(f"{v:.6f}" for v in row)])
  return buf.getvalue()


def write_outputs(result: scoring.PoolScores, output_dir: str, *, title: str,
                  preamble: str = "", run_info: Mapping[str, Any] | None = None,
                  extra: Mapping[str, str] | None = None) -> list[str]:
  """Writes the result files (and ``extra``: file name → text) as one new ``output_dir``.

  The directory is replaced as a unit (``result_dir.replace``): a reader, or a run killed at any
  point, sees the previous result or this one, whole. ``output_dir`` may be local (made
  absolute) or any epath URI (``gs://bucket/run``, published file by file). Returns the paths.
  """
  payload = result.to_json()
  if run_info:
    payload["run"] = dict(run_info)

  def fill(staging: str) -> None:
    with open(os.path.join(staging, "scores.json"), "w") as f:
      json.dump(payload, f, indent=2, allow_nan=True)
      f.write("\n")
    with open(os.path.join(staging, "scores.csv"), "w") as f:
      f.write(scores_csv(result))
    with open(os.path.join(staging, "report.md"), "w") as f:
      f.write(report_markdown(result, title=title, preamble=preamble, run_info=run_info))
    plot_png(result, os.path.join(staging, "scores.png"))
    for name, text in (extra or {}).items():
      with open(os.path.join(staging, name), "w") as f:
        f.write(text)

  return result_dir.replace(atomic.absolute(output_dir), fill)
