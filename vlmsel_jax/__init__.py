"""vlmsel_jax: choose the vision encoder (and LLM) of a vision-language model before training.

Training-free scores (``vlmsel_jax.scores``), ranking metrics (``vlmsel_jax.scoring.metrics``) and
absl binaries (``python -m vlmsel_jax.score``) live in this package.
"""

__version__ = "0.1.0"
