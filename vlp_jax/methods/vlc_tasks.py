"""Fine-tuning a VLC run on its downstream tasks (config.method "vlc_vqa", "vlc_nlvr2",
"vlc_retrieval", "vlc_classify"), as the VLC reference code does them:

- vqa: the pooled state -> Dense(2W) -> LayerNorm -> GELU -> Dense(answers) (ViLT's
  vqa_classifier); binary cross-entropy with the soft scores, averaged over rows and
  answers and multiplied by the number of answers (ViLT / VLC, after ban-vqa).
- nlvr2: two encoder passes with the same text, the left image with token type 1 and
  the right one with type 2 (type 2 starts as a copy of type 1, as VLC and ViLT do);
  the two pooled states concatenated -> the same MLP shape -> 2 logits; cross-entropy.
- retrieval: a rank head Dense(1) initialised from the ITM head's "matched" row; each
  image is scored against its caption and `num_negatives` captions of other rows of the
  batch, cross-entropy towards its own (VLC's irtr, whose negatives are drawn from the
  dataset); the ITM head stays frozen. `itm_weight` > 0 adds that x the ITM loss
  (random-image negatives): VLC's config lists 0.5, but its set_task drops every loss
  weighted under 1, so the reference trains the rank loss alone (itm_weight 0).
- classify: the image alone (no text tokens); the mean of the patch states -> LayerNorm
  -> Dense(classes) (MAE's fine-tuning head with global pooling, which VLC's ImageNet
  fine-tune uses); cross-entropy with label smoothing.

Nothing is masked when fine-tuning. Every parameter trains in one group with
layer-wise lr decay (methods/vlc.py, VLC's param_groups_lrd: block i at lr * decay **
(depth - i)); the new heads can get an extra lr multiplier. VQA, NLVR2 and classify read
their own training data (`train_data`, config.finetune.train); retrieval trains on the
image-text shards of config.data.train. `pretrained_params` loads the encoder and
pooler (and the ITM head) of config.finetune.pretrained's newest checkpoint.

Prediction functions: "vqa_logits" (params, images, tokens) -> (B, answers),
"nlvr2_logits" (params, left, right, tokens) -> (B, 2), "class_logits" (params, images)
-> (B, classes), and for retrieval "match_image" / "match_score" (the rank head), which
evaluation/finetune.py and evaluation/rerank.py read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags, logging
from flax import traverse_util

from vlp_jax import losses, processes
from vlp_jax.config_lib import ConfigError
from vlp_jax.evaluation import classification_readers as cls_readers
from vlp_jax.evaluation import finetune
from vlp_jax.evaluation.embedding import DataError, ImageRef
from vlp_jax.input_pipeline import image_files, pipeline, task_data
from vlp_jax.methods import vlc
from vlp_jax.methods.base import (
  Batch,
  DataContext,
  Extra,
  Method,
  MethodContext,
  Metrics,
  Params,
  PredictFn,
  dropout_rngs,
)
from vlp_jax.models.heads import ItmHead
from vlp_jax.models.single_stream import IMAGE_TYPE, SECOND_IMAGE_TYPE, SingleStreamEncoder

TASKS = ("vqa", "nlvr2", "retrieval", "classify")
NO_PRETRAINED = "none"  # config.finetune.pretrained: random initialisation, on purpose.
NEW_HEADS = ("vqa_head", "nlvr2_head", "fc_norm", "class_head")  # head_lr_multiplier's
FROZEN = "itm_head"  # Retrieval keeps the pretrained ITM head, as VLC does.
_INIT = nn.initializers.normal(0.02)  # ViLT's init_weights for its heads.
_CLASS_HEAD_INIT = nn.initializers.normal(2e-5)  # MAE's fine-tuning head.

# ---------------------------------------------------------------- model


class ClassifierMlp(nn.Module):
  """ViLT's vqa / nlvr2 classifier: Dense(hidden) -> LayerNorm -> GELU -> Dense(outputs)."""

  hidden: int
  outputs: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_INIT, name="dense_0")(x)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln")(x)  # torch's default eps.
    x = nn.gelu(x, approximate=False)  # torch.nn.GELU: exact.
    return nn.Dense(self.outputs, dtype=self.dtype, kernel_init=_INIT, name="dense_1")(x)


