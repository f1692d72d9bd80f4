"""Linear probe: logistic regression on frozen image features, CLIP_benchmark's recipe.

A linear layer (torch.nn.Linear's uniform init) is trained with cross-entropy, AdamW
(weight decay on every parameter) and a cosine learning rate without warmup, in
mini-batches reshuffled every epoch. The weight decay is searched on a validation split
over 97 log-spaced values in [1e-6, 1e2]: the 7 coarse values first, then the best index
+-8, +-4, +-2, +-1, keeping the first best accuracy (CLIP_benchmark's `find_peak`). The
final probe trains on train + validation and is scored on the test split.

All weight decays of one search round train at once (vmapped); the training loop is one
`lax.scan`, jitted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlp_jax.evaluation import classification

WEIGHT_DECAYS = np.logspace(-6, 2, num=97)
# The coarse grid's values as they sit in the fine grid (indices 0, 16, ..., 96).
COARSE = tuple(int(i) for i in np.flatnonzero(np.isin(WEIGHT_DECAYS, np.logspace(-6, 2, num=7))))
SPANS = (8, 4, 2, 1)


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  lr: float = 0.1
  epochs: int = 10
  batch_size: int = 64
  seed: int = 0


def _batch_indices(num: int, settings: ProbeSettings) -> np.ndarray:
  """(epochs * steps_per_epoch, batch) example indices, a fresh shuffle per epoch; the
  last batch of an epoch is padded with -1 (DataLoader's partial batch, drop_last=False)."""
  rng = np.random.default_rng(settings.seed)
  steps = math.ceil(num / settings.batch_size)
  out = np.full((settings.epochs, steps * settings.batch_size), -1, np.int32)
  for epoch in range(settings.epochs):
    out[epoch, :num] = rng.permutation(num)
  return out.reshape(settings.epochs * steps, settings.batch_size)


def _init(key: jax.Array, dim: int, num_classes: int) -> dict[str, jax.Array]:
  # torch.nn.Linear's default: weight and bias uniform in +-1/sqrt(fan_in).
  bound = 1.0 / math.sqrt(dim)
  wkey, bkey = jax.random.split(key)
  return {
    "w": jax.random.uniform(wkey, (dim, num_classes), jnp.float32, -bound, bound),
    "b": jax.random.uniform(bkey, (num_classes,), jnp.float32, -bound, bound),
  }


@functools.partial(jax.jit, static_argnames=("num_classes", "lr"))
def _train(
  features: jax.Array,
  labels: jax.Array,
  batches: jax.Array,
  weight_decays: jax.Array,
  key: jax.Array,
  *,
  num_classes: int,
  lr: float,
) -> dict[str, jax.Array]:
  """One probe per weight decay, same init and batch order for all: params (K, ...)."""
  schedule = optax.cosine_decay_schedule(lr, decay_steps=batches.shape[0])
  params0 = _init(key, features.shape[1], num_classes)

  def train_one(weight_decay: jax.Array) -> dict[str, jax.Array]:
    tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)

    def loss_fn(params, index):
      valid = index >= 0
      x = features[jnp.maximum(index, 0)]
      y = labels[jnp.maximum(index, 0)]
      logits = x @ params["w"] + params["b"]
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(valid.sum(), 1)

    def step(carry, index):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, index)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params0, tx.init(params0)), batches)
    return params

  return jax.vmap(train_one)(weight_decays)


def train_probes(
  features: np.ndarray,
  labels: np.ndarray,
  num_classes: int,
  weight_decays: Sequence[float],
  settings: ProbeSettings,
) -> dict[str, np.ndarray]:
  """Trains one probe per weight decay; returns stacked params {"w": (K, D, C), "b": (K, C)}."""
  batches = _batch_indices(len(features), settings)
  params = _train(
    jnp.asarray(features, jnp.float32),
    jnp.asarray(labels, jnp.int32),
    jnp.asarray(batches),
    jnp.asarray(weight_decays, jnp.float32),
    jax.random.PRNGKey(settings.seed),
    num_classes=num_classes,
    lr=settings.lr,
  )
  return jax.device_get(params)


def probe_logits(params: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
  """(K, N, C) logits of K stacked probes."""
  return np.einsum("nd,kdc->knc", features, params["w"]) + params["b"][:, None, :]


def search_weight_decay(accuracy: Callable[[Sequence[int]], Sequence[float]]) -> int:
  """CLIP_benchmark's coarse-to-fine search over WEIGHT_DECAYS indices.

  `accuracy(indices)` returns the validation accuracy of each index. Within a round the
  first strictly better accuracy wins, starting from (index 0, accuracy 0).
  """
  cache: dict[int, float] = {}

  def peak(indices: Sequence[int]) -> int:
    todo = [i for i in dict.fromkeys(indices) if i not in cache]
    if todo:
      cache.update(zip(todo, accuracy(todo)))
    best, best_acc = 0, 0.0
    for i in indices:
      if best_acc < cache[i]:
        best, best_acc = i, cache[i]
    return best

  best = peak(COARSE)
  for span in SPANS:
    best = peak([max(best - span, 0), best, min(best + span, len(WEIGHT_DECAYS) - 1)])
  return best


def linear_probe(
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  val: tuple[np.ndarray, np.ndarray] | None,
  settings: ProbeSettings,
) -> dict[str, float]:
  """CLIP_benchmark's linear-probe metrics (lp_acc1, lp_acc5, lp_mean_per_class_recall,
  weight_decay) from (features, labels) splits. Without a validation split the weight
  decay is 0, as in CLIP_benchmark."""
  x_train, y_train = train
  x_test, y_test = test
  all_labels = [y_train, y_test] + ([val[1]] if val is not None else [])
  num_classes = int(max(y.max() for y in all_labels)) + 1
  if val is not None:
    x_val, y_val = val

    def accuracy(indices: Sequence[int]) -> list[float]:
      params = train_probes(x_train, y_train, num_classes, WEIGHT_DECAYS[list(indices)], settings)
      logits = probe_logits(params, x_val)
      return [classification.topk_accuracy(lg, y_val, 1) for lg in logits]

    weight_decay = float(WEIGHT_DECAYS[search_weight_decay(accuracy)])
    x_train = np.concatenate([x_train, x_val])
    y_train = np.concatenate([y_train, y_val])
  else:
    weight_decay = 0.0
  params = train_probes(x_train, y_train, num_classes, [weight_decay], settings)
  logits = probe_logits(params, x_test)[0]
  metrics = classification.classification_metrics(logits, y_test, num_classes, prefix="lp_")
  if y_test.max() < 5:  # CLIP_benchmark's test: acc@5 needs a label of 5 or more.
    metrics["lp_acc5"] = float("nan")
  metrics.update(
    weight_decay=weight_decay, epochs=float(settings.epochs), seed=float(settings.seed)
  )
  return metrics


def split_validation(
  features: np.ndarray, labels: np.ndarray, proportion: float, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """A random `proportion` of the training examples held out for the weight-decay search."""
  order = np.random.default_rng(seed).permutation(len(features))
  num_val = round(proportion * len(features))
  if not 0 < num_val < len(features):
    raise ValueError(f"validation proportion {proportion} of {len(features)} examples is empty")
  val, train = order[:num_val], order[num_val:]
  return (features[train], labels[train]), (features[val], labels[val])
