r"""The real train step on whatever devices are present: throughput, MFU, memory, compile time.

  python benchmarks/accelerator.py                      # CLIP ViT-B/16, all local devices
  python benchmarks/accelerator.py --models=clip,albef,vlc --per_device_batch=128
  python benchmarks/accelerator.py --tiny               # tiny models (the CI smoke test)
  bash benchmarks/run_on_device.sh                      # on a lent GPU machine (see there)

Bounded for one GPU: the default (CLIP only) is meant to finish in under 8 minutes, each
further model adds about as much; --tiny is meant to take under a minute on an idle
2-core CPU (about 30 CPU seconds per model, most of it one XLA compile).

Per model (configs/clip_vitb16.py, albef_vitb16.py, vlc_vitb16.py), in its own subprocess
(clean device memory and peak statistics): the trainer's jitted step (AdamW, clipping,
the non-finite guard; built as benchmarks/common.py `jax_step` builds it) over a
data-parallel mesh of all local devices, in bf16 on GPU/TPU and f32 on CPU. The
per-device batch is `--per_device_batch`, or searched: compile at `--start_batch` and twice
it, extrapolate the compiled steps' memory estimates (XLA's memory analysis, affine in the
batch) to the largest power-of-two multiple within 90% of the device's memory, compile
that, halve while it does not fit (bounded by `--max_per_device_batch` and
`--search_budget_s`; 3-4 compiles). Reports:
- img/s/device and step time: median of `--steps` steps after `--warmup`, each
  synchronised with block_until_ready on the new state and metrics;
- MFU = (XLA cost-analysis FLOPs of the compiled step / step time) / (peak x devices),
  the peak from the device-kind table (vlp_jax.progress), `--peak_tflops`, or on CPU the
  measured f32 matmul ceiling (jit of a 4096^2 @ 4096^2 matmul, best of a few);
- peak device memory: memory_stats()["peak_bytes_in_use"] where the device has it, else
  the compiled step's memory analysis (the table says which);
- compile time: lower + compile of the step at the chosen batch;
- input-pipeline headroom: vlp_jax's grain pipeline (decode, random-resized crop to the
  model's image size, flip, CLIP BPE tokenisation, batching; `--pipeline_workers`
  processes) on generated photo-like JPEG shards, batches/s over the steps/s of the
  step at the same per-process batch (> 1: the pipeline keeps up).
Prints a table; writes benchmarks/results/accelerator.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import common

MODELS = ("clip", "albef", "vlc")
# bert-base-uncased's vocabulary and special ids ([PAD] 0): ALBEF's and VLC's text side.
BERT_VOCAB, BERT_CLS, BERT_SEP, BERT_MASK = 30522, 101, 102, 103
MATMUL_SIZE = 4096
_IMPORTED = time.perf_counter()


def create_config(model: str, per_device_batch: int, num_devices: int, args: argparse.Namespace):
  """The model's real config at a global batch of per_device_batch x num_devices."""
  from vlp_jax.configs import albef_vitb16, clip_vitb16, vlc_vitb16

  batch = per_device_batch * num_devices
  builders: dict[str, Callable] = {
    "clip": clip_vitb16.get_config,
    "albef": albef_vitb16.get_config,
    "vlc": vlc_vitb16.get_config,
  }
  config = builders[model](f"batch_size={batch}")
  config.unlock()
  config.model.dtype = args.dtype
  # Keys other work adds to the model config; ignored where this checkout lacks them.
  for key in ("attention", "scan_layers"):
    value = getattr(args, key)
    if value is not None and key in config.model:
      config.model[key] = value
  if args.tiny:
    _shrink(config)
  if model == "albef":
    # The feature queue must hold a whole number of global batches.
    queue = config.albef.queue_size
    config.albef.queue_size = -(-queue // batch) * batch
  return config


def _shrink(config) -> None:
  """A model that compiles and steps in seconds on a CPU core."""
  config.model.image.variant = "mu/8"
  config.model.image.image_size = 32
  config.model.image.depth = 1
  config.model.embed_dim = 32
  text = config.model.text
  text.width, text.depth, text.num_heads, text.mlp_dim = 64, 2, 2, 128
  text.context_length = 16
  if config.method == "albef":
    config.albef.fusion_layer = 1
  if config.method == "vlc":
    config.vlc.decoder_width, config.vlc.decoder_depth = 64, 1
    config.vlc.decoder_num_heads, config.vlc.decoder_mlp_dim = 4, 128


def tokenizer_spec(config):
  """What the method needs of a tokenizer (CLIP BPE's size, or BERT's with its ids)."""
  from vlp_jax import experiment

  context = config.model.text.context_length
  if config.method == "contrastive":
    return common.tokenizer_spec(config)
  return experiment.TokenizerSpec(BERT_VOCAB, 0, context, BERT_CLS, BERT_SEP, BERT_MASK)


def random_batch(spec: dict, vocab_size: int, seed: int = 0) -> dict:
  """Host arrays for every field of `spec` (shape/dtype structs): random uint8 pixels;
  captions laid out as [start] words [end] padding with one word per token."""
  import numpy as np

  rng = np.random.default_rng(seed)
  batch = {}
  for name, struct in spec.items():
    if struct.dtype == np.uint8:
      batch[name] = rng.integers(0, 256, struct.shape, dtype=np.uint8)
      continue
    rows, context = struct.shape
    lengths = rng.integers(context // 2, context - 1, rows)
    positions = np.arange(context)[None, :]
    inside = (positions >= 1) & (positions <= lengths[:, None])
    if name.endswith("word_ids"):
      batch[name] = np.where(inside, positions - 1, -1).astype(np.int32)
      continue
    tokens = np.where(inside, rng.integers(1000, vocab_size, (rows, context)), 0)
    tokens[:, 0] = BERT_CLS
    tokens[np.arange(rows), lengths + 1] = BERT_SEP
    batch[name] = tokens.astype(np.int32)
  return batch


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _device_memory_limit() -> tuple[int | None, str]:
  """Bytes one device may allocate, and where the number comes from."""
  import jax

  stats = jax.local_devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), "memory_stats bytes_limit"
  available, share = common.available_host_memory(), jax.local_device_count()
  if available is None:
    return None, "unknown"
  # Simulated CPU devices share the host's memory.
  return available // share, "MemAvailable" + (f" / {share} devices" if share > 1 else "")


def _memory_needed(compiled) -> int:
  """Bytes the compiled step needs per device: arguments, outputs (less those aliased to
  donated arguments) and temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  return (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )


def compile_candidates(model: str, args: argparse.Namespace, mesh) -> tuple[list[dict], list[dict]]:
  """Compiled steps at the per-device batches that fit, smallest first, and a record of
  every batch tried.

  With --per_device_batch, that one. Else --start_batch and twice it; then, memory being
  affine in the batch, the largest power-of-two multiple of the start that those two
  estimates predict within 90% of the device's limit (at most --max_per_device_batch),
  halving while it does not fit. A compile that runs out of memory, or the search's time
  budget, also ends the search."""
  limit, limit_source = _device_memory_limit()
  fitting, tried, started = [], [], time.perf_counter()

  def fits(size: int) -> bool:
    """Compiles at `size`; True if it fits (it is then kept in `fitting`)."""
    candidate = _compile(model, size, mesh, args)
    if candidate is None:
      tried.append({"per_device_batch": size, "outcome": "compile out of memory"})
      return False
    ok = not limit or candidate["memory_needed"] <= 0.9 * limit
    print(
      f"{model}: per-device batch {size}: compiled in {candidate['compile_s']:.1f} s, needs "
      f"{candidate['memory_needed'] / 2**30:.2f} GiB of {(limit or 0) / 2**30:.1f} GiB "
      f"({limit_source})",
      flush=True,
    )
    tried.append(
      {
        "per_device_batch": size,
        "compile_s": candidate["compile_s"],
        "memory_needed_bytes": candidate["memory_needed"],
        "outcome": "fits" if ok else "over 90% of the memory limit",
      }
    )
    if ok or not fitting:  # The start batch runs even when the estimate says no.
      fitting.append({**candidate, "memory_limit": limit, "memory_limit_source": limit_source})
    return ok

  def over_budget() -> bool:
    return time.perf_counter() - started > args.search_budget_s

  start, largest = args.per_device_batch or args.start_batch, args.max_per_device_batch
  if not fits(start) or args.per_device_batch or 2 * start > largest or over_budget():
    return fitting, tried
  if not fits(2 * start) or over_budget():
    return fitting, tried
  (small, a), (large, b) = [(t["per_device_batch"], t["memory_needed_bytes"]) for t in tried]
  per_row = max((b - a) / (large - small), 1.0)
  predicted = (0.9 * limit - (a - per_row * small)) / per_row if limit else largest
  size = 2 * start
  while 2 * size <= min(predicted, largest):
    size *= 2
  while size > 2 * start and not over_budget():
    if fits(size):
      break
    size //= 2
  return fitting, tried


def _compile(model: str, size: int, mesh, args: argparse.Namespace) -> dict | None:
  """The step compiled at per-device batch `size` (None: compilation ran out of memory)."""
  import jax

  from vlp_jax import experiment, trainer

  config = create_config(model, size, mesh.size, args)
  parts = experiment.create_step_parts(config, mesh, tokenizer_spec(config), 1000)
  abstract, state_sharding = trainer.abstract_train_state(parts.method, parts.tx, mesh, 0)
  start = time.perf_counter()
  try:
    compiled = trainer.compile_step(parts, state_sharding).lower(
      jax_shaped(abstract, state_sharding), parts.abstract_batch()
    )
    compiled = compiled.compile()
  except Exception as error:  # XLA raises its own runtime error type for OOM.
    if not _is_out_of_memory(error):
      raise
    return None
  return {
    "per_device_batch": size,
    "config": config,
    "parts": parts,
    "compiled": compiled,
    "compile_s": time.perf_counter() - start,
    "memory_needed": _memory_needed(compiled),
    "params": sum(x.size for x in jax.tree.leaves(abstract.params)),
  }


def jax_shaped(abstract, shardings):
  """The abstract state with its shardings attached (what lower() compiles against)."""
  import jax

  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )


def time_steps(candidate: dict, steps: int, warmup: int, vocab_size: int) -> list[float]:
  """Step times at the candidate's batch on a freshly initialised state."""
  import jax

  from vlp_jax import sharding, trainer

  parts = candidate["parts"]
  state, _ = trainer.create_train_state(parts.method, parts.tx, parts.mesh, seed=0)
  local = parts.batch_size // jax.process_count()
  spec = {
    name: jax.ShapeDtypeStruct((local, *s.shape[1:]), s.dtype)
    for name, s in parts.method.batch_spec(parts.batch_size).items()
  }
  batch = sharding.host_to_global(random_batch(spec, vocab_size), parts.mesh)
  holder = {"state": state}

  def step() -> None:
    holder["state"], metrics = candidate["compiled"](holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))

  try:
    return common.time_calls(step, steps, warmup)
  finally:
    holder.clear()  # Frees the state's device buffers before a smaller batch is tried.


