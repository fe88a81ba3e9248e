r"""``--method=mordal``: the Mordal search, replayed on recorded learning curves.

  python -m vlmsel_jax.select --method=mordal --curves=C.csv --vision_similarity=V.csv \
      --llm_similarity=L.csv --output=runs/mordal/mordal.json

Replay: ``C.csv`` has columns ``candidate,vision,llm,data_fraction,accuracy,cost`` — the accuracy
of ``candidate`` (built from encoder ``vision`` and LLM ``llm``) trained on that fraction of the
data and the cumulative cost of training it that far (fraction 1.0 is the full run). The
similarity files are square CKA matrices with a header row and a first column of names.
``--llm_similarity`` is one file (used for every vision cluster) or ``medoid=path`` entries, one
per vision medoid (the LLM CKA measured through that medoid's warm-up projector). The search
(``vlmsel_jax.selection.mordal.search``) sees only a ``train(candidate, fraction)`` callable that
looks the table up, so it pays only for what it trains; the JSON reports that cost next to
grid search's (every candidate to 1.0) and the weighted τ of its ranking against the fraction-1.0
accuracies.

Live mode (``--mordal_live``): the candidates are ``--mordal_candidates=vision|llm,...`` and
``train(candidate, fraction)`` runs ``vlmsel_jax.train``'s recipe (every flag of that binary
applies: ``--stage``, ``--data``, ``--workdir``, learning rate, LoRA, ...) for
``round(fraction · --max_steps)`` steps in ``<--workdir>/<candidate>``, continuing the
candidate's checkpoint, then measures held-out VQA accuracy on ``--eval_limit`` questions (see
``selection/mordal_live.py``). The similarity CSVs name the encoders and LLMs by the specs used in
``--mordal_candidates``. The JSON adds the recorded curves (``<stem>_curves.csv``), which replay
mode reads. Each training call prints a line as it finishes: the count of calls so far, the
candidate, fraction, accuracy, steps, and the search's cost so far against grid search's.
"""

from __future__ import annotations

import csv
import math
from typing import Any, Sequence

import numpy as np
from absl import flags

from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import parallel
from vlmsel_jax.training import flags as train_flags
from vlmsel_jax.selection import evaluate
from vlmsel_jax.selection import mordal
from vlmsel_jax.selection import mordal_live
from vlmsel_jax.training import progress as progress_lib

_D = mordal.MordalConfig()

CURVES = flags.DEFINE_list(
    "curves", [], "Replay table: CSV candidate,vision,llm,data_fraction,accuracy,cost "
    "(cumulative cost to reach that fraction; fraction 1.0 = the full run, needed for every "
    "candidate). Several comma-separated files are one pool (e.g. one grid per LLM).")
VISION_SIMILARITY = flags.DEFINE_string(
    "vision_similarity", None, "Square CKA matrix between vision encoders (CSV, header row and "
    "first column of names).")
LLM_SIMILARITY = flags.DEFINE_list(
    "llm_similarity", [], "CKA matrix between LLMs (same format): one path for every vision "
    "cluster, or medoid=path entries, one per vision medoid.")
VISION_THRESHOLD = flags.DEFINE_float("mordal_vision_threshold", _D.vision_threshold,
                                      "Agglomerative threshold on 1 − CKA for vision encoders.")
LLM_THRESHOLD = flags.DEFINE_float("mordal_llm_threshold", _D.llm_threshold,
                                   "Agglomerative threshold on 1 − CKA for LLMs.")
LINKAGE = flags.DEFINE_enum("mordal_linkage", _D.linkage, list(mordal.LINKAGES),
                            "Linkage of the agglomerative clustering (not stated by the paper).")
ETA = flags.DEFINE_integer("mordal_eta", _D.eta, "Successive-halving η: keep 1/η, budget ×η.",
                           lower_bound=2)
INITIAL_BUDGET = flags.DEFINE_float("mordal_initial_budget", _D.initial_budget,
                                    "Data fraction of the first successive-halving round.")
ROUNDS = flags.DEFINE_integer("mordal_rounds", _D.rounds,
                              "Maximum successive-halving rounds.", lower_bound=1)
TOP_CLUSTERS = flags.DEFINE_integer("mordal_top_clusters", _D.top_clusters,
                                    "Clusters kept for intra-cluster evaluation (K).",
                                    lower_bound=1)
FRACTIONS = flags.DEFINE_list("mordal_fractions", [repr(f) for f in _D.fractions],
                              "Data fractions of intra-cluster training, increasing, ending at 1.")
MIN_POINTS = flags.DEFINE_integer("mordal_min_points", _D.min_points,
                                  "Points before the scaling law is fitted.", lower_bound=2)
