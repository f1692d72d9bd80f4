r"""README's test command on two commits, one after the other on this machine: both times
and their ratio. Machines differ by 2x, so the suite's speed is a ratio of one machine.

  python benchmarks/suite_time.py --base=d259baa --head=HEAD
  python benchmarks/suite_time.py --base=d259baa --head=HEAD --order=head_first

Each commit is checked out clean (`git worktree add --detach`) in a temporary directory and
runs `pytest -q` (the command README and .ci/run give) there, with this Python and its
installed packages; nothing else should run meanwhile. Prints the passed / failed counts
and wall times, and writes them to benchmarks/results/suite_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_COMMAND = ("-m", "pytest", "-q")  # README's `pytest -q`, with this interpreter.


def _git(*args: str) -> str:
  return subprocess.run(
    ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
  ).stdout.strip()


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


_SUMMARY = re.compile(r"\d+ (passed|failed|error)[^\n]* in [\d.]+s")


def _counts(summary: str) -> dict[str, int]:
  """{'passed': n, 'failed': n, ...} from pytest's last line."""
  return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}


def time_suite(commit: str, log_path: str) -> dict:
  """Runs the test command in a clean worktree of `commit`; wall seconds and counts."""
  sha = _git("rev-parse", commit)
  workdir = tempfile.mkdtemp(prefix=f"suite_{sha[:7]}_")
  _git("worktree", "add", "--detach", workdir, sha)
  try:
    # Each run as CI's: its own flags, and a cold compilation cache of its own (conftest).
    unset = ("XLA_FLAGS", "PYTEST_ADDOPTS", "JAX_COMPILATION_CACHE_DIR")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    # CPU-only for both: an older commit's conftest does not keep jax from probing for a
    # TPU in every process when libtpu (requirements-dev.txt) is installed.
    env["JAX_PLATFORMS"] = "cpu"
    started = time.time()
    with open(log_path, "w") as log:
      result = subprocess.run(
        [sys.executable, *TEST_COMMAND], cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env
      )
    seconds = time.time() - started
  finally:
    _git("worktree", "remove", "--force", workdir)
    shutil.rmtree(workdir, ignore_errors=True)
  with open(log_path) as f:
    # pytest's closing line; processes it started may log after it.
    finals = [line for line in f.read().splitlines() if _SUMMARY.search(line)]
  summary = finals[-1].strip("= ") if finals else ""
  return {
    "commit": sha[:7],
    "seconds": round(seconds, 1),
    "returncode": result.returncode,
    "summary": summary,
    **_counts(summary),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--base", default="d259baa", help="The commit compared against.")
  parser.add_argument("--head", default="HEAD")
  parser.add_argument("--order", choices=("base_first", "head_first"), default="base_first")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/suite_time.json"))
  args = parser.parse_args()
  order = [args.base, args.head] if args.order == "base_first" else [args.head, args.base]
  runs = {}
  for commit in order:
    log_path = os.path.join(
      tempfile.gettempdir(), f"suite_time_{_git('rev-parse', commit)[:7]}.log"
    )
    print(f"{commit}: pytest -q (log {log_path}) ...", flush=True)
    runs[commit] = time_suite(commit, log_path)
    print(f"  {runs[commit]['summary']}  [{runs[commit]['seconds']:.0f} s wall]", flush=True)
  base, head = runs[args.base], runs[args.head]
  ratio = head["seconds"] / base["seconds"]
  print(f"head {head['commit']} / base {base['commit']}: {ratio:.2f}x")
  record = {
    "command": "python benchmarks/suite_time.py " + " ".join(sys.argv[1:]),
    "date": time.strftime("%Y-%m-%d"),
    "machine": f"{cpu_model()}, {os.cpu_count()} cores",
    "order": args.order,
    "base": base,
    "head": head,
    "ratio_head_over_base": round(ratio, 3),
  }
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")


if __name__ == "__main__":
  main()
