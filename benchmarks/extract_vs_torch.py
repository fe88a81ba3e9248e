r"""Our jit-compiled ViT-B/16 vision tower vs transformers' torch ViTModel, side by side, on CPU.

  python benchmarks/extract_vs_torch.py                       # batch 32, 5 timed steps
  python benchmarks/extract_vs_torch.py --batch=8 --steps=2 --threads=4
  python benchmarks/extract_vs_torch.py --cpu_devices=1       # ours on one CPU device

Both run THE SAME random weights: a transformers ``ViTModel`` with the ViT-B/16 config (hidden
768, 12 layers, 12 heads, patch 16, 224x224 images) is randomly initialised, saved with
``save_pretrained`` to a temporary directory and loaded from there with
``vlmsel_jax.models.load_pretrained``. Float32 throughout. Each model gets the same images in its
native layout (torch NCHW, ours NHWC; the transpose is done once, outside the timing) and returns
``last_hidden_state`` and ``pooler_output``; the largest absolute difference of both is printed
so the speed comparison is between models that compute the same thing.

Ours runs as ``vlmsel_jax.extract`` does: data-parallel, the batch split over a mesh of
``--cpu_devices`` CPU devices (default: one per core used), weights replicated. On XLA:CPU one
device runs the attention's many small (per image and head) matmuls on one thread; one device
per core runs them on every core, as torch's kernels do with its threads.

Timing: one warm-up call each (for ours the first call, minus a warm call, is the jit compile
time, reported separately), then ``--steps`` timed calls each; the best is reported as images/s.
Torch uses ``--threads`` intra-op threads (default: every core this process may run on); with
fewer threads than cores the whole process is pinned to that many cores, which is the only way to
bound XLA's CPU thread pool too.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import cpu_setup
import timing


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=32, help="images per call")
  parser.add_argument("--steps", type=int, default=5, help="timed calls per model (best is kept)")
  parser.add_argument("--threads", type=int, default=None,
                      help="CPU threads / cores to use (default: all available)")
  parser.add_argument("--cpu_devices", type=int, default=None,
                      help="CPU devices ours splits the batch over (default: --threads)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.batch < 1 or args.steps < 1 or (args.threads is not None and args.threads < 1):
    parser.error("--batch, --steps and --threads must be positive")
  if args.cpu_devices is not None and args.cpu_devices < 1:
    parser.error("--cpu_devices must be positive")
  return args


def main() -> None:
  args = _parse()
  # Before jax and torch start their thread pools (see cpu_setup).
  threads, usable = cpu_setup.pin_threads(args.threads)
  # Imported after pinning, for the reason above.
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import torch
  import transformers
  from flax import nnx

  devices = args.cpu_devices or threads
  jax.config.update("jax_num_cpu_devices", devices)
  if args.batch % devices:
    raise SystemExit(f"--batch {args.batch} must be a multiple of the {devices} CPU devices")

  from vlmsel_jax.models import load_pretrained
  # pylint: enable=g-import-not-at-top

  torch.set_num_threads(threads)
  print(cpu_setup.machine_line(threads, usable))
  print(f"python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}, "
        f"{jax.device_count()} devices, batch split over them), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}")

  torch.manual_seed(args.seed)
  config = transformers.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, patch_size=16, image_size=224)
  torch_model = transformers.ViTModel(config).eval()
  with tempfile.TemporaryDirectory() as tmp:
    torch_model.save_pretrained(tmp)
    ours = load_pretrained(tmp, dtype="float32")
  n_params = sum(p.numel() for p in torch_model.parameters())
  print(f"model: ViT-B/16 shape, random weights, {n_params / 1e6:.1f}M parameters, float32; "
        f"batch {args.batch}, {args.steps} timed steps, best kept")

  pixels = np.random.RandomState(args.seed).randn(args.batch, 3, 224, 224).astype(np.float32)
  x_torch = torch.from_numpy(pixels)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x_ours = jax.device_put(np.ascontiguousarray(pixels.transpose(0, 2, 3, 1)), by_batch)
  graphdef, state = nnx.split(ours)
  state = jax.device_put(state, replicated)

  @jax.jit
  def forward(state, x):
    out = nnx.merge(graphdef, state)(x)
    return out.last_hidden_state, out.pooler_output

  def run_ours():
    return jax.block_until_ready(forward(state, x_ours))

  def run_torch():
    with torch.inference_mode():
      out = torch_model(pixel_values=x_torch)
    return out.last_hidden_state, out.pooler_output

  t = time.perf_counter()
  ours_out = run_ours()
  first_s = time.perf_counter() - t
  t = time.perf_counter()
  run_ours()
  warm_s = time.perf_counter() - t
  torch_out = run_torch()

  diff_last = float(np.abs(np.asarray(ours_out[0]) - torch_out[0].numpy()).max())
  diff_pool = float(np.abs(np.asarray(ours_out[1]) - torch_out[1].numpy()).max())
  scale = float(np.abs(torch_out[0].numpy()).max())
  print(f"max |ours - torch|: last_hidden_state {diff_last:.2e} (largest |value| {scale:.2f}), "
        f"pooler_output {diff_pool:.2e}")

  # Alternating would interleave cache effects; each model runs its steps back to back.
  _, ours_s = timing.best_of(run_ours, args.steps)
  _, torch_s = timing.best_of(run_torch, args.steps)
  ours_ips = args.batch / ours_s
  torch_ips = args.batch / torch_s
  print(f"jit compile (ours, first call minus a warm call): {max(first_s - warm_s, 0.0):.2f} s")
  print(f"{'':<22}{'s / batch':>12}{'images / s':>13}")
  print(f"{f'ours (jax, jit, {devices} dev)':<22}{ours_s:>12.3f}{ours_ips:>13.1f}")
  print(f"{'torch (transformers)':<22}{torch_s:>12.3f}{torch_ips:>13.1f}")
  print(f"ratio ours / torch (images/s): {ours_ips / torch_ips:.2f}")


if __name__ == "__main__":
  main()
