"""The train step: which parameters train, the masked next-token loss, the optimizer, sharding.

The model is split once into ``graphdef`` (structure), ``params`` (what trains) and ``frozen``
(everything else). Stage 1 trains the projector; stage 2 the projector and the LoRA adapters (or,
with ``full_finetune``, the projector and every LLM weight). The vision tower never trains.
``params`` are float32 whatever the frozen models' dtype, so a bfloat16 LLM still gets float32
optimizer updates.

Sharding (big_vision / FSDP style): a 2-D mesh ("data", "fsdp"); the batch is split over both
axes; every parameter and optimizer moment is split over "fsdp" along its largest axis that the
axis size divides (replicated when none does). The step is ``jax.jit`` with explicit in/out
shardings and the train state donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vlmsel_jax.models import lora

DATA_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warm-up then cosine decay, clipping and gradient accumulation.

  Attributes:
    learning_rate: Peak learning rate.
    warmup_ratio: Fraction of ``schedule_steps`` spent warming up (LLaVA: 0.03).
    schedule_steps: Steps of the whole schedule (updates, after accumulation).
    weight_decay: AdamW decoupled weight decay (LLaVA: 0).
    clip_norm: Global-norm gradient clipping (0 disables).
    accumulate: Micro-batches per update (optax.MultiSteps averages their gradients).
    b1, b2, eps: Adam moments.
  """

  learning_rate: float = 1e-3
  warmup_ratio: float = 0.03
  schedule_steps: int = 1000
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  accumulate: int = 1
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def schedule(self) -> optax.Schedule:
    warmup = int(round(self.warmup_ratio * self.schedule_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=self.learning_rate, warmup_steps=warmup,
        decay_steps=max(self.schedule_steps, warmup + 1), end_value=0.0)

  def make(self) -> optax.GradientTransformation:
    chain = []
    if self.clip_norm > 0:
      chain.append(optax.clip_by_global_norm(self.clip_norm))
    chain.append(optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps,
                             weight_decay=self.weight_decay))
    tx = optax.chain(*chain)
    if self.accumulate > 1:
      tx = optax.MultiSteps(tx, every_k_schedule=self.accumulate)
    return tx


def trainable_filter(stage: int, full_finetune: bool = False) -> nnx.filterlib.Filter:
  """The parameters a stage trains."""
  projector = nnx.All(nnx.Param, nnx.PathContains("projector"))
  if stage == 1:
    return projector
  if stage == 2:
    llm = nnx.All(nnx.Param, nnx.PathContains("llm")) if full_finetune else lora.LoRAParam
    return nnx.Any(projector, llm)
  raise ValueError(f"stage must be 1 or 2, got {stage}")


def split_model(model: nnx.Module, stage: int, full_finetune: bool = False):
  """(graphdef, params, frozen, template).

  ``params`` is a float32 pure dict (what the optimizer sees), ``frozen`` an nnx.State, and
  ``template`` the abstract State of the trained variables (their structure and own dtypes),
  which ``model_from`` needs to rebuild the model.
  """
  graphdef, params, frozen = nnx.split(model, trainable_filter(stage, full_finetune), ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"stage {stage} has nothing to train (no projector/LoRA parameters found)")
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), nnx.to_pure_dict(params))
  return graphdef, params, frozen, template


def model_from(graphdef, template: nnx.State, params: Any, frozen: nnx.State) -> nnx.Module:
  """The model with ``params`` (cast to each variable's own dtype) in place of the trained part."""
  state = jax.tree.map(lambda t: t, template)
  dtypes = nnx.to_pure_dict(template)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda t, p: p.astype(t.dtype), dtypes, params))
  return nnx.merge(graphdef, state, frozen)


