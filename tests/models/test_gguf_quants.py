"""GGUF files in every quantization type the ``gguf`` package decodes, as users find them.

Three kinds of reference:

* the k-quant encoders below, written from ggml's block layouts (block_q4_K / block_q5_K /
  block_q6_K), whose output gguf's decoders (and the hand-written ggml decoders of
  test_gguf_gemma3.py) must read back to within one quantization step: that makes the Q5_K_M-style
  file a real Q5_K / Q6_K file, not random bytes;
* ``gguf.quants.dequantize`` itself, for the values every tensor of a file decodes to (our
  dequantizer is built on it, so this checks what we do around it: type gating, shapes, the
  reversed dimension order, the q/k un-permutation, routing);
* transformers' torch Llama holding those decoded values, for whole models (hidden states and
  logits within float32 tolerance).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import test_gguf as base
import test_gguf_gemma3 as gemma3_refs
from vlmsel_jax.models import load_gguf, load_pretrained
from vlmsel_jax.models.gguf import (
    SUPPORTED_TENSOR_TYPES,
    GGUFFile,
    UnsupportedQuantizationError,
    dequantize,
)

# Both sides run float32 from identical decoded weights; what is left is summation order.
F32_ATOL = 1e-4
# k-quant super-blocks and the TQ types are 256 values wide: every row length here is a multiple.
TINY_256 = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)


# ------------------------------------------------------------------------------------------------
# Hand-written k-quant encoders (ggml's block layouts; scales rounded up so nothing clips).

def _f16_bytes(values):
  return values.astype(np.float16).view(np.uint8).reshape(len(values), 2)


def _f16_round(values):
  return values.astype(np.float16).astype(np.float32)


def _encode_q45_k(x, bits):
  """block_q4_K / block_q5_K: f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) pairs for eight
  32-value sub-blocks, [qh: 32 bytes, bit k = 5th bit of sub-block k,] 128 bytes of nibbles
  (sub-block 2c in the low, 2c + 1 in the high nibbles of bytes 32c .. 32c + 31);
  x = d * scale * q - dmin * min."""
  x = np.asarray(x, np.float32).reshape(-1, 8, 32)
  n, qmax = len(x), (1 << bits) - 1
  low = np.minimum(x.min(-1), 0)
  sub_scale, sub_min = (x.max(-1) - low) / qmax, -low
  d, dmin = _f16_round(sub_scale.max(-1) / 63), _f16_round(sub_min.max(-1) / 63)
  safe_d, safe_dmin = np.where(d > 0, d, 1)[:, None], np.where(dmin > 0, dmin, 1)[:, None]
  sc = np.clip(np.ceil(sub_scale / safe_d), 0, 63).astype(np.uint8)
  m = np.clip(np.ceil(sub_min / safe_dmin), 0, 63).astype(np.uint8)
  step = (d[:, None] * sc)[..., None]
  q = np.clip(np.round((x + (dmin[:, None] * m)[..., None]) / np.where(step > 0, step, 1)),
              0, qmax).astype(np.uint8)
  scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                           (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], axis=1)
  pairs = q.reshape(n, 4, 2, 32)
  qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(n, 128)
  parts = [_f16_bytes(d), _f16_bytes(dmin), scales]
  if bits == 5:
    qh = np.zeros((n, 32), np.uint8)
    for k in range(8):
      qh |= ((q[:, k] >> 4) & 1) << k
    parts.append(qh)
  return np.concatenate(parts + [qs], axis=1).astype(np.uint8)


def _encode_q6_k(x):
  """block_q6_K: 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 int8 scales (one per
  16 values), f16 d; x = d * scale * (q - 32). Within each 128-value half, 32-value group g
  keeps its low nibble in byte l (g = 0, 2) or l + 32 (g = 1, 3), low (g < 2) or high half,
  and its high bits at bit 2g of qh byte l."""
  x = np.asarray(x, np.float32).reshape(-1, 16, 16)
  n = len(x)
  sub_scale = np.abs(x).max(-1) / 31
  d = _f16_round(sub_scale.max(-1) / 127)
  sc = np.clip(np.ceil(sub_scale / np.where(d > 0, d, 1)[:, None]), 0, 127).astype(np.int8)
  step = (d[:, None] * sc)[..., None]
  q = (np.clip(np.round(x / np.where(step > 0, step, 1)), -32, 31) + 32).astype(np.uint8)
  q = q.reshape(n, 2, 4, 32)  # (half, group, l)
  lo, hi = q & 0xF, q >> 4
  ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)],
                      axis=2).reshape(n, 128)
  qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
  return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1).astype(np.uint8)


K_ENCODERS = {Q.Q4_K: lambda x: _encode_q45_k(x, 4), Q.Q5_K: lambda x: _encode_q45_k(x, 5),
              Q.Q6_K: _encode_q6_k}


def _quantize(w, qtype):
  """Raw GGUF data of a float32 array (rows of whole blocks), by gguf or the encoders above."""
  if qtype in K_ENCODERS:
    rows = w.reshape(-1, w.shape[-1])
    return K_ENCODERS[qtype](rows).reshape(*w.shape[:-1], -1)
  return gguf.quants.quantize(w.astype(np.float32), qtype)


def _encode(w, qtype):
  """``test_gguf._write_gguf``'s encoder for any type: (raw, raw_dtype, decoded values)."""
  if qtype in (Q.F32, Q.F16):
    return base._encode(w, qtype)
  raw = _quantize(w, qtype)
  return raw, qtype, gguf.quants.dequantize(raw, qtype).reshape(w.shape)


