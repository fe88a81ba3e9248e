"""Evaluation of a trained VLM: the A score (caption log-likelihood) and VQA accuracy.

* A score (METHODS §4): for each held-out image–caption pair, (1/T) Σ_t log P(y_t | f(I), y_<t)
  over the caption's T tokens (no EOS) with the stage-1 projector; the score is the mean over
  pairs. Higher is better (it is ≤ 0).
* VQA accuracy: greedy decoding of a short answer after the chat prompt, stopped at EOS / the
  template's end-of-turn token or ``max_new_tokens``; the decoded text is normalized and scored by
  exact match against the record's answers (VQA's min(#matches / 3, 1) when it has several). The
  majority-answer baseline — always answer the training set's most common answer — is scored
  on the same questions beside it.

Decoding reruns the full fixed-length sequence per new token (no KV cache): answers are a few
tokens, and fixed shapes keep it one compiled program.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmsel_jax.training import batches as batches_lib
from vlmsel_jax.training import step as step_lib


def evaluation_indices(size: int, limit: int | None) -> list[int]:
  """All of ``range(size)``, or ``limit`` of them evenly spread over it.

  Evenly spread rather than the first ``limit``: sources list several questions per image in a
  row, and a prefix would cover only the first few images.
  """
  if limit is None or limit >= size:
    return list(range(size))
  return sorted(set(np.linspace(0, size - 1, limit).round().astype(int).tolist()))


def _batched(indices: Sequence[int], size: int):
  for i in range(0, len(indices), size):
    yield indices[i:i + size]


def _stack(rows: list[dict[str, np.ndarray]], size: int) -> tuple[dict[str, np.ndarray], int]:
  """Stacks rows, padding to ``size`` by repeating the last; returns (batch, real rows)."""
  n = len(rows)
  rows = rows + [rows[-1]] * (size - n)
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, n


def _exact_match(prediction: str, answers: Sequence[str]) -> float:
  from vlmsel_jax.data import vqa  # pylint: disable=g-import-not-at-top
  return float(vqa.exact_match(prediction, list(answers)))


def a_score(model_fn: Callable, builder: batches_lib.PromptBuilder, source, *,
            batch_size: int = 8, limit: int | None = None, progress: bool = False) -> dict:
  """Mean per-token caption log-likelihood over ``source``'s (paired) records.

  Args:
    model_fn: ``(pixels, input_ids, attention_mask, image_mask) -> logits``.
  """
  chosen = evaluation_indices(len(source), limit)
  n = len(chosen)
  if n == 0:
    raise ValueError("A score: the evaluation set is empty")

  static, weights = _static_and_weights(model_fn)
  values = []
  chunks = list(_batched(chosen, batch_size))
  for chunk in _progress(chunks, progress, "A score"):
    batch, real = _stack([builder.caption_inputs(source[i], train=False) for i in chunk],
                         batch_size)
    total, count = jax.device_get(_caption_log_likelihoods(static, weights, batch))
    values += list(total[:real] / np.maximum(count[:real], 1))
  values = np.asarray(values, np.float64)
  return {"a_score": float(values.mean()), "a_score_std": float(values.std()), "pairs": n}


END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>")


def greedy_answers(model_fn: Callable, builder: batches_lib.PromptBuilder, records: list, *,
                   batch_size: int = 8, max_new_tokens: int = 8, progress: bool = False
                   ) -> list[str]:
  """Greedy-decoded answers to VQA / chat records, as text."""
  tok = builder.tokenizer
  stop = {builder.eos_id}
  vocab = tok.get_vocab()
  # A chat turn ends with ChatML's <|im_end|> (SmolLM2, Qwen) or Gemma's <end_of_turn>.
  stop.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)

  static, weights = _static_and_weights(model_fn)
  # A model given by its parts decodes from a key/value cache: the prompt (and image) run once,
  # then one token per step. A plain function is re-run on the grown sequence every step.
  cached = isinstance(static, nnx.GraphDef)
  answers = []
  chunks = list(_batched(list(range(len(records))), batch_size))
  for chunk in _progress(chunks, progress, "VQA"):
    batch, real = _stack([builder.generation_inputs(records[i]) for i in chunk], batch_size)
    lengths = batch.pop("length").astype(np.int32)
    batch.pop("loss_mask")
    generated = [[] for _ in range(batch_size)]
    finished = np.zeros(batch_size, bool)
    cache = token = None
    for step in range(max_new_tokens):
      room = lengths < builder.max_len
      if not np.any(room & ~finished):
        break
      if not cached:
        token = _next_token(static, weights, batch, lengths)
      elif step == 0:
        token, cache = _prefill_next_token(static, weights, batch, lengths)
      else:
        # Last step's token goes in at its own position (rows that stopped re-write their last
        # slot; their outputs are ignored).
        token, cache = _decode_next_token(static, weights, token,
                                          np.maximum(lengths - 1, 0).astype(np.int32), cache)
      token = np.asarray(jax.device_get(token))
      for r in range(batch_size):
        if finished[r] or not room[r]:
          finished[r] = True
          continue
        if int(token[r]) in stop:
          finished[r] = True
          continue
        generated[r].append(int(token[r]))
        batch["input_ids"][r, lengths[r]] = token[r]
        batch["attention_mask"][r, lengths[r]] = 1
        lengths[r] += 1
      if finished.all():
        break
    answers += [tok.decode(g, skip_special_tokens=True).strip() for g in generated[:real]]
  return answers


def vqa_accuracy(model_fn: Callable, builder: batches_lib.PromptBuilder, source, *,
                 majority_answer: str | None = None, batch_size: int = 8,
                 max_new_tokens: int = 8, limit: int | None = None, progress: bool = False
                 ) -> dict:
  """VQA accuracy of greedy answers, with the majority-answer baseline beside it."""
  chosen = evaluation_indices(len(source), limit)
  n = len(chosen)
  if n == 0:
    raise ValueError("VQA: the evaluation set is empty")
  records = [source[i] for i in chosen]
  predictions = greedy_answers(model_fn, builder, records, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, progress=progress)
  scores = [_exact_match(p, _answers(r)) for p, r in zip(predictions, records)]
  out = {"vqa_accuracy": float(np.mean(scores)), "questions": n,
         "examples": [{"id": str(r["id"]), "question": r.get("question"), "prediction": p,
                       "answer": r.get("answer")} for p, r in list(zip(predictions, records))[:10]]}
  if majority_answer is not None:
    out["majority_answer"] = majority_answer
    out["majority_accuracy"] = float(np.mean([_exact_match(majority_answer, _answers(r))
                                              for r in records]))
  return out


def _answers(record) -> list[str]:
  """Reference answers: a VQA record's human answers, or a chat's last assistant turn."""
  if record.get("answers"):
    return list(record["answers"])
  if "answer" in record:
    return [record["answer"]]
  turns = [m["content"] for m in record.get("conversations", ()) if m["role"] == "assistant"]
  if not turns:
    raise ValueError(f"record {record.get('id')}: no answer to score against")
  return [turns[-1]]


def majority_answer_of(source, limit: int | None = None) -> str:
  """The most common (normalized) answer of a VQA source."""
  from vlmsel_jax.data import vqa  # pylint: disable=g-import-not-at-top
  n = len(source) if limit is None else min(limit, len(source))
  counts = collections.Counter(vqa.normalize_answer(_record_answer(source, i)) for i in range(n))
  return counts.most_common(1)[0][0]


def _record_answer(source, i: int) -> str:
  # Sources with ``answer_of`` (easy-VQA, VQA v2, LLaVA) give the answer without decoding the
  # image: a baseline over tens of thousands of records must not read every image.
  if hasattr(source, "answer_of"):
    return source.answer_of(i)
  return _answers(source[i])[0]


def _progress(items, enabled: bool, desc: str):
  if not enabled:
    return items
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(items, desc=desc, unit="batch", dynamic_ncols=True)


class BoundModel:
  """``(pixels, ids, mask, image_mask) -> logits`` of a model given by its parts.

  The evaluators jit the model's structure (``graphdef``, static) with ``weights`` as arguments
  rather than calling the model with its arrays closed over: closed-over arrays become constants
  of the compiled program, and with a 135M-parameter LLM that made every evaluation spend over a
  minute compiling.
  """

  def __init__(self, graphdef, template, params, frozen):
    self.graphdef = graphdef
    self.weights = (template, params, frozen)

  def __call__(self, pixels, input_ids, attention_mask, image_mask):
    return step_lib.model_from(self.graphdef, *self.weights)(pixels, input_ids, attention_mask,
                                                            image_mask)


def model_fn_for(graphdef, template, params, frozen) -> BoundModel:
  """A pure ``(pixels, ids, mask, image_mask) -> logits`` of the model's parts."""
  return BoundModel(graphdef, template, params, frozen)


