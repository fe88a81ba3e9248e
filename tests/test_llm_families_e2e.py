"""Every decoder family the zoo added beyond Llama, through the binaries, as a user runs them.

For each family a tiny random transformers checkpoint is saved with the tests' word-level
tokenizer, and then:

* ``train --stage=2`` trains the projector and LoRA adapters on easy-VQA chats (LoRA's default
  targets reach Phi-3's fused projections) and answers held-out questions by cached greedy
  decoding: the VQA accuracy every ground truth ends with;
* ``score`` extracts its caption bank as the text model and scores two towers against it.

The Gemma checkpoints are saved without a chat template, as Gemma's pretrained checkpoints are:
the zoo gives them Gemma's turn format. The numbers are those of random models; what is checked
is that each family runs end to end and gives finite values in their ranges. Each family's parity
with transformers is tested in ``tests/models/``.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import transformers
from absl import flags

import vlm_fixtures as fx
from vlmsel_jax import score
from vlmsel_jax import train

FLAGS = flags.FLAGS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None,
                                reason="needs the easy-vqa package: pip install easy-vqa")

_SIZES = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# name -> (model class, config, whether the checkpoint carries a chat template)
LLMS = {
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**_SIZES, head_dim=16),
              True),
    "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config(
        **_SIZES, pad_token_id=0, bos_token_id=0, eos_token_id=3), True),
    "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig(**_SIZES, head_dim=8),
              False),
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
        **_SIZES, head_dim=8, sliding_window=8), False),
}


def _run(module, argv):
  FLAGS.unparse_flags()
  FLAGS([module.__name__] + argv)
  return module.main([module.__name__])


def _save(family, path):
  model_cls, config, templated = LLMS[family]
  torch.manual_seed(0)
  model_cls(config).save_pretrained(path)
  tokenizer = fx.tiny_tokenizer()
  if not templated:
    tokenizer.chat_template = None
  tokenizer.save_pretrained(path)
  return str(path)


@pytest.mark.parametrize("family", LLMS)
def test_an_llm_family_trains_answers_and_scores(family, tmp_path):
  llm = _save(family, tmp_path / family)

  run = tmp_path / "stage2"
  _run(train, ["--vision_model=pixel-patches@res=32", "--vision_layer=-1", f"--llm_model={llm}",
               "--stage=2", "--data=easy-vqa", f"--output_dir={run}", "--max_steps=2",
               "--batch_size=8", "--max_len=64", "--learning_rate=1e-2", "--lora_rank=4",
               "--image_tokens=mean", "--eval_limit=8", "--eval_batch_size=8", "--save_every=2",
               "--progress=false"])
  result = json.load(open(run / "eval.json"))
  assert result["questions"] == 8 and 0.0 <= result["vqa_accuracy"] <= 1.0

  out = tmp_path / "report"
  _run(score, ["--vision_models=pixel-patches@res=32,hog", f"--text_model={llm}",
               "--data=easy-vqa", "--max_samples=12", f"--cache_dir={tmp_path / 'cache'}",
               "--metrics=gw,cka", "--gw_solver=entropic", "--bootstrap=0", "--permutations=0",
               "--progress=false", f"--output_dir={out}"])
  scores = json.load(open(out / "scores.json"))["scores"]
  assert len(scores) == 2
  for candidate, values in scores.items():
    assert math.isfinite(values["gw"]) and values["gw"] >= 0, (candidate, values)
    assert 0 <= values["cka"] <= 1 + 1e-6, (candidate, values)
