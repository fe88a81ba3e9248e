"""The AC law and AC policy of the Law of Vision Representation (METHODS §4), in NumPy.

*AC law.* A benchmark score y of a VLM built on a vision setting is fitted as a degree-2
polynomial of that setting's A score (cross-modal alignment) and C score (correspondence):
``y ≈ w0 + w1 A + w2 C + w3 A² + w4 AC + w5 C²``, by ordinary least squares over the settings;
``fit_law`` reports the in-sample R² and the coefficients, and the same for the comparison
models ``AC_linear`` (1, A, C), ``A_quad`` (1, A, A²) and ``C_quad`` (1, C, C²).

*AC policy.* With only ``budget`` settings fully trained, fit the law on those and rank all
settings by its prediction; Recall@k = how often the true best lands in the top k, over random
trials (``replay``). Samplers (which settings to train):

* ``region`` — the reference: min-max normalise A and C to [0, 1]; at level j = 1, 2, ... split
  the square into 2^j x 2^j cells, drop empty cells and cells that already hold a sampled
  setting, pick a random remaining cell, then a random setting in it; when a level has no cell
  left, go to the next level.
* ``random`` — uniform, without replacement.
* ``dopt`` — D-optimal design over the six polynomial features of the normalised (A, C):
  maximise ``log det(XᵀX + 1e-6 I)`` by Fedorov exchange (swap a chosen and an unchosen setting
  while the determinant grows) from a random start, so trials explore different local optima.
* ``active`` — sequential: the first ``ACTIVE_SEED_POINTS`` settings as ``region`` picks them,
  then repeatedly the untrained setting with the highest upper confidence bound
  ``mean + ACTIVE_BETA · std`` of a Bayesian ridge fit (below) to the settings trained so far.
  It is the only sampler that looks at the measured scores.

Fits (how the law is fitted to the trained settings):

* ``ols`` — scikit-learn ``LinearRegression`` semantics (the reference): centre features and
  targets, least squares by ``scipy.linalg.lstsq`` with singular values below ``OLS_RCOND`` times
  the largest cut off, i.e. the minimum-norm solution when fewer than 6 settings are trained;
  intercept = mean(y) - mean(x)·w.
* ``ridge`` — scikit-learn ``Ridge`` semantics: centred, ``(XᵀX + alpha I) w = Xᵀy``.
* ``bayesian`` — scikit-learn ``BayesianRidge`` semantics: Gaussian prior and noise, their
  precisions set by evidence maximisation (MacKay's fixed point, Gamma(1e-6, 1e-6) hyper-priors),
  with a predictive standard deviation.

Features for the fits: ``raw`` polynomial features of (A, C) as given, or ``normalized`` ones
(A and C min-max scaled over *all* settings, which are known before any training). The choice
matters only when the system is underdetermined (the minimum-norm solution depends on scale) and
for ridge / Bayesian shrinkage; OLS defaults to ``raw`` (what ``PolynomialFeatures(2)`` on the
table's columns gives), ridge and Bayesian always use ``normalized``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import scipy.linalg

from vlmsel_jax.scoring import metrics

# Feature sets of the law and its comparison models; "1" is the intercept.
MODELS: dict[str, tuple[str, ...]] = {
    "AC_quad": ("1", "A", "C", "A^2", "AC", "C^2"),
    "AC_linear": ("1", "A", "C"),
    "A_quad": ("1", "A", "A^2"),
    "C_quad": ("1", "C", "C^2"),
}
SAMPLERS = ("region", "random", "dopt", "active")
FITS = ("ols", "ridge", "bayesian")
RANK_TRAINED = ("prediction", "measured")
FIT_INPUTS = ("raw", "normalized")
REFERENCE_POLICY = "region+ols"

OLS_RCOND = 1e-6  # scikit-learn LinearRegression's default tol, passed to lstsq as cond.
RIDGE_ALPHA = 1e-2
DOPT_JITTER = 1e-6
ACTIVE_SEED_POINTS = 2
ACTIVE_BETA = 1.0
MAX_REGION_LEVEL = 52  # 2^52 cells per side resolves any two distinct float64 values in [0, 1].


class ACError(ValueError):
  """Inputs the AC fits cannot use; the message says which."""


class TableError(ValueError):
  """A settings table or option the AC methods cannot use; the message names the file, column,
  line or flag."""


# ---------------------------------------------------------------------------------------------
# Features and fits.


def features(a, c, model: str = "AC_quad") -> np.ndarray:
  """(n, p) polynomial features of ``model`` *without* the intercept column ("1")."""
  a = np.asarray(a, np.float64)
  c = np.asarray(c, np.float64)
  columns = {"A": a, "C": c, "A^2": a * a, "AC": a * c, "C^2": c * c}
  return np.stack([columns[t] for t in MODELS[model][1:]], axis=1)


def minmax(x) -> np.ndarray:
  """``x`` scaled to [0, 1] (a constant vector becomes zeros)."""
  x = np.asarray(x, np.float64)
  span = x.max() - x.min()
  return (x - x.min()) / span if span > 0 else np.zeros_like(x)


@dataclasses.dataclass(frozen=True)
class LinearFit:
  """``y ≈ intercept + x @ coef`` per target column; ``sigma``/``noise`` for Bayesian fits.

  Attributes:
    intercept: (T,).
    coef: (p, T).
    x_mean: (p,) the training features' mean (what ``sigma`` is centred on).
    sigma: (T, p, p) posterior covariance of ``coef`` (Bayesian fits), else None.
    noise_precision: (T,) the fitted noise precision alpha (Bayesian fits), else None.
  """

  intercept: np.ndarray
  coef: np.ndarray
  x_mean: np.ndarray
  sigma: np.ndarray | None = None
  noise_precision: np.ndarray | None = None

  def predict(self, x: np.ndarray) -> np.ndarray:
    """(n, p) features → (n, T) predictions."""
    return self.intercept[None, :] + x @ self.coef

  def predict_std(self, x: np.ndarray) -> np.ndarray:
    """(n, T) predictive standard deviations (noise included), as BayesianRidge's return_std."""
    if self.sigma is None:
      raise ValueError("only Bayesian fits have a predictive standard deviation")
    xc = x - self.x_mean
    var = np.einsum("np,tpq,nq->nt", xc, self.sigma, xc)
    return np.sqrt(var + 1.0 / self.noise_precision[None, :])