def _static_and_weights(model_fn: Callable) -> tuple[Any, Any]:
  """(static part, jit arguments): a BoundModel's graphdef and arrays; a plain function, ()."""
  if isinstance(model_fn, BoundModel):
    return model_fn.graphdef, model_fn.weights
  return model_fn, ()


def _logits(static, weights, batch) -> jax.Array:
  inputs = (batch["pixels"], batch["input_ids"], batch["attention_mask"], batch["image_mask"])
  if isinstance(static, nnx.GraphDef):
    return step_lib.model_from(static, *weights)(*inputs)
  return static(*inputs)


# Module-level programs whose static argument is the model's structure (its graphdef, never its
# arrays, which the cache would keep alive): every evaluation of models of one structure reuses
# one compiled program, so the curve points of a ground-truth run compile once instead of once
# each (benchmarks/README.md).
def _argmax_at_last(logits: jax.Array, lengths: jax.Array) -> jax.Array:
  """Each row's most likely next token after its last real position (``lengths - 1``)."""
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return jnp.argmax(last, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _next_token(static, weights, batch, lengths) -> jax.Array:
  return _argmax_at_last(_logits(static, weights, batch), lengths)


@functools.partial(jax.jit, static_argnums=0)
def _prefill_next_token(graphdef, weights, batch, lengths):
  model = step_lib.model_from(graphdef, *weights)
  logits, cache = model.prefill(batch["pixels"], batch["input_ids"], batch["attention_mask"],
                                batch["image_mask"], last=lengths - 1)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _decode_next_token(graphdef, weights, token, index, cache):
  logits, cache = step_lib.model_from(graphdef, *weights).decode(token, index, cache)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=0)
def _caption_log_likelihoods(static, weights, batch):
  logits = _logits(static, weights, batch)
  return step_lib.token_log_likelihoods(logits, batch["input_ids"], batch["loss_mask"])
