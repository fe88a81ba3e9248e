"""Qwen3's decoder (``Qwen3ForCausalLM``, ``model_type: qwen3``) as a Flax NNX module.

Qwen3 is the Llama family's decoder with two changes, so its modules subclass the Llama family's
and override only those; it is a family of its own for the loader (config, key table):

* queries and keys are RMS-normed per head (one norm weight of ``head_dim``, shared by the heads)
  after the projection and before the rotation;
* ``head_dim`` is a field of its own (Qwen3-0.6B: 16 heads of 128 on a 1024-wide residual), and
  ``attention_bias`` puts biases on all four attention projections (released checkpoints have
  none).

The numerics follow transformers' torch implementation, so hidden states match it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
from flax import nnx

from vlmsel_jax.models.llama import modeling as llama_modeling
from vlmsel_jax.models.llama.modeling import LlamaConfig, LlamaOutput, RMSNorm

SUPPORTED_MODEL_TYPES = ("qwen3",)
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)

# Qwen3's output is the Llama family's: logits and every hidden state.
Qwen3Output = LlamaOutput


@dataclasses.dataclass(frozen=True)
class Qwen3Config(LlamaConfig):
  """Architecture hyper-parameters of a Qwen3 decoder: ``LlamaConfig``'s fields (``qkv_bias`` and
  ``o_bias`` both follow ``attention_bias``; ``mlp_bias`` is always False)."""

  model_type: str = "qwen3"

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> Qwen3Config:
    """Reads a transformers ``Qwen3Config`` (a dict, ``config.json`` or its directory).

    Understands the transformers 5 ``rope_parameters`` and the older ``rope_theta`` /
    ``rope_scaling`` fields; the sliding window applies only with ``use_sliding_window``, to the
    layers ``layer_types`` (or, without it, ``max_window_layers``) marks, as in transformers.

    Raises:
      ValueError: not a ``qwen3`` config, or a feature this implementation lacks (a RoPE type
        other than default / llama3, partial rotary embeddings, an activation other than SiLU).
    """
    c = llama_modeling.read_hf(config, SUPPORTED_MODEL_TYPES, "a Qwen3 model")
    llama_modeling.require_silu(c, "Qwen3")
    # The llama family's reader: default and llama3 RoPE, anything else refused by name.
    rope_theta, rope_scaling = llama_modeling._rope_from_hf(c)  # pylint: disable=protected-access
    sliding_window, layer_types = llama_modeling.qwen_sliding_layers(c, c["num_hidden_layers"])
    bias = bool(c.get("attention_bias", False))
    return cls(
        **llama_modeling.hf_sizes(c),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        sliding_window=sliding_window,
        layer_types=layer_types,
        max_position_embeddings=int(c.get("max_position_embeddings", 32768)),
        model_type=c["model_type"],
    )


class Attention(llama_modeling.Attention):
  """The Llama family's grouped-query attention with per-head RMSNorms on queries and keys
  before the rotation; ``_attend``, ``prefill`` and ``decode`` are the Llama family's."""

  def __init__(self, config: Qwen3Config, *, dtype: Any, rngs: nnx.Rngs):
    super().__init__(config, dtype=dtype, rngs=rngs)
    self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype)
    self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype)

  def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v = super()._qkv(x)
    return self.q_norm(q), self.k_norm(k), v


class DecoderLayer(llama_modeling.DecoderLayer):
  """The Llama family's pre-norm layer around Qwen3's attention."""

  attention_class = Attention


class Qwen3(llama_modeling.Llama):
  """A Qwen3 causal language model: the Llama family's forward pass, ``prefill`` and ``decode``
  over Qwen3's layers."""

  layer_class = DecoderLayer
