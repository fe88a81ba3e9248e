"""Batches from a record source: seeded shuffling, host sharding, padding masks, resumable state.

`Loader` turns any record source (see `records`) and a per-record ``transform`` into fixed-shape
batches, built on `grain`: a `grain.MapDataset` whose element ``j`` is global batch ``j`` (a pure
function of ``j``), read through grain's prefetching iterator, whose position is the checkpoint.
So a resumed loader yields exactly the batches the interrupted one had not yet yielded.

Index plan, per epoch ``e``:

1. *Selection* (once): all records, or with ``fraction`` r < 1 the first ceil(r·n) entries of a
   permutation seeded by ``seed`` (`fraction_indices`), kept in that permuted order. Fractions
   r1 < r2 with one seed give nested subsets, as data-scaling experiments need.
2. *Order*: with ``shuffle``, the selection permuted by a generator seeded with (seed, e), a new
   order every epoch; without it, the selection sorted (source order).
3. *Sharding*: shard k of S takes positions k, k + S, k + 2S, ... of the order, so the shards are
   disjoint and together complete, and global step b (all shards' b-th batches) covers positions
   [b·B·S, (b+1)·B·S) of the order, as one host with batch B·S would.
4. *Batching*: every shard yields the same number of batches per epoch (ceil of the largest
   shard's size / batch_size), so multi-host steps stay in lockstep. Missing rows of a final batch
   repeat its real rows (or the epoch's first record when it has none) with ``mask`` False, so
   shapes never change under ``jit``. With ``drop_remainder`` only full batches of real rows are
   kept (floor of the smallest shard's size / batch_size) and ``mask`` is all True.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Mapping

from absl import flags
import grain
import numpy as np

from vlmsel_jax.data import records

STATE_FORMAT = "vlmsel_jax.data.pipeline.Loader/1"

Transform = Callable[[dict[str, Any]], Mapping[str, Any]]


def fraction_indices(n: int, fraction: float, seed: int) -> np.ndarray:
  """The first ceil(fraction·n) entries of a permutation of range(n) seeded by ``seed``.

  The indices stay in permutation order (not sorted). The permutation does not depend on
  ``fraction``, so for one seed a smaller fraction's indices are a prefix of a larger one's:
  the subsets are nested.

  Raises:
    ValueError: n < 1, fraction outside (0, 1], or a negative seed.
  """
  if n < 1:
    raise ValueError(f"fraction_indices: need at least one record, got n={n}")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  # Rounding first keeps float products like 0.7 * 10 = 7.000000000000001 from rounding up.
  count = max(1, math.ceil(round(fraction * n, 9)))
  return np.random.default_rng(seed).permutation(n)[:count].astype(np.int64)


class _BatchPlan:
  """Global batch j → the stacked batch: a pure function, picklable for grain's workers."""

  def __init__(self, source: records.RecordSource, transform: Transform, *, batch_size: int,
               seed: int, shuffle: bool, fraction: float, shard_index: int, shard_count: int,
               drop_remainder: bool):
    self.source = source
    self.transform = transform
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.shard_index = shard_index
    self.shard_count = shard_count
    n = len(source)
    if n < 1:
      raise records.DataError(f"{getattr(source, 'name', 'source')}: no records to load")
    selected = np.arange(n, dtype=np.int64) if fraction == 1.0 else fraction_indices(
        n, fraction, seed)
    self.selected = selected if shuffle else np.sort(selected)
    m = len(self.selected)
    if drop_remainder:
      self.batches_per_epoch = (m // shard_count) // batch_size
      if self.batches_per_epoch == 0:
        raise ValueError(f"drop_remainder: {m} records over {shard_count} shards do not fill one "
                         f"batch of {batch_size} per shard")
    else:
      self.batches_per_epoch = math.ceil(math.ceil(m / shard_count) / batch_size)
    self._orders: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()
    self._spec: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_lock"]
    state["_orders"] = {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def epoch_order(self, epoch: int) -> np.ndarray:
    """All shards' record indices for ``epoch``, in order."""
    with self._lock:
      order = self._orders.get(epoch)
      if order is None:
        if self.shuffle:
          perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.selected))
          order = self.selected[perm]
        else:
          order = self.selected
        # Batches are read nearly in order, so the current and the next epoch suffice.
        self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
        self._orders[epoch] = order
      return order

  def shard_indices(self, epoch: int) -> np.ndarray:
    return self.epoch_order(epoch)[self.shard_index::self.shard_count]

  def _transformed(self, index: int) -> dict[str, np.ndarray]:
    record = self.source[int(index)]
    out = self.transform(record)
    if not isinstance(out, Mapping):
      raise TypeError(f"transform must return a dict of arrays, got {type(out).__name__} for "
                      f"record {index} (id {record.get('id')!r})")
    if "mask" in out:
      raise ValueError("transform output must not have a 'mask' key: the loader adds it")
    arrays = {k: np.asarray(v) for k, v in out.items()}
    spec = {k: (a.shape, a.dtype) for k, a in arrays.items()}
    if self._spec is None:
      self._spec = spec
    elif spec != self._spec:
      raise ValueError(f"transform output of record {index} (id {record.get('id')!r}) has "
                       f"{_describe(spec)}, earlier records {_describe(self._spec)}: every "
                       "record must give the same keys, shapes and dtypes")
    return arrays

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    epoch, b = divmod(int(j), self.batches_per_epoch)
    indices = self.shard_indices(epoch)[b * self.batch_size:(b + 1) * self.batch_size]
    rows = [self._transformed(i) for i in indices]
    real = len(rows)
    if not rows:  # This shard ran out before the others: one padding record keeps lockstep.
      rows = [self._transformed(self.epoch_order(epoch)[0])]
    rows = [rows[r % len(rows)] for r in range(self.batch_size)]
    batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    batch["mask"] = np.arange(self.batch_size) < real
    return batch


