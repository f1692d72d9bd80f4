r"""Cost and speed-up of patch masking on CLIP ViT-B/16, and open_clip's patch dropout.

  python benchmarks/masking.py [--batch_size=8] [--steps=5]

One run measures, on this machine:
- the full vlp_jax train step with no masking, random masking at 0.5 and 0.75, cluster
  masking (anchors) and k-means cluster masking (target 0.5, minimum 0.3), each with
  both keep rules: "reference" (the encoder gets floor(0.7 L) = 137 tokens) and "target"
  (round(0.5 L) = 98, random 0.5's count);
- the mask computation alone (jitted, same batch) as a share of its masked step;
- open_clip's ViT-B-16 step with `force_patch_dropout=0.5`, beside our random 0.5 step.
Each configuration runs in its own subprocess. Prints a table; writes
benchmarks/results/masking.json. Needs `pip install -r benchmarks/requirements.txt`.
"""

from __future__ import annotations

import argparse

import common

JAX_CASES = {
  "none": {"kind": "none"},
  "random 0.5": {"kind": "random", "ratio": 0.5},
  "random 0.75": {"kind": "random", "ratio": 0.75},
  **{
    f"{kind} 0.5 (min 0.3), keep={keep}": {
      "kind": kind,
      "ratio": 0.5,
      "min_ratio": 0.3,
      "keep": keep,
    }
    for kind in ("cluster", "kmeans")
    for keep in ("reference", "target")
  },
}
TORCH_CASE = "open_clip patch dropout 0.5"


def measure(args: argparse.Namespace) -> dict:
  if args.case == TORCH_CASE:
    step, _, framework = common.torch_clip_step(args.variant, args.batch_size, patch_dropout=0.5)
    return {"framework": framework, "step_times": common.time_calls(step, args.steps, args.warmup)}
  import jax

  state, step_fn, masker, batch = common.jax_clip(
    args.variant, args.batch_size, **JAX_CASES[args.case]
  )
  step = common.jax_step_runner(state, step_fn, batch)
  result = {
    "framework": f"vlp_jax (jax {jax.__version__})",
    "tokens_kept": masker.num_keep,
    "step_times": common.time_calls(step, args.steps, args.warmup),
  }
  if args.case != "none":
    compute_mask = jax.jit(masker.__call__)
    rngs = iter(jax.random.split(jax.random.PRNGKey(0), 100))
    result["mask_times"] = common.time_calls(
      lambda: jax.block_until_ready(compute_mask(next(rngs), batch["image"])),
      args.steps * 4,
      args.warmup,
    )
  return result


def main() -> None:
  parser = common.create_parser(__doc__.split("\n")[0], steps=5, results_name="masking.json")
  parser.add_argument("--case", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:
    common.emit(measure(args))
    return

  shared = common.shared_flags(args)
  results = {}
  for case in [*JAX_CASES, TORCH_CASE]:
    results[case] = common.run_isolated(__file__, [*shared, f"--case={case}"])
    results[case]["step_s"] = common.median(results[case]["step_times"])
    if "mask_times" in results[case]:
      results[case]["mask_s"] = common.median(results[case]["mask_times"])
  unmasked = results["none"]["step_s"]
  print(f"CLIP {args.variant}, batch {args.batch_size}, 224 px, median of {args.steps} steps")
  print("| masking | tokens kept | step (s) | vs no masking | mask compute | share of step |")
  print("|---|---|---|---|---|---|")
  for case, r in results.items():
    mask = (
      f"{1e3 * r['mask_s']:.1f} ms | {100 * r['mask_s'] / r['step_s']:.2f}%"
      if "mask_s" in r
      else "- | -"
    )
    kept = r.get("tokens_kept", 98)
    print(f"| {case} | {kept} | {r['step_s']:.3f} | {r['step_s'] / unmasked:.2f}x | {mask} |")
  ours, theirs = results["random 0.5"]["step_s"], results[TORCH_CASE]["step_s"]
  print(f"random 0.5: vlp_jax / open_clip patch dropout 0.5 = {ours / theirs:.2f}x")
  target_vs_random = {
    kind: results[f"{kind} 0.5 (min 0.3), keep=target"]["step_s"] / ours
    for kind in ("cluster", "kmeans")
  }
  for kind, ratio in target_vs_random.items():
    print(f"{kind} keep=target / random 0.5 (same token count) = {ratio:.2f}x")
  common.write_json(
    args.out,
    {
      "benchmark": "masking",
      "variant": args.variant,
      "batch_size": args.batch_size,
      "results": results,
      "masked_step_ratio_vs_unmasked": {c: r["step_s"] / unmasked for c, r in results.items()},
      "random_0.5_vs_open_clip_patch_dropout_0.5": ours / theirs,
      "keep_target_vs_random_0.5": target_vs_random,
    },
  )


if __name__ == "__main__":
  main()
