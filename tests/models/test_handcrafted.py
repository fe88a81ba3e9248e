"""Towers without weights (models/handcrafted): HOG against scikit-image, pixel patches against a
NumPy loop, their zoo entries, patch grids, and a VLM that trains on them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.feature
from PIL import Image

import vlm_fixtures as fx
from vlmsel_jax.features import patch_grid
from vlmsel_jax import zoo
from vlmsel_jax.models import handcrafted
from vlmsel_jax.models import vlm
from vlmsel_jax.training import loop
from vlmsel_jax.training import step as step_lib


def _skimage_hog(image: np.ndarray, config: handcrafted.HogConfig) -> np.ndarray:
  """skimage's (blocks_row, blocks_col, k, k, O) descriptor as (blocks_row, blocks_col, k·k·O)."""
  channel_axis = -1 if image.shape[-1] > 1 else None
  image = image if channel_axis == -1 else image[..., 0]
  ref = skimage.feature.hog(image.astype(np.float64), orientations=config.orientations,
                            pixels_per_cell=(config.cell_size,) * 2,
                            cells_per_block=(config.block_size,) * 2,
                            block_norm=config.block_norm, feature_vector=False,
                            channel_axis=channel_axis)
  return ref.reshape(ref.shape[0], ref.shape[1], -1)


def _photo(gray: bool = False) -> np.ndarray:
  # Odd sizes: the pixels past the last whole cell must be ignored as skimage ignores them.
  if gray:
    return (skimage.data.camera()[:97, :77, None] / 255.0).astype(np.float32)
  return (skimage.data.astronaut()[100:230, 150:250] / 255.0).astype(np.float32)


CONFIGS = [handcrafted.HogConfig(),
           handcrafted.HogConfig(orientations=6, cell_size=7, block_size=3, block_norm="L2"),
           handcrafted.HogConfig(cell_size=5, block_size=1, block_norm="L1"),
           handcrafted.HogConfig(orientations=12, block_norm="L1-sqrt")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.orientations}-{c.cell_size}-"
                         f"{c.block_size}-{c.block_norm}")
@pytest.mark.parametrize("gray", [False, True], ids=["colour", "gray"])
def test_hog_matches_skimage_in_float64(config, gray):
  image = _photo(gray)
  with jax.enable_x64(True):
    out = handcrafted.Hog(config)(jnp.asarray(image, jnp.float64)[None]).hidden_states[-1][0]
    out = np.asarray(out)
  ref = _skimage_hog(image, config)
  assert out.shape == ref.shape
  # skimage's Cython cell sums return a C float, so its histograms carry float32 rounding.
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_hog_in_float32_matches_skimage_on_a_gray_image():
  image = _photo(gray=True)
  out = np.asarray(handcrafted.Hog()(jnp.asarray(image)[None]).hidden_states[-1][0])
  np.testing.assert_allclose(out, _skimage_hog(image, handcrafted.HogConfig()), rtol=0, atol=1e-6)


def test_hog_in_float32_of_a_colour_image_differs_only_in_blocks_where_channels_tie():
  # Where two channels' gradient magnitudes are equal in exact arithmetic, float32 rounding
  # decides which channel's orientation a pixel takes, which moves that pixel's vote and renormalises
  # its four blocks; every other block agrees to float32 precision.
  image = _photo()
  out = np.asarray(handcrafted.Hog()(jnp.asarray(image)[None]).hidden_states[-1][0])
  diff = np.abs(out - _skimage_hog(image, handcrafted.HogConfig())).max(axis=-1)
  assert np.mean(diff < 1e-6) > 0.7
  assert diff.max() < 0.05


def test_cell_histograms_of_a_ramp_have_the_closed_form():
  # A horizontal ramp of slope s: g_col = 2s inside, 0 in the first and last column; g_row = 0.
  # Orientation 0 (bin 0); each cell's mean is 2s times its share of interior pixels.
  s, cell = 0.01, 4
  ramp = np.tile(s * np.arange(16, dtype=np.float64), (8, 1))[None, ..., None]
  with jax.enable_x64(True):
    hist = np.asarray(handcrafted.cell_histograms(
        jnp.asarray(ramp), handcrafted.HogConfig(cell_size=cell)))[0]
  expected = np.zeros((2, 4, 9))
  expected[:, :, 0] = 2 * s
  expected[:, [0, -1], 0] = 2 * s * 3 / 4
  np.testing.assert_allclose(hist, expected, rtol=0, atol=1e-15)


