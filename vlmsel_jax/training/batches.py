"""Records → fixed-shape model inputs: image preprocessing, prompt rendering, tokenization.

Two prompt formats, as in LLaVA:

* ``caption`` (stage 1, A score): LLaVA's "plain" template — the image tokens, then the caption's
  tokens and EOS. The loss covers the caption tokens (and EOS when training).
* ``chat`` (stage 2, VQA): the LLM tokenizer's own chat template; the user turn carries the image
  placeholder ``<image>``, the loss covers each assistant turn's tokens (its content and the
  template's end-of-turn marker).

A chat is tokenized turn by turn: the template is rendered for the first i messages and the text
added by message i is tokenized on its own, so label positions are known exactly. The template
must render each longer conversation as an extension of the shorter one (ChatML, Llama-3 and most
others do); one that doesn't gets a clear error. The placeholder is expanded to exactly
``num_image_tokens`` positions flagged by ``image_mask``; the model splices the projected image
tokens there.

Every example is padded to ``max_len``: ``input_ids``, ``attention_mask`` (1 = real token),
``image_mask`` (image positions), ``loss_mask`` (1 where token t is a training target, predicted
from position t − 1) and ``pixels`` (h, w, 3) float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
FORMATS = ("caption", "chat")


class BatchError(ValueError):
  """An example that cannot become model input; the message names the record."""


@dataclasses.dataclass
class Example:
  """One tokenized example before padding."""

  input_ids: list[int]
  image_mask: list[bool]
  loss_mask: list[bool]


class PromptBuilder:
  """Turns records into padded model inputs for one tokenizer, image preprocessing and length."""

  def __init__(self, tokenizer: Any, preprocessing: Callable[[Image.Image], np.ndarray], *,
               num_image_tokens: int, max_len: int, context_len: int | None = None,
               system_prompt: str | None = None):
    """
    Args:
      tokenizer: A transformers tokenizer (with a chat template for the ``chat`` format).
      preprocessing: PIL image → (h, w, 3) float32, the vision tower's own preprocessing.
      num_image_tokens: Image tokens the model splices in per image.
      max_len: Every example is padded to this many tokens; longer ones are an error.
      context_len: The LLM's context length; ``max_len`` beyond it is an error.
      system_prompt: A system message for the chat format; None keeps the template's default.
    """
    if context_len is not None and max_len > context_len:
      raise BatchError(f"max_len {max_len} exceeds the LLM's context length {context_len}")
    if num_image_tokens >= max_len:
      raise BatchError(f"max_len {max_len} leaves no room for text after {num_image_tokens} "
                       "image tokens")
    self.tokenizer = tokenizer
    self.preprocessing = preprocessing
    self.num_image_tokens = num_image_tokens
    self.max_len = max_len
    self.system_prompt = system_prompt
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    self.eos_id = tokenizer.eos_token_id
    if self.eos_id is None:
      raise BatchError("the tokenizer has no EOS token")
    # Special tokens the tokenizer adds by itself at the start (a BOS for Llama-2-style ones).
    with_special = tokenizer("", add_special_tokens=True)["input_ids"]
    self.prefix_ids = list(with_special)

  # --- tokenization -------------------------------------------------------------------------

  def _ids(self, text: str) -> list[int]:
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def _text_with_image(self, text: str, record_id: str, example: Example, *, target: bool,
                       allow_image: bool) -> int:
    """Appends ``text`` (with any placeholders expanded) to ``example``; returns placeholders."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) > 1 and not allow_image:
      raise BatchError(f"record {record_id}: an assistant turn contains {IMAGE_PLACEHOLDER}")
    for i, piece in enumerate(pieces):
      if i:
        example.input_ids += [self.pad_id] * self.num_image_tokens
        example.image_mask += [True] * self.num_image_tokens
        example.loss_mask += [False] * self.num_image_tokens
      ids = self._ids(piece) if piece else []
      example.input_ids += ids
      example.image_mask += [False] * len(ids)
      example.loss_mask += [target] * len(ids)
    return len(pieces) - 1

  def caption_example(self, record_id: str, caption: str, *, train: bool = True) -> Example:
    """Image tokens, then the caption (+ EOS when ``train``); loss on the caption."""
    if not caption.strip():
      raise BatchError(f"record {record_id}: empty caption")
    ex = Example(list(self.prefix_ids), [False] * len(self.prefix_ids),
                 [False] * len(self.prefix_ids))
    ex.input_ids += [self.pad_id] * self.num_image_tokens
    ex.image_mask += [True] * self.num_image_tokens
    ex.loss_mask += [False] * self.num_image_tokens
    ids = self._ids(caption)
    if train:
      ids = ids + [self.eos_id]
    ex.input_ids += ids
    ex.image_mask += [False] * len(ids)
    ex.loss_mask += [True] * len(ids)
    return ex

  def _messages(self, conversations: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    messages = [dict(m) for m in conversations]
    if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
      messages.insert(0, {"role": "system", "content": self.system_prompt})
    return messages

  def _render(self, messages, add_generation_prompt: bool) -> str:
    if getattr(self.tokenizer, "chat_template", None) is None:
      raise BatchError("the LLM's tokenizer has no chat template; the chat format needs one")
    return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)

  def chat_example(self, record_id: str, conversations: Sequence[Mapping[str, str]], *,
                   generation: bool = False) -> Example:
    """A chat with loss on assistant turns.

    With ``generation`` the last message must be a user turn and the example ends with the
    template's assistant prompt, ready for decoding (no loss positions).
    """
    messages = self._messages(conversations)
    ex = Example([], [], [])
    rendered = ""
    placeholders = 0
    for i, message in enumerate(messages):
      role = message.get("role")
      if role not in ("system", "user", "assistant"):
        raise BatchError(f"record {record_id}: message {i} has role {role!r}")
      last = i == len(messages) - 1
      next_is_assistant = (not last and messages[i + 1]["role"] == "assistant") or (
          last and generation)
      full = self._render(messages[:i + 1], add_generation_prompt=next_is_assistant)
      if not full.startswith(rendered):
        raise BatchError("the chat template does not render a conversation as an extension of "
                         "its prefix; turn-by-turn tokenization needs that")
      added = full[len(rendered):]
      rendered = full
      if role == "assistant":
        # The generation prompt ("<|im_start|>assistant\n") was emitted with the previous turn,
        # so everything added here is the answer and its end-of-turn marker.
        self._text_with_image(added, record_id, ex, target=True, allow_image=False)
      else:
        placeholders += self._text_with_image(added, record_id, ex, target=False,
                                              allow_image=True)
    if generation and messages[-1]["role"] != "user":
      raise BatchError(f"record {record_id}: generation needs a conversation ending in a user turn")
    if placeholders == 0:
      raise BatchError(f"record {record_id}: no {IMAGE_PLACEHOLDER} placeholder in the prompt")
    if placeholders > 1:
      raise BatchError(f"record {record_id}: {placeholders} {IMAGE_PLACEHOLDER} placeholders; one "
                       "image per example is supported")
    return ex

  # --- padding and images -------------------------------------------------------------------

  def pad(self, record_id: str, ex: Example) -> dict[str, np.ndarray]:
    n = len(ex.input_ids)
    if n > self.max_len:
      raise BatchError(f"record {record_id}: {n} tokens exceed max_len {self.max_len}")
    pad = self.max_len - n
    return {
        "input_ids": np.asarray(ex.input_ids + [self.pad_id] * pad, np.int32),
        "attention_mask": np.asarray([1] * n + [0] * pad, np.int32),
        "image_mask": np.asarray(ex.image_mask + [False] * pad, bool),
        "loss_mask": np.asarray(ex.loss_mask + [False] * pad, bool),
    }

  def pixels(self, image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, np.ndarray):
      image = Image.fromarray(image)
    return np.asarray(self.preprocessing(image.convert("RGB")), np.float32)

  # --- record kinds ---------------------------------------------------------------------------

  def caption_inputs(self, record: Mapping[str, Any], *, train: bool = True
                     ) -> dict[str, np.ndarray]:
    rid = str(record["id"])
    out = self.pad(rid, self.caption_example(rid, record["caption"], train=train))
    out["pixels"] = self.pixels(record["image"])
    return out

  def chat_inputs(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A conversation record, or a VQA record (question → answer) as a one-turn chat."""
    rid = str(record["id"])
    out = self.pad(rid, self.chat_example(rid, conversation_of(record)))
    out["pixels"] = self.pixels(record["image"])
    return out

  def generation_inputs(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The prompt of a VQA record, ending where the answer starts; ``length`` = its tokens."""
    rid = str(record["id"])
    ex = self.chat_example(rid, conversation_of(record, with_answer=False), generation=True)
    out = self.pad(rid, ex)
    out["length"] = np.asarray(len(ex.input_ids), np.int32)
    out["pixels"] = self.pixels(record["image"])
    return out


def conversation_of(record: Mapping[str, Any], *, with_answer: bool = True
                    ) -> list[dict[str, str]]:
  """A record's conversation: its own, or a VQA question (with the image) and its answer."""
  if "conversations" in record:
    conv = [dict(m) for m in record["conversations"]]
    if not with_answer:
      while conv and conv[-1]["role"] == "assistant":
        conv.pop()
    return conv
  if "question" in record:
    conv = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{record['question']}"}]
    if with_answer:
      conv.append({"role": "assistant", "content": record["answer"]})
    return conv
  raise BatchError(f"record {record.get('id')}: neither 'conversations' nor 'question'")
