r"""``--method=judge``: judge score tables against a ground-truth table, per task and on average.

  python -m vlmsel_jax.select --method=judge --ground_truth=accuracy.csv \
      --scores=logme.csv,gw=runs/vqa/scores.csv:vqa,gw=runs/gqa/scores.csv:gqa \
      --output_dir=runs/judge

Writes into ``--output_dir`` ``judge.json`` (``vlmsel_jax.selection.judge.judge``'s result), a
markdown table and a bar plot beside it (``judge.md``, ``judge.png``). --bootstrap,
--permutations, --confidence and --seed give every task's correlations intervals and p-values
(0 = none).
"""

from __future__ import annotations

from absl import flags

from vlmsel_jax.runtime import flag_util
from vlmsel_jax.scoring import uncertainty_flags
from vlmsel_jax.selection import figures
from vlmsel_jax.selection import judge
from vlmsel_jax.selection import reports

GROUND_TRUTH = flag_util.shared(
    flags.DEFINE_string, "ground_truth", None, "Ground-truth CSV: columns candidate, task and "
    "--ground_truth_column (accuracy ≥ 0: it is NDCG's gain). judge judges the scores against "
    "it; dcd ranks the models by it.")
GROUND_TRUTH_COLUMN = flag_util.shared(flags.DEFINE_string, "ground_truth_column", "accuracy",
                                       "Column of --ground_truth holding the accuracy.")
SCORES = flags.DEFINE_list(
    "scores", [], "Score files as [label=]path[:task]: a CSV candidate,task,score (one method, "
    "named by the label or the file name; ':task' keeps one task) or a scores.csv of "
    "vlmsel_jax.score (one method per metric column, for the task after ':'). Methods of the "
    "same name from several files are merged task by task.")
LOWER_IS_BETTER = flags.DEFINE_list(
    "judge_lower_is_better", [], "Methods whose smaller score means better (distances); "
    "vlmsel_jax.score metrics know their own direction.")
TASKS = flags.DEFINE_list("judge_tasks", [], "Judge only on these tasks (default: every task "
                          "of --ground_truth).")


def run(method: str) -> dict:
  """Reads the flags' tables, judges, writes the JSON + markdown + plot; returns the JSON."""
  result = judge.judge_files(GROUND_TRUTH.value, list(SCORES.value),
                             column=GROUND_TRUTH_COLUMN.value,
                             lower_is_better=LOWER_IS_BETTER.value, tasks=TASKS.value or None,
                             ks=judge.cutoffs(flags.FLAGS.k),
                             uncertainty=uncertainty_flags.options(flags.FLAGS.seed))
  text = reports.judge_markdown(result, run_info={"ground_truth": GROUND_TRUTH.value,
                                                  "scores": ",".join(SCORES.value)})
  reports.write_result_files(flags.FLAGS.output_dir, method, result, text,
                             lambda path: figures.judge_bars(result, path))
  return result
