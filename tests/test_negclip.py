"""NegCLIP: swapped negatives keep their words, the loss matches NumPy, neighbours match
brute force, and the pipeline's extra fields are the neighbour's image and captions."""

import functools
import os
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.runs import small_builtin, small_tokenizer, take, train_dataset
from vlp_jax import losses
from vlp_jax.input_pipeline import builtin, image_ops, negatives, pipeline, records
from vlp_jax.methods import contrastive, negclip

# ---------------------------------------------------------------- taggers and swaps


def _builtin_captions(count: int) -> list[str]:
  """Training and held-out captions and the held-out negatives, without rendering."""
  captions = []
  for i in range(count):
    for heldout in (False, True):
      scene = builtin.sample_scene(np.random.default_rng([7, int(heldout), i]), heldout)
      captions.append(builtin.caption(scene))
      if heldout:
        captions.extend(builtin.negatives(scene, np.random.default_rng(i)).values())
  return captions


BUILTIN_CAPTIONS = _builtin_captions(100)

# Extra words to exercise verbs, adverbs, determiners and proper nouns.
EXTRA_LEXICON = {
  "the": "DET",
  "two": "NUM",
  "dog": "NOUN",
  "cat": "NOUN",
  "ball": "NOUN",
  "alice": "PROPN",
  "chases": "VERB",
  "eats": "VERB",
  "quickly": "ADV",
  "slowly": "ADV",
  "happy": "ADJ",
  "and": "CCONJ",
}

AWKWARD_CAPTIONS = [
  "  a small   red circle\tleft of a LARGE blue square.  ",
  "A Small Red Circle, which is above a blue diamond!",
  "the dog chases the cat, and the cat eats the ball.",
  "Alice slowly chases a happy dog; the dog quickly eats.",
  '"the red-circle" is left of a "blue" square, right?',
  "two dogs' ball... the happy cat (red) and blue cat",
  "red,blue,green:circle/square",
  "a small red circle right of a small red circle, which is below a small red cross",
  "Ünïcode red and blue — café circle",
]

NOTHING_TO_SWAP = [
  "",
  "!!!",
  "dog",
  "a a a",
  "the the dog",
  "red RED circle",  # the same word, however written
  "a red-circle and a blue square",  # "red" is glued to "circle": one unknown word
  "sunset over the sea",  # unknown words only
]


@pytest.fixture(scope="module")
def tagger():
  return negatives.LexiconTagger({**negatives.builtin_lexicon(), **EXTRA_LEXICON})


def test_builtin_lexicon_covers_every_caption_word():
  lexicon = negatives.builtin_lexicon()
  vocabulary = {w.lower() for c in BUILTIN_CAPTIONS for w in negatives.words(c)}
  assert vocabulary <= set(lexicon)
  assert {lexicon[s] for s in builtin.SHAPES} == {"NOUN"}
  assert {lexicon[c] for c in (*builtin.COLOUR_NAMES, *builtin.SIZES)} == {"ADJ"}
  tagging = negatives.LexiconTagger(lexicon).tag("a small red circle left of a large blue square")
  assert tagging.pairs()[:5] == [
    ("a", "OTHER"),
    ("small", "ADJ"),
    ("red", "ADJ"),
    ("circle", "NOUN"),
    ("left", "ADV"),
  ]
  assert tagging.noun_phrases == ((0, 18), (27, 46))


def _check_negative(caption: str, negative: str) -> None:
  assert negative != caption
  assert sorted(negatives.words(negative)) == sorted(negatives.words(caption))
  assert sorted(negative) == sorted(caption)  # Spaces and punctuation are all still there.
  if not re.search(r"[^\w\s]", caption):  # No punctuation to stay behind: whole tokens move.
    assert sorted(negative.split()) == sorted(caption.split())


