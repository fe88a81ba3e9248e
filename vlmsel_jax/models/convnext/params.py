"""Key tables from transformers' ConvNeXt and OpenCLIP's ConvNeXt CLIP checkpoints to the NNX
``ConvNext`` state.

Each entry maps a checkpoint-key regex to (NNX key template, transform); ``\\1`` in a template is
the stage index, ``\\2`` the block index, numbered alike on both sides. Everything a checkpoint
holds that the encoder does not use (the ImageNet classifier, OpenCLIP's text tower and
temperature) is listed with ``Transform.SKIP``, so an unknown key is still an error.
"""

from __future__ import annotations

from vlmsel_jax.models import transforms
from vlmsel_jax.models.convnext import modeling
from vlmsel_jax.models.transforms import Transform

Table = transforms.Table
_linear = transforms.linear_keys
_norm = transforms.layer_norm_keys


def _block(prefix: str, dwconv: str, norm: str, fc1: str, fc2: str, gamma: str) -> Table:
  """One block's tensors, named by the checkpoint's module names."""
  target = r"stages.\1.blocks.\2."
  return {
      prefix + dwconv + r"\.weight": (target + "dwconv.kernel", Transform.CONV),
      prefix + dwconv + r"\.bias": (target + "dwconv_bias", Transform.BIAS),
      **_norm(prefix + norm, target + "norm"),
      **_linear(prefix + fc1, target + "fc1"),
      **_linear(prefix + fc2, target + "fc2"),
      prefix + gamma: (target + "gamma", Transform.SCALE),
  }


def _transformers_table() -> Table:
  """``ConvNextModel`` keys; ``ConvNextForImageClassification`` prefixes them ``convnext.``."""
  p = r"(?:convnext\.)?"
  stage = p + r"encoder\.stages\.([0-9]+)\."
  return {
      p + r"embeddings\.patch_embeddings\.weight": ("stem_conv.kernel", Transform.CONV),
      p + r"embeddings\.patch_embeddings\.bias": ("stem_conv.bias", Transform.BIAS),
      **_norm(p + r"embeddings\.layernorm", "stem_norm"),
      **_norm(stage + r"downsampling_layer\.0", r"stages.\1.downsample_norm"),
      stage + r"downsampling_layer\.1\.weight": (r"stages.\1.downsample_conv.kernel",
                                                 Transform.CONV),
      stage + r"downsampling_layer\.1\.bias": (r"stages.\1.downsample_conv.bias", Transform.BIAS),
      **_block(stage + r"layers\.([0-9]+)\.", r"dwconv", r"layernorm", r"pwconv1", r"pwconv2",
               r"layer_scale_parameter"),
      **_norm(p + r"layernorm", "final_norm"),
      # The ImageNet classifier of ConvNextForImageClassification: not part of the encoder.
      r"classifier\.(?:weight|bias)": (None, Transform.SKIP),
  }


def _open_clip_table() -> Table:
  """A whole OpenCLIP model's keys: ``visual.trunk.`` (timm ConvNeXt), ``visual.head.``, and the
  text tower, which is skipped by name (both of OpenCLIP's text layouts)."""
  trunk = r"visual\.trunk\."
  stage = trunk + r"stages\.([0-9]+)\."
  return {
      trunk + r"stem\.0\.weight": ("stem_conv.kernel", Transform.CONV),
      trunk + r"stem\.0\.bias": ("stem_conv.bias", Transform.BIAS),
      **_norm(trunk + r"stem\.1", "stem_norm"),
      **_norm(stage + r"downsample\.0", r"stages.\1.downsample_norm"),
      stage + r"downsample\.1\.weight": (r"stages.\1.downsample_conv.kernel", Transform.CONV),
      stage + r"downsample\.1\.bias": (r"stages.\1.downsample_conv.bias", Transform.BIAS),
      **_block(stage + r"blocks\.([0-9]+)\.", r"conv_dw", r"norm", r"mlp\.fc1", r"mlp\.fc2",
               r"gamma"),
      **_norm(trunk + r"head\.norm", "final_norm"),
      # TimmModel's head: "linear" is head.proj, "mlp" timm's Mlp (fc1, GELU, fc2).
      **_linear(r"visual\.head\.proj", "head.proj"),
      **_linear(r"visual\.head\.mlp\.fc1", "head.fc1"),
      **_linear(r"visual\.head\.mlp\.fc2", "head.proj"),
      # The text tower: CLIP's own (token_embedding, transformer, ln_final, ...) or
      # CustomTextCLIP's (text.*), and the contrastive temperature / bias.
      r"text\..+": (None, Transform.SKIP),
      r"(?:token_embedding|transformer|ln_final)\..+": (None, Transform.SKIP),
      r"positional_embedding|text_projection|logit_scale|logit_bias": (None, Transform.SKIP),
  }


def key_table(config: modeling.ConvNextConfig) -> Table:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``'s format."""
  if config.weights_format == "open_clip":
    return _open_clip_table()
  return _transformers_table()
