r"""Quality check: the demo trained with each masking strategy, at equal steps or equal
image-tower compute.

  python benchmarks/masking_quality.py [--budget=steps] [--steps=600]
  python benchmarks/masking_quality.py --budget=flops --steps=600 [--keep=reference,target]

`--budget=steps` trains every strategy for `--steps`. `--budget=flops` gives every
strategy the image-tower FLOPs of `--steps` unmasked steps: XLA's cost analysis of the
image tower's forward + backward at the strategy's kept-token count (unrolled, so every
block counts) sets steps = round(steps * flops(none) / flops(strategy)), so half the
patches masked trains about twice the steps. Cluster and k-means run once per keep rule
(`config.masking.keep`). Each run is `train.py --config=configs/demo.py:masking=<kind>,
steps=<its steps>` in a fresh workdir, so the learning-rate schedule spans that run's own
steps: linear warm-up for `--warmup_share` of them (the demo's 50 of 600), then cosine
decay to 0 at its last step. Evaluation (held-out retrieval and the built-in
compositional probe) runs once, at the end.

Prints a markdown table, writes benchmarks/results/masking_quality.json (steps) or
masking_quality_flops.json (flops) with the command, date, machine and commit, and a
plot of the loss curves (needs matplotlib, see benchmarks/requirements.txt).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import common

DEMO = os.path.join(common.ROOT, "vlp_jax/configs/demo.py")
KEEP_RULES = ("reference", "target")


@dataclasses.dataclass(frozen=True)
class Strategy:
  kind: str  # config.masking.kind
  keep: str = ""  # config.masking.keep for cluster / kmeans; "": the config's default.

  @property
  def name(self) -> str:
    return f"{self.kind} keep={self.keep}" if self.keep else self.kind

  def overrides(self) -> dict[str, Any]:
    """Config keys this strategy sets beyond configs/demo.py:masking=<kind>."""
    return {"masking.keep": self.keep} if self.keep else {}


def strategies(kinds: list[str], keep_rules: list[str]) -> list[Strategy]:
  """One strategy per kind; cluster and kmeans once per keep rule (none given: the default)."""
  out = []
  for kind in kinds:
    if kind in ("cluster", "kmeans") and keep_rules:
      out += [Strategy(kind, rule) for rule in keep_rules]
    else:
      out.append(Strategy(kind))
  return out


def budget_steps(base_steps: int, flops_none: float, flops: float) -> int:
  """Steps whose image-tower FLOPs match `base_steps` unmasked steps (at least one)."""
  return max(1, round(base_steps * flops_none / flops))


# Every run: evaluate once at the end (evaluation does not change training, only costs
# time), checkpoint only the last step, log the loss every 10 steps for the curves.
RUN_OVERRIDES = {"eval.every_steps": 0, "log_every_steps": 10}


def demo_config(strategy: Strategy, steps: int, extra: dict[str, Any] | None = None):
  """configs/demo.py as train.py builds it for `strategy` (plus `extra` keys)."""
  sys.path.insert(0, common.ROOT)
  from vlp_jax.configs import demo

  config = demo.get_config(f"masking={strategy.kind},steps={steps}")
  with config.unlocked():
    for key, value in {**strategy.overrides(), **(extra or {})}.items():
      *parents, leaf = key.split(".")
      node = config
      for parent in parents:
        node = node[parent]
      node[leaf] = value
  return config


FLOPS_METHOD = (
  "XLA cost analysis of jit(grad of the image tower's output sum w.r.t. its parameters) at "
  "the strategy's kept-token count, compiled unrolled (scan_layers=False) for this machine's "
  "backend; step_flops: the whole compiled train step (masking loops counted once)"
)


def _cost_flops(compiled: Any) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):  # Older JAX: one dict per program.
    analysis = analysis[0]
  return float(analysis["flops"])


def measure_flops(config, whole_step: bool = True) -> dict[str, Any]:
  """Per training step: kept image tokens, the image tower's forward + backward FLOPs and
  (`whole_step`) the whole train step's FLOPs, from XLA's cost analysis of programs
  compiled for `config`.

  XLA counts a loop body once, so the image tower is measured unrolled
  (config.model.scan_layers=False: the same arithmetic, every block counted). The whole
  step includes the text tower, loss, optimizer and the mask computation, whose
  bisection / Lloyd loops count once: a lower bound, reported for scale only.
  """
  sys.path.insert(0, common.ROOT)
  import jax
  import jax.numpy as jnp

  from vlp_jax import masking, sharding
  from vlp_jax.experiment import create_step_parts
  from vlp_jax.models import CLIP

  if config.method != "contrastive" or config.grad_accum_steps != 1:
    raise ValueError("measure_flops covers one-pass contrastive steps (the demo's)")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.scan_layers = False
  mesh = sharding.create_mesh({"data": -1})
  parts = create_step_parts(config, mesh, common.tokenizer_spec(config), config.total_steps)
  method = parts.method
  size = method.model.visual.image_size
  images = jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8)
  num_keep = method.masker.num_keep
  keep = None  # NoMasking: the tower gets every patch, no gather.
  if not isinstance(method.masker, masking.NoMasking):
    keep = jax.ShapeDtypeStruct((config.batch_size, num_keep), jnp.int32)
  params = jax.eval_shape(method.init, jax.random.PRNGKey(0))[0]

  def image_loss(visual, params, images, keep):
    variables = {"params": {**params, "visual": visual}}
    return method.model.apply(variables, images, keep, method=CLIP.encode_image).sum()

  def image_grads(params, images, keep):
    return jax.grad(image_loss)(params["visual"], params, images, keep)

  image_tower = jax.jit(image_grads).lower(params, images, keep).compile()
  result = {
    "image_tokens": num_keep + 1,  # The class token too.
    "num_patches": method.model.visual.num_patches,
    "image_tower_flops": _cost_flops(image_tower),
  }
  if whole_step:
    from vlp_jax import trainer  # Imports TensorFlow (clu): seconds, only when needed.

    state, state_sharding = trainer.abstract_train_state(method, parts.tx, mesh, config.seed)
    step = trainer.compile_step(parts, state_sharding).lower(state, parts.abstract_batch())
    result["step_flops"] = _cost_flops(step.compile()) * mesh.size
  return result


def warmup_steps(steps: int, share: float) -> int:
  """The run's linear warm-up: `share` of its own steps (the cosine decay takes the rest)."""
  return round(steps * share)