def test_swapped_negatives_differ_and_keep_their_words(tagger):
  rng = np.random.default_rng(0)
  kinds = set()
  for caption in BUILTIN_CAPTIONS + AWKWARD_CAPTIONS:
    for _ in range(5):
      negative = negatives.swap_negative(caption, tagger, rng)
      assert negative is not None, caption  # Every caption here has a same-POS swap.
      _check_negative(caption, negative)
      kinds.add(_swap_kind(caption, negative, tagger))
  assert kinds >= {"NOUN", "ADJ", "VERB", "ADV", "NP"}


def _swap_kind(caption: str, negative: str, tagger) -> str:
  """Which category a swap came from: one-word swaps by the words' POS, else NP."""
  old, new = negatives.words(caption), negatives.words(negative)
  changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
  pos = {t.text: t.pos for t in tagger.tag(caption).tokens}
  if len(changed) != 2:
    return "NP"
  a, b = old[changed[0]], old[changed[1]]
  one_word = (new[changed[0]], new[changed[1]]) == (b, a) and pos[a] == pos[b] != "OTHER"
  return pos[a] if one_word else "NP"


def test_swaps_move_only_the_swapped_words(tagger):
  caption = "Alice slowly chases a happy dog; the dog quickly eats."
  rng = np.random.default_rng(1)
  seen = {negatives.swap_negative(caption, tagger, rng) for _ in range(200)}
  assert "Alice quickly chases a happy dog; the dog slowly eats." in seen  # ADV
  assert "Alice slowly eats a happy dog; the dog quickly chases." in seen  # VERB
  assert "Alice slowly chases the dog; a happy dog quickly eats." in seen  # NP
  for negative in seen:
    # Punctuation and spacing outside the swapped words stay where they were.
    assert negative.endswith(".") and "; " in negative


def test_nothing_to_swap_gives_none_and_the_fallbacks(tagger):
  rng = np.random.default_rng(0)
  for caption in NOTHING_TO_SWAP:
    assert negatives.swap_negative(caption, tagger, rng) is None, caption
  negative, kind = negatives.make_negative("sunset over the sea", "x", tagger, rng)
  assert kind == negatives.NEGATIVE_ANY_SWAP
  _check_negative("sunset over the sea", negative)
  assert negatives.make_negative("a a a", "a red circle", tagger, rng) == (
    "a red circle",
    negatives.NEGATIVE_OTHER_CAPTION,
  )
  negative, kind = negatives.make_negative("a red small circle", "x", tagger, rng)
  assert (negative, kind) == ("a small red circle", negatives.NEGATIVE_SWAP)


class _SubwordTagger:
  """A tagger whose tokens split words, as spaCy splits "don't" and "red-circle"."""

  def tag(self, caption: str) -> negatives.Tagging:
    tokens = [
      negatives.Token(m.group(), "NOUN", m.start(), m.end()) for m in re.finditer(r"\w+", caption)
    ]
    return negatives.Tagging(tuple(tokens), ((0, 3), (4, 7)))


def test_tokens_glued_to_other_words_are_never_moved():
  rng = np.random.default_rng(0)
  for caption in ["don't red-circle", "cat's red-circle x-ray"]:
    assert negatives.swap_negative(caption, _SubwordTagger(), rng) is None
  # "dog" and "cat" stand alone and may move; "do", "n't" (here "t") may not.
  for _ in range(20):
    negative = negatives.swap_negative("dog cat don't", _SubwordTagger(), rng)
    assert negative == "cat dog don't"


class _FakeSpacyToken:
  def __init__(self, text, pos, idx):
    self.text, self.pos_, self.idx, self.is_space = text, pos, idx, text.isspace()


class _FakeSpacyChunk:
  def __init__(self, start, end):
    self.start_char, self.end_char = start, end


class _FakeSpacyDoc(list):
  def __init__(self, tokens, chunks):
    super().__init__(tokens)
    self._chunks = chunks

  @property
  def noun_chunks(self):
    if self._chunks is None:
      raise ValueError("[E029] noun_chunks requires the dependency parse")
    return self._chunks


