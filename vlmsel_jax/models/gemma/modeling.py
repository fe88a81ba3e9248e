"""Gemma 1 (``GemmaForCausalLM``, ``model_type: gemma``) and Gemma 2 (``Gemma2ForCausalLM``,
``model_type: gemma2``) decoders as Flax NNX modules.

Both are Gemma 3's text decoder minus its query/key norms, so the modules subclass the Gemma 3
family's (which subclasses the Llama family's) and change only what differs:

* shared with Gemma 3: (1 + w) RMSNorm rounded once in float32, text embeddings scaled by
  sqrt(hidden_size) (``inputs_embeds``, a VLM's image tokens, enter unscaled), the GeGLU MLP with
  tanh-approximated GELU, a tied LM head by default, and the forward / ``prefill`` / ``decode``;
* Gemma 1: the Llama layer (two norms: before attention, before the MLP), scores scaled by
  ``head_dim ** -0.5``, every layer global; the 2B model is multi-query (one key/value head);
* Gemma 2: four norms per layer (Gemma 3's layer), scores scaled by
  ``query_pre_attn_scalar ** -0.5`` and soft-capped (``c·tanh(s/c)``, before the mask), the logits
  soft-capped too, and layers alternating sliding-window (even) and global (odd) attention as
  transformers' default ``layer_types`` says;
* one RoPE base for every layer (Gemma 3 has one per layer kind).

Soft-capped attention has no fused kernel (``jax.nn.dot_product_attention`` cannot cap scores), so
a Gemma 2 layer with ``attn_logit_softcapping`` runs the einsum path whatever ``attention_impl``
says; Gemma 1, and Gemma 2 without the cap, take the path it selects.

The numerics follow transformers' torch implementation, so hidden states match it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np
from flax import nnx

from vlmsel_jax.models.gemma3 import modeling as gemma3_modeling
from vlmsel_jax.models.llama import modeling as llama_modeling
from vlmsel_jax.models.llama.modeling import FULL_ATTENTION, SLIDING_ATTENTION, LlamaOutput

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2")
SUPPORTED_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM")
ROPE_TYPES = ("default", "linear")
# transformers' Gemma2Config defaults, which a config without the fields gets.
GEMMA2_ATTN_LOGIT_SOFTCAPPING = 50.0
GEMMA2_FINAL_LOGIT_SOFTCAPPING = 30.0

# The output is the Llama family's: logits and every hidden state.
GemmaOutput = LlamaOutput


def gemma2_layer_types(num_layers: int) -> tuple[str, ...]:
  """transformers' default Gemma 2 layers (and llama.cpp's): even layers slide, odd ones are
  global."""
  return tuple(SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class GemmaConfig(llama_modeling.DecoderConfig):
  """Architecture hyper-parameters of a Gemma 1 or Gemma 2 decoder: ``DecoderConfig``'s sizes and
  shared fields (empty ``layer_types`` means ``gemma2_layer_types`` for ``model_type`` gemma2 and
  all global otherwise; a tied LM head by default), plus:

  Attributes:
    query_pre_attn_scalar: Attention scores are scaled by its inverse square root; None means
      ``head_dim`` (Gemma 1).
    rope_factor: Linear RoPE scaling (1: none).
    sandwich_norms: Whether each layer also norms the attention and MLP outputs, four norms a
      layer (Gemma 2), rather than only their inputs (Gemma 1).
    attn_logit_softcapping: Attention scores become ``c·tanh(s/c)`` when set (Gemma 2).
    final_logit_softcapping: Logits become ``c·tanh(z/c)`` when set (Gemma 2).
    attention_bias: Whether the q/k/v/o projections have biases (released checkpoints: no).
  """

  query_pre_attn_scalar: float | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_factor: float = 1.0
  sandwich_norms: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  attention_bias: bool = False
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 8192
  model_type: str = "gemma"
  attention_impl: str = "auto"
  remat: bool = False

  def __post_init__(self):
    self._check_layout(gemma2_layer_types(self.num_layers) if self.model_type == "gemma2"
                       else (FULL_ATTENTION,) * self.num_layers)
    if self.query_pre_attn_scalar is None:
      object.__setattr__(self, "query_pre_attn_scalar", float(self.head_dim))
    if SLIDING_ATTENTION in self.layer_types and not (self.sliding_window or 0) > 0:
      raise ValueError("sliding_attention layers need a positive sliding_window")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
      cap = getattr(self, name)
      if cap is not None and not cap > 0:
        raise ValueError(f"{name} must be positive or None, got {cap}")

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> GemmaConfig:
    """Reads a transformers ``GemmaConfig`` / ``Gemma2Config`` (a dict, ``config.json`` or its
    directory).

    Fields the dict lacks take transformers' defaults for the model type (Gemma 2: soft-caps 50
    and 30, query_pre_attn_scalar 256, window 4096, alternating layers; both: head_dim 256).
    Understands the transformers 5 ``rope_parameters`` and the older ``rope_theta`` /
    ``rope_scaling`` fields.

    Raises:
      ValueError: not a gemma / gemma2 config, or a feature this implementation lacks
        (bidirectional attention, a RoPE type other than default / linear, an activation other
        than tanh-approximated GELU).
    """
    c = llama_modeling.read_hf(config, SUPPORTED_MODEL_TYPES, "a Gemma 1 or 2 model")
    model_type = c["model_type"]
    gemma2 = model_type == "gemma2"
    if gemma2:
      act = c.get("hidden_activation") or "gelu_pytorch_tanh"
    else:
      act = c.get("hidden_act") or "gelu_pytorch_tanh"
      # The original Gemma releases say "gelu" but were trained with the tanh approximation;
      # transformers' GemmaConfig reads it so.
      act = "gelu_pytorch_tanh" if act == "gelu" else act
    if act != "gelu_pytorch_tanh":
      raise ValueError(f"hidden activation {act!r} is not supported; Gemma uses "
                       "'gelu_pytorch_tanh'")
    if c.get("use_bidirectional_attention", False):
      raise ValueError("use_bidirectional_attention is not supported; only the causal decoder is")
    num_layers = c["num_hidden_layers"]
    rope_theta, rope_factor = _rope_from_hf(c)
    if gemma2:
      gemma2_fields = dict(
          query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", 256)),
          sandwich_norms=True,
          sliding_window=c.get("sliding_window", 4096),
          layer_types=tuple(c.get("layer_types") or gemma2_layer_types(num_layers)),
          attn_logit_softcapping=c.get("attn_logit_softcapping", GEMMA2_ATTN_LOGIT_SOFTCAPPING),
          final_logit_softcapping=c.get("final_logit_softcapping",
                                        GEMMA2_FINAL_LOGIT_SOFTCAPPING))
    else:
      gemma2_fields = {}
    return cls(
        **llama_modeling.hf_sizes(c, default_head_dim=256),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_factor=rope_factor,
        attention_bias=bool(c.get("attention_bias", False)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
        max_position_embeddings=int(c.get("max_position_embeddings", 8192)),
        model_type=model_type,
        **gemma2_fields,
    )


def _rope_from_hf(c: Mapping[str, Any]) -> tuple[float, float]:
  """(rope_theta, linear factor) from a config dict in either transformers format."""
  params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
  if any(isinstance(v, Mapping) for v in params.values()):
    raise ValueError("per-layer-type rope_parameters are not supported by Gemma 1 / 2")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"rope_type {rope_type!r} is not implemented; supported: "
                     f"{', '.join(ROPE_TYPES)}")
  theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
  return theta, float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0


class Attention(llama_modeling.Attention):
  """The Llama family's grouped-query attention, scores scaled by
  ``query_pre_attn_scalar ** -0.5`` and, in Gemma 2, soft-capped."""

  def __init__(self, config: GemmaConfig, *, dtype: Any, rngs: nnx.Rngs):
    super().__init__(llama_modeling.attention_config(config, bias=config.attention_bias),
                     dtype=dtype, rngs=rngs)
    self.scaling = config.query_pre_attn_scalar ** -0.5
    self.logit_softcap = config.attn_logit_softcapping


class DecoderLayer(llama_modeling.DecoderLayer):
  """Gemma 1's layer: the Llama layer, x + attn(norm(x)), then h + mlp(norm(h)), with Gemma's
  norms, attention and GeGLU MLP."""

  norm_class = gemma3_modeling.RMSNorm
  attention_class = Attention
  mlp_class = gemma3_modeling.MLP


class SandwichDecoderLayer(gemma3_modeling.DecoderLayer):
  """Gemma 2's layer: Gemma 3's four-norm layer,
  x + post_attn_norm(attn(input_norm(x))), then h + post_mlp_norm(mlp(pre_mlp_norm(h))), with
  Gemma 2's attention (no query/key norms)."""

  attention_class = Attention


class Gemma(gemma3_modeling.Gemma3):
  """A Gemma 1 or Gemma 2 causal language model.

  Gemma 3's model (scaled text embeddings, final soft-capping, forward / ``prefill`` / ``decode``)
  with Gemma 1's or Gemma 2's layers and a single RoPE base.
  """

  def _decoder_layer(self, config: GemmaConfig, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    layer = SandwichDecoderLayer if config.sandwich_norms else DecoderLayer
    return layer(config, dtype=dtype, rngs=rngs)

  def _inv_freq(self, kind: str) -> np.ndarray:
    del kind  # Sliding and global layers rotate alike.
    c = self.config
    return gemma3_modeling.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_factor)
