r"""The C score (keypoint-correspondence PCK) of vision encoders: the library behind
``correspondence_score`` and ``score --c_score_pairs``.

A pair source is ``homography`` (random perspective warps of scikit-image's photos: exact ground
truth), ``stereo`` (scikit-image's Middlebury motorcycle pair) or ``spair:<root>`` (an SPair-71k
tree). For every model: patch features of the second-to-last layer (or the variant's, or
``layer``) on the native grid, cosine-similarity maps, soft-argmax or argmax, PCK@0.05 / 0.10 /
0.15 of the target box's longer side; the C score is PCK@0.10 in percent.

``score_records`` scores one loaded model on records (``vlmsel_jax.data.correspondence``);
``score_models`` scores several models and writes ``c_scores.json`` and ``c_scores.csv``;
``cached_c_scores`` keeps each model's result beside its feature banks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from tqdm import auto as tqdm

from vlmsel_jax import zoo
from vlmsel_jax.data import correspondence as data
from vlmsel_jax.features import patch_grid as pg
from vlmsel_jax.runtime import atomic
from vlmsel_jax.scores import correspondence as corr

PAIR_SOURCES = ("homography", "stereo", "spair:<root>")
KEYPOINT_BUCKET = 16  # Keypoint counts are padded up to a multiple: few compiled shapes.
RESULTS_JSON = "c_scores.json"  # score_models' files inside its output directory.
RESULTS_CSV = "c_scores.csv"


def _pad(kps: np.ndarray, size: int) -> np.ndarray:
  out = np.zeros((size, 2), np.float32)
  out[:len(kps)] = kps
  return out


def score_records(loaded: zoo.LoadedModel, records: Iterable[dict[str, Any]], *,
                  layer: int | None = None, method: str = "soft_argmax",
                  temperature: float = corr.DEFAULT_TEMPERATURE,
                  window: int | None = corr.DEFAULT_WINDOW,
                  alphas: Sequence[float] = corr.ALPHAS, total: int | None = None,
                  progress: bool = False) -> dict[str, Any]:
  """PCK of one model over correspondence records (``vlmsel_jax.data.correspondence``).

  Returns:
    ``{"pck@<alpha>": percent, ..., "c_score": PCK@0.10 (if 0.10 is among alphas),
    "keypoints", "pairs", "grid": [h, w], "layer", "per_category": {category: {"pck@...",
    "keypoints"}}}``; PCK pools all keypoints (each keypoint counts once).
  """
  grid_fn = pg.patch_grid_fn(loaded, layer)
  alphas = tuple(float(a) for a in alphas)

  @jax.jit
  def one_pair(grids, src_kps, trg_kps, bbox, src_hw, trg_hw):
    return corr.pair_correct(grids[0], grids[1], src_kps, trg_kps, bbox, src_hw, trg_hw,
                             method=method, temperature=temperature, window=window,
                             alphas=alphas)

  hits = np.zeros(len(alphas), np.int64)
  count = 0
  pairs = 0
  by_cat: dict[str, list[Any]] = {}
  grid_shape = None
  for rec in tqdm.tqdm(records, total=total, desc=loaded.name, unit="pair", disable=not progress):
    pixels = np.stack([pg.resize_for_grid(loaded, rec["source"]),
                       pg.resize_for_grid(loaded, rec["target"])])
    grids = grid_fn(pixels)
    grid_shape = grids.shape[1:3]
    k = len(rec["source_kps"])
    size = -(-k // KEYPOINT_BUCKET) * KEYPOINT_BUCKET
    _, correct = one_pair(grids, _pad(rec["source_kps"], size), _pad(rec["target_kps"], size),
                          np.asarray(rec["target_bbox"], np.float32),
                          np.asarray(rec["source"].shape[:2], np.float32),
                          np.asarray(rec["target"].shape[:2], np.float32))
    correct = np.asarray(correct)[:, :k]
    hits += correct.sum(axis=1)
    count += k
    pairs += 1
    cat = by_cat.setdefault(str(rec.get("category", "")), [np.zeros(len(alphas), np.int64), 0])
    cat[0] += correct.sum(axis=1)
    cat[1] += k
  if not pairs:
    raise ValueError("no correspondence pairs to score")
  names = [f"pck@{a:.2f}" for a in alphas]
  result: dict[str, Any] = {n: float(100.0 * h / count) for n, h in zip(names, hits)}
  if 0.10 in alphas:
    result["c_score"] = result["pck@0.10"]
  result.update(keypoints=count, pairs=pairs, grid=list(grid_shape),
                layer=pg.default_layer(loaded) if layer is None else layer,
                per_category={c: {**{n: float(100.0 * h / v[1]) for n, h in zip(names, v[0])},
                                  "keypoints": v[1]} for c, v in sorted(by_cat.items())})
  return result


def load_records(pairs: str, *, seed: int = 0, homography_images: Sequence[str] = data.PHOTOS,
                 pairs_per_image: int = 2, num_keypoints: int = 50,
                 homography_strength: float = 0.1, homography_rotation: float = 30.0,
                 homography_scale: float = 0.25, homography_shift: float = 0.1,
                 spair_split: str = "test",
                 spair_limit: int | None = None) -> tuple[Iterable[dict[str, Any]], int]:
  """A pair source (``PAIR_SOURCES``) → (records, how many); SPair pairs are decoded lazily, as
  they are scored."""
  if pairs == "homography":
    recs = data.homography_pairs(homography_images, pairs_per_image=pairs_per_image,
                                 num_keypoints=num_keypoints, strength=homography_strength,
                                 max_rotation=homography_rotation, max_scale=homography_scale,
                                 max_shift=homography_shift, seed=seed)
    return recs, len(recs)
  if pairs == "stereo":
    return [data.stereo_pair(num_keypoints=num_keypoints, seed=seed)], 1
  if pairs.startswith("spair:") and len(pairs) > len("spair:"):
    parsed = data.spair_pairs(os.path.expanduser(pairs[len("spair:"):]), spair_split,
                              limit=spair_limit)
    return (data.load_spair_pair(p) for p in parsed), len(parsed)
  raise ValueError(f"pair source {pairs!r}: use one of {', '.join(PAIR_SOURCES)}")


def results_csv(results: dict[str, dict[str, Any]], alphas: Sequence[float]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  names = [f"pck@{a:.2f}" for a in alphas]
  w.writerow(["model"] + names + ["keypoints", "pairs", "grid_h", "grid_w", "layer"])
  for model, r in results.items():
    w.writerow([model] + [repr(r[n]) for n in names] +
               [r["keypoints"], r["pairs"], r["grid"][0], r["grid"][1], r["layer"]])
  return buf.getvalue()


def score_models(models: Sequence[str], pairs: str, output_dir: str, *,
                 layer: int | None = None, method: str = "soft_argmax",
                 temperature: float = corr.DEFAULT_TEMPERATURE,
                 window: int | None = corr.DEFAULT_WINDOW,
                 alphas: Sequence[float] = corr.ALPHAS, progress: bool = True,
                 **record_options) -> dict[str, Any]:
  """Scores every vision model on the pairs; writes ``RESULTS_JSON`` and ``RESULTS_CSV``.

  Both files go into ``output_dir`` only after every model is scored (a failed run writes
  nothing). ``record_options`` are ``load_records``'s.
  """
  if not models:
    raise ValueError("no vision models given")
  if not output_dir:
    raise ValueError("no output directory given")
  results = {}
  for spec in zoo.candidate_list(models):
    resolved = zoo.resolve(spec)
    if resolved.kind != "vision":
      raise ValueError(f"model {spec!r} is a {resolved.kind} model; the C score needs a vision "
                       "encoder")
    if layer is not None and resolved.variant.layer is not None:
      raise ValueError(f"model {spec!r} names its layer and --layer={layer} names another; "
                       "give the layer once")
    # A variant's layer is the candidate's feature layer; otherwise METHODS' second-to-last.
    model_layer = resolved.variant.layer if layer is None else layer
    loaded = resolved.load()
    records, total = load_records(pairs, **record_options)
    start = time.time()
    results[resolved.name] = score_records(loaded, records, layer=model_layer, method=method,
                                           temperature=temperature, window=window,
                                           alphas=alphas, total=total, progress=progress)
    results[resolved.name]["seconds"] = round(time.time() - start, 2)
  payload = {"models": results, "pairs": pairs, "method": method,
             "temperature": temperature, "window": window, "alphas": list(alphas),
             "options": {k: (list(v) if isinstance(v, (tuple, list)) else v)
                         for k, v in record_options.items()}}
  atomic.write_text_atomic(os.path.join(output_dir, RESULTS_JSON),
                           json.dumps(payload, indent=2) + "\n")
  atomic.write_text_atomic(os.path.join(output_dir, RESULTS_CSV), results_csv(results, alphas))
  return payload


def cached_c_scores(specs: Sequence[str], cache_dir: str, *, pairs: str = "homography",
                    progress: bool = True, **record_options) -> dict[str, dict[str, Any]]:
  """The C score result (``score_records``) of every vision spec, by model name, cached.

  Each spec is read at its variant's layer (else the default second-to-last layer) and
  resolution. A result is kept in ``<cache_dir>/c_scores/<name>.json`` with a key of the model
  files, the variant, the pairs and every option; a later call with the same key reads it back
  instead of running the model.
  """
  out = {}
  shared = None  # Synthetic pairs (a list) are made once and scored by every model that needs them.
  for spec in specs:
    resolved = zoo.resolve(spec)
    if resolved.kind != "vision":
      raise ValueError(f"model {spec!r} is a {resolved.kind} model; the C score needs a vision "
                       "encoder")
    options = {k: (list(v) if isinstance(v, (tuple, list)) else v)
               for k, v in sorted(record_options.items())}
    key = hashlib.sha256(json.dumps(
        {"version": 1, "model": resolved.fingerprint(), "pairs": pairs, "options": options,
         "method": "soft_argmax", "temperature": corr.DEFAULT_TEMPERATURE,
         "window": corr.DEFAULT_WINDOW, "alphas": list(corr.ALPHAS)},
        sort_keys=True).encode()).hexdigest()
    path = os.path.join(cache_dir, "c_scores", resolved.file_stem + ".json")
    if atomic.isfile(path):  # --cache_dir may be a bucket: read through atomic.
      try:
        with atomic.open_text(path) as f:
          cached = json.load(f)
        if cached.get("key") == key:
          out[resolved.name] = cached["result"]
          continue
      except (OSError, ValueError, KeyError):
        pass  # Unreadable: computed again and rewritten.
    records, total = shared or load_records(pairs, **record_options)
    if isinstance(records, list):
      shared = (records, total)
    result = score_records(resolved.load(), records, layer=resolved.variant.layer, total=total,
                           progress=progress)
    atomic.write_json_atomic(path, {"key": key, "spec": spec, "pairs": pairs,
                                    "options": options, "result": result})
    out[resolved.name] = result
  return out
