"""Built-in fine-tuning sets over the built-in scenes (builtin.py), written in the official
file formats so that the task readers (vqa_data.py, nlvr2_data.py) read them as they read
the real ones: VQA in builtin_vqa.py, NLVR2 in builtin_nlvr2.py. Everything is
deterministic from the seed; each set is written once to the cache directory
(atomically, versioned) and reused. This module: what the two generators share.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable

import numpy as np
from absl import logging

from vlp_jax.input_pipeline import builtin, records

SPLIT_SEEDS = {"train": 0, "val": 1, "dev": 1}  # A split's stream of the generator seed.


def plural(shape: str) -> str:
  return f"{shape}es" if shape.endswith("ss") else f"{shape}s"


def others(values, value) -> tuple[str, ...]:
  return tuple(str(v) for v in values if str(v) != value)


def pick(rng: np.random.Generator, items):
  return items[int(rng.integers(len(items)))]


def ensure_cached(
  cache_dir: str | None, name: str, params: dict, write: Callable[[str], None]
) -> str:
  """The directory of a generated set, written once: in a temporary directory that is
  renamed when complete (params.json, written last, marks it complete)."""
  digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
  root = os.path.join(cache_dir or builtin.default_cache_dir(), f"{name}-{digest}")
  if not os.path.exists(os.path.join(root, "params.json")):
    os.makedirs(os.path.dirname(root), exist_ok=True)
    logging.info("Writing the %s set %s to %s", name, params, root)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(root))
    write(tmp)
    with open(os.path.join(tmp, "params.json"), "w") as f:
      json.dump(params, f)
    records.replace_dir_atomically(tmp, root)
  return root
