r"""One prepared accelerator check: GW, extraction and a train step, each vs its reference.

  python benchmarks/device_check.py                 # full sizes, on the first jax device
  python benchmarks/device_check.py --dry_run       # tiny sizes on CPU, about a minute
  DEVICE_CHECK_DRY=1 python benchmarks/device_check.py

Usually run through ``benchmarks/device_check.sh``, which installs the packages a bare GPU image
lacks from a folder of wheels first. Writes ``device_check.json`` and ``device_check.md`` into
``--out`` (default: ``$OUT`` when set, else ``runs/device_check/``). Every comparison is measured
side by side in this one process and stated as a ratio against its reference:

* GW at each ``--sizes`` n, the synthetic candidate ``--candidate`` vs the text view (as in
  benchmarks/gw_vs_pot.py): the device-only default solver (``AnnealedOptions(oracle="device")``,
  no host callback) vs POT CG (``ot.gromov.gromov_wasserstein2``) on this machine's CPU, and vs
  ott-jax entropic GW (``EntropicOptions(epsilon=5e-3, polish=False)``) on the device; objective
  ratio (ours ÷ reference, lower = better coupling) and speed ratio (reference s ÷ ours s). Then
  ``--batch_k`` candidates in one ``gw_distances`` call vs a loop of POT CG; the loop stops after
  ``--pot_budget_s`` seconds and its time is scaled to all candidates (the row says so).
  POT runs in a child process, killed after ``--pot_cap_s`` (one problem) or what is left of
  ``--pot_budget_s`` (the loop): a solve that long is recorded as a lower bound on POT's time,
  and so on the speed-up ("≥"), with no objective ratio.
* Extraction images/s: a ViT-B/16-shaped tower (random weights, via transformers) and
  EfficientNet-Lite0 (ImageNet weights from its pip package) vs the torch models on the same
  device (torch on CUDA when it has it, else on the CPU; the row says which), each in float32
  (both sides exact float32: JAX's matmul precision "highest", torch's TF32 off) and in
  bfloat16 (weights and activations, both sides).
* A stage-2 train step, reusing benchmarks/train_step.py: EfficientNet-Lite0 (ImageNet weights)
  + an LLM of SmolLM2-135M's shape with LoRA, the bfloat16 recipe (``--dtype=bfloat16``), vs the
  same step in torch on the same device: tokens/s ours ÷ torch.

A section whose reference (POT, torch, a weights package) is missing, or that fails, records
"skipped: <why>" instead of stopping the run; sections that would start after ``--budget_s``
seconds are skipped the same way. The bounded sections run first (extraction, the train step,
then GW from the smallest n), and both files are rewritten after every section, so a run cut
short by its caller's time limit still leaves every finished section. Our times exclude jit
compilation (first call minus a warm call, recorded separately).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
  sys.path.insert(0, HERE)  # The sibling benchmarks (timing, train_step, ...) import as modules.

# In the order they run: the bounded ones first (see the module docstring).
SECTIONS = ("extraction", "train_step", "gw_single", "gw_batch")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The problem sizes of one run (full or dry)."""

  gw_sizes: tuple[int, ...]
  batch_k: int
  extract_batch: int
  vit: dict
  train_shape: str  # A benchmarks/train_step.py SHAPES key.
  train_dtype: str
  train_steps: int
  train_warmup: int


FULL = Sizes(gw_sizes=(1000, 2000, 4000), batch_k=16, extract_batch=32,
             vit=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, patch_size=16, image_size=224),
             train_shape="smollm2-135m", train_dtype="bfloat16", train_steps=5, train_warmup=1)
DRY = Sizes(gw_sizes=(64,), batch_k=2, extract_batch=2,
            vit=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, patch_size=8, image_size=32),
            train_shape="tiny-efficientnet", train_dtype="bfloat16", train_steps=1,
            train_warmup=0)
EXTRACT_DTYPES = ("float32", "bfloat16")


def parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT") or "runs/device_check",
                      help="output directory (default: $OUT, else runs/device_check)")
  parser.add_argument("--dry_run", action="store_true",
                      default=os.environ.get("DEVICE_CHECK_DRY", "") not in ("", "0"),
                      help="tiny sizes on CPU, end to end (also DEVICE_CHECK_DRY=1)")
  parser.add_argument("--sizes", default=None, help="GW n, comma-separated (default 1000,2000,4000)")
  parser.add_argument("--batch_k", type=int, default=None, help="batched GW candidates (16)")
  parser.add_argument("--candidate", type=int, default=5,
                      help="synthetic pool index for the single problems (5 = warp + noise)")
  parser.add_argument("--repeats", type=int, default=2, help="timed calls, best kept")
  parser.add_argument("--pot_budget_s", type=float, default=40.0,
                      help="seconds the batched POT loop may run before it is extrapolated")
  parser.add_argument("--pot_cap_s", type=float, default=120.0,
                      help="seconds one POT solve may run; longer is recorded as a lower bound")
  parser.add_argument("--budget_s", type=float, default=400.0,
                      help="no new item starts after this many seconds (the run aims at < 8 min)")
  parser.add_argument("--sections", default=",".join(SECTIONS))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  base = DRY if args.dry_run else FULL
  if args.sizes:
    base = dataclasses.replace(base, gw_sizes=tuple(int(s) for s in args.sizes.split(",") if s))
  if args.batch_k:
    base = dataclasses.replace(base, batch_k=args.batch_k)
  if args.dry_run:
    args.repeats = 1
  args.plan = base
  args.sections = tuple(s for s in args.sections.split(",") if s)
  unknown = set(args.sections) - set(SECTIONS)
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
  return args


class Clock:
  """The run's time budget."""

  def __init__(self, budget_s: float):
    self.start = time.monotonic()
    self.budget_s = budget_s

  def over(self) -> bool:
    return time.monotonic() - self.start > self.budget_s

  def elapsed(self) -> float:
    return time.monotonic() - self.start


def _why(exc: BaseException) -> str:
  text = f"{type(exc).__name__}: {exc}".strip()
  return " ".join(text.split())[:300]


def _solve_with_stats(cx, cy, opts):
  """``gw.solve_normalized``'s objective, with the CG polish's iterations and auction rounds
  (0 and 0 for a record without CG steps): the same work, the counts that explain the time."""
  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from vlmsel_jax.scores import gw
  stage = gw.coupling_stage(cx, cy, opts)
  if opts.cg_steps() is None:
    return gw.gw_objective(cx, cy, stage.coupling), jnp.array(0), jnp.array(0)
  coupling, _, cg_iters, rounds = gw.cg_polish(cx, cy, stage.coupling, opts, prices=stage.prices)
  return gw.gw_objective(cx, cy, coupling), cg_iters, rounds


def _ours_solve(c1, c2, opts, repeats: int):
  """(objective, warm seconds, compile seconds, CG iterations, auction rounds) on the device."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import timing
  a, b = jnp.asarray(c1, opts.dtype), jnp.asarray(c2, opts.dtype)
  solve = jax.jit(lambda u, v: _solve_with_stats(u, v, opts))
  t = time.perf_counter()
  jax.block_until_ready(solve(a, b))
  first_s = time.perf_counter() - t
  out, secs = timing.best_of(lambda: jax.block_until_ready(solve(a, b)), repeats)
  value, cg_iters, rounds = out
  return float(value), secs, max(first_s - secs, 0.0), int(cg_iters), int(rounds)


def _costs64(x, y):
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from vlmsel_jax.scores import gw
  with jax.enable_x64(True):
    cx, cy, unit = gw.prepare_costs(np.asarray(x, np.float64), np.asarray(y, np.float64))
    return np.asarray(cx), np.asarray(cy), float(unit)


POT_STARTUP_S = 15.0  # Allowed for a POT child's imports, beyond its solve's cap.
_POT_CHILD = """
import json, sys, time
import numpy as np
import ot
c1, c2 = np.load(sys.argv[1]), np.load(sys.argv[2])
p = np.full(c1.shape[0], 1.0 / c1.shape[0])
t = time.perf_counter()
value = ot.gromov.gromov_wasserstein2(c1, c2, p, p, "square_loss", max_iter=1000)
print(json.dumps({"value": float(value), "seconds": time.perf_counter() - t}))
"""


def pot_cg(c1, c2, cap_s: float) -> tuple[float | None, float]:
  """POT CG (as benchmarks/gw_vs_pot.py) in a child process: (objective, solve seconds), or
  (None, cap_s) when it was killed after ``cap_s`` seconds (its time is then ≥ cap_s).

  A child, so a slow solve can be stopped; it sees no accelerator (POT's jax and torch
  backends off), and times the solve alone, not its start-up.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
         "POT_BACKEND_DISABLE_PYTORCH": "1", "POT_BACKEND_DISABLE_JAX": "1",
         "POT_BACKEND_DISABLE_CUPY": "1", "POT_BACKEND_DISABLE_TENSORFLOW": "1"}
  with tempfile.TemporaryDirectory() as tmp:
    paths = [os.path.join(tmp, f"c{i}.npy") for i in (1, 2)]
    for path, c in zip(paths, (c1, c2)):
      np.save(path, np.asarray(c, np.float64))
    try:
      # The timeout also covers the child's imports (a few seconds): a child killed at
      # cap_s + POT_STARTUP_S had solved for at least cap_s.
      proc = subprocess.run([sys.executable, "-c", _POT_CHILD, *paths], env=env,
                            capture_output=True, text=True, timeout=cap_s + POT_STARTUP_S,
                            check=True)
    except subprocess.TimeoutExpired:
      return None, cap_s
    except subprocess.CalledProcessError as exc:
      raise RuntimeError(f"POT child failed: {exc.stderr.strip().splitlines()[-1:]}") from None
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  return out["value"], out["seconds"]


