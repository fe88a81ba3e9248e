r"""``--method=dcd``: Directional Conductance Divergence, leave-one-task-out.

  python -m vlmsel_jax.select --method=dcd --dcd_models=/models/vit_a,/models/clip_b \
      --dcd_tasks=shapes=data/shapes,colors=data/colors,... --dcd_accuracy=accuracy.csv \
      --output=runs/dcd/dcd.json
  python -m vlmsel_jax.select --method=dcd --dcd_conductance=runs/dcd/dcd_conductance.csv \
      --dcd_accuracy=accuracy.csv --output=runs/dcd2/dcd.json    # reuse computed profiles

The models are vision towers: vision transformers (zoo names or Hugging Face directories; DCD
is defined on transformer blocks) or EfficientNet-Lite (``efficientnet-lite0`` and its
variants, e.g. ``efficientnet-lite1@res=128``), whose blocks are its MBConv blocks; each task is
an image folder. ``--dcd_accuracy`` is a CSV
``candidate,task,accuracy`` whose candidates are the models' names. Writes the JSON, ``<stem>.md``,
``<stem>.png``, ``<stem>_conductance.csv`` (model,task,block,conductance: the profiles, reusable
with --dcd_conductance) and ``<stem>_scores.csv`` (candidate,task,score with score = −predicted
rank, the format ``--method=evaluate`` reads).
"""

from __future__ import annotations

import csv
import io
import os
import time
from typing import Any

import numpy as np
from absl import flags
from PIL import Image

from vlmsel_jax.runtime import atomic
from vlmsel_jax.selection import dcd
from vlmsel_jax.selection import evaluate

MODELS = flags.DEFINE_list("dcd_models", [], "Vision towers: ViT zoo names, Hugging Face "
                           "directories or Hub ids, or EfficientNet-Lite specs (blocks = MBConv "
                           "blocks).")
TASKS = flags.DEFINE_list("dcd_tasks", [], "Tasks as name=image_folder, one per task.")
ACCURACY = flags.DEFINE_string("dcd_accuracy", None, "CSV candidate,task,accuracy: every "
                               "model's true accuracy on every task (candidate = model name).")
CONDUCTANCE = flags.DEFINE_string(
    "dcd_conductance", None, "CSV model,task,block,conductance of precomputed profiles, instead "
    "of --dcd_models/--dcd_tasks.")
IMAGES_PER_TASK = flags.DEFINE_integer("dcd_images_per_task", 16, "Images of each task the "
                                       "profile averages over (a --seed'ed subset; 0 = all).",
                                       lower_bound=0)
STEPS = flags.DEFINE_integer("dcd_steps", 50, "Integration steps of the layer conductance.",
                             lower_bound=1)
QUADRATURE = flags.DEFINE_enum("dcd_quadrature", "gausslegendre",
                               ["gausslegendre", "riemann_left", "riemann_right",
                                "riemann_middle", "riemann_trapezoid"],
                               "Integration rule (Captum's names; gausslegendre is its default).")
EMBEDDING = flags.DEFINE_enum("dcd_embedding", "pooler", ["pooler", "cls", "mean"],
                              "Image embedding whose L2 norm is attributed: the model's pooler "
                              "output, or the CLS token / patch mean of its final hidden state.")
BATCH_SIZE = flags.DEFINE_integer("dcd_batch_size", 8, "Images per conductance batch.",
                                  lower_bound=1)
ETA = flags.DEFINE_float("dcd_eta", dcd.ETA, "Temperature η of the block importance softmax.")
GAMMA = flags.DEFINE_float("dcd_gamma", dcd.GAMMA, "Sharpness γ of the source weights.")

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_files(folder: str, limit: int, seed: int) -> list[str]:
  """The folder's images in name order, or a seeded subset of ``limit`` of them (kept sorted)."""
  if not os.path.isdir(folder):
    raise dcd.DCDError(f"{folder}: image folder not found")
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXTENSIONS))
  if not files:
    raise dcd.DCDError(f"{folder}: no images ({', '.join(_IMAGE_EXTENSIONS)})")
  if limit and len(files) > limit:
    keep = np.sort(np.random.default_rng(seed).choice(len(files), limit, replace=False))
    files = [files[i] for i in keep]
  return [os.path.join(folder, f) for f in files]


