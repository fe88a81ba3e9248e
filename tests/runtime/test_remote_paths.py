"""Outputs, caches and checkpoints on a bucket: gs:// paths through etils.epath, against local runs.

There is no GCS here, so ``gs://`` is served by a stand-in with GCS's semantics, in this process:

* ``FakeGCS``, an fsspec file system registered for the ``gs`` / ``gcs`` protocols, which epath
  uses for ``gs://`` when TensorFlow is absent (as here). Objects in one flat dict (no
  directories: a "directory" exists while an object lies under it), each write atomic and visible
  on close, rename = copy + delete, and no append mode (gcsfs has none either).
* A GCS JSON API HTTP server over the same objects, for TensorStore (orbax writes checkpoint
  arrays through TensorStore's own GCS driver, not epath): ``TENSORSTORE_GCS_HTTP_URL`` points
  the driver at it, ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` stands in for credentials. It implements
  what the driver uses: media upload, read (ranges, generation preconditions), delete, list.

Every test runs in a fresh current directory and checks that nothing leaked into a local
``gs:/...`` directory (what ``os.makedirs("gs://b/x")`` would create).
"""

from __future__ import annotations

import csv
import importlib
import io
import itertools
import json
import os
import threading
import urllib.parse
from http import server

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from etils.epath import backend as epath_backend
from fsspec.spec import AbstractFileSystem
from PIL import Image

from vlmsel_jax.runtime import result_dir
from vlmsel_jax.runtime import atomic
from vlmsel_jax.features import extraction
from vlmsel_jax.features import feature_bank as fb
from vlmsel_jax import score
from vlmsel_jax.selection import judge
from vlmsel_jax.selection import reports as sel_reports
from vlmsel_jax.selection import tables as sel_tables
from vlmsel_jax.training import checkpoint as ckpt_lib
from vlmsel_jax.training import groundtruth
from vlmsel_jax.training import loop

BUCKET = "bkt"


class FakeGCS(AbstractFileSystem):
  """An in-memory object store with GCS's semantics, as fsspec's ``gs`` / ``gcs`` protocols."""

  protocol = ("gs", "gcs")
  root_marker = ""
  cachable = False
  objects: dict[str, tuple[bytes, int]] = {}  # "bucket/name" -> (content, generation)
  generations = itertools.count(1)
  lock = threading.Lock()

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.strip("/")

  @classmethod
  def put(cls, key: str, data: bytes) -> None:
    with cls.lock:  # One assignment: a reader sees the old object or the new one.
      cls.objects[key] = (data, next(cls.generations))

  def _children(self, path):
    prefix = path + "/" if path else ""
    files, dirs = {}, set()
    for key, (data, _) in list(self.objects.items()):
      if key.startswith(prefix):
        rest = key[len(prefix):]
        if "/" in rest:
          dirs.add(prefix + rest.split("/", 1)[0])
        else:
          files[key] = len(data)
    return files, dirs

  def ls(self, path, detail=True, **kwargs):
    path = self._strip_protocol(path)
    if path in self.objects:
      out = [self.info(path)]
    else:
      files, dirs = self._children(path)
      if not files and not dirs:
        raise FileNotFoundError(path)
      out = ([{"name": k, "size": s, "type": "file"} for k, s in sorted(files.items())] +
             [{"name": d, "size": 0, "type": "directory"} for d in sorted(dirs)])
    return out if detail else [o["name"] for o in out]

  def info(self, path, **kwargs):
    path = self._strip_protocol(path)
    if path in self.objects:
      return {"name": path, "size": len(self.objects[path][0]), "type": "file"}
    files, dirs = self._children(path)
    if files or dirs or "/" not in path:  # A bucket always exists.
      return {"name": path, "size": 0, "type": "directory"}
    raise FileNotFoundError(path)

  def _open(self, path, mode="rb", **kwargs):
    path = self._strip_protocol(path)
    if mode == "rb":
      if path not in self.objects:
        raise FileNotFoundError(path)
      return io.BytesIO(self.objects[path][0])
    if mode == "wb":
      return _Upload(path)
    raise NotImplementedError(f"FakeGCS: file mode {mode!r} not supported")  # As gcsfs: no "ab".

  def cp_file(self, path1, path2, **kwargs):
    path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
    if path1 in self.objects:  # A "directory" has nothing to copy.
      self.put(path2, self.objects[path1][0])

  def rm_file(self, path):
    self.objects.pop(self._strip_protocol(path), None)

  def _rm(self, path):
    self.rm_file(path)

  def rmdir(self, path):
    pass

  def mkdir(self, path, create_parents=True, **kwargs):
    pass

  def makedirs(self, path, exist_ok=False):
    pass