def train(strategy: Strategy, steps: int, workdir: str, cache_dir: str, warmup: int) -> dict:
  overrides = {
    **strategy.overrides(),
    **RUN_OVERRIDES,
    "checkpoint_every_steps": steps,
    "optim.warmup_steps": warmup,
  }
  if cache_dir:
    overrides["data.cache_dir"] = cache_dir
  command = [
    sys.executable,
    os.path.join(common.ROOT, "train.py"),
    f"--config={DEMO}:masking={strategy.kind},steps={steps}",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in overrides.items()),
  ]
  start = time.time()
  proc = subprocess.run(command, capture_output=True, text=True, cwd=common.ROOT)
  wall = time.time() - start
  if proc.returncode:
    sys.exit(f"training with {strategy.name} failed:\n{proc.stderr[-4000:]}")
  with open(os.path.join(workdir, "eval_retrieval.json")) as f:
    metrics = json.load(f)["metrics"]
  curve, mask_stats, rates = {}, {}, []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for entry in map(json.loads, f):
      if "loss" in entry:
        curve[entry["step"]] = entry["loss"]
        mask_stats = {k: v for k, v in entry.items() if k.startswith("mask/")}
        rates.append(entry.get("examples_per_sec", 0.0))
  batch_size = demo_config(strategy, steps).batch_size
  return {
    "steps": steps,
    "warmup_steps": overrides["optim.warmup_steps"],
    "wall_s": wall,
    # Median over the log intervals after the first (which holds the first step's warm-up).
    "train_steps_per_s": statistics.median(rates[1:] or rates) / batch_size,
    "metrics": metrics,
    "compositional": compositional_metrics(workdir),
    "last_mask_stats": mask_stats,
    "loss_curve": sorted(curve.items()),
  }


def compositional_metrics(workdir: str) -> dict[str, float]:
  """The built-in compositional probe's metrics from the run's eval/ results."""
  found = {}
  for folder, _, files in os.walk(os.path.join(workdir, "eval")):
    for name in files:
      if name.endswith(".json") and "compositional" in os.path.join(folder, name):
        with open(os.path.join(folder, name)) as f:
          found.update(json.load(f).get("metrics", {}))
  return found


