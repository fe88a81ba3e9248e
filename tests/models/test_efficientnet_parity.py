"""Parity of the NNX EfficientNet-Lite with the ``efficientnet_lite_pytorch`` torch model.

Random-weight cases build the package's torch model (every weight and BatchNorm running statistic
randomised), save its state dict as a ``.pth``, load that with ours and compare the logits and
every stage output. Real-weight cases run the ImageNet weights of the ``efficientnet-liteN-pytorch
-model`` packages on scikit-image's sample photos. Torch takes NCHW images, ours NHWC.
"""

# The torch reference's internals (_blocks, _block_args, ...) are what the tests compare against.
# pylint: disable=protected-access

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import parity_util
import pytest
import torch
from flax import nnx

from vlmsel_jax.models import (
    CheckpointError,
    CheckpointFileError,
    TorchStateDict,
    load_model,
    load_torch_checkpoint,
    read_torch_state_dict,
)
from vlmsel_jax.models.efficientnet import (
    VARIANTS,
    DepthwiseConv,
    EfficientNetConfig,
    EfficientNetLite,
    preprocess,
    preprocess_info,
    select_features,
)
from vlmsel_jax.zoo.packages import load_lite, weights_file

efficientnet_lite_pytorch = pytest.importorskip(
    "efficientnet_lite_pytorch",
    reason="the torch reference needs efficientnet-lite-pytorch (requirements-models.txt)")
TorchEfficientNet = efficientnet_lite_pytorch.EfficientNet

F32_ATOL = 1e-4
# Real weights, real photos: logits reach ~15, float32 summation order differs between backends.
REAL_LOGITS_ATOL = 1e-3
BATCH = 2
NUM_CLASSES = 10
SAMPLE_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
# ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = range(281, 286)

# name -> (variant, overrides of the package's global params, which ours mirror). The odd 65 px
# size makes every stride-2 "SAME" convolution pad unevenly.
CASES = {
    "lite0_tiny": ("lite0", dict(width_coefficient=0.5, depth_coefficient=0.5, image_size=64)),
    "lite2_odd_size": ("lite2", dict(image_size=65)),
}


def _torch_model(case: str) -> torch.nn.Module:
  variant, overrides = CASES[case]
  return parity_util.randomise_torch_cnn(TorchEfficientNet.from_name(f"efficientnet-{variant}",
                                                num_classes=NUM_CLASSES, **overrides))


def _config(case: str) -> dict:
  variant, overrides = CASES[case]
  return {"model_type": "efficientnet_lite", "variant": variant, "num_classes": NUM_CLASSES,
          **overrides}


def _pixels(size: int, seed: int = 1) -> np.ndarray:
  """A random NCHW float32 batch, the layout torch takes."""
  return np.random.RandomState(seed).randn(BATCH, 3, size, size).astype(np.float32)


def _nhwc(x: np.ndarray) -> np.ndarray:
  return x.transpose(0, 2, 3, 1)


def _torch_outputs(model: torch.nn.Module, x: np.ndarray) -> dict:
  """Logits and the NHWC output of every stage, then of the head, of the torch model.

  Stages are found from the torch model itself: a stage is a run of blocks with the same output
  channel count (the seven stages' counts all differ).
  """
  stage_outputs = {}
  hooks = []
  blocks = list(model._blocks)
  widths = [block._block_args.output_filters for block in blocks] + [None]
  for i, block in enumerate(blocks):
    if widths[i + 1] != widths[i]:
      hooks.append(block.register_forward_hook(
          lambda _m, _i, out, i=i: stage_outputs.__setitem__(i, out.numpy())))
  with torch.no_grad():
    xt = torch.tensor(x)
    logits = model(xt).numpy()
    head = model.extract_features(xt).numpy()
  for h in hooks:
    h.remove()
  hidden = [stage_outputs[i] for i in sorted(stage_outputs)] + [head]
  return {"logits": logits, "hidden_states": [h.transpose(0, 2, 3, 1) for h in hidden]}


