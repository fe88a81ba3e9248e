"""Scores a pool end to end: inputs → scores → files. The library behind the ``score`` binary.

``ScoreConfig`` says what to score and where the results go; ``run`` builds the pool (feature
banks, the models' banks extracted into a cache first, or the synthetic pool), adds the C score
and the ground truth's own score columns, scores it (``pool.score_pool``) and writes the report
(``report.write_outputs``) and ``vision_cka.csv``, the candidates' linear CKA with one another
that Mordal clusters by.

Every process of a multi-process run computes the same result (GW work is split over all
devices and gathered); only process 0 writes.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from typing import Any, Mapping, Sequence

import numpy as np

from vlmsel_jax.features import extraction
from vlmsel_jax.features import feature_bank
from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import parallel
from vlmsel_jax.runtime import result_dir
from vlmsel_jax.scoring import pool
from vlmsel_jax.scoring import report
from vlmsel_jax.scoring import synthetic
from vlmsel_jax.scoring import uncertainty as uncertainty_lib
from vlmsel_jax.scores import checks
from vlmsel_jax.scores import cka

VISION_CKA_FILE = "vision_cka.csv"

SYNTHETIC_PREAMBLE = """\
**This is the synthetic demo pool, not real models.** One shared latent (a mixture of classes)
stands for image content; the "text features" are a fixed non-linear view of it; each candidate
sees the latent through a distance-preserving embedding after a graded amount of damage
(Gaussian noise, latent dimensions replaced by noise, smooth non-linear warps, or nothing of the
latent at all). The candidates are listed from least to most damaged and the ground truth is
that order (quality = how many candidates it beats: 11 for the best, 0 for the worst), so each
score's correlation below says how well it recovers an answer known in advance."""


class InputError(ValueError):
  """A bad flag value or input file; reported as one line."""


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
  """What ``run`` scores and where it writes; each field is a flag of the ``score`` binary.

  The pool is one of: ``banks`` + ``text_bank`` (feature-bank files), ``vision_models`` +
  ``text_model`` (model specs whose banks are extracted from ``data`` into ``cache_dir``), or
  ``synthetic_pool``.
  """

  output_dir: str | None = None
  banks: Sequence[str] = ()
  bank_names: Sequence[str] = ()
  text_bank: str | None = None
  synthetic_pool: bool = False
  synthetic_n: int = 500
  vision_models: Sequence[str] = ()
  text_model: str | None = None
  data: extraction.DataSource = extraction.DataSource()
  max_samples: int = 0
  cache_dir: str | None = None
  c_score_pairs: str | None = None
  c_score_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  metrics: Sequence[str] = pool.DEFAULT_METRICS
  settings: pool.ScoreSettings = pool.ScoreSettings()
  ground_truth: str | None = None
  ground_truth_column: str = "accuracy"
  ground_truth_scores: Sequence[str] = ()
  # Intervals, p-values and ranking stability (uncertainty.py); None or all zero = none.
  uncertainty: uncertainty_lib.UncertaintyOptions | None = None
  progress: bool = True


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
      if not math.isfinite(truth[name]):
        raise InputError(f"{path}:{line}: {column} is {row[column].strip()} (a ground truth "
                         "must be a finite number)")
  if not truth:
    raise InputError(f"{path}: no candidates (the file has a header and no rows)")
  return truth


def read_score_columns(path: str, columns: Sequence[str], names: Sequence[str]
                       ) -> dict[str, dict]:
  """``{column: {candidate: value}}`` of --ground_truth_scores, for every candidate."""
  unknown = [c for c in columns if c not in pool.PRECOMPUTED]
  if unknown:
    raise InputError(f"--ground_truth_scores: {', '.join(unknown)} is not a score this binary "
                     f"judges (known: {', '.join(pool.PRECOMPUTED)})")
  out = {}
  for column in columns:
    values = read_ground_truth(path, column)
    missing = [n for n in names if n not in values or not math.isfinite(values[n])]
    if missing:
      raise InputError(f"{path}: no finite {column} for candidate(s) {', '.join(missing)}")
    out[column] = {n: values[n] for n in names}
  return out


def _extract_banks(config: ScoreConfig) -> tuple[list[str], str]:
  """Extracts (or finds cached) the banks of the vision models and the text model; their paths."""
  from vlmsel_jax import zoo  # pylint: disable=g-import-not-at-top
  if config.banks or config.text_bank:
    raise InputError("--vision_models/--text_model extract their own banks; drop "
                     "--banks/--text_bank")
  if not config.vision_models or not config.text_model:
    raise InputError("--vision_models and --text_model go together")
  if not config.cache_dir:
    raise InputError("--cache_dir is required with --vision_models")
  vision_specs = zoo.candidate_list(config.vision_models)
  # Kinds are checked before anything is extracted.
  extraction.check_kinds(vision_specs, "vision", "vision_models")
  extraction.check_kinds([config.text_model], "text", "text_model")
  results = extraction.extract_from(
      vision_specs + [config.text_model], config.data, config.cache_dir,
      options=extraction.ExtractOptions(progress=config.progress, seed=config.settings.seed,
                                        max_samples=config.max_samples or None))
  return [r.path for r in results[:-1]], results[-1].path