MARGIN = flags.DEFINE_float("mordal_early_stop_margin", _D.early_stop_margin,
                            "Stop a member when its extrapolation is below the leader's minus "
                            "this.")
MAX_ACCURACY = flags.DEFINE_float("mordal_max_accuracy", _D.max_accuracy,
                                  "Error = this − accuracy in the scaling law (1 for accuracy in "
                                  "[0, 1], 100 for percent).")

LIVE = flags.DEFINE_bool("mordal_live", False, "Train the candidates for real (the "
                         "vlmsel_jax.train flags give the recipe) instead of replaying --curves.")
LIVE_CANDIDATES = flags.DEFINE_list("mordal_candidates", [], "Live mode: vision|llm pairs.")

_CURVE_COLUMNS = ("candidate", "vision", "llm", "data_fraction", "accuracy", "cost")


def read_similarity(path: str) -> tuple[list[str], np.ndarray]:
  """A square matrix CSV (header row of names, first column of names) → (names, matrix)."""
  # score's vision_cka.csv and the LLM similarity tables may be in a bucket (gs://).
  if not atomic.isfile(path):
    raise mordal.MordalError(f"{path}: file not found")
  with atomic.open_text(path, newline="", encoding="utf-8") as f:
    rows = [r for r in csv.reader(f) if r]
  if len(rows) < 2:
    raise mordal.MordalError(f"{path}: needs a header row and at least one row of values")
  names = [c.strip() for c in rows[0][1:]]
  if len(set(names)) != len(names):
    raise mordal.MordalError(f"{path}: header names are not unique")
  if len(rows) - 1 != len(names):
    raise mordal.MordalError(f"{path}: {len(names)} columns of names but {len(rows) - 1} rows; "
                             "the matrix must be square")
  matrix = np.empty((len(names), len(names)))
  for i, row in enumerate(rows[1:]):
    line = i + 2
    if row[0].strip() != names[i]:
      raise mordal.MordalError(f"{path}:{line}: row name {row[0].strip()!r} but column {i + 1} "
                               f"is {names[i]!r}; rows and columns must list the same names in "
                               "the same order")
    if len(row) - 1 != len(names):
      raise mordal.MordalError(f"{path}:{line}: {len(row) - 1} values for {len(names)} columns")
    for j, cell in enumerate(row[1:]):
      matrix[i, j] = evaluate.parse_float(cell, f"{path}:{line}", f"similarity to {names[j]}",
                                          mordal.MordalError)
  return names, matrix


