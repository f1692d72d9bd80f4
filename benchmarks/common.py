"""Shared pieces of the benchmarks: timing, the two CLIP train steps, isolated runs.

Each framework is measured in its own subprocess: TensorFlow (imported by vlp_jax's
trainer) must not be loaded before torchvision, and each side gets the whole machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPEN_CLIP_NAMES = {"B/16": "ViT-B-16", "B/32": "ViT-B-32", "L/14": "ViT-L-14"}
VOCAB_SIZE = 49408  # CLIP's BPE vocabulary, as open_clip's models use.
CONTEXT = 77
RESULT_PREFIX = "RESULT "


SHARED_FLAGS = ("batch_size", "steps", "warmup", "variant")


def create_parser(description: str, steps: int, results_name: str) -> argparse.ArgumentParser:
  """The flags every CLIP benchmark takes; each script adds its own."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=steps)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--variant", default="B/16", choices=sorted(OPEN_CLIP_NAMES))
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results", results_name))
  return parser


def shared_flags(args: argparse.Namespace) -> list[str]:
  """The shared flags as a subprocess command line."""
  return [f"--{k}={getattr(args, k)}" for k in SHARED_FLAGS]


def time_calls(fn: Callable[[], object], steps: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def median(times: Sequence[float]) -> float:
  return statistics.median(times)


def jax_step(config, mesh=None, vocab_size: int = VOCAB_SIZE):
  """(state, compiled step, masker, random batch) of vlp_jax's trainer for `config`."""
  sys.path.insert(0, ROOT)
  import numpy as np

  from vlp_jax import experiment, sharding, trainer

  mesh = mesh or sharding.create_mesh({"data": -1})
  parts = experiment.create_step_parts(config, mesh, tokenizer_spec(config, vocab_size), 1000)
  state, state_sharding = trainer.create_train_state(parts.method, parts.tx, mesh, seed=0)
  step_fn = trainer.compile_step(parts, state_sharding)
  rng = np.random.default_rng(0)
  size, context = parts.method.model.visual.image_size, config.model.text.context_length
  batch = sharding.host_to_global(
    {
      "image": rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
      "tokens": rng.integers(1, vocab_size, (config.batch_size, context), dtype=np.int32),
    },
    mesh,
  )
  return state, step_fn, parts.method.masker, batch


def tokenizer_spec(config, vocab_size: int = VOCAB_SIZE):
  """What create_experiment's tokenizer gives the method, without one (pad id 0:
  models.text.PAD_ID)."""
  from vlp_jax import experiment

  return experiment.TokenizerSpec(vocab_size, 0, config.model.text.context_length)


def jax_clip(variant: str, batch_size: int, **masking: object):
  """(state, step, masker, batch) for vlp_jax's CLIP (configs/clip_vitb16.py) on random data."""
  sys.path.insert(0, ROOT)
  from vlp_jax.configs import clip_vitb16

  config = clip_vitb16.get_config(f"variant={variant},batch_size={batch_size}")
  with config.unlocked():
    for key, value in masking.items():
      setattr(config.masking, key, value)
  return jax_step(config)


def jax_step_runner(state, step_fn, batch) -> Callable[[], None]:
  import jax

  holder = {"state": state}

  def step():
    holder["state"], metrics = step_fn(holder["state"], batch)
    jax.block_until_ready(metrics)

  return step


def torch_clip_step(variant: str, batch_size: int, patch_dropout: float = 0.0):
  """(step callable, parameter count, description) for open_clip with the same recipe."""
  import open_clip
  import torch

  torch.manual_seed(0)
  model = open_clip.create_model(OPEN_CLIP_NAMES[variant], force_patch_dropout=patch_dropout)
  model.train()
  loss_fn = open_clip.loss.ClipLoss()
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  optimizer = torch.optim.AdamW(
    [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
    lr=5e-4,
    betas=(0.9, 0.98),
    eps=1e-6,
  )
  images = torch.randn(batch_size, 3, 224, 224)
  texts = torch.randint(1, VOCAB_SIZE, (batch_size, CONTEXT))

  def step():
    optimizer.zero_grad(set_to_none=True)
    out = model(images, texts)
    if isinstance(out, dict):
      out = (out["image_features"], out["text_features"], out["logit_scale"])
    loss_fn(*out[:3]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

  description = (
    f"open_clip {open_clip.__version__} (torch {torch.__version__}, "
    f"{torch.get_num_threads()} threads)"
  )
  return step, sum(p.numel() for p in model.parameters()), description


def emit(result: dict) -> None:
  """Prints a result for the parent process to pick up."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_isolated(script: str, flags: Sequence[str]) -> dict:
  """Runs `script` with `flags` in a fresh Python and returns what it emitted."""
  proc = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True)
  lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
  if proc.returncode or not lines:
    sys.exit(f"{os.path.basename(script)} {' '.join(flags)} failed:\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1][len(RESULT_PREFIX) :])


def write_json(path: str, payload: dict) -> None:
  import platform

  payload = {**payload, "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  print(f"wrote {path}")


def available_host_memory() -> int | None:
  """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None
