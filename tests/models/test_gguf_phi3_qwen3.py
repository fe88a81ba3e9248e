"""GGUF files of llama.cpp's phi3 and qwen3 architectures against transformers' torch models.

Each test writes a tiny random torch model's weights into a float32 GGUF file the way llama.cpp's
``convert_hf_to_gguf.py`` writes that architecture (its tensor names, no q/k permutation: llama.cpp
rotates both architectures' halves as transformers does; Phi-3's fused ``attn_qkv`` and 2x-wide
``ffn_up``; its longrope factors as the ``rope_factors_short`` / ``rope_factors_long`` tensors with
the attention factor and original context as metadata; the head dropped when tied), loads the file
through ``loading.load_gguf`` / ``zoo.load`` and compares every hidden state and the logits with
the torch model. Tolerance (float32): 1e-4 relative to each reference tensor's scale.
"""

from __future__ import annotations

import math
import re

import gguf
import numpy as np
import pytest
import torch
import transformers

import decoder_family_util as util
import test_gguf_quants as quants
from parity_util import decoder_inputs, torch_decoder_outputs
from vlmsel_jax import zoo
from vlmsel_jax.models.gguf import GGUFFile, hf_key
from vlmsel_jax.models.loading import CheckpointFileError, load_gguf
from vlmsel_jax.models.phi3 import Phi3
from vlmsel_jax.models.qwen3 import Qwen3

Q = gguf.GGMLQuantizationType
U32, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
VOCAB = 128
LAYER_NAMES = {  # Hugging Face module -> llama.cpp tensor, per layer
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm"}


def gguf_name(key):
  """The llama.cpp tensor name of a Hugging Face Phi-3 / Qwen3 key."""
  fixed = {"lm_head.weight": "output.weight", "model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight"}
  if key in fixed:
    return fixed[key]
  layer, module, suffix = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key).groups()
  return f"blk.{layer}.{LAYER_NAMES[module]}.{suffix}"


def _gguf_tensors(model):
  """The torch model's weights under llama.cpp's names (a tied head left out, as llama.cpp's
  converter leaves it out)."""
  return {gguf_name(key): value.detach().numpy() for key, value in model.state_dict().items()
          if not (key == "lm_head.weight" and model.config.tie_word_embeddings)}


def _torch_model(model_cls, config_cls, **config):
  torch.manual_seed(0)
  return util.randomise(model_cls(config_cls(vocab_size=VOCAB, **config)))


def _qwen3_file(tmp_path, encode=None, **overrides):
  model = _torch_model(transformers.Qwen3ForCausalLM, transformers.Qwen3Config, **{
      "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
      "tie_word_embeddings": True, **overrides})
  path = tmp_path / "tiny-qwen3.gguf"
  util.write_gguf(path, "qwen3", _gguf_tensors(model),
                  util.llm_metadata("qwen3", model.config, head_dim=model.config.head_dim), VOCAB,
                  encode=encode)
  return path, model


PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                 "short_factor": [1.0, 1.3, 1.9, 2.4], "long_factor": [1.5, 3.0, 7.0, 11.0]}


def _phi3_file(tmp_path, skip=(), encode=None, **overrides):
  """A Phi-3 with longrope (original context 8 of 256), half-rotary 16-wide heads and a 5-token
  window, written as llama.cpp's Phi3MiniModel converter writes it."""
  model = _torch_model(transformers.Phi3ForCausalLM, transformers.Phi3Config, **{
      "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
      "original_max_position_embeddings": 8, "sliding_window": 5, "pad_token_id": 0,
      "bos_token_id": 1, "eos_token_id": 2, "rope_parameters": PHI3_LONGROPE, **overrides})
  assert model.config.hidden_size // model.config.num_attention_heads == 16
  metadata = util.llm_metadata("phi3", model.config, head_dim=16)
  del metadata["phi3.attention.key_length"], metadata["phi3.attention.value_length"]
  metadata.update({
      "phi3.rope.dimension_count": (8, U32),
      "phi3.rope.scaling.original_context_length": (8, U32),
      # The converter's own formula, from max / original context (256 / 8).
      "phi3.rope.scaling.attn_factor": (math.sqrt(1 + math.log(32) / math.log(8)), F32),
      "phi3.attention.sliding_window": (5, U32)})
  tensors = _gguf_tensors(model)
  tensors["rope_factors_short.weight"] = np.asarray(PHI3_LONGROPE["short_factor"], np.float32)
  tensors["rope_factors_long.weight"] = np.asarray(PHI3_LONGROPE["long_factor"], np.float32)
  for name in skip:
    del tensors[name]
  path = tmp_path / "tiny-phi3.gguf"
  util.write_gguf(path, "phi3", tensors, metadata, VOCAB, encode=encode)
  return path, model


