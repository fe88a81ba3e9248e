"""BERT-style text encoders (BERT, MiniLM, sentence-transformers) in Flax NNX."""

from vlmsel_jax.models.bert.modeling import (
    ACTIVATIONS,
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    Bert,
    BertConfig,
    BertOutput,
    mean_pool,
)
from vlmsel_jax.models.bert.params import key_table

__all__ = [
    "ACTIVATIONS",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "Bert",
    "BertConfig",
    "BertOutput",
    "key_table",
    "mean_pool",
]
