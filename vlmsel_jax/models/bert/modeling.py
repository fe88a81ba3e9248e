"""BERT-style text encoders (BERT, MiniLM, the sentence-transformers encoders) as a Flax NNX module.

The encoder sums word, position and token-type embeddings, normalises them with a LayerNorm and
runs post-norm transformer layers: ``x = norm1(x + attn(x))``, then ``x = norm2(x + mlp(x))``,
with a padding mask on the attention keys. An optional pooler maps the first ([CLS]) token through
a dense layer and tanh. ``mean_pool`` is sentence-transformers' mean pooling, which is how
all-MiniLM-L6-v2 and its kin turn token states into one sentence embedding.

The numerics follow transformers' torch ``BertModel`` so that hidden states match it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vlmsel_jax.models import attention, hf_config

SUPPORTED_MODEL_TYPES = ("bert",)
SUPPORTED_ARCHITECTURES = ("BertModel",)

# transformers' BertConfig defaults: hub config.json files leave out fields that equal them.
_HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
    layer_norm_eps=1e-12, position_embedding_type="absolute", is_decoder=False,
    add_cross_attention=False)

# transformers' ACT2FN names of the activations BERT-style checkpoints use.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture hyper-parameters of a BERT-style encoder.

  Attributes:
    vocab_size: Number of token ids.
    hidden_size: Width of the residual stream.
    intermediate_size: Width of the MLP.
    num_layers: Number of encoder layers.
    num_heads: Number of attention heads; divides ``hidden_size``.
    max_position_embeddings: Rows of the position table: the longest sequence accepted.
    type_vocab_size: Rows of the token-type (segment) table.
    layer_norm_eps: Epsilon of every LayerNorm.
    hidden_act: MLP activation, a key of ``ACTIVATIONS``.
    pooler: Whether the model has the dense + tanh pooler that gives ``pooler_output``.
    model_type: The transformers ``model_type`` the config came from.
    attention_impl: How attention is computed: ``"auto"``, ``"fused"`` or ``"einsum"``
      (``vlmsel_jax.models.attention``); not part of the checkpoint.
    remat: Rematerialize each encoder layer in the backward pass (``jax.checkpoint``); not part of
      the checkpoint.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  pooler: bool = True
  model_type: str = "bert"
  attention_impl: str = "auto"
  remat: bool = False

  def __post_init__(self):
    attention.check_impl(self.attention_impl)
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                       f"({self.num_heads})")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: "
                       f"{', '.join(sorted(ACTIVATIONS))}")

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> BertConfig:
    """Reads a transformers ``config.json`` (a dict, the file, or its directory).

    Fields the file leaves out take transformers' ``BertConfig`` defaults. The config may carry
    ``add_pooling_layer: false`` (not a transformers field) for a ``BertModel`` saved without its
    pooler.

    Raises:
      ValueError: the config is not a ``bert`` encoder this implementation covers (a decoder,
        cross-attention, relative position embeddings, another activation).
    """
    config = hf_config.read_config(config)
    c = {**_HF_DEFAULTS, **config}
    if c.get("model_type") not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type {c.get('model_type')!r} is not a BERT encoder supported "
                       f"here; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if c["is_decoder"] or c["add_cross_attention"]:
      raise ValueError("BERT as a causal decoder or with cross-attention is not supported; "
                       "only the bidirectional encoder is")
    if c["position_embedding_type"] != "absolute":
      raise ValueError(f"position_embedding_type {c['position_embedding_type']!r} is not "
                       "supported; only 'absolute' is")
    return cls(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        max_position_embeddings=c["max_position_embeddings"],
        type_vocab_size=c["type_vocab_size"],
        layer_norm_eps=float(c["layer_norm_eps"]),
        hidden_act=c["hidden_act"],
        pooler=bool(c.get("add_pooling_layer", True)),
        model_type=c["model_type"],
    )


def _layer_norm(config: BertConfig, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """A LayerNorm over the hidden axis, computed like torch's."""
  # use_fast_variance=False: E[x^2] - E[x]^2 loses precision that torch's LayerNorm keeps.
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False,
                       dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention in which padding tokens are never attended to."""

  def __init__(self, config: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
    d = config.hidden_size
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.q_proj = nnx.Linear(d, d, **kw)
    self.k_proj = nnx.Linear(d, d, **kw)
    self.v_proj = nnx.Linear(d, d, **kw)
    self.o_proj = nnx.Linear(d, d, **kw)
    self.num_heads = config.num_heads
    self.attention_impl = config.attention_impl

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Attends (b, t, d) tokens to each other; ``mask`` (b, t) is True for real tokens."""
    b, t, d = x.shape
    h = self.num_heads
    dh = d // h
    q = self.q_proj(x).reshape(b, t, h, dh)
    k = self.k_proj(x).reshape(b, t, h, dh)
    v = self.v_proj(x).reshape(b, t, h, dh)
    if attention.resolve(self.attention_impl) == "fused":
      out = attention.fused(q, k, v, mask[:, None, None, :], scale=dh ** -0.5)
      return self.o_proj(out.reshape(b, t, d))
    scores = (jnp.einsum("bqhd,bkhd->bhqk", q, k) * (dh ** -0.5)).astype(jnp.float32)
    # The most negative float rather than -inf, as transformers does: a row with every key
    # masked then averages all keys instead of producing NaN.
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    return self.o_proj(out)


