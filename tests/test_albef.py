"""ALBEF: hard negatives, alpha ramp, temperature clamp, one step's losses, EMA and queues
against a NumPy reference, the 2x2x2 mesh, ITM re-ranked retrieval, the BERT import, and
the demo config trained, evaluated, killed and resumed through the real trainer."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.runs import compilation_cache, crash_after_logged_step, logged_losses
from vlp_jax import experiment, losses, sharding
from vlp_jax.evaluation import rerank, retrieval
from vlp_jax.methods import MethodContext, albef, albef_parts, buffers
from vlp_jax.models.albef import MOMENTUM_PARTS, AlbefModel

BATCH = 8
CONTEXT = 12
TOKENIZER = experiment.TokenizerSpec(50, 0, CONTEXT, cls_id=2, sep_id=3, mask_id=4)


def tiny_albef_config(cache_dir: str = "", steps: int = 4) -> ml_collections.ConfigDict:
  """tests/configs/tiny.py with configs/demo.py's ALBEF switch: 1 text-only + 1 fusion layer."""
  from tests.configs import tiny
  from vlp_jax.configs import demo

  config = tiny.get_config(f"cache_dir={cache_dir},steps={steps},batch_size={BATCH}")
  config.unlock()
  demo.use_albef(config)
  config.model.text.depth = 2
  config.albef.fusion_layer = 1
  config.albef.queue_size = 2 * BATCH
  config.albef.queue_warmup_steps = 0  # The queue in every loss, as ALBEF.
  config.albef.alpha_ramp_steps = 10
  config.eval.rerank_k = 4
  return config


def build_method(config, mesh=None, cls=albef.Albef, **fields) -> albef.Albef:
  mesh = mesh or sharding.create_mesh({"data": 1}, jax.devices()[:1])
  ctx = MethodContext(config, mesh, TOKENIZER, total_steps=100)
  return albef.create(ctx, cls=cls, **fields)


def random_batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
  tokens = np.zeros((BATCH, CONTEXT), np.int32)
  for row, length in enumerate(rng.integers(3, CONTEXT - 2, BATCH)):
    tokens[row, 0] = TOKENIZER.cls_id
    tokens[row, 1 : length + 1] = rng.integers(5, TOKENIZER.vocab_size, length)
    tokens[row, length + 1] = TOKENIZER.sep_id
  return {"image": images, "tokens": tokens}


# ---------------------------------------------------------------- pieces


def test_itm_negatives_never_pick_the_positive_or_an_excluded_row():
  rng = np.random.default_rng(0)
  sim_i2t = jnp.asarray(rng.normal(size=(6, 6 + 10)), jnp.float32)  # batch + queue columns
  sim_t2i = jnp.asarray(rng.normal(size=(6, 6 + 10)), jnp.float32)
  exclude = jnp.asarray(rng.random((6, 6)) < 0.3)
  draw = jax.jit(jax.vmap(lambda key: albef_parts.itm_negatives(key, sim_i2t, sim_t2i, exclude)))
  images, texts = (np.asarray(x) for x in draw(jax.random.split(jax.random.PRNGKey(0), 4000)))
  banned = np.asarray(exclude) | np.eye(6, dtype=bool)
  for drawn, sim in ((images, sim_t2i), (texts, sim_i2t)):
    assert drawn.max() < 6  # Only batch rows, never queue columns.
    assert not banned[np.arange(6)[None, :], drawn].any()
    # salesforce/ALBEF models/model_pretrain.py: weights = softmax(sim[:, :bs]) with the
    # diagonal zeroed, torch.multinomial: the softmax renormalised over the other rows.
    weights = np.where(banned, 0.0, np.exp(np.asarray(sim)[:, :6]))
    expected = weights / weights.sum(1, keepdims=True)
    found = np.stack([np.bincount(drawn[:, r], minlength=6) / len(drawn) for r in range(6)])
    np.testing.assert_allclose(found, expected, atol=0.03)


