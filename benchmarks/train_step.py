r"""Train-step time of CLIP ViT-B/16: vlp_jax vs open_clip (PyTorch), side by side.

  python benchmarks/train_step.py [--batch_size=8] [--steps=10] [--variant=B/16]

Both do the same work per step: forward of both towers on `batch_size` 224 px images
and 77-token texts, symmetric InfoNCE, backward, global-norm clipping and an AdamW
update. Each runs in its own subprocess. Prints a table and writes JSON to
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
  else:
    step, params, framework = common.torch_clip_step(args.variant, args.batch_size)
  times = common.time_calls(step, args.steps, args.warmup)
  return {"framework": framework, "params": params, "times": times}


def main() -> None:
  parser = common.create_parser(__doc__.split("\n")[0], steps=10, results_name="train_step.json")
  parser.add_argument("--only", choices=["jax", "torch"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.only:
    common.emit(measure(args))
    return

  shared = common.shared_flags(args)
  results = {
    name: common.run_isolated(__file__, [*shared, f"--only={name}"]) for name in ("jax", "torch")
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
  print(f"ratio vlp_jax / open_clip: {ratio:.2f}x (target <= 1.0x)")
  common.write_json(
    args.out,
    {
      "benchmark": "train_step",
      "variant": args.variant,
      "batch_size": args.batch_size,
      "results": results,
      "ratio_jax_over_torch": ratio,
    },
  )


if __name__ == "__main__":
  main()
