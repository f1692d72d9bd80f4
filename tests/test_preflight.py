"""The pre-flight (vlp_jax.preflight): each method's tiny step compiled by libtpu's real TPU
compiler for a v5e:2x2 slice on this CPU host, and what it reports."""

import pytest

pytest.importorskip("libtpu", reason="libtpu (requirements-dev.txt) compiles for TPUs")

from tests.configs import tiny
from vlp_jax import topology
from vlp_jax.configs import demo
from vlp_jax.configs.common import use_method
from vlp_jax.preflight import fit, step

SLICE = "v5e:2x2"
MIB = 2**20


def _config(method: str):
  config = tiny.get_config()
  config.unlock()
  if method == "negclip":
    use_method(config, "negclip")
  elif method != "contrastive":
    getattr(demo, f"use_{method}")(config)
    config.model.text.depth = 2 if method != "vlc" else config.model.text.depth
    if method in ("albef", "cmask"):
      config.albef.fusion_layer = 1
      config.albef.queue_size = 2 * config.batch_size
  return config


@pytest.fixture(scope="module")
def devices():
  return topology.topology_devices(SLICE)


def _check_compiled_for_the_slice(report) -> None:
  """What every method's compiled step must show on v5e:2x2 in bfloat16."""
  assert report.fits and report.device_kind == "TPU v5 lite" and report.devices == 4
  assert report.hbm_usable_gib == pytest.approx(15.75)  # The compiler's own limit.
  mem = {k: v * 2**30 for k, v in report.per_chip_gib.items()}
  live = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
  # TPU peaks add the compiler's scoped reservations (collectives' buffers: ~96 MiB here).
  assert live <= mem["peak"] <= mem["arguments"] + mem["temporaries"] + mem["outputs"] + 128 * MIB
  assert report.flops_per_step > 0 and report.roofline["examples_per_s_per_chip_bound"] > 0
  assert "all-reduce" in report.collectives  # Data-parallel gradients.
  assert report.matmul_dtypes.get("bf16", 0) > report.matmul_dtypes.get("f32", 0)
  # Every Dense of the blocks in bfloat16 (what stays float32: the loss's similarities and
  # jax.nn attention's softmax gradients).
  dense = ("/mlp/", "_proj/", "/query/", "/key/", "/value/", "/intermediate/", "/output/")
  assert not [op for op in report.non_bf16_matmuls if any(d in op for d in dense)]


# The contrastive step is compiled (data 2 x FSDP 2) by the FSDP test below: one TPU
# compile of the tiny step costs ~25 s here.
@pytest.mark.parametrize("method", ["negclip", "albef", "cmask", "vlc"])
def test_each_methods_step_compiles_for_a_tpu_slice_in_bfloat16(devices, method):
  _check_compiled_for_the_slice(
    step.compile_report(step.build_step(_config(method), devices), SLICE)
  )


def test_a_step_too_large_for_the_chip_is_refused_with_what_would_fit(devices):
  config = _config("contrastive")
  config.batch_size = 4 * 4096  # 4,096 images per chip, 2,048-wide blocks: ~tens of GiB.
  config.model.image.update(width=2048, num_heads=16, mlp_dim=8192, image_size=64)
  report = step.compile_report(step.build_step(config, devices), SLICE)
  assert not report.fits and "exceeds available HBM" in report.compiler_error
  advice = " ".join(fit.suggestions(config, report))
  assert "--config.model.remat=full" in advice and "--config.mesh.fsdp=4" in advice


def test_fsdp_splits_the_per_chip_arguments_by_its_degree(devices):
  config = _config("contrastive")
  config.model.image.update(width=256, num_heads=4, mlp_dim=1024)
  config.model.text.update(width=256, num_heads=4, mlp_dim=1024)
  data = step.build_step(config, devices)
  config.mesh.update(data=2, fsdp=2)
  fsdp = step.build_step(config, devices)
  state_bytes = step.per_device_bytes(data.state)
  ratio = state_bytes / step.per_device_bytes(fsdp.state)
  assert 1.8 < ratio <= 2.0  # The few tensors under FSDP_MIN_SIZE stay whole.
  report = step.compile_report(fsdp, SLICE)
  assert report.per_chip_gib["arguments"] * 2**30 < 1.1 * state_bytes / 2 + MIB
  assert "all-gather" in report.collectives
  _check_compiled_for_the_slice(report)  # The contrastive method's step.


def test_bad_topology_names_fail_naming_the_flag():
  for name in ("v9:2x2", "v5e", "v5e:3x7"):
    with pytest.raises(topology.TopologyError, match=r"--topology"):
      topology.topology_devices(name)
