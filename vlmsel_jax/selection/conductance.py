"""Layer conductance of every block of a vision tower, by integrated gradients in JAX.

The towers: our vision transformers (a block is an encoder layer, its units tokens × hidden),
EfficientNet-Lite (a block is an MBConv block, its units rows × columns × channels; the image
embedding is the spatial mean of the final feature map, what its classifier reads) and ConvNeXt
(a block is a ConvNeXt block of any stage, its units rows × columns × channels; the image
embedding is the pooled output, the LayerNorm of the last map's mean, or that mean).

For an image x, a baseline x' (zeros: the zero image in the model's input space) and the
forward function F(x) = ‖image embedding(x)‖₂, the conductance of block l's output units is

  cond_l(x) = ∫₀¹ ∂F/∂h_l(x_α) ⊙ ∂h_l(x_α)/∂α dα,   x_α = x' + α (x − x'),

approximated exactly as Captum's ``LayerConductance`` does: on the n + 1 points α_0 < … < α_n of
the chosen rule (``gausslegendre``, Captum's default, or ``riemann_{left,right,middle,trapezoid}``)

  cond_l ≈ Σ_{k<n} ∂F/∂h_l(x_{α_k}) ⊙ (h_l(x_{α_{k+1}}) − h_l(x_{α_k})).

The gradient with respect to a block's output comes from the tower's ``block_offsets``:
a zero array added to each block's output, differentiated at zero. One forward and one backward
pass per α give every block's values and gradients at once. ``block_conductance`` reduces this
to DCD's per-block profile c_l = mean over images and over the block's units (tokens × hidden)
of |cond_l|.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmsel_jax.models.convnext import modeling as convnext
from vlmsel_jax.models.efficientnet import modeling as efficientnet
from vlmsel_jax.models.vit import modeling

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
           "riemann_trapezoid")
EMBEDDINGS = ("pooler", "cls", "mean")


def alphas(method: str, n_steps: int) -> np.ndarray:
  """The n_steps + 1 interpolation points Captum's LayerConductance uses, ascending, in [0, 1]."""
  if n_steps < 1:
    raise ValueError(f"n_steps must be at least 1, got {n_steps}")
  n = n_steps + 1
  if method == "gausslegendre":
    return 0.5 * (1.0 + np.polynomial.legendre.leggauss(n)[0])
  if method == "riemann_trapezoid":
    return np.linspace(0.0, 1.0, n)
  if method == "riemann_left":
    return np.linspace(0.0, 1.0 - 1.0 / n, n)
  if method == "riemann_right":
    return np.linspace(1.0 / n, 1.0, n)
  if method == "riemann_middle":
    return np.linspace(1.0 / (2 * n), 1.0 - 1.0 / (2 * n), n)
  raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")


def embed(output, embedding: str) -> jax.Array:
  """The image embedding F's norm is taken of: pooler output, or CLS / patch mean of the final
  (normed) hidden state; for EfficientNet the pooled final feature map ("pooler" or "mean"); for
  ConvNeXt its pooled output ("pooler") or the last map's mean ("mean")."""
  if isinstance(output, (efficientnet.EfficientNetOutput, convnext.ConvNextOutput)) and (
      embedding == "cls"):
    raise ValueError("a convolutional tower has no CLS token; use embedding 'pooler' or 'mean'")
  if isinstance(output, efficientnet.EfficientNetOutput):
    return efficientnet.select_features(output, layer=-1, pooling="mean")
  if isinstance(output, convnext.ConvNextOutput):
    return convnext.select_features(output, layer=-1, pooling=embedding)
  if embedding == "pooler":
    return modeling.select_features(output, pooling="pooler")
  if embedding in ("cls", "mean"):
    return modeling.select_features(output, layer=None, pooling=embedding)
  raise ValueError(f"embedding {embedding!r} is not one of {', '.join(EMBEDDINGS)}")


def _blocks_of(output) -> tuple:
  """Every block's output (what ``block_offsets`` is added to), block 0 first."""
  if isinstance(output, (efficientnet.EfficientNetOutput, convnext.ConvNextOutput)):
    return output.block_outputs
  return output.hidden_states[1:]


def supports(model) -> bool:
  """Whether ``model`` is a tower whose blocks conductance attributes through: a vision
  transformer (CLIP, SigLIP, DINOv2, ViT, InternViT, EVA-02, ...), an EfficientNet-Lite or a
  ConvNeXt."""
  return isinstance(model, (modeling.Vit, efficientnet.EfficientNetLite, convnext.ConvNext))


