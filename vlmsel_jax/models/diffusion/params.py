"""Key tables from diffusers' ``diffusion_pytorch_model.safetensors`` to the NNX modules.

The NNX modules keep diffusers' module names, so most keys map to themselves with torch's
``weight`` renamed (``kernel`` of a linear or conv layer, ``scale`` of a norm); the renames are
``downsamplers.0`` → ``downsampler``, ``upsamplers.0`` → ``upsampler``, ``to_out.0`` → ``to_out``,
``ff.net.0.proj`` → ``ff.proj_in`` and ``ff.net.2`` → ``ff.proj_out``. ``\\1`` in a template is
the module path the pattern captured. Tensors of the parts not built (the VAE decoder, the
UNet's, DiT's and MMDiT's output heads) are listed with ``Transform.SKIP``, so an unknown key is
still an error.
"""

from __future__ import annotations

from vlmsel_jax.models import transforms
from vlmsel_jax.models.diffusion import dit as dit_lib
from vlmsel_jax.models.diffusion import mmdit as mmdit_lib
from vlmsel_jax.models.diffusion import unet as unet_lib
from vlmsel_jax.models.diffusion import vae as vae_lib
from vlmsel_jax.models.transforms import Transform

Table = transforms.Table
_linear = transforms.linear_keys
_norm = transforms.layer_norm_keys


def _conv(prefix: str, target: str) -> Table:
  """weight and bias of one torch ``nn.Conv2d`` -> kernel and bias of one ``nnx.Conv``."""
  return {
      prefix + r"\.weight": (target + ".kernel", Transform.CONV),
      prefix + r"\.bias": (target + ".bias", Transform.BIAS),
  }


def _resnets(block: str) -> Table:
  """Every ``ResnetBlock2D`` under ``block`` (a regex capturing the module path)."""
  p = block + r"\.resnets\.[0-9]+)"
  return {
      **_norm(p + r"\.norm1", r"\1.norm1"),
      **_norm(p + r"\.norm2", r"\1.norm2"),
      **_conv(p + r"\.conv1", r"\1.conv1"),
      **_conv(p + r"\.conv2", r"\1.conv2"),
      **_conv(p + r"\.conv_shortcut", r"\1.conv_shortcut"),
      **_linear(p + r"\.time_emb_proj", r"\1.time_emb_proj"),
  }


def _attention(p: str) -> Table:
  """One ``Attention`` at ``p`` (a regex capturing the module path): q, k, v, out."""
  return {
      **_linear(p + r"\.to_q", r"\1.to_q"),
      **_linear(p + r"\.to_k", r"\1.to_k"),
      **_linear(p + r"\.to_v", r"\1.to_v"),
      **_linear(p + r"\.to_out\.0", r"\1.to_out"),
  }


def _feed_forward(p: str) -> Table:
  """One ``FeedForward`` at ``p``: ``net.0.proj`` and ``net.2``."""
  return {
      **_linear(p + r"\.net\.0\.proj", r"\1.proj_in"),
      **_linear(p + r"\.net\.2", r"\1.proj_out"),
  }


def _transformers(block: str, use_linear_projection: bool) -> Table:
  """Every ``Transformer2DModel`` under ``block`` and its ``BasicTransformerBlock`` s."""
  p = block + r"\.attentions\.[0-9]+)"
  proj = _linear if use_linear_projection else _conv
  t = block + r"\.attentions\.[0-9]+\.transformer_blocks\.[0-9]+"
  return {
      **_norm(p + r"\.norm", r"\1.norm"),
      **proj(p + r"\.proj_in", r"\1.proj_in"),
      **proj(p + r"\.proj_out", r"\1.proj_out"),
      **_norm(t + r"\.norm([123]))", r"\1"),
      **_attention(t + r"\.attn[12])"),
      **_feed_forward(t + r"\.ff)"),
  }


def vae_key_table(config: vae_lib.VaeConfig) -> Table:
  """``AutoencoderKL`` checkpoint keys → ``VaeEncoder``; the decoder's are skipped.

  The mid block's attention is read under both names diffusers has used: ``to_q`` / ``to_k`` /
  ``to_v`` / ``to_out.0`` (current) and ``query`` / ``key`` / ``value`` / ``proj_attn`` (older
  SD 1.x conversions, which diffusers renames on loading).
  """
  del config  # The model's shape decides which keys exist; extra ones are reported.
  e = r"encoder\."
  attn = e + r"(mid_block\.attentions\.0)"
  return {
      **_conv(e + r"conv_in", "conv_in"),
      **_resnets(e + r"(down_blocks\.[0-9]+"),
      **_resnets(e + r"(mid_block"),
      **_conv(e + r"(down_blocks\.[0-9]+)\.downsamplers\.0\.conv", r"\1.downsampler.conv"),
      **_norm(attn + r"\.group_norm", r"\1.group_norm"),
      **_attention(attn),
      **_linear(attn + r"\.query", r"\1.to_q"),
      **_linear(attn + r"\.key", r"\1.to_k"),
      **_linear(attn + r"\.value", r"\1.to_v"),
      **_linear(attn + r"\.proj_attn", r"\1.to_out"),
      **_norm(e + r"conv_norm_out", "conv_norm_out"),
      **_conv(e + r"conv_out", "conv_out"),
      **_conv(r"quant_conv", "quant_conv"),
      # The decoder half: images are only encoded here.
      r"decoder\..+": (None, Transform.SKIP),
      r"post_quant_conv\..+": (None, Transform.SKIP),
  }


