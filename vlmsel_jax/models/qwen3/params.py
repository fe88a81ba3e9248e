"""Key table from transformers' ``Qwen3ForCausalLM`` checkpoints to the NNX ``Qwen3`` state.

The Llama family's table plus the per-head query / key norms. Each entry maps a checkpoint-key
regex to (NNX key template, transform); ``\\1`` in a template is the layer index. The generic
loader (``vlmsel_jax.models.loading``) does the rest.
"""

from __future__ import annotations

from vlmsel_jax.models.llama import params as llama_params
from vlmsel_jax.models.qwen3 import modeling
from vlmsel_jax.models.transforms import Transform

_LAYER = r"model\.layers\.([0-9]+)\."


def key_table(config: modeling.Qwen3Config) -> dict[str, tuple[str | None, Transform]]:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``."""
  return {
      **llama_params.key_table(config),
      _LAYER + r"self_attn\.q_norm\.weight": (r"layers.\1.attn.q_norm.scale", Transform.SCALE),
      _LAYER + r"self_attn\.k_norm\.weight": (r"layers.\1.attn.k_norm.scale", Transform.SCALE),
  }
