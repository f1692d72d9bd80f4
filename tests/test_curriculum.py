"""CMask's masking agent: sampling, exact log-probabilities, reward, REINFORCE, learning."""

import itertools
import math
from collections import defaultdict
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlp_jax.masking import curriculum
from vlp_jax.models import fusion
from vlp_jax.models.agent import INVALID_LOGIT, MaskingAgent

set_log_prob = jax.jit(curriculum.set_log_prob)  # one compile instead of op-by-op ones


def captions(lengths, width: int) -> np.ndarray:
  """valid (B, width) bool for [CLS] w_1 .. w_n [SEP] pad...: true at w_1..w_n."""
  positions = np.arange(width)
  lengths = np.asarray(lengths)[:, None]
  return (positions >= 1) & (positions <= lengths)


def pl_set_prob(logits: np.ndarray, valid: np.ndarray, chosen: np.ndarray) -> float:
  """P(set) in float64 by brute force: the PL probabilities of all its orderings."""
  pool = list(np.flatnonzero(valid))
  weights = np.exp(logits - logits[pool].max())
  total = 0.0
  for ordering in itertools.permutations(np.flatnonzero(chosen)):
    left, p = list(pool), 1.0
    for i in ordering:
      p *= weights[i] / sum(weights[j] for j in left)  # summed, never subtracted
      left.remove(i)
    total += p
  return total


def random_cases(rng: np.random.Generator, count: int, width: int, max_k: int):
  """Random logits (scales 0.3 to 15: spreads of tens of nats), valid masks, subsets."""
  logits = rng.normal(size=(count, width)) * rng.choice([0.3, 2.0, 6.0, 15.0], (count, 1))
  valid = rng.random((count, width)) < 0.8
  chosen = np.zeros((count, width), bool)
  for row in range(count):
    pool = np.flatnonzero(valid[row])
    k = rng.integers(0, min(max_k, len(pool)) + 1)
    chosen[row, rng.choice(pool, k, replace=False)] = True
  return logits, valid, chosen


def test_mask_counts_round_ratio_times_maskable_length():
  valid = captions(np.arange(11), 12)
  counts = curriculum.mask_counts(jnp.asarray(valid), 0.3)
  # 0.3 x 0..10 = 0, .3, .6, .9, 1.2, 1.5, 1.8, 2.1, 2.4, 2.7, 3: halves round up.
  np.testing.assert_array_equal(counts, [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3])
  assert int(curriculum.mask_counts(jnp.asarray(captions([30], 32)), 0.3)[0]) == 9


def test_gumbel_top_k_exact_count_and_never_a_special_token():
  rng = np.random.default_rng(0)
  lengths = rng.integers(0, 11, 256)
  valid = captions(lengths, 12)
  k = rng.integers(0, 7, 256)  # often more than a short caption has
  # Specials and padding get the largest logits: still never chosen.
  logits = np.where(valid, rng.normal(size=valid.shape), 1e6).astype(np.float32)
  selected, order = jax.jit(curriculum.gumbel_top_k)(
    jax.random.PRNGKey(0), jnp.asarray(logits), jnp.asarray(valid), jnp.asarray(k, jnp.int32)
  )
  selected, order = np.asarray(selected), np.asarray(order)
  assert not (selected & ~valid).any()
  np.testing.assert_array_equal(selected.sum(1), np.minimum(k, lengths))
  short = k >= lengths
  np.testing.assert_array_equal(selected[short], valid[short])  # all of a short caption
  for row in range(256):  # a permutation, valid positions first, selected ones leading
    assert sorted(order[row]) == list(range(12))
    assert valid[row, order[row, : lengths[row]]].all()
    assert set(order[row, : selected[row].sum()]) == set(np.flatnonzero(selected[row]))


def test_set_log_prob_equals_enumeration_float32_and_float64():
  logits, valid, chosen = random_cases(np.random.default_rng(1), 300, 7, 4)
  expected = np.array([math.log(pl_set_prob(*case)) for case in zip(logits, valid, chosen)])
  got32 = set_log_prob(jnp.asarray(logits, jnp.float32), valid, chosen)
  # float32 rounding of ~-60 nat values; the quadrature error itself is far smaller:
  np.testing.assert_allclose(got32, expected, rtol=1e-6, atol=1e-5)
  with jax.enable_x64(True):
    got64 = set_log_prob(jnp.asarray(logits, jnp.float64), valid, chosen)
    np.testing.assert_allclose(got64, expected, rtol=0, atol=1e-11)