def test_itm_negatives_never_draw_what_albefs_softmax_gives_no_weight():
  # A batch of 64 where each row's positive scores 5, two other rows 2 and 1, the other 61
  # -30: ALBEF's weights there are ~e-31 (never drawn). The former softmax + 1e-4 drew
  # them in 8.7% of these draws: the positive holds most of the softmax, so the 61
  # epsilons outweigh the real negatives.
  rows = 64
  sim = np.full((rows, rows + 8), -30.0, np.float32)
  near, next_near = (np.arange(rows) + 1) % rows, (np.arange(rows) + 2) % rows
  sim[np.arange(rows), np.arange(rows)] = 5.0
  sim[np.arange(rows), near] = 2.0
  sim[np.arange(rows), next_near] = 1.0
  sim = jnp.asarray(sim)
  draw = jax.jit(jax.vmap(lambda key: albef_parts.itm_negatives(key, sim, sim)[0]))
  drawn = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 1000)))
  assert np.isin(drawn - np.arange(rows), [1, 2, 1 - rows, 2 - rows]).all()
  share_near = np.mean(drawn == near)
  assert share_near == pytest.approx(np.exp(2) / (np.exp(2) + np.exp(1)), abs=0.01)


def test_queue_warmup_leaves_the_queue_out_of_ita():
  rng = np.random.default_rng(0)
  unit = lambda *shape: (x := rng.normal(size=shape)) / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  feats = [jnp.asarray(unit(4, 8), jnp.float32) for _ in range(4)]
  filled = buffers.FeatureQueue(jnp.asarray(unit(8, 8), jnp.float32), jnp.int32(4), jnp.int32(4))
  empty = filled.replace(filled=jnp.int32(0))
  args = (jnp.float32(0.07), jnp.float32(0.4))
  with_queue = albef_parts.ita_loss(*feats, filled, filled, *args)[0]
  warming_up = albef_parts.ita_loss(*feats, filled, filled, *args, use_queue=False)[0]
  batch_only = albef_parts.ita_loss(*feats, empty, empty, *args)[0]
  assert float(warming_up) == float(batch_only) != float(with_queue)


def test_alpha_ramps_linearly_over_the_configured_steps():
  values = [float(albef_parts.alpha_at(jnp.int32(s), 0.4, 10)) for s in (0, 1, 5, 10, 11, 500)]
  np.testing.assert_allclose(values, [0.0, 0.04, 0.2, 0.4, 0.4, 0.4], rtol=1e-6)
  assert float(albef_parts.alpha_at(jnp.int32(0), 0.4, 0)) == pytest.approx(0.4)


def test_temperature_clamp_holds_and_passes_gradient():
  model = build_method(tiny_albef_config()).model
  for raw, expected in ((5.0, 0.5), (-1.0, 0.001), (0.1, 0.1)):
    variables = {"params": {"temp": jnp.float32(raw)}}
    value = model.apply(variables, method=AlbefModel.temperature)
    assert float(value) == pytest.approx(expected)
    grad = jax.grad(lambda t: model.apply({"params": {"temp": t}}, method=AlbefModel.temperature))
    assert float(grad(jnp.float32(raw))) == 1.0  # Straight-through: the loss still acts.


def test_rerank_positions_equal_plain_ranks_when_every_candidate_is_scored():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(7, 4)).astype(np.float32)
  texts = rng.normal(size=(15, 4)).astype(np.float32)
  texts[3] = texts[2]  # A tie, broken by index in both.
  text_to_image = rng.integers(0, 7, 15)
  text_to_image[:7] = np.arange(7)
  cand = rerank.top_candidates(texts, images, 7)
  t2i = rerank.reranked_positions(
    cand, np.take_along_axis(texts @ images.T, cand, 1), text_to_image[:, None]
  )
  np.testing.assert_array_equal(t2i, retrieval.text_to_image_ranks(images, texts, text_to_image))
  cand = rerank.top_candidates(images, texts, 15)
  table = rerank.caption_table(text_to_image, 7)
  i2t = rerank.reranked_positions(cand, np.take_along_axis(images @ texts.T, cand, 1), table)
  np.testing.assert_array_equal(i2t, retrieval.image_to_text_ranks(images, texts, text_to_image))