def _describe(spec) -> str:
  return "{" + ", ".join(f"{k}: {s}/{d}" for k, (s, d) in sorted(spec.items())) + "}"


class Loader:
  """An iterator of fixed-shape batches with checkpointable state (see the module docstring).

  Each batch is ``{key: stacked transform outputs (batch_size, ...), "mask": bool (batch_size,)}``.

  Args:
    source: A record source (``len``, ``[i]``).
    transform: record → dict of arrays with the same shapes for every record.
    batch_size: Rows per batch on this shard.
    seed: Seeds the fraction selection and, with (seed, epoch), each epoch's shuffle.
    shuffle: Reshuffle every epoch; else records come in source order.
    num_epochs: Epochs to yield; None repeats forever.
    fraction: Use the first ceil(fraction·n) records of a seeded permutation (nested in r).
    shard_index, shard_count: This shard and the number of shards; default
      ``jax.process_index()`` and ``jax.process_count()``.
    drop_remainder: Keep only full batches of real records.
    prefetch: Batches read ahead by grain's thread pool (0: read on demand).
    worker_count: > 0 reads batches in that many worker processes (grain ``mp_prefetch``); the
      source and transform must then be picklable.
  """

  def __init__(self, source: records.RecordSource, transform: Transform, *, batch_size: int,
               seed: int, shuffle: bool = True, num_epochs: int | None = 1,
               fraction: float = 1.0, shard_index: int | None = None,
               shard_count: int | None = None, drop_remainder: bool = False, prefetch: int = 2,
               worker_count: int = 0):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if prefetch < 0 or worker_count < 0:
      raise ValueError(f"prefetch and worker_count must be >= 0, got {prefetch}, {worker_count}")
    if shard_index is None or shard_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      shard_index = jax.process_index() if shard_index is None else shard_index
      shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    self.source = source
    self.num_epochs = num_epochs
    self._plan = _BatchPlan(source, transform, batch_size=batch_size, seed=seed,
                            shuffle=shuffle, fraction=fraction, shard_index=shard_index,
                            shard_count=shard_count, drop_remainder=drop_remainder)
    total = self._plan.batches_per_epoch * (num_epochs or 1)
    self._signature = {
        "source": str(getattr(source, "name", type(source).__name__)), "records": len(source),
        "selected": int(len(self._plan.selected)), "batch_size": batch_size, "seed": seed,
        "shuffle": shuffle, "num_epochs": num_epochs, "fraction": fraction,
        "shard_index": shard_index, "shard_count": shard_count,
        "drop_remainder": drop_remainder, "worker_count": worker_count}
    # An endless loader counts batches up to the largest index grain's range accepts.
    length = total if num_epochs is not None else np.iinfo(np.int64).max
    dataset = grain.MapDataset.range(length).map(self._plan)
    if worker_count > 0:
      # grain's worker processes read absl flags (their defaults suffice); outside an absl
      # binary (tests, notebooks) nothing has parsed them yet.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                               prefetch_buffer_size=1))
      iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=worker_count, per_worker_buffer_size=max(1, prefetch)))
    else:
      iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
          num_threads=prefetch, prefetch_buffer_size=prefetch))
    self._iterator = iter(iter_dataset)

  @property
  def batches_per_epoch(self) -> int:
    return self._plan.batches_per_epoch

  @property
  def num_selected(self) -> int:
    """Records used (all shards) after the fraction selection."""
    return len(self._plan.selected)

  def epoch_indices(self, epoch: int) -> np.ndarray:
    """This shard's record indices in ``epoch``, in batch order, without padding rows."""
    indices = self._plan.shard_indices(epoch)
    return indices[:self.batches_per_epoch * self._plan.batch_size]

  def __len__(self) -> int:
    return self.batches_per_epoch * (self.num_epochs or 1)

  def __iter__(self) -> Loader:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    """The position (JSON-serializable), with the settings it is only valid for."""
    return {"format": STATE_FORMAT, "settings": dict(self._signature),
            "iterator": self._iterator.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a `get_state` of a loader with the same settings.

    Raises:
      ValueError: the state is not a loader state, or was taken with other settings.
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
      raise ValueError(f"not a loader state (expected format {STATE_FORMAT!r})")
    saved = state.get("settings", {})
    differ = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in self._signature.items()
              if saved.get(k) != v]
    if differ:
      raise ValueError("loader state was saved with other settings (" + "; ".join(differ) + ")")
    self._iterator.set_state(state["iterator"])

  def close(self) -> None:
    """Stops prefetch threads or worker processes."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()
