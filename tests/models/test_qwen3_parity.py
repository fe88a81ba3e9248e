"""Parity of the NNX Qwen3 decoder with transformers' torch ``Qwen3ForCausalLM``.

Each case builds a tiny random torch model, saves it with ``save_pretrained`` (and a tokenizer),
loads the directory through ``vlmsel_jax.models.load_pretrained`` and through ``zoo.load`` and
compares every hidden state and the logits on the same token ids, unpadded and padded (padded
query positions are undefined and left out). Tolerance (float32): 1e-4 relative to each
reference tensor's scale (``decoder_family_util.assert_matches``). head_dim (24) is decoupled from
hidden / heads (16), so a head_dim taken from the wrong field fails to load.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import decoder_family_util as util
from parity_util import decoder_inputs, torch_decoder_outputs
from vlmsel_jax import zoo
from vlmsel_jax.models import load_pretrained
from vlmsel_jax.models.qwen3 import Qwen3, Qwen3Config

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, vocab_size=128, max_position_embeddings=256)

CASES = {
    # Qwen3-0.6B's shape: tied head, no biases, full attention everywhere.
    "tied": {"tie_word_embeddings": True},
    # Biases on all four projections, and layer 1 (>= max_window_layers) slides over 3 tokens.
    "untied_bias_sliding": {"tie_word_embeddings": False, "attention_bias": True,
                            "use_sliding_window": True, "sliding_window": 3,
                            "max_window_layers": 1},
}


def _torch_checkpoint(path, seed=0, **overrides):
  torch.manual_seed(seed)
  model = util.randomise(transformers.Qwen3ForCausalLM(
      transformers.Qwen3Config(**{**TINY, **overrides})))
  return util.save_with_tokenizer(model, path)


@pytest.mark.parametrize("case", list(CASES))
def test_qwen3_parity_hidden_states_and_logits(tmp_path, case):
  torch_model = _torch_checkpoint(tmp_path, **CASES[case])
  ids, mask = decoder_inputs()
  loaded = zoo.load(str(tmp_path))
  assert loaded.kind == "text" and loaded.num_layers == TINY["num_hidden_layers"] + 1
  for model in (load_pretrained(tmp_path), loaded.model):
    assert isinstance(model, Qwen3)
    assert (model.lm_head is None) is CASES[case]["tie_word_embeddings"]
    util.assert_matches(util.forward(model, ids, None), *torch_decoder_outputs(torch_model, ids),
                        np.ones(ids.shape, bool))
    util.assert_matches(util.forward(model, ids, mask),
                        *torch_decoder_outputs(torch_model, ids, mask), mask.astype(bool))


def test_qwen3_query_key_norms_matter(tmp_path):
  """The q/k norm weights reach the output: scaling them changes the logits (a model that
  skipped the norms would pass parity only with unit norm weights, which the tests avoid)."""
  _torch_checkpoint(tmp_path, **CASES["tied"])
  model = load_pretrained(tmp_path)
  ids, _ = decoder_inputs()
  before = np.asarray(util.forward(model, ids, None).logits)
  model.layers[0].attn.k_norm.scale[...] = model.layers[0].attn.k_norm.scale[...] * 3.0
  assert np.abs(np.asarray(util.forward(model, ids, None).logits) - before).max() > 1e-3


def test_qwen3_cached_decoding_equals_the_full_forward(tmp_path):
  _torch_checkpoint(tmp_path, **CASES["untied_bias_sliding"])
  # Prompts longer than the 3-token window, so the cache's sliding layer masks old keys.
  util.assert_cached_decoding_matches(load_pretrained(tmp_path), lengths=[4, 5], seq=7,
                                      vocab=TINY["vocab_size"], steps=2)


def test_qwen3_config_reads_legacy_fields_and_sliding_layers():
  c = Qwen3Config.from_hf({
      "model_type": "qwen3", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
      "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
      "head_dim": 32, "rope_theta": 1e6, "use_sliding_window": True, "sliding_window": 16,
      "max_window_layers": 2, "attention_bias": True})
  assert (c.head_dim, c.rope_theta, c.sliding_window) == (32, 1e6, 16)
  assert c.layer_types == ("full_attention", "full_attention", "sliding_attention")
  assert c.qkv_bias and c.o_bias and not c.mlp_bias and not c.tie_word_embeddings


@pytest.mark.parametrize("field, value, match", [
    ("model_type", "qwen2", r"model_type 'qwen2' is not a Qwen3 model"),
    ("hidden_act", "gelu", r"hidden_act 'gelu' is not supported"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
     r"rope_type 'yarn' is not implemented"),
])
def test_qwen3_config_rejects_unsupported(field, value, match):
  with pytest.raises(ValueError, match=match):
    Qwen3Config.from_hf({"model_type": "qwen3", "vocab_size": 128, "hidden_size": 64,
                         "intermediate_size": 96, "num_hidden_layers": 2,
                         "num_attention_heads": 4, field: value})