def test_rerank_puts_candidates_first_in_score_order_then_the_rest_by_index():
  candidates = np.array([[4, 1], [4, 1], [4, 1], [4, 1]])
  scores = np.array([[0.2, 0.9], [0.2, 0.9], [0.5, 0.5], [0.2, 0.9]])
  targets = np.array([[4], [1], [4], [3]])
  # Row 2: a tie between candidates 4 and 1 goes to the lower index (1). Row 3: key 3 is
  # no candidate: after both candidates and keys 0 and 2.
  assert rerank.reranked_positions(candidates, scores, targets).tolist() == [1, 0, 1, 4]


def test_mlm_loss_on_gathered_positions_equals_the_full_loss():
  rng = np.random.default_rng(0)
  rows, length, vocab = 4, 7, 11
  logits = jnp.asarray(rng.normal(size=(rows, length, vocab)), jnp.float32)
  soft = jax.nn.softmax(jnp.asarray(rng.normal(size=(rows, length, vocab)), jnp.float32))
  targets = jnp.asarray(rng.integers(0, vocab, (rows, length)), jnp.int32)
  selected = rng.random((rows, length)) < 0.3
  selected[0, 0] = True  # Position 0 is also the padding entries' position: must not leak.
  count = int(selected.sum())
  full, full_metrics = losses.mlm_loss(logits, targets, jnp.asarray(selected), soft, 0.4)

  def gathered(capacity):
    positions, kept = losses.masked_positions(jnp.asarray(selected), capacity)
    take = lambda x: albef_parts.gather_rows(x, positions)  # noqa: E731
    return positions, kept, losses.mlm_loss(take(logits), take(targets), kept, take(soft), 0.4)

  for capacity in (count, count + 5):  # Every selected position kept: the same loss.
    positions, kept, (loss, metrics) = gathered(capacity)
    assert int(kept.sum()) == count
    np.testing.assert_array_equal(np.asarray(positions)[:count], np.flatnonzero(selected))
    np.testing.assert_allclose(float(loss), float(full), rtol=1e-6)
    np.testing.assert_allclose(metrics["mlm_accuracy"], full_metrics["mlm_accuracy"], rtol=1e-6)
    # Scattered back, the kept positions are exactly the selected ones.
    back = albef_parts.scatter_rows(kept, positions, kept, (rows, length))
    np.testing.assert_array_equal(np.asarray(back), selected)
  # A cap below the count keeps the first `capacity` in row-major order (BERT's
  # max_predictions_per_seq): the loss over just those.
  _, kept, (loss, _) = gathered(count - 2)
  first = np.zeros(rows * length, bool)
  first[np.flatnonzero(selected)[: count - 2]] = True
  expected, _ = losses.mlm_loss(
    logits, targets, jnp.asarray(first.reshape(rows, length)), soft, 0.4
  )
  assert int(kept.sum()) == count - 2
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)


def test_mlm_capacity_covers_albef_and_cmask_masking():
  method = build_method(tiny_albef_config())
  # Bernoulli(0.15) over 8 x 30 positions: mean 36, sd 5.5, the cap mean + 6 sd.
  assert method.mlm_capacity(8, 30) == 70
  tokens = jnp.asarray(random_batch()["tokens"])

  def count(key):
    choice = method.select_mlm(None, None, {"tokens": tokens}, key, 0, None, None)
    return jnp.sum(choice.selected)

  counts = jax.jit(jax.vmap(count))(jax.random.split(jax.random.PRNGKey(0), 500))
  assert int(counts.max()) <= method.mlm_capacity(*tokens.shape)