def machine() -> dict[str, Any]:
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:
    pass
  return {"cpu_model": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def git_commit() -> dict[str, Any]:
  def git(*args: str) -> str:
    return subprocess.run(
      ["git", *args], capture_output=True, text=True, cwd=common.ROOT
    ).stdout.strip()

  # Others may have uncommitted edits in the shared tree: name the ones the runs import.
  dirty = git("status", "--porcelain", "--", "vlp_jax", "train.py", "benchmarks")
  return {"commit": git("rev-parse", "HEAD"), "uncommitted": dirty.splitlines()}


def plot(results: dict, budget: str, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, r in results.items():
    steps, losses = zip(*r["loss_curve"])
    scale = r["image_tower_flops"] / 1e12 if budget == "flops" else 1.0
    label = f"{name} (R@1 t->i {100 * r['metrics']['image_retrieval_recall@1']:.1f})"
    ax.plot([s * scale for s in steps], losses, label=label)
  ax.set_xlabel("image-tower TFLOPs (XLA cost analysis)" if budget == "flops" else "step")
  ax.set_ylabel("training loss (InfoNCE)")
  ax.set_yscale("log")
  budget_name = "image-tower FLOPs" if budget == "flops" else "steps"
  ax.set_title(f"Demo CLIP on the built-in dataset, equal {budget_name}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")


def table(results: dict) -> str:
  lines = [
    "| masking | image tokens | image-tower GFLOP/step | steps | image-tower TFLOP | "
    "text->image R@1 | image->text R@1 | text->image R@5 | compositional | steps/s | wall time (s) |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    m, c = r["metrics"], r["compositional"]
    comp = f"{100 * c['mean']:.1f}" if "mean" in c else "-"
    lines.append(
      f"| {name} | {r['image_tokens']} | {r['image_tower_flops'] / 1e9:.2f} | {r['steps']} | "
      f"{r['steps'] * r['image_tower_flops'] / 1e12:.2f} | "
      f"{100 * m['image_retrieval_recall@1']:.1f} | {100 * m['text_retrieval_recall@1']:.1f} | "
      f"{100 * m['image_retrieval_recall@5']:.1f} | {comp} | {r['train_steps_per_s']:.2f} | "
      f"{r['wall_s']:.0f} |"
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--budget", choices=("steps", "flops"), default="steps")
  parser.add_argument("--steps", type=int, default=600, help="Steps (flops: of the unmasked run).")
  parser.add_argument("--kinds", default="none,random,cluster,kmeans")
  parser.add_argument(
    "--keep",
    default=",".join(KEEP_RULES),
    help="config.masking.keep rules for cluster / kmeans ('': the config's default only).",
  )
  parser.add_argument(
    "--warmup_share",
    type=float,
    default=50 / 600,
    help="Each run warms up for this share of its own steps (configs/demo.py: 50 of 600).",
  )
  parser.add_argument("--cache_dir", default="", help="Built-in dataset cache (default: ~/.cache).")
  parser.add_argument("--out", default="", help="Default: benchmarks/results/masking_quality*.json")
  parser.add_argument("--plot", default=os.path.join(common.ROOT, "docs/masking_loss_curves.png"))
  args = parser.parse_args()
  suffix = "" if args.budget == "steps" else "_flops"
  out = args.out or os.path.join(common.ROOT, f"benchmarks/results/masking_quality{suffix}.json")
  runs = strategies(args.kinds.split(","), [k for k in args.keep.split(",") if k])

  flops = {}  # Before any training: a config that cannot compile fails in seconds.
  for strategy in [Strategy("none"), *runs]:
    if strategy.name not in flops:
      flops[strategy.name] = measure_flops(demo_config(strategy, args.steps))
      print(
        f"{strategy.name}: {flops[strategy.name]['image_tokens']} image tokens, "
        f"image tower {flops[strategy.name]['image_tower_flops'] / 1e9:.3f} GFLOP/step, "
        f"whole step {flops[strategy.name]['step_flops'] / 1e9:.3f} GFLOP",
        flush=True,
      )
  base = flops["none"]["image_tower_flops"]
  plan = {
    s.name: args.steps
    if args.budget == "steps"
    else budget_steps(args.steps, base, flops[s.name]["image_tower_flops"])
    for s in runs
  }
  print("steps: " + ", ".join(f"{name} {steps}" for name, steps in plan.items()), flush=True)

  results = {}
  with tempfile.TemporaryDirectory() as root:
    for i, strategy in enumerate(runs):
      workdir = os.path.join(root, str(i))
      steps = plan[strategy.name]
      run = train(strategy, steps, workdir, args.cache_dir, warmup_steps(steps, args.warmup_share))
      results[strategy.name] = {**flops[strategy.name], **run}
      m = run["metrics"]
      print(
        f"{strategy.name}: {run['steps']} steps, R@1 t->i "
        f"{100 * m['image_retrieval_recall@1']:.1f} i->t {100 * m['text_retrieval_recall@1']:.1f}, "
        f"{run['wall_s']:.0f} s",
        flush=True,
      )
  title = (
    f"Demo, {args.steps} steps each"
    if args.budget == "steps"
    else f"Demo, image-tower FLOPs of {args.steps} unmasked steps each"
  )
  print(title)
  print(table(results))
  payload = {
    "benchmark": "masking_quality",
    "budget": args.budget,
    "steps": args.steps,
    "command": shlex.join([os.path.relpath(sys.argv[0], common.ROOT), *sys.argv[1:]]),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "cpu": machine(),
    "git": git_commit(),
    "flops_method": FLOPS_METHOD,
    "results": results,
  }
  common.write_json(out, payload)
  plot(results, args.budget, args.plot)


if __name__ == "__main__":
  main()