def test_set_log_prob_stays_exact_where_inclusion_exclusion_cancels():
  """k = 8 of 16: sum_{A in S} (-1)^|A| W_R / (W_R + W_A), here in exact rationals."""
  rng = np.random.default_rng(2)
  logits = (rng.normal(size=(6, 16)) * 2.0).astype(np.float32)
  valid = np.ones((6, 16), bool)
  chosen = np.zeros((6, 16), bool)
  for row in range(6):
    chosen[row, rng.choice(16, 8, replace=False)] = True
  expected = []
  for row in range(6):
    w = [Fraction(float(x)) for x in np.exp(logits[row].astype(np.float64))]
    s = [w[i] for i in np.flatnonzero(chosen[row])]
    rest = sum(w[i] for i in np.flatnonzero(~chosen[row]))
    p = sum(
      (-1) ** len(a) * rest / (rest + sum(a))
      for size in range(9)
      for a in itertools.combinations(s, size)
    )
    expected.append(math.log(float(p)))
  got = set_log_prob(jnp.asarray(logits), valid, chosen)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)
  with jax.enable_x64(True):
    got = set_log_prob(jnp.asarray(logits, jnp.float64), valid, chosen)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_sampled_sets_follow_the_set_probability():
  """The sampler and the log-probability describe the same distribution."""
  logits = np.array([9.0, 0.5, -0.3, 1.2, 0.0, 9.0], np.float32)
  valid = np.array([False, True, True, True, True, False])
  n = 40_000
  selected, _ = curriculum.gumbel_top_k(
    jax.random.PRNGKey(3),
    jnp.tile(logits, (n, 1)),
    jnp.tile(valid, (n, 1)),
    jnp.full(n, 2, jnp.int32),
  )
  counts = defaultdict(int)
  for row in np.asarray(selected):
    counts[tuple(np.flatnonzero(row))] += 1
  sets = list(itertools.combinations([1, 2, 3, 4], 2))
  chosen = np.zeros((6, 6), bool)
  for row, pair in enumerate(sets):
    chosen[row, list(pair)] = True
  probs = np.exp(set_log_prob(jnp.tile(logits, (6, 1)), np.tile(valid, (6, 1)), chosen))
  assert abs(probs.sum() - 1) < 1e-5
  freqs = np.array([counts[pair] / n for pair in sets])
  assert sum(counts.values()) == n and len(counts) == 6
  np.testing.assert_allclose(freqs, probs, atol=0.01)  # ~5 standard errors


