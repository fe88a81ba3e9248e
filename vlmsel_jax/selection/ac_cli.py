r"""``select --method=ac_law`` and ``--method=ac_policy``: the AC law and AC policy on a table.

  python -m vlmsel_jax.select --flagfile=configs/ac_law_example.flags
  python -m vlmsel_jax.select --method=ac_law --table=T.csv --a_column=A --c_column=C \
      --targets=mmbench,mme --groups='vision:mmbench,mme;ocr:textvqa' --output=out/law.json
  python -m vlmsel_jax.select --method=ac_policy --table=T.csv --a_column=A --c_column=C \
      --targets=mmbench,mme --budget=4 --k=3 --trials=1000 --seed=0 --output=out/policy.json

The table is a CSV with a header row, one row per vision setting; lines starting with ``#`` are
comments. ``--output`` (JSON) is written atomically; figures go beside it:

* ac_law: ``<stem>_scatter.png`` (A–C scatter per target, coloured by the target, with the
  fitted degree-2 surface as contours).
* ac_policy: ``<stem>_curve.png`` (Recall@k against the budget, one line per policy),
  ``<stem>_scatter.png``, and ``<stem>.md`` (the policies side by side).

The math is in ``vlmsel_jax.selection.ac``; this module reads flags and files.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Sequence

import numpy as np
from absl import flags
from tqdm import auto as tqdm

from vlmsel_jax.runtime import atomic
from vlmsel_jax.selection import ac

TABLE = flags.DEFINE_string("table", None, "CSV of vision settings: a header row, one row per "
                            "setting ('#' lines are comments).")
A_COLUMN = flags.DEFINE_string("a_column", "A", "Column of the A score.")
C_COLUMN = flags.DEFINE_string("c_column", "C", "Column of the C score.")
TARGETS = flags.DEFINE_list("targets", [], "Benchmark columns to fit / select for (default: "
                            "every numeric column but A, C and --name_column).")
NAME_COLUMN = flags.DEFINE_string("name_column", "setting", "Column naming the settings "
                                  "(optional; rows are numbered when it is absent).")
GROUPS = flags.DEFINE_string("groups", None, "Benchmark groups whose mean R² ac_law reports: "
                             "'name:col,col;name:col,...'.")
BUDGET = flags.DEFINE_integer("budget", 4, "ac_policy: settings fully trained (k' of METHODS "
                              "§4).", lower_bound=1)
TRIALS = flags.DEFINE_integer("trials", 1000, "ac_policy: random trials averaged.",
                              lower_bound=1)
CURVE_TRIALS = flags.DEFINE_integer("curve_trials", 200, "ac_policy: trials per budget of the "
                                    "Recall@k-vs-budget curve (0: no curve).", lower_bound=0)
SAMPLER = flags.DEFINE_list("sampler", list(ac.SAMPLERS), "ac_policy samplers, side by side: "
                            f"any of {', '.join(ac.SAMPLERS)} (region is the reference).")
FIT = flags.DEFINE_list("fit", list(ac.FITS), f"ac_policy fits: any of {', '.join(ac.FITS)} "
                        "(ols is the reference). Every sampler runs with every fit.")
RANK_TRAINED = flags.DEFINE_enum("rank_trained", "prediction", list(ac.RANK_TRAINED),
                                 "ac_policy: rank the trained settings by the fit's prediction "
                                 "or by their measured value.")
FIT_INPUTS = flags.DEFINE_enum("fit_inputs", "raw", list(ac.FIT_INPUTS),
                               "ac_policy OLS features: raw (A, C) or min-max normalised (ridge "
                               "and Bayesian always use normalised).")
RIDGE_ALPHA = flags.DEFINE_float("ridge_alpha", ac.RIDGE_ALPHA, "ac_policy: ridge penalty on "
                                 "normalised features.", lower_bound=0.0)
PROGRESS = flags.DEFINE_bool("ac_progress", True, "ac_policy: show a progress bar.")

FLAGS = flags.FLAGS


class TableError(ValueError):
  """A table the AC methods cannot use; the message names the file, column and line."""


# ---------------------------------------------------------------------------------------------
# Table.


def read_table(path: str, a_column: str, c_column: str, targets: Sequence[str],
               name_column: str | None = "setting") -> dict[str, Any]:
  """Reads the settings table; checks columns, numbers and duplicate settings.

  Returns:
    ``{"names": [...], "a": (n,), "c": (n,), "y": (n, T), "targets": [...]}``.

  Raises:
    TableError: a missing file or column, a non-numeric or empty cell (named by line), no
      targets, or two settings with the same name or the same (A, C).
  """
  # The table may be one the ground-truth binaries wrote to a bucket (gs://).
  if not atomic.isfile(path):
    raise TableError(f"{path}: no such file")
  with atomic.open_text(path, newline="", encoding="utf-8") as f:
    numbered = [(i + 1, line) for i, line in enumerate(f)
                if line.strip() and not line.lstrip().startswith("#")]
  if not numbered:
    raise TableError(f"{path}: empty table (no header row)")
  rows = list(csv.reader([line for _, line in numbered]))
  header = [h.strip() for h in rows[0]]
  line_of = [ln for ln, _ in numbered[1:]]
  body = rows[1:]
  if len(set(header)) != len(header):
    dup = sorted({h for h in header if header.count(h) > 1})
    raise TableError(f"{path}: duplicate column name(s) {', '.join(dup)}")
  has_names = bool(name_column) and name_column in header
  if not targets:
    targets = [h for h in header if h not in (a_column, c_column)
               and not (has_names and h == name_column)]
  needed = [a_column, c_column] + list(targets)
  missing = [col for col in needed if col not in header]
  if missing:
    raise TableError(f"{path}: missing column(s) {', '.join(missing)} (columns: "
                     f"{', '.join(header)})")
  if not targets:
    raise TableError(f"{path}: no target columns")
  for row, ln in zip(body, line_of):
    if len(row) != len(header):
      raise TableError(f"{path}:{ln}: {len(row)} fields, the header has {len(header)}")

  def column(name: str) -> np.ndarray:
    j = header.index(name)
    values = []
    for row, ln in zip(body, line_of):
      cell = row[j].strip()
      try:
        v = float(cell)
      except ValueError:
        v = math.nan
      if not math.isfinite(v):
        raise TableError(f"{path}:{ln}: column {name!r} holds {cell!r}, not a finite number")
      values.append(v)
    return np.asarray(values, np.float64)

  names = ([row[header.index(name_column)].strip() for row in body] if has_names
           else [f"row{ln}" for ln in line_of])
  seen: dict[str, int] = {}
  for name, ln in zip(names, line_of):
    if name in seen:
      raise TableError(f"{path}:{ln}: duplicate setting {name!r} (also on line {seen[name]})")
    seen[name] = ln
  a, c = column(a_column), column(c_column)
  y = np.stack([column(t) for t in targets], axis=1) if body else np.zeros((0, len(targets)))
  try:
    ac.check_settings(a, c, [f"{n} (line {ln})" for n, ln in zip(names, line_of)])
  except ac.ACError as e:
    raise TableError(f"{path}: {e}") from None
  return {"names": names, "a": a, "c": c, "y": y, "targets": list(targets)}


def parse_groups(spec: str | None, targets: Sequence[str]) -> dict[str, list[str]]:
  """``'name:col,col;name:col'`` → {name: [cols]}; every column must be a target."""
  if not spec:
    return {}
  groups: dict[str, list[str]] = {}
  for part in spec.split(";"):
    part = part.strip()
    if not part:
      continue
    name, sep, cols = part.partition(":")
    cols_list = [c.strip() for c in cols.split(",") if c.strip()]
    if not sep or not name.strip() or not cols_list:
      raise TableError(f"--groups: {part!r} is not 'name:col,col'")
    unknown = [c for c in cols_list if c not in targets]
    if unknown:
      raise TableError(f"--groups: group {name.strip()!r} names {', '.join(unknown)}, not among "
                       f"the targets ({', '.join(targets)})")
    groups[name.strip()] = cols_list
  return groups


# ---------------------------------------------------------------------------------------------
# Outputs.


def _write_json(path: str, payload: dict[str, Any]) -> None:
  atomic.write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_scatter(path: str, table: dict[str, Any], law: ac.LawFit) -> None:
  """Per target: settings in the A–C plane coloured by the target, fitted surface as contours."""
  plt = _pyplot()
  a, c, y = table["a"], table["c"], table["y"]
  t = len(table["targets"])
  cols = min(4, t)
  rows = math.ceil(t / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
  pad_a, pad_c = 0.05 * np.ptp(a), 0.05 * np.ptp(c)
  ga, gc = np.meshgrid(np.linspace(a.min() - pad_a, a.max() + pad_a, 80),
                       np.linspace(c.min() - pad_c, c.max() + pad_c, 80))
  x = ac.features(ga.ravel(), gc.ravel())
  coef = law.coefficients["AC_quad"]
  for j, ax in enumerate(axes.flat):
    if j >= t:
      ax.axis("off")
      continue
    surface = (coef[0, j] + x @ coef[1:, j]).reshape(ga.shape)
    levels = np.linspace(min(surface.min(), y[:, j].min()), max(surface.max(), y[:, j].max()), 12)
    ax.contourf(ga, gc, surface, levels=levels, cmap="viridis", alpha=0.35)
    ax.contour(ga, gc, surface, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
    sc = ax.scatter(a, c, c=y[:, j], cmap="viridis", vmin=levels[0], vmax=levels[-1],
                    edgecolors="k", linewidths=0.5, s=30)
    fig.colorbar(sc, ax=ax, fraction=0.046)
    ax.set_title(f"{table['targets'][j]}: AC R² {law.r2['AC_quad'][j]:.3f}", fontsize=9)
    ax.set_xlabel("A", fontsize=8)
    ax.set_ylabel("C", fontsize=8)
    ax.tick_params(labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_curve(path: str, budgets: Sequence[int], curves: dict[str, np.ndarray], k: int,
               reference: str) -> None:
  """Mean Recall@k (over targets) against the budget, one line per policy."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  styles = {"ols": "-", "ridge": "--", "bayesian": ":"}
  for i, (name, values) in enumerate(curves.items()):
    if name == "random_choice":
      ax.plot(budgets, values.mean(axis=1), color="grey", lw=1, label="random choice (contains "
              "best)")
      continue
    fit_name = name.split("+")[-1]
    ax.plot(budgets, values.mean(axis=1), styles.get(fit_name, "-"), color=f"C{i % 10}",
            lw=2.5 if name == reference else 1.3, marker="o", ms=3,
            label=name + (" (reference)" if name == reference else ""))
  ax.set_xlabel("budget (settings fully trained)")
  ax.set_ylabel(f"mean Recall@{k} over targets")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xticks(list(budgets))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Methods.


