r"""Train-step time of CLIP ViT-B/16: vlp_jax vs open_clip (PyTorch), side by side.

  python benchmarks/train_step.py [--batch_size=8] [--steps=10] [--variant=B/16]

Each framework runs in its own subprocess (TensorFlow, which vlp_jax's trainer imports,
must not be loaded before torchvision). Both do the same work per step: forward of both
towers on `batch_size` 224 px images and 77-token texts, symmetric InfoNCE, backward,
global-norm clipping and an AdamW update. Prints a table and writes JSON to
benchmarks/results/train_step.json. Needs `pip install -r benchmarks/requirements.txt`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPEN_CLIP_NAMES = {"B/16": "ViT-B-16", "B/32": "ViT-B-32", "L/14": "ViT-L-14"}
VOCAB_SIZE = 49408  # CLIP's BPE vocabulary, as open_clip's models use.
CONTEXT = 77


def time_steps(step, steps: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def run_jax(args: argparse.Namespace) -> dict:
  sys.path.insert(0, ROOT)
  import jax
  import numpy as np

  from configs import clip_vitb16
  from vlp_jax import optim, sharding, trainer
  from vlp_jax.models import create_model

  config = clip_vitb16.get_config(f"variant={args.variant},batch_size={args.batch_size}")
  model = create_model(config.model, VOCAB_SIZE)
  schedule = optim.create_schedule(config.optim, total_steps=1000)
  tx = optim.create_optimizer(config.optim, schedule)
  mesh = sharding.create_mesh({"data": -1})
  state, state_sharding = trainer.create_train_state(model, tx, mesh, seed=0)
  step_fn = trainer.compile_train_step(model, tx, schedule, mesh, state_sharding)
  rng = np.random.default_rng(0)
  size = config.model.image.image_size
  batch = sharding.host_to_global(
    {
      "image": rng.integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8),
      "tokens": rng.integers(1, VOCAB_SIZE, (args.batch_size, CONTEXT), dtype=np.int32),
    },
    mesh,
  )
  holder = {"state": state}

  def step():
    holder["state"], metrics = step_fn(holder["state"], batch)
    jax.block_until_ready(metrics)

  times = time_steps(step, args.steps, args.warmup)
  params = sum(x.size for x in jax.tree.leaves(holder["state"].params))
  return {"framework": f"vlp_jax (jax {jax.__version__})", "params": params, "times": times}


def run_torch(args: argparse.Namespace) -> dict:
  import open_clip
  import torch

  torch.manual_seed(0)
  model = open_clip.create_model(OPEN_CLIP_NAMES[args.variant])
  model.train()
  loss_fn = open_clip.loss.ClipLoss()
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
  no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
  optimizer = torch.optim.AdamW(
    [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
    lr=5e-4,
    betas=(0.9, 0.98),
    eps=1e-6,
  )
  images = torch.randn(args.batch_size, 3, 224, 224)
  texts = torch.randint(1, VOCAB_SIZE, (args.batch_size, CONTEXT))

  def step():
    optimizer.zero_grad(set_to_none=True)
    out = model(images, texts)
    image_features, text_features, logit_scale = (
      (out["image_features"], out["text_features"], out["logit_scale"])
      if isinstance(out, dict)
      else out[:3]
    )
    loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

  times = time_steps(step, args.steps, args.warmup)
  params = sum(p.numel() for p in model.parameters())
  return {
    "framework": f"open_clip {open_clip.__version__} (torch {torch.__version__}, "
    f"{torch.get_num_threads()} threads)",
    "params": params,
    "times": times,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--variant", default="B/16", choices=sorted(OPEN_CLIP_NAMES))
  parser.add_argument("--only", choices=["jax", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/train_step.json"))
  args = parser.parse_args()

  if args.only:
    result = run_jax(args) if args.only == "jax" else run_torch(args)
    print("RESULT " + json.dumps(result))
    return

  results = {}
  for name in ("jax", "torch"):
    command = [sys.executable, __file__, f"--only={name}"] + [
      f"--{k}={v}" for k, v in vars(args).items() if k not in ("only", "out")
    ]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
      sys.exit(f"{name} benchmark failed:\n{proc.stderr[-4000:]}")
    results[name] = json.loads(lines[-1][len("RESULT ") :])

  for r in results.values():
    r["median_s"] = statistics.median(r["times"])
  ratio = results["jax"]["median_s"] / results["torch"]["median_s"]
  print(f"CLIP {args.variant}, batch {args.batch_size}, 224 px, {args.steps} timed steps")
  print("| framework | params | median step (s) | min (s) |\n|---|---|---|---|")
  for r in results.values():
    print(
      f"| {r['framework']} | {r['params'] / 1e6:.1f}M | {r['median_s']:.3f} | {min(r['times']):.3f} |"
    )
  print(f"ratio vlp_jax / open_clip: {ratio:.2f}x (target <= 1.0x)")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(
      {
        "benchmark": "train_step",
        "variant": args.variant,
        "batch_size": args.batch_size,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "results": results,
        "ratio_jax_over_torch": ratio,
      },
      f,
      indent=2,
    )
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