def _c_scores(config: ScoreConfig, names: list[str]) -> dict[str, float]:
  """The C score of every vision-model candidate (cached beside the banks)."""
  from vlmsel_jax import zoo  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.scoring import c_score  # pylint: disable=g-import-not-at-top
  if not config.vision_models:
    raise InputError("--c_score_pairs needs the models themselves: give --vision_models")
  results = c_score.cached_c_scores(
      zoo.candidate_list(config.vision_models), config.cache_dir, pairs=config.c_score_pairs,
      progress=config.progress, **config.c_score_options)
  missing = [n for n in names if n not in results]
  if missing:  # Bank names are model names unless --bank_names renamed them.
    raise InputError(f"no C score for {', '.join(missing)}; --c_score_pairs keeps the model "
                     "names (drop --bank_names)")
  return {n: results[n]["c_score"] for n in names}


def _check(x: np.ndarray, path: str) -> None:
  """Feature errors name the file: validated here, where the path is known."""
  try:
    checks.check_features(x, path)
  except checks.FeatureError as e:
    raise InputError(str(e)) from None


def load_pool(config: ScoreConfig):
  """Returns (names, candidate features, text features, ground truth or None, preamble)."""
  if config.synthetic_pool:
    if config.banks or config.text_bank or config.vision_models or config.text_model:
      raise InputError("--synthetic_pool scores the built-in pool; drop --banks/--text_bank "
                       "(and --vision_models/--text_model)")
    pool_ = synthetic.make_pool(n=config.synthetic_n, seed=config.settings.seed)
    truth = dict(zip(pool_.names, pool_.quality.tolist()))
    return pool_.names, pool_.candidates, pool_.text, truth, SYNTHETIC_PREAMBLE
  bank_paths, text_path = list(config.banks), config.text_bank
  if config.vision_models or config.text_model:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() > 1:
      raise InputError("--vision_models/--text_model work on one process only (process 0 "
                       "alone writes the banks, and every host must read them); run "
                       "vlmsel_jax.extract first (on one host or all), give every host the "
                       "banks, and pass --banks/--text_bank")
    bank_paths, text_path = _extract_banks(config)
  if not bank_paths:
    raise InputError("no candidates: pass --banks=bank1,bank2,... (or --vision_models, "
                     "or --synthetic_pool)")
  if not text_path:
    raise InputError("no text features: pass --text_bank=bank (the LLM's caption features)")
  given = list(config.bank_names)
  if given and len(given) != len(bank_paths):
    raise InputError(f"--bank_names has {len(given)} names for {len(bank_paths)} candidates")
  text = feature_bank.load_bank(text_path)
  names, feats = [], []
  for i, path in enumerate(bank_paths):
    bank = feature_bank.load_bank(path)
    names.append(given[i] if given else bank.name)
    feats.append(feature_bank.align_to(bank, text.ids, text.path))
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise InputError(f"candidate names are not unique ({', '.join(dupes)}); set --bank_names")
  _check(text.features, text_path)
  for path, x in zip(bank_paths, feats):
    _check(x, path)
  truth = (read_ground_truth(config.ground_truth, config.ground_truth_column)
           if config.ground_truth else None)
  return names, feats, text.features, truth, _preamble(config, text, names)


def _preamble(config: ScoreConfig, text: feature_bank.FeatureBank, names: list[str]) -> str:
  """What was scored: the models, the data, and where the ground truth came from."""
  if not config.vision_models:
    return ""
  lines = [f"{len(names)} vision candidates against the text features of `{config.text_model}` "
           f"on {text.features.shape[0]} image–caption pairs of {config.data.describe()}."]
  if config.c_score_pairs:
    lines.append(f"C score on `{config.c_score_pairs}` keypoint pairs.")
  if config.ground_truth:
    lines.append(f"Ground truth: column `{config.ground_truth_column}` of "
                 f"`{config.ground_truth}` (trained VLMs; see that file's command, seed and date "
                 "columns).")
    spread = _ground_truth_spread(config.ground_truth, config.ground_truth_column + "_std")
    if spread:
      lines.append(spread)
  return " ".join(lines)


def read_ground_truth_sd(path: str, column: str) -> dict[str, float]:
  """Candidate → standard error over seeds of its ground truth: ``<column>_std`` / √(seeds).

  The number of seeds is the count of the ``seeds`` column's entries ("0 1" = 2), else 1. A
  candidate trained once (no ``_std``) gets 0: its seed noise is unknown, not absent.
  """
  with atomic.open_text(path, newline="") as f:
    rows = list(csv.DictReader(f))
  out = {}
  for row in rows:
    try:
      std = float(row.get(column + "_std") or "nan")
    except ValueError:
      std = float("nan")
    seeds = max(1, len((row.get("seeds") or "").split()))
    out[row["candidate"]] = std / math.sqrt(seeds) if math.isfinite(std) else 0.0
  return out


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


