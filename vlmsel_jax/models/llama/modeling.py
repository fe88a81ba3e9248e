"""A decoder-only language model of the Llama family, as a Flax NNX module.

One implementation covers Llama (including SmolLM2), Qwen2 and Mistral checkpoints: they share
token embedding, rotary position embedding, grouped-query attention, RMSNorm, a SwiGLU MLP and an
LM head, and differ only in which projections carry biases and which layers use a sliding window.
The numerics follow transformers' torch implementation so that hidden states match it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmsel_jax.models import attention, hf_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """The "llama3" RoPE frequency rescaling of Llama 3.1+ (``rope_type: llama3``)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The sizes every decoder family's config starts with (Llama, Qwen3, Phi-3, Gemma 1, 2 and 3).

  Attributes:
    vocab_size: Number of token ids.
    hidden_size: Width of the residual stream.
    intermediate_size: Width of the gated MLP (SwiGLU, or Gemma's GeGLU).
    num_layers: Number of decoder layers.
    num_heads: Number of query heads.
    num_kv_heads: Number of key/value heads (grouped-query attention); divides ``num_heads``
      (1: multi-query).
    head_dim: Width of one head.

  Each family's config then declares its own fields and, among them in its own order, these
  shared ones (defaults differ by family):

    rms_norm_eps: Epsilon inside every RMSNorm.
    rope_theta: RoPE base wavelength (Gemma 3: of the full-attention layers).
    sliding_window: Attention window of the sliding layers, or ``None``.
    layer_types: Per layer, ``"full_attention"`` or ``"sliding_attention"``; empty means the
      family's default (Llama, Qwen3, Phi-3 and Gemma 1: all full).
    tie_word_embeddings: Whether the LM head reuses the token embedding.
    max_position_embeddings: Longest context the checkpoint was trained for (informational).
    model_type: The transformers ``model_type`` the config came from.
    attention_impl: How attention is computed: ``"auto"``, ``"fused"`` or ``"einsum"``
      (``vlmsel_jax.models.attention``); not part of the checkpoint.
    remat: Rematerialize each decoder layer in the backward pass (``jax.checkpoint``) of the forward
      pass (not of ``prefill`` / ``decode``); not part of the checkpoint.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int

  def _check_layout(self, default_layer_types: tuple[str, ...]) -> None:
    """Checks ``attention_impl`` and the heads, sets ``layer_types`` (``default_layer_types``
    when empty, a tuple always) and checks it has one known kind per layer."""
    attention.check_impl(self.attention_impl)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads})")
    if not self.layer_types:
      object.__setattr__(self, "layer_types", default_layer_types)
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if len(self.layer_types) != self.num_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                       f"{self.num_layers} layers")
    unknown = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
    if unknown:
      raise ValueError(f"unknown layer_types {sorted(unknown)}; expected "
                       f"{FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
  """Architecture hyper-parameters of a Llama-family decoder: ``DecoderConfig``'s sizes and
  shared fields, plus:

  Attributes:
    rope_scaling: ``None`` for plain RoPE, or the llama3 rescaling.
    rope_freq_factors: ``None``, or one divisor per rotary frequency (``head_dim // 2``): how
      llama.cpp stores Llama 3.1's rescaling in GGUF files (the ``rope_freqs.weight`` tensor, no
      parameters). Each inverse frequency is divided by its factor, as llama.cpp's RoPE does.
    qkv_bias: Whether the q/k/v projections have biases (Qwen2: yes; Llama: ``attention_bias``).
    o_bias: Whether the output projection has a bias (Llama: ``attention_bias``).
    mlp_bias: Whether the MLP projections have biases (Llama: ``mlp_bias``).
  """

  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Llama3RopeScaling | None = None
  rope_freq_factors: tuple[float, ...] | None = None
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()
  max_position_embeddings: int = 2048
  model_type: str = "llama"
  attention_impl: str = "auto"
  remat: bool = False

  def __post_init__(self):
    self._check_layout((FULL_ATTENTION,) * self.num_layers)
    if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
      raise ValueError("sliding_attention layers need a positive sliding_window")
    if self.rope_freq_factors is not None:
      factors = tuple(float(f) for f in self.rope_freq_factors)
      object.__setattr__(self, "rope_freq_factors", factors)
      if len(factors) != self.head_dim // 2:
        raise ValueError(f"rope_freq_factors has {len(factors)} entries; head_dim "
                         f"{self.head_dim} has {self.head_dim // 2} rotary frequencies")
      if not all(math.isfinite(f) and f > 0 for f in factors):
        raise ValueError("rope_freq_factors must be positive and finite")
      if self.rope_scaling is not None:
        # Both rescale the same frequencies; applying the two would rescale twice.
        raise ValueError("give rope_scaling or rope_freq_factors, not both")

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> LlamaConfig:
    """Reads a transformers ``config.json`` (a dict, the file, or its directory).

    Understands both the transformers 5 ``rope_parameters`` field and the older
    ``rope_theta`` / ``rope_scaling`` fields, plus ``rope_freq_factors`` (no transformers field:
    the GGUF source sets it from llama.cpp's ``rope_freqs.weight``).

    Raises:
      ValueError: the config is not a llama / qwen2 / mistral one, or uses a feature this
        implementation does not have (a RoPE type other than default or llama3, partial rotary
        embeddings, an activation other than SiLU).
    """
    c = read_hf(config, SUPPORTED_MODEL_TYPES, "a Llama-family model")
    model_type = c["model_type"]
    require_silu(c, "the Llama family")

    num_layers = c["num_hidden_layers"]
    rope_theta, rope_scaling = _rope_from_hf(c)

    if model_type == "qwen2":
      # Qwen2 hard-codes biases on q/k/v only (transformers' Qwen2Attention ignores attention_bias).
      qkv_bias, o_bias, mlp_bias = True, False, False
      sliding_window, layer_types = qwen_sliding_layers(c, num_layers)
    elif model_type == "mistral":
      qkv_bias = o_bias = mlp_bias = False
      sliding_window = c.get("sliding_window")
      layer_types = [FULL_ATTENTION if sliding_window is None else SLIDING_ATTENTION] * num_layers
    else:
      qkv_bias = o_bias = bool(c.get("attention_bias", False))
      mlp_bias = bool(c.get("mlp_bias", False))
      sliding_window, layer_types = None, [FULL_ATTENTION] * num_layers

    return cls(
        **hf_sizes(c),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rope_freq_factors=c.get("rope_freq_factors"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        sliding_window=sliding_window,
        layer_types=tuple(layer_types),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        model_type=model_type,
    )


def read_hf(config: Mapping[str, Any] | str | os.PathLike, supported: tuple[str, ...],
            family: str) -> dict[str, Any]:
  """A transformers config (a dict, ``config.json`` or its directory) as a dict, after checking
  that its ``model_type`` is one of ``supported`` (else "... is not ``family``")."""
  c = dict(hf_config.read_config(config))
  model_type = c.get("model_type")
  if model_type not in supported:
    raise ValueError(f"model_type {model_type!r} is not {family}; supported: "
                     f"{', '.join(supported)}")
  return c


def require_silu(c: Mapping[str, Any], family: str) -> None:
  """Refuses a config whose ``hidden_act`` is not SiLU, the activation ``family`` uses."""
  act = c.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"hidden_act {act!r} is not supported; {family} uses 'silu'")


def hf_sizes(c: Mapping[str, Any], default_head_dim: int | None = None) -> dict[str, int]:
  """``DecoderConfig``'s fields from a transformers config dict; ``head_dim`` is the config's
  (``default_head_dim`` where it has none), or ``hidden_size // num_attention_heads`` when that
  is empty."""
  num_heads = c["num_attention_heads"]
  return dict(
      vocab_size=c["vocab_size"],
      hidden_size=c["hidden_size"],
      intermediate_size=c["intermediate_size"],
      num_layers=c["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=c.get("num_key_value_heads") or num_heads,
      head_dim=c.get("head_dim", default_head_dim) or c["hidden_size"] // num_heads,
  )


def qwen_sliding_layers(c: Mapping[str, Any], num_layers: int
                        ) -> tuple[int | None, tuple[str, ...]]:
  """(sliding_window, layer_types) of a Qwen2 / Qwen3 config: the window applies only with
  ``use_sliding_window``, to the layers ``layer_types`` (or, without it, ``max_window_layers``)
  marks, as in transformers."""
  sliding_window = c.get("sliding_window") if c.get("use_sliding_window", False) else None
  layer_types = c.get("layer_types") or [
      SLIDING_ATTENTION if sliding_window is not None and i >= c.get("max_window_layers", 28)
      else FULL_ATTENTION for i in range(num_layers)]
  return sliding_window, tuple(layer_types)


def _rope_from_hf(c: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
  """Returns (rope_theta, rope_scaling) from a config dict in either transformers format."""
  params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
  if any(isinstance(v, Mapping) for v in params.values()):
    raise ValueError("per-layer-type rope_parameters are not supported by the Llama family")
  rope_theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
  partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ValueError(f"partial_rotary_factor {partial} is not supported; only full rotary "
                     "embeddings are implemented")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return rope_theta, None
  if rope_type == "llama3":
    return rope_theta, Llama3RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params.get(
            "original_max_position_embeddings", c.get("max_position_embeddings", 2048))))
  raise ValueError(f"rope_type {rope_type!r} is not implemented; supported: 'default', 'llama3'")


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """The RoPE inverse frequencies (head_dim // 2,), float32, as transformers computes them (and
  divided by ``rope_freq_factors``, as llama.cpp does, when the config has them)."""
  dim = config.head_dim
  # float32 throughout, like torch, so positions * inv_freq rounds the same way.
  inv_freq = np.float32(1.0) / (
      np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  if config.rope_freq_factors is not None:
    return (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv_freq
  low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq)
  old_context = np.float32(s.original_max_position_embeddings)
  smooth = ((old_context / wavelen - np.float32(s.low_freq_factor))
            / np.float32(s.high_freq_factor - s.low_freq_factor))
  smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
  """Rotates the two halves of the last axis: (x1, x2) -> (-x2, x1)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """RoPE on the first ``cos.shape[-1]`` channels of ``x`` (all of them but with Phi-3's partial
  rotary factor); the rest pass through."""
  rotary = cos.shape[-1]
  if rotary == x.shape[-1]:
    return x * cos + rotate_half(x) * sin
  x_rot, x_pass = x[..., :rotary], x[..., rotary:]
  return jnp.concatenate([x_rot * cos + rotate_half(x_rot) * sin, x_pass], axis=-1)


def visible_keys(query_positions: jax.Array, key_positions: jax.Array, kind: str,
             sliding_window: int | None) -> jax.Array:
  """Whether each query position may see each key position: causal, and on
  ``"sliding_attention"`` layers only the last ``sliding_window`` positions."""
  mask = key_positions <= query_positions
  if kind == SLIDING_ATTENTION:
    mask &= key_positions > query_positions - sliding_window
  return mask


def attention_mask_for(kind: str, seq: int, padding: jax.Array | None,
                       sliding_window: int | None) -> jax.Array:
  """Boolean mask (batch or 1, 1, 1, q, k): True where a query may attend to a key.

  Causal over the sequence axis, minus padded keys (``padding`` is (batch, seq) of 1/0), minus
  keys ``sliding_window`` or more tokens back on ``"sliding_attention"`` layers.
  """
  mask = visible_keys(jnp.arange(seq)[:, None], jnp.arange(seq)[None, :], kind,
                  sliding_window)[None, None, None]
  if padding is not None:
    mask = mask & (padding != 0)[:, None, None, None, :]
  return mask


class RMSNorm(nnx.Module):
  """Root-mean-square norm: statistics in float32, scaled in the activation dtype."""

  def __init__(self, dim: int, eps: float, *, dtype: Any):
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    # Cast back before scaling, as transformers' LlamaRMSNorm does, so bfloat16 rounds alike.
    return self.scale[...] * (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary position embeddings."""

  def __init__(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
    c = config
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.q_proj = nnx.Linear(c.hidden_size, c.num_heads * c.head_dim, use_bias=c.qkv_bias, **kw)
    self.k_proj = nnx.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.qkv_bias, **kw)
    self.v_proj = nnx.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.qkv_bias, **kw)
    self.o_proj = nnx.Linear(c.num_heads * c.head_dim, c.hidden_size, use_bias=c.o_bias, **kw)
    self.num_heads = c.num_heads
    self.num_kv_heads = c.num_kv_heads
    self.head_dim = c.head_dim
    self.scaling = c.head_dim ** -0.5
    self.attention_impl = c.attention_impl
    # None here; Gemma 2's subclass sets its attention-logit soft-cap c: scores become
    # c·tanh(scores / c) before the mask.
    self.logit_softcap: float | None = None

  def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(b, t, heads, d) queries and (b, t, kv_heads, d) keys and values, before the rotation."""
    b, t, _ = x.shape
    kv, dh = self.num_kv_heads, self.head_dim
    q = self.q_proj(x).reshape(b, t, self.num_heads, dh)
    k = self.k_proj(x).reshape(b, t, kv, dh)
    v = self.v_proj(x).reshape(b, t, kv, dh)
    return q, k, v

  def _rotated_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
    q, k, v = self._qkv(x)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              causal: bool = True) -> jax.Array:
    """Attention of (b, t, heads, d) queries over (b, s, kv_heads, d) keys and values.

    ``mask`` is (b or 1, 1, 1, t, s), True where a query sees a key; ``causal`` says the mask
    hides every key after its query (t == s), a hint the fused path passes on.
    """
    b, t = q.shape[:2]
    kv, groups, dh = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
    # jax.nn.dot_product_attention (XLA's and cuDNN's) cannot soft-cap scores: a capped layer
    # always takes the einsum path.
    if attention.resolve(self.attention_impl) == "fused" and self.logit_softcap is None:
      out = attention.fused(q, k, v, mask[:, :, 0], scale=self.scaling, is_causal=causal)
      return self.o_proj(out.reshape(b, t, self.num_heads * dh))
    # Query head h reads kv head h // groups, the order of transformers' repeat_kv.
    q = q.reshape(b, t, kv, groups, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * self.scaling
    if self.logit_softcap is not None:
      # In the activation dtype and before the mask, as transformers' eager attention caps.
      scores = jnp.tanh(scores / self.logit_softcap) * self.logit_softcap
    scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, self.num_heads * dh)
    return self.o_proj(out)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    q, k, v = self._rotated_qkv(x, cos, sin)
    return self._attend(q, k, v, mask)

  def prefill(self, x, cos, sin, mask) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """``__call__`` that also returns the rotated keys and values: the decoding cache."""
    q, k, v = self._rotated_qkv(x, cos, sin)
    return self._attend(q, k, v, mask), (k, v)

  def decode(self, x, cos, sin, mask, cache, index) -> tuple[jax.Array, tuple]:
    """One new token per row, (b, 1, d), written into ``cache`` at row r's ``index[r]``."""
    q, k, v = self._rotated_qkv(x, cos, sin)
    rows = jnp.arange(x.shape[0])
    keys = cache[0].at[rows, index].set(k[:, 0])
    values = cache[1].at[rows, index].set(v[:, 0])
    return self._attend(q, keys, values, mask, causal=False), (keys, values)


def attention_config(c: Any, bias: bool = False) -> LlamaConfig:
  """A ``LlamaConfig`` for the Llama attention of another family's config ``c``: its widths,
  heads and attention path, and ``bias`` on all four projections."""
  return LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim, qkv_bias=bias, o_bias=bias, attention_impl=c.attention_impl)