def token_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """(sum of target-token NLL, number of target tokens); target t is predicted at t − 1."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = input_ids[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * mask), jnp.sum(mask)


def gathered_token_loss(hidden: jax.Array, head: Callable[[jax.Array], jax.Array],
                        input_ids: jax.Array, loss_mask: jax.Array, max_targets: int
                        ) -> tuple[jax.Array, jax.Array]:
  """``token_loss`` with the LM head applied only where a target is predicted.

  Per row, the first ``max_targets`` positions whose next token is a target are gathered from
  ``hidden`` (the final normed hidden states) and only they go through ``head``: a caption or an
  answer is a few tokens of the sequence, and with a large vocabulary (Gemma 3: 262,144) the head
  at every position is most of a step. Equal to ``token_loss`` when no row has more than
  ``max_targets`` targets; the caller must ensure that (``count_targets``), since further
  targets would be dropped.
  """
  mask = loss_mask[:, 1:]
  k = min(max_targets, mask.shape[1])
  # Target positions first (in order), then the rest; stable, so the first k are the targets.
  order = jnp.argsort(jnp.logical_not(mask).astype(jnp.int32), axis=1, stable=True)[:, :k]
  valid = jnp.take_along_axis(mask, order, axis=1).astype(jnp.float32)
  picked = jnp.take_along_axis(hidden[:, :-1], order[..., None], axis=1)
  logits = head(picked).astype(jnp.float32)
  targets = jnp.take_along_axis(input_ids[:, 1:], order, axis=1)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * valid), jnp.sum(valid)


def count_targets(loss_mask: np.ndarray) -> int:
  """The most target tokens any row of a (host) batch has: what ``max_targets`` must cover."""
  return int(np.asarray(loss_mask)[:, 1:].sum(axis=1).max(initial=0))


def token_log_likelihoods(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
  """Per row: (sum of target-token log-probabilities, number of target tokens)."""
  logits = logits[:, :-1].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(picked * mask, axis=1), jnp.sum(mask, axis=1)


# --- sharding -------------------------------------------------------------------------------

def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Split the largest axis ``fsdp`` divides; replicate small or indivisible arrays."""
  if fsdp == 1 or not shape:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0 and shape[axis] >= fsdp:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  fsdp = mesh.shape.get("fsdp", 1)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp)), tree)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  axes = tuple(a for a in DATA_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's rows → global arrays sharded over the mesh's data axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
          for k, v in local.items()}


# --- the step -------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainState:
  """What a checkpoint holds besides the data position: trained params, optimizer, step."""

  step: jax.Array
  params: Any
  opt_state: Any


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state"],
                                 meta_fields=[])


def make_train_step(graphdef, template: nnx.State, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, state_shardings: Any, frozen_shardings: Any,
                    batch_shardings: Any, *, max_targets: int = 0) -> Callable:
  """A jitted ``step(state, frozen, batch) -> (state, metrics)``; ``state`` is donated.

  ``batch`` holds ``pixels``, ``input_ids``, ``attention_mask``, ``image_mask``, ``loss_mask``
  and ``mask`` (False on padding rows). The loss is the mean NLL over the batch's target tokens.
  ``max_targets`` > 0 applies the LM head only at (up to that many) target positions per row
  (``gathered_token_loss``); 0 applies it everywhere.
  """

  def loss_fn(params, frozen, batch):
    model = model_from(graphdef, template, params, frozen)
    inputs = (batch["pixels"], batch["input_ids"], batch["attention_mask"], batch["image_mask"])
    loss_mask = batch["loss_mask"] & batch["mask"][:, None]
    if max_targets:
      total, count = gathered_token_loss(model.final_hidden(*inputs), model.head,
                                         batch["input_ids"], loss_mask, max_targets)
    else:
      total, count = token_loss(model(*inputs), batch["input_ids"], loss_mask)
    return total / jnp.maximum(count, 1.0), count

  def step(state: TrainState, frozen, batch):
    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, params, opt_state), metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def init_state(params: Any, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
               ) -> tuple[TrainState, Any]:
  """A sharded fresh TrainState and its shardings."""
  params_sh = tree_shardings(params, mesh)
  # A copy: the step donates its state, which must never alias the caller's arrays.
  params = jax.device_put(jax.tree.map(jnp.copy, params), params_sh)
  opt_state = jax.jit(tx.init, out_shardings=None)(params)
  state = TrainState(jnp.zeros((), jnp.int32), params, opt_state)
  shardings = state_shardings_for(state, mesh)
  return jax.device_put(state, shardings), shardings


def state_shardings_for(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
  replicated = NamedSharding(mesh, P())
  return TrainState(replicated, tree_shardings(state.params, mesh),
                    tree_shardings(state.opt_state, mesh))
