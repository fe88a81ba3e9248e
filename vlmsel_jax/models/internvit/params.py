"""Key table from transformers' InternVL vision checkpoints to the NNX ``InternVit`` state.

An ``InternVLVisionModel`` checkpoint holds the tower's keys bare; an
``InternVLForConditionalGeneration`` one (model_type ``internvl``) holds them under
``vision_tower.`` (``model.vision_tower.`` in transformers' in-memory naming), next to the
projector and the language model, which are skipped by name so that a stray key is still an error.
"""

from __future__ import annotations

import re
from typing import Callable

from vlmsel_jax.models import transforms
from vlmsel_jax.models.internvit import modeling
from vlmsel_jax.models.transforms import Transform

Table = transforms.Table
_linear = transforms.linear_keys


def _norm(prefix: str, target: str) -> Table:
  """A LayerNorm (weight and bias) or an RMSNorm (weight only): both land on ``scale``."""
  return {
      prefix + r"\.weight": (target + ".scale", Transform.SCALE),
      prefix + r"\.bias": (target + ".bias", Transform.BIAS),
  }


def key_table(config: modeling.InternVitConfig) -> Table:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``."""
  p = r"(?:model\.)?vision_tower\." if config.model_type == "internvl" else ""
  layer = p + r"encoder\.layer\.([0-9]+)\."
  table: Table = {
      p + r"embeddings\.cls_token": ("cls_token", Transform.EMBED),
      p + r"embeddings\.position_embeddings": ("pos_embed", Transform.EMBED),
      p + r"embeddings\.patch_embeddings\.projection\.weight": ("patch_embed.kernel",
                                                                 Transform.CONV),
      p + r"embeddings\.patch_embeddings\.projection\.bias": ("patch_embed.bias", Transform.BIAS),
      # Masked-image-modelling pre-training only; inference never masks.
      p + r"embeddings\.mask_token": (None, Transform.SKIP),
      **_linear(layer + r"attention\.q_proj", r"layers.\1.attn.q_proj"),
      **_linear(layer + r"attention\.k_proj", r"layers.\1.attn.k_proj"),
      **_linear(layer + r"attention\.v_proj", r"layers.\1.attn.v_proj"),
      **_linear(layer + r"attention\.projection_layer", r"layers.\1.attn.o_proj"),
      layer + r"attention\.q_norm\.weight": (r"layers.\1.attn.q_norm.scale", Transform.SCALE),
      layer + r"attention\.k_norm\.weight": (r"layers.\1.attn.k_norm.scale", Transform.SCALE),
      **_norm(layer + r"layernorm_before", r"layers.\1.norm1"),
      **_norm(layer + r"layernorm_after", r"layers.\1.norm2"),
      layer + r"lambda_1": (r"layers.\1.layer_scale1", Transform.SCALE),
      layer + r"lambda_2": (r"layers.\1.layer_scale2", Transform.SCALE),
      **_linear(layer + r"mlp\.fc1", r"layers.\1.mlp.fc1"),
      **_linear(layer + r"mlp\.fc2", r"layers.\1.mlp.fc2"),
      **_norm(p + r"layernorm", "final_norm"),
  }
  if config.model_type == "internvl":
    table.update({pattern: (None, Transform.SKIP) for pattern in _NOT_THE_TOWER})
  return table


# What a whole InternVL checkpoint holds besides the tower.
_NOT_THE_TOWER = (r"(?:model\.)?multi_modal_projector\..+", r"(?:model\.)?language_model\..+",
                  r"lm_head\..+")
_NOT_THE_TOWER_RE = re.compile("|".join(f"(?:{p})" for p in _NOT_THE_TOWER))


def reads_key(config: modeling.InternVitConfig) -> Callable[[str], bool]:
  """The checkpoint keys worth reading: of a whole InternVL checkpoint, all but the projector's
  and the language model's (which the table skips); of a tower checkpoint, every key. Any other
  key is still read, and so reported when the table does not know it."""
  if config.model_type != "internvl":
    return lambda key: True
  return lambda key: _NOT_THE_TOWER_RE.fullmatch(key) is None
