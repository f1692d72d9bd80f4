r"""The train step compiled for an NVIDIA GPU on a host without one, per attention path.

  JAX_PLATFORMS=cpu python benchmarks/preflight_gpu.py \
      [--config=configs/cluster_vitb16.py] [--topology=h100] [--per_device_batch=128] \
      [--attention=xla,auto] [--config.model.remat=full ...]

Needs jax's CUDA plugin (vlp_jax.gpu_targets.INSTALL_LINE), no GPU. For each attention
path (config.model.attention: "xla", XLA's attention; "auto", cuDNN flash attention with
odd lengths padded, models/layers.py), builds the step train.py would run (method,
optimizer, data-parallel mesh over the topology's devices, bf16), compiles it with XLA's
real GPU compiler against the shipped target spec, and prints:
- whether it compiles, compile time, XLA's memory analysis per GPU (arguments, temporaries,
  peak = arguments + temporaries + outputs - aliased);
- XLA's own GPU cost model (--xla_gpu_collect_cost_model_stats: estimated microseconds per
  fusion and cuBLAS GEMM of the compiled program, summed per kind); cuDNN's custom calls
  get no estimate from it, so they are counted and listed apart;
- the cuDNN attention calls in the program (0 means XLA's attention ran).
Writes benchmarks/results/preflight_gpu.json. Estimates, not measurements: no GPU ran.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import defaultdict

import common
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, common.ROOT)  # configs/ and vlp_jax from a checkout.
_CONFIG = config_flags.DEFINE_config_file(
  "config", f"{common.ROOT}/configs/cluster_vitb16.py", "Config file (path[:arg])."
)
_TOPOLOGY = flags.DEFINE_string("topology", "h100", "h100, h100:8, h200, a100 (gpu_targets).")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 128, "Batch per GPU.")
_ATTENTION = flags.DEFINE_list("attention", ["xla", "auto"], "config.model.attention values.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "Where to write each compiled program's HLO text.")

_COST = re.compile(r'"reification_cost":(\[[^\]]*\])')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def cost_model_us(hlo_text: str) -> dict[str, float]:
  """XLA's estimated microseconds of the compiled program's top-level instructions, summed
  by kind (fusion / cublas / cudnn / other custom calls), and how many cuDNN calls ran
  without an estimate. Entries of while bodies count once (use unrolled layers)."""
  totals: dict[str, float] = defaultdict(float)
  for line in hlo_text.splitlines():
    target = _TARGET.search(line)
    kind = "fusion"
    if target:
      name = target.group(1)
      kind = "cudnn" if "cudnn" in name else "cublas" if "cublas" in name else "other"
    cost = _COST.search(line)
    if not cost or not json.loads(cost.group(1)):
      if kind == "cudnn" and " custom-call(" in line:
        totals["cudnn_calls_without_estimate"] += 1
      continue
    entries = json.loads(cost.group(1))
    totals[kind] += entries[0]["exec_time_us"]  # XLA's default model first, else "sol".
  return dict(totals)


def compile_for_gpu(config, topology: str) -> dict:
  """Compiles `config`'s train step for `topology` (gpu_targets); figures of the result."""
  from vlp_jax import checkpointing, experiment, gpu_targets, sharding, trainer

  devices = gpu_targets.topology_devices(topology)
  mesh = sharding.create_mesh(config.mesh.to_dict(), devices)
  parts = experiment.create_step_parts(config, mesh, common.tokenizer_spec(config), 10_000)
  abstract, state_sharding = trainer.abstract_train_state(parts.method, parts.tx, mesh, 0)
  state = checkpointing.abstract_with_shardings(abstract, state_sharding)
  options = {**gpu_targets.DEVICELESS_COMPILER_OPTIONS, "xla_gpu_collect_cost_model_stats": True}
  start = time.perf_counter()
  lowered = trainer.compile_step(parts, state_sharding).lower(state, parts.abstract_batch())
  compiled = lowered.compile(compiler_options=options)
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
  return {
    "device_kind": devices[0].device_kind,
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
      config.batch_size = _PER_DEVICE_BATCH.value * parsed[1]
      config.model.attention = attention
    try:
      row = compile_for_gpu(config, _TOPOLOGY.value)
    except Exception as error:  # The verdict is the result: report it and go on.
      row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    row.update(attention=attention, topology=_TOPOLOGY.value, argv=sys.argv[1:])
    row.update(per_device_batch=_PER_DEVICE_BATCH.value)
    print(json.dumps(row), flush=True)
    results.append(row)
  common.write_json(f"{common.ROOT}/benchmarks/results/preflight_gpu.json", {"runs": results})


if __name__ == "__main__":
  app.run(main)
