"""Writes a scored pool: scores.csv, scores.json, report.md and scores.png, as one unit.

With uncertainty (``pool.add_uncertainty``) the report adds each score's intervals, p-values
and P(top-1), says in words which candidates each score resolves, and the plot gets error bars
(score interval × the ground truth's seed noise); labels are placed so that none overlaps
another label or a point.

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
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import result_dir
from vlmsel_jax.scoring import pool as scoring

VISION_CKA_PNG = "vision_cka.png"
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
  if result.uncertainty_options is not None:
    lines += uncertainty_markdown(result)
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
    if result.uncertainty_options is not None:
      lines += judgement_markdown(result)
  if result.diagnostics:
    unconverged = [c for c, r in result.diagnostics.items() if not r.converged]
    solver = next(iter(result.diagnostics.values())).solver
    lines += ["", f"GW solver: `{solver}`; " + (
        f"did not meet its convergence tolerance within the iteration budget for: "
        f"{', '.join(unconverged)} (values are still the GW objective of the returned coupling)."
        if unconverged else "converged for every candidate.")]
  if run_info:
    lines += ["", "## Run", "", "```"] + [f"{k} = {v}" for k, v in run_info.items()] + ["```"]
  lines += ["", "## Plots", "",
            "![Each score against the ground truth](scores.png)", "",
            "`scores.png`: each score against the ground truth" +
            (" (horizontal bars: the score's interval; vertical bars: the ground truth's seed "
             "noise, where a candidate was trained with several seeds)"
             if result.uncertainty_options is not None else "") + ".", "",
            f"![Linear CKA of the candidates with one another]({VISION_CKA_PNG})", "",
            f"`{VISION_CKA_PNG}`: the candidates' linear CKA with one another (`vision_cka.csv`, "
            "what Mordal clusters by).", "",
            "Machine-readable: `scores.csv`, `scores.json`" +
            (" (every interval under `uncertainty`)." if result.uncertainty_options is not None
             else "."), ""]
  return "\n".join(lines)


def _interval(low: float, high: float, digits: int = 3) -> str:
  if not (math.isfinite(low) and math.isfinite(high)):
    return "–"
  return f"[{_fmt(float(low), digits)}, {_fmt(float(high), digits)}]"


def _p(p: float, permutations: int) -> str:
  if not math.isfinite(p):
    return "–"
  floor = 1.0 / (permutations + 1)
  return f"≤ {floor:.2g}" if p <= floor * (1 + 1e-9) else f"{p:.2g}"


def _and(names: Sequence[str]) -> str:
  names = list(names)
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def uncertainty_markdown(result: scoring.PoolScores) -> list[str]:
  """The intervals, p-values and P(top-1) of every score, and in words what each resolves."""
  opts = result.uncertainty_options
  level = f"{100 * opts.confidence:g}%"
  lines = ["", "## How sure: intervals, p-values, ranking stability", "",
           f"Intervals are {level} percentile bootstrap intervals over the image–caption pairs "
           f"({opts.bootstrap} resamples of the pairs, the same resamples for every candidate, "
           f"seed {opts.seed}). p is the permutation p-value against \"no shared structure\" "
           f"(the pairing of image and text rows shuffled {opts.permutations} times; the "
           f"smallest possible is 1/{opts.permutations + 1}, shown as ≤). P(top-1) is the share "
           "of resamples in which the candidate is the predicted best. Two candidates are "
           f"*resolved* by a score when the {level} interval of their difference excludes 0. "
           "Scores computed elsewhere (C score, A score) have no resamples here."]
  notes = [f"{m}: {u.note}." for m, u in result.uncertainty.items() if u.note]
  if notes:
    lines += [""] + [f"- {n}" for n in notes]
  lines += ["", "### What each score resolves", ""]
  m_count = len(result.candidates)
  for m in result.metrics:
    if m not in result.stability:
      continue
    st = result.stability[m]
    pairs = m_count * (m_count - 1) // 2
    n_resolved = int(np.triu(st.resolved, 1).sum())
    groups = result.unresolved(m)
    names = result.candidates
    pick = names.index(result.selected[m][0])
    close = [j for j in np.argsort(-st.p_top1, kind="stable") if j != pick and
             not st.resolved[pick, j]]
    lead = (f"its pick **{names[pick]}** (P(top-1) {st.p_top1[pick]:.2f}) is " +
            ("resolved above every other candidate" if not close else
             "not told apart from " + _and([f"{names[j]} ({st.p_top1[j]:.2f})" for j in close])
             + f", and resolved above the other {m_count - 1 - len(close)}"))
    chain = " > ".join("{" + ", ".join(g) + "}" if len(g) > 1 else g[0] for g in groups)
    text = (f"- **{m}** resolves {n_resolved} of {pairs} pairs; {lead}. In predicted order, "
            f"braces chaining neighbours it does not resolve: {chain}.")
    u = result.uncertainty[m]
    if u.null.shape[0]:
      above = [c for i, c in enumerate(result.candidates) if not u.p_value[i] <= 0.05]
      text += (" Every candidate's score is above its shuffled-pairing null (p ≤ 0.05)." if not
               above else f" Not distinguishable from a shuffled pairing (p > 0.05): "
               f"{_and(above)}.")
    lines.append(text)
  shown = [m for m in result.metrics if m in result.uncertainty]
  lines += ["", f"### Scores with {level} intervals", "",
            # Why an interval may not contain its own score: worth saying where it is read.
            "A resample repeats some images, and repeated pairs raise CKA, CCA and SVCCA above "
            "their value on distinct images, so an interval can lie above the score itself. "
            "Whether two candidates are resolved is read from each resample's difference, "
            "where that shift largely cancels.", "",
            "| candidate | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
  for i, c in enumerate(result.candidates):
    cells = [f"{_fmt(result.values[m][c])} "
             f"{_interval(result.uncertainty[m].ci_low[i], result.uncertainty[m].ci_high[i])}"
             for m in shown]
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  lines += ["", "### p-value against a shuffled pairing / P(top-1)", "",
            "| candidate | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
  for i, c in enumerate(result.candidates):
    cells = []
    for m in shown:
      st = result.stability.get(m)
      top1 = f"{st.p_top1[i]:.2f}" if st is not None else "–"
      cells.append(f"{_p(result.uncertainty[m].p_value[i], opts.permutations)} / {top1}")
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  return lines


def judgement_markdown(result: scoring.PoolScores) -> list[str]:
  """The correlations with the ground truth with their intervals and p-values, in a table."""
  opts = result.uncertainty_options
  level = f"{100 * opts.confidence:g}%"
  noisy = [c for c, v in (result.ground_truth_sd or {}).items() if v > 0]
  lines = ["", f"{level} intervals: bootstrap over the candidates ({opts.bootstrap} resamples of "
           f"the {len(result.candidates)} candidates" +
           (f"; the ground truth of {_and(noisy)} redrawn within its seed noise"
            if noisy else "") +
           "; each resample also takes the score's own bootstrap replicate, where it has one). "
           f"p: one-sided permutation p-value of a positive correlation ({opts.permutations} "
           "shuffles of the scores against the ground truth).", "",
           "| metric | Pearson | Spearman | Kendall | weighted τ | top-1 regret |",
           "|---|---|---|---|---|---|"]
  for m in result.metrics:
    ev = result.evaluation[m]
    cells = []
    for k in ("pearson", "spearman", "kendall", "weighted_tau"):
      low, high = ev.get(k + "_ci_low", math.nan), ev.get(k + "_ci_high", math.nan)
      cells.append(f"{_fmt(ev[k], 2)} {_interval(low, high, 2)} "
                   f"p {_p(ev.get(k + '_p_value', math.nan), opts.permutations)}")
    low, high = ev.get("top1_regret_ci_low", math.nan), ev.get("top1_regret_ci_high", math.nan)
    cells.append(f"{_fmt(ev['top1_regret'], 3)} {_interval(low, high)}")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return lines


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def text_box(annotation, renderer):
  """The display-space box of a centred annotation's text alone (without its connector line)."""
  import matplotlib.text  # pylint: disable=g-import-not-at-top
  import matplotlib.transforms  # pylint: disable=g-import-not-at-top
  extent = matplotlib.text.Text.get_window_extent(annotation, renderer)  # Size only.
  x, y = annotation.axes.transData.transform(annotation.xyann)
  return matplotlib.transforms.Bbox.from_bounds(x - extent.width / 2, y - extent.height / 2,
                                                extent.width, extent.height)


