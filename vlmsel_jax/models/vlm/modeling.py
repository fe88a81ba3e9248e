"""A LLaVA-style VLM in Flax NNX: frozen vision tower → projector → decoder LLM.

Data flow (METHODS §5): pixels → the tower's patch tokens at one layer (ViT family: patch tokens
without CLS/registers; EfficientNet: a stage's NHWC feature map, flattened row-major), optionally
average-pooled ``image_pool × image_pool`` or reduced to one mean token → projector (Linear →
GELU → Linear into the LLM width, or one Linear) → spliced into the LLM's input embeddings at the
positions ``image_mask`` marks, in order. The batch builder (``vlmsel_jax.training.batches``)
expands the prompt's image placeholder into exactly ``num_image_tokens`` such positions, so
shapes are static and the splice is a gather, not a scatter.

The tower never trains: its output goes through ``jax.lax.stop_gradient`` and its parameters are
outside every trainable filter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from vlmsel_jax.models import attention
from vlmsel_jax.models.gemma3 import modeling as gemma3
from vlmsel_jax.models.llama import modeling as llama

PROJECTORS = ("mlp2x_gelu", "linear")
IMAGE_TOKENS = ("patch", "mean")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """How the tower's output becomes LLM tokens.

  Attributes:
    vision_layer: Index into the tower's hidden states (-2: second-to-last, LLaVA's choice).
    image_tokens: "patch": one token per (pooled) grid cell; "mean": one token, the grid mean.
    image_pool: Average-pool the patch grid by this factor per side (1: keep the native grid).
      Pooling trades image detail for sequence length, which CPU training budgets need.
    projector: "mlp2x_gelu" (LLaVA-1.5) or "linear" (LLaVA-1).
    attention_impl: How the tower and the LLM compute attention: "auto" (fused
      ``jax.nn.dot_product_attention`` on GPU / TPU, the einsum on CPU), "fused" or "einsum"
      (``vlmsel_jax.models.attention``). The VLM sets it on both when it is built.
    remat: Rematerialize every tower and LLM layer in the backward pass (``jax.checkpoint``):
      less activation memory for one more forward pass per layer. Set on both when built.
  """

  vision_layer: int = -2
  image_tokens: str = "patch"
  image_pool: int = 1
  projector: str = "mlp2x_gelu"
  attention_impl: str = "auto"
  remat: bool = False

  def __post_init__(self):
    attention.check_impl(self.attention_impl)
    if self.image_tokens not in IMAGE_TOKENS:
      raise ValueError(f"image_tokens {self.image_tokens!r} is not one of "
                       f"{', '.join(IMAGE_TOKENS)}")
    if self.projector not in PROJECTORS:
      raise ValueError(f"projector {self.projector!r} is not one of {', '.join(PROJECTORS)}")
    if self.image_pool < 1:
      raise ValueError(f"image_pool must be >= 1, got {self.image_pool}")

  # How the model computes, not what it is: a run may resume with another attention path or
  # with remat switched, and checkpoints saved before these existed stay compatible.
  COMPUTE_FIELDS: ClassVar[tuple[str, ...]] = ("attention_impl", "remat")

  def to_dict(self) -> dict[str, Any]:
    """The fields that identify the model (checkpoint meta), without the compute settings."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.COMPUTE_FIELDS}


def tower_grid(tower: nnx.Module, pixels: jax.Array, layer: int) -> jax.Array:
  """(batch, rows, cols, dim) patch features of a vision tower at ``layer``.

  Any module with the vision-tower protocol is a tower: ``patch_grid(pixels, layer)`` and
  ``GRID_DEFAULT_LAYER`` (ViT family, EfficientNet-Lite, pixel patches, HOG, and every family
  added since).
  """
  if not callable(getattr(tower, "patch_grid", None)):
    raise TypeError(f"{type(tower).__name__} is not a vision tower (it has no patch_grid)")
  return tower.patch_grid(pixels, layer)


