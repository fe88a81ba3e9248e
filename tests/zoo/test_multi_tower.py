"""Multi-encoder towers (``zoo.multi``, ``models.multi_tower``): spec grammar, the grid as the
concatenation of the members' resampled grids, feature banks, the C score, a VLM train step, and
candidate names with an LLM.

References: every member loaded alone through the zoo (its own preprocessing, its own
``patch_grid`` / feature bank), resampled with torch's antialiased bilinear
``F.interpolate(align_corners=False)``; the members are the weightless towers and a tiny random
ViT (tests/vlm_fixtures.py).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlm_fixtures as fx
from vlmsel_jax import zoo
from vlmsel_jax.features import extraction
from vlmsel_jax.features import feature_bank as fb
from vlmsel_jax.features import patch_grid as pg
from vlmsel_jax.models import multi_tower
from vlmsel_jax.models import vlm
from vlmsel_jax.scoring import c_score
from vlmsel_jax.selection import mordal_live
from vlmsel_jax.selection import tables
from vlmsel_jax.training import groundtruth
from vlmsel_jax.training import loop
from vlmsel_jax.training import step as step_lib
from vlmsel_jax.zoo import multi

STUDY_DATA = Path(__file__).resolve().parents[2] / "studies" / "mordal_two_llms" / "data"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multi")
  return {"llm": fx.tiny_llm_dir(str(root / "llm")), "vit": fx.tiny_vit_dir(str(root / "vit"))}


def _image(seed: int, height: int = 90, width: int = 120) -> np.ndarray:
  """A smooth random image (blocks, bilinearly enlarged): structure at several scales."""
  small = np.random.default_rng(seed).integers(0, 256, (height // 10, width // 10, 3), np.uint8)
  return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def _resample_reference(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """torch's antialiased bilinear (half-pixel centres) of a (b, h, w, d) grid."""
  x = torch.from_numpy(np.array(grid, np.float32)).permute(0, 3, 1, 2)
  out = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
  return out.permute(0, 2, 3, 1).numpy()


def _members_reference(member_specs, pixels_of, grid) -> np.ndarray:
  """Each member loaded alone: its patch grid at its own (variant or default) layer, resampled
  to ``grid``, concatenated."""
  pieces = []
  for spec in member_specs:
    member = zoo.load(spec)
    layer = zoo.resolve(spec).variant.layer
    native = np.asarray(pg.patch_grid_fn(member, layer)(pixels_of(member)))
    pieces.append(_resample_reference(native, grid))
  return np.concatenate(pieces, axis=-1)


# --- the spec grammar ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec, members, grid, name", [
    ("a+b", ("a", "b"), None, "a+b"),
    (" (a@layer=-2+b@res=96,layer=-1+c) ", ("a@layer=-2", "b@res=96,layer=-1", "c"), None,
     "a@layer=-2+b@res=96,layer=-1+c"),
    ("(a+b)@grid=16x12", ("a", "b"), (16, 12), "(a+b)@grid=16x12"),
    ("(a+org/b@v1@layer=-2)@grid=7", ("a", "org/b@v1@layer=-2"), (7, 7),
     "(a+org/b@v1@layer=-2)@grid=7x7"),
])
def test_multi_specs_parse_into_members_and_a_grid(spec, members, grid, name):
  parsed = multi.parse(spec)
  assert (parsed.members, parsed.grid) == (members, grid)
  assert multi.multi_name(parsed.members, parsed.grid) == name
  # The tower has one layer; every caller of split_variant (training's tower layer) sees it.
  assert zoo.is_multi(spec)
  assert zoo.split_variant(spec) == (spec.strip(), zoo.Variant(layer=zoo.MULTI_LAYER))


