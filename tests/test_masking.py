import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax import masking, trainer
from vlp_jax.configs.common import base_config
from vlp_jax.input_pipeline import builtin, pipeline, tokenizers
from vlp_jax.masking import cluster
from vlp_jax.masking.random import mask_from_keep, select_keep


def make_masker(kind: str, num_patches: int = 64, patch_size: int = 8, **overrides):
  config = base_config().masking
  config.kind = kind
  for key, value in overrides.items():
    setattr(config, key, value)
  return masking.create_masker(
    config, num_patches=num_patches, patch_size=patch_size, mean=(0, 0, 0), std=(255, 255, 255)
  )


@pytest.fixture(scope="module")
def builtin_images(cache_dir):
  """128 built-in training images at 64 px (8x8 patches of 8 px)."""
  data = builtin.ensure_builtin(
    cache_dir, seed=0, num_train=256, num_heldout=64, image_size=32, vocab_size=1000
  )
  tokenizer = tokenizers.create_tokenizer("wordpiece", data.vocab_file, 24)
  dataset = pipeline.create_eval_dataset(
    data.train_shards, tokenizer, image_size=64, max_captions=1
  )
  return np.stack([dataset[i]["image"] for i in range(128)])


@pytest.mark.parametrize("kind", ["random", "cluster", "kmeans"])
def test_keep_indices_are_unique_in_range_and_of_static_count(kind, builtin_images):
  masker = make_masker(kind)
  keep, _ = jax.jit(masker.__call__)(jax.random.PRNGKey(0), builtin_images[:16])
  keep = np.asarray(keep)
  expected = 32 if kind == "random" else 44  # floor(64 * 0.5), floor(64 * (1 - 0.3))
  assert keep.shape == (16, expected) and masker.num_keep == expected
  assert keep.min() >= 0 and keep.max() < 64
  assert all(len(set(row)) == expected for row in keep)


@pytest.mark.parametrize("kind", ["cluster", "kmeans"])
def test_mask_ratio_hits_target_and_never_goes_under_minimum(kind, builtin_images):
  masker = make_masker(kind)
  compute = jax.jit(masker.compute_mask)
  ratios = []
  for step in range(8):
    batch = builtin_images[16 * step : 16 * (step + 1)]
    mask, _ = compute(jax.random.PRNGKey(step), batch)
    ratios.append(np.asarray(mask).mean(axis=1))
  ratios = np.concatenate(ratios)
  assert abs(ratios.mean() - 0.5) <= 0.02, ratios.mean()
  assert ratios.min() >= 0.3 - 1e-6


@pytest.mark.parametrize("kind", ["cluster", "kmeans"])
@pytest.mark.parametrize(
  ("keep_rule", "ratio"), [("target", 0.5), ("target", 0.75), ("reference", 0.5)]
)
def test_keep_rule_sets_the_tower_tokens_and_the_logged_dropped_share(
  kind, keep_rule, ratio, builtin_images
):
  masker = make_masker(kind, ratio=ratio, keep=keep_rule)
  keep, stats = jax.jit(masker.__call__)(jax.random.PRNGKey(3), builtin_images[:16])
  # 64 patches: "target" keeps round(64 * (1 - ratio)), "reference" floor(64 * (1 - 0.3)).
  expected = {"target": round(64 * (1 - ratio)), "reference": 44}[keep_rule]
  assert keep.shape == (16, expected) and masker.num_keep == expected
  assert float(stats["dropped_share"]) == pytest.approx(1 - expected / 64)
  if keep_rule == "target":
    assert float(stats["dropped_share"]) == pytest.approx(ratio)
  # The clusters' coverage is logged apart from what the tower lost.
  assert 0.3 - 1e-6 <= float(stats["cluster_coverage_min"]) <= float(stats["cluster_coverage_mean"])


@pytest.mark.parametrize("kind", ["cluster", "kmeans"])
@pytest.mark.parametrize("keep_rule", ["target", "reference"])
def test_visible_patches_are_kept_before_masked_ones_are_readmitted(
  kind, keep_rule, builtin_images
):
  masker = make_masker(kind, keep=keep_rule, ratio=0.6)
  rng = jax.random.PRNGKey(5)
  keep, stats = jax.jit(masker.__call__)(rng, builtin_images[:32])
  # The masker draws its clusters from the first half of its key (ClusterMasking.__call__).
  mask, _ = jax.jit(masker.compute_mask)(jax.random.split(rng)[0], builtin_images[:32])
  keep, mask = np.asarray(keep), np.asarray(mask)
  readmitted = 0
  for row_keep, row_mask in zip(keep, mask):
    kept_masked = row_mask[row_keep]
    visible = int((~row_mask).sum())
    if visible >= len(row_keep):  # Enough visible patches: no masked one is seen.
      assert not kept_masked.any()
    else:  # Every visible patch is seen, and first; masked ones only fill.
      assert (~kept_masked[:visible]).all() and kept_masked[visible:].all()
    readmitted += int(kept_masked.sum())
    # The minimum holds per image, for the clusters and for what the tower drops.
    assert row_mask.mean() >= 0.3 - 1e-6 and 1 - len(row_keep) / 64 >= 0.3 - 1e-6
  assert float(stats["readmitted_share"]) == pytest.approx(readmitted / mask.size)


def test_random_masking_drops_exactly_the_ratio():
  keep, stats = make_masker("random", ratio=0.75)(jax.random.PRNGKey(0), jnp.zeros((4, 64, 64, 3)))
  assert keep.shape == (4, 16)
  assert float(stats["dropped_share"]) == 0.75


