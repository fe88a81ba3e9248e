"""The flags the training and evaluation binaries share: a run's directory and its evaluation."""

from __future__ import annotations

from absl import flags

from vlmsel_jax.runtime import flag_util

OUTPUT_DIR = flag_util.shared(
    flags.DEFINE_string, "output_dir", None, "The directory the binary writes, with fixed file "
    "names inside. train / evaluate: the run's directory (checkpoints/, metrics.jsonl, "
    "eval.json, summary.json); a_score / groundtruth: their tables, and one run per candidate "
    "under runs/.")
EVAL_DATA = flags.DEFINE_string("eval_data", None, "Held-out data spec (default: the test split "
                                "of the run's training data).")
EVAL_LIMIT = flags.DEFINE_integer("eval_limit", 0, "Held-out examples evaluated, spread evenly "
                                  "over the split (0: all).", lower_bound=0)
EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 16, "Evaluation batch size.", lower_bound=1)
SYSTEM_PROMPT = flags.DEFINE_string(
    "system_prompt", None, "System message of the chat prompts. Training: default the chat "
    "template's own. Evaluation: default the one the run trained with (its checkpoint records "
    "it; give it for runs saved before it was recorded).")
