"""Layer conductance in JAX against Captum's LayerConductance on the same tiny torch ViTs."""

import numpy as np
import parity_util
import pytest
import torch
import transformers

from vlmsel_jax.models import load_pretrained
from vlmsel_jax.selection import conductance

captum_attr = pytest.importorskip("captum.attr")

ATOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8)


def _randomise(model, seed=0):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = name.endswith("weight") and ("norm" in name or "layrnorm" in name)
      p.copy_(torch.randn_like(p) * (0.2 if is_scale else 0.1) + (1.0 if is_scale else 0.0))
  return model.eval()


CASES = {
    # name: (torch model, its encoder blocks, torch embedding of the pixels)
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(**VISION)),
            lambda m: m.layers, lambda m, x: m(pixel_values=x).pooler_output),
    "clip": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
             lambda m: m.encoder.layers, lambda m, x: m(pixel_values=x).pooler_output),
    "dinov2_cls": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8,
        mlp_ratio=2)), lambda m: m.encoder.layer,
        lambda m, x: m(pixel_values=x).last_hidden_state[:, 0]),
}


@pytest.fixture(scope="module", name="models")
def _models(tmp_path_factory):
  out = {}
  for name, (build, _, _) in CASES.items():
    path = tmp_path_factory.mktemp(name)
    model = _randomise(build())
    model.save_pretrained(path)
    out[name] = (model, load_pretrained(path))
  return out


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
@pytest.mark.parametrize("case", list(CASES))
def test_conductance_matches_captum_layer_conductance(models, case, method):
  torch_model, ours = models[case]
  _, blocks, emb = CASES[case]
  x = np.random.RandomState(3).randn(2, 3, 32, 32).astype(np.float32)
  embedding = "cls" if case == "dinov2_cls" else "pooler"
  got = conductance.layer_conductance(ours, x.transpose(0, 2, 3, 1), n_steps=50, method=method,
                                      embedding=embedding)
  assert len(got) == 3

  def forward(px):
    return emb(torch_model, px).norm(dim=-1)

  for i, block in enumerate(blocks(torch_model)):
    ref = captum_attr.LayerConductance(forward, block).attribute(
        torch.tensor(x), baselines=torch.zeros(2, 3, 32, 32), n_steps=50, method=method)
    ref = ref.detach().numpy()
    assert got[i].shape == ref.shape
    np.testing.assert_allclose(np.asarray(got[i]), ref, atol=ATOL, rtol=0,
                               err_msg=f"{case} block {i}")
    # Not a vacuous comparison: the attributions are far from zero.
    assert np.abs(ref).max() > 100 * ATOL


def test_conductance_completeness_on_the_last_block(models):
  """Each block's conductance sums (over units) to F(x) − F(baseline) as the steps grow.

  The left-point path sum converges as O(1/n): here 11% off at n = 200, 2% at 1000, 0.6% at 4000.
  """
  torch_model, ours = models["vit"]
  x = np.random.RandomState(4).randn(1, 32, 32, 3).astype(np.float32)
  cond = conductance.layer_conductance(ours, x, n_steps=4000, method="riemann_trapezoid")
  with torch.no_grad():
    f = lambda px: torch_model(pixel_values=px).pooler_output.norm(dim=-1).item()
    want = f(torch.tensor(x.transpose(0, 3, 1, 2))) - f(torch.zeros(1, 3, 32, 32))
  for c in cond:  # Every block's output carries the whole residual stream: all paths cross it.
    assert float(np.asarray(c).sum()) == pytest.approx(want, rel=1e-2)


def test_block_conductance_is_mean_abs_over_images_and_units(models):
  _, ours = models["clip"]
  x = np.random.RandomState(5).randn(3, 32, 32, 3).astype(np.float32)
  profile = conductance.block_conductance(ours, x, batch_size=2, n_steps=8)
  cond = conductance.layer_conductance(ours, x, n_steps=8)
  want = [np.abs(np.asarray(c, np.float64)).mean() for c in cond]
  np.testing.assert_allclose(profile, want, rtol=1e-6)


def test_alphas_are_captums():
  from captum.attr._utils import approximation_methods as am  # pylint: disable=g-import-not-at-top
  for method in conductance.METHODS:
    want = am.approximation_parameters(method)[1](51)
    np.testing.assert_allclose(conductance.alphas(method, 50), want, atol=1e-7, err_msg=method)


