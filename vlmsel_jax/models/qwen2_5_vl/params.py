"""Key table from a Qwen2.5-VL checkpoint to the NNX ``Qwen25VisionTower`` state.

A whole ``Qwen2_5_VLForConditionalGeneration`` checkpoint holds the tower under ``visual.`` (the
original naming, which transformers 5's ``save_pretrained`` writes back) or ``model.visual.``
(transformers' in-memory naming, which some re-saved checkpoints carry), next to the language
model, which is skipped by name in either naming, so that a stray key is still an error. ``reads_key`` tells the
loader not to read the language model's tensors at all: they are most of the file.
"""

from __future__ import annotations

import re
from typing import Callable

from vlmsel_jax.models import transforms
from vlmsel_jax.models.qwen2_5_vl import modeling
from vlmsel_jax.models.transforms import Transform

Table = transforms.Table
_linear = transforms.linear_keys

VISUAL = r"(?:model\.)?visual\."
# The language model's keys in either naming: model.layers.* / model.embed_tokens.* /
# model.norm.* (original), model.language_model.* (in-memory), and the head.
LANGUAGE_MODEL = (r"model\.(?:layers|embed_tokens|norm)\..+", r"model\.language_model\..+",
                  r"lm_head\..+")
_LANGUAGE_MODEL = re.compile("|".join(f"(?:{p})" for p in LANGUAGE_MODEL))


def key_table(config: modeling.Qwen25VisionConfig) -> Table:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``."""
  del config  # Every Qwen2.5-VL tower has the same keys; the block count is in the regex.
  block = VISUAL + r"blocks\.([0-9]+)\."
  table: Table = {
      # Kept in its torch layout, 5-D: the module sums it over frames (PatchEmbed).
      VISUAL + r"patch_embed\.proj\.weight": ("patch_embed.kernel", Transform.EMBED),
      block + r"norm1\.weight": (r"blocks.\1.norm1.scale", Transform.SCALE),
      block + r"norm2\.weight": (r"blocks.\1.norm2.scale", Transform.SCALE),
      **_linear(block + r"attn\.qkv", r"blocks.\1.attn.qkv"),
      **_linear(block + r"attn\.proj", r"blocks.\1.attn.proj"),
      **_linear(block + r"mlp\.gate_proj", r"blocks.\1.mlp.gate_proj"),
      **_linear(block + r"mlp\.up_proj", r"blocks.\1.mlp.up_proj"),
      **_linear(block + r"mlp\.down_proj", r"blocks.\1.mlp.down_proj"),
      VISUAL + r"merger\.ln_q\.weight": ("merger.norm.scale", Transform.SCALE),
      **_linear(VISUAL + r"merger\.mlp\.0", "merger.fc1"),
      **_linear(VISUAL + r"merger\.mlp\.2", "merger.fc2"),
  }
  table.update({pattern: (None, Transform.SKIP) for pattern in LANGUAGE_MODEL})
  return table


def reads_key(config: modeling.Qwen25VisionConfig) -> Callable[[str], bool]:
  """The checkpoint keys worth reading: all but the language model's (which the table skips).

  Any other key is still read, and so reported by the loader when the table does not know it.
  """
  del config
  return lambda key: _LANGUAGE_MODEL.fullmatch(key) is None