def matmul_ceiling(size: int = MATMUL_SIZE, repeats: int = 3) -> float:
  """FLOP/s of a jitted f32 size^2 @ size^2 matmul on the first device, best of `repeats`."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(jnp.dot)
  times = common.time_calls(lambda: jax.block_until_ready(matmul(a, a)), repeats, 1)
  return 2 * size**3 / min(times)


def peak_flops(args: argparse.Namespace) -> tuple[float | None, str]:
  """Peak FLOP/s per device and where it comes from."""
  import jax

  from vlp_jax import progress

  if args.peak_tflops:
    return args.peak_tflops * 1e12, args.peak_source or "--peak_tflops"
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    # --tiny: a 2048^2 matmul, 1/8 of the work.
    size = MATMUL_SIZE // 2 if args.tiny else MATMUL_SIZE
    # One CPU device's matmul already uses every core: simulated CPU devices
    # (--xla_force_host_platform_device_count) share that ceiling.
    share = jax.local_device_count()
    source = f"measured f32 matmul {size}^2 (jit, best of 3)" + (
      f" / {share} devices" if share > 1 else ""
    )
    return matmul_ceiling(size) / share, source
  # Dense bf16 datasheet peaks: progress.PEAK_FLOPS_PER_DEVICE (sources beside it).
  peak = progress.peak_flops_per_device(device.device_kind)
  return peak, f"datasheet bf16 ({device.device_kind})" if peak else "unknown"


def peak_memory(fallback: int) -> tuple[int, str]:
  """The largest peak_bytes_in_use over local devices, else the compiled estimate."""
  import jax

  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  if all(peaks):
    return max(peaks), "memory_stats peak_bytes_in_use"
  return fallback, "compiled memory_analysis"


def pipeline_rate(config, local_batch: int, args: argparse.Namespace) -> dict:
  """Batches/s of the grain training pipeline on generated JPEGs for `config`'s sizes."""
  import input_pipeline as jpegs  # benchmarks/input_pipeline.py: photo-like JPEGs.
  import numpy as np

  from vlp_jax.input_pipeline import pipeline, records, tokenizers

  size, context = config.model.image.image_size, config.model.text.context_length
  # COCO's 500x375 photos for a 224 px model, scaled with the model's resolution.
  height, width = round(size * 375 / 224), round(size * 500 / 224)
  rng = np.random.default_rng(0)
  words = np.array(jpegs.CAPTION_WORDS)
  with tempfile.TemporaryDirectory() as root:
    rows = (
      records.encode_record(
        f"{i:06d}",
        jpegs.photo_like_jpeg(rng, height, width),
        " ".join(rng.choice(words, size=int(rng.integers(6, 20)))),
      )
      for i in range(args.pipeline_images)
    )
    records.write_shards(rows, root, "bench", 2)
    dataset = pipeline.create_train_dataset(
      records.resolve_shards(root),
      tokenizers.ClipBpeTokenizer(tokenizers.CLIP_BPE_MERGES, context),
      batch_size=local_batch,
      image_size=size,
      crop_scale=tuple(config.data.crop_scale),
      flip=config.data.flip,
      seed=0,
      num_workers=args.pipeline_workers,
      read_threads=config.data.read_threads,
    )
    iterator = iter(dataset)
    try:
      for _ in range(args.pipeline_warmup):
        next(iterator)
      start = time.perf_counter()
      for _ in range(args.pipeline_batches):
        next(iterator)
      elapsed = time.perf_counter() - start
    finally:
      if hasattr(iterator, "close"):
        iterator.close()  # Ends the grain worker processes.
  return {
    "batches_per_s": args.pipeline_batches / elapsed,
    "jpeg_size": [height, width],
    "images": args.pipeline_images,
    "workers": args.pipeline_workers,
    "read_threads": config.data.read_threads,
  }


