"""The generic checkpoint loader: error reporting, sources and tied embeddings."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from vlmsel_jax.models import (
    CheckpointError,
    CheckpointFileError,
    HFDirectory,
    UnsupportedModelError,
    load_model,
    load_pretrained,
)
from vlmsel_jax.models.loading import supported_architectures, supported_model_types

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64)
IDS = np.arange(12, dtype=np.int32).reshape(2, 6)


def _save(path, tie=False, **save_kwargs):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(**TINY, tie_word_embeddings=tie)
  transformers.LlamaForCausalLM(config).save_pretrained(path, **save_kwargs)
  return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A saved tiny untied Llama, never modified (tests copy it first)."""
  return _save(tmp_path_factory.mktemp("llama"))


@pytest.fixture
def ckpt(checkpoint, tmp_path):
  """A private copy of ``checkpoint`` a test may edit."""
  return shutil.copytree(checkpoint, tmp_path / "ckpt")


def _edit_weights(path, edit):
  """Rewrites ``path/model.safetensors`` with ``edit(dict of tensors)`` applied."""
  file = path / "model.safetensors"
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def _edit_config(path, **changes):
  file = path / "config.json"
  config = json.loads(file.read_text())
  config.update(changes)
  file.write_text(json.dumps(config))


def _logits(model):
  return np.asarray(nnx.jit(lambda m, x: m(x).logits)(model, IDS))


def test_loading_missing_key(ckpt):
  _edit_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError,
                     match=r"missing parameter layers\.1\.mlp\.up_proj\.kernel \(32, 64\)"):
    load_pretrained(ckpt)