def place_labels(ax, xs, ys, labels: Sequence[str], fontsize: float = 6,
                 iterations: int = 300) -> list:
  """Annotates each point (xs[i], ys[i]) with labels[i] so that no two labels overlap.

  Labels start centred above their points and are pushed apart in display space (pixels), from
  each other and from every point, by the smaller of the two overlaps, until none overlaps or
  ``iterations`` run out; each is then tied to its point by a thin line. Call after the axes'
  limits and the figure's layout are final. Returns the annotation artists.
  """
  fig = ax.figure
  renderer = fig.canvas.get_renderer()
  points = ax.transData.transform(np.column_stack([xs, ys]))
  texts = [ax.annotate(c, (x, y), xytext=(x, y), textcoords="data", fontsize=fontsize,
                       ha="center", va="center", alpha=0.85,
                       arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5",
                                   "shrinkA": 0, "shrinkB": 2})
           for c, x, y in zip(labels, xs, ys)]
  # The text's own box (an Annotation's extent would include its connector line).
  size = np.array([[b.width, b.height] for b in
                   (text_box(t, renderer) for t in texts)]) + 2.0
  pos = points + np.array([0.0, 1.0]) * (size[:, 1:2] / 2 + 3)
  frame = ax.get_window_extent(renderer)
  point_size = 6.0
  count = len(texts)
  for _ in range(iterations):
    moved = False
    for i in range(count):
      # Other labels, then the points, as boxes to keep clear of.
      centres = np.concatenate([np.delete(pos, i, axis=0), points])
      extents = np.concatenate([np.delete(size, i, axis=0), np.full((count, 2), point_size)])
      gaps = (size[i] + extents) / 2 - np.abs(pos[i] - centres)
      for centre, gap in zip(centres, gaps):
        if gap[0] > 0 and gap[1] > 0:
          axis = int(gap[1] < gap[0])  # Push along the axis of least overlap.
          direction = np.sign(pos[i][axis] - centre[axis]) or (1.0 if i % 2 else -1.0)
          pos[i][axis] += direction * (gap[axis] / 2 + 0.5)
          moved = True
      pos[i] = np.clip(pos[i], [frame.x0 + size[i][0] / 2, frame.y0 + size[i][1] / 2],
                       [frame.x1 - size[i][0] / 2, frame.y1 - size[i][1] / 2])
    if not moved:
      break
  inverse = ax.transData.inverted()
  for t, p in zip(texts, pos):
    t.set_position(inverse.transform(p))
  return texts


