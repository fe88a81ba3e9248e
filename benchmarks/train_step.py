r"""Our stage-2 VLM train step vs an equivalent PyTorch step, side by side in one process.

  python benchmarks/train_step.py                                # tiny and small, 10 timed steps
  python benchmarks/train_step.py --config=small --steps=20 --batch_size=8
  python benchmarks/train_step.py --config=smollm2-135m --dtype=bfloat16   # on a GPU

Both run THE SAME weights: a ``LlamaForCausalLM`` is randomly initialised, saved with
``save_pretrained`` to a temporary directory and loaded from there by both sides (ours through
``vlmsel_jax.models.loading``, torch through ``from_pretrained``); the tower is a random
transformers ``ViTModel`` saved the same way, or (``efficientnet-lite0`` configs) the real
EfficientNet-Lite0 ImageNet weights of its pip package, read by ours through the zoo and by the
package's torch model. ``--dtype=bfloat16`` is the training binary's ``--dtype=bfloat16``
recipe: the frozen tower and LLM (and the LoRA matmuls) in bfloat16, the projector, the trained
master weights, the optimizer and the loss in float32; the torch side does the same. Torch runs
on ``--torch_device`` (``auto``: CUDA when torch has it, else the CPU), ours on JAX's default
device.

Ours is the training binary's step (``vlmsel_jax.training.step``): the VLM (frozen tower →
projector Linear-GELU-Linear → Llama with the image tokens spliced in at ``image_mask``), LoRA
(rank 8, alpha 16) on q/k/v/o/gate/up/down, stage 2 (projector + LoRA train), AdamW with global
norm clipping at 1.0, loss on the answer tokens (``loss_mask``), jitted with the state donated.

Torch is the same model written the usual PyTorch way: ``ViTModel`` (eval, no grad) →
``hidden_states[-2]`` without CLS (EfficientNet-Lite0: the last stage's map, before the head
convolution, flattened row-major) → an ``nn.Sequential`` projector holding OUR initial projector
weights → ``masked_scatter`` into ``inputs_embeds`` → ``LlamaForCausalLM`` whose projections are
wrapped in a hand-written LoRA module holding OUR initial A and B → masked cross-entropy →
``torch.optim.AdamW`` over the same trainable parameters, ``clip_grad_norm_(1.0)``.

The learning rate is constant (no warm-up) on both sides, so the two take the same updates: the
first step's loss must agree (rtol 1e-4 in float32, 5e-3 in bfloat16, else the script exits
non-zero) and the second step's, after one optimizer update, is printed too.

The batch is random token ids: per row a few prompt tokens, the image positions, question tokens,
answer tokens (the loss positions), then padding to the sequence length; row lengths vary.
Tokens/s counts the real (non-pad) tokens of a step. Timing: one step each for the check, warm-up
steps, then ``--steps`` timed steps each, back to back; the median step time is reported (the
machine may be shared). For ours the first call minus a warm call is the jit compile time,
reported separately and excluded from tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time

import cpu_setup

TOWERS = ("vit", "efficientnet-lite0")
DTYPES = ("float32", "bfloat16")
# First-step loss agreement with torch: float32 rounding, or bfloat16's 8-bit mantissa through
# 30 layers of a random LLM.
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 5e-3}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Shape:
  """One benchmark configuration: model sizes and batch shape."""

  name: str
  # Llama (tied input and output embeddings when ``tie``).
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  intermediate: int
  vocab: int
  seq: int
  # The tower: a random ViT of these sizes, or the real EfficientNet-Lite0 (vit_* unused).
  vit_hidden: int
  vit_layers: int
  vit_heads: int
  vit_intermediate: int
  image: int
  patch: int
  batch: int
  tower: str = "vit"
  tie: bool = False

  @property
  def image_tokens(self) -> int:
    # EfficientNet-Lite0's last stage is at stride 32 (SAME padding rounds up).
    side = -(-self.image // 32) if self.tower == "efficientnet-lite0" else self.image // self.patch
    return side ** 2


SHAPES = {
    # The sizes of tests/vlm_fixtures.py (tiny_llm_dir, tiny_vit_dir) and tests/training/test_train.py.
    "tiny": Shape("tiny", hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=32,
                  seq=32, vit_hidden=16, vit_layers=2, vit_heads=2, vit_intermediate=32,
                  image=32, patch=8, batch=8),
    "small": Shape("small", hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408,
                   vocab=8192, seq=128, vit_hidden=384, vit_layers=6, vit_heads=6,
                   vit_intermediate=1536, image=64, patch=8, batch=8),
    # The device check's step (issue: EfficientNet-Lite0 + SmolLM2-135M, bf16, LoRA): SmolLM2-135M's
    # LLM (576 wide, 30 layers, 9 / 3 heads, 1536 MLP, 49,152 tied vocab) behind the real
    # EfficientNet-Lite0 at 224 px (7 × 7 = 49 image tokens, 320 channels).
    "smollm2-135m": Shape("smollm2-135m", hidden=576, layers=30, heads=9, kv_heads=3,
                          intermediate=1536, vocab=49152, seq=128, vit_hidden=0, vit_layers=0,
                          vit_heads=0, vit_intermediate=0, image=224, patch=32, batch=8,
                          tower="efficientnet-lite0", tie=True),
    # Its dry-run stand-in: the real EfficientNet-Lite0 at 64 px (2 × 2 tokens), the tiny LLM.
    "tiny-efficientnet": Shape("tiny-efficientnet", hidden=32, layers=2, heads=4, kv_heads=2,
                               intermediate=64, vocab=32, seq=32, vit_hidden=0, vit_layers=0,
                               vit_heads=0, vit_intermediate=0, image=64, patch=32, batch=8,
                               tower="efficientnet-lite0"),
}
CONFIGS = tuple(SHAPES)


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", choices=CONFIGS + ("both",), default="both",
                      help="model sizes: tiny (the test fixtures), small, smollm2-135m "
                      "(EfficientNet-Lite0 tower), tiny-efficientnet, or both (tiny and small)")
  parser.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="the training recipe's --dtype (frozen tower and LLM)")
  parser.add_argument("--torch_device", default="auto",
                      help="torch's device: auto (cuda when available, else cpu), cpu, cuda")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps per side after the equivalence check")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="rows per step (default: the config's, 8)")
  parser.add_argument("--threads", type=int, default=None,
                      help="CPU threads / cores to use (default: all available)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be positive and --warmup non-negative")
  if (args.batch_size is not None and args.batch_size < 1) or (
      args.threads is not None and args.threads < 1):
    parser.error("--batch_size and --threads must be positive")
  return args


def _write_checkpoints(shape: Shape, directory: str, seed: int) -> tuple[str | None, str]:
  """Random HF checkpoints of ``shape`` under ``directory``: (vit_dir or None, llm_dir)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  vit_dir = None
  if shape.tower == "vit":
    vit_dir = os.path.join(directory, "vit")
    transformers.ViTModel(transformers.ViTConfig(
        hidden_size=shape.vit_hidden, num_hidden_layers=shape.vit_layers,
        num_attention_heads=shape.vit_heads, intermediate_size=shape.vit_intermediate,
        image_size=shape.image, patch_size=shape.patch)).save_pretrained(vit_dir)
  llm_dir = os.path.join(directory, "llm")
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
      num_key_value_heads=shape.kv_heads, max_position_embeddings=max(256, shape.seq),
      tie_word_embeddings=shape.tie)).save_pretrained(llm_dir)
  return vit_dir, llm_dir