class _Clock:
  """Wall and process CPU seconds since the last lap."""

  def __init__(self) -> None:
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def lap(self) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    lap = {"wall_s": wall - self.wall, "cpu_s": cpu - self.cpu}
    self.wall, self.cpu = wall, cpu
    return lap


def _since_start() -> dict[str, float]:
  """Wall seconds since this module was imported and CPU seconds of the process so far."""
  return {"wall_s": time.perf_counter() - _IMPORTED, "cpu_s": time.process_time()}


def allow_missing_tensorflow() -> None:
  """Lets vlp_jax import where TensorFlow is not installed (the device machines).

  clu.metric_writers imports TensorFlow for its TensorBoard writer; this benchmark writes
  no summaries and tokenises with CLIP's BPE, so it needs TensorFlow for nothing."""
  import importlib.util
  import types

  try:
    if importlib.util.find_spec("tensorflow") is not None:
      return
  except ValueError:  # Blocked in sys.modules (None): as good as missing.
    pass

  class SummaryWriter:
    def __init__(self, *args, **kwargs):
      raise ImportError("TensorBoard summaries need TensorFlow, which is not installed")

  module = types.ModuleType("clu.metric_writers.summary_writer")
  module.SummaryWriter = SummaryWriter
  sys.modules[module.__name__] = module


