"""The fine-tuning tasks' datasets as a config names them: config.finetune.train (the
VLC fine-tuning methods' training data) and config.eval.data.<task> (evaluation), so
that training and evaluation read a spec the same way.

- VQA: `QUESTIONS_JSON,annotations=ANNOTATIONS_JSON,images=DIR` (vqa_data.py), several
  joined by ";" (e.g. VQAv2's train and val for training);
- NLVR2: `FILE.json,images=DIR` (nlvr2_data.py), several joined by ";";
- "builtin" for either: the generated sets (builtin_vqa.py, builtin_nlvr2.py) sized by
  config.finetune.builtin (the fine-tuning methods' block, methods/vlc_finetune_config.py:
  evaluation reads it from the fine-tuning run's config, which generated its training split);
- classification: one spec as classification_readers.py reads it, `split=` (evaluation,
  default "val") and `train_split=` (training, default "train");
- the VQA answer vocabulary: config.finetune.answers, or ViLT's built from the training
  annotations (vqa_data.build_answer_vocab).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from vlp_jax.config_lib import ConfigError
from vlp_jax.input_pipeline import builtin_nlvr2, builtin_vqa, nlvr2_data, vqa_data
from vlp_jax.input_pipeline import classification_readers as cls_readers
from vlp_jax.input_pipeline.dataset_files import DatasetSpec, parse_specs, stem

BUILTIN = "builtin"  # A dataset spec naming the generated set.
# Options of each task's dataset spec (dataset_files.parse_specs).
OPTIONS = {
  "vqa": ("annotations", "images", "name"),
  "nlvr2": ("images", "name"),
  "classify_finetuned": (
    "split",
    "train_split",
    "name",
    "data_dir",
    "image_key",
    "label_key",
    "classnames",
  ),
}


@dataclasses.dataclass(frozen=True)
class BuiltinSets:
  """Sizes of the generated VQA / NLVR2 sets (config.finetune.builtin)."""

  cache_dir: str
  num_train: int
  num_eval: int
  image_size: int
  seed: int
  nlvr2_statements: str = ""  # Comma list of builtin_nlvr2.STATEMENT_KINDS; "": all.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> BuiltinSets:
    b = finetune_block(config, "finetune.builtin").builtin
    return cls(
      config.data.cache_dir, b.num_train, b.num_eval, b.image_size, b.seed, b.nlvr2_statements
    )

  @classmethod
  def for_spec(cls, config: ml_collections.ConfigDict, text: str) -> BuiltinSets | None:
    """from_config for a "builtin" dataset spec `text`, None for files: evaluation reads
    the generated set's settings from the fine-tuning run's config, whose training split
    they generated, and needs none for files."""
    return cls.from_config(config) if text == BUILTIN else None

  @property
  def nlvr2_kinds(self) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in self.nlvr2_statements.split(",") if k.strip())
    unknown = [k for k in kinds if k not in builtin_nlvr2.STATEMENT_KINDS]
    if unknown:
      raise ValueError(
        f"config.finetune.builtin.nlvr2_statements: {unknown} are not among "
        f"{list(builtin_nlvr2.STATEMENT_KINDS)}"
      )
    return kinds or builtin_nlvr2.STATEMENT_KINDS


def finetune_block(config: ml_collections.ConfigDict, key: str) -> ml_collections.ConfigDict:
  """config.finetune, which only a VLC fine-tuning run's config carries; a ConfigError
  naming config.<key> for a config of another method."""
  if "finetune" not in config:
    raise ConfigError(
      f"config.{key} is read from a VLC fine-tuning run's config (config.method vlc_vqa, "
      f"vlc_nlvr2, vlc_retrieval or vlc_classify); config.method={config.method!r} has "
      "no config.finetune"
    )
  return config.finetune


def one_spec(text: str, flag: str, options: Sequence[str]) -> DatasetSpec:
  """The single dataset of `text` (a ValueError naming `flag` for none or several)."""
  specs = parse_specs(text, flag, options)
  if len(specs) != 1:
    raise ValueError(f"{flag} takes one dataset, got {len(specs)}")
  return specs[0]


@dataclasses.dataclass(frozen=True)
class _TaskFiles:
  """How a task's spec is read: one file of it (`read`), the image root it needs, and the
  generated set (`ensure`) with its training and evaluation split names."""

  read: Callable[[DatasetSpec], list[Any]]
  image_root: str
  ensure: Callable[[BuiltinSets], Any]  # -> builtin_vqa.BuiltinVqa / builtin_nlvr2.BuiltinNlvr2
  splits: tuple[str, str]


_TASK_FILES = {
  "vqa": _TaskFiles(
    lambda spec: vqa_data.read_vqa(spec.path, spec.get("annotations") or None, spec.get("images")),
    "COCO image root",
    lambda b: builtin_vqa.ensure_builtin_vqa(
      b.cache_dir or None,
      num_train=b.num_train,
      num_val=b.num_eval,
      image_size=b.image_size,
      seed=b.seed,
    ),
    ("train", "val"),
  ),
  "nlvr2": _TaskFiles(
    lambda spec: nlvr2_data.read_nlvr2(spec.path, spec.get("images")),
    "image root",
    lambda b: builtin_nlvr2.ensure_builtin_nlvr2(
      b.cache_dir or None,
      num_train=b.num_train,
      num_dev=b.num_eval,
      image_size=b.image_size,
      seed=b.seed,
      kinds=b.nlvr2_kinds,
    ),
    ("train", "dev"),
  ),
}


@functools.lru_cache(maxsize=8)  # The method and the evaluation read the same files.
def read_task_spec(
  task: str, text: str, train: bool, builtin: BuiltinSets | None, flag: str
) -> tuple[str, tuple[Any, ...]]:
  """(dataset name, examples) of a VQA or NLVR2 spec: its ";"-joined files (names joined
  by "+"), or "builtin": the generated set's training or evaluation split."""
  files = _TASK_FILES[task]
  if text == BUILTIN:
    if builtin is None:
      raise ValueError(f"{flag}=builtin: the generated set needs config.finetune.builtin")
    split = files.splits[0] if train else files.splits[1]
    return f"builtin-{task}", tuple(files.ensure(builtin).examples(split))
  names, examples = [], []
  for spec in parse_specs(text, flag, OPTIONS[task]):
    if not spec.get("images"):
      raise ValueError(f"{flag}: {spec.text!r} needs images=<{files.image_root}>")
    examples += files.read(spec)
    names.append(spec.get("name") or stem(spec.path))
  if not names:
    raise ValueError(f"{flag}: no dataset in {text!r}")
  return "+".join(names), tuple(examples)


