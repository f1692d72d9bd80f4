"""The base config: what the trainer, data pipeline, mesh and evaluator read, with
defaults; each config file changes only what differs. A method's own fields (config.albef,
config.vlc, ...) are declared on its module (vlp_jax/methods, CONFIG_BLOCKS) and merged by
base_config(method) / use_method, so a run's config.json carries only its method's."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from vlp_jax import methods
from vlp_jax.config_lib import (
  Rule,
  at_least,
  each,
  fraction_interval,
  in_range,
  one_of_or,
  positive,
)
from vlp_jax.configs import model
from vlp_jax.evaluation import tasks as eval_tasks


def base_config(method: str = "contrastive") -> ml_collections.ConfigDict:
  """Every field a run of `method` reads, with defaults: the base fields below and the
  method's own blocks (methods.CONFIG_BLOCKS); variant configs override a few."""
  config = ml_collections.ConfigDict()
  # Training method (vlp_jax/methods): "contrastive" (CLIP, SigLIP, FLIP / cluster
  # masking, LiT / LilT / LoRA: config.loss, masking, peft), "negclip", "albef", "cmask" or
  # "vlc"; fine-tuning a VLC run: "vlc_vqa", "vlc_nlvr2", "vlc_retrieval", "vlc_classify".
  # Set by base_config(method) or use_method, which also bring the method's own blocks.
  config.method = method
  config.seed = 0  # Seeds initialisation, data order, augmentation and masking.
  config.batch_size = 256  # Global batch (all processes together).
  config.total_steps = 0  # Training steps; 0 derives them from num_epochs.
  config.num_epochs = 1.0  # Used when total_steps is 0: epochs over config.data.train.
  # Device mesh axis -> size; -1 takes the remaining devices. The batch splits over
  # "data" and "fsdp"; "fsdp" > 1 also shards parameters and optimizer state (FSDP);
  # "tensor" > 1 splits the transformer's MLP and attention weights (Megatron-style).
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  model.add_model(config)
  _add_training(config)
  _add_masking(config)
  _add_data(config)
  _add_optim(config)
  _add_eval(config)
  _add_run_control(config)
  use_method(config, method)
  return config


def _add_training(config: ml_collections.ConfigDict) -> None:
  """config.peft, config.loss and gradient accumulation."""
  # What trains (vlp_jax/peft.py): "all" (CLIP), "lit" (image tower frozen), "lilt"
  # (towers frozen but layer norms, adapters, projections), "bitfit" (biases, projections),
  # "unlock_last" (last block per tower, projections), "lora" (LoRA factors only).
  config.peft = ml_collections.ConfigDict()
  config.peft.preset = "all"
  # Per-tower overrides of the preset's mode: "all", "frozen", "lilt", "bitfit",
  # "unlock_last", "lora"; "": the preset's. E.g. a pretrained text tower, locked: text="frozen".
  config.peft.image = ""
  config.peft.text = ""
  config.peft.adapter_reduction = 4  # lilt: adapter width = tower width / this.
  config.peft.lora_rank = 16  # lora: rank of A (in x r) and B (r x out).
  config.peft.lora_alpha = 32.0  # lora: the update is (alpha / rank) * x A B.
  # lora: comma list of Dense names to adapt (e.g. "in_proj,out_proj"); "": all of them.
  config.peft.lora_targets = ""
  # Regex over parameter paths that also train, e.g. "logit_scale|proj" or "attn/".
  config.peft.train_also = ""

  config.loss = ml_collections.ConfigDict()
  config.loss.kind = "clip"  # "clip" (softmax InfoNCE) or "siglip" (pairwise sigmoid).
  # clip: "auto" (XLA places the gathers), "gathered" (all-gather features, full logits
  # on every device) or "local" (each device scores its own rows). siglip: "auto"/"full"
  # (B x B logits) or "ring" (text chunks passed around the devices; b x b at a time).
  config.loss.form = "auto"
  # Split each global batch into this many microbatches, with negatives shared across the
  # whole batch (features are cached, then each microbatch is re-run with gradients).
  config.grad_accum_steps = 1


