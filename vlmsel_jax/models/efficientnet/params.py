"""Key table from ``efficientnet_lite_pytorch`` state dicts to the NNX ``EfficientNetLite`` state.

Each entry maps a checkpoint-key regex to (NNX key template, transform); ``\\1`` in a template is
the block index, which is the same flat numbering (``_blocks.N``) on both sides. BatchNorm
``num_batches_tracked`` counters never reach the table: the ``.pth`` source drops them.
"""

from __future__ import annotations

from vlmsel_jax.models.efficientnet import modeling
from vlmsel_jax.models.transforms import Transform

Table = dict[str, tuple[str | None, Transform]]


def _batch_norm(prefix: str, target: str) -> Table:
  """The four tensors of one torch ``nn.BatchNorm2d`` -> one inference ``nnx.BatchNorm``."""
  return {
      prefix + r"\.weight": (target + ".scale", Transform.SCALE),
      prefix + r"\.bias": (target + ".bias", Transform.BIAS),
      prefix + r"\.running_mean": (target + ".mean", Transform.STAT),
      prefix + r"\.running_var": (target + ".var", Transform.STAT),
  }


def key_table(config: modeling.EfficientNetConfig) -> Table:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``.

  The table is the same for every variant: the model's shape decides which blocks exist, and a
  block index or expansion conv the model lacks is reported by the loader as unexpected.
  """
  del config  # Every variant uses the same names.
  block = r"_blocks\.([0-9]+)\."
  return {
      r"_conv_stem\.weight": ("stem_conv.kernel", Transform.CONV),
      **_batch_norm(r"_bn0", "stem_bn"),
      block + r"_expand_conv\.weight": (r"blocks.\1.expand_conv.kernel", Transform.CONV),
      **_batch_norm(block + r"_bn0", r"blocks.\1.expand_bn"),
      block + r"_depthwise_conv\.weight": (r"blocks.\1.depthwise_conv.kernel", Transform.CONV),
      **_batch_norm(block + r"_bn1", r"blocks.\1.depthwise_bn"),
      block + r"_project_conv\.weight": (r"blocks.\1.project_conv.kernel", Transform.CONV),
      **_batch_norm(block + r"_bn2", r"blocks.\1.project_bn"),
      r"_conv_head\.weight": ("head_conv.kernel", Transform.CONV),
      **_batch_norm(r"_bn1", "head_bn"),
      r"_fc\.weight": ("fc.kernel", Transform.LINEAR),
      r"_fc\.bias": ("fc.bias", Transform.BIAS),
  }
