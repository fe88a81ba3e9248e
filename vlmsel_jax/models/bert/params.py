"""Key table from transformers' ``BertModel`` checkpoints to the NNX ``Bert`` state.

Each entry maps a checkpoint-key regex to (NNX key template, transform); ``\\1`` in a template is
the layer index. The keys are those of the hub's ``BertModel`` checkpoints (all-MiniLM-L6-v2 and
the other sentence-transformers encoders), which are also what transformers' ``save_pretrained``
writes. Buffers some checkpoints carry are listed with ``Transform.SKIP``, so an unknown key is
still an error.
"""

from __future__ import annotations

from vlmsel_jax.models.bert import modeling
from vlmsel_jax.models import transforms
from vlmsel_jax.models.transforms import Transform

Table = transforms.Table
_linear = transforms.linear_keys
_norm = transforms.layer_norm_keys


def key_table(config: modeling.BertConfig) -> Table:
  """Returns the checkpoint-key regex -> (NNX key, transform) table for ``config``."""
  del config  # Every BertModel config has the same keys; a pooler-less model just lacks some.
  layer = r"encoder\.layer\.([0-9]+)\."
  return {
      r"embeddings\.word_embeddings\.weight": ("word_embed.embedding", Transform.EMBED),
      r"embeddings\.position_embeddings\.weight": ("position_embed.embedding", Transform.EMBED),
      r"embeddings\.token_type_embeddings\.weight": ("token_type_embed.embedding",
                                                     Transform.EMBED),
      **_norm(r"embeddings\.LayerNorm", "embed_norm"),
      # Constant arange / zeros buffers that older checkpoints saved; the model rebuilds them.
      r"embeddings\.position_ids": (None, Transform.SKIP),
      r"embeddings\.token_type_ids": (None, Transform.SKIP),
      **_linear(layer + r"attention\.self\.query", r"layers.\1.attn.q_proj"),
      **_linear(layer + r"attention\.self\.key", r"layers.\1.attn.k_proj"),
      **_linear(layer + r"attention\.self\.value", r"layers.\1.attn.v_proj"),
      **_linear(layer + r"attention\.output\.dense", r"layers.\1.attn.o_proj"),
      **_norm(layer + r"attention\.output\.LayerNorm", r"layers.\1.attn_norm"),
      **_linear(layer + r"intermediate\.dense", r"layers.\1.fc1"),
      **_linear(layer + r"output\.dense", r"layers.\1.fc2"),
      **_norm(layer + r"output\.LayerNorm", r"layers.\1.mlp_norm"),
      **_linear(r"pooler\.dense", "pooler"),
  }
