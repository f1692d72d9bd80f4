r"""Train-step time of CLIP ViT-B/16: vlp_jax vs open_clip (PyTorch) vs a plain Flax CLIP.

  python benchmarks/train_step.py [--batch_size=8] [--steps=10] [--variant=B/16]

Both do the same work per step: forward of both towers on `batch_size` 224 px images
and 77-token texts, symmetric InfoNCE, backward, global-norm clipping and an AdamW
update (the plain Flax CLIP, benchmarks/plain_flax_clip.py, is flax.linen's own layers
with the same shapes: the bar a hand-written model sets). Each runs in its own subprocess. Prints a table and writes JSON to
benchmarks/results/train_step.json. Needs `pip install -r benchmarks/requirements.txt`.
"""

from __future__ import annotations

import argparse

import common


def measure(args: argparse.Namespace) -> dict:
  if args.only == "jax":
    import jax

    state, step_fn, _, batch = common.jax_clip(args.variant, args.batch_size)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    step = common.jax_step_runner(state, step_fn, batch)
    framework = f"vlp_jax (jax {jax.__version__})"
  elif args.only == "flax":
    import flax
    import jax
    import numpy as np
    import plain_flax_clip

    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size, 224, 224, 3), dtype=np.float32)
    tokens = rng.integers(1, common.VOCAB_SIZE, (args.batch_size, common.CONTEXT), dtype=np.int32)
    step, params = plain_flax_clip.train_step(args.variant, common.VOCAB_SIZE, images, tokens)
    framework = f"plain Flax CLIP (flax {flax.__version__}, jax {jax.__version__})"
  else:
    step, params, framework = common.torch_clip_step(args.variant, args.batch_size)
  times = common.time_calls(step, args.steps, args.warmup)
  return {"framework": framework, "params": params, "times": times}


def main() -> None:
  parser = common.create_parser(__doc__.split("\n")[0], steps=10, results_name="train_step.json")
  parser.add_argument("--only", choices=["jax", "torch", "flax"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.only:
    common.emit(measure(args))
    return

  shared = common.shared_flags(args)
  results = {
    name: common.run_isolated(__file__, [*shared, f"--only={name}"])
    for name in ("jax", "torch", "flax")
  }
  for result in results.values():
    result["median_s"] = common.median(result["times"])
  ratio = results["jax"]["median_s"] / results["torch"]["median_s"]
  print(f"CLIP {args.variant}, batch {args.batch_size}, 224 px, {args.steps} timed steps")
  print("| framework | params | median step (s) | min (s) |\n|---|---|---|---|")
  for r in results.values():
    print(
      f"| {r['framework']} | {r['params'] / 1e6:.1f}M | {r['median_s']:.3f} | {min(r['times']):.3f} |"
    )
  ratio_flax = results["jax"]["median_s"] / results["flax"]["median_s"]
  print(f"ratio vlp_jax / open_clip: {ratio:.2f}x (target <= 0.7x)")
  print(f"ratio vlp_jax / plain Flax: {ratio_flax:.2f}x (target <= 0.8x)")
  common.write_json(
    args.out,
    {
      "benchmark": "train_step",
      "variant": args.variant,
      "batch_size": args.batch_size,
      "results": results,
      "ratio_jax_over_torch": ratio,
      "ratio_jax_over_plain_flax": ratio_flax,
    },
  )


if __name__ == "__main__":
  main()
