"""The figures ``select`` draws beside its results (PNG, matplotlib's Agg backend).

Each function draws one figure from a method's result (or its inputs) into ``path``, its last
argument; ``reports.write_result_files`` calls them with a staging path and moves the files in.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from vlmsel_jax.selection import ac
from vlmsel_jax.selection import reports


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def ac_scatter(table: Mapping[str, Any], law: ac.LawFit, path: str) -> None:
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


def ac_curve(budgets: Sequence[int], curves: Mapping[str, np.ndarray], k: int, reference: str,
             path: str) -> None:
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


def mordal_curves(p: Mapping[str, Any], path: str) -> None:
  """Every trained candidate's measured curve (accuracy vs data fraction, log x)."""
  plt = _pyplot()
  fmt = reports.fmt
  fig, ax = plt.subplots(figsize=(6, 4))
  for c, pts in p["trained"].items():
    r = [float(k) for k in pts]
    line, = ax.plot(r, list(pts.values()), marker="o", markersize=3, linewidth=1)
    ax.scatter([1.0], [p["truth"][c]], marker="x", color=line.get_color(), s=14)
    ext = p["intra_status"].get(c, {}).get("extrapolated")
    if ext is not None:
      ax.plot([r[-1], 1.0], [list(pts.values())[-1], ext], linestyle=":",
              color=line.get_color(), linewidth=1)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("data fraction", fontsize=8)
  ax.set_ylabel("accuracy (x: full run from the table)", fontsize=8)
  ax.set_title(f"Mordal: cost {fmt(p['cost'])} vs grid {fmt(p['grid_cost'])} "
               f"({fmt(p['cost_ratio'], 2)}×), weighted τ {fmt(p['weighted_tau'], 2)}",
               fontsize=8)
  ax.tick_params(labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def dcd_profiles(p: Mapping[str, Any], path: str) -> None:
  """Left: every model's conductance profile per task; right: NDCG@k per target, DCD vs uniform."""
  plt = _pyplot()
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
  profiles = p["profiles"]
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, m in enumerate(sorted(profiles)):
    for j, t in enumerate(sorted(profiles[m])):
      a1.plot(profiles[m][t], color=colors[i % len(colors)], alpha=0.7, linewidth=1,
              label=m if j == 0 else None)
  a1.set_yscale("log")
  a1.set_xlabel("block", fontsize=8)
  a1.set_ylabel("mean |conductance| (one line per task)", fontsize=8)
  a1.legend(fontsize=6)
  k = p["dcd"]["keys"][min(2, len(p["dcd"]["keys"]) - 1)]
  tasks = p["dcd"]["tasks"]
  x = np.arange(len(tasks))
  for off, name in ((-0.2, "dcd"), (0.2, "uniform")):
    a2.bar(x + off, [p[name]["per_task"][t][k] for t in tasks], 0.4, label=name)
  a2.set_xticks(x, tasks, rotation=30, ha="right", fontsize=7)
  a2.set_ylabel(k, fontsize=8)
  a2.legend(fontsize=7)
  for ax in (a1, a2):
    ax.tick_params(labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def judge_bars(result: Mapping[str, Any], path: str,
               shown: Sequence[str] = ("spearman", "weighted_tau", "ndcg@1", "ndcg@3", "ndcg@5")
               ) -> None:
  """Grouped bars: the mean over tasks of a few metrics, one group per method."""
  plt = _pyplot()
  shown = [k for k in shown if k in result["metrics"]]
  names = list(result["methods"])
  fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) * len(shown) / 3 + 2), 3.6))
  width = 0.8 / max(len(shown), 1)
  x = np.arange(len(names))
  for i, k in enumerate(shown):
    vals = [result["methods"][n]["mean"][k] for n in names]
    ax.bar(x + i * width - 0.4 + width / 2, np.nan_to_num(vals), width, label=k)
  ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
  ax.axhline(0.0, color="black", linewidth=0.5)
  ax.set_ylabel(f"mean over {len(result['tasks'])} task(s)", fontsize=8)
  ax.legend(fontsize=7, ncol=len(shown))
  ax.tick_params(labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
