"""config.model.scan_layers: scanned towers compute what unrolled ones do, and parameters,
shardings, PEFT labels, weight import/export and checkpoints move between the layouts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vlp_jax import checkpointing, experiment, peft, sharding, trainer
from vlp_jax.config_lib import ConfigError
from vlp_jax.models import CLIP, create_model, layers
from vlp_jax.models.stacking import has_stacked_blocks, stack_blocks, unstack_blocks
from vlp_jax.weights import convert, loader, open_clip
from vlp_jax.weights.state_dict import flatten


def scanned(model: CLIP, scan: bool = True) -> CLIP:
  """`model` with both CLIP towers in the scanned (or unrolled) layout."""
  return model.clone(
    visual=model.visual.clone(scan_layers=scan), text=model.text.clone(scan_layers=scan)
  )


def with_model(exp, model: CLIP):
  return dataclasses.replace(exp, method=dataclasses.replace(exp.method, model=model))


def on_mesh(exp, axes):
  parts = experiment.create_step_parts(
    exp.config, sharding.create_mesh(axes), exp.tokenizer, exp.total_steps, exp.train_sets
  )
  return dataclasses.replace(
    exp, **{f.name: getattr(parts, f.name) for f in dataclasses.fields(parts)}
  )


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.fixture
def two_block_config(tiny_config):
  # Two blocks per tower, so stacking has an axis to get wrong.
  tiny_config.model.image.depth = 2
  tiny_config.model.text.depth = 2
  return tiny_config


@pytest.fixture
def small_fsdp_threshold(monkeypatch):
  monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 256)  # The test tensors are tiny.


def test_stack_unstack_round_trip_is_exact():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  params = jax.jit(layers.Transformer(3, 2, 32).init)(jax.random.key(1), x)["params"]
  stacked = stack_blocks(params)
  assert set(stacked) == {"resblocks"} and has_stacked_blocks(stacked)
  kernel = stacked["resblocks"]["attn"]["in_proj"]["kernel"]
  assert kernel.shape == (3, 16, 48)
  np.testing.assert_array_equal(kernel[2], params["resblocks_2"]["attn"]["in_proj"]["kernel"])
  assert_trees_equal(unstack_blocks(stacked), params)
  assert_trees_equal(stack_blocks(stacked), stacked)  # Already scanned: unchanged.
  assert_trees_equal(unstack_blocks(params), params)
  # Deeper trees (a train state's moments under other keys) convert wherever blocks are.
  nested = {"mu": {"tower": {"transformer": params, "proj": np.ones(3)}}, "count": np.int32(4)}
  assert_trees_equal(unstack_blocks(stack_blocks(nested)), nested)
  # Shapes with shardings: the layer axis is added unsharded and removed again.
  mesh = sharding.create_mesh({"fsdp": 8})
  leaf = jax.ShapeDtypeStruct(
    (16, 48), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp"))
  )
  abstract = {f"resblocks_{i}": {"kernel": leaf} for i in range(3)}
  stacked_leaf = stack_blocks(abstract)["resblocks"]["kernel"]
  assert stacked_leaf.shape == (3, 16, 48)
  assert stacked_leaf.sharding.spec == PartitionSpec(None, "fsdp")
  assert unstack_blocks(stack_blocks(abstract)) == abstract


def test_unnumbered_or_uneven_blocks_are_refused():
  with pytest.raises(ValueError, match="not numbered"):
    stack_blocks({"resblocks_0": {"w": np.ones(2)}, "resblocks_2": {"w": np.ones(2)}})
  with pytest.raises(ValueError, match="leading axes"):
    unstack_blocks({"resblocks": {"a": np.ones((2, 3)), "b": np.ones((3, 3))}})


def _contrastive_loss(model: CLIP, params, images, tokens) -> jax.Array:
  out = model.apply({"params": params}, images, tokens)
  logits = out["image"] @ out["text"].T * out["logit_scale"]
  labels = jnp.arange(logits.shape[0])
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def test_scanned_towers_give_the_unrolled_loss_and_gradients(two_block_config):
  model = scanned(create_model(two_block_config.model, vocab_size=1000), scan=False)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 1000, (4, 16)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), images, tokens)["params"]
  loss_fn = jax.jit(jax.value_and_grad(_contrastive_loss, argnums=1), static_argnums=0)
  loss, grads = loss_fn(model, params, images, tokens)
  scan_model = scanned(model)
  scan_loss, scan_grads = loss_fn(scan_model, stack_blocks(params), images, tokens)
  assert has_stacked_blocks(scan_grads)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
  # Float32 round-off of a different summation order: entries near zero of a gradient
  # whose largest are ~3 differ by a few 1e-6 (4.3e-6 with XLA CPU's classic emitters).
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    unstack_blocks(scan_grads),
    grads,
  )
  # The scanned model initialises straight into the stacked layout.
  fresh = jax.eval_shape(scan_model.init, jax.random.key(0), images, tokens)["params"]
  assert jax.tree.structure(fresh) == jax.tree.structure(stack_blocks(params))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_apply_inside_the_scan(remat):
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  plain = layers.Transformer(3, 2, 32, causal=True)
  params = stack_blocks(jax.jit(plain.init)(jax.random.key(1), x)["params"])

  def grads_and_jaxpr(module):
    loss = lambda p: jnp.sum(module.apply({"params": p}, x) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss))(params), str(jax.make_jaxpr(jax.grad(loss))(params))

  reference, _ = grads_and_jaxpr(plain.clone(scan_layers=True))
  grads, jaxpr = grads_and_jaxpr(plain.clone(scan_layers=True, remat=remat))
  assert "remat" in jaxpr or "checkpoint" in jaxpr  # The policy is in the scanned body.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, reference
  )


def test_config_key_builds_scanned_towers(two_block_config, tmp_path):
  two_block_config.model.scan_layers = True
  model = create_model(two_block_config.model, vocab_size=1000)
  assert model.visual.scan_layers and model.text.scan_layers
  exp = trainer.create_experiment(two_block_config, str(tmp_path))
  params, _ = jax.eval_shape(exp.method.init, jax.random.PRNGKey(0))
  assert has_stacked_blocks(params["visual"]) and has_stacked_blocks(params["text"])


def test_open_clip_import_into_scanned_model_equals_the_unrolled_import_stacked(tmp_path):
  # The random open_clip model of the weight tests (imports torch and open_clip).
  from tests.test_weights import SMALL_TOKENS, numpy_state_dict, pixels, small_open_clip

  state_dict = numpy_state_dict(small_open_clip())
  fields = open_clip.config_from_open_clip(state_dict, image_heads=3, text_heads=2)
  model = convert.model_from_fields(fields)
  scan_model = scanned(model)
  unrolled = open_clip.import_open_clip(state_dict, model)
  stacked = open_clip.import_open_clip(state_dict, scan_model)
  assert has_stacked_blocks(stacked) and not has_stacked_blocks(unrolled)
  assert_trees_equal(stacked, stack_blocks(unrolled))
  images, tokens = jnp.asarray(pixels(32)), jnp.asarray(SMALL_TOKENS)
  ours = jax.jit(model.apply)({"params": unrolled}, images, tokens)
  scan_ours = jax.jit(scan_model.apply)({"params": stacked}, images, tokens)
  for key in ("image", "text"):
    np.testing.assert_allclose(scan_ours[key], ours[key], rtol=1e-5, atol=1e-6)
  # Export writes open_clip's numbered blocks from either layout.
  exported, scan_exported = (
    open_clip.export_open_clip(unrolled),
    open_clip.export_open_clip(stacked),
  )
  assert exported.keys() == scan_exported.keys()
  for key, value in exported.items():
    np.testing.assert_array_equal(scan_exported[key], value)
  # Converted directories load into a template of the other layout, both ways.
  for name, saved, template, expected in (
    ("unrolled", unrolled, stacked, stacked),
    ("scanned", stacked, unrolled, unrolled),
  ):
    convert.save_params(str(tmp_path / name), saved, {"model": fields, "new_params": []})
    loaded = loader.load_tower_params("model", str(tmp_path / name), template)
    assert_trees_equal(loaded, expected)


def test_stacked_shardings_shift_the_block_rules_past_the_layer_axis(two_block_config):
  two_block_config.model.image.width = 64
  two_block_config.model.image.mlp_dim = 256
  model = scanned(create_model(two_block_config.model, vocab_size=1000), scan=False)
  images = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  tokens = jnp.zeros((1, 16), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
  scan_abstract = jax.eval_shape(scanned(model).init, jax.random.key(0), images, tokens)["params"]
  mesh = sharding.create_mesh({"fsdp": 4, "tensor": 2})
  mesh_shape = dict(mesh.shape)
  blocks = abstract["visual"]["transformer"]
  stacked = flatten(scan_abstract["visual"]["transformer"]["resblocks"])
  specs = set()
  for path, leaf in stacked.items():
    stacked_path = f"visual/transformer/resblocks/{path}"
    spec = sharding.param_spec(stacked_path, leaf.shape, {**mesh_shape})
    for i in range(2):
      block_leaf = flatten(blocks[f"resblocks_{i}"])[path]
      block_spec = sharding.param_spec(
        f"visual/transformer/resblocks_{i}/{path}", block_leaf.shape, mesh_shape
      )
      assert spec == PartitionSpec(None, *block_spec), path
    specs.add(spec)
  # Megatron splits and FSDP both apply to the stacked kernels, never on the layer axis.
  assert PartitionSpec(None, "fsdp", "tensor") in specs  # attn/in_proj, mlp/c_fc kernels
  assert PartitionSpec(None, "tensor", "fsdp") in specs  # mlp/c_proj kernel
  # state_shardings (moments included: their paths end in the parameter's) agrees.
  state = {"params": scan_abstract, "opt_state": {"mu": scan_abstract}}
  shardings = flatten(sharding.state_shardings(state, mesh))
  shapes = flatten(state)
  stacked_paths = [path for path in shardings if "/resblocks/" in path]
  assert any(path.startswith("opt_state/") for path in stacked_paths)
  for path in stacked_paths:
    unrolled_path = path.replace("/resblocks/", "/resblocks_0/")
    block_spec = sharding.param_spec(unrolled_path, shapes[path].shape[1:], mesh_shape)
    assert shardings[path].spec == PartitionSpec(None, *block_spec), path


def test_peft_labels_per_block_or_a_clear_refusal(two_block_config):
  model = scanned(create_model(two_block_config.model, vocab_size=1000), scan=False)
  images, tokens = jnp.zeros((1, 32, 32, 3), jnp.uint8), jnp.zeros((1, 16), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
  scan_params = stack_blocks(params)
  for preset in ("lilt", "bitfit", "lit"):
    two_block_config.peft.preset = preset
    labels = peft.labeler(two_block_config.peft)
    assert labels(scan_params) == stack_blocks(labels(params)), preset
  two_block_config.peft.preset = "lit"  # A frozen image tower whose block 1 trains:
  two_block_config.peft.train_also = "visual/transformer/resblocks_1/"  # not expressible.
  with pytest.raises(ConfigError, match=r"config\.model\.scan_layers"):
    peft.labeler(two_block_config.peft)(scan_params)
  two_block_config.peft.train_also = ""
  two_block_config.peft.preset = "unlock_last"
  with pytest.raises(ConfigError, match=r"config\.model\.scan_layers"):
    peft.labeler(two_block_config.peft)(scan_params)


def _randomised(state):
  """`state` with every float leaf (parameters, Adam moments) replaced by distinct values,
  in place of training steps: a layout bug cannot hide behind zeros or equal blocks."""
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(0)
  out = [
    jax.device_put(rng.standard_normal(x.shape).astype(x.dtype), x.sharding)
    if jnp.issubdtype(x.dtype, jnp.floating)
    else x
    for x in leaves
  ]
  return jax.tree.unflatten(treedef, out)


def _save(directory, step, state, config):
  manager = checkpointing.create_checkpoint_manager(str(directory), config)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  return manager


def test_checkpoints_restore_across_layouts_both_ways(
  two_block_config, tmp_path, small_fsdp_threshold
):
  exp = trainer.create_experiment(two_block_config, str(tmp_path))
  exp = on_mesh(exp, {"fsdp": 4, "tensor": 2})
  scan_exp = with_model(exp, scanned(exp.method.model))

  def abstract_of(exp):
    abstract, shardings = trainer.abstract_train_state(exp.method, exp.tx, exp.mesh, 0)
    return checkpointing.abstract_with_shardings(abstract, shardings)

  state = _randomised(trainer.create_train_state(exp.method, exp.tx, exp.mesh, 0)[0])
  manager = _save(tmp_path, 1, state, two_block_config)

  # Unrolled checkpoint -> scanned config: parameters and Adam moments stacked, sharded.
  scan_abstract = abstract_of(scan_exp)
  assert has_stacked_blocks(scan_abstract.opt_state)
  assert checkpointing.check_matches(manager, 1, scan_abstract) == []
  restored = checkpointing.restore_state(manager, 1, scan_abstract)
  assert_trees_equal(restored, stack_blocks(jax.device_get(state)))
  shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
  assert shardings_of(restored) == shardings_of(scan_abstract)
  # init_from a run in the other layout.
  assert_trees_equal(checkpointing.load_params(str(tmp_path), scan_abstract), restored.params)

  # Scanned checkpoint -> unrolled config.
  scan_manager = _save(tmp_path / "scan", 1, restored, two_block_config)
  abstract = abstract_of(exp)
  assert checkpointing.check_matches(scan_manager, 1, abstract) == []
  back = checkpointing.restore_state(scan_manager, 1, abstract)
  assert_trees_equal(back, state)
  assert shardings_of(back) == shardings_of(abstract)

  # A checkpoint of another model still fails, naming the arrays.
  two_block_config.model.text.depth = 3
  other = with_model(exp, scanned(create_model(two_block_config.model, exp.tokenizer.vocab_size)))
  with pytest.raises(checkpointing.CheckpointMismatchError, match="resblocks"):
    checkpointing.require_match(manager, 1, abstract_of(other))


@pytest.mark.parametrize("method", ["albef", "vlc", "bert_text"])
def test_towers_without_a_scanned_layout_refuse_it_by_name(method):
  from vlp_jax.configs import demo
  from vlp_jax.methods import vlc
  from vlp_jax.models.albef import create_albef_model

  config = demo.get_config("method=contrastive" if method == "bert_text" else f"method={method}")
  config.model.scan_layers = True
  build = {
    "albef": lambda: create_albef_model(config.model, config.albef, 1000, 0),
    "vlc": lambda: vlc.create_model(config, 1000, 0, 16),
    "bert_text": lambda: create_model(config.model, 1000),
  }[method]
  if method == "bert_text":
    config.model.text.kind = "bert"
  with pytest.raises(ValueError, match=r"config\.model\.scan_layers=True"):
    build()
  config.model.scan_layers = False
  build()  # The unrolled layout builds.
