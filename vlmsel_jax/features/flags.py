"""The dataset flags of the binaries that extract feature banks (``extract``, ``score``).

One definition (``flag_util.shared``), and ``source()``: the ``extraction.DataSource`` they
name.
"""

from __future__ import annotations

from absl import flags

from vlmsel_jax.features import extraction
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


def source() -> extraction.DataSource:
  """The dataset the flags name (``--data`` or ``--data_dir``), unopened."""
  return extraction.DataSource(data=DATA.value, data_split=DATA_SPLIT.value,
                               data_dir=DATA_DIR.value, captions=CAPTIONS.value)
