"""Key table from transformers' Llama / Qwen2 / Mistral checkpoints to the NNX ``Llama`` state.

Each entry maps a checkpoint-key regex to (NNX key template, transform); ``\\1`` in a template is
the layer index. The generic loader (``vlmsel_jax.models.loading``) does the rest.
"""

from __future__ import annotations

from vlmsel_jax.models.llama import modeling
from vlmsel_jax.models.transforms import Transform

_LAYER = r"model\.layers\.([0-9]+)\."


def key_table(config: modeling.LlamaConfig) -> dict[str, tuple[str | None, Transform]]:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``."""
  return {
      r"model\.embed_tokens\.weight": ("embed_tokens.embedding", Transform.EMBED),
      _LAYER + r"self_attn\.q_proj\.weight": (r"layers.\1.attn.q_proj.kernel", Transform.LINEAR),
      _LAYER + r"self_attn\.k_proj\.weight": (r"layers.\1.attn.k_proj.kernel", Transform.LINEAR),
      _LAYER + r"self_attn\.v_proj\.weight": (r"layers.\1.attn.v_proj.kernel", Transform.LINEAR),
      _LAYER + r"self_attn\.o_proj\.weight": (r"layers.\1.attn.o_proj.kernel", Transform.LINEAR),
      _LAYER + r"self_attn\.q_proj\.bias": (r"layers.\1.attn.q_proj.bias", Transform.BIAS),
      _LAYER + r"self_attn\.k_proj\.bias": (r"layers.\1.attn.k_proj.bias", Transform.BIAS),
      _LAYER + r"self_attn\.v_proj\.bias": (r"layers.\1.attn.v_proj.bias", Transform.BIAS),
      _LAYER + r"self_attn\.o_proj\.bias": (r"layers.\1.attn.o_proj.bias", Transform.BIAS),
      _LAYER + r"mlp\.gate_proj\.weight": (r"layers.\1.mlp.gate_proj.kernel", Transform.LINEAR),
      _LAYER + r"mlp\.up_proj\.weight": (r"layers.\1.mlp.up_proj.kernel", Transform.LINEAR),
      _LAYER + r"mlp\.down_proj\.weight": (r"layers.\1.mlp.down_proj.kernel", Transform.LINEAR),
      _LAYER + r"mlp\.gate_proj\.bias": (r"layers.\1.mlp.gate_proj.bias", Transform.BIAS),
      _LAYER + r"mlp\.up_proj\.bias": (r"layers.\1.mlp.up_proj.bias", Transform.BIAS),
      _LAYER + r"mlp\.down_proj\.bias": (r"layers.\1.mlp.down_proj.bias", Transform.BIAS),
      **norm_and_head_keys(config),
  }


def norm_and_head_keys(config: modeling.LlamaConfig) -> dict[str, tuple[str | None, Transform]]:
  """The table's entries for the two norms of each layer, the final norm and the LM head (also
  Phi-3's)."""
  return {
      _LAYER + r"input_layernorm\.weight": (r"layers.\1.input_norm.scale", Transform.SCALE),
      _LAYER + r"post_attention_layernorm\.weight": (r"layers.\1.post_attn_norm.scale",
                                                     Transform.SCALE),
      r"model\.norm\.weight": ("final_norm.scale", Transform.SCALE),
      # Tied: the model reads logits off the embedding, so a saved lm_head copy is ignored, as
      # transformers ignores it.
      r"lm_head\.weight": ((None, Transform.SKIP) if config.tie_word_embeddings
                           else ("lm_head.kernel", Transform.LINEAR)),
  }