_forward = nnx.jit(lambda model, x: model(x))
_select = jax.jit(select_features, static_argnames=("layer", "pooling"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """checkpoint(case) -> (.pth path, torch model): saved once per module, never modified."""

  @functools.cache
  def make(case):
    model = _torch_model(case)
    path = tmp_path_factory.mktemp(case) / f"{case}.pth"
    torch.save(model.state_dict(), path)
    return path, model

  return make


@pytest.mark.parametrize("case", list(CASES))
def test_efficientnet_parity_random_weights_logits_and_stages(checkpoint, case):
  path, torch_model = checkpoint(case)
  model = load_torch_checkpoint(path, _config(case))
  x = _pixels(model.config.image_size)
  out = _forward(model, _nhwc(x))
  ref = _torch_outputs(torch_model, x)
  assert len(out.hidden_states) == len(ref["hidden_states"]) == 8
  named = [("logits", out.logits, ref["logits"])]
  named += [(f"hidden_states[{i}]", a, b)
            for i, (a, b) in enumerate(zip(out.hidden_states, ref["hidden_states"]))]
  for name, a, b in named:
    a = np.asarray(a)
    assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
    err = float(np.abs(a - b).max())
    assert err <= F32_ATOL, f"{name}: max abs error {err:.3g} > {F32_ATOL}"
  # The randomisation makes the comparison meaningful: outputs vary and are not saturated.
  assert float(np.std(ref["logits"])) > 0.1


def test_efficientnet_parity_select_features(checkpoint):
  path, torch_model = checkpoint("lite0_tiny")
  model = load_torch_checkpoint(path, _config("lite0_tiny"))
  x = _pixels(64)
  out = _forward(model, _nhwc(x))
  ref = _torch_outputs(torch_model, x)
  with torch.no_grad():
    # What the torch classifier reads: the global average pool of the head feature map.
    pooled = torch_model._avg_pooling(
        torch_model.extract_features(torch.tensor(x))).flatten(1).numpy()
  np.testing.assert_allclose(np.asarray(_select(out)), pooled, atol=F32_ATOL)
  for layer in (0, 3, -2, -1):
    want = ref["hidden_states"][layer]
    got = np.asarray(_select(out, layer=layer, pooling="patch_grid"))
    np.testing.assert_allclose(got, want, atol=F32_ATOL, err_msg=f"layer {layer}")
    got = np.asarray(_select(out, layer=layer, pooling="mean"))
    np.testing.assert_allclose(got, want.mean(axis=(1, 2)), atol=F32_ATOL, err_msg=str(layer))
  np.testing.assert_allclose(np.asarray(_select(out, pooling="logits")), ref["logits"],
                             atol=F32_ATOL)
  assert _select(out, layer=2, pooling="patch_grid").shape == (BATCH, 8, 8, 24)
  with pytest.raises(ValueError, match=r"pooling 'cls' is not one of mean, patch_grid, logits"):
    select_features(out, pooling="cls")
  with pytest.raises(ValueError, match=r"leave layer at its default"):
    select_features(out, layer=-2, pooling="logits")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_efficientnet_config_matches_the_torch_package(variant):
  """Every variant's blocks and parameter shapes equal the package's, lite3 / lite4 included."""
  torch_model = TorchEfficientNet.from_name(f"efficientnet-{variant}")
  config = EfficientNetConfig.lite(variant)
  ours = [(s.in_channels if j == 0 else s.out_channels, s.out_channels, s.kernel_size,
           s.stride if j == 0 else 1, s.expand_ratio)
          for s in config.stages for j in range(s.num_blocks)]
  theirs = []
  for block in torch_model._blocks:
    a = block._block_args
    # The package keeps a stage's first stride as a one-element list, the others as an int.
    stride = a.stride[0] if isinstance(a.stride, list) else a.stride
    theirs.append((a.input_filters, a.output_filters, a.kernel_size, stride, a.expand_ratio))
  assert ours == theirs
  assert config.image_size == TorchEfficientNet.get_image_size(f"efficientnet-{variant}")
  # Loading the (untrained) state dict into an abstract model checks every shape and key.
  state = [(k, v.numpy()) for k, v in torch_model.state_dict().items()
           if not k.endswith("num_batches_tracked")]
  abstract = load_model(config.to_dict(), state)
  assert isinstance(abstract, EfficientNetLite)


@pytest.mark.parametrize("variant", ["lite0", pytest.param("lite1", marks=pytest.mark.slow),
                                     pytest.param("lite2", marks=pytest.mark.slow)])
def test_efficientnet_parity_real_weights_on_photos(variant):
  try:
    path = weights_file(variant)
  except FileNotFoundError as e:
    pytest.skip(f"pretrained weights absent: {e}")
  skimage_data = pytest.importorskip("skimage.data", reason="sample photos need scikit-image")
  model = load_lite(variant)
  info = preprocess_info(model.config)
  assert info.image_size == VARIANTS[variant][2]
  photos = np.concatenate([np.asarray(preprocess(getattr(skimage_data, name)()[..., :3], info))
                           for name in SAMPLE_PHOTOS])
  assert photos.shape == (len(SAMPLE_PHOTOS), info.image_size, info.image_size, 3)
  out = _forward(model, photos)
  torch_model = TorchEfficientNet.from_name(f"efficientnet-{variant}")
  torch_model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
  torch_model.eval()
  with torch.no_grad():
    ref = torch_model(torch.tensor(photos.transpose(0, 3, 1, 2))).numpy()
  logits = np.asarray(out.logits)
  assert list(logits.argmax(-1)) == list(ref.argmax(-1))
  err = float(np.abs(logits - ref).max())
  assert err <= REAL_LOGITS_ATOL, f"max abs logit error {err:.3g}"
  # The photos are recognised, not just reproduced: the cat is a cat, the coffee a cup of it.
  top1 = dict(zip(SAMPLE_PHOTOS, logits.argmax(-1).tolist()))
  assert top1["chelsea"] in CAT_CLASSES, top1
  assert top1["coffee"] in (967, 968), top1  # espresso, cup
  assert float(jax.nn.softmax(logits[SAMPLE_PHOTOS.index("coffee")]).max()) > 0.5


def test_efficientnet_loading_reports_missing_unexpected_and_bad_shapes_together(checkpoint):
  path, _ = checkpoint("lite0_tiny")
  pairs = dict(read_torch_state_dict(path))
  del pairs["_blocks.3._bn1.running_var"]
  pairs["_blocks.99._project_conv.weight"] = np.zeros((8, 8, 1, 1), np.float32)
  pairs["_fc.bias"] = np.zeros(NUM_CLASSES + 1, np.float32)
  pairs["_se_reduce.weight"] = np.zeros((4, 8, 1, 1), np.float32)
  with pytest.raises(CheckpointError, match=r"4 problem\(s\)") as info:
    load_model(_config("lite0_tiny"), pairs.items(), source=str(path))
  message = str(info.value)
  assert "missing parameter blocks.3.depthwise_bn.var" in message
  assert ("unexpected key '_blocks.99._project_conv.weight' (8, 8, 1, 1): maps to "
          "blocks.99.project_conv.kernel") in message
  assert "shape mismatch for '_fc.bias'" in message
  assert "unexpected key '_se_reduce.weight' (4, 8, 1, 1): not in the key table" in message


def test_efficientnet_loading_wrong_variant_is_a_shape_error(checkpoint):
  """A lite2 state dict does not load as lite0: the mismatches are listed, not half-loaded."""
  path, _ = checkpoint("lite2_odd_size")
  config = {**_config("lite2_odd_size"), "variant": "lite0", "image_size": 65}
  with pytest.raises(CheckpointError) as info:
    load_torch_checkpoint(path, config)
  message = str(info.value)
  # lite2 is deeper (20 blocks, lite0 16): its block 3 is still in the 3x3 stage, lite0's is 5x5.
  assert ("shape mismatch for '_blocks.3._depthwise_conv.weight': checkpoint (144, 1, 3, 3) gives "
          "blocks.3.depthwise_conv.kernel (3, 3, 1, 144), the model needs (5, 5, 1, 144)"
          ) in message
  assert "unexpected key '_blocks.19._project_conv.weight'" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_efficientnet_loading_corrupt_pth_is_one_line_naming_the_file(checkpoint, tmp_path,
                                                                       damage):
  data = checkpoint("lite0_tiny")[0].read_bytes()
  bad = tmp_path / f"{damage}.pth"
  bad.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"not a checkpoint" * 64,
                   "empty": b""}[damage])
  with pytest.raises(CheckpointFileError) as info:
    load_torch_checkpoint(bad, _config("lite0_tiny"))
  message = str(info.value)
  assert message.startswith(f"{bad}: unreadable PyTorch checkpoint, truncated or corrupt (")
  assert "\n" not in message


