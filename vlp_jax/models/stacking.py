"""A block stack's two sides: what its backward pass keeps (remat policies), and its two
parameter layouts, unrolled (resblocks_<i>) and scanned (one "resblocks" with a leading
depth axis), with the one converter between them (weights, init_from, checkpoints)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# Activation rematerialisation policies (config.model.remat): what the backward pass keeps.
REMAT_POLICIES = {
  "none": None,  # Keep every activation: fastest, most memory.
  "full": jax.checkpoint_policies.nothing_saveable,  # Recompute each block: least memory.
  # Keep matmul outputs, recompute the cheap elementwise ops (softmax, gelu, layer norm).
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def refuse_scan_layers(scan_layers: bool, towers: str) -> None:
  """Fails before compute where `config.model.scan_layers` asks for a stacked layout that
  `towers` do not have (their blocks differ per depth or their importers map per block)."""
  if scan_layers:
    raise ValueError(
      f"config.model.scan_layers=True: {towers} have no scanned layout; set it to False "
      "(scanning serves the CLIP-style ViT and text towers)"
    )


def remat_policy_name(remat: bool | str) -> str:
  """Normalises `config.model.remat` (a policy name; True/False mean "full"/"none")."""
  name = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={remat!r} is not one of {tuple(REMAT_POLICIES)}")
  return name


def with_remat(
  block_cls: type[nn.Module], remat: bool | str, prevent_cse: bool = True
) -> type[nn.Module]:
  """`block_cls`, rematerialised under the `config.model.remat` policy (unless "none").

  Inside a scan, `prevent_cse=False`: the scan already keeps XLA from merging the
  recomputation into the forward pass, and the extra barriers would only slow it.
  """
  policy = remat_policy_name(remat)
  if policy == "none":
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse)


# The scanned layout's name for the stacked blocks, and the unrolled layout's block names.
STACKED_BLOCKS = "resblocks"
_UNROLLED_BLOCK = re.compile(rf"^{STACKED_BLOCKS}_(\d+)$")


def _is_unrolled_parent(node: Any) -> bool:
  return isinstance(node, Mapping) and any(_UNROLLED_BLOCK.match(str(k)) for k in node)


def _is_stacked_parent(node: Any) -> bool:
  return isinstance(node, Mapping) and STACKED_BLOCKS in node


def has_stacked_blocks(tree: Any) -> bool:
  """Whether `tree` (parameters, a train state...) holds scanned-layout blocks."""
  found = []
  jax.tree_util.tree_map(
    lambda node: found.append(_is_stacked_parent(node)), tree, is_leaf=_is_stacked_parent
  )
  return any(found)


def _stacked_sharding(sharding: Any, add: bool) -> Any:
  """A NamedSharding with the layer axis added (replicated: the scan slices it) or
  removed; other shardings (one device) fit either layout."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  return NamedSharding(sharding.mesh, PartitionSpec(*((None, *spec) if add else spec[1:])))


def _stack_leaves(*leaves: Any) -> Any:
  first = leaves[0]
  if hasattr(first, "shape") and any(leaf.shape != first.shape for leaf in leaves):
    raise ValueError(f"blocks have shapes {sorted({leaf.shape for leaf in leaves})}: not stackable")
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(
      (len(leaves), *first.shape), first.dtype, sharding=_stacked_sharding(first.sharding, True)
    )
  if isinstance(first, np.ndarray | np.generic):
    return np.stack(leaves)
  if isinstance(first, jax.Array):
    return jnp.stack(leaves)
  if any(leaf != first for leaf in leaves):  # Labels (peft, optimizer groups) and the like.
    raise ValueError(f"blocks differ ({sorted(set(map(str, leaves)))}): they cannot be stacked")
  return first


def _unstack_leaf(leaf: Any, depth: int) -> list[Any]:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    sharding = _stacked_sharding(leaf.sharding, False)
    return [jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)] * depth
  if isinstance(leaf, np.ndarray | jax.Array):
    return [leaf[i] for i in range(depth)]
  return [leaf] * depth


def _stack_node(node: Any) -> Any:
  if not _is_unrolled_parent(node):
    return node
  blocks = sorted((int(m.group(1)), k) for k in node if (m := _UNROLLED_BLOCK.match(str(k))))
  if [i for i, _ in blocks] != list(range(len(blocks))):
    raise ValueError(f"blocks {[k for _, k in blocks]} are not numbered 0..{len(blocks) - 1}")
  out = {k: v for k, v in node.items() if not _UNROLLED_BLOCK.match(str(k))}
  out[STACKED_BLOCKS] = jax.tree.map(_stack_leaves, *(node[k] for _, k in blocks))
  return type(node)(out) if not isinstance(node, dict) else out


def _unstack_node(node: Any) -> Any:
  if not _is_stacked_parent(node):
    return node
  stacked = node[STACKED_BLOCKS]
  depths = {leaf.shape[0] for leaf in jax.tree.leaves(stacked) if hasattr(leaf, "shape")}
  if len(depths) != 1:
    raise ValueError(f"stacked blocks have leading axes {sorted(depths)}, not one depth")
  (depth,) = depths
  leaves, treedef = jax.tree.flatten(stacked)
  columns = [_unstack_leaf(leaf, depth) for leaf in leaves]
  out = {k: v for k, v in node.items() if k != STACKED_BLOCKS}
  for i in range(depth):
    out[f"{STACKED_BLOCKS}_{i}"] = jax.tree.unflatten(treedef, [c[i] for c in columns])
  return type(node)(out) if not isinstance(node, dict) else out


def stack_blocks(tree: Any) -> Any:
  """Unrolled layout (resblocks_0..N-1) -> scanned layout (one "resblocks" subtree whose
  leaves have a leading axis N), wherever blocks appear in `tree`: parameters, optimizer
  moments, a whole train state, labels, or their ShapeDtypeStructs (shardings get a
  replicated layer axis). A tree already scanned is returned as it is."""
  return jax.tree_util.tree_map(_stack_node, tree, is_leaf=_is_unrolled_parent)


def unstack_blocks(tree: Any) -> Any:
  """The inverse of `stack_blocks`: scanned layout -> resblocks_<i> (exact: slices)."""
  return jax.tree_util.tree_map(_unstack_node, tree, is_leaf=_is_stacked_parent)
