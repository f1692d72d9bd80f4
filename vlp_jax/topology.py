"""Named accelerator topologies and the chip figures a roofline reads, for compiling a
step on a CPU host for hardware it does not have (vlp_jax.preflight).

`topology_devices("v5e:16x16")` gives the devices of that TPU slice through libtpu's
deviceless compiler (`pip install -r requirements-tpu.txt`); other families register a
resolver in TOPOLOGY_FAMILIES. `chip_for(device)` gives one
device's peak bf16 FLOP/s, HBM bandwidth and capacity from CHIPS, keyed by device_kind.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from vlp_jax import gpu_targets
from vlp_jax.config_lib import UserError

FLAG = "--topology"


class TopologyError(UserError):
  """A topology name that names no slice, or one this host cannot compile for."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's datasheet figures (dense bf16; per chip, not per core)."""

  peak_flops: float  # bf16 FLOP/s.
  hbm_bandwidth: float  # Bytes/s.
  hbm_bytes: float  # Nominal capacity; the compiler's own limit decides whether a step fits.
  cores_per_chip: int  # TensorCores; a topology may present one jax device per core.
  source: str


_GB, _GIB = 1e9, 2**30
# Keyed by device_kind prefix, longest first at lookup. TPU figures: "Peak compute per chip
# (bf16)" and "HBM capacity / bandwidth per chip" on cloud.google.com/tpu/docs/<version>
# (v5e, v5p, v6e, v4; v2 and v3 on .../system-architecture-tpu-vm), read 2026-12-07.
# Deviceless v5p topologies name their devices "TPU v5"; hardware may say "TPU v5p".
CHIPS: dict[str, Chip] = {
  "TPU v6 lite": Chip(918e12, 1640 * _GB, 32 * _GIB, 1, "cloud.google.com/tpu/docs/v6e"),
  "TPU v5 lite": Chip(197e12, 819 * _GB, 16 * _GIB, 1, "cloud.google.com/tpu/docs/v5e"),
  "TPU v5p": Chip(459e12, 2765 * _GB, 95 * _GIB, 2, "cloud.google.com/tpu/docs/v5p"),
  "TPU v5": Chip(459e12, 2765 * _GB, 95 * _GIB, 2, "cloud.google.com/tpu/docs/v5p"),
  "TPU v4": Chip(275e12, 1200 * _GB, 32 * _GIB, 2, "cloud.google.com/tpu/docs/v4"),
  "TPU v3": Chip(123e12, 900 * _GB, 32 * _GIB, 2, "cloud.google.com/tpu/docs/v3"),
  "TPU v2": Chip(45e12, 600 * _GB, 16 * _GIB, 2, "cloud.google.com/tpu/docs/v2"),
  # NVIDIA datasheets (dense bf16: the sheets' tensor-core figures marked "with sparsity"
  # halved), read 2026-12-07: H100 SXM5 80 GB 1,979* TFLOPS, 3.35 TB/s; H100 PCIe 1,513*,
  # 2.0 TB/s (nvidia.com/en-us/data-center/h100); H200 SXM 141 GB 1,979*, 4.8 TB/s
  # (nvidia.com/en-us/data-center/h200); A100 SXM 80 GB 312 dense, 2,039 GB/s
  # (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf). Capacities in GB as sold.
  "NVIDIA H100 PCIe": Chip(756e12, 2000 * _GB, 80 * _GB, 1, "NVIDIA H100 datasheet"),
  "NVIDIA H100": Chip(989e12, 3350 * _GB, 80 * _GB, 1, "NVIDIA H100 datasheet (SXM5)"),
  "NVIDIA H200": Chip(989e12, 4800 * _GB, 141 * _GB, 1, "NVIDIA H200 datasheet (SXM)"),
  "NVIDIA A100": Chip(312e12, 2039 * _GB, 80 * _GB, 1, "NVIDIA A100 datasheet r4 (SXM4)"),
}


@dataclasses.dataclass(frozen=True)
class DeviceFigures:
  """A chip's figures scaled to one jax device (a whole chip, or one of its cores)."""

  device_kind: str
  peak_flops: float
  hbm_bandwidth: float
  hbm_bytes: float
  source: str


