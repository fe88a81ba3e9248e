"""Parity of the NNX Gemma 3 text decoder with transformers' torch ``Gemma3ForCausalLM``.

Each test builds a tiny random torch model, saves it with ``save_pretrained``, loads the directory
with ``vlmsel_jax.models.load_pretrained`` and compares every hidden state and the logits on the
same token ids. The sliding window (3) is shorter than the sequences, so both attention kinds and
both RoPE bases are exercised.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from decoder_family_util import assert_bfloat16_within_twice_torch_error
from decoder_family_util import assert_cached_decoding_matches, assert_matches
from decoder_family_util import forward as _forward
from parity_util import decoder_inputs as _inputs
from parity_util import torch_decoder_outputs as _torch_outputs
from vlmsel_jax.models import load_pretrained
from vlmsel_jax.models.gemma3 import Gemma3, Gemma3Config

F32_ATOL = 1e-4

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=128, query_pre_attn_scalar=24,
            sliding_window=3, layer_types=["sliding_attention", "full_attention",
                                           "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})


def _torch_checkpoint(path, seed=0, **overrides):
  """Saves a tiny random torch Gemma3ForCausalLM to ``path``; returns the torch model."""
  torch.manual_seed(seed)
  config = transformers.Gemma3TextConfig(**{**TINY, **overrides})
  model = transformers.Gemma3ForCausalLM(config).eval()
  with torch.no_grad():
    # Default init zeroes every norm weight (scale 1 + 0), which would hide a mis-routed norm.
    for _, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.05)
  model.save_pretrained(path)
  return model


def _assert_matches(ours, ref_hidden, ref_logits, valid):
  assert_matches(ours, ref_hidden, ref_logits, valid, lambda _: F32_ATOL)


CASES = {
    "gemma3_270m_like": {},
    "linear_rope_softcaps": {
        "rope_parameters": {"full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                               "factor": 8.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        "final_logit_softcapping": 3.0},
    "untied_head": {"tie_word_embeddings": False},
}


@pytest.mark.parametrize("case", list(CASES))
def test_gemma3_parity_hidden_states_and_logits(tmp_path, case):
  torch_model = _torch_checkpoint(tmp_path, **CASES[case])
  model = load_pretrained(tmp_path)
  assert isinstance(model, Gemma3)
  ids, mask = _inputs()
  ref_hidden, ref_logits = _torch_outputs(torch_model, ids)
  out = _forward(model, ids, None)
  assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
  _assert_matches(out, ref_hidden, ref_logits, np.ones(ids.shape, bool))
  # Padded: outputs at padded query positions are undefined, so only real tokens are compared.
  ref_hidden, ref_logits = _torch_outputs(torch_model, ids, mask)
  _assert_matches(_forward(model, ids, mask), ref_hidden, ref_logits, mask.astype(bool))


def test_gemma3_parity_bfloat16(tmp_path):
  """bfloat16 against the float32 reference: within twice transformers' own bfloat16 error."""
  torch_model = _torch_checkpoint(tmp_path)
  model = load_pretrained(tmp_path, dtype="bfloat16")
  ids, mask = _inputs()
  out = _forward(model, ids, mask)
  assert out.logits.dtype == jax.numpy.bfloat16
  assert_bfloat16_within_twice_torch_error(out, torch_model, ids, mask)


def test_gemma3_inputs_embeds_are_not_rescaled(tmp_path):
  """``embed`` scales text tokens by sqrt(hidden); embeddings passed in enter as given, as
  transformers' ``inputs_embeds`` do (a VLM's image tokens rely on it)."""
  torch_model = _torch_checkpoint(tmp_path)
  model = load_pretrained(tmp_path)
  ids, mask = _inputs()
  embeds = np.random.RandomState(3).randn(*ids.shape, TINY["hidden_size"]).astype(np.float32)
  with torch.no_grad():
    ref = torch_model(inputs_embeds=torch.tensor(embeds),
                      attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  ours = nnx.jit(lambda m, e, a: m(None, attention_mask=a, inputs_embeds=e))(model, embeds, mask)
  valid = mask.astype(bool)
  assert np.abs(np.asarray(ours.logits)[valid] - ref[valid]).max() <= F32_ATOL
  text = np.asarray(nnx.jit(lambda m, i: m.embed(i))(model, ids))
  table = np.asarray(model.embed_tokens.embedding[...])
  np.testing.assert_allclose(text, table[ids] * np.float32(64 ** 0.5), rtol=1e-6)


def test_gemma3_cached_decoding_equals_the_full_forward_of_the_grown_sequence(tmp_path):
  _torch_checkpoint(tmp_path)
  model = load_pretrained(tmp_path)
  assert_cached_decoding_matches(model, lengths=[5, 8, 3], seq=12, vocab=TINY["vocab_size"],
                                steps=4)


def test_gemma3_config_reads_legacy_rope_fields():
  c = Gemma3Config.from_hf({"model_type": "gemma3_text", "vocab_size": 128, "hidden_size": 64,
                            "intermediate_size": 128, "num_hidden_layers": 6,
                            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                            "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                            "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
  assert (c.rope_theta, c.rope_factor, c.rope_local_theta, c.rope_local_factor) == (
      1e6, 8.0, 1e4, 1.0)
  assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention",)


@pytest.mark.parametrize("field, value, match", [
    ("attn_logit_softcapping", 50.0, r"attn_logit_softcapping is not supported"),
    ("hidden_activation", "silu", r"hidden_activation 'silu' is not supported"),
    ("use_bidirectional_attention", True, r"use_bidirectional_attention is not supported"),
    ("model_type", "llama", r"model_type 'llama' is not a Gemma 3 text model"),
    ("rope_parameters", {"full_attention": {"rope_type": "yarn", "factor": 2.0},
                         "sliding_attention": {"rope_type": "default"}},
     r"full_attention rope_type 'yarn' is not implemented"),
])
def test_gemma3_config_rejects_unsupported(field, value, match):
  with pytest.raises(ValueError, match=match):
    Gemma3Config.from_hf({"model_type": "gemma3_text", "vocab_size": 128, "hidden_size": 64,
                          "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, field: value})
