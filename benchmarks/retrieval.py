r"""Zero-shot retrieval metrics at COCO-test size: time and peak memory on this machine.

  python benchmarks/retrieval.py [--steps=3] [--num_images=5000] [--captions_per_image=5]

Random normalised embeddings (25,000 captions x 5,000 images, 512-d, as COCO's 5k test
split with ViT-B/16 embeddings) scored by vlp_jax's blockwise recall@1/5/10, and by
CLIP_benchmark's own `zeroshot_retrieval.evaluate` (the full score matrix in torch) fed
the same embeddings. Each runs in its own subprocess; peak memory is the growth of the
process's resident set during the call (VmHWM after resetting it), and for vlp_jax also
numpy's own peak allocation (tracemalloc). Prints a table; writes
benchmarks/results/retrieval.json. CLIP_benchmark needs `pip install clip-benchmark`.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

import common
import numpy as np

KS = (1, 5, 10)
CLIP_BENCHMARK = "clip_benchmark"
VLP_JAX = "vlp_jax"


def embeddings(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)

  def unit(n: int) -> np.ndarray:
    x = np.empty((n, args.dim), np.float32)
    for start in range(0, n, 4096):  # in chunks: setup must not set the memory peak
      chunk = rng.standard_normal((min(4096, n - start), args.dim), np.float32)
      x[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return x

  images = unit(args.num_images)
  text_to_image = np.repeat(np.arange(args.num_images), args.captions_per_image)
  # Captions lie near their image, so recall is neither 0 nor 1.
  texts = unit(len(text_to_image))
  texts += 0.12 * images[text_to_image]
  texts /= np.linalg.norm(texts, axis=1, keepdims=True)
  return images, texts, text_to_image


def _status(field: str) -> int:
  """A field of /proc/self/status in bytes (Linux)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set


def measure_call(fn, steps: int, warmup: int) -> dict:
  for _ in range(warmup):
    fn()
  times, peaks = [], []
  for _ in range(steps):
    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    metrics = fn()
    times.append(time.perf_counter() - start)
    peaks.append(_status("VmHWM") - before)
  return {"times_s": times, "peak_rss_growth_bytes": max(peaks), "metrics": metrics}


def run_vlp_jax(args: argparse.Namespace) -> dict:
  sys.path.insert(0, common.ROOT)
  from vlp_jax.evaluation.retrieval import BLOCK_ELEMENTS, retrieval_metrics

  images, texts, text_to_image = embeddings(args)
  result = measure_call(
    lambda: retrieval_metrics(images, texts, text_to_image, KS), args.steps, args.warmup
  )
  tracemalloc.start()
  retrieval_metrics(images, texts, text_to_image, KS)
  result["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  result["block_elements"] = BLOCK_ELEMENTS
  return result


def run_clip_benchmark(args: argparse.Namespace) -> dict:
  import clip_benchmark
  import torch
  from clip_benchmark.metrics import zeroshot_retrieval

  images, texts, text_to_image = embeddings(args)

  class LookupModel(torch.nn.Module):
    def encode_image(self, rows):
      return torch.from_numpy(images)[rows[:, 0]]

    def encode_text(self, rows):
      return torch.from_numpy(texts)[rows[:, 0]]

  # Its dataloader yields (images, captions) batches; a batch of 64 images as its default.
  first = np.searchsorted(text_to_image, np.arange(len(images)))
  loader = []
  for start in range(0, len(images), 64):
    rows = range(start, min(start + 64, len(images)))
    captions = [[str(t) for t in range(first[i], first[i] + args.captions_per_image)] for i in rows]
    loader.append((torch.tensor(list(rows)).reshape(-1, 1), captions))

  def tokenizer(captions):
    return torch.tensor([[int(c)] for c in captions])

  def call():
    return zeroshot_retrieval.evaluate(
      LookupModel(), loader, tokenizer, "cpu", amp=False, recall_k_list=list(KS)
    )

  result = measure_call(call, args.steps, args.warmup)
  result["version"] = getattr(clip_benchmark, "__version__", "1.6.2")
  return result


def main() -> None:
  parser = common.create_parser(__doc__.split("\n")[0], steps=3, results_name="retrieval.json")
  parser.add_argument("--num_images", type=int, default=5000)
  parser.add_argument("--captions_per_image", type=int, default=5)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--case", help=argparse.SUPPRESS)
  parser.set_defaults(warmup=1)
  args = parser.parse_args()
  if args.case:
    common.emit(run_vlp_jax(args) if args.case == VLP_JAX else run_clip_benchmark(args))
    return

  flags = [
    f"--steps={args.steps}",
    f"--warmup={args.warmup}",
    f"--num_images={args.num_images}",
    f"--captions_per_image={args.captions_per_image}",
    f"--dim={args.dim}",
  ]
  results = {VLP_JAX: common.run_isolated(__file__, [*flags, f"--case={VLP_JAX}"])}
  # CLIP_benchmark takes over a minute per call here: one call, without warm-up.
  once = [f for f in flags if not f.startswith(("--steps", "--warmup"))]
  once += ["--steps=1", "--warmup=0", f"--case={CLIP_BENCHMARK}"]
  results[CLIP_BENCHMARK] = common.run_isolated(__file__, once)
  num_texts = args.num_images * args.captions_per_image
  full_matrix = num_texts * args.num_images * 4
  print(
    f"Retrieval metrics (R@1/5/10 both ways), {num_texts:,} captions x {args.num_images:,} "
    f"images, {args.dim}-d, vlp_jax median of {args.steps}, CLIP_benchmark one call; a full "
    "float32 score matrix is "
    f"{full_matrix / 2**20:.0f} MiB"
  )
  print("| implementation | time (s) | peak memory growth (MiB) |")
  print("|---|---|---|")
  for case, r in results.items():
    r["time_s"] = common.median(r["times_s"])
    print(f"| {case} | {r['time_s']:.2f} | {r['peak_rss_growth_bytes'] / 2**20:.0f} |")
  ours, theirs = results[VLP_JAX], results[CLIP_BENCHMARK]
  print(
    f"vlp_jax numpy peak allocation (tracemalloc): {ours['tracemalloc_peak_bytes'] / 2**20:.0f} MiB"
  )
  same = all(abs(ours["metrics"][k] - v) < 1e-6 for k, v in theirs["metrics"].items())
  print(f"metrics identical to CLIP_benchmark's: {same}")
  common.write_json(
    args.out,
    {
      "benchmark": "retrieval",
      "num_images": args.num_images,
      "num_texts": num_texts,
      "dim": args.dim,
      "full_score_matrix_bytes": full_matrix,
      "metrics_identical": same,
      "results": results,
    },
  )


if __name__ == "__main__":
  main()