class _FakeSpacy:
  """spaCy's interface as SpacyTagger uses it: tokens with pos_/idx, doc.noun_chunks."""

  def __init__(self, parsed: bool):
    self.parsed = parsed

  def __call__(self, text):
    tags = {"Alice": "PROPN", "runs": "VERB", "fast": "ADV", "dogs": "NOUN", "is": "AUX"}
    tokens = [
      _FakeSpacyToken(m.group(), tags.get(m.group(), "X"), m.start())
      for m in re.finditer(r"\S+|\s+", text)
    ]
    return _FakeSpacyDoc(tokens, [_FakeSpacyChunk(0, 5)] if self.parsed else None)


def test_spacy_tagger_maps_tags_and_noun_chunks():
  tagger = negatives.SpacyTagger("fake", nlp=_FakeSpacy(parsed=True))
  tagging = tagger.tag("Alice  runs fast")
  assert tagging.pairs() == [("Alice", "NOUN"), ("runs", "VERB"), ("fast", "ADV")]
  assert tagging.tokens[1].start == 7 and tagging.noun_phrases == ((0, 5),)
  unparsed = negatives.SpacyTagger("fake", nlp=_FakeSpacy(parsed=False))
  assert unparsed.tag("dogs is").noun_phrases == ()
  copy = pickle.loads(pickle.dumps(unparsed))  # A given pipeline travels with the tagger.
  assert copy.tag("dogs is").pairs() == [("dogs", "NOUN"), ("is", "OTHER")]


def _spacy_installed() -> bool:
  try:
    import spacy  # noqa: F401
  except ImportError:
    return False
  return True


def test_create_tagger_kinds():
  assert isinstance(negatives.create_tagger("lexicon"), negatives.LexiconTagger)
  with pytest.raises(ValueError, match="unknown tagger"):
    negatives.create_tagger("nltk")
  if _spacy_installed():
    with pytest.raises(negatives.TaggerUnavailableError, match="spacy download no_such_model"):
      negatives.create_tagger("spacy:no_such_model")
    return
  assert isinstance(negatives.create_tagger("auto"), negatives.LexiconTagger)
  install = "pip install spacy && python -m spacy download en_core_web_sm"
  with pytest.raises(negatives.TaggerUnavailableError, match=re.escape(install)):
    negatives.create_tagger("spacy")
  with pytest.raises(ImportError, match="download en_core_web_trf"):
    negatives.create_tagger("spacy:en_core_web_trf")


# ---------------------------------------------------------------- the loss


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def reference_negclip_loss(image: np.ndarray, text: np.ndarray, scale: float) -> float:
  image, text = image.astype(np.float64), text.astype(np.float64)
  n = len(image)
  logits = scale * image @ text.T
  i2t = -np.mean([_log_softmax(logits)[j, j] for j in range(n)])
  t2i = -np.mean([_log_softmax(logits[:, :n].T)[j, j] for j in range(n)])
  return (i2t + t2i) / 2


