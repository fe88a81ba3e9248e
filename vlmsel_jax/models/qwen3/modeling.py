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
import jax.numpy as jnp
from flax import nnx

from vlmsel_jax.models import hf_config
from vlmsel_jax.models.llama import modeling as llama_modeling
from vlmsel_jax.models.llama.modeling import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    LlamaConfig,
    LlamaOutput,
    RMSNorm,
    rotate_half,
)

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
    c = dict(hf_config.read_config(config))
    model_type = c.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type {model_type!r} is not a Qwen3 model; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    act = c.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"hidden_act {act!r} is not supported; Qwen3 uses 'silu'")
    num_heads = c["num_attention_heads"]
    num_layers = c["num_hidden_layers"]
    # The llama family's reader: default and llama3 RoPE, anything else refused by name.
    rope_theta, rope_scaling = llama_modeling._rope_from_hf(c)  # pylint: disable=protected-access
    sliding_window = c.get("sliding_window") if c.get("use_sliding_window", False) else None
    layer_types = c.get("layer_types") or [
        SLIDING_ATTENTION if sliding_window is not None and i >= c.get("max_window_layers", 28)
        else FULL_ATTENTION for i in range(num_layers)]
    bias = bool(c.get("attention_bias", False))
    return cls(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=c.get("num_key_value_heads") or num_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // num_heads,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        sliding_window=sliding_window,
        layer_types=tuple(layer_types),
        max_position_embeddings=int(c.get("max_position_embeddings", 32768)),
        model_type=model_type,
    )


class Attention(llama_modeling.Attention):
  """The Llama family's grouped-query attention with per-head RMSNorms on queries and keys
  before the rotation; ``_attend``, ``prefill`` and ``decode`` are the Llama family's."""

  def __init__(self, config: Qwen3Config, *, dtype: Any, rngs: nnx.Rngs):
    super().__init__(config, dtype=dtype, rngs=rngs)
    self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype)
    self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype)

  def _rotated_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
    b, t, _ = x.shape
    kv, dh = self.num_kv_heads, self.head_dim
    q = self.q_norm(self.q_proj(x).reshape(b, t, self.num_heads, dh))
    k = self.k_norm(self.k_proj(x).reshape(b, t, kv, dh))
    v = self.v_proj(x).reshape(b, t, kv, dh)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


class DecoderLayer(llama_modeling.DecoderLayer):
  """The Llama family's pre-norm layer around Qwen3's attention."""

  def __init__(self, config: Qwen3Config, *, dtype: Any,
               rngs: nnx.Rngs):  # pylint: disable=super-init-not-called
    self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.mlp = llama_modeling.MLP(config, dtype=dtype, rngs=rngs)


class Qwen3(llama_modeling.Llama):
  """A Qwen3 causal language model: the Llama family's forward pass, ``prefill`` and ``decode``
  over Qwen3's layers."""

  def __init__(self, config: Qwen3Config, *, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):  # pylint: disable=super-init-not-called
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                  param_dtype=dtype, rngs=rngs)
    self.layers = nnx.List(
        [DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    # A tied model has no separate head: logits come from the embedding table itself.
    self.lm_head = None if config.tie_word_embeddings else nnx.Linear(
        config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype,
        rngs=rngs)
