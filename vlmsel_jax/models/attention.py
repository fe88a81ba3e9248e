"""How every model family computes attention and whether it rematerializes its layers.

Each family keeps its own hand-written einsum attention, tuned for XLA:CPU, and can instead call
``jax.nn.dot_product_attention``: on TPU XLA fuses it, on GPU it runs cuDNN's flash attention
where cuDNN takes the shapes and dtype (bfloat16 / float16, head width a multiple of 8). Which one
runs is chosen here, in one place, from an ``attention_impl`` setting:

* ``"auto"`` (the default): ``"fused"`` on a GPU or TPU backend, ``"einsum"`` on CPU;
* ``"fused"``: always ``jax.nn.dot_product_attention``;
* ``"einsum"``: always the family's own einsum.

The two give the same outputs up to float rounding (tests/models/test_attention_paths.py); masked keys
get a large negative score in both, so a query with no visible key averages every key in both
(cuDNN aside: its output at such a query, a padding position, is not that average).

``remat`` wraps each decoder / encoder layer's forward pass in ``jax.checkpoint`` (as
``nnx.remat`` does) so that training
recomputes a layer's activations in the backward pass instead of storing them. ``configure``
sets both on a built model (a VLM: its tower and LLM), config fields included.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION_IMPLS = ("auto", "fused", "einsum")
_FUSED_BACKENDS = ("gpu", "cuda", "rocm", "tpu")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check_impl(impl: str) -> str:
  """``impl`` if it is one of ``ATTENTION_IMPLS``; raises ValueError otherwise."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
  return impl


def resolve(impl: str, backend: str | None = None) -> str:
  """``"fused"`` or ``"einsum"``: what ``impl`` means on ``backend`` (default: JAX's default
  backend, the one a jitted model runs on)."""
  check_impl(impl)
  if impl != "auto":
    return impl
  backend = jax.default_backend() if backend is None else backend
  return "fused" if backend in _FUSED_BACKENDS else "einsum"


def _use_cudnn(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> bool:
  """Whether cuDNN's flash attention takes these inputs, as far as can be told before tracing
  its backward pass (which refuses a mask over an odd number of queries or keys)."""
  if jax.default_backend() not in ("gpu", "cuda"):
    return False
  head = q.shape[-1]
  if q.dtype not in _CUDNN_DTYPES or head % 8 or head > 128:
    return False
  return mask is None or (q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)


def fused(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
          scale: float, is_causal: bool = False) -> jax.Array:
  """``jax.nn.dot_product_attention`` of (b, t, heads, d) queries over (b, s, kv_heads, d) keys
  and values (grouped-query when kv_heads < heads: query head h reads kv head h // groups).

  Args:
    q, k, v: Queries, keys, values; one dtype.
    mask: None, or a boolean array broadcastable to (b, heads, t, s): True where a query may
      attend to a key.
    scale: Factor on the scores.
    is_causal: Also hide keys after each query (t == s); ``mask`` may already do so. On GPU it
      lets cuDNN skip the hidden blocks instead of computing and masking them.

  Returns:
    (b, t, heads, d) attention outputs.
  """
  if mask is not None:
    mask = mask.astype(bool)
  if _use_cudnn(q, k, mask):
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal,
                                          implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError):
      pass  # A cuDNN build or GPU that refuses these shapes: XLA's fused attention below.
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal)


def remat_call(remat: bool, layer: nnx.Module, *args: Any) -> Any:
  """``layer(*args)``; when ``remat`` is set, rematerialized in the backward pass.

  The layer runs as a pure function of its split state under ``jax.checkpoint`` (what
  ``nnx.remat`` does), written out so that it also works on a model that a plain JAX transform
  closes over (``jax.eval_shape(lambda x: model(x), ...)``), where ``nnx.remat`` refuses to
  write back into the outer model. The layers it wraps change no state while they run.
  """
  if not remat:
    return layer(*args)
  graphdef, state = nnx.split(layer)

  def run(state, *inputs):
    return nnx.merge(graphdef, state)(*inputs)

  return jax.checkpoint(run)(state, *args)


def configure(model: nnx.Module, *, attention_impl: str | None = None,
              remat: bool | None = None) -> nnx.Module:
  """Sets ``attention_impl`` and / or ``remat`` (None: leave as is) on every module of ``model``
  that has them, and on the configs of the models that carry one; returns ``model``.

  Works on any model of ``vlmsel_jax.models`` (a VLM reaches its tower and LLM); modules without
  attention (EfficientNet, handcrafted towers) are left as they are.
  """
  if attention_impl is not None:
    check_impl(attention_impl)
  changes = {name: value for name, value in (("attention_impl", attention_impl),
                                             ("remat", remat)) if value is not None}
  if not changes:
    return model
  for _, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    for name, value in changes.items():
      if name in vars(node):
        setattr(node, name, value)
    config = vars(node).get("config")
    if dataclasses.is_dataclass(config):
      fields = {f.name for f in dataclasses.fields(config)}
      own = {name: value for name, value in changes.items() if name in fields}
      if own:
        node.config = dataclasses.replace(config, **own)
  return model
