import numpy as np
import pytest

from vlp_jax.input_pipeline import builtin, pipeline, records, tokenizers


@pytest.fixture(scope="module")
def data(cache_dir):
  return builtin.ensure_builtin(
    cache_dir, seed=0, num_train=256, num_heldout=64, image_size=32, vocab_size=1000
  )


@pytest.fixture(scope="module")
def tokenizer(data):
  return tokenizers.create_tokenizer(data.vocab_file, context_length=24)


def _train_dataset(shards, tokenizer, **overrides):
  kwargs = dict(
    batch_size=8,
    image_size=32,
    crop_scale=(0.8, 1.0),
    flip=True,
    seed=0,
    num_workers=0,
    read_threads=2,
  )
  kwargs.update(overrides)
  return pipeline.create_train_dataset(shards, tokenizer, **kwargs)


def _take(dataset, num_batches):
  iterator = iter(dataset)
  return [next(iterator) for _ in range(num_batches)]


def test_batches_have_static_shapes_and_valid_tokens(data, tokenizer):
  batch = _take(_train_dataset(data.train_shards, tokenizer), 1)[0]
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["tokens"].shape == (8, 24) and batch["tokens"].dtype == np.int32
  assert (batch["tokens"][:, 0] == tokenizer.cls_id).all()
  lengths = (batch["tokens"] != 0).sum(axis=1)
  assert (batch["tokens"][np.arange(8), lengths - 1] == tokenizer.sep_id).all()
  assert batch["skipped"].sum() == 0


def test_pipeline_is_deterministic_for_a_seed(data, tokenizer):
  a = _take(_train_dataset(data.train_shards, tokenizer, seed=5), 3)
  b = _take(_train_dataset(data.train_shards, tokenizer, seed=5), 3)
  c = _take(_train_dataset(data.train_shards, tokenizer, seed=6), 3)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(a[0]["index"], c[0]["index"])


def test_two_processes_split_an_epoch_without_repeats_or_drops(data, tokenizer):
  per_process_epoch = 256 // 2 // 8  # batches
  seen = []
  for process in range(2):
    dataset = _train_dataset(data.train_shards, tokenizer, process_index=process, process_count=2)
    seen.append(np.concatenate([b["index"] for b in _take(dataset, per_process_epoch)]))
  assert not set(seen[0]) & set(seen[1])
  union = np.concatenate(seen)
  assert len(union) == len(set(union)) == 256
  # The next epoch is a different order of the same records.
  dataset = _train_dataset(data.train_shards, tokenizer, process_index=0, process_count=2)
  two_epochs = np.concatenate([b["index"] for b in _take(dataset, 2 * per_process_epoch)])
  second = two_epochs[len(seen[0]) :]
  assert set(second) == set(seen[0]) and not np.array_equal(second, seen[0])


def test_worker_processes_give_the_same_batches(data, tokenizer):
  in_process = _take(_train_dataset(data.train_shards, tokenizer), 2)
  iterator = iter(_train_dataset(data.train_shards, tokenizer, num_workers=1))
  try:
    with_workers = [next(iterator) for _ in range(2)]
  finally:
    iterator.close()
  for x, y in zip(in_process, with_workers):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_iterator_state_resumes_the_exact_sequence(data, tokenizer):
  iterator = iter(_train_dataset(data.train_shards, tokenizer))
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  fresh = iter(_train_dataset(data.train_shards, tokenizer))
  fresh.set_state(state)
  for x, y in zip(expected, [next(fresh) for _ in range(4)]):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])


def _write_shard_with_corrupt_records(tmp_path):
  good = builtin.encode_jpeg(builtin.generate_example(0, "train", 0, 32)["image"])
  items = []
  for i in range(40):
    if i % 10 == 3:
      items.append(b"\x00garbage that is not msgpack")
    elif i % 10 == 6:
      items.append(records.encode_record(f"k{i}", good[: len(good) // 3], "a truncated jpeg"))
    elif i % 10 == 8:
      items.append(records.encode_record(f"k{i}", good, ""))
    else:
      items.append(records.encode_record(f"k{i}", good, f"a small red circle {i}"))
  return records.write_shards(items, str(tmp_path), "mixed", 1), 12


def test_corrupt_records_are_skipped_and_counted(tmp_path, tokenizer):
  shards, num_bad = _write_shard_with_corrupt_records(tmp_path)
  dataset = _train_dataset(shards, tokenizer, batch_size=4)
  batches = _take(dataset, 14)  # a little more than one epoch of 28 good records
  indices = np.concatenate([b["index"] for b in batches])
  assert not set(indices) & {i for i in range(40) if i % 10 in (3, 6, 8)}
  assert set(indices[:28]) == {i for i in range(40) if i % 10 not in (3, 6, 8)}
  skipped = sum(int(b["skipped"].sum()) for b in batches)
  assert num_bad <= skipped <= 2 * num_bad


def test_eval_dataset_marks_corrupt_records_as_none(tmp_path, tokenizer):
  shards, num_bad = _write_shard_with_corrupt_records(tmp_path)
  dataset = pipeline.create_eval_dataset(shards, tokenizer, image_size=32, max_captions=2)
  elements = [dataset[i] for i in range(len(dataset))]
  assert sum(e is None for e in elements) == num_bad
  good = next(e for e in elements if e is not None)
  assert good["tokens"].shape == (2, 24) and good["caption_mask"].tolist() == [True, False]


@pytest.mark.parametrize(
  "make_image",
  [
    lambda: __import__("PIL.Image").Image.new("RGBA", (20, 30), (255, 0, 0, 0)),
    lambda: __import__("PIL.Image").Image.new("L", (20, 30), 128),
    lambda: __import__("PIL.Image").Image.new("P", (20, 30), 3),
    lambda: __import__("PIL.Image").Image.new("CMYK", (20, 30), (0, 255, 0, 0)),
  ],
)
def test_images_of_any_mode_decode_to_rgb(make_image):
  import io

  buffer = io.BytesIO()
  image = make_image()
  image.save(buffer, format="JPEG" if image.mode == "CMYK" else "PNG")
  decoded = pipeline.open_image(buffer.getvalue())
  assert decoded.mode == "RGB" and decoded.size == (20, 30)
  if image.mode == "RGBA":  # fully transparent -> white, not the hidden red
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_random_resized_crop_stays_inside_the_image():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = pipeline.random_resized_crop_box(50, 30, rng, (0.08, 1.0))
    assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30


def test_tokenizer_truncates_but_keeps_the_end_token(tokenizer):
  long_caption = " ".join(["a small red circle left of"] * 20)
  ids = tokenizer([long_caption, "a blue square"])
  assert ids.shape == (2, 24)
  assert ids[0, -1] == tokenizer.sep_id and ids[0, 0] == tokenizer.cls_id
  assert (ids[1] != 0).sum() == 5  # [CLS] a blue square [SEP]