@pytest.mark.parametrize("spec, match", [
    ("a+", r"an empty member"),
    ("(a)", r"two or more members"),
    ("(a+b)@layer=-2", r"layer is its members'"),
    ("(a+b)@res=160", r"res is its members'"),
    ("(a+b)@grid=4x", r"grid='4x' is not RxC"),
    ("(a+b)@grid=0x4", r"1 to 1024 rows"),
    ("(a+b)@grid=4,grid=5", r"grid is given twice"),
    ("(a+b)@size=4", r"unknown setting 'size'"),
    ("((a+b)+c)", r"do not nest"),
    ("(a+b)+c", r"do not combine with further members"),
    ("(a+b", r"'\(' without its '\)'"),
])
def test_bad_multi_specs_are_one_line_errors(spec, match):
  with pytest.raises(zoo.ZooError, match=match):
    multi.parse(spec)


def test_multi_spec_resolution_names_members_and_refuses_text_members(tmp_path):
  resolved = zoo.resolve("pixel-patches@res=64+hog")
  assert isinstance(resolved, multi.MultiResolved)
  assert resolved.name == resolved.file_stem == "pixel-patches@res=64+hog"
  assert [m.name for m in resolved.members] == ["pixel-patches@res=64", "hog"]
  with pytest.raises(zoo.ZooError, match=r"member 'no-such-model': unknown model"):
    zoo.resolve("hog+no-such-model")
  with pytest.raises(zoo.ZooError, match=r"res=4: give an input side"):
    zoo.resolve("hog@res=4+pixel-patches")
  # A path with '+' that exists is one model, not two.
  odd = tmp_path / "a+b"
  odd.mkdir()
  assert not zoo.is_multi(str(odd))
  # absl splits list flags at every comma; a member's variant keeps its own.
  items = "a@layer=-2,res=160+b@res=96,layer=-1,c,(d+e)@grid=4x4".split(",")
  assert zoo.candidate_list(items) == ["a@layer=-2,res=160+b@res=96,layer=-1", "c",
                                       "(d+e)@grid=4x4"]


# --- the grid -----------------------------------------------------------------------------------

def test_grid_is_the_concatenation_of_each_members_resampled_grid():
  # HOG's 16x16 cells reduced (antialiased) to 5x7; the 6x6 patches fewer rows, more columns.
  spec, grid = "(hog@layer=-2+pixel-patches@res=96)@grid=5x7", (5, 7)
  images = [Image.fromarray(_image(s)) for s in (0, 1)]
  loaded = zoo.load(spec)
  canvas = np.stack([loaded.preprocessing(im) for im in images])
  assert canvas.shape == (2, *loaded.preprocessing.image_size, 3)
  got = np.asarray(pg.patch_grid_fn(loaded)(canvas))  # Jitted, as the C score runs it.
  members = multi.parse(spec).members

  def pixels_of(member):
    return np.stack([member.preprocessing(im) for im in images])

  want = _members_reference(members, pixels_of, grid)
  assert got.shape == want.shape == (2, *grid, want.shape[-1])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # The VLM's path (tower_grid) is the same function, at layer 0 too; the tower has one layer.
  tokens = jax.jit(lambda x: vlm.tower_grid(loaded.model, x, 0))(canvas)
  np.testing.assert_allclose(np.asarray(tokens), got, rtol=1e-6, atol=1e-6 * np.abs(want).max())
  with pytest.raises(ValueError, match=r"one layer \(-1\)"):
    loaded.model.patch_grid(canvas, -2)