def image_features(tower: nnx.Module, pixels: jax.Array, config: VLMConfig) -> jax.Array:
  """(batch, num_image_tokens, dim) frozen image tokens, before the projector."""
  grid = jax.lax.stop_gradient(tower_grid(tower, pixels, config.vision_layer))
  grid = grid.astype(jnp.float32)
  if config.image_tokens == "mean":
    return jnp.mean(grid, axis=(1, 2))[:, None, :]
  p = config.image_pool
  if p > 1:
    b, h, w, d = grid.shape
    if h % p or w % p:
      raise ValueError(f"image_pool {p} does not divide the {h}×{w} patch grid")
    grid = grid.reshape(b, h // p, p, w // p, p, d).mean(axis=(2, 4))
  b, h, w, d = grid.shape
  return grid.reshape(b, h * w, d)


class Projector(nnx.Module):
  """Maps image features into the LLM's embedding space."""

  def __init__(self, in_dim: int, out_dim: int, kind: str, *, rngs: nnx.Rngs):
    if kind not in PROJECTORS:
      raise ValueError(f"projector {kind!r} is not one of {', '.join(PROJECTORS)}")
    self.kind = kind
    # Projector weights stay float32 whatever the LLM dtype: they are what stage 1 trains.
    self.fc1 = nnx.Linear(in_dim, out_dim, rngs=rngs)
    self.fc2 = nnx.Linear(out_dim, out_dim, rngs=rngs) if kind == "mlp2x_gelu" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.fc1(x)
    if self.fc2 is not None:
      # torch.nn.GELU's default (exact erf), as in LLaVA's projector.
      x = self.fc2(jax.nn.gelu(x, approximate=False))
    return x


def splice_image_tokens(text_embeds: jax.Array, image_tokens: jax.Array,
                        image_mask: jax.Array) -> jax.Array:
  """Replaces, row by row, the positions where ``image_mask`` is set with ``image_tokens`` in order.

  Args:
    text_embeds: (batch, seq, dim) token embeddings.
    image_tokens: (batch, n, dim) projected image tokens.
    image_mask: (batch, seq) bool with exactly n True positions per row (the batch builder's
      invariant; rows with fewer use a prefix of the image tokens).
  """
  n = image_tokens.shape[1]
  index = jnp.clip(jnp.cumsum(image_mask, axis=1) - 1, 0, n - 1)
  gathered = jnp.take_along_axis(image_tokens, index[..., None], axis=1)
  return jnp.where(image_mask[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class VLM(nnx.Module):
  """Vision tower + projector + LLM."""

  def __init__(self, tower: nnx.Module, llm: llama.Llama | gemma3.Gemma3, config: VLMConfig, *,
               image_size: tuple[int, int], rngs: nnx.Rngs):
    attention.configure(tower, attention_impl=config.attention_impl, remat=config.remat)
    attention.configure(llm, attention_impl=config.attention_impl, remat=config.remat)
    self.tower = tower
    self.llm = llm
    self.config = config
    self.image_size = tuple(image_size)
    shape = jax.eval_shape(
        lambda x: image_features(tower, x, config),
        jax.ShapeDtypeStruct((1, *self.image_size, 3), jnp.float32)).shape
    self.num_image_tokens = shape[1]
    self.vision_dim = shape[2]
    self.projector = Projector(self.vision_dim, llm.config.hidden_size, config.projector,
                               rngs=rngs)

  def embed(self, pixels: jax.Array, input_ids: jax.Array, image_mask: jax.Array) -> jax.Array:
    """(batch, seq, hidden) LLM input embeddings with the image tokens spliced in."""
    image = self.projector(image_features(self.tower, pixels, self.config))
    text = self.llm.embed(input_ids)
    return splice_image_tokens(text, image, image_mask)

  def __call__(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
               image_mask: jax.Array) -> jax.Array:
    """(batch, seq, vocab) next-token logits."""
    return self.head(self.final_hidden(pixels, input_ids, attention_mask, image_mask))

  def final_hidden(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                   image_mask: jax.Array) -> jax.Array:
    """(batch, seq, hidden) final normed hidden states, what ``head`` maps to logits (the
    logits the LLM also returns are unused, and a jitted caller's compiler drops them)."""
    embeds = self.embed(pixels, input_ids, image_mask)
    return self.llm(None, attention_mask, inputs_embeds=embeds).hidden_states[-1]

  def head(self, hidden: jax.Array) -> jax.Array:
    """The LLM's output head (Gemma 3's final soft-capping included) on final hidden states."""
    return self.llm._logits(hidden)  # pylint: disable=protected-access

  def prefill(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
              image_mask: jax.Array, last: jax.Array | None = None) -> tuple[jax.Array, tuple]:
    """``__call__``'s logits (only at ``last`` when given) and the LLM's decoding cache
    (``Llama.prefill``)."""
    embeds = self.embed(pixels, input_ids, image_mask)
    return self.llm.prefill(None, attention_mask, inputs_embeds=embeds, last=last)

  def decode(self, token_ids: jax.Array, index: jax.Array, cache: tuple
             ) -> tuple[jax.Array, tuple]:
    """One generated text token per row (``Llama.decode``): the image is in the cache already."""
    return self.llm.decode(token_ids, index, cache)
