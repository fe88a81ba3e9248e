"""The two attention paths agree, and rematerialized layers change no loss or gradient.

Every family's attention runs either its own einsum (the CPU-tuned path) or
``jax.nn.dot_product_attention`` (the fused path of GPUs and TPUs); ``attention_impl`` picks one
(``vlmsel_jax.models.attention``). On CPU both run here and must give equal outputs within
``TOL`` (float32) on random inputs: causal and padding masks, sliding windows, grouped-query
attention, the KV-cached prefill / decode path, bidirectional towers with and without padding.
``remat`` wraps each layer in ``nnx.remat``; the loss and gradients of a tiny VLM must not move.
Tiny random models built directly in NNX; CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlmsel_jax.models import attention
from vlmsel_jax.models.bert import modeling as bert
from vlmsel_jax.models.gemma import modeling as gemma
from vlmsel_jax.models.gemma3 import modeling as gemma3
from vlmsel_jax.models.llama import modeling as llama
from vlmsel_jax.models.phi3 import modeling as phi3
from vlmsel_jax.models.qwen3 import modeling as qwen3
from vlmsel_jax.models.vit import modeling as vit
from vlmsel_jax.models.vlm import modeling as vlm

# float32: both paths compute the same scores, softmax and sums, in different orders at most.
TOL = dict(rtol=1e-5, atol=1e-5)
PATHS = ("einsum", "fused")


def _llama_config(**overrides) -> llama.LlamaConfig:
  base = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
              num_kv_heads=2, head_dim=8, qkv_bias=True, sliding_window=3,
              layer_types=("sliding_attention", "full_attention", "sliding_attention"))
  base.update(overrides)
  return llama.LlamaConfig(**base)


def _gemma3_config(**overrides) -> gemma3.Gemma3Config:
  base = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
              num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=3,
              layer_types=("sliding_attention", "full_attention", "sliding_attention"),
              final_logit_softcapping=5.0)
  base.update(overrides)
  return gemma3.Gemma3Config(**base)


def _gemma_config(**overrides) -> gemma.GemmaConfig:
  """Gemma 1: multi-query, every layer global."""
  base = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
              num_kv_heads=1, head_dim=16)
  base.update(overrides)
  return gemma.GemmaConfig(**base)


def _gemma2_config(**overrides) -> gemma.GemmaConfig:
  """Gemma 2: four norms, local / global layers, soft-capped scores (always the einsum path, the
  fused one cannot cap) and logits."""
  base = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=3,
              sandwich_norms=True, attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
              model_type="gemma2")
  base.update(overrides)
  return gemma.GemmaConfig(**base)


def _phi3_config(**overrides) -> phi3.Phi3Config:
  """Half-rotary heads, a 3-token window on every layer, and longrope whose original context (4)
  the tests' sequences exceed, so the long factors and the attention factor are in play."""
  base = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=8, rotary_dim=4, sliding_window=3,
              layer_types=("sliding_attention",) * 2,
              long_rope=phi3.LongRopeScaling(short_factor=(1.0, 1.5), long_factor=(2.0, 5.0),
                                             original_max_position_embeddings=4,
                                             attention_factor=1.2))
  base.update(overrides)
  return phi3.Phi3Config(**base)


def _qwen3_config(**overrides) -> qwen3.Qwen3Config:
  base = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, qkv_bias=True, o_bias=True, sliding_window=3,
              layer_types=("full_attention", "sliding_attention"))
  base.update(overrides)
  return qwen3.Qwen3Config(**base)


def _randomize(model: nnx.Module, seed: int, scale: float = 0.3) -> nnx.Module:
  """Every parameter random (norm scales too, so Gemma's zero-initialised norms do something)."""
  rng = np.random.default_rng(seed)
  for _, param in nnx.iter_graph(model):
    if isinstance(param, nnx.Param):
      param[...] = jnp.asarray(rng.normal(scale=scale, size=param.shape), param.dtype)
  return model


