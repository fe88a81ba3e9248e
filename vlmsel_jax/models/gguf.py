"""GGUF (llama.cpp) checkpoints of the llama, qwen2, gemma, gemma2 and gemma3 architectures as a
weight source.

A GGUF file holds the weights (possibly block-quantized), the hyper-parameters and the tokenizer
of one model, all under llama.cpp's names. ``GGUFFile`` reads one with the ``gguf`` package and
turns it into what the generic loader takes: a transformers-style config dict and
(Hugging Face key, float32 numpy array) pairs. On the way it

* dequantizes every tensor with ``gguf.quants`` (every type that package decodes: the legacy
  Q4_0 ... Q8_0, the k-quants Q2_K ... Q6_K behind the usual Q4_K_M / Q5_K_M files, the IQ and
  TQ types, MXFP4, BF16; ``SUPPORTED_TENSOR_TYPES`` is probed from the installed package);
* reverses GGUF's dimension order (``ne[0]`` is the innermost axis, so a torch ``(out, in)``
  weight is stored as ``[in, out]``);
* renames ``blk.N.attn_q.weight`` & co. to ``model.layers.N.self_attn.q_proj.weight`` & co. by
  inverting gguf's own ``TensorNameMap`` for the architecture;
* undoes the row permutation llama.cpp's converter applies to the llama q/k projections
  (llama.cpp rotates interleaved pairs of a llama head, transformers rotates its two halves).
  Qwen2 and Gemma (1, 2, 3) files are written unpermuted: llama.cpp rotates their halves, as
  transformers does. Gemma files store every RMSNorm weight plus one (llama.cpp's norm multiplies
  by the weight, Gemma's by 1 + weight), which is subtracted again here;
* reads Llama 3.1's ``rope_freqs.weight`` (llama.cpp stores the llama3 RoPE rescaling as one
  divisor per frequency and no parameters; GGUF has no metadata keys for it) into the config's
  ``rope_freq_factors``, which the NNX Llama divides its inverse frequencies by, as llama.cpp
  does. transformers has no such field: the dict alone describes unscaled RoPE to transformers.
* reads the phi3 and qwen3 architectures too (Phi-3 / Phi-4-mini, Qwen3): Phi-3's fused
  ``attn_qkv`` / ``ffn_up`` map onto the NNX Phi3's fused projections as they are, its longrope
  factors (the ``rope_factors_short`` / ``rope_factors_long`` tensors) go into the config, and a
  SentencePiece Phi-3 vocabulary is converted by transformers' GGUF tokenizer conversion.

Typical use::

  src = GGUFFile("SmolLM2-135M-Instruct.Q4_1.gguf")
  src.config                # a transformers-style config dict
  tokenizer = src.tokenizer()
  for key, array in src:    # Hugging Face keys, float32 arrays
    ...

``loading.load_gguf`` turns a file into (NNX model, config, tokenizer); ``loading.load_pretrained``
takes a ``.gguf`` file too and returns the model alone.

Of ``vlmsel_jax`` this module imports only ``checkpoint`` (its errors) and the llama / gemma /
gemma3 key tables, whose checkpoint keys it renames GGUF's tensors to.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import tokenizers
import transformers
from gguf import GGMLQuantizationType, GGUFValueType
from tokenizers import decoders, models, pre_tokenizers, processors

from vlmsel_jax.models import gemma, gemma3, llama
from vlmsel_jax.models import phi3, qwen3
from vlmsel_jax.models.checkpoint import CheckpointFileError, UnsupportedModelError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TENSOR_TYPES",
    "GGUFFile",
    "UnsupportedQuantizationError",
    "dequantize",
    "hf_key",
    "unpermute_rotary",
]


def _dequantizable_types() -> tuple[GGMLQuantizationType, ...]:
  """The tensor types the installed ``gguf`` package dequantizes, in enum order.

  ``gguf.quants.dequantize`` handles F32 / F16 itself and every type with a registered block
  decoder; any other type raises ``NotImplementedError``. Asking it to decode one all-zero block
  of each type finds them without reaching into the package's private registry.
  """
  found = []
  for qtype in GGMLQuantizationType:
    sizes = gguf.GGML_QUANT_SIZES.get(qtype)
    if sizes is None:
      continue
    try:
      gguf.quants.dequantize(np.zeros((1, sizes[1]), np.uint8), qtype)
    # A decoder that fails on a zero block is as unusable as a missing one, whatever it raises;
    # this runs at import, where a gguf bug must not make the whole module unimportable.
    except Exception:  # pylint: disable=broad-except
      continue
    found.append(qtype)
  return tuple(found)


SUPPORTED_TENSOR_TYPES = _dequantizable_types()

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma", "gemma2", "gemma3", "phi3", "qwen3")
# Gemma's llama.cpp architectures: norm weights stored plus one, a SentencePiece vocabulary.
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# Architectures whose q/k rows llama.cpp's converter permutes: only where llama.cpp rotates
# interleaved pairs (LLAMA_ROPE_TYPE_NORM; convert_hf_to_gguf.py's LlamaModel.modify_tensors).
# Qwen2Model and Gemma3Model write transformers' row order, since llama.cpp rotates their two
# halves (LLAMA_ROPE_TYPE_NEOX) exactly as transformers does.
_PERMUTED_QK = ("llama",)
# llama.cpp architecture -> transformers (model_type, architectures) of the NNX family loading it.
_TRANSFORMERS_MODEL = {"llama": ("llama", "LlamaForCausalLM"),
                       "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                       "phi3": ("phi3", "Phi3ForCausalLM"),
                       "qwen3": ("qwen3", "Qwen3ForCausalLM"),
                       "gemma": ("gemma", "GemmaForCausalLM"),
                       "gemma2": ("gemma2", "Gemma2ForCausalLM"),
                       "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
_ROPE_FREQS = "rope_freqs.weight"
# Phi-3's longrope factors: llama.cpp's converter writes them as tensors, not metadata.
_PHI3_ROPE_FACTORS = {"short_factor": "rope_factors_short.weight",
                      "long_factor": "rope_factors_long.weight"}

# tokenizer.ggml.pre values -> how text is split before byte-level BPE. llama.cpp's "smollm" is
# single digits, then the GPT-2 regex; "llama-bpe" is Llama 3's regex, "qwen2" Qwen2's.
_GPT2_PRE = ("default", "gpt-2", "gpt2")
_SMOLLM_PRE = ("smollm",)
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's tokenizer.json regex: Llama 3's with single digits. llama.cpp maps these three pre
# names to it (LLAMA_VOCAB_PRE_TYPE_QWEN2).
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen", "megrez")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {**{pre: _LLAMA3_SPLIT for pre in _LLAMA3_PRE},
              **{pre: _QWEN2_SPLIT for pre in _QWEN2_PRE}}

# llama.cpp's token types (llama_token_type): which vocabulary entries are added tokens.
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Parsing errors a damaged file provokes inside gguf.GGUFReader (it memory-maps the file and
# slices/reshapes/decodes whatever the header says is there).
_READ_ERRORS = (ValueError, IndexError, KeyError, OSError, OverflowError, TypeError,
                UnicodeDecodeError)


class UnsupportedQuantizationError(UnsupportedModelError):
  """A GGUF tensor stored in a format the installed ``gguf`` package does not dequantize."""


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def dequantize(data: np.ndarray, tensor_type: GGMLQuantizationType,
               name: str = "tensor") -> np.ndarray:
  """Returns the float32 values of one GGUF tensor's raw data (as ``GGUFReader`` exposes it).

  Quantized data comes as uint8 rows of whole blocks; the result has the same leading axes and
  the decoded row length. F32 / F16 data comes already typed and keeps its shape. The decoding
  is ``gguf.quants.dequantize``'s.

  Args:
    data: The tensor's data.
    tensor_type: Its GGML type.
    name: The tensor's name, for the error message.

  Raises:
    UnsupportedQuantizationError: the installed ``gguf`` cannot dequantize ``tensor_type`` (see
      ``SUPPORTED_TENSOR_TYPES``); the one-line message names ``name`` and the type.
    ValueError: ``data`` is not whole blocks of ``tensor_type``.
  """
  # The membership test also covers ids outside the enum, on which gguf's own NotImplementedError
  # message would fail with an AttributeError.
  if tensor_type not in SUPPORTED_TENSOR_TYPES:
    raise _unsupported_type(name, tensor_type)
  try:
    values = gguf.quants.dequantize(data, tensor_type)
  except NotImplementedError:
    raise _unsupported_type(name, tensor_type) from None
  return np.asarray(values, dtype=np.float32)


def _unsupported_type(name: str, tensor_type: Any) -> UnsupportedQuantizationError:
  return UnsupportedQuantizationError(
      f"{name}: GGUF tensor type {_type_name(tensor_type)} is not supported; supported: "
      f"{_supported_list()}")


def _supported_list() -> str:
  """The supported type names, and which gguf package decides them (upgrading it adds types)."""
  return (f"{', '.join(t.name for t in SUPPORTED_TENSOR_TYPES)} (the types gguf "
          f"{_gguf_version()} dequantizes)")


@functools.cache
def _gguf_version() -> str:
  try:
    return importlib.metadata.version("gguf")
  except importlib.metadata.PackageNotFoundError:
    return "(version unknown)"


def _type_name(tensor_type: Any) -> str:
  return getattr(tensor_type, "name", str(tensor_type))


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation, giving transformers' row order back.

  llama.cpp's ``convert_hf_to_gguf.py`` stores ``w.reshape(n, 2, d // n // 2, *rest)
  .swapaxes(1, 2)`` (``n`` heads; for k the key/value heads), which interleaves the two rotary
  halves of every head; this is its inverse. Works for weights ``(out, in)`` and biases
  ``(out,)``.
  """
  rows = weight.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(f"{rows} rows do not split into {num_heads} heads of rotary pairs")
  return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def _key_patterns(architecture: str) -> list[re.Pattern[str]]:
  """The checkpoint-key regexes of the key table of the NNX family loading ``architecture``.

  The regexes do not depend on the config (only what ``lm_head`` routes to does), so a minimal
  one of the family stands in.
  """
  if architecture == "gemma3":
    table = gemma3.key_table(gemma3.Gemma3Config(
        vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1,
        num_kv_heads=1, head_dim=1, query_pre_attn_scalar=1))
  elif architecture in ("gemma", "gemma2"):
    table = gemma.key_table(gemma.GemmaConfig(
        vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1,
        num_kv_heads=1, head_dim=1, sandwich_norms=architecture == "gemma2"))
  elif architecture == "phi3":
    table = phi3.key_table(phi3.Phi3Config(
        vocab_size=1, hidden_size=2, intermediate_size=1, num_layers=1, num_heads=1,
        num_kv_heads=1, head_dim=2))
  elif architecture == "qwen3":
    table = qwen3.key_table(qwen3.Qwen3Config(
        vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1,
        num_kv_heads=1, head_dim=1))
  elif architecture in SUPPORTED_ARCHITECTURES:
    table = llama.key_table(llama.LlamaConfig(
        vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1,
        num_kv_heads=1, head_dim=1))
  else:
    raise ValueError(f"GGUF architecture {architecture!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  return [re.compile(pattern) for pattern in table]


@functools.cache
def _tensor_names(architecture: str) -> dict[str, str]:
  """GGUF tensor name -> Hugging Face module name (both without ``.weight`` / ``.bias``), with
  the per-layer tensors of block 0 standing for every block.

  Inverts ``gguf.get_tensor_name_map``, the table llama.cpp's converter names tensors with. It
  lists many checkpoints' spellings of each tensor (``model.layers.0.self_attn.q_proj``,
  ``layers.0.attention.wq``, ...); the one kept is the one the family's key table reads. Only
  the architecture's own tensors (``gguf.MODEL_TENSORS``) are in the map, so Gemma 3's
  ``blk.N.ffn_norm`` (its pre-MLP norm) and llama's (its post-attention norm) come out right.
  """
  arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture), None)
  if arch is None:
    raise ValueError(f"gguf {_gguf_version()} knows no architecture {architecture!r}")
  patterns = _key_patterns(architecture)
  names: dict[str, str] = {}
  for hf_name, (_, gguf_name) in gguf.get_tensor_name_map(arch, 1).mapping.items():
    if gguf_name not in names and any(p.fullmatch(hf_name + ".weight") for p in patterns):
      names[gguf_name] = hf_name
  return names


