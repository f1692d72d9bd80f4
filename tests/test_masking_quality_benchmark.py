"""benchmarks/masking_quality.py's equal-compute arithmetic: FLOPs per strategy -> steps."""

import os
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import masking_quality as mq


def test_budget_steps_scale_with_the_flops_ratio():
  assert mq.budget_steps(600, 2.0e9, 2.0e9) == 600
  assert mq.budget_steps(600, 2.0e9, 1.0e9) == 1200  # Half the FLOPs: twice the steps.
  assert mq.budget_steps(300, 3.0e9, 2.0e9) == 450
  assert mq.budget_steps(100, 1.0e9, 3.0e9) == 33  # Rounded to the nearest step.
  assert mq.budget_steps(1, 1.0e9, 3.0e9) == 1  # Never zero steps.
  # Each run's warm-up is the demo's share of its own steps: 50 of 600.
  assert mq.warmup_steps(600, 50 / 600) == 50
  assert mq.warmup_steps(1200, 50 / 600) == 100


def test_cluster_and_kmeans_run_once_per_keep_rule():
  names = [
    s.name for s in mq.strategies(["none", "random", "cluster", "kmeans"], ["reference", "target"])
  ]
  assert names == [
    "none",
    "random",
    "cluster keep=reference",
    "cluster keep=target",
    "kmeans keep=reference",
    "kmeans keep=target",
  ]
  assert mq.Strategy("cluster", "target").overrides() == {"masking.keep": "target"}
  assert [s.name for s in mq.strategies(["cluster"], [])] == ["cluster"]


@pytest.fixture
def tiny_flops(cache_dir):
  from tests.configs import tiny

  def measure(scan_layers=False, **masking):
    config = tiny.get_config(f"cache_dir={cache_dir}")
    with config.unlocked():
      config.model.image.depth = 2  # Two blocks: a scan would count one of them.
      config.model.scan_layers = scan_layers
      for key, value in masking.items():
        setattr(config.masking, key, value)
    return mq.measure_flops(config, whole_step=False)  # The step's compile costs a minute.

  return measure


def test_masked_image_tower_costs_less_and_scan_counts_every_block(tiny_flops):
  # Tiny config: 32 px images, 8 px patches: 16 patches + the class token.
  none = tiny_flops()
  random = tiny_flops(kind="random", ratio=0.5)
  assert (none["image_tokens"], random["image_tokens"]) == (17, 9)
  ratio = random["image_tower_flops"] / none["image_tower_flops"]
  # Tokens 9/17 = 0.53; attention is quadratic, the patch embedding sees every patch.
  assert 0.4 < ratio < 0.7, ratio
  # A scanned tower is measured unrolled: the same FLOPs, not one block's.
  assert tiny_flops(scan_layers=True)["image_tower_flops"] == none["image_tower_flops"]
