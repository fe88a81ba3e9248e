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


def randomise_torch_cnn(model, seed: int = 0):
  """Gives every weight and BatchNorm statistic of a torch CNN a random value; returns it in eval.

  Default init leaves BN at scale 1, bias 0, mean 0, var 1, which would hide a swapped or
  missing statistic. Conv weights are scaled by 1/sqrt(fan-in) to keep activations O(1).
  """
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(1.0 + 0.2 * torch.randn(c, generator=gen))
        module.bias.copy_(0.1 * torch.randn(c, generator=gen))
        module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
        module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
      elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
        w = module.weight
        fan_in = w[0].numel()
        w.copy_(torch.randn(w.shape, generator=gen) / fan_in ** 0.5)
        if module.bias is not None:
          module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
  return model.eval()


def decoder_inputs(batch=2, seq=7, vocab=128):
  """Token ids and a padding mask for decoder-LM parity: row 0 right-padded by 2, row 1
  left-padded by 2."""
  ids = np.random.RandomState(1).randint(0, vocab, size=(batch, seq)).astype(np.int32)
  mask = np.ones((batch, seq), np.int32)
  mask[0, -2:] = 0
  mask[1, :2] = 0
  return ids, mask


def torch_decoder_outputs(model, ids, mask=None):
  """(hidden states, logits) of a transformers torch causal LM, as float32 numpy arrays."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model(torch.tensor(ids, dtype=torch.long),
                attention_mask=None if mask is None else torch.tensor(mask, dtype=torch.long),
                output_hidden_states=True)
  return [h.float().numpy() for h in out.hidden_states], out.logits.float().numpy()
