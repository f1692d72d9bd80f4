import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import ROOT
from vlp_jax import checkpointing, sharding, trainer
from vlp_jax.config_lib import ConfigError


def _host_batches(exp, num):
  iterator = iter(exp.train_dataset())
  return [{k: b[k] for k in trainer.MODEL_INPUTS} for b in (next(iterator) for _ in range(num))]


def _run_steps(exp, batches):
  state, state_sharding = trainer.create_train_state(exp.model, exp.tx, exp.mesh, 0)
  step_fn = trainer.compile_train_step(
    exp.model, exp.tx, exp.schedule, exp.masker, exp.mesh, state_sharding
  )
  losses = []
  for batch in batches:
    state, metrics = step_fn(state, sharding.host_to_global(batch, exp.mesh))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


def test_sharded_steps_match_one_device(tiny_config, tmp_path):
  assert jax.device_count() == 8
  exp = trainer.create_experiment(tiny_config, str(tmp_path))
  batches = _host_batches(exp, 2)
  one_device = dataclasses.replace(exp, mesh=sharding.create_mesh({"data": 1}, jax.devices()[:1]))
  reference_losses, reference_params = _run_steps(one_device, batches)
  for axes in ({"data": 8}, {"data": 4, "fsdp": 2}):
    mesh_exp = dataclasses.replace(exp, mesh=sharding.create_mesh(axes))
    losses, params = _run_steps(mesh_exp, batches)
    # Same math, different reduction order across devices: float32 round-off only.
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, reference_params
    )


def test_nonfinite_loss_skips_the_update(tiny_config, tmp_path):
  exp = trainer.create_experiment(tiny_config, str(tmp_path))
  state, state_sharding = trainer.create_train_state(exp.model, exp.tx, exp.mesh, 0)
  params = dict(state.params)
  params["logit_scale"] = jnp.float32(jnp.nan)
  state = state.replace(params=params)
  before = jax.device_get(state.params)
  step_fn = trainer.compile_train_step(
    exp.model, exp.tx, exp.schedule, exp.masker, exp.mesh, state_sharding
  )
  batch = sharding.host_to_global(_host_batches(exp, 1)[0], exp.mesh)
  new_state, metrics = step_fn(state, batch)
  assert int(new_state.step) == 1
  assert int(metrics["nonfinite_streak"]) == 1 and int(metrics["nonfinite_total"]) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.params), before)


@pytest.mark.parametrize(
  ("edit", "message"),
  [
    (lambda c: setattr(c, "batch_size", 12), "config.batch_size=12"),
    (lambda c: setattr(c.eval, "batch_size", 4), "config.eval.batch_size=4"),
    (lambda c: setattr(c.data, "train", "/no/such/shards"), r"config.data.train.*/no/such/shards"),
    (lambda c: setattr(c.data, "vocab_file", "/no/vocab.txt"), "config.data.vocab_file"),
    (lambda c: setattr(c.model.image, "variant", "Q/16"), "unknown ViT variant 'Q/16'"),
    (lambda c: setattr(c.masking, "kind", "clustr"), "config.masking.kind='clustr'"),
    (lambda c: setattr(c, "mesh", type(c.mesh)({"data": 3})), "needs 3 devices, found 8"),
  ],
)
def test_bad_configs_fail_before_any_compute(tiny_config, tmp_path, edit, message):
  edit(tiny_config)
  with pytest.raises((ConfigError, ValueError), match=message):
    trainer.create_experiment(tiny_config, str(tmp_path))


def test_unwritable_workdir_fails_with_its_name(tiny_config, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ConfigError, match=r"a_file/run.*not writable"):
    trainer.create_experiment(tiny_config, str(blocker / "run"))


def test_locked_config_names_a_misspelled_key(tiny_config):
  tiny_config.lock()
  with pytest.raises(AttributeError, match="lrr"):
    tiny_config.optim.lrr = 1.0


