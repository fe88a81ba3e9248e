"""The chat format a decoder LLM's tokenizer renders conversations with when its checkpoint has none.

Stage-2 training and VQA decoding render conversations with the tokenizer's chat template. An
instruction-tuned checkpoint carries its own; a pretrained one usually does not, and then the
only format its vocabulary was built for is its family's. Gemma's vocabulary has
``<start_of_turn>`` / ``<end_of_turn>`` tokens whatever the checkpoint, so a Gemma 1 / 2 / 3
tokenizer without a template gets Gemma's turn format. Other families keep what they have: their
base checkpoints name no format, and guessing one would train the model on a made-up protocol
(``training.batches`` then says the tokenizer has no chat template).
"""

from __future__ import annotations

from typing import Any

from vlmsel_jax.models import gemma3

# Gemma's turn format (<start_of_turn>role ... <end_of_turn>, the assistant's role is "model", a
# system message is folded into the first user turn). Every prefix of a conversation renders as
# a prefix of the whole, which turn-by-turn tokenization needs.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set state = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set state.system = message['content'] + '\n\n' %}"
    "{% else %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (state.system if role == 'user' else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% if role == 'user' %}{% set state.system = '' %}{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def with_family_chat_template(model: Any, tokenizer: Any) -> Any:
  """``tokenizer``, given its family's chat template when it has none (Gemma: the turn format)."""
  if getattr(tokenizer, "chat_template", None) is None and isinstance(model, gemma3.Gemma3):
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE  # Gemma 1 and 2 subclass Gemma 3's module.
  return tokenizer
