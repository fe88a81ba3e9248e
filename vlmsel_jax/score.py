r"""Scores candidate encoders against an LLM's text features, without training.

  python -m vlmsel_jax.score --flagfile=configs/demo.flags
  python -m vlmsel_jax.score --candidates=a.safetensors,b.npz --text=llm.safetensors \
      --metrics=gw,cka --ground_truth=accuracy.csv --output_dir=runs/score
  python -m vlmsel_jax.score --vision_models=/models/clip-vit-b32,/models/dinov2-small \
      --text_model=smollm2-135m --data_dir=data/pairs --cache_dir=banks --output_dir=runs/score

Writes scores.csv, scores.json, report.md and scores.png into --output_dir (atomically), and
vision_cka.csv: the candidates' linear CKA with one another, the vision similarity Mordal
clusters by (``vlmsel_jax.select --method=mordal --vision_similarity``). --output_dir and
--cache_dir (and --ground_truth) may be bucket paths (``gs://bucket/run``: any ``etils.epath``
URI; see ``vlmsel_jax.runtime.atomic``).

On several hosts (a TPU pod slice, or --coordinator_address/--num_processes/--process_id),
every process runs the same command: GW candidates are sharded over the devices of all hosts,
each process solves its own, results are gathered, and only process 0 writes --output_dir.
"""

from __future__ import annotations

import csv
import sys
import time

from absl import app
from absl import flags

from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import flag_util
from vlmsel_jax.features import flags as data_flags
from vlmsel_jax.features import feature_bank
from vlmsel_jax.runtime import parallel
from vlmsel_jax.scoring import report
from vlmsel_jax.runtime import flags as runtime_flags
from vlmsel_jax.scoring import pool as scoring
from vlmsel_jax.scoring import synthetic
from vlmsel_jax.scores import checks
from vlmsel_jax.scores import cka
from vlmsel_jax.scores import distances
from vlmsel_jax.scores import gw

# Flag defaults are the options records' defaults (gw.options_from_flags maps the flags back).
_ANNEALED, _ENTROPIC, _CG, _LOWRANK = (gw.AnnealedOptions(), gw.EntropicOptions(),
                                       gw.CGOptions(), gw.LowRankOptions())

CANDIDATES = flags.DEFINE_list(
    "candidates", [], "Candidate feature banks (.safetensors or .npz with 'features' n×d and "
    "'ids'), one per candidate encoder.")
CANDIDATE_NAMES = flags.DEFINE_list(
    "candidate_names", [], "Names for --candidates (default: the bank's 'name' metadata, else "
    "its file name).")
TEXT = flags.DEFINE_string("text", None, "The text feature bank (the LLM's features of the "
                           "paired captions); rows are paired with the candidates' by 'ids'.")
SYNTHETIC_POOL = flags.DEFINE_bool(
    "synthetic_pool", False, "Score the built-in synthetic pool (vlmsel_jax.scoring.synthetic) instead "
    "of feature banks: candidates with graded damage to a shared latent, so the right ranking is "
    "known and is used as ground truth.")
SYNTHETIC_N = flags.DEFINE_integer("synthetic_n", 500, "Samples in the synthetic pool.",
                                   lower_bound=4)
METRICS = flags.DEFINE_list("metrics", list(scoring.DEFAULT_METRICS),
                            f"Scores to compute; any of: {', '.join(scoring.METRICS)}.")
DISTANCE = flags.DEFINE_enum("distance", "angular", list(distances.DISTANCES),
                             "Intra-space distance for GW and RSA.")
SCALE = flags.DEFINE_enum("scale", "median", list(distances.SCALES),
                          "Scale alignment of the candidate's distances to the text's (GW).")
GW_SOLVER = flags.DEFINE_enum("gw_solver", _ANNEALED.solver, list(gw.SOLVERS),
                              "GW solver (see vlmsel_jax/scores/gw.py).")
GW_EPSILON = flags.DEFINE_float("gw_epsilon", _ENTROPIC.epsilon,
                                "Entropic ε of the entropic and lowrank solvers, relative to "
                                "unit median distance.", lower_bound=0.0)
