"""A Hugging Face Hub cache built by the tests, in the layout huggingface_hub writes.

``add_snapshot`` puts a directory that ``save_pretrained`` wrote into
``<cache>/models--org--name/``: every file as a content-addressed blob under ``blobs/``, the
snapshot ``snapshots/<commit>/<file>`` as relative symlinks to those blobs, and
``refs/<revision>`` holding the commit hash. ``tiny_hub_cache`` fills one with tiny random CLIP,
SigLIP, DINOv2 and Qwen2 checkpoints (saved by transformers) under Hub-style ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import tokenizers
import torch
import transformers

import vlm_fixtures as fx

# Hub ids the tiny cache holds; none exists on the real Hub, so nothing can be fetched by mistake.
CLIP = "vlmsel-test/clip-vit-tiny"
SIGLIP = "vlmsel-test/siglip-tiny"
DINOV2 = "vlmsel-test/dinov2-tiny"
QWEN2 = "vlmsel-test/qwen2-tiny"
IMAGE_SIZE = 32
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=8)


def add_snapshot(cache: Path, repo_id: str, source: Path, revision: str = "main") -> str:
  """Adds ``source``'s files as one commit of ``repo_id`` at ``revision``; returns the commit."""
  files = sorted(p for p in source.rglob("*") if p.is_file())
  digest = hashlib.sha1(repo_id.encode())
  for f in files:
    digest.update(f.relative_to(source).as_posix().encode() + f.read_bytes())
  commit = digest.hexdigest()
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  (repo / "blobs").mkdir(parents=True, exist_ok=True)
  for f in files:
    data = f.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    if not blob.exists():
      blob.write_bytes(data)
    link = repo / "snapshots" / commit / f.relative_to(source)
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, link.parent), link)
  (repo / "refs").mkdir(exist_ok=True)
  (repo / "refs" / revision).write_text(commit)  # No newline, as huggingface_hub writes it.
  return commit


def _clip(path: Path, seed: int) -> None:
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, vocab_size=64, max_position_embeddings=16),
      vision_config=VISION, projection_dim=16)
  transformers.CLIPModel(config).save_pretrained(path)
  transformers.CLIPImageProcessorPil(
      size={"shortest_edge": IMAGE_SIZE},
      crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def _siglip(path: Path, seed: int) -> None:
  torch.manual_seed(seed)
  transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)).save_pretrained(path)
  transformers.SiglipImageProcessorPil(
      size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def _dinov2(path: Path, seed: int) -> None:
  torch.manual_seed(seed)
  config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     mlp_ratio=2, image_size=IMAGE_SIZE, patch_size=8)
  transformers.Dinov2Model(config).save_pretrained(path)
  transformers.BitImageProcessorPil(
      size={"shortest_edge": IMAGE_SIZE},
      crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def qwen2_tokenizer() -> transformers.PreTrainedTokenizerBase:
  """A byte-level BPE of 300 tokens trained on the fixtures' words, as a ``Qwen2Tokenizer``
  (what AutoTokenizer builds for a qwen2 config) with the ChatML template."""
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator([" ".join(fx.WORDS)] * 20 + ["what colour is the square ?"], trainer)
  model = json.loads(bpe.to_str())["model"]
  merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  tokenizer = transformers.Qwen2Tokenizer(
      vocab=model["vocab"], merges=merges, unk_token=None, pad_token="<|endoftext|>",
      eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
  tokenizer.chat_template = fx.CHATML
  return tokenizer


def qwen2_dir(path: Path, seed: int = 0) -> Path:
  """A random 2-layer Qwen2 (q/k/v biases) with a tiny ChatML BPE tokenizer."""
  torch.manual_seed(seed)
  tokenizer = qwen2_tokenizer()
  config = transformers.Qwen2Config(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      tie_word_embeddings=False, initializer_range=0.3)
  transformers.Qwen2ForCausalLM(config).save_pretrained(path)
  tokenizer.save_pretrained(path)
  return path


def tiny_hub_cache(root: Path) -> dict[str, str]:
  """Fills ``root / "hub"`` with the four tiny models; returns {repo id: commit of main}.

  ``QWEN2`` also has a tag ``v2`` at a second commit (other random weights).
  """
  cache = root / "hub"
  commits = {}
  for repo_id, write in ((CLIP, _clip), (SIGLIP, _siglip), (DINOV2, _dinov2), (QWEN2, qwen2_dir)):
    source = root / "saved" / repo_id
    write(source, 0)
    commits[repo_id] = add_snapshot(cache, repo_id, source)
  qwen2_dir(root / "saved" / "qwen2-v2", seed=1)
  commits[QWEN2 + "@v2"] = add_snapshot(cache, QWEN2, root / "saved" / "qwen2-v2", "v2")
  return commits
