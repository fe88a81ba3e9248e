"""Gemma 3's text decoder (``Gemma3ForCausalLM``, ``model_type: gemma3_text``) as a Flax NNX module.

Gemma 3 shares the Llama family's skeleton (token embedding, rotary embeddings, grouped-query
attention, gated MLP, tied LM head), so its modules subclass the Llama family's and override
what Gemma changes; it is a family of its own for the loader (config, key table):

* RMSNorm scales by ``1 + weight`` and rounds once, after scaling, in float32;
* the token embeddings are multiplied by sqrt(hidden_size) (text tokens only: a VLM's projected
  image tokens enter unscaled, as in transformers' Gemma 3 VLM);
* queries and keys are RMS-normed per head before the rotation, and attention scores are scaled
  by ``query_pre_attn_scalar ** -0.5`` rather than ``head_dim ** -0.5``;
* every layer norms the attention and MLP outputs too (four norms per layer);
* the MLP is GeGLU with tanh-approximated GELU;
* sliding-window layers (five of every six) and full-attention layers use different RoPE bases.

The numerics follow transformers' torch implementation, so hidden states match it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmsel_jax.models.llama import modeling as llama_modeling
from vlmsel_jax.models.llama.modeling import FULL_ATTENTION, SLIDING_ATTENTION, LlamaOutput

SUPPORTED_MODEL_TYPES = ("gemma3_text",)
SUPPORTED_ARCHITECTURES = ("Gemma3ForCausalLM",)
ROPE_TYPES = ("default", "linear")

# Gemma 3's output is the Llama family's: logits and every hidden state.
Gemma3Output = LlamaOutput


@dataclasses.dataclass(frozen=True)
class Gemma3Config(llama_modeling.DecoderConfig):
  """Architecture hyper-parameters of a Gemma 3 text decoder: ``DecoderConfig``'s sizes and
  shared fields (every sixth layer global by default; a tied LM head), plus:

  Attributes:
    query_pre_attn_scalar: Attention scores are scaled by its inverse square root.
    rope_local_theta: RoPE base of the sliding-window layers.
    rope_factor: Linear RoPE scaling of the full-attention layers (1: none).
    rope_local_factor: Linear RoPE scaling of the sliding-window layers (1: none).
    final_logit_softcapping: Logits become ``c·tanh(z/c)`` when set.
  """

  query_pre_attn_scalar: float
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  rope_local_theta: float = 10_000.0
  rope_factor: float = 1.0
  rope_local_factor: float = 1.0
  sliding_window: int = 4096
  layer_types: tuple[str, ...] = ()
  final_logit_softcapping: float | None = None
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 32768
  model_type: str = "gemma3_text"
  attention_impl: str = "auto"
  remat: bool = False

  def __post_init__(self):
    # transformers' default: every sixth layer attends globally.
    self._check_layout(tuple(FULL_ATTENTION if (i + 1) % 6 == 0 else SLIDING_ATTENTION
                             for i in range(self.num_layers)))
    if self.sliding_window < 1:
      raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> Gemma3Config:
    """Reads a transformers ``Gemma3TextConfig`` (a dict, ``config.json`` or its directory).

    Understands the transformers 5 per-layer-type ``rope_parameters`` and the older
    ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` fields.

    Raises:
      ValueError: not a ``gemma3_text`` config, or a feature this implementation lacks
        (bidirectional attention, a RoPE type other than default / linear, an activation other
        than tanh-approximated GELU, attention biases or attention-logit soft-capping).
    """
    c = llama_modeling.read_hf(config, SUPPORTED_MODEL_TYPES, "a Gemma 3 text model")
    act = c.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
      raise ValueError(f"hidden_activation {act!r} is not supported; Gemma 3 uses "
                       "'gelu_pytorch_tanh'")
    if c.get("use_bidirectional_attention", False):
      raise ValueError("use_bidirectional_attention is not supported; only the causal decoder is")
    if c.get("attn_logit_softcapping") is not None:
      # transformers' Gemma3Attention never applies it, so no checkpoint was trained with it.
      raise ValueError("attn_logit_softcapping is not supported; Gemma 3 attention has none")
    if c.get("attention_bias", False):
      raise ValueError("attention_bias is not supported; Gemma 3 has none")
    (theta, factor), (local_theta, local_factor) = _rope_from_hf(c)
    return cls(
        **llama_modeling.hf_sizes(c),
        query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", 256)),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_local_theta=local_theta,
        rope_factor=factor,
        rope_local_factor=local_factor,
        sliding_window=int(c.get("sliding_window") or 4096),
        layer_types=tuple(c.get("layer_types") or ()),
        final_logit_softcapping=c.get("final_logit_softcapping"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
        max_position_embeddings=int(c.get("max_position_embeddings", 32768)),
        model_type=c["model_type"],
    )


def _rope_from_hf(c: Mapping[str, Any]) -> tuple[tuple[float, float], tuple[float, float]]:
  """((theta, linear factor) of full-attention layers, (theta, factor) of sliding layers)."""
  params = c.get("rope_parameters")
  if isinstance(params, Mapping) and any(isinstance(v, Mapping) for v in params.values()):
    per_type = {k: dict(v or {}) for k, v in params.items()}
  else:  # The older layout: one rope_scaling for the global layers, a base for the local ones.
    scaling = dict(params or c.get("rope_scaling") or {})
    per_type = {
        FULL_ATTENTION: {**scaling, "rope_theta": scaling.get(
            "rope_theta", c.get("rope_theta", 1_000_000.0))},
        SLIDING_ATTENTION: {"rope_type": "default",
                            "rope_theta": c.get("rope_local_base_freq", 10_000.0)},
    }

  def one(kind: str, default_theta: float) -> tuple[float, float]:
    p = per_type.get(kind) or {}
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"{kind} rope_type {rope_type!r} is not implemented; supported: "
                       f"{', '.join(ROPE_TYPES)}")
    factor = float(p.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return float(p.get("rope_theta", default_theta)), factor

  return one(FULL_ATTENTION, 1_000_000.0), one(SLIDING_ATTENTION, 10_000.0)


def rope_inv_freq(head_dim: int, theta: float, factor: float = 1.0) -> np.ndarray:
  """RoPE inverse frequencies (head_dim // 2,) in float32, as transformers computes them; the
  linear scaling divides them by ``factor``."""
  inv_freq = np.float32(1.0) / (
      np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
  return (inv_freq / np.float32(factor)).astype(np.float32)


class RMSNorm(nnx.Module):
  """Gemma's RMSNorm: ``x / rms(x) · (1 + weight)``, all in float32, rounded once at the end."""

  def __init__(self, dim: int, eps: float, *, dtype: Any):
    # Zero-initialised, like transformers: a fresh norm is the identity scaling.
    self.scale = nnx.Param(jnp.zeros((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


class Attention(llama_modeling.Attention):
  """The Llama family's grouped-query attention with per-head query/key norms before the
  rotation and scores scaled by ``query_pre_attn_scalar ** -0.5``; ``_attend``, ``prefill`` and
  ``decode`` are the Llama family's."""

  def __init__(self, config: Gemma3Config, *, dtype: Any, rngs: nnx.Rngs):
    c = config
    # No biases: Gemma 3 has none (from_hf refuses attention_bias).
    super().__init__(llama_modeling.attention_config(c), dtype=dtype, rngs=rngs)
    self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype)
    self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype)
    self.scaling = c.query_pre_attn_scalar ** -0.5

  def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v = super()._qkv(x)
    return self.q_norm(q), self.k_norm(k), v


class MLP(nnx.Module):
  """GeGLU feed-forward block: down(gelu_tanh(gate(x)) * up(x))."""

  def __init__(self, config: Gemma3Config, *, dtype: Any, rngs: nnx.Rngs):
    c = config
    kw = dict(use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.gate_proj = nnx.Linear(c.hidden_size, c.intermediate_size, **kw)
    self.up_proj = nnx.Linear(c.hidden_size, c.intermediate_size, **kw)
    self.down_proj = nnx.Linear(c.intermediate_size, c.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """x + post_attn_norm(attn(input_norm(x))), then h + post_mlp_norm(mlp(pre_mlp_norm(h))).

  Gemma 2's layer (``vlmsel_jax.models.gemma``) names its own attention in ``attention_class``.
  """

  attention_class: type[nnx.Module] = Attention

  def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
    c = config
    self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
    self.attn = self.attention_class(c, dtype=dtype, rngs=rngs)
    self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
    self.pre_mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
    self.mlp = MLP(c, dtype=dtype, rngs=rngs)
    self.post_mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)

  def _mlp_block(self, h: jax.Array) -> jax.Array:
    return h + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(h)))

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    return self._mlp_block(x + self.post_attn_norm(self.attn(self.input_norm(x), cos, sin, mask)))

  def prefill(self, x, cos, sin, mask):
    a, cache = self.attn.prefill(self.input_norm(x), cos, sin, mask)
    return self._mlp_block(x + self.post_attn_norm(a)), cache

  def decode(self, x, cos, sin, mask, cache, index):
    a, cache = self.attn.decode(self.input_norm(x), cos, sin, mask, cache, index)
    return self._mlp_block(x + self.post_attn_norm(a)), cache


class Gemma3(llama_modeling.Llama):
  """A Gemma 3 causal language model (text only).

  The forward pass, ``prefill`` and ``decode`` are the Llama family's; Gemma's layers, its
  scaled text embeddings, per-kind RoPE bases and logit soft-capping are what differ.
  """

  layer_class = DecoderLayer
  norm_class = RMSNorm

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """(batch, seq, hidden) text-token embeddings, scaled by sqrt(hidden_size).

    The scale is rounded to the parameter dtype first, as transformers does (bfloat16 turns
    sqrt(640) = 25.298 into 25.25). ``inputs_embeds`` passed to the forward pass are used as
    given, unscaled: a VLM builds its text rows with ``embed`` and splices image tokens in.
    """
    scale = jnp.asarray(np.float32(self.config.hidden_size) ** np.float32(0.5)).astype(self.dtype)
    return self.embed_tokens(input_ids) * scale

  def _inv_freq(self, kind: str) -> np.ndarray:
    c = self.config
    if kind == SLIDING_ATTENTION:
      return rope_inv_freq(c.head_dim, c.rope_local_theta, c.rope_local_factor)
    return rope_inv_freq(c.head_dim, c.rope_theta, c.rope_factor)

  def _logits(self, x: jax.Array) -> jax.Array:
    return _softcap(super()._logits(x), self.config.final_logit_softcapping)
