"""Scale-out: meshes, FSDP and tensor rules, sharded losses, accumulation, remat, bf16."""

import dataclasses
import os
import socket
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import ROOT, xla_flags
from tests.runs import first_batches, logged_losses, run_train_in_process, train_command
from vlp_jax import checkpointing, experiment, progress, sharding, trainer
from vlp_jax.config_lib import ConfigError


def _run_steps(exp, batches, grad_accum_steps=1):
  if grad_accum_steps != exp.method.grad_accum_steps:
    exp = dataclasses.replace(
      exp, method=dataclasses.replace(exp.method, grad_accum_steps=grad_accum_steps)
    )
  state, state_sharding = trainer.create_train_state(exp.method, exp.tx, exp.mesh, 0)
  step_fn = trainer.compile_step(exp, state_sharding)
  step_losses = []
  for batch in batches:
    state, metrics = step_fn(state, sharding.host_to_global(batch, exp.mesh))
    step_losses.append(float(metrics["loss"]))
  return step_losses, state


def _on_mesh(exp, axes, devices=None):
  mesh = sharding.create_mesh(axes, devices)
  parts = experiment.create_step_parts(
    exp.config, mesh, exp.tokenizer, exp.total_steps, exp.train_sets
  )
  return dataclasses.replace(
    exp, **{f.name: getattr(parts, f.name) for f in dataclasses.fields(parts)}
  )


def _assert_close(result, reference, rtol=1e-5, param_rtol=1e-4):
  # Same math, different reduction order across devices: float32 round-off only.
  np.testing.assert_allclose(result[0], reference[0], rtol=rtol)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=param_rtol, atol=1e-6),
    jax.device_get(result[1].params),
    jax.device_get(reference[1].params),
  )


@pytest.fixture
def small_fsdp_threshold(monkeypatch):
  # The test model's tensors are tiny: shard everything of 256 values or more.
  monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 256)


@pytest.mark.parametrize(
  ("kind", "form", "meshes"),
  [
    # Pure data parallelism ({"data": 8}) is every other test's default mesh.
    ("clip", "auto", [{"data": 4, "fsdp": 2}, {"data": 2, "fsdp": 2, "tensor": 2}]),
    ("clip", "local", [{"data": 2, "fsdp": 2, "tensor": 2}]),
    ("siglip", "ring", [{"data": 2, "fsdp": 2, "tensor": 2}]),
  ],
)
def test_meshes_match_one_device(tiny_config, tmp_path, small_fsdp_threshold, kind, form, meshes):
  tiny_config.loss.kind, tiny_config.loss.form = kind, form
  exp = trainer.create_experiment(tiny_config, str(tmp_path))
  batches = first_batches(exp, 2)
  reference = _run_steps(_on_mesh(exp, {"data": 1}, jax.devices()[:1]), batches)
  for axes in meshes:
    result = _run_steps(_on_mesh(exp, axes), batches)
    _assert_close(result, reference)
    specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(result[1].params)}
    assert any("fsdp" in s for s in specs) == (axes.get("fsdp", 1) > 1)
    assert any("tensor" in s for s in specs) == (axes.get("tensor", 1) > 1)


def test_fsdp_splits_parameters_and_optimizer_state_evenly(tiny_config, tmp_path):
  exp = trainer.create_experiment(tiny_config, str(tmp_path))
  mesh = sharding.create_mesh({"fsdp": 8})
  abstract, shardings = trainer.abstract_train_state(exp.method, exp.tx, mesh, 0)
  for leaf, leaf_sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    local = leaf_sharding.shard_shape(leaf.shape)
    if leaf.size >= sharding.FSDP_MIN_SIZE and any(d % 8 == 0 for d in leaf.shape):
      assert np.prod(local) * 8 == leaf.size
    else:
      assert local == leaf.shape


@pytest.mark.parametrize(("kind", "masking"), [("clip", "random"), ("siglip", "none")])
def test_accumulating_microbatches_equals_one_big_batch(tiny_config, tmp_path, kind, masking):
  # Negatives are shared across the whole batch: the loss and gradients are the batch's.
  tiny_config.loss.kind = kind
  tiny_config.masking.kind = masking
  exp = _on_mesh(
    trainer.create_experiment(tiny_config, str(tmp_path)), {"data": 4}, jax.devices()[:4]
  )
  batches = first_batches(exp, 2)
  reference = _run_steps(exp, batches)
  _assert_close(_run_steps(exp, batches, grad_accum_steps=4), reference)


def test_remat_policies_change_memory_not_results(tiny_config, tmp_path):
  exp = trainer.create_experiment(tiny_config, str(tmp_path))
  batches = first_batches(exp, 1)
  reference = _run_steps(exp, batches)
  for policy in ("full", "dots"):
    tiny_config.model.remat = policy
    _assert_close(
      _run_steps(trainer.create_experiment(tiny_config, str(tmp_path)), batches), reference
    )