def chip_for(device: Any) -> DeviceFigures | None:
  """Figures for one device (a jax device, or a device_kind string: a whole chip): its
  chip's, times the share of the chip it drives (v3 and deviceless v4 present one device
  per TensorCore; v4/v5p megacore one per chip). None for a kind CHIPS does not know."""
  kind = device if isinstance(device, str) else device.device_kind
  for prefix in sorted(CHIPS, key=len, reverse=True):
    if kind.startswith(prefix):
      chip = CHIPS[prefix]
      cores = None if isinstance(device, str) else getattr(device, "num_cores", None)
      cores = cores or chip.cores_per_chip
      share = min(cores, chip.cores_per_chip) / chip.cores_per_chip
      return DeviceFigures(
        kind,
        chip.peak_flops * share,
        chip.hbm_bandwidth * share,
        chip.hbm_bytes * share,
        chip.source,
      )
  return None


# A host with no TPU: these keep libtpu from probing for one (the values change nothing
# in a deviceless compile; shared/notes/offline-compile.md), and jax's own backend on the CPU.
_NO_TPU_HOST = {
  "TPU_ACCELERATOR_TYPE": "v5litepod-4",
  "TPU_WORKER_HOSTNAMES": "localhost",
  "TPU_WORKER_ID": "0",
}
TPU_FAMILIES = ("v2", "v3", "v4", "v5e", "v5p", "v6e")


def _tpu_devices(name: str) -> list[Any]:
  try:
    import libtpu  # noqa: F401  # Only to say what is missing.
  except ImportError:
    raise TopologyError(
      f"{FLAG}={name}: compiling for a TPU needs libtpu (pip install -r requirements-tpu.txt)"
    ) from None
  for key, value in _NO_TPU_HOST.items():
    os.environ.setdefault(key, value)
  from jax.experimental import topologies

  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
  except Exception as e:  # libtpu's errors are RuntimeError / XlaRuntimeError, unpredictably.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "lockfile" in first:  # Another process has libtpu loaded (one at a time by default).
      raise TopologyError(
        f"{FLAG}={name}: another process holds libtpu; set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to "
        "compile beside it (no TPU is touched)"
      ) from None
    raise TopologyError(
      f"{FLAG}={name}: libtpu does not know this slice ({first}); "
      "give <version>:<shape> as in v5e:4x4, v5p:2x2x4, v6e:8x8, v4:2x2x2"
    ) from None


# Family (the part of a name before ":", lower case) -> resolver(name) -> devices. GPU
# families ("h100", "h200": vlp_jax's GPU target configs, jax's CUDA wheels) add theirs.
TOPOLOGY_FAMILIES: dict[str, Callable[[str], list[Any]]] = dict.fromkeys(TPU_FAMILIES, _tpu_devices)


def _gpu_devices(name: str) -> list[Any]:
  try:
    return gpu_targets.topology_devices(name)
  except (ValueError, RuntimeError) as e:  # A bad count, or no CUDA plugin: say so, one line.
    raise TopologyError(str(e)) from None


# "h100", "h100:8" (one host's GPUs): XLA's GPU compiler against a shipped target spec.
TOPOLOGY_FAMILIES.update(dict.fromkeys(gpu_targets.GPU_TARGETS, _gpu_devices))


def topology_devices(name: str) -> list[Any]:
  """The devices of the named slice (e.g. "v5e:16x16"), deviceless: a mesh over them
  compiles with the real compiler for that hardware. TopologyError naming the flag for a
  name no family knows."""
  family = name.split(":", 1)[0].strip().lower()
  resolver = TOPOLOGY_FAMILIES.get(family)
  if resolver is None or (family in TPU_FAMILIES and ":" not in name):
    known = ", ".join(sorted(TOPOLOGY_FAMILIES))
    raise TopologyError(
      f"{FLAG}={name!r} names no known topology: give <family>:<shape>, family one of "
      f"{known} (e.g. v5e:4x4)"
    )
  devices = resolver(name)
  if not devices:
    raise TopologyError(f"{FLAG}={name}: the topology has no devices")
  return devices
