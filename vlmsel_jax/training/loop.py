"""The training loop: build the VLM, restore or start, step through the data, save, evaluate.

One readable loop (big_vision style). Everything random is a function of ``seed``: parameter
initialisation (projector, LoRA) and data order (the loader's seeded shuffle, whose position is
checkpointed). There is no other random state, so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import parallel
from vlmsel_jax import zoo
from vlmsel_jax.models import lora
from vlmsel_jax.models import vlm as vlm_lib
from vlmsel_jax.training import batches as batches_lib
from vlmsel_jax.training import checkpoint as ckpt_lib
from vlmsel_jax.training import step as step_lib

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run; ``training.flags.config_from_flags`` fills it from flags.

  ``vlm.vision_layer`` is the run's tower layer, resolved (``tower_layer``): the vision
  spec's own ``@layer=`` when it names one.
  """

  vision: str
  llm: str
  stage: int
  data: str
  workdir: str
  data_kind: str | None = None
  vlm: vlm_lib.VLMConfig = vlm_lib.VLMConfig()
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = lora.DEFAULT_TARGETS
  full_finetune: bool = False
  optim: step_lib.OptimConfig = step_lib.OptimConfig()
  batch_size: int = 8
  max_steps: int = 100
  data_fraction: float = 1.0
  seed: int = 0
  max_len: int = 128
  system_prompt: str | None = None
  dtype: str = "float32"
  mesh: str = "data:-1,fsdp:1"
  save_every: int = 50
  keep: int = 2
  log_every: int = 10
  init_from: str | None = None
  skip_bad_records: bool = False
  progress: bool = True
  # > 0: the LM head runs only at up to this many target positions per row (step.py's
  # gathered_token_loss); the same loss, and a batch row with more targets is an error.
  max_targets: int = 0

  def __post_init__(self):
    # The tower layer is set once, by whoever builds the config (``tower_layer``); a vision spec
    # that names another layer than the VLM config carries is a contradiction, not a default.
    own = zoo.split_variant(self.vision)[1].layer
    if own is not None and own != self.vlm.vision_layer:
      raise ValueError(f"vision {self.vision!r} names layer {own}, but the VLM config has "
                       f"vision_layer={self.vlm.vision_layer}; build the config with "
                       "loop.tower_layer(vision, default)")

  def kind(self) -> str:
    if self.data_kind:
      return self.data_kind
    return "paired" if self.stage == 1 else "vqa"

  def meta(self, trainable_shapes: dict) -> dict:
    """What identifies the run for checkpoint compatibility (see checkpoint.COMPATIBILITY_KEYS)."""
    return {
        "vision": self.vision, "llm": self.llm, "vlm": self.vlm.to_dict(), "stage": self.stage,
        "lora": (None if self.stage == 1 or self.full_finetune else
                 {"rank": self.lora_rank, "alpha": self.lora_alpha,
                  "targets": list(self.lora_targets)}),
        "trainable_shapes": trainable_shapes, "dtype": self.dtype, "seed": self.seed,
        "data": self.data, "data_fraction": self.data_fraction,
        "batch_size": self.batch_size, "max_len": self.max_len,
        # Not compatibility keys (checkpoints from before they were recorded still load), but
        # evaluation must read the data and build the prompts the way the run trained.
        "data_kind": self.data_kind, "system_prompt": self.system_prompt,
    }


def tower_layer(vision: str, default: int) -> int:
  """The tower layer a run of ``vision`` uses: the spec's own ``@layer=`` (a candidate setting,
  ``efficientnet-lite0@layer=-3``), else ``default`` (``--vision_layer``). A multi-encoder spec
  (``a@layer=-2+b``) always names its one layer, -1: its members' layers are in the spec.

  The one place the two meet: every config builder (``training.flags.config_from_flags``) sets
  ``TrainConfig.vlm.vision_layer`` from it, and ``meta()`` records it, so a checkpoint says what
  it was.
  """
  layer = zoo.split_variant(vision)[1].layer
  return default if layer is None else layer


@dataclasses.dataclass
class Built:
  """A VLM ready to train or evaluate, split into its trained and frozen parts."""

  model: vlm_lib.VLM
  graphdef: Any
  params: Any
  frozen: Any
  template: Any
  tokenizer: Any
  preprocessing: Any
  builder: batches_lib.PromptBuilder


