"""A pretrained checkpoint without a chat template: Gemma's get Gemma's turn format, others none."""

from __future__ import annotations

import pytest
import torch
import transformers

import vlm_fixtures
from vlmsel_jax import zoo
from vlmsel_jax.training.batches import BatchError, PromptBuilder


def _save(model_cls, config, path, chat_template):
  torch.manual_seed(0)
  model_cls(config).save_pretrained(path)
  tokenizer = vlm_fixtures.tiny_tokenizer()
  tokenizer.chat_template = chat_template
  tokenizer.save_pretrained(path)
  return str(path)


def _gemma2_config():
  return transformers.Gemma2Config(
      vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def _llama_config():
  return transformers.LlamaConfig(
      vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_gemma_checkpoint_without_template_gets_gemma_turns(tmp_path):
  path = _save(transformers.Gemma2ForCausalLM, _gemma2_config(), tmp_path / "gemma2", None)
  assert transformers.AutoTokenizer.from_pretrained(path).chat_template is None
  tokenizer = zoo.load(path).tokenizer
  assert tokenizer.chat_template == zoo.GEMMA_CHAT_TEMPLATE
  rendered = tokenizer.apply_chat_template(
      [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what color"},
       {"role": "assistant", "content": "red"}], tokenize=False)
  assert rendered == ("<start_of_turn>user\nBe brief.\n\nwhat color<end_of_turn>\n"
                      "<start_of_turn>model\nred<end_of_turn>\n")


def test_a_checkpoint_template_is_kept(tmp_path):
  path = _save(transformers.Gemma2ForCausalLM, _gemma2_config(), tmp_path / "gemma2",
               vlm_fixtures.CHATML)
  assert zoo.load(path).tokenizer.chat_template == vlm_fixtures.CHATML


def test_other_families_without_template_get_none(tmp_path):
  path = _save(transformers.LlamaForCausalLM, _llama_config(), tmp_path / "llama", None)
  tokenizer = zoo.load(path).tokenizer
  assert tokenizer.chat_template is None
  with pytest.raises(BatchError, match="no chat template"):
    builder = PromptBuilder(tokenizer, lambda image: image, num_image_tokens=1, max_len=16)
    builder.chat_example("r0", [{"role": "user", "content": "what color"},
                                {"role": "assistant", "content": "red"}])