def hf_key(gguf_name: str, architecture: str = "llama") -> str:
  """The Hugging Face key for a GGUF tensor name of ``architecture``.

  Names with no Hugging Face counterpart in the family's key table (``rope_freqs.weight``, say)
  come back unchanged.

  Raises:
    ValueError: ``architecture`` is not one of ``SUPPORTED_ARCHITECTURES``.
  """
  names = _tensor_names(architecture)
  base, _, suffix = gguf_name.rpartition(".")
  if suffix not in ("weight", "bias"):
    return gguf_name
  block = re.fullmatch(r"blk\.([0-9]+)\.(.+)", base)
  if block is None:
    hf_name = names.get(base)
  else:
    # gguf names every per-layer tensor blk.{bid}.<kind>, and the key tables read
    # model.layers.<bid>.<module>: look the kind up in block 0 and move it to this block.
    hf_name = names.get(f"blk.0.{block.group(2)}")
    if hf_name is not None:
      hf_name = re.sub(r"^model\.layers\.0\.", f"model.layers.{block.group(1)}.", hf_name)
  return gguf_name if hf_name is None else f"{hf_name}.{suffix}"


def _field_value(field: Any) -> Any:
  """Decodes one ``ReaderField``: a scalar, a string, or a list of either."""
  types = field.types
  if not types:
    return None

  def item(index: int, value_type: GGUFValueType) -> Any:
    part = field.parts[index]
    if value_type == GGUFValueType.STRING:
      return bytes(part).decode("utf-8")
    return part.tolist()[0]

  if types[0] == GGUFValueType.ARRAY:
    return [item(i, types[-1]) for i in field.data]
  return item(field.data[0], types[0])


