"""The uncertainty flags, shared by ``score`` and ``select --method=judge``.

Each is defined through ``flag_util.shared`` with one default, so a binary that imports both
users gets one flag; ``options`` turns them into ``uncertainty.UncertaintyOptions``.
"""

from __future__ import annotations

from absl import flags

from vlmsel_jax.runtime import flag_util
from vlmsel_jax.scoring import uncertainty

_DEFAULTS = uncertainty.UncertaintyOptions()

BOOTSTRAP = flag_util.shared(
    flags.DEFINE_integer, "bootstrap", _DEFAULTS.bootstrap, "Bootstrap replicates: over the "
    "paired samples for every score's 95% (--confidence) percentile interval and its ranking "
    "stability, and over the candidates for every judgement's interval; 0 = none.",
    lower_bound=0)
PERMUTATIONS = flag_util.shared(
    flags.DEFINE_integer, "permutations", _DEFAULTS.permutations, "Permutations of the null: "
    "the pairing of image and text rows shuffled (a score's p-value against no shared "
    "structure), and of scores against the ground truth (a judgement's p-value); 0 = none.",
    lower_bound=0)
CONFIDENCE = flag_util.shared(
    flags.DEFINE_float, "confidence", _DEFAULTS.confidence, "Level of every interval.",
    lower_bound=0.5, upper_bound=0.999)


def options(seed: int, **overrides) -> uncertainty.UncertaintyOptions:
  """The flags' options with ``seed`` (a bad combination is a one-line ValueError)."""
  return uncertainty.UncertaintyOptions(bootstrap=BOOTSTRAP.value,
                                        permutations=PERMUTATIONS.value,
                                        confidence=CONFIDENCE.value, seed=seed, **overrides)
