"""Tests for the record sources: on-disk fixtures in each format, written here and read back.

Every fixture image is a PNG of known pixels, so a decoded record is compared with the exact
array that was written; bad-record handling is checked both ways (one-line error naming the
record and file; or skipped and counted by reason).
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from vlmsel_jax.data import coco
from vlmsel_jax.data import easy_vqa
from vlmsel_jax.data import llava
from vlmsel_jax.data import paired
from vlmsel_jax.data import photos
from vlmsel_jax.data import records
from vlmsel_jax.data import registry
from vlmsel_jax.data import vqa
from vlmsel_jax.data.records import DataError


def pixels(seed: int, h: int = 6, w: int = 5) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_png(path, seed: int, h: int = 6, w: int = 5) -> np.ndarray:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  array = pixels(seed, h, w)
  Image.fromarray(array).save(path)
  return array


def assert_source(source):
  assert isinstance(source, records.RecordSource)
  assert isinstance(source.name, str) and source.name


# ---------------------------------------------------------------------------- folder (paired.py)


@pytest.fixture
def folder(tmp_path):
  arrays = {}
  lines = []
  for i in range(5):
    arrays[i] = write_png(str(tmp_path / "img" / f"{i}.png"), i)
    lines.append(json.dumps({"id": i, "image": f"img/{i}.png", "caption": f"caption {i}"}))
  return tmp_path, arrays, lines


def test_folder_source_reads_back(folder):
  root, arrays, lines = folder
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  source = registry.open_source(f"folder:{root}", kind="paired")
  assert_source(source)
  assert len(source) == 5 and not source.bad_records
  assert source.bad_records.as_dict() == {"skipped": 0, "by_reason": {}, "examples": []}
  for i in range(5):
    record = source[i]
    assert set(record) == {"id", "image", "caption"}
    assert record["id"] == str(i) and record["caption"] == f"caption {i}"
    assert record["image"].dtype == np.uint8
    np.testing.assert_array_equal(record["image"], arrays[i])
  assert paired.DataError is DataError  # Moved to records, still reachable from paired.


def _break_folder(root, lines):
  (root / "img" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  os.remove(root / "img" / "4.png")
  bad = lines[:1] + ['{"id": 9, "image": ', json.dumps({"id": 1, "image": "img/1.png",
                                                          "caption": "  "})]
  bad += lines[1:] + [lines[0]]  # The last line repeats id 0.
  (root / "captions.jsonl").write_text("\n".join(bad) + "\n")


def test_folder_source_bad_records_counted_or_raised(folder):
  root, arrays, lines = folder
  _break_folder(root, lines)
  source = paired.PairedSource(str(root), skip_bad_records=True)
  assert [source[i]["id"] for i in range(len(source))] == ["0", "1", "2"]
  summary = source.bad_records.as_dict()
  assert summary["skipped"] == 5
  assert summary["by_reason"] == {"duplicate id": 1, "empty caption": 1, "image not found": 1,
                                  "malformed JSON": 1, "undecodable image": 1}
  assert f"{root}/captions.jsonl:2: not valid JSON" in summary["examples"][0]
  with pytest.raises(DataError, match=r"captions.jsonl:2: not valid JSON"):
    paired.PairedSource(str(root))
  # load_paired (feature extraction's API) keeps its behaviour.
  with pytest.raises(DataError, match=r"captions.jsonl:2: not valid JSON"):
    paired.load_paired(str(root))


def test_folder_source_missing_image_error_names_line_and_file(folder):
  root, _, lines = folder
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  os.remove(root / "img" / "2.png")
  with pytest.raises(DataError, match=r"captions.jsonl: line 3 \(id 2\): image not found: "
                                      r".*img/2.png$"):
    paired.PairedSource(str(root))


def test_folder_source_finds_a_cut_jpeg_when_opened(folder):
  """A JPEG whose body is cut passes PIL's ``verify`` (headers only); opening the data decodes
  every image, so the run stops before it trains, naming the record and the file."""
  root, _, lines = folder
  Image.fromarray(pixels(7, 64, 64)).save(root / "img" / "2.jpg", quality=90)
  whole = (root / "img" / "2.jpg").read_bytes()
  (root / "img" / "2.jpg").write_bytes(whole[:len(whole) // 2])
  with Image.open(root / "img" / "2.jpg") as image:
    image.verify()  # The structure check alone would let it through.
  lines[2] = json.dumps({"id": 2, "image": "img/2.jpg", "caption": "caption 2"})
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"captions.jsonl: line 3 \(id 2\): undecodable image "
                                      r"\(OSError: image file is truncated.*img/2.jpg$"):
    registry.open_source(f"folder:{root}", kind="paired")
  source = paired.PairedSource(str(root), skip_bad_records=True)
  assert len(source) == 4
  assert source.bad_records.as_dict()["by_reason"] == {"undecodable image": 1}


# ----------------------------------------------------------------------------------------- LLaVA


def _llava_fixture(root, jsonl=False, extra=()):
  arrays = {k: write_png(str(root / "images" / "coco" / f"{k}.png"), k) for k in range(3)}
  rows = [
      {"id": "000001", "image": "coco/0.png", "conversations": [
          {"from": "human", "value": "<image>\nWhat is this?"},
          {"from": "gpt", "value": "A cat."},
          {"from": "human", "value": "And its colour?"},
          {"from": "gpt", "value": "Grey."}]},
      {"id": 2, "image": "coco/1.png", "conversations": [
          {"from": "human", "value": "Describe briefly.\n<image>"},
          {"from": "gpt", "value": "Two dogs on grass."}]},
      {"id": "3", "image": "coco/2.png", "conversations": [
          {"from": "human", "value": "<image>\nShare a concise interpretation."},
          {"from": "gpt", "value": " A red bus. "}]},
  ] + list(extra)
  path = root / ("data.jsonl" if jsonl else "data.json")
  if jsonl:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  else:
    path.write_text(json.dumps(rows))
  return str(path), str(root / "images"), arrays


def test_llava_conversation_and_paired_views(tmp_path):
  path, images, arrays = _llava_fixture(tmp_path)
  conv = registry.open_source(f"llava:{path}@{images}", kind="conversation")
  assert_source(conv)
  assert len(conv) == 3
  first = conv[0]
  assert set(first) == {"id", "image", "conversations"}
  assert first["id"] == "000001"
  assert first["conversations"] == [
      {"role": "user", "content": "<image>\nWhat is this?"},
      {"role": "assistant", "content": "A cat."},
      {"role": "user", "content": "And its colour?"},
      {"role": "assistant", "content": "Grey."}]
  np.testing.assert_array_equal(first["image"], arrays[0])
  assert conv[1]["id"] == "2"
  assert conv[1]["conversations"][0]["content"] == "Describe briefly.\n<image>"
  # The paired view: one record per single-caption record; the 4-turn one is not a caption.
  with pytest.raises(DataError, match=r"data.json: entry 0 \(id '000001'\): the paired view needs "
                                      r"exactly one gpt turn"):
    llava.LlavaSource(path, images, kind="paired")
  pairs = llava.LlavaSource(path, images, kind="paired", skip_bad_records=True)
  assert [(pairs[i]["id"], pairs[i]["caption"]) for i in range(2)] == [
      ("2", "Two dogs on grass."), ("3", "A red bus.")]
  np.testing.assert_array_equal(pairs[1]["image"], arrays[2])
  assert pairs.bad_records.as_dict()["by_reason"] == {"not a caption record": 1}


def test_llava_bad_records(tmp_path):
  extra = [
      {"id": "t", "conversations": [{"from": "human", "value": "hi"},
                                    {"from": "gpt", "value": "hello"}]},  # Text-only.
      {"id": "e", "image": "coco/0.png", "conversations": [{"from": "human", "value": ""}]},
      {"id": "r", "image": "coco/0.png", "conversations": [{"from": "robot", "value": "x"}]},
      {"id": "m", "image": "coco/missing.png", "conversations": [{"from": "gpt", "value": "x"}]},
  ]
  path, images, _ = _llava_fixture(tmp_path, jsonl=True, extra=extra)
  with open(path, "a") as f:
    f.write("{not json\n")
  source = llava.LlavaSource(path, images, skip_bad_records=True)
  assert len(source) == 3
  assert source.bad_records.as_dict()["by_reason"] == {
      "empty text": 1, "image not found": 1, "malformed JSON": 1, "malformed record": 1,
      "no image": 1}
  with pytest.raises(DataError, match=r"data.jsonl: line 4 \(id 't'\): no image"):
    llava.LlavaSource(path, images)


# ------------------------------------------------------------------------------------------ COCO


def _coco_fixture(root, broken=False):
  arrays = {k: write_png(str(root / "val2017" / f"{k:012d}.jpg.png"), k) for k in (5, 9)}
  images = [{"id": 5, "file_name": f"{5:012d}.jpg.png"}, {"id": 9, "file_name": f"{9:012d}.jpg.png"},
            {"id": 11, "file_name": "no_captions.png"}]
  anns = [{"id": 31, "image_id": 9, "caption": "A bird."},
          {"id": 12, "image_id": 5, "caption": "A boat on water."},
          {"id": 40, "image_id": 9, "caption": "A small bird. "},
          {"id": 7, "image_id": 5, "caption": "A sailing boat."}]
  if broken:
    images.append({"id": 13, "file_name": "gone.png"})
    anns += [{"id": 50, "image_id": 77, "caption": "orphan"},
             {"id": 51, "image_id": 9, "caption": ""},
             {"id": 52, "image_id": 13, "caption": "A missing file."}]
  path = root / "captions_val2017.json"
  path.write_text(json.dumps({"images": images, "annotations": anns}))
  return str(path), str(root / "val2017"), arrays


def test_coco_all_and_first_captions(tmp_path):
  path, root, arrays = _coco_fixture(tmp_path)
  every = registry.open_source(f"coco:{path}@{root}", kind="paired")
  assert_source(every)
  got = [(every[i]["id"], every[i]["caption"]) for i in range(len(every))]
  assert got == [("31", "A bird."), ("12", "A boat on water."), ("40", "A small bird."),
                 ("7", "A sailing boat.")]
  np.testing.assert_array_equal(every[1]["image"], arrays[5])
  first = registry.open_source(f"coco:{path}@{root}#captions=first", kind="paired")
  assert [(first[i]["id"], first[i]["caption"]) for i in range(len(first))] == [
      ("5", "A sailing boat."), ("9", "A bird.")]  # Lowest annotation id, images order.
  np.testing.assert_array_equal(first[1]["image"], arrays[9])


def test_coco_bad_records(tmp_path):
  path, root, _ = _coco_fixture(tmp_path, broken=True)
  source = coco.CocoCaptionsSource(path, root, skip_bad_records=True)
  assert len(source) == 4
  assert source.bad_records.as_dict()["by_reason"] == {
      "empty caption": 1, "image not found": 1, "unknown image": 1}
  with pytest.raises(DataError, match=r"captions_val2017.json: annotations\[4\] \(id '50'\): "
                                      r"image_id '77' is not in images"):
    coco.CocoCaptionsSource(path, root)


# ------------------------------------------------------------------------------------------- VQA


def _vqa_fixture(root, coco_names=True):
  folder = root / "train2014"
  arrays = {}
  for image_id in (42, 7):
    name = f"COCO_train2014_{image_id:012d}.jpg" if coco_names else f"{image_id}.png"
    array = pixels(image_id)
    os.makedirs(folder, exist_ok=True)
    # JPEG is lossy: write PNG bytes under the .jpg name (PIL reads by content).
    Image.fromarray(array).save(folder / name, format="PNG")
    arrays[image_id] = array
  questions = {"data_subtype": "train2014", "questions": [
      {"image_id": 42, "question": "How many dogs?", "question_id": 420},
      {"image_id": 7, "question": "What color is the bus?", "question_id": 70},
      {"image_id": 7, "question": "Is it raining?", "question_id": 71}]}
  annotations = {"annotations": [
      {"question_id": 420, "multiple_choice_answer": "2", "answers": [
          {"answer": a} for a in ["two", "2", "2", "Two.", "3", "2", "two", "1", "2", "2"]]},
      {"question_id": 70, "multiple_choice_answer": "red", "answers": [
          {"answer": a} for a in ["Red", "red and white", "white", "red", "white"]]},
      {"question_id": 71, "multiple_choice_answer": "no", "answers": [{"answer": "no"}]}]}
  (root / "q.json").write_text(json.dumps(questions))
  (root / "a.json").write_text(json.dumps(annotations))
  return str(root / "q.json"), str(root / "a.json"), str(folder), arrays


@pytest.mark.parametrize("coco_names", [True, False])
def test_vqa_source_reads_back(tmp_path, coco_names):
  q, a, folder, arrays = _vqa_fixture(tmp_path, coco_names)
  source = registry.open_source(f"vqa:{q},{a}@{folder}", kind="vqa")
  assert_source(source)
  assert len(source) == 3
  first = source[0]
  assert set(first) == {"id", "image", "question", "answers", "answer"}
  assert first["id"] == "420" and first["question"] == "How many dogs?"
  assert first["answers"] == ["two", "2", "2", "Two.", "3", "2", "two", "1", "2", "2"]
  assert first["answer"] == "2"  # "two"/"Two." normalize to "2": 8 of 10.
  np.testing.assert_array_equal(first["image"], arrays[42])
  # "red" twice ("Red", "red"), "white" twice: the tie goes to the first given.
  assert source[1]["answer"] == "red"
  np.testing.assert_array_equal(source[2]["image"], arrays[7])
  unanswered = vqa.VqaSource(q, None, folder)
  assert unanswered[1]["answers"] == [] and unanswered[1]["answer"] == ""


def test_vqa_source_bad_records(tmp_path):
  q, a, folder, _ = _vqa_fixture(tmp_path)
  document = json.loads(open(q).read())
  document["questions"] += [{"image_id": 5, "question": "Where?", "question_id": 50},
                            {"image_id": 42, "question": "Why?", "question_id": 99},
                            {"image_id": 42, "question": " ", "question_id": 420}]
  with open(q, "w") as f:
    json.dump(document, f)
  annotations = json.loads(open(a).read())
  annotations["annotations"].append({"question_id": 50, "answers": [{"answer": "home"}]})
  with open(a, "w") as f:
    json.dump(annotations, f)
  source = vqa.VqaSource(q, a, folder, skip_bad_records=True)
  assert len(source) == 3
  assert source.bad_records.as_dict()["by_reason"] == {
      "empty question": 1, "image not found": 1, "no annotation": 1}
  with pytest.raises(DataError, match=r"q.json: questions\[3\] \(question '50'\): no image for "
                                      r"image_id 5 in .*COCO_train2014_000000000005.jpg"):
    vqa.VqaSource(q, a, folder)


# ------------------------------------------------------------------------------------- easy-VQA


def test_easy_vqa_counts_and_records():
  rows = json.load(open(os.path.join(easy_vqa.data_dir(), "train", "questions.json")))
  source = registry.open_source("easy-vqa", kind="vqa", split="train")
  assert_source(source)
  assert len(source) == len(rows) == 38575
  assert len(easy_vqa.load("test", "vqa")) == 9673
  record = source[0]
  question, answer, image_id = rows[0]
  assert record["question"] == question and record["answers"] == [answer]
  assert record["answer"] == vqa.normalize_answer(answer)
  ref = np.asarray(Image.open(os.path.join(easy_vqa.data_dir(), "train", "images",
                                           f"{image_id}.png")).convert("RGB"))
  np.testing.assert_array_equal(record["image"], ref)
  assert record["image"].shape == (64, 64, 3)
  counts = collections.Counter(r[1] for r in rows)
  assert easy_vqa.majority_answer() == counts.most_common(1)[0][0] == "yes"
  with open(os.path.join(easy_vqa.data_dir(), "answers.txt")) as f:
    assert easy_vqa.answers() == [line.strip() for line in f if line.strip()]
  assert len(easy_vqa.answers()) == 13 and set(counts) <= set(easy_vqa.answers())


@pytest.mark.parametrize("split, images", [("train", 4000), ("test", 1000)])
def test_easy_vqa_paired_captions(split, images):
  source = easy_vqa.load(split, "paired")
  assert len(source) == images and not source.bad_records
  assert source[0]["id"] == f"{split}/0"
  assert source[0]["caption"] == ("A blue rectangle." if split == "train" else
                                  "A red triangle.")  # Read off the questions by hand.
  captions = [source._entries[i][2] for i in range(len(source))]  # pylint: disable=protected-access
  for text in captions:
    _, color, shape = text.rstrip(".").split()
    assert color in easy_vqa.COLORS and shape in easy_vqa.SHAPES


@pytest.mark.parametrize("split", ["train", "test"])
def test_easy_vqa_pixels_agree_with_questions(split):
  # The pixel fallback must agree with every attribute the questions decide.
  decided = easy_vqa.attributes_from_questions(easy_vqa.questions(split))
  checked = 0
  for image_id, attrs in decided.items():
    image = records.decode_image(easy_vqa.image_path(split, image_id), "")
    from_pixels = easy_vqa.attributes_from_pixels(image)
    for key, value in attrs.items():
      if value is not None:
        assert from_pixels[key] == value, (split, image_id, key)
        checked += 1
  assert checked > 1.8 * len(decided)


def test_easy_vqa_attributes_from_question_rules():
  rows = [("what is the blue shape?", "rectangle", 1),
          ("is there not a red shape?", "no", 2), ("is there a triangle?", "yes", 2),
          ("does the image contain a circle?", "no", 3),
          ("is no rectangle present?", "yes", 3), ("what color is the shape?", "teal", 3),
          ("is there a green shape?", "yes", 4), ("is there a red shape?", "yes", 4)]
  got = easy_vqa.attributes_from_questions(rows[:6])
  assert got == {1: {"shape": "rectangle", "color": "blue"},
                 2: {"shape": "triangle", "color": "red"},
                 3: {"shape": "triangle", "color": "teal"}}  # Circle and rectangle ruled out.
  with pytest.raises(DataError, match=r"image 4: its questions contradict each other on the "
                                      r"color"):
    easy_vqa.attributes_from_questions(rows)
  blank = np.full((64, 64, 3), 240, np.uint8)
  assert easy_vqa.attributes_from_pixels(blank) == {"shape": None, "color": None}
  drawn = blank.copy()
  drawn[10:30, 20:50] = easy_vqa.COLORS["teal"]
  assert easy_vqa.attributes_from_pixels(drawn) == {"shape": "rectangle", "color": "teal"}
  yy, xx = np.mgrid[:64, :64]
  disc = blank.copy()
  disc[(yy - 30) ** 2 + (xx - 30) ** 2 <= 15 ** 2] = easy_vqa.COLORS["yellow"]
  assert easy_vqa.attributes_from_pixels(disc) == {"shape": "circle", "color": "yellow"}
  tri = blank.copy()
  tri[(yy >= 10) & (yy < 50) & (np.abs(xx - 32) <= (yy - 10) / 2)] = easy_vqa.COLORS["black"]
  assert easy_vqa.attributes_from_pixels(tri) == {"shape": "triangle", "color": "black"}


def test_easy_vqa_errors():
  with pytest.raises(DataError, match="easy-vqa has splits train, test, not 'val'"):
    easy_vqa.load("val")
  with pytest.raises(DataError, match="easy-vqa has kinds vqa, paired, not 'caption'"):
    easy_vqa.load("train", "caption")


# --------------------------------------------------------------------------------------- photos


def test_photos_match_the_packages():
  import skimage.data  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  source = registry.open_source("photos", kind="paired")
  assert_source(source)
  assert len(source) == len(photos.SKIMAGE_PHOTOS) + 2
  by_id = {source[i]["id"]: source[i] for i in range(len(source))}
  np.testing.assert_array_equal(by_id["skimage/astronaut"]["image"], skimage.data.astronaut())
  camera = by_id["skimage/camera"]["image"]
  assert camera.shape == (512, 512, 3)
  for c in range(3):
    np.testing.assert_array_equal(camera[:, :, c], skimage.data.camera())
  assert by_id["skimage/hubble_deep_field"]["caption"] == "hubble deep field"
  sample = load_sample_images()
  for name, image in zip(sample.filenames, sample.images):
    key = "sklearn/" + os.path.splitext(os.path.basename(name))[0]
    np.testing.assert_array_equal(by_id[key]["image"], image)
  assert len(registry.open_source("photos:sklearn", kind="paired")) == 2


# ------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("spec, kind, match", [
    ("imagenet:/x", "paired", r"data spec 'imagenet:/x': unknown source 'imagenet' \(known: "
                              r"easy-vqa, photos"),
    ("easy-vqa", "conversation", r"easy-vqa gives vqa, paired records, not 'conversation'"),
    ("easy-vqa:train", "vqa", r"easy-vqa takes no argument"),
    ("llava:/only/file.json", "paired", r"expected llava:<annotation file>@<image root>"),
    ("coco:/a.json@/b#max=3", "paired", r"unknown option 'max' for coco \(known: captions\)"),
    ("photos:imagenet", "paired", r"photos collections are skimage, sklearn"),
    ("folder:", "paired", r"folder needs a path"),
    ("folder:/no/such/dir", "paired", r"/no/such/dir: image folder not found"),
    ("vqa:/q.json,@/root", "vqa", r"expected vqa:<questions.json>\[,<annotations.json>\]"),
])
def test_registry_errors_are_one_line(spec, kind, match):
  with pytest.raises(DataError, match=match) as info:
    registry.open_source(spec, kind=kind)
  assert "\n" not in str(info.value)


def test_bad_records_summary():
  bad = records.BadRecords()
  assert not bad and str(bad) == "no records skipped"
  for i in range(7):
    bad.add("empty caption" if i % 3 else "image not found", f"f.json: entry {i}: problem")
  assert bad.as_dict() == {"skipped": 7, "by_reason": {"empty caption": 4, "image not found": 3},
                           "examples": [f"f.json: entry {i}: problem" for i in range(5)]}
  assert str(bad).startswith("7 records skipped (4 empty caption, 3 image not found)")