class TaskModel(nn.Module):
  """A VLC encoder with its pooler (as models.single_stream.SingleStream names them, so
  a pretraining run's parameters copy over) and one task's head."""

  encoder: SingleStreamEncoder
  task: str
  num_outputs: int = 0  # VQA answers or classes.

  def setup(self) -> None:
    width, dtype = self.encoder.size.width, self.encoder.dtype
    if self.task != "classify":
      self.pooler = nn.Dense(width, dtype=dtype, kernel_init=_INIT)
    if self.task == "vqa":
      self.vqa_head = ClassifierMlp(2 * width, self.num_outputs, dtype)
    elif self.task == "nlvr2":
      self.nlvr2_head = ClassifierMlp(2 * width, 2, dtype)
    elif self.task == "retrieval":
      self.rank_head = nn.Dense(1, dtype=dtype, kernel_init=_INIT)
      self.itm_head = ItmHead(dtype)
    elif self.task == "classify":
      self.fc_norm = nn.LayerNorm(epsilon=1e-6, dtype=dtype)
      self.class_head = nn.Dense(self.num_outputs, dtype=dtype, kernel_init=_CLASS_HEAD_INIT)
    else:
      raise ValueError(f"unknown task {self.task!r}; known: {TASKS}")

  def pooled(self, images: jax.Array, tokens: jax.Array, image_type: int = IMAGE_TYPE):
    """ViLT's pooler over the first token (the text's [CLS]): (B, W)."""
    text, _ = self.encoder(images, tokens, None, image_type)
    return jnp.tanh(self.pooler(text[:, 0]))

  def __call__(
    self, images: jax.Array, tokens: jax.Array | None = None, images2: jax.Array | None = None
  ) -> jax.Array:
    """The task's outputs: VQA (B, answers) and NLVR2 (B, 2) logits, retrieval (B,) rank
    scores, classify (B, classes) logits."""
    if self.task == "vqa":
      return self.vqa_head(self.pooled(images, tokens))
    if self.task == "nlvr2":
      pair = [
        self.pooled(images, tokens, IMAGE_TYPE),
        self.pooled(images2, tokens, SECOND_IMAGE_TYPE),
      ]
      return self.nlvr2_head(jnp.concatenate(pair, axis=-1))
    if self.task == "retrieval":
      return self.rank_head(self.pooled(images, tokens))[:, 0]
    no_text = jnp.zeros((images.shape[0], 0), jnp.int32)
    _, image = self.encoder(images, no_text)
    return self.class_head(self.fc_norm(jnp.mean(image[:, 1:], axis=1)))

  def itm_logits(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """The (frozen) ITM head's logits (B, 2); retrieval only."""
    return self.itm_head(self.pooled(images, tokens))

  def _every_head(self, images, tokens, images2):
    out = self(images, tokens, images2)
    return (out, self.itm_logits(images, tokens)) if self.task == "retrieval" else out

  def init_params(self, rng: jax.Array, text_length: int) -> Params:
    size = self.encoder.image_size
    images = jnp.zeros((1, size, size, 3), jnp.uint8)
    tokens = jnp.zeros((1, text_length), jnp.int32)
    images2 = images if self.task == "nlvr2" else None
    return self.init(rng, images, tokens, images2, method=TaskModel._every_head)["params"]


# ---------------------------------------------------------------- losses


def vqa_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """ViLT / VLC's VQA loss: mean binary cross-entropy over rows x answers against the
  soft scores, times the number of answers (so it sums over answers, averages over rows)."""
  per_answer = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
  return jnp.mean(per_answer) * targets.shape[-1]


def negative_captions(rng: jax.Array, batch: int, num_negatives: int) -> jax.Array:
  """(B, 1 + num_negatives) caption rows per image: its own first, then the captions of
  `num_negatives` distinct other rows (the same random offsets for every row, so each
  row's negatives are distinct and never its own)."""
  offsets = jax.random.choice(rng, batch - 1, (num_negatives,), replace=False) + 1
  offsets = jnp.concatenate([jnp.zeros((1,), offsets.dtype), offsets])
  return (jnp.arange(batch)[:, None] + offsets[None]) % batch


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class _ClassRows(grain.transforms.RandomMap):
  """(image source, label) -> {"image", "label", "skipped"}; None when unreadable."""

  image_size: int
  crop_scale: tuple[float, float] | None
  flip: bool
  skip_list: str = ""  # Where an unreadable file is listed (image_files.SKIP_LIST_FILE).

  def random_map(self, element: tuple[Any, int], rng: np.random.Generator) -> dict | None:
    source, label = element
    try:
      pixels = np.asarray(source.open(), np.uint8)
    except (DataError, pipeline.ImageError, OSError) as e:
      if self.skip_list:
        task_data.list_skip(self.skip_list, str(getattr(source, "path", source)), str(e))
      logging.log_every_n_seconds(logging.WARNING, "Skipping image %s: %s", 10, source, e)
      return None
    height, width = pixels.shape[:2]
    box = (0, 0, width, height)
    if self.crop_scale is not None:
      box = pipeline.random_resized_crop_box(width, height, rng, self.crop_scale)
    image = pipeline.crop_resize_pixels(pixels, box, self.image_size)
    if self.flip and rng.uniform() < 0.5:
      image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image), "label": np.int32(label), "skipped": np.int32(0)}


