"""The C-score flags of the binaries that compute it (``correspondence_score``, ``score``).

Defined once, here, at import; ``record_options`` turns them into ``c_score.load_records``'s
keyword arguments.
"""

from __future__ import annotations

from typing import Any

from absl import flags

from vlmsel_jax.data import correspondence as data
from vlmsel_jax.scoring import c_score

C_SCORE_PAIRS = flags.DEFINE_string(
    "c_score_pairs", None, "Keypoint pairs of the C score (PCK@0.10 of patch-feature "
    f"correspondence): {', '.join(c_score.PAIR_SOURCES)} (homography: warps of the bundled "
    "photos; stereo: the Middlebury motorcycle pair; spair: an SPair-71k tree). score: also "
    "compute the C score of every --vision_models candidate, each read at its variant's layer, "
    "else the second-to-last (unset: no C score). correspondence_score: unset means homography.")
C_SCORE_IMAGES = flags.DEFINE_list("c_score_images", list(data.PHOTOS),
                                   "Photos (skimage.data) warped for --c_score_pairs=homography.")
C_SCORE_PAIRS_PER_IMAGE = flags.DEFINE_integer(
    "c_score_pairs_per_image", 5, "Homographies per photo (--c_score_pairs=homography).",
    lower_bound=1)
C_SCORE_KEYPOINTS = flags.DEFINE_integer(
    "c_score_keypoints", 50, "Keypoints per synthetic pair (homography, stereo).", lower_bound=1)


def record_options(seed: int) -> dict[str, Any]:
  """``c_score.load_records``' options from the flags, drawn with ``seed``."""
  return dict(seed=seed, homography_images=tuple(C_SCORE_IMAGES.value),
              pairs_per_image=C_SCORE_PAIRS_PER_IMAGE.value,
              num_keypoints=C_SCORE_KEYPOINTS.value)