def test_set_log_prob_gradient_is_exact_and_finite():
  logits, valid, chosen = random_cases(np.random.default_rng(4), 6, 6, 3)
  with jax.enable_x64(True):
    grad = jax.grad(lambda x: set_log_prob(x, valid, chosen).sum())(jnp.asarray(logits))
    eps = 1e-5
    numeric = np.zeros_like(logits)
    for row, col in itertools.product(range(6), range(6)):
      up, down = logits[row].copy(), logits[row].copy()
      up[col] += eps
      down[col] -= eps
      args = (valid[row], chosen[row])
      numeric[row, col] = (
        math.log(pl_set_prob(up, *args)) - math.log(pl_set_prob(down, *args))
      ) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-7)
  # float32 extremes: 60-nat spread, invalid logits of +-1e9, k = 0, nothing left, no
  # valid token at all.
  logits = jnp.array(
    [[30.0, -30.0, 0.0, 1e9], [0.0, 1.0, 2.0, -1e9], [0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]]
  )
  valid = jnp.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
  chosen = jnp.array([[0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
  value, grad = jax.value_and_grad(lambda x: set_log_prob(x, valid, chosen).sum())(logits)
  assert np.isfinite(grad).all() and np.isfinite(value)
  # One of three: the softmax; log P = -60 - log(1 + e^-30 + e^-60), gradient onehot - p.
  np.testing.assert_allclose(set_log_prob(logits, valid, chosen), [-60, 0, 0, 0], atol=1e-5)
  np.testing.assert_allclose(grad[0], [-1, 1, 0, 0], atol=1e-6)
  np.testing.assert_array_equal(grad[1:], 0.0)


def test_spans_are_contiguous_and_exactly_k():
  rng = np.random.default_rng(5)
  lengths = rng.integers(0, 15, 256)
  valid = captions(lengths, 16)
  k = rng.integers(0, 9, 256)
  sample = jax.jit(curriculum.span_top_k, static_argnums=(4, 5))(
    jax.random.PRNGKey(5),
    jnp.asarray(rng.normal(size=valid.shape), jnp.float32),
    jnp.asarray(valid),
    jnp.asarray(k, jnp.int32),
    0.2,
    4,
  )
  selected, starts = np.asarray(sample.selected), np.asarray(sample.starts)
  np.testing.assert_array_equal(selected.sum(1), np.minimum(k, lengths))
  assert not (selected & ~valid).any() and not (starts & ~selected).any()
  # Every masked token opens a span or continues the one on its left; no span is longer
  # than max_length.
  left_masked = np.pad(selected[:, :-1], ((0, 0), (1, 0)))
  assert (starts | left_masked)[selected].all()
  for row in range(256):
    run = 0
    for pos in range(16):
      run = 1 if starts[row, pos] else (run + 1 if selected[row, pos] else 0)
      assert run <= 4
  assert (selected.sum(1) > starts.sum(1)).any()  # spans really extend


def test_span_log_prob_is_the_exact_probability_of_the_starts():
  """Every PL order of 5 valid tokens, with fixed lengths: the orders that give one
  sequence of starts add up to exp(its log-probability)."""
  logits = np.array([4.0, 0.3, -1.0, 1.5, 0.0, 2.0], np.float32)  # position 0 is invalid
  valid = np.array([False, True, True, True, True, True])
  orders = np.array([[*perm, 0] for perm in itertools.permutations(range(1, 6))], np.int32)
  n = len(orders)
  lengths = np.tile(np.array([2, 1, 3, 1, 1, 1], np.int32), (n, 1))
  sample = curriculum.grow_spans(
    jnp.tile(logits, (n, 1)), jnp.tile(valid, (n, 1)), jnp.full(n, 4, jnp.int32), orders, lengths
  )
  weights = np.exp(logits.astype(np.float64))
  groups = defaultdict(list)
  for order, starts, log_prob in zip(orders, np.asarray(sample.starts), sample.log_prob):
    p, left = 1.0, list(range(1, 6))
    for i in order[:5]:
      p *= weights[i] / weights[left].sum()
      left.remove(i)
    sequence = tuple(i for i in order if starts[i])
    groups[sequence].append((p, float(log_prob)))
  assert np.asarray(sample.selected).sum(1).tolist() == [4] * n
  assert len(groups) > 10
  grad = jax.grad(
    lambda x: curriculum.grow_spans(
      x, valid[None], jnp.array([4]), orders[:1], lengths[:1]
    ).log_prob.sum()
  )(jnp.asarray(logits[None]))
  assert np.isfinite(grad).all() and float(grad[0, 0]) == 0.0  # invalid: no gradient
  total = 0.0
  for members in groups.values():
    p = sum(m[0] for m in members)
    total += p
    np.testing.assert_allclose([m[1] for m in members], math.log(p), atol=1e-5)
  assert abs(total - 1) < 1e-9


def test_truncated_geometric_is_spanberts():
  lengths = np.asarray(curriculum.truncated_geometric(jax.random.PRNGKey(6), (100_000,), 0.2, 10))
  assert lengths.min() == 1 and lengths.max() == 10
  assert abs(lengths.mean() - 3.797) < 0.03  # sum l p(l) / sum p(l) for l in 1..10


def test_agent_share_ramps_linearly():
  share = jax.jit(curriculum.agent_share, static_argnums=1)
  for step, expected in [(0, 0.0), (250, 0.25), (500, 0.5), (1000, 1.0), (5000, 1.0)]:
    assert float(share(step, 1000)) == expected
  assert abs(float(share(999, 1000)) - 0.999) < 1e-6  # XLA divides by multiplying: 1 ulp
  assert float(curriculum.agent_share(0, 0)) == 1.0


def test_mix_masks_split_between_agent_and_random():
  rng = np.random.default_rng(7)
  lengths = rng.integers(0, 13, 128)
  valid = jnp.asarray(captions(lengths, 14))
  k = curriculum.mask_counts(valid, 0.3) + jnp.asarray(rng.integers(0, 3, 128), jnp.int32)
  target = np.minimum(np.asarray(k), lengths)
  logits = jnp.asarray(rng.normal(size=valid.shape) * 3, jnp.float32)
  mix = jax.jit(curriculum.mix_masks, static_argnums=5)
  for share in (0.0, 0.4, 1.0):
    for span in (None, (0.2, 10)):
      out = mix(jax.random.PRNGKey(8), logits, valid, k, share, span)
      selected, agent = np.asarray(out.selected), np.asarray(out.agent_selected)
      agent_count = np.minimum(np.floor(share * np.asarray(k) + 0.5), target)
      np.testing.assert_array_equal(out.agent_count, agent_count)
      np.testing.assert_array_equal(agent.sum(1), agent_count)
      np.testing.assert_array_equal(selected.sum(1), target)
      assert not (agent & ~selected).any() and not (selected & ~np.asarray(valid)).any()
      if span is None:
        expected = set_log_prob(logits, valid, out.agent_selected)
        np.testing.assert_allclose(out.log_prob, expected, atol=1e-6)
      np.testing.assert_array_equal(np.asarray(out.log_prob)[agent_count == 0], 0.0)
      if share == 1.0:
        np.testing.assert_array_equal(agent, selected)


def test_jit_compiles_once_for_any_per_row_k_and_share():
  traces = []

  def sample(rng, logits, valid, k, share):
    traces.append(1)
    return curriculum.mix_masks(rng, logits, valid, k, share)

  sample = jax.jit(sample)
  valid = jnp.asarray(captions([3, 8, 10, 1], 12))
  logits = jnp.zeros((4, 12))
  for i, k in enumerate([[1, 2, 3, 0], [9, 9, 9, 9], [0, 0, 0, 0]]):
    out = sample(jax.random.PRNGKey(i), logits, valid, jnp.array(k, jnp.int32), 0.5 * i)
    np.testing.assert_array_equal(out.selected.sum(1), np.minimum(k, [3, 8, 10, 1]))
  assert len(traces) == 1


def test_flow_reward_equals_numpy_reference():
  rng = np.random.default_rng(9)
  layers, batch, heads, length, patches, dim = 3, 4, 2, 6, 5, 4
  attention = rng.dirichlet(np.ones(patches), (layers, batch, heads, length))
  values = rng.normal(size=(layers, batch, patches, heads, dim))
  masked = rng.random((batch, length)) < 0.4
  masked[0] = False  # nothing masked: reward 0
  flows = jnp.stack([fusion.information_flow(attention[i], values[i]) for i in range(layers)])
  reward = curriculum.flow_reward(flows, jnp.asarray(masked))

  expected = np.zeros(batch)
  for b in range(batch):
    norms = []
    for layer, t in itertools.product(range(layers), np.flatnonzero(masked[b])):
      context = [attention[layer, b, h, t] @ values[layer, b, :, h] for h in range(heads)]
      norms.append(np.linalg.norm(np.concatenate(context)))
    expected[b] = np.mean(norms) if norms else 0.0
  np.testing.assert_allclose(reward, expected, rtol=1e-5)
  assert float(reward[0]) == 0.0
  gain = curriculum.mlm_gain(jnp.array([2.0, 1.0]), jnp.array([1.5, 1.25]))
  np.testing.assert_allclose(gain, [0.5, -0.25])


def test_reinforce_loss_gradient_baseline_and_entropy():
  log_prob = jnp.array([-1.0, -2.0, -3.0])
  reward = jnp.array([1.0, 0.0, 5.0])
  entropy = jnp.array([0.5, 1.0, 1.5])
  weight = jnp.array([1.0, 1.0, 0.0])  # the last row had no agent choice

  def loss(log_prob, reward, entropy):
    return curriculum.reinforce_loss(log_prob, reward, 0.5, entropy, 0.1, weight)[0]

  value = loss(log_prob, reward, entropy)
  d_log_prob, d_reward, d_entropy = jax.grad(loss, argnums=(0, 1, 2))(log_prob, reward, entropy)
  # -(0.5 x -1 + -0.5 x -2) / 2 - 0.1 x (0.5 + 1) / 2
  np.testing.assert_allclose(value, -0.25 - 0.075, rtol=1e-6)
  np.testing.assert_allclose(d_log_prob, [-0.25, 0.25, 0.0])
  np.testing.assert_allclose(d_reward, 0.0)  # the advantage is a constant
  np.testing.assert_allclose(d_entropy, [-0.05, -0.05, 0.0])
  _, metrics = curriculum.reinforce_loss(log_prob, reward, 0.5, entropy, 0.1, weight)
  np.testing.assert_allclose(metrics["agent/reward"], 2.0)

  baseline = curriculum.update_baseline(jnp.float32(1.0), reward, 0.9)
  np.testing.assert_allclose(baseline, 0.9 + 0.1 * 2.0, rtol=1e-6)
  baseline = curriculum.update_baseline(jnp.float32(1.0), reward, 0.9, weight)
  np.testing.assert_allclose(baseline, 0.9 + 0.1 * 0.5, rtol=1e-6)
  kept = curriculum.update_baseline(jnp.float32(1.0), reward, 0.9, jnp.zeros(3))
  assert float(kept) == 1.0


def test_token_entropy_over_valid_tokens():
  valid = jnp.asarray(captions([4, 0, 2], 6))
  logits = jnp.array([[9.0, 0, 0, 0, 0, 9], [0] * 6, [0, 2.0, 0, 0, 0, 0]])
  entropy = curriculum.token_entropy(logits, valid)
  p = np.exp([2.0, 0]) / np.exp([2.0, 0]).sum()
  np.testing.assert_allclose(entropy, [math.log(4), 0.0, -(p * np.log(p)).sum()], rtol=1e-6)
  assert np.isfinite(jax.grad(lambda x: curriculum.token_entropy(x, valid).sum())(logits)).all()


def tiny_agent() -> MaskingAgent:
  return MaskingAgent(num_layers=1, num_heads=2, mlp_dim=32, width=16)


def test_agent_logits_start_uniform_and_never_train_the_inputs():
  text = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 24))
  image = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 12))
  mask = jnp.asarray(captions([6, 3], 8)) | (jnp.arange(8) == 0) | (jnp.arange(8) == 7)
  valid = jnp.asarray(captions([6, 3], 8))
  agent = tiny_agent()
  params = jax.jit(agent.init)(jax.random.PRNGKey(2), text, image, mask, valid)["params"]
  assert set(params) == {"input_projection", "layer_0", "logit"}
  apply = jax.jit(agent.apply)
  logits = apply({"params": params}, text, image, mask, valid)
  assert logits.shape == (2, 8) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(logits)[~np.asarray(valid)], INVALID_LOGIT)
  np.testing.assert_array_equal(np.asarray(logits)[np.asarray(valid)], 0.0)  # uniform policy
  params = jax.tree.map(lambda x: x + 0.1, params)  # a trained-looking agent
  grads = jax.jit(
    jax.grad(lambda t, i: (apply({"params": params}, t, i, mask, valid) * valid).sum(), (0, 1))
  )(text, image)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_agent_learns_to_mask_the_paid_positions():
  """A toy reward pays for positions 2, 5 and 7 of every caption: after a few hundred
  REINFORCE steps on random tokens and images, the agent masks mostly those, against
  3 of 10 by chance. The whole agent path: MaskingAgent, the curriculum's mix (agent
  share 0 -> 1 over 50 steps), the set log-probability, entropy, baseline, adam."""
  batch, length, vocab, width = 32, 12, 50, 24
  valid = jnp.asarray(captions([10] * batch, length))
  k = curriculum.mask_counts(valid, 0.3)  # 3 of the 10 words
  paid = jnp.zeros(length, bool).at[jnp.array([2, 5, 7])].set(True)
  mask = jnp.ones((batch, length), bool)
  # Data on the host: the lower text states a BERT would give carry token and position.
  data = np.random.default_rng(10)
  token_table = data.normal(size=(vocab, width)).astype(np.float32)
  positions = data.normal(size=(length, width)).astype(np.float32)

  def inputs():
    text = token_table[data.integers(0, vocab, (batch, length))] + positions
    return text, data.normal(size=(batch, 4, 12)).astype(np.float32)

  agent = tiny_agent()
  params = jax.jit(agent.init)(jax.random.PRNGKey(12), *inputs(), mask, valid)["params"]
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, baseline, step, text, image):
    rng = jax.random.fold_in(jax.random.PRNGKey(13), step)
    share = curriculum.agent_share(step, 50)

    def loss_fn(params):
      logits = agent.apply({"params": params}, text, image, mask, valid)
      out = curriculum.mix_masks(rng, logits, valid, k, share)
      agent_part = out.agent_selected
      reward = (agent_part & paid).sum(1) / jnp.maximum(agent_part.sum(1), 1)
      weight = (out.agent_count > 0).astype(jnp.float32)
      entropy = curriculum.token_entropy(logits, valid)
      loss, _ = curriculum.reinforce_loss(out.log_prob, reward, baseline, entropy, 1e-3, weight)
      hit_rate = (out.selected & paid).sum() / out.selected.sum()
      return loss, (reward, weight, hit_rate)

    grads, (reward, weight, hit_rate) = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    baseline = curriculum.update_baseline(baseline, reward, 0.9, weight)
    return optax.apply_updates(params, updates), opt_state, baseline, hit_rate

  baseline = jnp.float32(0.0)
  hit_rates = []
  for step in range(300):
    params, opt_state, baseline, hit_rate = train_step(params, opt_state, baseline, step, *inputs())
    hit_rates.append(hit_rate)
  # The last 50 steps (share 1: all masks are the agent's), on fresh data each step.
  hit_rate = float(np.mean(hit_rates[-50:]))
  assert hit_rate > 0.8, hit_rate  # chance: 0.3
