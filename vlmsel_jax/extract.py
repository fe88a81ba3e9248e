r"""Extracts feature banks: each model's features of a paired image–caption dataset.

  python -m vlmsel_jax.extract --flagfile=my_extract.flags
  python -m vlmsel_jax.extract --vision_models=/models/clip-vit-b32 \
      --text_models=smollm2-135m --data_dir=data/coco_val --output_dir=banks

Writes <output_dir>/<name>.safetensors per model (vision models: image features; text models:
caption features), reusing banks whose inputs have not changed and resuming interrupted runs.
The work is ``vlmsel_jax.features.extraction.extract``.
"""

from __future__ import annotations

from absl import app
from absl import flags

from vlmsel_jax.runtime import errors
from vlmsel_jax.runtime import flag_util
from vlmsel_jax.features import extraction
from vlmsel_jax.features import flags as data_flags
from vlmsel_jax.runtime import parallel
from vlmsel_jax.runtime import flags as runtime_flags
from vlmsel_jax import zoo

_SPECS = ("zoo names (" + ", ".join(zoo.names()) + "), local paths (a Hugging Face model "
          "directory or a .gguf file) or Hugging Face Hub ids (org/name, org/name@revision), "
          "each optionally with a variant: efficientnet-lite0@layer=-3,res=160 (see "
          "vlmsel_jax.zoo).")
VISION_MODELS = flag_util.shared(flags.DEFINE_list, "vision_models", [],
                                 "Vision models to extract (image features): " + _SPECS)
TEXT_MODELS = flag_util.shared(flags.DEFINE_list, "text_models", [],
                               "Text models to extract (caption features): " + _SPECS)
OUTPUT_DIR = flag_util.shared(flags.DEFINE_string, "output_dir", None, "Where results are "
                              "written.")
LAYER = flag_util.shared(
    flags.DEFINE_integer, "layer", None, "Hidden-state index to read (negative counts from the "
    "end; default: -1, the last layer, for vision models and -2, the second to last, for text "
    "models).")
POOLING = flags.DEFINE_enum(
    "pooling", None, sorted(set(extraction.VISION_POOLINGS + zoo.TEXT_POOLINGS)),
    "How tokens become one vector. Vision: cls, mean (patch tokens / feature map), pooler, "
    "logits (classifiers such as EfficientNet-Lite) or embedding (an OpenCLIP tower's CLIP image "
    "embedding); default cls, or mean for models without a CLS token. Text: mean or last over "
    "the caption's tokens (decoders: the caption's own tokens; minilm-l6: all tokens incl. "
    "[CLS]/[SEP], the sentence-transformers convention); default mean.")
BATCH_SIZE = flag_util.shared(flags.DEFINE_integer, "batch_size", 32, "Samples per batch (global; "
                              "training: one micro-batch).", lower_bound=1)
DTYPE = flag_util.shared(flags.DEFINE_enum, "dtype", "float32", "Model dtype (training: of "
                         "the frozen tower and LLM; trained weights stay float32).",
                         enum_values=list(extraction.DTYPES))
SEED = flag_util.shared(flags.DEFINE_integer, "seed", 0, "Seed of every random choice "
                        "(extraction: the --max_samples draw).")
MAX_TEXT_TOKENS = flags.DEFINE_integer("max_text_tokens", 128, "Captions are truncated to this "
                                       "many tokens.", lower_bound=1)
CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 20, "Save the rows done so far to <name>.partial.npz every this many "
    "batches, so a killed run resumes there.", lower_bound=1)
SKIP_BAD_IMAGES = flags.DEFINE_bool(
    "skip_bad_images", False, "Drop samples whose image does not decode (from every bank, so "
    "they stay paired) instead of failing.")
PROGRESS = flag_util.shared(flags.DEFINE_bool, "progress", True, "Show a progress bar.")


class InputError(ValueError):
  """A missing or bad flag; reported as one line."""


def options() -> extraction.ExtractOptions:
  """The extraction options the flags give."""
  return extraction.ExtractOptions(
      layer=LAYER.value, pooling=POOLING.value, batch_size=BATCH_SIZE.value, dtype=DTYPE.value,
      max_samples=data_flags.MAX_SAMPLES.value or None, seed=SEED.value,
      max_text_tokens=MAX_TEXT_TOKENS.value, checkpoint_every=CHECKPOINT_EVERY.value,
      skip_bad_images=SKIP_BAD_IMAGES.value, progress=PROGRESS.value)


def run() -> list[extraction.ExtractResult]:
  """The binary's body: flags → ``extraction.extract_from`` (vision models first)."""
  if not VISION_MODELS.value and not TEXT_MODELS.value:
    raise InputError("no models: pass --vision_models=name_or_path,... and/or "
                     f"--text_models=... (zoo names: {', '.join(zoo.names())})")
  if not OUTPUT_DIR.value:
    raise InputError("--output_dir is required")
  vision, text = zoo.candidate_list(VISION_MODELS.value), zoo.candidate_list(TEXT_MODELS.value)
  extraction.check_kinds(vision, "vision", "vision_models")
  extraction.check_kinds(text, "text", "text_models")
  return extraction.extract_from(vision + text, data_flags.source(), OUTPUT_DIR.value,
                                 options=options())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime_flags.initialize_from_flags()
  results = run()
  if parallel.is_primary():  # The bank paths are process 0's; other hosts say nothing.
    for r in results:
      print(f"{r.path}\t{'cached' if r.cached else 'extracted'}\t{r.n}x{r.dim}")


def console_main():
  """The ``vlmsel-extract`` console command."""
  errors.run(main, "extract")


if __name__ == "__main__":
  console_main()
