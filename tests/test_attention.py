"""Attention kernels (config.model.attention), compute dtype (config.model.dtype) and the
activation sharding constraints that keep an FSDP step free of full rematerialisation."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT
from vlp_jax import sharding
from vlp_jax.models import attention, bert, clip, layers, platform

SPMD_REMAT_WARNING = "Involuntary full rematerialization"


def _reference_attention(q, k, v, allowed):
  """Softmax attention written out: q (B, T, N, H), allowed (B, T, S) boolean."""
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(allowed[:, None], logits, -jnp.inf)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


def _qkv(batch=2, length=6, heads=3, head_dim=8, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return [jax.random.normal(key, (batch, length, heads, head_dim)) for key in keys]


def test_causal_attention_matches_explicit_softmax():
  q, k, v = _qkv()
  length = q.shape[1]
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (2, length, length))
  for implementation in ("xla", "auto"):  # "auto" is XLA's kernel on CPU.
    out = attention.dot_product_attention(q, k, v, implementation, is_causal=True)
    np.testing.assert_allclose(out, _reference_attention(q, k, v, causal), atol=1e-5)


def test_padding_mask_matches_explicit_softmax_and_ignores_padded_keys():
  q, k, v = _qkv()
  valid = jnp.array([[True] * 4 + [False] * 2, [True] * 6])  # Trailing padding, as tokenizers.
  out = attention.dot_product_attention(q, k, v, "xla", padding_mask=valid)
  allowed = jnp.broadcast_to(valid[:, None, :], (2, 6, 6))
  np.testing.assert_allclose(out, _reference_attention(q, k, v, allowed), atol=1e-5)
  # Whatever the padded positions hold, no query sees them.
  noise_k, noise_v = (100 * x for x in _qkv(seed=1)[:2])
  padded = ~valid[:, :, None, None]
  changed = attention.dot_product_attention(
    q, jnp.where(padded, noise_k, k), jnp.where(padded, noise_v, v), "xla", padding_mask=valid
  )
  np.testing.assert_array_equal(changed, out)


def test_cpu_heads_major_path_matches_jax_attention_values_and_gradients():
  # The CPU path's own layout must be jax.nn.dot_product_attention's XLA math exactly:
  # self- and cross-attention, causal and padded, forward and backward.
  q, _, _ = _qkv(length=5, seed=1)
  _, k, v = _qkv(length=7, seed=2)
  padding = jnp.arange(7)[None] < jnp.array([[7], [4]])
  for causal, mask in ((False, None), (True, None), (False, padding), (True, padding)):

    def ours(q, k, v, causal=causal, mask=mask):
      return attention.dot_product_attention(q, k, v, "xla", is_causal=causal, padding_mask=mask)

    def jaxs(q, k, v, causal=causal, mask=mask):
      jax_mask = None if mask is None else mask[:, None, None, :]
      return jax.nn.dot_product_attention(q, k, v, mask=jax_mask, is_causal=causal)

    np.testing.assert_allclose(ours(q, k, v), jaxs(q, k, v), atol=1e-5)
    grads = [
      jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
      for f in (ours, jaxs)
    ]
    for g_ours, g_jax in zip(*grads, strict=True):
      np.testing.assert_allclose(g_ours, g_jax, atol=1e-5)


def test_cpu_path_keeps_only_the_attention_weights_for_the_backward_pass():
  # What makes long sequences fit (VLC's 617 tokens): one (T, S) array per attention
  # between forward and backward, where autodiff of the plain math keeps four.
  q, _, _ = _qkv(length=5, seed=1)
  _, k, v = _qkv(length=7, seed=2)
  padding = jnp.arange(7)[None] < jnp.array([[7], [4]])

  def kept(f):
    vjp = jax.eval_shape(lambda *a: jax.tree.leaves(jax.vjp(f, *a)[1]), q, k, v)
    return [r.dtype for r in vjp if r.shape[-2:] == (5, 7) and r.size > 7 * 5]

  ours = kept(lambda q, k, v: attention.dot_product_attention(q, k, v, "xla", padding_mask=padding))
  assert ours == [jnp.float32]
  mask = padding[:, None, None, :]
  assert len(kept(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))) > 1


def test_bert_self_attention_ignores_padding_tokens():
  layer = bert.BertLayer(num_heads=2, mlp_dim=32)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  mask = jnp.array([[True, True, True, False, False], [True] * 5])
  params = layer.init(jax.random.PRNGKey(1), x, mask)
  out = layer.apply(params, x, mask)
  noisy = x.at[0, 3:].set(50.0)
  np.testing.assert_allclose(layer.apply(params, noisy, mask)[0, :3], out[0, :3], atol=1e-5)


def test_auto_attention_is_xla_on_cpu_and_cudnn_is_refused_by_name():
  assert attention.attention_implementation("auto", "cpu", jnp.bfloat16, 64) == "xla"
  assert attention.attention_implementation("auto", "tpu", jnp.bfloat16, 64) == "xla"
  assert attention.attention_implementation("xla", "cpu", jnp.float32, 64) == "xla"
  with pytest.raises(ValueError, match=r"config\.model\.attention='cudnn'.*GPU"):
    attention.attention_implementation("cudnn", "cpu", jnp.bfloat16, 64)
  with pytest.raises(ValueError, match=r"config\.model\.attention='flash' is not one of"):
    attention.attention_implementation("flash", "cpu", jnp.float32, 64)


def test_cudnn_on_cpu_fails_when_the_model_is_built(tiny_config):
  tiny_config.model.attention = "cudnn"
  with pytest.raises(ValueError, match=r"config\.model\.attention='cudnn'.*image tower"):
    clip.create_model(tiny_config.model, vocab_size=100)


def test_auto_dtype_is_bfloat16_on_accelerators_float32_on_cpu():
  assert platform.compute_dtype("auto", "cpu") == jnp.float32
  assert platform.compute_dtype("auto", "gpu") == jnp.bfloat16
  assert platform.compute_dtype("auto", "tpu") == jnp.bfloat16
  assert platform.compute_dtype("auto") == jnp.float32  # These tests run on CPU.
  assert platform.compute_dtype("float32", "tpu") == jnp.float32  # Explicit names win.
  assert platform.compute_dtype("bfloat16", "cpu") == jnp.bfloat16
  with pytest.raises(ValueError, match=r"config\.model\.dtype='bf17'"):
    platform.compute_dtype("bf17", "cpu")


def test_platform_comes_from_the_mesh_not_the_host():
  # A TPU mesh as a CPU host sees it when compiling for a topology (vlp_jax.preflight).
  tpu = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  tpu_mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=tpu)
  q = jnp.ones((2, 5, 2, 8), jnp.bfloat16)
  attend = lambda q: attention.dot_product_attention(q, q, q)  # noqa: E731
  assert platform.target_platform() == "cpu"
  assert "custom_vjp_call" in str(jax.make_jaxpr(attend)(q))  # The CPU heads-major path.
  with jax.sharding.use_abstract_mesh(tpu_mesh):
    assert platform.target_platform() == "tpu"
    assert platform.compute_dtype("auto") == jnp.bfloat16
    assert "custom_vjp_call" not in str(jax.make_jaxpr(attend)(q))  # jax.nn's XLA path.


def test_layer_norm_statistics_stay_float32_under_bfloat16():
  # A large offset with a small spread: bfloat16 statistics would lose the spread.
  x = (1000.0 + jnp.arange(8.0)).astype(jnp.bfloat16)[None]
  norm = layers.layer_norm("ln", jnp.bfloat16)
  params = norm.init(jax.random.PRNGKey(0), x)
  expected = (x.astype(jnp.float32) - x.astype(jnp.float32).mean()) / jnp.sqrt(
    x.astype(jnp.float32).var() + layers.LAYER_NORM_EPS
  )
  out = norm.apply(params, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=2e-2)


def test_batch_constraint_is_a_no_op_without_a_mesh():
  x = jnp.ones((8, 3, 4))
  assert sharding.constrain_batch(x) is x
  one_device = sharding.create_mesh({"data": 1}, jax.devices()[:1])
  with jax.sharding.use_abstract_mesh(one_device.abstract_mesh):
    assert sharding.constrain_batch(x) is x


# Compiles the real CLIP train step on {"fsdp": 8} and on one device at the same global
# batch. A 768-wide, 12-head ViT block on 64 px images: the smallest shape found where
# XLA, without the constraints, reported the full rematerialisation (5 times; the
# 192-wide 12-head model does not trigger it). Prints "flops <fsdp> <one device>".
_FSDP_SCRIPT = textwrap.dedent(
  """
  import sys
  sys.path[:0] = [{root!r}]
  import jax
  from vlp_jax.configs import clip_vitb16
  from vlp_jax import experiment, progress, sharding, trainer

  config = clip_vitb16.get_config("variant=B/16,batch_size=64")
  with config.unlocked():
    config.model.embed_dim = 64
    config.model.image.image_size = 64
    config.model.image.depth = 1
    config.model.text.update(width=64, num_heads=2, mlp_dim=128, depth=1, context_length=8)

  def flops(axes, devices):
    mesh = sharding.create_mesh(axes, devices)
    spec = experiment.TokenizerSpec(1000, 0, config.model.text.context_length)
    parts = experiment.create_step_parts(config, mesh, spec, 1000)
    abstract, shardings = trainer.abstract_train_state(parts.method, parts.tx, mesh, 0)
    state = jax.tree.map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract, shardings
    )
    with jax.set_mesh(mesh):  # The ambient mesh the activation constraints read.
      lowered = trainer.compile_step(parts, shardings).lower(state, parts.abstract_batch())
    return progress.compiled_flops(lowered.compile(), mesh.size)

  print("flops", flops({{"fsdp": 8}}, jax.devices()), flops({{"data": 1}}, jax.devices()[:1]))
  """
)


def test_fsdp_step_has_no_full_rematerialisation_and_one_device_flops():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")  # XLA's C++ warnings go to fd 2.
  result = subprocess.run(
    [sys.executable, "-c", _FSDP_SCRIPT.format(root=ROOT)],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert SPMD_REMAT_WARNING not in result.stderr
  fsdp_flops, one_device_flops = map(float, result.stdout.split("flops")[-1].split())
  assert abs(fsdp_flops / one_device_flops - 1) < 0.01, (fsdp_flops, one_device_flops)
