"""Parity of the NNX Gemma 1 / Gemma 2 decoders with transformers' torch ``GemmaForCausalLM`` and
``Gemma2ForCausalLM``.

Each test builds a tiny random torch model, saves it with ``save_pretrained`` and loads the
directory through ``vlmsel_jax.models.load_pretrained`` and through ``zoo.load``, then compares
every hidden state and the logits on the same token ids, float32 on both sides.

Tolerance (``REL_TOL``): per tensor, max |ours - reference| <= 1e-4 * max |reference|. Both sides
run the same float32 operations in different orders (XLA's einsums against torch's matmuls), so
the error scales with the tensor's magnitude; Gemma's sqrt(hidden) embedding scale and residual
sums put hidden states well above 1, where a fixed absolute bound would say little.

Two layers each. Gemma 2's configs slide a window of 3 over sequences of 7 tokens, with
transformers' default layer types (even layers local, odd global) or the reverse, and soft-cap
the attention scores and the logits with caps small enough (2 and 3) that tanh bends them.
Gemma 1's is multi-query with a head width other than hidden / heads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from huggingface_hub import constants as hf_constants

import hub_fixtures
from decoder_family_util import assert_bfloat16_within_twice_torch_error
from decoder_family_util import assert_cached_decoding_matches
from decoder_family_util import forward as _forward
from parity_util import decoder_inputs as _inputs
from parity_util import torch_decoder_outputs as _torch_outputs
from vlm_fixtures import tiny_tokenizer
from vlmsel_jax import zoo
from vlmsel_jax.models import attention, load_pretrained
from vlmsel_jax.models.gemma import Gemma, GemmaConfig

REL_TOL = 1e-4
VOCAB = 128

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=VOCAB, max_position_embeddings=64)
# Gemma 1 as the 2B model is shaped: multi-query, and a head width that is not hidden / heads.
GEMMA1 = dict(_COMMON, num_key_value_heads=1, head_dim=24)
GEMMA2 = dict(_COMMON, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
              sliding_window=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)

CASES = {
    # Biases and linear RoPE scaling: no released checkpoint has them, transformers does.
    "gemma1_mqa_bias_linear_rope": ("gemma", dict(
        GEMMA1, attention_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0})),
    "gemma2_softcaps_sliding": ("gemma2", GEMMA2),
    "gemma2_no_attn_softcap_untied": ("gemma2", dict(
        GEMMA2, attn_logit_softcapping=None, tie_word_embeddings=False,
        layer_types=["full_attention", "sliding_attention"])),
}
_CLASSES = {"gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
            "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM)}


def _torch_checkpoint(path, model_type, fields, seed=0):
  """Saves a tiny random torch Gemma / Gemma 2 (and a tokenizer, for the zoo) to ``path``."""
  config_class, model_class = _CLASSES[model_type]
  torch.manual_seed(seed)
  model = model_class(config_class(**fields)).eval()
  with torch.no_grad():
    # Default init zeroes every norm weight (scale 1 + 0), which would hide a mis-routed norm.
    for _, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.05)
  model.save_pretrained(path)
  tiny_tokenizer().save_pretrained(path)
  return model


def _assert_close(name, ours, ref, valid=None):
  ours = np.asarray(ours, np.float32)
  assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
  if valid is not None:
    ours, ref = ours[valid], ref[valid]
  err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
  assert err <= REL_TOL * scale, f"{name}: max abs error {err:.3g} > {REL_TOL:g} * {scale:.3g}"


def _assert_matches(out, ref_hidden, ref_logits, valid):
  assert len(out.hidden_states) == len(ref_hidden)
  for i, (a, b) in enumerate(zip(out.hidden_states, ref_hidden)):
    _assert_close(f"hidden_states[{i}]", a, b, valid)
  _assert_close("logits", out.logits, ref_logits, valid)


@pytest.mark.parametrize("case", list(CASES))
def test_gemma_parity_hidden_states_and_logits(tmp_path, case):
  model_type, fields = CASES[case]
  torch_model = _torch_checkpoint(tmp_path, model_type, fields)
  ids, mask = _inputs(vocab=VOCAB)
  ref_full = _torch_outputs(torch_model, ids)
  # Padded (row 0 on the right, row 1 on the left): outputs at padded query positions are
  # undefined, so only real tokens are compared.
  ref_padded = _torch_outputs(torch_model, ids, mask)
  loaded = zoo.load(str(tmp_path))
  assert loaded.kind == "text" and loaded.num_layers == fields["num_hidden_layers"] + 1
  # The zoo's copy runs the fused attention path (jax.nn.dot_product_attention), unless its
  # scores are soft-capped, which only the einsum path computes.
  fused = "fused" if fields.get("attn_logit_softcapping") is None else "einsum"
  for model, impl in ((load_pretrained(tmp_path), "einsum"), (loaded.model, fused)):
    assert isinstance(model, Gemma) and model.config.model_type == model_type
    attention.configure(model, attention_impl=impl)
    # An all-ones mask (the reference had none) shares the padded run's compilation.
    ones = np.ones(ids.shape, np.int32)
    _assert_matches(_forward(model, ids, ones), *ref_full, ones.astype(bool))
    _assert_matches(_forward(model, ids, mask), *ref_padded, mask.astype(bool))
  # The zoo's text features: the second-to-last hidden state, mean over the real tokens.
  feats = loaded.features(loaded.model, {"input_ids": ids, "attention_mask": mask,
                                         "pool_mask": mask}, -2, "mean")
  hidden = ref_padded[0][-2]
  expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  _assert_close("features", feats, expected)


def test_gemma2_loads_as_a_hub_id(tmp_path, monkeypatch):
  """A Hub id resolved offline from a Hub cache (huggingface_hub's layout) loads the family."""
  saved = tmp_path / "saved"
  torch_model = _torch_checkpoint(saved, "gemma2", GEMMA2)
  hub_fixtures.add_snapshot(tmp_path / "hub", "vlmsel-test/gemma2-tiny", saved)
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
  loaded = zoo.load("vlmsel-test/gemma2-tiny")
  assert loaded.name == "vlmsel-test/gemma2-tiny" and loaded.kind == "text"
  assert isinstance(loaded.model, Gemma) and loaded.model.config.model_type == "gemma2"
  ids, mask = _inputs(vocab=VOCAB)
  _assert_matches(_forward(loaded.model, ids, mask), *_torch_outputs(torch_model, ids, mask),
                  mask.astype(bool))


def test_gemma2_config_follows_transformers_defaults(tmp_path):
  torch_model = _torch_checkpoint(tmp_path, "gemma2", GEMMA2)
  c = load_pretrained(tmp_path).config
  assert c.layer_types == tuple(torch_model.config.layer_types) == (
      "sliding_attention", "full_attention")
  assert (c.sliding_window, c.query_pre_attn_scalar, c.attn_logit_softcapping,
          c.final_logit_softcapping, c.sandwich_norms) == (3, 24.0, 2.0, 3.0, True)
  # A Gemma2Config without the optional fields: transformers' defaults.
  bare = GemmaConfig.from_hf({"model_type": "gemma2", "vocab_size": 8, "hidden_size": 16,
                              "intermediate_size": 16, "num_hidden_layers": 4,
                              "num_attention_heads": 2})
  reference = transformers.Gemma2Config(vocab_size=8, hidden_size=16, intermediate_size=16,
                                        num_hidden_layers=4, num_attention_heads=2)
  assert (bare.attn_logit_softcapping, bare.final_logit_softcapping, bare.sliding_window,
          bare.query_pre_attn_scalar, bare.head_dim, bare.layer_types) == (
              reference.attn_logit_softcapping, reference.final_logit_softcapping,
              reference.sliding_window, reference.query_pre_attn_scalar, reference.head_dim,
              tuple(reference.layer_types))


def test_gemma1_config_reads_the_legacy_gelu_and_rope_fields():
  c = GemmaConfig.from_hf({"model_type": "gemma", "vocab_size": 8, "hidden_size": 16,
                           "intermediate_size": 16, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                           "hidden_act": "gelu", "rope_theta": 500.0})
  assert (c.rope_theta, c.rope_factor, c.query_pre_attn_scalar, c.sandwich_norms) == (
      500.0, 1.0, 8.0, False)
  assert c.layer_types == ("full_attention",) * 2 and c.attn_logit_softcapping is None
  assert c.final_logit_softcapping is None


@pytest.mark.parametrize("model_type, field, value, match", [
    ("gemma", "hidden_act", "silu", r"hidden activation 'silu' is not supported"),
    ("gemma2", "hidden_activation", "relu", r"hidden activation 'relu' is not supported"),
    ("gemma2", "use_bidirectional_attention", True, r"use_bidirectional_attention"),
    ("gemma", "rope_parameters", {"rope_type": "yarn", "factor": 2.0},
     r"rope_type 'yarn' is not implemented"),
    ("gemma2", "sliding_window", None, r"sliding_attention layers need a positive"),
    ("gemma3_text", "head_dim", 8, r"model_type 'gemma3_text' is not a Gemma 1 or 2 model"),
])
def test_gemma_config_rejects_unsupported(model_type, field, value, match):
  with pytest.raises(ValueError, match=match):
    GemmaConfig.from_hf({"model_type": model_type, "vocab_size": 8, "hidden_size": 16,
                         "intermediate_size": 16, "num_hidden_layers": 2,
                         "num_attention_heads": 2, field: value})


def test_gemma_inputs_embeds_are_not_rescaled(tmp_path):
  """``embed`` scales text tokens by sqrt(hidden); embeddings passed in enter as given, as
  transformers' ``inputs_embeds`` do (a VLM's image tokens rely on it)."""
  torch_model = _torch_checkpoint(tmp_path, "gemma2", GEMMA2)
  model = load_pretrained(tmp_path)
  ids, mask = _inputs(vocab=VOCAB)
  embeds = np.random.RandomState(3).randn(*ids.shape, 64).astype(np.float32)
  with torch.no_grad():
    ref = torch_model(inputs_embeds=torch.tensor(embeds),
                      attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  ours = nnx.jit(lambda m, e, a: m(None, attention_mask=a, inputs_embeds=e))(model, embeds, mask)
  _assert_close("logits", ours.logits, ref, mask.astype(bool))
  text = np.asarray(nnx.jit(lambda m, i: m.embed(i))(model, ids))
  table = np.asarray(model.embed_tokens.embedding[...])
  np.testing.assert_allclose(text, table[ids] * np.float32(64 ** 0.5), rtol=1e-6)


def test_gemma2_cached_decoding_equals_the_full_forward_of_the_grown_sequence(tmp_path):
  """prefill + decode (sliding window 3 shorter than every row, soft-capped scores) give the full
  forward's logits: the same float32 operations on the same values, so within 1e-5."""
  _torch_checkpoint(tmp_path, "gemma2", GEMMA2)
  model = load_pretrained(tmp_path)
  # The parity test's shapes (2 x 7), so the full forward's compilation is shared.
  assert_cached_decoding_matches(model, lengths=[4, 2], seq=7, vocab=VOCAB, steps=3,
                                check_last=False)


def test_gemma2_bfloat16_is_within_twice_transformers_own_error(tmp_path):
  """bfloat16 against the float32 reference: within twice transformers' own bfloat16 error."""
  torch_model = _torch_checkpoint(tmp_path, "gemma2", GEMMA2)
  model = load_pretrained(tmp_path, dtype="bfloat16")
  ids, mask = _inputs(vocab=VOCAB)
  out = _forward(model, ids, mask)
  assert out.logits.dtype == jnp.bfloat16
  assert_bfloat16_within_twice_torch_error(out, torch_model, ids, mask)


@pytest.mark.parametrize("model_type, attn_cap, fused_calls", [
    ("gemma", None, 2), ("gemma2", None, 2), ("gemma2", 2.0, 0)])
def test_gemma_attention_paths(monkeypatch, model_type, attn_cap, fused_calls):
  """Gemma 1 and uncapped Gemma 2 run the path ``attention_impl`` selects (one fused call a
  layer); soft-capped Gemma 2 layers always run the einsum, since ``jax.nn.dot_product_attention``
  cannot cap scores. Counted while tracing; the parity test compares the fused path's outputs
  with transformers."""
  calls = []
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  gemma2 = model_type == "gemma2"
  config = GemmaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, sliding_window=3,
                       sandwich_norms=gemma2, attn_logit_softcapping=attn_cap,
                       model_type=model_type)
  assert config.layer_types == (("sliding_attention", "full_attention") if gemma2
                                else ("full_attention",) * 2)
  ids, mask = _inputs(vocab=40)
  for impl, expected in (("einsum", 0), ("fused", fused_calls)):
    calls.clear()
    # Built and run abstractly: nothing is computed, only traced.
    jax.eval_shape(lambda i, a, impl=impl: Gemma(dataclasses.replace(config, attention_impl=impl),
                                                 rngs=nnx.Rngs(0))(i, a).logits, ids, mask)
    assert len(calls) == expected, impl