class MLP(nnx.Module):
  """SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
    c = config
    kw = dict(use_bias=c.mlp_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.gate_proj = nnx.Linear(c.hidden_size, c.intermediate_size, **kw)
    self.up_proj = nnx.Linear(c.hidden_size, c.intermediate_size, **kw)
    self.down_proj = nnx.Linear(c.intermediate_size, c.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm decoder layer: x + attn(norm(x)), then h + mlp(norm(h)).

  The families that reuse it name their own norm, attention and MLP modules in the class
  attributes below.
  """

  norm_class: type[nnx.Module] = RMSNorm
  attention_class: type[nnx.Module] = Attention
  mlp_class: type[nnx.Module] = MLP

  def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
    self.input_norm = self.norm_class(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.attn = self.attention_class(config, dtype=dtype, rngs=rngs)
    self.post_attn_norm = self.norm_class(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.mlp = self.mlp_class(config, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    h = x + self.attn(self.input_norm(x), cos, sin, mask)
    return h + self.mlp(self.post_attn_norm(h))

  def prefill(self, x, cos, sin, mask):
    a, cache = self.attn.prefill(self.input_norm(x), cos, sin, mask)
    h = x + a
    return h + self.mlp(self.post_attn_norm(h)), cache

  def decode(self, x, cos, sin, mask, cache, index):
    a, cache = self.attn.decode(self.input_norm(x), cos, sin, mask, cache, index)
    h = x + a
    return h + self.mlp(self.post_attn_norm(h)), cache


class LlamaOutput(NamedTuple):
  """What ``Llama.__call__`` returns.

  Attributes:
    logits: (batch, seq, vocab) next-token logits.
    hidden_states: ``num_layers + 1`` arrays (batch, seq, hidden): the token embeddings, then the
      output of every layer, the last one after the final norm, exactly like transformers'
      ``output_hidden_states=True``. ``hidden_states[-2]`` is the second-to-last layer's output.
  """

  logits: jax.Array
  hidden_states: tuple[jax.Array, ...]


class Llama(nnx.Module):
  """A Llama / Qwen2 / Mistral causal language model.

  The families that reuse it (Qwen3, Phi-3, Gemma 1, 2 and 3) name their own layer and norm
  modules in the class attributes below, or build their layers in ``_decoder_layer``.
  """

  layer_class: type[nnx.Module] = DecoderLayer
  norm_class: type[nnx.Module] = RMSNorm

  def __init__(self, config: Any, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                  param_dtype=dtype, rngs=rngs)
    self.layers = nnx.List(
        [self._decoder_layer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = self.norm_class(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    # A tied model has no separate head: logits come from the embedding table itself.
    self.lm_head = None if config.tie_word_embeddings else nnx.Linear(
        config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype,
        rngs=rngs)

  def _decoder_layer(self, config: Any, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    """One decoder layer: a ``layer_class``."""
    return self.layer_class(config, dtype=dtype, rngs=rngs)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """(batch, seq, hidden) token embeddings: what ``inputs_embeds`` holds for text tokens."""
    return self.embed_tokens(input_ids)

  def __call__(self, input_ids: jax.Array | None, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None,
               inputs_embeds: jax.Array | None = None) -> LlamaOutput:
    """Runs the model on a batch of token ids.

    Args:
      input_ids: (batch, seq) int token ids.
      attention_mask: optional (batch, seq) 1 for real tokens, 0 for padding; padded keys are
        never attended to. Outputs at padded query positions are meaningless.
      positions: optional (batch, seq) RoPE positions; defaults to 0..seq-1 for every row, as
        transformers' forward does (it does not shift positions for left padding either).
      inputs_embeds: optional (batch, seq, hidden) input embeddings used instead of looking up
        ``input_ids`` (which must then be None): a VLM splices projected image tokens in here.

    Returns:
      A ``LlamaOutput`` with the logits and all hidden states.
    """
    x, rope, masks = self._inputs(input_ids, attention_mask, positions, inputs_embeds)
    hidden = [x]
    for kind, layer in zip(self.config.layer_types, self.layers):
      x = attention.remat_call(self.config.remat, layer, x, *rope[kind], masks[kind])
      hidden.append(x)
    x = self.final_norm(x)
    # transformers replaces the last layer's output with the normed one in output_hidden_states.
    hidden[-1] = x
    return LlamaOutput(logits=self._logits(x), hidden_states=tuple(hidden))

  def _inputs(self, input_ids, attention_mask, positions, inputs_embeds):
    """(embeddings, RoPE (cos, sin) per layer kind, mask per layer kind) of a forward pass."""
    c = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError(f"{type(self).__name__}: pass exactly one of input_ids and inputs_embeds")
    b, t = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    masks = {kind: attention_mask_for(kind, t, attention_mask, c.sliding_window)
             for kind in set(c.layer_types)}
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    return x, self._rope(positions), masks

  def _inv_freq(self, kind: str) -> np.ndarray:
    """RoPE inverse frequencies of layers of ``kind`` (one set for every kind here)."""
    del kind
    return rope_inv_freq(self.config)

  def _rope(self, positions: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """RoPE (cos, sin) at ``positions`` for each layer kind."""
    tables = {}
    for kind in set(self.config.layer_types):
      freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(self._inv_freq(kind))
      emb = jnp.concatenate([freqs, freqs], axis=-1)
      tables[kind] = jnp.cos(emb).astype(self.dtype), jnp.sin(emb).astype(self.dtype)
    return tables

  def _logits(self, x: jax.Array) -> jax.Array:
    return self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)

  # Cached decoding: ``prefill`` runs a right-padded prompt batch once and keeps every layer's
  # rotated keys and values; ``decode`` then adds one token per row at that row's own position,
  # attending to the row's cached keys up to it. Together they give the logits a full forward
  # pass over the grown sequence gives, for a fraction of its cost.

  def prefill(self, input_ids: jax.Array | None, attention_mask: jax.Array | None = None,
              inputs_embeds: jax.Array | None = None, last: jax.Array | None = None
              ) -> tuple[jax.Array, tuple]:
    """(logits, cache): ``__call__``'s logits and every layer's (k, v).

    The logits are (batch, seq, vocab), or with ``last`` ((batch,) positions) only each row's
    logits at its position, (batch, vocab): greedy decoding needs no others, and the LM head
    over every position is most of a prefill's cost when the vocabulary is large.
    """
    x, rope, masks = self._inputs(input_ids, attention_mask, None, inputs_embeds)
    cache = []
    for kind, layer in zip(self.config.layer_types, self.layers):
      x, kv = layer.prefill(x, *rope[kind], masks[kind])
      cache.append(kv)
    if last is not None:
      x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return self._logits(self.final_norm(x)), tuple(cache)

  def decode(self, token_ids: jax.Array, index: jax.Array, cache: tuple
             ) -> tuple[jax.Array, tuple]:
    """(logits (batch, vocab), cache) of one new token per row.

    Args:
      token_ids: (batch,) the tokens to append.
      index: (batch,) each row's position for its token (its current length): the token's RoPE
        position and cache slot; the row attends to cache slots 0..index.
      cache: ``prefill``'s (or the previous ``decode``'s) cache; slots past each row's index are
        ignored, so a right-padded prompt's padding never reaches the new tokens.
    """
    c = self.config
    rope = self._rope(index[:, None])
    slots = jnp.arange(cache[0][0].shape[1])[None, :]
    masks = {kind: visible_keys(index[:, None], slots, kind,
                                c.sliding_window)[:, None, None, None, :]
             for kind in set(c.layer_types)}
    x = self.embed(token_ids[:, None])
    new_cache = []
    for kind, layer, kv in zip(c.layer_types, self.layers, cache):
      x, kv = layer.decode(x, *rope[kind], masks[kind], kv, index)
      new_cache.append(kv)
    return self._logits(self.final_norm(x))[:, 0], tuple(new_cache)
