"""Result, cache and checkpoint files on any file system, written atomically.

Every output path of the binaries (``--output_dir``, ``--workdir``, ``--cache_dir``, ...) may be a
local path, a ``file://`` URL, or any URI ``etils.epath`` opens (``gs://bucket/run``, ``s3://``):
on a TPU pod results and checkpoints usually go to a bucket. Paths stay strings (``os.path.join``
and ``os.path.splitext`` work on POSIX for URIs too); what touches the file system goes through
the helpers here, which keep the plain ``os`` calls for local paths (so local behaviour is what
it always was) and use ``epath`` for the rest.

Atomic writes: a reader (or a killed run) never sees a half-written result file. Locally a
temporary file beside the target is renamed over it (``os.replace``). Elsewhere the content is
uploaded to a temporary object beside the target and renamed over it with epath (on GCS a rename
is a copy and a delete; each object write is atomic, so a reader sees the old or the new file),
or written to the target directly where the file system cannot rename.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Iterator, Mapping, Sequence

from etils import epath

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
  """Whether ``path`` is on the local file system (a plain path or a ``file://`` URL)."""
  s = os.fspath(path)
  return "://" not in s or s.startswith("file://")


def local_path(path: PathLike) -> str:
  """A local path or ``file://`` URL as a plain path (relative paths stay relative).

  Raises:
    ValueError: ``path`` is a remote URI.
  """
  s = os.fspath(path)
  if not is_local(s):
    raise ValueError(f"{s}: not a local path")
  if s.startswith("file://"):
    parsed = urllib.parse.urlsplit(s)
    if parsed.netloc not in ("", "localhost"):
      raise ValueError(f"{s}: a file:// URL must name a local file (file:///path)")
    return urllib.request.url2pathname(parsed.path)
  return s


def as_path(path: PathLike) -> epath.Path:
  """``path`` as an ``epath.Path`` (``file://`` URLs become local paths).

  Raises:
    ValueError: a URI scheme epath does not know (it knows gs://, s3://, az://, hf://).
  """
  if is_local(path):
    return epath.Path(local_path(path))
  try:
    return epath.Path(os.fspath(path))
  except KeyError:  # epath's registry lookup of the scheme.
    raise ValueError(f"{os.fspath(path)}: unsupported file system (local paths, file://, and "
                     "the URIs etils.epath opens: gs://, s3://, az://, hf://)") from None


def absolute(path: PathLike) -> str:
  """A local path made absolute (against the current directory); any other path unchanged.

  A remote URI has no current directory to resolve against (``os.path.abspath`` would turn
  ``gs://b/x`` into ``<cwd>/gs:/b/x``), so it is never passed through ``abspath``.
  """
  if is_local(path):
    return os.path.abspath(local_path(path))
  return os.fspath(path)


def exists(path: PathLike) -> bool:
  if is_local(path):
    return os.path.exists(local_path(path))
  return as_path(path).exists()


def isfile(path: PathLike) -> bool:
  if is_local(path):
    return os.path.isfile(local_path(path))
  return as_path(path).is_file()


def isdir(path: PathLike) -> bool:
  if is_local(path):
    return os.path.isdir(local_path(path))
  return as_path(path).is_dir()


def makedirs(path: PathLike) -> None:
  """Creates directory ``path`` and its parents, if missing.

  On an object store this creates what the file system has of directories (often nothing).
  """
  if is_local(path):
    os.makedirs(local_path(path), exist_ok=True)
  else:
    as_path(path).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike) -> None:
  """Deletes file ``path``; no error when it does not exist."""
  if is_local(path):
    with contextlib.suppress(FileNotFoundError):
      os.remove(local_path(path))
  else:
    as_path(path).unlink(missing_ok=True)


def read_bytes(path: PathLike) -> bytes:
  if is_local(path):
    with open(local_path(path), "rb") as f:
      return f.read()
  return as_path(path).read_bytes()


def open_text(path: PathLike, *, encoding: str | None = None,
              newline: str | None = None) -> io.TextIOBase:
  """``path`` opened for reading text, as ``open(path, encoding=, newline=)`` would.

  A remote file is read whole into memory (the files read back this way, tables, JSON and
  logs, are small) and decoded as UTF-8, since epath's files take no ``newline`` argument and the
  csv module needs ``newline=""``.
  """
  if is_local(path):
    return open(local_path(path), encoding=encoding,  # pylint: disable=consider-using-with
                newline=newline)
  return io.StringIO(as_path(path).read_bytes().decode(encoding or "utf-8"), newline=newline)


