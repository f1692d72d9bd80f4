"""Helpers for the Python config files in configs/.

A config file is `get_config(arg: str | None) -> ConfigDict`. `arg` is a short override
string such as "variant=S/16,masking=cluster" (big_vision style), parsed here against a
dict of defaults so a misspelled key fails with its name.
"""

from __future__ import annotations

from typing import Any

import ml_collections

# Evaluation tasks, in report order (config.eval.tasks, eval.py --tasks). "heldout" reads
# the run's own config.data.eval; every other task reads config.eval.data.<task>.
EVAL_TASKS = (
  "heldout",
  "zeroshot_retrieval",
  "zeroshot_classification",
  "linear_probe",
  "sugarcrepe",
  "aro",
  "winoground",
  "crepe",
  "svo",
)


class ConfigError(ValueError):
  """A config is inconsistent or names something that does not exist."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses "a=1,b=x" into a ConfigDict typed after `defaults`; unknown keys fail."""
  result = dict(defaults)
  if arg:
    for item in arg.split(","):
      if not item.strip():
        continue
      key, sep, value = item.partition("=")
      key = key.strip()
      if not sep:
        raise ConfigError(f"config arg {item!r} is not of the form key=value")
      if key not in defaults:
        raise ConfigError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
      result[key] = _coerce(key, value.strip(), defaults[key])
  return ml_collections.ConfigDict(result)


def _coerce(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes"):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ConfigError(f"config arg {key!r} wants a bool, got {value!r}")
  if isinstance(default, int | float):
    try:
      return type(default)(value)
    except ValueError as e:
      raise ConfigError(f"config arg {key!r} wants {type(default).__name__}, got {value!r}") from e
  return value


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config so that setting an unknown field raises with the field's name."""
  config.lock()
  return config
