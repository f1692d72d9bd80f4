"""The method interface: existing methods unchanged by the move onto it, a toy method
with extra state through the real trainer (FSDP, checkpoints, kill -9 and resume), EMA and
queue building blocks, task refusal, and the import layering."""

import ast
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.conftest import ROOT
from tests.runs import crash_after_logged_step, logged_losses
from vlp_jax import trainer
from vlp_jax.config_lib import ConfigError
from vlp_jax.configs.common import use_method
from vlp_jax.methods import METHODS, Method, MethodContext, buffers

GOLDEN = json.loads(Path(ROOT, "tests/golden/losses_before_methods.json").read_text())
# The variants recorded from the trainer before the method interface (GOLDEN["commit"]).
VARIANTS = {
  "clip": {},
  "siglip": {"loss.kind": "siglip"},
  "random_masking": {"masking.kind": "random"},
  "cluster_masking": {"masking.kind": "cluster"},
  "lilt": {"peft.preset": "lilt"},
  "negclip": {"method": "negclip", "negclip.tagger": "lexicon"},
  "grad_accum_4": {"grad_accum_steps": 4, "batch_size": 32},
  "mesh_2x2x2": {"mesh": {"data": 2, "fsdp": 2, "tensor": 2}},
}


def _set(config: ml_collections.ConfigDict, key: str, value) -> None:
  if key == "method":  # With the method's own config blocks (config.negclip).
    use_method(config, value)
    return
  *parents, leaf = key.split(".")
  for part in parents:
    config = config[part]
  config[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_losses_equal_the_trainer_before_the_method_interface(cache_dir, tmp_path, variant):
  # Bit-identical on the machine that moved the code (same XLA programs); the tolerance
  # leaves room for another CPU's vector code in a fresh CI machine.
  from tests.configs import tiny

  config = tiny.get_config(f"cache_dir={cache_dir},steps=10")
  config.unlock()
  for key, value in VARIANTS[variant].items():
    _set(config, key, value)
  config.checkpoint_every_steps = 100
  config.eval.tasks = ""  # Losses only: no evaluation needed.
  trainer.train_and_evaluate(config, str(tmp_path))
  np.testing.assert_allclose(logged_losses(tmp_path), GOLDEN["losses"][variant], rtol=1e-5)


# ---------------------------------------------------------------- a toy method


class ToyRegression(Method):
  """Predicts each image's mean brightness from its 4x4-pooled pixels. Extra state: an
  EMA of the parameters and a queue of pooled features, whose mean enters the loss (so
  resuming with a wrong queue would change the losses)."""

  name = "toy"

  def __init__(self, ctx: MethodContext):
    self.image_size = ctx.config.model.image.image_size
    self.features = 3 * (self.image_size // 4) ** 2
    self.queue_size = 4 * ctx.config.batch_size

  def batch_spec(self, batch_size):
    shape = (batch_size, self.image_size, self.image_size, 3)
    return {"image": jax.ShapeDtypeStruct(shape, jnp.uint8)}

  def init(self, rng):
    params = {"w": 0.01 * jax.random.normal(rng, (self.features, 8)), "b": jnp.zeros((8,))}
    extra = {
      "ema": jax.tree.map(jnp.copy, params),
      "queue": buffers.FeatureQueue.create(self.queue_size, self.features),
    }
    return params, extra

  def _pool(self, images):
    x = images.astype(jnp.float32) / 255
    b, s = x.shape[0], self.image_size // 4
    return x.reshape(b, s, 4, s, 4, 3).mean(axis=(2, 4)).reshape(b, -1)

  def loss(self, params, extra, batch, rng, step):
    features = self._pool(batch["image"])
    noise = 0.01 * jax.random.normal(rng, features.shape)  # The step's rng matters too.
    prediction = ((features + noise) @ params["w"] + params["b"]).mean(axis=1)
    target = features.mean(axis=1)
    queue = extra["queue"]
    valid = queue.valid()[:, None]
    queue_mean = (queue.features * valid).sum(0) / jnp.maximum(valid.sum(), 1)
    loss = jnp.mean((prediction - target) ** 2) + 0.1 * jnp.mean(queue_mean @ params["w"]) ** 2
    new_extra = {
      "ema": buffers.ema_update(extra["ema"], params, 0.9),
      "queue": queue.enqueue(features),
    }
    return loss, ({"loss": loss, "queue_filled": queue.filled}, new_extra)


def run_toy(workdir, cache_dir: str, steps: int) -> None:
  """Trains the toy method (registered by the caller) with the real trainer on an 8-way
  FSDP mesh, then saves the final state's params and extra to <workdir>/final.npz."""
  from tests.configs import tiny
  from vlp_jax import checkpointing

  workdir = str(workdir)
  config = tiny.get_config(f"cache_dir={cache_dir},steps={steps}")
  config.unlock()
  config.method = "toy"
  config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 8})
  config.eval.tasks = ""
  trainer.train_and_evaluate(config, workdir)
  exp = trainer.create_experiment(config, workdir)
  abstract, shardings = trainer.abstract_train_state(exp.method, exp.tx, exp.mesh, config.seed)
  manager = checkpointing.create_checkpoint_manager(workdir, config)
  state = checkpointing.restore_state(
    manager, steps, checkpointing.abstract_with_shardings(abstract, shardings)
  )
  queue = state.extra["queue"].features
  sharded = {str(queue.sharding.spec), str(state.extra["ema"]["w"].sharding.spec)}
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get((state.params, state.extra)))[0]
  arrays = {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}
  np.savez(os.path.join(workdir, "final.npz"), specs=np.array(sorted(sharded)), **arrays)