class _Upload(io.BytesIO):
  """A file being written: the object appears, whole, when it is closed."""

  def __init__(self, key):
    super().__init__()
    self.key = key

  def close(self):
    if not self.closed:
      FakeGCS.put(self.key, self.getvalue())
    super().close()


class _GcsApi(server.BaseHTTPRequestHandler):
  """The part of the GCS JSON API that TensorStore's gcs driver uses, over FakeGCS.objects."""

  protocol_version = "HTTP/1.1"

  def log_message(self, *args):
    pass

  def _send(self, code, body=b"", headers=()):
    self.send_response(code)
    for k, v in headers:
      self.send_header(k, v)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _request(self):
    url = urllib.parse.urlsplit(self.path)
    return url.path.split("/"), dict(urllib.parse.parse_qsl(url.query))

  @staticmethod
  def _meta(key):
    data, generation = FakeGCS.objects[key]
    bucket, name = key.split("/", 1)
    return {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(len(data)),
            "generation": str(generation), "metageneration": "1"}

  @staticmethod
  def _precondition(key, query):
    generation = FakeGCS.objects[key][1] if key in FakeGCS.objects else 0
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
      return 412
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
      return 304
    return None

  def do_GET(self):  # pylint: disable=invalid-name
    parts, query = self._request()  # "", storage, v1, b, <bucket>, o[, <object>]
    if parts[1:4] != ["storage", "v1", "b"] or len(parts) < 6 or parts[5] != "o":
      return self._send(400)
    bucket = parts[4]
    if len(parts) == 6:  # List.
      prefix, start, end = query.get("prefix", ""), query.get("startOffset", ""), query.get(
          "endOffset")
      items = [self._meta(k) for k in sorted(FakeGCS.objects)
               if k.startswith(bucket + "/") and k.split("/", 1)[1].startswith(prefix)
               and k.split("/", 1)[1] >= start and not (end and k.split("/", 1)[1] >= end)]
      return self._send(200, json.dumps({"kind": "storage#objects", "items": items}).encode(),
                        [("Content-Type", "application/json")])
    key = bucket + "/" + urllib.parse.unquote("/".join(parts[6:]))
    if key not in FakeGCS.objects:
      return self._send(404, b'{"error": {"code": 404}}')
    failed = self._precondition(key, query)
    if failed:
      return self._send(failed)
    data, generation = FakeGCS.objects[key]
    headers = [("x-goog-generation", str(generation)), ("x-goog-metageneration", "1")]
    if query.get("alt") != "media":
      return self._send(200, json.dumps(self._meta(key)).encode(),
                        headers + [("Content-Type", "application/json")])
    ranged = self.headers.get("Range")
    if ranged:
      first, last = ranged.split("=")[1].split("-")
      first, last = int(first), int(last) if last else len(data) - 1
      body = data[first:last + 1]
      return self._send(206, body, headers + [
          ("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(data)}")])
    return self._send(200, data, headers)

  def do_POST(self):  # pylint: disable=invalid-name
    parts, query = self._request()  # "", upload, storage, v1, b, <bucket>, o
    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
    if parts[1:5] != ["upload", "storage", "v1", "b"] or "name" not in query:
      return self._send(400)
    key = parts[5] + "/" + query["name"]
    if self._precondition(key, query):
      return self._send(412)
    FakeGCS.put(key, body)
    return self._send(200, json.dumps(self._meta(key)).encode(),
                      [("Content-Type", "application/json")])

  def do_DELETE(self):  # pylint: disable=invalid-name
    parts, query = self._request()
    key = parts[4] + "/" + urllib.parse.unquote("/".join(parts[6:]))
    if key not in FakeGCS.objects:
      return self._send(404)
    if self._precondition(key, query):
      return self._send(412)
    FakeGCS.objects.pop(key, None)
    return self._send(204)


