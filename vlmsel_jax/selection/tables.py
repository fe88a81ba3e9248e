"""The CSV tables the selection methods read and write (besides judging's, in ``judge``).

Readers check what they read and raise the method's own error (``ac.TableError``,
``mordal.MordalError``, ``dcd.DCDError``: all ``ValueError``s) with a one-line message naming the
file, line and column. Any path may be local or an epath URI (``gs://``): the inputs are often
tables another binary wrote to a bucket.

* AC: the settings table (``read_settings``, ``parse_groups``).
* Mordal: square similarity matrices (``read_similarity``; the LLM ones one per vision medoid,
  ``read_llm_similarity``) and recorded learning curves (``read_curves``).
* DCD: block-conductance profiles (``read_profiles`` / ``profiles_csv``) and the predicted
  ranking as a score table for ``--method=judge`` (``scores_csv``).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

from vlmsel_jax.runtime import atomic
from vlmsel_jax.selection import ac
from vlmsel_jax.selection import dcd
from vlmsel_jax.selection import judge
from vlmsel_jax.selection import mordal

CURVE_COLUMNS = ("candidate", "vision", "llm", "data_fraction", "accuracy", "cost")

# ---------------------------------------------------------------------------------------------
# AC.


def read_settings(path: str, a_column: str, c_column: str, targets: Sequence[str],
                  name_column: str | None = "setting") -> dict[str, Any]:
  """Reads the AC settings table; checks columns, numbers and duplicate settings.

  The table is a CSV with a header row, one row per vision setting; lines starting with ``#``
  are comments. Without ``targets``, every column but A, C and ``name_column`` is one.

  Returns:
    ``{"names": [...], "a": (n,), "c": (n,), "y": (n, T), "targets": [...]}``.

  Raises:
    ac.TableError: a missing file or column, a non-numeric or empty cell (named by line), no
      targets, or two settings with the same name or the same (A, C).
  """
  if not atomic.isfile(path):
    raise ac.TableError(f"{path}: no such file")
  with atomic.open_text(path, newline="", encoding="utf-8") as f:
    numbered = [(i + 1, line) for i, line in enumerate(f)
                if line.strip() and not line.lstrip().startswith("#")]
  if not numbered:
    raise ac.TableError(f"{path}: empty table (no header row)")
  rows = list(csv.reader([line for _, line in numbered]))
  header = [h.strip() for h in rows[0]]
  line_of = [ln for ln, _ in numbered[1:]]
  body = rows[1:]
  if len(set(header)) != len(header):
    dup = sorted({h for h in header if header.count(h) > 1})
    raise ac.TableError(f"{path}: duplicate column name(s) {', '.join(dup)}")
  has_names = bool(name_column) and name_column in header
  if not targets:
    targets = [h for h in header if h not in (a_column, c_column)
               and not (has_names and h == name_column)]
  needed = [a_column, c_column] + list(targets)
  missing = [col for col in needed if col not in header]
  if missing:
    raise ac.TableError(f"{path}: missing column(s) {', '.join(missing)} (columns: "
                        f"{', '.join(header)})")
  if not targets:
    raise ac.TableError(f"{path}: no target columns")
  for row, ln in zip(body, line_of):
    if len(row) != len(header):
      raise ac.TableError(f"{path}:{ln}: {len(row)} fields, the header has {len(header)}")

  def column(name: str) -> np.ndarray:
    j = header.index(name)
    values = []
    for row, ln in zip(body, line_of):
      cell = row[j].strip()
      try:
        v = float(cell)
      except ValueError:
        v = math.nan
      if not math.isfinite(v):
        raise ac.TableError(f"{path}:{ln}: column {name!r} holds {cell!r}, not a finite number")
      values.append(v)
    return np.asarray(values, np.float64)

  names = ([row[header.index(name_column)].strip() for row in body] if has_names
           else [f"row{ln}" for ln in line_of])
  seen: dict[str, int] = {}
  for name, ln in zip(names, line_of):
    if name in seen:
      raise ac.TableError(f"{path}:{ln}: duplicate setting {name!r} (also on line {seen[name]})")
    seen[name] = ln
  a, c = column(a_column), column(c_column)
  y = np.stack([column(t) for t in targets], axis=1) if body else np.zeros((0, len(targets)))
  try:
    ac.check_settings(a, c, [f"{n} (line {ln})" for n, ln in zip(names, line_of)])
  except ac.ACError as e:
    raise ac.TableError(f"{path}: {e}") from None
  return {"names": names, "a": a, "c": c, "y": y, "targets": list(targets)}


def parse_groups(spec: str | None, targets: Sequence[str]) -> dict[str, list[str]]:
  """``'name:col,col;name:col'`` → {name: [cols]}; every column must be a target."""
  if not spec:
    return {}
  groups: dict[str, list[str]] = {}
  for part in spec.split(";"):
    part = part.strip()
    if not part:
      continue
    name, sep, cols = part.partition(":")
    cols_list = [c.strip() for c in cols.split(",") if c.strip()]
    if not sep or not name.strip() or not cols_list:
      raise ac.TableError(f"--groups: {part!r} is not 'name:col,col'")
    unknown = [c for c in cols_list if c not in targets]
    if unknown:
      raise ac.TableError(f"--groups: group {name.strip()!r} names {', '.join(unknown)}, not "
                          f"among the targets ({', '.join(targets)})")
    groups[name.strip()] = cols_list
  return groups


# ---------------------------------------------------------------------------------------------
# Mordal.


def read_similarity(path: str) -> tuple[list[str], np.ndarray]:
  """A square matrix CSV (header row of names, first column of names) → (names, matrix)."""
  # score's vision_cka.csv and the LLM similarity tables may be in a bucket (gs://).
  if not atomic.isfile(path):
    raise mordal.MordalError(f"{path}: file not found")
  with atomic.open_text(path, newline="", encoding="utf-8") as f:
    rows = [r for r in csv.reader(f) if r]
  if len(rows) < 2:
    raise mordal.MordalError(f"{path}: needs a header row and at least one row of values")
  names = [c.strip() for c in rows[0][1:]]
  if len(set(names)) != len(names):
    raise mordal.MordalError(f"{path}: header names are not unique")
  if len(rows) - 1 != len(names):
    raise mordal.MordalError(f"{path}: {len(names)} columns of names but {len(rows) - 1} rows; "
                             "the matrix must be square")
  matrix = np.empty((len(names), len(names)))
  for i, row in enumerate(rows[1:]):
    line = i + 2
    if row[0].strip() != names[i]:
      raise mordal.MordalError(f"{path}:{line}: row name {row[0].strip()!r} but column {i + 1} "
                               f"is {names[i]!r}; rows and columns must list the same names in "
                               "the same order")
    if len(row) - 1 != len(names):
      raise mordal.MordalError(f"{path}:{line}: {len(row) - 1} values for {len(names)} columns")
    for j, cell in enumerate(row[1:]):
      matrix[i, j] = judge.parse_float(cell, f"{path}:{line}", f"similarity to {names[j]}",
                                       mordal.MordalError)
  return names, matrix


def read_llm_similarity(specs: Sequence[str]) -> dict[str, tuple[list[str], np.ndarray]]:
  """``--llm_similarity`` entries → {vision medoid or "*": (names, matrix)}.

  Each entry is one path (the matrix for every vision cluster, key "*") or ``MEDOID=PATH`` (the
  LLM CKA measured through that medoid's warm-up projector); see ``similarity_entry``.
  """
  if not specs:
    raise mordal.MordalError("--llm_similarity is required")
  llm: dict[str, tuple[list[str], np.ndarray]] = {}
  for spec in specs:
    key, path = similarity_entry(spec.strip())
    if key in llm:
      raise mordal.MordalError(f"--llm_similarity gives {key!r} twice")
    llm[key] = read_similarity(path.strip())
  return llm


def similarity_entry(spec: str) -> tuple[str, str]:
  """``PATH`` → ("*", PATH); ``MEDOID=PATH`` → (MEDOID, PATH).

  Medoid names (``efficientnet-lite2@layer=-5``) and paths may both contain "=", so the entry is
  split where the right-hand side is an existing file.
  """
  splits = [(spec[:i], spec[i + 1:]) for i, ch in enumerate(spec)
            if ch == "=" and i > 0 and _isfile(spec[i + 1:])]
  if _isfile(spec):
    splits.append(("*", spec))
  if len(splits) == 1:
    return splits[0]
  if not splits:
    raise mordal.MordalError(f"--llm_similarity {spec!r}: no such file (give PATH or "
                             "MEDOID=PATH)")
  raise mordal.MordalError(f"--llm_similarity {spec!r} is ambiguous: it reads as "
                           + " or ".join(f"{k}={p}" if k != "*" else p for k, p in splits))


def _isfile(path: str) -> bool:
  """``atomic.isfile``, but False for what is no supported path at all: splitting
  ``a@layer=-5=gs://b/x.csv`` at each "=" also tries ``-5=gs://b/x.csv``, an unknown scheme."""
  try:
    return atomic.isfile(path)
  except ValueError:
    return False


def read_curves(paths: str | Sequence[str]
                ) -> tuple[dict[tuple[str, str], str], dict[str, dict[float, tuple[float, float]]]]:
  """The replay table(s) → ((vision, llm) → candidate, candidate → fraction → (accuracy, cost)).

  Columns ``CURVE_COLUMNS``: the accuracy of ``candidate`` (built from encoder ``vision`` and LLM
  ``llm``) trained on that fraction of the data and the cumulative cost of training it that far
  (fraction 1.0, the full run, is needed for every candidate). Several files are one pool (e.g.
  one grid per LLM): a candidate name or a (vision, llm) pair may appear in only one of them.
  """
  paths = [paths] if isinstance(paths, str) else list(paths)
  if not paths:
    raise mordal.MordalError("no curves file given")
  pairs: dict[tuple[str, str], str] = {}
  of: dict[str, tuple[str, str]] = {}
  source: dict[str, str] = {}
  curves: dict[str, dict[float, tuple[float, float]]] = {}
  for path in paths:
    # groundtruth's curve tables may be in a bucket (gs://).
    if not atomic.isfile(path):
      raise mordal.MordalError(f"{path}: file not found")
    with atomic.open_text(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      fields = reader.fieldnames or []
      for column in CURVE_COLUMNS:
        if column not in fields:
          raise mordal.MordalError(f"{path}: no '{column}' column (columns: "
                                   f"{', '.join(fields) or 'none'})")
      rows = 0
      for line, row in enumerate(reader, start=2):
        rows += 1
        where = f"{path}:{line}"
        cand, vision, llm = (row[c].strip() for c in ("candidate", "vision", "llm"))
        if not cand or not vision or not llm:
          raise mordal.MordalError(f"{where}: empty candidate, vision or llm name")
        if source.setdefault(cand, path) != path:
          raise mordal.MordalError(f"{where}: candidate {cand!r} is also in {source[cand]}; "
                                   "each candidate's curve must come from one file")
        if of.setdefault(cand, (vision, llm)) != (vision, llm):
          raise mordal.MordalError(f"{where}: candidate {cand!r} is ({vision}, {llm}) here but "
                                   f"{of[cand]} earlier")
        if pairs.setdefault((vision, llm), cand) != cand:
          raise mordal.MordalError(f"{where}: ({vision}, {llm}) is both "
                                   f"{pairs[(vision, llm)]!r} and {cand!r}")
        r = judge.parse_float(row["data_fraction"], where, "data_fraction", mordal.MordalError)
        if not 0.0 < r <= 1.0:
          raise mordal.MordalError(f"{where}: data_fraction {r:g} is not in (0, 1]")
        acc = judge.parse_float(row["accuracy"], where, "accuracy", mordal.MordalError)
        cost = judge.parse_float(row["cost"], where, "cost", mordal.MordalError)
        if cost < 0.0:
          raise mordal.MordalError(f"{where}: negative cost {cost:g}")
        per = curves.setdefault(cand, {})
        if any(math.isclose(r, q, rel_tol=1e-9) for q in per):
          raise mordal.MordalError(f"{where}: {cand!r} has fraction {r:g} twice")
        per[r] = (acc, cost)
      if not rows:
        raise mordal.MordalError(f"{path}: no rows")
  for cand, per in curves.items():
    path = source[cand]
    if not any(math.isclose(r, 1.0) for r in per):
      raise mordal.MordalError(f"{path}: {cand!r} has no data_fraction 1.0 row (the full run "
                               "every ranking is judged against)")
    ordered = sorted(per.items())
    for (r1, (_, c1)), (r2, (_, c2)) in zip(ordered, ordered[1:]):
      if c2 < c1:
        raise mordal.MordalError(f"{path}: {cand!r} costs {c2:g} to fraction {r2:g} but {c1:g} "
                                 f"to {r1:g}; costs must be cumulative")
  return pairs, curves


# ---------------------------------------------------------------------------------------------
# DCD.


def read_profiles(path: str) -> dict[str, dict[str, np.ndarray]]:
  """model,task,block,conductance CSV → model → task → profile (blocks 0..L−1 all present)."""
  # A profiles CSV an earlier run wrote may be in a bucket (gs://).
  if not atomic.isfile(path):
    raise dcd.DCDError(f"{path}: file not found")
  cells: dict[str, dict[str, dict[int, float]]] = {}
  with atomic.open_text(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    fields = reader.fieldnames or []
    for column in ("model", "task", "block", "conductance"):
      if column not in fields:
        raise dcd.DCDError(f"{path}: no '{column}' column (columns: {', '.join(fields) or 'none'})")
    for line, row in enumerate(reader, start=2):
      where = f"{path}:{line}"
      try:
        block = int(row["block"])
      except ValueError:
        raise dcd.DCDError(f"{where}: block {row['block']!r} is not an integer") from None
      value = judge.parse_float(row["conductance"], where, "conductance", dcd.DCDError)
      per = cells.setdefault(row["model"].strip(), {}).setdefault(row["task"].strip(), {})
      if block in per:
        raise dcd.DCDError(f"{where}: block {block} appears twice")
      per[block] = value
  out = {}
  for m, tasks in cells.items():
    out[m] = {}
    for t, blocks in tasks.items():
      if sorted(blocks) != list(range(len(blocks))):
        raise dcd.DCDError(f"{path}: model {m!r}, task {t!r}: blocks {sorted(blocks)} are not "
                           f"0..{len(blocks) - 1}")
      out[m][t] = np.array([blocks[i] for i in range(len(blocks))])
  if not out:
    raise dcd.DCDError(f"{path}: no rows")
  return out


def profiles_csv(profiles: Mapping[str, Mapping[str, np.ndarray]]) -> str:
  """The profiles as ``read_profiles`` reads them back."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["model", "task", "block", "conductance"])
  for m in sorted(profiles):
    for t in sorted(profiles[m]):
      for i, v in enumerate(profiles[m][t]):
        w.writerow([m, t, i, repr(float(v))])
  return buf.getvalue()


def scores_csv(result: Mapping[str, Any]) -> str:
  """``dcd.leave_one_task_out``'s ranking as ``candidate,task,score`` with score = −predicted
  rank, the score table ``--method=judge`` reads."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["candidate", "task", "score"])
  for t in result["tasks"]:
    for m in result["models"]:
      w.writerow([m, t, repr(-result["per_task"][t]["scores"][m])])
  return buf.getvalue()
