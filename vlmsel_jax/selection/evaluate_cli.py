r"""``--method=evaluate``: judge score tables against a ground-truth table, per task and on average.

  python -m vlmsel_jax.select --method=evaluate --truth=accuracy.csv \
      --scores=logme.csv,gw=runs/vqa/scores.csv:vqa,gw=runs/gqa/scores.csv:gqa \
      --output=runs/eval/evaluate.json

Writes the JSON (``vlmsel_jax.selection.evaluate.evaluate``'s result), a markdown table and a
bar plot beside it (``evaluate.md``, ``evaluate.png``).
"""

from __future__ import annotations

from absl import flags

from vlmsel_jax.selection import evaluate

TRUTH = flags.DEFINE_string(
    "truth", None, "Ground-truth CSV with columns candidate,task,accuracy (accuracy ≥ 0: it is "
    "NDCG's gain).")
TRUTH_COLUMN = flags.DEFINE_string("truth_column", "accuracy",
                                   "Column of --truth holding the accuracy.")
SCORES = flags.DEFINE_list(
    "scores", [], "Score files as [label=]path[:task]: a CSV candidate,task,score (one method, "
    "named by the label or the file name; ':task' keeps one task) or a scores.csv of "
    "vlmsel_jax.score (one method per metric column, for the task after ':'). Methods of the "
    "same name from several files are merged task by task.")
LOWER_IS_BETTER = flags.DEFINE_list(
    "eval_lower_is_better", [], "Methods whose smaller score means better (distances); "
    "vlmsel_jax.score metrics know their own direction.")
TASKS = flags.DEFINE_list("eval_tasks", [], "Evaluate only these tasks (default: every task "
                          "of --truth).")


def ks() -> tuple[int, ...]:
  """NDCG@k / Recall@k cut-offs: 1, 3, 5 and the shared --k."""
  return tuple(sorted({1, 3, 5, int(flags.FLAGS.k)}))


def run(method: str) -> dict:
  """Reads the flags' tables, evaluates, writes the JSON + markdown + plot; returns the JSON."""
  del method  # One method here.
  if not TRUTH.value:
    raise evaluate.EvalError("--truth is required (CSV candidate,task,accuracy)")
  if not SCORES.value:
    raise evaluate.EvalError("--scores is required (one or more score files)")
  truth = evaluate.read_truth(TRUTH.value, TRUTH_COLUMN.value)
  methods = evaluate.load_methods(SCORES.value, sorted(truth), LOWER_IS_BETTER.value)
  result = evaluate.evaluate(truth, methods, truth_path=TRUTH.value,
                             tasks=TASKS.value or None, ks=ks())
  result["truth"] = TRUTH.value
  result["scores"] = list(SCORES.value)
  text = evaluate.markdown(result, run_info={"truth": TRUTH.value,
                                             "scores": ",".join(SCORES.value)})
  evaluate.write_result_files(flags.FLAGS.output, result, text,
                              lambda path: evaluate.plot(result, path))
  return result