def unet_key_table(config: unet_lib.UNetConfig) -> Table:
  """``UNet2DConditionModel`` checkpoint keys → ``UNet2DCondition``.

  ``conv_norm_out`` / ``conv_out`` (the noise prediction after the last up block) are skipped:
  the features end at the up blocks.
  """
  blocks = r"((?:down_blocks|up_blocks)\.[0-9]+"
  return {
      **_conv(r"conv_in", "conv_in"),
      **_linear(r"time_embedding\.linear_1", "time_embedding.linear_1"),
      **_linear(r"time_embedding\.linear_2", "time_embedding.linear_2"),
      **_linear(r"add_embedding\.linear_1", "add_embedding.linear_1"),
      **_linear(r"add_embedding\.linear_2", "add_embedding.linear_2"),
      **_resnets(blocks),
      **_resnets(r"(mid_block"),
      **_transformers(blocks, config.use_linear_projection),
      **_transformers(r"(mid_block", config.use_linear_projection),
      **_conv(r"(down_blocks\.[0-9]+)\.downsamplers\.0\.conv", r"\1.downsampler.conv"),
      **_conv(r"(up_blocks\.[0-9]+)\.upsamplers\.0\.conv", r"\1.upsampler.conv"),
      r"conv_norm_out\.(?:weight|bias)": (None, Transform.SKIP),
      r"conv_out\.(?:weight|bias)": (None, Transform.SKIP),
  }


def dit_key_table(config: dit_lib.DiTConfig) -> Table:
  """``DiTTransformer2DModel`` checkpoint keys → ``DiT``.

  ``proj_out_1`` / ``proj_out_2`` (the final adaLN and the unpatchify projection of the noise
  prediction) are skipped: the features end at the transformer blocks.
  """
  del config
  b = r"(transformer_blocks\.[0-9]+)"
  return {
      **_conv(r"pos_embed\.proj", "pos_embed.proj"),
      **_linear(b + r"\.norm1\.emb\.timestep_embedder\.linear_1",
                r"\1.norm1.timestep_embedder.linear_1"),
      **_linear(b + r"\.norm1\.emb\.timestep_embedder\.linear_2",
                r"\1.norm1.timestep_embedder.linear_2"),
      b + r"\.norm1\.emb\.class_embedder\.embedding_table\.weight": (
          r"\1.norm1.class_embedding", Transform.EMBED),
      **_linear(b + r"\.norm1\.linear", r"\1.norm1.linear"),
      **_attention(r"(transformer_blocks\.[0-9]+\.attn1)"),
      **_feed_forward(r"(transformer_blocks\.[0-9]+\.ff)"),
      r"proj_out_[12]\.(?:weight|bias)": (None, Transform.SKIP),
  }


def mmdit_key_table(config: mmdit_lib.MMDiTConfig) -> Table:
  """``SD3Transformer2DModel`` checkpoint keys → ``MMDiT``.

  The stored position table (``pos_embed.pos_embed``, a persistent buffer when
  ``pos_embed_max_size`` is set) is read as is. RMSNorm weights become ``scale``. ``norm_out`` /
  ``proj_out`` (the final adaLN and the unpatchify projection of the velocity prediction) are
  skipped: the features end at the joint blocks.
  """
  del config  # The model's shape decides which keys exist; extra ones are reported.
  b = r"(transformer_blocks\.[0-9]+)"
  attn = r"(transformer_blocks\.[0-9]+\.attn2?)"
  return {
      **_conv(r"pos_embed\.proj", "pos_embed.proj"),
      r"pos_embed\.pos_embed": ("pos_embed.pos_embed", Transform.EMBED),
      **_linear(r"time_text_embed\.(timestep_embedder|text_embedder)\.(linear_[12])",
                r"time_text_embed.\1.\2"),
      **_linear(r"context_embedder", "context_embedder"),
      **_linear(b + r"\.(norm1|norm1_context)\.linear", r"\1.\2.linear"),
      **_attention(attn),
      **_linear(attn + r"\.(add_[qkv]_proj|to_add_out)", r"\1.\2"),
      attn + r"\.(norm_q|norm_k|norm_added_q|norm_added_k)\.weight": (r"\1.\2.scale",
                                                                    Transform.SCALE),
      **_feed_forward(r"(transformer_blocks\.[0-9]+\.ff(?:_context)?)"),
      r"(?:norm_out\.linear|proj_out)\.(?:weight|bias)": (None, Transform.SKIP),
  }