def _allclose(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


def _both_paths(model: nnx.Module, run):
  """``run(model)`` with the einsum path, then with the fused path."""
  out = []
  for impl in PATHS:
    attention.configure(model, attention_impl=impl)
    out.append(run(model))
  return out


# --- the selection point -----------------------------------------------------------------------

def test_auto_is_fused_on_accelerators_and_einsum_on_cpu():
  assert attention.resolve("auto", "cpu") == "einsum"
  assert attention.resolve("auto", "gpu") == "fused"
  assert attention.resolve("auto", "tpu") == "fused"
  assert attention.resolve("fused", "cpu") == "fused"
  assert attention.resolve("einsum", "tpu") == "einsum"
  assert attention.resolve("auto") == ("einsum" if jax.default_backend() == "cpu" else "fused")


@pytest.mark.parametrize("make", [
    lambda: _llama_config(attention_impl="flash"),
    lambda: _gemma3_config(attention_impl="flash"),
    lambda: vit.VitConfig(variant="vit", hidden_size=8, intermediate_size=8, num_layers=1,
                          num_heads=2, image_size=8, patch_size=4, attention_impl="flash"),
    lambda: bert.BertConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                            num_heads=2, attention_impl="flash"),
    lambda: vlm.VLMConfig(attention_impl="flash"),
])
def test_configs_refuse_an_unknown_attention_impl(make):
  with pytest.raises(ValueError, match="attention_impl 'flash'"):
    make()


def test_configure_sets_modules_and_configs():
  model = llama.Llama(_llama_config(), rngs=nnx.Rngs(0))
  attention.configure(model, attention_impl="fused", remat=True)
  assert model.config.attention_impl == "fused" and model.config.remat
  assert all(layer.attn.attention_impl == "fused" for layer in model.layers)
  attention.configure(model, remat=False)
  assert model.config.attention_impl == "fused" and not model.config.remat
  with pytest.raises(ValueError, match="attention_impl"):
    attention.configure(model, attention_impl="flash")


# --- decoder attention on random inputs --------------------------------------------------------

@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("kind", ["full_attention", "sliding_attention"])
def test_decoder_attention_paths_agree(num_kv_heads, kind):
  c = _llama_config(num_kv_heads=num_kv_heads, num_layers=1, layer_types=(kind,))
  attn = llama.Attention(c, dtype=jnp.float32, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  b, t, dh = 3, 7, c.head_dim
  q = jnp.asarray(rng.normal(scale=2.0, size=(b, t, c.num_heads, dh)), jnp.float32)
  k = jnp.asarray(rng.normal(scale=2.0, size=(b, t, num_kv_heads, dh)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, num_kv_heads, dh)), jnp.float32)
  # Right padding, left padding (its first queries see no key at all) and none.
  padding = jnp.asarray([[1] * 5 + [0] * 2, [0] * 3 + [1] * 4, [1] * 7])
  mask = llama.attention_mask_for(kind, t, padding, c.sliding_window)
  # One decode step: row r's single query at slot index[r] over 7 cache slots.
  index = jnp.asarray([5, 2, 6])
  step_mask = llama.visible_keys(index[:, None], jnp.arange(t)[None, :], kind,
                                 c.sliding_window)[:, None, None, None, :]
  einsum, fused = _both_paths(attn, lambda a: (
      a._attend(q, k, v, mask), a._attend(q[:, :1], k, v, step_mask, causal=False)))
  _allclose(einsum, fused)


def test_fused_attention_matches_a_reference():
  """The fused path against attention written out in numpy, grouped queries and a mask."""
  rng = np.random.default_rng(2)
  q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, 6, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, 6, 2, 8)).astype(np.float32)
  mask = rng.random((2, 1, 5, 6)) < 0.7
  mask[..., 0] = True
  out = np.asarray(attention.fused(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                   jnp.asarray(mask), scale=0.3))
  kr, vr = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # Query head h reads kv head h // 2.
  scores = np.einsum("bthd,bshd->bhts", q, kr) * 0.3
  scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bhts,bshd->bthd", probs, vr), **TOL)


def test_each_family_takes_the_path_it_is_set_to(monkeypatch):
  calls = []
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  pixels = jnp.zeros((1, 8, 8, 3))
  ids = jnp.zeros((1, 4), jnp.int32)
  runs = [
      (llama.Llama(_llama_config(), rngs=nnx.Rngs(0)), lambda m: m(ids)),
      (gemma3.Gemma3(_gemma3_config(), rngs=nnx.Rngs(0)), lambda m: m(ids)),
      (vit.Vit(vit.VitConfig(variant="siglip", hidden_size=8, intermediate_size=8, num_layers=2,
                             num_heads=2, image_size=8, patch_size=4), rngs=nnx.Rngs(0)),
       lambda m: m(pixels)),
      (bert.Bert(bert.BertConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2,
                                 num_heads=2), rngs=nnx.Rngs(0)), lambda m: m(ids)),
  ]
  for model, run in runs:
    for impl, expected in (("einsum", 0), ("fused", 3 if isinstance(model, vit.Vit) else None)):
      calls.clear()
      run(attention.configure(model, attention_impl=impl))
      # One call per layer (3 decoder layers, 2 encoder layers; SigLIP's pooling head is one more).
      assert len(calls) == (expected if expected is not None else len(model.layers))