def _as_2d(y) -> np.ndarray:
  y = np.asarray(y, np.float64)
  return y[:, None] if y.ndim == 1 else y


def fit_ols(x, y) -> LinearFit:
  """scikit-learn ``LinearRegression()`` on (n, p) ``x`` and (n,) or (n, T) ``y``.

  Centres both, then ``scipy.linalg.lstsq(cond=OLS_RCOND)``: the minimum-norm least-squares
  solution, whatever the rank (fewer samples than features included).
  """
  x = np.asarray(x, np.float64)
  y = _as_2d(y)
  x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
  coef = scipy.linalg.lstsq(x - x_mean, y - y_mean, cond=OLS_RCOND)[0]
  return LinearFit(intercept=y_mean - x_mean @ coef, coef=coef, x_mean=x_mean)


def fit_ridge(x, y, alpha: float = RIDGE_ALPHA) -> LinearFit:
  """scikit-learn ``Ridge(alpha)``: centred, ``(XᵀX + alpha I) w = Xᵀy``, intercept unpenalised."""
  x = np.asarray(x, np.float64)
  y = _as_2d(y)
  x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
  xc = x - x_mean
  coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - y_mean))
  return LinearFit(intercept=y_mean - x_mean @ coef, coef=coef, x_mean=x_mean)