def _pot_missing() -> str | None:
  """Why POT cannot run here, or None."""
  try:
    importlib.import_module("ot")  # The children import it; checked here once.
  except ImportError as exc:
    return f"POT not importable ({_why(exc)})"
  return None


def gw_single(args, clock: Clock) -> list[dict]:
  """Per n: POT CG (CPU), ours device-only, ours ott-jax entropic; one problem each."""
  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.scoring import synthetic
  from vlmsel_jax.scores import gw
  pot_missing = _pot_missing()
  rows = []
  for n in args.plan.gw_sizes:
    row = {"n": n}
    rows.append(row)
    if clock.over():
      row["status"] = f"skipped: time budget of {args.budget_s:.0f} s spent"
      continue
    try:
      pool = synthetic.make_pool(n=n, seed=args.seed)
      c1, c2, _ = _costs64(pool.candidates[args.candidate], pool.text)
      row["candidate"] = pool.names[args.candidate]
      v, s, c, its, rounds = _ours_solve(c1, c2, gw.AnnealedOptions(oracle="device"),
                                         args.repeats)
      row.update(ours_obj=v, ours_s=s, ours_compile_s=c, ours_cg_iterations=its,
                 ours_auction_rounds=rounds)
      if pot_missing:
        row["pot"] = f"skipped: {pot_missing}"
      else:
        ref, ref_s = pot_cg(c1, c2, args.pot_cap_s)
        row.update(pot_s=ref_s, pot_timed_out=ref is None, speedup_vs_pot=ref_s / s)
        if ref is not None:
          row.update(pot_obj=ref, obj_vs_pot=v / ref)
      try:
        ev, es, ec, _, _ = _ours_solve(c1, c2, gw.EntropicOptions(epsilon=5e-3, polish=False),
                                       args.repeats)
        row.update(entropic_obj=ev, entropic_s=es, entropic_compile_s=ec,
                   obj_vs_entropic=v / ev, speedup_vs_entropic=es / s)
      except Exception as exc:  # pylint: disable=broad-except
        row["entropic"] = f"skipped: {_why(exc)}"
      row["status"] = "ok"
    except Exception as exc:  # pylint: disable=broad-except
      traceback.print_exc()
      row["status"] = f"skipped: {_why(exc)}"
    print(f"[gw_single] {json.dumps(row)}", flush=True)
  return rows