def test_fusion_with_image_index_equals_fusion_on_copied_images(initial_state):
  model = build_method(tiny_albef_config()).model
  params = initial_state[0]["model"]
  call = lambda *a, method: model.apply({"params": params}, *a, method=method)  # noqa: E731
  batch = random_batch()
  image_tokens, _ = call(batch["image"], method=AlbefModel.encode_image)
  states, _ = call(batch["tokens"], method=AlbefModel.encode_text)
  mask = batch["tokens"] != 0
  index = jnp.asarray([3, 0, 0, 7, 1, 2, 2, 5], jnp.int32)

  def fused(image_tokens, copied):
    if copied:  # Each row's image materialised, as the reference fuses.
      return call(states, mask, image_tokens[index], method=AlbefModel.fuse)
    return call(states, mask, image_tokens, index, method=AlbefModel.fuse)

  (copied, copied_flow), (indexed, indexed_flow) = (
    fused(image_tokens, True),
    fused(image_tokens, False),
  )
  np.testing.assert_allclose(indexed, copied, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(indexed_flow, copied_flow, rtol=1e-5, atol=1e-6)

  # The gradient into an image sums over every row that read it (image 4 and 6: none).
  def grad(copied):
    return jax.grad(lambda i: jnp.sum(fused(i, copied)[0] ** 2))(image_tokens)

  np.testing.assert_allclose(grad(False), grad(True), rtol=1e-4, atol=1e-6)
  assert not np.asarray(grad(False))[[4, 6]].any()


def test_hf_bert_checkpoint_loads_albef_text_encoder_with_random_cross_attention():
  from tests.test_bert import small_hf_bert
  from vlp_jax.models.albef import AlbefText
  from vlp_jax.weights.hf_bert import import_hf_bert

  model = small_hf_bert(cls="BertForMaskedLM")
  text = AlbefText(101, 40, 32, 2, 1, 4, 48, type_vocab_size=3, layer_norm_eps=1e-7)
  ids = jnp.ones((1, 6), jnp.int32)
  template = text.init(jax.random.PRNGKey(0), ids, method=_all_parts)["params"]
  params = import_hf_bert(model.state_dict(), template)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  np.testing.assert_array_equal(
    params["layer_1"]["query"]["kernel"],
    state["bert.encoder.layer.1.attention.self.query.weight"].T,
  )
  np.testing.assert_array_equal(params["mlm_head"]["bias"], state["cls.predictions.bias"])
  np.testing.assert_array_equal(
    params["mlm_head"]["transform"]["kernel"], state["cls.predictions.transform.dense.weight"].T
  )
  for name in ("cross_query", "cross_key", "cross_value", "cross_output", "cross_ln"):
    jax.tree.map(np.testing.assert_array_equal, params["layer_1"][name], template["layer_1"][name])


def _all_parts(text, ids):
  states = text.encode(ids, ids != 0)
  fused, _ = text.fuse(states, ids != 0, jnp.zeros((1, 3, 32)))
  return text.mlm_logits(fused)


# ---------------------------------------------------------------- one step vs NumPy


@dataclasses.dataclass(frozen=True)
class FixedChoices(albef.Albef):
  """ALBEF with given hard negatives and MLM tokens, so a reference can follow it."""

  fixed: tuple = ()  # (negative images, negative texts, masked inputs, selected)

  def draw_negatives(self, rng, tokens, sim_i2t, sim_t2i):
    return jnp.asarray(self.fixed[0]), jnp.asarray(self.fixed[1])

  def select_mlm(self, params, extra, batch, rng, step, text_states, image_tokens):
    return albef_parts.MlmChoice(jnp.asarray(self.fixed[2]), jnp.asarray(self.fixed[3]))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _softmax(x):
  return np.exp(_log_softmax(x))


def _reference_ita(image_feat, text_feat, image_feat_m, text_feat_m, extra, temp, alpha):
  """ITA over the batch + the filled queue rows only (the rest are not candidates)."""
  filled = int(extra["image_queue"].filled)
  text_all = np.concatenate([text_feat_m, np.asarray(extra["text_queue"].features)[:filled]])
  image_all = np.concatenate([image_feat_m, np.asarray(extra["image_queue"].features)[:filled]])
  onehot = np.eye(BATCH, len(text_all))

  def contrast(query, query_m, keys):
    targets = alpha * _softmax(query_m @ keys.T / temp) + (1 - alpha) * onehot
    return -np.mean(np.sum(_log_softmax(query @ keys.T / temp) * targets, 1))

  return (
    contrast(image_feat, image_feat_m, text_all) + contrast(text_feat, text_feat_m, image_all)
  ) / 2


def _reference_loss(method, params, extra, batch, fixed, step, ema):
  """ALBEF's three losses as its reference code computes them, in NumPy, over the
  model's forward passes (online params and the given momentum copies)."""
  model, online = method.model, params["model"]
  momentum = {**online, **ema}
  call = lambda p, *a, method: jax.tree.map(  # noqa: E731
    np.asarray, model.apply({"params": p}, *a, method=method)
  )
  images, tokens = batch["image"], batch["tokens"]
  mask = tokens != 0
  neg_images, neg_texts, inputs, selected = fixed
  temp = float(online["temp"])
  alpha = float(albef_parts.alpha_at(jnp.int32(step), method.alpha, method.alpha_ramp_steps))
  image_tokens, image_feat = call(online, images, method=AlbefModel.encode_image)
  text_states, text_feat = call(online, tokens, method=AlbefModel.encode_text)
  image_tokens_m, image_feat_m = call(momentum, images, method=AlbefModel.encode_image)
  _, text_feat_m = call(momentum, tokens, method=AlbefModel.encode_text)

  ita = _reference_ita(image_feat, text_feat, image_feat_m, text_feat_m, extra, temp, alpha)

  # ITM: positives, then a negative image per text, then a negative text per image.
  def itm_logits(states, text_mask, image):
    fused, _ = call(online, states, text_mask, image, method=AlbefModel.fuse)
    return call(online, fused, method=AlbefModel.itm_logits)

  logits = np.concatenate(
    [
      itm_logits(text_states, mask, image_tokens),
      itm_logits(text_states, mask, image_tokens[neg_images]),
      itm_logits(text_states[neg_texts], mask[neg_texts], image_tokens),
    ]
  )
  labels = np.r_[np.ones(BATCH, int), np.zeros(2 * BATCH, int)]
  itm = -np.mean(_log_softmax(logits)[np.arange(3 * BATCH), labels])

  # MLM: cross-entropy on the masked positions, mixed with the momentum model's soft labels.
  def mlm_logits(p, image):
    states, _ = call(p, inputs, mask, method=AlbefModel.encode_text)
    fused, _ = call(p, states, mask, image, method=AlbefModel.fuse)
    return call(p, fused, method=AlbefModel.mlm_logits)

  log_probs = _log_softmax(mlm_logits(online, image_tokens).astype(np.float64))
  soft = _softmax(mlm_logits(momentum, image_tokens_m).astype(np.float64))
  hard = -np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0][selected].mean()
  distilled = -np.sum(soft * log_probs, -1)[selected].mean()
  mlm = (1 - alpha) * hard + alpha * distilled
  parts = {"ita_loss": ita, "itm_loss": itm, "mlm_loss": mlm, "alpha": alpha}
  return ita + itm + mlm, parts, (image_feat_m, text_feat_m)