def _table_from_flags() -> dict[str, Any]:
  if TABLE.value is None:
    raise TableError("--table is required")
  return read_table(TABLE.value, A_COLUMN.value, C_COLUMN.value, TARGETS.value,
                    NAME_COLUMN.value)


def run_law(table: dict[str, Any], groups: dict[str, list[str]]) -> tuple[dict[str, Any],
                                                                          ac.LawFit]:
  targets = table["targets"]
  try:
    law = ac.fit_law(table["a"], table["c"], table["y"], targets)
  except ac.ACError as e:
    raise TableError(f"{TABLE.value}: {e}") from None
  r2 = law.r2["AC_quad"]
  payload: dict[str, Any] = {
      "r2": {t: float(v) for t, v in zip(targets, r2)},
      "mean_r2": float(r2.mean()),
      "coefficients": law.coefficient_dict("AC_quad"),
      "terms": list(ac.MODELS["AC_quad"]),
      "r2_by_model": {m: {t: float(v) for t, v in zip(targets, law.r2[m])} for m in ac.MODELS},
      "mean_r2_by_model": {m: float(law.r2[m].mean()) for m in ac.MODELS},
      "coefficients_by_model": {m: law.coefficient_dict(m) for m in ac.MODELS},
      "settings": len(table["names"]),
  }
  if groups:
    index = {t: j for j, t in enumerate(targets)}
    payload["groups"] = groups
    payload["mean_r2_by_group"] = {
        g: float(np.mean([r2[index[t]] for t in cols])) for g, cols in groups.items()}
    payload["mean_r2_by_group_by_model"] = {
        m: {g: float(np.mean([law.r2[m][index[t]] for t in cols])) for g, cols in groups.items()}
        for m in ac.MODELS}
  return payload, law