def run(config: ScoreConfig) -> list[str]:
  """Scores the pool ``config`` names and writes the results; returns the written paths.

  Every process of a multi-process run computes the same result; only process 0 writes, and
  the others return []. Process 0 holds ``output_dir``'s lock from the start, so a path that
  cannot be a result directory, or one another run is writing, stops the run before any work.
  """
  if not config.output_dir:
    raise InputError("--output_dir is required")
  if not parallel.is_primary():
    return _run(config)
  with result_dir.locked(config.output_dir):
    return _run(config)


def _run(config: ScoreConfig) -> list[str]:
  run_start = time.time()
  metric_names = pool.parse_metrics(config.metrics)
  if config.c_score_pairs and not config.cache_dir:
    raise InputError("--c_score_pairs caches its results: give --cache_dir")
  if config.ground_truth_scores and not config.ground_truth:
    raise InputError("--ground_truth_scores reads columns of --ground_truth; give it")
  names, feats, text, truth, preamble = load_pool(config)
  if config.synthetic_pool and config.ground_truth:
    truth = read_ground_truth(config.ground_truth, config.ground_truth_column)
  if truth is not None and config.ground_truth:
    missing = [n for n in names if n not in truth]
    if missing:
      raise InputError(f"{config.ground_truth}: ground truth has no {config.ground_truth_column} "
                       f"for candidate(s) {', '.join(missing)} (its candidates: "
                       f"{', '.join(sorted(truth)) or 'none'})")
  start = time.time()
  precomputed = {}
  if config.ground_truth_scores:
    precomputed.update(read_score_columns(config.ground_truth, config.ground_truth_scores, names))
  if config.c_score_pairs:
    precomputed["c_score"] = _c_scores(config, names)
  settings = config.settings
  scored = time.time()
  result = pool.score_pool(names, feats, text, metric_names, settings, ground_truth=truth,
                           show_progress=config.progress and parallel.is_primary(),
                           precomputed=precomputed)
  scored = time.time() - scored
  uncertainty_seconds = uncertainty_cpu = 0.0
  if config.uncertainty is not None and config.uncertainty.enabled:
    uncertainty_seconds, uncertainty_cpu = time.time(), time.process_time()
    if truth is not None and config.ground_truth:
      sd = read_ground_truth_sd(config.ground_truth, config.ground_truth_column)
      result.ground_truth_sd = {n: sd.get(n, 0.0) for n in names}
    pool.add_uncertainty(result, feats, text, settings, config.uncertainty,
                         show_progress=config.progress and parallel.is_primary())
    uncertainty_seconds = time.time() - uncertainty_seconds
    uncertainty_cpu = time.process_time() - uncertainty_cpu
  import jax  # pylint: disable=g-import-not-at-top
  run_info = {
      "candidates": len(names), "samples": int(text.shape[0]),
      "metrics": ",".join(result.metrics),
      "distance": settings.distance, "scale": settings.scale,
      "gw_solver": settings.gw_options.solver, "seed": settings.seed,
      "devices": f"{jax.device_count()} × {jax.devices()[0].platform}",
      "processes": jax.process_count(),
      "seconds": round(time.time() - start, 1),
      "scoring_seconds": round(scored, 1),
      "uncertainty_seconds": round(uncertainty_seconds, 1),
      # CPU seconds (all threads): comparable across runs on a machine shared with others.
      "uncertainty_cpu_seconds": round(uncertainty_cpu, 1),
      "total_seconds (extraction included)": round(time.time() - run_start, 1),
  }
  if config.uncertainty is not None and config.uncertainty.enabled:
    u = config.uncertainty
    run_info["uncertainty"] = (f"bootstrap {u.bootstrap} (GW {min(u.gw_bootstrap, u.bootstrap)}),"
                               f" permutations {u.permutations}, confidence {u.confidence}, "
                               f"seed {u.seed}")
    run_info["uncertainty_cpu_seconds by metric"] = ", ".join(
        f"{m} {r.cpu_seconds:.1f}" for m, r in result.uncertainty.items())
  if not parallel.is_primary():
    return []
  title = ("Encoder selection: training-free scores" +
           (" (synthetic demo pool)" if config.synthetic_pool else ""))
  vision_cka = cka.linear_cka_matrix(feats)
  return report.write_outputs(
      result, config.output_dir, title=title, preamble=preamble, run_info=run_info,
      extra={VISION_CKA_FILE: report.similarity_csv(names, vision_cka)},
      figures={report.VISION_CKA_PNG: lambda path: report.similarity_heatmap(
          names, vision_cka, path)})
