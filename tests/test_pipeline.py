import io
import os
import shutil

import numpy as np
import pytest

from tests.runs import small_builtin, small_tokenizer, take, train_dataset
from vlp_jax.input_pipeline import builtin, image_ops, pipeline, records


@pytest.fixture(scope="module")
def data(cache_dir):
  return small_builtin(cache_dir)


@pytest.fixture(scope="module")
def tokenizer(data):
  return small_tokenizer(data)


def test_batches_have_static_shapes_and_valid_tokens(data, tokenizer):
  batch = take(train_dataset(data.train_shards, tokenizer), 1)[0]
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["tokens"].shape == (8, 24) and batch["tokens"].dtype == np.int32
  assert (batch["tokens"][:, 0] == tokenizer.cls_id).all()
  lengths = (batch["tokens"] != 0).sum(axis=1)
  assert (batch["tokens"][np.arange(8), lengths - 1] == tokenizer.sep_id).all()
  assert batch["skipped"].sum() == 0


def test_pipeline_is_deterministic_for_a_seed(data, tokenizer):
  a = take(train_dataset(data.train_shards, tokenizer, seed=5), 3)
  b = take(train_dataset(data.train_shards, tokenizer, seed=5), 3)
  c = take(train_dataset(data.train_shards, tokenizer, seed=6), 3)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(a[0]["index"], c[0]["index"])


def test_processes_split_each_global_batch_without_repeats_or_drops(data, tokenizer):
  per_process_epoch = 256 // 2 // 8  # batches
  seen = []
  for process in range(2):
    dataset = train_dataset(data.train_shards, tokenizer, process_index=process, process_count=2)
    seen.append([b for b in take(dataset, 2 * per_process_epoch)])
  one_process = take(train_dataset(data.train_shards, tokenizer, batch_size=16), 2)
  for epoch in range(2):
    epoch_batches = slice(epoch * per_process_epoch, (epoch + 1) * per_process_epoch)
    indices = [np.concatenate([b["index"] for b in s[epoch_batches]]) for s in seen]
    assert not set(indices[0]) & set(indices[1])
    union = np.concatenate(indices)
    assert len(union) == len(set(union)) == 256
  # Process 0's rows, then process 1's, are the one-process global batch, augmentation too.
  for step in range(2):
    for key in ("index", "image", "tokens"):
      together = np.concatenate([seen[0][step][key], seen[1][step][key]])
      np.testing.assert_array_equal(together, one_process[step][key])
  # The next epoch is a new global order: each process gets a different set of records.
  first = np.concatenate([b["index"] for b in seen[0][:per_process_epoch]])
  second = np.concatenate([b["index"] for b in seen[0][per_process_epoch:]])
  assert set(first) != set(second)


