"""CMask's learned text masking: sampling, exact log-probabilities, reward, REINFORCE.

A masking agent gives one logit per text token. Here is everything between those logits
and the agent's loss, pure JAX with static shapes (B, T) so it runs inside the jitted
train step; every count (tokens to mask per caption, the agent's share of them) is a
traced int32 array, so neither a caption's length nor the curriculum recompiles.

- `mask_counts`: k = round(ratio x caption length), the length counting maskable tokens.
- `gumbel_top_k`: k tokens without replacement: the top-k of Gumbel-perturbed logits,
  which is a Plackett-Luce sample with weights exp(logits).
- `set_log_prob`: the exact log-probability of the chosen *set* (all orders summed).
- `span_top_k`: optional SpanBERT-style spans grown right from agent-chosen starts.
- `mix_masks`: the curriculum: the agent picks round(share x k) tokens, the rest are
  uniformly random; `agent_share` ramps the share from 0 to 1.
- `flow_reward`, `mlm_gain`: rewards; `token_entropy`, `reinforce_loss`,
  `update_baseline`: the policy-gradient loss with a running-mean baseline.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Log-space trapezoid grid for `set_log_prob`, in x = log(W_R u) (see there).
_GRID_LOW = -50.0  # the integrand grows at least like e^(0.63 x) below x = -1
_LOG_LOG_2 = math.log(math.log(2.0))


def mask_counts(valid: jax.Array, ratio: float | jax.Array) -> jax.Array:
  """(B,) int32: round(ratio x number of valid tokens), halves rounded up.

  A one-word caption gets 0 at ratio 0.3, as ALBEF's Bernoulli masking often gives it.
  """
  length = valid.sum(axis=-1).astype(jnp.float32)
  return jnp.floor(ratio * length + 0.5).astype(jnp.int32)


def _perturbed_order(rng: jax.Array, logits: jax.Array, valid: jax.Array) -> jax.Array:
  """Positions (B, T) sorted by logits + Gumbel noise, best first, invalid ones last."""
  noise = jax.random.gumbel(rng, logits.shape, jnp.float32)
  scores = jnp.where(valid, logits.astype(jnp.float32) + noise, -jnp.inf)
  return jnp.argsort(-scores, axis=-1, stable=True).astype(jnp.int32)


def _ranks(order: jax.Array) -> jax.Array:
  """The inverse permutation: rank (B, T) of every position in `order`."""
  return jnp.argsort(order, axis=-1).astype(jnp.int32)


def gumbel_top_k(
  rng: jax.Array, logits: jax.Array, valid: jax.Array, k: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Samples min(k, #valid) valid positions per row without replacement.

  logits (B, T), valid (B, T) bool (False at pad, CLS, SEP), k (B,) int32. Returns
  (selected (B, T) bool, order (B, T) int32: positions by perturbed score, best first,
  invalid positions last). `selected` is the first min(k, #valid) entries of `order`:
  a Plackett-Luce draw of that many items with weights exp(logits) over valid positions.
  """
  order = _perturbed_order(rng, logits, valid)
  count = jnp.minimum(k, valid.sum(axis=-1))
  selected = (_ranks(order) < count[:, None]) & valid
  return selected, order


def _log1mexp_of_exp(z: jax.Array) -> jax.Array:
  """log(1 - exp(-e^z)), accurate and with finite gradients for every real z."""
  # Each branch gets its argument clipped to its own range, so the branches that `where`
  # discards cannot make infinities (and NaN gradients) either.
  small = jnp.minimum(z, -20.0)  # e^z < 2e-9: log(y - y^2/2 ...) = z - y/2
  middle = jnp.clip(z, -20.0, _LOG_LOG_2)  # y < log 2: expm1 is accurate
  large = jnp.clip(z, _LOG_LOG_2, 50.0)  # y >= log 2: log1p is accurate; e^-e^50 = 0
  return jnp.where(
    z < -20.0,
    small - 0.5 * jnp.exp(small),
    jnp.where(
      z < _LOG_LOG_2,
      jnp.log(-jnp.expm1(-jnp.exp(middle))),
      jnp.log1p(-jnp.exp(-jnp.exp(large))),
    ),
  )


