"""GGUF files of llama.cpp's gemma and gemma2 architectures (Gemma 1 and Gemma 2).

Each test writes a tiny random transformers model into a GGUF file the way llama.cpp's converter
(``GemmaModel`` / ``Gemma2Model`` in convert_hf_to_gguf.py) writes one: norm weights plus one, no
q/k permutation, no ``output.weight`` (tied), Gemma 2's soft-caps and window as metadata. The
file is loaded through ``load_pretrained``, ``load_gguf`` and ``zoo.load`` and compared with the
torch model holding the same weights, float32 on both sides: per tensor, max |ours - reference|
<= ``REL_TOL`` (1e-4) * max |reference|, as in test_gemma_parity.py.

The Gemma 2 model's ``query_pre_attn_scalar`` equals its head width, as in the released 2B / 9B
(llama.cpp stores no scalar and scales by the head width, but for the 46-layer 27B). The tokenizer
is the tiny SentencePiece vocabulary of test_gguf_gemma3.py (256 byte-fallback pieces, so its
files have more than 256 tokens), compared with transformers' own GGUF tokenizer for gemma2;
transformers reads no gemma (1) file, so there the test checks ids directly.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import test_gguf_gemma3 as gemma3_refs
from vlmsel_jax import zoo
from vlmsel_jax.models import load_pretrained
from vlmsel_jax.models.gemma import Gemma
from vlmsel_jax.models.gguf import GGUFFile, hf_key
from vlmsel_jax.models.loading import load_gguf

REL_TOL = 1e-4
_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               head_dim=16, vocab_size=120, rms_norm_eps=1e-6, max_position_embeddings=256)
TINY = {
    "gemma": dict(_COMMON, num_key_value_heads=1),
    "gemma2": dict(_COMMON, num_key_value_heads=2, query_pre_attn_scalar=16, sliding_window=3,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
}
_CLASSES = {"gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
            "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM)}
# The tensors of gguf's MODEL_TENSORS for each architecture, by transformers module name.
_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm"}
_NORMS = {"gemma": {"post_attention_layernorm": "ffn_norm"},
          "gemma2": {"post_attention_layernorm": "post_attention_norm",
                     "pre_feedforward_layernorm": "ffn_norm",
                     "post_feedforward_layernorm": "post_ffw_norm"}}


def _tiny_gguf(path, arch, tokenizer=None, metadata=True):
  """Writes a tiny random Gemma (``arch`` "gemma") or Gemma 2 ("gemma2") as llama.cpp's converter
  does; returns the torch model. ``tokenizer``: ``_write_tiny_tokenizer``'s keyword arguments
  (the tiny vocabulary then sets the vocabulary size). ``metadata=False`` leaves out Gemma 2's
  optional keys (soft-caps, window), which llama.cpp then defaults."""
  config_class, model_class = _CLASSES[arch]
  fields = dict(TINY[arch])
  if tokenizer is not None:
    fields["vocab_size"] = len(gemma3_refs.TINY_VOCAB)
  if not metadata:
    fields.update(sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
  torch.manual_seed(0)
  model = model_class(config_class(**fields)).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.05)
  config = model.config
  names = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight"}
  for i in range(config.num_hidden_layers):
    for hf, gg in {**_PARTS, **_NORMS[arch]}.items():
      names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
  w = gguf.GGUFWriter(str(path), arch)
  w.add_context_length(config.max_position_embeddings)
  w.add_embedding_length(config.hidden_size)
  w.add_block_count(config.num_hidden_layers)
  w.add_feed_forward_length(config.intermediate_size)
  w.add_head_count(config.num_attention_heads)
  w.add_head_count_kv(config.num_key_value_heads)
  w.add_layer_norm_rms_eps(config.rms_norm_eps)
  w.add_key_length(config.head_dim)
  w.add_value_length(config.head_dim)
  if arch == "gemma2" and metadata:
    w.add_attn_logit_softcapping(config.attn_logit_softcapping)
    w.add_final_logit_softcapping(config.final_logit_softcapping)
    w.add_sliding_window(config.sliding_window)
  if tokenizer is not None:
    gemma3_refs._write_tiny_tokenizer(w, **tokenizer)  # pylint: disable=protected-access
  for key, t in model.state_dict().items():
    if key == "lm_head.weight":
      continue  # tied: llama.cpp writes no head
    value = t.numpy().astype(np.float32)
    if key.endswith("norm.weight"):
      value = value + np.float32(1.0)  # llama.cpp's Gemma converters store 1 + weight
    w.add_tensor(names[key], value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return model


def _assert_close(name, ours, ref):
  ours = np.asarray(ours, np.float32)
  assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
  err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
  assert err <= REL_TOL * scale, f"{name}: max abs error {err:.3g} > {REL_TOL:g} * {scale:.3g}"


def _assert_parity(model, torch_model, vocab):
  ids = np.random.RandomState(1).randint(0, vocab, size=(2, 9)).astype(np.int32)
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
  out = nnx.jit(lambda m, x: m(x))(model, ids)
  assert len(out.hidden_states) == len(ref.hidden_states)
  for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    _assert_close(f"hidden_states[{i}]", a, b.numpy())
  _assert_close("logits", out.logits, ref.logits.numpy())


def test_gguf_gemma_names():
  assert hf_key("blk.1.ffn_norm.weight", "gemma") == (
      "model.layers.1.post_attention_layernorm.weight")
  assert hf_key("blk.1.ffn_norm.weight", "gemma2") == (
      "model.layers.1.pre_feedforward_layernorm.weight")
  assert hf_key("blk.0.post_attention_norm.weight", "gemma2") == (
      "model.layers.0.post_attention_layernorm.weight")
  assert hf_key("blk.0.post_ffw_norm.weight", "gemma2") == (
      "model.layers.0.post_feedforward_layernorm.weight")
  assert hf_key("blk.0.attn_output.weight", "gemma") == "model.layers.0.self_attn.o_proj.weight"


@pytest.mark.parametrize("arch", ["gemma", "gemma2"])
def test_gguf_gemma_tiny_parity_and_config(tmp_path, arch):
  path = tmp_path / f"tiny-{arch}.gguf"
  torch_model = _tiny_gguf(path, arch)
  config = GGUFFile(path).config
  assert config["model_type"] == arch and config["tie_word_embeddings"]
  assert config["num_key_value_heads"] == TINY[arch]["num_key_value_heads"]
  if arch == "gemma2":
    assert config["layer_types"] == list(torch_model.config.layer_types) == [
        "sliding_attention", "full_attention"]
    assert (config["sliding_window"], config["attn_logit_softcapping"],
            config["final_logit_softcapping"], config["query_pre_attn_scalar"]) == (
                3, 2.0, 3.0, 16)
  model = load_pretrained(path)
  assert isinstance(model, Gemma) and model.config.sandwich_norms == (arch == "gemma2")
  _assert_parity(model, torch_model, TINY[arch]["vocab_size"])


def test_gguf_gemma2_without_optional_metadata_takes_llama_cpp_defaults(tmp_path):
  """llama.cpp's defaults when the file lacks them: window 4096, soft-caps 50 and 30."""
  path = tmp_path / "tiny-gemma2-bare.gguf"
  torch_model = _tiny_gguf(path, "gemma2", metadata=False)
  config = GGUFFile(path).config
  assert (config["sliding_window"], config["attn_logit_softcapping"],
          config["final_logit_softcapping"]) == (4096, 50.0, 30.0)
  _assert_parity(load_pretrained(path), torch_model, TINY["gemma2"]["vocab_size"])