def test_efficientnet_loading_pth_missing_file_and_non_state_dicts(tmp_path):
  with pytest.raises(CheckpointFileError, match=r"nope\.pth: no such checkpoint file"):
    list(TorchStateDict(tmp_path / "nope.pth"))
  torch.save([torch.zeros(2)], tmp_path / "list.pth")
  with pytest.raises(CheckpointFileError, match=r"list\.pth: expected a state dict, got list"):
    list(TorchStateDict(tmp_path / "list.pth"))
  torch.save({"w": torch.zeros(2), "step": 3}, tmp_path / "mixed.pth")
  with pytest.raises(CheckpointFileError, match=r"key 'step' holds a int, not a tensor"):
    list(TorchStateDict(tmp_path / "mixed.pth"))


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_efficientnet_parity_wrapped_bf16_state_dict(checkpoint, tmp_path, wrapper):
  """A {"state_dict": ...} / {"model": ...} wrapper is unwrapped, bf16 tensors read as float32."""
  path, torch_model = checkpoint("lite0_tiny")
  state = torch.load(path, weights_only=True)
  wrapped = tmp_path / "wrapped.pth"
  torch.save({wrapper: {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                        for k, v in state.items()}, "epoch": 7}, wrapped)
  pairs = dict(read_torch_state_dict(wrapped))
  assert not any(k.endswith("num_batches_tracked") for k in pairs)
  assert len(pairs) == sum(not k.endswith("num_batches_tracked") for k in state)
  assert pairs["_fc.weight"].dtype == np.float32
  np.testing.assert_array_equal(pairs["_fc.weight"],
                                state["_fc.weight"].to(torch.bfloat16).float().numpy())
  model = load_torch_checkpoint(wrapped, _config("lite0_tiny"), dtype="bfloat16")
  x = _pixels(64)
  out = _forward(model, _nhwc(x))
  assert out.logits.dtype == jnp.bfloat16
  ref = _torch_outputs(torch_model, x)["logits"]
  logits = np.asarray(out.logits, np.float32)
  # bf16 weights and activations: a few percent of the logit scale.
  assert float(np.abs(logits - ref).max()) <= 0.05 * float(np.abs(ref).max())


