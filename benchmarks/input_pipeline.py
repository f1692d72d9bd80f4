r"""Input pipeline throughput: vlp_jax's grain pipeline beside a tf.data pipeline.

  python benchmarks/input_pipeline.py [--num_images=512] [--batches=12]

Both pipelines do the same work per example, from the same ~500x375 JPEGs (COCO's size):
decode, random-resized crop to 224 (area 0.08-1, aspect 3/4-4/3), random flip, tokenise
the caption (WordPiece, 77 tokens), batch. Both hand the model uint8 pixels: normalising
is one fused multiply-add on the accelerator, inside the model, for both. grain reads
ArrayRecord shards of msgpack records; tf.data reads TFRecords of tf.train.Example
(each framework's native format) and tokenises with tensorflow-text's FastBertTokenizer.

Cases, each in its own subprocess:
- "per core": grain with one worker process and one read thread; tf.data with a private
  thread pool of one thread.
- "all cores": grain with one worker per core; tf.data with AUTOTUNE parallelism.
- tf.data resizes with bilinear filtering and no antialiasing (its default, as big_vision
  does) and, as a second row, with the antialiased bicubic filter our pipeline uses.
- the demo's train step (configs/demo.py) on this machine: the images/s the pipeline
  must keep up with.
Prints a table; writes benchmarks/results/input_pipeline.json.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import common
import numpy as np

CAPTION_WORDS = tuple(
  [
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "red",
    "blue",
    "small",
    "large",
    "sitting",
    "standing",
    "on",
    "in",
    "next",
    "to",
    "the",
    "table",
    "bench",
    "street",
    "field",
    "with",
    "holding",
    "two",
    "three",
    "people",
    "riding",
    "bike",
    "horse",
    "near",
    "water",
    "tree",
    "grass",
    "of",
  ]
)
IMAGE_SHAPES = ((375, 500), (500, 375), (333, 500), (480, 640))  # (height, width)
CONTEXT = 77
CROP_SCALE = (0.08, 1.0)


def photo_like_jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  """Smooth colour regions plus sensor-like noise: JPEG sizes close to real photos."""
  from PIL import Image

  low = rng.uniform(0, 255, (height // 32, width // 32, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.int16)
  image = np.clip(image + rng.normal(0, 16, image.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def write_fixture(root: str, num_images: int) -> dict:
  """ArrayRecord shards, TFRecords and a WordPiece vocab of the same image-text pairs."""
  sys.path.insert(0, common.ROOT)
  from vlp_jax.input_pipeline import records, tokenizers

  tf = tokenizers.import_tensorflow()
  rng = np.random.default_rng(0)
  pairs = []
  for i in range(num_images):
    height, width = IMAGE_SHAPES[i % len(IMAGE_SHAPES)]
    words = rng.choice(CAPTION_WORDS, size=int(rng.integers(6, 20)))
    pairs.append((f"{i:06d}", photo_like_jpeg(rng, height, width), " ".join(words)))
  records.write_shards(
    (records.encode_record(k, image, text) for k, image, text in pairs), root, "bench", 4
  )
  with tf.io.TFRecordWriter(os.path.join(root, "bench.tfrecord")) as writer:
    for _, image, text in pairs:
      feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()])),
      }
      writer.write(
        tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
      )
  vocab = tokenizers.learn_wordpiece_vocab([t for _, _, t in pairs], vocab_size=200)
  with open(os.path.join(root, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  return {"mean_jpeg_kb": float(np.mean([len(p[1]) for p in pairs]) / 1e3)}


def _time_batches(iterator, batch_size: int, warmup: int, batches: int) -> float:
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


def measure_grain(args: argparse.Namespace, workers: int, threads: int) -> dict:
  sys.path.insert(0, common.ROOT)
  from vlp_jax.input_pipeline import pipeline, records, tokenizers

  vocab = tokenizers.read_vocab(os.path.join(args.root, "vocab.txt"))
  dataset = pipeline.create_train_dataset(
    records.resolve_shards(args.root),
    tokenizers.WordPieceTokenizer(vocab, CONTEXT),
    batch_size=args.batch_size,
    image_size=224,
    crop_scale=CROP_SCALE,
    flip=True,
    seed=0,
    num_workers=workers,
    read_threads=threads,
  )
  iterator = iter(dataset)
  try:
    rate = _time_batches(iterator, args.batch_size, args.warmup, args.batches)
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  return {"images_per_s": rate, "workers": workers, "read_threads": threads}


def measure_tf_data(args: argparse.Namespace, threads: int, bicubic: bool) -> dict:
  sys.path.insert(0, common.ROOT)
  from vlp_jax.input_pipeline import tokenizers

  tf = tokenizers.import_tensorflow()
  import tensorflow_text as tf_text

  tf.config.threading.set_intra_op_parallelism_threads(max(threads, 1))
  vocab = tokenizers.read_vocab(os.path.join(args.root, "vocab.txt"))
  tokenizer = tf_text.FastBertTokenizer(
    vocab=vocab, lower_case_nfd_strip_accents=True, token_out_type=tf.int32
  )
  cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
  method = "bicubic" if bicubic else "bilinear"
  features = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "caption": tf.io.FixedLenFeature([], tf.string),
  }

  def transform(serialized):
    example = tf.io.parse_single_example(serialized, features)
    shape = tf.image.extract_jpeg_shape(example["image"])
    begin, size, _ = tf.image.sample_distorted_bounding_box(
      shape,
      tf.zeros([0, 0, 4], tf.float32),
      area_range=CROP_SCALE,
      aspect_ratio_range=(3 / 4, 4 / 3),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(example["image"], window, channels=3)
    image = tf.image.resize(image, (224, 224), method=method, antialias=bicubic)
    image = tf.image.random_flip_left_right(image)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    pieces = tokenizer.tokenize(tf.reshape(example["caption"], [1]))[0][: CONTEXT - 2]
    ids = tf.concat([[cls_id], pieces, [sep_id]], axis=0)
    tokens = tf.pad(ids, [[0, CONTEXT - tf.shape(ids)[0]]])
    return {"image": image, "tokens": tf.ensure_shape(tokens, [CONTEXT])}

  parallel = tf.data.AUTOTUNE if threads == 0 else threads
  dataset = (
    tf.data.TFRecordDataset(os.path.join(args.root, "bench.tfrecord"))
    .repeat()
    .shuffle(256, seed=0)
    .map(transform, num_parallel_calls=parallel)
    .batch(args.batch_size, drop_remainder=True)
    .prefetch(2)
  )
  options = tf.data.Options()
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  dataset = dataset.with_options(options)
  rate = _time_batches(dataset.as_numpy_iterator(), args.batch_size, args.warmup, args.batches)
  return {"images_per_s": rate, "threads": threads or "autotune", "filter": method}


def measure_demo_step(args: argparse.Namespace) -> dict:
  """Images/s the demo's jitted train step consumes (random data of the demo's shapes)."""
  sys.path.insert(0, common.ROOT)
  from vlp_jax.configs import demo

  config = demo.get_config()
  state, step_fn, _, batch = common.jax_step(config, vocab_size=1000)
  step = common.jax_step_runner(state, step_fn, batch)
  times = common.time_calls(step, steps=10, warmup=2)
  return {"images_per_s": config.batch_size / common.median(times), "batch": config.batch_size}


def measure(args: argparse.Namespace) -> dict:
  cpus = os.cpu_count() or 1
  cases = {
    "setup": lambda: write_fixture(args.root, args.num_images),
    "grain per core": lambda: measure_grain(args, workers=1, threads=1),
    "grain all cores": lambda: measure_grain(args, workers=cpus, threads=2),
    "tf.data per core (bilinear)": lambda: measure_tf_data(args, threads=1, bicubic=False),
    "tf.data per core (bicubic)": lambda: measure_tf_data(args, threads=1, bicubic=True),
    "tf.data all cores (bilinear)": lambda: measure_tf_data(args, threads=0, bicubic=False),
    "tf.data all cores (bicubic)": lambda: measure_tf_data(args, threads=0, bicubic=True),
    "demo train step": lambda: measure_demo_step(args),
  }
  return cases[args.case]()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--root", default="")
  parser.add_argument("--case", help=argparse.SUPPRESS)
  parser.add_argument(
    "--out", default=os.path.join(common.ROOT, "benchmarks/results/input_pipeline.json")
  )
  args = parser.parse_args()
  if args.case:
    common.emit(measure(args))
    return

  with tempfile.TemporaryDirectory() as root:
    flags = [f"--{k}={getattr(args, k)}" for k in ("batch_size", "batches", "warmup")]
    flags.append(f"--root={args.root or root}")
    fixture = common.run_isolated(
      __file__, [*flags, f"--num_images={args.num_images}", "--case=setup"]
    )
    results = {}
    for case in (
      "grain per core",
      "tf.data per core (bilinear)",
      "tf.data per core (bicubic)",
      "grain all cores",
      "tf.data all cores (bilinear)",
      "tf.data all cores (bicubic)",
      "demo train step",
    ):
      results[case] = common.run_isolated(__file__, [*flags, f"--case={case}"])
      print(f"{case}: {results[case]['images_per_s']:.0f} images/s", flush=True)

  rate = {case: r["images_per_s"] for case, r in results.items()}
  per_core = rate["grain per core"] / max(
    rate["tf.data per core (bilinear)"], rate["tf.data per core (bicubic)"]
  )
  headroom = rate["grain all cores"] / rate["demo train step"]
  print(
    f"\n{args.num_images} JPEGs (mean {fixture['mean_jpeg_kb']:.0f} KB), crop to 224, "
    f"batch {args.batch_size}, {args.batches} timed batches, {os.cpu_count()} cores"
  )
  print("| case | images/s |")
  print("|---|---|")
  for case, value in rate.items():
    print(f"| {case} | {value:.0f} |")
  print(f"\ngrain per core / best tf.data per core: {per_core:.2f}x (target >= 0.8x)")
  print(f"grain all cores / demo step consumption: {headroom:.2f}x (target >= 1.5x)")
  common.write_json(
    args.out,
    {
      "args": {k: v for k, v in vars(args).items() if k not in ("case", "out", "root")},
      "fixture": fixture,
      "results": results,
      "grain_per_core_vs_tf_data": per_core,
      "grain_all_cores_vs_demo_step": headroom,
    },
  )


if __name__ == "__main__":
  main()
