"""The VLC recipe configs carry the reference code's values: each row below is one config
field, the value the reference uses and where in the reference it is written (guilk/VLC
at its released commit; dandelin/ViLT, which VLC builds on). Only configs are built, no
model. Deviations that stay are in docs/DECISIONS.md's table, not here."""

from __future__ import annotations

import pytest

from vlp_jax import config_lib
from vlp_jax.configs import common, vlc_classify, vlc_nlvr2, vlc_retrieval, vlc_vitb16, vlc_vqa

CONFIGS = {
  "vlc_vitb16": vlc_vitb16.get_config,
  "vlc_vqa": vlc_vqa.get_config,
  "vlc_nlvr2": vlc_nlvr2.get_config,
  "vlc_retrieval:coco": lambda: vlc_retrieval.get_config("dataset=coco"),
  "vlc_retrieval:f30k": lambda: vlc_retrieval.get_config("dataset=f30k"),
  "vlc_classify": vlc_classify.get_config,
}

VLC_CONFIG = "guilk/VLC vlc/config.py"
VLC_README = "guilk/VLC README.md"
MAE_TRANSFORMS = "guilk/VLC vlc/transforms/mae_transforms.py"
VLC_UTILS = "guilk/VLC vlc/modules/vlc_utils.py"
IMAGENET_README = "guilk/VLC imagenet_classification/README.md"
IMAGENET_MAIN = "guilk/VLC imagenet_classification/main_finetune.py"

