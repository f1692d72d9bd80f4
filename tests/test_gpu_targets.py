"""GPU targets for deviceless compiles (vlp_jax.gpu_targets, `--topology=h100[:N]`) and the
cuDNN attention path's padding of odd lengths (models/attention.py).

The compile tests need jax's CUDA plugin (gpu_targets.INSTALL_LINE; no GPU) and skip
without it; everything else runs anywhere."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax import experiment, gpu_targets, sharding, topology, trainer
from vlp_jax.models import attention

needs_cuda_plugin = pytest.mark.skipif(
  not gpu_targets.cuda_plugin_installed(),
  reason=f"jax's CUDA plugin is not installed ({gpu_targets.INSTALL_LINE})",
)


@pytest.mark.parametrize("name", sorted(gpu_targets.GPU_TARGETS))
def test_each_shipped_spec_parses_and_names_its_source(name):
  text = gpu_targets.spec_text(name)
  header = text[: text.index("gpu_device_info")]
  assert re.search(r"openxla/xla, xla/backends/gpu/target_config/specs/\S+\.txtpb", header)
  assert re.search(r"at commit [0-9a-f]{40}", header)
  spec = gpu_targets.parse_text_proto(text)
  info = spec["gpu_device_info"][0]
  assert spec["platform_name"] == ["CUDA"]
  # The field jax 0.10.2's parser rejects stays out (the header says why).
  assert "collective_memory_granularity" not in info
  assert int(info["core_count"][0]) > 0 and len(info["cuda_compute_capability"]) == 1


def test_target_figures_come_from_the_specs():
  h100 = gpu_targets.target_info("h100")
  assert h100.device_kind == "NVIDIA H100 80GB HBM3"
  assert h100.memory_bytes == 84942979072 and h100.compute_capability == (9, 0)
  assert gpu_targets.target_info("a100").compute_capability == (8, 0)
  assert gpu_targets.target_info("h200").memory_bytes > 140e9


@pytest.mark.parametrize(
  "text", ["a { b: 1", "a { b: 1 } }", "a: ", "a b", "a { b: 1 } c"], ids=str
)
def test_text_proto_parser_refuses_malformed_text(text):
  with pytest.raises(ValueError, match="text proto"):
    gpu_targets.parse_text_proto(text)


def test_text_proto_parser_reads_nesting_repeats_and_strings():
  parsed = gpu_targets.parse_text_proto('# c\nx { k: 1 v { y: "a b" } }\nx { k: 2 }\nz: TRUE')
  assert parsed == {"x": [{"k": ["1"], "v": [{"y": ["a b"]}]}, {"k": ["2"]}], "z": ["TRUE"]}


def test_gpu_topology_names_and_missing_plugin(monkeypatch):
  assert gpu_targets.parse_topology("H100:8") == ("h100", 8)
  assert gpu_targets.parse_topology("h200") == ("h200", 1)
  assert gpu_targets.parse_topology("v5e:4x4") is None
  with pytest.raises(topology.TopologyError, match=r"--topology=h100:16: .* 1\.\.8"):
    topology.topology_devices("h100:16")
  monkeypatch.setattr(gpu_targets, "cuda_plugin_installed", lambda: False)
  with pytest.raises(topology.TopologyError) as error:
    topology.topology_devices("h100:8")
  message = str(error.value)
  assert "--topology=h100:8" in message and gpu_targets.INSTALL_LINE in message
  assert "\n" not in message


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [None, (7, 4)])
def test_cudnn_padding_of_odd_lengths_keeps_the_math(monkeypatch, causal, lengths):
  # cuDNN runs on GPUs only: jax's XLA attention stands in for it, taking the same
  # arguments (key lengths), so the padding, masking and cut are what is checked here.
  plain = jax.nn.dot_product_attention
  seen = []

  def stand_in(q, k, v, *, implementation, **kwargs):
    assert implementation == "cudnn"
    seen.append((q.shape[1], k.shape[1]))
    return plain(q, k, v, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (2, 7, 2, 8)) for key in keys[:3])
  mask = None if lengths is None else jnp.arange(7)[None] < jnp.asarray(lengths)[:, None]
  weights = jax.random.normal(keys[3], q.shape)

  def loss(attend, q, k, v):
    return jnp.sum(attend(q, k, v) * weights)

  padded = lambda q, k, v: attention._cudnn_attention(q, k, v, causal, mask)  # noqa: E731
  exact = lambda q, k, v: plain(  # noqa: E731
    q, k, v, is_causal=causal, mask=None if mask is None else mask[:, None, None, :]
  )
  got, got_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(padded, q, k, v)
  want, want_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(exact, q, k, v)
  assert seen and all(t % 2 == 0 and s % 2 == 0 for t, s in seen)  # What jax refuses: odd.
  assert attention._cudnn_attention(q, k, v, causal, mask).shape == q.shape
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@needs_cuda_plugin
@pytest.mark.parametrize("name", sorted(gpu_targets.GPU_TARGETS))
def test_jax_parses_each_shipped_spec(name):
  devices = topology.topology_devices(f"{name}:2")
  assert len(devices) == 2 and devices[0].platform == "gpu"
  assert devices[0].device_kind == gpu_targets.target_info(name).device_kind
  assert topology.chip_for(devices[0]) is not None


@needs_cuda_plugin
def test_tiny_step_compiles_for_an_h100_without_one(tiny_config):
  devices = topology.topology_devices("h100")
  mesh = sharding.create_mesh({"data": -1}, devices)
  tokenizer = experiment.TokenizerSpec(1000, 0, tiny_config.model.text.context_length)
  parts = experiment.create_step_parts(tiny_config, mesh, tokenizer, 10)
  abstract, state_sharding = trainer.abstract_train_state(parts.method, parts.tx, mesh, 0)
  state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sharding
  )
  lowered = trainer.compile_step(parts, state_sharding).lower(state, parts.abstract_batch())
  compiled = lowered.compile(compiler_options=gpu_targets.compiler_options(devices))
  text = compiled.as_text()
  # bf16 compute ("auto" on a GPU mesh) and cuDNN flash attention forward and backward for
  # both towers, the image tower's 5 tokens (4 patches + class) padded to 6.
  assert re.search(r"bf16\[[^\]]*\][^\n]*custom_call_target=\"__cublas", text)
  assert text.count('custom_call_target="__cudnn$fmhaSoftmax"') == 2
  assert text.count('custom_call_target="__cudnn$fmhaSoftmaxBackward"') == 2
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes > 0 and memory.temp_size_in_bytes > 0