GW_ANNEAL_EPSILONS = flags.DEFINE_list(
    "gw_anneal_epsilons", [str(e) for e in _ANNEALED.epsilons],
    "ε schedule of the annealed solver, largest first.")
GW_ANNEAL_ITERATIONS = flags.DEFINE_integer("gw_anneal_iterations", _ANNEALED.stage_iterations,
                                            "Outer GW iterations of each annealing stage but the last.",
                                            lower_bound=1)
GW_SINKHORN_ITERATIONS = flags.DEFINE_integer(
    "gw_sinkhorn_iterations", _ENTROPIC.sinkhorn_iterations,
    "Maximum Sinkhorn iterations per linearized problem of the entropic solver.", lower_bound=1)
GW_ANNEAL_SINKHORN_ITERATIONS = flags.DEFINE_integer(
    "gw_anneal_sinkhorn_iterations", _ANNEALED.sinkhorn_iterations,
    "Sinkhorn iterations per linearized problem of the annealed solver (warm-started; its "
    "coupling only seeds the CG polish).", lower_bound=1)
GW_ITERATIONS = flags.DEFINE_integer("gw_iterations", _ANNEALED.gw_iterations,
                                     "Maximum outer iterations of the entropic solver and of the last annealing stage.",
                                     lower_bound=1)
GW_CG_ITERATIONS = flags.DEFINE_integer("gw_cg_iterations", _CG.iterations,
                                        "Maximum conditional-gradient iterations.", lower_bound=1)
GW_CG_TOL = flags.DEFINE_float("gw_cg_tol", None,
                               "Relative objective decrease below which CG stops (default: "
                               "1e-9 in float64 as POT, 1e-6 in float32).", lower_bound=0.0)
GW_POLISH = flags.DEFINE_bool("gw_polish", _ANNEALED.polish,
                              "CG polish after the entropic / annealed solvers.")
GW_RANK = flags.DEFINE_integer("gw_rank", _LOWRANK.rank, "Coupling rank of the lowrank "
                               "solver.", lower_bound=1)
GW_LOWRANK_ITERATIONS = flags.DEFINE_integer(
    "gw_lowrank_iterations", _LOWRANK.iterations,
    "Maximum outer iterations of the lowrank solver.", lower_bound=1)
GW_LOWRANK_GAMMA = flags.DEFINE_float("gw_lowrank_gamma", _LOWRANK.gamma,
                                      "Mirror-descent step of the lowrank solver.",
                                      lower_bound=0.0)
GW_PRECISION = flags.DEFINE_enum("gw_precision", _ANNEALED.precision, list(gw.PRECISIONS),
                                 "GW arithmetic: auto = float64 for cg, float32 otherwise.")
# The flags gw.options_from_flags maps to the solver's options record.
_GW_FLAGS = (GW_EPSILON, GW_ANNEAL_EPSILONS, GW_ANNEAL_ITERATIONS, GW_SINKHORN_ITERATIONS,
             GW_ANNEAL_SINKHORN_ITERATIONS, GW_ITERATIONS, GW_CG_ITERATIONS, GW_CG_TOL, GW_POLISH,
             GW_RANK, GW_LOWRANK_ITERATIONS, GW_LOWRANK_GAMMA, GW_PRECISION)
GW_BATCH_SIZE = flags.DEFINE_integer(
    "gw_batch_size", 0, "Candidates per batched (vmapped, device-sharded) GW call; 0 = the "
    "number of devices.", lower_bound=0)
GW_BATCH_MODE = flags.DEFINE_enum(
    "gw_batch_mode", "auto", list(gw.BATCH_MODES), "How a batched GW call runs its candidates on "
    "each device: vmap (lockstep, for accelerators), map (one after another), auto (map on CPU, "
    "vmap elsewhere).")
RBF_SIGMA = flags.DEFINE_float("rbf_sigma", 0.5, "RBF CKA bandwidth: sigma² × median squared "
                               "distance.", lower_bound=0.0)
KNN_K = flags.DEFINE_integer("knn_k", 10, "k of mutual k-NN alignment.", lower_bound=1)
CCA_PCA_VARIANCE = flags.DEFINE_float("cca_pca_variance", 0.99, "Variance kept by the PCA "
                                      "before CCA.", lower_bound=0.0, upper_bound=1.0)