def test_toy_method_with_extra_state_resumes_exactly_after_a_crash(
  cache_dir, tmp_path, monkeypatch
):
  # The trainer dies in this process after logging step 5, before its save; a real kill -9
  # (torn checkpoint writes) is tests/test_resilience.py's.
  from vlp_jax import sharding

  monkeypatch.setitem(METHODS, "toy", ToyRegression)
  monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 256)  # Small tensors: shard them anyway.
  steps = 12
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  run_toy(straight, cache_dir, steps)
  with crash_after_logged_step(5):
    run_toy(killed, cache_dir, steps)
  assert len(logged_losses(killed)) == 5 and not (killed / "final.npz").exists()
  run_toy(killed, cache_dir, steps)
  assert logged_losses(killed) == logged_losses(straight)
  expected, found = np.load(straight / "final.npz"), np.load(killed / "final.npz")
  assert sorted(expected.files) == sorted(found.files)
  for key in expected.files:
    np.testing.assert_array_equal(found[key], expected[key], err_msg=key)
  # The queue and the EMA copy are sharded over "fsdp" like parameters.
  assert all("fsdp" in spec for spec in expected["specs"])
  assert any(k.endswith("['queue'].features") for k in expected.files)


def test_a_task_the_method_cannot_serve_is_refused_before_compute(tiny_config, tmp_path):
  METHODS["toy"] = ToyRegression
  try:
    tiny_config.method = "toy"
    tiny_config.eval.tasks = "heldout"
    with pytest.raises(
      ConfigError,
      match=r"'toy' offers no embeddings for evaluation task 'heldout': it needs embed_image",
    ):
      trainer.create_experiment(tiny_config, str(tmp_path))
  finally:
    del METHODS["toy"]


def test_unknown_method_is_named(tiny_config, tmp_path):
  tiny_config.method = "albeff"
  with pytest.raises(ConfigError, match=r"config.method='albeff' is not one of"):
    trainer.create_experiment(tiny_config, str(tmp_path))


# ---------------------------------------------------------------- EMA and queue


def test_ema_update_is_exact_and_passes_no_gradient():
  rng = np.random.default_rng(0)
  average = {"a": rng.normal(size=(3, 4)).astype(np.float32)}
  params = {"a": rng.normal(size=(3, 4)).astype(np.float32)}
  out = jax.jit(buffers.ema_update)(average, params, 0.995)
  np.testing.assert_allclose(out["a"], average["a"] * 0.995 + params["a"] * 0.005, rtol=1e-6)
  grad = jax.grad(lambda p: buffers.ema_update(average, p, 0.5)["a"].sum())(params)
  assert not np.asarray(grad["a"]).any()


def test_feature_queue_is_fifo_over_global_batches_and_sharded():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  queue = buffers.FeatureQueue.create(16, 2)
  queue = jax.tree.map(lambda x: jax.device_put(x, spec) if x.ndim else x, queue)
  enqueue = jax.jit(lambda q, b: q.enqueue(b))
  batches = [np.full((8, 2), i, np.float32) for i in range(1, 4)]
  queue = enqueue(queue, batches[0])
  assert int(queue.filled) == 8 and queue.valid().tolist() == [True] * 8 + [False] * 8
  queue = enqueue(queue, batches[1])
  queue = enqueue(queue, batches[2])  # Overwrites the oldest rows: FIFO.
  np.testing.assert_array_equal(queue.features[:8], batches[2])
  np.testing.assert_array_equal(queue.features[8:], batches[1])
  assert int(queue.pointer) == 8 and int(queue.filled) == 16
  assert queue.features.sharding.spec == spec.spec
  with pytest.raises(ValueError, match="not a multiple"):
    buffers.FeatureQueue.create(10, 2).enqueue(np.zeros((4, 2), np.float32))


# ---------------------------------------------------------------- import layering

