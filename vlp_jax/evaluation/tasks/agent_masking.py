"""CMask's agent report (task "agent_masking"): which words a masking agent masks on the
held-out captions.

It runs a method's "agent_logits" prediction function, (params, tokens
(B, T), uint8 images (B, S, S, 3)) -> (B, T) logits (INVALID_LOGIT where a token is never
masked), over every (image, caption) pair of the run's held-out retrieval set, and takes
each caption's k best tokens, k = round(mask_ratio x maskable length) as in training
(masking.curriculum.mask_counts), deterministically: the agent's mode, no Gumbel noise.

It reports the masking rate per word class (the share of that class's tokens chosen) and
the words the agent masks most, as metrics, a top_words.json file and two Markdown tables
(`Result.texts`: "top_words", "class_rates") that reach TensorBoard as text summaries.
Classes are the built-in dataset's WORD_CLASSES, matched by a word's token ids under the
run's tokenizer, so every piece of a word counts as the word's class; words of no class
(other shards) count as "other". Only classes that occur are reported.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlp_jax import sharding
from vlp_jax.evaluation import readers
from vlp_jax.evaluation.embedding import Embedder, load_pixels
from vlp_jax.evaluation.tasks.base import Context, Result, Task, TaskDef
from vlp_jax.input_pipeline.builtin import WORD_CLASSES
from vlp_jax.input_pipeline.tokenizers import NO_WORD
from vlp_jax.masking import curriculum
from vlp_jax.models.agent import INVALID_LOGIT

NAME = "agent_masking"
OTHER = "other"
AgentFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def top_k_mask(logits: np.ndarray, mask_ratio: float) -> np.ndarray:
  """(N, T) bool: each row's round(mask_ratio x #valid) highest logits among its valid
  tokens (logit above INVALID_LOGIT / 2); ties go to the earlier position."""
  valid = logits > INVALID_LOGIT / 2
  counts = np.asarray(curriculum.mask_counts(valid, mask_ratio))
  order = np.argsort(-logits, axis=1, kind="stable")
  ranks = np.argsort(order, axis=1, kind="stable")
  return (ranks < counts[:, None]) & valid


def class_of_ids(tokenizer: Any, word_classes: Mapping[str, Sequence[str]]) -> dict[tuple, str]:
  """A class word's token ids (without specials) -> its class, under `tokenizer`."""
  found: dict[tuple, str] = {}
  for name, words in word_classes.items():
    ids, word_ids = tokenizer.encode_with_word_ids(list(words))
    for row in range(len(words)):
      # A "word" the tokenizer splits in two (never in the built-in vocab) has no key.
      if set(word_ids[row][word_ids[row] != NO_WORD].tolist()) == {0}:
        found.setdefault(tuple(ids[row][word_ids[row] == 0].tolist()), name)
  return found


def word_name(tokenizer: Any, ids: tuple[int, ...]) -> str:
  """A word's text from its WordPiece pieces; other tokenizers: its ids."""
  vocab = getattr(tokenizer, "vocab", None)
  if vocab is None:
    return " ".join(str(i) for i in ids)
  return "".join(vocab[i].removeprefix("##") for i in ids)


def masking_report(
  tokens: np.ndarray,
  word_ids: np.ndarray,
  chosen: np.ndarray,
  valid: np.ndarray,
  classes: Mapping[tuple, str],
  top: int = 10,
) -> tuple[dict[str, float], list[tuple[tuple[int, ...], float, int, int]]]:
  """(metrics, top words): the rate per class ("rate/<class>", "tokens/<class>") over the
  maskable tokens, and the `top` words by times masked (ids, rate, masked, tokens)."""
  class_tokens: collections.Counter = collections.Counter()
  class_chosen: collections.Counter = collections.Counter()
  word_tokens: collections.Counter = collections.Counter()
  word_chosen: collections.Counter = collections.Counter()
  for row in range(len(tokens)):
    for word in np.unique(word_ids[row][word_ids[row] != NO_WORD]):
      where = (word_ids[row] == word) & valid[row]
      if not where.any():
        continue
      key = tuple(tokens[row][word_ids[row] == word].tolist())
      name = classes.get(key, OTHER)
      size, masked = int(where.sum()), int(chosen[row][where].sum())
      class_tokens[name] += size
      class_chosen[name] += masked
      word_tokens[key] += size
      word_chosen[key] += masked
  metrics: dict[str, float] = {}
  for name in [*dict.fromkeys(classes.values()), OTHER]:
    if class_tokens[name]:
      metrics[f"rate/{name}"] = class_chosen[name] / class_tokens[name]
      metrics[f"tokens/{name}"] = float(class_tokens[name])
  ranked = sorted(
    (k for k in word_chosen if word_chosen[k]),
    key=lambda k: (-word_chosen[k], -word_chosen[k] / word_tokens[k], k),
  )
  words = [(k, word_chosen[k] / word_tokens[k], word_chosen[k], word_tokens[k]) for k in ranked]
  return metrics, words[:top]