def measure(args: argparse.Namespace) -> dict:
  """One model's row (runs in its own process)."""
  sys.path.insert(0, common.ROOT)
  allow_missing_tensorflow()
  import jax

  from vlp_jax import progress, sharding

  platform = jax.default_backend()
  if args.dtype == "auto":
    args.dtype = "float32" if platform == "cpu" else "bfloat16"
  mesh = sharding.create_mesh({"data": -1})
  phases: dict[str, dict[str, float]] = {"imports": _since_start()}
  clock = _Clock()
  candidates, tried = compile_candidates(args.only, args, mesh)
  if not candidates:
    sys.exit(f"{args.only}: the step does not compile at per-device batch {tried[0]}")
  phases["batch_search"] = clock.lap()
  # The largest batch that compiled within memory; a smaller one if running it does not fit.
  times = None
  while candidates:
    chosen = candidates.pop()
    vocab = tokenizer_spec(chosen["config"]).vocab_size
    try:
      times = time_steps(chosen, args.steps, args.warmup, vocab)
      break
    except Exception as error:
      if not _is_out_of_memory(error) or not candidates:
        raise
      print(f"{args.only}: batch {chosen['per_device_batch']} ran out of memory; smaller")
  phases["steps"] = clock.lap()
  step_s = statistics.median(times)
  devices = mesh.size
  flops = progress.compiled_flops(chosen["compiled"], devices)
  peak, peak_source = peak_flops(args)
  phases["peak"] = clock.lap()
  memory, memory_source = peak_memory(chosen["memory_needed"])
  per_device = chosen["per_device_batch"]
  local_batch = per_device * jax.local_device_count()
  pipe = pipeline_rate(chosen["config"], local_batch, args)
  phases["pipeline"] = clock.lap()
  mfu = progress.model_flops_utilization(flops, step_s, peak, devices) if flops and peak else None
  config = chosen["config"]
  device = jax.local_devices()[0]
  return {
    "model": args.only,
    "platform": platform,
    "device_kind": device.device_kind,
    "jax_version": jax.__version__,
    "variant": config.model.image.variant,
    "image_size": config.model.image.image_size,
    "context_length": config.model.text.context_length,
    "dtype": config.model.dtype,
    "attention": config.model.get("attention"),
    "scan_layers": config.model.get("scan_layers"),
    "params": chosen["params"],
    "per_device_batch": per_device,
    "batch_searched": not args.per_device_batch,
    "batches_tried": tried,
    "devices": devices,
    "step_times": times,
    "step_s": step_s,
    "images_per_s_per_device": per_device / step_s,
    "flops_per_step": flops,
    "peak_flops_per_device": peak,
    "peak_source": peak_source,
    "mfu": mfu,
    "peak_memory_bytes": memory,
    "memory_source": memory_source,
    "memory_needed_bytes": chosen["memory_needed"],
    "memory_limit_bytes": chosen["memory_limit"],
    "memory_limit_source": chosen["memory_limit_source"],
    "compile_s": chosen["compile_s"],
    "pipeline": pipe,
    "pipeline_headroom": pipe["batches_per_s"] * step_s,
    # Wall and this process's CPU seconds per phase: on a shared machine CPU time says
    # how much of the wall time was waiting for other work.
    "phases": phases,
  }