def fit_bayesian(x, y, *, max_iter: int = 300, tol: float = 1e-3, alpha_1: float = 1e-6,
                 alpha_2: float = 1e-6, lambda_1: float = 1e-6,
                 lambda_2: float = 1e-6) -> LinearFit:
  """scikit-learn ``BayesianRidge()`` (its defaults), every target column at once.

  Evidence maximisation over the noise precision alpha and the weight precision lambda by
  MacKay's fixed-point updates on the centred data, iterated until the coefficients move less
  than ``tol`` (L1), then the posterior mean and covariance at the final precisions.
  """
  x = np.asarray(x, np.float64)
  y = _as_2d(y)
  n, p = x.shape
  x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
  xc, yc = x - x_mean, y - y_mean
  _, s, vh = np.linalg.svd(xc, full_matrices=False)
  eig = s ** 2
  # In the eigenbasis of XᵀX (the columns of vh.T, zero-padded when n < p) every update is
  # elementwise. Padding eigenvalues are 0: the prior alone governs those directions.
  if vh.shape[0] < p:
    basis = scipy.linalg.null_space(vh) if vh.shape[0] else np.eye(p)
    vh = np.concatenate([vh, basis.T], axis=0)
    eig = np.concatenate([eig, np.zeros(p - len(eig))])
  proj = vh @ (xc.T @ yc)  # (p, T)
  t = y.shape[1]
  eps = np.finfo(np.float64).eps
  alpha = 1.0 / (np.var(y, axis=0) + eps)
  lam = np.ones(t)
  coef_old = None
  done = np.zeros(t, bool)

  def coef_for(alpha, lam):
    return vh.T @ (proj / (eig[:, None] + lam[None, :] / alpha[None, :]))

  for _ in range(max_iter):
    coef = coef_for(alpha, lam)
    rmse = np.sum((yc - xc @ coef) ** 2, axis=0)
    gamma = np.sum(alpha[None, :] * eig[:, None] / (lam[None, :] + alpha[None, :] * eig[:, None]),
                   axis=0)
    active = ~done
    # BayesianRidge updates the precisions, then tests convergence; a target that converged
    # keeps the precisions of that last update.
    lam = np.where(active, (gamma + 2 * lambda_1) / (np.sum(coef ** 2, axis=0) + 2 * lambda_2),
                   lam)
    alpha = np.where(active, (n - gamma + 2 * alpha_1) / (rmse + 2 * alpha_2), alpha)
    if coef_old is not None:
      done |= active & (np.sum(np.abs(coef_old - coef), axis=0) < tol)
    coef_old = coef if coef_old is None else np.where(active[None, :], coef, coef_old)
    if done.all():
      break
  coef = coef_for(alpha, lam)
  scaled = 1.0 / (eig[None, :] + lam[:, None] / alpha[:, None])  # (T, p)
  sigma = np.einsum("ip,ti,iq->tpq", vh, scaled, vh) / alpha[:, None, None]
  return LinearFit(intercept=y_mean - x_mean @ coef, coef=coef, x_mean=x_mean, sigma=sigma,
                   noise_precision=alpha)


def fit(x, y, method: str = "ols", ridge_alpha: float = RIDGE_ALPHA) -> LinearFit:
  if method == "ols":
    return fit_ols(x, y)
  if method == "ridge":
    return fit_ridge(x, y, ridge_alpha)
  if method == "bayesian":
    return fit_bayesian(x, y)
  raise ACError(f"fit {method!r} is not one of {', '.join(FITS)}")


def r2_score(y, pred) -> np.ndarray:
  """In-sample R² = 1 - SS_res / SS_tot per column."""
  y, pred = _as_2d(y), _as_2d(pred)
  ss_res = np.sum((y - pred) ** 2, axis=0)
  ss_tot = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
  return 1.0 - ss_res / ss_tot


@dataclasses.dataclass(frozen=True)
class LawFit:
  """``fit_law``'s result: per model, per target R² and (for every model) the coefficients."""

  targets: tuple[str, ...]
  r2: dict[str, np.ndarray]  # model -> (T,)
  coefficients: dict[str, np.ndarray]  # model -> (p + 1, T), intercept first.

  def coefficient_dict(self, model: str = "AC_quad") -> dict[str, dict[str, float]]:
    terms = MODELS[model]
    return {t: {term: float(self.coefficients[model][i, j]) for i, term in enumerate(terms)}
            for j, t in enumerate(self.targets)}