def test_hog_rejects_an_image_smaller_than_a_block():
  with pytest.raises(ValueError, match="fewer than 2 cells of 8x8 pixels"):
    handcrafted.Hog()(jnp.zeros((1, 12, 40, 3)))


def test_pixel_patches_match_a_numpy_loop():
  x = np.random.default_rng(0).normal(size=(2, 12, 8, 3)).astype(np.float32)
  grid = np.asarray(handcrafted.PixelPatches(handcrafted.PixelPatchesConfig(4))(
      jnp.asarray(x)).hidden_states[-1])
  assert grid.shape == (2, 3, 2, 48)
  for b in range(2):
    for i in range(3):
      for j in range(2):
        np.testing.assert_array_equal(grid[b, i, j], x[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].ravel())
  with pytest.raises(ValueError, match="does not split into 5x5 patches"):
    handcrafted.PixelPatches(handcrafted.PixelPatchesConfig(5))(jnp.asarray(x))


def test_zoo_loads_both_towers_with_variants_and_their_patch_grids():
  image = Image.fromarray(skimage.data.astronaut())
  for spec, size, grid_shape, dim in [("pixel-patches", 224, (14, 14), 768),
                                      ("pixel-patches@res=64", 64, (4, 4), 768),
                                      ("hog", 128, (15, 15), 36),
                                      ("hog@layer=-2,res=64", 64, (8, 8), 9)]:
    loaded = zoo.load(spec)
    assert loaded.name == spec and loaded.kind == "vision"
    pixels = jnp.asarray(loaded.preprocessing(image))[None]
    assert pixels.shape == (1, size, size, 3)
    features = loaded.features(loaded.model, {"pixels": pixels}, loaded.default_layer, "mean")
    grid = patch_grid.patch_grid(loaded, pixels, loaded.default_layer)
    assert features.shape == (1, dim) and grid.shape == (1, *grid_shape, dim)
    np.testing.assert_allclose(features, grid.mean(axis=(1, 2)), rtol=1e-6)
  # With no layer named, a patch grid of a trained tower is its second-to-last layer; a
  # handcrafted tower's is its own output (pixel patches have no other).
  loaded = zoo.load("pixel-patches@res=32")
  pixels = jnp.asarray(loaded.preprocessing(image))[None]
  assert patch_grid.default_layer(loaded) == -1
  assert patch_grid.patch_grid_fn(loaded)(pixels).shape == (1, 2, 2, 768)
  # The "weights" are the defining module, so a cached bank follows the code.
  assert zoo.resolve("hog").path.name == "modeling.py"
  with pytest.raises(zoo.ZooError, match="layer -3 is out of range"):
    zoo.load("hog@layer=-3")


def test_pixel_patches_scale_to_minus_one_one_and_hog_reads_zero_one():
  flat = Image.new("RGB", (50, 50), (255, 0, 51))
  np.testing.assert_allclose(zoo.load("pixel-patches@res=32").preprocessing(flat)[0, 0],
                             [1.0, -1.0, -0.6], atol=1e-6)
  np.testing.assert_allclose(zoo.load("hog@res=32").preprocessing(flat)[0, 0], [1.0, 0.0, 0.2],
                             atol=1e-6)


def test_a_vlm_with_a_hog_tower_trains_only_its_projector(tmp_path):
  llm = fx.tiny_llm_dir(str(tmp_path / "llm"))
  config = loop.TrainConfig(
      vision="hog@res=32", llm=llm, stage=1, data="unused", workdir=str(tmp_path / "run"),
      vlm=vlm.VLMConfig(vision_layer=-1),
      optim=step_lib.OptimConfig(learning_rate=1e-2, schedule_steps=8, warmup_ratio=0.1),
      batch_size=8, max_steps=8, max_len=32, save_every=2, log_every=1,
      mesh="data:-1,fsdp:1", progress=False)
  built = loop.build_model(config)
  batch = fx.fixed_batch(built, "paired")
  # 3x3 blocks of the 32 px image, one token each, 36 HOG dimensions into the projector.
  assert built.model.config.vision_layer == -1
  pixels = jnp.asarray(batch["pixels"])
  assert vlm.image_features(built.model.tower, pixels, built.model.config).shape == (8, 9, 36)
  state, losses = fx.run_train_steps(built, batch, fx.mesh(1, 1), 15)
  assert losses[-1] < 0.5 * losses[0], losses
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(state.params)[0]]
  assert paths and all("projector" in p for p in paths), paths

