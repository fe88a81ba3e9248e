"""Every vision-tower family through the binaries, as a user runs them.

For each family a tiny random checkpoint is saved in that family's own format (a transformers
directory, a timm directory, a whole VLM checkpoint, a diffusers pipeline), and then:

* ``train --stage=1`` trains a projector between the tower and a tiny LLM on easy-VQA captions
  and measures the A score on held-out captions (the stage every ground truth starts with; stage 2
  feeds the LLM the same image tokens, through the same ``patch_grid``);
* ``score`` extracts the tower's and a second tower's feature banks, computes GW, CKA and mutual
  k-NN against a text model, and the C score of the tower's patch grid.

The numbers are those of random models; what is checked is that every family runs end to end
and produces finite scores in their ranges. Each family's parity with its reference is tested in
``tests/models/``.
"""

from __future__ import annotations

import importlib.util
import json
import math

import diffusers
import pytest
import torch
import transformers
from absl import flags

import references
import vlm_fixtures as fx
from vlmsel_jax import score
from vlmsel_jax import train

FLAGS = flags.FLAGS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None,
                                reason="needs the easy-vqa package: pip install easy-vqa")


def _run(module, argv):
  FLAGS.unparse_flags()
  FLAGS([module.__name__] + argv)
  return module.main([module.__name__])


# --- tiny checkpoints, one per family, in the format users download ------------------------------

def _siglip2_naflex(path):
  torch.manual_seed(0)
  transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      patch_size=4, num_patches=16)).save_pretrained(path)
  transformers.Siglip2ImageProcessor(patch_size=4, max_num_patches=16).save_pretrained(path)
  return str(path)


def _internvit(path):
  torch.manual_seed(0)
  transformers.InternVLVisionModel(transformers.InternVLVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=32, patch_size=8)).save_pretrained(path)
  return str(path)


def _eva02(path):
  timm = references.import_reference("timm")
  from timm.models._hub import save_for_hf  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=5,
                            embed_dim=32, depth=2, num_heads=2, img_size=56)
  save_for_hf(model, path, safe_serialization=True)
  return str(path)


def _convnext(path):
  torch.manual_seed(0)
  transformers.ConvNextModel(transformers.ConvNextConfig(
      hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], image_size=64)).save_pretrained(path)
  transformers.ConvNextImageProcessorPil(size={"shortest_edge": 64}).save_pretrained(path)
  return str(path)


def _qwen2_5_vl(path):
  torch.manual_seed(0)
  transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
      vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4,
                         out_hidden_size=24, patch_size=4, spatial_merge_size=2,
                         temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1]),
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=64),
  )).save_pretrained(path)
  return f"{path}@res=32"  # 8 x 8 patches: four 4 x 4 windows, 4 x 4 merged tokens.


_VAE = dict(latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32),
            layers_per_block=1, norm_num_groups=32, sample_size=32)
_DDPM = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012)


def _pipeline(path, pipeline_class, denoiser_name, denoiser, scheduler=_DDPM, **vae):
  """A diffusers pipeline directory: model_index.json, vae/, unet/ or transformer/, scheduler/."""
  torch.manual_seed(0)
  diffusers.AutoencoderKL(**{**_VAE, **vae}).save_pretrained(path / "vae")
  denoiser.save_pretrained(path / denoiser_name)
  scheduler.save_pretrained(path / "scheduler")
  (path / "model_index.json").write_text(json.dumps({
      "_class_name": pipeline_class, "vae": ["diffusers", "AutoencoderKL"],
      denoiser_name: ["diffusers", type(denoiser).__name__],
      "scheduler": ["diffusers", type(scheduler).__name__]}))
  return str(path)


def _sd_unet(path):
  torch.manual_seed(0)
  return _pipeline(path, "StableDiffusionPipeline", "unet", diffusers.UNet2DConditionModel(
      sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32),
      layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
      attention_head_dim=2, norm_num_groups=32))


def _dit(path):
  torch.manual_seed(0)
  return _pipeline(path, "DiTPipeline", "transformer", diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2, sample_size=16,
      patch_size=2, num_embeds_ada_norm=10))


def _sd3(path):
  torch.manual_seed(0)
  return _pipeline(
      path, "StableDiffusion3Pipeline", "transformer", diffusers.SD3Transformer2DModel(
          sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
          caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=16),
      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), latent_channels=16,
      scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
      use_post_quant_conv=False)


FAMILIES = {"siglip2_naflex": _siglip2_naflex, "internvit": _internvit, "eva02": _eva02,
            "convnext": _convnext, "qwen2_5_vl": _qwen2_5_vl, "sd_unet": _sd_unet, "dit": _dit, "sd3": _sd3}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
  return fx.tiny_llm_dir(str(tmp_path_factory.mktemp("llm")))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tower_family_trains_and_scores(family, llm, tmp_path):
  tower = FAMILIES[family](tmp_path / family)

  run = tmp_path / "stage1"
  _run(train, [f"--vision_model={tower}", f"--llm_model={llm}", "--stage=1", "--data=easy-vqa",
               f"--output_dir={run}", "--max_steps=2", "--batch_size=8", "--max_len=16",
               "--learning_rate=1e-2", "--image_tokens=mean", "--eval_limit=8",
               "--eval_batch_size=8", "--save_every=2", "--progress=false"])
  summary = json.load(open(run / "summary.json"))
  assert summary["steps"] == 2 and summary["eval"]["pairs"] == 8
  assert math.isfinite(summary["eval"]["a_score"]) and summary["eval"]["a_score"] < 0

  out = tmp_path / "report"
  _run(score, [f"--vision_models={tower},pixel-patches@res=32", f"--text_model={llm}",
               "--data=easy-vqa", "--max_samples=12", f"--cache_dir={tmp_path / 'cache'}",
               "--metrics=gw,cka,mutual_knn", "--knn_k=3", "--gw_solver=entropic",
               "--c_score_pairs=homography", "--c_score_images=astronaut",
               "--c_score_pairs_per_image=1", "--c_score_keypoints=8", "--bootstrap=0",
               "--permutations=0", "--progress=false", f"--output_dir={out}"])
  result = json.load(open(out / "scores.json"))
  assert len(result["candidates"]) == 2
  for candidate, values in result["scores"].items():
    assert math.isfinite(values["gw"]) and values["gw"] >= 0, (candidate, values)
    assert 0 <= values["cka"] <= 1 + 1e-6 and 0 <= values["mutual_knn"] <= 1, (candidate, values)
    assert 0 <= values["c_score"] <= 100, (candidate, values)