# (config, field, reference value, where the reference says so)
RECIPES = [
  # ---- pretraining (README: task_mlm_itm_mae whole_word_masking=True step25k image_size=384)
  ("vlc_vitb16", "method", "vlc", f"{VLC_README}: python run.py with task_mlm_itm_mae"),
  ("vlc_vitb16", "batch_size", 4096, f"{VLC_CONFIG}: task_mlm_itm_mae batch_size = 4096"),
  ("vlc_vitb16", "total_steps", 25_000, f"{VLC_CONFIG}: step25k max_steps = 25000"),
  ("vlc_vitb16", "model.image.image_size", 384, f"{VLC_README}: pre-training image_size=384"),
  ("vlc_vitb16", "model.text.context_length", 40, f"{VLC_CONFIG}: max_text_len = 40"),
  ("vlc_vitb16", "vlc.whole_word", True, f"{VLC_README}: pre-training whole_word_masking=True"),
  ("vlc_vitb16", "vlc.mlm_ratio", 0.15, f"{VLC_CONFIG}: mlm_prob = 0.15"),
  ("vlc_vitb16", "vlc.mask_ratio", 0.6, f"{VLC_CONFIG}: task_mlm_itm_mae mask_ratio = 0.6"),
  (
    "vlc_vitb16",
    "vlc.mae_weight",
    1.0,
    f"{VLC_README}: pre-training mae_weight=1.0 (vlc/config.py: mae_weight = 1.0)",
  ),
  (
    "vlc_vitb16",
    "vlc.itm_weight",
    1.0,
    f'{VLC_CONFIG}: task_mlm_itm_mae loss_names {{"itm": 1, "mlm": 1, "mae": 1}}',
  ),
  (
    "vlc_vitb16",
    "vlc.mlm_weight",
    1.0,
    f'{VLC_CONFIG}: task_mlm_itm_mae loss_names {{"itm": 1, "mlm": 1, "mae": 1}}',
  ),
  (
    "vlc_vitb16",
    "vlc.wpa",
    True,
    "guilk/VLC vlc/modules/vlc_module.py: forward adds compute_itm_wpa's outputs whenever "
    'itm is a task, training_step sums every key with "loss" in it (itm_wpa_loss too)',
  ),
  (
    "vlc_vitb16",
    "vlc.wpa_weight",
    0.1,
    'guilk/VLC vlc/modules/objectives.py: compute_itm_wpa "itm_wpa_loss": 0.1 * ot_loss',
  ),
  (
    "vlc_vitb16",
    "data.crop_scale",
    (0.8, 1.0),
    f"{MAE_TRANSFORMS}: mae_transform RandomResizedCrop(size, scale=(0.8, 1.0))",
  ),
  (
    "vlc_vitb16",
    "data.flip",
    True,
    f"{MAE_TRANSFORMS}: mae_transform RandomHorizontalFlip()",
  ),
  (
    "vlc_vitb16",
    "model.image.mean",
    (0.485, 0.456, 0.406),
    f"{MAE_TRANSFORMS}: Normalize(mean=[0.485, 0.456, 0.406], ...)",
  ),
  (
    "vlc_vitb16",
    "model.image.std",
    (0.229, 0.224, 0.225),
    f"{MAE_TRANSFORMS}: Normalize(..., std=[0.229, 0.224, 0.225])",
  ),
  ("vlc_vitb16", "optim.lr", 1e-4, f"{VLC_CONFIG}: learning_rate = 1e-4"),
  ("vlc_vitb16", "optim.weight_decay", 0.01, f"{VLC_CONFIG}: weight_decay = 0.01"),
  ("vlc_vitb16", "optim.warmup_steps", 2500, f"{VLC_CONFIG}: warmup_steps = 2500"),
  (
    "vlc_vitb16",
    "optim.schedule",
    "linear",
    f"{VLC_CONFIG}: decay_power = 1, end_lr = 0 "
    "(vlc/modules/vlc_utils.py: get_polynomial_decay_schedule_with_warmup)",
  ),
  ("vlc_vitb16", "optim.end_lr_ratio", 0.0, f"{VLC_CONFIG}: end_lr = 0"),
  ("vlc_vitb16", "optim.b1", 0.9, f"{VLC_UTILS}: AdamW(..., eps=1e-8, betas=(0.9, 0.98))"),
  ("vlc_vitb16", "optim.b2", 0.98, f"{VLC_UTILS}: AdamW(..., eps=1e-8, betas=(0.9, 0.98))"),
  ("vlc_vitb16", "optim.eps", 1e-8, f"{VLC_UTILS}: AdamW(..., eps=1e-8, betas=(0.9, 0.98))"),
  # ---- VQAv2 (README: task_finetune_vqa_mae_randaug image_size=576 learning_rate=5e-4)
  ("vlc_vqa", "model.image.image_size", 576, f"{VLC_README}: VQAv2 image_size=576"),
  ("vlc_vqa", "optim.lr", 5e-4, f"{VLC_README}: VQAv2 learning_rate=5e-4"),
  ("vlc_vqa", "batch_size", 256, f"{VLC_CONFIG}: task_finetune_vqa_mae_randaug batch_size = 256"),
  (
    "vlc_vqa",
    "finetune.lr_decay",
    0.5,
    f"{VLC_UTILS}: set_schedule param_groups_lrd(layer_decay=0.5)",
  ),
  (
    "vlc_vqa",
    "finetune.crop_scale",
    (0.9, 1.0),
    f"{MAE_TRANSFORMS}: mae_transform_randaug RandomResizedCrop(size, scale=(0.9, 1.0))",
  ),
  ("vlc_vqa", "finetune.flip", False, f"{MAE_TRANSFORMS}: mae_transform_randaug has no flip"),
  # ---- NLVR2 (README: task_finetune_nlvr2_mae_randaug image_size=384 learning_rate=5e-4)
  ("vlc_nlvr2", "model.image.image_size", 384, f"{VLC_README}: NLVR image_size=384"),
  ("vlc_nlvr2", "optim.lr", 5e-4, f"{VLC_README}: NLVR learning_rate=5e-4"),
  (
    "vlc_nlvr2",
    "batch_size",
    128,
    f"{VLC_CONFIG}: task_finetune_nlvr2_mae_randaug batch_size = 128",
  ),
  (
    "vlc_nlvr2",
    "finetune.lr_decay",
    0.5,
    f"{VLC_UTILS}: set_schedule param_groups_lrd(layer_decay=0.5)",
  ),
  (
    "vlc_nlvr2",
    "finetune.crop_scale",
    (0.9, 1.0),
    f"{MAE_TRANSFORMS}: mae_transform_randaug RandomResizedCrop(size, scale=(0.9, 1.0))",
  ),
  # ---- retrieval (README: task_finetune_irtr_{coco,f30k}_mae_randaug 384 px, lr 5e-4)
  ("vlc_retrieval:coco", "model.image.image_size", 384, f"{VLC_README}: COCO IR/TR image_size=384"),
  ("vlc_retrieval:coco", "optim.lr", 5e-4, f"{VLC_README}: COCO IR/TR learning_rate=5e-4"),
  ("vlc_retrieval:f30k", "optim.lr", 5e-4, f"{VLC_README}: Flickr30K IR/TR learning_rate=5e-4"),
  (
    "vlc_retrieval:coco",
    "batch_size",
    256,
    f"{VLC_CONFIG}: task_finetune_irtr_coco_mae_randaug batch_size = 256",
  ),
  ("vlc_retrieval:coco", "finetune.num_negatives", 15, f"{VLC_CONFIG}: draw_false_text = 15"),
  (
    "vlc_retrieval:coco",
    "finetune.itm_weight",
    0.0,
    f'{VLC_UTILS}: set_task keeps the losses with weight >= 1, so loss_names {{"itm": 0.5, '
    '"irtr": 1}} trains irtr alone (dandelin/ViLT vilt/modules/vilt_utils.py: the same set_task)',
  ),
  (
    "vlc_retrieval:f30k",
    "finetune.itm_weight",
    0.0,
    f"{VLC_UTILS}: set_task drops the 0.5-weighted itm loss",
  ),
  (
    "vlc_retrieval:coco",
    "data.crop_scale",
    (0.9, 1.0),
    f"{MAE_TRANSFORMS}: mae_transform_randaug RandomResizedCrop(size, scale=(0.9, 1.0))",
  ),
  (
    "vlc_retrieval:coco",
    "data.flip",
    False,
    f"{MAE_TRANSFORMS}: mae_transform_randaug has no flip",
  ),
  (
    "vlc_retrieval:coco",
    "finetune.lr_decay",
    0.5,
    f"{VLC_UTILS}: set_schedule param_groups_lrd(layer_decay=0.5)",
  ),
  # ---- ImageNet-1k (imagenet_classification: MAE's fine-tuning)
  ("vlc_classify", "batch_size", 1024, f"{IMAGENET_README}: effective batch size 64 x 16 = 1024"),
  ("vlc_classify", "optim.lr", 2e-3, f"{IMAGENET_README}: --blr 5e-4, lr = blr x 1024 / 256"),
  ("vlc_classify", "finetune.lr_decay", 0.65, f"{IMAGENET_README}: --layer_decay 0.65"),
  ("vlc_classify", "optim.weight_decay", 0.05, f"{IMAGENET_README}: --weight_decay 0.05"),
  ("vlc_classify", "finetune.label_smoothing", 0.1, f"{IMAGENET_MAIN}: --smoothing default 0.1"),
  ("vlc_classify", "model.image.image_size", 224, f"{IMAGENET_MAIN}: --input_size default 224"),
  (
    "vlc_classify",
    "optim.schedule",
    "cosine",
    "guilk/VLC imagenet_classification/util/lr_sched.py",
  ),
  (
    "vlc_classify",
    "finetune.crop_scale",
    (0.08, 1.0),
    "guilk/VLC imagenet_classification/util/datasets.py: timm create_transform",
  ),
  (
    "vlc_classify",
    "finetune.flip",
    True,
    "guilk/VLC imagenet_classification/util/datasets.py: timm create_transform",
  ),
]