def test_a_vit_member_at_its_own_layer_and_the_c_score(dirs):
  # The first member's grid is the common one: the ViT's 4x4; the 3x3 pixel patches enlarged.
  spec = f"{dirs['vit']}@layer=-2+pixel-patches@res=48"
  loaded = zoo.load(spec)
  assert loaded.model.member_layers == (-2, -1) and loaded.model.grid == (4, 4)
  assert loaded.preprocessing.image_size == (48, 32 + 48)
  image = _image(2, 60, 80)
  pixels = pg.resize_for_grid(loaded, image)[None]
  # The C score's input: each member's own resize_for_grid, side by side.
  parts = [pg.resize_for_grid(zoo.load(m), image) for m in multi.parse(spec).members]
  np.testing.assert_array_equal(pixels[0, :32, :32], parts[0])
  np.testing.assert_array_equal(pixels[0, :48, 32:], parts[1])
  assert not pixels[0, 32:, :32].any()
  want = _members_reference(multi.parse(spec).members,
                            lambda m: pg.resize_for_grid(m, image)[None], (4, 4))
  got = np.asarray(pg.patch_grid_fn(loaded)(pixels))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

  # One identity pair through score_records: every keypoint is found where it is.
  rng = np.random.default_rng(0)
  kps = rng.uniform(5, 55, size=(6, 2)).astype(np.float32)
  record = {"source": image, "target": image, "source_kps": kps, "target_kps": kps,
            "target_bbox": np.array([0, 0, 79, 59], np.float32), "category": "identity"}
  result = c_score.score_records(loaded, [record], method="argmax")
  assert result["grid"] == [4, 4] and result["layer"] == -1 and result["keypoints"] == 6
  assert result["pck@0.15"] == 100.0


# --- feature banks ------------------------------------------------------------------------------