def _fixed_choices(batch):
  rng = np.random.default_rng(3)
  neg_images = (np.arange(BATCH) + rng.integers(1, BATCH, BATCH)) % BATCH
  neg_texts = (np.arange(BATCH) + rng.integers(1, BATCH, BATCH)) % BATCH
  tokens = batch["tokens"]
  selected = (rng.random(tokens.shape) < 0.3) & (tokens != 0) & (tokens != TOKENIZER.cls_id)
  selected[:, 1] = True  # Every caption predicts at least one token.
  inputs = np.where(selected, TOKENIZER.mask_id, tokens).astype(np.int32)
  return neg_images, neg_texts, inputs, selected


@pytest.fixture(scope="module")
def initial_state() -> tuple[dict, dict]:
  """The tiny ALBEF's initial (params, extra) as host arrays (one compilation, shared)."""
  method = build_method(tiny_albef_config())
  return jax.tree.map(np.asarray, jax.jit(method.init)(jax.random.PRNGKey(0)))


def _perturbed_state(method, initial_state, seed=1):
  params, extra = jax.tree.map(np.copy, initial_state)
  extra = dict(extra)
  rng = np.random.default_rng(seed)
  # Momentum copies away from the online model, so using them before or after the update
  # gives different losses (NumPy: no compilation per leaf shape).
  extra["ema"] = jax.tree.map(
    lambda x: np.asarray(x) + 0.05 * rng.normal(size=x.shape).astype(np.float32), extra["ema"]
  )
  # Half the queue filled (rows [0, B)), pointer at B: this step writes rows [B, 2B).
  for name in ("image_queue", "text_queue"):
    features = np.zeros((2 * BATCH, method.model.embed_dim), np.float32)
    rows = rng.normal(size=(BATCH, method.model.embed_dim))
    features[:BATCH] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    extra[name] = buffers.FeatureQueue(features, np.int32(BATCH), np.int32(BATCH))
  return params, extra


