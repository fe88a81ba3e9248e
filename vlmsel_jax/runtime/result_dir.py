"""A binary's result directory, replaced as a unit, with one writer at a time.

A run prepares its whole result in a staging directory beside the target and swaps it in with
one atomic exchange of the two directories (``renameat2(RENAME_EXCHANGE)``), so a reader, or a
run killed at any point, sees the old result or the new one, whole, never a mix.

The result's own files are listed in a manifest inside it (``MANIFEST``). When a result replaces
an older one, what the older manifest lists goes with it; anything else in the directory (a bank
cache, files a user put there) is carried into the new one by hard links, so it is kept.

A lock file beside the target (``.<name>.lock``, an ``flock`` the kernel releases when its holder
dies, even by kill -9) refuses a second writer. Under the lock, what a killed run left behind is
removed: staging directories, and (where the exchange is unavailable and two renames stand in for
it) a result moved aside but not yet replaced is put back.

Remote directories (``gs://``) have neither rename nor locks: there the files are published one
by one, the manifest last.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import tempfile
from typing import Callable, Iterator

from vlmsel_jax.runtime import atomic

MANIFEST = ".vlmsel-result.json"


class OutputDirError(ValueError):
  """The result directory cannot be written: it is a file, is busy, or is not writable."""


def _split(target: str) -> tuple[str, str]:
  target = atomic.absolute(target).rstrip("/")
  return os.path.dirname(target), os.path.basename(target)


def lock_path(target: str) -> str:
  parent, name = _split(target)
  return os.path.join(parent, f".{name}.lock")


# Locks this process holds: lock path → (fd, depth). The lock is re-entrant within a process, so
# a binary can hold it for a whole run and its report writer take it again.
_HELD: dict[str, list[int]] = {}


def _check_target(target: str) -> None:
  path = atomic.local_path(target)
  if os.path.exists(path) and not os.path.isdir(path):
    raise OutputDirError(f"{target}: exists and is not a directory; give --output_dir a "
                         "directory path")


def _acquire(path: str, target: str) -> int:
  """Opens and flocks ``path``; the file at ``path`` is the one locked (a holder that unlinked
  it on release cannot leave two processes each holding a different file)."""
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise OutputDirError(f"{target}: cannot write beside it ({e.strerror}: {path})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      with contextlib.suppress(OSError):
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
      os.close(fd)
      raise OutputDirError(f"{target}: another run is writing it (lock {path}"
                           + (f", held by {holder}" if holder else "") + ")") from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
      return fd
    os.close(fd)  # Unlinked by its last holder between our open and flock: take the new one.


def _recover(target: str) -> None:
  """Cleans up after killed runs (under the lock)."""
  parent, name = _split(target)
  aside = sorted(glob.glob(os.path.join(parent, glob.escape(f".{name}.old-") + "*")),
                 key=os.path.getmtime)
  if aside and not os.path.exists(target):
    # Killed between the two renames of the fallback swap: the moved-aside result is whole.
    os.rename(aside.pop(), target)
  for stale in aside + glob.glob(os.path.join(parent, glob.escape(f".{name}.tmp-") + "*")):
    shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def locked(target: str) -> Iterator[None]:
  """Holds ``target``'s lock (re-entrant in one process); a no-op for remote directories.

  Raises:
    OutputDirError: another process holds it; ``target`` is a file; its parent is not writable.
  """
  if not atomic.is_local(target):
    yield
    return
  target = atomic.absolute(target)
  _check_target(target)
  path = lock_path(target)
  if path in _HELD:
    _HELD[path][1] += 1
    try:
      yield
    finally:
      _HELD[path][1] -= 1
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = _acquire(path, target)
  _HELD[path] = [fd, 1]
  try:
    _recover(target)
    yield
  finally:
    del _HELD[path]
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps directories ``a`` and ``b``; False where the system cannot."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except AttributeError:
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), b)


def read_manifest(directory: str) -> list[str]:
  """The files a result directory's manifest lists ([] without one)."""
  try:
    with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
      return list(json.load(f)["files"])
  except FileNotFoundError:
    return []
  except (ValueError, KeyError, TypeError):
    return []  # A damaged manifest owns nothing: every entry is kept.


def _carry_over(old: str, new: str, produced: set[str]) -> None:
  """Hard-links into ``new`` what ``old`` holds besides its own result and the new one."""
  owned = set(read_manifest(old)) | produced | {MANIFEST}
  for entry in sorted(os.listdir(old)):
    if entry in owned:
      continue
    src, dst = os.path.join(old, entry), os.path.join(new, entry)
    if os.path.isdir(src) and not os.path.islink(src):
      shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
      _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
  if os.path.islink(src):
    os.symlink(os.readlink(src), dst)
    return
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def replace(target: str, fill: Callable[[str], None]) -> list[str]:
  """Writes a new result into ``target`` as one unit: ``fill(staging)`` writes every file of it.

  Returns the paths of the files ``fill`` wrote, as they lie in ``target``.

  Raises:
    OutputDirError: see ``locked``. Whatever ``fill`` raises (``target`` is then untouched).
  """
  if not atomic.is_local(target):
    return _replace_remote(target, fill)
  target = atomic.absolute(target)
  parent, name = _split(target)
  with locked(target):
    try:
      staging = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
    except OSError as e:
      raise OutputDirError(f"{target}: cannot write there ({e.strerror})") from None
    try:
      fill(staging)
      produced = sorted(os.listdir(staging))
      atomic.write_json_atomic(os.path.join(staging, MANIFEST), {"files": produced})
      if not os.path.exists(target):
        os.rename(staging, target)
      else:
        _carry_over(target, staging, set(produced))
        if _exchange(staging, target):
          shutil.rmtree(staging)  # Now the old result.
        else:
          aside = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
          os.rmdir(aside)
          os.rename(target, aside)
          os.rename(staging, target)
          shutil.rmtree(aside)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  return [os.path.join(target, p) for p in produced]


def _replace_remote(target: str, fill: Callable[[str], None]) -> list[str]:
  staging = tempfile.mkdtemp(prefix="vlmsel-result-")
  try:
    fill(staging)
    produced = sorted(os.listdir(staging))
    atomic.makedirs(target)
    for entry in produced:
      atomic.publish(os.path.join(staging, entry), os.path.join(target, entry))
    atomic.write_json_atomic(os.path.join(target, MANIFEST), {"files": produced})
    return [os.path.join(target, p) for p in produced]
  finally:
    shutil.rmtree(staging, ignore_errors=True)