def build_model(config: TrainConfig) -> Built:
  """Loads the tower and LLM from the zoo and assembles the (LoRA-adapted) VLM."""
  vision = zoo.load(config.vision, dtype=config.dtype)
  if vision.kind != "vision":
    raise ValueError(f"vision {config.vision!r} is a {vision.kind} model, not a vision "
                     "tower")
  layer, count = config.vlm.vision_layer, vision.num_layers
  if not -count <= layer < count:
    raise ValueError(f"vision {config.vision!r} has {count} layer(s) to read ({-count} .. "
                     f"{count - 1}); --vision_layer / @layer={layer} is not one of them")
  text = zoo.load(config.llm, dtype=config.dtype)
  if text.kind != "text" or not hasattr(text.model, "embed_tokens"):
    raise ValueError(f"llm {config.llm!r} is not a decoder LLM")
  rngs = nnx.Rngs(params=config.seed)
  model = vlm_lib.VLM(vision.model, text.model, config.vlm,
                      image_size=vision.preprocessing.image_size, rngs=rngs)
  if config.stage == 2 and not config.full_finetune:
    lora.apply_lora(model.llm, rank=config.lora_rank, alpha=config.lora_alpha,
                    targets=config.lora_targets, rngs=nnx.Rngs(params=config.seed + 1))
  graphdef, params, frozen, template = step_lib.split_model(model, config.stage,
                                                            config.full_finetune)
  if config.init_from:
    params = _init_projector(params, config.init_from)
  builder = batches_lib.PromptBuilder(
      text.tokenizer, vision.preprocessing, num_image_tokens=model.num_image_tokens,
      max_len=config.max_len, context_len=text.model.config.max_position_embeddings,
      system_prompt=config.system_prompt)
  return Built(model, graphdef, params, frozen, template, text.tokenizer, vision.preprocessing,
               builder)


def _init_projector(params: dict, directory: str) -> dict:
  """``params`` with the projector from the latest checkpoint of another run (stage 1).

  ``directory`` is that run's workdir (or its checkpoints directory).
  """
  nested = os.path.join(directory, CHECKPOINT_DIR)
  restored, _ = ckpt_lib.restore_params(nested if atomic.isdir(nested) else directory)
  if not isinstance(restored, dict) or "projector" not in restored:
    raise ckpt_lib.CheckpointError(f"{directory}: the checkpoint has no projector")
  want = jax.tree.map(np.shape, params["projector"])
  got = jax.tree.map(np.shape, restored["projector"])
  if want != got:
    raise ckpt_lib.CheckpointError(f"{directory}: projector shapes {got} do not fit this model's "
                                   f"{want}")
  params = dict(params)
  params["projector"] = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                                     restored["projector"])
  return params


def shapes_of(tree: Any) -> dict[str, list[int]]:
  """{"projector/fc1/kernel": [in, out], ...}: JSON-safe, comparable across save and load."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): list(np.shape(x))
          for path, x in flat}


def final_loss(workdir: str) -> float | None:
  """The last logged training loss of a run (also when this invocation trained nothing)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not atomic.exists(path):
    return None
  with atomic.open_text(path) as f:
    lines = [line for line in f if line.strip()]
  return json.loads(lines[-1]).get("loss") if lines else None


def transform_for(config: TrainConfig, builder: batches_lib.PromptBuilder
                  ) -> Callable[[dict], dict]:
  if config.stage == 1:
    return builder.caption_inputs
  return builder.chat_inputs


def open_data(config: TrainConfig):
  from vlmsel_jax.data import registry  # pylint: disable=g-import-not-at-top
  return registry.open_source(config.data, kind=config.kind(), split="train",
                              skip_bad_records=config.skip_bad_records)


def make_loader(config: TrainConfig, source, transform):
  from vlmsel_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  count = jax.process_count()
  if config.batch_size % count:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {count} processes")
  return pipeline.Loader(source, transform, batch_size=config.batch_size // count,
                         seed=config.seed, shuffle=True, num_epochs=None,
                         fraction=config.data_fraction)


class MetricsLog:
  """metrics.jsonl (process 0 only); on resume, entries past the restored step are dropped.

  In a workdir on an object store (``gs://``), which cannot append, each record rewrites the
  file (``atomic.append_text``); there is one record per ``log_every`` steps.
  """

  def __init__(self, path: str, resume_step: int):
    self.path = path
    self.primary = parallel.is_primary()
    # The last record kept (up to the restored step); {} when there is none.
    self.last: dict = {}
    if not self.primary:
      return
    kept = []
    if atomic.exists(path):
      with atomic.open_text(path) as f:
        for line in f:
          line = line.strip()
          if not line:
            continue
          try:
            record = json.loads(line)
          except json.JSONDecodeError:  # A line cut short by a kill while it was written.
            continue
          if record.get("step", 0) <= resume_step:
            kept.append(line)
            self.last = record
    atomic.write_text_atomic(path, "".join(k + "\n" for k in kept))

  def write(self, record: dict) -> None:
    if self.primary:
      atomic.append_text(self.path, json.dumps(record) + "\n")


