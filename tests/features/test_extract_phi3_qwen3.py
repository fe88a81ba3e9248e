"""Phi-3 and Qwen3 LLMs through feature extraction and as Hugging Face Hub ids.

``extraction.extract`` (what the extract and score binaries run) writes each family's text bank
from a saved directory; the bank must equal transformers' torch ``hidden_states[-2]`` mean-pooled
over each caption's non-special tokens (float32, 1e-4 relative to the features' scale). The same
directories, put into a Hub cache the test builds (``hub_fixtures.add_snapshot``), resolve by Hub
id offline to text models with the directory's weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from huggingface_hub import constants as hf_constants
from PIL import Image

import decoder_family_util as util
import hub_fixtures as hf
import vlm_fixtures as fx
from vlmsel_jax import zoo
from vlmsel_jax.features import extraction
from vlmsel_jax.features import feature_bank as fb
from vlmsel_jax.models import loading
from vlmsel_jax.models.phi3 import Phi3
from vlmsel_jax.models.qwen3 import Qwen3

COMMON = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "phi3": (Phi3, lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **COMMON, pad_token_id=0, bos_token_id=0, eos_token_id=3,
        original_max_position_embeddings=4,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5, "short_factor": [1.0, 1.2],
                         "long_factor": [2.0, 4.0]}))),
    "qwen3": (Qwen3, lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **COMMON, head_dim=16, tie_word_embeddings=True))),
}
CAPTIONS = ["a red square", "the blue square is a square .", "what colour is it ?",
            "a green shape", "yellow", "an assistant square"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Both families saved with the tests' tokenizer, a 6-image caption set, and their banks."""
  root = tmp_path_factory.mktemp("phi3_qwen3")
  torch_models = {}
  for i, (name, (_, build)) in enumerate(FAMILIES.items()):
    torch.manual_seed(i)
    torch_models[name] = util.save_with_tokenizer(util.randomise(build()), root / name)
  data = root / "data"
  data.mkdir()
  with open(data / "captions.jsonl", "w") as f:
    for i, caption in enumerate(CAPTIONS):
      Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(data / f"{i}.png")
      f.write(json.dumps({"id": i, "image": f"{i}.png", "caption": caption}) + "\n")
  out = root / "banks"
  extraction.extract([str(root / name) for name in FAMILIES], str(data), str(out),
                     options=extraction.ExtractOptions(batch_size=4, progress=False))
  return {"root": root, "out": out, "torch": torch_models}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_text_bank_matches_torch_second_to_last_mean(saved, name):
  bank = fb.load_bank(str(saved["out"] / f"{name}.safetensors"))
  tokenizer = fx.tiny_tokenizer()
  enc = tokenizer(CAPTIONS, padding=True, return_special_tokens_mask=True, return_tensors="pt")
  with torch.no_grad():
    h = saved["torch"][name](input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                             output_hidden_states=True).hidden_states[-2].numpy()
  mask = (enc.attention_mask * (1 - enc.special_tokens_mask)).numpy()
  want = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  assert bank.features.shape == want.shape == (len(CAPTIONS), COMMON["hidden_size"])
  err = np.abs(bank.features - want).max()
  assert err <= util.F32_RTOL * max(1.0, np.abs(want).max()), err


def test_hub_ids_load_both_families(saved, tmp_path, monkeypatch):
  cache = tmp_path / "hub"
  for name in FAMILIES:
    hf.add_snapshot(cache, f"vlmsel-test/{name}-tiny", saved["root"] / name)
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
  for name, (cls, _) in FAMILIES.items():
    resolved = zoo.resolve(f"vlmsel-test/{name}-tiny")
    assert resolved.kind == "text" and resolved.hub is not None
    model = resolved.load().model
    assert isinstance(model, cls)
    ours = nnx.to_flat_state(nnx.state(model, nnx.Param))
    ref = nnx.to_flat_state(nnx.state(loading.load_pretrained(saved["root"] / name), nnx.Param))
    assert [k for k, _ in ours] == [k for k, _ in ref]
    for (_, a), (_, b) in zip(ours, ref):
      np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
