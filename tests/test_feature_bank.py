"""Feature banks: round trips in both formats, pairing by ids, and clear errors."""

import json
import os

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