def _policy_table(payload: dict[str, Any], targets: Sequence[str], k: int, budget: int) -> str:
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


def run_policy(table: dict[str, Any], *, budget: int, k: int, trials: int, seed: int,
               samplers: Sequence[str], fits: Sequence[str], rank_trained: str,
               fit_inputs: str, ridge_alpha: float, curve_trials: int,
               progress: bool) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
  n = len(table["names"])
  bad = [s for s in samplers if s not in ac.SAMPLERS] + [f for f in fits if f not in ac.FITS]
  if bad:
    raise TableError(f"unknown sampler / fit {', '.join(bad)}: samplers are "
                     f"{', '.join(ac.SAMPLERS)}, fits {', '.join(ac.FITS)}")
  if not samplers or not fits:
    raise TableError("--sampler and --fit must name at least one each")
  if n < 2:
    raise TableError(f"{TABLE.value}: {n} setting(s); a policy needs at least 2")
  if budget >= n:
    raise TableError(f"--budget={budget} trains every one of the {n} settings; use fewer")
  if not 1 <= k < n:
    raise TableError(f"--k={k} must be at least 1 and below the {n} settings")
  policies = [ac.Policy(s, f) for s in samplers for f in fits]
  common = dict(k=k, seed=seed, fit_inputs=fit_inputs, rank_trained=rank_trained,
                ridge_alpha=ridge_alpha)
  with tqdm.tqdm(total=trials + (curve_trials if curve_trials else 0), desc="ac_policy",
                 unit="trial", disable=not progress) as bar:
    main = ac.replay(table["a"], table["c"], table["y"], policies, budgets=[budget],
                     trials=trials, progress=bar.update, **common)
    curves = None
    if curve_trials:
      curves = ac.replay(table["a"], table["c"], table["y"], policies,
                         budgets=list(range(1, n + 1)), trials=curve_trials,
                         progress=bar.update, **common)
  targets = table["targets"]
  per_policy = {}
  for p in policies:
    values = main[p.name][0]
    per_policy[p.name] = {
        "sampler": p.sampler, "fit": p.fit,
        "recall_at_k": {t: float(v) for t, v in zip(targets, values)},
        "mean_recall_at_k": float(values.mean())}
    if curves is not None:
      per_policy[p.name]["curve_mean_recall_at_k"] = [float(v) for v in curves[p.name].mean(1)]
  reference = ac.REFERENCE_POLICY if ac.REFERENCE_POLICY in per_policy else policies[0].name
  rnd = main["random_choice"][0]
  payload = {
      "recall_at_k": per_policy[reference]["recall_at_k"],
      "mean_recall_at_k": per_policy[reference]["mean_recall_at_k"],
      "random_recall_at_k": {t: float(v) for t, v in zip(targets, rnd)},
      "mean_random_recall_at_k": float(rnd.mean()),
      "reference_policy": reference,
      "policies": per_policy,
      "best_policy": max(per_policy, key=lambda name: per_policy[name]["mean_recall_at_k"]),
      "budget": budget, "k": k, "trials": trials, "seed": seed, "rank_trained": rank_trained,
      "fit_inputs": fit_inputs, "ridge_alpha": ridge_alpha, "settings": n,
  }
  if curves is not None:
    payload["curve"] = {"budgets": list(range(1, n + 1)), "trials": curve_trials,
                        "random_choice": [float(v) for v in curves["random_choice"].mean(1)]}
  return payload, curves