def test_bfloat16_compute_keeps_float32_master_weights(tiny_config, tmp_path):
  exp = trainer.create_experiment(tiny_config, str(tmp_path))
  batches = first_batches(exp, 2)
  reference = _run_steps(exp, batches)
  tiny_config.model.dtype = "bfloat16"
  result = _run_steps(trainer.create_experiment(tiny_config, str(tmp_path)), batches)
  assert {leaf.dtype for leaf in jax.tree.leaves(result[1].params)} == {np.dtype("float32")}
  np.testing.assert_allclose(result[0], reference[0], rtol=0.05)


def test_checkpoint_restores_onto_a_different_mesh(tiny_config, tmp_path, small_fsdp_threshold):
  exp = _on_mesh(trainer.create_experiment(tiny_config, str(tmp_path)), {"fsdp": 8})
  _, state = _run_steps(exp, first_batches(exp, 1))
  manager = checkpointing.create_checkpoint_manager(str(tmp_path), tiny_config)
  manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  for axes, devices in (({"data": 2, "tensor": 1}, jax.devices()[:2]), ({"data": 1}, None)):
    mesh = sharding.create_mesh(axes, devices or jax.devices()[:1])
    abstract, shardings = trainer.abstract_train_state(exp.method, exp.tx, mesh, 0)
    restored = checkpointing.restore_state(
      manager, 1, checkpointing.abstract_with_shardings(abstract, shardings)
    )
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
    assert {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(restored.params)} == {
      mesh.size
    }


@pytest.mark.parametrize(
  ("edit", "message"),
  [
    (lambda c: setattr(c, "grad_accum_steps", 3), "config.grad_accum_steps=3"),
    (lambda c: setattr(c.loss, "form", "ring"), "config.loss.form='ring'"),
    (lambda c: setattr(c.model, "remat", "some"), "config.model.remat='some'"),
  ],
)
def test_bad_scaling_configs_fail_before_any_compute(tiny_config, tmp_path, edit, message):
  edit(tiny_config)
  with pytest.raises(ConfigError, match=message):
    trainer.create_experiment(tiny_config, str(tmp_path))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env_with_devices(count: int) -> dict:
  return {**os.environ, "XLA_FLAGS": xla_flags(count)}


def test_two_processes_train_like_one_process(tmp_path, cache_dir, tiny_config):
  config = f"tests/configs/tiny.py:cache_dir={cache_dir},steps=5"
  flags = ("--config.data.num_workers=0", "--config.checkpoint_every_steps=5")
  port = _free_port()
  two = [
    subprocess.Popen(
      train_command(
        config,
        tmp_path / "two",
        *flags,
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      cwd=ROOT,
      env=_env_with_devices(2),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  # The single-process run is this process (8 devices, not the pair's 4): data parallelism
  # splits the same global batch, so only the reduction order differs.
  one = run_train_in_process(config, tmp_path / "one", *flags)
  assert one.returncode == 0, one.stderr[-3000:]
  for process in two:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
  losses_two = logged_losses(tmp_path / "two")
  assert len(losses_two) == 5
  np.testing.assert_allclose(losses_two, logged_losses(tmp_path / "one"), rtol=1e-5)
  # One checkpoint, written by both processes together, restores in this single process.
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["5"]
  exp = trainer.create_experiment(tiny_config, str(tmp_path / "restore"))
  mesh = sharding.create_mesh({"data": 1}, jax.devices()[:1])
  abstract = checkpointing.abstract_with_shardings(
    *trainer.abstract_train_state(exp.method, exp.tx, mesh, 0)
  )
  restored = []
  for run in ("two", "one"):
    manager = checkpointing.create_checkpoint_manager(str(tmp_path / run), tiny_config)
    restored.append(jax.device_get(checkpointing.restore_state(manager, 5, abstract).params))
  # Summation order differs across processes: parameters near zero differ by ~2e-6.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *restored)


def test_mfu_uses_the_compiled_step_flops(tiny_config, tmp_path):
  exp = trainer.create_experiment(tiny_config, str(tmp_path))
  state, state_sharding = trainer.create_train_state(exp.method, exp.tx, exp.mesh, 0)
  step_fn = trainer.compile_step(exp, state_sharding)
  flops = progress.step_flops(step_fn.trace(state, exp.abstract_batch()))  # As the trainer.
  # Forward + backward is about 6 FLOPs per parameter per token, plus attention and AdamW.
  params = sum(x.size for x in jax.tree.leaves(state.params))
  tokens = tiny_config.batch_size * (exp.method.model.visual.num_patches + 1 + 24)
  # Each tower's parameters see its own tokens only, so params x tokens counts ~2x high.
  assert 2 * params * tokens < flops < 30 * params * tokens
  assert progress.model_flops_utilization(8e12, 1.0, 1e12, 8) == pytest.approx(1.0)
  assert progress.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
  assert progress.peak_flops_per_device("cpu") is None
  assert progress.peak_flops_per_device("cpu", 5e11) == 5e11
