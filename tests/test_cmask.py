"""CMask: the demo config's agent learns to mask image-grounded words, the agent_masking
report, resume after kill -9 mid-curriculum, the agent's gradient isolation, its own
optimizer group, and the logged curriculum share."""

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tests.runs import compilation_cache, crash_after_logged_step, logged_losses
from vlp_jax import experiment, optim, sharding
from vlp_jax.methods import MethodContext, cmask

DEMO_STEPS = 200  # Enough for the agent to separate grounded from function words.
# The demo run's first steps, killed after step 14: the agent picks some masks from step
# 10 on (share 0.1 of a caption's ~5), so its parameters and baseline are in play.
RESUME_STEPS, KILL_AFTER = 20, 14
GROUNDED = ("colour", "shape", "size", "relation")


def cmask_config(
  cache_dir: str = "", steps: int = 4, batch_size: int = 16
) -> ml_collections.ConfigDict:
  """tests/configs/tiny.py with configs/demo.py's CMask switch: 1 text-only + 1 fusion
  layer, 1 agent layer, curriculum over the first half of the run."""
  from tests.configs import tiny
  from vlp_jax.configs import demo

  config = tiny.get_config(f"cache_dir={cache_dir},steps={steps},batch_size={batch_size}")
  config.unlock()
  demo.use_cmask(config)
  config.model.text.depth = 2
  config.albef.fusion_layer = 1
  config.albef.queue_size = 2 * batch_size
  config.albef.queue_warmup_steps = 0  # The queue in every loss, as ALBEF.
  config.albef.alpha_ramp_steps = 4
  config.eval.tasks = ""
  config.seed = 0
  return config


def logged(workdir, key: str) -> dict[int, float]:
  by_step = {}
  for line in Path(workdir, "metrics.jsonl").read_text().splitlines():
    entry = json.loads(line)
    if key in entry:
      by_step[entry["step"]] = entry[key]
  return by_step


# ---------------------------------------------------------------- the demo run


@pytest.fixture(scope="module")
def demo_run(cache_dir, tmp_path_factory):
  """The tiny demo CMask trained once in this process, then its agent_masking report."""
  from vlp_jax import evaluation, progress, trainer

  workdir = tmp_path_factory.mktemp("cmask_demo")
  jax_cache = str(tmp_path_factory.mktemp("cmask_jax_cache"))
  config = cmask_config(cache_dir, DEMO_STEPS)
  config.checkpoint_every_steps = DEMO_STEPS  # Only the final state.
  started = time.time()
  with compilation_cache(jax_cache):  # The resume test's runs reuse the compiled step.
    trainer.train_and_evaluate(config, str(workdir))
  exp = trainer.create_experiment(config, str(workdir))
  step, params = trainer.restore_params(exp)
  # The report is a registered task: the evaluator builds it on the held-out set.
  results = exp.evaluator(tasks=["agent_masking"]).evaluate(params)
  writer = progress.create_metric_writer(str(workdir))
  evaluation.log_and_write(results, step, str(workdir), writer)
  writer.flush()
  print(f"demo CMask: {DEMO_STEPS} steps trained and reported in {time.time() - started:.0f} s")
  return workdir, config, results, jax_cache


def test_demo_agent_masks_grounded_words_more_than_function_words(demo_run):
  workdir, config, (result,), _ = demo_run
  metrics = result.metrics
  tokens = {c: metrics[f"tokens/{c}"] for c in GROUNDED if f"tokens/{c}" in metrics}
  grounded = sum(metrics[f"rate/{c}"] * n for c, n in tokens.items()) / sum(tokens.values())
  function = metrics["rate/function"]
  print(
    f"agent masking rates: grounded {grounded:.3f}, function {function:.3f}; "
    + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("rate/"))
  )
  print("top words:", [(w["word"], round(w["rate"], 3), w["count"]) for w in result.top_words])
  assert grounded > function
  # k = round(0.3 x length): the overall share chosen is about the mask ratio.
  assert metrics["masked_share"] == pytest.approx(config.cmask.mask_ratio, abs=0.08)
  assert "rate/other" not in metrics  # Every built-in word has a class.
  # The results JSON and the top words beside it, as the other tasks write theirs.
  (path,) = Path(workdir, "eval").glob("step_*/*_agent_masking.json")
  saved = json.loads(path.read_text())
  assert saved["task"] == "agent_masking" and saved["metrics"]["rate/function"] == function
  top = json.loads(Path(path.with_suffix(""), "top_words.json").read_text())
  assert top == result.top_words and 0 < len(top) <= 10


def test_curriculum_share_logged_is_step_over_curriculum_steps(demo_run):
  workdir, config, _, _ = demo_run
  share = logged(workdir, "agent/share")
  assert len(share) == DEMO_STEPS
  curriculum = config.cmask.curriculum_steps
  # metrics.jsonl's step s is the state after s updates: the share of update s - 1.
  for step, value in share.items():
    assert value == pytest.approx(min((step - 1) / curriculum, 1.0), abs=1e-6), step


# ---------------------------------------------------------------- resume after kill -9


def resume_config(cache_dir: str) -> ml_collections.ConfigDict:
  """The demo run's config (so its compiled step is reused), a run stopped after
  RESUME_STEPS of its own steps, with a checkpoint every 4 steps."""
  config = cmask_config(cache_dir, DEMO_STEPS)
  config.stop_after_steps = RESUME_STEPS
  config.checkpoint_every_steps = 4
  return config


