"""Shared assertion for parity tests: our model's outputs against a reference's, per tensor."""

from __future__ import annotations

import numpy as np

F32_ATOL = 1e-4


def assert_outputs_match(ours, ref, tol_of=lambda _: F32_ATOL):
  """Asserts every hidden state, last_hidden_state and pooler_output agree within tolerance.

  ``ours`` has attributes hidden_states / last_hidden_state / pooler_output; ``ref`` is a dict
  with the same keys (numpy arrays; pooler_output may be None). ``tol_of(reference_tensor)``
  gives the tolerance for each tensor.
  """
  assert len(ours.hidden_states) == len(ref["hidden_states"])
  named = [(f"hidden_states[{i}]", a, b)
           for i, (a, b) in enumerate(zip(ours.hidden_states, ref["hidden_states"]))]
  named.append(("last_hidden_state", ours.last_hidden_state, ref["last_hidden_state"]))
  if ref["pooler_output"] is None:
    assert ours.pooler_output is None
  else:
    named.append(("pooler_output", ours.pooler_output, ref["pooler_output"]))
  for name, a, b in named:
    a = np.asarray(a, np.float32)
    assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
    err = float(np.abs(a - b).max())
    tol = tol_of(b)
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"