def _random_batch(shape: Shape, batch: int, seed: int):
  """A stage-2 batch as the batch builder lays it out, with random token ids.

  Per row: 4 prompt tokens, the image positions (pad id, like the builder), question tokens,
  answer tokens (``loss_mask``), then padding; the real length varies from row to row.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  n_img, seq = shape.image_tokens, shape.seq
  prefix = 4
  if prefix + n_img + 4 > seq:
    raise ValueError(f"{shape.name}: seq {seq} is too short for {n_img} image tokens")
  pad_id = 0
  input_ids = np.full((batch, seq), pad_id, np.int32)
  attention_mask = np.zeros((batch, seq), np.int32)
  image_mask = np.zeros((batch, seq), bool)
  loss_mask = np.zeros((batch, seq), bool)
  free = seq - prefix - n_img
  for r in range(batch):
    text = int(rng.integers(max(4, free * 3 // 4), free + 1))
    answer = int(rng.integers(1, max(2, text // 3) + 1))
    length = prefix + n_img + text
    input_ids[r, :length] = rng.integers(1, shape.vocab, length)
    input_ids[r, prefix:prefix + n_img] = pad_id
    attention_mask[r, :length] = 1
    image_mask[r, prefix:prefix + n_img] = True
    loss_mask[r, length - answer:length] = True
  pixels = rng.standard_normal((batch, shape.image, shape.image, 3)).astype(np.float32)
  return {"pixels": pixels, "input_ids": input_ids, "attention_mask": attention_mask,
          "image_mask": image_mask, "loss_mask": loss_mask, "mask": np.ones((batch,), bool)}


def _median_step_s(step, n: int) -> float:
  times = []
  for _ in range(n):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def torch_device(name: str):
  """torch's device named by ``--torch_device``: "auto" is CUDA when torch has it, else the CPU."""
  import torch  # pylint: disable=g-import-not-at-top
  if name == "auto":
    name = "cuda" if torch.cuda.is_available() else "cpu"
  return torch.device(name)