SVCCA_KEEP = flags.DEFINE_float("svcca_keep", 0.99, "Variance kept by SVCCA's SVD step.",
                                lower_bound=0.0, upper_bound=1.0)
MINIBATCH_SIZE = flags.DEFINE_integer("minibatch_size", 256, "Batch size of minibatch CKA.",
                                      lower_bound=4)
SEED = flag_util.shared(flags.DEFINE_integer, "seed", 0, "Seed of every random choice "
                        "(scoring: synthetic pool, minibatch order).")
GROUND_TRUTH = flags.DEFINE_string(
    "ground_truth", None, "CSV with columns 'candidate' and --ground_truth_column (e.g. trained "
    "VLM accuracy); adds the table of every score's agreement with it.")
GROUND_TRUTH_COLUMN = flags.DEFINE_string("ground_truth_column", "accuracy",
                                          "Column of --ground_truth holding the accuracy.")
OUTPUT_DIR = flag_util.shared(flags.DEFINE_string, "output_dir", None, "Where results are "
                              "written.")
PROGRESS = flag_util.shared(flags.DEFINE_bool, "progress", True, "Show a progress bar.")
VISION_MODELS = flags.DEFINE_list(
    "vision_models", [], "Candidate encoders as model specs (zoo names, local Hugging Face "
    "directories or Hub ids such as openai/clip-vit-base-patch16) instead of --candidates: their banks are extracted into --cache_dir first "
    "(or reused when up to date), with the default layer and pooling of vlmsel_jax.extract.")
TEXT_MODEL = flags.DEFINE_string(
    "text_model", None, "The LLM as a model spec (zoo name, Hugging Face directory, .gguf "
    "file or Hub id such as Qwen/Qwen2.5-0.5B-Instruct) instead of --text; goes with --vision_models.")
CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Where the banks extracted for "
                                "--vision_models / --text_model (and their C scores) are kept "
                                "and reused.")
C_SCORE_PAIRS = flags.DEFINE_string(
    "c_score_pairs", None, "Also compute the C score (keypoint-correspondence PCK@0.10) of every "
    "--vision_models candidate on these pairs: homography (warps of the bundled photos), stereo, "
    "or spair:<root>. Each candidate is read at its variant's layer, else the second-to-last.")
C_SCORE_IMAGES = flags.DEFINE_list("c_score_images", ["astronaut", "coffee", "chelsea", "rocket"],
                                   "Photos warped for --c_score_pairs=homography.")
C_SCORE_PAIRS_PER_IMAGE = flags.DEFINE_integer("c_score_pairs_per_image", 5, "Homographies per "
                                               "photo.", lower_bound=1)
C_SCORE_KEYPOINTS = flags.DEFINE_integer("c_score_keypoints", 50, "Keypoints per synthetic pair.",
                                         lower_bound=1)
GROUND_TRUTH_SCORES = flags.DEFINE_list(
    "ground_truth_scores", [], "Columns of --ground_truth that hold scores measured with the "
    "ground truth and judged like the others (a_score: the A score of the stage-1 projectors the "
    "ground-truth runs trained); higher is better.")


class InputError(ValueError):
  """A bad flag value or input file; reported as one line."""


def read_ground_truth(path: str, column: str) -> dict[str, float]:
  # The groundtruth binary may have written it to a bucket: read through atomic.
  if not atomic.exists(path):
    raise InputError(f"{path}: ground-truth file not found")
  with atomic.open_text(path, newline="") as f:
    reader = csv.DictReader(f)
    fields = reader.fieldnames or []
    for needed in ("candidate", column):
      if needed not in fields:
        raise InputError(f"{path}: no '{needed}' column (columns: {', '.join(fields) or 'none'})")
    truth: dict[str, float] = {}
    for line, row in enumerate(reader, start=2):
      name = row["candidate"]
      if name in truth:
        raise InputError(f"{path}:{line}: candidate {name!r} appears twice")
      try:
        truth[name] = float(row[column])
      except (TypeError, ValueError):
        raise InputError(f"{path}:{line}: {column} {row[column]!r} is not a number") from None
  return truth


