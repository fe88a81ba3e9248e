"""Shared pieces of the decoder tests (Llama, Gemma 1-3, Phi-3, Qwen3): tiny random torch
checkpoints saved with a tokenizer, the float32 comparison, the bfloat16 bound, the
cached-decoding check, and a GGUF writer.

Tolerance: float32, every hidden state and the logits within 1e-4 relative to the reference
tensor's scale (max abs error <= 1e-4 * max(1, max |reference|)) at the compared positions,
unless a test gives its own.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
from flax import nnx
from tokenizers import pre_tokenizers

import vlm_fixtures
from parity_util import torch_decoder_outputs

F32_RTOL = 1e-4

forward = nnx.jit(lambda model, ids, mask: model(ids, attention_mask=mask))


def randomise(model):
  """Every parameter random (norm weights around 1), so a mis-routed tensor shows; eval mode."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in name else 0.0))
  return model.eval()


def save_with_tokenizer(model, path):
  """``save_pretrained`` plus the tests' word-level tokenizer, what ``zoo.load`` needs."""
  model.save_pretrained(path)
  vlm_fixtures.tiny_tokenizer().save_pretrained(path)
  return model


def assert_matches(ours, ref_hidden, ref_logits, valid, tol_of=None):
  """Every hidden state and the logits at the ``valid`` (batch, seq) positions within
  ``tol_of(reference at the valid positions)``; by default ``F32_RTOL`` of the reference's
  scale."""
  if tol_of is None:
    tol_of = lambda ref: F32_RTOL * max(1.0, float(np.abs(ref).max()))
  assert len(ours.hidden_states) == len(ref_hidden)
  named = [(f"hidden_states[{i}]", a, b)
           for i, (a, b) in enumerate(zip(ours.hidden_states, ref_hidden))]
  for name, a, b in named + [("logits", ours.logits, ref_logits)]:
    a = np.asarray(a, np.float32)
    assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
    err = float(np.abs(a[valid] - b[valid]).max())
    tol = tol_of(b[valid])
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"


def assert_bfloat16_within_twice_torch_error(out, torch_model, ids, mask):
  """A bfloat16 run's hidden states and logits ``out`` are within twice transformers' own
  bfloat16 error (plus 1e-3) of its float32 reference, at the unpadded positions.

  ``torch_model`` is float32; it is left in bfloat16."""
  ref_hidden, ref_logits = torch_decoder_outputs(torch_model, ids, mask)
  bf16_hidden, bf16_logits = torch_decoder_outputs(torch_model.to(torch.bfloat16), ids, mask)
  valid = mask.astype(bool)
  for name, a, ref, theirs in [
      *[(f"hidden_states[{i}]", a, r, t) for i, (a, r, t) in enumerate(
          zip(out.hidden_states, ref_hidden, bf16_hidden))],
      ("logits", out.logits, ref_logits, bf16_logits)]:
    err = float(np.abs(np.asarray(a, np.float32)[valid] - ref[valid]).max())
    bound = 2 * float(np.abs(theirs[valid] - ref[valid]).max()) + 1e-3
    assert err <= bound, f"{name}: bfloat16 error {err:.3g} > {bound:.3g}"


def assert_cached_decoding_matches(model, lengths, seq, vocab, steps=3, seed=2, check_last=True):
  """prefill (also with ``last``, when ``check_last``) and ``steps`` decode steps give the
  logits the full forward of the grown, right-padded sequence gives, within 1e-5."""
  rng = np.random.RandomState(seed)
  lengths = np.asarray(lengths, np.int32)
  rows = len(lengths)
  ids = rng.randint(0, vocab, size=(rows, seq)).astype(np.int32)
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  logits, cache = nnx.jit(lambda m, i, a: m.prefill(i, a))(model, ids, mask)
  full = np.asarray(forward(model, ids, mask).logits)
  for r, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(logits)[r, :n], full[r, :n], atol=1e-5)
  if check_last:
    at_last, _ = nnx.jit(lambda m, i, a, l: m.prefill(i, a, last=l))(model, ids, mask,
                                                                      lengths - 1)
    np.testing.assert_allclose(np.asarray(at_last), full[np.arange(rows), lengths - 1],
                               atol=1e-5)
  decode = nnx.jit(lambda m, t, i, c: m.decode(t, i, c))
  for _ in range(steps):
    token = rng.randint(0, vocab, size=rows).astype(np.int32)
    ids[np.arange(rows), lengths] = token
    mask[np.arange(rows), lengths] = 1
    step_logits, cache = decode(model, token, lengths, cache)
    full = np.asarray(forward(model, ids, mask).logits)
    np.testing.assert_allclose(np.asarray(step_logits), full[np.arange(rows), lengths],
                               atol=1e-5)
    lengths = lengths + 1


def write_gguf(path, arch, tensors, metadata, vocab_size, encode=None):
  """Writes a GGUF file of ``arch``: ``tensors`` (GGUF name -> numpy array in torch's layout;
  GGUF stores the reversed shape, as llama.cpp's converter does), ``metadata`` (key ->
  (value, GGUFValueType)) and a byte-level BPE vocabulary of ``vocab_size`` single characters
  without merges (what ``load_gguf`` builds the tokenizer from). Tensors are float32 unless
  ``encode(name, array)`` returns ``(raw data, raw GGMLQuantizationType)`` for one (``None``:
  float32)."""
  writer = gguf.GGUFWriter(str(path), arch)
  for key, (value, kind) in metadata.items():
    writer.add_key_value(key, value, kind)
  tokens = sorted(pre_tokenizers.ByteLevel.alphabet())[:vocab_size]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_types([1] * len(tokens))
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(1)
  for name, value in tensors.items():
    encoded = encode(name, value) if encode else None
    if encoded is None:
      writer.add_tensor(name, np.ascontiguousarray(value, np.float32))
    else:
      writer.add_tensor(name, encoded[0], raw_dtype=encoded[1])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def llm_metadata(arch, config, head_dim):
  """The metadata llama.cpp's converter writes for every llama-like ``arch``."""
  u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
  return {
      f"{arch}.context_length": (config.max_position_embeddings, u32),
      f"{arch}.embedding_length": (config.hidden_size, u32),
      f"{arch}.feed_forward_length": (config.intermediate_size, u32),
      f"{arch}.block_count": (config.num_hidden_layers, u32),
      f"{arch}.attention.head_count": (config.num_attention_heads, u32),
      f"{arch}.attention.head_count_kv": (config.num_key_value_heads, u32),
      f"{arch}.attention.key_length": (head_dim, u32),
      f"{arch}.attention.value_length": (head_dim, u32),
      f"{arch}.attention.layer_norm_rms_epsilon": (config.rms_norm_eps, f32),
      f"{arch}.rope.freq_base": (config.rope_parameters["rope_theta"], f32),
  }
