"""Directional Conductance Divergence (DCD): model-specific task similarity → model ranking.

METHODS.md §2. For model m, every task T has a block-conductance profile c_T (one value per
visual transformer block; ``conductance.block_conductance``). Then, for a target task T and the
other (source) tasks S:

  α = softmax(η · c_T / ‖c_T‖₂)                                    (block importance, η = 2.5)
  DCD(T ‖ S) = Σ_l α_l · |c_{T,l} − c_{S,l}| / (|c_{T,l}| + 1e-8)   (asymmetric)
  w_S = exp(−γ · (DCD(T ‖ S) − min_S' DCD(T ‖ S')))                 (γ = 4)
  score_m(T) = Σ_S w_S · rank_m(S) / Σ_S w_S

rank_m(S) is model m's rank among all models on source task S by true accuracy (1 = best, ties
get the mean rank), so a *lower* score predicts a better model. The weights depend on the model:
the similarity of two tasks is measured through each model's own conductance. Leave-one-task-out
evaluation treats each task in turn as the target, with every other task as a source, and judges
the predicted order by NDCG@k (relevance = true accuracy on the target) and top-k overlap.

``compute_profiles`` measures the profiles of vision towers on image folders (one per task);
``report`` is ``select --method=dcd``'s result: DCD's leave-one-task-out next to uniform weights'.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.stats

from vlmsel_jax.scoring import metrics as rank_metrics

ETA = 2.5
GAMMA = 4.0
EPS = 1e-8
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Integration rules of the layer conductance (Captum's names; gausslegendre is its default).
QUADRATURES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
               "riemann_trapezoid")
# The image embedding whose L2 norm is attributed.
EMBEDDINGS = ("pooler", "cls", "mean")


class DCDError(ValueError):
  """Inconsistent conductance profiles or accuracy tables; one line."""


def block_importance(c_target, eta: float = ETA) -> np.ndarray:
  """α = softmax(η · c_T / ‖c_T‖₂) over blocks."""
  c = np.asarray(c_target, np.float64)
  norm = np.linalg.norm(c)
  z = eta * c / norm if norm > 0 else np.zeros_like(c)
  z = np.exp(z - z.max())
  return z / z.sum()


def divergence(c_target, c_source, eta: float = ETA) -> float:
  """DCD(T ‖ S) = Σ_l α_l |c_{T,l} − c_{S,l}| / (|c_{T,l}| + 1e-8), α from the target."""
  t = np.asarray(c_target, np.float64)
  s = np.asarray(c_source, np.float64)
  if t.shape != s.shape or t.ndim != 1:
    raise DCDError(f"conductance profiles differ in shape: {t.shape} vs {s.shape}")
  return float(np.sum(block_importance(t, eta) * np.abs(t - s) / (np.abs(t) + EPS)))


def source_weights(divergences: Mapping[str, float], gamma: float = GAMMA) -> dict[str, float]:
  """w_S = exp(−γ (DCD(T‖S) − min_S' DCD(T‖S'))); the closest source gets weight 1."""
  low = min(divergences.values())
  return {s: float(np.exp(-gamma * (d - low))) for s, d in divergences.items()}


def source_ranks(accuracy: Mapping[str, Mapping[str, float]], models: Sequence[str]
                 ) -> dict[str, dict[str, float]]:
  """task → model → rank by accuracy among ``models`` (1 = best, ties share the mean rank)."""
  out = {}
  for task, acc in accuracy.items():
    r = scipy.stats.rankdata([-acc[m] for m in models], method="average")
    out[task] = dict(zip(models, r.tolist()))
  return out


def _same_keys(have, want, missing_message: str, extra_message: tuple[str, str]) -> None:
  """Raises DCDError when ``have`` lacks a key of ``want`` or holds one ``want`` lacks.

  The error is ``missing_message`` + the missing keys, or extra_message[0] + the extra keys +
  extra_message[1].
  """
  missing = [k for k in want if k not in have]
  if missing:
    raise DCDError(f"{missing_message} {', '.join(missing)}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise DCDError(f"{extra_message[0]} {', '.join(extra)} {extra_message[1]}")


def check_inputs(profiles: Mapping[str, Mapping[str, np.ndarray]],
                 accuracy: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[str]]:
  """(models, tasks) when every model has a profile and an accuracy for every task."""
  models = sorted(profiles)
  tasks = sorted(accuracy)
  if len(models) < 2:
    raise DCDError(f"DCD ranks models: needs at least 2, got {len(models)}")
  if len(tasks) < 2:
    raise DCDError(f"leave-one-task-out needs at least 2 tasks, got {len(tasks)}")
  for m in models:
    _same_keys(profiles[m], tasks, f"model {m!r} has no conductance profile for task(s)",
               (f"model {m!r} has profiles for task(s)", "that have no accuracies"))
    lengths = {profiles[m][t].shape for t in tasks}
    if len(lengths) != 1:
      raise DCDError(f"model {m!r}: profiles of different lengths {sorted(lengths)}")
    for t in tasks:
      if not np.all(np.isfinite(profiles[m][t])):
        raise DCDError(f"model {m!r}, task {t!r}: non-finite conductance")
  for t in tasks:
    _same_keys(accuracy[t], models, f"task {t!r}: no accuracy for model(s)",
               (f"task {t!r}: accuracies for model(s)", "that have no conductance profile"))
  return models, tasks


def predict(target: str, sources: Sequence[str], profiles: Mapping[str, Mapping[str, np.ndarray]],
            ranks: Mapping[str, Mapping[str, float]], eta: float = ETA, gamma: float = GAMMA,
            uniform: bool = False) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """Predicted rank score of every model on ``target`` (lower = better) and each model's w_S.

  With ``uniform`` every source weighs the same (the mean source rank: DCD's ablation baseline).
  """
  scores, weights = {}, {}
  for m, per_task in profiles.items():
    if uniform:
      w = {s: 1.0 for s in sources}
    else:
      w = source_weights({s: divergence(per_task[target], per_task[s], eta) for s in sources},
                         gamma)
    weights[m] = w
    scores[m] = sum(w[s] * ranks[s][m] for s in sources) / sum(w.values())
  return scores, weights


def leave_one_task_out(profiles: Mapping[str, Mapping[str, np.ndarray]],
                       accuracy: Mapping[str, Mapping[str, float]], *, eta: float = ETA,
                       gamma: float = GAMMA, ks: Sequence[int] = (1, 3, 5),
                       uniform: bool = False) -> dict[str, Any]:
  """Every task as the target in turn; NDCG@k and top-k overlap per target and on average.

  Args:
    profiles: model → task → block-conductance profile.
    accuracy: task → model → true accuracy (non-negative: NDCG's gain).
    eta, gamma: DCD's temperature and source-weight sharpness.
    ks: cut-offs of NDCG@k and top-k overlap.
    uniform: equal source weights instead of DCD's (the baseline).

  Returns:
    {"per_task": {task: {"scores", "ranking", "weights", "ndcg@k", "overlap@k"}}, "mean": {...}}.
  """
  models, tasks = check_inputs(profiles, accuracy)
  ranks = source_ranks(accuracy, models)
  per_task = {}
  for t in tasks:
    sources = [s for s in tasks if s != t]
    scores, weights = predict(t, sources, profiles, ranks, eta, gamma, uniform)
    true = np.array([accuracy[t][m] for m in models])
    if np.any(true < 0):
      raise DCDError(f"task {t!r}: negative accuracy; NDCG needs non-negative gains")
    pred = -np.array([scores[m] for m in models])  # Larger = predicted better.
    entry: dict[str, Any] = {
        "scores": scores,
        "ranking": [models[i] for i in np.argsort(-pred, kind="stable")],
        "weights": weights,
    }
    for k in ks:
      entry[f"ndcg@{k}"] = rank_metrics.ndcg_at_k(true, pred, k)
    for k in ks:
      entry[f"overlap@{k}"] = rank_metrics.top_k_overlap(true, pred, k)
    per_task[t] = entry
  keys = [f"ndcg@{k}" for k in ks] + [f"overlap@{k}" for k in ks]
  mean = {k: float(np.mean([per_task[t][k] for t in tasks])) for k in keys}
  return {"models": models, "tasks": tasks, "per_task": per_task, "mean": mean, "keys": keys}


# ---------------------------------------------------------------------------------------------
# Profiles of real towers, and the report of ``select --method=dcd``.


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
  """How ``compute_profiles`` measures a profile: over ``images_per_task`` images of each task
  (a ``seed``ed subset; 0 = all), ``steps`` integration steps of rule ``quadrature``, attributing
  the L2 norm of the ``embedding``, ``batch_size`` images at a time."""

  images_per_task: int = 16
  steps: int = 50
  quadrature: str = "gausslegendre"
  embedding: str = "pooler"
  batch_size: int = 8
  seed: int = 0


def image_files(folder: str, limit: int, seed: int) -> list[str]:
  """The folder's images in name order, or a seeded subset of ``limit`` of them (kept sorted)."""
  if not os.path.isdir(folder):
    raise DCDError(f"{folder}: image folder not found")
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise DCDError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
  if limit and len(files) > limit:
    keep = np.sort(np.random.default_rng(seed).choice(len(files), limit, replace=False))
    files = [files[i] for i in keep]
  return [os.path.join(folder, f) for f in files]


def compute_profiles(specs: Sequence[str], task_specs: Sequence[str],
                     options: ProfileOptions = ProfileOptions()
                     ) -> dict[str, dict[str, np.ndarray]]:
  """Loads each model (a zoo spec) and task (``name=image_folder``); returns model → task →
  block-conductance profile. The models are vision towers: vision transformers (blocks = their
  transformer blocks), EfficientNet-Lite (its MBConv blocks) or ConvNeXt (its ConvNeXt blocks)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vlmsel_jax import zoo  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.selection import conductance  # pylint: disable=g-import-not-at-top

  tasks = []
  for spec in task_specs:
    if "=" not in spec:
      raise DCDError(f"--dcd_tasks entry {spec!r} is not name=image_folder")
    name, folder = (x.strip() for x in spec.split("=", 1))
    tasks.append((name, image_files(folder, options.images_per_task, options.seed)))
  names = [t for t, _ in tasks]
  if len(set(names)) != len(names):
    raise DCDError(f"--dcd_tasks names are not unique: {', '.join(names)}")
  out: dict[str, dict[str, np.ndarray]] = {}
  for spec in specs:
    loaded = zoo.load(spec)
    if not conductance.supports(loaded.model):
      raise DCDError(f"{spec}: DCD attributes through the blocks of a vision tower (a vision "
                     f"transformer, an EfficientNet-Lite or a ConvNeXt); this is a "
                     f"{type(loaded.model).__name__}")
    if loaded.name in out:
      raise DCDError(f"two models are named {loaded.name!r}")
    out[loaded.name] = {}
    for task, files in tasks:
      images = np.stack([loaded.preprocessing(Image.open(f)) for f in files])
      out[loaded.name][task] = conductance.block_conductance(
          loaded.model, images, batch_size=options.batch_size, n_steps=options.steps,
          method=options.quadrature, embedding=options.embedding)
  return out


def report(profiles: Mapping[str, Mapping[str, np.ndarray]],
           accuracy: Mapping[str, Mapping[str, float]], *, eta: float = ETA,
           gamma: float = GAMMA, ks: Sequence[int] = (1, 3, 5),
           run: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Leave-one-task-out with DCD's weights (``dcd``) and with uniform ones (``uniform``), the
  profiles, and ``run`` (how the inputs were made)."""
  result = leave_one_task_out(profiles, accuracy, eta=eta, gamma=gamma, ks=ks)
  uniform = leave_one_task_out(profiles, accuracy, ks=ks, uniform=True)
  return {
      "dcd": result, "uniform": uniform,
      "mean": result["mean"],
      "profiles": {m: {t: np.asarray(v).tolist() for t, v in per.items()}
                   for m, per in profiles.items()},
      "run": dict(run or {}),
  }
