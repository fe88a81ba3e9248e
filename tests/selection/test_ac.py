"""AC law and AC policy: fits vs scikit-learn / NumPy, samplers vs their definitions, the policy
replay, and ``select --method=ac_law / ac_policy`` end to end (through absl, in a subprocess).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import BayesianRidge, LinearRegression, Ridge
from sklearn.preprocessing import PolynomialFeatures

from vlmsel_jax.selection import ac
from vlmsel_jax.selection import tables

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "configs", "data", "ac_example_15.csv")
TARGETS = ["mmbench", "mme", "okvqa", "seed_bench", "mmmu", "textvqa", "vizwiz", "scienceqa"]


def make_table(seed: int, n: int = 15, t: int = 6, noise: float = 0.3):
  """A constructed table: (A, C) spread like real settings, targets a noisy degree-2 law."""
  rng = np.random.default_rng(seed)
  a = rng.uniform(-2.7, -1.7, n)
  c = rng.uniform(20, 60, n)
  an, cn = ac.minmax(a), ac.minmax(c)
  ys = []
  for _ in range(t):
    w = rng.normal(size=5) * [1, 1, 0.5, 0.5, 0.5] + [0.8, 0.5, -0.2, 0.4, -0.1]
    clean = w[0] * an + w[1] * cn + w[2] * an ** 2 + w[3] * an * cn + w[4] * cn ** 2
    ys.append(50 + 5 * (clean + noise * np.std(clean) * rng.normal(size=n)))
  return a, c, np.stack(ys, 1)


def _poly(a, c):
  return PolynomialFeatures(2).fit_transform(np.stack([a, c], 1))


# ---------------------------------------------------------------------------------------------
# Fits.


def test_law_r2_matches_sklearn_and_lstsq_on_15_settings():
  a, c, y = make_table(0, n=15, t=4)
  targets = [f"t{j}" for j in range(4)]
  law = ac.fit_law(a, c, y, targets)
  poly = _poly(a, c)
  for j in range(4):
    lr = LinearRegression().fit(poly, y[:, j])
    want = lr.score(poly, y[:, j])
    assert abs(law.r2["AC_quad"][j] - want) <= 1e-9
    w = np.linalg.lstsq(poly, y[:, j], rcond=None)[0]  # Intercept as the bias column.
    resid = y[:, j] - poly @ w
    want_np = 1 - resid @ resid / np.sum((y[:, j] - y[:, j].mean()) ** 2)
    assert abs(law.r2["AC_quad"][j] - want_np) <= 1e-9
    coefs = law.coefficient_dict()[f"t{j}"]
    # PolynomialFeatures order: 1, a, c, a^2, a c, c^2.
    np.testing.assert_allclose([coefs[k] for k in ("1", "A", "C", "A^2", "AC", "C^2")], w,
                               rtol=1e-7, atol=1e-7)
  # The comparison models use their own feature sets.
  for model, cols in (("AC_linear", [1, 2]), ("A_quad", [1, 3]), ("C_quad", [2, 5])):
    for j in range(4):
      lr = LinearRegression().fit(poly[:, cols], y[:, j])
      assert abs(law.r2[model][j] - lr.score(poly[:, cols], y[:, j])) <= 1e-9


def test_law_on_the_shipped_table():
  table = tables.read_settings(EXAMPLE, "A", "C", TARGETS)
  law = ac.fit_law(table["a"], table["c"], table["y"], TARGETS)
  poly = _poly(table["a"], table["c"])
  want = np.mean([LinearRegression().fit(poly, table["y"][:, j]).score(poly, table["y"][:, j])
                  for j in range(len(TARGETS))])
  assert abs(law.r2["AC_quad"].mean() - want) <= 1e-9
  # The quadratic AC fit beats every comparison model on average, as the law says.
  mean = {m: law.r2[m].mean() for m in ac.MODELS}
  assert mean["AC_quad"] > max(mean["AC_linear"], mean["A_quad"], mean["C_quad"])


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 9])
def test_ols_matches_sklearn_when_underdetermined(n):
  a, c, y = make_table(n, n=15, t=3)
  rng = np.random.default_rng(n)
  rows = rng.choice(15, n, replace=False)
  poly = _poly(a, c)
  f = ac.fit_ols(ac.features(a[rows], c[rows]), y[rows])
  for j in range(3):
    lr = LinearRegression().fit(poly[rows], y[rows, j])
    np.testing.assert_allclose(f.coef[:, j], lr.coef_[1:], rtol=1e-9, atol=1e-9)
    assert abs(f.intercept[j] - lr.intercept_) <= 1e-9 * max(1, abs(lr.intercept_))
    np.testing.assert_allclose(f.predict(ac.features(a, c))[:, j], lr.predict(poly),
                               rtol=1e-9, atol=1e-9)
  # Minimum norm: the centred solution is orthogonal to the null space of the centred design.
  if n < 6:
    x = ac.features(a[rows], c[rows])
    xc = x - x.mean(0)
    _, s, vh = np.linalg.svd(xc)
    null = vh[(s > 1e-6 * s[0]).sum():]
    np.testing.assert_allclose(null @ f.coef, 0, atol=1e-8)


def test_ridge_and_bayesian_match_sklearn():
  a, c, y = make_table(7, n=15, t=2)
  x = ac.features(ac.minmax(a), ac.minmax(c))
  for n in (15, 8, 4, 3):
    rows = np.arange(n)
    fr = ac.fit_ridge(x[rows], y[rows], 0.05)
    fb = ac.fit_bayesian(x[rows], y[rows])
    for j in range(2):
      r = Ridge(alpha=0.05).fit(x[rows], y[rows, j])
      np.testing.assert_allclose(fr.coef[:, j], r.coef_, rtol=1e-8, atol=1e-10)
      assert fr.intercept[j] == pytest.approx(r.intercept_, rel=1e-10)
      b = BayesianRidge().fit(x[rows], y[rows, j])
      mean, std = b.predict(x, return_std=True)
      # Fixed-point iterations on slightly different float paths: agreement to ~1e-8.
      np.testing.assert_allclose(fb.predict(x)[:, j], mean, rtol=1e-8, atol=1e-6)
      np.testing.assert_allclose(fb.predict_std(x)[:, j], std, rtol=1e-6)
      assert fb.noise_precision[j] == pytest.approx(b.alpha_, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Samplers.


def test_region_sampler_follows_its_definition():
  # Normalised positions: quadrants of level 1 hold {0, 1}, {2}, {3, 4, 5}; the fourth is empty.
  a = np.array([0.0, 0.2, 0.9, 0.6, 0.7, 1.0])
  c = np.array([0.1, 0.3, 0.2, 0.6, 0.9, 1.0])
  counts = np.zeros((3, 6))
  for s in range(3000):
    order = ac.sample_region(a, c, 4, np.random.default_rng(s))
    first3 = order[:3]
    quads = {(a[i] >= 0.5, c[i] >= 0.5) for i in first3}
    assert len(quads) == 3  # One per non-empty level-1 cell before any cell repeats.
    cells2 = ac._cells(a, c, 2)  # pylint: disable=protected-access
    assert cells2[order[3]] not in {cells2[i] for i in first3}
    for pos in range(3):
      counts[pos, order[pos]] += 1
  # First pick: a uniform cell, then a uniform member: 1/3 * (1/2, 1/2, 1, 1/3, 1/3, 1/3).
  want = np.array([1 / 6, 1 / 6, 1 / 3, 1 / 9, 1 / 9, 1 / 9])
  np.testing.assert_allclose(counts[0] / 3000, want, atol=0.03)


def test_region_sampler_exhausts_levels_and_rejects_duplicates():
  a, c, _ = make_table(1)
  order = ac.sample_region(ac.minmax(a), ac.minmax(c), 15, np.random.default_rng(0))
  assert sorted(order) == list(range(15))
  with pytest.raises(ac.ACError, match="identical"):
    ac.sample_region(np.array([0.0, 0.5, 0.5]), np.array([0.0, 0.5, 0.5]), 3,
                     np.random.default_rng(0))
  with pytest.raises(ac.ACError, match="duplicate settings s1 and s2"):
    ac.check_settings([1, 2, 2], [3, 4, 4], ["s0", "s1", "s2"])


def test_dopt_is_a_local_optimum_and_random_has_no_repeats():
  a, c, _ = make_table(2, n=10)
  an, cn = ac.minmax(a), ac.minmax(c)
  x = np.concatenate([np.ones((10, 1)), ac.features(an, cn)], 1)
  logdet = lambda rows: np.linalg.slogdet(x[rows].T @ x[rows] + 1e-6 * np.eye(6))[1]
  for budget in (3, 4, 7):
    chosen = list(ac.sample_dopt(an, cn, budget, np.random.default_rng(budget)))
    assert len(set(chosen)) == budget
    best = logdet(chosen)
    for pos, cand in itertools.product(range(budget), range(10)):
      if cand not in chosen:
        swapped = chosen.copy()
        swapped[pos] = cand
        assert logdet(swapped) <= best + 1e-9
    if budget == 3:  # Small enough to check against every design.
      assert best >= max(logdet(list(s)) for s in itertools.combinations(range(10), 3)) - 0.5
  r = ac.sample_random(an, cn, 7, np.random.default_rng(0))
  assert len(set(r.tolist())) == 7


def test_active_sampler_picks_the_ucb_of_sklearn_bayesian_ridge():
  a, c, y = make_table(3)
  an, cn = ac.minmax(a), ac.minmax(c)
  x = ac.features(an, cn)
  order = ac.sample_active(an, cn, 7, np.random.default_rng(5), y[:, 0])
  seeds = ac.sample_region(an, cn, ac.ACTIVE_SEED_POINTS, np.random.default_rng(5))
  np.testing.assert_array_equal(order[:len(seeds)], seeds)
  chosen = list(seeds)
  while len(chosen) < 7:
    b = BayesianRidge().fit(x[chosen], y[chosen, 0])
    mean, std = b.predict(x, return_std=True)
    ucb = mean + ac.ACTIVE_BETA * std
    ucb[chosen] = -np.inf
    chosen.append(int(np.argmax(ucb)))
  np.testing.assert_array_equal(order, chosen)


# ---------------------------------------------------------------------------------------------
# Replay.


def test_replay_baselines_and_full_budget():
  a, c, y = make_table(4)
  pol = [ac.Policy("region", "ols"), ac.Policy("random", "ridge")]
  r = ac.replay(a, c, y, pol, budgets=[4, 15], k=3, trials=400, seed=1)
  # A random 4 of 15 contains the (unique) best with probability 4/15; binomial SE ~ 0.022.
  np.testing.assert_allclose(r["random_choice"][0], 4 / 15, atol=0.07)
  np.testing.assert_array_equal(r["random_choice"][1], 1.0)
  # Budget = everything: the fit is the full OLS fit, whatever the sampler.
  full = ac.fit_ols(ac.features(a, c), y).predict(ac.features(a, c))
  want = [float(np.argmax(y[:, j]) in np.argsort(-full[:, j], kind="stable")[:3])
          for j in range(y.shape[1])]
  np.testing.assert_array_equal(r["region+ols"][1], want)
  measured = ac.replay(a, c, y, pol, budgets=[15], k=1, trials=3, rank_trained="measured")
  np.testing.assert_array_equal(measured["region+ols"][0], 1.0)


def test_a_better_policy_beats_the_reference_at_budget_4():
  """Acceptance: Recall@3 at budget 4 of 15 — region sampler + ridge fit, and the active
  sampler + ridge fit, beat the reference (region + OLS) on the shipped table and on three
  other constructed tables."""
  table = tables.read_settings(EXAMPLE, "A", "C", TARGETS)
  settings = [(table["a"], table["c"], table["y"])] + [make_table(s) for s in (10, 11, 12)]
  pol = [ac.Policy("region", "ols"), ac.Policy("region", "ridge"), ac.Policy("active", "ridge")]
  for a, c, y in settings:
    r = ac.replay(a, c, y, pol, budgets=[4], k=3, trials=150, seed=0)
    ref = r["region+ols"].mean()
    assert r["region+ridge"].mean() > ref + 0.02
    assert r["active+ridge"].mean() > ref + 0.01


# ---------------------------------------------------------------------------------------------
# Tables and the binary.


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_read_table_errors(tmp_path):
  good = "# comment\nsetting,A,C,t1\ns1,1,2,3\ns2,2,3,4\n"
  t = tables.read_settings(_write(tmp_path / "g.csv", good), "A", "C", [])
  assert t["targets"] == ["t1"] and t["names"] == ["s1", "s2"]
  cases = {
      "setting,A,C,t1\ns1,1,2,3\n": ("missing column(s) t2", ["t1", "t2"]),
      "setting,A,C,t1\ns1,1,x,3\n": (r"m.csv:2: column 'C' holds 'x', not a finite number", []),
      "setting,A,C,t1\ns1,1,2,3\ns2,1,2,5\n": ("duplicate settings s1 (line 2) and s2 (line 3)",
                                               []),
      "setting,A,C,t1\ns1,1,2,3\ns1,3,2,5\n": ("m.csv:3: duplicate setting 's1'", []),
      "setting,A,C,t1\ns1,1,2\n": ("m.csv:2: 3 fields, the header has 4", []),
      "setting,A,C,t1\ns1,1,2,\n": ("column 't1' holds ''", []),
  }
  for text, (message, targets) in cases.items():
    with pytest.raises(ac.TableError) as e:
      tables.read_settings(_write(tmp_path / "m.csv", text), "A", "C", targets)
    assert message in str(e.value), (text, str(e.value))
  with pytest.raises(ac.TableError, match="no such file"):
    tables.read_settings(str(tmp_path / "none.csv"), "A", "C", [])
  with pytest.raises(ac.TableError, match="not among the targets"):
    tables.parse_groups("g:t1,zz", ["t1"])
  assert tables.parse_groups("v:a,b; o:c", ["a", "b", "c"]) == {"v": ["a", "b"], "o": ["c"]}
  with pytest.raises(ac.ACError, match="needs at least 7 settings"):
    ac.fit_law(np.arange(6.0), np.arange(6.0) ** 1.5, np.ones((6, 1)) * np.arange(6)[:, None],
               ["t"])


def _select(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "vlmsel_jax.select", *args], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=300)


def _table_csv(path, a, c, y, names=None):
  names = names or [f"s{i}" for i in range(len(a))]
  lines = ["setting,A,C," + ",".join(f"t{j}" for j in range(y.shape[1]))]
  lines += [f"{n},{float(ai)!r},{float(ci)!r}," + ",".join(repr(float(v)) for v in row)
            for n, ai, ci, row in zip(names, a, c, y)]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_select_ac_law_and_policy_end_to_end(tmp_path):
  a, c, y = make_table(20, n=15, t=4)
  table = _table_csv(tmp_path / "t.csv", a, c, y)
  out = tmp_path / "law" / "ac_law.json"
  proc = _select("--method=ac_law", f"--table={table}", "--a_column=A", "--c_column=C",
                 "--targets=t0,t1,t2,t3", "--groups=g1:t0,t1;g2:t2,t3",
                 f"--output_dir={tmp_path / 'law'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  law = json.loads(out.read_text())
  poly = _poly(a, c)
  want = {f"t{j}": LinearRegression().fit(poly, y[:, j]).score(poly, y[:, j]) for j in range(4)}
  for t, v in want.items():
    assert abs(law["r2"][t] - v) <= 1e-9
  assert abs(law["mean_r2"] - np.mean(list(want.values()))) <= 1e-9
  assert set(law["r2_by_model"]) == {"AC_quad", "AC_linear", "A_quad", "C_quad"}
  assert law["mean_r2_by_group"]["g1"] == pytest.approx((want["t0"] + want["t1"]) / 2, abs=1e-12)
  assert set(law["coefficients"]["t0"]) == {"1", "A", "C", "A^2", "AC", "C^2"}
  assert (tmp_path / "law" / "ac_law_scatter.png").read_bytes()[:4] == b"\x89PNG"

  out = tmp_path / "pol" / "ac_policy.json"
  proc = _select("--method=ac_policy", f"--table={table}", "--targets=t0,t1,t2,t3",
                 "--budget=4", "--k=3", "--trials=40", "--curve_trials=5", "--seed=0",
                 "--sampler=region,random,dopt,active", "--fit=ols,ridge,bayesian",
                 "--noac_progress", f"--output_dir={tmp_path / 'pol'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  pol = json.loads(out.read_text())
  assert pol["reference_policy"] == "region+ols" and len(pol["policies"]) == 12
  assert pol["recall_at_k"] == pol["policies"]["region+ols"]["recall_at_k"]
  # The same numbers as the library replay with the same seed.
  lib = ac.replay(a, c, y, [ac.Policy("region", "ols")], budgets=[4], k=3, trials=40, seed=0)
  np.testing.assert_allclose([pol["recall_at_k"][f"t{j}"] for j in range(4)],
                             lib["region+ols"][0], atol=1e-12)
  np.testing.assert_allclose([pol["random_recall_at_k"][f"t{j}"] for j in range(4)],
                             lib["random_choice"][0], atol=1e-12)
  assert len(pol["curve"]["budgets"]) == 15
  for name in ("ac_policy_curve.png", "ac_policy_scatter.png"):
    assert (tmp_path / "pol" / name).read_bytes()[:4] == b"\x89PNG"
  assert "| region+ols |" in (tmp_path / "pol" / "ac_policy.md").read_text()


def test_select_errors_are_one_line(tmp_path):
  a, c, y = make_table(21, n=5, t=1)
  few = _table_csv(tmp_path / "few.csv", a, c, y)
  proc = _select("--method=ac_law", f"--table={few}", "--targets=t0",
                 f"--output_dir={tmp_path / 'o'}")
  assert proc.returncode == 1
  assert "5 settings: the degree-2 AC fit has 6 parameters" in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "o" / "ac_law.json").exists()
  a, c, y = make_table(22, n=8, t=1)
  a[5], c[5] = a[2], c[2]
  dup = _table_csv(tmp_path / "dup.csv", a, c, y)
  proc = _select("--method=ac_policy", f"--table={dup}", "--targets=t0", "--trials=2",
                 f"--output_dir={tmp_path / 'o'}")
  assert proc.returncode == 1
  assert "duplicate settings s2 (line 4) and s5 (line 7)" in proc.stderr
  proc = _select("--method=ac_law", f"--table={dup}", "--targets=t0,nope",
                 f"--output_dir={tmp_path / 'o'}")
  assert proc.returncode == 1 and "missing column(s) nope" in proc.stderr
