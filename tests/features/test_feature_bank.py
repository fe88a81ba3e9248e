"""Feature banks: round trips in both formats, pairing by ids, and clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from vlmsel_jax.features import feature_bank as fb


@pytest.mark.parametrize("ext", [".safetensors", ".npz"])
@pytest.mark.parametrize("ids", [np.arange(10, 20), np.array([f"img{i}" for i in range(10)])])
def test_round_trip(tmp_path, ext, ids):
  feats = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
  path = str(tmp_path / f"bank{ext}")
  fb.save_bank(path, feats, ids, {"name": "clip-b16", "layer": -1})
  bank = fb.load_bank(path)
  np.testing.assert_array_equal(bank.features, feats)
  np.testing.assert_array_equal(bank.ids, ids)
  if ext == ".safetensors":
    assert bank.name == "clip-b16" and bank.metadata["layer"] == "-1"
  else:
    assert bank.name == "bank"
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_align_reorders_rows_by_id(tmp_path):
  feats = np.arange(12, dtype=np.float32).reshape(6, 2)
  bank = fb.FeatureBank(features=feats, ids=np.array([5, 4, 3, 2, 1, 0]), path="b")
  out = fb.align_to(bank, np.arange(6), "text")
  np.testing.assert_array_equal(out, feats[::-1])


def test_align_reports_missing_ids():
  bank = fb.FeatureBank(features=np.zeros((3, 2)), ids=np.array([0, 1, 7]), path="cand.npz")
  with pytest.raises(fb.BankError, match=r"cand.npz: pair ids do not match text.npz: 1 of 3 ids "
                     r"missing, 1 extra \(e.g. id 2 is missing\)"):
    fb.align_to(bank, np.arange(3), "text.npz")


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(fb.BankError, match="nope.npz: feature bank file not found"):
    fb.load_bank(str(tmp_path / "nope.npz"))
  p = tmp_path / "noids.npz"
  np.savez(p, features=np.zeros((4, 2)))
  with pytest.raises(fb.BankError, match="noids.npz: no 'ids'"):
    fb.load_bank(str(p))
  p = tmp_path / "nofeat.safetensors"
  save_file({"x": np.zeros((4, 2), np.float32)}, str(p))
  with pytest.raises(fb.BankError, match=r"nofeat.safetensors: no 'features' tensor \(found: x\)"):
    fb.load_bank(str(p))
  p = tmp_path / "threed.npz"
  np.savez(p, features=np.zeros((4, 2, 2)), ids=np.arange(4))
  with pytest.raises(fb.BankError, match="must be 2-D"):
    fb.load_bank(str(p))
  p = tmp_path / "dup.npz"
  np.savez(p, features=np.zeros((3, 2)), ids=np.array([1, 1, 2]))
  with pytest.raises(fb.BankError, match="duplicates"):
    fb.load_bank(str(p))
  p = tmp_path / "trunc.safetensors"
  fb.save_bank(str(p), np.ones((8, 8), np.float32), np.arange(8))
  p.write_bytes(p.read_bytes()[:60])
  with pytest.raises(fb.BankError, match="trunc.safetensors: cannot read feature bank"):
    fb.load_bank(str(p))
  with pytest.raises(fb.BankError, match="unsupported feature bank format '.pt'"):
    fb.load_bank(_touch(tmp_path / "x.pt"))


def _touch(p):
  p.write_bytes(b"")
  return str(p)


def test_string_ids_in_safetensors_metadata(tmp_path):
  p = str(tmp_path / "s.safetensors")
  save_file({"features": np.ones((2, 2), np.float32)}, p, metadata={"ids": json.dumps(["a", "b"])})
  assert fb.load_bank(p).ids.tolist() == ["a", "b"]


def _features_region(path):
  """(start, end) byte offsets of the 'features' tensor's data in a .safetensors file."""
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
  begin, end = header["features"]["data_offsets"]
  return 8 + size + begin, 8 + size + end


