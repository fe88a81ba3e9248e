"""What ``select`` writes: each method's result files, and the markdown reports among them.

Every method writes ``<output_dir>/<method>.json`` and, beside it under fixed names, its markdown
report ``<method>.md``, figures (``<method>.png``, ``<method>_scatter.png``, ...; drawn by
``selection/figures.py``) and tables (``<method>_scores.csv``, ...). ``write_result_files``
writes them all atomically, locally or to any epath URI (``gs://bucket/runs/x``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

from vlmsel_jax.runtime import atomic
from vlmsel_jax.selection import judge


def fmt(v: Any, digits: int = 3) -> str:
  """A number for a markdown table (NaN as "nan", tiny values in %g)."""
  if isinstance(v, float):
    if math.isnan(v):
      return "nan"
    return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
  return str(v)


def result_path(output_dir: str, name: str, suffix: str = ".json") -> str:
  """The path of one of a method's result files: ``<output_dir>/<name><suffix>``."""
  return os.path.join(output_dir, name + suffix)


def write_result_files(output_dir: str, name: str, payload: Mapping[str, Any],
                       markdown_text: str | None = None,
                       plot_fn: Callable[[str], None] | None = None,
                       extra: Mapping[str, str] | None = None,
                       plots: Mapping[str, Callable[[str], None]] | None = None) -> list[str]:
  """Writes ``<output_dir>/<name>.json`` and, beside it, ``<name>.md`` (given ``markdown_text``),
  ``<name>.png`` (given ``plot_fn``), each of ``plots`` (``<name><suffix>`` drawn by its
  function) and each ``extra`` file (``<name><suffix>`` → text).

  Everything is written into a local staging directory (beside the output when that is local)
  first and each file moved in atomically (``atomic.publish``), the way
  ``vlmsel_jax.scoring.report`` does; a run that dies before leaves no file. ``output_dir`` may be
  local or any epath URI (``gs://bucket/runs``). Returns the paths written.
  """
  output_dir = atomic.absolute(output_dir)
  output_json = result_path(output_dir, name)
  staging = atomic.staging_dir(output_json, f".{name}.tmp-")
  figures = dict(plots or {})
  if plot_fn is not None:
    figures[".png"] = plot_fn
  try:
    suffixes = [".json"]
    with open(os.path.join(staging, name + ".json"), "w", encoding="utf-8") as f:
      json.dump(payload, f, indent=2, allow_nan=True)
      f.write("\n")
    if markdown_text is not None:
      with open(os.path.join(staging, name + ".md"), "w", encoding="utf-8") as f:
        f.write(markdown_text)
      suffixes.append(".md")
    for suffix, draw in figures.items():
      draw(os.path.join(staging, name + suffix))
      suffixes.append(suffix)
    for suffix, text in (extra or {}).items():
      with open(os.path.join(staging, name + suffix), "w", encoding="utf-8") as f:
        f.write(text)
      suffixes.append(suffix)
    atomic.makedirs(output_dir)
    written = []
    for suffix in suffixes:
      dest = result_path(output_dir, name, suffix)
      atomic.publish(os.path.join(staging, name + suffix), dest)
      written.append(dest)
    return written
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _run_block(run_info: Mapping[str, Any]) -> list[str]:
  return ["", "## Run", "", "```"] + [f"{k} = {v}" for k, v in run_info.items()] + ["```"]