def test_efficientnet_conductance_matches_captum_layer_conductance(tmp_path):
  """Every MBConv block of a random tiny EfficientNet-Lite, against Captum on the torch model."""
  elp = pytest.importorskip("efficientnet_lite_pytorch",
                            reason="needs efficientnet-lite-pytorch (requirements-models.txt)")
  from vlmsel_jax.models import load_torch_checkpoint  # pylint: disable=g-import-not-at-top
  overrides = dict(width_coefficient=0.5, depth_coefficient=0.5, image_size=32)
  torch_model = elp.EfficientNet.from_name("efficientnet-lite0", num_classes=10, **overrides)
  parity_util.randomise_torch_cnn(torch_model)
  path = tmp_path / "lite0.pth"
  torch.save(torch_model.state_dict(), path)
  ours = load_torch_checkpoint(path, {"model_type": "efficientnet_lite", "variant": "lite0",
                                      "num_classes": 10, **overrides})
  x = np.random.RandomState(3).randn(2, 3, 32, 32).astype(np.float32)
  got = conductance.layer_conductance(ours, x.transpose(0, 2, 3, 1), n_steps=20)
  blocks = list(torch_model._blocks)  # pylint: disable=protected-access
  assert len(got) == len(blocks) == len(ours.blocks)

  def forward(px):  # The pooled final feature map, what the classifier reads.
    return torch_model.extract_features(px).mean(dim=(2, 3)).norm(dim=-1)

  for i, block in enumerate(blocks):
    ref = captum_attr.LayerConductance(forward, block).attribute(
        torch.tensor(x), baselines=torch.zeros(2, 3, 32, 32), n_steps=20)
    ref = ref.detach().numpy().transpose(0, 2, 3, 1)
    assert got[i].shape == ref.shape
    np.testing.assert_allclose(np.asarray(got[i]), ref, atol=ATOL, rtol=0,
                               err_msg=f"block {i}")
    # Spread over many small units, the values are small: also agree relative to their size.
    err = float(np.abs(np.asarray(got[i]) - ref).max())
    assert err <= 1e-3 * float(np.abs(ref).max()), (i, err, float(np.abs(ref).max()))
  with pytest.raises(ValueError, match="a convolutional tower has no CLS token"):
    conductance.layer_conductance(ours, x.transpose(0, 2, 3, 1), n_steps=2, embedding="cls")


@pytest.mark.parametrize("embedding", ["pooler", "mean"])
def test_convnext_conductance_matches_captum_layer_conductance(tmp_path, embedding):
  """Every ConvNeXt block of every stage of a random tiny transformers ConvNextModel, against
  Captum on the torch model; the image embedding its pooled output or the last map's mean."""
  torch.manual_seed(0)
  torch_model = _randomise(transformers.ConvNextModel(transformers.ConvNextConfig(
      hidden_sizes=[8, 16, 24], depths=[1, 2, 1], num_stages=3, image_size=32)))
  torch_model.save_pretrained(tmp_path)
  ours = load_pretrained(tmp_path)
  x = np.random.RandomState(3).randn(2, 3, 32, 32).astype(np.float32)
  got = conductance.layer_conductance(ours, x.transpose(0, 2, 3, 1), n_steps=20,
                                      embedding=embedding)
  blocks = [layer for stage in torch_model.encoder.stages for layer in stage.layers]
  assert len(got) == len(blocks) == ours.num_blocks == 4

  def forward(px):
    out = torch_model(pixel_values=px)
    pooled = (out.pooler_output if embedding == "pooler"
              else out.last_hidden_state.mean(dim=(2, 3)))
    return pooled.norm(dim=-1)

  for i, block in enumerate(blocks):
    ref = captum_attr.LayerConductance(forward, block).attribute(
        torch.tensor(x), baselines=torch.zeros(2, 3, 32, 32), n_steps=20)
    ref = ref.detach().numpy().transpose(0, 2, 3, 1)
    assert got[i].shape == ref.shape
    err = float(np.abs(np.asarray(got[i]) - ref).max())
    assert err <= 1e-3 * float(np.abs(ref).max()), (i, err, float(np.abs(ref).max()))
  profile = conductance.block_conductance(ours, x.transpose(0, 2, 3, 1), n_steps=20,
                                          embedding=embedding)
  np.testing.assert_allclose(profile, [np.abs(np.asarray(c)).mean() for c in got], rtol=1e-5)
  assert conductance.supports(ours)
  with pytest.raises(ValueError, match="a convolutional tower has no CLS token"):
    conductance.layer_conductance(ours, x.transpose(0, 2, 3, 1), n_steps=2, embedding="cls")