def _settings() -> scoring.ScoreSettings:
  try:
    opts = gw.options_from_flags(GW_SOLVER.value, **{f.name: f.value for f in _GW_FLAGS})
  except ValueError as e:
    raise InputError(f"bad GW flag: {e}") from None
  return scoring.ScoreSettings(
      distance=DISTANCE.value, scale=SCALE.value, gw_options=opts,
      gw_batch_size=GW_BATCH_SIZE.value, gw_batch_mode=GW_BATCH_MODE.value, rbf_sigma=RBF_SIGMA.value, knn_k=KNN_K.value,
      cca_pca_variance=CCA_PCA_VARIANCE.value, svcca_keep=SVCCA_KEEP.value,
      minibatch_size=MINIBATCH_SIZE.value, seed=SEED.value)


SYNTHETIC_PREAMBLE = """\
**This is the synthetic demo pool, not real models.** One shared latent (a mixture of classes)
stands for image content; the "text features" are a fixed non-linear view of it; each candidate
sees the latent through a distance-preserving embedding after a graded amount of damage
(Gaussian noise, latent dimensions replaced by noise, smooth non-linear warps, or nothing of the
latent at all). The candidates are listed from least to most damaged and the ground truth is
that order (quality = how many candidates it beats: 11 for the best, 0 for the worst), so each
score's correlation below says how well it recovers an answer known in advance."""


def _extract_banks() -> tuple[list[str], str]:
  """Extracts (or finds cached) the banks of --vision_models and --text_model; their paths."""
  from vlmsel_jax.features import extraction  # pylint: disable=g-import-not-at-top
  from vlmsel_jax import zoo  # pylint: disable=g-import-not-at-top
  if CANDIDATES.value or TEXT.value:
    raise InputError("--vision_models/--text_model extract their own banks; drop "
                     "--candidates/--text")
  if not VISION_MODELS.value or not TEXT_MODEL.value:
    raise InputError("--vision_models and --text_model go together")
  if not CACHE_DIR.value:
    raise InputError("--cache_dir is required with --vision_models")
  vision_specs = zoo.candidate_list(VISION_MODELS.value)
  # Kinds are checked before anything is extracted.
  for flag, specs, kind in ((VISION_MODELS, vision_specs, "vision"),
                            (TEXT_MODEL, [TEXT_MODEL.value], "text")):
    for spec in specs:
      resolved = zoo.resolve(spec)
      if resolved.kind != kind:
        raise InputError(f"--{flag.name}: {spec} is a {resolved.kind} model")
  dataset = data_flags.paired_dataset()
  results = extraction.extract(
      vision_specs + [TEXT_MODEL.value], None if dataset else data_flags.DATA_DIR.value,
      CACHE_DIR.value, captions=data_flags.CAPTIONS.value, dataset=dataset,
      options=extraction.ExtractOptions(progress=PROGRESS.value, seed=SEED.value,
                                        max_samples=data_flags.MAX_SAMPLES.value or None))
  return [r.path for r in results[:-1]], results[-1].path


def _c_scores(names: list[str]) -> dict[str, float]:
  """The C score of every --vision_models candidate (cached beside the banks)."""
  from vlmsel_jax import correspondence_score  # pylint: disable=g-import-not-at-top
  from vlmsel_jax import zoo  # pylint: disable=g-import-not-at-top
  if not VISION_MODELS.value:
    raise InputError("--c_score_pairs needs the models themselves: give --vision_models")
  results = correspondence_score.cached_c_scores(
      zoo.candidate_list(VISION_MODELS.value), CACHE_DIR.value, pairs=C_SCORE_PAIRS.value,
      progress=PROGRESS.value, seed=SEED.value, homography_images=tuple(C_SCORE_IMAGES.value),
      pairs_per_image=C_SCORE_PAIRS_PER_IMAGE.value, num_keypoints=C_SCORE_KEYPOINTS.value)
  missing = [n for n in names if n not in results]
  if missing:  # Bank names are model names unless --candidate_names renamed them.
    raise InputError(f"no C score for {', '.join(missing)}; --c_score_pairs keeps the model "
                     "names (drop --candidate_names)")
  return {n: results[n]["c_score"] for n in names}


