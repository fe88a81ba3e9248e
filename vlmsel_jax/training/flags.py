"""The training recipe as flags, defined once: ``train`` reads them, and so do the binaries that
train one run per candidate (``a_score``, ``groundtruth``) and select's live modes (Mordal, LLM
similarity), which take their recipe from the same flags.

``config_from_flags(vision=..., llm=...)`` turns them into a ``loop.TrainConfig`` for one model
pair: the candidate is always given, never read from a flag here, so a binary that trains many
candidates builds each one's config the same way ``train`` builds its one. ``vision_models`` and
``llm_models`` check a candidate list flag.
"""

from __future__ import annotations

from absl import app
from absl import flags

from vlmsel_jax import zoo
from vlmsel_jax.models import attention
from vlmsel_jax.models import lora
from vlmsel_jax.models import vlm
from vlmsel_jax.runtime import flag_util
from vlmsel_jax.training import loop
from vlmsel_jax.training import run_flags
from vlmsel_jax.training import step as step_lib

# The run's directory and its evaluation, shared with the evaluate binary.
OUTPUT_DIR = run_flags.OUTPUT_DIR
EVAL_DATA = run_flags.EVAL_DATA
EVAL_LIMIT = run_flags.EVAL_LIMIT
EVAL_BATCH = run_flags.EVAL_BATCH
SYSTEM_PROMPT = run_flags.SYSTEM_PROMPT

LLM_MODEL = flag_util.shared(flags.DEFINE_string, "llm_model", None, "LLM: a zoo name, a local "
                             "HF directory, a .gguf file or a Hugging Face Hub id "
                             "(org/name[@revision]).")
_STAGE = flags.DEFINE_enum("stage", "1", ["1", "2"], "1: projector on captions; 2: projector + "
                           "LoRA on instruction/VQA data.")
_DATA = flag_util.shared(flags.DEFINE_string, "data", None, "Data spec "
                         "(vlmsel_jax.data.registry), e.g. easy-vqa, llava:FILE.json@IMAGE_ROOT, "
                         "folder:DIR.")
_DATA_KIND = flags.DEFINE_enum("data_kind", None, ["paired", "vqa", "conversation"],
                               "Record kind to read (default: paired for stage 1, vqa for 2).")
_VISION_LAYER = flags.DEFINE_integer("vision_layer", -2, "Tower hidden state used by a vision "
                                     "spec that names none (a spec's own @layer= wins; -2: "
                                     "second-to-last).")
_IMAGE_TOKENS = flags.DEFINE_enum("image_tokens", "patch", list(vlm.IMAGE_TOKENS),
                                  "patch: one token per grid cell; mean: one token.")
_IMAGE_POOL = flags.DEFINE_integer("image_pool", 1, "Average-pool the patch grid by this factor.",
                                   lower_bound=1)