def train(config: TrainConfig, *, source=None, built: Built | None = None,
          stop_after: int | None = None) -> dict:
  """Runs (or resumes) one training run; returns a summary dict.

  Args:
    config: The run.
    source: A record source to train on instead of opening ``config.data``.
    built: ``build_model(config)``, when the caller has it already (it evaluates afterwards
      with the same model); the trained params are copied, never modified.
    stop_after: Stop after this many steps *of this invocation* without a final save, as a kill
      would (tests use it to simulate an interrupted run).
  """
  if config.max_steps < 1:
    raise ValueError(f"max_steps must be >= 1, got {config.max_steps}")
  if config.max_targets < 0:
    raise ValueError(f"max_targets must be >= 0, got {config.max_targets}")
  if not 0 < config.data_fraction <= 1:
    raise ValueError(f"data_fraction must be in (0, 1], got {config.data_fraction}")
  # Everything that can refuse the run (mesh, data, models) comes before its directory is made:
  # a run that cannot start leaves nothing behind.
  mesh = parallel.make_mesh(config.mesh)
  source = open_data(config) if source is None else source
  built = build_model(config) if built is None else built
  loader = make_loader(config, source, transform_for(config, built.builder))
  atomic.makedirs(config.workdir)

  tx = config.optim.make()
  state, state_sh = step_lib.init_state(built.params, tx, mesh)
  frozen_sh = step_lib.tree_shardings(built.frozen, mesh)
  frozen = jax.device_put(built.frozen, frozen_sh)
  meta = config.meta(shapes_of(built.params))

  ckpt = ckpt_lib.Checkpointer(os.path.join(config.workdir, CHECKPOINT_DIR),
                               save_every=config.save_every, keep=config.keep)
  start = 0
  # The newest intact checkpoint (a damaged newer one is skipped with a warning).
  found = ckpt.restore_latest(_state_tree(state), meta)
  if found is not None:
    _, restored, data_state = found
    state = step_lib.TrainState(restored["step"], restored["params"], restored["opt_state"])
    loader.set_state(data_state)
    start = int(restored["step"])
  log = MetricsLog(os.path.join(config.workdir, METRICS_FILE), start)

  train_step = None
  schedule = config.optim.schedule()
  it = iter(loader)
  bar = None
  if config.progress and parallel.is_primary() and start < config.max_steps:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=config.max_steps, initial=start, desc=f"stage {config.stage}",
               unit="step", dynamic_ncols=True)
  # What the last logged step recorded (loss, grad norm, learning rate, ...): the summary of an
  # invocation that trains no further step (a finished run run again) reports it as it was.
  last = dict(log.last)
  tic, interval_tokens = time.perf_counter(), 0
  done_here = 0
  for step in range(start, config.max_steps):
    batch = next(it)
    gb = step_lib.global_batch(batch, mesh)
    if train_step is None:
      batch_sh = {k: v.sharding for k, v in gb.items()}
      train_step = step_lib.make_train_step(built.graphdef, built.template, tx, mesh, state_sh,
                                            frozen_sh, batch_sh,
                                            max_targets=config.max_targets)
    if config.max_targets:
      most = step_lib.count_targets(batch["loss_mask"])
      if most > config.max_targets:
        raise ValueError(f"step {step + 1}: a batch row has {most} target tokens, more than "
                         f"--max_targets={config.max_targets}; raise it, or give 0 (the LM head "
                         "at every position)")
    state, metrics = train_step(state, frozen, gb)
    done_here += 1
    interval_tokens += int(np.sum(batch["attention_mask"])) * jax.process_count()
    if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps or step == start:
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      # The first step compiles, so it gets no rate; later ones average since the last log.
      rate = interval_tokens / max(now - tic, 1e-9) if step > start else None
      last = {"step": step + 1, "loss": float(metrics["loss"]),
              "grad_norm": float(metrics["grad_norm"]),
              "learning_rate": float(schedule(step // max(config.optim.accumulate, 1))),
              "tokens_per_s": rate, "time": time.time()}
      log.write(last)
      if bar is not None:
        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['learning_rate']:.2e}")
      tic, interval_tokens = time.perf_counter(), 0
    if bar is not None:
      bar.update(1)
    ckpt.save(step + 1, _state_tree(state), loader.get_state(), meta)
    if stop_after is not None and done_here >= stop_after:
      # As a kill would: no final save, only what the periodic saves already wrote.
      ckpt.wait()
      ckpt.close()
      if bar is not None:
        bar.close()
      return {"stopped_at": step + 1, **last}
  if bar is not None:
    bar.close()
  final = int(jax.device_get(state.step))
  if ckpt.latest_step() != final:
    ckpt.save(final, _state_tree(state), loader.get_state(), meta, force=True)
  ckpt.wait()
  ckpt.close()
  summary = {"workdir": config.workdir, "steps": final, "resumed_from": start, **last}
  if getattr(source, "bad_records", None) is not None and hasattr(source.bad_records, "as_dict"):
    summary["bad_records"] = source.bad_records.as_dict()
  return summary


def _state_tree(state: step_lib.TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}