def create_classification_dataset(
  data: cls_readers.ClassificationSet,
  *,
  image_size: int,
  batch_size: int,
  seed: int,
  crop_scale: tuple[float, float] | None,
  flip: bool,
  num_workers: int = 0,
  read_threads: int = 4,
  process_index: int = 0,
  process_count: int = 1,
  skip_list: str = "",
) -> grain.IterDataset:
  """This process's endless, shuffled training batches of a classification set:
  {"image" uint8 (B, S, S, 3), "label" int32 (B,), "skipped" int32 (B,)}, drawn by
  global position (as pipeline.py), so any number of processes sees the same batches."""
  if not isinstance(data.images, Sequence):
    raise DataError(
      f"{data.name}: training needs random access to its images (class folders or a wds "
      "directory); a TFDS split is read in order only"
    )
  elements = list(zip(data.images, data.labels.tolist()))
  if len(elements) < batch_size * process_count:
    raise DataError(
      f"{data.name}: {len(elements)} images, fewer than a global batch of "
      f"{batch_size * process_count}"
    )
  dataset = grain.MapDataset.source(elements).shuffle(seed=seed).repeat()
  dataset = dataset.random_map(_ClassRows(image_size, crop_scale, flip, skip_list), seed=seed)
  dataset = pipeline.ProcessRows(dataset, batch_size, process_index, process_count)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * batch_size)
  iterable = pipeline.CountSkipped(dataset.to_iter_dataset(options, allow_nones=True))
  iterable = iterable.batch(batch_size, drop_remainder=True)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags.
    iterable = iterable.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers),
      worker_init_fn=processes.exit_with_parent,
    )
  return iterable


# ---------------------------------------------------------------- pretrained parameters


def _fit(template: Params, source: Any, where: str) -> Params:
  """`source` arranged as `template` (same keys and shapes, template's dtypes); a
  ConfigError lists what is missing or mis-shaped."""
  if not isinstance(source, dict):
    raise ConfigError(f"config.finetune.pretrained: the run has no {where!r} parameters")
  want = traverse_util.flatten_dict(template, sep="/")
  have = traverse_util.flatten_dict(source, sep="/")
  problems = [f"{where}/{k} missing" for k in want if k not in have]
  problems += [
    f"{where}/{k} is {tuple(np.shape(have[k]))} there, {tuple(v.shape)} here"
    for k, v in want.items()
    if k in have and tuple(np.shape(have[k])) != tuple(v.shape)
  ]
  if problems:
    raise ConfigError(
      f"config.finetune.pretrained: the run's parameters do not fit this model ("
      f"{'; '.join(problems[:8])}{'; ...' if len(problems) > 8 else ''}): give the "
      "pretraining run's config.model and tokenizer (config.data.tokenizer / vocab_file)"
    )
  filled = {k: np.asarray(have[k], dtype=np.asarray(v).dtype) for k, v in want.items()}
  return traverse_util.unflatten_dict(filled, sep="/")


