r"""Compile time and step time of the CLIP train step: unrolled vs scanned blocks.

  python benchmarks/compile_time.py [--variants=B/16,L/14] [--batch_size=2] [--steps=2]

For each ViT variant (with configs/clip_vitb16.py's 12-block text tower) and each layout
(config.model.scan_layers off / on), in a fresh process each (no compilation cache):
the time to lower and to compile trainer.train_step, ahead of time as the trainer does,
and the median time of `steps` steps after `warmup`. Prints a table and writes JSON to
benchmarks/results/compile_time.json. Target (issue 16): L/14's compile time with
scan_layers <= 0.4x unrolled.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import common

LAYOUTS = ("unrolled", "scanned")


def _seconds(value: float | None) -> str:
  return "-" if value is None else f"{value:.2f}"  # None: --compile_only ran no steps.


def measure(args: argparse.Namespace) -> dict:
  import jax

  jax.config.update("jax_enable_compilation_cache", False)  # Every compile is a real one.
  sys.path.insert(0, common.ROOT)
  import numpy as np

  from vlp_jax import checkpointing, experiment, sharding, trainer
  from vlp_jax.configs import clip_vitb16

  scan = args.only == "scanned"
  config = clip_vitb16.get_config(f"variant={args.variant},batch_size={args.batch_size}")
  with config.unlocked():
    config.model.scan_layers = scan
  mesh = sharding.create_mesh({"data": -1})
  parts = experiment.create_step_parts(config, mesh, common.tokenizer_spec(config), 1000)
  # The layout is set on the built towers too, whether or not create_model reads the key.
  model = parts.method.model
  model = model.clone(
    visual=model.visual.clone(scan_layers=scan), text=model.text.clone(scan_layers=scan)
  )
  parts = dataclasses.replace(parts, method=dataclasses.replace(parts.method, model=model))
  if args.compile_only:  # Shapes only: no parameters in memory (L/14 + Adam: ~5 GB).
    abstract, state_sharding = trainer.abstract_train_state(parts.method, parts.tx, mesh, 0)
    state = checkpointing.abstract_with_shardings(abstract, state_sharding)
  else:
    state, state_sharding = trainer.create_train_state(parts.method, parts.tx, mesh, seed=0)
  rng = np.random.default_rng(0)
  size, context = model.visual.image_size, config.model.text.context_length
  batch = sharding.host_to_global(
    {
      "image": rng.integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8),
      "tokens": rng.integers(1, common.VOCAB_SIZE, (args.batch_size, context), dtype=np.int32),
    },
    mesh,
  )
  step_fn = trainer.compile_step(parts, state_sharding)
  start = time.perf_counter()
  lowered = step_fn.lower(state, batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  times = []
  if not args.compile_only:
    step = common.jax_step_runner(state, compiled, batch)
    times = common.time_calls(step, args.steps, args.warmup)
  return {
    "layout": args.only,
    "params": sum(x.size for x in jax.tree.leaves(state.params)),
    "lower_s": lowered_at - start,
    "compile_s": compiled_at - lowered_at,
    "times": times,
    "jax": jax.__version__,
  }


def main() -> None:
  parser = common.create_parser(__doc__.split("\n")[0], steps=2, results_name="compile_time.json")
  parser.add_argument("--variants", default="B/16,L/14", help="comma-separated ViT variants")
  parser.add_argument(
    "--compile_only", action="store_true", help="lower + compile on shapes only, no steps"
  )
  parser.add_argument("--only", choices=LAYOUTS, help=argparse.SUPPRESS)
  parser.set_defaults(batch_size=2, warmup=1)
  args = parser.parse_args()
  if args.only:
    common.emit(measure(args))
    return

  rows = []
  for variant in args.variants.split(","):
    args.variant = variant
    for layout in LAYOUTS:
      flags = [*common.shared_flags(args), f"--only={layout}"]
      result = common.run_isolated(__file__, flags + ["--compile_only"] * args.compile_only)
      times = result["times"]
      result.update(variant=variant, median_s=common.median(times) if times else None)
      rows.append(result)
      print(
        f"  {variant} {layout}: lower {result['lower_s']:.1f} s, compile "
        f"{result['compile_s']:.1f} s, step {_seconds(result['median_s'])} s",
        flush=True,
      )
  print(f"CLIP train step, batch {args.batch_size}, 224 px, 77 tokens, CPU")
  print("| variant | layout | params | lower (s) | compile (s) | median step (s) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['variant']} | {r['layout']} | {r['params'] / 1e6:.1f}M | {r['lower_s']:.1f} | "
      f"{r['compile_s']:.1f} | {_seconds(r['median_s'])} |"
    )
  ratios = {}
  for variant in args.variants.split(","):
    by_layout = {r["layout"]: r for r in rows if r["variant"] == variant}
    compile_ratio = by_layout["scanned"]["compile_s"] / by_layout["unrolled"]["compile_s"]
    step_ratio = None
    if not args.compile_only:
      step_ratio = by_layout["scanned"]["median_s"] / by_layout["unrolled"]["median_s"]
    ratios[variant] = {"compile": compile_ratio, "step": step_ratio}
    print(
      f"{variant}: scanned / unrolled compile {compile_ratio:.2f}x, step {_seconds(step_ratio)}x"
    )
  if "L/14" in ratios:
    print(f"target: L/14 compile scanned / unrolled <= 0.4x ({ratios['L/14']['compile']:.2f}x)")
  common.write_json(
    args.out,
    {
      "benchmark": "compile_time",
      "batch_size": args.batch_size,
      "steps": args.steps,
      "warmup": args.warmup,
      "compile_only": args.compile_only,
      "results": rows,
      "ratios": ratios,
    },
  )


if __name__ == "__main__":
  main()
