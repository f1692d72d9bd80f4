"""What would make a step fit its chips: suggestions for a step the compiler refused, and
`--fit`'s small search over remat policy, FSDP degree and per-chip batch (gradient
accumulation at the same global batch), scanned layers where the model has them, with
the compiler's own verdict on each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from vlp_jax.config_lib import ConfigError
from vlp_jax.preflight.step import Report, build_step, compile_report


def scannable(
  config: ml_collections.ConfigDict,
  devices: list[Any],
  build: Callable[[ml_collections.ConfigDict, list[Any]], Any] = build_step,
) -> bool:
  """Whether the config's model has a scanned layout (ALBEF's and VLC's towers do not:
  their builders refuse model.scan_layers=True before any compile)."""
  try:
    build(with_overrides(config, {"model.scan_layers": True}), devices)
  except ConfigError:
    return False
  return True


def suggestions(
  config: ml_collections.ConfigDict, report: Report, can_scan: bool = True
) -> list[str]:
  """Config overrides likely to make a refused step fit, least costly first; scanned
  layers only where `can_scan` (see `scannable`)."""
  out = []
  remat = config.model.remat
  if remat in ("none", False):
    out.append("--config.model.remat=full (recompute each block in the backward pass)")
  if can_scan and not config.model.scan_layers:
    out.append("--config.model.scan_layers=True (stack each tower's blocks in one scan)")
  if report.devices > 1 and config.mesh.fsdp == 1:
    out.append(
      f"--config.mesh.fsdp={report.devices} (parameters and optimizer state split over "
      f"the {report.devices} chips)"
    )
  temporaries = report.per_chip_gib.get("temporaries", 0.0)
  room = report.hbm_usable_gib - report.per_chip_gib["params"] - report.per_chip_gib["optimizer"]
  if temporaries > 0 and room > 0:
    accum = 1
    while temporaries / accum > room and accum < 64:
      accum *= 2
    per_chip = config.batch_size // report.devices
    if accum > 1 and per_chip % (accum * config.grad_accum_steps) == 0:
      out.append(
        f"--config.grad_accum_steps={accum * config.grad_accum_steps} (per-chip microbatch "
        f"{per_chip // accum // config.grad_accum_steps}, same global batch) or "
        f"--config.batch_size={config.batch_size // accum}"
      )
  out.append("--fit searches these with the compiler's verdict")
  return out


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One point of the search: config overrides and what the compiler said of them."""

  overrides: dict[str, Any]
  report: Report

  @property
  def flags(self) -> list[str]:
    return [f"--config.{key}={value}" for key, value in self.overrides.items()]


# Tried in this order, from the least extra work per step (recompute, communication,
# accumulation loops) to the most: the first that fits is the fastest by the roofline.
SEARCH = (
  {"model.remat": "none"},
  {"model.remat": "dots"},
  {"model.remat": "full"},
  {"model.remat": "full", "mesh.fsdp": "all"},
  {"model.remat": "full", "grad_accum_steps": 2},
  {"model.remat": "full", "mesh.fsdp": "all", "grad_accum_steps": 2},
  {"model.remat": "full", "mesh.fsdp": "all", "grad_accum_steps": 4},
)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  """config["a"]["b"] for key "a.b" ("": config itself)."""
  node = config
  for part in filter(None, key.split(".")):
    node = node[part]
  return node


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> Any:
  """A copy of `config` with dotted-key overrides applied."""
  out = config.copy_and_resolve_references()
  with out.unlocked():
    for key, value in overrides.items():
      parent, _, leaf = key.rpartition(".")
      _get(out, parent)[leaf] = value
  return out


def _resolved(point: dict[str, Any], devices: int, config: ml_collections.ConfigDict) -> dict:
  point = dict(point)
  if point.get("mesh.fsdp") == "all":
    point.update({"mesh.fsdp": devices, "mesh.data": -1, "mesh.tensor": 1})
  if "grad_accum_steps" in point:
    point["grad_accum_steps"] *= config.grad_accum_steps
  return point


def search(
  config: ml_collections.ConfigDict,
  devices: list[Any],
  topology_name: str,
  log: Callable[[str], None] = print,
  max_compiles: int = 0,
  build: Callable[[ml_collections.ConfigDict, list[Any]], Any] = build_step,
  compile_fn: Callable[[Any, str], Report] = compile_report,
  start_report: Report | None = None,
) -> tuple[Candidate | None, list[Candidate]]:
  """(the first fitting candidate of SEARCH, every candidate tried); scanned layers
  where the config's model has a scanned layout. At most `max_compiles` compiles when
  positive (each may take minutes). `build` and `compile_fn` are the step's builder and
  the compiler's verdict (tests pass stand-ins); `start_report`, the verdict on `config`
  itself, is reused for a candidate that changes nothing."""
  scan = {"model.scan_layers": True} if scannable(config, devices, build) else {}
  tried: list[Candidate] = []
  compiles = 0
  for point in SEARCH:
    if max_compiles > 0 and compiles >= max_compiles:
      log(f"  stopped after {max_compiles} compiles (--fit_max_compiles)")
      break
    overrides = {**scan, **_resolved(point, len(devices), config)}
    if start_report is not None and all(_get(config, k) == v for k, v in overrides.items()):
      tried.append(Candidate(overrides, start_report))
      log(f"  {'fits' if start_report.fits else 'does not fit'}: {overrides} (the config as given)")
      if start_report.fits:
        return tried[-1], tried
      continue
    candidate_config = with_overrides(config, overrides)
    try:
      step_build = build(candidate_config, devices)
    except ConfigError as e:  # E.g. a batch that does not split into the microbatches.
      log(f"  skip {overrides}: {e}")
      continue
    report = compile_fn(step_build, topology_name)
    compiles += 1
    candidate = Candidate(overrides, report)
    tried.append(candidate)
    peak = report.per_chip_gib.get("peak", report.per_chip_gib.get("temporaries", 0.0))
    log(
      f"  {'fits' if report.fits else 'does not fit'}: {' '.join(candidate.flags)} "
      f"(peak {peak:.2f} GiB of {report.hbm_usable_gib:.2f}, compiled in {report.compile_s:.0f} s)"
    )
    if report.fits:
      return candidate, tried
  return None, tried
