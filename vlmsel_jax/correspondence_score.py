r"""The C score (keypoint-correspondence PCK) of vision encoders: a thin absl binary.

  python -m vlmsel_jax.correspondence_score --flagfile=configs/c_score_demo.flags
  python -m vlmsel_jax.correspondence_score --models=efficientnet-lite0,/models/dinov2-small \
      --pairs=spair:/data/SPair-71k --output=runs/c_score/c_score.json

``--pairs`` is ``homography`` (random perspective warps of scikit-image's photos: exact ground
truth), ``stereo`` (scikit-image's Middlebury motorcycle pair) or ``spair:<root>`` (an SPair-71k
tree, ``--spair_split`` pairs). For every model: patch features of the second-to-last layer
(``--layer``) on the native grid, cosine-similarity maps, ``--method`` soft-argmax or argmax,
PCK@0.05 / 0.10 / 0.15 of the target box's longer side; the C score is PCK@0.10 in percent.
Writes ``--output`` (JSON) and a CSV beside it (same stem), atomically.

The flags are defined only when this runs as a program, so ``score_records`` can be imported
next to other binaries' flags.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import time
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from tqdm import auto as tqdm

from vlmsel_jax.runtime import atomic
from vlmsel_jax.features import patch_grid as pg
from vlmsel_jax import zoo
from vlmsel_jax.data import correspondence as data
from vlmsel_jax.scores import correspondence as corr

PAIR_SOURCES = ("homography", "stereo", "spair:<root>")
KEYPOINT_BUCKET = 16  # Keypoint counts are padded up to a multiple: few compiled shapes.


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
  """``--pairs`` → (records, how many); SPair pairs are decoded lazily, as they are scored."""
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
  raise ValueError(f"--pairs={pairs!r}: use one of {', '.join(PAIR_SOURCES)}")


def results_csv(results: dict[str, dict[str, Any]], alphas: Sequence[float]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  names = [f"pck@{a:.2f}" for a in alphas]
  w.writerow(["model"] + names + ["keypoints", "pairs", "grid_h", "grid_w", "layer"])
  for model, r in results.items():
    w.writerow([model] + [repr(r[n]) for n in names] +
               [r["keypoints"], r["pairs"], r["grid"][0], r["grid"][1], r["layer"]])
  return buf.getvalue()


def run(models: Sequence[str], pairs: str, output: str, *, layer: int | None = None,
        method: str = "soft_argmax", temperature: float = corr.DEFAULT_TEMPERATURE,
        window: int | None = corr.DEFAULT_WINDOW, alphas: Sequence[float] = corr.ALPHAS,
        progress: bool = True, **record_options) -> dict[str, Any]:
  """Scores every model on the pairs; writes ``output`` (JSON) and its ``.csv`` sibling.

  Both files are written only after every model is scored (a failed run writes nothing).
  """
  if not models:
    raise ValueError("--models is empty")
  if not output.endswith(".json"):
    raise ValueError(f"--output={output}: give a .json path (the CSV goes beside it)")
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
  atomic.write_text_atomic(output, json.dumps(payload, indent=2) + "\n")
  atomic.write_text_atomic(os.path.splitext(output)[0] + ".csv", results_csv(results, alphas))
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


def _define_flags() -> dict[str, Any]:
  f = {}
  f["models"] = flags.DEFINE_list("models", [], "Vision encoders: zoo names (efficientnet-lite0, "
                                  "...), local Hugging Face ViT-family directories or Hub ids "
                                  "(openai/clip-vit-base-patch16), optionally "
                                  "with a variant (efficientnet-lite0@layer=-4,res=320: the "
                                  "variant's layer is read unless --layer is given).")
  f["pairs"] = flags.DEFINE_string("pairs", "homography",
                                   f"Pair source: {', '.join(PAIR_SOURCES)}.")
  f["output"] = flags.DEFINE_string("output", None, "Output JSON path; the CSV goes beside it.")
  f["layer"] = flags.DEFINE_integer("layer", None, "hidden_states index of the patch grid "
                                    "(default -2: the second-to-last layer / stage).")
  f["method"] = flags.DEFINE_enum("method", "soft_argmax", list(corr.METHODS),
                                  "How a similarity map becomes a point.")
  f["temperature"] = flags.DEFINE_float("temperature", corr.DEFAULT_TEMPERATURE,
                                        "Soft-argmax temperature (cosine-similarity units).",
                                        lower_bound=1e-6)
  f["window"] = flags.DEFINE_integer("window", corr.DEFAULT_WINDOW,
                                     "Soft-argmax window radius in cells around the argmax; "
                                     "negative: the whole map.")
  f["alphas"] = flags.DEFINE_list("alphas", [str(a) for a in corr.ALPHAS],
                                  "PCK thresholds (fractions of the target box's longer side).")
  f["seed"] = flags.DEFINE_integer("seed", 0, "Seed of the synthetic pairs and keypoints.")
  f["homography_images"] = flags.DEFINE_list("homography_images", list(data.PHOTOS),
                                             "skimage.data photos warped for --pairs=homography.")
  f["pairs_per_image"] = flags.DEFINE_integer("pairs_per_image", 2, "Homographies per photo.",
                                              lower_bound=1)
  f["num_keypoints"] = flags.DEFINE_integer("num_keypoints", 50, "Keypoints per synthetic pair "
                                            "(homography, stereo).", lower_bound=1)
  f["homography_strength"] = flags.DEFINE_float(
      "homography_strength", 0.1, "Perspective part of a random homography: largest independent "
      "move of each corner, as a fraction of the image side.", lower_bound=0.0)
  f["homography_rotation"] = flags.DEFINE_float(
      "homography_rotation", 30.0, "Largest rotation of a random homography, in degrees.",
      lower_bound=0.0)
  f["homography_scale"] = flags.DEFINE_float(
      "homography_scale", 0.25, "Zoom of a random homography: a factor within [1/(1+s), 1+s].",
      lower_bound=0.0)
  f["homography_shift"] = flags.DEFINE_float(
      "homography_shift", 0.1, "Largest shift of a random homography, as a fraction of the side.",
      lower_bound=0.0)
  f["spair_split"] = flags.DEFINE_enum("spair_split", "test", ["test", "val", "trn"],
                                       "SPair-71k split for --pairs=spair:<root>.")
  f["spair_limit"] = flags.DEFINE_integer("spair_limit", None, "Score only the first N SPair "
                                          "pairs.", lower_bound=1)
  f["progress"] = flags.DEFINE_bool("progress", True, "Show a progress bar.")
  return f


def main(argv, f):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if f["output"].value is None:
    raise app.UsageError("--output is required (a .json path)")
  try:
    alphas = tuple(float(a) for a in f["alphas"].value)
  except ValueError:
    raise app.UsageError(f"--alphas: not numbers: {','.join(f['alphas'].value)}") from None
  window = f["window"].value
  try:
    payload = _run_from_flags(f, alphas, window)
  except ValueError as e:  # ZooError and CorrespondenceDataError are ValueErrors.
    print(f"correspondence_score: error: {e}", file=sys.stderr)
    sys.exit(1)
  for name, r in payload["models"].items():
    logging.info("%s: %s", name, ", ".join(f"{k} {r[k]:.2f}" for k in r if k.startswith("pck")))
  print(results_csv(payload["models"], alphas), end="")


def _run_from_flags(f, alphas, window):
  return run(f["models"].value, f["pairs"].value, f["output"].value, layer=f["layer"].value,
             method=f["method"].value, temperature=f["temperature"].value,
             window=None if window < 0 else window, alphas=alphas,
             progress=f["progress"].value, seed=f["seed"].value,
             homography_images=tuple(f["homography_images"].value),
             pairs_per_image=f["pairs_per_image"].value,
             num_keypoints=f["num_keypoints"].value,
             homography_strength=f["homography_strength"].value,
             homography_rotation=f["homography_rotation"].value,
             homography_scale=f["homography_scale"].value,
             homography_shift=f["homography_shift"].value,
             spair_split=f["spair_split"].value, spair_limit=f["spair_limit"].value)


def console_main():
  """The ``vlmsel-correspondence-score`` console command."""
  defined = _define_flags()
  app.run(lambda argv: main(argv, defined))


if __name__ == "__main__":
  console_main()