def _add_masking(config: ml_collections.ConfigDict) -> None:
  """config.masking: image patch masking (the contrastive method's; others refuse it)."""
  config.masking = ml_collections.ConfigDict()
  config.masking.kind = "none"  # Image patch masking: "none", "random" (FLIP), "cluster", "kmeans".
  # random: share of patches dropped. cluster/kmeans: target batch-mean mask ratio.
  config.masking.ratio = 0.5
  # cluster/kmeans: the clusters cover at least this share of every image.
  config.masking.min_ratio = 0.3
  # cluster/kmeans: how many of the L patches the image tower gets. "reference" (the
  # released code): floor(L * (1 - min_ratio)), so at ratio 0.5 it still sees 70%, masked
  # patches re-admitted to fill. "target": round(L * (1 - ratio)), dropping exactly the
  # ratio (extra visible patches dropped at random where the clusters covered less).
  config.masking.keep = "reference"
  config.masking.anchor_ratio = 0.03  # cluster: share of patches drawn as anchors.
  config.masking.calibration_steps = 24  # cluster: bisection steps for the threshold.
  config.masking.num_clusters = 8  # kmeans: clusters per image.
  config.masking.kmeans_iterations = 10  # kmeans: Lloyd iterations.
  config.masking.show_every_steps = 0  # Log a mask picture to TensorBoard every N steps.


def _add_data(config: ml_collections.ConfigDict) -> None:
  """config.data: training and held-out data, tokenizer, augmentation."""
  config.data = ml_collections.ConfigDict()
  # Training shards: a dir, glob or comma list; "a:0.7,b:0.3" (or a list of such strings)
  # mixes shard sets by weight. "": the built-in dataset.
  config.data.train = ml_collections.FieldReference("", field_type=object)
  config.data.eval = ""  # Held-out retrieval shards; "": the built-in held-out split.
  # Tokeniser: "wordpiece" (BERT), "sentencepiece" or "clip_bpe" (CLIP's byte-level BPE).
  config.data.tokenizer = "wordpiece"
  # Its file: WordPiece vocab (one token per line), SentencePiece `.model`, or CLIP's merges
  # (bpe_simple_vocab_16e6.txt.gz). "": the built-in dataset's WordPiece vocab.
  config.data.vocab_file = ""
  # Lower-case (WordPiece: and strip accents) first; SentencePiece uses its own normaliser.
  config.data.lower_case = True
  config.data.cache_dir = ""  # Where the built-in dataset is written; "": ~/.cache/vlp_jax.
  config.data.crop_scale = (0.5, 1.0)  # Random-resized-crop area range.
  config.data.flip = True  # Random horizontal flips.
  config.data.num_workers = 2  # grain worker processes (0: decode in the trainer process).
  config.data.read_threads = 4  # Threads per process reading and decoding records.
  # Fail when more corrupt records than this. Fine-tuning (vqa / nlvr2) first looks at its
  # task images and fails before training; <workdir>/unreadable_images.txt lists them all.
  config.data.max_skipped_fraction = 0.01
  config.data.builtin = ml_collections.ConfigDict()
  config.data.builtin.num_train = 10_000  # Generated training pairs.
  config.data.builtin.num_heldout = 1_000  # Generated held-out pairs (unseen combinations).
  config.data.builtin.image_size = 64  # Rendered resolution.
  config.data.builtin.vocab_size = 1_000  # Upper bound for the learned WordPiece vocab.
  config.data.builtin.seed = 0  # Generator seed (independent of config.seed).


def _add_optim(config: ml_collections.ConfigDict) -> None:
  """config.optim: schedule and AdamW."""
  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 5e-4  # Peak learning rate.
  config.optim.warmup_steps = 2_000  # Linear warmup, then the decay of optim.schedule.
  config.optim.warmup_start_ratio = 0.0  # The warm-up starts at lr x this (ALBEF: 0.1).
  config.optim.schedule = "cosine"  # Decay after warm-up: "cosine" or "linear" (VLC).
  config.optim.end_lr_ratio = 0.0  # Final lr as a share of the peak.
  config.optim.weight_decay = 0.2  # AdamW decoupled decay on matrices.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.98
  config.optim.eps = 1e-6
  config.optim.grad_clip_norm = 1.0  # Global-norm clipping.