def run(method: str) -> dict[str, Any]:
  """Runs ``ac_law`` or ``ac_policy`` from the flags; writes ``--output`` and the figures.

  Raises:
    TableError / ac.ACError: a bad table or flag (both ValueErrors; ``select`` prints them as one
      line naming the file / column / line / flag, and exits with status 1). Nothing is written
      then.
  """
  output = FLAGS.output
  if not output.endswith(".json"):
    raise TableError(f"--output={output}: give a .json path (figures go beside it)")
  stem = os.path.splitext(output)[0]
  table = _table_from_flags()
  groups = parse_groups(GROUPS.value, table["targets"])
  if method == "ac_law":
    payload, law = run_law(table, groups)
    payload.update(table=TABLE.value, a_column=A_COLUMN.value, c_column=C_COLUMN.value,
                   targets=table["targets"], scatter_png=stem + "_scatter.png")
    atomic.write_atomic(stem + "_scatter.png", lambda tmp: plot_scatter(tmp, table, law))
    _write_json(output, payload)
    return payload
  if method == "ac_policy":
    payload, curves = run_policy(
        table, budget=BUDGET.value, k=FLAGS.k, trials=TRIALS.value, seed=FLAGS.seed,
        samplers=SAMPLER.value, fits=FIT.value, rank_trained=RANK_TRAINED.value,
        fit_inputs=FIT_INPUTS.value, ridge_alpha=RIDGE_ALPHA.value,
        curve_trials=CURVE_TRIALS.value, progress=PROGRESS.value)
    payload.update(table=TABLE.value, a_column=A_COLUMN.value, c_column=C_COLUMN.value,
                   targets=table["targets"], scatter_png=stem + "_scatter.png",
                   table_md=stem + ".md")
    if curves is not None:
      payload["curve_png"] = stem + "_curve.png"
      atomic.write_atomic(stem + "_curve.png", lambda tmp: plot_curve(
          tmp, payload["curve"]["budgets"], curves, FLAGS.k, payload["reference_policy"]))
    if len(table["names"]) > len(ac.MODELS["AC_quad"]):
      law = ac.fit_law(table["a"], table["c"], table["y"], table["targets"])
      atomic.write_atomic(stem + "_scatter.png", lambda tmp: plot_scatter(tmp, table, law))
    else:
      payload.pop("scatter_png")
    atomic.write_text_atomic(stem + ".md",
                             _policy_table(payload, table["targets"], FLAGS.k, BUDGET.value))
    _write_json(output, payload)
    return payload
  raise ValueError(f"ac_cli handles ac_law and ac_policy, not {method!r}")
