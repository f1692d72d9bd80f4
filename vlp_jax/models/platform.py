"""The platform a program is built for, and the compute dtype it implies.

One place resolves both (`config.model.dtype` "auto"), from the mesh's devices, never the
host's backend: a TPU step compiled from a CPU host (vlp_jax.preflight) gets bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

# config.model.dtype "auto": bfloat16 compute where the matmul units are made for it.
_BFLOAT16_BACKENDS = ("gpu", "tpu")


def target_platform(mesh: Mesh | None = None) -> str:
  """The platform ("cpu", "gpu", "tpu") a program is built for: that of `mesh`'s devices,
  else of the ambient mesh (the train step is traced under its mesh, trainer.compile_step),
  else of this process's default devices. Never the host's backend when a mesh is given:
  a step compiled on a CPU host for a TPU topology (vlp_jax.preflight) is a TPU program."""
  if mesh is not None:
    return mesh.devices.flat[0].platform
  ambient = jax.sharding.get_abstract_mesh()
  if not ambient.empty and ambient.abstract_device is not None:
    return ambient.abstract_device.platform
  return jax.devices()[0].platform


def compute_dtype(name: str, backend: str | None = None) -> jnp.dtype:
  """`config.model.dtype` -> the compute dtype: "auto" is bfloat16 on `backend` "gpu" or
  "tpu" (default: `target_platform()`; model builders pass their mesh's platform) and
  float32 elsewhere; other names as they say. Parameters stay float32 either way."""
  if name == "auto":
    backend = backend or target_platform()
    return jnp.dtype(jnp.bfloat16 if backend in _BFLOAT16_BACKENDS else jnp.float32)
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ValueError(
      f"config.model.dtype={name!r} is not 'auto' or a dtype name such as 'bfloat16'"
    ) from None