def set_log_prob(
  logits: jax.Array, valid: jax.Array, selected: jax.Array, num_points: int = 256
) -> jax.Array:
  """log P(the Gumbel top-|S| of `logits` is exactly the set S = `selected`): (B,).

  Exact in the Plackett-Luce model with weights w = exp(logits) over valid positions,
  order summed out. As exponential races (item i arrives at E_i ~ Exp(w_i); arrival order
  is PL), S is the first |S| to arrive iff all of S beats all of the rest R:

    P(S) = int_0^inf W_R e^(-W_R u) prod_{i in S} (1 - e^(-w_i u)) du,   W_R = sum_R w.

  Inclusion-exclusion turns this into sum_{A in S} (-1)^|A| W_R / (W_R + W_A), which
  cancels catastrophically in float32 for |S| ~ 8. We integrate instead, in log space,
  over x = log(W_R u): the integrand exp(x - e^x + sum_S log(1 - exp(-e^(x + l_i - log W_R))))
  is smooth and decays double-exponentially to the right and at least like e^(0.63 x)
  to the left, so the trapezoid rule on a fixed grid, x in [-50, log(40 + 3 (|S| + 1))]
  whatever the logits' spread, converges exponentially: in float64 against exact
  rationals, the error in log P is ~1e-3 at 128 points, < 1e-9 at 256 (|S| up to 15 of
  40, spreads of 10 nats) and ~1e-14 at 512. In float32 rounding dominates (~1e-5 at
  log P ~ -170). Raise `num_points` for |S| well over 15: the peak narrows. Rows with S
  or R empty give exactly 0. Differentiable w.r.t. `logits`; O(B x num_points x T).
  """
  dtype = jnp.result_type(logits.dtype, jnp.float32)  # float64 stays (tests), bf16 -> f32
  logits = logits.astype(dtype)
  chosen = selected & valid
  rest = valid & ~selected
  size = chosen.sum(axis=-1)
  certain = (size == 0) | ~rest.any(axis=-1)  # P(S) = 1: nothing chosen or nothing left
  # A stand-in rest for the certain rows keeps every value and gradient finite.
  rest = jnp.where(certain[:, None], True, rest)
  log_rest = jax.nn.logsumexp(jnp.where(rest, logits, -jnp.inf), axis=-1)
  shifted = logits - log_rest[:, None]  # l_i - log W_R

  high = jnp.log(40.0 + 3.0 * (size + 1).astype(dtype))  # W_R u = 40 + 3 (|S| + 1)
  t = jnp.linspace(0.0, 1.0, num_points, dtype=dtype)
  x = _GRID_LOW + (high[:, None] - _GRID_LOW) * t  # (B, P)
  spacing = (high - _GRID_LOW) / (num_points - 1)
  z = jnp.where(chosen[:, None, :], shifted[:, None, :] + x[:, :, None], 0.0)  # (B, P, T)
  factors = jnp.where(chosen[:, None, :], _log1mexp_of_exp(z), 0.0).sum(axis=-1)
  integrand = x - jnp.exp(x) + factors
  half_ends = jnp.zeros(num_points, dtype).at[jnp.array([0, num_points - 1])].set(math.log(0.5))
  log_p = jax.nn.logsumexp(integrand + half_ends, axis=-1) + jnp.log(spacing)
  return jnp.where(certain, 0.0, log_p)


def truncated_geometric(
  rng: jax.Array, shape: tuple[int, ...], p: float, max_length: int
) -> jax.Array:
  """Lengths in [1, max_length], P(l) ~ p (1 - p)^(l - 1) renormalised (SpanBERT: p 0.2,
  max 10, mean 3.8). int32, by inverting the CDF (1 - q^l) / (1 - q^max)."""
  q = 1.0 - p
  u = jax.random.uniform(rng, shape, minval=1e-7, maxval=1.0)
  length = jnp.ceil(jnp.log1p(-u * (1.0 - q**max_length)) / math.log(q))
  return jnp.clip(length, 1, max_length).astype(jnp.int32)


class SpanSample(NamedTuple):
  selected: jax.Array  # (B, T) bool: every masked token, min(k, #valid) per row
  starts: jax.Array  # (B, T) bool: where the agent started a span
  log_prob: jax.Array  # (B,): log P(the sequence of starts | span lengths)


def span_top_k(
  rng: jax.Array,
  logits: jax.Array,
  valid: jax.Array,
  k: jax.Array,
  p: float = 0.2,
  max_length: int = 10,
) -> SpanSample:
  """Contiguous spans, min(k, #valid) tokens per row, from agent-chosen starts: a
  Plackett-Luce order of the valid tokens (Gumbel-perturbed logits) and truncated
  geometric span lengths (SpanBERT: p 0.2, at most 10), then `grow_spans`."""
  order_rng, length_rng = jax.random.split(rng)
  order = _perturbed_order(order_rng, logits, valid)
  lengths = truncated_geometric(length_rng, logits.shape, p, max_length)
  return grow_spans(logits, valid, k, order, lengths)