def _format_row(r: dict) -> str:
  mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
  memory_kind = "peak" if r["memory_source"].startswith("memory_stats") else "estimate"
  return (
    f"| {r['model']} {r['variant']} {r['image_size']}px | {r['per_device_batch']}"
    f"{' (searched)' if r['batch_searched'] else ''} | {r['images_per_s_per_device']:.1f} | "
    f"{1e3 * r['step_s']:.1f} | {mfu} | {r['peak_memory_bytes'] / 2**30:.2f} ({memory_kind}) | "
    f"{r['compile_s']:.1f} | {r['pipeline']['batches_per_s']:.2f} | "
    f"{r['pipeline_headroom']:.2f}x |"
  )


def create_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="clip", help=f"Comma list of {list(MODELS)}.")
  parser.add_argument(
    "--per_device_batch", type=int, default=0, help="0: search (see --start_batch)."
  )
  parser.add_argument("--start_batch", type=int, default=0, help="0: 32 (tiny, CPU: 4, 8).")
  parser.add_argument(
    "--max_per_device_batch", type=int, default=0, help="0: 1024 (CPU: the start batch)."
  )
  parser.add_argument("--search_budget_s", type=float, default=150.0)
  parser.add_argument("--steps", type=int, default=0, help="Timed steps; 0: 10 (tiny, CPU: 3).")
  parser.add_argument("--warmup", type=int, default=0, help="0: 2 (tiny, CPU: 1).")
  parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU/TPU, float32 CPU.")
  parser.add_argument("--attention", default=None, help="config.model.attention, where it exists.")
  parser.add_argument(
    "--scan_layers",
    default=None,
    type=lambda v: v.lower() in ("1", "true", "yes"),
    help="config.model.scan_layers (true/false), where it exists.",
  )
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="Peak per device; 0: table.")
  parser.add_argument("--pipeline_workers", type=int, default=-1, help="-1: one per CPU core.")
  parser.add_argument("--pipeline_images", type=int, default=0, help="0: 256 (tiny: 32).")
  parser.add_argument("--pipeline_batches", type=int, default=0, help="0: 5 (tiny: 2).")
  parser.add_argument("--pipeline_warmup", type=int, default=1)
  parser.add_argument("--tiny", action="store_true", help="Tiny models and images, few steps.")
  parser.add_argument(
    "--out", default=os.path.join(common.ROOT, "benchmarks/results/accelerator.json")
  )
  parser.add_argument("--only", choices=MODELS, help=argparse.SUPPRESS)
  parser.add_argument("--peak_source", default="", help=argparse.SUPPRESS)
  return parser


