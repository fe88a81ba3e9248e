"""Key tables from transformers' CLIP / SigLIP / DINOv2 / ViT checkpoints to the NNX ``Vit`` state.

Each entry maps a checkpoint-key regex to (NNX key template, transform); ``\\1`` in a template is
the layer index. The keys are those of the checkpoints on the hub, which are also what
transformers' ``save_pretrained`` writes (it converts its renamed modules back on saving).
Everything a checkpoint holds that the model does not use is listed with ``Transform.SKIP``, so an
unknown key is still an error.
"""

from __future__ import annotations

from vlmsel_jax.models import transforms
from vlmsel_jax.models.transforms import Transform
from vlmsel_jax.models.vit import modeling

Table = transforms.Table
_linear = transforms.linear_keys
_norm = transforms.layer_norm_keys


def _clip_siglip_table(config: modeling.VitConfig) -> Table:
  """CLIP and SigLIP vision towers: ``vision_model.``-prefixed in the hub's checkpoints."""
  if config.contrastive:
    p = r"vision_model\."
  else:
    # Hub CLIPVisionModel / SiglipVisionModel checkpoints keep the ``vision_model.`` prefix;
    # transformers 5's save_pretrained writes them without it.
    p = r"(?:vision_model\.)?"
  layer = p + r"encoder\.layers\.([0-9]+)\."
  table: Table = {
      p + r"embeddings\.patch_embedding\.weight": ("patch_embed.kernel", Transform.CONV),
      p + r"embeddings\.position_embedding\.weight": ("pos_embed", Transform.EMBED),
      # A constant arange(positions) buffer that older checkpoints saved; the model rebuilds it.
      p + r"embeddings\.position_ids": (None, Transform.SKIP),
      **_norm(layer + r"layer_norm1", r"layers.\1.norm1"),
      **_linear(layer + r"self_attn\.q_proj", r"layers.\1.attn.q_proj"),
      **_linear(layer + r"self_attn\.k_proj", r"layers.\1.attn.k_proj"),
      **_linear(layer + r"self_attn\.v_proj", r"layers.\1.attn.v_proj"),
      **_linear(layer + r"self_attn\.out_proj", r"layers.\1.attn.o_proj"),
      **_norm(layer + r"layer_norm2", r"layers.\1.norm2"),
      **_linear(layer + r"mlp\.fc1", r"layers.\1.mlp.fc1"),
      **_linear(layer + r"mlp\.fc2", r"layers.\1.mlp.fc2"),
  }
  if config.variant == "clip":
    table.update({
        p + r"embeddings\.class_embedding": ("cls_token", Transform.EMBED),
        **_norm(p + r"pre_layrnorm", "pre_norm"),
        **_norm(p + r"post_layernorm", "pooled_norm"),
    })
  else:
    table.update({
        p + r"embeddings\.patch_embedding\.bias": ("patch_embed.bias", Transform.BIAS),
        **_norm(p + r"post_layernorm", "final_norm"),
        p + r"head\.probe": ("head.probe", Transform.EMBED),
        p + r"head\.attention\.in_proj_weight": ("head.in_proj.kernel", Transform.LINEAR),
        p + r"head\.attention\.in_proj_bias": ("head.in_proj.bias", Transform.BIAS),
        **_linear(p + r"head\.attention\.out_proj", "head.out_proj"),
        **_norm(p + r"head\.layernorm", "head.norm"),
        **_linear(p + r"head\.mlp\.fc1", "head.mlp.fc1"),
        **_linear(p + r"head\.mlp\.fc2", "head.mlp.fc2"),
    })
  if config.contrastive:
    # The text tower and the contrastive projections / temperature are not part of the vision
    # encoder. Skipped by name, so a stray key elsewhere is still reported.
    table.update({
        r"text_model\..+": (None, Transform.SKIP),
        r"text_projection\.weight": (None, Transform.SKIP),
        r"visual_projection\.weight": (None, Transform.SKIP),
        r"logit_scale": (None, Transform.SKIP),
        r"logit_bias": (None, Transform.SKIP),
    })
  return table


def _dinov2_vit_table(config: modeling.VitConfig) -> Table:
  """DINOv2 (with or without registers) and ViT: the ViT-style ``encoder.layer.N`` naming."""
  layer = r"encoder\.layer\.([0-9]+)\."
  table: Table = {
      r"embeddings\.cls_token": ("cls_token", Transform.EMBED),
      r"embeddings\.position_embeddings": ("pos_embed", Transform.EMBED),
      r"embeddings\.patch_embeddings\.projection\.weight": ("patch_embed.kernel", Transform.CONV),
      r"embeddings\.patch_embeddings\.projection\.bias": ("patch_embed.bias", Transform.BIAS),
      # Masked-image-modelling pre-training replaces masked patches by this token; inference
      # never masks.
      r"embeddings\.mask_token": (None, Transform.SKIP),
      **_linear(layer + r"attention\.attention\.query", r"layers.\1.attn.q_proj"),
      **_linear(layer + r"attention\.attention\.key", r"layers.\1.attn.k_proj"),
      **_linear(layer + r"attention\.attention\.value", r"layers.\1.attn.v_proj"),
      **_linear(layer + r"attention\.output\.dense", r"layers.\1.attn.o_proj"),
      **_norm(r"layernorm", "final_norm"),
  }
  if config.variant == "dinov2":
    table.update({
        r"embeddings\.register_tokens": ("register_tokens", Transform.EMBED),
        **_norm(layer + r"norm1", r"layers.\1.norm1"),
        **_norm(layer + r"norm2", r"layers.\1.norm2"),
        layer + r"layer_scale1\.lambda1": (r"layers.\1.layer_scale1", Transform.SCALE),
        layer + r"layer_scale2\.lambda1": (r"layers.\1.layer_scale2", Transform.SCALE),
        **_linear(layer + r"mlp\.fc1", r"layers.\1.mlp.fc1"),
        **_linear(layer + r"mlp\.fc2", r"layers.\1.mlp.fc2"),
        **_linear(layer + r"mlp\.weights_in", r"layers.\1.mlp.gate_up_proj"),
        **_linear(layer + r"mlp\.weights_out", r"layers.\1.mlp.down_proj"),
    })
  else:
    table.update({
        **_norm(layer + r"layernorm_before", r"layers.\1.norm1"),
        **_norm(layer + r"layernorm_after", r"layers.\1.norm2"),
        **_linear(layer + r"intermediate\.dense", r"layers.\1.mlp.fc1"),
        **_linear(layer + r"output\.dense", r"layers.\1.mlp.fc2"),
        **_linear(r"pooler\.dense", "pooler"),
    })
  return table


def key_table(config: modeling.VitConfig) -> Table:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``."""
  if config.variant in ("clip", "siglip"):
    return _clip_siglip_table(config)
  return _dinov2_vit_table(config)
