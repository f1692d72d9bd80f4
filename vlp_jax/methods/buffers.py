"""Extra state that methods keep beside their parameters: EMA copies and feature queues.

Both are plain pytrees of arrays in `TrainState.extra`, so they are sharded by path like
the parameters, checkpointed, restored exactly and left unchanged when a step is skipped.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


def ema_update(average: Any, params: Any, momentum: float | jax.Array) -> Any:
  """average * momentum + params * (1 - momentum), leaf by leaf (ALBEF's momentum model)."""
  return jax.tree.map(
    lambda a, p: (a * momentum + jax.lax.stop_gradient(p) * (1 - momentum)).astype(a.dtype),
    average,
    params,
  )


@flax.struct.dataclass
class FeatureQueue:
  """A FIFO ring of `size` feature rows: `features` (size, D) and the next write row.

  Rows are written in global-batch order, so the queue holds the same values however the
  batch is sharded. `filled` counts valid rows until the ring is full.
  """

  features: jax.Array
  pointer: jax.Array  # int32 scalar: the row the next batch starts at.
  filled: jax.Array  # int32 scalar: valid rows (== size once the ring wrapped).

  @classmethod
  def create(cls, size: int, dim: int, dtype: Any = jnp.float32) -> FeatureQueue:
    return cls(jnp.zeros((size, dim), dtype), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  @property
  def size(self) -> int:
    return self.features.shape[0]

  def enqueue(self, batch: jax.Array) -> FeatureQueue:
    """The queue with `batch` (B, D) written at the pointer (B divides the size, as in
    ALBEF, so a batch never straddles the end of the ring)."""
    rows = batch.shape[0]
    if self.size % rows:
      raise ValueError(f"queue size {self.size} is not a multiple of the batch {rows}")
    batch = jax.lax.stop_gradient(batch).astype(self.features.dtype)
    features = jax.lax.dynamic_update_slice_in_dim(self.features, batch, self.pointer, axis=0)
    return FeatureQueue(
      features,
      (self.pointer + rows) % self.size,
      jnp.minimum(self.filled + rows, self.size),
    )

  def valid(self) -> jax.Array:
    """(size,) bool: rows that hold enqueued features."""
    return jnp.arange(self.size) < self.filled
