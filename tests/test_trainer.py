import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.runs import first_batches, run_train_in_process
from vlp_jax import checkpointing, sharding, trainer
from vlp_jax.config_lib import ConfigError


def test_nonfinite_loss_skips_the_update(tiny_config, tmp_path):
  exp = trainer.create_experiment(tiny_config, str(tmp_path))
  state, state_sharding = trainer.create_train_state(exp.method, exp.tx, exp.mesh, 0)
  params = dict(state.params)
  params["logit_scale"] = jnp.float32(jnp.nan)
  state = state.replace(params=params)
  before = jax.device_get(state.params)
  step_fn = trainer.compile_step(exp, state_sharding)
  batch = sharding.host_to_global(first_batches(exp, 1)[0], exp.mesh)
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
    (lambda c: setattr(c.data, "train", "/a:0.5,/b:x"), r"config.data.train.*weight"),
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
  tiny_config.stop_after_steps = 3  # A time-limited job: ends early with a checkpoint...
  trainer.train_and_evaluate(tiny_config, workdir)
  tiny_config.stop_after_steps = 0  # ...and the next one resumes there.
  metrics = trainer.train_and_evaluate(tiny_config, workdir)
  assert metrics["num_images"] == 64 and metrics["num_texts"] == 64
  for key in ("image_retrieval_recall@1", "text_retrieval_recall@10"):
    assert 0.0 <= metrics[key] <= 1.0
  tokenizer = json.loads(Path(workdir, "tokenizer.json").read_text())  # For weight export.
  assert tokenizer["kind"] == "wordpiece" and tokenizer["eos_id"] not in (0, tokenizer["pad_id"])
  saved = json.loads(Path(workdir, "eval_retrieval.json").read_text())
  assert saved["step"] == 4 and saved["metrics"] == metrics
  logged = [json.loads(line) for line in Path(workdir, "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 2, 3, 4]
  assert all(np.isfinite(m["loss"]) and m["examples_per_sec"] > 0 for m in logged)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3", "4"]
  assert trainer.evaluate_checkpoint(tiny_config, workdir) == metrics
  # A second run on the finished workdir resumes at the end and trains no more.
  assert trainer.train_and_evaluate(tiny_config, workdir) == metrics
  assert len(Path(workdir, "metrics.jsonl").read_text().splitlines()) == 4


def test_cli_rejects_an_unknown_config_key(tmp_path):
  result = run_train_in_process("configs/demo.py", tmp_path, "--config.optim.lrr=0.1")
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
  assert {
    "masks",
    "mask/cluster_coverage_mean",
    "mask/dropped_share",
    "mask/num_clusters",
    "loss",
  } <= tags

  # FLIP-style unmasked tuning from the masked run; lr ~0 so the parameters cannot move.
  tuning = tiny_config.copy_and_resolve_references()
  tuning.masking.kind = "none"
  tuning.init_from = source
  tuning.optim.lr = 1e-30  # The rules want lr > 0.
  tuning.total_steps = 1
  trainer.train_and_evaluate(tuning, tuned)
  checkpointer = ocp.StandardCheckpointer()
  before = checkpointer.restore(os.path.join(source, "checkpoints", "2", "state"))["params"]
  after = checkpointer.restore(os.path.join(tuned, "checkpoints", "1", "state"))["params"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-20), before, after)


def test_init_from_a_run_without_checkpoints_fails_with_its_path(tiny_config, tmp_path):
  tiny_config.init_from = str(tmp_path)
  exp = trainer.create_experiment(tiny_config, str(tmp_path / "run"))
  abstract, shardings = trainer.abstract_train_state(exp.method, exp.tx, exp.mesh, 0)
  with pytest.raises(ConfigError, match="no checkpoint in"):
    checkpointing.load_params(
      str(tmp_path), checkpointing.abstract_with_shardings(abstract, shardings)
    )