def compute_profiles(specs: list[str], task_specs: list[str], seed: int
                     ) -> dict[str, dict[str, np.ndarray]]:
  """Loads each model and task folder; returns model → task → block-conductance profile."""
  from vlmsel_jax import zoo  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.models.efficientnet import modeling as efficientnet  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.models.vit import modeling  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.selection import conductance  # pylint: disable=g-import-not-at-top

  tasks = []
  for spec in task_specs:
    if "=" not in spec:
      raise dcd.DCDError(f"--dcd_tasks entry {spec!r} is not name=image_folder")
    name, folder = (x.strip() for x in spec.split("=", 1))
    tasks.append((name, image_files(folder, IMAGES_PER_TASK.value, seed)))
  names = [t for t, _ in tasks]
  if len(set(names)) != len(names):
    raise dcd.DCDError(f"--dcd_tasks names are not unique: {', '.join(names)}")
  out: dict[str, dict[str, np.ndarray]] = {}
  for spec in specs:
    loaded = zoo.load(spec)
    if not isinstance(loaded.model, (modeling.Vit, efficientnet.EfficientNetLite)):
      raise dcd.DCDError(f"{spec}: DCD attributes through the blocks of a vision tower (a ViT "
                         f"or an EfficientNet-Lite); this is a {type(loaded.model).__name__}")
    if loaded.name in out:
      raise dcd.DCDError(f"two models are named {loaded.name!r}")
    out[loaded.name] = {}
    for task, files in tasks:
      images = np.stack([loaded.preprocessing(Image.open(f)) for f in files])
      out[loaded.name][task] = conductance.block_conductance(
          loaded.model, images, batch_size=BATCH_SIZE.value, n_steps=STEPS.value,
          method=QUADRATURE.value, embedding=EMBEDDING.value)
  return out


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
      value = evaluate.parse_float(row["conductance"], where, "conductance", dcd.DCDError)
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


def profiles_csv(profiles: dict[str, dict[str, np.ndarray]]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["model", "task", "block", "conductance"])
  for m in sorted(profiles):
    for t in sorted(profiles[m]):
      for i, v in enumerate(profiles[m][t]):
        w.writerow([m, t, i, repr(float(v))])
  return buf.getvalue()


def scores_csv(result: dict[str, Any]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["candidate", "task", "score"])
  for t in result["tasks"]:
    for m in result["models"]:
      w.writerow([m, t, repr(-result["per_task"][t]["scores"][m])])
  return buf.getvalue()


