"""Parity of the NNX Phi-3 decoder with transformers' torch ``Phi3ForCausalLM``.

Each case builds a tiny random torch model, saves it with ``save_pretrained`` (and a tokenizer),
loads the directory through ``vlmsel_jax.models.load_pretrained`` and through ``zoo.load`` and
compares every hidden state and the logits on the same token ids, unpadded and padded (padded
query positions are undefined and left out). Tolerance (float32): 1e-4 relative to each
reference tensor's scale (``decoder_family_util.assert_matches``).

The longrope case rotates half of each head (partial_rotary_factor 0.5), slides a 5-token window
over every layer and has original_max_position_embeddings 8: the 7-token inputs use the short
factors, the 12-token ones the long factors (transformers picks by the call's largest position),
and both are compared.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

import decoder_family_util as util
from parity_util import decoder_inputs, torch_decoder_outputs
from vlmsel_jax import zoo
from vlmsel_jax.models import load_pretrained
from vlmsel_jax.models.phi3 import Phi3, Phi3Config

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
LONGROPE = {
    "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
    "short_factor": [1.0, 1.3, 1.9, 2.4], "long_factor": [1.5, 3.0, 7.0, 11.0]}

CASES = {
    "plain": {"tie_word_embeddings": False},
    "longrope_partial_sliding_tied": {
        "tie_word_embeddings": True, "sliding_window": 5, "original_max_position_embeddings": 8,
        "rope_parameters": LONGROPE},
}


def _torch_checkpoint(path, seed=0, **overrides):
  torch.manual_seed(seed)
  model = util.randomise(transformers.Phi3ForCausalLM(
      transformers.Phi3Config(**{**TINY, **overrides})))
  return util.save_with_tokenizer(model, path)


@pytest.mark.parametrize("case", list(CASES))
def test_phi3_parity_hidden_states_and_logits(tmp_path, case):
  torch_model = _torch_checkpoint(tmp_path, **CASES[case])
  loaded = zoo.load(str(tmp_path))
  assert loaded.kind == "text" and loaded.num_layers == TINY["num_hidden_layers"] + 1
  # Two lengths only where they select different RoPE factors.
  lengths = (7, 12) if "longrope" in case else (7,)
  for model in (load_pretrained(tmp_path), loaded.model):
    assert isinstance(model, Phi3)
    assert (model.lm_head is None) is CASES[case]["tie_word_embeddings"]
    for ids, mask in (decoder_inputs(seq=seq) for seq in lengths):
      util.assert_matches(util.forward(model, ids, None),
                          *torch_decoder_outputs(torch_model, ids), np.ones(ids.shape, bool))
      util.assert_matches(util.forward(model, ids, mask),
                          *torch_decoder_outputs(torch_model, ids, mask), mask.astype(bool))


def test_phi3_longrope_switches_factors_past_the_original_context(tmp_path):
  """The same 7 tokens give other outputs inside a 12-token call (long factors) than alone
  (short factors), in transformers and here alike; the attention factor is applied."""
  torch_model = _torch_checkpoint(tmp_path, **CASES["longrope_partial_sliding_tied"])
  model = load_pretrained(tmp_path)
  s = model.config.long_rope
  assert s.original_max_position_embeddings == 8 and model.config.rotary_dim == 8
  assert s.attention_factor == pytest.approx(math.sqrt(1 + math.log(256 / 8) / math.log(8)))
  ids, _ = decoder_inputs(seq=12)
  alone = np.asarray(util.forward(model, ids[:, :7], None).logits)
  inside = np.asarray(util.forward(model, ids, None).logits)[:, :7]
  assert np.abs(alone - inside).max() > 1e-3
  _, ref_logits = torch_decoder_outputs(torch_model, ids[:, :7])
  np.testing.assert_allclose(alone, ref_logits, atol=1e-4)


def test_phi3_cached_decoding_equals_the_full_forward(tmp_path):
  """Prompts already past the original context (8), so every call uses the long factors."""
  _torch_checkpoint(tmp_path, **CASES["longrope_partial_sliding_tied"])
  util.assert_cached_decoding_matches(load_pretrained(tmp_path), lengths=[9, 10], seq=12,
                                      vocab=TINY["vocab_size"], steps=2)


def test_phi3_config_reads_legacy_su_scaling():
  c = Phi3Config.from_hf({
      "model_type": "phi3", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
      "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 5e4,
      "max_position_embeddings": 4096, "original_max_position_embeddings": 1024,
      "sliding_window": 100,
      "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}})
  assert (c.rope_theta, c.head_dim, c.rotary_dim, c.num_kv_heads) == (5e4, 16, 16, 4)
  assert c.long_rope.long_factor == (2.0,) * 8
  assert c.long_rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(1024)))
  assert c.layer_types == ("sliding_attention",) * 2 and c.sliding_window == 100


@pytest.mark.parametrize("field, value, match", [
    ("model_type", "phi", r"model_type 'phi' is not a Phi-3 model"),
    ("hidden_act", "gelu_new", r"hidden_act 'gelu_new' is not supported"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
     r"rope_type 'linear' is not implemented for Phi-3"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 3,
                         "long_factor": [1.0] * 3},
     r"longrope short_factor has 3 entries; rotary_dim 16 has 8 frequencies"),
])
def test_phi3_config_rejects_unsupported(field, value, match):
  with pytest.raises(ValueError, match=match):
    Phi3Config.from_hf({"model_type": "phi3", "vocab_size": 128, "hidden_size": 64,
                        "intermediate_size": 96, "num_hidden_layers": 2,
                        "num_attention_heads": 4, field: value})