# Lowest first: a module imports only from its own layer or below (and no cycles).
LAYERS = (
  (
    "vlp_jax",  # The package's __init__ imports nothing.
    "vlp_jax.config_lib",
    "vlp_jax.sharding",
    "vlp_jax.models",
    "vlp_jax.losses",
    "vlp_jax.masking",
    "vlp_jax.peft",
    "vlp_jax.optim",
    "vlp_jax.preemption",
    "vlp_jax.processes",
    "vlp_jax.cli",  # Flags, logging, user errors; imports config_lib only.
    "vlp_jax.gpu_targets",  # GPU target specs as data; imports nothing of vlp_jax.
    "vlp_jax.flops",  # Counts a jaxpr's FLOPs; imports nothing of vlp_jax.
    "vlp_jax.topology",  # Devices and chips of a named slice; gpu_targets and config_lib.
  ),
  (
    "vlp_jax.input_pipeline",
    "vlp_jax.weights",
    "vlp_jax.progress",
    "vlp_jax.checkpointing",
    "vlp_jax.workdir_lock",
  ),
  ("vlp_jax.pretrained",),
  ("vlp_jax.methods",),
  # Evaluation runs what methods predict: a method never imports evaluation (their shared
  # readers are in input_pipeline).
  ("vlp_jax.evaluation",),
  ("vlp_jax.configs",),  # The base config merges the methods' own blocks.
  ("vlp_jax.experiment",),
  (
    "vlp_jax.trainer",
    "vlp_jax.eval_runner",
    "vlp_jax.show_masks",
    "vlp_jax.preflight",
    "vlp_jax.train",  # python -m vlp_jax.train, and train.py.
  ),
)


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
  for index, prefixes in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes if p != "vlp_jax"):
      return index
    if module == "vlp_jax" and module in prefixes:
      return index
  raise AssertionError(f"{module} is in no layer of tests/test_methods.py LAYERS: add it")


def _imports(path: Path, modules: set[str]) -> set[str]:
  """vlp_jax modules `path` imports, anywhere in the file (also inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        child = f"{node.module}.{alias.name}"
        found.add(child if child in modules else node.module)
  return {m for m in found if m.startswith("vlp_jax")}


def test_imports_are_layered_without_cycles():
  files = {_module_name(p): p for p in Path(ROOT, "vlp_jax").rglob("*.py")}
  modules = set(files)
  graph = {name: _imports(path, modules) - {name} for name, path in files.items()}
  upward = [
    f"{name} -> {dep}"
    for name, deps in graph.items()
    for dep in deps
    if dep != "vlp_jax" and _layer(dep) > _layer(name)
  ]
  assert not upward, f"imports against the layering: {upward}"

  def package_edge(a: str, b: str) -> bool:  # A package and its own submodules.
    return b.startswith(a + ".") or a.startswith(b + ".")

  state: dict[str, int] = {}

  def visit(name: str, trail: list[str]) -> None:
    state[name] = 1
    for dep in sorted(graph.get(name, ())):
      if package_edge(name, dep):
        continue
      if state.get(dep) == 1:
        raise AssertionError(f"import cycle: {' -> '.join([*trail, name, dep])}")
      if dep not in state:
        visit(dep, [*trail, name])
    state[name] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [])


def test_a_shard_set_without_records_fails_before_any_compute(tiny_config, tmp_path):
  from vlp_jax.input_pipeline import records

  empty = str(tmp_path / "empty-00000-of-00001.arrayrecord")
  records.write_shard(empty, [])
  tiny_config.data.train = empty
  tiny_config.data.eval = empty
  tiny_config.data.vocab_file = str(tmp_path / "vocab.txt")
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
  with pytest.raises(ConfigError, match=r"config.data.train: .* has 0 records, fewer than"):
    trainer.create_experiment(tiny_config, str(tmp_path / "run"))


def test_checkpoints_from_before_extra_state_still_restore(tmp_path):
  import flax
  import orbax.checkpoint as ocp

  from vlp_jax import checkpointing

  @flax.struct.dataclass
  class OldTrainState:  # TrainState before it had `extra`.
    step: jax.Array
    params: dict
    opt_state: dict
    rng: jax.Array
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array

  values = dict(
    step=jnp.int32(7),
    params={"w": jnp.arange(6.0).reshape(2, 3)},
    opt_state={"mu": {"w": jnp.ones((2, 3))}},
    rng=jax.random.PRNGKey(3),
    nonfinite_streak=jnp.int32(0),
    nonfinite_total=jnp.int32(1),
  )
  manager = ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(create=True))
  manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(OldTrainState(**values))))
  manager.wait_until_finished()
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    trainer.TrainState(extra={}, **values),
  )
  assert checkpointing.check_matches(manager, 7, abstract) == []
  restored = checkpointing.restore_state(manager, 7, abstract)
  assert isinstance(restored, trainer.TrainState) and restored.extra == {}
  np.testing.assert_array_equal(restored.params["w"], values["params"]["w"])
  assert int(restored.step) == 7 and int(restored.nonfinite_total) == 1
