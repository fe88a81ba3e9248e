"""Sample photographs bundled with scikit-image and scikit-learn, as paired records.

No download: scikit-image ships a set of photos (``skimage.data``) and scikit-learn two JPEGs
(``sklearn.datasets.load_sample_images``: china, flower). Each record's caption is the photo's
name in words ("hubble deep field"); grayscale photos come as three equal channels. Synthetic
test images (colour wheel, logo, binary blobs, the horse silhouette) and photos that
scikit-image would download are left out. scikit-learn is a test-only dependency, so its photos
are read straight from its installed files and need it installed.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

import numpy as np

from vlmsel_jax.data import records
from vlmsel_jax.data.records import DataError

# skimage.data functions that return bundled photographs (no download), in a fixed order.
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "clock", "coffee", "coins",
                  "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
                  "microaneurysms", "moon", "page", "retina", "rocket", "text")
SKLEARN_PHOTOS = ("china", "flower")
COLLECTIONS = ("skimage", "sklearn")


def _sklearn_images_dir() -> str:
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("photos: the scikit-learn sample photos need scikit-learn installed "
                    "(pip install scikit-learn), or use only the scikit-image ones "
                    "(spec photos:skimage)")
  return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "images")


class PhotosSource:
  """The bundled photos of ``collections`` as paired records (caption: the photo's name)."""

  def __init__(self, collections: Sequence[str] = COLLECTIONS):
    unknown = [c for c in collections if c not in COLLECTIONS]
    if unknown or not collections:
      raise DataError(f"photos: collections are {', '.join(COLLECTIONS)}, got "
                      f"{list(collections)}")
    self.name = "photos" if tuple(collections) == COLLECTIONS else "photos-" + "-".join(
        collections)
    self._entries: list[tuple[str, str, str]] = []  # (collection, name, file or function)
    if "skimage" in collections:
      self._entries += [("skimage", n, n) for n in SKIMAGE_PHOTOS]
    if "sklearn" in collections:
      folder = _sklearn_images_dir()
      for n in SKLEARN_PHOTOS:
        path = os.path.join(folder, f"{n}.jpg")
        if not os.path.isfile(path):
          raise DataError(f"{path}: scikit-learn sample photo {n!r} not found")
        self._entries.append(("sklearn", n, path))

  @property
  def bad_records(self) -> records.BadRecords:
    return records.BadRecords()

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> dict[str, Any]:
    collection, name, where = self._entries[index]
    if collection == "skimage":
      import skimage.data  # pylint: disable=g-import-not-at-top
      image = records.to_rgb(np.asarray(getattr(skimage.data, where)()))
    else:
      image = records.decode_image(where, f"photo {name!r}")
    return {"id": f"{collection}/{name}", "image": image, "caption": name.replace("_", " ")}


def load(collections: Sequence[str] = COLLECTIONS) -> PhotosSource:
  return PhotosSource(collections)