def append_text(path: PathLike, text: str) -> None:
  """Appends ``text`` to ``path`` (created when missing).

  Object stores cannot append (gcsfs refuses mode "a"); there the file is read and written
  again whole, atomically. The files appended to (metrics and curve logs) stay small.
  """
  if is_local(path):
    with open(local_path(path), "a") as f:
      f.write(text)
    return
  p = as_path(path)
  old = p.read_bytes().decode("utf-8") if p.exists() else ""
  write_text_atomic(path, old + text)


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
  """A local file holding ``path``'s content, for readers that need one (safetensors, mmap).

  A local ``path`` is yielded as it is; a remote one is downloaded into a temporary file with the
  same extension, removed on exit.
  """
  if is_local(path):
    yield local_path(path)
    return
  p = as_path(path)
  fd, tmp = tempfile.mkstemp(prefix="vlmsel-download-", suffix=os.path.splitext(p.name)[1])
  try:
    with os.fdopen(fd, "wb") as out, p.open("rb") as f:
      shutil.copyfileobj(f, out)
    yield tmp
  finally:
    os.unlink(tmp)


def _upload_atomic(source: str, target: epath.Path, prefix: str) -> None:
  """Copies local file ``source`` to remote ``target``: into a temporary object beside it, then
  renamed over it, or written directly where the file system has no rename."""
  tmp = target.parent / f"{prefix}{uuid.uuid4().hex}{os.path.splitext(target.name)[1]}"
  moved = False
  try:
    with open(source, "rb") as f, tmp.open("wb") as out:
      shutil.copyfileobj(f, out)
    try:
      tmp.replace(target)
      moved = True
    except (NotImplementedError, io.UnsupportedOperation):
      # One object write is still all-or-nothing on an object store.
      with open(source, "rb") as f, target.open("wb") as out:
        shutil.copyfileobj(f, out)
  finally:
    if not moved:
      tmp.unlink(missing_ok=True)


def publish(source: str, path: PathLike) -> None:
  """Moves the finished local file ``source`` to ``path`` atomically (``source`` is consumed).

  Locally this is ``os.replace``, so ``source`` must be on the same file system (a staging
  directory beside the target, see ``staging_dir``).
  """
  if is_local(path):
    os.replace(source, local_path(path))
    return
  target = as_path(path)
  _upload_atomic(source, target, f".{target.name}.tmp-")
  os.unlink(source)


def staging_dir(beside: PathLike, prefix: str) -> str:
  """A new local directory (named ``prefix`` + random) to prepare files in before ``publish``
  moves them to ``beside`` or next to it.

  In ``beside``'s parent directory when that is local (``os.replace`` cannot cross file systems;
  the parent is created), in the system's temporary directory otherwise. The caller removes it.
  """
  if is_local(beside):
    parent = os.path.dirname(absolute(beside))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=prefix)
  return tempfile.mkdtemp(prefix=prefix)


def write_atomic(path: PathLike, write: Callable[[str], None], *,
                 prefix: str | None = None) -> None:
  """Calls ``write(tmp_path)`` for a temporary local file, then moves it over ``path`` atomically.

  The temporary name keeps ``path``'s extension, so writers that pick a format by extension
  (matplotlib's ``savefig``, ``np.savez``) write the right one. A local temporary file lies beside
  ``path`` (named ``prefix`` + random, default ``.<name>.tmp-``) and is renamed over it; for a
  remote ``path`` it lies in the system's temporary directory and is uploaded (see the module
  docstring). On any error the temporary files are removed and ``path`` is left as it was.

  Args:
    path: The target; a local path, ``file://`` URL or epath URI. Missing parent directories are
      created.
    write: Writes the complete content into the (local) path it is given.
    prefix: The temporary names' prefix.

  Raises:
    ValueError: an unsupported URI scheme. Whatever ``write`` or the file system raises.
  """
  if is_local(path):
    path = os.path.abspath(local_path(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                               prefix=prefix or f".{os.path.basename(path)}.tmp-",
                               suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
      write(tmp)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
    return
  target = as_path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="vlmsel-upload-", suffix=os.path.splitext(target.name)[1])
  os.close(fd)
  try:
    write(tmp)
    _upload_atomic(tmp, target, prefix or f".{target.name}.tmp-")
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      f.write(data)
  write_atomic(path, write)


def write_text_atomic(path: PathLike, text: str) -> None:
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  write_atomic(path, write)


def write_json_atomic(path: PathLike, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """``rows`` as CSV text with a header of ``columns`` (keys a row lacks are left empty)."""
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: row.get(k) for k in columns})
  return buf.getvalue()