# --- whole decoders: forward, prefill and decode -----------------------------------------------

DECODERS = {
    "llama": lambda: _randomize(llama.Llama(_llama_config(), rngs=nnx.Rngs(0)), 3),
    "gemma3": lambda: _randomize(gemma3.Gemma3(_gemma3_config(), rngs=nnx.Rngs(0)), 4),
    "gemma": lambda: _randomize(gemma.Gemma(_gemma_config(), rngs=nnx.Rngs(0)), 17),
    "gemma2": lambda: _randomize(gemma.Gemma(_gemma2_config(), rngs=nnx.Rngs(0)), 18),
    "phi3": lambda: _randomize(phi3.Phi3(_phi3_config(), rngs=nnx.Rngs(0)), 15),
    "qwen3": lambda: _randomize(qwen3.Qwen3(_qwen3_config(), rngs=nnx.Rngs(0)), 16),
}


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_hidden_states_agree(family):
  model = DECODERS[family]()
  rng = np.random.default_rng(5)
  ids = jnp.asarray(rng.integers(0, 40, (3, 9)))
  padding = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3, [0] * 2 + [1] * 7])
  einsum, fused = _both_paths(model, lambda m: m(ids, padding))
  _allclose(einsum.hidden_states, fused.hidden_states)
  _allclose(einsum.logits, fused.logits)


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_prefill_and_decode_agree(family):
  model = DECODERS[family]()
  rng = np.random.default_rng(6)
  ids = jnp.asarray(rng.integers(0, 40, (2, 8)))
  padding = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3])  # Right-padded prompts.
  lengths = jnp.asarray([8, 5])
  # Room for three generated tokens past the longest prompt.
  ids = jnp.concatenate([ids, jnp.zeros((2, 3), ids.dtype)], axis=1)
  padding = jnp.concatenate([padding, jnp.zeros((2, 3), padding.dtype)], axis=1)

  def generate(m):
    logits, cache = m.prefill(ids, padding, last=lengths - 1)
    steps = [logits]
    index = lengths
    for _ in range(3):
      logits, cache = m.decode(jnp.argmax(logits, axis=-1), index, cache)
      steps.append(logits)
      index = index + 1
    return steps, cache

  einsum, fused = _both_paths(model, generate)
  _allclose(einsum, fused)


# --- vision towers and BERT --------------------------------------------------------------------

VIT_VARIANTS = {
    "clip": dict(variant="clip", hidden_act="quick_gelu"),
    "siglip": dict(variant="siglip", hidden_act="gelu_pytorch_tanh", pooler=True),
    "dinov2": dict(variant="dinov2", num_register_tokens=2, swiglu=True),
    "vit": dict(variant="vit", pooler=True),
}


@pytest.mark.parametrize("variant", sorted(VIT_VARIANTS))
def test_vision_tower_paths_agree(variant):
  config = vit.VitConfig(hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                         image_size=16, patch_size=4, **VIT_VARIANTS[variant])
  model = _randomize(vit.Vit(config, rngs=nnx.Rngs(0)), 7, scale=0.2)
  pixels = jnp.asarray(np.random.default_rng(8).normal(size=(2, 16, 16, 3)), jnp.float32)
  einsum, fused = _both_paths(model, lambda m: m(pixels))
  _allclose(einsum.hidden_states, fused.hidden_states)
  _allclose(einsum.last_hidden_state, fused.last_hidden_state)
  _allclose(einsum.pooler_output, fused.pooler_output)