def _field(config, key: str):
  for part in key.split("."):
    config = config[part]
  return tuple(config) if isinstance(config, list | tuple) else config


@pytest.fixture(scope="module")
def configs():
  return {name: get() for name, get in CONFIGS.items()}


@pytest.mark.parametrize(
  ("name", "key", "expected", "source"),
  RECIPES,
  ids=[f"{name}.{key}" for name, key, *_ in RECIPES],
)
def test_recipe_default_is_the_reference_value(configs, name, key, expected, source):
  found = _field(configs[name], key)
  if isinstance(expected, float):
    assert found == pytest.approx(expected, rel=1e-9), source
  else:
    assert found == expected, source


def test_recipes_pass_the_rules_and_state_epochs_as_the_reference(configs):
  for config in configs.values():
    config_lib.check_rules(config, common.config_rules(config.method))
  # Warm-up 10% of every fine-tuning run (vlc/config.py: warmup_steps = 0.1), epochs as
  # vlc/config.py's max_epoch: VQA 10 over ~650k questions at 256, NLVR2 20 over 86,373 at
  # 128, COCO 20 and Flickr30k 10 over their captions at 256.
  for name in ("vlc_vqa", "vlc_nlvr2", "vlc_retrieval:coco", "vlc_retrieval:f30k"):
    config = configs[name]
    assert config.optim.warmup_steps == config.total_steps // 10, name
  assert configs["vlc_nlvr2"].total_steps == pytest.approx(20 * 86_373 / 128, rel=0.01)
  # MAE's cosine ends at --min_lr 1e-6 (imagenet_classification/main_finetune.py), after
  # --warmup_epochs 5 of --epochs 100.
  classify = configs["vlc_classify"]
  assert classify.optim.lr * classify.optim.end_lr_ratio == pytest.approx(1e-6)
  assert classify.total_steps == 20 * classify.optim.warmup_steps


def test_the_switches_turn_the_reference_extras_off():
  config = vlc_vitb16.get_config("wpa=False,flip=False")
  assert not config.vlc.wpa and not config.data.flip
  assert vlc_retrieval.get_config("itm_weight=0.5").finetune.itm_weight == 0.5
  assert vlc_vqa.get_config("image_size=384,lr=1e-4").optim.lr == 1e-4
  # The defaults of the VLC fine-tuning methods' configs are the reference's too.
  base = common.base_config("vlc_retrieval")
  assert base.vlc.wpa and base.vlc.wpa_weight == 0.1 and base.finetune.itm_weight == 0.0