def read_score_columns(path: str, columns: list[str], names: list[str]) -> dict[str, dict]:
  """``{column: {candidate: value}}`` of --ground_truth_scores, for every candidate."""
  import math  # pylint: disable=g-import-not-at-top
  unknown = [c for c in columns if c not in scoring.PRECOMPUTED]
  if unknown:
    raise InputError(f"--ground_truth_scores: {', '.join(unknown)} is not a score this binary "
                     f"judges (known: {', '.join(scoring.PRECOMPUTED)})")
  out = {}
  for column in columns:
    values = read_ground_truth(path, column)
    missing = [n for n in names if n not in values or not math.isfinite(values[n])]
    if missing:
      raise InputError(f"{path}: no finite {column} for candidate(s) {', '.join(missing)}")
    out[column] = {n: values[n] for n in names}
  return out


def _load_inputs():
  """Returns (names, candidate features, text features, ground truth or None, preamble)."""
  if SYNTHETIC_POOL.value:
    if CANDIDATES.value or TEXT.value or VISION_MODELS.value or TEXT_MODEL.value:
      raise InputError("--synthetic_pool scores the built-in pool; drop --candidates/--text "
                       "(and --vision_models/--text_model)")
    pool = synthetic.make_pool(n=SYNTHETIC_N.value, seed=SEED.value)
    truth = dict(zip(pool.names, pool.quality.tolist()))
    return pool.names, pool.candidates, pool.text, truth, SYNTHETIC_PREAMBLE
  candidate_paths, text_path = CANDIDATES.value, TEXT.value
  if VISION_MODELS.value or TEXT_MODEL.value:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() > 1:
      raise InputError("--vision_models/--text_model work on one process only (process 0 "
                       "alone writes the banks, and every host must read them); run "
                       "vlmsel_jax.extract first (on one host or all), give every host the "
                       "banks, and pass --candidates/--text")
    candidate_paths, text_path = _extract_banks()
  if not candidate_paths:
    raise InputError("no candidates: pass --candidates=bank1,bank2,... (or --vision_models, "
                     "or --synthetic_pool)")
  if not text_path:
    raise InputError("no text features: pass --text=bank (the LLM's caption features)")
  if CANDIDATE_NAMES.value and len(CANDIDATE_NAMES.value) != len(candidate_paths):
    raise InputError(f"--candidate_names has {len(CANDIDATE_NAMES.value)} names for "
                     f"{len(candidate_paths)} candidates")
  text = feature_bank.load_bank(text_path)
  names, feats = [], []
  for i, path in enumerate(candidate_paths):
    bank = feature_bank.load_bank(path)
    names.append(CANDIDATE_NAMES.value[i] if CANDIDATE_NAMES.value else bank.name)
    feats.append(feature_bank.align_to(bank, text.ids, text.path))
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise InputError(f"candidate names are not unique ({', '.join(dupes)}); set --candidate_names")
  # Name the file in feature errors: validate here, where the path is known.
  try:
    checks.check_features(text.features, text_path)
  except checks.FeatureError as e:
    raise InputError(str(e)) from None
  for path, x in zip(candidate_paths, feats):
    try:
      checks.check_features(x, path)
    except checks.FeatureError as e:
      raise InputError(str(e)) from None
  truth = read_ground_truth(GROUND_TRUTH.value, GROUND_TRUTH_COLUMN.value) if GROUND_TRUTH.value else None
  return names, feats, text.features, truth, _preamble(text, names)