def gw_batch(args, clock: Clock) -> list[dict]:
  """Per n: ``batch_k`` candidates in one ``gw_distances`` call vs a POT CG loop on the CPU."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from vlmsel_jax.scoring import synthetic
  from vlmsel_jax.scores import gw
  pot_missing = _pot_missing()
  k = args.plan.batch_k
  rows = []
  for n in args.plan.gw_sizes:
    row = {"n": n, "k": k}
    rows.append(row)
    if clock.over():
      row["status"] = f"skipped: time budget of {args.budget_s:.0f} s spent"
      continue
    try:
      pool = synthetic.make_pool(n=n, seed=args.seed)
      cands = [pool.candidates[i % len(pool.candidates)] for i in range(k)]
      opts = gw.AnnealedOptions(oracle="device")
      t = time.perf_counter()
      gw.gw_distances(cands, pool.text, options=opts)  # Compile.
      first_s = time.perf_counter() - t
      t = time.perf_counter()
      ours = np.array([r.value for r in gw.gw_distances(cands, pool.text, options=opts)])
      ours_s = time.perf_counter() - t
      row.update(ours_s=ours_s, ours_compile_s=max(first_s - ours_s, 0.0),
                 ours_mean=float(ours.mean()),
                 batch_mode="map" if jax.default_backend() == "cpu" else "vmap")
      if pot_missing:
        row["pot"] = f"skipped: {pot_missing}"
      else:
        # Solve seconds of the finished candidates, summed (cost matrices and child start-ups
        # not counted); the loop stops when they pass the budget, or when a solve is killed
        # at what is left of it (its partial time is dropped, its candidate not counted).
        pot, pot_run_s, killed_s = [], 0.0, None
        for x in cands:
          c1, c2, unit = _costs64(x, pool.text)
          value, secs = pot_cg(c1, c2, max(args.pot_budget_s - pot_run_s, 1.0))
          if value is None:
            killed_s = secs
            break
          pot_run_s += secs
          pot.append(value * unit ** 2)
          if pot_run_s > args.pot_budget_s:
            break
        m = len(pot)
        if m == 0:
          # Not one candidate finished: k of them take at least k times the killed solve's
          # time.
          row.update(pot_candidates_run=0, pot_s=killed_s * k, pot_timed_out=True,
                     pot_extrapolated=True, speedup_vs_pot=killed_s * k / ours_s)
        else:
          pot = np.array(pot)
          pot_s = pot_run_s * k / m
          row.update(pot_candidates_run=m, pot_s=pot_s, pot_timed_out=False,
                     pot_extrapolated=m < k, pot_mean=float(pot.mean()),
                     speedup_vs_pot=pot_s / ours_s,
                     obj_vs_pot_mean=float((ours[:m] / pot).mean()),
                     ours_le_pot=int(np.sum(ours[:m] <= pot * 1.005)))
      row["status"] = "ok"
    except Exception as exc:  # pylint: disable=broad-except
      traceback.print_exc()
      row["status"] = f"skipped: {_why(exc)}"
    print(f"[gw_batch] {json.dumps(row)}", flush=True)
  return rows


def _torch_device():
  """torch's device for the references: CUDA when torch has it, else the CPU."""
  import train_step  # pylint: disable=g-import-not-at-top
  return train_step.torch_device("auto")


def _exact_float32(dtype: str):
  """A context in which both sides compute float32 exactly (no TF32 / bf16 passes) when
  ``dtype`` is float32; nothing otherwise."""
  # pylint: disable=g-import-not-at-top
  import contextlib
  import jax
  import torch
  if dtype != "float32":
    return contextlib.nullcontext()
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  return jax.default_matmul_precision("highest")


