r"""Compiles a config's train step for a named TPU slice (or GPU) on this CPU host and says
whether it fits, before any hardware is rented.

  pip install -r requirements-tpu.txt   # libtpu: the TPU compiler, no TPU needed
  python -m vlp_jax.preflight --config=configs/cluster_vitb16.py --topology=v5e:16x16
  python -m vlp_jax.preflight --config=configs/clip_vitb16.py --topology=v5e:16x16 --fit
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import sys
import time

from absl import app, flags

# A CPU host: jax's own backend stays on the CPU (no probing for a TPU); set before jax
# initialises its backends. The topology's devices come from the compiler, deviceless.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from vlp_jax import cli, topology
from vlp_jax.preflight import fit, step

_CONFIG = cli.define_config_flag()
flags.declare_key_flag("config")  # Defined in vlp_jax.cli; --helpshort lists it here.
_TOPOLOGY = flags.DEFINE_string(
  "topology", None, "The slice to compile for: v5e:16x16, v5p:4x4x4, v6e:8x8, v4:2x2x2, h100:8..."
)
_JSON = flags.DEFINE_string(
  "json", "", "Where to write the report (default ./preflight-<config>-<topology>.json)."
)
_FIT = flags.DEFINE_bool(
  "fit", False, "Search remat policy, FSDP degree and per-chip batch for the fastest that fits."
)
_FIT_MAX = flags.DEFINE_integer(
  "fit_max_compiles", 0, "--fit stops after this many compiles (0: the whole search)."
)
flags.mark_flags_as_required(["config", "topology"])


def _gib(x: float) -> str:
  return f"{x:.2f} GiB"


def format_report(report: step.Report) -> str:
  """The report as the terminal shows it."""
  per_chip = report.per_chip_gib
  verdict = "FITS" if report.fits else "DOES NOT FIT"
  lines = [
    f"{report.topology}: {report.devices} x {report.device_kind}, mesh {report.mesh}, "
    f"global batch {report.batch_size} ({report.batch_size / report.devices:g} per device)",
    f"{verdict} in {_gib(report.hbm_usable_gib)} usable HBM per device ({report.hbm_source})",
    "per device: " + ", ".join(f"{k} {_gib(v)}" for k, v in per_chip.items()),
    f"compile {report.compile_s:.1f} s ({report.lower_s:.1f} s before XLA's); FLOPs per step {report.flops_per_step:.3e} "
    "(jaxpr count: scanned layers times depth, remat recompute included)",
  ]
  if report.compiler_error:
    lines.append(f"compiler: {report.compiler_error}")
  if roof := report.roofline:
    lines.append(
      f"roofline BOUND (not a measurement): step >= {roof['step_s_bound'] * 1e3:.1f} ms "
      f"({roof['bound_by']}-bound), <= {roof['examples_per_s_per_chip_bound']:.0f} "
      f"examples/s/device, MFU <= {roof['mfu_bound']:.0%}; peak "
      f"{roof['peak_flops_per_chip'] / 1e12:.1f} TFLOP/s, HBM "
      f"{roof['hbm_bandwidth'] / 1e9:.0f} GB/s per device ({roof['source']})"
    )
  if report.collectives:
    lines.append(
      "collectives per step (per device): "
      + ", ".join(
        f"{kind} x{int(c['count'])} {c['bytes'] / 2**20:.1f} MiB"
        for kind, c in report.collectives.items()
      )
    )
  if report.matmul_dtypes:
    lines.append(f"matrix products by operand dtype: {report.matmul_dtypes}")
  for op in report.non_bf16_matmuls[:6]:
    lines.append(f"  not bf16: {op}")
  for row in report.largest_arrays[:5]:
    lines.append(f"  largest: {row['shape']} {row['bytes'] / 2**20:.1f} MiB  {row['op']}")
  for suggestion in report.suggestions:
    lines.append(f"  would fit? {suggestion}")
  return "\n".join(lines)


def _json_path(config_path: str, topology_name: str) -> str:
  stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  slice_name = re.sub(r"[^\w.-]", "_", topology_name)
  return f"preflight-{stem}-{slice_name}.json"


def _overrides() -> list[str]:
  """The --config.* flags given, as the command line spelled them."""
  return [a for a in sys.argv[1:] if a.startswith("--config.")]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  config, name = _CONFIG.value, _TOPOLOGY.value
  devices = topology.topology_devices(name)
  report = step.compile_report(step.build_step(config, devices), name)
  report.overrides = _overrides()
  if not report.fits:
    report.suggestions = fit.suggestions(config, report, fit.scannable(config, devices))
  print(format_report(report), flush=True)
  payload: dict = {
    "config": flags.FLAGS["config"].config_filename,
    # Where and when: compile times depend on the host (and on what else it runs).
    "command": " ".join(["python -m vlp_jax.preflight", *sys.argv[1:]]),
    "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    **dataclasses.asdict(report),
  }
  if _FIT.value:
    print("--fit: compiling candidates (scanned layers where the model has them)...", flush=True)
    best, tried = fit.search(
      config, devices, name, max_compiles=_FIT_MAX.value, start_report=report
    )
    payload["fit"] = {
      "chosen": best.flags if best else None,
      # The candidate's flags, not the report's own (empty) overrides field.
      "tried": [{**dataclasses.asdict(c.report), "overrides": c.flags} for c in tried],
    }
    if best is None:
      print("--fit: nothing tried fits; try a larger slice or a smaller global batch")
    else:
      print(format_report(best.report))
      print("--fit: fastest fitting choice by the roofline bound:\n  " + " ".join(best.flags))
  path = _JSON.value or _json_path(flags.FLAGS["config"].config_filename, name)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, default=str)
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
