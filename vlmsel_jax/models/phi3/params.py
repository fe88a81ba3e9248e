"""Key table from transformers' ``Phi3ForCausalLM`` checkpoints to the NNX ``Phi3`` state.

The fused ``qkv_proj`` and ``gate_up_proj`` map whole onto the module's fused projections. Each
entry maps a checkpoint-key regex to (NNX key template, transform); ``\\1`` in a template is the
layer index. The generic loader (``vlmsel_jax.models.loading``) does the rest.
"""

from __future__ import annotations

from vlmsel_jax.models.llama import params as llama_params
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
      **llama_params.norm_and_head_keys(config),
  }