def markdown(p: dict[str, Any]) -> str:
  f = evaluate.fmt
  keys = p["dcd"]["keys"]
  lines = ["# DCD: leave-one-task-out model ranking", "",
           "For each target task, the other tasks are sources; each model's predicted rank is the "
           "DCD-weighted mean of its ranks on the sources (uniform: equal weights, the ablation "
           "baseline). NDCG@k uses the true accuracy on the target as gains; overlap@k = "
           "|true top-k ∩ predicted top-k| / k.", "",
           f"Models: {', '.join(p['dcd']['models'])}. Tasks: {', '.join(p['dcd']['tasks'])}.", "",
           "## Mean over targets", "", "| weights | " + " | ".join(keys) + " |",
           "|---|" + "---|" * len(keys)]
  for name in ("dcd", "uniform"):
    lines.append(f"| {name} | " + " | ".join(f(p[name]["mean"][k]) for k in keys) + " |")
  lines += ["", "## Per target", "", "| target | weights | predicted ranking | " +
            " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
  for t in p["dcd"]["tasks"]:
    for name in ("dcd", "uniform"):
      e = p[name]["per_task"][t]
      lines.append(f"| {t} | {name} | {', '.join(e['ranking'])} | " +
                   " | ".join(f(e[k]) for k in keys) + " |")
  lines += ["", "## Run", "", "```"] + [f"{k} = {v}" for k, v in p["run"].items()] + ["```"]
  return "\n".join(lines) + "\n"


def plot(p: dict[str, Any], path: str):
  """Left: every model's conductance profile per task; right: NDCG@k per target, DCD vs uniform."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
  profiles = p["profiles"]
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, m in enumerate(sorted(profiles)):
    for j, t in enumerate(sorted(profiles[m])):
      a1.plot(profiles[m][t], color=colors[i % len(colors)], alpha=0.7, linewidth=1,
              label=m if j == 0 else None)
  a1.set_yscale("log")
  a1.set_xlabel("block", fontsize=8)
  a1.set_ylabel("mean |conductance| (one line per task)", fontsize=8)
  a1.legend(fontsize=6)
  k = p["dcd"]["keys"][min(2, len(p["dcd"]["keys"]) - 1)]
  tasks = p["dcd"]["tasks"]
  x = np.arange(len(tasks))
  for off, name in ((-0.2, "dcd"), (0.2, "uniform")):
    a2.bar(x + off, [p[name]["per_task"][t][k] for t in tasks], 0.4, label=name)
  a2.set_xticks(x, tasks, rotation=30, ha="right", fontsize=7)
  a2.set_ylabel(k, fontsize=8)
  a2.legend(fontsize=7)
  for ax in (a1, a2):
    ax.tick_params(labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(method: str) -> dict:
  """Profiles (computed or read) + accuracies → leave-one-task-out DCD; writes the outputs."""
  del method
  from vlmsel_jax.selection import evaluate_cli  # pylint: disable=g-import-not-at-top
  if not ACCURACY.value:
    raise dcd.DCDError("--dcd_accuracy is required (CSV candidate,task,accuracy)")
  if CONDUCTANCE.value and (MODELS.value or TASKS.value):
    raise dcd.DCDError("--dcd_conductance replaces --dcd_models/--dcd_tasks; give one or the other")
  accuracy = evaluate.read_truth(ACCURACY.value)
  start = time.time()
  if CONDUCTANCE.value:
    profiles = read_profiles(CONDUCTANCE.value)
  else:
    if not MODELS.value or not TASKS.value:
      raise dcd.DCDError("--dcd_models and --dcd_tasks are required (or --dcd_conductance)")
    profiles = compute_profiles(list(MODELS.value), list(TASKS.value), flags.FLAGS.seed)
  seconds = round(time.time() - start, 1)
  ks = evaluate_cli.ks()
  result = dcd.leave_one_task_out(profiles, accuracy, eta=ETA.value, gamma=GAMMA.value, ks=ks)
  uniform = dcd.leave_one_task_out(profiles, accuracy, ks=ks, uniform=True)
  payload = {
      "dcd": result, "uniform": uniform,
      "mean": result["mean"],
      "profiles": {m: {t: v.tolist() for t, v in per.items()} for m, per in profiles.items()},
      "run": {"accuracy": ACCURACY.value,
              "profiles": CONDUCTANCE.value or "computed",
              "steps": STEPS.value, "quadrature": QUADRATURE.value,
              "embedding": EMBEDDING.value, "images_per_task": IMAGES_PER_TASK.value,
              "eta": ETA.value, "gamma": GAMMA.value, "seed": flags.FLAGS.seed,
              "profile_seconds": seconds},
  }
  evaluate.write_result_files(
      flags.FLAGS.output, payload, markdown(payload), lambda path: plot(payload, path),
      extra={"_conductance.csv": profiles_csv(profiles), "_scores.csv": scores_csv(result)})
  return payload
