"""A loaded model as extraction sees it, and how each family turns a batch into features.

``LoadedModel`` holds an NNX model with what extraction needs next to it: the tokenizer of a text
model, the image preprocessing of a vision model, and ``features``, a jittable function that maps
a batch to one feature vector per sample at a given layer and pooling. ``vit_model``,
``llama_model``, ``bert_model``, ``efficientnet_model`` and ``handcrafted_model`` wrap one family's
module with its feature function, its layers and poolings and its defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from vlmsel_jax.models import bert, efficientnet, handcrafted, vit
from vlmsel_jax.models import convnext
from vlmsel_jax.models import diffusion
from vlmsel_jax.models import qwen2_5_vl
from vlmsel_jax.zoo.preprocessing import ImagePreprocessing, Preprocessing

TEXT_POOLINGS = ("mean", "last")

# features(model, inputs, layer, pooling) -> (batch, dim). Jittable; layer and pooling static.
# Vision inputs: {"pixels": (b, h, w, c) float32 NHWC}. Text inputs: {"input_ids",
# "attention_mask" (real tokens), "pool_mask" (the caption's own tokens)}, all (b, t) int32.
FeatureFn = Callable[[Any, Mapping[str, Any], int, str], Any]


@dataclasses.dataclass
class LoadedModel:
  """A model ready for extraction.

  Attributes:
    name: Short name, also the bank's file name.
    kind: "vision" or "text".
    model: The NNX module.
    features: ``features(model, inputs, layer, pooling)`` → (batch, dim); see ``FeatureFn``.
    num_layers: Valid ``layer`` indices are ``-num_layers .. num_layers - 1``.
    poolings: The poolings ``features`` accepts.
    default_layer: The layer used when none is asked for.
    default_pooling: The pooling used when none is asked for.
    tokenizer: A transformers tokenizer (text models).
    preprocessing: The image preprocessing (vision models): PIL image → (h, w, 3) float32, with
      ``image_size`` and ``to_dict()``.
  """

  name: str
  kind: str
  model: Any
  features: FeatureFn
  num_layers: int
  poolings: tuple[str, ...]
  default_layer: int
  default_pooling: str
  tokenizer: Any = None
  preprocessing: ImagePreprocessing | None = None


def _vit_features(model, inputs, layer, pooling):
  return vit.select_features(model(inputs["pixels"]), layer, pooling)


def pool_tokens(hidden, pool_mask, pooling: str):
  """(b, t, d) hidden states → (b, d): mean over, or last of, the tokens where ``pool_mask``."""
  hidden = hidden.astype(jnp.float32)
  mask = pool_mask.astype(jnp.float32)
  if pooling == "mean":
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  if pooling == "last":
    t = pool_mask.shape[1]
    last = t - 1 - jnp.argmax(pool_mask[:, ::-1], axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f"text pooling {pooling!r} is not one of {', '.join(TEXT_POOLINGS)}")


def _llama_features(model, inputs, layer, pooling):
  out = model(inputs["input_ids"], inputs["attention_mask"])
  return pool_tokens(out.hidden_states[layer], inputs["pool_mask"], pooling)


def _bert_features(model, inputs, layer, pooling):
  if pooling != "mean":
    raise ValueError(f"text pooling {pooling!r} is not available for a BERT encoder; use mean")
  out = model(inputs["input_ids"], inputs["attention_mask"])
  # sentence-transformers' pooling: every real token, [CLS] and [SEP] too, not only the caption's.
  return bert.mean_pool(out.hidden_states[layer].astype(jnp.float32), inputs["attention_mask"])


def _efficientnet_features(model, inputs, layer, pooling):
  return efficientnet.select_features(model(inputs["pixels"]), layer, pooling)


def _handcrafted_features(model, inputs, layer, pooling):
  return handcrafted.select_features(model(inputs["pixels"]), layer, pooling)


def vit_model(name: str, model, preprocessing: Preprocessing) -> LoadedModel:
  """Wraps an NNX ``Vit`` or a tower returning ``VitOutput`` (InternViT, EVA-02): CLS pooling of
  the last layer by default; mean without CLS."""
  config = model.config
  poolings = ("cls", "mean", "pooler") if config.has_class_token else ("mean", "pooler")
  if not getattr(config, "pooler", True):
    # A tower without pooler_output (InternViT, a SigLIP without head) offers no "pooler".
    poolings = tuple(p for p in poolings if p != "pooler")
  return LoadedModel(name=name, kind="vision", model=model, features=_vit_features,
                     num_layers=config.num_layers + 1, poolings=poolings, default_layer=-1,
                     default_pooling=poolings[0], preprocessing=preprocessing)


def llama_model(name: str, model, tokenizer) -> LoadedModel:
  """Wraps a decoder LLM (NNX ``Llama`` or ``Gemma3``): second-to-last hidden state, mean over
  the caption's tokens."""
  return LoadedModel(name=name, kind="text", model=model, features=_llama_features,
                     num_layers=model.config.num_layers + 1, poolings=TEXT_POOLINGS,
                     default_layer=-2, default_pooling="mean", tokenizer=tokenizer)


