"""config.finetune: the block of the four methods that fine-tune a VLC run (vlc_vqa,
vlc_nlvr2, vlc_retrieval, vlc_classify; vlc_finetune.py), declared here as the other
methods declare theirs (methods.CONFIG_BLOCKS), so only their runs carry it. The
evaluation of their heads reads it too: the VQA answers and the generated ("builtin")
sets are the fine-tuning run's (input_pipeline/finetune_data.py)."""

from __future__ import annotations

import ml_collections

from vlp_jax.config_lib import ConfigBlock, at_least, fraction_interval, in_range, positive


def _config_defaults() -> ml_collections.ConfigDict:
  """config.finetune. The encoder is config.model's, read as for "vlc" (config.vlc): give
  the pretraining run's model and tokenizer."""
  finetune = ml_collections.ConfigDict()
  # The VLC run (its workdir) whose newest checkpoint gives the encoder and pooler (and
  # the retrieval rank head, from its ITM head), loaded when this workdir has no
  # checkpoint yet; "none": random initialisation, on purpose ("" is refused when a fresh
  # run starts: a fine-tune without its pretraining would look valid and is not).
  finetune.pretrained = ""
  # The task's training data, one spec ("builtin": the generated set below): vqa
  # "QUESTIONS_JSON,annotations=ANNOTATIONS_JSON,images=COCO_DIR", nlvr2
  # "train.json,images=DIR", classify a class-folder tree or wds directory
  # [,train_split=train]. Retrieval trains on config.data.train's image-text shards.
  # Evaluation reads config.eval.data.<vqa|nlvr2|classify_finetuned|itm_retrieval>.
  finetune.train = "builtin"
  # VQA answers (the head's outputs): a file, one answer per line; "": the answers that
  # are the most common answer of >= min_answer_count training questions (VQAv2: 3,129).
  finetune.answers = ""
  finetune.min_answer_count = 9
  # Layer-wise lr decay: encoder block i trains at lr * lr_decay ** (depth - i), the
  # embeddings at lr * lr_decay ** (depth + 1), final norm, pooler and heads at lr (VLC: 0.5).
  finetune.lr_decay = 0.5
  # The new heads' (VQA, NLVR2, classifier) lr multiplier. VLC's layer-wise groups give
  # them 1 (its lr_mult=10 only reaches its pretraining-style groups, as ViLT's do).
  finetune.head_lr_multiplier = 1.0
  # Random-resized-crop area range of training images; None: the whole image (the demos:
  # a crop could cut away what is asked about; configs/vlc_*.py: VLC's (0.9, 1.0)).
  # Flips: classify only.
  finetune.crop_scale = ml_collections.FieldReference(None, field_type=tuple)
  finetune.flip = False
  # Retrieval: other rows' captions each image is ranked against besides its own (VLC:
  # 15 drawn captions) and the ITM loss weight beside the rank loss, ITM head frozen. 0, as
  # VLC and ViLT train: their configs list "itm": 0.5, but set_task keeps only the losses
  # of weight >= 1, so the rank head trains alone. (Its evaluation's shortlist:
  # config.eval.itm_retrieval.)
  finetune.num_negatives = 15
  finetune.itm_weight = 0.0
  finetune.label_smoothing = 0.1  # Classify (MAE's fine-tuning recipe).
  # The generated sets ("builtin"): VQA images (3 questions each) or NLVR2 statement
  # pairs of the training and evaluation splits, their rendered size and seed.
  finetune.builtin = ml_collections.ConfigDict()
  finetune.builtin.num_train = 2_000
  finetune.builtin.num_eval = 300
  finetune.builtin.image_size = 64
  finetune.builtin.seed = 0
  # NLVR2 statement kinds (comma list of more, both_colour, contains, fewer_shapes, total:
  # input_pipeline/builtin_nlvr2.py); "": all of them.
  finetune.builtin.nlvr2_statements = ""
  return finetune


# The block a fine-tuning run carries (vlp_jax.configs.common.base_config(method)) and the
# valid range of its numeric fields, checked before any compute.
CONFIG_BLOCK = ConfigBlock(
  "finetune",
  _config_defaults,
  {
    "min_answer_count": at_least(1),
    "lr_decay": in_range(0, 1, include_high=True),  # 1: no decay.
    "head_lr_multiplier": positive(),
    "crop_scale": fraction_interval(),  # None: the whole image.
    "num_negatives": at_least(1),  # < batch_size: methods/vlc_retrieval.py.
    "itm_weight": at_least(0),
    "label_smoothing": in_range(0, 1, include_high=False),
    "builtin.num_train": at_least(2),
    "builtin.num_eval": at_least(1),
    "builtin.image_size": at_least(8),
    "builtin.seed": at_least(0),
  },
)
