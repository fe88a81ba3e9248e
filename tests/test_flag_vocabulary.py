"""One name for one thing: every binary's flags, listed, and checked against a shared vocabulary.

Each binary is imported alone, in a fresh interpreter (as when it runs), and the flags the
project defines are read back: their names and kinds. The table below states, per binary, the
flags of the shared vocabulary it takes; the checks that follow hold for every binary, whatever
the table says.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys

import pytest

from test_layout import _binaries

# The shared vocabulary: what each name means, wherever it appears.
VOCABULARY = {
    "vision_model": "one vision encoder (zoo name, local path or Hub id, with a variant)",
    "vision_models": "several vision encoders",
    "llm_model": "one LLM",
    "llm_models": "several LLMs",
    "text_model": "one text model whose caption features the scores compare against",
    "text_models": "several text models",
    "output_dir": "the directory a binary writes; file names inside it are fixed",
    "ground_truth": "a CSV of trained accuracies the scores are judged against",
    "ground_truth_column": "the column of --ground_truth read as the accuracy",
    "seed": "the seed of every random choice",
    "seeds": "several seeds, one run per seed",
}

# Spellings the vocabulary replaced; no binary may take them.
RETIRED = {
    "models", "vision", "llm", "vision_candidates", "llm_candidates", "dcd_models",
    "llm_similarity_vision", "llm_similarity_llms", "mordal_candidates", "output", "workdir",
    "a_score_output", "groundtruth_output", "truth", "truth_column", "gt_seeds", "candidates",
    "candidate_names", "text",
}

# A flag whose name says "model(s)", "llm(s)", "output(s)", "truth", "seed(s)" or "candidate(s)"
# must be a vocabulary word, or one of these, each of which names something else.
NOT_SYNONYMS = {
    "vision_layer": "the tower's hidden state, not a model",
    "llm_similarity_layer": "an LLM hidden state, not a model",
    "ground_truth_scores": "score files judged against --ground_truth, not a ground truth",
    "mordal_llm_threshold": "a clustering threshold",
    "text_bank": "a feature bank file",
    "llm_similarity": "a file of similarities between LLMs",
}
_CONCEPT = re.compile(r"(^|_)(models?|llms?|outputs?|workdir|truth|seeds?|candidates?)(_|$)")

# binary -> the vocabulary flags it takes (all of them; none missing, none extra).
EXPECTED = {
    "vlmsel_jax.a_score": {"vision_models", "llm_model", "output_dir", "seed"},
    "vlmsel_jax.correspondence_score": {"vision_models", "output_dir", "seed"},
    "vlmsel_jax.evaluate": {"output_dir"},
    "vlmsel_jax.extract": {"vision_models", "text_models", "output_dir", "seed"},
    "vlmsel_jax.groundtruth": {"vision_models", "llm_models", "llm_model", "output_dir", "seed",
                               "seeds"},
    "vlmsel_jax.score": {"vision_models", "text_model", "output_dir", "ground_truth",
                         "ground_truth_column", "seed"},
    "vlmsel_jax.select": {"vision_models", "llm_models", "llm_model", "output_dir",
                          "ground_truth", "ground_truth_column", "seed"},
    "vlmsel_jax.train": {"vision_model", "llm_model", "output_dir", "seed"},
}

_LIST_FLAGS = """
import importlib, json, sys
from absl import flags
importlib.import_module(sys.argv[1])
out = {}
for module, defined in flags.FLAGS.flags_by_module_dict().items():
  if module.startswith("vlmsel_jax"):
    for flag in defined:
      out[flag.name] = flag.flag_type()
print(json.dumps(out))
"""


def _flags_of(binary: str) -> dict[str, str]:
  proc = subprocess.run([sys.executable, "-c", _LIST_FLAGS, binary], capture_output=True,
                        text=True, timeout=300, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(name="flags_by_binary", scope="module")
def _flags_by_binary() -> dict[str, dict[str, str]]:
  binaries = sorted(_binaries())
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(zip(binaries, pool.map(_flags_of, binaries)))


def test_every_binary_is_listed(flags_by_binary):
  assert sorted(flags_by_binary) == sorted(EXPECTED)
  assert all(len(names) >= 3 for names in flags_by_binary.values())


@pytest.mark.parametrize("binary", sorted(EXPECTED))
def test_binary_takes_its_vocabulary(flags_by_binary, binary):
  names = set(flags_by_binary[binary])
  assert names & set(VOCABULARY) == EXPECTED[binary]


def test_no_binary_takes_a_retired_spelling(flags_by_binary):
  found = {f"{b}: --{n}" for b, names in flags_by_binary.items() for n in names if n in RETIRED}
  assert not found, sorted(found)


def test_every_concept_flag_is_a_vocabulary_word(flags_by_binary):
  found = {f"{b}: --{n}" for b, names in flags_by_binary.items() for n in names
           if _CONCEPT.search(n) and n not in VOCABULARY and n not in NOT_SYNONYMS}
  assert not found, sorted(found)


def test_one_name_has_one_kind_everywhere(flags_by_binary):
  kinds: dict[str, set[str]] = {}
  for names in flags_by_binary.values():
    for name, kind in names.items():
      kinds.setdefault(name, set()).add(kind)
  mixed = {name: sorted(k) for name, k in kinds.items() if len(k) > 1}
  assert not mixed, mixed


def test_every_binary_writes_under_output_dir(flags_by_binary):
  assert all("output_dir" in names for names in flags_by_binary.values())