def _probe_quantizable():
  """The types gguf.quants.quantize encodes (it raises NotImplementedError for the rest)."""
  found = []
  for qtype in Q:
    try:
      gguf.quants.quantize(np.ones((2, 256), np.float32), qtype)
    except NotImplementedError:
      continue
    found.append(qtype)
  return found


GGUF_QUANTIZABLE = _probe_quantizable()


def _random_raw(qtype, rows, row_len, seed=0):
  """Random raw data of ``rows`` rows of ``row_len`` values in ``qtype`` (any byte pattern)."""
  block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
  raw = np.random.RandomState(seed).randint(0, 256, size=(rows, row_len // block_size * type_size))
  return raw.astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Which types, and the dequantizer on each.

def test_supported_types_are_what_gguf_dequantizes():
  supported = set(SUPPORTED_TENSOR_TYPES)
  # The formats of the files people download: legacy, k-quants (Q*_K_S/M/L), i-quants, ternary.
  assert {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K,
          Q.Q5_K, Q.Q6_K, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M,
          Q.IQ4_NL, Q.IQ4_XS, Q.TQ1_0, Q.TQ2_0, Q.MXFP4} <= supported
  # What gguf has no decoder for stays out (Q8_1 / Q8_K exist only inside llama.cpp's matmuls).
  assert not {Q.Q8_1, Q.Q8_K, Q.I8, Q.I16, Q.I32, Q.I64, Q.F64} & supported
  for qtype in set(Q) - supported:
    with pytest.raises(UnsupportedQuantizationError,
                       match=rf"^blk\.0\.attn_q\.weight: GGUF tensor type {qtype.name} is not "
                       r"supported; supported: F32, F16, "):
      dequantize(np.zeros((1, 64), np.uint8), qtype, "blk.0.attn_q.weight")


# Random bytes make some float16 scales inf / NaN, on which gguf's decoders warn; the comparison
# is exact (NaN where NaN) all the same.
RANDOM_BLOCKS_WARN = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning",
                                                "ignore:overflow:RuntimeWarning")


@RANDOM_BLOCKS_WARN
@pytest.mark.parametrize("qtype", SUPPORTED_TENSOR_TYPES, ids=lambda t: t.name)
def test_dequantize_every_supported_type(qtype):
  if qtype in (Q.F32, Q.F16):
    raw = np.random.RandomState(0).randn(3, 512).astype(np.float32 if qtype == Q.F32 else
                                                          np.float16)
  else:
    raw = _random_raw(qtype, 3, 512)  # three rows of 512 values, as GGUFReader lays them out
  ours = dequantize(raw, qtype, "w")
  assert ours.dtype == np.float32 and ours.shape == (3, 512)
  np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", list(K_ENCODERS), ids=lambda t: t.name)
def test_k_quant_encoders_write_the_real_format(qtype):
  """gguf's decoder reads our encoding back to within one quantization step (a layout error
  would be off by the block's range), and so does ggml's decoder transcribed by hand."""
  x = np.random.RandomState(5).randn(6, 512).astype(np.float32) * np.float32(0.05)
  x[0, :256] += np.float32(0.3)  # an all-positive block: its minimums (and dmin) are zero
  raw = _quantize(x, qtype)
  assert raw.shape == (6, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
  decoded = dequantize(raw, qtype)
  blocks = x.reshape(-1, 256)
  err = np.abs(decoded.reshape(-1, 256) - blocks).max(-1)
  if qtype == Q.Q6_K:
    # q in [-32, 31] over each 16 values' absolute maximum: half a step of amax / 31, plus the
    # rounding of the 8-bit scale (rounded up, so never clipping) and of the float16 d.
    bound = np.abs(blocks.reshape(-1, 16, 16)).max((-1, -2)) / 31 * 0.6
  else:
    # Half a step of range / (2^bits - 1), plus up to one dmin from rounding the minimum up.
    qmax = 15 if qtype == Q.Q4_K else 31
    sub = blocks.reshape(-1, 8, 32)
    span = (sub.max(-1) - np.minimum(sub.min(-1), 0)).max(-1)
    bound = span / qmax * 0.6 + np.abs(np.minimum(sub.min(-1), 0)).max(-1) / 63 * 1.01
  assert np.all(err <= bound), float((err / bound).max())
  # The loose bound still tells a right encoding from a scrambled one.
  assert np.all(bound < 0.5 * np.abs(blocks).max(-1))
  if qtype in gemma3_refs.REF:
    np.testing.assert_allclose(decoded.ravel(), gemma3_refs.REF[qtype][0](raw), rtol=1e-6,
                               atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Whole files.

def _all_weights(config, qtype):
  """Every 2-D weight (embedding and head included) in ``qtype``."""
  return {name: qtype for key, name in base._gguf_names(config).items() if key.endswith("weight")
          and "norm" not in key}


def _assert_parity(model, torch_config, decoded, tol=F32_ATOL):
  """Our model against transformers' torch Llama holding the same decoded weights."""
  reference = base._torch_reference(torch_config, decoded)
  ids = base._ids()
  out = base._forward(model, ids)
  ref_hidden, ref_logits = base._torch_outputs(reference, ids)
  err = base._max_err(out, ref_hidden, ref_logits)
  assert err <= tol, err
  return out, ref_logits


def test_gguf_quantizable_types_are_probed():
  # gguf 0.19 quantizes the legacy types, BF16, the ternary types and MXFP4 (no k- or i-quants:
  # those come from K_ENCODERS or random blocks here).
  assert {Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0} <= set(GGUF_QUANTIZABLE)


@pytest.mark.parametrize("qtype", [t for t in GGUF_QUANTIZABLE if t != Q.F32],
                         ids=lambda t: t.name)
def test_gguf_quantized_model_matches_transformers(tmp_path, qtype):
  """Every 2-D weight quantized by gguf in ``qtype``: the file's tensors decode to gguf's values
  in transformers' layout, and the model matches transformers' Llama holding those values."""
  torch_model = base._torch_llama(**TINY_256)
  types = _all_weights(torch_model.config, qtype)
  path = tmp_path / f"{qtype.name}.gguf"
  decoded = base._write_gguf(path, base._state(torch_model), torch_model.config, types=types,
                             encode=_encode)
  stored = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
  assert {stored[name] for name in types} == {qtype}
  got = dict(GGUFFile(path))
  assert got.keys() == decoded.keys()
  for key, value in decoded.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  _assert_parity(load_pretrained(path), torch_model.config, decoded)


# The types gguf decodes but cannot quantize (the k- and i-quants, NVFP4): random blocks, one
# tensor per type, the q/k projections among them.
OTHER_TYPES = [t for t in SUPPORTED_TENSOR_TYPES if t not in GGUF_QUANTIZABLE]


@RANDOM_BLOCKS_WARN
def test_gguf_file_of_every_other_type_loads_the_decoded_values(tmp_path):
  """Tensors in each type gguf decodes but cannot encode (random blocks: any bytes are valid)
  reach the model as gguf's decoded values, un-permuted and transposed."""
  layers = -(-len(OTHER_TYPES) // 7)  # seven 2-D weights per layer
  torch_model = base._torch_llama(**{**TINY_256, "num_hidden_layers": layers})
  config = torch_model.config
  names = [n for k, n in base._gguf_names(config).items()
           if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n]
  assignment = dict(zip(names, OTHER_TYPES))
  assert len(assignment) == len(OTHER_TYPES) >= 15
  assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight"} <= assignment.keys()
  state = base._state(torch_model)

  def encode(w, qtype):
    if qtype in (Q.F32, Q.F16):
      return base._encode(w, qtype)
    raw = _random_raw(qtype, w.shape[0], w.shape[1], seed=len(assignment) + int(qtype))
    return raw, qtype, gguf.quants.dequantize(raw, qtype).reshape(w.shape)

  path = tmp_path / "others.gguf"
  decoded = base._write_gguf(path, state, config, types=assignment, encode=encode)
  stored = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
  assert {stored[n] for n in assignment} == set(OTHER_TYPES)
  got = dict(GGUFFile(path))
  for key, value in decoded.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  model = load_pretrained(path)
  for i in range(layers):
    for hf, module in (("self_attn.q_proj", model.layers[i].attn.q_proj),
                       ("mlp.down_proj", model.layers[i].mlp.down_proj)):
      np.testing.assert_array_equal(np.asarray(module.kernel[...]),
                                    decoded[f"model.layers.{i}.{hf}.weight"].T)


def _q5_k_m_types(config):
  """llama.cpp's LLAMA_FTYPE_MOSTLY_Q5_K_M recipe (llama-quant.cpp): Q5_K by default; Q6_K for
  the head and for attn_v / ffn_down of the layers use_more_bits picks (with two layers, the
  second); norms stay F32."""
  n = config.num_hidden_layers

  def more_bits(i):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

  types = {}
  for key, name in base._gguf_names(config).items():
    if not key.endswith("weight") or "norm" in key:
      continue
    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    kind = name.split(".")[-2]
    if name == "output.weight" or (kind in ("attn_v", "ffn_down") and more_bits(layer)):
      types[name] = Q.Q6_K
    else:
      types[name] = Q.Q5_K
  return types


def test_gguf_q5_k_m_style_file_matches_transformers(tmp_path):
  torch_model = base._torch_llama(**TINY_256)
  types = _q5_k_m_types(torch_model.config)
  path = tmp_path / "tiny-Q5_K_M.gguf"
  decoded = base._write_gguf(path, base._state(torch_model), torch_model.config, types=types,
                             encode=_encode)
  stored = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
  assert set(stored.values()) == {Q.F32, Q.Q5_K, Q.Q6_K}
  assert (stored["blk.0.attn_v.weight"], stored["blk.1.attn_v.weight"]) == (Q.Q5_K, Q.Q6_K)
  assert stored["output.weight"] == Q.Q6_K and stored["blk.1.attn_norm.weight"] == Q.F32

  model, config, tokenizer = load_gguf(path)
  assert config["hidden_size"] == 256 and len(tokenizer) == len(base.TOKENS)
  out, _ = _assert_parity(model, torch_model.config, decoded)

  # And against the float model it was quantized from. This random tiny model amplifies weight
  # noise: the ~4% (Q5_K) / ~2% (Q6_K) relative weight error moves its logits by 14% RMS
  # (measured; Q8_0 everywhere: 2%), while a mis-decoded MLP or value tensor moves them by
  # 70-115%. 20% RMS separates the two; the exact check above is the one that pins every value.
  _, float_logits = base._torch_outputs(torch_model, base._ids())
  diff = np.asarray(out.logits) - float_logits
  rel = float(np.sqrt(np.mean(diff ** 2)) / np.sqrt(np.mean(float_logits ** 2)))
  assert rel <= 0.2, rel
