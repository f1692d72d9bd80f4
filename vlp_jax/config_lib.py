"""Helpers for the Python config files in vlp_jax/configs/ and the methods' config blocks.

A config file is `get_config(arg: str | None) -> ConfigDict`. `arg` is a short override
string such as "variant=S/16,masking=cluster" (big_vision style), parsed here against a
dict of defaults so a misspelled key fails with its name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

# The packaged configs (vlp_jax/configs); its modules that build parts of a config, not a
# run's config, have no get_config.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_NOT_RECIPES = ("__init__", "common", "model", "run_config")


def packaged_recipes() -> list[str]:
  """Names of the packaged recipes: vlp_jax/configs/<name>.py with get_config."""
  names = sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py"))
  return [n for n in names if n not in _NOT_RECIPES]


class UserError(Exception):
  """A mistake the user fixes (a config, a path, a full disk): the command line prints its
  message as one line, without a traceback (vlp_jax.cli.run)."""


class ConfigError(UserError, ValueError):
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


@dataclasses.dataclass(frozen=True)
class Rule:
  """A valid range of a config value: `holds(value)`, described as e.g. ">= 1"."""

  description: str
  holds: Callable[[Any], bool]


@dataclasses.dataclass(frozen=True)
class ConfigBlock:
  """A method's own part of the config, config.<name>, declared on the method's module:
  its defaults (a fresh ConfigDict per call) and the rules of its numeric fields, keyed
  relative to the block ("momentum" for config.albef.momentum)."""

  name: str
  defaults: Callable[[], ml_collections.ConfigDict]
  rules: Mapping[str, Rule]

  def config_rules(self) -> dict[str, Rule]:
    """The rules keyed by their path in the whole config ("albef.momentum")."""
    return {f"{self.name}.{key}": rule for key, rule in self.rules.items()}


def _is_number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool)


def at_least(low: float) -> Rule:
  return Rule(f">= {low}", lambda v: _is_number(v) and v >= low)


def positive() -> Rule:
  return Rule("> 0", lambda v: _is_number(v) and v > 0)


def in_range(
  low: float, high: float, *, include_low: bool = True, include_high: bool = True
) -> Rule:
  """low <= value <= high (or low < value, value < high)."""
  left, right = "[" if include_low else "(", "]" if include_high else ")"
  return Rule(
    f"in {left}{low}, {high}{right}",
    lambda v: (
      _is_number(v)
      and (low <= v if include_low else low < v)
      and (v <= high if include_high else v < high)
    ),
  )


def one_of_or(values: tuple[Any, ...], rule: Rule) -> Rule:
  """One of `values` (special meanings such as -1), or else `rule`."""
  listed = ", ".join(map(repr, values))
  return Rule(f"{listed} or {rule.description}", lambda v: v in values or rule.holds(v))


def each(rule: Rule, length: int | None = None) -> Rule:
  """A non-empty sequence (of `length` elements if given), each satisfying `rule`."""

  def holds(value: Any) -> bool:
    if not isinstance(value, list | tuple) or not value:
      return False
    return (length is None or len(value) == length) and all(rule.holds(x) for x in value)

  size = f"{length} values" if length else "a non-empty sequence"
  return Rule(f"{size}, each {rule.description}", holds)


def fraction_interval() -> Rule:
  """(low, high) with 0 < low <= high <= 1, e.g. a crop's area range."""
  return Rule(
    "(low, high) with 0 < low <= high <= 1",
    lambda v: (
      isinstance(v, list | tuple)
      and len(v) == 2
      and all(_is_number(x) for x in v)
      and 0 < v[0] <= v[1] <= 1
    ),
  )


def check_rules(config: ml_collections.ConfigDict, rules: Mapping[str, Rule]) -> None:
  """Raises a ConfigError naming the first key whose value breaks its rule.

  Keys are dotted paths ("optim.lr"). A None value is skipped: None means "derived from
  elsewhere" (e.g. model.image.width: the variant's). A key the config lacks is skipped
  too (tests check that every rule names a field of the base config).
  """
  for key, rule in rules.items():
    node: Any = config
    for part in key.split("."):
      if part not in node:
        break
      node = node[part]
    else:
      if node is None:
        continue
      if not rule.holds(node):  # NaN fails every comparison: every numeric rule rejects it.
        raise ConfigError(f"config.{key}={node!r}: must be {rule.description}")