def _load_towers(shape: Shape, vit_dir: str | None, dtype: str):
  """(ours, torch feature function) for ``shape``'s tower.

  The torch function maps NCHW pixels to (batch, tokens, dim) features at ours' default layer.
  """
  # pylint: disable=g-import-not-at-top
  import torch
  import transformers
  from vlmsel_jax.models import loading
  # pylint: enable=g-import-not-at-top
  if shape.tower == "vit":
    src = loading.HFDirectory(vit_dir)
    ours = loading.load_model(src.config, src, dtype=dtype, source=str(src))
    vit = transformers.ViTModel.from_pretrained(vit_dir).eval()

    def vit_features(pixels):
      # Like ours: the second-to-last hidden state, patch tokens only (CLS dropped).
      return vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    return ours, vit, vit_features
  if shape.tower != "efficientnet-lite0":
    raise ValueError(f"unknown tower {shape.tower!r}; known: {', '.join(TOWERS)}")
  # pylint: disable=g-import-not-at-top
  from efficientnet_lite_pytorch import EfficientNet
  from vlmsel_jax import zoo
  # pylint: enable=g-import-not-at-top
  ours = zoo.load("efficientnet-lite0", dtype=dtype).model
  net = EfficientNet.from_name("efficientnet-lite0")
  net.load_state_dict(torch.load(zoo.weights_file("lite0"), map_location="cpu",
                                 weights_only=True))
  net.eval()

  def effnet_features(pixels):
    # Ours' hidden_states[-2]: the stem, every MBConv block (eval: no drop-connect), no head.
    x = net._swish(net._bn0(net._conv_stem(pixels)))  # pylint: disable=protected-access
    for block in net._blocks:  # pylint: disable=protected-access
      x = block(x)
    return x.permute(0, 2, 3, 1).flatten(1, 2)
  return ours, net, effnet_features