def _flip_in_place(path, start, end):
  """Overwrites bytes in [start, end) of ``path`` (same size): a float32 3.4e38 mid-region."""
  data = bytearray(open(path, "rb").read())
  at = start + ((end - start) // 2) // 4 * 4
  data[at:at + 4] = b"\xff\xff\x7f\x7f"
  before = os.path.getsize(path)
  open(path, "r+b").write(bytes(data))
  assert os.path.getsize(path) == before


@pytest.mark.parametrize("ids", [np.arange(10, 30), np.array([f"img{i}" for i in range(20)])])
def test_bytes_changed_in_place_are_a_checksum_mismatch_on_read(tmp_path, ids):
  feats = np.random.default_rng(1).standard_normal((20, 6)).astype(np.float32)
  path = str(tmp_path / "bank.safetensors")
  fb.save_bank(path, feats, ids, {"name": "clip"})
  bank = fb.load_bank(path)
  assert bank.metadata[fb.CHECKSUM_KEY] == fb.content_checksum(feats, ids)
  assert fb.check_bank(path)[1] == (20, 6)
  _flip_in_place(path, *_features_region(path))
  want = rf"^{path}: checksum mismatch: the file changed after it was written \(.*\)"
  with pytest.raises(fb.BankError, match=want) as e:
    fb.load_bank(path)
  assert "\n" not in str(e.value)
  fb._CHUNK_BYTES, chunk = 48, fb._CHUNK_BYTES  # pylint: disable=protected-access
  try:  # Hashed two rows at a time: the same answer as the whole array.
    with pytest.raises(fb.BankError, match=want):
      fb.check_bank(path)
    fb.save_bank(path, feats, ids)
    assert fb.check_bank(path)[1] == (20, 6)
  finally:
    fb._CHUNK_BYTES = chunk  # pylint: disable=protected-access


def test_changed_ids_are_a_checksum_mismatch_not_another_error(tmp_path):
  path = str(tmp_path / "bank.safetensors")
  fb.save_bank(path, np.ones((4, 2), np.float32), np.arange(4))
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    begin, _ = json.loads(f.read(size))["ids"]["data_offsets"]
  data = bytearray(open(path, "rb").read())
  data[8 + size + begin] = 1  # Id 0 becomes 1: a duplicate, reported as the corruption it is.
  open(path, "r+b").write(bytes(data))
  with pytest.raises(fb.BankError, match="bank.safetensors: checksum mismatch"):
    fb.load_bank(path)


def test_npz_bank_records_and_checks_its_checksum(tmp_path):
  path = str(tmp_path / "bank.npz")
  feats = np.arange(12, dtype=np.float32).reshape(6, 2)
  fb.save_bank(path, feats, np.arange(6))
  np.testing.assert_array_equal(fb.load_bank(path).features, feats)
  with np.load(path) as f:
    arrays = dict(f)
  arrays["features"] = arrays["features"].copy()
  arrays["features"][3, 1] = 3.4e38  # Rewritten with other values but the old checksum.
  np.savez(path, **arrays)
  with pytest.raises(fb.BankError, match="bank.npz: checksum mismatch"):
    fb.load_bank(path)


@pytest.mark.parametrize("ext", [".safetensors", ".npz"])
def test_a_bank_without_checksum_still_reads(tmp_path, ext):
  feats = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
  path = str(tmp_path / f"old{ext}")
  if ext == ".safetensors":  # As banks were written before they recorded a checksum.
    save_file({"features": feats, "ids": np.arange(5, dtype=np.int64)}, path,
              metadata={"name": "old", "cache_key": "k"})
  else:
    np.savez(path, features=feats, ids=np.arange(5))
  bank = fb.load_bank(path)
  np.testing.assert_array_equal(bank.features, feats)
  assert fb.CHECKSUM_KEY not in bank.metadata
  assert fb.check_bank(path)[1] == (5, 3)


def test_score_on_a_corrupt_bank_is_one_line(tmp_path):
  rng = np.random.default_rng(3)
  text = str(tmp_path / "text.safetensors")
  fb.save_bank(text, rng.standard_normal((16, 4)).astype(np.float32), np.arange(16))
  cand = str(tmp_path / "cand.safetensors")
  fb.save_bank(cand, rng.standard_normal((16, 3)).astype(np.float32), np.arange(16))
  _flip_in_place(cand, *_features_region(cand))
  proc = subprocess.run(
      [sys.executable, "-m", "vlmsel_jax.score", f"--banks={cand}", f"--text_bank={text}",
       "--metrics=cka", f"--output_dir={tmp_path / 'out'}"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if "error" in l]
  assert len(errors) == 1 and errors[0].startswith(
      f"score: error: {cand}: checksum mismatch: the file changed after it was written"), errors
  assert not (tmp_path / "out").exists()