def _preamble(text: feature_bank.FeatureBank, names: list[str]) -> str:
  """What was scored: the models, the data, and where the ground truth came from."""
  if not VISION_MODELS.value:
    return ""
  lines = [f"{len(names)} vision candidates against the text features of `{TEXT_MODEL.value}` "
           f"on {text.features.shape[0]} image–caption pairs of {data_flags.describe()}."]
  if C_SCORE_PAIRS.value:
    lines.append(f"C score on `{C_SCORE_PAIRS.value}` keypoint pairs.")
  if GROUND_TRUTH.value:
    lines.append(f"Ground truth: column `{GROUND_TRUTH_COLUMN.value}` of `{GROUND_TRUTH.value}` "
                 "(trained VLMs; see that file's command, seed and date columns).")
    spread = _ground_truth_spread(GROUND_TRUTH.value, GROUND_TRUTH_COLUMN.value + "_std")
    if spread:
      lines.append(spread)
  return " ".join(lines)


def _ground_truth_spread(path: str, column: str) -> str:
  """A sentence on the ground truth's seed-to-seed noise (its ``<column>_std``), if recorded."""
  with atomic.open_text(path, newline="") as f:
    rows = list(csv.DictReader(f))
  stds = []
  for row in rows:
    try:
      stds.append(float(row.get(column) or "nan"))
    except ValueError:
      continue
  stds = [v for v in stds if v == v]
  if not stds:
    return ""
  return (f"Its seed-to-seed noise: the standard deviation over seeds of {len(stds)} "
          f"candidate(s) trained more than once is {sum(stds) / len(stds):.4f} on average "
          f"(largest {max(stds):.4f}); ground-truth differences below that are not resolved.")


def run() -> list[str]:
  """The binary's body: flags → inputs → scores → files. Returns the written paths.

  Every process of a multi-process run computes the same result (GW work is split over all
  devices and gathered); only process 0 writes, and the others return [].
  """
  run_start = time.time()
  if not OUTPUT_DIR.value:
    raise InputError("--output_dir is required")
  settings = _settings()
  metric_names = scoring.parse_metrics(METRICS.value)
  if C_SCORE_PAIRS.value and not CACHE_DIR.value:
    raise InputError("--c_score_pairs caches its results: give --cache_dir")
  if GROUND_TRUTH_SCORES.value and not GROUND_TRUTH.value:
    raise InputError("--ground_truth_scores reads columns of --ground_truth; give it")
  names, feats, text, truth, preamble = _load_inputs()
  if SYNTHETIC_POOL.value and GROUND_TRUTH.value:
    truth = read_ground_truth(GROUND_TRUTH.value, GROUND_TRUTH_COLUMN.value)
  start = time.time()
  precomputed = {}
  if GROUND_TRUTH_SCORES.value:
    precomputed.update(read_score_columns(GROUND_TRUTH.value, GROUND_TRUTH_SCORES.value, names))
  if C_SCORE_PAIRS.value:
    precomputed["c_score"] = _c_scores(names)
  result = scoring.score_pool(names, feats, text, metric_names, settings, ground_truth=truth,
                              show_progress=PROGRESS.value and parallel.is_primary(),
                              precomputed=precomputed)
  import jax  # pylint: disable=g-import-not-at-top
  run_info = {
      "candidates": len(names), "samples": int(text.shape[0]),
      "metrics": ",".join(result.metrics),
      "distance": settings.distance, "scale": settings.scale,
      "gw_solver": settings.gw_options.solver, "seed": settings.seed,
      "devices": f"{jax.device_count()} × {jax.devices()[0].platform}",
      "processes": jax.process_count(),
      "seconds": round(time.time() - start, 1),
      "total_seconds (extraction included)": round(time.time() - run_start, 1),
  }
  if not parallel.is_primary():
    return []
  title = "Encoder selection: training-free scores" + (" (synthetic demo pool)" if SYNTHETIC_POOL.value else "")
  return report.write_outputs(
      result, OUTPUT_DIR.value, title=title, preamble=preamble, run_info=run_info,
      extra={VISION_CKA_FILE: report.similarity_csv(names, cka.linear_cka_matrix(feats))})


VISION_CKA_FILE = "vision_cka.csv"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    runtime_flags.initialize_from_flags()
    written = run()
  except (InputError, feature_bank.BankError, checks.FeatureError, ValueError) as e:
    print(f"score: error: {e}", file=sys.stderr)
    sys.exit(1)
  for path in written:
    print(path)


def console_main():
  """The ``vlmsel-score`` console command."""
  app.run(main)


if __name__ == "__main__":
  console_main()
