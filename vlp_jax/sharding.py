"""Device mesh, batch sharding and parameter sharding from the config.

The batch is split over the mesh's batch axes ("data" and "fsdp"). Parameters and
optimizer state are replicated, or, when the mesh has an "fsdp" axis larger than one,
sharded FSDP-style: the largest dimension divisible by the axis size is split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"
# Tensors smaller than this stay replicated under FSDP: splitting them saves nothing.
FSDP_MIN_SIZE = 2**14


def create_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh from {axis: size}; one size may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  names, sizes = list(axes.keys()), [int(s) for s in axes.values()]
  if not names:
    raise ValueError("config.mesh names no axes")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh {dict(axes)} has more than one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(
        f"config.mesh {dict(axes)}: {len(devices)} devices do not divide into axes of {known}"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"config.mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
      f"found {len(devices)}"
    )
  return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_size_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: tuple[int, ...], axis_size: int) -> PartitionSpec:
  """Splits the largest dimension divisible by `axis_size`; small tensors stay whole."""
  if axis_size <= 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return PartitionSpec()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % axis_size == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP_AXIS
      return PartitionSpec(*spec)
  return PartitionSpec()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of a (train state) pytree of ShapeDtypeStructs."""
  axis_size = mesh.shape.get(FSDP_AXIS, 1)
  return jax.tree.map(
    lambda leaf: NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), axis_size)), abstract_state
  )


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }
