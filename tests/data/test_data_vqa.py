"""Tests for VQA answer normalization and accuracy (vlmsel_jax.data.vqa).

The reference is a transcription of the official evaluation script (``vqaEval.py`` of the VQA
API: ``processPunctuation``, ``processDigitArticle`` and the accuracy loop of ``evaluate``),
kept separate from the library's code, plus hand-worked cases.
"""

from __future__ import annotations

import re

import pytest

from vlmsel_jax.data import vqa

_CONTRACTIONS_SAMPLE = {"dont": "don't", "isnt": "isn't", "whats": "what's", "youre": "you're",
                        "cant": "can't", "wont": "won't"}
_MANUAL = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
           "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]


def ref_punctuation(in_text):
  out_text = in_text
  for p in _PUNCT:
    if (p + " " in in_text or " " + p in in_text) or (re.search(_COMMA, in_text) is not None):
      out_text = out_text.replace(p, "")
    else:
      out_text = out_text.replace(p, " ")
  return _PERIOD.sub("", out_text, re.UNICODE)


def ref_digit_article(in_text):
  out = []
  for word in in_text.lower().split():
    word = _MANUAL.setdefault(word, word)
    if word not in ["a", "an", "the"]:
      out.append(word)
  for i, word in enumerate(out):
    if word in _CONTRACTIONS_SAMPLE:
      out[i] = _CONTRACTIONS_SAMPLE[word]
  return " ".join(out)


def ref_accuracy(res_ans, gt_answers):
  """The official per-question loop (gts normalized only when they differ, as there)."""
  gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in gt_answers]
  res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
  if len(set(gts)) > 1:
    gts = [ref_digit_article(ref_punctuation(a)) for a in gts]
    res_ans = ref_digit_article(ref_punctuation(res_ans))
  accs = []
  for i in range(len(gts)):
    others = gts[:i] + gts[i + 1:]
    accs.append(min(1, sum(o.lower() == res_ans.lower() for o in others) / 3))
  return sum(accs) / len(accs)


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),
    ("The cat", "cat"),
    ("an apple", "apple"),
    ("dont know", "don't know"),
    ("3.5", "3.5"),
    ("yes!", "yes"),
    ("YES", "yes"),
    ("red, white", "red white"),  # ", " → removed ("p + ' '" in text), no double space.
    ("red,white", "red white"),   # Comma without a space becomes a space.
    ("1,000", "1000"),            # Digits around a comma: every punctuation mark removed.
    ("  \tnone\n", "0"),
    ("t-shirt", "t shirt"),
    ("whats that?", "what's that"),
    ("mr. smith", "mr smith"),
])
def test_normalize_answer_hand_cases(raw, expected):
  assert vqa.normalize_answer(raw) == expected
  assert ref_digit_article(ref_punctuation(raw.replace("\t", " ").replace("\n", " ").strip())) \
      == expected


def test_exact_match_single_answer_is_plain_match():
  assert vqa.exact_match("Two", "2") == 1.0
  assert vqa.exact_match("two dogs", ["2 dogs"]) == 1.0
  assert vqa.exact_match("cat", ["dog"]) == 0.0
  with pytest.raises(ValueError, match="no reference answers"):
    vqa.exact_match("x", [])


@pytest.mark.parametrize("matches, expected", [
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_exact_match_ten_humans_hand_values(matches, expected):
  # k of 10 humans agree: k subsets of 9 hold k-1 matches, 10-k hold k; each scores min(·/3, 1).
  answers = ["blue"] * matches + [f"other{i}" for i in range(10 - matches)]
  assert vqa.exact_match("Blue.", answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("prediction, answers", [
    ("2", ["two", "2", "2", "Two.", "3", "2", "two", "1", "2", "2"]),
    ("red", ["Red", "red and white", "white", "red", "white", "red", "pink", "red", "red", "x"]),
    ("t-shirt", ["t shirt", "shirt", "t-shirt", "tshirt", "shirt", "t shirt", "tee", "top",
                 "shirt", "shirt"]),
    ("no", ["no"] * 10),
    ("dont know", ["don't know", "dont know", "unknown", "not sure", "dont know", "?",
                   "no idea", "don't know", "unsure", "idk"]),
    ("a cat", ["cat", "cats", "kitten", "the cat", "cat", "cat", "dog", "cat", "a cat", "cat"]),
])
def test_exact_match_agrees_with_official_loop(prediction, answers):
  assert vqa.exact_match(prediction, answers) == pytest.approx(
      ref_accuracy(prediction, answers), abs=1e-12)


def test_majority_answer():
  assert vqa.majority_answer(["Two", "2", "three"]) == "2"
  assert vqa.majority_answer(["white", "Red", "red", "white"]) == "white"  # Tie: first given.
  assert vqa.majority_answer([]) == ""
