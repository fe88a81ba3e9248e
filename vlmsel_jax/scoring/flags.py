"""The metric flags of ``score``: which scores, and the settings of each (GW solver and all).

Defined once, here, at import; ``settings`` turns them into the ``pool.ScoreSettings`` that
``pool.score_pool`` takes.
"""

from __future__ import annotations

from absl import flags

from vlmsel_jax.scoring import pool
from vlmsel_jax.scores import distances
from vlmsel_jax.scores import gw

# Flag defaults are the options records' defaults (gw.options_from_flags maps the flags back).
_ANNEALED, _ENTROPIC, _CG, _LOWRANK = (gw.AnnealedOptions(), gw.EntropicOptions(),
                                       gw.CGOptions(), gw.LowRankOptions())

METRICS = flags.DEFINE_list("metrics", list(pool.DEFAULT_METRICS),
                            f"Scores to compute; any of: {', '.join(pool.METRICS)}.")
DISTANCE = flags.DEFINE_enum("distance", "angular", list(distances.DISTANCES),
                             "Intra-space distance for GW and RSA.")
SCALE = flags.DEFINE_enum("scale", "median", list(distances.SCALES),
                          "Scale alignment of the candidate's distances to the text's (GW).")
GW_SOLVER = flags.DEFINE_enum("gw_solver", _ANNEALED.solver, list(gw.SOLVERS),
                              "GW solver (see vlmsel_jax/scores/gw.py).")
GW_EPSILON = flags.DEFINE_float("gw_epsilon", _ENTROPIC.epsilon,
                                "Entropic ε of the entropic and lowrank solvers, relative to "
                                "unit median distance.", lower_bound=0.0)
GW_ANNEAL_EPSILONS = flags.DEFINE_list(
    "gw_anneal_epsilons", [str(e) for e in _ANNEALED.epsilons],
    "ε schedule of the annealed solver, largest first.")
GW_ANNEAL_ITERATIONS = flags.DEFINE_integer("gw_anneal_iterations", _ANNEALED.stage_iterations,
                                            "Outer GW iterations of each annealing stage but the last.",
                                            lower_bound=1)
GW_SINKHORN_ITERATIONS = flags.DEFINE_integer(
    "gw_sinkhorn_iterations", _ENTROPIC.sinkhorn_iterations,
    "Maximum Sinkhorn iterations per linearized problem of the entropic solver.", lower_bound=1)
GW_ANNEAL_SINKHORN_ITERATIONS = flags.DEFINE_integer(
    "gw_anneal_sinkhorn_iterations", _ANNEALED.sinkhorn_iterations,
    "Sinkhorn iterations per linearized problem of the annealed solver (warm-started; its "
    "coupling only seeds the CG polish).", lower_bound=1)
GW_ITERATIONS = flags.DEFINE_integer("gw_iterations", _ANNEALED.gw_iterations,
                                     "Maximum outer iterations of the entropic solver and of the last annealing stage.",
                                     lower_bound=1)
GW_CG_ITERATIONS = flags.DEFINE_integer("gw_cg_iterations", _CG.iterations,
                                        "Maximum conditional-gradient iterations.", lower_bound=1)
GW_CG_TOL = flags.DEFINE_float("gw_cg_tol", None,
                               "Relative objective decrease below which CG stops (default: "
                               "1e-9 in float64 as POT, 1e-6 in float32).", lower_bound=0.0)
GW_POLISH = flags.DEFINE_bool("gw_polish", _ANNEALED.polish,
                              "CG polish after the entropic / annealed solvers.")
GW_RANK = flags.DEFINE_integer("gw_rank", _LOWRANK.rank, "Coupling rank of the lowrank "
                               "solver.", lower_bound=1)
GW_LOWRANK_ITERATIONS = flags.DEFINE_integer(
    "gw_lowrank_iterations", _LOWRANK.iterations,
    "Maximum outer iterations of the lowrank solver.", lower_bound=1)
