"""A run's config rebuilt from the values of the config.json its trainer wrote (eval.py,
and the shortlist of itm_retrieval through evaluation's Context)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from vlp_jax import config_lib
from vlp_jax.config_lib import ConfigError
from vlp_jax.configs import common


def from_values(
  values: Mapping[str, Any], source: str, base: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
  """The locked config of a run's config.json `values` (read from `source`): set on
  `base` (default: the base config of the run's method, common.run_base), which gives
  them their types back; a key the base lacks fails with a ConfigError naming it."""
  if base is None:  # The run's method's base config: its blocks, no other method's.
    base, values = common.run_base(values)
  return overlay_config(base, values, source)


def overlay_config(
  base: ml_collections.ConfigDict, values: Mapping, source: str
) -> ml_collections.ConfigDict:
  """`base` (modified) with `values` (nested JSON values) set over it, locked."""
  unknown = []

  def overlay(node: ml_collections.ConfigDict, values: Mapping, prefix: str) -> None:
    for key, value in values.items():
      name = f"{prefix}{key}"
      if key not in node:
        unknown.append(name)
      elif isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
        overlay(node[key], value, f"{name}.")
      else:
        try:
          node[key] = value  # ConfigDict casts: lists to tuples, ints to floats.
        except (TypeError, ValueError) as e:
          raise ConfigError(f"{source}: config.{name}={value!r} does not fit: {e}") from e

  with base.unlocked():
    overlay(base, values, "")
  if unknown:
    raise ConfigError(
      f"{source} has fields this version's config does not know: "
      + ", ".join(f"config.{name}" for name in unknown)
    )
  return config_lib.lock(base)