def _forget_epath_file_systems():
  """epath caches the fsspec file system it made for each protocol: make it ask fsspec again."""
  fsspec_backend = epath_backend._FileSystemSpecBackend  # pylint: disable=protected-access
  fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def _fake_gcs_service():
  """Registers FakeGCS for gs:// and serves its objects to TensorStore, for this module."""
  saved = {p: fsspec.registry.get(p) for p in FakeGCS.protocol}
  for protocol in FakeGCS.protocol:
    fsspec.register_implementation(protocol, FakeGCS, clobber=True)
  _forget_epath_file_systems()
  http = server.ThreadingHTTPServer(("127.0.0.1", 0), _GcsApi)
  threading.Thread(target=http.serve_forever, daemon=True).start()
  env = {"TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{http.server_address[1]}",
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token"}
  old_env = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield
  finally:
    http.shutdown()
    http.server_close()
    for k, v in old_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    for protocol, cls in saved.items():
      if cls is None:
        # fsspec.registry is the read-only view; the module's dict is behind it.
        registry = importlib.import_module("fsspec.registry")
        registry._registry.pop(protocol, None)  # pylint: disable=protected-access
      else:
        fsspec.register_implementation(protocol, cls, clobber=True)
    _forget_epath_file_systems()


@pytest.fixture(name="gcs")
def _gcs(_fake_gcs_service, tmp_path, monkeypatch):
  """An empty fake bucket; the test runs in ``tmp_path/cwd``, which must stay free of gs:."""
  FakeGCS.objects.clear()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield FakeGCS.objects
  assert not os.listdir(cwd), f"local files leaked from remote paths: {os.listdir(cwd)}"


def _keys(objects, prefix=""):
  return sorted(k[len(BUCKET) + 1:] for k in objects if k.startswith(f"{BUCKET}/{prefix}"))


def _get(objects, name) -> bytes:
  return objects[f"{BUCKET}/{name}"][0]


# --- atomic --------------------------------------------------------------------------------------


def test_atomic_writes_land_where_asked_and_equal_local(gcs, tmp_path):
  local_dir = tmp_path / "local"
  url_dir = tmp_path / "url"
  png = np.zeros((4, 4), np.uint8)

  def write_all(root: str) -> None:
    atomic.write_text_atomic(f"{root}/a/notes.txt", "héllo\n")
    atomic.write_json_atomic(f"{root}/a/b/result.json", {"x": [1, 2.5], "nan": float("nan")})
    atomic.write_bytes_atomic(f"{root}/raw.bin", bytes(range(256)))
    # The writer is handed a path with the target's extension (np.save appends .npy otherwise).
    atomic.write_atomic(f"{root}/arr.npy", lambda tmp: np.save(tmp, png))
    atomic.write_atomic(f"{root}/img.png", lambda tmp: Image.fromarray(png).save(tmp))

  write_all(str(local_dir))
  write_all(f"file://{url_dir}")
  write_all(f"gs://{BUCKET}/out")
  names = ["a/b/result.json", "a/notes.txt", "arr.npy", "img.png", "raw.bin"]
  assert _keys(gcs) == [f"out/{n}" for n in names]  # No temporary objects left.
  for name in names:
    want = (local_dir / name).read_bytes()
    assert (url_dir / name).read_bytes() == want
    assert _get(gcs, f"out/{name}") == want
  assert sorted(os.listdir(url_dir)) == ["a", "arr.npy", "img.png", "raw.bin"]

  atomic.write_text_atomic(f"gs://{BUCKET}/out/a/notes.txt", "replaced\n")  # Over an old object.
  assert _get(gcs, "out/a/notes.txt") == b"replaced\n"


def test_failed_remote_write_keeps_the_old_file_and_no_temporary(gcs):
  target = f"gs://{BUCKET}/out/result.json"
  atomic.write_json_atomic(target, {"old": 1})

  def half_then_fail(tmp):
    with open(tmp, "w") as f:
      f.write('{"new": ')
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError, match="killed"):
    atomic.write_atomic(target, half_then_fail)
  assert _keys(gcs) == ["out/result.json"]
  assert json.loads(_get(gcs, "out/result.json")) == {"old": 1}


def test_remote_write_falls_back_to_a_direct_write_without_rename(gcs, monkeypatch):
  def no_rename(self, *args, **kwargs):
    raise NotImplementedError("no rename here")

  monkeypatch.setattr(FakeGCS, "mv", no_rename)
  atomic.write_text_atomic(f"gs://{BUCKET}/x/y.txt", "direct\n")
  assert _keys(gcs) == ["x/y.txt"] and _get(gcs, "x/y.txt") == b"direct\n"