def _num_blocks(model) -> int:
  if isinstance(model, efficientnet.EfficientNetLite):
    return len(model.blocks)
  if isinstance(model, convnext.ConvNext):
    return model.num_blocks
  return len(model.layers)


def layer_conductance(model, pixels, *, n_steps: int = 50,
                      method: str = "gausslegendre", embedding: str = "pooler",
                      baseline=None) -> list[jax.Array]:
  """Conductance of every block's output units for each image.

  Args:
    model: a ``Vit``, an ``EfficientNetLite`` or a ``ConvNext``.
    pixels: (batch, height, width, channels) preprocessed images (NHWC).
    n_steps: integration steps (Captum's ``n_steps``).
    method: the quadrature rule, one of ``METHODS``.
    embedding: which image embedding F is the L2 norm of, one of ``EMBEDDINGS``.
    baseline: the reference input, same shape as ``pixels``; default zeros.

  Returns:
    One array per block, block 0 first: (batch, tokens, hidden) for a ViT, (batch, rows,
    columns, channels) for an EfficientNet or a ConvNeXt.
  """
  pixels = jnp.asarray(pixels, jnp.float32)
  base = jnp.zeros_like(pixels) if baseline is None else jnp.asarray(baseline, jnp.float32)
  if base.shape != pixels.shape:
    raise ValueError(f"baseline shape {base.shape} differs from the images' {pixels.shape}")
  if embedding not in EMBEDDINGS:
    raise ValueError(f"embedding {embedding!r} is not one of {', '.join(EMBEDDINGS)}")
  points = jnp.asarray(alphas(method, n_steps), jnp.float32)
  graphdef, state = nnx.split(model)
  return list(_conductance(graphdef, state, pixels, base, points, embedding,
                           _num_blocks(model)))


@functools.partial(jax.jit, static_argnames=("graphdef", "embedding", "num_blocks"))
def _conductance(graphdef, state, pixels, base, points, embedding, num_blocks):
  def norm_and_blocks(offsets, x):
    out = nnx.merge(graphdef, state)(x, block_offsets=offsets)
    total = jnp.sum(jnp.linalg.norm(embed(out, embedding).astype(jnp.float32), axis=-1))
    return total, _blocks_of(out)

  scalar_zeros = tuple(jnp.zeros((), jnp.float32) for _ in range(num_blocks))
  shapes = jax.eval_shape(
      lambda x: _blocks_of(nnx.merge(graphdef, state)(x, block_offsets=scalar_zeros)), pixels)
  zeros = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
  grad_fn = jax.grad(norm_and_blocks, has_aux=True)

  def at(alpha):
    grads, blocks = grad_fn(zeros, base + alpha * (pixels - base))
    return tuple(grads), tuple(blocks)

  g0, h0 = at(points[0])

  def step(carry, alpha):
    g_prev, h_prev, acc = carry
    g, h = at(alpha)
    acc = tuple(a + gp * (hn - hp) for a, gp, hn, hp in zip(acc, g_prev, h, h_prev))
    return (g, h, acc), None

  init = (g0, h0, tuple(jnp.zeros_like(h) for h in h0))
  (_, _, acc), _ = jax.lax.scan(step, init, points[1:])
  return acc


def block_conductance(model, images, *, batch_size: int = 8, n_steps: int = 50,
                      method: str = "gausslegendre", embedding: str = "pooler") -> np.ndarray:
  """DCD's profile c_l: mean over ``images`` and over block l's units of |conductance|.

  Args:
    model: a ``Vit``, an ``EfficientNetLite`` or a ``ConvNext``.
    images: (n, height, width, channels) preprocessed images of one task.
    batch_size: images per integrated-gradients batch (memory: batch × tokens × hidden × blocks).

  Returns:
    (num_blocks,) float64.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"images must be a non-empty (n, height, width, channels) batch, got shape "
                     f"{images.shape}")
  totals = None
  for start in range(0, images.shape[0], batch_size):
    batch = images[start:start + batch_size]
    cond = layer_conductance(model, batch, n_steps=n_steps, method=method, embedding=embedding)
    # Sum |cond| per image over the block's units, in float64 on the host.
    sums = np.array([np.abs(np.asarray(c, np.float64)).reshape(c.shape[0], -1).mean(axis=1).sum()
                     for c in cond])
    totals = sums if totals is None else totals + sums
  return totals / images.shape[0]
