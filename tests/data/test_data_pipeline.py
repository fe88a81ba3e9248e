"""Tests for vlmsel_jax.data.pipeline: fractions, sharding, padding, lockstep, resume.

Records carry their own index, so every batch can be checked against the index plan written out
by hand below (selection → per-epoch order → strided shards → padded batches).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vlmsel_jax.data import pipeline


class RangeSource:
  """n records; record i is {"id": str(i), "value": i}."""

  name = "range"

  def __init__(self, n: int):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return {"id": str(i), "value": i}


def to_arrays(record):
  i = record["value"]
  return {"index": np.int64(i), "feature": np.full((2, 3), i, np.float32)}


def make(n=23, **kwargs):
  kwargs.setdefault("batch_size", 4)
  kwargs.setdefault("seed", 7)
  return pipeline.Loader(RangeSource(n), to_arrays, **kwargs)


def expected_plan(n, *, batch_size, seed, epochs, shard_index, shard_count, fraction=1.0,
                  shuffle=True):
  """Per batch: (real indices) — the index plan written out directly."""
  if fraction == 1.0:
    selected = np.arange(n)
  else:
    selected = np.random.default_rng(seed).permutation(n)[:int(np.ceil(round(fraction * n, 9)))]
  if not shuffle:
    selected = np.sort(selected)
  per_shard = -(-len(selected) // shard_count)
  batches_per_epoch = -(-per_shard // batch_size)
  out = []
  for e in range(epochs):
    order = selected[np.random.default_rng([seed, e]).permutation(len(selected))] if shuffle \
        else selected
    mine = order[shard_index::shard_count]
    for b in range(batches_per_epoch):
      out.append(mine[b * batch_size:(b + 1) * batch_size].tolist())
  return out


def test_fraction_indices_nested_and_sized():
  full = pipeline.fraction_indices(1000, 1.0, seed=3)
  assert sorted(full.tolist()) == list(range(1000))
  previous = np.array([], np.int64)
  for r, size in [(0.01, 10), (0.1, 100), (0.25, 250), (0.333, 333), (0.7, 700), (1.0, 1000)]:
    chosen = pipeline.fraction_indices(1000, r, seed=3)
    assert len(chosen) == size
    assert len(set(chosen.tolist())) == size
    np.testing.assert_array_equal(chosen[:len(previous)], previous)  # Nested: a prefix.
    previous = chosen
  # ceil, not round: 0.7 * 10 = 7.000000000000001 must give 7, 0.71 * 10 gives 8.
  assert len(pipeline.fraction_indices(10, 0.7, seed=0)) == 7
  assert len(pipeline.fraction_indices(10, 0.71, seed=0)) == 8
  assert len(pipeline.fraction_indices(10, 0.01, seed=0)) == 1
  # Permutation order, not sorted; another seed gives another subset.
  small = pipeline.fraction_indices(1000, 0.1, seed=3)
  assert not np.all(np.diff(small) > 0)
  assert set(small.tolist()) != set(pipeline.fraction_indices(1000, 0.1, seed=4).tolist())
  np.testing.assert_array_equal(small, np.random.default_rng(3).permutation(1000)[:100])
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="fraction must be in"):
      pipeline.fraction_indices(10, bad, seed=0)


def test_loader_batches_match_hand_written_plan():
  loader = make(23, batch_size=4, seed=7, num_epochs=2, shard_index=1, shard_count=3)
  plan = expected_plan(23, batch_size=4, seed=7, epochs=2, shard_index=1, shard_count=3)
  batches = list(loader)
  assert len(batches) == len(loader) == len(plan) == 2 * 2
  for batch, real in zip(batches, plan):
    assert set(batch) == {"index", "feature", "mask"}
    assert batch["index"].shape == (4,) and batch["feature"].shape == (4, 2, 3)
    assert batch["mask"].dtype == bool
    np.testing.assert_array_equal(batch["mask"], np.arange(4) < len(real))
    np.testing.assert_array_equal(batch["index"][:len(real)], real)
    # Padding rows repeat the batch's real rows.
    pad = np.arange(len(real), 4)
    np.testing.assert_array_equal(batch["index"][pad], np.asarray(real)[pad % len(real)])
    np.testing.assert_array_equal(batch["feature"][:, 0, 0], batch["index"])


def test_epochs_reshuffle_and_seed_determines_order():
  a = [b["index"].tolist() for b in make(40, num_epochs=2, shard_index=0, shard_count=1)]
  b = [b["index"].tolist() for b in make(40, num_epochs=2, shard_index=0, shard_count=1)]
  c = [b["index"].tolist() for b in make(40, num_epochs=2, seed=8, shard_index=0,
                                         shard_count=1)]
  assert a == b
  assert a != c
  first, second = sum(a[:10], []), sum(a[10:], [])
  assert sorted(first) == sorted(second) == list(range(40))
  assert first != second


def test_no_shuffle_is_source_order_and_fraction_sorted():
  batches = list(make(10, batch_size=4, shuffle=False, shard_index=0, shard_count=1))
  assert [b["index"][b["mask"]].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                                [8, 9]]
  loader = make(100, batch_size=8, shuffle=False, fraction=0.2, shard_index=0, shard_count=1)
  seen = np.concatenate([b["index"][b["mask"]] for b in loader])
  np.testing.assert_array_equal(seen, np.sort(pipeline.fraction_indices(100, 0.2, seed=7)))


@pytest.mark.parametrize("n, shards, batch_size, fraction", [
    (23, 2, 4, 1.0), (23, 3, 4, 1.0), (37, 4, 3, 1.0), (5, 8, 2, 1.0), (100, 3, 7, 0.3)])
def test_shard_disjoint_complete_and_lockstep(n, shards, batch_size, fraction):
  for epoch_count in (1, 2):
    per_shard = [list(make(n, batch_size=batch_size, num_epochs=epoch_count, fraction=fraction,
                           shard_index=k, shard_count=shards)) for k in range(shards)]
    lengths = {len(batches) for batches in per_shard}
    assert len(lengths) == 1, "every shard must yield the same number of batches"
    steps_per_epoch = lengths.pop() // epoch_count
    selected = set(pipeline.fraction_indices(n, fraction, seed=7).tolist()) if fraction < 1 \
        else set(range(n))
    for e in range(epoch_count):
      seen = []
      for k in range(shards):
        for batch in per_shard[k][e * steps_per_epoch:(e + 1) * steps_per_epoch]:
          seen += batch["index"][batch["mask"]].tolist()
      assert len(seen) == len(set(seen)), "shards overlap"
      assert set(seen) == selected, "shards miss records"
    # Global step b covers a contiguous slice of the epoch order, as one host would.
    for k in range(shards):
      plan = expected_plan(n, batch_size=batch_size, seed=7, epochs=epoch_count, shard_index=k,
                           shard_count=shards, fraction=fraction)
      got = [b["index"][b["mask"]].tolist() for b in per_shard[k]]
      assert got == plan


def test_drop_remainder_keeps_full_real_batches_in_lockstep():
  loaders = [make(23, batch_size=4, drop_remainder=True, shard_index=k, shard_count=2)
             for k in range(2)]
  assert [len(loader) for loader in loaders] == [2, 2]  # floor(11 / 4) on both shards.
  seen = []
  for loader in loaders:
    for batch in loader:
      assert batch["mask"].all()
      seen += batch["index"].tolist()
  assert len(seen) == len(set(seen)) == 16
  with pytest.raises(ValueError, match="do not fill one batch"):
    make(5, batch_size=4, drop_remainder=True, shard_index=0, shard_count=2)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_iterator_resume_yields_exactly_the_rest(prefetch):
  kwargs = dict(batch_size=4, num_epochs=3, shard_index=1, shard_count=2, prefetch=prefetch)
  full = list(make(29, **kwargs))
  for k in (0, 1, 4, len(full) - 1, len(full)):
    first = make(29, **kwargs)
    for _ in range(k):
      next(first)
    state = json.loads(json.dumps(first.get_state()))  # Must survive JSON.
    first.close()
    resumed = make(29, **kwargs)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(full) - k
    for got, want in zip(rest, full[k:]):
      assert got.keys() == want.keys()
      for key in want:
        assert got[key].tobytes() == want[key].tobytes()


def test_iterator_resume_refuses_other_settings():
  loader = make(29, batch_size=4, shard_index=0, shard_count=2)
  next(loader)
  state = loader.get_state()
  other = make(29, batch_size=8, shard_index=0, shard_count=2)
  with pytest.raises(ValueError, match=r"other settings \(batch_size: saved 4, now 8\)"):
    other.set_state(state)
  with pytest.raises(ValueError, match="not a loader state"):
    other.set_state({"next_index": 1})


def test_endless_loader_keeps_reshuffling():
  loader = make(6, batch_size=3, num_epochs=None, shard_index=0, shard_count=1)
  assert len(loader) == 2  # Batches per epoch.
  epochs = [sorted(sum((next(loader)["index"].tolist() for _ in range(2)), []))
            for _ in range(5)]
  assert epochs == [list(range(6))] * 5


def test_transform_must_give_fixed_shapes():
  def ragged(record):
    return {"x": np.zeros(record["value"] % 2 + 1)}
  loader = pipeline.Loader(RangeSource(4), ragged, batch_size=2, seed=0, shuffle=False,
                           shard_index=0, shard_count=1, prefetch=0)
  with pytest.raises(ValueError, match=r"record 1 \(id '1'\) has \{x: \(2,\)/float64\}, "
                                       r"earlier records \{x: \(1,\)/float64\}"):
    next(loader)
  with pytest.raises(ValueError, match="must not have a 'mask' key"):
    next(pipeline.Loader(RangeSource(4), lambda r: {"mask": 1}, batch_size=2, seed=0,
                         shard_index=0, shard_count=1, prefetch=0))


def test_default_shard_is_the_jax_process():
  import jax  # pylint: disable=g-import-not-at-top
  loader = make(10, batch_size=2)
  assert loader.get_state()["settings"]["shard_index"] == jax.process_index() == 0
  assert loader.get_state()["settings"]["shard_count"] == jax.process_count() == 1


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=60)
    import numpy as np
    sys.path.insert(0, sys.argv[4])
    from test_data_pipeline import RangeSource, to_arrays
    from vlmsel_jax.data import pipeline
    loader = pipeline.Loader(RangeSource(37), to_arrays, batch_size=4, seed=5, num_epochs=2)
    batches = [b["index"][b["mask"]].tolist() for b in loader]
    with open(out, "w") as f:
      json.dump({"process": jax.process_index(), "count": jax.process_count(),
                 "batches": batches}, f)
""")