def test_gguf_qwen3_tied_matches_transformers(tmp_path):
  path, torch_model = _qwen3_file(tmp_path)
  model, config, tokenizer = load_gguf(path)
  assert isinstance(model, Qwen3) and model.lm_head is None
  assert (config["model_type"], config["head_dim"], config["tie_word_embeddings"]) == (
      "qwen3", 24, True)
  assert len(tokenizer) == VOCAB
  loaded = zoo.load(str(path))
  assert loaded.kind == "text" and isinstance(loaded.model, Qwen3)
  ids, mask = decoder_inputs(vocab=VOCAB)
  for ours in (model, loaded.model):
    util.assert_matches(util.forward(ours, ids, mask),
                        *torch_decoder_outputs(torch_model, ids, mask), mask.astype(bool))


def test_gguf_phi3_longrope_matches_transformers_in_both_regimes(tmp_path):
  path, torch_model = _phi3_file(tmp_path)
  model, config, _ = load_gguf(path)
  assert isinstance(model, Phi3) and model.lm_head is not None
  c = model.config
  assert (c.rotary_dim, c.sliding_window, c.long_rope.original_max_position_embeddings) == (
      8, 5, 8)
  for field in ("short_factor", "long_factor"):  # float32 in the file
    np.testing.assert_array_equal(np.float32(getattr(c.long_rope, field)),
                                  np.float32(PHI3_LONGROPE[field]))
  assert config["rope_parameters"]["rope_type"] == "longrope"
  for seq in (7, 12):  # Short factors, then long ones.
    ids, mask = decoder_inputs(seq=seq, vocab=VOCAB)
    util.assert_matches(util.forward(model, ids, mask),
                        *torch_decoder_outputs(torch_model, ids, mask), mask.astype(bool))
  assert isinstance(zoo.load(str(path)).model, Phi3)


def test_gguf_tensor_names_of_phi3_and_qwen3():
  assert hf_key("blk.1.attn_qkv.weight", "phi3") == "model.layers.1.self_attn.qkv_proj.weight"
  assert hf_key("blk.0.ffn_up.weight", "phi3") == "model.layers.0.mlp.gate_up_proj.weight"
  assert hf_key("blk.3.attn_k_norm.weight", "qwen3") == "model.layers.3.self_attn.k_norm.weight"
  assert hf_key("blk.0.ffn_up.weight", "qwen3") == "model.layers.0.mlp.up_proj.weight"
  assert hf_key("rope_factors_long.weight", "phi3") == "rope_factors_long.weight"


def test_gguf_phi3_with_one_longrope_factor_tensor_is_refused(tmp_path):
  path, _ = _phi3_file(tmp_path, skip=("rope_factors_long.weight",))
  with pytest.raises(CheckpointFileError, match=r"rope_factors_short.weight' but not its"):
    GGUFFile(path)


# A Phi-3-style SentencePiece vocabulary as llama.cpp writes one (tokenizer.ggml.model "llama"):
# <unk>, <s>, </s>, 256 byte-fallback tokens, pieces in merge order, then chat control tokens.
_SPM_PIECES = list("\u2581abcdehilmnorstuwy0123456789.,!?'") + [
    "\u2581h", "el", "\u2581hel", "\u2581hell", "\u2581hello", "\u2581t", "he", "\u2581the", "ll",
    "\u2581w", "or", "\u2581wor", "ld", "\u2581world"]
_SPM_VOCAB = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _SPM_PIECES
              + ["<|user|>", "<|assistant|>", "<|end|>"])
_SPM_TYPES = [2, 3, 3] + [6] * 256 + [1] * len(_SPM_PIECES) + [3, 3, 3]
_SPM_TEXTS = ["", "hello world", "  two leading spaces", "the  hello   world\n\nline",
              "naïve café 日本", "<|user|>\nhello<|end|>\n<|assistant|>", "digits 0123 3.14"]


