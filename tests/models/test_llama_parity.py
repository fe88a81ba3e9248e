"""Parity of the NNX Llama family with transformers' torch Llama / Qwen2 / Mistral.

Each test builds a tiny random torch ``*ForCausalLM``, saves it with ``save_pretrained``, loads
the directory with ``vlmsel_jax.models.load_pretrained`` and compares every hidden state and the
logits on the same token ids.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from decoder_family_util import assert_cached_decoding_matches
from decoder_family_util import assert_matches as _assert_matches
from decoder_family_util import forward as _forward
from parity_util import decoder_inputs as _inputs
from parity_util import torch_decoder_outputs as _torch_outputs
from vlmsel_jax.models import load_pretrained
from vlmsel_jax.models.llama import LlamaConfig

F32_ATOL = 1e-4
# bfloat16 keeps 8 mantissa bits; transformers' own bfloat16 run lands at ~1% of the activation
# scale on these models, so 2% of the largest reference magnitude is a loose but real bound.
BF16_RTOL_OF_MAX = 2e-2

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


def _torch_checkpoint(path, config_cls, seed=0, save_kwargs=None, **overrides):
  """Saves a tiny random torch causal LM to ``path``; returns the torch model."""
  torch.manual_seed(seed)
  config = config_cls(**{**TINY, **overrides})
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    # Default init zeroes biases and sets norms to one, which would hide a mis-routed bias or
    # norm scale; random values make every tensor matter.
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in name else 0.0))
  model.save_pretrained(path, **(save_kwargs or {}))
  return model


def _f32_tol(_):
  return F32_ATOL


CASES = {
    "llama": (transformers.LlamaConfig, {}),
    "llama_tied_smollm2": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
    "llama_biases_head_dim": (transformers.LlamaConfig,
                              {"attention_bias": True, "mlp_bias": True, "head_dim": 24}),
    "llama3_rope": (transformers.LlamaConfig, {
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64}}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen2_tied": (transformers.Qwen2Config, {"tie_word_embeddings": True}),
    "qwen2_sliding": (transformers.Qwen2Config,
                      {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    "mistral_sliding": (transformers.MistralConfig, {"sliding_window": 3}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llama_parity_hidden_states_and_logits(tmp_path, case):
  config_cls, overrides = CASES[case]
  torch_model = _torch_checkpoint(tmp_path, config_cls, **overrides)
  model = load_pretrained(tmp_path)
  ids, mask = _inputs()

  # Unpadded: every position counts.
  ref_hidden, ref_logits = _torch_outputs(torch_model, ids)
  out = _forward(model, ids, None)
  assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
  _assert_matches(out, ref_hidden, ref_logits, np.ones(ids.shape, bool), _f32_tol)

  # Padded: outputs at padded query positions are undefined, so only real tokens are compared.
  ref_hidden, ref_logits = _torch_outputs(torch_model, ids, mask)
  out = _forward(model, ids, mask)
  _assert_matches(out, ref_hidden, ref_logits, mask.astype(bool), _f32_tol)


def test_llama_parity_padding_mask_changes_real_tokens(tmp_path):
  """The padded comparison above is only meaningful if padding changes the real outputs."""
  _torch_checkpoint(tmp_path, transformers.LlamaConfig)
  model = load_pretrained(tmp_path)
  ids, mask = _inputs()
  plain = np.asarray(_forward(model, ids, None).logits)
  padded = np.asarray(_forward(model, ids, mask).logits)
  # Row 1 is left-padded: its real tokens no longer see the two pad tokens.
  assert np.abs(plain[1, 2:] - padded[1, 2:]).max() > 1e-3


def test_llama_parity_sharded_checkpoint(tmp_path):
  torch_model = _torch_checkpoint(tmp_path, transformers.Qwen2Config,
                                  save_kwargs={"max_shard_size": "20KB"})
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  model = load_pretrained(tmp_path)
  ids, _ = _inputs()
  ref_hidden, ref_logits = _torch_outputs(torch_model, ids)
  _assert_matches(_forward(model, ids, None), ref_hidden, ref_logits, np.ones(ids.shape, bool),
                  _f32_tol)


def test_llama_parity_bfloat16(tmp_path):
  torch_model = _torch_checkpoint(tmp_path, transformers.LlamaConfig)
  model = load_pretrained(tmp_path, dtype="bfloat16")
  assert model.embed_tokens.embedding.dtype == jax.numpy.bfloat16
  ids, mask = _inputs()
  out = _forward(model, ids, mask)
  assert out.logits.dtype == jax.numpy.bfloat16
  ref_hidden, ref_logits = _torch_outputs(torch_model, ids, mask)
  _assert_matches(out, ref_hidden, ref_logits, mask.astype(bool),
                  lambda ref: BF16_RTOL_OF_MAX * float(np.abs(ref).max()))


def test_llama_parity_jax_jit_of_split_state(tmp_path):
  """The model also runs as a pure function of its state under plain ``jax.jit``."""
  torch_model = _torch_checkpoint(tmp_path, transformers.MistralConfig, sliding_window=None)
  graphdef, state = nnx.split(load_pretrained(tmp_path))

  @jax.jit
  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask)

  ids, mask = _inputs()
  ref_hidden, ref_logits = _torch_outputs(torch_model, ids, mask)
  _assert_matches(forward(state, ids, mask), ref_hidden, ref_logits, mask.astype(bool), _f32_tol)


def test_llama_config_from_hf_reads_saved_configs(tmp_path):
  transformers.Qwen2Config(**TINY, tie_word_embeddings=True, rms_norm_eps=1e-5,
                           use_sliding_window=True, sliding_window=5,
                           max_window_layers=1).save_pretrained(tmp_path)
  c = LlamaConfig.from_hf(tmp_path)
  assert (c.model_type, c.vocab_size, c.hidden_size, c.intermediate_size) == ("qwen2", 128, 64, 128)
  assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 4, 2, 16)
  assert (c.rms_norm_eps, c.rope_theta, c.tie_word_embeddings) == (1e-5, 10000.0, True)
  assert (c.qkv_bias, c.o_bias, c.mlp_bias) == (True, False, False)
  assert c.sliding_window == 5
  assert c.layer_types == ("full_attention", "sliding_attention")


def test_llama_config_from_hf_reads_legacy_rope_fields():
  """Hub configs written before transformers 5 keep rope_theta / rope_scaling at the top level."""
  c = LlamaConfig.from_hf({
      "model_type": "llama", **TINY, "rope_theta": 500000.0, "max_position_embeddings": 131072,
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
  assert c.rope_theta == 500000.0
  assert c.rope_scaling.factor == 8.0
  assert c.rope_scaling.original_max_position_embeddings == 8192


@pytest.mark.parametrize("field, value, match", [
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
     r"rope_type 'yarn' is not implemented; supported: 'default', 'llama3'"),
    ("hidden_act", "gelu", r"hidden_act 'gelu' is not supported"),
    ("model_type", "gemma", r"model_type 'gemma' is not a Llama-family model"),
])
def test_llama_config_from_hf_rejects_unsupported(field, value, match):
  with pytest.raises(ValueError, match=match):
    LlamaConfig.from_hf({"model_type": "llama", **TINY, field: value})


@pytest.mark.parametrize("case", ["llama", "qwen2_sliding", "mistral_sliding"])
def test_cached_decoding_equals_the_full_forward_of_the_grown_sequence(tmp_path, case):
  # Right-padded prompts of different lengths, then 4 tokens appended one at a time, each at its
  # row's own position: prefill + decode must give the logits a full forward pass gives at that
  # position (which the parity tests above tie to transformers). The sliding cases have a
  # window of 3, shorter than the sequences, so the decode mask's window matters.
  config_cls, overrides = CASES[case]
  _torch_checkpoint(tmp_path, config_cls, **overrides)
  model = load_pretrained(tmp_path)
  assert_cached_decoding_matches(model, lengths=[5, 8, 3], seq=12, vocab=TINY["vocab_size"],
                                steps=4)