def test_one_step_matches_numpy_reference_with_queue_ema_and_distillation(initial_state):
  batch = random_batch()
  fixed = _fixed_choices(batch)
  # A fast momentum (ALBEF: 0.995), so the copies before and after the update differ.
  method = build_method(tiny_albef_config(), cls=FixedChoices, fixed=fixed, momentum=0.5)
  params, extra = _perturbed_state(method, initial_state)
  step = 5  # alpha = 0.4 * 5 / 10
  loss, (metrics, new_extra) = jax.jit(method.loss)(
    params, extra, batch, jax.random.PRNGKey(2), jnp.int32(step)
  )

  to_np = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
  online = {k: to_np(params["model"][k]) for k in MOMENTUM_PARTS}
  ema_before = to_np(extra["ema"])
  ema_after = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, ema_before, online)
  expected, parts, (image_feat_m, text_feat_m) = _reference_loss(
    method, params, extra, batch, fixed, step, ema_after
  )
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
  for key, value in parts.items():
    np.testing.assert_allclose(float(metrics[key]), value, rtol=2e-5, err_msg=key)
  assert float(metrics["temperature"]) == pytest.approx(0.07)
  assert int(metrics["mlm_dropped"]) == 0  # The head saw every selected position.

  # The EMA moved first and the momentum features came from the moved copies: the old
  # copies give another ITA loss.
  stale = {**params["model"], **ema_before}
  model = method.model
  image_feat = model.apply(
    {"params": params["model"]}, batch["image"], method=AlbefModel.encode_image
  )[1]
  text_feat = model.apply(
    {"params": params["model"]}, batch["tokens"], method=AlbefModel.encode_text
  )[1]
  image_stale = model.apply({"params": stale}, batch["image"], method=AlbefModel.encode_image)[1]
  text_stale = model.apply({"params": stale}, batch["tokens"], method=AlbefModel.encode_text)[1]
  stale_ita = _reference_ita(
    *(np.asarray(x) for x in (image_feat, text_feat, image_stale, text_stale)),
    extra,
    0.07,
    parts["alpha"],
  )
  assert abs(stale_ita - parts["ita_loss"]) > 1e-3 * parts["ita_loss"]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    to_np(new_extra["ema"]),
    ema_after,
  )
  # FIFO: the momentum features of the batch, in row order, after the older rows; the
  # pointer wraps to 0 and the ring is full.
  for name, features in (("image_queue", image_feat_m), ("text_queue", text_feat_m)):
    queue = new_extra[name]
    np.testing.assert_array_equal(queue.features[:BATCH], extra[name].features[:BATCH])
    np.testing.assert_allclose(queue.features[BATCH:], features, rtol=1e-5, atol=1e-6)
    assert int(queue.pointer) == 0 and int(queue.filled) == 2 * BATCH


# ---------------------------------------------------------------- sharding