def _add_eval(config: ml_collections.ConfigDict) -> None:
  """config.eval: what evaluation runs and its options."""
  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 1_000  # Run config.eval.tasks every N steps (0: only at the end).
  config.eval.batch_size = 256  # Global eval batch.
  config.eval.max_captions = 5  # Captions per image kept for retrieval (COCO has 5).
  # Tasks run at every evaluation and by eval.py (its --tasks overrides): comma list of
  # registered tasks (vlp_jax/evaluation/tasks/, one module each; eval.py --help lists
  # them), e.g. heldout (retrieval on data.eval, plus the built-in set's compositional
  # probe) or fine-tuned heads' vqa ("builtin" data: the generated sets of config.finetune,
  # the fine-tuning methods' block).
  config.eval.tasks = "heldout"
  # Dataset of each task that reads one: "path[,key=value...]", several joined by ";"
  # (eval.py: --data.<task>=...); formats and options: each task module's docstring.
  config.eval.data = ml_collections.ConfigDict(eval_tasks.data_fields())
  config.eval.recall_ks = (1, 5, 10)  # Retrieval recall@k.
  # Methods with an image-text matching head (ALBEF): retrieval also re-ranks each query's
  # top rerank_k candidates by ITA similarity with the ITM score (ALBEF's protocol,
  # evaluation/rerank.py), and the compositional tasks also score with ITM; 0: off. Here,
  # not a task's option: seven tasks share it (evaluation/tasks/base.py Context.matcher).
  config.eval.rerank_k = 128
  # Each registered task's own options, declared on its module (TaskDef.options), e.g.
  # config.eval.svo.threshold, config.eval.linear_probe.lr, config.eval.itm_retrieval.shortlist.
  for name, options in eval_tasks.option_fields().items():
    if name in config.eval:
      raise ValueError(f"evaluation task {name!r}: its options would replace config.eval.{name}")
    config.eval[name] = options


def _add_run_control(config: ml_collections.ConfigDict) -> None:
  """Logging, checkpoints, restarts, profiling."""
  config.log_every_steps = 50  # Fetch and write metrics every N steps.
  config.checkpoint_every_steps = 1_000  # Save a checkpoint every N steps (and at the end).
  config.keep_checkpoints = 3  # Newest checkpoints kept on disk.
  # Initialise the parameters (not the optimizer) from another run's newest checkpoint
  # when this workdir has none: e.g. FLIP's unmasked tuning after masked pretraining.
  config.init_from = ""
  config.stop_after_steps = 0  # End this run after N steps (checkpointed); 0: run to the end.
  config.max_nonfinite_streak = 20  # Stop after this many non-finite losses in a row.
  # jax.profiler trace of steps [profile_first_step, + profile_num_steps) into the workdir
  # (TensorBoard's profile tab); 0: no trace.
  config.profile_first_step = 0
  config.profile_num_steps = 5
  # Peak FLOP/s of one device for the logged MFU (perf/mfu); 0: look up the device kind
  # (A100, H100, TPU v4/v5/v6), and no MFU where unknown (e.g. CPUs).
  config.peak_flops_per_device = 0.0


def use_method(config: ml_collections.ConfigDict, method: str) -> None:
  """Makes `config` a config of `method`: config.method set, the method's blocks added with
  their defaults where absent (kept where present: cmask keeps an ALBEF config's albef
  block), other methods' blocks removed."""
  own = {block.name: block for block in methods.config_blocks(method)}
  with config.unlocked():
    config.method = method
    for name in methods.block_owners():
      if name in config and name not in own:
        del config[name]
    for name, block in own.items():
      if name not in config:
        config[name] = block.defaults()


def config_rules(method: str) -> dict[str, Rule]:
  """The rules of a `method` run's config: the base RULES, those of the registered
  evaluation tasks' options (config.eval.<task>) and those of the method's blocks."""
  rules = {**RULES, **eval_tasks.option_rules()}
  for block in methods.config_blocks(method):
    rules.update(block.config_rules())
  return rules