def _fill_defaults(args: argparse.Namespace, cpu: bool) -> None:
  """Defaults that depend on --tiny and on the platform (bounded for an 8-minute GPU run)."""
  small = args.tiny or cpu
  # On CPU the search stops at its start: each compile of the step takes ~15 CPU seconds
  # even for the tiny model, and B/16 steps past batch 8 take minutes.
  args.start_batch = args.start_batch or (8 if small else 32)
  args.max_per_device_batch = args.max_per_device_batch or (args.start_batch if cpu else 1024)
  args.steps = args.steps or (3 if small else 10)
  args.warmup = args.warmup or (1 if small else 2)
  args.pipeline_images = args.pipeline_images or (32 if args.tiny else 256)
  args.pipeline_batches = args.pipeline_batches or (2 if args.tiny else 5)
  if args.pipeline_workers < 0:
    # In-process decoding for --tiny: worker start-up would dominate a one-minute run.
    args.pipeline_workers = 0 if args.tiny else os.cpu_count() or 1


def main() -> None:
  args = create_parser().parse_args()
  if args.only:
    # Only the children touch the devices: a parent holding the GPU would leave them none.
    import jax

    # Compile time means compiling: a persistent cache (JAX_COMPILATION_CACHE_DIR) would
    # turn it into a cache read.
    jax.config.update("jax_enable_compilation_cache", False)
    _fill_defaults(args, cpu=jax.default_backend() == "cpu")
    common.emit(measure(args))
    return
  models = [m for m in args.models.split(",") if m]
  unknown = [m for m in models if m not in MODELS]
  if unknown or not models:
    sys.exit(f"--models: {unknown or models} not in {list(MODELS)}")
  flags = [
    f"--{k}={v}"
    for k, v in vars(args).items()
    if k not in ("models", "only", "out", "tiny", "attention", "scan_layers", "peak_source")
    and v is not None
  ]
  flags += ["--tiny"] if args.tiny else []
  flags += [f"--attention={args.attention}"] if args.attention else []
  flags += [f"--scan_layers={args.scan_layers}"] if args.scan_layers is not None else []
  rows, started = [], time.perf_counter()
  for model in models:
    row = common.run_isolated(__file__, [*flags, f"--only={model}"])
    rows.append(row)
    if row["platform"] == "cpu" and not args.peak_tflops and row["peak_flops_per_device"]:
      # One measured CPU ceiling for every row (and no second measurement).
      args.peak_tflops = row["peak_flops_per_device"] / 1e12
      flags = [f for f in flags if not f.startswith(("--peak_tflops", "--peak_source"))]
      flags += [f"--peak_tflops={args.peak_tflops}", f"--peak_source={row['peak_source']}"]
  first = rows[0]
  print(
    f"\n{first['devices']} x {first['device_kind']} ({first['platform']}), jax "
    f"{first['jax_version']}, {first['dtype']}; peak {first['peak_flops_per_device'] / 1e12:.2f} "
    f"TFLOP/s per device: {first['peak_source']}; median of {len(first['step_times'])} steps"
  )
  print(
    "| model | batch / device | img/s/device | step (ms) | MFU | memory / device (GiB) | "
    "compile (s) | pipeline batches/s | pipeline headroom |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for row in rows:
    print(_format_row(row))
  print(f"total {time.perf_counter() - started:.0f} s")
  common.write_json(
    args.out,
    {
      "benchmark": "accelerator",
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "device_kind": first["device_kind"],
      "device_count": first["devices"],
      "platform": first["platform"],
      "jax_version": first["jax_version"],
      "tiny": args.tiny,
      "rows": rows,
    },
  )


if __name__ == "__main__":
  main()
