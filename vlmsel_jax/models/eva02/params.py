"""Key table from timm's EVA-02 state dicts (``model.state_dict()``, what timm's ``save_for_hf``
and the Hub's timm repos hold) to the NNX ``Eva02`` state.

The classifier ``head`` is skipped by name: the tower is the image encoder, its pre-logits are
``pooler_output``. The key bias of a fused ``qkv`` is a non-persistent zero buffer, never saved.
"""

from __future__ import annotations

from vlmsel_jax.models import transforms
from vlmsel_jax.models.eva02 import modeling
from vlmsel_jax.models.transforms import Transform

Table = transforms.Table
_linear = transforms.linear_keys
_norm = transforms.layer_norm_keys


def key_table(config: modeling.Eva02Config) -> Table:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``."""
  del config  # One table serves every EVA-02: keys a config lacks are reported by the loader.
  block = r"blocks\.([0-9]+)\."
  return {
      r"cls_token": ("cls_token", Transform.EMBED),
      r"pos_embed": ("pos_embed", Transform.EMBED),
      r"patch_embed\.proj\.weight": ("patch_embed.kernel", Transform.CONV),
      r"patch_embed\.proj\.bias": ("patch_embed.bias", Transform.BIAS),
      **_norm(block + r"norm1", r"layers.\1.norm1"),
      **_norm(block + r"norm2", r"layers.\1.norm2"),
      block + r"attn\.qkv\.weight": (r"layers.\1.attn.qkv.kernel", Transform.LINEAR),
      block + r"attn\.q_bias": (r"layers.\1.attn.q_bias", Transform.BIAS),
      block + r"attn\.v_bias": (r"layers.\1.attn.v_bias", Transform.BIAS),
      **_linear(block + r"attn\.q_proj", r"layers.\1.attn.q_proj"),
      **_linear(block + r"attn\.k_proj", r"layers.\1.attn.k_proj"),
      **_linear(block + r"attn\.v_proj", r"layers.\1.attn.v_proj"),
      **_linear(block + r"attn\.proj", r"layers.\1.attn.o_proj"),
      # Packed SwiGLU (tiny, small): one fc1 whose first half is the gate.
      **_linear(block + r"mlp\.fc1", r"layers.\1.mlp.gate_up_proj"),
      # Sub-LN SwiGLU (base, large).
      **_linear(block + r"mlp\.fc1_g", r"layers.\1.mlp.gate_proj"),
      **_linear(block + r"mlp\.fc1_x", r"layers.\1.mlp.up_proj"),
      **_norm(block + r"mlp\.norm", r"layers.\1.mlp.norm"),
      **_linear(block + r"mlp\.fc2", r"layers.\1.mlp.down_proj"),
      **_norm(r"norm", "final_norm"),
      **_norm(r"fc_norm", "fc_norm"),
      r"head\.(?:weight|bias)": (None, Transform.SKIP),
  }