def run_base(values: Mapping[str, Any]) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The base config of a run's config.json `values` (its method's) and the values to set
  on it: keys since moved to a task's options at their new place, blocks of other methods
  dropped (runs before per-method blocks wrote them all)."""
  base = base_config(values.get("method", "contrastive"))
  values = _moved(values)
  owners = methods.block_owners()
  return base, {key: v for key, v in values.items() if key in base or key not in owners}


# Keys a run's config.json may hold that moved to an evaluation task's options: old path
# -> new path (both under config). A value at the new path wins.
MOVED_KEYS = {
  "eval.templates": "eval.zeroshot_classification.templates",
  "eval.svo_threshold": "eval.svo.threshold",
  "finetune.shortlist": "eval.itm_retrieval.shortlist",
  "finetune.shortlist_k": "eval.itm_retrieval.shortlist_k",
}


def _moved(values: Mapping[str, Any]) -> dict[str, Any]:
  """`values` (nested, copied where changed) with MOVED_KEYS at their new paths."""
  values = json.loads(json.dumps(values))  # A deep copy: config.json's values are JSON.
  for old, new in MOVED_KEYS.items():
    *old_parents, old_name = old.split(".")
    node = values
    for part in old_parents:
      node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or old_name not in node:
      continue
    value = node.pop(old_name)
    *new_parents, new_name = new.split(".")
    target = values
    for part in new_parents:
      target = target.setdefault(part, {})
    target.setdefault(new_name, value)
  return values


# The valid range of every numeric field of base_config, checked before any compute
# (vlp_jax.config_lib.check_rules). Rules that involve several fields (batch divisibility,
# masking.min_ratio <= masking.ratio, ...) stay where the fields are used. A *_every_steps
# of 0 means "never" where the loop can skip the event (eval: only at the end, mask
# pictures); logging and checkpointing have no "never", so they need >= 1.
_DEVICES = one_of_or((-1,), at_least(1))  # -1: the remaining devices.
RULES: dict[str, Rule] = {
  "seed": at_least(0),
  "batch_size": at_least(1),
  "total_steps": at_least(0),  # 0: from num_epochs.
  "num_epochs": at_least(0),
  "mesh.data": _DEVICES,
  "mesh.fsdp": _DEVICES,
  "mesh.tensor": _DEVICES,
  **model.RULES,
  "peft.adapter_reduction": at_least(1),
  "peft.lora_rank": at_least(1),
  "peft.lora_alpha": positive(),
  "grad_accum_steps": at_least(1),
  "masking.ratio": in_range(0, 1, include_high=False),
  "masking.min_ratio": in_range(0, 1, include_high=False),
  "masking.anchor_ratio": in_range(0, 1),
  "masking.calibration_steps": at_least(1),
  "masking.num_clusters": at_least(1),  # kmeans needs 2: masking.validate.
  "masking.kmeans_iterations": at_least(1),
  "masking.show_every_steps": at_least(0),  # 0: never.
  "data.crop_scale": fraction_interval(),
  "data.num_workers": at_least(0),  # 0: decode in the trainer process.
  "data.read_threads": at_least(1),
  "data.max_skipped_fraction": in_range(0, 1),
  "data.builtin.num_train": at_least(1),
  "data.builtin.num_heldout": at_least(1),
  "data.builtin.image_size": at_least(1),
  "data.builtin.vocab_size": at_least(1),
  "data.builtin.seed": at_least(0),
  "optim.lr": positive(),
  "optim.warmup_steps": at_least(0),
  "optim.warmup_start_ratio": in_range(0, 1),
  "optim.end_lr_ratio": in_range(0, 1),
  "optim.weight_decay": at_least(0),
  "optim.b1": in_range(0, 1, include_high=False),
  "optim.b2": in_range(0, 1, include_high=False),
  "optim.eps": positive(),
  "optim.grad_clip_norm": positive(),  # 0 would clip every update to nothing.
  "eval.every_steps": at_least(0),  # 0: only at the end.
  "eval.batch_size": at_least(1),
  "eval.max_captions": at_least(1),
  "eval.recall_ks": each(at_least(1)),
  "eval.rerank_k": at_least(0),  # 0: no ITM re-ranking.
  "log_every_steps": at_least(1),
  "checkpoint_every_steps": at_least(1),
  "keep_checkpoints": at_least(1),  # 0 would delete every checkpoint, the last one too.
  "stop_after_steps": at_least(0),  # 0: run to the end.
  "max_nonfinite_streak": at_least(1),
  "profile_first_step": at_least(0),  # 0: no trace.
  "profile_num_steps": at_least(1),
  "peak_flops_per_device": at_least(0),  # 0: look up the device kind.
}
