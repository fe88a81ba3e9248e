r"""The C score (keypoint-correspondence PCK) of vision encoders.

  python -m vlmsel_jax.correspondence_score --flagfile=configs/c_score_demo.flags
  python -m vlmsel_jax.correspondence_score --vision_models=efficientnet-lite0,/models/dinov2-small \
      --c_score_pairs=spair:/data/SPair-71k --output_dir=runs/c_score

``--c_score_pairs`` is ``homography`` (random perspective warps of scikit-image's photos: exact
ground truth; the default), ``stereo`` (scikit-image's Middlebury motorcycle pair) or
``spair:<root>`` (an SPair-71k tree, ``--spair_split`` pairs). For every model: patch features of
the second-to-last layer (``--layer``) on the native grid, cosine-similarity maps, ``--method``
soft-argmax or argmax, PCK@0.05 / 0.10 / 0.15 of the target box's longer side; the C score is
PCK@0.10 in percent. Writes ``c_scores.json`` and ``c_scores.csv`` into ``--output_dir``,
atomically. The work is ``vlmsel_jax.scoring.c_score.score_models``; the pair flags are
``vlmsel_jax.scoring.c_score_flags``', shared with ``score``.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from vlmsel_jax.runtime import errors
from vlmsel_jax.runtime import flag_util
from vlmsel_jax.scores import correspondence as corr
from vlmsel_jax.scoring import c_score
from vlmsel_jax.scoring import c_score_flags

VISION_MODELS = flag_util.shared(
    flags.DEFINE_list, "vision_models", [], "Vision encoders: zoo names (efficientnet-lite0, "
    "...), local Hugging Face ViT-family directories or Hub ids (openai/clip-vit-base-patch16), "
    "optionally with a variant (efficientnet-lite0@layer=-4,res=320: the variant's layer is read "
    "unless --layer is given).")
OUTPUT_DIR = flag_util.shared(flags.DEFINE_string, "output_dir", None, "Where results are "
                              "written.")
LAYER = flag_util.shared(flags.DEFINE_integer, "layer", None, "hidden_states index of the "
                         "patch grid (default -2: the second-to-last layer / stage).")
READOUT = flags.DEFINE_enum("c_score_readout", "soft_argmax", list(corr.METHODS),
                            "How a similarity map becomes a point.")
TEMPERATURE = flags.DEFINE_float("temperature", corr.DEFAULT_TEMPERATURE,
                                 "Soft-argmax temperature (cosine-similarity units).",
                                 lower_bound=1e-6)
WINDOW = flags.DEFINE_integer("window", corr.DEFAULT_WINDOW, "Soft-argmax window radius in cells "
                              "around the argmax; negative: the whole map.")
ALPHAS = flags.DEFINE_list("alphas", [str(a) for a in corr.ALPHAS],
                           "PCK thresholds (fractions of the target box's longer side).")
SEED = flag_util.shared(flags.DEFINE_integer, "seed", 0, "Seed of every random choice "
                        "(C score: the synthetic pairs and keypoints).")
HOMOGRAPHY_STRENGTH = flags.DEFINE_float(
    "homography_strength", 0.1, "Perspective part of a random homography: largest independent "
    "move of each corner, as a fraction of the image side.", lower_bound=0.0)
HOMOGRAPHY_ROTATION = flags.DEFINE_float(
    "homography_rotation", 30.0, "Largest rotation of a random homography, in degrees.",
    lower_bound=0.0)
HOMOGRAPHY_SCALE = flags.DEFINE_float(
    "homography_scale", 0.25, "Zoom of a random homography: a factor within [1/(1+s), 1+s].",
    lower_bound=0.0)
HOMOGRAPHY_SHIFT = flags.DEFINE_float(
    "homography_shift", 0.1, "Largest shift of a random homography, as a fraction of the side.",
    lower_bound=0.0)
SPAIR_SPLIT = flags.DEFINE_enum("spair_split", "test", ["test", "val", "trn"],
                                "SPair-71k split for --c_score_pairs=spair:<root>.")
SPAIR_LIMIT = flags.DEFINE_integer("spair_limit", None, "Score only the first N SPair pairs.",
                                   lower_bound=1)
PROGRESS = flag_util.shared(flags.DEFINE_bool, "progress", True, "Show a progress bar.")


def alphas() -> tuple[float, ...]:
  try:
    return tuple(float(a) for a in ALPHAS.value)
  except ValueError:
    raise app.UsageError(f"--alphas: not numbers: {','.join(ALPHAS.value)}") from None


def run(thresholds: tuple[float, ...]) -> dict:
  """The binary's body: flags → ``c_score.score_models``; returns its payload."""
  return c_score.score_models(
      VISION_MODELS.value, c_score_flags.C_SCORE_PAIRS.value or "homography", OUTPUT_DIR.value,
      layer=LAYER.value, method=READOUT.value, temperature=TEMPERATURE.value,
      window=None if WINDOW.value < 0 else WINDOW.value, alphas=thresholds,
      progress=PROGRESS.value, **c_score_flags.record_options(SEED.value),
      homography_strength=HOMOGRAPHY_STRENGTH.value,
      homography_rotation=HOMOGRAPHY_ROTATION.value, homography_scale=HOMOGRAPHY_SCALE.value,
      homography_shift=HOMOGRAPHY_SHIFT.value, spair_split=SPAIR_SPLIT.value,
      spair_limit=SPAIR_LIMIT.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not VISION_MODELS.value:
    raise app.UsageError("--vision_models is required")
  if OUTPUT_DIR.value is None:
    raise app.UsageError("--output_dir is required")
  thresholds = alphas()
  payload = run(thresholds)
  for name, r in payload["models"].items():
    logging.info("%s: %s", name, ", ".join(f"{k} {r[k]:.2f}" for k in r if k.startswith("pck")))
  print(c_score.results_csv(payload["models"], thresholds), end="")


def console_main():
  """The ``vlmsel-correspondence-score`` console command."""
  errors.run(main, "correspondence_score")


if __name__ == "__main__":
  console_main()
