"""Key table from transformers' ``Gemma3ForCausalLM`` checkpoints to the NNX ``Gemma3`` state.

Each entry maps a checkpoint-key regex to (NNX key template, transform); ``\\1`` in a template is
the layer index. The generic loader (``vlmsel_jax.models.loading``) does the rest. Norm weights
are stored as transformers stores them (the scale is ``1 + weight``).
"""

from __future__ import annotations

from vlmsel_jax.models.gemma3 import modeling
from vlmsel_jax.models.transforms import Transform

_LAYER = r"model\.layers\.([0-9]+)\."


def key_table(config: modeling.Gemma3Config) -> dict[str, tuple[str | None, Transform]]:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``."""
  table = {
      r"model\.embed_tokens\.weight": ("embed_tokens.embedding", Transform.EMBED),
      r"model\.norm\.weight": ("final_norm.scale", Transform.SCALE),
      # Tied: logits come from the embedding, so a saved lm_head copy is ignored, as in
      # transformers.
      r"lm_head\.weight": ((None, Transform.SKIP) if config.tie_word_embeddings
                           else ("lm_head.kernel", Transform.LINEAR)),
  }
  for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
    table[_LAYER + rf"self_attn\.{proj}\.weight"] = (rf"layers.\1.attn.{proj}.kernel",
                                                      Transform.LINEAR)
  for proj in ("gate_proj", "up_proj", "down_proj"):
    table[_LAYER + rf"mlp\.{proj}\.weight"] = (rf"layers.\1.mlp.{proj}.kernel", Transform.LINEAR)
  norms = {
      r"self_attn\.q_norm": "attn.q_norm",
      r"self_attn\.k_norm": "attn.k_norm",
      r"input_layernorm": "input_norm",
      r"post_attention_layernorm": "post_attn_norm",
      r"pre_feedforward_layernorm": "pre_mlp_norm",
      r"post_feedforward_layernorm": "post_mlp_norm",
  }
  for hf, ours in norms.items():
    table[_LAYER + hf + r"\.weight"] = (rf"layers.\1.{ours}.scale", Transform.SCALE)
  return table
