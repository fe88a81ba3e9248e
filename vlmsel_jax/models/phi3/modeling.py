"""Phi-3's decoder (``Phi3ForCausalLM``, ``model_type: phi3``) as a Flax NNX module.

Phi-3 (and Phi-4-mini, also ``phi3``) is the Llama family's decoder with these differences, so its
modules subclass the Llama family's and override them; it is a family of its own for the loader:

* the q/k/v projections are one fused ``qkv_proj`` (queries, then keys, then values) and the
  MLP's gate and up projections one ``gate_up_proj`` (gate half first). They stay fused here, as
  in the checkpoint, transformers and llama.cpp's GGUF files (``attn_qkv``, a 2x ``ffn_up``), so
  every source loads without splitting tensors and the matmuls are transformers' own. LoRA
  targets them by these names (``qkv_proj``, ``gate_up_proj``);
* ``partial_rotary_factor`` rotates only the first ``rotary_dim`` channels of each head;
* ``longrope`` RoPE scaling (Phi-3-*-128k): the inverse frequencies are divided per frequency by
  ``short_factor`` or ``long_factor``, and cos / sin are multiplied by an attention factor. As in
  transformers 5.23, the long factors are used for a whole call when its largest position + 1
  exceeds ``original_max_position_embeddings`` (``jnp.where``, so it works under jit), else the
  short ones; the attention factor applies either way;
* a ``sliding_window``, when configured, applies to every layer (Phi-3-mini-4k: 2047).

Cached decoding (``prefill`` / ``decode``) picks the factors per call like transformers' forward:
a decode step past the switch point uses the long factors for its own token but keeps the keys
cached under the short ones (transformers' ``generate`` re-runs the prompt at that point instead).

The numerics follow transformers' torch implementation, so hidden states match it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmsel_jax.models.llama import modeling as llama_modeling
from vlmsel_jax.models.llama.modeling import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    LlamaConfig,
    LlamaOutput,
)

SUPPORTED_MODEL_TYPES = ("phi3",)
SUPPORTED_ARCHITECTURES = ("Phi3ForCausalLM",)
# transformers' Phi3Config renames the old "su" and "yarn" types to "longrope".
_LONGROPE_ALIASES = ("longrope", "su", "yarn")

# Phi-3's output is the Llama family's: logits and every hidden state.
Phi3Output = LlamaOutput


@dataclasses.dataclass(frozen=True)
class LongRopeScaling:
  """Phi-3's ``longrope`` RoPE scaling.

  Attributes:
    short_factor: One divisor per rotary frequency (``rotary_dim // 2``), used while the
      sequence fits ``original_max_position_embeddings``.
    long_factor: The divisors used beyond it.
    original_max_position_embeddings: The pretraining context; longer calls use ``long_factor``.
    attention_factor: cos and sin are multiplied by it (both regimes).
  """

  short_factor: tuple[float, ...]
  long_factor: tuple[float, ...]
  original_max_position_embeddings: int
  attention_factor: float


@dataclasses.dataclass(frozen=True)
class Phi3Config(LlamaConfig):
  """Architecture hyper-parameters of a Phi-3 decoder.

  ``LlamaConfig``'s fields (without biases, llama3 ``rope_scaling`` or ``rope_freq_factors``;
  every layer ``"sliding_attention"`` when there is a window), plus:

  Attributes:
    rotary_dim: Channels of each head that are rotated (``int(head_dim *
      partial_rotary_factor)``); 0 means ``head_dim``.
    long_rope: ``None`` for plain RoPE, or the ``longrope`` scaling.
  """

  rotary_dim: int = 0
  long_rope: LongRopeScaling | None = None
  model_type: str = "phi3"

  def __post_init__(self):
    super().__post_init__()
    if not self.rotary_dim:
      object.__setattr__(self, "rotary_dim", self.head_dim)
    if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
      raise ValueError(f"rotary_dim {self.rotary_dim} must be even and in 2..head_dim "
                       f"({self.head_dim})")
    if self.rope_scaling is not None or self.rope_freq_factors is not None:
      raise ValueError("Phi-3 has no llama3 rope_scaling or rope_freq_factors; use long_rope")
    if self.qkv_bias or self.o_bias or self.mlp_bias:
      raise ValueError("Phi-3 has no projection biases")
    s = self.long_rope
    if s is not None:
      s = dataclasses.replace(s, short_factor=tuple(float(f) for f in s.short_factor),
                              long_factor=tuple(float(f) for f in s.long_factor))
      object.__setattr__(self, "long_rope", s)
      for name in ("short_factor", "long_factor"):
        factors = getattr(s, name)
        if len(factors) != self.rotary_dim // 2:
          raise ValueError(f"longrope {name} has {len(factors)} entries; rotary_dim "
                           f"{self.rotary_dim} has {self.rotary_dim // 2} frequencies")
        if not all(math.isfinite(f) and f > 0 for f in factors):
          raise ValueError(f"longrope {name} must be positive and finite")

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> Phi3Config:
    """Reads a transformers ``Phi3Config`` (a dict, ``config.json`` or its directory).

    Understands the transformers 5 ``rope_parameters`` and the older ``rope_theta`` /
    ``rope_scaling`` fields (``"su"`` and ``"yarn"`` mean ``"longrope"``, as in transformers).
    ``original_max_position_embeddings`` is the top-level field (4096 when absent), which
    transformers' Phi3Config puts before the one in ``rope_parameters``; a missing ``factor`` is
    ``max_position_embeddings / original_max_position_embeddings`` and a missing
    ``attention_factor`` ``sqrt(1 + ln(factor) / ln(original))`` (1 when factor <= 1), as in
    transformers' ``_compute_longrope_parameters``.

    Raises:
      ValueError: not a ``phi3`` config, or a feature this implementation lacks (a RoPE type
        other than default / longrope, an activation other than SiLU).
    """
    c = llama_modeling.read_hf(config, SUPPORTED_MODEL_TYPES, "a Phi-3 model")
    llama_modeling.require_silu(c, "Phi-3")
    sizes = llama_modeling.hf_sizes(c)
    max_positions = int(c.get("max_position_embeddings", 4096))

    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    if any(isinstance(v, Mapping) for v in params.values()):
      raise ValueError("per-layer-type rope_parameters are not supported by Phi-3")
    rope_theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in _LONGROPE_ALIASES:
      original = int(c.get("original_max_position_embeddings", 4096))
      factor = params.get("factor")
      factor = max_positions / original if factor is None else float(factor)
      attention_factor = params.get("attention_factor")
      if attention_factor is None:
        attention_factor = (1.0 if factor <= 1.0 else
                            math.sqrt(1 + math.log(factor) / math.log(original)))
      long_rope = LongRopeScaling(
          short_factor=tuple(params["short_factor"]), long_factor=tuple(params["long_factor"]),
          original_max_position_embeddings=original, attention_factor=float(attention_factor))
    elif rope_type == "default":
      long_rope = None
    else:
      raise ValueError(f"rope_type {rope_type!r} is not implemented for Phi-3; supported: "
                       "'default', 'longrope'")

    # transformers' Phi3Model switches every layer to the sliding mask when a window is set.
    sliding_window = c.get("sliding_window")
    kind = FULL_ATTENTION if sliding_window is None else SLIDING_ATTENTION
    return cls(
        **sizes,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        rope_theta=rope_theta,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        layer_types=(kind,) * sizes["num_layers"],
        max_position_embeddings=max_positions,
        model_type=c["model_type"],
        rotary_dim=int(sizes["head_dim"] * partial),
        long_rope=long_rope,
    )


def rope_inv_freq(config: Phi3Config, factors: tuple[float, ...] | None = None) -> np.ndarray:
  """The RoPE inverse frequencies (rotary_dim // 2,), float32, as transformers computes them;
  with ``factors``, longrope's ``1 / (factor * base ** (2i / dim))``."""
  dim = config.rotary_dim
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  powers = np.float32(config.rope_theta) ** exponents
  if factors is None:
    return (np.float32(1.0) / powers).astype(np.float32)
  return (np.float32(1.0) / (np.asarray(factors, np.float32) * powers)).astype(np.float32)


class Attention(llama_modeling.Attention):
  """The Llama family's grouped-query attention from one fused ``qkv_proj``, rotating the first
  ``rotary_dim`` channels of each head (the width of ``Phi3._rope``'s tables); ``_attend``,
  ``prefill`` and ``decode`` are the Llama family's."""

  def __init__(self, config: Phi3Config, *, dtype: Any, rngs: nnx.Rngs):
    # The Llama family's constructor sets everything ``_attend`` reads; its separate q/k/v
    # projections are then replaced by the fused one.
    super().__init__(config, dtype=dtype, rngs=rngs)
    del self.q_proj, self.k_proj, self.v_proj
    c = config
    self.qkv_proj = nnx.Linear(
        c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, use_bias=False,
        dtype=dtype, param_dtype=dtype, rngs=rngs)

  def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, t, _ = x.shape
    kv, dh = self.num_kv_heads, self.head_dim
    q_end = self.num_heads * dh
    qkv = self.qkv_proj(x)
    q = qkv[..., :q_end].reshape(b, t, self.num_heads, dh)
    k = qkv[..., q_end:q_end + kv * dh].reshape(b, t, kv, dh)
    v = qkv[..., q_end + kv * dh:].reshape(b, t, kv, dh)
    return q, k, v


class MLP(nnx.Module):
  """SwiGLU from one fused projection: down(up * silu(gate)), gate the first half of gate_up."""

  def __init__(self, config: Phi3Config, *, dtype: Any, rngs: nnx.Rngs):
    c = config
    kw = dict(use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.gate_up_proj = nnx.Linear(c.hidden_size, 2 * c.intermediate_size, **kw)
    self.down_proj = nnx.Linear(c.intermediate_size, c.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
    return self.down_proj(up * jax.nn.silu(gate))


class DecoderLayer(llama_modeling.DecoderLayer):
  """The Llama family's pre-norm layer around Phi-3's attention and MLP (transformers' residual
  dropouts are identities at inference)."""

  attention_class = Attention
  mlp_class = MLP


class Phi3(llama_modeling.Llama):
  """A Phi-3 causal language model: the Llama family's forward pass, ``prefill`` and ``decode``
  over Phi-3's layers and RoPE."""

  layer_class = DecoderLayer

  def _rope(self, positions: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """RoPE (cos, sin) of width ``rotary_dim`` at ``positions``, one table for every layer.

    With longrope, the call's longest extent (largest position + 1) picks short or long factors
    for every row and position, as transformers' ``longrope_frequency_update`` does.
    """
    c, s = self.config, self.config.long_rope
    if s is None:
      inv_freq = jnp.asarray(rope_inv_freq(c))
    else:
      extent = jnp.max(positions) + 1
      inv_freq = jnp.where(extent > s.original_max_position_embeddings,
                           jnp.asarray(rope_inv_freq(c, s.long_factor)),
                           jnp.asarray(rope_inv_freq(c, s.short_factor)))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if s is not None:
      cos, sin = cos * s.attention_factor, sin * s.attention_factor
    table = cos.astype(self.dtype), sin.astype(self.dtype)
    return {kind: table for kind in set(c.layer_types)}