def test_resume_after_a_crash_mid_curriculum_is_identical(demo_run, cache_dir, tmp_path):
  # The trainer dies in this process after logging step KILL_AFTER, before its save; a real
  # kill -9 (torn checkpoint writes) is tests/test_resilience.py's.
  from vlp_jax import trainer

  straight, _, _, jax_cache = demo_run
  killed = tmp_path / "killed"
  with compilation_cache(jax_cache):  # The demo run's compiled step.
    with crash_after_logged_step(KILL_AFTER):
      trainer.train_and_evaluate(resume_config(cache_dir), str(killed))
    assert len(logged_losses(killed)) == KILL_AFTER
    assert 0 < logged(killed, "agent/share")[KILL_AFTER] < 1  # Mid-curriculum.
    trainer.train_and_evaluate(resume_config(cache_dir), str(killed))
  # Losses see the queues and EMA (ITA over the queue, distillation); the agent's reward,
  # advantage and baseline see the agent's parameters and extra["baseline"].
  resumed_losses = logged_losses(killed)  # stop_after_steps counts this run's own steps.
  assert len(resumed_losses) >= RESUME_STEPS
  assert resumed_losses == logged_losses(straight)[: len(resumed_losses)]
  for key in ("agent/reward", "agent/advantage", "agent/baseline", "agent/log_prob"):
    resumed = logged(killed, key)
    assert [resumed[s] for s in sorted(resumed)] == [
      logged(straight, key)[s] for s in sorted(resumed)
    ], key
  assert logged(killed, "agent/baseline")[RESUME_STEPS] != 0.0  # It moved: the check bites.


# ---------------------------------------------------------------- gradients and groups

BATCH = 8
CONTEXT = 12
TOKENIZER = experiment.TokenizerSpec(50, 0, CONTEXT, cls_id=2, sep_id=3, mask_id=4)


def build_method(**fields) -> cmask.CMask:
  config = cmask_config(steps=20)
  mesh = sharding.create_mesh({"data": 1}, jax.devices()[:1])
  method = cmask.create(MethodContext(config, mesh, TOKENIZER, total_steps=20))
  return dataclasses.replace(method, **fields)


def random_batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
  tokens = np.zeros((BATCH, CONTEXT), np.int32)
  for row, length in enumerate(rng.integers(3, CONTEXT - 2, BATCH)):
    tokens[row, 0] = TOKENIZER.cls_id
    tokens[row, 1 : length + 1] = rng.integers(5, TOKENIZER.vocab_size, length)
    tokens[row, length + 1] = TOKENIZER.sep_id
  return {"image": images, "tokens": tokens}


@pytest.fixture(scope="module")
def grads_by_agent_weight():
  """Gradients of one mid-curriculum step's loss at agent_weight 0 (entropy 0) and 1."""
  batch = random_batch()
  method = build_method()
  params, extra = jax.jit(method.init)(jax.random.PRNGKey(0))
  step = jnp.int32(method.curriculum_steps // 2)  # Agent and random masks both present.
  grads = {}
  for weight, entropy in ((0.0, 0.0), (1.0, method.entropy_coef)):
    variant = dataclasses.replace(method, agent_weight=weight, entropy_coef=entropy)
    grad_fn = jax.jit(jax.grad(variant.loss, has_aux=True))
    grads[weight], _ = grad_fn(params, extra, batch, jax.random.PRNGKey(1), step)
  return method, params, grads


def test_agent_learns_only_from_its_own_loss(grads_by_agent_weight):
  method, params, grads = grads_by_agent_weight
  # agent_weight 0 and no entropy: the main model's losses give the agent no gradient...
  for leaf in jax.tree.leaves(grads[0.0]["agent"]):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  # ...so one optimizer step leaves it unchanged while the main model moves.
  tx = optim.create_optimizer(
    cmask_config().optim, lambda _: 1e-3, method.param_labels(), method.optimizer_groups(None)
  )
  updates, _ = tx.update(grads[0.0], tx.init(params), params)
  for leaf in jax.tree.leaves(updates["agent"]):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert any(np.abs(np.asarray(u)).max() > 0 for u in jax.tree.leaves(updates["model"]))
  # With agent_weight 1 the agent does learn.
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads[1.0]["agent"]))


def test_main_model_gradient_does_not_depend_on_the_agent_loss(grads_by_agent_weight):
  _, _, grads = grads_by_agent_weight
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
    grads[0.0]["model"],
    grads[1.0]["model"],
  )


def test_agent_is_its_own_optimizer_group(grads_by_agent_weight):
  method, params, _ = grads_by_agent_weight
  labels = method.param_labels()(params)
  assert set(jax.tree.leaves(labels["agent"])) == {"agent"}
  assert set(jax.tree.leaves(labels["model"])) == {"train"}
  assert set(method.optimizer_groups(None)) == {"agent"}
  tx = optim.create_optimizer(
    cmask_config().optim, lambda _: 1e-3, method.param_labels(), method.optimizer_groups(None)
  )
  state = tx.init(params)
  # multi_transform keeps one inner state per label; the agent's Adam holds moments for
  # its parameters only (the others are masked out of it).
  inner = state.inner_states
  assert set(inner) >= {"train", "agent"}
  agent_mu = inner["agent"].inner_state[1][0].mu
  assert jax.tree.structure(agent_mu["agent"]) == jax.tree.structure(params["agent"])
  assert all(
    isinstance(x, optax.MaskedNode)
    for x in jax.tree.leaves(agent_mu["model"], is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  )
