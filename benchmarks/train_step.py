r"""Our stage-2 VLM train step vs an equivalent PyTorch step, side by side in one process.

  python benchmarks/train_step.py                                # tiny and small, 10 timed steps
  python benchmarks/train_step.py --config=small --steps=20 --batch_size=8

Both run THE SAME random weights: a transformers ``ViTModel`` (with pooler) and a
``LlamaForCausalLM`` are randomly initialised, saved with ``save_pretrained`` to a temporary
directory, and loaded from there by both sides (ours through ``vlmsel_jax.models.loading``,
torch through ``from_pretrained``). Float32 throughout.

Ours is the training binary's step (``vlmsel_jax.training.step``): the VLM (frozen tower →
projector Linear-GELU-Linear → Llama with the image tokens spliced in at ``image_mask``), LoRA
(rank 8, alpha 16) on q/k/v/o/gate/up/down, stage 2 (projector + LoRA train), AdamW with global
norm clipping at 1.0, loss on the answer tokens (``loss_mask``), jitted with the state donated.

Torch is the same model written the usual PyTorch way: ``ViTModel`` (eval, no grad) →
``hidden_states[-2]`` without CLS → an ``nn.Sequential`` projector holding OUR initial projector
weights → ``masked_scatter`` into ``inputs_embeds`` → ``LlamaForCausalLM`` whose projections are
wrapped in a hand-written LoRA module holding OUR initial A and B → masked cross-entropy →
``torch.optim.AdamW`` over the same trainable parameters, ``clip_grad_norm_(1.0)``.

The learning rate is constant (no warm-up) on both sides, so the two take the same updates: the
first step's loss must agree (rtol 1e-4, else the script exits non-zero) and the second step's,
after one optimizer update, is printed too.

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

CONFIGS = ("tiny", "small")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Shape:
  """One benchmark configuration: model sizes and batch shape."""

  name: str
  # Llama.
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  intermediate: int
  vocab: int
  seq: int
  # ViT.
  vit_hidden: int
  vit_layers: int
  vit_heads: int
  vit_intermediate: int
  image: int
  patch: int
  batch: int

  @property
  def image_tokens(self) -> int:
    return (self.image // self.patch) ** 2


SHAPES = {
    # The sizes of tests/vlm_fixtures.py (tiny_llm_dir, tiny_vit_dir) and tests/training/test_train.py.
    "tiny": Shape("tiny", hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=32,
                  seq=32, vit_hidden=16, vit_layers=2, vit_heads=2, vit_intermediate=32,
                  image=32, patch=8, batch=8),
    "small": Shape("small", hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408,
                   vocab=8192, seq=128, vit_hidden=384, vit_layers=6, vit_heads=6,
                   vit_intermediate=1536, image=64, patch=8, batch=8),
}


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", choices=CONFIGS + ("both",), default="both",
                      help="model sizes: tiny (the test fixtures), small, or both")
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


def _write_checkpoints(shape: Shape, directory: str, seed: int) -> tuple[str, str]:
  """Random HF checkpoints of ``shape`` under ``directory``: (vit_dir, llm_dir)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
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
      tie_word_embeddings=False)).save_pretrained(llm_dir)
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

  batch_size = args.batch_size or shape.batch
  batch = _random_batch(shape, batch_size, args.seed)
  tokens = int(batch["attention_mask"].sum())
  lr, rank, alpha = 1e-3, 8, 16.0

  with tempfile.TemporaryDirectory() as tmp:
    vit_dir, llm_dir = _write_checkpoints(shape, tmp, args.seed)
    vit_src, llm_src = loading.HFDirectory(vit_dir), loading.HFDirectory(llm_dir)
    tower = loading.load_model(vit_src.config, vit_src, dtype="float32", source=str(vit_src))
    llm = loading.load_model(llm_src.config, llm_src, dtype="float32", source=str(llm_src))
    torch_vit = transformers.ViTModel.from_pretrained(vit_dir).eval()
    torch_llm = transformers.LlamaForCausalLM.from_pretrained(llm_dir)

  # --- ours: as training/loop.py build_model + train assemble it -----------------------------
  model = vlm_lib.VLM(tower, llm, vlm_lib.VLMConfig(), image_size=(shape.image, shape.image),
                      rngs=nnx.Rngs(params=args.seed))
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
  torch_vit.requires_grad_(False)
  torch_llm.requires_grad_(False)

  class LoRALinear(torch.nn.Module):
    """``base(x) + scale · (x @ A) @ B``, A (in, r) and B (r, out) as ours stores them."""

    def __init__(self, base: torch.nn.Linear, a: np.ndarray, b: np.ndarray, scale: float):
      super().__init__()
      self.base = base
      self.lora_a = torch.nn.Parameter(torch.from_numpy(np.array(a, np.float32)))
      self.lora_b = torch.nn.Parameter(torch.from_numpy(np.array(b, np.float32)))
      self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return self.base(x) + ((x @ self.lora_a) @ self.lora_b) * self.scale

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
                                  torch.nn.Linear(shape.hidden, shape.hidden))
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

  t_pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"].transpose(0, 3, 1, 2)))
  t_ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
  t_attn = torch.from_numpy(batch["attention_mask"].astype(np.int64))
  t_image = torch.from_numpy(batch["image_mask"])
  t_loss = torch.from_numpy(batch["loss_mask"] & batch["mask"][:, None])

  def torch_step() -> float:
    with torch.no_grad():
      # Like ours: the second-to-last hidden state, patch tokens only (CLS dropped).
      feats = torch_vit(pixel_values=t_pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    image = projector(feats)
    embeds = torch_llm.get_input_embeddings()(t_ids)
    embeds = embeds.masked_scatter(t_image[..., None].expand_as(embeds), image)
    logits = torch_llm(inputs_embeds=embeds, attention_mask=t_attn).logits
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
  if not np.isclose(ours_losses[0], torch_losses[0], rtol=1e-4, atol=0.0):
    raise SystemExit(f"[{shape.name}] the first-step losses disagree beyond rtol 1e-4")

  # --- timing ---------------------------------------------------------------------------------
  for _ in range(args.warmup):
    ours_step()
  ours_s = _median_step_s(ours_step, args.steps)
  for _ in range(args.warmup):
    torch_step()
  torch_s = _median_step_s(torch_step, args.steps)
  return {"config": shape.name, "batch": batch_size, "seq": shape.seq, "tokens": tokens,
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
  print(f"stage 2: projector + LoRA r8/a16 train, AdamW lr 1e-3 constant, clip 1.0, float32; "
        f"{args.warmup} warm-up + {args.steps} timed steps per side, median kept")

  names = CONFIGS if args.config == "both" else (args.config,)
  rows = [_run_config(SHAPES[name], args) for name in names]

  print()
  header = (f"{'config':<8}{'batch×seq':>11}{'tokens':>8}{'trainable':>11}{'ours s/step':>13}"
            f"{'torch s/step':>14}{'ours tok/s':>12}{'torch tok/s':>13}{'ratio':>8}"
            f"{'jit compile s':>15}")
  print(header)
  for r in rows:
    print(f"{r['config']:<8}{str(r['batch']) + '×' + str(r['seq']):>11}{r['tokens']:>8}"
          f"{r['trainable']:>11}{r['ours_s']:>13.4f}{r['torch_s']:>14.4f}"
          f"{r['ours_tps']:>12.0f}{r['torch_tps']:>13.0f}"
          f"{r['ours_tps'] / r['torch_tps']:>8.2f}{r['compile_s']:>15.2f}")
  print("ratio = ours tokens/s / torch tokens/s (tokens: real, non-pad tokens of a step)")


if __name__ == "__main__":
  main()
