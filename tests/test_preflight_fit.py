"""The pre-flight's --fit search (vlp_jax.preflight.fit) with the compiler's verdict stood
in by a function: its order, scanned layers where the model has them, FSDP over every
device, accumulation at the same global batch, skips and its compile bound. No TPU compile
(tests/test_preflight.py compiles for a slice)."""

import pytest

from tests.configs import tiny
from vlp_jax.config_lib import ConfigError
from vlp_jax.preflight import fit, step

DEVICES = list(range(8))  # Stand-ins: the search only counts them.


def _report(config, fits: bool) -> step.Report:
  per_chip = {"params": 1.0, "optimizer": 2.0, "temporaries": 20.0}
  if fits:
    per_chip["peak"] = 9.0
  return step.Report(
    topology="v5e:2x4",
    device_kind="TPU v5 lite",
    devices=len(DEVICES),
    mesh={"data": len(DEVICES)},
    batch_size=config.batch_size,
    fits=fits,
    hbm_usable_gib=15.75,
    hbm_source="stand-in",
    per_chip_gib=per_chip,
    compile_s=1.0,
  )


def _search(config, fits, scanned: bool = True, max_compiles: int = 0, start_report=None):
  """fit.search with `fits(config) -> bool` as the compiler; every config compiled."""
  compiled, logged = [], []

  def build(candidate, devices):
    if candidate.model.scan_layers and not scanned:
      raise ConfigError("config.model.scan_layers=True: no scanned layout")
    if candidate.batch_size % (len(devices) * candidate.grad_accum_steps):
      raise ConfigError("config.grad_accum_steps: the batch does not split")
    return candidate

  def compile_fn(candidate, topology_name):
    compiled.append(candidate)
    return _report(candidate, fits(candidate))

  best, tried = fit.search(
    config,
    DEVICES,
    "v5e:2x4",
    logged.append,
    max_compiles,
    build=build,
    compile_fn=compile_fn,
    start_report=start_report,
  )
  return best, tried, compiled, logged


@pytest.fixture
def config():
  return tiny.get_config("batch_size=64")


def test_the_first_fitting_point_is_chosen_after_the_cheaper_ones_failed(config):
  # Fits only with full remat and FSDP over all 8 devices.
  best, tried, compiled, _ = _search(config, lambda c: c.model.remat == "full" and c.mesh.fsdp > 1)
  assert [c.model.remat for c in compiled] == ["none", "dots", "full", "full"]
  assert all(c.model.scan_layers for c in compiled)  # The tiny ViT/CLIP text scan.
  assert best is tried[-1] and best.report.fits and len(tried) == 4
  assert best.overrides == {
    "model.scan_layers": True,
    "model.remat": "full",
    "mesh.fsdp": 8,
    "mesh.data": -1,
    "mesh.tensor": 1,
  }
  assert best.flags[0] == "--config.model.scan_layers=True"
  assert compiled[-1].batch_size == config.batch_size  # Same global batch.


def test_unscanned_models_are_searched_unrolled(config):
  best, _, compiled, _ = _search(config, lambda c: c.model.remat == "dots", scanned=False)
  assert best.overrides == {"model.remat": "dots"}
  assert not any(c.model.scan_layers for c in compiled)


def test_accumulation_multiplies_the_configs_own_and_skips_what_does_not_split(config):
  config.grad_accum_steps = 4  # 64 / (8 devices x 4) = 2 per microbatch: x2 splits, x4 not.
  best, tried, compiled, logged = _search(config, lambda c: False)
  assert best is None and len(tried) == len(fit.SEARCH) - 1
  assert [c.grad_accum_steps for c in compiled][-2:] == [8, 8]
  assert sum("skip" in line for line in logged) == 1  # 4 x 4 = 16 does not split 64 / 8.


def test_the_search_stops_after_max_compiles(config):
  best, tried, compiled, logged = _search(config, lambda c: False, max_compiles=2)
  assert best is None and len(tried) == len(compiled) == 2
  assert "stopped after 2 compiles" in logged[-1]


def test_a_candidate_equal_to_the_given_config_reuses_its_verdict(config):
  config.model.update(scan_layers=True, remat="none")  # SEARCH's first point, as given.
  refused = _report(config, fits=False)
  best, tried, compiled, _ = _search(
    config, lambda c: c.model.remat == "dots", max_compiles=1, start_report=refused
  )
  assert tried[0].report is refused and [c.model.remat for c in compiled] == ["dots"]
  assert best is tried[1]  # The bound counts compiles, not the reused verdict.


def test_suggestions_for_a_refused_step_name_remat_scan_fsdp_and_accumulation(config):
  config.batch_size = 512  # 64 per device: 20 GiB of temporaries need 2 microbatches.
  report = _report(config, fits=False)
  out = fit.suggestions(config, report)
  assert out[0].startswith("--config.model.remat=full")
  assert any(s.startswith("--config.model.scan_layers=True") for s in out)
  assert any(s.startswith("--config.mesh.fsdp=8") for s in out)
  assert any(s.startswith("--config.grad_accum_steps=2 (per-chip microbatch 32") for s in out)
  # A model without a scanned layout (ALBEF, VLC) is not told to scan.
  unscanned = fit.suggestions(config, report, can_scan=False)
  assert not any("scan_layers" in s for s in unscanned)
  assert unscanned == [s for s in out if "scan_layers" not in s]