def test_remote_reads_appends_and_checks(gcs):
  root = f"gs://{BUCKET}/run"
  assert not atomic.exists(f"{root}/log.jsonl") and not atomic.isdir(root)
  atomic.makedirs(root)
  atomic.append_text(f"{root}/log.jsonl", "1\n")  # FakeGCS refuses mode "a", as gcsfs does.
  atomic.append_text(f"{root}/log.jsonl", "2\n")
  assert _get(gcs, "run/log.jsonl") == b"1\n2\n"
  assert atomic.exists(f"{root}/log.jsonl") and atomic.isfile(f"{root}/log.jsonl")
  assert atomic.isdir(root) and not atomic.isfile(root)
  with atomic.open_text(f"{root}/log.jsonl", newline="") as f:
    assert f.read() == "1\n2\n"
  with atomic.local_copy(f"{root}/log.jsonl") as local:
    assert open(local, "rb").read() == b"1\n2\n" and local.endswith(".jsonl")
  assert not os.path.exists(local)
  atomic.remove(f"{root}/log.jsonl")
  atomic.remove(f"{root}/log.jsonl")  # Already gone: no error.
  assert not gcs
  assert atomic.absolute(root) == root
  assert atomic.absolute("rel/x") == os.path.join(os.getcwd(), "rel/x")
  assert atomic.local_path("file:///tmp/a%20b/c") == "/tmp/a b/c"
  with pytest.raises(ValueError, match="unsupported file system"):
    atomic.write_text_atomic("memory://nowhere/x.txt", "x")


# --- the score binary ----------------------------------------------------------------------------


def _score(argv):
  f = flags.FLAGS
  f.unparse_flags()
  f(["score", "--synthetic_pool", "--synthetic_n=60", "--metrics=cka,rsa",
     "--gw_anneal_iterations=10", "--noprogress"] + argv)
  try:
    return score.run()
  finally:
    f.unparse_flags()


def _comparable(name: str, data: bytes) -> bytes:
  """A result file without the run's timings (seconds differ between two runs)."""
  if name == "scores.json":
    payload = json.loads(data)
    payload["run"] = {k: v for k, v in payload["run"].items() if "seconds" not in k}
    return json.dumps(payload, sort_keys=True).encode()
  if name == "report.md":
    return b"\n".join(l for l in data.split(b"\n") if b"seconds" not in l)
  return data


def test_score_binary_writes_output_dir_to_a_bucket_as_locally(gcs, tmp_path):
  local = tmp_path / "local_out"
  written_local = _score([f"--output_dir={local}"])
  written = _score([f"--output_dir=gs://{BUCKET}/runs/score"])
  names = sorted(["scores.json", "scores.csv", "scores.png", "report.md", "vision_cka.csv",
                  "vision_cka.png"])
  assert [os.path.basename(p) for p in written_local] == names
  assert written == [f"gs://{BUCKET}/runs/score/{n}" for n in names]
  # Nothing else (no staging), but the manifest naming the result's files, written last.
  assert _keys(gcs) == sorted(f"runs/score/{n}" for n in names + [result_dir.MANIFEST])
  assert json.loads(_get(gcs, f"runs/score/{result_dir.MANIFEST}")) == {"files": names}
  for name in names:
    assert _comparable(name, _get(gcs, f"runs/score/{name}")) == _comparable(
        name, (local / name).read_bytes()), name
  # A file:// URL is a local directory.
  url_out = tmp_path / "url_out"
  assert [os.path.basename(p) for p in _score([f"--output_dir=file://{url_out}"])] == names
  assert _comparable("scores.csv", (url_out / "scores.csv").read_bytes()) == (
      local / "scores.csv").read_bytes()
  # A ground-truth table in the bucket is read back through epath.
  FakeGCS.put(f"{BUCKET}/gt/truth.csv", (local / "scores.csv").read_bytes())
  truth = f"gs://{BUCKET}/gt/truth.csv"
  again = _score([f"--output_dir=gs://{BUCKET}/runs/again", f"--ground_truth={truth}",
                  "--ground_truth_column=cka"])
  assert json.loads(_get(gcs, "runs/again/scores.json"))["evaluation"]["cka"]["spearman"] == (
      pytest.approx(1.0))
  assert len(again) == 6  # vision_cka.png too


