r"""The train step compiled for an NVIDIA GPU on a host without one, per attention path.

  JAX_PLATFORMS=cpu python benchmarks/preflight_gpu.py \
      [--config=configs/cluster_vitb16.py] [--topology=h100] [--per_device_batch=128] \
      [--attention=xla,auto] [--config.model.remat=full ...]

Needs jax's CUDA plugin (vlp_jax.gpu_targets.INSTALL_LINE), no GPU. For each attention
path (config.model.attention: "xla", XLA's attention; "auto", cuDNN flash attention with
odd lengths padded, models/attention.py), builds the step train.py would run (method,
optimizer, data-parallel mesh over the topology's devices, bf16), compiles it with XLA's
real GPU compiler against the shipped target spec, and prints:
- whether it compiles, compile time (trace + lower + compile), XLA's memory analysis per GPU
  (arguments, temporaries, peak = arguments + temporaries + outputs - aliased) and whether
  the peak fits the share of GPU memory jax takes by default (gpu_targets.memory_limit_bytes:
  XLA's GPU compiler does not refuse a step that does not fit);
- the step's FLOPs per GPU (scan-aware jaxpr count, progress.step_flops) and the roofline
  bound they give at the chip's bf16 peak (topology.CHIPS): a bound on step time and
  img/s/GPU, never a measurement (XLA's GPU cost analysis, bytes included, is absent);
- XLA's own GPU cost model (--xla_gpu_collect_cost_model_stats: estimated microseconds per
  fusion and cuBLAS GEMM of the compiled program, summed per kind, see cost_model_us);
  cuDNN's custom calls (attention, the patch convolution) get no estimate from it, so
  they are counted apart;
- the cuDNN attention calls in the program (0 means XLA's attention ran).
Writes benchmarks/results/preflight_gpu_<config>_<topology>_<batch per GPU>.json.
Estimates and bounds, not measurements: no GPU ran.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import defaultdict

import common
from absl import app, flags

sys.path.insert(0, common.ROOT)  # vlp_jax from a checkout.
from vlp_jax import cli

_CONFIG = cli.define_config_flag(default="configs/cluster_vitb16.py")
flags.declare_key_flag("config")
_CONFIG_PATH = flags.FLAGS["config"]  # Its config_filename names the results file.
_TOPOLOGY = flags.DEFINE_string("topology", "h100", "h100, h100:8, h200, a100 (gpu_targets).")
_PER_DEVICE_BATCH = flags.DEFINE_integer(
  "per_device_batch", 128, "Batch per GPU; 0: the config's global batch_size."
)
_ATTENTION = flags.DEFINE_list("attention", ["xla", "auto"], "config.model.attention values.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "Where to write each compiled program's HLO text.")

_COST = re.compile(r'"reification_cost":(\[[^\]]*\])')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def cost_model_us(hlo_text: str) -> dict[str, float]:
  """XLA's estimated microseconds of the compiled program's top-level instructions, summed
  by kind (fusion / cublas / other custom calls; "attention_*": those whose op_name is in
  an attention block), and how many cuDNN calls it gave no estimate. Per instruction the
  indexing cost model where XLA ran it, else its first model (fusions: the default one,
  GEMMs: "sol"): the default model gave one division fusion of the cluster step 1.05e10 us,
  the indexing model 47 us. While bodies count once (use unrolled layers)."""
  totals: dict[str, float] = defaultdict(float)
  for line in hlo_text.splitlines():
    target = _TARGET.search(line)
    name = target.group(1) if target else ""
    kind = "cudnn" if "cudnn" in name else "cublas" if "cublas" in name else "other"
    kind = kind if target else "fusion"
    cost = _COST.search(line)
    entries = {e["name"]: e["exec_time_us"] for e in json.loads(cost.group(1))} if cost else {}
    if not entries:
      if kind == "cudnn" and " custom-call(" in line:
        totals["cudnn_calls_without_estimate"] += 1
      continue
    us = entries.get("indexing-cost-model", next(iter(entries.values())))
    totals[kind] += us
    if "/attn/" in line:
      totals[f"attention_{kind}"] += us
  return dict(totals)


def compile_for_gpu(config, topology_name: str) -> dict:
  """Compiles `config`'s train step for `topology_name` (gpu_targets); its figures."""
  from vlp_jax import checkpointing, experiment, gpu_targets, progress, sharding, topology, trainer

  devices = gpu_targets.topology_devices(topology_name)
  mesh = sharding.create_mesh(config.mesh.to_dict(), devices)
  parts = experiment.create_step_parts(config, mesh, common.tokenizer_spec(config), 10_000)
  abstract, state_sharding = trainer.abstract_train_state(parts.method, parts.tx, mesh, 0)
  state = checkpointing.abstract_with_shardings(abstract, state_sharding)
  options = {**gpu_targets.DEVICELESS_COMPILER_OPTIONS, "xla_gpu_collect_cost_model_stats": True}
  start = time.perf_counter()
  traced = trainer.compile_step(parts, state_sharding).trace(state, parts.abstract_batch())
  flops_per_device = progress.step_flops(traced) / len(devices)  # Scan-aware, jaxpr count.
  compiled = traced.lower().compile(compiler_options=options)
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  if _HLO_DIR.value:
    with open(f"{_HLO_DIR.value}/{config.model.attention}.hlo.txt", "w") as f:
      f.write(text)
  gib = 2.0**30
  peak = (
    memory.argument_size_in_bytes
    + memory.temp_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
  )
  chip = topology.chip_for(devices[0])
  bound_s = flops_per_device / chip.peak_flops  # Compute-bound: GPU cost analysis is absent.
  limit = gpu_targets.memory_limit_bytes(devices[0])
  return {
    "device_kind": devices[0].device_kind,
    "fits": peak <= limit,
    "memory_limit_gib": round(limit / gib, 2),
    "tflops_per_device": round(flops_per_device / 1e12, 2),
    "bound_step_ms": round(bound_s * 1e3, 1),
    "bound_img_per_s_per_device": round(config.batch_size / len(devices) / bound_s),
    "compile_s": round(seconds, 1),
    "argument_gib": round(memory.argument_size_in_bytes / gib, 3),
    "temp_gib": round(memory.temp_size_in_bytes / gib, 3),
    "peak_gib": round(peak / gib, 3),
    "cudnn_attention_calls": text.count('custom_call_target="__cudnn$fmha'),
    "cost_model_us": {k: round(v, 1) for k, v in cost_model_us(text).items()},
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from vlp_jax import gpu_targets

  parsed = gpu_targets.parse_topology(_TOPOLOGY.value)
  if parsed is None:
    raise app.UsageError(f"--topology: not one of {sorted(gpu_targets.GPU_TARGETS)}")
  results = []
  for attention in _ATTENTION.value:
    config = _CONFIG.value.copy_and_resolve_references()
    with config.unlocked():
      if _PER_DEVICE_BATCH.value:  # Else the config's own global batch.
        config.batch_size = _PER_DEVICE_BATCH.value * parsed[1]
      config.model.attention = attention
    try:
      row = compile_for_gpu(config, _TOPOLOGY.value)
    except Exception as error:  # The verdict is the result: report it and go on.
      row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    row.update(attention=attention, topology=_TOPOLOGY.value, argv=sys.argv[1:])
    row.update(per_device_batch=config.batch_size // parsed[1])
    print(json.dumps(row), flush=True)
    results.append(row)
  config_name = os.path.basename(_CONFIG_PATH.config_filename).split(".")[0]
  per_device = results[-1]["per_device_batch"]
  name = f"preflight_gpu_{config_name}_{_TOPOLOGY.value.replace(':', 'x')}_{per_device}.json"
  common.write_json(f"{common.ROOT}/benchmarks/results/{name}", {"runs": results})


if __name__ == "__main__":
  app.run(main)