def test_efficientnet_loading_without_torch_reads_the_same_arrays(checkpoint, monkeypatch):
  """The .pth reader needs no torch (it used to raise ImportError without it)."""
  path = checkpoint("lite0_tiny")[0]
  with_torch = dict(read_torch_state_dict(path))
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
  without_torch = dict(read_torch_state_dict(path))
  assert without_torch.keys() == with_torch.keys()
  for key, value in with_torch.items():
    assert without_torch[key].dtype == value.dtype
    np.testing.assert_array_equal(without_torch[key], value)


def test_efficientnet_config_from_dict_and_errors():
  c = EfficientNetConfig.from_dict({"model_type": "efficientnet_lite",
                                    "variant": "efficientnet-lite4", "num_classes": 5})
  assert (c.variant, c.width_coefficient, c.depth_coefficient, c.image_size, c.num_classes) == (
      "lite4", 1.4, 1.8, 300, 5)
  assert EfficientNetConfig.from_dict(c.to_dict()) == c
  assert c.stages[0].in_channels == 32 and c.stages[-1].num_blocks == 1
  with pytest.raises(ValueError, match=r"variant 'lite9' is not one of lite0, lite1"):
    EfficientNetConfig.from_dict({"model_type": "efficientnet_lite", "variant": "lite9"})
  with pytest.raises(ValueError, match=r"unknown EfficientNet-Lite config field\(s\): se_ratio"):
    EfficientNetConfig.from_dict({"model_type": "efficientnet_lite", "se_ratio": 0.25})
  with pytest.raises(ValueError, match=r"no pretrained weights package for variant 'lite3'"):
    weights_file("lite3")
  assert preprocess_info(EfficientNetConfig.lite("lite2")).crop_fraction == 260 / 292