def test_bank_is_the_concatenation_of_the_members_banks(dirs, tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  with open(folder / "captions.jsonl", "w") as f:
    for i in range(3):
      Image.fromarray(_image(10 + i, 40 + 10 * i, 50)).save(folder / f"{i}.png")
      f.write(json.dumps({"id": i, "image": f"{i}.png", "caption": f"image {i}"}) + "\n")
  options = extraction.ExtractOptions(batch_size=2, progress=False)
  spec = "pixel-patches+hog@layer=-2"
  both, first, second = extraction.extract([spec, "pixel-patches", "hog@layer=-2"], str(folder),
                                           str(tmp_path / "banks"), options=options)
  bank = fb.load_bank(both.path)
  want = np.concatenate([fb.load_bank(first.path).features, fb.load_bank(second.path).features],
                        axis=1)
  assert bank.features.shape == want.shape == (3, 768 + 9)
  np.testing.assert_allclose(bank.features, want, rtol=1e-6, atol=1e-6)
  assert bank.metadata["pooling"] == multi.POOLING and bank.metadata["layer"] == "-1"
  recipe = json.loads(bank.metadata["preprocessing"])
  assert recipe["recipe"] == "multi_encoder_canvas" and len(recipe["members"]) == 2
  again = extraction.extract([spec], str(folder), str(tmp_path / "banks"), options=options)
  assert again[0].cached
  # The members name their layers; a --layer beside them is a second one.
  with pytest.raises(extraction.ExtractError, match="names its layer"):
    extraction.extract([spec], str(folder), str(tmp_path / "banks"),
                       options=extraction.ExtractOptions(layer=-2, progress=False))

  # The cache key follows every member's files: a member touched is a new key.
  vit_spec = f"{dirs['vit']}+hog"
  key = extraction.cache_key(zoo.resolve(vit_spec), "data", options)
  assert extraction.cache_key(zoo.resolve(vit_spec), "data", options) == key
  config = os.path.join(dirs["vit"], "config.json")
  stat = os.stat(config)
  os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  assert extraction.cache_key(zoo.resolve(vit_spec), "data", options) != key
  assert extraction.cache_key(zoo.resolve(f"({vit_spec})@grid=2x2"), "data", options) != key


# --- training -----------------------------------------------------------------------------------

def test_a_vlm_with_a_multi_tower_trains(dirs, tmp_path):
  vision = f"{dirs['vit']}@layer=-2+pixel-patches@res=48"
  layer = loop.tower_layer(vision, -2)  # The spec's own layer wins over --vision_layer.
  assert layer == multi_tower.LAYER
  config = loop.TrainConfig(
      vision=vision, llm=dirs["llm"], stage=1, data="unused", workdir=str(tmp_path),
      vlm=vlm.VLMConfig(vision_layer=layer),
      optim=step_lib.OptimConfig(learning_rate=1e-2, schedule_steps=8, warmup_ratio=0.0),
      batch_size=4, max_steps=2, max_len=32, progress=False)
  built = loop.build_model(config)
  assert built.model.num_image_tokens == 16 and built.model.vision_dim == 16 + 768
  batch = fx.fixed_batch(built, "paired", n=4)
  assert batch["pixels"].shape == (4, 48, 80, 3)
  _, losses = fx.run_train_steps(built, batch, fx.mesh(1, 1), 3)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  with pytest.raises(ValueError, match="names layer -1"):
    loop.TrainConfig(vision=vision, llm=dirs["llm"], stage=1, data="unused",
                     workdir=str(tmp_path), vlm=vlm.VLMConfig(vision_layer=-2))


# --- candidate names ----------------------------------------------------------------------------

def test_candidate_names_with_a_multi_vision_read_back_unambiguously():
  visions = ["/m/a@layer=-2+b", "(a+b)@grid=4x4", "c@layer=-3"]
  names = ["a@layer=-2+b", "(a+b)@grid=4x4", "c@layer=-3"]
  grid = groundtruth.candidate_grid(visions, names, ["/m/l", "org/m"], ["l", "org/m"])
  assert [g[0] for g in grid] == [
      "(a@layer=-2+b)+l", "(a@layer=-2+b)+org/m", "(a+b)@grid=4x4+l", "(a+b)@grid=4x4+org/m",
      "c@layer=-3+l", "c@layer=-3+org/m"]
  assert len({g[0] for g in grid}) == len(grid)
  assert [zoo.split_candidate_pair_name(g[0]) for g in grid] == [
      ("(a@layer=-2+b)", "l"), ("(a@layer=-2+b)", "org/m"), ("(a+b)@grid=4x4", "l"),
      ("(a+b)@grid=4x4", "org/m"), ("c@layer=-3", "l"), ("c@layer=-3", "org/m")]
  # The vision part of a name is itself a spec of the same tower.
  assert multi.parse("(a@layer=-2+b)").members == multi.parse("a@layer=-2+b").members
  # Without LLMs a multi candidate is named by its vision alone, as any other.
  assert groundtruth.candidate_grid(visions[:1], names[:1], [], [], "l") == [
      ("a@layer=-2+b", "/m/a@layer=-2+b", "l")]
  # Mordal's live search shortens each member, and its names read back too.
  live = mordal_live.candidate_grid(["/m/vit@layer=-2+hog", "/m/vit"], ["/m/llm.gguf"])
  assert live == {("/m/vit@layer=-2+hog", "/m/llm.gguf"): "(vit@layer=-2+hog)+llm",
                  ("/m/vit", "/m/llm.gguf"): "vit+llm"}
  assert zoo.split_candidate_pair_name("vit+llm") == ("vit", "llm")
  # A search's recipe is built from a spec naming no layer (its layer is then --vision_layer),
  # also when the first candidate is a multi tower, which always names its one layer.
  assert [zoo.base_spec(v) for v in visions] == ["/m/a", "a", "c"]
  assert zoo.split_variant(zoo.base_spec(visions[0]))[1].layer is None
  with pytest.raises(ValueError, match="not <vision>\\+<llm>"):
    zoo.split_candidate_pair_name("(a+b)")


def test_the_studys_existing_plus_names_still_read():
  runs = groundtruth.read_runs(str(STUDY_DATA / "mordal_groundtruth_gemma3_runs.csv"))
  pairs, curves = tables.read_curves(str(STUDY_DATA / "mordal_groundtruth_gemma3_curves_seed0.csv"))
  assert runs and pairs and curves
  for row in runs:
    assert zoo.split_candidate_pair_name(row["candidate"]) == (row["vision"], row["llm"])
    assert row["candidate"] == zoo.candidate_pair_name(row["vision"], row["llm"])
  for (vision, llm), name in pairs.items():
    assert zoo.split_candidate_pair_name(name) == (vision, llm)
  with open(STUDY_DATA / "mordal_groundtruth_gemma3.csv", newline="") as f:
    summary = list(csv.DictReader(f))
  assert {r["candidate"] for r in summary} == {r["candidate"] for r in runs}
