r"""Quality check: the demo's ALBEF with random MLM masks against CMask's agent.

  python benchmarks/albef_quality.py [--steps=200] [--variants=albef15,albef30,cmask30]
      [--seeds=1] [--rerank_k=16] [--max_minutes=0]

Runs `train.py --config=configs/demo.py:method=<albef|cmask>` once per variant and seed
in fresh workdirs (one shared built-in dataset cache), evaluating once, at the end, with
the demo's tasks: held-out retrieval by ITA embeddings and re-ranked by ITM (the top
--rerank_k by ITA; ALBEF's 128 costs 256k ITM pairs, about 10 minutes on a loaded 2-core
CPU), and the built-in compositional probe scored both ways. After every run it prints a
variant x metric table with wall time (mean and half-range over seeds) and rewrites
benchmarks/results/albef_quality.json, so a cut-short sweep keeps what finished. The MLM
accuracy is the training log's (on each run's own masks, mean of the last quarter of the
logs): no held-out MLM metric exists. 200 steps take about 10 minutes per run on a 2-core
CPU that other jobs load.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import common

# Variant -> (demo method, overrides). CMask's demo masks round(0.3 x length) per caption.
VARIANTS = {
  "albef15": ("albef", ["--config.albef.mlm_probability=0.15"]),
  "albef30": ("albef", ["--config.albef.mlm_probability=0.3"]),
  "cmask30": ("cmask", ["--config.cmask.mask_ratio=0.3"]),
}
LABELS = {
  "albef15": "ALBEF, random 15%",
  "albef30": "ALBEF, random 30%",
  "cmask30": "CMask agent 30%",
}
# Table columns: (header, result task, metric key).
COLUMNS = [
  ("ITA t->i R@1", "zeroshot_retrieval", "image_retrieval_recall@1"),
  ("ITA i->t R@1", "zeroshot_retrieval", "text_retrieval_recall@1"),
  ("ITA t->i R@5", "zeroshot_retrieval", "image_retrieval_recall@5"),
  ("ITM t->i R@1", "itm_retrieval", "image_retrieval_recall@1"),
  ("ITM i->t R@1", "itm_retrieval", "text_retrieval_recall@1"),
  ("ITM t->i R@5", "itm_retrieval", "image_retrieval_recall@5"),
  ("comp. ITA mean", "compositional", "mean"),
  ("comp. ITM mean", "compositional_itm", "mean"),
  ("train MLM acc", "train", "mlm_accuracy"),
]


def final_results(workdir: str) -> dict[str, dict[str, float]]:
  """task -> metrics of the newest evaluation step's JSON files."""
  steps = sorted(glob.glob(os.path.join(workdir, "eval", "step_*")))
  if not steps:
    raise FileNotFoundError(f"{workdir}: no evaluation was written")
  found = {}
  for path in glob.glob(os.path.join(steps[-1], "*.json")):
    with open(path) as f:
      payload = json.load(f)
    found[payload["task"]] = payload["metrics"]
  return found


