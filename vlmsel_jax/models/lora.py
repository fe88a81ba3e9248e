"""Low-rank adapters (LoRA) for the ``nnx.Linear`` layers of any NNX model.

``apply_lora`` swaps each targeted ``nnx.Linear`` for a ``LoRALinear`` that keeps the original
layer untouched and adds ``scale · x A B`` with A (in, r), B (r, out), scale = alpha / r. B starts
at zero, so a freshly adapted model computes exactly what the original did (PEFT's convention; A
uses PEFT's Kaiming-uniform init). The adapter weights are ``LoRAParam`` variables, a subclass of
``nnx.Param``: training filters on that type to update adapters only.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

# The Linear layers of a Llama-style decoder LoRA usually adapts (LLaVA adapts all of them).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Fused projections (Phi-3 stores q, k and v as one ``qkv_proj``, gate and up as one
# ``gate_up_proj``) are adapted when every projection they hold is targeted, so the default
# targets mean "every projection" in each family, and the target list saved with a run is the
# same whichever family it trains.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                     "gate_up_proj": ("gate_proj", "up_proj")}


def is_target(name: str, targets: Iterable[str]) -> bool:
  """Whether a Linear layer called ``name`` is adapted under ``targets``: named itself, or a
  fused projection all of whose parts are named."""
  targets = set(targets)
  return name in targets or set(FUSED_PROJECTIONS.get(name, (None,))) <= targets


class LoRAParam(nnx.Param):
  """A LoRA adapter weight; the only LLM weights a LoRA stage trains."""


class LoRALinear(nnx.Module):
  """``base(x) + (alpha / rank) · (x @ A) @ B`` around a frozen ``nnx.Linear``."""

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    in_features, out_features = base.kernel.shape
    dtype = base.kernel.dtype
    self.base = base
    self.rank = rank
    self.scale = float(alpha) / rank
    # PEFT: kaiming_uniform_(a=sqrt(5)) on A (out=r, in) = U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(in_features)
    self.lora_a = LoRAParam(jax.random.uniform(rngs.params(), (in_features, rank), dtype,
                                               -bound, bound))
    self.lora_b = LoRAParam(jnp.zeros((rank, out_features), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.lora_a[...].astype(x.dtype)
    b = self.lora_b[...].astype(x.dtype)
    return self.base(x) + ((x @ a) @ b) * jnp.asarray(self.scale, x.dtype)


def _children(module: nnx.Module) -> Iterable[tuple[str, Any]]:
  return list(vars(module).items())


def apply_lora(model: nnx.Module, *, rank: int, alpha: float,
               targets: Iterable[str] = DEFAULT_TARGETS, rngs: nnx.Rngs) -> int:
  """Wraps, in place, every ``nnx.Linear`` attribute of ``model`` named in ``targets`` (and each
  fused projection whose parts all are: ``is_target``).

  Returns:
    How many layers were adapted.

  Raises:
    ValueError: when no layer matches ``targets`` (a misspelt target must not train nothing).
  """
  targets = tuple(targets)
  count = 0

  def visit(module: nnx.Module) -> None:
    nonlocal count
    for name, child in _children(module):
      if isinstance(child, nnx.Linear) and is_target(name, targets):
        setattr(module, name, LoRALinear(child, rank=rank, alpha=alpha, rngs=rngs))
        count += 1
      elif isinstance(child, LoRALinear):
        continue
      elif isinstance(child, nnx.Module):
        visit(child)
      elif isinstance(child, (list, tuple, nnx.List)):
        for item in child:
          if isinstance(item, nnx.Module):
            visit(item)

  visit(model)
  if count == 0:
    raise ValueError(f"LoRA targets {', '.join(targets)} match no Linear layer of "
                     f"{type(model).__name__}")
  return count
