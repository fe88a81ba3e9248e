"""Tiny on-disk models and data for the VLM training tests.

``tiny_llm_dir`` writes a random 2-layer Llama (transformers ``save_pretrained``) with a word-level
tokenizer that has a ChatML chat template (``tiny_gemma3_dir`` a random 3-layer Gemma 3 with it); ``tiny_vit_dir`` a random 2-layer ViT with its
preprocessor config; ``shape_records`` a small in-memory image–caption/VQA dataset whose answers
are decidable from the image (colour of a filled square), so training has something to learn;
``fixed_batch`` / ``run_train_steps`` / ``mesh`` run jitted train steps on one batch of it.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers

from vlmsel_jax.training import step as step_lib

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 30)}
WORDS = ["a", "an", "the", "square", "what", "colour", "is", "it", "?", ".", "\n", "shape",
         "user", "assistant", "system"] + list(COLOURS)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
  specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>"]
  vocab = {w: i for i, w in enumerate(specials + WORDS)}
  tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
      additional_special_tokens=["<|im_start|>"])
  fast.chat_template = CHATML
  return fast


def tiny_llm_dir(path: str, seed: int = 0, vocab_size: int = 32) -> str:
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      tie_word_embeddings=False, initializer_range=0.3)
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  tiny_tokenizer().save_pretrained(path)
  return path


def tiny_gemma3_dir(path: str, seed: int = 0, vocab_size: int = 32) -> str:
  """A random 3-layer Gemma 3 (sliding window 4, shorter than the prompts) with the tiny
  tokenizer."""
  torch.manual_seed(seed)
  config = transformers.Gemma3TextConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
      sliding_window=4, max_position_embeddings=256, initializer_range=0.3,
      layer_types=["sliding_attention", "full_attention", "sliding_attention"])
  transformers.Gemma3ForCausalLM(config).save_pretrained(path)
  tiny_tokenizer().save_pretrained(path)
  return path


def tiny_vit_dir(path: str, seed: int = 0, image_size: int = 32) -> str:
  torch.manual_seed(seed)
  config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, image_size=image_size, patch_size=8)
  transformers.ViTModel(config).save_pretrained(path)
  with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
    json.dump({"do_resize": True, "size": {"height": image_size, "width": image_size},
               "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
               "image_std": [0.5, 0.5, 0.5], "do_rescale": True, "rescale_factor": 1 / 255,
               "resample": 2, "image_processor_type": "ViTImageProcessor"}, f)
  return path


def square_image(colour: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
  image = np.full((size, size, 3), 255, np.uint8)
  x, y = rng.integers(0, size // 2, 2)
  image[y:y + size // 2, x:x + size // 2] = COLOURS[colour]
  return image


class ListSource:
  """A random-access record source over a list (what the data layer's sources look like)."""

  def __init__(self, records, name="list"):
    self.records = list(records)
    self.name = name
    self.bad_records = None

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def shape_records(n: int, kind: str, seed: int = 0) -> ListSource:
  rng = np.random.default_rng(seed)
  names = list(COLOURS)
  out = []
  for i in range(n):
    colour = names[i % len(names)]
    image = square_image(colour, rng)
    if kind == "paired":
      out.append({"id": str(i), "image": image, "caption": f"a {colour} square ."})
    else:
      out.append({"id": str(i), "image": image, "question": "what colour is the square ?",
                  "answers": [colour], "answer": colour})
  return ListSource(out, name=f"shapes-{kind}")


def fixed_batch(built, kind: str, n: int = 8) -> dict[str, np.ndarray]:
  """n records of ``shape_records`` as one training batch (``kind``: "paired" or "vqa")."""
  source = shape_records(n, kind)
  make = built.builder.caption_inputs if kind == "paired" else built.builder.chat_inputs
  rows = [make(source[i]) for i in range(n)]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch["mask"] = np.ones(n, bool)
  return batch


def run_train_steps(built, batch, mesh, steps, lr=1e-2, max_targets=0, tx=None):
  """``steps`` jitted train steps of ``built`` on one fixed batch: (final state, losses).

  ``tx``: the optimizer (default: the training loop's AdamW at ``lr``, constant after no warm-up).
  """
  if tx is None:
    tx = step_lib.OptimConfig(learning_rate=lr, schedule_steps=100, warmup_ratio=0.0).make()
  state, state_sh = step_lib.init_state(built.params, tx, mesh)
  frozen_sh = step_lib.tree_shardings(built.frozen, mesh)
  frozen = jax.device_put(built.frozen, frozen_sh)
  gb = step_lib.global_batch(batch, mesh)
  fn = step_lib.make_train_step(built.graphdef, built.template, tx, mesh, state_sh, frozen_sh,
                                {k: v.sharding for k, v in gb.items()}, max_targets=max_targets)
  losses = []
  for _ in range(steps):
    state, metrics = fn(state, frozen, gb)
    losses.append(float(metrics["loss"]))
  return state, losses


def mesh(data, fsdp):
  """A (data, fsdp) mesh of the first data·fsdp devices."""
  devices = np.asarray(jax.devices()[:data * fsdp]).reshape(data, fsdp)
  return jax.sharding.Mesh(devices, ("data", "fsdp"))