def fit_law(a, c, y, targets: Sequence[str]) -> LawFit:
  """OLS of every target on each model's features of the raw (A, C), with in-sample R².

  Raises:
    ACError: too few settings for the 6-term fit (at least 7 are needed: with 6 every fit is
      exact and R² is 1 by construction), or a constant target (R² undefined).
  """
  y = _as_2d(y)
  n = y.shape[0]
  if n <= len(MODELS["AC_quad"]):
    raise ACError(f"{n} settings: the degree-2 AC fit has {len(MODELS['AC_quad'])} parameters "
                  f"and needs at least {len(MODELS['AC_quad']) + 1} settings")
  constant = [t for j, t in enumerate(targets) if np.ptp(y[:, j]) == 0]
  if constant:
    raise ACError(f"target(s) {', '.join(constant)} are constant over the settings: R² is "
                  "undefined")
  r2, coefs = {}, {}
  for model in MODELS:
    x = features(a, c, model)
    f = fit_ols(x, y)
    r2[model] = r2_score(y, f.predict(x))
    coefs[model] = np.concatenate([f.intercept[None, :], f.coef], axis=0)
  return LawFit(targets=tuple(targets), r2=r2, coefficients=coefs)


# ---------------------------------------------------------------------------------------------
# Samplers. Each returns the indices of the settings to train, in the order chosen.


def _cells(a: np.ndarray, c: np.ndarray, level: int) -> list[tuple[int, int]]:
  """The (A cell, C cell) of every setting on the 2^level x 2^level grid; 1.0 is in the last."""
  n = 2 ** level
  ia = np.minimum(np.floor(a * n), n - 1).astype(np.int64)
  ic = np.minimum(np.floor(c * n), n - 1).astype(np.int64)
  return list(zip(ia.tolist(), ic.tolist()))


def sample_region(a_norm: np.ndarray, c_norm: np.ndarray, budget: int,
                  rng: np.random.Generator) -> np.ndarray:
  """The reference region sampler (module docstring) on min-max normalised A and C."""
  k = len(a_norm)
  budget = min(budget, k)
  chosen: list[int] = []
  level = 1
  while len(chosen) < budget:
    if level > MAX_REGION_LEVEL:
      raise ACError("the region sampler cannot separate settings with identical (A, C)")
    cells = _cells(a_norm, c_norm, level)
    held = {cells[i] for i in chosen}
    free = sorted(set(cells) - held)
    if not free:
      level += 1
      continue
    cell = free[rng.integers(len(free))]
    members = [i for i in range(k) if cells[i] == cell]
    chosen.append(members[rng.integers(len(members))])
  return np.asarray(chosen, np.int64)


def sample_random(a_norm: np.ndarray, c_norm: np.ndarray, budget: int,
                  rng: np.random.Generator) -> np.ndarray:
  return rng.permutation(len(a_norm))[:budget].astype(np.int64)


def _logdet(x: np.ndarray) -> float:
  m = x.T @ x + DOPT_JITTER * np.eye(x.shape[1])
  return float(np.linalg.slogdet(m)[1])


def sample_dopt(a_norm: np.ndarray, c_norm: np.ndarray, budget: int,
                rng: np.random.Generator) -> np.ndarray:
  """Fedorov-exchange D-optimal design over [1, A, C, A², AC, C²] from a random start."""
  k = len(a_norm)
  budget = min(budget, k)
  x = np.concatenate([np.ones((k, 1)), features(a_norm, c_norm)], axis=1)
  chosen = list(rng.permutation(k)[:budget])
  best = _logdet(x[chosen])
  improved = True
  while improved:
    improved = False
    for pos in range(budget):
      for cand in rng.permutation(k):
        if cand in chosen:
          continue
        trial = chosen.copy()
        trial[pos] = cand
        value = _logdet(x[trial])
        if value > best + 1e-10:
          chosen, best, improved = trial, value, True
  return np.asarray(chosen, np.int64)


def sample_active(a_norm: np.ndarray, c_norm: np.ndarray, budget: int,
                  rng: np.random.Generator, y: np.ndarray,
                  cache: dict | None = None) -> np.ndarray:
  """Region-sampled seed points, then UCB picks of a Bayesian ridge fit (module docstring).

  After the seed points the choice is deterministic (UCB ties go to the lowest index), so a
  ``cache`` dict may memoise whole sequences by their seed points; pass one per target.
  """
  k = len(a_norm)
  budget = min(budget, k)
  seeds = tuple(int(i) for i in sample_region(a_norm, c_norm, min(ACTIVE_SEED_POINTS, budget),
                                              rng))
  key = (seeds, budget)
  if cache is not None and key in cache:
    return cache[key]
  chosen = list(seeds)
  x = features(a_norm, c_norm)
  y = np.asarray(y, np.float64)
  while len(chosen) < budget:
    f = fit_bayesian(x[chosen], y[chosen])
    ucb = (f.predict(x) + ACTIVE_BETA * f.predict_std(x))[:, 0]
    ucb[chosen] = -np.inf
    chosen.append(int(np.argmax(ucb)))
  out = np.asarray(chosen, np.int64)
  if cache is not None:
    cache[key] = out
  return out