class AgentMaskingTask(Task):
  """The agent's deterministic top-k choices on held-out captions, by word class."""

  name = NAME

  def __init__(
    self,
    data: readers.RetrievalSet,
    agent_fn: AgentFn,
    mask_ratio: float,
    word_classes: Mapping[str, Sequence[str]] = WORD_CLASSES,
    top: int = 10,
  ):
    self.data, self.mask_ratio, self.word_classes, self.top = data, mask_ratio, word_classes, top
    self._agent_fn = agent_fn
    self._jitted: dict[Any, Callable] = {}

  def _score_fn(self, mesh: Any) -> Callable:
    if mesh not in self._jitted:
      agent_fn = self._agent_fn

      def score(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {"logits": agent_fn(params, batch["tokens"], batch["image"]), "row": batch["row"]}

      self._jitted[mesh] = jax.jit(score, out_shardings=sharding.batch_sharding(mesh))
    return self._jitted[mesh]

  def agent_logits(
    self, embedder: Embedder, params: Any, tokens: np.ndarray, image_index: np.ndarray
  ) -> np.ndarray:
    """(N, T) float32 logits of caption n over image image_index[n], batch by batch on
    the mesh (as rerank.Matcher.score_pairs: static batch, padding rows -1)."""
    score = self._score_fn(embedder.mesh)
    count, size, local = len(tokens), embedder.image_size, embedder.local_batch
    outputs = []
    with concurrent.futures.ThreadPoolExecutor(max(1, embedder.read_threads)) as pool:
      for step in range(math.ceil(count / embedder.batch_size)):
        start = step * embedder.batch_size + jax.process_index() * local
        rows = np.arange(start, start + local)
        valid = rows < count
        take = np.where(valid, rows, 0)
        # A batch's captions share few images: decode each once.
        needed = sorted(set(image_index[take].tolist()))
        loaded = dict(
          zip(needed, pool.map(lambda i: load_pixels(self.data.images[i], size), needed))
        )
        pixels = np.stack([loaded[i] for i in image_index[take]]).astype(np.uint8)
        batch = sharding.host_to_global(
          {
            "image": pixels,
            "tokens": tokens[take],
            "row": np.where(valid, rows, -1).astype(np.int32),
          },
          embedder.mesh,
        )
        outputs.append(score(params, batch))
    if not outputs:
      return np.zeros((0, tokens.shape[1]), np.float32)
    gathered = multihost_utils.process_allgather(outputs, tiled=True)
    logits = np.concatenate([np.asarray(o["logits"], np.float32) for o in gathered])
    rows = np.concatenate([np.asarray(o["row"]) for o in gathered])
    result = np.full(tokens.shape, INVALID_LOGIT, np.float32)
    result[rows[rows >= 0]] = logits[rows >= 0]
    return result

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    data, tokenizer = self.data, embedder.tokenizer
    texts = [c for captions in data.captions for c in captions]
    image_index = np.repeat(np.arange(len(data.captions)), [len(c) for c in data.captions])
    tokens, word_ids = tokenizer.encode_with_word_ids(texts)
    tokens = np.asarray(tokens, np.int32)
    logits = self.agent_logits(embedder, params, tokens, image_index)
    chosen = top_k_mask(logits, self.mask_ratio)
    valid = logits > INVALID_LOGIT / 2
    classes = class_of_ids(tokenizer, self.word_classes)
    metrics, top = masking_report(tokens, np.asarray(word_ids), chosen, valid, classes, self.top)
    metrics.update(
      mask_ratio=float(self.mask_ratio),
      num_captions=float(len(texts)),
      masked_share=float(chosen.sum() / max(valid.sum(), 1)),
    )
    top_words = [
      {"word": word_name(tokenizer, ids), "rate": rate, "count": masked, "tokens": total}
      for ids, rate, masked, total in top
    ]

    def write_top_words(path: str) -> None:
      with open(path, "w") as f:
        json.dump(top_words, f, indent=2)

    headline = [k for k in metrics if k.startswith("rate/")]
    result = Result(
      self.name,
      data.name,
      metrics,
      headline,
      files={"top_words.json": write_top_words},
      texts=summary_texts(metrics, top_words),
    )
    result.top_words = top_words  # type: ignore[attr-defined]  # For callers (tests/test_cmask.py).
    return [result]


def top_words_text(top_words: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table of the top words, for a TensorBoard text summary."""
  lines = ["| word | rate | masked | tokens |", "|---|---|---|---|"]
  lines += [f"| {w['word']} | {w['rate']:.3f} | {w['count']} | {w['tokens']} |" for w in top_words]
  return "\n".join(lines)


def class_rates_text(metrics: Mapping[str, float]) -> str:
  """A Markdown table of the masking rate per word class ("rate/<class>", "tokens/<class>"
  of `masking_report`), in the report's class order."""
  lines = ["| class | rate | tokens |", "|---|---|---|"]
  for key, rate in metrics.items():
    if key.startswith("rate/"):
      name = key.removeprefix("rate/")
      lines.append(f"| {name} | {rate:.3f} | {int(metrics[f'tokens/{name}'])} |")
  return "\n".join(lines)


def summary_texts(
  metrics: Mapping[str, float], top_words: Sequence[Mapping[str, Any]]
) -> dict[str, str]:
  """The Result's texts: TensorBoard shows them as Markdown tables at every evaluation."""
  return {"top_words": top_words_text(top_words), "class_rates": class_rates_text(metrics)}


def create(ctx: Context) -> list[Task]:
  """The task over the run's held-out set; k as in training, from the method's own
  config.cmask.mask_ratio (the masking agent is CMask's)."""
  data = ctx.read_heldout(f"the {NAME} task")
  return [AgentMaskingTask(data, ctx.predict_fns["agent_logits"], ctx.config.cmask.mask_ratio)]


TASK = TaskDef(NAME, ("agent_logits",), create, reads_data=False, needs_what="masking agent")