def bert_model(name: str, model, tokenizer) -> LoadedModel:
  """Wraps an NNX ``Bert``: last hidden state mean-pooled over the attention mask.

  That is sentence-transformers' mean pooling ([CLS] and [SEP] count, padding does not), the
  pooling all-MiniLM-L6-v2 and its kin were trained with; it is the only pooling offered.
  """
  return LoadedModel(name=name, kind="text", model=model, features=_bert_features,
                     num_layers=model.config.num_layers + 1, poolings=("mean",),
                     default_layer=-1, default_pooling="mean", tokenizer=tokenizer)


def efficientnet_model(name: str, model, preprocessing: ImagePreprocessing) -> LoadedModel:
  """Wraps an NNX ``EfficientNetLite``: spatial mean of the final feature map by default.

  Layers index ``EfficientNetOutput.hidden_states``: the seven stage outputs, then the final
  1280-channel map (-1), whose mean feeds the classifier. Poolings: ``mean`` (spatial mean of the
  layer) and ``logits`` (the ImageNet classifier's outputs; layer -1 only).
  """
  return LoadedModel(name=name, kind="vision", model=model, features=_efficientnet_features,
                     num_layers=len(model.config.stages) + 1, poolings=("mean", "logits"),
                     default_layer=-1, default_pooling="mean", preprocessing=preprocessing)


def handcrafted_model(name: str, model, preprocessing: ImagePreprocessing) -> LoadedModel:
  """Wraps a tower without weights (``PixelPatches``, ``Hog``): spatial mean of its last grid by
  default."""
  return LoadedModel(name=name, kind="vision", model=model, features=_handcrafted_features,
                     num_layers=model.num_layers, poolings=("mean",), default_layer=-1,
                     default_pooling="mean", preprocessing=preprocessing)


def _convnext_features(model, inputs, layer, pooling):
  return convnext.select_features(model(inputs["pixels"]), layer, pooling)


def convnext_model(name: str, model, preprocessing: Any) -> LoadedModel:
  """Wraps an NNX ``ConvNext``. Layers index its ``hidden_states``: the stem's map, then each
  stage's (-1: the last stage). Poolings: ``mean`` (spatial mean of the layer; the default, as
  for EfficientNet-Lite, since it holds at every ``@layer=``), ``pooler`` (LayerNorm of the last
  map's mean: what transformers' classifier reads) and, for an OpenCLIP tower, ``embedding``
  (its CLIP image embedding); the last two read no layer.
  """
  poolings = (("mean", "pooler", "embedding") if model.config.projection is not None
              else ("mean", "pooler"))
  return LoadedModel(name=name, kind="vision", model=model, features=_convnext_features,
                     num_layers=model.config.num_stages + 1, poolings=poolings,
                     default_layer=-1, default_pooling="mean", preprocessing=preprocessing)


def _diffusion_features(model, inputs, layer, pooling):
  return diffusion.select_features(model(inputs["pixels"]), layer, pooling)


def diffusion_model(name: str, model, preprocessing: ImagePreprocessing) -> LoadedModel:
  """Wraps a ``diffusion.DiffusionTower``: spatial mean of one feature map (a UNet up block's
  output, a DiT or SD3 joint block's patch grid), by default the tower's ``GRID_DEFAULT_LAYER``
  (DIFT's up block 1; a DiT's or SD3's middle block)."""
  return LoadedModel(name=name, kind="vision", model=model, features=_diffusion_features,
                     num_layers=model.num_layers, poolings=("mean",),
                     default_layer=model.GRID_DEFAULT_LAYER, default_pooling="mean",
                     preprocessing=preprocessing)


def _qwen2_5_vl_features(model, inputs, layer, pooling):
  return qwen2_5_vl.select_features(model(inputs["pixels"]), layer, pooling)


def qwen2_5_vl_model(name: str, model, preprocessing: ImagePreprocessing) -> LoadedModel:
  """Wraps a ``qwen2_5_vl.Qwen25VisionTower``: the mean of one layer's tokens. Layers index its
  ``hidden_states``: the patch embeddings, every block's output, then the merger's output (-1,
  the default: the tokens the Qwen2.5-VL language model reads). It has no CLS token nor pooler.
  """
  return LoadedModel(name=name, kind="vision", model=model, features=_qwen2_5_vl_features,
                     num_layers=model.config.num_layers + 2, poolings=("mean",),
                     default_layer=model.GRID_DEFAULT_LAYER, default_pooling="mean",
                     preprocessing=preprocessing)