def test_loading_unexpected_key(ckpt):
  _edit_weights(ckpt, lambda t: t.update(
      {"model.layers.0.self_attn.rotary.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError,
                     match=r"unexpected key 'model\.layers\.0\.self_attn\.rotary\.weight' \(3,\)"):
    load_pretrained(ckpt)


def test_loading_key_for_a_parameter_the_config_lacks(ckpt):
  # attention_bias is false in config.json, so the model has no q_proj bias to put this in.
  _edit_weights(ckpt, lambda t: t.update(
      {"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
  with pytest.raises(CheckpointError, match=r"maps to layers\.0\.attn\.q_proj\.bias, which this "
                     r"model config does not have"):
    load_pretrained(ckpt)


def test_loading_wrong_shape(ckpt):
  _edit_weights(ckpt, lambda t: t.update({"model.norm.weight": np.ones(16, np.float32)}))
  with pytest.raises(CheckpointError, match=r"shape mismatch for 'model\.norm\.weight': checkpoint "
                     r"\(16,\) gives final_norm\.scale \(16,\), the model needs \(32,\)"):
    load_pretrained(ckpt)


def test_loading_reports_every_problem_at_once(ckpt):
  def edit(t):
    t.pop("model.layers.1.mlp.up_proj.weight")
    t["model.layers.0.self_attn.rotary.weight"] = np.zeros(3, np.float32)
    t["model.layers.0.mlp.down_proj.weight"] = np.zeros((64, 32), np.float32)  # transposed

  _edit_weights(ckpt, edit)
  with pytest.raises(CheckpointError, match=r"3 problem\(s\) loading the checkpoint") as info:
    load_pretrained(ckpt)
  message = str(info.value)
  assert str(ckpt) in message
  assert "missing parameter layers.1.mlp.up_proj.kernel" in message
  assert "unexpected key 'model.layers.0.self_attn.rotary.weight'" in message
  assert "shape mismatch for 'model.layers.0.mlp.down_proj.weight'" in message
  assert len(info.value.problems) == 3


def test_loading_truncated_safetensors(ckpt):
  file = ckpt / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[:len(data) - 100])
  with pytest.raises(CheckpointFileError,
                     match=r"model\.safetensors: unreadable safetensors file, truncated or corrupt"
                     ) as info:
    load_pretrained(ckpt)
  assert "\n" not in str(info.value)


def test_loading_missing_weights_file(ckpt):
  (ckpt / "model.safetensors").unlink()
  with pytest.raises(CheckpointFileError, match=r"model\.safetensors: no such file"):
    load_pretrained(ckpt)


def test_loading_missing_config(ckpt):
  (ckpt / "config.json").unlink()
  with pytest.raises(CheckpointFileError, match=r"config\.json: no such file"):
    load_pretrained(ckpt)


def test_loading_missing_shard(tmp_path):
  _save(tmp_path, max_shard_size="20KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  shard = sorted(set(index["weight_map"].values()))[-1]
  (tmp_path / shard).unlink()
  with pytest.raises(CheckpointFileError,
                     match=rf"{shard}: shard listed in model\.safetensors\.index\.json"):
    load_pretrained(tmp_path)


# Every family's names, from its own tuple: the message must list exactly what FAMILIES loads.
_KNOWN_TYPES = {"bert", "clip", "convnext", "dinov2", "efficientnet_lite", "gemma", "gemma2",
                "gemma3_text", "internvl_vision", "llama", "mistral", "phi3", "qwen2", "qwen3",
                "siglip", "vit"}


def test_loading_unsupported_model_type(ckpt):
  _edit_config(ckpt, model_type="gpt2", architectures=["GPT2LMHeadModel"])
  listed = supported_model_types()
  assert _KNOWN_TYPES <= set(listed) and listed == sorted(set(listed))
  with pytest.raises(UnsupportedModelError,
                     match=r"model_type 'gpt2' \(architectures \['GPT2LMHeadModel'\]\) is not "
                     r"supported; supported model_type: " + re.escape(", ".join(listed)) + "$"):
    load_pretrained(ckpt)


def test_loading_unsupported_architecture(ckpt):
  _edit_config(ckpt, architectures=["LlamaForSequenceClassification"])
  listed = supported_architectures()
  assert {"LlamaForCausalLM", "Phi3ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
          "Gemma2ForCausalLM", "ConvNextModel", "CLIPVisionModel"} <= set(listed)
  with pytest.raises(UnsupportedModelError,
                     match=r"architectures \['LlamaForSequenceClassification'\] are not "
                     r"supported; supported architectures: " + re.escape(", ".join(listed)) + "$"):
    load_pretrained(ckpt)


def test_loading_unsupported_dtype(checkpoint):
  with pytest.raises(ValueError, match=r"dtype 'float16' is not supported"):
    load_pretrained(checkpoint, dtype="float16")


def test_loading_from_any_key_array_source(checkpoint):
  """load_model takes plain (key, array) pairs, the interface other formats will implement."""
  source = HFDirectory(checkpoint)
  pairs = {k: np.array(v) for k, v in source}
  reference = _logits(load_pretrained(checkpoint))
  model = load_model(source.config, reversed(list(pairs.items())), source="in-memory")
  np.testing.assert_array_equal(_logits(model), reference)


def test_loading_tied_ignores_a_saved_lm_head(tmp_path):
  _save(tmp_path, tie=True)
  reference = _logits(load_pretrained(tmp_path))
  # Some hub checkpoints store the tied head anyway; like transformers, the embedding wins.
  _edit_weights(tmp_path, lambda t: t.update(
      {"lm_head.weight": np.full((64, 32), 7.0, np.float32)}))
  model = load_pretrained(tmp_path)
  assert model.lm_head is None
  np.testing.assert_array_equal(_logits(model), reference)


def test_loading_untied_requires_lm_head(ckpt):
  _edit_weights(ckpt, lambda t: t.pop("lm_head.weight"))
  with pytest.raises(CheckpointError, match=r"missing parameter lm_head\.kernel \(32, 64\)"):
    load_pretrained(ckpt)


def test_loading_duplicate_key(checkpoint):
  source = HFDirectory(checkpoint)
  pairs = list(source)
  with pytest.raises(CheckpointError, match=r"duplicate key 'model\.norm\.weight': "
                     r"final_norm\.scale was already given a tensor"):
    load_model(source.config, pairs + [p for p in pairs if p[0] == "model.norm.weight"])