def test_bert_paths_agree_with_padding():
  config = bert.BertConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_layers=2,
                           num_heads=4, max_position_embeddings=16)
  model = _randomize(bert.Bert(config, rngs=nnx.Rngs(0)), 9)
  rng = np.random.default_rng(10)
  ids = jnp.asarray(rng.integers(0, 30, (3, 7)))
  # A padded row, an unpadded one and one with no real token (it averages every key).
  mask = jnp.asarray([[1] * 4 + [0] * 3, [1] * 7, [0] * 7])
  einsum, fused = _both_paths(model, lambda m: m(ids, mask))
  _allclose(einsum.hidden_states, fused.hidden_states)
  _allclose(einsum.pooler_output, fused.pooler_output)


# --- rematerialization -------------------------------------------------------------------------

def _tiny_vlm(remat: bool, llm_family: str = "llama") -> vlm.VLM:
  tower = _randomize(vit.Vit(vit.VitConfig(
      variant="vit", hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
      image_size=16, patch_size=4), rngs=nnx.Rngs(0)), 11, scale=0.2)
  llm = DECODERS[llm_family]()
  return vlm.VLM(tower, llm, vlm.VLMConfig(vision_layer=-1, remat=remat),
                 image_size=(16, 16), rngs=nnx.Rngs(1))


def _primitive_names(jaxpr) -> set[str]:
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= _primitive_names(sub)
  return names


@pytest.mark.parametrize("llm_family", sorted(DECODERS))
def test_remat_changes_neither_loss_nor_gradients(llm_family):
  rng = np.random.default_rng(12)
  pixels = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  seq = 24  # 16 image tokens (a 4 x 4 grid), then text.
  ids = jnp.asarray(rng.integers(0, 40, (2, seq)))
  padding = jnp.asarray([[1] * seq, [1] * 20 + [0] * 4])
  image_mask = jnp.zeros((2, seq), bool).at[:, 2:18].set(True)
  targets = jnp.roll(ids, -1, axis=1)

  results, names = {}, {}
  for remat in (False, True):
    model = _tiny_vlm(remat, llm_family)
    assert model.llm.config.remat is remat and model.tower.config.remat is remat
    graphdef, state = nnx.split(model)

    def loss_fn(state, graphdef=graphdef):
      logits = nnx.merge(graphdef, state)(pixels, ids, padding, image_mask)
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
      return jnp.sum(nll * padding) / jnp.sum(padding)

    value_and_grad = jax.value_and_grad(loss_fn)
    names[remat] = _primitive_names(jax.make_jaxpr(value_and_grad)(state).jaxpr)
    results[remat] = jax.jit(value_and_grad)(state)

  assert not any("remat" in n or "checkpoint" in n for n in names[False])
  assert any("remat" in n or "checkpoint" in n for n in names[True])
  (loss, grads), (loss_remat, grads_remat) = results[False], results[True]
  np.testing.assert_allclose(float(loss_remat), float(loss), rtol=1e-6, atol=1e-6)
  flat, flat_remat = jax.tree.leaves(grads), jax.tree.leaves(grads_remat)
  assert len(flat) == len(flat_remat) and any(np.abs(np.asarray(g)).max() > 0 for g in flat)
  for g, g_remat in zip(flat, flat_remat):
    np.testing.assert_allclose(np.asarray(g_remat), np.asarray(g), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["vit", "bert"])
def test_encoder_remat_changes_no_gradient(family):
  if family == "vit":
    config = vit.VitConfig(variant="vit", hidden_size=16, intermediate_size=24, num_layers=2,
                           num_heads=2, image_size=16, patch_size=4)
    inputs = (jnp.asarray(np.random.default_rng(13).normal(size=(2, 16, 16, 3)), jnp.float32),)
    build = lambda c: vit.Vit(c, rngs=nnx.Rngs(0))
  else:
    config = bert.BertConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_layers=2,
                             num_heads=4, max_position_embeddings=16)
    inputs = (jnp.asarray(np.random.default_rng(13).integers(0, 30, (2, 7))),
              jnp.asarray([[1] * 7, [1] * 3 + [0] * 4]))
    build = lambda c: bert.Bert(c, rngs=nnx.Rngs(0))
  grads = []
  for remat in (False, True):
    graphdef, state = nnx.split(_randomize(build(dataclasses.replace(config, remat=remat)), 14))
    loss = lambda s, g=graphdef: jnp.sum(nnx.merge(g, s)(*inputs).last_hidden_state ** 2)
    grads.append(jax.jit(jax.grad(loss))(state))
  for g, g_remat in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
    np.testing.assert_allclose(np.asarray(g_remat), np.asarray(g), rtol=1e-6, atol=1e-6)
