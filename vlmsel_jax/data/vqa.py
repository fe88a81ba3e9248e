"""VQA data (the VQA v2 question/annotation file pair) and VQA answer scoring.

`normalize_answer` is the answer normalization of the official VQA evaluation script
(``vqaEval.py``: ``processPunctuation`` then ``processDigitArticle``): punctuation removed or
turned into spaces, periods dropped unless inside a number, lowercase, number words zero–ten →
digits, articles dropped, common contractions restored ("dont" → "don't").

`exact_match` is VQA accuracy: with one reference answer, 1.0 when the normalized prediction
equals it, else 0.0; with several (VQA has ten human answers), the official script's
min(#humans who gave the prediction / 3, 1), averaged over the leave-one-out subsets of the
humans (so 3 matching humans of 10 score 0.9, 4 or more score 1.0).

`VqaSource` reads the question file ``{"questions": [{"image_id", "question", "question_id"}],
"data_subtype": "train2014"}`` and the annotation file ``{"annotations": [{"question_id",
"answers": [{"answer": ...}, ...], "multiple_choice_answer"}]}`` over an image folder whose files
are named ``COCO_<subtype>_<12-digit image id>.jpg`` or ``<image id>.jpg`` / ``.png``.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Sequence

from vlmsel_jax.data import records
from vlmsel_jax.data.records import DataError

# The tables of the official evaluation script (vqaEval.py), verbatim.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
# "(?!<=\d)" is the official script's (a lookahead, not the lookbehind it meant); kept so scores
# match it: a period is removed unless a digit follows.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!")


def _process_punctuation(text: str) -> str:
  out = text
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  # The official script passes re.UNICODE (= 32) where `count` goes: at most 32 periods go.
  return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def _process_digit_article(text: str) -> str:
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(s: str) -> str:
  """The official VQA normalization of an answer (see the module docstring)."""
  s = s.replace("\n", " ").replace("\t", " ").strip()
  return _process_digit_article(_process_punctuation(s))


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
  """VQA accuracy of ``prediction`` against the reference ``answers`` (normalized first).

  Raises:
    ValueError: no reference answers.
  """
  if isinstance(answers, str):
    answers = [answers]
  if not answers:
    raise ValueError("exact_match: no reference answers")
  predicted = normalize_answer(prediction)
  hits = [normalize_answer(a) == predicted for a in answers]
  if len(hits) == 1:
    return float(hits[0])
  matches = sum(hits)
  # Leave-one-out over the humans: dropping a matching human leaves matches - 1.
  return sum(min(1.0, (matches - hit) / 3.0) for hit in hits) / len(hits)


def majority_answer(answers: Sequence[str]) -> str:
  """The most common normalized answer; ties go to the one given first ("" for none)."""
  normalized = [normalize_answer(a) for a in answers]
  if not normalized:
    return ""
  counts = collections.Counter(normalized)
  best = max(counts.values())
  return next(a for a in normalized if counts[a] == best)


_COCO_NAME = re.compile(r"^COCO_([A-Za-z0-9]+)_(\d{12})\.jpg$")
_PLAIN_NAME = re.compile(r"^(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


def image_files(image_root: str, subtype: str | None) -> dict[int, str]:
  """Image id → file name in ``image_root`` under the COCO or the plain naming convention.

  Where one id has several files, ``COCO_<subtype>_...`` wins, then the COCO name, then the
  plain one (first in sorted order).
  """
  ranked: dict[int, tuple[int, str]] = {}
  for name in sorted(os.listdir(image_root)):
    match = _COCO_NAME.match(name)
    if match:
      image_id, rank = int(match.group(2)), 0 if match.group(1) == subtype else 1
    else:
      match = _PLAIN_NAME.match(name)
      if not match:
        continue
      image_id, rank = int(match.group(1)), 2
    if image_id not in ranked or rank < ranked[image_id][0]:
      ranked[image_id] = (rank, name)
  return {image_id: name for image_id, (_, name) in ranked.items()}


def _load_list(path: str, key: str) -> tuple[dict[str, Any], list[Any]]:
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  with open(path, encoding="utf-8") as f:
    try:
      document = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if not isinstance(document, dict) or not isinstance(document.get(key), list):
    raise DataError(f"{path}: expected a JSON object with a list {key!r}")
  return document, document[key]


class VqaSource(records.EntrySource):
  """VQA v2 questions (+ annotations) over an image folder, as vqa records.

  Records: ``{"id": question id, "image", "question", "answers": the raw human answers,
  "answer": majority_answer(answers)}``, in question-file order. Without an annotation file
  (test splits) ``answers`` is empty and ``answer`` is "".
  """

  def __init__(self, questions_path: str, annotations_path: str | None, image_root: str, *,
               skip_bad_records: bool = False, name: str | None = None):
    if not os.path.isdir(image_root):
      raise DataError(f"{image_root}: image folder not found (for {questions_path})")
    self.name = name or os.path.splitext(os.path.basename(questions_path))[0]
    self.questions_path = questions_path
    self.image_root = image_root
    problems = records.Problems(skip_bad_records)
    document, questions = _load_list(questions_path, "questions")
    subtype = document.get("data_subtype")
    answers_by_question: dict[str, list[str]] | None = None
    if annotations_path:
      answers_by_question = {}
      for index, ann in enumerate(_load_list(annotations_path, "annotations")[1]):
        where = f"{annotations_path}: annotations[{index}]"
        qid = records.record_id(ann.get("question_id")) if isinstance(ann, dict) else None
        raw = ann.get("answers") if isinstance(ann, dict) else None
        if qid is None or not isinstance(raw, list):
          problems.report("malformed record", f"{where}: needs question_id and a list of answers")
          continue
        texts = [a.get("answer") if isinstance(a, dict) else None for a in raw]
        if not texts or not all(records.nonempty_text(t) for t in texts):
          problems.report("empty answer", f"{where} (question {qid!r}): every answer must be "
                          "a non-empty string")
          continue
        answers_by_question[qid] = texts
    files = image_files(image_root, subtype if isinstance(subtype, str) else None)
    entries = []
    for index, q in enumerate(questions):
      where = f"{questions_path}: questions[{index}]"
      qid = records.record_id(q.get("question_id")) if isinstance(q, dict) else None
      image_id = q.get("image_id") if isinstance(q, dict) else None
      if qid is None or isinstance(image_id, bool) or not isinstance(image_id, int):
        problems.report("malformed record", f"{where}: needs question_id and an integer "
                        f"image_id, got {q!r:.100}")
        continue
      where = f"{where} (question {qid!r})"
      if not records.nonempty_text(q.get("question")):
        problems.report("empty question", f"{where}: question must be a non-empty string")
        continue
      answers: list[str] = []
      if answers_by_question is not None:
        if qid not in answers_by_question:
          problems.report("no annotation", f"{where}: no usable annotation in "
                          f"{annotations_path}")
          continue
        answers = answers_by_question[qid]
      if image_id not in files:
        problems.report("image not found", f"{where}: no image for image_id {image_id} in "
                        f"{image_root} (COCO_{subtype or '<subtype>'}_{image_id:012d}.jpg or "
                        f"{image_id}.jpg/.png)")
        continue
      entries.append((qid, files[image_id], q["question"], answers, where))
    # Every image is decoded now, when the data is opened, not when a batch reads it.
    unique = sorted({e[1] for e in entries})
    found = dict(zip(unique, records.image_problems(
        [os.path.join(image_root, u) for u in unique])))
    kept = []
    for entry in entries:
      if found[entry[1]] is None:
        kept.append(entry)
      else:
        problems.report(records.reason_of(found[entry[1]]),
                        f"{entry[4]}: {found[entry[1]]}: {os.path.join(image_root, entry[1])}")
    entries = kept
    self._entries = [(qid, f, question, answers, majority_answer(answers))
                     for qid, f, question, answers, _ in entries]
    records.require_records(len(self._entries), questions_path, problems)
    self._bad = problems.bad

  def answer_of(self, index: int) -> str:
    """Record ``index``'s most common normalized answer, without decoding its image."""
    return self._entries[index][4]

  def __getitem__(self, index: int) -> dict[str, Any]:
    qid, file_name, question, answers, answer = self._entries[index]
    image = records.decode_image(os.path.join(self.image_root, file_name),
                                 f"question {qid!r} ({self.questions_path})")
    return {"id": qid, "image": image, "question": question, "answers": list(answers),
            "answer": answer}