def test_gguf_phi3_sentencepiece_tokenizer_equals_transformers(tmp_path, monkeypatch):
  """A Phi-3 file's SentencePiece vocabulary gives the tokenizer AutoTokenizer builds from it."""
  path = tmp_path / "tiny-phi3-tok.gguf"
  w = gguf.GGUFWriter(str(path), "phi3")
  for key, (value, kind) in {
      "phi3.block_count": (1, U32), "phi3.context_length": (64, U32),
      "phi3.embedding_length": (8, U32), "phi3.feed_forward_length": (8, U32),
      "phi3.attention.head_count": (2, U32), "phi3.attention.head_count_kv": (2, U32),
      "phi3.attention.layer_norm_rms_epsilon": (1e-5, F32),
      "phi3.rope.dimension_count": (4, U32)}.items():
    w.add_key_value(key, value, kind)
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list(_SPM_VOCAB)
  w.add_token_scores([-float(i) for i in range(len(_SPM_VOCAB))])
  w.add_token_types(_SPM_TYPES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_pad_token_id(2)
  w.add_add_bos_token(False)
  w.add_add_eos_token(False)
  w.add_tensor("token_embd.weight", np.zeros((len(_SPM_VOCAB), 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  # Ours never reaches transformers' GGUF reader (it imports torch).
  from transformers.integrations.gguf import gguf_tokenizer_mapping
  with monkeypatch.context() as patch:
    patch.setattr(gguf_tokenizer_mapping, "get_gguf_tokenizer",
                  lambda *_: pytest.fail("transformers' GGUF reader was used"))
    ours = GGUFFile(path).tokenizer()
  assert type(ours) is type(theirs)
  assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
  for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token",
               "add_eos_token", "all_special_tokens"):
    assert getattr(ours, attr) == getattr(theirs, attr), attr
  assert ours(_SPM_TEXTS).input_ids == theirs(_SPM_TEXTS).input_ids
  for row in theirs(_SPM_TEXTS).input_ids:
    assert ours.decode(row) == theirs.decode(row)


# ------------------------------------------------------------------------------------------------
# Quantized files: the 2-D weights in the k-quant and Q8_0 types llama.cpp's usual recipes write
# (Q4_K_M / Q5_K_M files mix Q4_K, Q5_K, Q6_K; Q8_0 files hold Q8_0), encoded by gguf or by the
# hand-written ggml block encoders of test_gguf_quants.py. Each row length is a multiple of 256
# (a k-quant super-block). The reference is the torch model holding the values each tensor
# decodes to, so the tolerance stays float32's; this pins the fused Phi-3 tensors and Qwen3's
# q/k norms of a quantized file to the right rows.

QUANTIZED_TYPES = {"token_embd": Q.Q8_0, "output": Q.Q6_K, "attn_q": Q.Q4_K, "attn_k": Q.Q4_K,
                   "attn_v": Q.Q6_K, "attn_qkv": Q.Q4_K, "attn_output": Q.Q5_K, "ffn_gate": Q.Q5_K,
                   "ffn_up": Q.Q5_K, "ffn_down": Q.Q6_K}


class _Quantizer:
  """``write_gguf``'s ``encode``: every 2-D weight in its ``QUANTIZED_TYPES`` type, the values it
  decodes to kept under its GGUF name."""

  def __init__(self):
    self.decoded, self.types = {}, {}

  def __call__(self, name, value):
    kind = name.split(".")[-2]
    if value.ndim != 2 or not name.endswith(".weight") or kind not in QUANTIZED_TYPES:
      return None
    qtype = QUANTIZED_TYPES[kind]
    raw = quants._quantize(value, qtype)
    self.decoded[name] = gguf.quants.dequantize(raw, qtype).reshape(value.shape)
    self.types[name] = qtype
    return raw, qtype

  def load_into(self, model):
    """The torch model with every quantized weight replaced by its decoded values."""
    state = model.state_dict()
    for key in state:
      name = gguf_name(key)
      if name in self.decoded:
        state[key] = torch.from_numpy(self.decoded[name].copy())
    model.load_state_dict(state)
    return model


def _assert_quantized_file_matches(path, quantizer, torch_model, seqs=(7,)):
  stored = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
  assert {n: stored[n] for n in quantizer.types} == quantizer.types
  assert len(set(quantizer.types.values())) >= 4
  reference = quantizer.load_into(torch_model)
  model, _, _ = load_gguf(path)
  for seq in seqs:
    ids, mask = decoder_inputs(seq=seq, vocab=VOCAB)
    util.assert_matches(util.forward(model, ids, mask),
                        *torch_decoder_outputs(reference, ids, mask), mask.astype(bool))
  return model


def test_gguf_quantized_qwen3_matches_transformers(tmp_path):
  quantizer = _Quantizer()
  path, torch_model = _qwen3_file(tmp_path, encode=quantizer, hidden_size=256,
                                  intermediate_size=512, head_dim=64)
  assert "blk.0.attn_q_norm.weight" not in quantizer.types  # norms stay float32
  model = _assert_quantized_file_matches(path, quantizer, torch_model)
  assert isinstance(model, Qwen3) and model.lm_head is None


def test_gguf_quantized_phi3_matches_transformers(tmp_path):
  quantizer = _Quantizer()
  path, torch_model = _phi3_file(tmp_path, encode=quantizer, hidden_size=256,
                                 intermediate_size=512, num_attention_heads=16,
                                 num_key_value_heads=4)
  assert quantizer.types["blk.0.attn_qkv.weight"] == Q.Q4_K
  assert quantizer.decoded["blk.0.ffn_up.weight"].shape == (1024, 256)  # gate and up, fused
  model = _assert_quantized_file_matches(path, quantizer, torch_model, seqs=(7, 12))
  assert isinstance(model, Phi3)