def read_curves(paths: str | Sequence[str]
                ) -> tuple[dict[tuple[str, str], str], dict[str, dict[float, tuple[float, float]]]]:
  """The replay table(s) → ((vision, llm) → candidate, candidate → fraction → (accuracy, cost)).

  Several files are one pool (e.g. one grid per LLM): a candidate name or a (vision, llm) pair may
  appear in only one of them.
  """
  paths = [paths] if isinstance(paths, str) else list(paths)
  if not paths:
    raise mordal.MordalError("no curves file given")
  pairs: dict[tuple[str, str], str] = {}
  of: dict[str, tuple[str, str]] = {}
  source: dict[str, str] = {}
  curves: dict[str, dict[float, tuple[float, float]]] = {}
  for path in paths:
    # groundtruth's curve tables may be in a bucket (gs://).
    if not atomic.isfile(path):
      raise mordal.MordalError(f"{path}: file not found")
    with atomic.open_text(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      fields = reader.fieldnames or []
      for column in _CURVE_COLUMNS:
        if column not in fields:
          raise mordal.MordalError(f"{path}: no '{column}' column (columns: "
                                   f"{', '.join(fields) or 'none'})")
      rows = 0
      for line, row in enumerate(reader, start=2):
        rows += 1
        where = f"{path}:{line}"
        cand, vision, llm = (row[c].strip() for c in ("candidate", "vision", "llm"))
        if not cand or not vision or not llm:
          raise mordal.MordalError(f"{where}: empty candidate, vision or llm name")
        if source.setdefault(cand, path) != path:
          raise mordal.MordalError(f"{where}: candidate {cand!r} is also in {source[cand]}; "
                                   "each candidate's curve must come from one file")
        if of.setdefault(cand, (vision, llm)) != (vision, llm):
          raise mordal.MordalError(f"{where}: candidate {cand!r} is ({vision}, {llm}) here but "
                                   f"{of[cand]} earlier")
        if pairs.setdefault((vision, llm), cand) != cand:
          raise mordal.MordalError(f"{where}: ({vision}, {llm}) is both "
                                   f"{pairs[(vision, llm)]!r} and {cand!r}")
        r = evaluate.parse_float(row["data_fraction"], where, "data_fraction", mordal.MordalError)
        if not 0.0 < r <= 1.0:
          raise mordal.MordalError(f"{where}: data_fraction {r:g} is not in (0, 1]")
        acc = evaluate.parse_float(row["accuracy"], where, "accuracy", mordal.MordalError)
        cost = evaluate.parse_float(row["cost"], where, "cost", mordal.MordalError)
        if cost < 0.0:
          raise mordal.MordalError(f"{where}: negative cost {cost:g}")
        per = curves.setdefault(cand, {})
        if any(math.isclose(r, q, rel_tol=1e-9) for q in per):
          raise mordal.MordalError(f"{where}: {cand!r} has fraction {r:g} twice")
        per[r] = (acc, cost)
      if not rows:
        raise mordal.MordalError(f"{path}: no rows")
  for cand, per in curves.items():
    path = source[cand]
    if not any(math.isclose(r, 1.0) for r in per):
      raise mordal.MordalError(f"{path}: {cand!r} has no data_fraction 1.0 row (the full run "
                               "every ranking is judged against)")
    ordered = sorted(per.items())
    for (r1, (_, c1)), (r2, (_, c2)) in zip(ordered, ordered[1:]):
      if c2 < c1:
        raise mordal.MordalError(f"{path}: {cand!r} costs {c2:g} to fraction {r2:g} but {c1:g} "
                                 f"to {r1:g}; costs must be cumulative")
  return pairs, curves


def table_trainer(curves: dict[str, dict[float, tuple[float, float]]], path: str) -> mordal.TrainFn:
  """``train(candidate, fraction)`` that looks the recorded (accuracy, cumulative cost) up."""

  def train(candidate: str, fraction: float) -> tuple[float, float]:
    for r, value in curves[candidate].items():
      if math.isclose(r, fraction, rel_tol=1e-9):
        return value
    raise mordal.MordalError(f"{path}: the search needs {candidate!r} at data_fraction "
                             f"{fraction:g}, which the table lacks (has "
                             f"{', '.join(f'{r:g}' for r in sorted(curves[candidate]))})")

  return train


def _config() -> mordal.MordalConfig:
  try:
    fractions = tuple(float(x) for x in FRACTIONS.value)
  except ValueError:
    raise mordal.MordalError(f"--mordal_fractions must be numbers, got {FRACTIONS.value}") from None
  return mordal.MordalConfig(
      vision_threshold=VISION_THRESHOLD.value, llm_threshold=LLM_THRESHOLD.value,
      linkage=LINKAGE.value, eta=ETA.value, initial_budget=INITIAL_BUDGET.value,
      rounds=ROUNDS.value, top_clusters=TOP_CLUSTERS.value, fractions=fractions,
      min_points=MIN_POINTS.value, early_stop_margin=MARGIN.value,
      max_accuracy=MAX_ACCURACY.value)


def replay(curves_paths: str | Sequence[str], vision_path: str, llm_specs: list[str],
           config: mordal.MordalConfig) -> dict[str, Any]:
  """Runs the search on the recorded curves (one file or several); returns the JSON payload."""
  curves_paths = [curves_paths] if isinstance(curves_paths, str) else list(curves_paths)
  pairs, curves = read_curves(curves_paths)
  vision_names, vision_sim = read_similarity(vision_path)
  llm = _llm_similarity(llm_specs)
  result = mordal.search(pairs, vision_names, vision_sim, llm,
                         table_trainer(curves, ", ".join(curves_paths)), config)
  full = {c: next(v for r, v in per.items() if math.isclose(r, 1.0)) for c, per in curves.items()}
  truth = {c: acc for c, (acc, _) in full.items()}
  grid_cost = float(sum(cost for _, cost in full.values()))
  best = max(truth, key=lambda c: truth[c])
  return {
      **mordal.result_fields(result, config, grid_cost),
      "weighted_tau": mordal.ranking_weighted_tau(result.ranking, truth),
      "top1_accuracy": truth[result.top1],
      "best": best,
      "best_accuracy": truth[best],
      "top1_regret": truth[best] - truth[result.top1],
      "candidates": len(truth),
      "truth": truth,
      "inputs": {"curves": curves_paths, "vision_similarity": vision_path,
                 "llm_similarity": list(llm_specs)},
  }


def markdown(p: dict[str, Any]) -> str:
  f = evaluate.fmt
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


def plot(p: dict[str, Any], path: str):
  """Every trained candidate's measured curve (accuracy vs data fraction, log x)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

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
  ax.set_title(f"Mordal: cost {evaluate.fmt(p['cost'])} vs grid {evaluate.fmt(p['grid_cost'])} "
               f"({evaluate.fmt(p['cost_ratio'], 2)}×), weighted τ "
               f"{evaluate.fmt(p['weighted_tau'], 2)}", fontsize=8)
  ax.tick_params(labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(method: str) -> dict:
  """Replays the search from the flags' tables and writes JSON + markdown + plot."""
  del method
  config = _config()
  if LIVE.value:
    return run_live(config)
  if not CURVES.value:
    raise mordal.MordalError("--curves is required (or --mordal_live to train the candidates)")
  if not VISION_SIMILARITY.value:
    raise mordal.MordalError("--vision_similarity is required")
  payload = replay(list(CURVES.value), VISION_SIMILARITY.value, list(LLM_SIMILARITY.value), config)
  evaluate.write_result_files(flags.FLAGS.output, payload, markdown(payload),
                              lambda path: plot(payload, path))
  return payload


def _llm_similarity(specs: list[str]) -> dict[str, tuple[list[str], np.ndarray]]:
  if not specs:
    raise mordal.MordalError("--llm_similarity is required")
  llm: dict[str, tuple[list[str], np.ndarray]] = {}
  for spec in specs:
    key, path = _llm_similarity_entry(spec.strip())
    if key in llm:
      raise mordal.MordalError(f"--llm_similarity gives {key!r} twice")
    llm[key] = read_similarity(path.strip())
  return llm


def _llm_similarity_entry(spec: str) -> tuple[str, str]:
  """``PATH`` → ("*", PATH); ``MEDOID=PATH`` → (MEDOID, PATH).

  Medoid names (``efficientnet-lite2@layer=-5``) and paths may both contain "=", so the entry is
  split where the right-hand side is an existing file.
  """
  splits = [(spec[:i], spec[i + 1:]) for i, ch in enumerate(spec)
            if ch == "=" and i > 0 and _isfile(spec[i + 1:])]
  if _isfile(spec):
    splits.append(("*", spec))
  if len(splits) == 1:
    return splits[0]
  if not splits:
    raise mordal.MordalError(f"--llm_similarity {spec!r}: no such file (give PATH or "
                             "MEDOID=PATH)")
  raise mordal.MordalError(f"--llm_similarity {spec!r} is ambiguous: it reads as "
                           + " or ".join(f"{k}={p}" if k != "*" else p for k, p in splits))


def _isfile(path: str) -> bool:
  """``atomic.isfile``, but False for what is no supported path at all: splitting
  ``a@layer=-5=gs://b/x.csv`` at each "=" also tries ``-5=gs://b/x.csv``, an unknown scheme."""
  try:
    return atomic.isfile(path)
  except ValueError:
    return False


def run_live(config: mordal.MordalConfig) -> dict:
  """Live mode: the search trains the candidates through the training loop."""
  candidates = mordal_live.parse_candidates(list(LIVE_CANDIDATES.value))
  if not candidates:
    raise mordal.MordalError("--mordal_live needs --mordal_candidates=vision|llm,...")
  if not VISION_SIMILARITY.value:
    raise mordal.MordalError("--vision_similarity is required")
  fv = flags.FLAGS
  # The training flags name one model pair; live mode swaps in each candidate's.
  (first_vision, first_llm), _ = next(iter(candidates.items()))
  fv.vision = fv.vision or first_vision
  fv.llm = fv.llm or first_llm
  base = train_flags.config_from_flags()
  # A line per train(candidate, fraction) call as it finishes; their number is the search's to
  # decide, so a count without a total.
  trainer = mordal_live.LiveTrainer(base, candidates, full_steps=base.max_steps,
                                    eval_limit=fv.eval_limit or None,
                                    eval_batch_size=fv.eval_batch_size,
                                    progress=progress_lib.Progress(enabled=parallel.is_primary()))
  vision_names, vision_sim = read_similarity(VISION_SIMILARITY.value)
  result = mordal.search(candidates, vision_names, vision_sim,
                         _llm_similarity(list(LLM_SIMILARITY.value)), trainer, config)
  payload = mordal_live.live_payload(result, trainer, config, {
      "candidates": list(LIVE_CANDIDATES.value), "vision_similarity": VISION_SIMILARITY.value,
      "llm_similarity": list(LLM_SIMILARITY.value), "workdir": base.workdir})
  evaluate.write_result_files(fv.output, payload, mordal_live.live_markdown(payload), None,
                              extra={"_curves.csv": trainer.curves_csv()})
  return payload