def _diff(ours, ref) -> tuple[float, float]:
  """(max |ours − ref|, that ÷ max |ref|), in float32."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ours = np.asarray(ours, np.float32)
  ref = ref.float().cpu().numpy()
  diff = float(np.abs(ours - ref).max())
  return diff, diff / max(float(np.abs(ref).max()), 1e-30)


def _images_per_s(fn, batch: int, repeats: int) -> float:
  import timing  # pylint: disable=g-import-not-at-top
  fn()  # Warm (compiled, allocated).
  _, secs = timing.best_of(fn, max(repeats, 3) if batch > 4 else 1)
  return batch / secs


def _extract_vit(args, dtype: str) -> dict:
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import torch
  import transformers
  from flax import nnx
  from vlmsel_jax.models import load_pretrained
  torch.manual_seed(args.seed)
  dev = _torch_device()
  torch_dtype = getattr(torch, dtype)
  torch_model = transformers.ViTModel(transformers.ViTConfig(**args.plan.vit)).eval()
  with tempfile.TemporaryDirectory() as tmp:
    torch_model.save_pretrained(tmp)
    ours = load_pretrained(tmp, dtype=dtype)
  torch_model = torch_model.to(device=dev, dtype=torch_dtype)
  size, batch = args.plan.vit["image_size"], args.plan.extract_batch
  pixels = np.random.RandomState(args.seed).randn(batch, 3, size, size).astype(np.float32)
  x_torch = torch.from_numpy(pixels).to(device=dev, dtype=torch_dtype)
  x_ours = jax.device_put(np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))).astype(dtype)
  graphdef, state = nnx.split(ours)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).last_hidden_state)

  def run_ours():
    return jax.block_until_ready(forward(state, x_ours))

  def run_torch():
    with torch.inference_mode():
      out = torch_model(pixel_values=x_torch).last_hidden_state
    if dev.type == "cuda":
      torch.cuda.synchronize()
    return out

  diff, rel = _diff(run_ours(), run_torch())
  ours_ips = _images_per_s(run_ours, batch, args.repeats)
  torch_ips = _images_per_s(run_torch, batch, args.repeats)
  return {"model": "ViT-B/16 shape, random weights" if not args.dry_run else
                   "tiny ViT, random weights",
          "batch": batch, "torch_device": str(dev), "max_abs_diff": diff, "max_rel_diff": rel,
          "ours_ips": ours_ips, "torch_ips": torch_ips, "ratio": ours_ips / torch_ips}


def _extract_efficientnet(args, dtype: str) -> dict:
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import torch
  from efficientnet_lite_pytorch import EfficientNet
  from flax import nnx
  from vlmsel_jax import zoo
  dev = _torch_device()
  torch_dtype = getattr(torch, dtype)
  loaded = zoo.load("efficientnet-lite0", dtype=dtype)
  size = 224
  batch = args.plan.extract_batch
  images = np.random.RandomState(args.seed).rand(batch, size, size, 3).astype(np.float32)
  graphdef, state = nnx.split(loaded.model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits)
  x_ours = jax.device_put(images).astype(dtype)
  torch_model = EfficientNet.from_name("efficientnet-lite0")
  torch_model.load_state_dict(torch.load(zoo.weights_file("lite0"), map_location="cpu",
                                         weights_only=True))
  torch_model = torch_model.eval().to(device=dev, dtype=torch_dtype)
  x_torch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(
      device=dev, dtype=torch_dtype)

  def run_ours():
    return jax.block_until_ready(forward(state, x_ours))

  def run_torch():
    with torch.inference_mode():
      out = torch_model(x_torch)
    if dev.type == "cuda":
      torch.cuda.synchronize()
    return out

  diff, rel = _diff(run_ours(), run_torch())
  ours_ips = _images_per_s(run_ours, batch, args.repeats)
  torch_ips = _images_per_s(run_torch, batch, args.repeats)
  return {"model": "EfficientNet-Lite0, ImageNet weights", "batch": batch,
          "torch_device": str(dev), "max_abs_diff": diff, "max_rel_diff": rel,
          "ours_ips": ours_ips,
          "torch_ips": torch_ips, "ratio": ours_ips / torch_ips}


def extraction(args, clock: Clock) -> list[dict]:
  rows = []
  for name, fn in (("vit_b16", _extract_vit), ("efficientnet_lite0", _extract_efficientnet)):
    for dtype in EXTRACT_DTYPES:
      if clock.over():
        row = {"status": f"skipped: time budget of {args.budget_s:.0f} s spent"}
      else:
        try:
          with _exact_float32(dtype):
            row = {**fn(args, dtype), "status": "ok"}
        except Exception as exc:  # pylint: disable=broad-except
          traceback.print_exc()
          row = {"status": f"skipped: {_why(exc)}"}
      row.update(name=name, dtype=dtype)
      rows.append(row)
      print(f"[extraction] {json.dumps(row)}", flush=True)
  return rows


def train_step(args, clock: Clock) -> list[dict]:
  """benchmarks/train_step.py's side-by-side step: EfficientNet-Lite0 + SmolLM2-135M's shape,
  bfloat16, LoRA (dry: EfficientNet-Lite0 at 64 px + the tiny LLM)."""
  if clock.over():
    return [{"status": f"skipped: time budget of {args.budget_s:.0f} s spent"}]
  try:
    # pylint: disable=g-import-not-at-top
    import train_step as ts
    shape = ts.SHAPES[args.plan.train_shape]
    dtype = args.plan.train_dtype
    ns = argparse.Namespace(batch_size=None, seed=args.seed, steps=args.plan.train_steps,
                            warmup=args.plan.train_warmup, dtype=dtype, torch_device="auto")
    # train_step.py checks the first step's losses agree (float32: rtol 1e-4, computed exactly
    # on both sides; bfloat16: 5e-3).
    with _exact_float32(dtype):
      result = ts._run_config(shape, ns)  # pylint: disable=protected-access
    result["ratio"] = result["ours_tps"] / result["torch_tps"]
    result["status"] = "ok"
    result["note"] = (f"{shape.tower} tower at {shape.image} px + LLM {shape.hidden} wide × "
                      f"{shape.layers} layers, vocab {shape.vocab}; {dtype} (trained weights, "
                      f"optimizer and loss float32); torch on {result['torch_device']}")
  except BaseException as exc:  # pylint: disable=broad-except  # SystemExit on a loss mismatch.
    if isinstance(exc, KeyboardInterrupt):
      raise
    traceback.print_exc()
    result = {"status": f"skipped: {_why(exc)}"}
  print(f"[train_step] {json.dumps(result)}", flush=True)
  return [result]


def _versions() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  out = {"jax": jax.__version__, "python": platform.python_version()}
  for mod in ("jaxlib", "flax", "ott", "ot", "torch", "transformers"):
    try:
      out[mod] = __import__(mod).__version__
    except Exception as exc:  # pylint: disable=broad-except
      out[mod] = f"missing ({type(exc).__name__})"
  return out


def _fmt(x, spec=".3g"):
  return "—" if x is None else format(x, spec)


def markdown(result: dict) -> str:
  """The run as one table: every row a comparison and its ratio."""
  m = result["meta"]
  lines = [
      "# Device check" + (" (dry run: tiny sizes on CPU, not a measurement)"
                          if m["dry_run"] else ""),
      "",
      f"Card: **{m['device_kind']}** ({m['platform']}, {m['device_count']} device(s)); "
      f"jax {m['versions']['jax']}; date {m['date']}; host CPU {m['cpu']}, {m['cpu_count']} "
      f"cores; total {m['elapsed_s']:.0f} s.",
      "",
      "| section | what is compared | result (ratio) | setting |",
      "|---|---|---|---|",
  ]
  for r in result["gw_single"]:
    if r["status"] != "ok":
      lines.append(f"| GW one problem, n = {r['n']} | device-only default solver vs POT CG "
                   f"(CPU) and vs ott-jax entropic | {r['status']} | |")
      continue
    if "pot_s" not in r:
      pot = f"vs POT CG: {r.get('pot')}"
    elif r.get("pot_timed_out"):
      pot = (f"vs POT CG: speed-up ≥ {_fmt(r['speedup_vs_pot'], '.2f')}× ({_fmt(r['ours_s'])} "
             f"s vs POT stopped unfinished after {_fmt(r['pot_s'])} s; no objective ratio)")
    else:
      pot = (f"vs POT CG: objective {_fmt(r.get('obj_vs_pot'), '.3f')}×, "
             f"speed-up {_fmt(r.get('speedup_vs_pot'), '.2f')}× ({_fmt(r['ours_s'])} s vs "
             f"{_fmt(r.get('pot_s'))} s)")
    ent = (f"vs entropic ε=5e-3: objective {_fmt(r['obj_vs_entropic'], '.3f')}×, "
           f"speed-up {_fmt(r['speedup_vs_entropic'], '.2f')}× ({_fmt(r['entropic_s'])} s)"
           ) if "entropic_s" in r else f"vs entropic: {r.get('entropic')}"
    lines.append(f"| GW one problem, n = {r['n']} | `AnnealedOptions(oracle=\"device\")` vs POT "
                 f"CG on the host CPU, and vs ott-jax entropic on the device; objective ours ÷ "
                 f"ref, speed = ref s ÷ ours s | {pot}; {ent} | candidate `{r['candidate']}`; "
                 f"ours: {r['ours_cg_iterations']} CG iterations, {r['ours_auction_rounds']} "
                 f"auction rounds, compile {_fmt(r['ours_compile_s'])} s excluded |")
  for r in result["gw_batch"]:
    head = f"| GW batch of {r['k']}, n = {r['n']} | one `gw_distances` call (device oracle) vs "
    if r["status"] != "ok":
      lines.append(head + f"a POT CG loop | {r['status']} | |")
      continue
    if r.get("pot_timed_out"):
      res = (f"speed-up ≥ {_fmt(r['speedup_vs_pot'], '.2f')}× ({_fmt(r['ours_s'])} s vs ≥ "
             f"{_fmt(r['pot_s'])} s: POT's first candidate stopped unfinished, scaled to "
             f"{r['k']}; no objective ratio)")
    elif "pot_s" in r:
      est = (f" (POT timed on {r['pot_candidates_run']} of {r['k']}, scaled)"
             if r["pot_extrapolated"] else "")
      res = (f"speed-up {_fmt(r['speedup_vs_pot'], '.2f')}× ({_fmt(r['ours_s'])} s vs "
             f"{_fmt(r['pot_s'])} s{est}); objective ours ÷ POT {_fmt(r['obj_vs_pot_mean'], '.3f')}"
             f"× (mean), ours ≤ POT on {r['ours_le_pot']}/{r['pot_candidates_run']}")
    else:
      res = f"ours {_fmt(r['ours_s'])} s; POT {r['pot']}"
    lines.append(head + f"a loop of POT CG on the host CPU | {res} | batch_mode "
                 f"{r['batch_mode']}; compile {_fmt(r['ours_compile_s'])} s excluded |")
  for r in result["extraction"]:
    if r["status"] != "ok":
      lines.append(f"| extraction {r['name']}, {r['dtype']} | ours vs torch, images/s | "
                   f"{r['status']} | |")
      continue
    precision = ("exact float32 both sides (no TF32)" if r["dtype"] == "float32" else
                 "bfloat16 weights and activations both sides")
    lines.append(f"| extraction {r['name']}, {r['dtype']} | {r['model']}: ours (jax.jit) vs "
                 f"torch on {r['torch_device']}, same weights (max diff {r['max_abs_diff']:.1e}, "
                 f"{r['max_rel_diff']:.1e} of the largest output); images/s ours ÷ torch | "
                 f"**{r['ratio']:.2f}×** ({r['ours_ips']:.1f} vs {r['torch_ips']:.1f} images/s) | "
                 f"batch {r['batch']}, {precision} |")
  for r in result["train_step"]:
    if r["status"] != "ok":
      lines.append(f"| train step | ours vs torch, tokens/s | {r['status']} | |")
      continue
    lines.append(f"| train step ({r['config']}, {r['dtype']}) | benchmarks/train_step.py's "
                 f"stage-2 step (projector + LoRA r8, AdamW) vs the same step in torch; first "
                 f"losses agree (rel {r['loss_rel_diff']:.1e}); tokens/s ours ÷ torch | "
                 f"**{r['ratio']:.2f}×** "
                 f"({r['ours_tps']:.0f} vs {r['torch_tps']:.0f} tokens/s) | {r['note']}; batch "
                 f"{r['batch']} × {r['seq']}, compile {r['compile_s']:.1f} s excluded |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  args = parse(argv)
  if args.dry_run:
    os.environ["JAX_PLATFORMS"] = "cpu"
  # Leave room on the card for torch, which runs on it after (and beside) jax.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  clock = Clock(args.budget_s)
  # pylint: disable=g-import-not-at-top
  import jax
  import cpu_setup
  device = jax.devices()[0]
  print(f"device check: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
        f"{'dry run' if args.dry_run else 'full'}; out {args.out}", flush=True)
  result = {"meta": {
      "device_kind": device.device_kind, "platform": device.platform,
      "device_count": jax.device_count(), "dry_run": args.dry_run,
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "cpu": cpu_setup.cpu_model(), "cpu_count": os.cpu_count(), "versions": _versions(),
      "plan": dataclasses.asdict(args.plan), "budget_s": args.budget_s,
  }}
  fns = {"gw_single": gw_single, "gw_batch": gw_batch, "extraction": extraction,
         "train_step": train_step}
  result.update({name: [] for name in SECTIONS})
  for name in SECTIONS:
    if name in args.sections:
      t = time.monotonic()
      result[name] = fns[name](args, clock)
      result["meta"][f"{name}_s"] = time.monotonic() - t
      _release_torch_memory()
    # After every section: a run cut short still leaves what it finished.
    result["meta"]["elapsed_s"] = clock.elapsed()
    table = write(result, args.out)
  print("\n" + table, flush=True)
  return result


def _release_torch_memory():
  """Hands torch's cached GPU memory back, so the GW sections after it have the card."""
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available():
    torch.cuda.empty_cache()


def write(result: dict, out: str) -> str:
  """Writes device_check.json and device_check.md into ``out``, each whole or not at all (a
  temporary file renamed over it); returns the table."""
  os.makedirs(out, exist_ok=True)
  table = markdown(result)
  for name, text in (("device_check.json", json.dumps(result, indent=1, default=str)),
                     ("device_check.md", table)):
    path = os.path.join(out, name)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  return table


if __name__ == "__main__":
  main()