class EncoderLayer(nnx.Module):
  """Post-norm layer: x = attn_norm(x + attn(x)), then mlp_norm(x + fc2(act(fc1(x))))."""

  def __init__(self, config: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.attn_norm = _layer_norm(config, dtype, rngs)
    self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, **kw)
    self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, **kw)
    self.mlp_norm = _layer_norm(config, dtype, rngs)
    self.hidden_act = config.hidden_act

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attn_norm(x + self.attn(x, mask))
    return self.mlp_norm(x + self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x))))


@struct.dataclass
class BertOutput:
  """What ``Bert.__call__`` returns; a pytree, so it passes through ``jax.jit``.

  Attributes:
    last_hidden_state: (batch, tokens, hidden): the last layer's output, which is also
      ``hidden_states[-1]`` (a post-norm encoder has no final LayerNorm).
    hidden_states: ``num_layers + 1`` arrays (batch, tokens, hidden), exactly transformers'
      ``output_hidden_states=True``: the normalised embeddings, then every layer's output.
    pooler_output: (batch, hidden): tanh(dense(first token of ``last_hidden_state``)), or None
      where the model has no pooler.
  """

  last_hidden_state: jax.Array
  hidden_states: tuple[jax.Array, ...]
  pooler_output: jax.Array | None


class Bert(nnx.Module):
  """A BERT-style bidirectional text encoder (BERT, MiniLM, sentence-transformers encoders)."""

  def __init__(self, config: BertConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    c = config
    d = c.hidden_size
    self.config = c
    self.dtype = jnp.dtype(dtype)
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.word_embed = nnx.Embed(c.vocab_size, d, **kw)
    self.position_embed = nnx.Embed(c.max_position_embeddings, d, **kw)
    self.token_type_embed = nnx.Embed(c.type_vocab_size, d, **kw)
    self.embed_norm = _layer_norm(c, dtype, rngs)
    self.layers = nnx.List([EncoderLayer(c, dtype=dtype, rngs=rngs) for _ in range(c.num_layers)])
    self.pooler = nnx.Linear(d, d, **kw) if c.pooler else None

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> BertOutput:
    """Encodes a batch of token id sequences.

    Args:
      input_ids: (batch, tokens) integer token ids.
      attention_mask: (batch, tokens), 1 / True for real tokens and 0 / False for padding, which
        no token attends to; None means no padding.
      token_type_ids: (batch, tokens) segment ids; None means all 0 (one segment).
      position_ids: (batch, tokens) or (tokens,) positions; None means 0, 1, 2, ...

    Returns:
      A ``BertOutput`` with all hidden states, ``last_hidden_state`` and ``pooler_output``.
      Padding positions get hidden states too (they attend to the real tokens); pool with
      ``mean_pool`` to leave them out.

    Raises:
      ValueError: ``input_ids`` is not 2-D, a given array's shape differs from it, or the
        sequence is longer than ``config.max_position_embeddings`` (without ``position_ids``).
    """
    c = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, tokens); got shape {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    for name, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
      if value is not None and value.shape != (b, t):
        raise ValueError(f"{name} must have the shape of input_ids {(b, t)}; got "
                         f"{tuple(value.shape)}")
    if position_ids is None:
      if t > c.max_position_embeddings:
        raise ValueError(f"sequence length {t} exceeds max_position_embeddings "
                         f"{c.max_position_embeddings}")
      position_ids = jnp.arange(t)[None]
    elif position_ids.shape not in ((b, t), (t,)):
      raise ValueError(f"position_ids must be (batch, tokens) or (tokens,), got "
                       f"{tuple(position_ids.shape)} for input_ids {(b, t)}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros((b, t), jnp.int32)
    mask = (jnp.ones((b, t), bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))

    # Summed in transformers' order (word + type, then + position) for matching rounding.
    x = self.word_embed(input_ids) + self.token_type_embed(token_type_ids)
    x = x + jnp.broadcast_to(self.position_embed(position_ids), x.shape)
    x = self.embed_norm(x)
    hidden = [x]
    for layer in self.layers:
      x = attention.remat_call(c.remat, layer, x, mask)
      hidden.append(x)
    pooled = jnp.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
    return BertOutput(last_hidden_state=x, hidden_states=tuple(hidden), pooler_output=pooled)


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """The mean of the real tokens' states, sentence-transformers' mean pooling; jittable.

  Args:
    hidden: (batch, tokens, hidden) token states, e.g. ``BertOutput.last_hidden_state``.
    mask: (batch, tokens) attention mask, 1 / True for real tokens; padding is left out.

  Returns:
    (batch, hidden) sentence embeddings (not normalised).
  """
  if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
    raise ValueError(f"mean_pool needs hidden (batch, tokens, hidden) and mask (batch, tokens); "
                     f"got {tuple(hidden.shape)} and {tuple(mask.shape)}")
  weights = jnp.asarray(mask).astype(hidden.dtype)[..., None]
  # Clamped like sentence-transformers, so an all-padding row gives zeros, not NaN.
  count = jnp.maximum(weights.sum(axis=1), 1e-9)
  return (hidden * weights).sum(axis=1) / count
