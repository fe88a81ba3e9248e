r"""``select --method=ac_law`` and ``--method=ac_policy``: the AC law and AC policy on a table.

  python -m vlmsel_jax.select --flagfile=configs/ac_law_example.flags
  python -m vlmsel_jax.select --method=ac_law --table=T.csv --a_column=A --c_column=C \
      --targets=mmbench,mme --groups='vision:mmbench,mme;ocr:textvqa' --output_dir=out/law
  python -m vlmsel_jax.select --method=ac_policy --table=T.csv --a_column=A --c_column=C \
      --targets=mmbench,mme --budget=4 --k=3 --trials=1000 --seed=0 --output_dir=out/policy

The table is a CSV with a header row, one row per vision setting; lines starting with ``#`` are
comments (``tables.read_settings``). Writes, atomically, into ``--output_dir``:

* ac_law: ``ac_law.json`` and ``ac_law_scatter.png`` (A–C scatter per target, coloured by the
  target, with the fitted degree-2 surface as contours).
* ac_policy: ``ac_policy.json``, ``ac_policy_curve.png`` (Recall@k against the budget, one line
  per policy), ``ac_policy_scatter.png`` and ``ac_policy.md`` (the policies side by side).

The math is in ``vlmsel_jax.selection.ac``; this module reads flags and files.
"""

from __future__ import annotations

from typing import Any

from absl import flags
from tqdm import auto as tqdm

from vlmsel_jax.selection import ac
from vlmsel_jax.selection import figures
from vlmsel_jax.selection import reports
from vlmsel_jax.selection import tables

TABLE = flags.DEFINE_string("table", None, "CSV of vision settings: a header row, one row per "
                            "setting ('#' lines are comments).")
A_COLUMN = flags.DEFINE_string("a_column", "A", "Column of the A score.")
C_COLUMN = flags.DEFINE_string("c_column", "C", "Column of the C score.")
TARGETS = flags.DEFINE_list("targets", [], "Benchmark columns to fit / select for (default: "
                            "every numeric column but A, C and --name_column).")
NAME_COLUMN = flags.DEFINE_string("name_column", "setting", "Column naming the settings "
                                  "(optional; rows are numbered when it is absent).")
GROUPS = flags.DEFINE_string("groups", None, "Benchmark groups whose mean R² ac_law reports: "
                             "'name:col,col;name:col,...'.")
BUDGET = flags.DEFINE_integer("budget", 4, "ac_policy: settings fully trained (k' of METHODS "
                              "§4).", lower_bound=1)
TRIALS = flags.DEFINE_integer("trials", 1000, "ac_policy: random trials averaged.",
                              lower_bound=1)
CURVE_TRIALS = flags.DEFINE_integer("curve_trials", 200, "ac_policy: trials per budget of the "
                                    "Recall@k-vs-budget curve (0: no curve).", lower_bound=0)
SAMPLER = flags.DEFINE_list("sampler", list(ac.SAMPLERS), "ac_policy samplers, side by side: "
                            f"any of {', '.join(ac.SAMPLERS)} (region is the reference).")
FIT = flags.DEFINE_list("fit", list(ac.FITS), f"ac_policy fits: any of {', '.join(ac.FITS)} "
                        "(ols is the reference). Every sampler runs with every fit.")
RANK_TRAINED = flags.DEFINE_enum("rank_trained", "prediction", list(ac.RANK_TRAINED),
                                 "ac_policy: rank the trained settings by the fit's prediction "
                                 "or by their measured value.")
FIT_INPUTS = flags.DEFINE_enum("fit_inputs", "raw", list(ac.FIT_INPUTS),
                               "ac_policy OLS features: raw (A, C) or min-max normalised (ridge "
                               "and Bayesian always use normalised).")
RIDGE_ALPHA = flags.DEFINE_float("ridge_alpha", ac.RIDGE_ALPHA, "ac_policy: ridge penalty on "
                                 "normalised features.", lower_bound=0.0)
PROGRESS = flags.DEFINE_bool("ac_progress", True, "ac_policy: show a progress bar.")

FLAGS = flags.FLAGS


def _policy_options() -> ac.PolicyOptions:
  return ac.PolicyOptions(
      budget=BUDGET.value, k=FLAGS.k, trials=TRIALS.value, seed=FLAGS.seed,
      samplers=tuple(SAMPLER.value), fits=tuple(FIT.value), rank_trained=RANK_TRAINED.value,
      fit_inputs=FIT_INPUTS.value, ridge_alpha=RIDGE_ALPHA.value,
      curve_trials=CURVE_TRIALS.value)


def run(method: str) -> dict[str, Any]:
  """Runs ``ac_law`` or ``ac_policy`` from the flags; writes its files into ``--output_dir``.

  Raises:
    ac.TableError / ac.ACError: a bad table or flag (both ValueErrors; ``select`` prints them as
      one line naming the file / column / line / flag, and exits with status 1). Nothing is
      written then.
  """
  if method not in ("ac_law", "ac_policy"):
    raise ValueError(f"ac_cli handles ac_law and ac_policy, not {method!r}")
  if TABLE.value is None:
    raise ac.TableError("--table is required")
  out = FLAGS.output_dir
  table = tables.read_settings(TABLE.value, A_COLUMN.value, C_COLUMN.value, TARGETS.value,
                               NAME_COLUMN.value)
  groups = tables.parse_groups(GROUPS.value, table["targets"])
  inputs = dict(table=TABLE.value, a_column=A_COLUMN.value, c_column=C_COLUMN.value,
                targets=table["targets"])
  if method == "ac_law":
    payload, law = ac.law_report(table, groups, TABLE.value)
    payload.update(inputs, scatter_png=reports.result_path(out, method, "_scatter.png"))
    reports.write_result_files(out, method, payload, plots={
        "_scatter.png": lambda path: figures.ac_scatter(table, law, path)})
    return payload
  options = _policy_options()
  with tqdm.tqdm(total=options.trials + options.curve_trials, desc=method, unit="trial",
                 disable=not PROGRESS.value) as bar:
    payload, curves = ac.policy_report(table, options, TABLE.value, progress=bar.update)
  payload.update(inputs, table_md=reports.result_path(out, method, ".md"))
  plots = {}
  if curves is not None:
    payload["curve_png"] = reports.result_path(out, method, "_curve.png")
    plots["_curve.png"] = lambda path: figures.ac_curve(
        payload["curve"]["budgets"], curves, options.k, payload["reference_policy"], path)
  if len(table["names"]) > len(ac.MODELS["AC_quad"]):
    law = ac.fit_law(table["a"], table["c"], table["y"], table["targets"])
    payload["scatter_png"] = reports.result_path(out, method, "_scatter.png")
    plots["_scatter.png"] = lambda path: figures.ac_scatter(table, law, path)
  markdown = reports.ac_policy_markdown(payload, table["targets"], options.k, options.budget)
  reports.write_result_files(out, method, payload, markdown, plots=plots)
  return payload