def grow_spans(
  logits: jax.Array, valid: jax.Array, k: jax.Array, order: jax.Array, lengths: jax.Array
) -> SpanSample:
  """Spans from a visiting order (B, T) of positions and span lengths (B, T).

  Positions are visited in `order`; each valid one not yet masked opens the next span,
  which gets the next of `lengths` and runs right over valid, unmasked tokens, stopping
  early at an invalid or masked token; the last span is cut so the total is exactly
  min(k, #valid). (Every valid token is visited, and opens a span if still free, so the
  total is always reached.)

  The lengths do not depend on the agent, and the j-th span gets lengths[j] however
  many covered positions were passed before it, so the mask is a function of the
  sequence of starts. With `order` a PL sample, the next start is a PL draw among the
  tokens still free (exponential races), which makes the exact log P(starts | lengths)
  a sum over starts r of l_{s_r} - logsumexp(logits over the valid tokens free before
  r). It is the log-probability of the sequence, not of the set: the order decides
  which start gets which length.
  """
  batch, length = logits.shape
  logits = logits.astype(jnp.float32)
  order, lengths = jnp.asarray(order), jnp.asarray(lengths)
  target = jnp.minimum(k, valid.sum(axis=-1))
  positions = jnp.arange(length)
  rows = jnp.arange(batch)

  def visit(carry, rank):
    covered, starts, count, spans, log_prob = carry
    start = order[:, rank]
    free = valid & ~covered
    start_free = free[rows, start]
    # The span ends at the first position from `start` on that is not free.
    blocked = ~free & (positions >= start[:, None])
    end = jnp.min(jnp.where(blocked, positions, length), axis=-1)
    wanted = lengths[rows, jnp.minimum(spans, length - 1)]
    size = jnp.minimum(jnp.minimum(end - start, wanted), target - count)
    size = jnp.where(start_free, jnp.maximum(size, 0), 0)
    opened = size > 0
    span = (positions >= start[:, None]) & (positions < (start + size)[:, None])
    # Keep the normaliser finite on rows with nothing left (their term is dropped).
    pool = jnp.where(free.any(axis=-1, keepdims=True), free, True)
    normaliser = jax.nn.logsumexp(jnp.where(pool, logits, -jnp.inf), axis=-1)
    term = jnp.where(opened, logits[rows, start] - normaliser, 0.0)
    starts = starts | (opened[:, None] & (positions == start[:, None]))
    carry = (covered | span, starts, count + size, spans + opened, log_prob + term)
    return carry, None

  zeros = jnp.zeros(batch, jnp.int32)
  init = (
    jnp.zeros((batch, length), bool),
    jnp.zeros((batch, length), bool),
    zeros,
    zeros,
    jnp.zeros(batch, jnp.float32),
  )
  (covered, starts, *_, log_prob), _ = jax.lax.scan(visit, init, jnp.arange(length))
  return SpanSample(covered, starts, log_prob)


def agent_share(step: jax.Array | int, curriculum_steps: int) -> jax.Array:
  """The share of masks the agent chooses: step / curriculum_steps, clipped to [0, 1]
  (float32 scalar). curriculum_steps <= 0: the agent from the start."""
  if curriculum_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.clip(jnp.asarray(step, jnp.float32) / curriculum_steps, 0.0, 1.0)


class MixedMask(NamedTuple):
  selected: jax.Array  # (B, T) bool: every token to mask, min(k, #valid) per row
  agent_selected: jax.Array  # (B, T) bool: the agent's part of `selected`
  log_prob: jax.Array  # (B,): log-probability of the agent's part (0 where it chose none)
  agent_count: jax.Array  # (B,) int32: tokens the agent chose


def mix_masks(
  rng: jax.Array,
  agent_logits: jax.Array,
  valid: jax.Array,
  k: jax.Array,
  share: float | jax.Array,
  span: tuple[float, int] | None = None,
) -> MixedMask:
  """The curriculum's mask: the agent picks round(share x k) tokens of each caption's k,
  the rest are drawn uniformly from the caption's other valid tokens.

  The mix is per token, not per example (an example all-agent with probability
  `share`): every caption keeps exactly k masks, and every caption gives the agent a
  gradient from the first steps on instead of a `share` of them, so the policy gradient's
  variance does not blow up early in the curriculum. The random tokens do not depend on
  the agent given its own, so log P(agent's part) alone is the score function.

  span=(p, max_length) grows the agent's part as spans (`span_top_k`); its log-probability
  is then that of the starts.
  """
  agent_rng, random_rng = jax.random.split(rng)
  target = jnp.minimum(k, valid.sum(axis=-1))
  agent_count = jnp.minimum(
    jnp.floor(share * k.astype(jnp.float32) + 0.5).astype(jnp.int32), target
  )
  if span is None:
    agent_selected, _ = gumbel_top_k(agent_rng, agent_logits, valid, agent_count)
    log_prob = set_log_prob(agent_logits, valid, agent_selected)
  else:
    sample = span_top_k(agent_rng, agent_logits, valid, agent_count, *span)
    agent_selected, log_prob = sample.selected, sample.log_prob
  rest = valid & ~agent_selected
  uniform, _ = gumbel_top_k(random_rng, jnp.zeros_like(agent_logits), rest, target - agent_count)
  return MixedMask(agent_selected | uniform, agent_selected, log_prob, agent_count)


