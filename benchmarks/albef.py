r"""Train-step time and achieved FLOP/s of ALBEF ViT-B/16 + BERT-base against CLIP ViT-B/16.

  python benchmarks/albef.py [--batch_size=8] [--steps=3] [--variants=albef]
  python benchmarks/albef.py --smoke   # tiny models, one step: CI checks that it runs

Each variant runs in its own subprocess through the trainer's compiled step (AdamW,
clipping, the non-finite guard): "clip" is configs/clip_vitb16.py (224 px, 77 tokens),
"albef" configs/albef_vitb16.py (256 px, 30 tokens, random 15% MLM masking, queue
65,536). FLOPs come from XLA's cost analysis of the compiled step (rematerialised work
included), so FLOP/s = FLOPs / median step time compares how well each program uses the
machine. "cmask" is that ALBEF with configs/cmask_vitb16.py's masking agent choosing every
mask (the agent's overhead over "albef" is the target: <= 25%). Prints a table
and writes benchmarks/results/albef.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import common

# The vocabulary and special ids of bert-base-uncased.
BERT_VOCAB, BERT_CLS, BERT_SEP, BERT_MASK = 30522, 101, 102, 103


def clip_config(batch_size: int, smoke: bool):
  from vlp_jax.configs import clip_vitb16

  config = clip_vitb16.get_config(f"batch_size={batch_size}")
  if smoke:
    _shrink(config)
  return config


def albef_config(batch_size: int, smoke: bool):
  from vlp_jax.configs import albef_vitb16

  config = albef_vitb16.get_config(f"batch_size={batch_size}")
  if smoke:
    _shrink(config)
    with config.unlocked():
      config.albef.fusion_layer = 1
      config.albef.queue_size = 4 * batch_size
  return config


def _shrink(config) -> None:
  with config.unlocked():
    config.model.image.variant = "mu/8"
    config.model.image.image_size = 32
    config.model.image.depth = 1
    config.model.text.width = 64
    config.model.text.depth = 2
    config.model.text.num_heads = 2
    config.model.text.mlp_dim = 128
    config.model.text.context_length = 16
    config.model.embed_dim = 32


def cmask_config(batch_size: int, smoke: bool):
  """configs/cmask_vitb16.py mid-curriculum would mix agent and random masks; the
  benchmark measures the agent's full share (curriculum_steps 0)."""
  from vlp_jax.configs import cmask_vitb16

  config = cmask_vitb16.get_config(f"batch_size={batch_size},curriculum_steps=0")
  if smoke:
    _shrink(config)
    with config.unlocked():
      config.albef.fusion_layer = 1
      config.albef.queue_size = 4 * batch_size
      config.cmask.agent_layers = 1
  return config


# Variant name -> config builder (batch_size, smoke).
VARIANTS: dict[str, Callable] = {"clip": clip_config, "albef": albef_config, "cmask": cmask_config}


def random_batch(config, method, vocab: int):
  """Random uint8 images and BERT-style captions ([CLS] words [SEP] padding)."""
  import numpy as np

  rng = np.random.default_rng(0)
  size, context = method.model.visual.image_size, config.model.text.context_length
  tokens = np.zeros((config.batch_size, context), np.int32)
  for row, length in enumerate(rng.integers(context // 2, context - 1, config.batch_size)):
    tokens[row, 0], tokens[row, length + 1] = BERT_CLS, BERT_SEP
    tokens[row, 1 : length + 1] = rng.integers(1000, vocab, length)
  images = rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8)
  return {"image": images, "tokens": tokens}


def measure(args: argparse.Namespace) -> dict:
  sys.path.insert(0, common.ROOT)
  import jax

  from vlp_jax import experiment, progress, sharding, trainer

  config = VARIANTS[args.only](args.batch_size, args.smoke)
  mesh = sharding.create_mesh({"data": -1})
  if config.method == "contrastive":
    tokenizer = common.tokenizer_spec(config)
    vocab = common.VOCAB_SIZE
  else:
    context = config.model.text.context_length
    tokenizer = experiment.TokenizerSpec(BERT_VOCAB, 0, context, BERT_CLS, BERT_SEP, BERT_MASK)
    vocab = BERT_VOCAB
  parts = experiment.create_step_parts(config, mesh, tokenizer, 1000)
  state, state_sharding = trainer.create_train_state(parts.method, parts.tx, mesh, seed=0)
  compiled = trainer.compile_step(parts, state_sharding).lower(state, parts.abstract_batch())
  compiled = compiled.compile()
  flops = progress.compiled_flops(compiled, mesh.size)
  batch = sharding.host_to_global(random_batch(config, parts.method, vocab), mesh)
  step = common.jax_step_runner(state, compiled, batch)
  times = common.time_calls(step, args.steps, args.warmup)
  return {
    "variant": args.only,
    "framework": f"vlp_jax (jax {jax.__version__})",
    "params": sum(x.size for x in jax.tree.leaves(state.params)),
    "flops_per_step": flops,
    "times": times,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--variants", default="albef", help=f"Comma list of {sorted(VARIANTS)}.")
  parser.add_argument("--smoke", action="store_true", help="Tiny models, one step.")
  parser.add_argument("--out", default=os.path.join(common.ROOT, "benchmarks/results/albef.json"))
  parser.add_argument("--only", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.smoke:
    args.steps, args.warmup = 1, 0
  if args.only:
    common.emit(measure(args))
    return

  names = ["clip", *[v for v in args.variants.split(",") if v and v != "clip"]]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    sys.exit(f"--variants: {unknown} not in {sorted(VARIANTS)}")
  flags = [f"--batch_size={args.batch_size}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
  flags += ["--smoke"] if args.smoke else []
  results = {}
  for name in names:
    r = results[name] = common.run_isolated(__file__, [*flags, f"--only={name}"])
    r["median_s"] = common.median(r["times"])
    r["flop_per_s"] = r["flops_per_step"] / r["median_s"] if r["flops_per_step"] else None
    # At once: a later variant that dies (out of memory on a shared machine) loses the rest.
    print(f"{name}: {r['times']} s, {(r['flops_per_step'] or 0) / 1e9:.1f} GFLOP", flush=True)
  clip = results["clip"]
  size = "tiny (--smoke)" if args.smoke else "B/16"
  print(f"{size}, batch {args.batch_size}, {args.steps} timed steps, {os.cpu_count()} CPUs")
  print(
    "| variant | params | GFLOP/step | median step (s) | GFLOP/s | vs CLIP step | FLOP/s vs CLIP |"
  )
  print("|---|---|---|---|---|---|---|")
  for name, r in results.items():
    rate = r["flop_per_s"] / clip["flop_per_s"] if r["flop_per_s"] and clip["flop_per_s"] else 0
    print(
      f"| {name} | {r['params'] / 1e6:.1f}M | {(r['flops_per_step'] or 0) / 1e9:.1f} | "
      f"{r['median_s']:.2f} | {(r['flop_per_s'] or 0) / 1e9:.1f} | "
      f"{r['median_s'] / clip['median_s']:.2f}x | {rate:.2f}x |"
    )
  if "albef" in results and "cmask" in results:
    overhead = results["cmask"]["median_s"] / results["albef"]["median_s"] - 1
    print(f"agent overhead: CMask step {100 * overhead:+.0f}% over ALBEF's")
  print("targets: ALBEF FLOP/s >= 0.9x CLIP's; the agent's overhead <= 25% of ALBEF's step")
  common.write_json(
    args.out,
    {
      "benchmark": "albef",
      "batch_size": args.batch_size,
      "smoke": args.smoke,
      "results": results,
    },
  )


if __name__ == "__main__":
  main()