def plot_png(result: scoring.PoolScores, path: str):
  """Per metric: score vs ground truth (when given), else the score per candidate.

  With uncertainty: horizontal error bars are the score's interval, vertical ones the ground
  truth's seed noise (± z × its standard error over seeds, at the same confidence).
  """
  plt = _pyplot()
  k = len(result.metrics)
  cols = min(3, k)
  rows = int(math.ceil(k / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
  for ax in axes.flat[k:]:
    ax.axis("off")
  opts = result.uncertainty_options
  placements = []
  for ax, m in zip(axes.flat, result.metrics):
    vals = np.array([result.values[m][c] for c in result.candidates])
    u = result.uncertainty.get(m) if opts is not None else None
    xerr = None
    if u is not None and np.isfinite(u.ci_low).all():
      xerr = np.vstack([np.maximum(vals - u.ci_low, 0), np.maximum(u.ci_high - vals, 0)])
    if result.ground_truth is not None:
      truth = np.array([result.ground_truth[c] for c in result.candidates])
      yerr = None
      if opts is not None and result.ground_truth_sd:
        import scipy.stats  # pylint: disable=g-import-not-at-top
        z = scipy.stats.norm.ppf(0.5 + opts.confidence / 2)
        yerr = z * np.array([result.ground_truth_sd[c] for c in result.candidates])
      ax.errorbar(vals, truth, xerr=xerr, yerr=yerr, fmt="o", ms=3.5, lw=0.8, capsize=2,
                  color="C0", ecolor="C0", alpha=0.9)
      ev = result.evaluation[m]
      title = f"{m}: Spearman {_fmt(ev['spearman'], 2)}"
      if "spearman_ci_low" in ev:
        title += f" {_interval(ev['spearman_ci_low'], ev['spearman_ci_high'], 2)}"
      ax.set_title(title + f", w-τ {_fmt(ev['weighted_tau'], 2)}", fontsize=9)
      ax.set_xlabel(m + (" (lower = closer)" if not scoring.METRICS[m].higher_is_better else ""),
                    fontsize=8)
      ax.set_ylabel("ground truth", fontsize=8)
      # Room for the labels around the points.
      ax.margins(x=0.18, y=0.15)
      placements.append((ax, vals, truth))
    else:
      ax.barh(range(len(vals)), vals, xerr=xerr, capsize=2)
      ax.set_yticks(range(len(vals)), result.candidates, fontsize=6)
      ax.invert_yaxis()
      ax.set_title(m, fontsize=9)
    ax.tick_params(labelsize=7)
    # Scores such as GW can be ~1e-4: an offset exponent keeps the tick labels short.
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
  fig.tight_layout()
  for ax, vals, truth in placements:
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    place_labels(ax, vals, truth, result.candidates)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def similarity_heatmap(names: Sequence[str], matrix: np.ndarray, path: str,
                       title: str = "Linear CKA between the candidates (what Mordal clusters by)"
                       ) -> None:
  """A square similarity matrix as an annotated heat map."""
  plt = _pyplot()
  m = len(names)
  fig, ax = plt.subplots(figsize=(1.6 + 0.62 * m, 1.2 + 0.55 * m))
  image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
  for i in range(m):
    for j in range(m):
      ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
              color="white" if matrix[i, j] < 0.6 else "black")
  ax.set_xticks(range(m), names, rotation=45, ha="right", fontsize=6)
  ax.set_yticks(range(m), names, fontsize=6)
  ax.set_title(title, fontsize=8)
  fig.colorbar(image, ax=ax, fraction=0.046)
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


def _finite_or_null(value: Any) -> Any:
  """``value`` with every NaN or infinite float (NumPy's too) replaced by None, recursively."""
  if isinstance(value, Mapping):
    return {k: _finite_or_null(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_null(v) for v in value]
  if isinstance(value, (float, np.floating)) and not np.isfinite(value):
    return None
  return value


def write_outputs(result: scoring.PoolScores, output_dir: str, *, title: str,
                  preamble: str = "", run_info: Mapping[str, Any] | None = None,
                  extra: Mapping[str, str] | None = None,
                  figures: Mapping[str, Callable[[str], None]] | None = None) -> list[str]:
  """Writes the result files (and ``extra``: file name → text; ``figures``: file name → a
  function drawing it into a path) as one new ``output_dir``.

  The directory is replaced as a unit (``result_dir.replace``): a reader, or a run killed at any
  point, sees the previous result or this one, whole. ``output_dir`` may be local (made
  absolute) or any epath URI (``gs://bucket/run``, published file by file). Returns the paths.
  """
  payload = result.to_json()
  if run_info:
    payload["run"] = dict(run_info)

  def fill(staging: str) -> None:
    with open(os.path.join(staging, "scores.json"), "w") as f:
      # Standard JSON: an undefined value (GW's permutation p-value, a correlation with a
      # constant ground truth) is null, which every JSON reader takes; NaN is not JSON.
      json.dump(_finite_or_null(payload), f, indent=2, allow_nan=False)
      f.write("\n")
    with open(os.path.join(staging, "scores.csv"), "w") as f:
      f.write(scores_csv(result))
    with open(os.path.join(staging, "report.md"), "w") as f:
      f.write(report_markdown(result, title=title, preamble=preamble, run_info=run_info))
    plot_png(result, os.path.join(staging, "scores.png"))
    for name, text in (extra or {}).items():
      with open(os.path.join(staging, name), "w") as f:
        f.write(text)
    for name, draw in (figures or {}).items():
      draw(os.path.join(staging, name))

  return result_dir.replace(atomic.absolute(output_dir), fill)