def test_efficientnet_preprocess_crops_resizes_and_normalises():
  """A centre crop of image_size / (image_size + 32) of the short side, then inception scaling."""
  info = preprocess_info(EfficientNetConfig.lite("lite0", image_size=4))
  image = np.full((10, 16, 3), 255, np.uint8)
  # The crop (int(4 / 36 * 10) = 1 px, at row 5, column 8) is the one black pixel.
  image[5, 8] = 0
  x = np.asarray(preprocess(image, info))
  assert x.shape == (1, 4, 4, 3)
  np.testing.assert_allclose(x, (0.0 - 127.0 / 255) / (128.0 / 255), atol=1e-6)
  with pytest.raises(ValueError, match=r"images must be \(height, width, 3\)"):
    preprocess(np.zeros((2, 3, 8, 8)), info)


def test_efficientnet_parity_off_native_size_matches_dynamic_padding(checkpoint):
  """At any other size ours pads like TF "SAME", as the package's image_size=None model does."""
  path, static_model = checkpoint("lite0_tiny")
  variant, overrides = CASES["lite0_tiny"]
  dynamic = TorchEfficientNet.from_name(f"efficientnet-{variant}", num_classes=NUM_CLASSES,
                                        **{**overrides, "image_size": None})
  dynamic.load_state_dict(static_model.state_dict())
  dynamic.eval()
  model = load_torch_checkpoint(path, _config("lite0_tiny"))
  x = np.random.RandomState(2).randn(1, 3, 41, 23).astype(np.float32)
  out = _forward(model, _nhwc(x))
  ref = _torch_outputs(dynamic, x)
  assert out.hidden_states[-1].shape == (1, 2, 1, 1280)
  for a, b in zip((out.logits, *out.hidden_states), (ref["logits"], *ref["hidden_states"])):
    np.testing.assert_allclose(np.asarray(a), b, atol=F32_ATOL)
  with pytest.raises(ValueError, match=r"pixel_values must be NHWC \(batch, height, width, 3\); "
                     r"got shape \(1, 3, 41, 23\)"):
    model(jnp.asarray(x))


@pytest.mark.parametrize("size, channels, kernel, stride", [
    (9, 4, 3, 1), (9, 4, 3, 2), (10, 6, 5, 2), (7, 3, 5, 1), (2, 5, 5, 2), (1, 2, 3, 2)])
def test_depthwise_shifted_sums_equal_xla_grouped_conv(size, channels, kernel, stride):
  """The CPU default (shifts) against XLA's grouped convolution, odd sizes and padding."""
  x = jnp.asarray(np.random.default_rng(size).normal(size=(2, size, size + 1, channels)),
                  jnp.float32)
  conv = DepthwiseConv(channels, kernel, stride=stride, dtype=jnp.float32,
                       rngs=nnx.Rngs(0), impl="conv")
  shifts = DepthwiseConv(channels, kernel, stride=stride, dtype=jnp.float32,
                         rngs=nnx.Rngs(0), impl="shifts")
  want, got = conv(x), shifts(x)
  assert got.shape == want.shape == (2, -(-size // stride), -(-(size + 1) // stride), channels)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="depthwise impl 'fast' is not one of auto, shifts, conv"):
    DepthwiseConv(channels, kernel, stride=stride, dtype=jnp.float32, rngs=nnx.Rngs(0),
                  impl="fast")
