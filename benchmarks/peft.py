r"""What freezing buys: train-step time and optimizer memory of ViT-B/16 + BERT-base
(configs/lit_b16_bert.py, random weights) under each parameter-efficient preset.

  python benchmarks/peft.py [--batch_size=8] [--steps=5] [--presets=all,lit,lilt,lora]

Each preset runs in its own subprocess on the same random batch (224 px images, 32
tokens). Frozen parameters get no gradient computation (stop_gradient) and no optimizer
state (optax.multi_transform), so LiT skips the image tower's backward pass entirely.
Prints a table and writes JSON to benchmarks/results/peft.json.
"""

from __future__ import annotations

import argparse
import sys

import common


def measure(args: argparse.Namespace) -> dict:
  sys.path.insert(0, common.ROOT)
  import jax

  from vlp_jax import peft
  from vlp_jax.configs import lit_b16_bert

  config = lit_b16_bert.get_config(f"preset={args.only},batch_size={args.batch_size}")
  state, step_fn, _, batch = common.jax_step(config, vocab_size=30_522)
  labels = None if args.only == "all" else peft.labeler(config.peft)
  trainable, total = peft.count(state.params, labels)
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  times = common.time_calls(common.jax_step_runner(state, step_fn, batch), args.steps, args.warmup)
  return {"trainable": trainable, "total": total, "opt_state_bytes": opt_bytes, "times": times}


def main() -> None:
  parser = common.create_parser(__doc__.split("\n")[0], steps=5, results_name="peft.json")
  parser.add_argument("--presets", default="all,lit,lilt,lora")
  parser.add_argument("--only", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.only:
    common.emit(measure(args))
    return
  shared = common.shared_flags(args)
  presets = args.presets.split(",")
  results = {p: common.run_isolated(__file__, [*shared, f"--only={p}"]) for p in presets}
  base = results.get("all")
  print(f"ViT-B/16 + BERT-base, batch {args.batch_size}, {args.steps} timed steps")
  print("| preset | trainable | share | optimizer state | median step (s) | vs all |")
  print("|---|---|---|---|---|---|")
  for name, r in results.items():
    r["median_s"] = common.median(r["times"])
    speedup = f"{base['median_s'] / r['median_s']:.2f}x" if base else "-"
    print(
      f"| {name} | {r['trainable'] / 1e6:.1f}M | {r['trainable'] / r['total']:.1%} | "
      f"{r['opt_state_bytes'] / 2**20:.0f} MiB | {r['median_s']:.3f} | {speedup} |"
    )
  common.write_json(
    args.out, {"benchmark": "peft", "batch_size": args.batch_size, "results": results}
  )


if __name__ == "__main__":
  main()
