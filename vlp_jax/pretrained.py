"""Starting a run from pretrained towers: config.model.init / image.init / text.init.

Each is "FORMAT:PATH" (FORMAT one of FORMATS) or a plain PATH (a converted directory, a
run's workdir, or a raw checkpoint whose format is detected from its key names). Paths
are checked when the experiment is built, before any compute; the weights are read once
the (sharded) train state exists and the workdir has no checkpoint to resume.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
from absl import logging

from vlp_jax.config_lib import ConfigError

FORMATS = ("open_clip", "hf_clip", "timm", "hf_bert")
# Config key -> which part of the model it initialises (weights.loader.KINDS).
INIT_KEYS = {"model.init": "model", "model.image.init": "image", "model.text.init": "text"}


@dataclasses.dataclass(frozen=True)
class InitSpec:
  key: str  # The config key it came from, for messages.
  kind: str  # "model", "image" or "text".
  source: str  # A FORMATS entry or "auto".
  path: str


def parse_specs(config: ml_collections.ConfigDict, check_paths: bool = True) -> list[InitSpec]:
  """The configured pretrained inits, whole model first; ConfigError naming a bad one
  (and, with `check_paths`, one whose checkpoint does not exist)."""
  specs = []
  for key, kind in INIT_KEYS.items():
    value = config
    for part in key.split("."):
      value = value[part]
    if not value:
      continue
    source, sep, path = value.partition(":")
    if not sep or source not in FORMATS:
      if sep and "/" not in source and not os.path.exists(value):
        raise ConfigError(f"config.{key}={value!r}: format {source!r} is not one of {FORMATS}")
      source, path = "auto", value
    if source == "hf_bert" and kind != "text":
      raise ConfigError(f"config.{key}={value!r}: hf_bert holds a text tower only")
    if check_paths and not os.path.exists(path):
      raise ConfigError(f"config.{key}: checkpoint {path!r} does not exist")
    specs.append(InitSpec(f"config.{key}", kind, source, path))
  return specs


def text_vocab_file(specs: list[InitSpec]) -> str | None:
  """vocab.txt of a Hugging Face text checkpoint directory, the tokenizer's default."""
  for spec in specs:
    if spec.kind == "text" and os.path.isdir(spec.path):
      vocab = os.path.join(spec.path, "vocab.txt")
      if os.path.isfile(vocab):
        return vocab
  return None


def load(specs: list[InitSpec], params: Any) -> Any:
  """`params` (host arrays) with the parts each spec names replaced by its weights."""
  from vlp_jax.weights import hf_bert, loader

  for spec in specs:
    logging.info("Initialising %s from %s (%s)", spec.kind, spec.path, spec.key)
    try:
      if spec.source == "hf_bert":
        params = {**params, "text": hf_bert.import_hf_bert(spec.path, params["text"])}
      else:
        params = loader.load_tower_params(spec.kind, spec.path, params, source=spec.source)
    except (ValueError, OSError) as e:
      raise ConfigError(f"{spec.key}: {e}") from e
  return params
