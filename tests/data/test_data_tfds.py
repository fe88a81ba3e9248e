"""Tests for vlmsel_jax.data.tfds_source: a tiny TFDS dataset written here, read back.

The dataset is prepared by TFDS's own builder (``download_and_prepare``, ArrayRecord files,
``dataset_info.json``) through `tfds_source.write_dataset`, without TensorFlow, and read with
``tfds.data_source``; every record must come back equal to what was written (TFDS stores
examples in its own shuffled order, so they are matched by id).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import numpy as np
import pytest

from vlmsel_jax.data import registry
from vlmsel_jax.data import tfds_source
from vlmsel_jax.data.records import DataError


def _image(i):
  return np.random.default_rng(i).integers(0, 256, (5 + i, 7, 3), dtype=np.uint8)


def _paired(n, offset=0):
  return [{"id": f"p{i}", "image": _image(i), "caption": f"Caption number {i}."}
          for i in range(offset, offset + n)]


def test_tensorflow_is_not_needed():
  # The point of the TF-free route; if TF ever gets installed this test still checks imports.
  assert importlib.util.find_spec("tensorflow") is None or "tensorflow" not in sys.modules


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  tfds_source.write_dataset("tiny_pairs", root, {"train": _paired(6), "test": _paired(3, 10)})
  vqa_records = [{"id": f"q{i}", "image": _image(i), "question": f"How many {i}?",
                  "answers": ["two", "2", "Two."] if i % 2 else ["yes"], "answer": "whatever"}
                 for i in range(4)]
  tfds_source.write_dataset("tiny_vqa", root, {"train": vqa_records}, kind="vqa")
  conv = [{"id": f"c{i}", "image": _image(i), "conversations": [
      {"role": "user", "content": f"<image>\nQuestion {i}?"},
      {"role": "assistant", "content": f"Answer {i}."}]} for i in range(3)]
  tfds_source.write_dataset("tiny_conv", root, {"train": conv}, kind="conversation")
  bad = _paired(3) + [{"id": "empty", "image": _image(9), "caption": "   "}]
  tfds_source.write_dataset("tiny_bad", root, {"train": bad})
  return root


def test_written_dataset_is_array_record_with_metadata(data_dir):
  folder = os.path.join(data_dir, "tiny_pairs", "1.0.0")
  assert os.path.isfile(os.path.join(folder, "dataset_info.json"))
  assert glob.glob(os.path.join(folder, "tiny_pairs-train.array_record-*"))
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("split, expected", [("train", _paired(6)), ("test", _paired(3, 10))])
def test_paired_read_back(data_dir, split, expected):
  source = registry.open_source(f"tfds:tiny_pairs@{data_dir}", kind="paired", split=split)
  assert source.name == f"tiny_pairs-{split}" and not source.bad_records
  got = {source[i]["id"]: source[i] for i in range(len(source))}
  assert len(got) == len(source) == len(expected)
  for record in expected:
    back = got[record["id"]]
    assert set(back) == {"id", "image", "caption"}
    assert back["caption"] == record["caption"]
    assert back["image"].dtype == np.uint8
    np.testing.assert_array_equal(back["image"], record["image"])


def test_vqa_and_conversation_read_back(data_dir):
  source = registry.open_source(f"tfds:tiny_vqa@{data_dir}", kind="vqa")
  got = {source[i]["id"]: source[i] for i in range(len(source))}
  assert got["q1"]["answers"] == ["two", "2", "Two."]
  assert got["q1"]["question"] == "How many 1?"
  assert got["q1"]["answer"] == "whatever"  # The stored answer feature, normalized.
  np.testing.assert_array_equal(got["q3"]["image"], _image(3))
  # Without an answer feature the majority of the normalized answers is used.
  no_answer = tfds_source.TfdsSource("tiny_vqa", data_dir, kind="vqa",
                                     fields={"answer": "no_such_feature"})
  assert {no_answer[i]["id"]: no_answer[i]["answer"] for i in range(4)}["q1"] == "2"
  conv = registry.open_source(f"tfds:tiny_conv@{data_dir}", kind="conversation")
  by_id = {conv[i]["id"]: conv[i] for i in range(len(conv))}
  assert by_id["c2"]["conversations"] == [
      {"role": "user", "content": "<image>\nQuestion 2?"},
      {"role": "assistant", "content": "Answer 2."}]
  np.testing.assert_array_equal(by_id["c2"]["image"], _image(2))


def test_field_mapping_and_errors(data_dir):
  renamed = registry.open_source(f"tfds:tiny_conv@{data_dir}#caption=id", kind="paired")
  assert sorted(renamed[i]["caption"] for i in range(3)) == ["c0", "c1", "c2"]
  with pytest.raises(DataError, match=r"has no feature 'caption' \(for caption\); it has "
                                      r"conversations, id, image"):
    registry.open_source(f"tfds:tiny_conv@{data_dir}", kind="paired")
  with pytest.raises(DataError, match=r"tfds:nope_set .*cannot open as an ArrayRecord data "
                                      r"source: Dataset nope_set not found"):
    registry.open_source(f"tfds:nope_set@{data_dir}", kind="paired")
  with pytest.raises(DataError, match=r"split 'validation'.*Unknown split 'validation'"):
    registry.open_source(f"tfds:tiny_pairs@{data_dir}", kind="paired", split="validation")


def test_bad_records_skipped_or_raised(data_dir):
  skipping = registry.open_source(f"tfds:tiny_bad@{data_dir}", kind="paired",
                                  skip_bad_records=True)
  assert len(skipping) == 3
  assert sorted(skipping[i]["id"] for i in range(3)) == ["p0", "p1", "p2"]
  summary = skipping.bad_records.as_dict()
  assert summary["skipped"] == 1 and summary["by_reason"] == {"empty caption": 1}
  assert "(id 'empty'): empty caption" in summary["examples"][0]
  strict = registry.open_source(f"tfds:tiny_bad@{data_dir}", kind="paired")
  assert len(strict) == 4
  with pytest.raises(DataError, match=r"tiny_bad/1.0.0: example \d \(id 'empty'\): empty caption"):
    for i in range(4):
      strict[i]
