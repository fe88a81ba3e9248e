"""The train / evaluate / a_score binaries end to end through absl, on tiny models and
on-disk data written by the test (a folder dataset for captions, LLaVA JSON for VQA chats)."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from absl import flags
from PIL import Image

import vlm_fixtures as fx
from vlmsel_jax.runtime import errors
from vlmsel_jax import a_score
from vlmsel_jax import evaluate
from vlmsel_jax import train
from vlmsel_jax.training import checkpoint as ckpt_lib
from vlmsel_jax.training import flags as train_flags
from vlmsel_jax.training import loop
from vlmsel_jax.training import evaluate_run

FLAGS = flags.FLAGS


def _run(module, argv):
  FLAGS.unparse_flags()
  FLAGS([module.__name__] + argv)
  return module.main([module.__name__])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("binaries")
  out = {"llm": fx.tiny_llm_dir(str(root / "llm")), "vit": fx.tiny_vit_dir(str(root / "vit"))}
  for split, n, seed in (("train", 24, 0), ("test", 8, 1)):
    folder = root / f"captions_{split}"
    folder.mkdir()
    records = fx.shape_records(n, "paired", seed=seed)
    conversations = []
    with open(folder / "captions.jsonl", "w") as f:
      for i in range(n):
        r = records[i]
        Image.fromarray(r["image"]).save(folder / f"{i}.png")
        f.write(json.dumps({"id": i, "image": f"{i}.png", "caption": r["caption"]}) + "\n")
        colour = r["caption"].split()[1]
        conversations.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the square ?"},
            {"from": "gpt", "value": colour}]})
    out[f"folder_{split}"] = f"folder:{folder}"
    with open(root / f"chat_{split}.json", "w") as f:
      json.dump(conversations, f)
    out[f"llava_{split}"] = f"llava:{root / f'chat_{split}.json'}@{folder}"
  out["root"] = root
  return out


def _common(world):
  return [f"--vision_model={world['vit']}", f"--llm_model={world['llm']}", "--batch_size=8",
          "--max_len=32", "--learning_rate=1e-2", "--save_every=2", "--log_every=1",
          "--eval_limit=8", "--eval_batch_size=4"]


def test_stage1_then_stage2_then_evaluate(world, capsys):
  s1 = str(world["root"] / "s1")
  _run(train, _common(world) + ["--stage=1", f"--data={world['folder_train']}",
                                f"--eval_data={world['folder_test']}", f"--output_dir={s1}",
                                "--max_steps=4"])
  summary = json.load(open(os.path.join(s1, "summary.json")))
  assert summary["steps"] == 4 and summary["eval"]["pairs"] == 8
  assert summary["eval"]["a_score"] < 0
  assert len(open(os.path.join(s1, "metrics.jsonl")).readlines()) == 4

  s2 = str(world["root"] / "s2")
  _run(train, _common(world) + ["--stage=2", f"--data={world['llava_train']}",
                                "--data_kind=conversation", f"--eval_data={world['llava_test']}",
                                f"--output_dir={s2}", f"--init_from={s1}", "--max_steps=3",
                                "--lora_rank=4", "--system_prompt=Answer in one word.",
                                "--max_len=48"])
  result = json.load(open(os.path.join(s2, "eval.json")))
  assert result["questions"] == 8 and 0.0 <= result["vqa_accuracy"] <= 1.0
  assert "majority_accuracy" in result
  # The evaluate binary rebuilds the run's own prompts (system prompt included) from its
  # checkpoint, and so gives the answers training's own evaluation gave.
  checkpointer = ckpt_lib.Checkpointer(os.path.join(s2, "checkpoints"), save_every=1, keep=1)
  meta = checkpointer.read_meta(checkpointer.latest_step())
  checkpointer.close()
  assert evaluate_run.config_from_meta(meta, s2).system_prompt == "Answer in one word."
  _run(evaluate, [f"--output_dir={s2}", f"--eval_data={world['llava_test']}", "--eval_limit=8",
                  "--eval_batch_size=4"])
  assert json.load(open(os.path.join(s2, "eval.json")))["examples"] == result["examples"]
  capsys.readouterr()
  with pytest.raises(SystemExit) as bad:  # Through the binary's error boundary.
    errors.guard(lambda argv: _run(evaluate, [f"--output_dir={s2}", "--eval_data=folder:"
                                              f"{world['root'] / 'missing'}"]), "evaluate")([])
  assert bad.value.code == 1
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith("evaluate: error: data spec")

  capsys.readouterr()
  _run(evaluate, [f"--output_dir={s1}", f"--eval_data={world['folder_test']}", "--eval_limit=8"])
  again = json.load(open(os.path.join(s1, "eval.json")))
  # Re-evaluating the same checkpoint on the same data gives the same A score.
  np.testing.assert_allclose(again["a_score"], summary["eval"]["a_score"], rtol=1e-6)


def test_a_score_binary_writes_one_row_per_candidate(world, capsys):
  output = str(world["root"] / "a" / "a_scores.csv")
  argv = _common(world) + ["--stage=1", f"--data={world['folder_train']}",
                           f"--eval_data={world['folder_test']}",
                           f"--output_dir={world['root'] / 'a'}", "--max_steps=2",
                           f"--vision_models={world['vit']}@-1,{world['vit']}@layer=-2"]
  _run(a_score, argv)
  lines = open(output).read().splitlines()
  assert lines[0].startswith("candidate,vision,vision_layer,a_score")
  assert [line.split(",")[0] for line in lines[1:]] == ["vit@layer=-1", "vit@layer=-2"]
  assert [int(line.split(",")[2]) for line in lines[1:]] == [-1, -2]
  assert all(float(line.split(",")[7]) > 0 for line in lines[1:])  # final training loss
  # The JSON beside the table, and each candidate's run under <output_dir>/runs/.
  assert [r["candidate"] for r in json.load(open(world["root"] / "a" / "a_scores.json"))["rows"]
          ] == ["vit@layer=-1", "vit@layer=-2"]
  for name in ("vit@layer=-1", "vit@layer=-2"):
    assert (world["root"] / "a" / "runs" / name / "checkpoints").is_dir()
  # A progress line per candidate as it finishes, counted over the two, timed.
  progress = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
  assert len(progress) == 2
  assert re.fullmatch(r"\[1/2\] vit@layer=-1\tA -\d+\.\d{4}\tsteps 2\tloss \d+\.\d{4}\t"
                      r"\(\d.*; .* so far; about .* left\)", progress[0])
  assert progress[1].startswith("[2/2] vit@layer=-2\tA -") and progress[1].endswith(" so far)")
  # Run again: both were trained before, so both are evaluated only and say so.
  _run(a_score, argv)
  progress = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
  assert [x.split("\t")[0] for x in progress] == ["[1/2] vit@layer=-1", "[2/2] vit@layer=-2"]
  assert all("\tsteps 2\t" in x and x.endswith("\t(done before)") for x in progress)


def test_train_flag_errors_are_one_line(world):
  with pytest.raises(Exception, match="--output_dir is required"):
    _run(train, _common(world) + [f"--data={world['folder_train']}"])
  with pytest.raises(Exception, match="no such checkpoint directory"):
    _run(train, _common(world) + ["--stage=2", f"--data={world['llava_train']}",
                                  "--data_kind=conversation",
                                  f"--output_dir={world['root'] / 'bad'}",
                                  f"--init_from={world['root'] / 'missing'}"])
  # A layer the tower does not have (pixel-patches has one grid): one line, before any training.
  with pytest.raises(ValueError, match=r"vision 'pixel-patches' has 1 layer\(s\) to read "
                     r"\(-1 \.\. 0\); --vision_layer / @layer=-2 is not one of them"):
    _run(train, _common(world) + ["--vision_model=pixel-patches", "--vision_layer=-2",
                                  f"--data={world['folder_train']}",
                                  f"--output_dir={world['root'] / 'bad_layer'}"])
  assert not (world["root"] / "bad_layer" / "checkpoints").exists()


def test_the_tower_layer_is_the_specs_else_vision_layer(tmp_path):
  """One place decides the tower layer: a vision spec's own @layer=, else --vision_layer; the
  VLM config (and so the checkpoint's meta) carries what it decided."""
  base = ["train", "--data=easy-vqa", f"--output_dir={tmp_path}"]
  FLAGS.unparse_flags()
  FLAGS(base)
  spec = "efficientnet-lite0@layer=-3,res=160"
  assert train_flags.config_from_flags(vision="efficientnet-lite0", llm="x").vlm.vision_layer == -2
  for argv in ([], ["--vision_layer=-1"], ["--vision_layer=-3"]):
    FLAGS.unparse_flags()
    FLAGS(base + argv)
    config = train_flags.config_from_flags(vision=spec, llm="x")  # The spec's layer wins.
    assert config.vlm.vision_layer == -3 and config.meta({})["vlm"]["vision_layer"] == -3
    assert config.workdir == str(tmp_path)
  plain = train_flags.config_from_flags(vision="efficientnet-lite0", llm="x")
  assert plain.vlm.vision_layer == -3  # No layer of its own: --vision_layer.
  other = train_flags.config_from_flags(vision="efficientnet-lite0@layer=-4", llm="x",
                                        output_dir=str(tmp_path / "o"))
  assert other.vlm.vision_layer == -4 and other.workdir == str(tmp_path / "o")
  assert loop.tower_layer("efficientnet-lite0@-5", -2) == -5
  assert loop.tower_layer("efficientnet-lite0@res=160", -1) == -1
  # A config whose spec names another layer than its VLM config is refused, not mended.
  with pytest.raises(ValueError, match=r"names layer -4, but the VLM config has vision_layer=-3"):
    dataclasses.replace(plain, vision="efficientnet-lite0@layer=-4")
  with pytest.raises(Exception, match="--vision_model is required"):
    train_flags.config_from_flags(vision=None, llm="x")
  with pytest.raises(Exception, match="--llm_model is required"):
    train_flags.config_from_flags(vision=spec, llm=None)
  FLAGS.unparse_flags()
  FLAGS(["train", "--data=easy-vqa"])
  with pytest.raises(Exception, match="--output_dir is required"):
    train_flags.config_from_flags(vision=spec, llm="x")


def test_majority_answer_reads_no_image(world, monkeypatch):
  """The majority baseline comes from the sources' answers alone (no image decoded)."""
  from vlmsel_jax.data import registry  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.training import evaluation  # pylint: disable=g-import-not-at-top
  source = registry.open_source(world["llava_train"], kind="conversation")
  expected = evaluation.majority_answer_of(fx.ListSource([source[i] for i in range(len(source))]))

  def no_reads(self, index):
    raise AssertionError(f"record {index} was read")

  monkeypatch.setattr(type(source), "__getitem__", no_reads)
  assert evaluation.majority_answer_of(source) == expected


def test_compute_settings_reach_the_model_but_not_the_checkpoint_identity():
  """--attention_impl and --remat set how the VLM computes; a run may resume with them changed,
  so the checkpoint meta (its compatibility keys) does not record them."""
  FLAGS.unparse_flags()
  FLAGS(["train", "--data=easy-vqa", "--attention_impl=einsum", "--remat"])
  try:
    config = train_flags.config_from_flags(vision="efficientnet-lite0", llm="smollm2-135m",
                                           output_dir="/tmp/unused")
  finally:
    FLAGS.unparse_flags()
  assert config.vlm.attention_impl == "einsum" and config.vlm.remat
  assert "remat" not in config.meta({})["vlm"] and "attention_impl" not in config.meta({})["vlm"]
  plain = dataclasses.replace(config, vlm=dataclasses.replace(config.vlm, remat=False,
                                                              attention_impl="auto"))
  assert plain.meta({}) == config.meta({})