_PROJECTOR = flags.DEFINE_enum("projector", "mlp2x_gelu", list(vlm.PROJECTORS), "Projector.")
_ATTENTION = flags.DEFINE_enum(
    "attention_impl", "auto", list(attention.ATTENTION_IMPLS), "How the tower and the LLM "
    "compute attention: auto (jax.nn.dot_product_attention's fused kernels on GPU/TPU, the "
    "einsum on CPU), fused or einsum.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialize every tower and LLM layer in the "
                           "backward pass: less activation memory for one more forward pass.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 8, "LoRA rank (stage 2).", lower_bound=1)
_LORA_ALPHA = flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha (scale = alpha / rank).")
_LORA_TARGETS = flags.DEFINE_list("lora_targets", list(lora.DEFAULT_TARGETS),
                                  "Linear layers of the LLM that get adapters.")
_FULL = flags.DEFINE_bool("full_finetune", False, "Stage 2: train every LLM weight, no LoRA.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.", lower_bound=0.0)
_WARMUP = flags.DEFINE_float("warmup_ratio", 0.03, "Warm-up fraction of the schedule.",
                             lower_bound=0.0, upper_bound=1.0)
_SCHEDULE_STEPS = flags.DEFINE_integer("schedule_steps", 0, "Cosine schedule length in updates "
                                       "(0: --max_steps / --accumulate).", lower_bound=0)
_WD = flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.", lower_bound=0.0)
_CLIP = flags.DEFINE_float("clip_norm", 1.0, "Gradient global-norm clip (0: off).",
                           lower_bound=0.0)
_ACCUMULATE = flags.DEFINE_integer("accumulate", 1, "Micro-batches per optimizer update.",
                                   lower_bound=1)
_BATCH = flag_util.shared(flags.DEFINE_integer, "batch_size", 32, "Samples per batch (global; "
                          "training: one micro-batch).", lower_bound=1)
_MAX_STEPS = flags.DEFINE_integer("max_steps", 100, "Micro-steps to train to.", lower_bound=1)
_FRACTION = flags.DEFINE_float("data_fraction", 1.0, "Train on the first r of a seeded "
                               "permutation of the data.")
SEED = flag_util.shared(flags.DEFINE_integer, "seed", 0, "Seed of every random choice "
                         "(training: initialisation and data order).")
_MAX_LEN = flags.DEFINE_integer("max_len", 128, "Tokens per example (image tokens included).",
                                lower_bound=2)
_DTYPE = flag_util.shared(flags.DEFINE_enum, "dtype", "float32", "Model dtype (training: of "
                          "the frozen tower and LLM; trained weights stay float32).",
                          enum_values=["float32", "bfloat16"])
_MESH = flags.DEFINE_string("mesh", "data:-1,fsdp:1", "Device mesh, e.g. data:2,fsdp:4.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 100, "Checkpoint every N steps.", lower_bound=1)
_KEEP = flags.DEFINE_integer("keep", 2, "Checkpoints kept.", lower_bound=1)
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Log metrics every N steps.", lower_bound=1)
_INIT_FROM = flags.DEFINE_string("init_from", None, "Output directory of a run whose latest "
                                 "projector initialises this one (stage 2 from stage 1).")
_MAX_TARGETS = flags.DEFINE_integer(
    "max_targets", 0, "Apply the LM head only at up to this many target (caption / answer) "
    "positions per example, the same loss for a fraction of the head's cost with a large "
    "vocabulary; an example with more targets stops the run. 0: at every position.",
    lower_bound=0)
_SKIP_BAD = flags.DEFINE_bool("skip_bad_records", False, "Skip (and count) bad records instead "
                              "of stopping.")
EVAL = flags.DEFINE_bool("eval", True, "Evaluate at the end (A score for stage 1, VQA accuracy "
                          "for stage 2) and write eval.json.")


def config_from_flags(*, vision: str, llm: str, output_dir: str | None = None
                      ) -> loop.TrainConfig:
  """The recipe of the training flags as the run of one (``vision``, ``llm``) pair.

  Args:
    vision: The vision spec; its own ``@layer=`` is the tower layer, else ``--vision_layer``
      (``loop.tower_layer``).
    llm: The LLM spec.
    output_dir: The run's directory (default: ``--output_dir``).

  Raises:
    app.UsageError: a missing model, data or output directory, or a bad VLM setting.
  """
  output_dir = output_dir or OUTPUT_DIR.value
  for value, name in ((vision, "--vision_model"), (llm, "--llm_model"), (_DATA.value, "--data"),
                      (output_dir, "--output_dir")):
    if not value:
      raise app.UsageError(f"{name} is required")
  accumulate = _ACCUMULATE.value
  schedule = _SCHEDULE_STEPS.value or max(_MAX_STEPS.value // accumulate, 1)
  try:
    vlm_config = vlm.VLMConfig(vision_layer=loop.tower_layer(vision, _VISION_LAYER.value),
                               image_tokens=_IMAGE_TOKENS.value, image_pool=_IMAGE_POOL.value,
                               projector=_PROJECTOR.value, attention_impl=_ATTENTION.value,
                               remat=_REMAT.value)
  except (ValueError, zoo.ZooError) as e:
    raise app.UsageError(str(e)) from None
  return loop.TrainConfig(
      vision=vision, llm=llm, stage=int(_STAGE.value), data=_DATA.value, workdir=output_dir,
      data_kind=_DATA_KIND.value, vlm=vlm_config,
      lora_rank=_LORA_RANK.value, lora_alpha=_LORA_ALPHA.value,
      lora_targets=tuple(_LORA_TARGETS.value), full_finetune=_FULL.value,
      optim=step_lib.OptimConfig(learning_rate=_LR.value, warmup_ratio=_WARMUP.value,
                                 schedule_steps=schedule, weight_decay=_WD.value,
                                 clip_norm=_CLIP.value, accumulate=accumulate),
      batch_size=_BATCH.value, max_steps=_MAX_STEPS.value, data_fraction=_FRACTION.value,
      seed=SEED.value, max_len=_MAX_LEN.value, system_prompt=SYSTEM_PROMPT.value,
      dtype=_DTYPE.value, mesh=_MESH.value, save_every=_SAVE_EVERY.value, keep=_KEEP.value,
      log_every=_LOG_EVERY.value, init_from=_INIT_FROM.value,
      skip_bad_records=_SKIP_BAD.value, max_targets=_MAX_TARGETS.value)


def _resolved_list(specs: list[str], flag: str, kind: str, what: str, plural: str
                   ) -> tuple[list[str], list[str]]:
  """(specs, names) once every spec resolves to a ``kind`` model with a distinct name."""
  try:
    resolved = [zoo.resolve(c) for c in specs]
  except zoo.ZooError as e:
    raise app.UsageError(f"{flag}: {e}") from None
  for r in resolved:
    if r.kind != kind:
      raise app.UsageError(f"{flag}: {r.spec!r} is a {r.kind} model, not {what}")
  names = [r.name for r in resolved]
  if len(set(names)) != len(names):
    raise app.UsageError(f"{flag}: duplicate {plural} in {', '.join(names)}")
  return specs, names


def vision_models(values: list[str], flag: str = "--vision_models"
                  ) -> tuple[list[str], list[str]]:
  """A vision list flag → (specs, names), for binaries that train one run per candidate.

  Every spec is resolved (a one-line usage error names a bad one) and names must be distinct.
  """
  specs = zoo.candidate_list(values or [])
  if not specs:
    raise app.UsageError(f"{flag} is required")
  return _resolved_list(specs, flag, "vision", "a vision tower", "candidates")


def llm_models(values: list[str], flag: str = "--llm_models") -> tuple[list[str], list[str]]:
  """An LLM list flag → (specs, names); ([], []) when empty.

  Raises:
    app.UsageError: an LLM spec that does not resolve, is not a text model, or is repeated.
  """
  specs = [x.strip() for x in values or [] if x.strip()]
  return _resolved_list(specs, flag, "text", "an LLM", "LLMs")