def read_vqa_spec(
  text: str, train: bool, builtin: BuiltinSets | None, flag: str = "--data.vqa"
) -> tuple[str, tuple[vqa_data.VqaExample, ...]]:
  """read_task_spec of VQA (VQAv2's train and val may be joined for training; `builtin`
  only needed for "builtin")."""
  return read_task_spec("vqa", text, train, builtin, flag)


def read_nlvr2_spec(
  text: str, train: bool, builtin: BuiltinSets | None, flag: str = "--data.nlvr2"
) -> tuple[str, tuple[nlvr2_data.Nlvr2Example, ...]]:
  """read_task_spec of NLVR2 (`builtin` only needed for "builtin")."""
  return read_task_spec("nlvr2", text, train, builtin, flag)


@functools.lru_cache(maxsize=4)
def read_classification_spec(
  text: str, train: bool, flag: str = "--data.classify_finetuned"
) -> cls_readers.ClassificationSet:
  """A classification spec's training split (`train_split=`, default "train") or its
  evaluation split (`split=`, default "val")."""
  spec = one_spec(text, flag, OPTIONS["classify_finetuned"])
  split = spec.get("train_split", "train") if train else spec.get("split", "val")
  return cls_readers.read_classification(spec, split, require_split=True)


@functools.lru_cache(maxsize=4)
def answer_vocab(
  answers_file: str, train_text: str, min_count: int, builtin: BuiltinSets
) -> tuple[str, ...]:
  """The VQA answers (head outputs, in order): `answers_file` (one per line) or ViLT's
  vocabulary built from the training annotations (answers that are the most common
  answer of at least `min_count` questions)."""
  if answers_file:
    return tuple(vqa_data.read_answer_vocab(answers_file))
  _, train = read_vqa_spec(train_text, True, builtin, "config.finetune.train")
  answers = vqa_data.build_answer_vocab(train, min_count)
  if not answers:
    raise ValueError(
      f"config.finetune.min_answer_count={min_count}: no answer of {train_text!r} is that common"
    )
  return tuple(answers)


def config_answer_vocab(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """answer_vocab of a run's config.finetune."""
  tune = finetune_block(config, "finetune.answers")
  return answer_vocab(
    tune.answers, tune.train, tune.min_answer_count, BuiltinSets.from_config(config)
  )