def _unit(rng: np.random.Generator, shape) -> np.ndarray:
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("batch,dim", [(3, 8), (8, 32)])
def test_negclip_loss_matches_numpy(batch, dim):
  rng = np.random.default_rng(batch)
  image, text = _unit(rng, (2 * batch, dim)), _unit(rng, (4 * batch, dim))
  text[: 2 * batch] = _unit(rng, (2 * batch, dim)) + 0.8 * image  # Some signal to find.
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  scale = np.float32(7.5)
  loss, metrics = jax.jit(losses.negclip_loss)(image, text, scale)  # Static shapes: jits.
  assert np.isclose(float(loss), reference_negclip_loss(image, text, scale), rtol=1e-5)
  logits = scale * image.astype(np.float64) @ text.T.astype(np.float64)
  rows = np.arange(2 * batch)
  assert np.isclose(float(metrics["train_i2t_accuracy"]), (logits.argmax(1) == rows).mean())
  swap = (logits[rows, rows] > logits[rows, rows + 2 * batch]).mean()
  assert np.isclose(float(metrics["train_swap_accuracy"]), swap)
  grad_fn = jax.jit(jax.grad(lambda i, t, s: losses.negclip_loss(i, t, s)[0], argnums=(0, 1, 2)))
  grads = grad_fn(image, text, scale)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_negclip_loss_limits():
  loss_fn = jax.jit(losses.negclip_loss)
  rng = np.random.default_rng(0)
  image, text = _unit(rng, (4, 8)), _unit(rng, (8, 8))
  # No signal: uniform over 4B texts one way, 2B images the other.
  loss, _ = loss_fn(image, text, jnp.float32(0.0))
  assert np.isclose(float(loss), (np.log(8) + np.log(4)) / 2, rtol=1e-6)
  # Negatives identical to their captions can never be beaten: the loss stays above log 2 / 2.
  same = np.concatenate([image, image])
  loss, metrics = loss_fn(image, same, jnp.float32(100.0))
  assert np.log(2) / 2 - 1e-4 < float(loss) < np.log(2) / 2 + 1e-3
  assert float(metrics["train_swap_accuracy"]) == 0.0
  with pytest.raises(ValueError, match="twice as many texts"):
    losses.negclip_loss(image, image, jnp.float32(1.0))