def transfer_pretrained(params: Params, source: Params, task: str) -> Params:
  """The fine-tuning parameters `params` (host arrays) with the encoder and pooler of a
  VLC run's `source` parameters; the new heads keep their initialisation. NLVR2: the
  second image's token type starts as the first image's (unless the run fine-tuned it
  already); retrieval: the ITM head comes along and the rank head starts as its
  "matched" row (unless the run has a rank head)."""
  out = dict(params)
  out["encoder"] = _fit(params["encoder"], source.get("encoder"), "encoder")
  if "pooler" in params:
    out["pooler"] = _fit(params["pooler"], source.get("pooler"), "pooler")
  if task == "nlvr2" and "nlvr2_head" not in source:
    types = np.array(out["encoder"]["token_type_embedding"])
    types[SECOND_IMAGE_TYPE] = types[IMAGE_TYPE]
    out["encoder"] = {**out["encoder"], "token_type_embedding": types}
  if task == "retrieval":
    out["itm_head"] = _fit(params["itm_head"], source.get("itm_head"), "itm_head")
    if "rank_head" in source:
      out["rank_head"] = _fit(params["rank_head"], source["rank_head"], "rank_head")
    else:
      itm = out["itm_head"]["itm_head"]
      out["rank_head"] = {"kernel": itm["kernel"][:, 1:].copy(), "bias": itm["bias"][1:].copy()}
  return out


# ---------------------------------------------------------------- the method


def _top_key(path: tuple) -> str:
  return str(getattr(path[0], "key", "")) if path else ""