def test_train_then_evaluate_end_to_end(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  metrics = trainer.train_and_evaluate(tiny_config, workdir)
  assert metrics["num_images"] == 64 and metrics["num_texts"] == 64
  for key in ("image_retrieval_recall@1", "text_retrieval_recall@10"):
    assert 0.0 <= metrics[key] <= 1.0
  saved = json.loads(Path(workdir, "eval_retrieval.json").read_text())
  assert saved["step"] == 4 and saved["metrics"] == metrics
  logged = [json.loads(line) for line in Path(workdir, "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 2, 3, 4]
  assert all(np.isfinite(m["loss"]) and m["examples_per_sec"] > 0 for m in logged)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert trainer.evaluate_checkpoint(tiny_config, workdir) == metrics
  # A second run on the finished workdir resumes at the end and trains no more.
  assert trainer.train_and_evaluate(tiny_config, workdir) == metrics
  assert len(Path(workdir, "metrics.jsonl").read_text().splitlines()) == 4


def _run_train_py(config: str, workdir, *flags: str) -> subprocess.CompletedProcess:
  command = [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    f"--config={os.path.join(ROOT, config)}",
  ]
  command += [f"--workdir={workdir}", *flags]
  return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def _losses(workdir):
  by_step = {}
  for line in Path(workdir, "metrics.jsonl").read_text().splitlines():
    entry = json.loads(line)
    by_step[entry["step"]] = entry["loss"]
  return [by_step[s] for s in sorted(by_step)]


def test_resume_after_restart_is_exact(tmp_path, cache_dir):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  for args in ((straight,), (resumed, "--config.stop_after_steps=3"), (resumed,)):
    config = f"tests/configs/tiny.py:cache_dir={cache_dir},steps=6"
    result = _run_train_py(config, args[0], "--config.data.num_workers=1", *args[1:])
    assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming from the checkpoint of step 3" in result.stderr
  assert len(_losses(straight)) == 6
  assert _losses(resumed) == _losses(straight)
  checkpointer = ocp.StandardCheckpointer()
  final = [
    checkpointer.restore(os.path.join(d, "checkpoints", "6", "state")) for d in (straight, resumed)
  ]
  jax.tree.map(np.testing.assert_array_equal, final[0]["params"], final[1]["params"])


def test_cli_rejects_an_unknown_config_key(tmp_path):
  result = _run_train_py("configs/demo.py", tmp_path, "--config.optim.lrr=0.1")
  assert result.returncode != 0
  assert "lrr" in result.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_masked_run_logs_mask_pictures_and_a_tuning_run_starts_from_its_params(
  tiny_config, tmp_path
):
  import tensorflow as tf

  source, tuned = str(tmp_path / "source"), str(tmp_path / "tuned")
  tiny_config.masking.kind = "kmeans"
  tiny_config.masking.show_every_steps = 2
  tiny_config.total_steps = 2
  trainer.train_and_evaluate(tiny_config, source)
  tags = set()
  for events in Path(source).glob("events.out.tfevents*"):
    for event in tf.compat.v1.train.summary_iterator(str(events)):
      tags.update(value.tag for value in event.summary.value)
  assert {"masks", "mask/mask_ratio_mean", "mask/num_clusters", "loss"} <= tags

  # FLIP-style unmasked tuning from the masked run; lr 0 so the parameters cannot move.
  tuning = tiny_config.copy_and_resolve_references()
  tuning.masking.kind = "none"
  tuning.init_from = source
  tuning.optim.lr = 0.0
  tuning.total_steps = 1
  trainer.train_and_evaluate(tuning, tuned)
  checkpointer = ocp.StandardCheckpointer()
  before = checkpointer.restore(os.path.join(source, "checkpoints", "2", "state"))["params"]
  after = checkpointer.restore(os.path.join(tuned, "checkpoints", "1", "state"))["params"]
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_init_from_a_run_without_checkpoints_fails_with_its_path(tiny_config, tmp_path):
  tiny_config.init_from = str(tmp_path)
  exp = trainer.create_experiment(tiny_config, str(tmp_path / "run"))
  abstract, shardings = trainer.abstract_train_state(exp.model, exp.tx, exp.mesh, 0)
  with pytest.raises(ConfigError, match="no checkpoint in"):
    checkpointing.load_params(
      str(tmp_path), checkpointing.abstract_with_shardings(abstract, shardings)
    )