def _run_config(shape: Shape, args: argparse.Namespace) -> dict:
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import torch
  import transformers
  from flax import nnx

  from vlmsel_jax.runtime import parallel
  from vlmsel_jax.models import loading
  from vlmsel_jax.models import lora
  from vlmsel_jax.models import vlm as vlm_lib
  from vlmsel_jax.training import step as step_lib
  # pylint: enable=g-import-not-at-top

  dtype = getattr(args, "dtype", "float32")
  dev = torch_device(getattr(args, "torch_device", "auto"))
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  batch_size = args.batch_size or shape.batch
  batch = _random_batch(shape, batch_size, args.seed)
  tokens = int(batch["attention_mask"].sum())
  lr, rank, alpha = 1e-3, 8, 16.0

  with tempfile.TemporaryDirectory() as tmp:
    vit_dir, llm_dir = _write_checkpoints(shape, tmp, args.seed)
    tower, torch_tower, torch_features = _load_towers(shape, vit_dir, dtype)
    llm_src = loading.HFDirectory(llm_dir)
    llm = loading.load_model(llm_src.config, llm_src, dtype=dtype, source=str(llm_src))
    torch_llm = transformers.LlamaForCausalLM.from_pretrained(llm_dir)

  # --- ours: as training/loop.py build_model + train assemble it -----------------------------
  model = vlm_lib.VLM(tower, llm, vlm_lib.VLMConfig(), image_size=(shape.image, shape.image),
                      rngs=nnx.Rngs(params=args.seed))
  if model.num_image_tokens != shape.image_tokens:
    raise AssertionError(f"{shape.name}: the tower gives {model.num_image_tokens} image tokens, "
                         f"the batch has {shape.image_tokens}")
  lora.apply_lora(model.llm, rank=rank, alpha=alpha, targets=LORA_TARGETS,
                  rngs=nnx.Rngs(params=args.seed + 1))
  graphdef, params, frozen, template = step_lib.split_model(model, stage=2)
  # No warm-up and a cosine over 1e9 steps: a constant learning rate, as torch's AdamW has.
  optim = step_lib.OptimConfig(learning_rate=lr, warmup_ratio=0.0, schedule_steps=10**9,
                               weight_decay=0.0, clip_norm=1.0)
  tx = optim.make()
  mesh = parallel.make_mesh("data:-1,fsdp:1")
  init_params = jax.tree.map(np.asarray, params)  # Host copies, for the torch side.
  state, state_sh = step_lib.init_state(params, tx, mesh)
  frozen_sh = step_lib.tree_shardings(frozen, mesh)
  frozen = jax.device_put(frozen, frozen_sh)
  gb = step_lib.global_batch(batch, mesh)
  train_step = step_lib.make_train_step(graphdef, template, tx, mesh, state_sh, frozen_sh,
                                        {k: v.sharding for k, v in gb.items()})
  n_trainable = sum(int(np.size(x)) for x in jax.tree.leaves(init_params))

  # --- torch: the same model, the usual way ---------------------------------------------------
  # The frozen models in the recipe's dtype; the trained parameters (LoRA, projector) float32.
  torch_tower.requires_grad_(False).to(device=dev, dtype=torch_dtype)
  torch_llm.requires_grad_(False).to(device=dev, dtype=torch_dtype)

  class LoRALinear(torch.nn.Module):
    """``base(x) + scale · (x @ A) @ B``, A (in, r) and B (r, out) as ours stores them; float32
    parameters cast to the activations' dtype, as ours casts its float32 master weights."""

    def __init__(self, base: torch.nn.Linear, a: np.ndarray, b: np.ndarray, scale: float):
      super().__init__()
      self.base = base
      self.lora_a = torch.nn.Parameter(torch.from_numpy(np.array(a, np.float32)).to(dev))
      self.lora_b = torch.nn.Parameter(torch.from_numpy(np.array(b, np.float32)).to(dev))
      self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
      return self.base(x) + ((x @ a) @ b) * self.scale

  ours_layers = init_params["llm"]["layers"]
  for i, layer in enumerate(torch_llm.model.layers):
    for parent, ours_parent, names in ((layer.self_attn, "attn", LORA_TARGETS[:4]),
                                       (layer.mlp, "mlp", LORA_TARGETS[4:])):
      for name in names:
        adapter = ours_layers[i][ours_parent][name]
        setattr(parent, name, LoRALinear(getattr(parent, name), adapter["lora_a"],
                                         adapter["lora_b"], alpha / rank))

  ours_proj = init_params["projector"]
  vision_dim = ours_proj["fc1"]["kernel"].shape[0]
  projector = torch.nn.Sequential(torch.nn.Linear(vision_dim, shape.hidden), torch.nn.GELU(),
                                  torch.nn.Linear(shape.hidden, shape.hidden)).to(dev)
  with torch.no_grad():
    for layer, key in ((projector[0], "fc1"), (projector[2], "fc2")):
      # nnx.Linear's kernel is (in, out); torch's weight is (out, in).
      layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(ours_proj[key]["kernel"].T)))
      layer.bias.copy_(torch.from_numpy(np.array(ours_proj[key]["bias"], np.float32)))
  trainable = list(projector.parameters()) + [
      p for p in torch_llm.parameters() if p.requires_grad]
  if sum(p.numel() for p in trainable) != n_trainable:
    raise AssertionError(f"torch trains {sum(p.numel() for p in trainable)} parameters, ours "
                         f"{n_trainable}")
  optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

  def on_dev(x):
    return torch.from_numpy(x).to(dev)

  t_pixels = on_dev(np.ascontiguousarray(batch["pixels"].transpose(0, 3, 1, 2))).to(torch_dtype)
  t_ids = on_dev(batch["input_ids"].astype(np.int64))
  t_attn = on_dev(batch["attention_mask"].astype(np.int64))
  t_image = on_dev(batch["image_mask"])
  t_loss = on_dev(batch["loss_mask"] & batch["mask"][:, None])

  def torch_step() -> float:
    with torch.no_grad():
      feats = torch_features(t_pixels).float()  # Ours: the tower's grid, cast to float32.
    embeds = torch_llm.get_input_embeddings()(t_ids)
    image = projector(feats).to(embeds.dtype)
    embeds = embeds.masked_scatter(t_image[..., None].expand_as(embeds), image)
    logits = torch_llm(inputs_embeds=embeds, attention_mask=t_attn).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), t_ids[:, 1:].reshape(-1), reduction="none")
    mask = t_loss[:, 1:].reshape(-1).float()
    loss = (nll * mask).sum() / mask.sum().clamp(min=1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    return float(loss.detach())

  def ours_step():
    nonlocal state
    state, metrics = train_step(state, frozen, gb)
    return jax.block_until_ready(metrics)

  # --- equivalence: the first two steps' losses -----------------------------------------------
  t = time.perf_counter()
  ours_losses = [float(ours_step()["loss"])]
  first_s = time.perf_counter() - t
  t = time.perf_counter()
  ours_losses.append(float(ours_step()["loss"]))
  warm_s = time.perf_counter() - t
  torch_losses = [torch_step(), torch_step()]
  rel = [abs(o - p) / abs(p) for o, p in zip(ours_losses, torch_losses)]
  print(f"[{shape.name}] loss step 1: ours {ours_losses[0]:.7f}  torch {torch_losses[0]:.7f}  "
        f"rel diff {rel[0]:.1e}")
  print(f"[{shape.name}] loss step 2: ours {ours_losses[1]:.7f}  torch {torch_losses[1]:.7f}  "
        f"rel diff {rel[1]:.1e}  (after one AdamW update)")
  if not np.isclose(ours_losses[0], torch_losses[0], rtol=LOSS_RTOL[dtype], atol=0.0):
    raise SystemExit(f"[{shape.name}] the first-step losses disagree beyond rtol "
                     f"{LOSS_RTOL[dtype]:g} ({dtype})")

  # --- timing ---------------------------------------------------------------------------------
  for _ in range(args.warmup):
    ours_step()
  ours_s = _median_step_s(ours_step, args.steps)
  for _ in range(args.warmup):
    torch_step()
  torch_s = _median_step_s(torch_step, args.steps)
  return {"config": shape.name, "tower": shape.tower, "dtype": dtype,
          "torch_device": str(dev), "batch": batch_size, "seq": shape.seq, "tokens": tokens,
          "trainable": n_trainable, "ours_s": ours_s, "torch_s": torch_s,
          "ours_tps": tokens / ours_s, "torch_tps": tokens / torch_s,
          "compile_s": max(first_s - warm_s, 0.0), "loss_rel_diff": rel[0]}


def main() -> None:
  args = _parse()
  # Before jax and torch start their thread pools (see cpu_setup).
  threads, usable = cpu_setup.pin_threads(args.threads)
  # Imported after pinning, for the reason above.
  # pylint: disable=g-import-not-at-top
  import jax
  import torch
  import transformers
  # pylint: enable=g-import-not-at-top

  torch.set_num_threads(threads)
  transformers.utils.logging.disable_progress_bar()
  print(cpu_setup.machine_line(threads, usable))
  print(f"python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}")
  print(f"stage 2: projector + LoRA r8/a16 train, AdamW lr 1e-3 constant, clip 1.0, "
        f"{args.dtype} (trained weights float32), torch on {torch_device(args.torch_device)}; "
        f"{args.warmup} warm-up + {args.steps} timed steps per side, median kept")

  names = ("tiny", "small") if args.config == "both" else (args.config,)
  rows = [_run_config(SHAPES[name], args) for name in names]

  print()
  header = (f"{'config':<18}{'batch×seq':>11}{'tokens':>8}{'trainable':>11}{'ours s/step':>13}"
            f"{'torch s/step':>14}{'ours tok/s':>12}{'torch tok/s':>13}{'ratio':>8}"
            f"{'jit compile s':>15}")
  print(header)
  for r in rows:
    print(f"{r['config']:<18}{str(r['batch']) + '×' + str(r['seq']):>11}{r['tokens']:>8}"
          f"{r['trainable']:>11}{r['ours_s']:>13.4f}{r['torch_s']:>14.4f}"
          f"{r['ours_tps']:>12.0f}{r['torch_tps']:>13.0f}"
          f"{r['ours_tps'] / r['torch_tps']:>8.2f}{r['compile_s']:>15.2f}")
  print("ratio = ours tokens/s / torch tokens/s (tokens: real, non-pad tokens of a step)")


if __name__ == "__main__":
  main()