def judge_markdown(result: Mapping[str, Any], *,
                   title: str = "Selection methods against ground truth",
                   run_info: Mapping[str, Any] | None = None) -> str:
  """``judge.judge``'s result: the mean table and one table per task."""
  keys = result["metrics"]
  lines = [f"# {title}", "",
           "Each score is oriented so that larger = predicted better. R² is that of a "
           "least-squares line; NDCG@k uses the accuracy as gains; Recall@k = 1 if the truly best "
           "candidate is in the predicted top k; top-1 regret = best accuracy − accuracy of the "
           "predicted best. Candidates with equal scores are a tie, never ordered by name: the "
           "top-k metrics are averaged over every order of a tie (a constant score gets Recall@1 "
           "= 1/N for one best of N). Means are over the tasks where a metric is defined (a "
           "constant score has no correlation).", "",
           f"## Mean over {len(result['tasks'])} task(s): {', '.join(result['tasks'])}", "",
           "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name, m in result["methods"].items():
    lines.append(f"| {name} | " + " | ".join(fmt(m["mean"][k]) for k in keys) + " |")
  for t in result["tasks"]:
    lines += ["", f"## Task {t}", "", "| method | selects | " + " | ".join(keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for name, m in result["methods"].items():
      lines.append(f"| {name} | {judge.fmt_pick(m['selects'][t])} | " +
                   " | ".join(fmt(m["per_task"][t][k]) for k in keys) + " |")
    if "uncertainty" in result:
      lines += _judge_intervals(result, t)
  if run_info:
    lines += _run_block(run_info)
  return "\n".join(lines) + "\n"


def _judge_intervals(result: Mapping[str, Any], task: str) -> list[str]:
  """One task's correlations with their intervals and permutation p-values."""
  opts = result["uncertainty"]

  def interval(v: Mapping[str, Any], key: str) -> str:
    low, high = v.get(key + "_ci_low", math.nan), v.get(key + "_ci_high", math.nan)
    return f"[{fmt(low)}, {fmt(high)}]" if math.isfinite(low) and math.isfinite(high) else "–"

  lines = ["", f"{100 * opts['confidence']:g}% intervals (bootstrap over the candidates, "
           f"{opts['bootstrap']} resamples, seed {opts['seed']}; the accuracy redrawn within its "
           "seed noise where the table gives `_std`) and one-sided permutation p-values "
           f"({opts['permutations']} shuffles):", "",
           "| method | Pearson | Spearman | Kendall | weighted τ | top-1 regret |",
           "|---|---|---|---|---|---|"]
  for name, m in result["methods"].items():
    v = m["per_task"][task]
    cells = [f"{fmt(v[k])} {interval(v, k)} p {fmt(v.get(k + '_p_value', math.nan))}"
             for k in ("pearson", "spearman", "kendall", "weighted_tau")]
    cells.append(f"{fmt(v['top1_regret'])} {interval(v, 'top1_regret')}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def ac_policy_markdown(payload: Mapping[str, Any], targets: Sequence[str], k: int,
                       budget: int) -> str:
  """The AC policies side by side: Recall@k per target and its mean."""
  lines = [f"# AC policy replay: Recall@{k} at budget {budget}", "",
           f"Reference policy: `{payload['reference_policy']}` (region sampler + OLS, METHODS §4). "
           f"Trials: {payload['trials']}; trained settings ranked by "
           f"{payload['rank_trained']}.", "",
           "| policy | mean | " + " | ".join(targets) + " |",
           "|---|---|" + "---|" * len(targets)]
  for name, r in payload["policies"].items():
    lines.append(f"| {name} | {r['mean_recall_at_k']:.3f} | " +
                 " | ".join(f"{r['recall_at_k'][t]:.3f}" for t in targets) + " |")
  rnd = payload["random_recall_at_k"]
  lines.append(f"| random choice of {budget} (contains the best) | "
               f"{payload['mean_random_recall_at_k']:.3f} | " +
               " | ".join(f"{rnd[t]:.3f}" for t in targets) + " |")
  return "\n".join(lines) + "\n"


def mordal_markdown(p: Mapping[str, Any]) -> str:
  """A replayed Mordal search: its pick, cost, clusters, halving rounds and ranking."""
  f = fmt
  lines = [
      "# Mordal search (replay on recorded learning curves)", "",
      f"Curves: {', '.join(f'`{c}`' for c in p['inputs']['curves'])}. Cost counts only what "
      "the search trained, with "
      "checkpoint reuse (taking a candidate from fraction r1 to r2 costs cost(r2) − cost(r1)).",
      "", "| | value |", "|---|---|",
      f"| predicted best | **{p['top1']}** (accuracy {f(p['top1_accuracy'])}) |",
      f"| true best | {p['best']} ({f(p['best_accuracy'])}) |",
      f"| top-1 regret | {f(p['top1_regret'])} |",
      f"| weighted τ vs fraction-1.0 accuracy | {f(p['weighted_tau'])} |",
      f"| search cost | {f(p['cost'])} |",
      f"| grid-search cost | {f(p['grid_cost'])} |",
      f"| grid / search cost | **{f(p['cost_ratio'], 2)}×** |",
      f"| candidates trained (any fraction) | {p['trained_candidates']} of {p['candidates']} |",
      "", "## Clusters", "", "| cluster | vision | LLM | medoid | members |", "|---|---|---|---|---|"]
  for c in p["clusters"]:
    lines.append(f"| {c['id']} | {', '.join(c['vision'])} | {', '.join(c['llm'])} | "
                 f"{c['medoid']} | {len(c['members'])} |")
  lines += ["", "## Successive halving", ""]
  for rnd in p["halving_rounds"]:
    accs = ", ".join(f"{cid} {f(a)}" for cid, a in rnd["accuracy"].items())
    lines.append(f"- round {rnd['round']} at fraction {rnd['fraction']:g}: {accs}; kept "
                 f"{', '.join(rnd['kept'])}")
  lines += ["", f"Kept clusters: {', '.join(p['kept_clusters'])}.", "",
            "## Ranking", "", "| # | candidate | estimate | true accuracy | status |",
            "|---|---|---|---|---|"]
  for i, c in enumerate(p["ranking"]):
    est = p["estimates"].get(c)
    status = p["intra_status"].get(c, {}).get("status", "cluster eliminated by halving")
    lines.append(f"| {i + 1} | {c} | {f(est) if est is not None else '—'} | "
                 f"{f(p['truth'][c])} | {status} |")
  return "\n".join(lines) + "\n"


def mordal_live_markdown(p: Mapping[str, Any]) -> str:
  """A live Mordal search: its pick, cost in training steps and ranking."""
  lines = ["# Mordal search (live: real training runs)", "",
           f"Cost is training steps (a full run is {p['full_steps']} steps); checkpoints are "
           "continued, never restarted.", "", "| | value |", "|---|---|",
           f"| predicted best | **{p['top1']}** |",
           f"| search cost (steps) | {p['cost']:g} |",
           f"| grid-search cost (steps) | {p['grid_cost']:g} |",
           f"| grid / search cost | **{p['cost_ratio']:.2f}×** |",
           f"| candidates trained (any fraction) | {p['trained_candidates']} of "
           f"{p['candidates']} |", "", "## Ranking", "", "| # | candidate | estimate | measured |",
           "|---|---|---|---|"]
  for i, c in enumerate(p["ranking"]):
    est = p["estimates"].get(c)
    measured = ", ".join(f"{float(r):g}: {a:.3f}" for r, a in p["trained"].get(c, {}).items())
    lines.append(f"| {i + 1} | {c} | {'—' if est is None else f'{est:.3f}'} | {measured or '—'} |")
  return "\n".join(lines) + "\n"


def llm_similarity_markdown(p: Mapping[str, Any]) -> str:
  """Mordal's LLM similarity: one CKA table per vision medoid."""
  lines = ["# Mordal LLM similarity (linear CKA through warm-up projectors)", "",
           f"{p['images']} held-out images of `{p['data']}`; LLM hidden state {p['layer']} "
           f"averaged over the image tokens; warm-up: {p['warmup_steps']} stage-1 steps.", ""]
  for vision, entry in p["vision"].items():
    names = list(entry["warmup_workdirs"])
    lines += [f"## Through `{vision}` (tower layer {entry['vision_layer']})", "",
              "| | " + " | ".join(names) + " |",
              "|---" * (len(names) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
              for a, row in zip(names, entry["cka"])]
    lines.append("")
  return "\n".join(lines)


def dcd_markdown(p: Mapping[str, Any]) -> str:
  """DCD leave-one-task-out: the mean over targets and each target, DCD against uniform."""
  f = fmt
  keys = p["dcd"]["keys"]
  lines = ["# DCD: leave-one-task-out model ranking", "",
           "For each target task, the other tasks are sources; each model's predicted rank is the "
           "DCD-weighted mean of its ranks on the sources (uniform: equal weights, the ablation "
           "baseline). NDCG@k uses the true accuracy on the target as gains; overlap@k = "
           "|true top-k ∩ predicted top-k| / k.", "",
           f"Models: {', '.join(p['dcd']['models'])}. Tasks: {', '.join(p['dcd']['tasks'])}.", "",
           "## Mean over targets", "", "| weights | " + " | ".join(keys) + " |",
           "|---|" + "---|" * len(keys)]
  for name in ("dcd", "uniform"):
    lines.append(f"| {name} | " + " | ".join(f(p[name]["mean"][k]) for k in keys) + " |")
  lines += ["", "## Per target", "", "| target | weights | predicted ranking | " +
            " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
  for t in p["dcd"]["tasks"]:
    for name in ("dcd", "uniform"):
      e = p[name]["per_task"][t]
      lines.append(f"| {t} | {name} | {', '.join(e['ranking'])} | " +
                   " | ".join(f(e[k]) for k in keys) + " |")
  lines += _run_block(p["run"])
  return "\n".join(lines) + "\n"
