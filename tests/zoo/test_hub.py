"""Hugging Face Hub ids, offline, from a Hub cache the tests build (``hub_fixtures``).

The resolver: zoo name → local path → Hub id; ``org/name@revision`` and variants; the commit in
the cache key; one line for a missing id. Then every binary that takes a model, given Hub ids:
``score`` and ``extract`` in subprocesses that get the cache only through ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE=1`` (as transformers would), the others in process with huggingface_hub's
settings patched the same way.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from absl import flags
from flax import nnx
from huggingface_hub import constants as hf_constants
from PIL import Image

import hub_fixtures as hf
import vlm_fixtures as fx
from vlmsel_jax import zoo
from vlmsel_jax.models import checkpoint, loading

FLAGS = flags.FLAGS
HAS_EASY_VQA = importlib.util.find_spec("easy_vqa") is not None
needs_easy_vqa = pytest.mark.skipif(not HAS_EASY_VQA, reason="needs the easy-vqa package")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
  root = tmp_path_factory.mktemp("hub")
  commits = hf.tiny_hub_cache(root)
  data = root / "data"
  data.mkdir()
  records = fx.shape_records(8, "paired", seed=3)
  with open(data / "captions.jsonl", "w") as f:
    for i, r in enumerate(records):
      Image.fromarray(r["image"]).save(data / f"{i}.png")
      f.write(json.dumps({"id": i, "image": f"{i}.png", "caption": r["caption"]}) + "\n")
  return {"root": root, "cache": root / "hub", "commits": commits, "data": data}


@pytest.fixture
def offline(hub, monkeypatch):
  """huggingface_hub as HF_HUB_CACHE=<the tiny cache> HF_HUB_OFFLINE=1 would have set it."""
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub["cache"]))
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
  return hub


def _params(model) -> dict:
  return {k: np.asarray(v) for k, v in
          checkpoint._flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


# ---------------------------------------------------------------------------------------------
# The resolver.


def test_hub_ids_resolve_to_their_snapshot_with_revision_and_variant(offline):
  commits = offline["commits"]
  clip = zoo.resolve(hf.CLIP)
  assert (clip.kind, clip.name, clip.file_stem) == ("vision", hf.CLIP, "vlmsel-test--clip-vit-tiny")
  assert clip.path == offline["cache"] / "models--vlmsel-test--clip-vit-tiny" / "snapshots" / \
      commits[hf.CLIP]
  assert clip.hub.commit == commits[hf.CLIP] and clip.hub.revision is None
  assert clip.fingerprint()["hub"] == {"repo_id": hf.CLIP, "commit": commits[hf.CLIP]}

  dino = zoo.resolve(f"{hf.DINOV2}@layer=-2")
  assert dino.name == f"{hf.DINOV2}@layer=-2" and dino.variant == zoo.Variant(layer=-2)
  assert dino.load().default_layer == -2

  tagged = zoo.resolve(f"{hf.QWEN2}@v2@layer=-1")
  assert tagged.kind == "text" and tagged.variant == zoo.Variant(layer=-1)
  assert tagged.hub.revision == "v2" and tagged.hub.commit == commits[hf.QWEN2 + "@v2"]
  by_commit = zoo.resolve(f"{hf.QWEN2}@{commits[hf.QWEN2 + '@v2']}")
  assert by_commit.path == tagged.path
  # The revision's own weights: those transformers saved at that commit, not main's.
  v2 = _params(tagged.load().model)
  main = _params(zoo.load(hf.QWEN2).model)
  saved = _params(loading.load_pretrained(offline["root"] / "saved" / "qwen2-v2"))
  assert v2.keys() == saved.keys() == main.keys()
  assert all(np.array_equal(v2[k], saved[k]) for k in v2)
  assert not all(np.array_equal(v2[k], main[k]) for k in v2)
  # Another commit is another cache key.
  assert zoo.resolve(hf.QWEN2).fingerprint() != zoo.resolve(f"{hf.QWEN2}@v2").fingerprint()


def test_zoo_names_and_local_paths_come_before_hub_ids(offline, tmp_path, monkeypatch):
  local = tmp_path / "vlmsel-test" / "qwen2-tiny"
  hf.qwen2_dir(local, seed=5)
  monkeypatch.chdir(tmp_path)
  resolved = zoo.resolve(hf.QWEN2)  # A relative path that exists: the local directory.
  assert resolved.hub is None and resolved.path == Path(hf.QWEN2)
  assert zoo.resolve("smollm2-135m").hub is None


@pytest.mark.parametrize("spec, match", [
    ("vlmsel-test/absent", r"^model 'vlmsel-test/absent' is not in the Hugging Face cache \(.*\) "
                           r"and HF_HUB_OFFLINE=1; fetch it where the Hub is reachable: "
                           r"`hf download vlmsel-test/absent`$"),
    (f"{hf.QWEN2}@nope", r"`hf download vlmsel-test/qwen2-tiny --revision nope`$"),
    ("vlmsel-test/no-weights", r"^model 'vlmsel-test/no-weights': the cached snapshot .* has no "
                               r"weights \(model.safetensors or pytorch_model.bin\)"),
    ("no-such-thing", r"^unknown model 'no-such-thing': not a zoo name .* nor a Hub id"),
])
def test_a_hub_id_that_cannot_be_had_is_one_line(offline, spec, match):
  source = offline["root"] / "saved" / "no-weights"
  if not source.exists():
    source.mkdir(parents=True)
    (source / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    hf.add_snapshot(offline["cache"], "vlmsel-test/no-weights", source)
  with pytest.raises(zoo.ZooError, match=match) as e:
    zoo.resolve(spec)
  assert "\n" not in str(e.value)


def test_unreachable_hub_falls_back_to_the_cache(offline, monkeypatch):
  """Online mode with the Hub unreachable: a cached model still resolves, a missing one is one
  line that says the Hub could not be reached."""
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
  monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
  assert zoo.resolve(hf.CLIP).hub.commit == offline["commits"][hf.CLIP]
  with pytest.raises(zoo.ZooError, match=r"and the Hub could not be reached; fetch it"):
    zoo.resolve("vlmsel-test/absent")


# ---------------------------------------------------------------------------------------------
# The binaries.


def _env(hub):
  return dict(os.environ, HF_HUB_CACHE=str(hub["cache"]), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
              XLA_FLAGS="")


def test_score_binary_scores_hub_models_offline(hub, tmp_path):
  out = tmp_path / "out"
  vision = [hf.CLIP, hf.SIGLIP, f"{hf.DINOV2}@layer=-2"]
  proc = subprocess.run(
      [sys.executable, "-m", "vlmsel_jax.score", f"--vision_models={','.join(vision)}",
       f"--text_model={hf.QWEN2}", f"--data_dir={hub['data']}", f"--cache_dir={tmp_path / 'c'}",
       "--metrics=cka,rsa", f"--output_dir={out}", "--noprogress", "--bootstrap=0",
       "--permutations=0"],
      env=_env(hub), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "scores.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["candidate"] for r in rows) == sorted(vision)
  assert all(np.isfinite(float(r["cka"])) for r in rows)
  assert sorted(os.listdir(tmp_path / "c")) == sorted(
      zoo.file_stem(n) + ".safetensors" for n in vision + [hf.QWEN2])


def test_extract_binary_missing_hub_id_is_one_line(hub, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "vlmsel_jax.extract", f"--vision_models={hf.CLIP},vlmsel-test/absent",
       f"--data_dir={hub['data']}", f"--output_dir={tmp_path / 'banks'}", "--noprogress"],
      env=_env(hub), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "'vlmsel-test/absent' is not in the Hugging Face cache" in lines[-1]
  assert "hf download vlmsel-test/absent" in lines[-1]
  assert not (tmp_path / "banks").exists() or not os.listdir(tmp_path / "banks")


def _run(module, argv):
  FLAGS.unparse_flags()
  try:
    FLAGS([module.__name__] + argv)
    return module.main([module.__name__])
  finally:
    FLAGS.unparse_flags()


def test_extract_binary_writes_banks_of_hub_models(offline, tmp_path):
  from vlmsel_jax import extract  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.features import feature_bank  # pylint: disable=g-import-not-at-top
  _run(extract, [f"--vision_models={hf.SIGLIP}", f"--text_models={hf.QWEN2}@v2",
                 f"--data_dir={offline['data']}",
                 f"--output_dir={tmp_path}", "--noprogress"])
  bank = feature_bank.load_bank(str(tmp_path / "vlmsel-test--qwen2-tiny@v2.safetensors"))
  assert bank.name == f"{hf.QWEN2}@v2" and bank.features.shape == (8, 32)
  assert feature_bank.load_bank(str(tmp_path / "vlmsel-test--siglip-tiny.safetensors")
                                ).features.shape == (8, 32)


def test_correspondence_score_binary_takes_a_hub_id(hub, tmp_path):
  out = tmp_path / "c"
  proc = subprocess.run(
      [sys.executable, "-m", "vlmsel_jax.correspondence_score", f"--vision_models={hf.CLIP}",
       "--c_score_pairs=homography", "--c_score_images=astronaut", "--c_score_pairs_per_image=1",
       "--c_score_keypoints=10", f"--output_dir={out}", "--noprogress"],
      env=_env(hub), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads((out / "c_scores.json").read_text())["models"][hf.CLIP]
  assert r["keypoints"] == 10 and 0.0 <= r["c_score"] <= 100.0


def _train_flags(hub, output_dir):
  return [f"--llm_model={hf.QWEN2}", f"--data=folder:{hub['data']}", f"--output_dir={output_dir}",
          "--stage=1", "--max_steps=1", "--batch_size=8", "--max_len=24", "--image_tokens=mean",
          "--save_every=1",
          "--log_every=1", "--eval_limit=8", "--eval_batch_size=8"]


def test_train_and_a_score_binaries_take_hub_ids(offline, tmp_path):
  from vlmsel_jax import a_score  # pylint: disable=g-import-not-at-top
  from vlmsel_jax import train  # pylint: disable=g-import-not-at-top
  _run(train, _train_flags(offline, tmp_path / "t") + [f"--vision_model={hf.DINOV2}"])
  summary = json.loads((tmp_path / "t" / "summary.json").read_text())
  assert summary["steps"] == 1
  output = tmp_path / "a" / "a_scores.csv"
  _run(a_score, _train_flags(offline, tmp_path / "a") + [
      f"--vision_models={hf.CLIP}@layer=-1,{hf.DINOV2}@layer=-2",
      f"--eval_data=folder:{offline['data']}"])
  with open(output, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["candidate"] for r in rows] == [f"{hf.CLIP}@layer=-1", f"{hf.DINOV2}@layer=-2"]
  assert [r["vision_layer"] for r in rows] == ["-1", "-2"]
  assert all(float(r["a_score"]) < 0 for r in rows)


@needs_easy_vqa
def test_groundtruth_binary_takes_hub_ids(offline, tmp_path, monkeypatch):
  from vlmsel_jax import groundtruth  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, "argv", ["groundtruth"])
  output = tmp_path / "w" / "groundtruth.csv"
  _run(groundtruth, [
      f"--vision_models={hf.SIGLIP}", f"--llm_model={hf.QWEN2}", "--data=easy-vqa",
      f"--output_dir={tmp_path / 'w'}", "--image_tokens=mean",
      "--lora_rank=2", "--stage1_steps=1", "--stage2_steps=1", "--stage1_batch_size=8",
      "--stage2_batch_size=8", "--stage1_max_len=48", "--stage2_max_len=96",
      "--a_score_limit=8", "--vqa_limit=8", "--eval_batch_size=8", "--save_every=1"])
  with open(output, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["candidate"] for r in rows] == [hf.SIGLIP] and float(rows[0]["a_score"]) < 0


@needs_easy_vqa
def test_select_live_modes_take_hub_ids(offline, tmp_path):
  from vlmsel_jax import select  # pylint: disable=g-import-not-at-top
  out = tmp_path / "llm" / "mordal_llm_similarity.json"
  _run(select, ["--method=mordal_llm_similarity", f"--vision_models={hf.CLIP}",
                f"--llm_models={hf.QWEN2},{hf.QWEN2}@v2", "--data=easy-vqa",
                "--max_steps=1", "--batch_size=8",
                "--max_len=48", "--image_tokens=mean", "--eval_limit=8", "--eval_batch_size=8",
                f"--output_dir={out.parent}"])
  payload = json.loads(out.read_text())
  assert payload["llms"] == [hf.QWEN2, f"{hf.QWEN2}@v2"]
  assert np.asarray(payload["vision"][hf.CLIP]["cka"]).shape == (2, 2)

  vision_csv = tmp_path / "v.csv"
  vision_csv.write_text(f"name,{hf.CLIP},{hf.SIGLIP}\n{hf.CLIP},1,0.2\n{hf.SIGLIP},0.2,1\n")
  llm_csv = tmp_path / "l.csv"
  llm_csv.write_text(f"name,{hf.QWEN2}\n{hf.QWEN2},1\n")
  output = tmp_path / "mordal" / "mordal.json"
  _run(select, ["--method=mordal", "--mordal_live", f"--vision_models={hf.CLIP},{hf.SIGLIP}",
                f"--llm_models={hf.QWEN2}",
                f"--vision_similarity={vision_csv}", f"--llm_similarity={llm_csv}",
                "--mordal_initial_budget=0.5", "--mordal_rounds=1", "--mordal_top_clusters=2",
                "--mordal_fractions=0.5,1.0", "--mordal_min_points=2", "--stage=2",
                "--data=easy-vqa", "--eval_data=easy-vqa",
                "--max_steps=2", "--batch_size=8", "--max_len=96", "--image_tokens=mean",
                "--lora_rank=2", "--save_every=1",
                "--eval_limit=8", "--eval_batch_size=8", f"--output_dir={output.parent}"])
  ranking = json.loads(output.read_text())["ranking"]
  assert set(ranking) == {f"{hf.CLIP}+{hf.QWEN2}", f"{hf.SIGLIP}+{hf.QWEN2}"}
  assert (output.parent / "runs" / "vlmsel-test--clip-vit-tiny+vlmsel-test--qwen2-tiny").is_dir()


def test_dcd_binary_takes_hub_ids(offline, tmp_path):
  from vlmsel_jax import select  # pylint: disable=g-import-not-at-top
  tasks = []
  for t in ("t0", "t1"):
    (tmp_path / t).mkdir()
    for i in range(2):
      Image.fromarray(np.full((16, 16, 3), 40 * i + 60 * len(tasks), np.uint8)).save(
          tmp_path / t / f"{i}.png")
    tasks.append(f"{t}={tmp_path / t}")
  acc = tmp_path / "acc.csv"
  acc.write_text("candidate,task,accuracy\n" + "".join(
      f"{m},{t},{v}\n" for m, t, v in ((hf.CLIP, "t0", 0.5), (hf.CLIP, "t1", 0.6),
                                       (hf.DINOV2, "t0", 0.7), (hf.DINOV2, "t1", 0.3))))
  out = tmp_path / "dcd" / "dcd.json"
  _run(select, ["--method=dcd", f"--vision_models={hf.CLIP},{hf.DINOV2}",
                f"--dcd_tasks={','.join(tasks)}", f"--ground_truth={acc}", "--dcd_steps=2",
                "--dcd_images_per_task=2", f"--output_dir={out.parent}"])
  assert set(json.loads(out.read_text())["profiles"]) == {hf.CLIP, hf.DINOV2}


def test_transformers_reads_the_same_cache(offline):
  """The cache the tests build is one transformers itself reads (the layout is the real one)."""
  model = transformers.AutoModel.from_pretrained(
      hf.DINOV2, cache_dir=str(offline["cache"]), local_files_only=True)
  assert model.config.hidden_size == 32
