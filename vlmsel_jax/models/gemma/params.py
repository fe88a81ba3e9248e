"""Key table from transformers' ``GemmaForCausalLM`` / ``Gemma2ForCausalLM`` checkpoints to the
NNX ``Gemma`` state.

Each entry maps a checkpoint-key regex to (NNX key template, transform); ``\\1`` in a template is
the layer index. The generic loader (``vlmsel_jax.models.loading``) does the rest. Norm weights
are stored as transformers stores them (the scale is ``1 + weight``).
"""

from __future__ import annotations

from vlmsel_jax.models.gemma import modeling
from vlmsel_jax.models.gemma3 import params as gemma3_params
from vlmsel_jax.models.transforms import Transform

_LAYER = r"model\.layers\.([0-9]+)\."


def key_table(config: modeling.GemmaConfig) -> dict[str, tuple[str | None, Transform]]:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``.

  Gemma 3's table (same checkpoint names, same NNX names) without what the model lacks: the
  query/key norms, and in Gemma 1 the feed-forward norms. Biases when the config has them.
  """
  absent = {"attn.q_norm", "attn.k_norm"}
  if not config.sandwich_norms:
    absent |= {"pre_mlp_norm", "post_mlp_norm"}
  table = {pattern: (target, transform)
           for pattern, (target, transform) in gemma3_params.key_table(config).items()
           if target is None or not any(f".{name}." in target for name in absent)}
  if config.attention_bias:
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      table[_LAYER + rf"self_attn\.{proj}\.bias"] = (rf"layers.\1.attn.{proj}.bias",
                                                      Transform.BIAS)
  return table