def test_selection_result_files_and_tables_in_a_bucket(gcs, tmp_path):
  payload = {"a": 1}
  local = sel_reports.write_result_files(str(tmp_path / "sel"), "out", payload, "# md\n",
                                         extra={"_t.csv": "x,y\n1,2\n"})
  remote = sel_reports.write_result_files(f"gs://{BUCKET}/sel", "out", payload, "# md\n",
                                          extra={"_t.csv": "x,y\n1,2\n"})
  assert remote == [f"gs://{BUCKET}/sel/{n}" for n in ("out.json", "out.md", "out_t.csv")]
  assert _keys(gcs) == ["sel/out.json", "sel/out.md", "sel/out_t.csv"]
  for path, name in zip(local, ("out.json", "out.md", "out_t.csv")):
    assert _get(gcs, f"sel/{name}") == open(path, "rb").read()
  FakeGCS.put(f"{BUCKET}/t/truth.csv", b"candidate,task,accuracy\na,t,0.5\nb,t,0.7\n")
  assert judge.read_long_table(f"gs://{BUCKET}/t/truth.csv", "accuracy") == {
      "t": {"a": 0.5, "b": 0.7}}
  # Mordal's similarity tables (score's vision_cka.csv) read back from the bucket; a medoid name
  # with "=" in it still splits where the right-hand side is an existing (remote) file.
  table = f"gs://{BUCKET}/sim/llm.csv"
  FakeGCS.put(table[len("gs://"):], b"name,a,b\na,1,0.5\nb,0.5,1\n")
  assert sel_tables.similarity_entry(f"m@layer=-5={table}") == ("m@layer=-5", table)
  names, matrix = sel_tables.read_similarity(table)
  assert names == ["a", "b"] and matrix.tolist() == [[1.0, 0.5], [0.5, 1.0]]


# --- feature banks and the extraction cache ------------------------------------------------------


@pytest.mark.parametrize("ext", [".safetensors", ".npz"])
def test_feature_bank_round_trip_in_a_bucket(gcs, tmp_path, ext):
  feats = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
  ids = np.array([f"s{i}" for i in range(6)])
  fb.save_bank(str(tmp_path / f"bank{ext}"), feats, ids, {"name": "m", "cache_key": "k1"})
  fb.save_bank(f"gs://{BUCKET}/banks/bank{ext}", feats, ids, {"name": "m", "cache_key": "k1"})
  assert _keys(gcs) == [f"banks/bank{ext}"]
  # (Not compared byte for byte: safetensors orders the metadata as a hash map does.)
  bank = fb.load_bank(f"gs://{BUCKET}/banks/bank{ext}")
  want = fb.load_bank(str(tmp_path / f"bank{ext}"))
  np.testing.assert_array_equal(bank.features, feats)
  np.testing.assert_array_equal(bank.features, want.features)
  np.testing.assert_array_equal(bank.ids, want.ids)
  assert bank.metadata == want.metadata
  assert bank.path == f"gs://{BUCKET}/banks/bank{ext}"
  if ext == ".safetensors":
    assert bank.name == "m"
    assert extraction.bank_info(f"gs://{BUCKET}/banks/bank{ext}") == extraction.bank_info(
        str(tmp_path / f"bank{ext}")) == ("k1", (6, 3))
  with pytest.raises(fb.BankError, match=r"gs://bkt/banks/none.npz: feature bank file not found"):
    fb.load_bank(f"gs://{BUCKET}/banks/none.npz")