def test_worker_processes_give_the_same_batches(data, tokenizer):
  in_process = take(train_dataset(data.train_shards, tokenizer), 2)
  iterator = iter(train_dataset(data.train_shards, tokenizer, num_workers=1))
  try:
    with_workers = [next(iterator) for _ in range(2)]
  finally:
    iterator.close()
  for x, y in zip(in_process, with_workers):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_iterator_state_resumes_the_exact_sequence(data, tokenizer):
  iterator = iter(train_dataset(data.train_shards, tokenizer))
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  fresh = iter(train_dataset(data.train_shards, tokenizer))
  fresh.set_state(state)
  for x, y in zip(expected, [next(fresh) for _ in range(4)]):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_mixture_follows_its_weights_and_resumes_exactly(data, tokenizer):
  # Two sets: the first train shard (64 records) at weight 3, the other three at weight 1.
  sets = [
    records.ShardSet("a", tuple(data.train_shards[:1]), 3.0),
    records.ShardSet("b", tuple(data.train_shards[1:]), 1.0),
  ]
  iterator = iter(train_dataset(sets, tokenizer))
  batches = [next(iterator) for _ in range(20)]
  source = np.concatenate([b["source"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert abs((source == 0).mean() - 0.75) < 0.05
  assert index[source == 0].max() < 64 and index[source == 1].max() < 192
  # 120 draws from set "a" cover its 64 records in each epoch before any repeat.
  first_epoch = index[source == 0][:64]
  assert len(set(first_epoch)) == 64
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  fresh = iter(train_dataset(sets, tokenizer))
  fresh.set_state(state)
  for x, y in zip(expected, [next(fresh) for _ in range(3)]):
    for key in ("source", "index", "image", "tokens"):
      np.testing.assert_array_equal(x[key], y[key])


def test_mixture_specs_parse_weights_and_paths(data, tmp_path):
  shard_dir = os.path.dirname(data.train_shards[0])
  first, rest = data.train_shards[0], ",".join(data.train_shards[1:])
  one = records.resolve_mixture(f"{first},{rest}")
  assert len(one) == 1 and one[0].shards == tuple(data.train_shards)
  mixed = records.resolve_mixture(f"{first}:0.7,{shard_dir}/heldout-*:0.3")
  assert [s.weight for s in mixed] == [0.7, 0.3]
  assert mixed[1].shards == tuple(data.heldout_shards)
  listed = records.resolve_mixture([first, f"{data.train_shards[1]}:2"])
  assert [s.weight for s in listed] == [1.0, 2.0]
  # A colon that is not followed by a number belongs to the path.
  odd = tmp_path / "a:b"
  odd.mkdir()
  shutil.copy(first, odd)
  assert records.resolve_mixture(str(odd))[0].shards[0].startswith(str(odd))
  with pytest.raises(ValueError, match="weight"):
    records.resolve_mixture(f"{first}:0.7,{data.train_shards[1]}")
  with pytest.raises(ValueError, match="positive"):
    records.resolve_mixture(f"{first}:-1")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    records.resolve_mixture(f"{first}:1,/nowhere:1")


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
  dataset = train_dataset(shards, tokenizer, batch_size=4)
  batches = take(dataset, 14)  # a little more than one epoch of 28 good records
  indices = np.concatenate([b["index"] for b in batches])
  assert not set(indices) & {i for i in range(40) if i % 10 in (3, 6, 8)}
  assert set(indices[:28]) == {i for i in range(40) if i % 10 not in (3, 6, 8)}
  skipped = sum(int(b["skipped"].sum()) for b in batches)
  assert num_bad <= skipped <= 2 * num_bad


def test_eval_reader_skips_and_counts_corrupt_records(tmp_path):
  from vlp_jax.evaluation import readers

  shards, num_bad = _write_shard_with_corrupt_records(tmp_path)
  data = readers.read_record_retrieval(shards, max_captions=2, name="mixed")
  assert data.skipped == num_bad and len(data.images) == len(data.captions) == 40 - num_bad


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
  decoded = image_ops.open_image(buffer.getvalue())
  assert decoded.mode == "RGB" and decoded.size == (20, 30)
  if image.mode == "RGBA":  # fully transparent -> white, not the hidden red
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def _jpeg(pixels: np.ndarray, mode: str = "RGB") -> bytes:
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def _smooth_picture(height: int, width: int) -> np.ndarray:
  y, x = np.mgrid[:height, :width]
  return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_fast_jpeg_decode_matches_pil(mode):
  data = _jpeg(_smooth_picture(96, 128), mode)
  reference = np.asarray(image_ops.open_image(data), np.float32)
  pixels = image_ops.decode_pixels(data)
  assert pixels.shape == (96, 128, 3) and pixels.dtype == np.uint8
  assert np.abs(pixels - reference).mean() < 2
  # A 4x smaller crop target lets the decoder shrink by 4 in the DCT.
  small = image_ops.decode_pixels(data, max_shrink=4.5)
  if mode == "CMYK":  # PIL's path: no DCT scaling, full size
    assert small.shape == (96, 128, 3)
  else:
    assert small.shape == (24, 32, 3)
    shrunk = reference.reshape(24, 4, 32, 4, 3).mean(axis=(1, 3))
    assert np.abs(small - shrunk).mean() < 6


def test_oversized_and_truncated_jpegs_are_refused_from_the_header():
  data = bytearray(_jpeg(_smooth_picture(16, 16)))
  sof = data.index(b"\xff\xc0")
  data[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") * 2  # height, width
  with pytest.raises(image_ops.ImageError, match="30000x30000"):
    image_ops.image_dimensions(bytes(data))
  with pytest.raises(image_ops.ImageError, match="30000x30000"):
    image_ops.decode_pixels(bytes(data))
  good = _jpeg(_smooth_picture(64, 64))
  with pytest.raises(image_ops.ImageError):
    image_ops.decode_pixels(good[: len(good) // 2])


def test_train_crops_resize_the_chosen_box():
  # Left half black, right half white: a crop of the right half must come out white.
  pixels = np.zeros((64, 128, 3), np.uint8)
  pixels[:, 64:] = 255
  out = image_ops.crop_resize_pixels(pixels, (70, 0, 128, 64), 32)
  assert out.shape == (32, 32, 3) and out.min() == 255
  out = image_ops.crop_resize_pixels(pixels, (0, 0, 128, 64), 16)  # 4x shrink: area filter
  assert out[:, :7].max() == 0 and out[:, 9:].min() == 255


def test_random_resized_crop_stays_inside_the_image():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = image_ops.random_resized_crop_box(50, 30, rng, (0.08, 1.0))
    assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30


def test_tokenizer_truncates_but_keeps_the_end_token(tokenizer):
  long_caption = " ".join(["a small red circle left of"] * 20)
  ids = tokenizer([long_caption, "a blue square"])
  assert ids.shape == (2, 24)
  assert ids[0, -1] == tokenizer.sep_id and ids[0, 0] == tokenizer.cls_id
  assert (ids[1] != 0).sum() == 5  # [CLS] a blue square [SEP]


def test_word_ids_come_with_the_tokens_and_leave_them_unchanged(data, tokenizer):
  plain = take(train_dataset(data.train_shards, tokenizer), 1)[0]
  batch = take(train_dataset(data.train_shards, tokenizer, extension=pipeline.WithWordIds()), 1)[0]
  np.testing.assert_array_equal(batch["tokens"], plain["tokens"])
  np.testing.assert_array_equal(batch["image"], plain["image"])
  word_ids = batch["tokens_word_ids"]
  assert word_ids.shape == batch["tokens"].shape and word_ids.dtype == np.int32
  special = np.isin(batch["tokens"], [tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id])
  assert (word_ids[special] == -1).all() and (word_ids[~special] >= 0).all()
  # Pieces of one word are adjacent: ids never decrease along a caption.
  for row in word_ids:
    words = row[row >= 0]
    assert (np.diff(words) >= 0).all() and words[0] == 0
