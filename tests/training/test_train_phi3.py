"""VLM training with a Phi-3 LLM, through the training loop's own model building.

A tiny random Phi-3 (half-rotary heads, longrope with an original context shorter than the
prompts) saved with the tests' tokenizer, the tiny ViT of ``vlm_fixtures``, stage 2 with LoRA's
default targets, which reach its fused ``qkv_proj`` and ``gate_up_proj`` (``lora.is_target``) as
well as ``o_proj`` / ``down_proj``: the loss halves in
15 steps on a fixed batch, and only the projector and the LoRA adapters change, every targeted
projection's adapter among them. Phi-3 only, to keep this file within its time budget: Qwen3's
layers are the Llama family's plus two norms, and a VLM's loss and gradients through Qwen3 (and
Phi-3), with and without remat, are checked in tests/models/test_attention_paths.py; cached
decoding of both against the full forward in their parity tests.
"""

from __future__ import annotations

import jax
import numpy as np
import torch
import transformers
from flax import nnx

import vlm_fixtures as fx
from vlmsel_jax.models import vlm
from vlmsel_jax.training import loop
from vlmsel_jax.training import step as step_lib

PHI3 = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            original_max_position_embeddings=16, pad_token_id=0, bos_token_id=0,
            eos_token_id=3, initializer_range=0.3,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.5, "short_factor": [1.0, 1.2],
                             "long_factor": [2.0, 4.0]})
# The layers the default targets adapt in Phi-3.
ADAPTED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _leaves_by_path(state) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def test_phi3_llm_trains_only_projector_and_lora(tmp_path):
  torch.manual_seed(0)
  llm_dir = str(tmp_path / "phi3")
  transformers.Phi3ForCausalLM(transformers.Phi3Config(**PHI3)).save_pretrained(llm_dir)
  fx.tiny_tokenizer().save_pretrained(llm_dir)
  built = loop.build_model(loop.TrainConfig(
      vision=fx.tiny_vit_dir(str(tmp_path / "vit")), llm=llm_dir, stage=2, data="unused",
      workdir=str(tmp_path / "run"), vlm=vlm.VLMConfig(vision_layer=-2),
      optim=step_lib.OptimConfig(learning_rate=1e-2, schedule_steps=8, warmup_ratio=0.1),
      batch_size=8, max_steps=8, max_len=32, mesh="data:-1,fsdp:1",
      progress=False))
  before = _leaves_by_path(nnx.state(built.model))
  state, losses = fx.run_train_steps(built, fx.fixed_batch(built, "vqa"), fx.mesh(1, 1), 15)
  assert losses[-1] < 0.5 * losses[0], losses
  model = step_lib.model_from(built.graphdef, built.template, state.params, built.frozen)
  after = _leaves_by_path(nnx.state(model))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert all("projector" in k or "lora_" in k for k in changed), changed
  assert any("projector" in k for k in changed)
  for target in ADAPTED:  # every projection got an adapter that moved
    assert any(f"'{target}'" in k and "lora_b" in k for k in changed), target
