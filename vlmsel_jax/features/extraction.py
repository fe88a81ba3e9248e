"""Feature extraction: encoders × a paired dataset → one feature bank per encoder.

For every model spec (``vlmsel_jax.zoo``) the images (vision models) or captions (text models) of
a ``vlmsel_jax.data.paired`` dataset go through the model in fixed-size batches, each one
jit-compiled and split data-parallel over a 1-D ``batch`` mesh of all devices (the last batch is
padded by repeating a real row, and the padding dropped). Each model's features become
``<output_dir>/<name>.safetensors`` (``feature_bank.save_bank``, atomic), rows in dataset order,
ids from the captions file.

Caching: a bank records a content key (model files' names, sizes and mtimes; the captions file
and each selected image's size and mtime; every option that changes the features). A re-run whose
key matches the existing bank does nothing, once the bank's content checksum (see
``feature_bank``) shows its bytes are those written; a bank that fails it is extracted again.
Resume: every ``checkpoint_every`` batches the rows done so far are written atomically to
``<name>.partial.npz`` (arrays ``partial_features``, ``rows``, ``cache_key``: not a bank,
``load_bank`` rejects it); a re-run with the same key starts after them, and the file is removed
once the bank is written.

Several hosts (``jax.distributed``, e.g. a TPU pod slice running the binary on every worker): the
mesh spans every device of every host, each process decodes only the images its own devices
hold (captions are tokenized whole, since a batch's padded length depends on all of them), the
features are gathered to every host, and process 0 alone reads and writes the partial file and
the bank; whether a bank is up to date and where a resumed run starts are process 0's answers,
broadcast to the others, so hosts with their own disks agree.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import auto as tqdm

from vlmsel_jax.runtime import atomic
from vlmsel_jax.features import feature_bank
from vlmsel_jax.runtime import parallel
from vlmsel_jax import zoo
from vlmsel_jax.data import paired

CACHE_VERSION = 1
DTYPES = ("float32", "bfloat16")
# "embedding": a CLIP tower's own image embedding (OpenCLIP ConvNeXt: its projection head).
VISION_POOLINGS = ("cls", "mean", "pooler", "logits", "embedding")
BANK_EXT = ".safetensors"
PARTIAL_SUFFIX = ".partial.npz"


class ExtractError(ValueError):
  """Options that do not fit the models or data; reported as one line."""


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
  """Everything but the models and data that extraction takes.

  Attributes:
    layer: Hidden-state index (None: the model's default: the last layer for vision, the second
      to last for text).
    pooling: Vision: cls / mean / pooler; text: mean / last (over the caption's own tokens).
      None: the model's default (CLS, or mean without one; text: mean).
    batch_size: Samples per batch (rounded up to a multiple of the device count by padding).
    dtype: Model dtype, "float32" or "bfloat16"; features are stored as float32.
    max_samples: Use at most this many samples, drawn with ``seed`` (None or 0: all).
    seed: Seed of the sample draw.
    max_text_tokens: Captions are truncated to this many tokens.
    checkpoint_every: Write the partial file every this many batches.
    skip_bad_images: Drop samples whose image does not decode (from every bank of the run, so
      banks stay paired) instead of failing.
    progress: Show a tqdm bar per model.
  """

  layer: int | None = None
  pooling: str | None = None
  batch_size: int = 32
  dtype: str = "float32"
  max_samples: int | None = None
  seed: int = 0
  max_text_tokens: int = 128
  checkpoint_every: int = 20
  skip_bad_images: bool = False
  progress: bool = True

  def validate(self) -> None:
    if self.dtype not in DTYPES:
      raise ExtractError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
    if self.batch_size < 1 or self.checkpoint_every < 1 or self.max_text_tokens < 1:
      raise ExtractError("batch_size, checkpoint_every and max_text_tokens must be positive")
    if self.max_samples is not None and self.max_samples < 0:
      raise ExtractError(f"max_samples must be >= 0, got {self.max_samples}")


@dataclasses.dataclass
class ExtractResult:
  """What happened to one model.

  Attributes:
    name: The bank's name.
    spec: The model spec given.
    kind: "vision" or "text".
    path: The bank file.
    cached: The bank was already up to date; nothing ran.
    batches_run: Batches computed by this call (0 on a cache hit).
    resumed_rows: Rows taken from a partial file of an earlier, interrupted run.
    n: Rows of the bank.
    dim: Feature width.
  """

  name: str
  spec: str
  kind: str
  path: str
  cached: bool
  batches_run: int
  resumed_rows: int
  n: int
  dim: int


def cache_key(resolved: zoo.Resolved, data_hash: str, options: ExtractOptions) -> str:
  """The content key of one model's bank: changes whenever its features could."""
  payload = {
      "version": CACHE_VERSION, "model": resolved.fingerprint(), "kind": resolved.kind,
      "data": data_hash, "skip_bad_images": options.skip_bad_images, "layer": options.layer,
      "pooling": options.pooling, "dtype": options.dtype,
      "max_text_tokens": options.max_text_tokens if resolved.kind == "text" else None,
  }
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def bank_info(path: str) -> tuple[str | None, tuple[int, ...]]:
  """(cache key, features shape) of a bank; (None, ()) when there is no usable bank or it records
  no key.

  A local bank's content checksum is checked (``feature_bank.check_bank``, a slice of rows at a
  time): one that cannot be read or whose bytes changed after it was written is not a cache hit,
  with a warning naming it, and is extracted again. A bank without a checksum (written before
  banks recorded one) counts as it is. A bank in a bucket is judged by its header alone (see
  ``_remote_bank_info``); ``load_bank`` checks it when it is read for use.
  """
  if not atomic.isfile(path):
    return None, ()
  try:
    if not atomic.is_local(path):
      return _remote_bank_info(path)
    metadata, shape = feature_bank.check_bank(atomic.local_path(path))
    return metadata.get("cache_key"), shape
  except Exception as e:  # pylint: disable=broad-except
    # A corrupt bank is not a cache hit; it is rewritten.
    reason = str(e) if isinstance(e, feature_bank.BankError) else f"{path}: unreadable bank ({e})"
    logging.warning("%s; extracting it again", " ".join(reason.split()))
    return None, ()


def _remote_bank_info(path: str) -> tuple[str | None, tuple[int, ...]]:
  """``bank_info`` of a bank in a bucket, from its safetensors header alone.

  safe_open needs a local file, and downloading every cached bank to check its key would cost
  what the cache saves; the header (an 8-byte little-endian length, then that much JSON) holds
  the metadata and the shapes.
  """
  with atomic.as_path(path).open("rb") as f:
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
  return (header.get("__metadata__") or {}).get("cache_key"), tuple(header["features"]["shape"])


def _read_partial(path: str, key: str) -> np.ndarray | None:
  """The rows a partial file holds for ``key``, or None (missing, stale, unreadable)."""
  if not atomic.isfile(path):
    return None
  try:
    with atomic.local_copy(path) as local, np.load(local, allow_pickle=False) as f:
      if str(f["cache_key"]) != key:
        logging.info("%s: made with other inputs or options; starting over", path)
        return None
      return f["partial_features"][:int(f["rows"])]
  except Exception:  # pylint: disable=broad-except
    logging.warning("%s: unreadable partial file; starting over", path)
    return None


def _write_partial(path: str, features: np.ndarray, key: str) -> None:
  """Writes the rows done so far atomically (temporary file + rename)."""
  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      np.savez(f, partial_features=features, rows=np.int64(features.shape[0]),
               cache_key=np.asarray(key))
  atomic.write_atomic(path, write, prefix=".tmp-")


def _check_options_for_kind(resolved: zoo.Resolved, options: ExtractOptions) -> None:
  allowed = VISION_POOLINGS if resolved.kind == "vision" else zoo.TEXT_POOLINGS
  if options.pooling is not None and options.pooling not in allowed:
    raise ExtractError(f"pooling {options.pooling!r} is not available for {resolved.kind} model "
                       f"{resolved.spec!r}; choose from {', '.join(allowed)}")


def _layer_and_pooling(loaded: zoo.LoadedModel, options: ExtractOptions) -> tuple[int, str]:
  layer = loaded.default_layer if options.layer is None else options.layer
  pooling = options.pooling or loaded.default_pooling
  if not -loaded.num_layers <= layer < loaded.num_layers:
    raise ExtractError(f"layer {layer} is out of range for {loaded.name}: it has "
                       f"{loaded.num_layers} hidden states (layers {-loaded.num_layers} .. "
                       f"{loaded.num_layers - 1})")
  if pooling not in loaded.poolings:
    raise ExtractError(f"pooling {pooling!r} is not available for {loaded.name}; choose from "
                       f"{', '.join(loaded.poolings)}")
  if pooling in ("pooler", "logits", "embedding") and layer != -1:
    raise ExtractError(f"pooling {pooling!r} reads the model's {pooling} output, which has no "
                       "layer; leave --layer unset")
  return layer, pooling


def _bucket(length: int, cap: int) -> int:
  """Padded sequence length: the next power of two ≥ 8, so few shapes get compiled."""
  return min(cap, max(8, 1 << max(0, length - 1).bit_length()))


class _TextBatches:
  """Tokenizes captions into padded (input_ids, attention_mask, pool_mask) batches."""

  def __init__(self, loaded: zoo.LoadedModel, dataset: paired.PairedDataset, max_tokens: int):
    self.tokenizer = loaded.tokenizer
    self.dataset = dataset
    self.max_tokens = max_tokens
    pad = self.tokenizer.pad_token_id
    self.pad_id = 0 if pad is None else int(pad)

  def __call__(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
    captions = [self.dataset.samples[i].caption for i in rows]
    enc = self.tokenizer(captions, add_special_tokens=True, truncation=True,
                         max_length=self.max_tokens, return_special_tokens_mask=True)
    length = _bucket(max(len(ids) for ids in enc["input_ids"]), self.max_tokens)
    shape = (len(rows), length)
    input_ids = np.full(shape, self.pad_id, np.int32)
    attention = np.zeros(shape, np.int32)
    pool = np.zeros(shape, np.int32)
    for r, (ids, special) in enumerate(zip(enc["input_ids"], enc["special_tokens_mask"])):
      input_ids[r, :len(ids)] = ids
      attention[r, :len(ids)] = 1
      # Special tokens (BOS, EOS) go through the model but are not the caption: not pooled.
      pool[r, :len(ids)] = 1 - np.asarray(special, np.int32)
      if not pool[r].any():
        sample = self.dataset.samples[rows[r]]
        raise paired.DataError(f"{self.dataset.captions_path}:{sample.line}: caption of id "
                               f"{sample.id!r} has no tokens of its own after tokenization")
    return {"input_ids": input_ids, "attention_mask": attention, "pool_mask": pool}


class _ImageBatches:
  """Decodes and preprocesses images into (b, h, w, 3) float32 batches, a few threads at once."""

  def __init__(self, loaded: zoo.LoadedModel, dataset: paired.PairedDataset,
               pool: concurrent.futures.Executor):
    self.preprocessing = loaded.preprocessing
    self.dataset = dataset
    self.pool = pool

  def _one(self, index: int) -> np.ndarray:
    return self.preprocessing(self.dataset.load_image(index))

  def __call__(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
    return {"pixels": np.stack(list(self.pool.map(self._one, rows)))}


def _pad_rows(inputs: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Every array extended to ``size`` rows by repeating its last row (dropped afterwards)."""
  extra = size - next(iter(inputs.values())).shape[0]
  if not extra:
    return inputs
  return {k: np.concatenate([v, np.repeat(v[-1:], extra, axis=0)]) for k, v in inputs.items()}


def _global_batch(make: Callable[[Sequence[int]], dict[str, np.ndarray]], rows: list[int],
                  padded: int, sharding: NamedSharding, whole: bool) -> dict[str, jax.Array]:
  """Dataset ``rows``, padded to ``padded`` by repeating the last, as arrays split by ``sharding``.

  On one process the whole batch is made and put. On several, each makes only the rows of its
  own devices unless ``whole`` (text: the padded length depends on every caption of the batch).
  """
  if jax.process_count() == 1:
    return jax.device_put(_pad_rows(make(rows), padded), sharding)
  ids = rows + [rows[-1]] * (padded - len(rows))
  if whole:
    full = _pad_rows(make(rows), padded)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in full.items()}
  held = sharding.addressable_devices_indices_map((padded,))
  local = sorted({r for index in held.values() for r in range(*index[0].indices(padded))})
  position = {r: i for i, r in enumerate(local)}
  made = make([ids[r] for r in local])

  def rows_of(v: np.ndarray):
    def piece(index):
      wanted = range(*index[0].indices(padded))
      return v[[position[r] for r in wanted]][(slice(None),) + tuple(index[1:])]
    return piece

  return {k: jax.make_array_from_callback((padded,) + v.shape[1:], sharding, rows_of(v))
          for k, v in made.items()}


def _extract_one(resolved: zoo.Resolved, dataset: paired.PairedDataset, path: str, key: str,
                 options: ExtractOptions, mesh: jax.sharding.Mesh,
                 data_hash: str, skipped: int,
                 on_batch: Callable[[str, int], None] | None) -> ExtractResult:
  """Runs one model over the dataset and writes its bank (resuming from a partial file)."""
  name = resolved.name
  loaded = resolved.load(options.dtype)
  layer, pooling = _layer_and_pooling(loaded, options)
  n = len(dataset)
  partial_path = os.path.join(os.path.dirname(path), resolved.file_stem + PARTIAL_SUFFIX)
  primary = parallel.is_primary()
  done = _read_partial(partial_path, key) if primary else None
  chunks = [done] if done is not None and done.shape[0] else []
  start = done.shape[0] if done is not None else 0
  if jax.process_count() > 1:  # Process 0's partial file decides where every host starts.
    start = int(multihost_utils.broadcast_one_to_all(np.int32(start)))
  if start:
    logging.info("%s: resuming after %d of %d rows (%s)", name, start, n, partial_path)

  devices = mesh.devices.size
  padded = -(-options.batch_size // devices) * devices
  replicated = NamedSharding(mesh, P())
  by_batch = NamedSharding(mesh, P(parallel.BATCH_AXIS))
  graphdef, state = nnx.split(loaded.model)
  state = jax.device_put(state, replicated)
  features_fn = loaded.features

  def step(state, inputs):
    model = nnx.merge(graphdef, state)
    return features_fn(model, inputs, layer, pooling).astype(jnp.float32)

  step = jax.jit(step, in_shardings=(replicated, by_batch), out_shardings=by_batch)

  starts = list(range(start, n, options.batch_size))
  executor = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
  make = (_TextBatches(loaded, dataset, options.max_text_tokens) if loaded.kind == "text"
          else _ImageBatches(loaded, dataset, executor))
  bar = tqdm.tqdm(total=math.ceil(n / options.batch_size),
                  initial=math.ceil(start / options.batch_size),
                  desc=name, unit="batch", disable=not (options.progress and primary))
  batches_run = 0

  def finish(rows: int, out: jax.Array) -> None:
    nonlocal batches_run
    chunks.append(parallel.gather_to_host(out)[:rows])  # A collective across hosts.
    batches_run += 1
    bar.update(1)
    if (primary and batches_run % options.checkpoint_every == 0
        and sum(c.shape[0] for c in chunks) < n):
      _write_partial(partial_path, np.concatenate(chunks), key)
    if on_batch is not None:
      on_batch(name, batches_run)

  try:
    pending = None
    for first in starts:
      rows = list(range(first, min(first + options.batch_size, n)))
      inputs = _global_batch(make, rows, padded, by_batch, whole=loaded.kind == "text")
      # Dispatch is asynchronous: the next batch is prepared on the host while this one runs.
      out = step(state, inputs)
      if pending is not None:
        finish(*pending)
      pending = (len(rows), out)
    if pending is not None:
      finish(*pending)
  finally:
    bar.close()
    executor.shutdown(wait=False, cancel_futures=True)

  features = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
  # Only process 0 holds the resumed rows (from its partial file).
  if features.shape[0] + (0 if primary else start) != n:
    raise ExtractError(f"{name}: extracted {features.shape[0]} rows for {n} samples")
  metadata = {
      "name": name, "model": resolved.spec, "kind": loaded.kind, "layer": str(layer),
      "pooling": pooling, "dtype": options.dtype, "data_hash": data_hash, "n": str(n),
      "dim": str(features.shape[1]), "cache_key": key, "data_dir": dataset.root,
      "captions": dataset.captions_path, "skipped_images": str(skipped),
  }
  if loaded.kind == "vision":
    metadata["preprocessing"] = json.dumps(loaded.preprocessing.to_dict())
  else:
    metadata["max_text_tokens"] = str(options.max_text_tokens)
  if primary:
    feature_bank.save_bank(path, features, dataset.ids, metadata)
    atomic.remove(partial_path)
  logging.info("%s: wrote %s (%d x %d, %d batches run)", name, path, n, features.shape[1],
               batches_run)
  return ExtractResult(name=name, spec=resolved.spec, kind=loaded.kind, path=path, cached=False,
                       batches_run=batches_run, resumed_rows=start, n=n, dim=features.shape[1])


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Where the paired images and captions come from: a data spec or an image folder.

  Attributes:
    data: A data spec (``vlmsel_jax.data.registry``: easy-vqa, folder:DIR, ...), or None.
    data_split: The split of ``data``.
    data_dir: An image folder with a captions file, instead of ``data``.
    captions: The captions file of ``data_dir`` (default ``<data_dir>/captions.jsonl``).
  """

  data: str | None = None
  data_split: str = "train"
  data_dir: str | None = None
  captions: str | None = None

  def open(self) -> paired.PairedDataset | None:
    """The ``PairedDataset`` ``data`` names, or None when ``data_dir`` names the folder.

    Raises:
      ValueError: neither or both are given; DataError: a spec extraction cannot read.
    """
    from vlmsel_jax.data import registry  # pylint: disable=g-import-not-at-top
    if bool(self.data) == bool(self.data_dir):
      raise ValueError("give the dataset once: --data=easy-vqa (or folder:DIR), or "
                       "--data_dir=DIR")
    if not self.data:
      return None
    return registry.open_paired_dataset(self.data, split=self.data_split)

  def describe(self) -> str:
    """The dataset in a few words, for reports."""
    if self.data:
      return f"`{self.data}` ({self.data_split} split)"
    return f"`{self.data_dir}`"


def check_kinds(specs: Sequence[str], kind: str, flag: str) -> None:
  """Raises ExtractError, one line naming ``--flag`` and the spec, unless every spec is a
  ``kind`` ("vision" or "text") model; resolves the specs (nothing is loaded)."""
  for spec in specs:
    resolved = zoo.resolve(spec)
    if resolved.kind != kind:
      raise ExtractError(f"--{flag}: {spec} is a {resolved.kind} model, not a {kind} model")


def extract_from(specs: Sequence[str], source: DataSource, output_dir: str, *,
                 options: ExtractOptions = ExtractOptions()) -> list[ExtractResult]:
  """``extract`` of the dataset ``source`` names."""
  dataset = source.open()
  return extract(specs, None if dataset else source.data_dir, output_dir,
                 captions=source.captions, dataset=dataset, options=options)


def extract(specs: Sequence[str], data_dir: str | None, output_dir: str, *,
            captions: str | None = None, dataset: paired.PairedDataset | None = None,
            options: ExtractOptions = ExtractOptions(),
            devices: Sequence[jax.Device] | None = None,
            on_batch: Callable[[str, int], None] | None = None) -> list[ExtractResult]:
  """Writes (or finds up to date) one feature bank per model spec.

  Args:
    specs: Zoo names or paths (``vlmsel_jax.zoo.resolve``).
    data_dir: The image folder (None when ``dataset`` is given).
    output_dir: Where ``<name>.safetensors`` (and, while running, ``<name>.partial.npz``) go;
      local or a bucket URI (``gs://``, any ``etils.epath`` path; see ``vlmsel_jax.runtime.atomic``).
    captions: The captions file (default ``<data_dir>/captions.jsonl``).
    dataset: The dataset itself instead of ``data_dir`` (e.g.
      ``data.registry.open_paired_dataset("easy-vqa")``).
    options: See ``ExtractOptions``.
    devices: Devices of the data-parallel mesh (default: all).
    on_batch: Called as ``on_batch(name, batches_run)`` after each batch (and its checkpoint).

  Returns:
    One ``ExtractResult`` per spec, in order.

  Raises:
    zoo.ZooError, paired.DataError, ExtractError, and the checkpoint loader's errors; every spec
    is resolved and the dataset read before any model runs.
  """
  options.validate()
  if not specs:
    raise ExtractError("no models given")
  resolved = [zoo.resolve(s) for s in specs]
  for r in resolved:
    _check_options_for_kind(r, options)
    if r.variant.layer is not None and options.layer is not None:
      raise ExtractError(f"model {r.spec!r} names its layer and --layer={options.layer} names "
                         "another; give the layer once")
  seen: dict[str, str] = {}
  for r in resolved:
    if r.file_stem in seen:
      raise ExtractError(f"models {seen[r.file_stem]!r} and {r.spec!r} would both write "
                         f"{r.file_stem}{BANK_EXT}; give them distinct directory / file names")
    seen[r.file_stem] = r.spec
  if (dataset is None) == (data_dir is None):
    raise ExtractError("give exactly one of a data folder and a dataset")
  if atomic.exists(output_dir) and not atomic.isdir(output_dir):
    raise ExtractError(f"{output_dir}: exists and is not a directory; the banks go in a "
                       "directory")
  if dataset is None:
    dataset = paired.load_paired(data_dir, captions)
  dataset = dataset.sample(options.max_samples, options.seed)
  data_hash = dataset.fingerprint()
  keys = [cache_key(r, data_hash, options) for r in resolved]
  paths = [os.path.join(output_dir, r.file_stem + BANK_EXT) for r in resolved]
  existing = [bank_info(p) for p in paths]
  todo = [info[0] != k for info, k in zip(existing, keys)]
  if jax.process_count() > 1:  # Process 0's banks decide, whatever the other hosts' disks hold.
    todo = [bool(t) for t in multihost_utils.broadcast_one_to_all(np.asarray(todo))]

  skipped = 0
  if any(todo) and options.skip_bad_images:
    dataset, bad = dataset.without_undecodable()
    skipped = len(bad)
    for message in bad:
      logging.warning("skipped: %s", message)
    if bad:
      logging.warning("skipped %d undecodable image(s) of %d", skipped, skipped + len(dataset))
    if not len(dataset):
      raise paired.DataError(f"{dataset.root}: no sample has a decodable image")

  if parallel.is_primary():
    atomic.makedirs(output_dir)
  mesh = parallel.batch_mesh(devices)
  results = []
  for r, key, path, needed, (_, shape) in zip(resolved, keys, paths, todo, existing):
    if not needed:
      logging.info("%s: cache hit, %s is up to date; nothing to do", r.name, path)
      # Another host's disk may not hold process 0's bank: (0, 0) there.
      n, dim = shape if len(shape) == 2 else (0, 0)
      results.append(ExtractResult(name=r.name, spec=r.spec, kind=r.kind, path=path, cached=True,
                                   batches_run=0, resumed_rows=0, n=n, dim=dim))
      continue
    results.append(_extract_one(r, dataset, path, key, options, mesh, data_hash, skipped,
                                on_batch))
  return results