def train_metrics(workdir: str) -> dict[str, float]:
  """Mean of each logged training metric over the last quarter of the log lines."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  tail = lines[-max(1, len(lines) // 4) :]
  keys = {k for line in tail for k, v in line.items() if isinstance(v, int | float)}
  return {k: statistics.fmean(line[k] for line in tail if k in line) for k in sorted(keys)}


def run_to_end(command: list[str]) -> subprocess.CompletedProcess:
  """Runs `command` in its own process group, killed with it if this script is stopped
  (train.py finishes its evaluation on SIGTERM, grain workers are its children)."""
  proc = subprocess.Popen(
    command,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=common.ROOT,
    start_new_session=True,
  )
  try:
    out, err = proc.communicate()
  except BaseException:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise
  return subprocess.CompletedProcess(command, proc.returncode, out, err)


def train(variant: str, seed: int, steps: int, rerank_k: int, workdir: str, cache_dir: str) -> dict:
  method, overrides = VARIANTS[variant]
  command = [
    sys.executable,
    os.path.join(common.ROOT, "train.py"),
    f"--config={os.path.join(common.ROOT, 'vlp_jax/configs/demo.py')}:method={method},steps={steps}",
    f"--workdir={workdir}",
    f"--config.data.cache_dir={cache_dir}",
    f"--config.seed={seed}",
    "--config.eval.every_steps=0",  # Only the final evaluation: the one the table shows.
    f"--config.eval.rerank_k={rerank_k}",
    *overrides,
  ]
  start = time.time()
  proc = run_to_end(command)
  wall = time.time() - start
  if proc.returncode:
    sys.exit(f"training {variant} (seed {seed}) failed:\n{proc.stderr[-4000:]}")
  results = final_results(workdir)
  results["train"] = train_metrics(workdir)
  return {"command": command[1:], "wall_s": wall, "results": results}


def value(run: dict, task: str, key: str) -> float:
  return run["results"].get(task, {}).get(key, float("nan"))


def cell(runs: list[dict], task: str, key: str, scale: float = 100.0) -> str:
  """Mean over seeds, with the range (max - min) when there are several."""
  values = [scale * value(r, task, key) for r in runs]
  text = f"{statistics.fmean(values):.1f}"
  if len(values) > 1:
    text += f" (+-{(max(values) - min(values)) / 2:.1f})"
  return text


def print_table(runs: dict[str, list[dict]], steps: int, seeds: int) -> None:
  print(f"Demo ALBEF / CMask, {steps} steps, {seeds} seed(s); held-out: 1,000 unseen compositions")
  headers = ["variant", *(c[0] for c in COLUMNS), "wall time (s)"]
  print("| " + " | ".join(headers) + " |")
  print("|" + "---|" * len(headers))
  for variant, found in sorted(runs.items(), key=lambda item: list(VARIANTS).index(item[0])):
    cells = [cell(found, task, key) for _, task, key in COLUMNS]
    cells.append(cell([{"results": {"t": {"w": r["wall_s"]}}} for r in found], "t", "w", 1.0))
    print(f"| {LABELS[variant]} | " + " | ".join(cells) + " |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--seeds", type=int, default=1, help="Runs per variant: seeds 0..N-1.")
  parser.add_argument("--rerank_k", type=int, default=16, help="ITM re-ranks the top k by ITA.")
  parser.add_argument(
    "--max_minutes",
    type=float,
    default=0,
    help="Start no run that would end past this; 0: no limit.",
  )
  parser.add_argument("--cache_dir", default="", help="Built-in dataset cache (default: ~/.cache).")
  parser.add_argument(
    "--out", default=os.path.join(common.ROOT, "benchmarks/results/albef_quality.json")
  )
  parser.add_argument(
    "--keep_previous",
    action="store_true",
    help="Keep --out's runs (same steps, rerank_k) of variants not named in --variants.",
  )
  args = parser.parse_args()
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    sys.exit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
  runs: dict[str, list[dict]] = {v: [] for v in variants}
  if args.keep_previous and os.path.exists(args.out):
    with open(args.out) as f:
      previous = json.load(f)
    if (previous["steps"], previous["rerank_k"]) != (args.steps, args.rerank_k):
      sys.exit(f"{args.out}: other steps / rerank_k than this sweep's")
    runs = {**previous["runs"], **runs}
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # Ends the current run's group too.
  began, longest = time.time(), 0.0
  with tempfile.TemporaryDirectory() as root:
    # Seeds outermost: a sweep cut short still has every variant at seed 0.
    for seed in range(args.seeds):
      for variant in variants:
        elapsed = time.time() - began
        if args.max_minutes and elapsed + longest > 60 * args.max_minutes:
          print(f"stopping before {variant} seed {seed}: --max_minutes={args.max_minutes}")
          return
        workdir = os.path.join(root, f"{variant}_{seed}")
        run = train(variant, seed, args.steps, args.rerank_k, workdir, args.cache_dir)
        longest = max(longest, run["wall_s"])
        runs[variant].append(run)
        print(
          f"{variant} seed {seed}: "
          f"ITA R@1 t->i {100 * value(run, 'zeroshot_retrieval', COLUMNS[0][2]):.1f}, "
          f"ITM R@1 t->i {100 * value(run, 'itm_retrieval', COLUMNS[3][2]):.1f}, "
          f"comp. ITA {100 * value(run, 'compositional', 'mean'):.1f} "
          f"ITM {100 * value(run, 'compositional_itm', 'mean'):.1f}, {run['wall_s']:.0f} s",
          flush=True,
        )
        print_table({v: r for v, r in runs.items() if r}, args.steps, seed + 1)
        payload = {"steps": args.steps, "seeds": args.seeds, "rerank_k": args.rerank_k}
        run["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())  # When it ended.
        common.write_json(args.out, {"benchmark": "albef_quality", **payload, "runs": runs})


if __name__ == "__main__":
  main()
