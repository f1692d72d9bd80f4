from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlp_jax.input_pipeline import builtin, records


def test_examples_are_deterministic_from_the_seed():
  a = builtin.generate_example(3, "train", 17, 32)
  b = builtin.generate_example(3, "train", 17, 32)
  c = builtin.generate_example(4, "train", 17, 32)
  assert a["caption"] == b["caption"]
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["caption"] != c["caption"] or not np.array_equal(a["image"], c["image"])


def _pairs(caption: str) -> set[tuple[str, str]]:
  words = caption.replace(",", "").split()
  return {
    (colour, words[i + 1])
    for i, colour in enumerate(words[:-1])
    if colour in builtin.COLOURS and words[i + 1] in builtin.SHAPES
  }


def test_heldout_combinations_never_occur_in_training():
  train = [builtin.generate_example(0, "train", i, 32)["caption"] for i in range(400)]
  heldout = [builtin.generate_example(0, "heldout", i, 32)["caption"] for i in range(100)]
  train_pairs = set().union(*map(_pairs, train))
  assert not train_pairs & builtin.HELDOUT_PAIRS
  assert all(_pairs(c) & builtin.HELDOUT_PAIRS for c in heldout)
  # Each colour and each shape still occurs in training.
  assert {c for c, _ in train_pairs} == set(builtin.COLOURS)
  assert {s for _, s in train_pairs} == set(builtin.SHAPES)


def test_scene_positions_satisfy_their_caption():
  rng = np.random.default_rng(0)
  for _ in range(200):
    scene = builtin.sample_scene(rng, heldout=False)
    for i, relation in enumerate(scene.relations):
      assert builtin.relation_holds(relation, scene.objects[i], scene.objects[i + 1])
    assert len(scene.objects) in (1, 2, 3)


def test_shapes_are_drawn_in_their_colour_where_the_scene_puts_them():
  scene = builtin.Scene((builtin.Shape("large", "red", "square", 0.3, 0.5),), ())
  image = builtin.render(scene, 64, np.random.default_rng(0))
  assert tuple(image[32, 19]) == builtin.COLOURS["red"]  # inside the square
  assert image[32, 50].max() < 120  # background


def test_negatives_differ_from_the_caption_and_keep_its_words():
  for i in range(100):
    example = builtin.generate_example(0, "heldout", i, 32)
    caption = example["caption"]
    negatives = example["negatives"]
    assert {"replace_att", "replace_obj"} <= set(negatives) <= set(builtin.NEGATIVE_KINDS)
    for kind, negative in negatives.items():
      assert negative != caption, kind
    if "swap_att" in negatives:
      assert Counter(negatives["swap_att"].split()) == Counter(caption.split())


def test_dataset_is_written_once_to_shards_that_decode(cache_dir):
  kwargs = dict(seed=0, num_train=256, num_heldout=64, image_size=32, vocab_size=1000)
  data = builtin.ensure_builtin(cache_dir, **kwargs)
  again = builtin.ensure_builtin(cache_dir, **kwargs)
  assert data == again
  from array_record.python.array_record_module import ArrayRecordReader

  keys = []
  for path in data.heldout_shards:
    reader = ArrayRecordReader(path)
    for raw in reader.read_all():
      record = records.decode_record(raw)
      keys.append(record["key"])
      assert set(record["negatives"]) <= set(builtin.NEGATIVE_KINDS)
    reader.close()
  assert len(keys) == 64 and len(set(keys)) == 64
  vocab = Path(data.vocab_file).read_text().split("\n")
  for word in ("circle", "left", "purple", "[CLS]", "[SEP]"):
    assert word in vocab


def test_decode_record_rejects_bad_records():
  with pytest.raises(records.RecordError, match="msgpack"):
    records.decode_record(b"\xc1not msgpack")
  with pytest.raises(records.RecordError, match="empty caption"):
    records.decode_record(records.encode_record("k", b"img", "  "))
  with pytest.raises(records.RecordError, match="no image"):
    records.decode_record(records.encode_record("k", b"", "a caption"))