def test_shard_disjoint_in_a_real_two_process_run(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_TWO_PROCESS_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  tests_dir = os.path.dirname(os.path.abspath(__file__))  # where test_data_pipeline is
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port),
                             str(tmp_path / f"out{i}.json"), tests_dir], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for p in procs:
    output, _ = p.communicate(timeout=120)
    assert p.returncode == 0, output[-2000:]
  results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert [(r["process"], r["count"]) for r in results] == [(0, 2), (1, 2)]
  assert len(results[0]["batches"]) == len(results[1]["batches"]) == 2 * 5  # ceil(19/4) = 5.
  for e in range(2):
    seen = sum((r["batches"][e * 5 + b] for r in results for b in range(5)), [])
    assert sorted(seen) == list(range(37))
  for k in range(2):
    assert results[k]["batches"] == expected_plan(37, batch_size=4, seed=5, epochs=2,
                                                  shard_index=k, shard_count=2)


@pytest.mark.slow
def test_iterator_resume_with_worker_processes():
  kwargs = dict(batch_size=4, num_epochs=2, shard_index=0, shard_count=2, worker_count=2)
  full_loader = make(29, **kwargs)
  full = list(full_loader)
  full_loader.close()
  reference = list(make(29, **dict(kwargs, worker_count=0)))
  assert [b["index"].tolist() for b in full] == [b["index"].tolist() for b in reference]
  first = make(29, **kwargs)
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  first.close()
  resumed = make(29, **kwargs)
  resumed.set_state(state)
  rest = list(resumed)
  resumed.close()
  assert [b["index"].tobytes() for b in rest] == [b["index"].tobytes() for b in full[3:]]
