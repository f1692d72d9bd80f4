r"""Quality check: the demo trained with each masking strategy for the same steps.

  python benchmarks/masking_quality.py [--steps=600] [--kinds=none,random,cluster,kmeans]

Runs `train.py --config=configs/demo.py:masking=<kind>` once per strategy in fresh
workdirs, then prints held-out retrieval R@1 and wall time per strategy, writes
benchmarks/results/masking_quality.json and a plot of the loss curves to
docs/masking_loss_curves.png (needs matplotlib, see benchmarks/requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common


def train(kind: str, steps: int, workdir: str, cache_dir: str) -> dict:
  command = [
    sys.executable,
    os.path.join(common.ROOT, "train.py"),
    f"--config={os.path.join(common.ROOT, 'configs/demo.py')}:masking={kind},steps={steps}",
    f"--workdir={workdir}",
    f"--config.data.cache_dir={cache_dir}",
  ]
  start = time.time()
  proc = subprocess.run(command, capture_output=True, text=True, cwd=common.ROOT)
  wall = time.time() - start
  if proc.returncode:
    sys.exit(f"training with masking={kind} failed:\n{proc.stderr[-4000:]}")
  with open(os.path.join(workdir, "eval_retrieval.json")) as f:
    metrics = json.load(f)["metrics"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    curve = {e["step"]: e["loss"] for e in map(json.loads, f)}
  return {"wall_s": wall, "metrics": metrics, "loss_curve": sorted(curve.items())}


def plot(results: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for kind, r in results.items():
    steps, losses = zip(*r["loss_curve"])
    label = f"{kind} (R@1 t->i {100 * r['metrics']['image_retrieval_recall@1']:.1f})"
    ax.plot(steps, losses, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (InfoNCE)")
  ax.set_yscale("log")
  ax.set_title("Demo CLIP on the built-in dataset, by masking strategy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--kinds", default="none,random,cluster,kmeans")
  parser.add_argument("--cache_dir", default="", help="Built-in dataset cache (default: ~/.cache).")
  parser.add_argument(
    "--out", default=os.path.join(common.ROOT, "benchmarks/results/masking_quality.json")
  )
  parser.add_argument("--plot", default=os.path.join(common.ROOT, "docs/masking_loss_curves.png"))
  args = parser.parse_args()
  results = {}
  with tempfile.TemporaryDirectory() as root:
    for kind in args.kinds.split(","):
      results[kind] = train(kind, args.steps, os.path.join(root, kind), args.cache_dir)
      m = results[kind]["metrics"]
      print(
        f"{kind}: R@1 t->i {100 * m['image_retrieval_recall@1']:.1f} "
        f"i->t {100 * m['text_retrieval_recall@1']:.1f}, {results[kind]['wall_s']:.0f} s",
        flush=True,
      )
  print(f"Demo, {args.steps} steps, held-out retrieval on 1,000 unseen compositions")
  print("| masking | text->image R@1 | image->text R@1 | R@5 (t->i) | wall time (s) |")
  print("|---|---|---|---|---|")
  for kind, r in results.items():
    m = r["metrics"]
    print(
      f"| {kind} | {100 * m['image_retrieval_recall@1']:.1f} | "
      f"{100 * m['text_retrieval_recall@1']:.1f} | {100 * m['image_retrieval_recall@5']:.1f} | "
      f"{r['wall_s']:.0f} |"
    )
  common.write_json(
    args.out, {"benchmark": "masking_quality", "steps": args.steps, "results": results}
  )
  plot(results, args.plot)


if __name__ == "__main__":
  main()