def flow_reward(flows: jax.Array, masked: jax.Array) -> jax.Array:
  """(B,): information flow (L, B, T) from the fusion layers, averaged over the layers
  and the masked tokens (B, T) bool; 0 where nothing is masked."""
  per_token = flows.astype(jnp.float32).mean(axis=0)
  total = jnp.where(masked, per_token, 0.0).sum(axis=-1)
  return total / jnp.maximum(masked.sum(axis=-1), 1)


def mlm_gain(loss_without_image: jax.Array, loss_with_image: jax.Array) -> jax.Array:
  """(B,): how much the image lowers each example's MLM loss on the masked tokens (the
  second reward term; the caller runs the image-free pass and weighs the two)."""
  return loss_without_image - loss_with_image


def token_entropy(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """(B,): entropy in nats of the softmax of `logits` over the valid tokens.

  The entropy bonus uses this, not the entropy of the top-k set: it is exact, cheap, and
  its gradient is plain, while the set entropy has no closed form and a sampled estimate
  (-log P(S)) would add a second score-function term. A uniform softmax is also a
  uniform top-k, so it pushes the same way. 0 for rows without valid tokens.
  """
  logits = logits.astype(jnp.float32)
  pool = jnp.where(valid.any(axis=-1, keepdims=True), valid, True)
  log_p = jax.nn.log_softmax(jnp.where(pool, logits, -jnp.inf), axis=-1)
  terms = jnp.where(valid, jnp.exp(log_p) * jnp.where(valid, log_p, 0.0), 0.0)
  return -terms.sum(axis=-1)


def reinforce_loss(
  log_prob: jax.Array,
  reward: jax.Array,
  baseline: jax.Array | float,
  entropy: jax.Array,
  entropy_coef: float,
  weight: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """REINFORCE with a baseline and an entropy bonus; (loss, metrics).

  loss = -mean_w[(reward - baseline) log_prob + entropy_coef entropy], the mean weighted
  by `weight` (B,) (e.g. agent_count > 0: rows where the agent chose nothing carry no
  decision). The advantage is behind stop_gradient, so only log_prob and entropy train.
  Metrics: reward over all rows, the rest weighted.
  """
  weight = weight.astype(jnp.float32)
  total = jnp.maximum(weight.sum(), 1e-6)
  advantage = jax.lax.stop_gradient(reward.astype(jnp.float32) - baseline)

  def mean(x: jax.Array) -> jax.Array:
    return (weight * x).sum() / total

  policy = -mean(advantage * log_prob)
  bonus = mean(entropy)
  loss = policy - entropy_coef * bonus
  metrics = {
    "agent/reward": reward.astype(jnp.float32).mean(),
    "agent/advantage": mean(advantage),
    "agent/entropy": bonus,
    "agent/log_prob": mean(log_prob),
    "agent/baseline": jnp.asarray(baseline, jnp.float32),
    "agent/policy_loss": policy,
  }
  return loss, jax.lax.stop_gradient(metrics)


def update_baseline(
  baseline: jax.Array,
  reward: jax.Array,
  momentum: float,
  weight: jax.Array | None = None,
) -> jax.Array:
  """Running mean: momentum x baseline + (1 - momentum) x the batch's (weighted) mean
  reward; unchanged when every weight is 0. Use the old baseline in `reinforce_loss`, so
  the advantage never contains the rewards it weighs."""
  reward = jax.lax.stop_gradient(reward.astype(jnp.float32))
  weight = jnp.ones_like(reward) if weight is None else weight.astype(jnp.float32)
  total = weight.sum()
  batch_mean = (weight * reward).sum() / jnp.maximum(total, 1e-6)
  updated = momentum * baseline + (1.0 - momentum) * batch_mean
  return jnp.where(total > 0, updated, baseline)
