"""A synthetic candidate pool with a known right answer, for the demo and the tests.

One shared latent z (n × k) stands for "the content of the images". The text features are a
fixed non-linear view of z. Each candidate encoder sees z through a transformation with a
graded amount of damage — a rotation (harmless to every distance-based score), growing additive
noise, non-linear warps, dropped latent dimensions — so the true order of candidates is known by
construction: less damage = a better candidate. This is not a model of any real encoder; it is a
check that each score recovers an order that is known in advance.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticPool:
  """Candidate features, text features, and the known quality of each candidate."""
  names: list[str]
  candidates: list[np.ndarray]
  text: np.ndarray
  quality: np.ndarray  # Higher is better; the order every score should recover.
  ids: np.ndarray


def _isometric_embedding(rng: np.random.Generator, k: int, width: int) -> np.ndarray:
  """A k × width matrix with orthonormal rows: embeds R^k into R^width preserving distances."""
  q, r = np.linalg.qr(rng.standard_normal((width, k)))
  return (q * np.sign(np.diag(r))).T


def _text_view(rng: np.random.Generator, z: np.ndarray, width: int, warp: float) -> np.ndarray:
  """The text features: z plus a smooth non-linear term, isometrically embedded in R^width."""
  k = z.shape[1]
  w = rng.standard_normal((k, k)) / np.sqrt(k)
  view = z + warp * np.tanh(z @ w)
  return view @ _isometric_embedding(rng, k, width)


# (name, noise std relative to the signal std, latent dims replaced by noise, warp strength);
# ordered by increasing damage.
DEFAULT_SPECS = (
    ("isometric", 0.0, 0, 0.0),
    ("noise_0.3", 0.3, 0, 0.0),
    ("warp_0.5", 0.0, 0, 0.5),
    ("noise_0.6", 0.6, 0, 0.0),
    ("drop_4", 0.0, 4, 0.0),
    ("warp_1.5_noise_0.3", 0.3, 0, 1.5),
    ("noise_1.0", 1.0, 0, 0.0),
    ("drop_8", 0.0, 8, 0.0),
    ("noise_1.5", 1.5, 0, 0.0),
    ("drop_12", 0.0, 12, 0.0),
    ("noise_3.0", 3.0, 0, 0.0),
    ("random", None, 0, 0.0),
)


def make_pool(n: int = 500, latent_dim: int = 16, text_dim: int = 64,
              candidate_dims=(32, 48, 64, 96), specs=DEFAULT_SPECS, text_warp: float = 0.3,
              n_classes: int = 10, seed: int = 0) -> SyntheticPool:
  """Builds the pool. Candidate i has width candidate_dims[i % len(candidate_dims)].

  Every candidate is a distance-preserving embedding of a damaged copy of z: noise (each
  coordinate gets Gaussian noise of std ``noise`` × the latent's std), replacing the last
  ``drop`` latent dimensions by fresh noise, or a smooth warp z + w·sin(zA). Quality is the
  number of candidates a candidate is better than (len(specs) − 1 for the first, 0 for the
  last), so it can serve as non-negative gains for NDCG.
  """
  rng = np.random.default_rng(seed)
  # Content with structure, as real image sets have: a mixture of classes in the latent space.
  centers = 2.0 * rng.standard_normal((n_classes, latent_dim))
  labels = rng.integers(0, n_classes, size=n)
  z = centers[labels] + rng.standard_normal((n, latent_dim))
  text = _text_view(rng, z, text_dim, text_warp)
  names, feats = [], []
  for i, (name, noise, drop, warp) in enumerate(specs):
    width = candidate_dims[i % len(candidate_dims)]
    if noise is None:  # A candidate that sees nothing of the latent.
      f = rng.standard_normal((n, width))
    else:
      zi = z.copy()
      if drop:
        zi[:, latent_dim - drop:] = rng.standard_normal((n, drop))
      if warp:
        a = rng.standard_normal((latent_dim, latent_dim)) / np.sqrt(latent_dim)
        zi = zi + warp * np.sin(2.0 * zi @ a)
      zi = zi + noise * rng.standard_normal(zi.shape)
      f = zi @ _isometric_embedding(rng, latent_dim, width)
    names.append(name)
    feats.append(f.astype(np.float32))
  quality = np.arange(len(specs), 0, -1, dtype=np.float64) - 1.0
  return SyntheticPool(names=names, candidates=feats, text=text.astype(np.float32),
                       quality=quality, ids=np.arange(n))