GW_LOWRANK_GAMMA = flags.DEFINE_float("gw_lowrank_gamma", _LOWRANK.gamma,
                                      "Mirror-descent step of the lowrank solver.",
                                      lower_bound=0.0)
GW_PRECISION = flags.DEFINE_enum("gw_precision", _ANNEALED.precision, list(gw.PRECISIONS),
                                 "GW arithmetic: auto = float64 for cg, float32 otherwise.")
GW_ORACLE = flags.DEFINE_enum(
    "gw_oracle", _ANNEALED.oracle, list(gw.ORACLES), "Where the CG steps' linear assignments are "
    "solved: host (POT's network simplex, through a callback), device (an auction, no callback), "
    "auto (device on GPU/TPU, host on CPU, where the two are even and the simplex is exact).")
# The flags gw.options_from_flags maps to the solver's options record.
GW_FLAGS = (GW_EPSILON, GW_ANNEAL_EPSILONS, GW_ANNEAL_ITERATIONS, GW_SINKHORN_ITERATIONS,
             GW_ANNEAL_SINKHORN_ITERATIONS, GW_ITERATIONS, GW_CG_ITERATIONS, GW_CG_TOL, GW_POLISH,
             GW_RANK, GW_LOWRANK_ITERATIONS, GW_LOWRANK_GAMMA, GW_PRECISION, GW_ORACLE)
GW_BATCH_SIZE = flags.DEFINE_integer(
    "gw_batch_size", 0, "Candidates per batched (vmapped, device-sharded) GW call; 0 = the "
    "number of devices.", lower_bound=0)
GW_BATCH_MODE = flags.DEFINE_enum(
    "gw_batch_mode", "auto", list(gw.BATCH_MODES), "How a batched GW call runs its candidates on "
    "each device: vmap (lockstep, for accelerators), map (one after another), auto (map on CPU, "
    "vmap elsewhere).")
RBF_SIGMA = flags.DEFINE_float("rbf_sigma", 0.5, "RBF CKA bandwidth: sigma² × median squared "
                               "distance.", lower_bound=0.0)
KNN_K = flags.DEFINE_integer("knn_k", 10, "k of mutual k-NN alignment.", lower_bound=1)
CCA_PCA_VARIANCE = flags.DEFINE_float("cca_pca_variance", 0.99, "Variance kept by the PCA "
                                      "before CCA.", lower_bound=0.0, upper_bound=1.0)
SVCCA_KEEP = flags.DEFINE_float("svcca_keep", 0.99, "Variance kept by SVCCA's SVD step.",
                                lower_bound=0.0, upper_bound=1.0)
GW_BOOTSTRAP = flags.DEFINE_integer(
    "gw_bootstrap", 50, "GW's bootstrap replicates (at most --bootstrap): each one cheap "
    "entropic solve without polish (vlmsel_jax.scoring.uncertainty.GW_REPLICATE_OPTIONS), since "
    "the annealed solver per replicate would cost as much as the whole run per replicate.",
    lower_bound=0)
MINIBATCH_SIZE = flags.DEFINE_integer("minibatch_size", 256, "Batch size of minibatch CKA.",
                                      lower_bound=4)


def settings(seed: int) -> pool.ScoreSettings:
  """The settings the flags give; a bad --gw_* value is a one-line ValueError naming it."""
  try:
    opts = gw.options_from_flags(GW_SOLVER.value, **{f.name: f.value for f in GW_FLAGS})
  except ValueError as e:
    raise ValueError(f"bad GW flag: {e}") from None
  return pool.ScoreSettings(
      distance=DISTANCE.value, scale=SCALE.value, gw_options=opts,
      gw_batch_size=GW_BATCH_SIZE.value, gw_batch_mode=GW_BATCH_MODE.value,
      rbf_sigma=RBF_SIGMA.value, knn_k=KNN_K.value, cca_pca_variance=CCA_PCA_VARIANCE.value,
      svcca_keep=SVCCA_KEEP.value, minibatch_size=MINIBATCH_SIZE.value, seed=seed)
