"""VLM training: step semantics, trainable sets, resume, sharding, errors, evaluation.

Tiny random models (tests/vlm_fixtures.py) on a coloured-square dataset; CPU, 8 fake devices.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.special import log_softmax

import vlm_fixtures as fx
from vlmsel_jax import zoo
from vlmsel_jax.models import lora
from vlmsel_jax.models import vlm
from vlmsel_jax.training import batches
from vlmsel_jax.training import checkpoint as ckpt_lib
from vlmsel_jax.training import evaluation
from vlmsel_jax.training import loop
from vlmsel_jax.training import step as step_lib


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_vlm")
  return {"llm": fx.tiny_llm_dir(str(root / "llm")), "vit": fx.tiny_vit_dir(str(root / "vit"))}


def _config(dirs, workdir, **overrides):
  base = dict(vision=dirs["vit"], llm=dirs["llm"], stage=2, data="unused", workdir=str(workdir),
              vlm=vlm.VLMConfig(vision_layer=-2),
              optim=step_lib.OptimConfig(learning_rate=1e-2, schedule_steps=8, warmup_ratio=0.1),
              batch_size=8, max_steps=8, max_len=32, save_every=2, log_every=1,
              mesh="data:-1,fsdp:1", progress=False)
  base.update(overrides)
  return loop.TrainConfig(**base)


def _leaves_by_path(state) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


# --- model pieces ------------------------------------------------------------------------------

def test_lora_linear_matches_numpy_and_starts_as_identity():
  base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
  before = np.asarray(base(jnp.asarray(x)))
  layer = lora.LoRALinear(base, rank=2, alpha=6.0, rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(np.asarray(layer(jnp.asarray(x))), before)
  layer.lora_b[...] = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5)), jnp.float32)
  a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
  expected = before + 3.0 * (x @ a) @ b
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_apply_lora_rejects_targets_that_match_nothing(dirs):
  llm = zoo.load(dirs["llm"]).model
  with pytest.raises(ValueError, match="match no Linear"):
    lora.apply_lora(llm, rank=2, alpha=4, targets=("qproj",), rngs=nnx.Rngs(0))


def test_a_fused_projection_is_a_target_when_all_its_parts_are():
  assert lora.is_target("qkv_proj", lora.DEFAULT_TARGETS)
  assert lora.is_target("gate_up_proj", lora.DEFAULT_TARGETS)
  assert lora.is_target("qkv_proj", ("qkv_proj",))
  assert not lora.is_target("qkv_proj", ("q_proj", "v_proj"))
  assert not lora.is_target("gate_up_proj", ("up_proj", "down_proj"))
  assert not lora.is_target("fc1", lora.DEFAULT_TARGETS)


def test_splice_places_image_tokens_in_order():
  text = jnp.zeros((1, 6, 2))
  image = jnp.asarray([[[1.0, 1.0], [2.0, 2.0]]])
  mask = jnp.asarray([[False, True, True, False, False, False]])
  out = np.asarray(vlm.splice_image_tokens(text, image, mask))
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 2, 0, 0, 0])


# --- training semantics ------------------------------------------------------------------------

def test_loss_decreases_on_a_fixed_batch(dirs, tmp_path):
  built = loop.build_model(_config(dirs, tmp_path, stage=2))
  _, losses = fx.run_train_steps(built, fx.fixed_batch(built, "vqa"), fx.mesh(1, 1), 15)
  assert losses[-1] < 0.5 * losses[0], losses


def test_gathered_token_loss_equals_the_full_head_loss():
  rng = np.random.default_rng(0)
  b, t, d, v = 3, 9, 5, 11
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, v, size=(b, t)))
  mask = jnp.asarray(rng.random((b, t)) < 0.4).at[2].set(False)  # One row without targets.
  full = step_lib.token_loss(hidden @ w, ids, mask)
  most = step_lib.count_targets(np.asarray(mask))
  for k in (most, most + 3, 100):
    got = step_lib.gathered_token_loss(hidden, lambda h: h @ w, ids, mask, k)
    np.testing.assert_allclose(got, full, rtol=1e-6)
  # Fewer slots than targets: the later targets are dropped, which is why the loop refuses it.
  dropped = step_lib.gathered_token_loss(hidden, lambda h: h @ w, ids, mask, most - 1)
  assert float(dropped[1]) < float(full[1])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_max_targets_trains_exactly_as_the_full_head(dirs, tmp_path, family):
  use = dirs if family == "llama" else {**dirs, "llm": fx.tiny_gemma3_dir(str(tmp_path / "g"))}
  built = loop.build_model(_config(use, tmp_path / "run", stage=2))
  batch = fx.fixed_batch(built, "vqa")
  k = step_lib.count_targets(batch["loss_mask"])
  # The training loop's AdamW: the same losses step after step.
  _, ref_losses = fx.run_train_steps(built, batch, fx.mesh(1, 1), 3)
  _, losses = fx.run_train_steps(built, batch, fx.mesh(1, 1), 3, max_targets=k)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # The same gradients: plain SGD moves every parameter by lr · gradient, so the parameters after
  # three steps agree to float32 rounding. (Adam is no test of this: it divides each gradient by
  # its own running scale, so for a gradient near zero a rounding-level difference becomes a step
  # of up to lr, and which parameter that hits varies from run to run with the CPU's threading.)
  ref, _ = fx.run_train_steps(built, batch, fx.mesh(1, 1), 3, tx=optax.sgd(1e-1))
  got, _ = fx.run_train_steps(built, batch, fx.mesh(1, 1), 3, tx=optax.sgd(1e-1),
                              max_targets=k)
  # Per parameter tensor: the two runs' moves differ by float32 rounding of the gradient sums
  # (measured: up to 3e-5 of its largest move), and every tensor moved.
  for a, b, init in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params),
                        jax.tree.leaves(built.params)):
    a, b, init = (np.asarray(x, np.float64) for x in (a, b, init))
    moved = np.max(np.abs(b - init))
    assert moved > 0.0
    assert np.max(np.abs(a - b)) <= 1e-4 * moved, (np.max(np.abs(a - b)), moved)


def test_a_row_with_more_targets_than_max_targets_stops_the_run(dirs, tmp_path):
  source = fx.shape_records(16, "vqa")
  config = _config(dirs, tmp_path, stage=2, max_targets=1)
  with pytest.raises(ValueError, match=r"step 1: a batch row has \d+ target tokens, more than "
                     r"--max_targets=1"):
    loop.train(config, source=source)


def test_stage1_leaves_every_non_projector_parameter_bit_identical(dirs, tmp_path):
  built = loop.build_model(_config(dirs, tmp_path, stage=1))
  assert set(built.params) == {"projector"}
  before = _leaves_by_path(nnx.state(built.model))
  state, _ = fx.run_train_steps(built, fx.fixed_batch(built, "paired"), fx.mesh(1, 1), 3)
  model = step_lib.model_from(built.graphdef, built.template, state.params, built.frozen)
  after = _leaves_by_path(nnx.state(model))
  assert before.keys() == after.keys()
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all("projector" in k for k in changed), changed


def test_stage2_changes_only_projector_and_lora_parameters(dirs, tmp_path):
  built = loop.build_model(_config(dirs, tmp_path, stage=2))
  before = _leaves_by_path(nnx.state(built.model))
  state, _ = fx.run_train_steps(built, fx.fixed_batch(built, "vqa"), fx.mesh(1, 1), 3)
  model = step_lib.model_from(built.graphdef, built.template, state.params, built.frozen)
  after = _leaves_by_path(nnx.state(model))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert any("projector" in k for k in changed) and any("lora_b" in k for k in changed)
  assert all("projector" in k or "lora_" in k for k in changed), changed


def test_sharded_step_on_8_devices_matches_1_device(dirs, tmp_path):
  built = loop.build_model(_config(dirs, tmp_path, stage=2))
  batch = fx.fixed_batch(built, "vqa")
  ref, ref_losses = fx.run_train_steps(built, batch, fx.mesh(1, 1), 3)
  for data, fsdp in ((1, 8), (2, 4)):
    got, losses = fx.run_train_steps(built, batch, fx.mesh(data, fsdp), 3)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # The parameters really are split over the fsdp axis.
  kernel = got.params["projector"]["fc2"]["kernel"]
  assert "fsdp" in str(kernel.sharding.spec)


def test_kill_and_resume_ends_equal_to_an_uninterrupted_run(dirs, tmp_path):
  source = fx.shape_records(40, "vqa")
  loop.train(_config(dirs, tmp_path / "full"), source=source)
  stopped = loop.train(_config(dirs, tmp_path / "killed"), source=source, stop_after=3)
  assert stopped["stopped_at"] == 3
  resumed = loop.train(_config(dirs, tmp_path / "killed"), source=source)
  assert resumed["resumed_from"] == 2  # the last periodic checkpoint before the kill
  full, _ = ckpt_lib.restore_params(str(tmp_path / "full" / "checkpoints"))
  again, meta = ckpt_lib.restore_params(str(tmp_path / "killed" / "checkpoints"))
  assert meta["step"] == 8
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  with open(tmp_path / "killed" / "metrics.jsonl") as f:
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in f]
  assert steps == list(range(1, 9))


def test_larger_budget_continues_a_finished_run(dirs, tmp_path):
  source = fx.shape_records(40, "vqa")
  loop.train(_config(dirs, tmp_path, max_steps=4), source=source)
  out = loop.train(_config(dirs, tmp_path, max_steps=6), source=source)
  assert out["resumed_from"] == 4 and out["steps"] == 6


# --- errors --------------------------------------------------------------------------------------

def test_incompatible_checkpoint_is_refused_by_name(dirs, tmp_path):
  source = fx.shape_records(16, "vqa")
  loop.train(_config(dirs, tmp_path, max_steps=2), source=source)
  with pytest.raises(ckpt_lib.CheckpointError, match="incompatible run: lora"):
    loop.train(_config(dirs, tmp_path, max_steps=4, lora_rank=4), source=source)


def test_corrupt_checkpoint_gives_a_clear_error(dirs, tmp_path):
  source = fx.shape_records(16, "vqa")
  loop.train(_config(dirs, tmp_path, max_steps=2), source=source)
  # Every kept step (1 and 2) is damaged: a damaged latest step alone falls back to an earlier
  # one (tests/training/test_checkpoint_recovery.py).
  steps = sorted(os.listdir(tmp_path / "checkpoints"))
  assert steps == ["1", "2"]
  for step in steps:
    for root, _, files in os.walk(tmp_path / "checkpoints" / step / "state"):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  with pytest.raises(ckpt_lib.CheckpointError, match="cannot restore the train state"):
    loop.train(_config(dirs, tmp_path, max_steps=4), source=source)


def test_missing_init_from_directory_is_named(dirs, tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError, match="no such checkpoint directory"):
    loop.build_model(_config(dirs, tmp_path, init_from=str(tmp_path / "nope")))


def test_prompt_errors_name_the_record(dirs, tmp_path):
  built = loop.build_model(_config(dirs, tmp_path))
  image = np.zeros((8, 8, 3), np.uint8)
  no_placeholder = {"id": "r7", "image": image, "conversations": [
      {"role": "user", "content": "what colour ?"}, {"role": "assistant", "content": "red"}]}
  with pytest.raises(batches.BatchError, match="record r7: no <image> placeholder"):
    built.builder.chat_inputs(no_placeholder)
  long = {"id": "r8", "image": image, "question": " ".join(["square"] * 40), "answer": "red"}
  with pytest.raises(batches.BatchError, match="record r8: .* exceed max_len 32"):
    built.builder.chat_inputs(long)
  with pytest.raises(batches.BatchError, match="exceeds the LLM's context length 256"):
    batches.PromptBuilder(built.tokenizer, built.preprocessing, num_image_tokens=4,
                          max_len=300, context_len=256)
  with pytest.raises(batches.BatchError, match="record r9: empty caption"):
    built.builder.caption_inputs({"id": "r9", "image": image, "caption": "  "})


def test_labels_cover_exactly_the_answer_tokens(dirs, tmp_path):
  built = loop.build_model(_config(dirs, tmp_path))
  row = built.builder.chat_inputs(fx.shape_records(1, "vqa")[0])
  tok = built.tokenizer
  assert tok.convert_ids_to_tokens(row["input_ids"][row["loss_mask"]].tolist()) == [
      "red", "<|im_end|>"]
  assert row["image_mask"].sum() == built.model.num_image_tokens


# --- evaluation ----------------------------------------------------------------------------------

def test_a_score_matches_an_independent_log_likelihood(dirs, tmp_path):
  built = loop.build_model(_config(dirs, tmp_path, stage=1))
  source = fx.shape_records(5, "paired")
  fn = evaluation.model_fn_for(built.graphdef, built.template, built.params, built.frozen)
  got = evaluation.a_score(fn, built.builder, source, batch_size=4)
  expected = []
  for i in range(5):
    row = built.builder.caption_inputs(source[i], train=False)
    n = int(row["attention_mask"].sum())
    logits = np.asarray(fn(row["pixels"][None], row["input_ids"][None, :n],
                           row["attention_mask"][None, :n], row["image_mask"][None, :n]))[0]
    logp = log_softmax(logits.astype(np.float64), axis=-1)
    targets = [t for t in range(1, n) if row["loss_mask"][t]]
    # The caption alone: no EOS in the A score.
    assert len(targets) == len(built.tokenizer(source[i]["caption"],
                                               add_special_tokens=False)["input_ids"])
    expected.append(np.mean([logp[t - 1, row["input_ids"][t]] for t in targets]))
  assert got["pairs"] == 5
  np.testing.assert_allclose(got["a_score"], np.mean(expected), rtol=1e-5)


def test_greedy_decoding_matches_an_unpadded_loop(dirs, tmp_path):
  built = loop.build_model(_config(dirs, tmp_path))
  source = fx.shape_records(3, "vqa")
  fn = evaluation.model_fn_for(built.graphdef, built.template, built.params, built.frozen)
  got = evaluation.greedy_answers(fn, built.builder, [source[i] for i in range(3)],
                                  batch_size=2, max_new_tokens=3)
  for i in range(3):
    row = built.builder.generation_inputs(source[i])
    n = int(row["length"])
    ids, image = list(row["input_ids"][:n]), list(row["image_mask"][:n])
    out = []
    for _ in range(3):
      logits = fn(row["pixels"][None], np.asarray([ids]), np.ones((1, len(ids)), np.int32),
                  np.asarray([image]))
      token = int(np.argmax(np.asarray(logits)[0, -1]))
      if token == built.tokenizer.eos_token_id:
        break
      out.append(token)
      ids.append(token)
      image.append(False)
    assert got[i] == built.tokenizer.decode(out, skip_special_tokens=True).strip()


def test_evaluations_of_one_structure_compile_once_and_use_each_models_weights(dirs, tmp_path):
  built = loop.build_model(_config(dirs, tmp_path))
  records = [fx.shape_records(3, "vqa")[i] for i in range(3)]
  first = evaluation.model_fn_for(built.graphdef, built.template, built.params, built.frozen)
  want_first = evaluation.greedy_answers(first, built.builder, records, batch_size=2,
                                         max_new_tokens=2)
  programs = (evaluation._prefill_next_token, evaluation._decode_next_token)  # pylint: disable=protected-access
  compiled = [p._cache_size() for p in programs]
  # The same structure with other trained weights (a later curve point, another seed).
  params = jax.tree.map(lambda p: p + 0.5 * jnp.sign(p), built.params)
  second = evaluation.model_fn_for(built.graphdef, built.template, params, built.frozen)
  got_second = evaluation.greedy_answers(second, built.builder, records, batch_size=2,
                                         max_new_tokens=2)
  assert [p._cache_size() for p in programs] == compiled
  assert got_second != want_first  # The new weights were used, not the first model's.
  # ...and each answer is that model's own: the same as calling it directly.
  for model, got in ((first, want_first), (second, got_second)):
    for i, record in enumerate(records):
      row = built.builder.generation_inputs(record)
      n = int(row["length"])
      logits = model(row["pixels"][None], row["input_ids"][None, :n],
                     np.ones((1, n), np.int32), row["image_mask"][None, :n])
      token = int(np.argmax(np.asarray(logits)[0, -1]))
      if token != built.tokenizer.eos_token_id:
        assert got[i].startswith(built.tokenizer.decode([token], skip_special_tokens=True)
                                 .strip()), (i, got[i])


def test_cached_greedy_decoding_equals_re_running_the_model_every_step(dirs, tmp_path):
  built = loop.build_model(_config(dirs, tmp_path))
  # Weights moved off their initialisation so answers run several tokens before a stop token.
  params = jax.tree.map(lambda p: p + 0.3 * jnp.sign(p), built.params)
  bound = evaluation.model_fn_for(built.graphdef, built.template, params, built.frozen)
  records = [fx.shape_records(7, "vqa")[i] for i in range(7)]  # 2 batches of 4, one padded
  cached = evaluation.greedy_answers(bound, built.builder, records, batch_size=4,
                                     max_new_tokens=6)
  # A plain function takes the uncached path: the whole model on the grown sequence each step.
  full = evaluation.greedy_answers(lambda *inputs: bound(*inputs), built.builder, records,
                                   batch_size=4, max_new_tokens=6)
  assert cached == full
  assert max(len(built.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in full) >= 3


def test_a_gemma3_llm_trains_only_projector_and_lora_and_decodes_from_its_cache(dirs, tmp_path):
  gemma_dirs = {**dirs, "llm": fx.tiny_gemma3_dir(str(tmp_path / "gemma3"))}
  built = loop.build_model(_config(gemma_dirs, tmp_path / "run", stage=2))
  before = _leaves_by_path(nnx.state(built.model))
  state, losses = fx.run_train_steps(built, fx.fixed_batch(built, "vqa"), fx.mesh(1, 1), 15)
  assert losses[-1] < 0.5 * losses[0], losses
  model = step_lib.model_from(built.graphdef, built.template, state.params, built.frozen)
  after = _leaves_by_path(nnx.state(model))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert any("projector" in k for k in changed) and any("lora_b" in k for k in changed)
  assert all("projector" in k or "lora_" in k for k in changed), changed
  params = jax.tree.map(lambda p: p + 0.3 * jnp.sign(p), built.params)
  bound = evaluation.model_fn_for(built.graphdef, built.template, params, built.frozen)
  records = [fx.shape_records(7, "vqa")[i] for i in range(7)]
  cached = evaluation.greedy_answers(bound, built.builder, records, batch_size=4,
                                     max_new_tokens=6)
  full = evaluation.greedy_answers(lambda *inputs: bound(*inputs), built.builder, records,
                                   batch_size=4, max_new_tokens=6)
  assert cached == full


def test_bfloat16_frozen_models_train_float32_params(dirs, tmp_path):
  built = loop.build_model(_config(dirs, tmp_path, stage=2, dtype="bfloat16"))
  frozen_dtypes = {x.dtype for x in jax.tree.leaves(built.frozen)
                   if jnp.issubdtype(x.dtype, jnp.floating)}
  assert frozen_dtypes == {jnp.dtype(jnp.bfloat16)}
  state, losses = fx.run_train_steps(built, fx.fixed_batch(built, "vqa"), fx.mesh(1, 1), 10)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert losses[-1] < 0.5 * losses[0], losses
