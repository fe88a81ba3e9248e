"""benchmarks/device_check.py's dry mode: the whole device check end to end on CPU, tiny sizes.

Runs the Python entry in a subprocess (DEVICE_CHECK_DRY=1, as device_check.sh passes it on)
and checks that the JSON and the markdown table are written with every section present, each
row either measured or marked "skipped: <why>".
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "device_check.py")
SECTIONS = ("gw_single", "gw_batch", "extraction", "train_step")


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
      assert row["status"] == "ok" or row["status"].startswith("skipped: "), (section, row)
  # Every size of the dry plan has a row in both GW sections; extraction has both towers.
  assert [r["n"] for r in result["gw_single"]] == meta["plan"]["gw_sizes"]
  assert [r["n"] for r in result["gw_batch"]] == meta["plan"]["gw_sizes"]
  assert {r["name"] for r in result["extraction"]} == {"vit_b16", "efficientnet_lite0"}
  table = (tmp_path / "device_check.md").read_text(encoding="utf-8")
  assert meta["device_kind"] in table and meta["versions"]["jax"] in table
  for label in ("GW one problem", "GW batch", "extraction vit_b16", "extraction efficientnet_lite0",
                "train step"):
    assert label in table, label