class GGUFFile:
  """A llama, qwen2, gemma, gemma2 or gemma3 GGUF file as a source of (Hugging Face key, float32
  array) pairs.

  Opening checks the file (readable, a supported architecture, only tensor types ``gguf`` can
  dequantize, no feature the NNX model lacks) and builds the config; tensors are dequantized one
  at a time while iterating. Tensors whose GGUF name has no Hugging Face counterpart are yielded
  under their GGUF name, so the loader reports them as unexpected keys.

  Attributes:
    path: The file.
    reader: The open ``gguf.GGUFReader`` (it memory-maps the file).
    architecture: ``general.architecture``.
    config: A transformers-style config dict (``LlamaConfig`` / ``Qwen2Config`` /
      ``Gemma3TextConfig`` fields) built from the metadata; a Llama 3.1 file's
      ``rope_freqs.weight`` becomes ``rope_freq_factors``.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.is_file():
      raise CheckpointFileError(f"{self.path}: no such GGUF file")
    try:
      self.reader = gguf.GGUFReader(self.path, "r")
    except _READ_ERRORS as e:
      raise CheckpointFileError(
          f"{self.path}: unreadable GGUF file, truncated or corrupt ({_one_line(e)})") from None
    self._fields = self.reader.fields
    self.architecture = self._required("general.architecture")
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise UnsupportedModelError(
          f"{self.path}: GGUF architecture {self.architecture!r} is not supported; supported: "
          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    self._check_tensor_types()
    self.config = self._build_config()

  def get(self, key: str, default: Any = None) -> Any:
    """The decoded metadata value under ``key``, or ``default`` when the file lacks it."""
    field = self._fields.get(key)
    if field is None:
      return default
    try:
      return _field_value(field)
    except _READ_ERRORS as e:
      raise CheckpointFileError(
          f"{self.path}: unreadable GGUF metadata {key!r} ({_one_line(e)})") from None

  def _required(self, key: str) -> Any:
    value = self.get(key)
    if value is None:
      raise CheckpointFileError(f"{self.path}: GGUF metadata lacks {key!r}")
    return value

  def _check_tensor_types(self) -> None:
    """Raises once, naming every unsupported type and a tensor stored in it."""
    unsupported: dict[str, list[str]] = {}
    for t in self.reader.tensors:
      if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
        unsupported.setdefault(_type_name(t.tensor_type), []).append(t.name)
    if unsupported:
      listed = "; ".join(f"{kind} in {len(names)} tensor(s), e.g. {names[0]!r}"
                         for kind, names in sorted(unsupported.items()))
      raise UnsupportedQuantizationError(
          f"{self.path}: unsupported GGUF tensor type(s): {listed}; supported: "
          f"{_supported_list()}")

  def _build_config(self) -> dict[str, Any]:
    """The transformers-style config dict for the metadata (and tensor list)."""
    arch = self.architecture
    names = {t.name for t in self.reader.tensors}

    def unsupported(what: str) -> UnsupportedModelError:
      model = {"gemma3": "NNX Gemma 3", "gemma": "NNX Gemma", "gemma2": "NNX Gemma"}.get(
          arch, "NNX Llama")
      return UnsupportedModelError(f"{self.path}: {what} is not supported by the {model}")

    if self.get(f"{arch}.expert_count", 0):
      raise unsupported(f"a mixture of experts ({arch}.expert_count = "
                        f"{self.get(f'{arch}.expert_count')})")
    scaling = self.get(f"{arch}.rope.scaling.type", "none")
    # Gemma 3's long-context checkpoints scale the global layers' RoPE linearly.
    if scaling != "none" and not (arch == "gemma3" and scaling == "linear") and not (
        arch == "phi3" and scaling == "longrope"):
      raise unsupported(f"RoPE scaling {scaling!r}")
    if _ROPE_FREQS in names and arch != "llama":
      # llama.cpp itself reads the factors for llama only (Llama 3.1+); it loads no such tensor
      # for qwen2 or gemma3.
      raise unsupported(f"RoPE frequency factors ({_ROPE_FREQS}) in a {arch} file")

    hidden = int(self._required(f"{arch}.embedding_length"))
    num_heads = int(self._required(f"{arch}.attention.head_count"))
    num_kv_heads = self.get(f"{arch}.attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
      if len(set(num_kv_heads)) != 1:
        raise unsupported(f"a per-layer key/value head count {num_kv_heads}")
      num_kv_heads = num_kv_heads[0]
    head_dim = int(self.get(f"{arch}.attention.key_length", hidden // num_heads))
    value_dim = int(self.get(f"{arch}.attention.value_length", head_dim))
    if value_dim != head_dim:
      raise unsupported(f"a value head width ({value_dim}) other than the key's ({head_dim})")
    rope_dim = int(self.get(f"{arch}.rope.dimension_count", head_dim))
    # Phi-3 / Phi-4-mini rotate part of each head (partial_rotary_factor); the others all.
    if rope_dim != head_dim and arch != "phi3":
      raise unsupported(f"partial rotary embeddings (rope.dimension_count {rope_dim}, "
                        f"head width {head_dim})")

    vocab_size = self.get(f"{arch}.vocab_size")
    if vocab_size is None:
      tokens = self._fields.get("tokenizer.ggml.tokens")
      if tokens is not None:
        vocab_size = len(tokens.data)
      else:
        embed = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        if embed is None:
          raise CheckpointFileError(f"{self.path}: GGUF file has no vocabulary size (no "
                                    f"{arch}.vocab_size, tokenizer.ggml.tokens or token_embd)")
        vocab_size = int(embed.shape[-1])

    common = {
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(self._required(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(self._required(f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(self._required(f"{arch}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(self.get(f"{arch}.context_length", 2048)),
        # llama.cpp's converter drops the head of a tied model, so its absence means tied.
        "tie_word_embeddings": "output.weight" not in names,
    }
    if arch == "gemma3":
      config = {**common, **self._gemma3_config(common, scaling)}
    elif arch in ("gemma", "gemma2"):
      config = {**common, **self._gemma_config(common)}
    elif arch == "phi3":
      config = {**common, **self._phi3_config(common, rope_dim, names)}
    else:
      model_type, architecture = _TRANSFORMERS_MODEL[arch]
      config = {
          **common,
          "model_type": model_type,
          "architectures": [architecture],
          "hidden_act": "silu",
          "rope_parameters": {"rope_type": "default",
                              "rope_theta": float(self.get(f"{arch}.rope.freq_base", 10000.0))},
      }
      if arch == "qwen2":
        # Qwen2 always has q/k/v biases (the family hard-codes them, as transformers does), and
        # llama.cpp attends fully in every qwen2 layer: it stores no sliding window.
        config["use_sliding_window"] = False
      else:
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = "blk.0.ffn_gate.bias" in names
      if _ROPE_FREQS in names:
        config["rope_freq_factors"] = self._rope_freq_factors(rope_dim)
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
      value = self.get(f"tokenizer.ggml.{key}")
      if value is not None:
        config[key.replace("padding", "pad")] = int(value)
    return config

  def _rope_freq_factors(self, rope_dim: int) -> list[float]:
    """The divisors of the RoPE inverse frequencies in ``rope_freqs.weight``.

    llama.cpp's converter writes Llama 3.1's ``rope_scaling`` (rope_type "llama3") as this
    tensor, one factor per frequency, and no metadata (GGUF has keys for linear / YaRN /
    LongRoPE scaling only), so the factors themselves are the config; llama.cpp divides each
    frequency by its factor, and so does the NNX Llama with ``rope_freq_factors``.

    Raises:
      CheckpointFileError: the tensor is corrupt, has other than ``rope_dim // 2`` values, or a
        value that is not positive and finite.
    """
    t = next(t for t in self.reader.tensors if t.name == _ROPE_FREQS)
    try:
      values = dequantize(t.data, t.tensor_type, t.name).ravel()
    except UnsupportedModelError:
      raise
    except ValueError as e:
      raise CheckpointFileError(f"{self.path}: tensor {_ROPE_FREQS!r} is corrupt "
                                f"({_one_line(e)})") from None
    if values.size != rope_dim // 2:
      raise CheckpointFileError(
          f"{self.path}: tensor {_ROPE_FREQS!r} has {values.size} values; a rotary width of "
          f"{rope_dim} has {rope_dim // 2} frequencies")
    if not np.all(np.isfinite(values) & (values > 0)):
      raise CheckpointFileError(
          f"{self.path}: tensor {_ROPE_FREQS!r} holds factors that are not positive and finite")
    return [float(v) for v in values]

  def _phi3_config(self, common: dict[str, Any], rope_dim: int,
                   names: set[str]) -> dict[str, Any]:
    """The ``Phi3Config`` fields llama.cpp's phi3 metadata and tensors imply.

    llama.cpp's converter writes the rotated width (``rope.dimension_count``), the pretraining
    context (``rope.scaling.original_context_length``), the sliding window (0 for none) and, for
    the long-context checkpoints, longrope's attention factor as metadata and its short / long
    factors as the tensors ``rope_factors_short`` / ``rope_factors_long``. The config says what
    transformers' Phi3Config of the original checkpoint says: the window applies to every layer
    (llama.cpp itself currently ignores Phi-3's window), and the factors are chosen per call by
    sequence length (llama.cpp chooses by context size).

    Raises:
      CheckpointFileError: only one of the factor tensors, or one that is corrupt, of another
        length than ``rope_dim // 2``, or not positive and finite.
    """
    head_dim = common["head_dim"]
    partial = rope_dim / head_dim
    if int(head_dim * partial) != rope_dim:
      # transformers rotates int(head_dim * factor) channels; a factor a hair above the ratio
      # gives exactly rope_dim where the plain ratio rounds below it.
      partial = (rope_dim + 0.5) / head_dim
    rope = {"rope_type": "default", "rope_theta": float(self.get("phi3.rope.freq_base", 10000.0)),
            "partial_rotary_factor": partial}
    config = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_act": "silu",
              "rope_parameters": rope}
    original = self.get("phi3.rope.scaling.original_context_length")
    if original is not None:
      config["original_max_position_embeddings"] = int(original)
    present = [n for n in _PHI3_ROPE_FACTORS.values() if n in names]
    if present and len(present) != len(_PHI3_ROPE_FACTORS):
      raise CheckpointFileError(f"{self.path}: GGUF file has {present[0]!r} but not its "
                                "short / long counterpart")
    if present:
      rope["rope_type"] = "longrope"
      for field, name in _PHI3_ROPE_FACTORS.items():
        rope[field] = self._factor_tensor(name, rope_dim // 2)
      attention_factor = self.get("phi3.rope.scaling.attn_factor")
      if attention_factor is not None:
        rope["attention_factor"] = float(attention_factor)
    window = int(self.get("phi3.attention.sliding_window", 0) or 0)
    config["sliding_window"] = window if window > 0 else None
    return config

  def _factor_tensor(self, name: str, count: int) -> list[float]:
    """The ``count`` positive, finite values of the 1-D tensor ``name``.

    Raises:
      CheckpointFileError: the tensor is corrupt, has another length, or a value that is not
        positive and finite.
    """
    t = next(t for t in self.reader.tensors if t.name == name)
    try:
      values = dequantize(t.data, t.tensor_type, t.name).ravel()
    except UnsupportedModelError:
      raise
    except ValueError as e:
      raise CheckpointFileError(f"{self.path}: tensor {name!r} is corrupt "
                                f"({_one_line(e)})") from None
    if values.size != count:
      raise CheckpointFileError(f"{self.path}: tensor {name!r} has {values.size} values, not "
                                f"one per rotary frequency ({count})")
    if not np.all(np.isfinite(values) & (values > 0)):
      raise CheckpointFileError(
          f"{self.path}: tensor {name!r} holds factors that are not positive and finite")
    return [float(v) for v in values]

  def _gemma3_config(self, common: dict[str, Any], scaling: str) -> dict[str, Any]:
    """The ``Gemma3TextConfig`` fields llama.cpp's gemma3 metadata implies.

    llama.cpp hard-codes what the file does not store: every sixth layer attends globally, the
    sliding layers' RoPE base is 10000, and attention scores are scaled by head_dim ** -0.5
    except in the 62-layer (27B) model, which uses (hidden / heads) ** -0.5.
    """
    layers = common["num_hidden_layers"]
    full = {"rope_type": "default",
            "rope_theta": float(self.get("gemma3.rope.freq_base", 1_000_000.0))}
    if scaling == "linear":
      full = {**full, "rope_type": "linear",
              "factor": float(self._required("gemma3.rope.scaling.factor"))}
    scalar = (common["hidden_size"] // common["num_attention_heads"] if layers == 62
              else common["head_dim"])
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(self._required("gemma3.attention.sliding_window")),
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(layers)],
        "rope_parameters": {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "final_logit_softcapping": self.get("gemma3.final_logit_softcapping"),
    }

  def _gemma_config(self, common: dict[str, Any]) -> dict[str, Any]:
    """The ``GemmaConfig`` / ``Gemma2Config`` fields llama.cpp's gemma / gemma2 metadata implies.

    llama.cpp hard-codes what the file does not store: a RoPE base of 10000 (the converter writes
    none); Gemma 2's even layers slide, its window defaults to 4096 and its soft-caps to 50
    (attention) and 30 (logits), and its attention scores are scaled by head_dim ** -0.5 except in
    the 46-layer (27B) model, which uses (hidden / heads) ** -0.5.
    """
    arch = self.architecture
    model_type, architecture = _TRANSFORMERS_MODEL[arch]
    config = {
        "model_type": model_type,
        "architectures": [architecture],
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": float(self.get(f"{arch}.rope.freq_base", 10000.0))},
    }
    if arch == "gemma":
      return {**config, "hidden_act": "gelu_pytorch_tanh"}
    layers = common["num_hidden_layers"]
    scalar = (common["hidden_size"] // common["num_attention_heads"] if layers == 46
              else common["head_dim"])
    return {
        **config,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(self.get("gemma2.attention.sliding_window", 4096)),
        "layer_types": list(gemma.modeling.gemma2_layer_types(layers)),
        "attn_logit_softcapping": float(self.get("gemma2.attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(self.get("gemma2.final_logit_softcapping", 30.0)),
    }

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    c = self.config
    rotary_heads = {"q_proj": c["num_attention_heads"], "k_proj": c["num_key_value_heads"]}
    gemma = self.architecture in _GEMMA_ARCHITECTURES
    permuted = self.architecture in _PERMUTED_QK
    for t in self.reader.tensors:
      if t.name == _ROPE_FREQS and "rope_freq_factors" in c:
        continue  # already in the config
      if self.architecture == "phi3" and t.name in _PHI3_ROPE_FACTORS.values():
        continue  # already in the config
      key = hf_key(t.name, self.architecture)
      # GGUF lists ne[0] (the innermost, contiguous axis) first: numpy order is the reverse.
      shape = tuple(int(n) for n in reversed(t.shape))
      try:
        value = dequantize(t.data, t.tensor_type, t.name).reshape(shape)
      except UnsupportedModelError:
        raise
      except ValueError as e:  # a data size that does not fit the stated type and shape
        raise CheckpointFileError(f"{self.path}: tensor {t.name!r} {_type_name(t.tensor_type)} "
                                  f"{shape} is corrupt ({_one_line(e)})") from None
      if gemma and key.endswith("norm.weight"):
        value = value - np.float32(1.0)  # llama.cpp stores Gemma's 1 + weight.
      proj = re.search(r"self_attn\.(q_proj|k_proj)\.", key) if permuted else None
      if proj:
        try:
          value = unpermute_rotary(value, rotary_heads[proj.group(1)])
        except ValueError as e:
          raise CheckpointFileError(
              f"{self.path}: tensor {t.name!r} {shape} does not fit the head count "
              f"({_one_line(e)})") from None
      yield key, value

  def tokenizer(self) -> transformers.PreTrainedTokenizerBase:
    """Builds the file's byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``).

    A Gemma (1, 2 or 3) file's SentencePiece vocabulary (``"llama"``, scores instead of merges)
    is converted by transformers' GGUF tokenizer conversion instead.

    Vocabulary, merges, control / user-defined tokens, special token ids, BOS/EOS insertion and
    the chat template come from the metadata; the pre-tokenizer follows ``tokenizer.ggml.pre``.

    Raises:
      UnsupportedModelError: another tokenizer model, or an unknown pre-tokenizer.
      CheckpointFileError: the vocabulary or merges are missing or malformed.
    """
    kind = self.get("tokenizer.ggml.model")
    # Phi-3's SentencePiece vocabulary too (Phi-4-mini, also phi3, is byte-level BPE).
    if kind == "llama" and self.architecture in (*_GEMMA_ARCHITECTURES, "phi3"):
      return self._converted_tokenizer()
    if kind != "gpt2":
      raise UnsupportedModelError(
          f"{self.path}: tokenizer.ggml.model {kind!r} is not supported; only 'gpt2' "
          "(byte-level BPE) tokenizers are built")
    tokens = self._required("tokenizer.ggml.tokens")
    merges = []
    for merge in self.get("tokenizer.ggml.merges", []):
      pair = merge.split(" ")
      if len(pair) != 2:
        raise CheckpointFileError(f"{self.path}: malformed BPE merge {merge!r}")
      merges.append((pair[0], pair[1]))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
      raise CheckpointFileError(f"{self.path}: tokenizer.ggml.tokens has duplicate entries")

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                          byte_fallback=False))
    tok.pre_tokenizer = self._pre_tokenizer()
    tok.decoder = decoders.ByteLevel()

    token_types = self.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # Added tokens are matched whole in raw text, as llama.cpp does, instead of being BPE-split.
    tok.add_special_tokens([
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, token_types) if kind == _TOKEN_CONTROL])
    tok.add_tokens([
        tokenizers.AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, token_types) if kind == _TOKEN_USER_DEFINED])

    def special(key: str) -> str | None:
      index = self.get(f"tokenizer.ggml.{key}")
      if index is None:
        return None
      if not 0 <= index < len(tokens):
        raise CheckpointFileError(f"{self.path}: tokenizer.ggml.{key} {index} is outside the "
                                  f"vocabulary of {len(tokens)}")
      return tokens[index]

    bos, eos = special("bos_token_id"), special("eos_token_id")
    add_bos = bool(self.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(self.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    steps = [processors.ByteLevel(trim_offsets=False)]
    if add_bos or add_eos:
      def around(seq: str, type_id: int) -> list[str]:
        return ([f"{bos}:{type_id}"] if add_bos else []) + [f"{seq}:{type_id}"] + (
            [f"{eos}:{type_id}"] if add_eos else [])

      steps.append(processors.TemplateProcessing(
          single=around("$A", 0), pair=around("$A", 0) + around("$B", 1),
          special_tokens=list({t: vocab[t] for t, on in ((bos, add_bos), (eos, add_eos))
                               if on}.items())))
    tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=special("unknown_token_id"),
        pad_token=special("padding_token_id"), add_bos_token=add_bos, add_eos_token=add_eos)
    template = self.get("tokenizer.chat_template")
    if template is not None:
      fast.chat_template = template
    return fast

  def _converted_tokenizer(self) -> transformers.PreTrainedTokenizerBase:
    """transformers' GGUF tokenizer for a Gemma (1, 2 or 3) or Phi-3 SentencePiece file, built
    without torch.

    ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` returns a ``GemmaTokenizer`` for a
    gemma2 or gemma3 file (its config's model type maps to that class; transformers reads no
    gemma file, whose vocabulary its conversion treats as Gemma 2's), whose backend is
    ``convert_gguf_tokenizer(*get_gguf_tokenizer(path)[:2])``. ``get_gguf_tokenizer`` reads the
    file with transformers' GGUF reader, which imports torch; ``convert_gguf_tokenizer`` and its
    module do not. So the metadata comes from this file's ``gguf.GGUFReader`` instead
    (``_gguf_tokenizer_fields``), and the rest is transformers' own conversion and class, with
    the tokenizer config (special tokens, ``add_bos_token`` / ``add_eos_token``, chat template)
    passed as ``AutoTokenizer`` passes it.
    """
    # This module imports no torch (nor does the GemmaTokenizer it imports); the package's
    # reader module, which get_gguf_tokenizer imports, does.
    from transformers.integrations.gguf import gguf_tokenizer_mapping as hf_gguf

    architecture, tokenizer_dict, tokenizer_config = self._gguf_tokenizer_fields(hf_gguf)
    try:
      backend, extra = hf_gguf.convert_gguf_tokenizer(architecture, tokenizer_dict)
      # AutoTokenizer gives a phi3 file the plain backend class (transformers has no Phi-3
      # tokenizer class); its conversion rebuilds Phi-3's normalizer.
      tokenizer_class = (transformers.TokenizersBackend if self.architecture == "phi3"
                         else transformers.GemmaTokenizer)
      return tokenizer_class(tokenizer_object=backend, **{**tokenizer_config, **extra})
    except (ValueError, KeyError, TypeError, IndexError) as e:
      raise CheckpointFileError(
          f"{self.path}: cannot build the tokenizer ({_one_line(e)})") from None

  def _gguf_tokenizer_fields(self, hf_gguf: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(architecture, tokenizer_dict, tokenizer_config)`` as transformers' ``get_gguf_tokenizer``
    assembles them (``hf_gguf`` is its module, for ``GGUF_TOKENIZER_MAPPING`` and
    ``_SPECIAL_TOKENS``), from the metadata this file's ``gguf.GGUFReader`` decoded.

    Raises:
      CheckpointFileError: no vocabulary, or a special token id outside it.
    """
    grouped = {
        group: {name: self.get(f"tokenizer.{key}") for key, name in renames.items()
                if f"tokenizer.{key}" in self._fields}
        for group, renames in hf_gguf.GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    tokens = tokenizer_dict.get("tokens")
    if not tokens:
      raise CheckpointFileError(f"{self.path}: GGUF metadata lacks 'tokenizer.ggml.tokens'")

    tokenizer_type = tokenizer_dict.get("tokenizer_type")
    if tokenizer_type == "llama":
      # transformers (after llama.cpp): a SentencePiece vocabulary adds BOS unless it says not to.
      tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer_type == "gemma4":
      tokenizer_config["add_bos_token"] = False

    for name, key in hf_gguf._SPECIAL_TOKENS.items():  # pylint: disable=protected-access
      token_id = self.get(f"tokenizer.ggml.{key}")
      if token_id is not None and not 0 <= token_id < len(tokens):
        raise CheckpointFileError(f"{self.path}: tokenizer.ggml.{key} {token_id} is outside the "
                                  f"vocabulary of {len(tokens)}")
      tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    return self.architecture, tokenizer_dict, tokenizer_config

  def _pre_tokenizer(self) -> pre_tokenizers.PreTokenizer:
    """The split rule ``tokenizer.ggml.pre`` names, followed by the byte-level mapping."""
    if self.get("tokenizer.ggml.add_space_prefix", False):
      raise UnsupportedModelError(f"{self.path}: tokenizer.ggml.add_space_prefix is not "
                                  "supported for a byte-level BPE tokenizer")
    pre = self.get("tokenizer.ggml.pre", "default")
    if pre in _GPT2_PRE:
      return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _SMOLLM_PRE:
      return pre_tokenizers.Sequence([
          pre_tokenizers.Digits(individual_digits=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _SPLIT_PRE:
      return pre_tokenizers.Sequence([
          pre_tokenizers.Split(tokenizers.Regex(_SPLIT_PRE[pre]), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise UnsupportedModelError(
        f"{self.path}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
        f"{', '.join(_GPT2_PRE + _SMOLLM_PRE + tuple(_SPLIT_PRE))}")

  def __str__(self) -> str:
    return str(self.path)