def test_select_keep_prefers_visible_patches_and_refills_with_masked_ones():
  bias = jnp.array([[0, 1, 0, 1, 1, 1, 0, 1]], jnp.float32)  # 3 visible
  for seed in range(10):
    keep = np.asarray(select_keep(jax.random.PRNGKey(seed), bias, 5))[0]
    assert set(keep[:3]) == {0, 2, 6}
    assert set(keep[3:]) <= {1, 3, 4, 5, 7}
  orders = {tuple(np.asarray(select_keep(jax.random.PRNGKey(s), bias, 3))[0]) for s in range(20)}
  assert len(orders) > 1  # visible patches come in random order, not index order


def two_region_image(left=(220, 30, 30), right=(30, 60, 220)) -> np.ndarray:
  image = np.zeros((64, 64, 3), np.uint8)
  image[:, :32] = left
  image[:, 32:] = right
  return image


def test_an_anchor_masks_its_own_region_and_nothing_of_the_other():
  images = jnp.asarray(np.stack([two_region_image()] * 4))
  features = cluster.patch_features(images, 8, (0, 0, 0), (255, 255, 255))
  left = (np.arange(64) % 8) < 4
  for seed in range(5):
    mask, _ = cluster.anchor_cluster_mask(
      jax.random.PRNGKey(seed),
      features,
      num_anchors=1,
      target_ratio=0.5,
      min_ratio=0.0,
      calibration_steps=30,
    )
    for row in np.asarray(mask):
      assert np.array_equal(row, left) or np.array_equal(row, ~left)


def test_kmeans_recovers_planted_clusters():
  rng = np.random.default_rng(0)
  centres = np.eye(5, 48)[:4] * 10
  labels = np.repeat(np.arange(4), 16)
  features = centres[labels] + rng.normal(0, 0.5, (64, 48))
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  for seed in range(5):
    assignment = np.asarray(
      cluster.spherical_kmeans(jax.random.PRNGKey(seed), jnp.asarray(features, jnp.float32), 4, 10)
    )
    # Same partition up to renaming: each planted cluster maps to exactly one found id.
    pairs = set(zip(labels, assignment))
    assert len(pairs) == 4 and len({a for _, a in pairs}) == 4


@pytest.mark.parametrize("kind", ["random", "cluster", "kmeans"])
def test_masks_vary_across_steps_and_images_and_repeat_for_a_fixed_rng(kind, builtin_images):
  masker = jax.jit(make_masker(kind).__call__)
  images = builtin_images[:8]
  a = np.asarray(masker(jax.random.PRNGKey(1), images)[0])
  b = np.asarray(masker(jax.random.PRNGKey(1), images)[0])
  c = np.asarray(masker(jax.random.PRNGKey(2), images)[0])
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(np.sort(a, axis=1), np.sort(c, axis=1))
  assert len({tuple(np.sort(row)) for row in a}) > 1


def test_mask_from_keep_is_the_complement():
  keep = jnp.array([[0, 3], [1, 2]])
  np.testing.assert_array_equal(
    mask_from_keep(keep, 4), [[False, True, True, False], [True, False, False, True]]
  )


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    ({"kind": "clustr"}, "config.masking.kind='clustr'"),
    ({"kind": "cluster", "min_ratio": 0.6}, "config.masking.min_ratio=0.6"),
    ({"kind": "kmeans", "num_clusters": 1}, "config.masking.num_clusters=1"),
    ({"kind": "random", "ratio": 1.0}, "config.masking.ratio=1.0"),
    ({"kind": "cluster", "keep": "all"}, "config.masking.keep='all'"),
  ],
)
def test_bad_masking_configs_name_the_key(overrides, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[")):
    make_masker(**overrides)


@pytest.mark.parametrize("kind", ["cluster", "kmeans"])
def test_masked_train_step_compiles_once_over_five_steps(kind, tiny_config, tmp_path):
  tiny_config.masking.kind = kind
  exp = trainer.create_experiment(tiny_config, str(tmp_path))
  state, state_sharding = trainer.create_train_state(exp.method, exp.tx, exp.mesh, 0)
  step_fn = trainer.compile_step(exp, state_sharding)
  iterator = iter(exp.train_dataset())
  batches = []
  for _ in range(5):
    host_batch = next(iterator)
    inputs = {k: host_batch[k] for k in exp.batch_fields}
    batches.append(trainer.sharding.host_to_global(inputs, exp.mesh))
  compiles = []  # XLA compilations, or loads of one from the persistent cache.
  jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: (
      compiles.append(name) if "backend_compile" in name or "cache_retrieval" in name else None
    )
  )
  state, metrics = step_fn(state, batches[0])
  first = len(compiles)
  ratios = []
  for batch in batches[1:]:
    state, metrics = step_fn(state, batch)
    ratios.append(float(metrics["mask/cluster_coverage_mean"]))
  assert first >= 1 and len(compiles) == first, "the masked step recompiled"
  assert all(0.3 <= r <= 0.7 for r in ratios)


def test_mask_picture_shades_exactly_the_masked_patches():
  from vlp_jax.masking import show

  images = np.full((2, 16, 16, 3), 10, np.uint8)
  masks = [np.array([[True, False, False, False], [False, False, False, True]])]
  grid = show.draw_mask_grid(images, masks, ["m"], patch_size=8)
  assert grid.shape == (16, show.LABEL_WIDTH + 32, 3)
  tiles = grid[:, show.LABEL_WIDTH :]
  assert tiles[0, 0].min() > 100 and tiles[0, 8].max() == 10  # patch 0 shaded, patch 1 not
  assert tiles[15, 31].min() > 100 and tiles[15, 16].max() == 10