def test_loss_on_a_2x2x2_mesh_equals_one_device(monkeypatch, initial_state):
  monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 256)  # Shard the tiny tensors too.
  config = tiny_albef_config()
  # ALBEF's dropout on: its masks must not depend on how the batch is split.
  config.model.text.dropout = config.model.text.attention_dropout = 0.1
  batch = random_batch()
  results = {}
  for axes in ({"data": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
    devices = jax.devices()[: int(np.prod(list(axes.values())))]
    mesh = sharding.create_mesh(axes, devices)
    method = build_method(config, mesh)
    abstract = jax.eval_shape(method.init, jax.random.PRNGKey(0))
    state_sharding = sharding.state_shardings(abstract, mesh)
    params, extra = jax.device_put(initial_state, state_sharding)
    if len(devices) > 1:
      specs = {str(x.sharding.spec) for x in jax.tree.leaves((params, extra)) if x.ndim}
      assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
      assert "fsdp" in str(extra["image_queue"].features.sharding.spec)
      assert "fsdp" in str(extra["ema"]["text"]["layer_0"]["intermediate"]["kernel"].sharding.spec)
    loss_fn = jax.jit(
      method.loss,
      in_shardings=(*state_sharding, sharding.batch_sharding(mesh), None, None),
    )
    loss, (_, new_extra) = loss_fn(
      params, extra, sharding.host_to_global(batch, mesh), jax.random.PRNGKey(1), jnp.int32(3)
    )
    results[len(devices)] = (float(loss), np.asarray(new_extra["image_queue"].features))
  np.testing.assert_allclose(results[8][0], results[1][0], rtol=1e-5)
  np.testing.assert_allclose(results[8][1], results[1][1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- through the trainer

STEPS = 6


@pytest.fixture(scope="module")
def demo_run(cache_dir, tmp_path_factory) -> tuple[Path, dict, str]:
  """The tiny demo ALBEF trained in this process, evaluated at the end (held-out
  retrieval, ITA and ITM re-ranked, and the compositional probe both ways); with the
  compilation cache the resume test reuses."""
  from vlp_jax import trainer

  workdir = tmp_path_factory.mktemp("albef_demo")
  jax_cache = str(tmp_path_factory.mktemp("jax_cache"))
  with compilation_cache(jax_cache):
    metrics = trainer.train_and_evaluate(tiny_albef_config(cache_dir, STEPS), str(workdir))
  return workdir, metrics, jax_cache


def test_demo_albef_trains_and_evaluates_itm_reranked_retrieval(demo_run):
  workdir, heldout, _ = demo_run
  losses = logged_losses(workdir)
  assert len(losses) == STEPS and all(np.isfinite(losses))
  assert heldout["num_images"] > 0 and "image_retrieval_recall@1" in heldout
  found = sorted(p.name for p in Path(workdir, "eval").glob("step_*/*.json"))
  for task in ("zeroshot_retrieval", "itm_retrieval", "compositional", "compositional_itm"):
    assert any(n.endswith(f"_{task}.json") for n in found), (task, found)
  (itm_file,) = Path(workdir, "eval").glob("step_*/*_itm_retrieval.json")
  itm = json.loads(itm_file.read_text())["metrics"]
  assert itm["rerank_k"] == 4
  assert all(0 <= v <= 1 for k, v in itm.items() if "recall" in k)
  # Past the k re-ranked candidates the order is ITA's: recall@10 agrees with plain.
  assert itm["image_retrieval_recall@10"] == heldout["image_retrieval_recall@10"]


def test_resume_after_a_crash_gives_the_identical_loss_sequence(demo_run, cache_dir, tmp_path):
  # The trainer dies in this process after logging step 3, before its save; a real kill -9
  # (torn checkpoint writes) is tests/test_resilience.py's.
  from vlp_jax import trainer

  workdir, _, jax_cache = demo_run
  killed = tmp_path / "killed"
  config = tiny_albef_config(cache_dir, STEPS)
  config.eval.tasks = ""
  with compilation_cache(jax_cache):  # The same programs as the straight run.
    with crash_after_logged_step(3):
      trainer.train_and_evaluate(config, str(killed))
    assert len(logged_losses(killed)) == 3
    trainer.train_and_evaluate(config, str(killed))
  # Queues and EMA enter every loss (ITA over the queue, distillation with alpha > 0).
  assert logged_losses(killed) == logged_losses(workdir)
