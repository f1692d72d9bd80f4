import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax import peft, sharding, trainer
from vlp_jax.config_lib import ConfigError
from vlp_jax.weights.state_dict import flatten, unflatten


def _random_batch(exp, seed=0):
  rng = np.random.default_rng(seed)
  size = exp.method.model.visual.image_size
  batch = exp.config.batch_size
  return {
    "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
    "tokens": rng.integers(1, 50, (batch, exp.method.model.text.context_length), dtype=np.int32),
  }


def _train(config, workdir, steps):
  exp = trainer.create_experiment(config, workdir)
  state, state_sharding = trainer.create_train_state(exp.method, exp.tx, exp.mesh, 0)
  before = flatten(jax.device_get(state.params))
  opt_state = state.opt_state
  step_fn = trainer.compile_step(exp, state_sharding)
  for i in range(steps):
    state, metrics = step_fn(state, sharding.host_to_global(_random_batch(exp, i), exp.mesh))
  assert int(metrics["nonfinite_total"]) == 0
  return exp, before, flatten(jax.device_get(state.params)), opt_state


@pytest.mark.parametrize("preset", ["lilt", "lora"])
def test_frozen_parameters_are_bit_identical_after_ten_steps(tiny_config, tmp_path, preset):
  tiny_config.peft.preset = preset
  tiny_config.peft.lora_rank = 4
  tiny_config.optim.lr = 1e-2
  exp, before, after, opt_state = _train(tiny_config, str(tmp_path), steps=10)
  labels = flatten(exp.method.labels(jax.tree.map(np.asarray, unflatten(before))))
  trained = {p for p, label in labels.items() if label == peft.TRAIN}
  assert trained and len(trained) < len(labels)
  for path in labels:
    if path in trained:
      assert not np.array_equal(before[path], after[path]), f"{path} did not train"
    else:
      np.testing.assert_array_equal(before[path], after[path], err_msg=path)
  if preset == "lora":
    assert all(p.endswith(("lora_a", "lora_b")) for p in trained)
  else:
    assert any("adapter_attn" in p for p in trained) and any("ln_1" in p for p in trained)
    assert "visual/proj" in trained and "logit_scale" in trained
  # Frozen parameters keep no optimizer state: Adam's moments cover the trainable ones only.
  state_size = sum(x.size for x in jax.tree.leaves(opt_state))
  trainable_size = sum(before[p].size for p in trained)
  assert 2 * trainable_size <= state_size < 2 * trainable_size + 16


def test_lora_with_zero_b_equals_the_base_model(tiny_config, tmp_path):
  base_exp = trainer.create_experiment(tiny_config, str(tmp_path / "base"))
  tiny_config.peft.preset = "lora"
  tiny_config.peft.lora_rank = 4
  tiny_config.peft.lora_targets = "in_proj,c_fc"
  lora_exp = trainer.create_experiment(tiny_config, str(tmp_path / "lora"))
  batch = _random_batch(lora_exp)
  images, tokens = batch["image"][:4], batch["tokens"][:4]
  # Jitted: one compiled program each, not one per eager op.
  params = jax.jit(lora_exp.method.model.init)(jax.random.PRNGKey(1), images[:2], tokens[:2])
  flat = flatten(params["params"])
  lora_paths = [p for p in flat if p.endswith(("lora_a", "lora_b"))]
  assert lora_paths and all(("in_proj" in p or "c_fc" in p) for p in lora_paths)
  base_params = unflatten({p: v for p, v in flat.items() if p not in lora_paths})
  lora_apply = jax.jit(lora_exp.method.model.apply)
  ours = lora_apply(params, images, tokens)
  base = jax.jit(base_exp.method.model.apply)({"params": base_params}, images, tokens)
  for key in ("image", "text"):
    np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(base[key]))
  # A non-zero B moves the outputs: the factors are in the forward pass.
  b_path = next(p for p in lora_paths if p.endswith("lora_b"))
  flat[b_path] = jnp.ones_like(flat[b_path])
  moved = lora_apply({"params": unflatten(flat)}, images, tokens)
  tower = "image" if b_path.startswith("visual/") else "text"
  assert not np.allclose(np.asarray(moved[tower]), np.asarray(ours[tower]), atol=1e-4)


def _tiny_params(tiny_config, tmp_path, preset, **peft_fields):
  tiny_config.peft.preset = preset
  for key, value in peft_fields.items():
    setattr(tiny_config.peft, key, value)
  tiny_config.model.image.depth = 2
  tiny_config.model.text.depth = 2
  exp = trainer.create_experiment(tiny_config, str(tmp_path))
  abstract, _ = trainer.abstract_train_state(exp.method, exp.tx, exp.mesh, 0)
  labels = exp.method.labels(abstract.params) if exp.method.labels else None
  return abstract.params, labels


@pytest.mark.parametrize(
  ("preset", "extra", "trains", "freezes"),
  [
    ("lit", {}, ["text/transformer/resblocks_0/attn/in_proj/kernel", "logit_scale"], ["visual/proj", "visual/conv1/kernel"]),
    ("bitfit", {}, ["visual/transformer/resblocks_1/mlp/c_fc/bias", "text/text_projection"], ["visual/transformer/resblocks_1/mlp/c_fc/kernel", "visual/ln_pre/scale"]),
    ("unlock_last", {}, ["visual/transformer/resblocks_1/attn/in_proj/kernel", "visual/ln_post/scale", "text/ln_final/bias"], ["visual/transformer/resblocks_0/attn/in_proj/kernel", "visual/ln_pre/scale", "text/token_embedding/embedding"]),
    ("lilt", {}, ["visual/transformer/resblocks_0/adapter_mlp/up/kernel", "text/transformer/resblocks_1/ln_2/scale", "visual/ln_pre/bias"], ["visual/transformer/resblocks_0/mlp/c_fc/kernel", "text/positional_embedding"]),
    ("all", {"text": "frozen"}, ["visual/conv1/kernel", "logit_scale"], ["text/text_projection", "text/ln_final/scale"]),
    ("lora", {"train_also": "logit_scale|attn/"}, ["logit_scale", "visual/transformer/resblocks_0/attn/out_proj/kernel", "text/transformer/resblocks_1/mlp/c_proj/lora_b"], ["visual/proj", "text/transformer/resblocks_1/mlp/c_proj/kernel"]),
  ],
)  # fmt: skip
def test_presets_label_parameters_by_path(tiny_config, tmp_path, preset, extra, trains, freezes):
  _, labels = _tiny_params(tiny_config, tmp_path, preset, **extra)
  labels = flatten(labels)
  for path in trains:
    assert labels[path] == peft.TRAIN, path
  for path in freezes:
    assert labels[path] == peft.FREEZE, path


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("preset", "lot", "config.peft.preset='lot'"),
    ("train_also", "(", "config.peft.train_also"),
    ("lora_rank", 0, "config.peft.lora_rank=0"),
  ],
)
def test_bad_peft_configs_fail_naming_the_key(tiny_config, tmp_path, field, value, message):
  tiny_config.peft.preset = "lora"
  setattr(tiny_config.peft, field, value)
  with pytest.raises(ConfigError, match=message):
    trainer.create_experiment(tiny_config, str(tmp_path))