def test_gguf_gemma2_27b_scales_by_hidden_over_heads(tmp_path):
  """llama.cpp's one exception: the 46-layer Gemma 2 (27B) scales scores by (hidden / heads)
  ** -0.5, not head_dim ** -0.5. Metadata only: the config is built without reading tensors."""
  path = tmp_path / "gemma2-27b-shape.gguf"
  w = gguf.GGUFWriter(str(path), "gemma2")
  for add, value in ((w.add_embedding_length, 64), (w.add_block_count, 46),
                     (w.add_feed_forward_length, 96), (w.add_head_count, 4),
                     (w.add_head_count_kv, 2), (w.add_layer_norm_rms_eps, 1e-6),
                     (w.add_key_length, 32), (w.add_value_length, 32), (w.add_vocab_size, 8)):
    add(value)
  w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  config = GGUFFile(path).config
  assert config["head_dim"] == 32 and config["query_pre_attn_scalar"] == 16
  assert config["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]


@pytest.mark.parametrize("arch", ["gemma", "gemma2"])
def test_gguf_gemma_tokenizer_and_zoo(tmp_path, arch):
  """The file's SentencePiece vocabulary becomes transformers' ``GemmaTokenizer`` (for gemma2 the
  very one ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds), and ``zoo.load`` of
  the file gives the model and that tokenizer."""
  path = tmp_path / f"tiny-{arch}-tok.gguf"
  flags = {"add_bos": True, "add_eos": False, "chat_template": gemma3_refs.TINY_TEMPLATE}
  torch_model = _tiny_gguf(path, arch, tokenizer=flags)
  model, config, ours = load_gguf(path)
  assert isinstance(model, Gemma) and type(ours).__name__ == "GemmaTokenizer"
  assert config["vocab_size"] == len(ours) == len(gemma3_refs.TINY_VOCAB)
  if arch == "gemma2":
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    gemma3_refs._assert_same_tokenizer(  # pylint: disable=protected-access
        ours, theirs, gemma3_refs.TOKENIZER_TEXTS)
  ids = ours(" the hello  world\n\n").input_ids
  assert ids[0] == 2  # <bos>
  assert ours.convert_ids_to_tokens(ids[1:]) == [
      "\u2581the", "\u2581hello", "\u2581\u2581", "w", "or", "ld", "\n\n"]
  assert ours.decode(ours("naïve 😀").input_ids, skip_special_tokens=True) == "naïve 😀"
  assert ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
      "<start_of_turn>user\nhi<end_of_turn>\n")
  loaded = zoo.load(str(path))
  assert loaded.kind == "text" and isinstance(loaded.model, Gemma)
  assert loaded.tokenizer.get_vocab() == ours.get_vocab()
  _assert_parity(loaded.model, torch_model, len(gemma3_refs.TINY_VOCAB))