def test_negclip_inputs_order_images_and_texts():
  batch = {
    "image": np.zeros((2, 4, 4, 3), np.uint8),
    "hard_image": np.ones((2, 4, 4, 3), np.uint8),
    **{k: np.full((2, 5), i, np.int32) for i, k in enumerate(negclip.TOKEN_FIELDS)},
  }
  inputs = _stacked(batch)
  images, tokens = inputs["image"], inputs["tokens"]
  assert images.shape == (4, 4, 4, 3) and images[:2].max() == 0 and images[2:].min() == 1
  assert tokens.shape == (8, 5) and tokens[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# ---------------------------------------------------------------- hard images


def brute_force_neighbours(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  sims = unit @ unit.T
  np.fill_diagonal(sims, -np.inf)
  return sims.argmax(axis=1), sims


@pytest.mark.parametrize("count,block_size", [(53, 16), (20, 4096), (2, 3)])
def test_nearest_neighbours_match_brute_force(count, block_size):
  rng = np.random.default_rng(count)
  x = rng.normal(size=(count, 6)).astype(np.float32)
  if count > 10:
    x[10] = x[3]  # Duplicates: each other's neighbours, at similarity 1.
    x[40 % count] = 2 * x[3]
    x[7] = 0  # A zero row is similar to nothing.
  expected, sims = brute_force_neighbours(x)
  found = negclip.nearest_neighbours(x, block_size=block_size)
  assert found.shape == (count,) and found.dtype == np.int64
  assert (found != np.arange(count)).all()
  best = sims.max(axis=1)
  np.testing.assert_allclose(sims[np.arange(count), found], best, atol=1e-6)
  second = np.sort(sims, axis=1)[:, -2]
  clear = best - second > 1e-5  # Where the top-1 is unambiguous, it is the same index.
  np.testing.assert_array_equal(found[clear], expected[clear])
  if count > 10:
    assert found[3] in (10, 40 % count) and found[10] in (3, 40 % count)


def test_nearest_neighbours_refuse_fewer_than_two_rows():
  with pytest.raises(ValueError, match="N >= 2"):
    negclip.nearest_neighbours(np.ones((1, 4), np.float32))


def test_neighbours_file_round_trip(tmp_path):
  workdir = str(tmp_path / "run")
  assert negclip.load_neighbours(workdir) is None
  neighbours = np.array([1, 0, 0, 2], np.int32)
  path = negclip.save_neighbours(workdir, neighbours)
  assert path == os.path.join(workdir, "negclip_neighbours.npy")
  assert os.listdir(workdir) == ["negclip_neighbours.npy"]  # No temporary file left behind.
  loaded = negclip.load_neighbours(workdir, num_records=4)
  assert loaded.dtype == np.int64 and loaded.tolist() == [1, 0, 0, 2]
  with pytest.raises(ValueError, match="Delete it"):
    negclip.load_neighbours(workdir, num_records=5)
  negclip.save_neighbours(workdir, np.array([1, 0, 9, 2]))
  with pytest.raises(ValueError, match="outside"):
    negclip.load_neighbours(workdir, num_records=4)


@pytest.fixture(scope="module")
def data(cache_dir):
  return small_builtin(cache_dir)  # test_pipeline's: one cached dataset for both.


@pytest.fixture(scope="module")
def tokenizer(data):
  return small_tokenizer(data)


def _record_images(shards) -> np.ndarray:
  import grain

  source = grain.sources.ArrayRecordDataSource(list(shards))
  return np.stack(
    [image_ops.decode_pixels(records.decode_record(source[i])["image"]) for i in range(len(source))]
  )


def _pixel_embedder(images, count):
  """A stand-in for Embedder.images: mean colour of the center crop (deterministic)."""
  from vlp_jax.evaluation import embedding

  pixels = np.stack([embedding.load_pixels(image, 32) for image in images])
  assert len(pixels) == count
  return pixels.reshape(count, -1, 3).mean(axis=1) - 100.0


def test_mining_embeds_every_record_in_order(data, tmp_path):
  mined = negclip.mine_hard_images(_pixel_embedder, data.train_shards, block_size=64)
  embeddings = _record_images(data.train_shards).reshape(256, -1, 3).mean(axis=1) - 100.0
  np.testing.assert_array_equal(mined, negclip.nearest_neighbours(embeddings, block_size=64))
  # load_or_mine mines once, then reads the file back.
  calls = []

  def counting(images, count):
    calls.append(count)
    return _pixel_embedder(images, count)

  workdir = str(tmp_path)
  first = negclip.load_or_mine_hard_images(workdir, counting, data.train_shards, block_size=64)
  second = negclip.load_or_mine_hard_images(workdir, counting, data.train_shards, block_size=64)
  np.testing.assert_array_equal(first, mined)
  np.testing.assert_array_equal(second, mined)
  assert calls == [256]


def test_mining_through_the_evaluation_embedder(data, tokenizer):
  from tests.configs import tiny
  from vlp_jax import sharding
  from vlp_jax.evaluation import Embedder
  from vlp_jax.models import CLIP, create_model, embedding_fns

  config = tiny.get_config()
  model = create_model(config.model, tokenizer.vocab_size)
  shapes = jax.eval_shape(
    model.init,
    jax.random.key(0),
    jnp.zeros((1, 32, 32, 3), jnp.uint8),
    jnp.ones((1, 24), jnp.int32),
  )["params"]
  rng = np.random.default_rng(0)  # Random weights without compiling the initialiser.
  params = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(x.dtype), shapes)
  mesh = sharding.create_mesh({"data": -1})
  embedder = Embedder(
    embedding_fns(model), mesh, tokenizer, batch_size=64, image_size=32, read_threads=2
  )
  mined = negclip.mine_hard_images(functools.partial(embedder.images, params), data.train_shards)
  pixels = _record_images(data.train_shards)
  encode = jax.jit(functools.partial(model.apply, method=CLIP.encode_image))
  embeddings = encode({"params": params}, jnp.asarray(pixels))
  _, sims = brute_force_neighbours(np.asarray(embeddings))
  np.testing.assert_allclose(sims[np.arange(256), mined], sims.max(axis=1), atol=1e-4)
  assert len(set(mined.tolist())) > 20  # The embeddings tell the images apart.


# ---------------------------------------------------------------- the training pipeline


def _spec(num_records: int = 256) -> negclip.NegClipSpec:
  neighbours = (np.arange(num_records) * 37 + 5) % num_records
  return negclip.NegClipSpec(neighbours, negatives.create_tagger("lexicon"))


def _non_pad(tokens: np.ndarray) -> list[int]:
  return sorted(tokens[tokens != 0].tolist())


def test_negclip_batches_carry_hard_images_and_negatives(data, tokenizer):
  spec = _spec()
  plain = take(train_dataset(data.train_shards, tokenizer, seed=3), 2)
  batches = take(train_dataset(data.train_shards, tokenizer, seed=3, extension=spec), 2)
  for base, batch in zip(plain, batches):
    for key, value in base.items():  # The plain fields are the pipeline's without NegCLIP.
      np.testing.assert_array_equal(batch[key], value)
    assert batch["hard_image"].shape == (8, 32, 32, 3) and batch["hard_image"].dtype == np.uint8
    for key in negclip.TOKEN_FIELDS:
      assert batch[key].shape == (8, 24) and batch[key].dtype == np.int32
    assert batch["negative_kind"].shape == (8, 2) and (batch["negative_kind"] == 0).all()
    np.testing.assert_array_equal(batch["hard_index"], spec.neighbours[batch["index"]])
    for row in range(8):
      for caption, negative in (("tokens", "neg_tokens"), ("hard_tokens", "hard_neg_tokens")):
        # A swap: other token rows, the same tokens.
        assert not np.array_equal(batch[caption][row], batch[negative][row])
        assert _non_pad(batch[caption][row]) == _non_pad(batch[negative][row])
  inputs = _stacked(batches[0])
  assert inputs["image"].shape == (16, 32, 32, 3) and inputs["tokens"].shape == (32, 24)


def test_hard_image_and_caption_are_the_neighbour_record(data, tokenizer):
  import grain

  spec = _spec()
  batch = take(
    train_dataset(data.train_shards, tokenizer, crop_scale=(1.0, 1.0), flip=False, extension=spec),
    1,
  )[0]
  source = grain.sources.ArrayRecordDataSource(list(data.train_shards))
  for row in range(8):
    record = records.decode_record(source[int(spec.neighbours[batch["index"][row]])])
    np.testing.assert_array_equal(
      batch["hard_image"][row], image_ops.decode_pixels(record["image"])
    )
    np.testing.assert_array_equal(batch["hard_tokens"][row], tokenizer(record["captions"])[0])
    own = records.decode_record(source[int(batch["index"][row])])
    np.testing.assert_array_equal(batch["image"][row], image_ops.decode_pixels(own["image"]))


def test_negclip_pipeline_resumes_exactly(data, tokenizer):
  spec = _spec()
  iterator = iter(train_dataset(data.train_shards, tokenizer, extension=spec))
  for _ in range(2):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  fresh = iter(train_dataset(data.train_shards, tokenizer, extension=spec))
  fresh.set_state(state)
  for x, y in zip(expected, [next(fresh) for _ in range(2)]):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_negclip_transform_survives_pickling_for_worker_processes(data):
  import grain

  transform = _spec().train_transform(
    pipeline.TrainTransform(32, (0.5, 1.0), True),
    [records.ShardSet("train", tuple(data.train_shards))],
  )
  source = grain.sources.ArrayRecordDataSource(list(data.train_shards))
  element = (0, 17, source[17])
  before = transform.random_map(element, np.random.default_rng(4))  # Opens the shards.
  copy = pickle.loads(pickle.dumps(transform))
  after = copy.random_map(element, np.random.default_rng(4))
  assert before["hard_index"] == (17 * 37 + 5) % 256
  for key, value in before.items():
    np.testing.assert_array_equal(after[key], value)


def test_negclip_pipeline_refuses_mixtures_and_wrong_neighbours(data, tokenizer):
  sets = [
    records.ShardSet("a", tuple(data.train_shards[:1]), 3.0),
    records.ShardSet("b", tuple(data.train_shards[1:]), 1.0),
  ]
  with pytest.raises(ValueError, match="single training shard set"):
    train_dataset(sets, tokenizer, extension=_spec())
  with pytest.raises(ValueError, match=r"\(256,\)"):
    train_dataset(data.train_shards, tokenizer, extension=_spec(100))


def _stacked(batch):
  return contrastive.stack_fields(batch, negclip.IMAGE_FIELDS, negclip.TOKEN_FIELDS)
