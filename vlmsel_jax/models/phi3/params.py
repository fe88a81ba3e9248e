"""Key table from transformers' ``Phi3ForCausalLM`` checkpoints to the NNX ``Phi3`` state.

The fused ``qkv_proj`` and ``gate_up_proj`` map whole onto the module's fused projections. Each
entry maps a checkpoint-key regex to (NNX key template, transform); ``\\1`` in a template is the
layer index. The generic loader (``vlmsel_jax.models.loading``) does the rest.
"""

from __future__ import annotations

from vlmsel_jax.models.phi3 import modeling
from vlmsel_jax.models.transforms import Transform

_LAYER = r"model\.layers\.([0-9]+)\."


def key_table(config: modeling.Phi3Config) -> dict[str, tuple[str | None, Transform]]:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``."""
  return {
      r"model\.embed_tokens\.weight": ("embed_tokens.embedding", Transform.EMBED),
      _LAYER + r"self_attn\.qkv_proj\.weight": (r"layers.\1.attn.qkv_proj.kernel",
                                                Transform.LINEAR),
      _LAYER + r"self_attn\.o_proj\.weight": (r"layers.\1.attn.o_proj.kernel", Transform.LINEAR),
      _LAYER + r"mlp\.gate_up_proj\.weight": (r"layers.\1.mlp.gate_up_proj.kernel",
                                              Transform.LINEAR),
      _LAYER + r"mlp\.down_proj\.weight": (r"layers.\1.mlp.down_proj.kernel", Transform.LINEAR),
      _LAYER + r"input_layernorm\.weight": (r"layers.\1.input_norm.scale", Transform.SCALE),
      _LAYER + r"post_attention_layernorm\.weight": (r"layers.\1.post_attn_norm.scale",
                                                     Transform.SCALE),
      r"model\.norm\.weight": ("final_norm.scale", Transform.SCALE),
      # Tied: logits come from the embedding, so a saved lm_head copy is ignored, as in
      # transformers.
      r"lm_head\.weight": ((None, Transform.SKIP) if config.tie_word_embeddings
                           else ("lm_head.kernel", Transform.LINEAR)),
  }
