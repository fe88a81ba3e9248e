"""Multi-host scoring: two local processes × 4 CPU devices give the single-process result.

Each process is started with ``--coordinator_address/--num_processes/--process_id`` on a free
localhost port, exactly as a pod slice runs the binary on every worker. The reference is the
same pool scored in this process (8 simulated devices, see conftest.py). Subprocesses run under
a timeout so a hang (e.g. a host callback inside a multi-device program) fails the test.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import multiprocess_util
from vlmsel_jax.features import feature_bank as fb
from vlmsel_jax.scoring import pool as scoring
from vlmsel_jax.scoring import synthetic
from vlmsel_jax.scores import gw

N = 160  # Above the ~150 where host callbacks in multi-device programs hung (gw.py).
K = 16  # The 12-candidate synthetic pool, cycled with different row subsets.
TIMEOUT_S = 240
# Intervals off: their replicates would multiply the run time of every process (they are tested
# in test_uncertainty.py on one process).
FLAGS = ["--metrics=gw,cka", "--gw_anneal_iterations=5", "--gw_iterations=20", "--noprogress",
         "--bootstrap=0", "--permutations=0"]


def _pool():
  pool = synthetic.make_pool(n=N + K, seed=3)
  names, feats = [], []
  for i in range(K):
    rows = slice(i // 12, i // 12 + N)
    names.append(f"{pool.names[i % 12]}_{i // 12}")
    feats.append(pool.candidates[i % 12][rows])
  return names, feats, pool.text[:N], pool.ids[:N]


@pytest.fixture(scope="module", name="banks")
def _banks(tmp_path_factory):
  d = tmp_path_factory.mktemp("mp_banks")
  names, feats, text, ids = _pool()
  text_path = str(d / "text.npz")
  fb.save_bank(text_path, text, ids, {"name": "llm"})
  paths = []
  for name, x in zip(names, feats):
    paths.append(str(d / f"{name}.npz"))
    fb.save_bank(paths[-1], x, ids, {"name": name})
  return names, feats, text, paths, text_path, d


def _run_processes(argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
  return multiprocess_util.run_processes(
      [[sys.executable, "-m", "vlmsel_jax.score"] + argv for argv in argvs], devices=4,
      timeout=TIMEOUT_S)


def test_multiprocess_score_matches_single_process(banks):
  names, feats, text, paths, text_path, d = banks
  port = multiprocess_util.free_port()
  argvs = [[f"--banks={','.join(paths)}", f"--text_bank={text_path}",
            f"--output_dir={d / f'out{i}'}", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={i}"] + FLAGS for i in range(2)]
  results = _run_processes(argvs)
  for i, r in enumerate(results):
    assert r.returncode == 0, f"process {i} failed:\n{r.stderr[-3000:]}"
  # Only process 0 writes.
  assert os.path.exists(d / "out0" / "scores.json")
  assert not os.path.exists(d / "out1")
  assert "scores.json" in results[0].stdout and "scores" not in results[1].stdout
  got = json.load(open(d / "out0" / "scores.json"))
  assert got["run"]["processes"] == 2 and got["run"]["devices"].startswith("8 ")

  settings = scoring.ScoreSettings(gw_options=gw.AnnealedOptions(stage_iterations=5,
                                                                 gw_iterations=20))
  want = scoring.score_pool(names, feats, text, ["gw", "cka"], settings, show_progress=False)
  for name in names:
    # Same 2-candidates-per-device blocks and programs as the 8-device reference: equal up to
    # float32 round-off of a different process layout.
    np.testing.assert_allclose(got["scores"][name]["gw"], want.values["gw"][name], rtol=1e-4,
                               atol=1e-7, err_msg=name)
    np.testing.assert_allclose(got["scores"][name]["cka"], want.values["cka"][name], rtol=1e-6,
                               err_msg=name)
  assert got["rankings"]["gw"] == want.rankings["gw"]


def test_multiprocess_half_specified_settings_fail_with_one_line(banks):
  _, _, _, paths, text_path, d = banks
  r = subprocess.run([sys.executable, "-m", "vlmsel_jax.score", f"--banks={paths[0]}",
                      f"--text_bank={text_path}", f"--output_dir={d / 'bad'}", "--num_processes=2"]
                     + FLAGS, env=multiprocess_util.cpu_env(1), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert r.returncode == 1
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("score: error: distributed settings are incomplete: num_processes=2 "
                         "given but coordinator_address, process_id missing"), r.stderr


WORKER = """
import json, sys
from vlmsel_jax.runtime import parallel
parallel.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
from vlmsel_jax.scoring import synthetic
from vlmsel_jax.scores import gw
pool = synthetic.make_pool(n=160, seed=0)
x, y = pool.candidates[5], pool.text
res = gw.gw_distance(x, y, options=gw.AnnealedOptions(stage_iterations=5), devices=jax.devices())
out = {"dense": {"value": res.value, "iterations": res.iterations}}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # ~45 s on 2 cores: two more JAX start-ups and a cross-process solve.
def test_multiprocess_one_problem_sharded_over_both_hosts():
  """One 160 × 160 problem: rows of every n×n matrix split over the 8 devices of 2 processes."""
  port = multiprocess_util.free_port()
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, f"127.0.0.1:{port}", str(i)],
                            env=multiprocess_util.cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = []
  try:
    for i, p in enumerate(procs):
      out, err = p.communicate(timeout=TIMEOUT_S)
      assert p.returncode == 0, f"process {i} failed:\n{err[-3000:]}"
      outs.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  pool = synthetic.make_pool(n=160, seed=0)
  x, y = pool.candidates[5], pool.text
  # (lowrank_gw_large runs sharded over processes too, but its many small cross-process
  # reductions make it minutes slow on CPU processes; tests/runtime/test_parallel_large_n.py checks it
  # sharded over the devices of one process.)
  want = {"dense": gw.gw_distance(x, y, options=gw.AnnealedOptions(stage_iterations=5))}
  for got in outs:  # Every process returns the whole result.
    for key in want:
      np.testing.assert_allclose(got[key]["value"], want[key].value, rtol=1e-4, err_msg=key)
      assert got[key]["iterations"] == want[key].iterations, key
