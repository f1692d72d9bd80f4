"""Masked language modelling inputs, shared by ALBEF / CMask and VLC.

Selection and replacement are separate steps, so a masking agent can choose the tokens
and still reuse the replacement:

- `select_tokens`: each maskable token with probability `ratio` (ALBEF's Bernoulli), or
  each maskable word with probability `ratio`, all its pieces together (whole-word
  masking, VLC), from the tokeniser's word ids.
- `replace_tokens`: BERT's 80/10/10: [MASK], a random vocabulary id, or unchanged.

Everything is jittable with static shapes: selections are (B, T) bool masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

NO_WORD = -1  # Word id of special tokens and padding (input_pipeline.tokenizers.NO_WORD).


@dataclasses.dataclass(frozen=True)
class TextSpecials:
  """The ids MLM needs: [MASK], the vocabulary size for random replacements, and the ids
  that are never masked (ALBEF: pad and [CLS]; VLC: every special token)."""

  mask_id: int
  vocab_size: int
  never_mask: tuple[int, ...]


def text_specials(tokenizer: object, never_mask: Sequence[str]) -> TextSpecials:
  """TextSpecials of a BERT-style tokenizer (mask_id, vocab_size and the id attributes
  named in `never_mask`, e.g. ("pad_id", "cls_id")); ValueError when it has no [MASK]."""
  mask_id = getattr(tokenizer, "mask_id", None)
  if mask_id is None:
    raise ValueError(
      "masked language modelling needs a tokenizer with a [MASK] token: "
      'config.data.tokenizer="wordpiece" with a vocab that has [MASK]'
    )
  ids = tuple(getattr(tokenizer, name) for name in never_mask)
  return TextSpecials(mask_id, tokenizer.vocab_size, tuple(i for i in ids if i is not None))


def maskable(tokens: jax.Array, never_mask: Sequence[int]) -> jax.Array:
  """(B, T) bool: the tokens that may be masked."""
  allowed = jnp.ones(tokens.shape, bool)
  for token_id in never_mask:
    allowed &= tokens != token_id
  return allowed


def select_tokens(
  rng: jax.Array,
  tokens: jax.Array,
  never_mask: Sequence[int],
  ratio: float | jax.Array,
  word_ids: jax.Array | None = None,
) -> jax.Array:
  """(B, T) bool: the tokens to predict.

  Without `word_ids`, every maskable token independently with probability `ratio`. With
  `word_ids` (B, T) (each token's word index in its text, NO_WORD for special tokens and
  padding), every word with probability `ratio`: a word's pieces are all masked or none.
  """
  allowed = maskable(tokens, never_mask)
  draws = jax.random.uniform(rng, tokens.shape)
  if word_ids is None:
    return allowed & (draws < ratio)
  # Word w of a text takes the draw at position w: one draw per word, shared by its pieces
  # (a text has at most T words).
  in_word = word_ids != NO_WORD
  word_draws = jnp.take_along_axis(draws, jnp.where(in_word, word_ids, 0), axis=1)
  return allowed & in_word & (word_draws < ratio)


def replace_tokens(
  rng: jax.Array,
  tokens: jax.Array,
  selected: jax.Array,
  specials: TextSpecials,
  probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> jax.Array:
  """The encoder's input: selected tokens become [MASK] with probs[0], a uniformly random
  vocabulary id with probs[1], and stay themselves with probs[2] (BERT's 80/10/10;
  CMask: (1, 0, 0))."""
  choice_rng, random_rng = jax.random.split(rng)
  u = jax.random.uniform(choice_rng, tokens.shape)
  random_ids = jax.random.randint(random_rng, tokens.shape, 0, specials.vocab_size, tokens.dtype)
  replaced = jnp.where(u < probs[0], specials.mask_id, tokens)
  replaced = jnp.where((u >= probs[0]) & (u < probs[0] + probs[1]), random_ids, replaced)
  return jnp.where(selected, replaced, tokens)


def mask_text(
  rng: jax.Array,
  tokens: jax.Array,
  specials: TextSpecials,
  ratio: float | jax.Array,
  word_ids: jax.Array | None = None,
  probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> tuple[jax.Array, jax.Array]:
  """(masked input ids, selected (B, T) bool): `select_tokens` then `replace_tokens`."""
  select_rng, replace_rng = jax.random.split(rng)
  selected = select_tokens(select_rng, tokens, specials.never_mask, ratio, word_ids)
  return replace_tokens(replace_rng, tokens, selected, specials, probs), selected
