"""The dataset flags of the binaries that extract feature banks (``extract``, ``score``).

One definition (``flag_util.shared``), and ``paired_dataset()``: what they name, for
``extraction.extract``.
"""

from __future__ import annotations

from absl import flags

from vlmsel_jax.runtime import flag_util

DATA_DIR = flag_util.shared(flags.DEFINE_string, "data_dir", None, "Image folder of the paired "
                            "dataset features are extracted from.")
CAPTIONS = flag_util.shared(flags.DEFINE_string, "captions", None, "Captions file of --data_dir "
                            "(default: <data_dir>/captions.jsonl).")
DATA = flag_util.shared(flags.DEFINE_string, "data", None, "Data spec (vlmsel_jax.data.registry), "
                        "e.g. easy-vqa, folder:DIR; extraction reads easy-vqa and folder: "
                        "sources. Instead of --data_dir.")
DATA_SPLIT = flag_util.shared(flags.DEFINE_string, "data_split", "train", "Split of --data "
                              "(easy-vqa: train or test).")
MAX_SAMPLES = flag_util.shared(flags.DEFINE_integer, "max_samples", 0, "Use at most this many "
                               "samples, drawn with --seed (0: all).", lower_bound=0)


def paired_dataset():
  """The ``PairedDataset`` --data names, or None when --data_dir names the folder.

  Raises:
    ValueError: neither or both are given; DataError: a spec extraction cannot read.
  """
  from vlmsel_jax.data import registry  # pylint: disable=g-import-not-at-top
  if bool(DATA.value) == bool(DATA_DIR.value):
    raise ValueError("give the dataset once: --data=easy-vqa (or folder:DIR), or --data_dir=DIR")
  if not DATA.value:
    return None
  return registry.open_paired_dataset(DATA.value, split=DATA_SPLIT.value)


def describe() -> str:
  """The dataset in a few words, for reports."""
  if DATA.value:
    return f"`{DATA.value}` ({DATA_SPLIT.value} split)"
  return f"`{DATA_DIR.value}`"