def scale_top_level(factors: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates under each top-level key of `factors` by its factor (the
  new heads' lr multiplier; 0 freezes a part, weight decay included)."""

  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
      lambda path, u: u * factors.get(_top_key(path), 1.0), updates
    )
    return scaled, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


@dataclasses.dataclass(frozen=True)
class VlcTask(Method):
  """One of VLC's fine-tuning tasks over a TaskModel."""

  model: TaskModel
  task: str
  context_length: int
  optim_config: ml_collections.ConfigDict = dataclasses.field(compare=False)
  lr_decay: float = 0.5
  head_lr_multiplier: float = 1.0
  pretrained: str = ""  # A VLC run's workdir.
  train_spec: str = ""  # config.finetune.train.
  builtin: finetune.BuiltinSets | None = None
  answers: tuple[str, ...] = ()  # VQA.
  seed: int = 0
  num_workers: int = 0
  read_threads: int = 4
  crop_scale: tuple[float, float] | None = None
  flip: bool = False
  num_negatives: int = 15
  itm_weight: float = 0.0
  label_smoothing: float = 0.1
  max_skipped_fraction: float = 0.01  # config.data's: unreadable training images allowed.
  report_name: str = "vlp_jax-VLC"

  @property
  def name(self) -> str:  # type: ignore[override]
    return f"vlc_{self.task}"

  @property
  def image_size(self) -> int:
    return self.model.encoder.image_size

  @property
  def depth(self) -> int:
    return self.model.encoder.size.depth

  # ------------------------------------------------------------ jitted

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    size = self.image_size
    image = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8)
    tokens = jax.ShapeDtypeStruct((batch_size, self.context_length), jnp.int32)
    label = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    if self.task == "vqa":
      targets = jax.ShapeDtypeStruct((batch_size, len(self.answers)), jnp.float32)
      return {"image": image, "tokens": tokens, "targets": targets}
    if self.task == "nlvr2":
      return {"image": image, "image2": image, "tokens": tokens, "label": label}
    if self.task == "retrieval":
      return {"image": image, "tokens": tokens}
    return {"image": image, "label": label}

  def init(self, rng: jax.Array) -> tuple[Params, Extra]:
    return self.model.init_params(rng, self.context_length), {}

  def loss(
    self, params: Params, extra: Extra, batch: Batch, rng: jax.Array, step: jax.Array
  ) -> tuple[jax.Array, tuple[Metrics, Extra]]:
    del step
    if FROZEN in params:  # No gradient for the frozen ITM head.
      params = {**params, FROZEN: jax.lax.stop_gradient(params[FROZEN])}
    variables = {"params": params}
    rngs = dropout_rngs(rng)  # Text-embedding dropout (VLC's drop_rate), and any other.
    if self.task == "vqa":
      logits = self.model.apply(variables, batch["image"], batch["tokens"], rngs=rngs)
      logits = logits.astype(jnp.float32)
      loss = vqa_loss(logits, batch["targets"])
      # ViLT's VQAScore: the soft score of the chosen answer.
      chosen = jnp.argmax(logits, axis=-1)[:, None]
      score = jnp.mean(jnp.take_along_axis(batch["targets"], chosen, axis=1))
      metrics = {"vqa_loss": loss, "vqa_score": score}
    elif self.task == "nlvr2":
      logits = self.model.apply(
        variables, batch["image"], batch["tokens"], batch["image2"], rngs=rngs
      )
      loss, metrics = _cross_entropy(logits, batch["label"], 0.0, "nlvr2")
    elif self.task == "retrieval":
      loss, metrics = self._retrieval_loss(variables, batch, rng)
    else:
      logits = self.model.apply(variables, batch["image"], rngs=rngs)
      loss, metrics = _cross_entropy(logits, batch["label"], self.label_smoothing, "class")
    metrics["loss"] = loss
    return loss, (metrics, extra)

  def _retrieval_loss(
    self, variables: dict, batch: Batch, rng: jax.Array
  ) -> tuple[jax.Array, Metrics]:
    images, tokens = batch["image"], batch["tokens"]
    rows, choices = images.shape[0], self.num_negatives + 1
    rank_rng, pair_rng = jax.random.split(rng)
    # Every image against its caption (column 0) and num_negatives other rows' captions.
    captions = tokens[negative_captions(rank_rng, rows, self.num_negatives)]
    scores = self.model.apply(
      variables,
      jnp.repeat(images, choices, axis=0),
      captions.reshape(rows * choices, -1),
      rngs=dropout_rngs(rng, 0),
    )
    scores = scores.reshape(rows, choices).astype(jnp.float32)
    rank = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(scores, jnp.zeros(rows, int)))
    metrics = {
      "irtr_loss": rank,
      "irtr_accuracy": jnp.mean((jnp.argmax(scores, axis=-1) == 0).astype(jnp.float32)),
    }
    loss = rank
    if self.itm_weight > 0:
      itm_images, labels = vlc.itm_pairs(pair_rng, images)
      logits = self.model.apply(
        variables, itm_images, tokens, method=TaskModel.itm_logits, rngs=dropout_rngs(rng, 1)
      )
      itm, itm_metrics = losses.itm_loss(logits, labels)
      metrics.update(itm_loss=itm, **itm_metrics)
      loss = loss + self.itm_weight * itm
    return loss, metrics

  def predict_fns(self) -> dict[str, PredictFn]:
    model = self.model

    def apply(params: Params, *inputs: jax.Array) -> jax.Array:
      return model.apply({"params": params}, *inputs).astype(jnp.float32)

    if self.task == "vqa":
      return {"vqa_logits": apply}
    if self.task == "nlvr2":

      def nlvr2_logits(params: Params, left: jax.Array, right: jax.Array, tokens: jax.Array):
        return apply(params, left, tokens, right)

      return {"nlvr2_logits": nlvr2_logits}
    if self.task == "retrieval":

      def match_image(params: Params, images: jax.Array) -> jax.Array:
        del params  # A single-stream model sees image and text together: keep the pixels.
        return images

      return {"match_image": match_image, "match_score": apply}
    return {"class_logits": apply}

  # ------------------------------------------------------------ optimizer

  def param_labels(self) -> Callable[[Params], Any] | None:
    # One group, so global-norm clipping sees every gradient. (The frozen ITM head is
    # scaled to 0 inside it, not labelled "freeze": the layer-wise transform cannot
    # skip optax's masked leaves.)
    return lambda params: jax.tree.map(lambda _: vlc.LAYERWISE, params)

  def optimizer_groups(self, schedule: optax.Schedule) -> dict[str, optax.GradientTransformation]:
    groups = vlc.layerwise_lr_decay_transforms(
      self.optim_config, schedule, self.depth, self.lr_decay
    )
    factors = dict.fromkeys(NEW_HEADS, self.head_lr_multiplier)
    if self.task == "retrieval":
      factors[FROZEN] = 0.0
    groups[vlc.LAYERWISE] = optax.chain(groups[vlc.LAYERWISE], scale_top_level(factors))
    return groups

  # ------------------------------------------------------------ host

  def train_data(self, ctx: DataContext) -> grain.IterDataset | None:
    if self.task == "retrieval":
      return None  # The image-text shards of config.data.train.
    common = dict(
      image_size=self.image_size,
      batch_size=ctx.local_batch_size,
      seed=self.seed,
      num_workers=self.num_workers,
      read_threads=self.read_threads,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      crop_scale=self.crop_scale,
    )
    where = "config.finetune.train"
    # Every unreadable image is listed there (process 0's), found before training or later.
    skip_list = os.path.join(ctx.workdir, image_files.SKIP_LIST_FILE)
    skip_list = skip_list if jax.process_index() == 0 else ""
    screen = dict(
      source=where,
      max_skipped_fraction=self.max_skipped_fraction,
      skip_list=skip_list,
      read_threads=self.read_threads,
    )
    if self.task == "vqa":
      _, examples = finetune.read_vqa_spec(self.train_spec, True, self.builtin, where)
      examples = task_data.drop_unreadable(examples, **screen)
      return task_data.create_vqa_dataset(
        examples, ctx.tokenizer, self.answers, train=True, skip_list=skip_list, **common
      )
    if self.task == "nlvr2":
      _, examples = finetune.read_nlvr2_spec(self.train_spec, True, self.builtin, where)
      examples = task_data.drop_unreadable(examples, **screen)
      return task_data.create_nlvr2_dataset(
        examples, ctx.tokenizer, train=True, skip_list=skip_list, **common
      )
    data = finetune.read_classification_spec(self.train_spec, True, where)
    if isinstance(data.images, Sequence):
      # Image files are only stat-ed here (a class-folder set may hold millions).
      kept = task_data.drop_unreadable(
        list(zip(data.images, data.labels)),
        images_of=lambda e: (e[0].path,) if isinstance(e[0], ImageRef) and e[0].path else (),
        check=image_files.check_image_file,
        **screen,
      )
      labels = np.asarray([label for _, label in kept], data.labels.dtype)
      data = dataclasses.replace(data, images=[image for image, _ in kept], labels=labels)
    return create_classification_dataset(data, flip=self.flip, skip_list=skip_list, **common)

  def pretrained_params(self, gather: Callable[[], Params]) -> Params | None:
    if self.pretrained == NO_PRETRAINED:
      logging.warning(
        "Fine-tuning %s from random initialisation (config.finetune.pretrained=%s)",
        self.task,
        NO_PRETRAINED,
      )
      return None
    if not self.pretrained:
      raise ConfigError(
        "config.finetune.pretrained is empty: give the VLC pretraining run (its workdir) "
        f"to fine-tune, or {NO_PRETRAINED!r} to fine-tune from random initialisation on "
        "purpose (e.g. --config=configs/demo_vqa.py:pretrained=none)"
      )
    from vlp_jax.weights import convert

    try:
      source, info = convert.read_params(self.pretrained)
    except (ValueError, OSError) as e:
      raise ConfigError(f"config.finetune.pretrained: {e}") from e
    method = info.get("config", {}).get("method", "")
    if method and not method.startswith("vlc"):
      raise ConfigError(
        f"config.finetune.pretrained: {self.pretrained} is a {method!r} run, not a VLC one"
      )
    logging.info("Fine-tuning %s from the VLC run %s", self.task, self.pretrained)
    return transfer_pretrained(gather(), source, self.task)

  def summary(self, params: Params) -> str:
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    heads = {k: count(v) for k, v in params.items() if k not in ("encoder", "pooler")}
    outputs = {
      "vqa": f"{len(self.answers)} answers",
      "classify": f"{self.model.num_outputs} classes",
    }
    return (
      f"VLC {self.task}: {count(params) / 1e6:.2f}M parameters (encoder "
      f"{count(params['encoder']) / 1e6:.2f}M; heads {heads}); {outputs.get(self.task, '')} "
      f"layer-wise lr decay {self.lr_decay} over {self.depth} blocks"
    )

  @property
  def model_name(self) -> str:
    return self.report_name


