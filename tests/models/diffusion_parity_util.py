"""Shared pieces of the diffusion parity tests (SD UNet, DiT, SD3 MMDiT): random torch weights,
layout conversions, the tolerance check and the test images."""

from __future__ import annotations

import numpy as np
import torch

# Max abs error ≤ RTOL × max |reference|, float32 on both sides.
RTOL = 1e-4
BATCH = 2


def randomise(model, seed: int):
  """Every parameter random: weights ~ N(0, 1 / fan_in), norm scales ~ 1 + N(0, 0.2²), biases
  and the rest of the vectors ~ N(0, 0.1²)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2:
        p.copy_(noise / p[0].numel() ** 0.5)
      elif name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.1 * noise)
  return model.eval()


def nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def assert_close(ours, ref, name: str, rtol: float = RTOL):
  ours = np.asarray(ours, np.float32)
  assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
  err = float(np.abs(ours - ref).max())
  scale = float(np.abs(ref).max())
  assert err <= rtol * scale, f"{name}: max abs error {err:.3g} > {rtol} * {scale:.3g}"


def images(size: int, seed: int = 1) -> np.ndarray:
  """(BATCH, size, size, 3) NHWC images in [-1, 1]."""
  return np.random.RandomState(seed).uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32)
