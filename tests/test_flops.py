"""FLOPs counted from the jaxpr (vlp_jax.flops): scans count length times, so a scanned
model's count equals the unrolled model's, which XLA's cost analysis counts right."""

import jax
import jax.numpy as jnp
import pytest

from vlp_jax import experiment, flops, progress, sharding, trainer
from vlp_jax.configs import clip_vitb16


def test_loops_and_branches_count_as_they_run():
  x = jnp.ones((4, 8))
  w = jnp.ones((8, 8))
  one = 2 * 4 * 8 * 8  # One (4, 8) @ (8, 8).
  scanned = lambda x: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]  # noqa: E731
  assert flops.count_flops(jax.make_jaxpr(scanned)(x)) == 5 * one
  branch = lambda x: jax.lax.cond(x.sum() > 0, lambda x: x @ w @ w, lambda x: x, x)  # noqa: E731
  # The dearer branch, plus the sum and the comparison (elementwise work counts once each).
  assert flops.count_flops(jax.make_jaxpr(branch)(x)) == 2 * one + 4 * 8 + 1
  layer = lambda x: jnp.sum(jnp.sin(x @ w) @ w)  # noqa: E731
  plain = flops.count_flops(jax.make_jaxpr(jax.grad(layer))(x))
  # Rematerialised, the backward pass recomputes x @ w (not the last product).
  assert flops.count_flops(jax.make_jaxpr(jax.grad(jax.checkpoint(layer)))(x)) == plain + one


def _clip_step(scan_layers: bool) -> jax.stages.Traced:
  """The real CLIP train step of a small 2-block model (width 256, where matrix products
  are ~98% of XLA's count), traced on one CPU device."""
  config = clip_vitb16.get_config("variant=B/16,batch_size=8")
  with config.unlocked():
    config.model.embed_dim = 64
    config.model.scan_layers = scan_layers
    config.model.image.update(image_size=64, width=256, depth=2, num_heads=4, mlp_dim=1024)
    config.model.text.update(width=256, depth=2, num_heads=4, mlp_dim=1024, context_length=16)
  mesh = sharding.create_mesh({"data": 1}, jax.devices()[:1])
  parts = experiment.create_step_parts(config, mesh, experiment.TokenizerSpec(1000, 0, 16), 100)
  abstract, shardings = trainer.abstract_train_state(parts.method, parts.tx, mesh, 0)
  state = jax.tree.map(
    lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract, shardings
  )
  return trainer.compile_step(parts, shardings).trace(state, parts.abstract_batch())


def test_scanned_step_flops_equal_the_unrolled_steps_xla_count():
  unrolled = _clip_step(scan_layers=False)
  xla = progress.compiled_flops(unrolled.lower().compile(), 1)
  scanned = progress.step_flops(_clip_step(scan_layers=True))
  assert scanned == pytest.approx(progress.step_flops(unrolled), rel=1e-4)
  assert scanned == pytest.approx(xla, rel=0.02)
