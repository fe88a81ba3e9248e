"""Key table from transformers' SigLIP2 NaFlex checkpoints to the NNX ``Siglip2Vit`` state.

The keys are SigLIP's (``vit.key_table`` of the siglip variant: ``vision_model.``-prefixed in a
full ``Siglip2Model``, the text tower and ``logit_scale`` / ``logit_bias`` skipped), except that
``embeddings.patch_embedding`` is an ``nn.Linear`` here, not a convolution.
"""

from __future__ import annotations

from vlmsel_jax.models import transforms
from vlmsel_jax.models.transforms import Transform
from vlmsel_jax.models.vit import modeling as vit_modeling
from vlmsel_jax.models.vit import params as vit_params


def key_table(config: vit_modeling.VitConfig) -> transforms.Table:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``."""
  return {pattern: ((target, Transform.LINEAR) if target == "patch_embed.kernel"
                    else (target, rule))
          for pattern, (target, rule) in vit_params.key_table(config).items()}