def _images(root, n=6):
  os.makedirs(root / "img")
  rows = []
  for i in range(n):
    rng = np.random.default_rng(i)
    Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), np.uint8)).save(
        root / "img" / f"{i}.png")
    rows.append({"id": i, "image": f"img/{i}.png", "caption": f"picture {i}"})
  (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_extraction_cache_and_resume_in_a_bucket(gcs, tmp_path):
  data = tmp_path / "data"
  _images(data)
  options = extraction.ExtractOptions(batch_size=2, checkpoint_every=1, progress=False)
  [local] = extraction.extract(["pixel-patches"], str(data), str(tmp_path / "banks"),
                               options=options)
  cache = f"gs://{BUCKET}/cache"

  def kill_after_2(name, batches):
    if batches == 2:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    extraction.extract(["pixel-patches"], str(data), cache, options=options,
                       on_batch=kill_after_2)
  assert _keys(gcs) == ["cache/pixel-patches.partial.npz"]
  [resumed] = extraction.extract(["pixel-patches"], str(data), cache, options=options)
  assert (resumed.cached, resumed.resumed_rows, resumed.batches_run) == (False, 4, 1)
  assert _keys(gcs) == ["cache/pixel-patches.safetensors"]  # The partial file is gone.
  assert resumed.path == f"{cache}/pixel-patches.safetensors"
  np.testing.assert_array_equal(fb.load_bank(resumed.path).features,
                                fb.load_bank(local.path).features)
  [again] = extraction.extract(["pixel-patches"], str(data), cache, options=options)
  assert again.cached and (again.n, again.dim) == (local.n, local.dim)


# --- training: checkpoints, metrics log, ground-truth tables -------------------------------------


def _state(scale):
  return {"step": jnp.asarray(3, jnp.int32),
          "params": {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * scale,
                     "b": jnp.full((3,), scale, jnp.float32)}}


def test_orbax_checkpoints_in_a_bucket_restore_as_locally(gcs, tmp_path, monkeypatch):
  # orbax asks the GCS client library whether a bucket has hierarchical namespace (that library
  # is not installed here); the fake bucket has a flat one.
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  meta = {"vision": "v", "llm": "l", "stage": 1}
  restored = {}
  for where in (str(tmp_path / "ckpt"), f"gs://{BUCKET}/run/checkpoints"):
    assert ckpt_lib.latest_step(where) is None
    ckpt = ckpt_lib.Checkpointer(where, save_every=1, keep=1)
    for step in (1, 2):
      ckpt.save(step, _state(step), {"position": step}, meta)
    ckpt.wait()
    assert ckpt.latest_step() == 2
    restored[where] = ckpt.restore(2, _state(0), meta)
    ckpt.close()
    assert ckpt_lib.latest_step(where) == 2
    params, saved_meta = ckpt_lib.restore_params(where)
    np.testing.assert_array_equal(params["w"], np.asarray(_state(2)["params"]["w"]))
    assert saved_meta["step"] == 2 and saved_meta["vision"] == "v"
  (state_l, data_l), (state_r, data_r) = restored.values()
  assert data_l == data_r == {"position": 2}
  jax.tree.map(np.testing.assert_array_equal, state_r, state_l)
  keys = _keys(gcs)
  assert "run/checkpoints/2/meta/metadata" in keys
  assert not [k for k in keys if k.startswith("run/checkpoints/1/")]  # keep=1 deleted step 1.
  with pytest.raises(ckpt_lib.CheckpointError, match="gs://bkt/run/none: no such checkpoint"):
    ckpt_lib.restore_params(f"gs://{BUCKET}/run/none")


def test_metrics_log_and_final_loss_in_a_bucket(gcs):
  workdir = f"gs://{BUCKET}/run"
  log = loop.MetricsLog(f"{workdir}/{loop.METRICS_FILE}", 0)
  for step in (1, 2, 3):
    log.write({"step": step, "loss": 1.0 / step})
  assert loop.final_loss(workdir) == pytest.approx(1 / 3)
  loop.MetricsLog(f"{workdir}/{loop.METRICS_FILE}", 2)  # A resume from step 2 drops step 3.
  assert [json.loads(l)["step"] for l in _get(gcs, "run/metrics.jsonl").splitlines()] == [1, 2]
  assert loop.final_loss(workdir) == pytest.approx(0.5)
  assert loop.final_loss(f"gs://{BUCKET}/other") is None


def test_groundtruth_tables_in_a_bucket_round_trip_as_locally(gcs, tmp_path):
  runs = [{"candidate": "a", "seed": s, "accuracy": 0.6 + s / 10, "a_score": -1.0,
           "majority_accuracy": 0.3, "questions": 300, "stage1_steps": 8, "stage2_steps": 8,
           "date": "2026-01-01", "command": "cmd"} for s in (0, 1)]
  for output_dir in (str(tmp_path), f"gs://{BUCKET}/gt"):
    groundtruth.write_tables(output_dir, runs, ["a"])
    assert [(r["seed"], r["questions"]) for r in groundtruth.read_runs(
        groundtruth.runs_path(output_dir))] == [(0, 300), (1, 300)]
  names = ("groundtruth.csv", "groundtruth.json", "groundtruth_runs.csv")
  assert _keys(gcs) == [f"gt/{name}" for name in names]
  for name in names:
    assert _get(gcs, f"gt/{name}") == (tmp_path / name).read_bytes()
  curves = f"gs://{BUCKET}/gt/curves.csv"
  atomic.write_text_atomic(curves, "candidate,accuracy\na,0.5\n")
  assert groundtruth.read_curves(curves) == [{"candidate": "a", "accuracy": "0.5"}]
  with atomic.open_text(f"gs://{BUCKET}/gt/groundtruth.csv", newline="") as f:
    assert next(csv.DictReader(f))["candidate"] == "a"
  assert groundtruth.read_curve_points(f"gs://{BUCKET}/gt") == {}
