"""Device mesh, batch sharding and parameter sharding from the config.

The batch is split over the mesh's batch axes ("data" and "fsdp"). Parameters and
optimizer state are replicated, except: with a "tensor" axis larger than one, the MLP and
attention projections are split Megatron-style (TENSOR_RULES); with an "fsdp" axis larger
than one, every large tensor is also split FSDP-style over its largest divisible
dimension. The config's mesh is the switch: {"data": -1, "fsdp": 8, "tensor": 2}.
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
TENSOR_AXIS = "tensor"
# Tensors smaller than this stay replicated under FSDP: splitting them saves nothing.
FSDP_MIN_SIZE = 2**14
# The path part of scanned blocks (models.stacking.STACKED_BLOCKS; not imported, so that
# the models can import this module).
STACKED_BLOCKS = "resblocks"


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


# Megatron-style splits over a "tensor" axis: (parameter path suffix, dimension of one
# block's tensor; param_spec shifts it past a scanned stack's layer axis). The MLP's
# hidden units and the attention projections are split; XLA inserts the collectives.
TENSOR_RULES = (
  ("mlp/c_fc/kernel", 1),
  ("mlp/c_fc/bias", 0),
  ("mlp/c_proj/kernel", 0),
  ("attn/in_proj/kernel", 1),
  ("attn/in_proj/bias", 0),
  ("attn/out_proj/kernel", 0),
  # BERT towers (models/bert.py): column-split q/k/v and FFN input, row-split outputs.
  *(
    (f"/{name}/{leaf}", dim)
    for name in ("query", "key", "value", "intermediate")
    for leaf, dim in (("kernel", 1), ("bias", 0))
  ),
  ("/attention_output/kernel", 0),
  ("/output/kernel", 0),
)


def param_spec(path: str, shape: tuple[int, ...], mesh_shape: Mapping[str, int]) -> PartitionSpec:
  """Tensor-parallel rule for `path` if one applies, then FSDP over the largest free
  dimension divisible by the "fsdp" axis; tensors under FSDP_MIN_SIZE stay whole.

  Scanned blocks (config.model.scan_layers: a "resblocks" path part, leading axis =
  depth) get their unrolled block's spec behind an unsharded layer axis: the scan slices
  that axis one block per step, so it is never split.
  """
  layer_axes = 1 if STACKED_BLOCKS in path.split("/") and shape else 0
  block_shape = shape[layer_axes:]
  spec: list[str | None] = [None] * len(block_shape)
  tensor_size = mesh_shape.get(TENSOR_AXIS, 1)
  if tensor_size > 1:
    for suffix, dim in TENSOR_RULES:
      if path.endswith(suffix) and block_shape[dim] % tensor_size == 0:
        spec[dim] = TENSOR_AXIS
        break
  fsdp_size = mesh_shape.get(FSDP_AXIS, 1)
  if fsdp_size > 1 and math.prod(block_shape) >= FSDP_MIN_SIZE:
    for dim in sorted(range(len(block_shape)), key=lambda d: -block_shape[d]):
      if spec[dim] is None and block_shape[dim] % fsdp_size == 0:
        spec[dim] = FSDP_AXIS
        break
  return PartitionSpec(*([None] * layer_axes), *spec)


def constrain_batch(x: jax.Array, tensor_dim: int | None = None) -> jax.Array:
  """`x` with its leading (batch) dimension split over the ambient mesh's batch axes and
  every other dimension whole; `tensor_dim` (the heads of q/k/v) is left to XLA when the
  mesh has a "tensor" axis, which splits the attention projections.

  Without it, XLA's propagation may carry an FSDP-split weight's layout into the
  activations (12 heads over 8 devices cannot be split evenly) and then fully
  rematerialise them. A no-op without an ambient mesh (`jax.set_mesh`) or on one device,
  so single-device programs are unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x  # A batch that does not split (an evaluation remainder): leave it to XLA.
  spec: list[Any] = [axes, *([None] * (x.ndim - 1))]
  if tensor_dim is not None and mesh.shape.get(TENSOR_AXIS, 1) > 1:
    spec[tensor_dim] = PartitionSpec.UNCONSTRAINED
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def _path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of a (train state) pytree of ShapeDtypeStructs.

  Optimizer moments have their parameter's path as a suffix, so they shard alike.
  """
  mesh_shape = dict(mesh.shape)
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: NamedSharding(
      mesh, param_spec(_path_str(path), tuple(leaf.shape), mesh_shape)
    ),
    abstract_state,
  )


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


def host_tree_to_global(tree: Any, shardings: Any) -> Any:
  """Full host copies (the same on every process) -> global arrays with `shardings`; each
  process places only its own devices' slices."""
  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: np.asarray(x)[index]),
    tree,
    shardings,
  )