# Samplers whose first b picks do not depend on the budget: a budget curve takes prefixes.
NESTED = {"region": True, "random": True, "dopt": False, "active": True}


def sample(name: str, a_norm, c_norm, budget: int, rng: np.random.Generator,
           y: np.ndarray | None = None, cache: dict | None = None) -> np.ndarray:
  if name == "region":
    return sample_region(a_norm, c_norm, budget, rng)
  if name == "random":
    return sample_random(a_norm, c_norm, budget, rng)
  if name == "dopt":
    return sample_dopt(a_norm, c_norm, budget, rng)
  if name == "active":
    if y is None:
      raise ValueError("the active sampler needs the target's measured values")
    return sample_active(a_norm, c_norm, budget, rng, y, cache)
  raise ACError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}")


# ---------------------------------------------------------------------------------------------
# Policy replay.


@dataclasses.dataclass(frozen=True)
class Policy:
  sampler: str
  fit: str

  @property
  def name(self) -> str:
    return f"{self.sampler}+{self.fit}"


def rank_scores(a, c, y, chosen: np.ndarray, fit_method: str, *, fit_inputs: str = "raw",
                rank_trained: str = "prediction", ridge_alpha: float = RIDGE_ALPHA) -> np.ndarray:
  """(k, T) ranking scores: the law fitted on the ``chosen`` settings, predicted for all.

  With ``rank_trained="measured"`` the chosen settings carry their measured values instead.
  """
  y = _as_2d(y)
  if fit_method == "ols" and fit_inputs == "raw":
    x = features(a, c)
  else:
    x = features(minmax(a), minmax(c))
  f = fit(x[chosen], y[chosen], fit_method, ridge_alpha)
  scores = f.predict(x)
  if rank_trained == "measured":
    scores[chosen] = y[chosen]
  elif rank_trained != "prediction":
    raise ACError(f"rank_trained {rank_trained!r} is not one of {', '.join(RANK_TRAINED)}")
  return scores


def _recall(y: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
  return np.array([metrics.recall_at_k(y[:, j], scores[:, j], k) for j in range(y.shape[1])])


def replay(a, c, y, policies: Sequence[Policy], *, budgets: Sequence[int], k: int = 3,
           trials: int = 1000, seed: int = 0, fit_inputs: str = "raw",
           rank_trained: str = "prediction", ridge_alpha: float = RIDGE_ALPHA,
           progress: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
  """Recall@k of each policy at each budget, averaged over ``trials`` random trials.

  Trial ``i`` of every policy draws from ``default_rng([seed, i, 0])`` (a non-nested sampler at
  budget ``b``: ``[seed, i, 2 + b]``; the random-choice baseline: ``[seed, i, 1]``), so policies
  are compared on the same random streams and any single cell of the result is reproducible.

  Returns:
    policy name -> (len(budgets), T) mean Recall@k; also "random_choice" -> (len(budgets), T):
    how often a uniformly random set of ``budget`` settings contains the true best.
  """
  a = np.asarray(a, np.float64)
  c = np.asarray(c, np.float64)
  y = _as_2d(y)
  n, t = y.shape
  budgets = [int(b) for b in budgets]
  if not budgets or min(budgets) < 1 or max(budgets) > n:
    raise ACError(f"budgets {budgets} must lie in 1 .. {n} (the number of settings)")
  a_norm, c_norm = minmax(a), minmax(c)
  best = y == y.max(axis=0, keepdims=True)
  out = {p.name: np.zeros((len(budgets), t)) for p in policies}
  out["random_choice"] = np.zeros((len(budgets), t))
  caches = [{} for _ in range(t)]  # Active sequences per target (see sample_active).
  memo: dict = {}  # The fit depends on the set of trained settings, not on their order.

  def recall_of(fit_method: str, chosen: np.ndarray, j: int | None) -> np.ndarray:
    key = (fit_method, frozenset(chosen.tolist()), j)
    if key not in memo:
      cols = slice(None) if j is None else slice(j, j + 1)
      scores = rank_scores(a, c, y[:, cols], chosen, fit_method, fit_inputs=fit_inputs,
                           rank_trained=rank_trained, ridge_alpha=ridge_alpha)
      memo[key] = _recall(y[:, cols], scores, k)
    return memo[key]

  for trial in range(trials):
    for p in policies:
      rng = np.random.default_rng([seed, trial, 0])
      per_target = p.sampler == "active"
      if NESTED[p.sampler]:
        top = max(budgets)
        if per_target:
          orders = [sample(p.sampler, a_norm, c_norm, top,
                           np.random.default_rng([seed, trial, 0]), y[:, j], caches[j])
                    for j in range(t)]
        else:
          orders = [sample(p.sampler, a_norm, c_norm, top, rng)] * t
      for bi, b in enumerate(budgets):
        if not NESTED[p.sampler]:
          rng_b = np.random.default_rng([seed, trial, 2 + b])
          orders = [sample(p.sampler, a_norm, c_norm, b, rng_b)] * t
        if per_target:
          for j in range(t):
            out[p.name][bi, j] += recall_of(p.fit, orders[j][:b], j)[0]
        else:
          out[p.name][bi] += recall_of(p.fit, orders[0][:b], None)
    rng = np.random.default_rng([seed, trial, 1])
    perm = rng.permutation(n)
    for bi, b in enumerate(budgets):
      out["random_choice"][bi] += best[perm[:b]].any(axis=0)
    if progress is not None:
      progress()
  return {name: v / trials for name, v in out.items()}


def check_settings(a, c, names: Sequence[str] | None = None) -> None:
  """Raises ``ACError`` naming two settings with identical (A, C), or a non-finite value."""
  a = np.asarray(a, np.float64)
  c = np.asarray(c, np.float64)
  names = list(names) if names is not None else [str(i) for i in range(len(a))]
  bad = np.flatnonzero(~(np.isfinite(a) & np.isfinite(c)))
  if bad.size:
    raise ACError(f"setting {names[bad[0]]}: A or C is not finite")
  seen: dict[tuple[float, float], int] = {}
  for i, key in enumerate(zip(a.tolist(), c.tolist())):
    if key in seen:
      raise ACError(f"duplicate settings {names[seen[key]]} and {names[i]}: both have "
                    f"A={key[0]:g}, C={key[1]:g}")
    seen[key] = i


# ---------------------------------------------------------------------------------------------
# Reports: what ``select --method=ac_law`` / ``ac_policy`` write, from a settings table
# (``tables.read_settings``).


def law_report(table: Mapping[str, Any], groups: Mapping[str, Sequence[str]], source: str
               ) -> tuple[dict[str, Any], LawFit]:
  """The AC law on ``table`` (read from ``source``): R² and coefficients per target and model,
  and the mean R² of each group of targets."""
  targets = table["targets"]
  try:
    law = fit_law(table["a"], table["c"], table["y"], targets)
  except ACError as e:
    raise TableError(f"{source}: {e}") from None
  r2 = law.r2["AC_quad"]
  payload: dict[str, Any] = {
      "r2": {t: float(v) for t, v in zip(targets, r2)},
      "mean_r2": float(r2.mean()),
      "coefficients": law.coefficient_dict("AC_quad"),
      "terms": list(MODELS["AC_quad"]),
      "r2_by_model": {m: {t: float(v) for t, v in zip(targets, law.r2[m])} for m in MODELS},
      "mean_r2_by_model": {m: float(law.r2[m].mean()) for m in MODELS},
      "coefficients_by_model": {m: law.coefficient_dict(m) for m in MODELS},
      "settings": len(table["names"]),
  }
  if groups:
    index = {t: j for j, t in enumerate(targets)}
    payload["groups"] = {g: list(cols) for g, cols in groups.items()}
    payload["mean_r2_by_group"] = {
        g: float(np.mean([r2[index[t]] for t in cols])) for g, cols in groups.items()}
    payload["mean_r2_by_group_by_model"] = {
        m: {g: float(np.mean([law.r2[m][index[t]] for t in cols])) for g, cols in groups.items()}
        for m in MODELS}
  return payload, law


@dataclasses.dataclass(frozen=True)
class PolicyOptions:
  """How ``policy_report`` replays the policies: every sampler with every fit, ``trials`` times
  at ``budget`` (and ``curve_trials`` times at every budget for the Recall@k curve; 0: none)."""

  budget: int = 4
  k: int = 3
  trials: int = 1000
  seed: int = 0
  samplers: tuple[str, ...] = SAMPLERS
  fits: tuple[str, ...] = FITS
  rank_trained: str = "prediction"
  fit_inputs: str = "raw"
  ridge_alpha: float = RIDGE_ALPHA
  curve_trials: int = 200

  def check(self, n: int, source: str) -> None:
    """Raises ``TableError`` for options that cannot run on ``n`` settings."""
    bad = ([s for s in self.samplers if s not in SAMPLERS] +
           [f for f in self.fits if f not in FITS])
    if bad:
      raise TableError(f"unknown sampler / fit {', '.join(bad)}: samplers are "
                       f"{', '.join(SAMPLERS)}, fits {', '.join(FITS)}")
    if not self.samplers or not self.fits:
      raise TableError("--sampler and --fit must name at least one each")
    if n < 2:
      raise TableError(f"{source}: {n} setting(s); a policy needs at least 2")
    if self.budget >= n:
      raise TableError(f"--budget={self.budget} trains every one of the {n} settings; use fewer")
    if not 1 <= self.k < n:
      raise TableError(f"--k={self.k} must be at least 1 and below the {n} settings")


def policy_report(table: Mapping[str, Any], options: PolicyOptions, source: str,
                  progress: Callable[[], None] | None = None
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
  """Replays every policy on ``table`` (read from ``source``); returns the JSON payload and the
  Recall@k-vs-budget curves (``replay``'s result over budgets 1..n; None without
  ``curve_trials``). ``progress`` is called once per trial."""
  n = len(table["names"])
  o = options
  o.check(n, source)
  policies = [Policy(s, f) for s in o.samplers for f in o.fits]
  common = dict(k=o.k, seed=o.seed, fit_inputs=o.fit_inputs, rank_trained=o.rank_trained,
                ridge_alpha=o.ridge_alpha, progress=progress)
  main = replay(table["a"], table["c"], table["y"], policies, budgets=[o.budget],
                trials=o.trials, **common)
  curves = None
  if o.curve_trials:
    curves = replay(table["a"], table["c"], table["y"], policies,
                    budgets=list(range(1, n + 1)), trials=o.curve_trials, **common)
  targets = table["targets"]
  per_policy = {}
  for p in policies:
    values = main[p.name][0]
    per_policy[p.name] = {
        "sampler": p.sampler, "fit": p.fit,
        "recall_at_k": {t: float(v) for t, v in zip(targets, values)},
        "mean_recall_at_k": float(values.mean())}
    if curves is not None:
      per_policy[p.name]["curve_mean_recall_at_k"] = [float(v) for v in curves[p.name].mean(1)]
  reference = REFERENCE_POLICY if REFERENCE_POLICY in per_policy else policies[0].name
  rnd = main["random_choice"][0]
  payload = {
      "recall_at_k": per_policy[reference]["recall_at_k"],
      "mean_recall_at_k": per_policy[reference]["mean_recall_at_k"],
      "random_recall_at_k": {t: float(v) for t, v in zip(targets, rnd)},
      "mean_random_recall_at_k": float(rnd.mean()),
      "reference_policy": reference,
      "policies": per_policy,
      "best_policy": max(per_policy, key=lambda name: per_policy[name]["mean_recall_at_k"]),
      "budget": o.budget, "k": o.k, "trials": o.trials, "seed": o.seed,
      "rank_trained": o.rank_trained, "fit_inputs": o.fit_inputs, "ridge_alpha": o.ridge_alpha,
      "settings": n,
  }
  if curves is not None:
    payload["curve"] = {"budgets": list(range(1, n + 1)), "trials": o.curve_trials,
                        "random_choice": [float(v) for v in curves["random_choice"].mean(1)]}
  return payload, curves