def _cross_entropy(
  logits: jax.Array, labels: jax.Array, smoothing: float, prefix: str
) -> tuple[jax.Array, Metrics]:
  logits = logits.astype(jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, {f"{prefix}_loss": loss, f"{prefix}_accuracy": accuracy}


def create(ctx: MethodContext, task: str) -> VlcTask:
  """The fine-tuning method of `task` from config.model / config.finetune (ValueError
  naming a bad key; the task's training data is read here: the head's size needs it)."""
  if task not in TASKS:
    raise ValueError(f"unknown VLC fine-tuning task {task!r}; known: {TASKS}")
  config, tune = ctx.config, ctx.config.finetune
  for key in ("model.init", "model.image.init", "model.text.init"):
    if _get(config, key):
      raise ValueError(
        f"config.{key}: fine-tuning starts from a VLC run (config.finetune.pretrained)"
      )
  pretrained = tune.pretrained if tune.pretrained != NO_PRETRAINED else ""
  if pretrained and config.init_from:
    raise ValueError(
      "config.init_from and config.finetune.pretrained are both set: init_from restores a "
      "run of this same fine-tuning model, finetune.pretrained a VLC pretraining run"
    )
  if pretrained and not os.path.isdir(pretrained):
    raise ValueError(f"config.finetune.pretrained: {tune.pretrained!r} is not a directory")
  tokenizer = ctx.tokenizer
  encoder = vlc.create_model(
    config, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.context_length, ctx.platform
  ).encoder
  builtin = finetune.BuiltinSets.from_config(config)
  where = "config.finetune.train"
  if task != "retrieval" and not tune.train:
    raise ValueError(
      f"{where} is empty: give the {task} training data (configs/common.py lists the "
      "formats), or builtin for vqa / nlvr2"
    )
  answers: tuple[str, ...] = ()
  num_outputs = 0
  if task == "vqa":
    answers = finetune.config_answer_vocab(config)
    num_outputs = len(answers)
  elif task == "nlvr2":
    finetune.read_nlvr2_spec(tune.train, True, builtin, where)  # Bad files fail now.
  elif task == "classify":
    data = finetune.read_classification_spec(tune.train, True, where)
    num_outputs = len(data.classnames)
  elif tune.num_negatives >= config.batch_size:
    raise ValueError(
      f"config.finetune.num_negatives={tune.num_negatives}: needs that many other rows, "
      f"config.batch_size={config.batch_size} has {config.batch_size - 1}"
    )
  if task == "retrieval" and config.batch_size < 2:
    raise ValueError(f"config.batch_size={config.batch_size}: ITM needs two rows to swap images")
  image = config.model.image
  return VlcTask(
    model=TaskModel(encoder, task, num_outputs),
    task=task,
    context_length=tokenizer.context_length,
    optim_config=config.optim,
    lr_decay=tune.lr_decay,
    head_lr_multiplier=tune.head_lr_multiplier,
    pretrained=tune.pretrained,
    train_spec=tune.train,
    builtin=builtin,
    answers=answers,
    seed=config.seed,
    num_workers=config.data.num_workers,
    read_threads=config.data.read_threads,
    crop_scale=tuple(tune.crop_scale) if tune.crop_scale is not None else None,
    flip=tune.flip,
    num_negatives=tune.num_negatives,
    itm_weight=tune.itm_weight,
    label_smoothing=tune.label_smoothing,
    max_skipped_fraction=config.data.max_skipped_fraction,
    report_name=f"vlp_jax-VLC-{task}-ViT-{image.variant}-{image.image_size}px",
  )


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node: Any = config
  for part in key.split("."):
    node = node[part]
  return node


create_vqa = functools.partial(create, task="vqa")
create_nlvr2 = functools.partial(create, task="nlvr2")
create_retrieval = functools.partial(create, task="retrieval")
create_classify = functools.partial(create, task="classify")
