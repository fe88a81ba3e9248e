r"""``--method=mordal``: the Mordal search, replayed on recorded learning curves or live.

  python -m vlmsel_jax.select --method=mordal --curves=C.csv --vision_similarity=V.csv \
      --llm_similarity=L.csv --output_dir=runs/mordal

Replay: ``C.csv`` has columns ``candidate,vision,llm,data_fraction,accuracy,cost`` — the accuracy
of ``candidate`` (built from encoder ``vision`` and LLM ``llm``) trained on that fraction of the
data and the cumulative cost of training it that far (fraction 1.0 is the full run). The
similarity files are square CKA matrices with a header row and a first column of names.
``--llm_similarity`` is one file (used for every vision cluster) or ``medoid=path`` entries, one
per vision medoid (the LLM CKA measured through that medoid's warm-up projector). The search
(``selection/mordal_replay.py``) sees only a ``train(candidate, fraction)`` callable that looks
the table up, so it pays only for what it trains; ``mordal.json`` reports that cost next to grid
search's (every candidate to 1.0) and the weighted τ of its ranking against the fraction-1.0
accuracies, with ``mordal.md`` and ``mordal.png`` beside it in ``--output_dir``.

Live mode (``--mordal_live``): the candidates are every encoder of ``--vision_models`` with every
LLM of ``--llm_models``, and ``train(candidate, fraction)`` runs ``vlmsel_jax.train``'s recipe
(every flag of that binary applies: ``--stage``, ``--data``, learning rate, LoRA, ...) for
``round(fraction · --max_steps)`` steps in ``<--output_dir>/runs/<candidate>``, continuing the
candidate's checkpoint, then measures held-out VQA accuracy on
``--eval_limit`` questions (see ``selection/mordal_live.py``). The similarity CSVs name the
encoders and LLMs by the specs given in ``--vision_models`` / ``--llm_models``. Besides the JSON,
markdown and plot it writes the recorded curves (``mordal_curves.csv``), which replay mode reads.
Each training call prints a line as it finishes: the count of calls so far, the candidate,
fraction, accuracy, steps, and the search's cost so far against grid search's.
"""

from __future__ import annotations

import os

from absl import flags

from vlmsel_jax import zoo
from vlmsel_jax.runtime import flag_util
from vlmsel_jax.runtime import parallel
from vlmsel_jax.selection import figures
from vlmsel_jax.selection import mordal
from vlmsel_jax.selection import mordal_live
from vlmsel_jax.selection import mordal_replay
from vlmsel_jax.selection import reports
from vlmsel_jax.training import flags as train_flags
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
VISION_MODELS = flag_util.shared(
    flags.DEFINE_list, "vision_models", [], "Vision encoders (zoo names, local paths or Hub ids, "
    "optionally with a variant): dcd ranks them; mordal --mordal_live pairs each with every "
    "--llm_models; mordal_llm_similarity compares the LLMs through each.")
LLM_MODELS = flag_util.shared(
    flags.DEFINE_list, "llm_models", [], "LLMs (zoo names, local paths, .gguf files or Hub ids): "
    "mordal --mordal_live pairs each with every --vision_models; mordal_llm_similarity compares "
    "them (two or more).")



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


def run(method: str) -> dict:
  """Replays (or, with ``--mordal_live``, runs) the search; writes JSON + markdown + plot."""
  config = _config()
  if LIVE.value:
    return run_live(method, config)
  if not CURVES.value:
    raise mordal.MordalError("--curves is required (or --mordal_live to train the candidates)")
  payload = mordal_replay.replay(list(CURVES.value), VISION_SIMILARITY.value,
                                 list(LLM_SIMILARITY.value), config)
  reports.write_result_files(flags.FLAGS.output_dir, method, payload,
                             reports.mordal_markdown(payload),
                             lambda path: figures.mordal_curves(payload, path))
  return payload


def run_live(method: str, config: mordal.MordalConfig) -> dict:
  """Live mode: the search trains the candidates through the training loop."""
  fv = flags.FLAGS
  candidates = mordal_live.candidate_grid(VISION_MODELS.value, LLM_MODELS.value)
  # The recipe, as a run of the first models (the tower without its variant, so that the recipe's
  # layer is --vision_layer); each candidate's run replaces the models, layer and directory.
  (vision, llm), _ = next(iter(candidates.items()))
  base = train_flags.config_from_flags(vision=zoo.base_spec(vision), llm=llm,
                                       output_dir=os.path.join(fv.output_dir, "runs"))
  # A line per train(candidate, fraction) call as it finishes; their number is the search's to
  # decide, so a count without a total.
  payload, curves_csv = mordal_live.search_live(
      base, candidates, VISION_SIMILARITY.value, list(LLM_SIMILARITY.value), config,
      eval_limit=fv.eval_limit or None, eval_batch_size=fv.eval_batch_size,
      progress=progress_lib.Progress(enabled=parallel.is_primary()))
  reports.write_result_files(fv.output_dir, method, payload,
                             reports.mordal_live_markdown(payload),
                             extra={"_curves.csv": curves_csv})
  return payload
