"""The train step of a config, built as train.py builds it over a named topology's devices,
compiled deviceless by that hardware's own compiler, and what the compiler says of it:
memory per chip against the chip's HBM, FLOPs, collectives, a roofline bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections

from vlp_jax import experiment, gpu_targets, progress, topology, trainer
from vlp_jax.config_lib import ConfigError
from vlp_jax.preflight import hlo

GIB = 2**30
# Reference vocabularies of config.data.tokenizer's kinds, for a step built without the
# vocab file (the embedding's size is all the step needs of it): CLIP's BPE (49,408
# tokens), bert-base-uncased's WordPiece (30,522; [CLS] 101, [SEP] 102, [MASK] 103), and
# a 32,000-piece SentencePiece model. config.model.text.vocab_size, where set, wins.
REFERENCE_VOCABS: dict[str, tuple[int, int, int | None, int | None, int | None]] = {
  "clip_bpe": (49_408, 0, None, None, None),
  "wordpiece": (30_522, 0, 101, 102, 103),
  "sentencepiece": (32_000, 0, 1, 2, 3),
}
# The compiler's refusal of a step that does not fit, and the figures it names.
_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED|exceeds available HBM|[Oo]ut of memory")
_AVAILABLE = re.compile(r"available HBM \(([\d.]+)([KMGT])\)")
_REQUIRED = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def tokenizer_spec(config: ml_collections.ConfigDict) -> experiment.TokenizerSpec:
  """What the method needs of a tokenizer, from the reference vocabulary of its kind."""
  vocab, pad, cls, sep, mask = REFERENCE_VOCABS[config.data.tokenizer]
  vocab = config.model.text.vocab_size or vocab
  return experiment.TokenizerSpec(vocab, pad, config.model.text.context_length, cls, sep, mask)


@dataclasses.dataclass(frozen=True)
class StepBuild:
  """The step's parts and its abstract (shape, dtype, sharding) inputs."""

  parts: experiment.StepParts
  state: Any  # trainer.TrainState of ShapeDtypeStructs with their NamedShardings.
  shardings: Any
  batch: dict[str, jax.ShapeDtypeStruct]


def build_step(config: ml_collections.ConfigDict, devices: list[Any]) -> StepBuild:
  """The step train.py would run for `config` on a mesh over `devices` (ConfigError
  naming a key before any compute)."""
  mesh = experiment.create_mesh(config, devices)
  experiment.check_step_config(config, mesh)
  total_steps = config.total_steps or 10_000  # Only the schedule's shape depends on it.
  try:
    parts = experiment.create_step_parts(config, mesh, tokenizer_spec(config), total_steps)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  abstract, shardings = trainer.abstract_train_state(parts.method, parts.tx, mesh, config.seed)
  state = jax.tree.map(
    lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract, shardings
  )
  return StepBuild(parts, state, shardings, parts.abstract_batch())


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with NamedShardings."""
  return sum(
    leaf.dtype.itemsize * _prod(leaf.sharding.shard_shape(leaf.shape))
    for leaf in jax.tree.leaves(tree)
  )


def _prod(shape: tuple[int, ...]) -> int:
  out = 1
  for n in shape:
    out *= n
  return out


def _bytes(match: re.Match[str] | None) -> float | None:
  return float(match.group(1)) * _UNITS[match.group(2)] if match else None


@contextlib.contextmanager
def _no_compilation_cache() -> Iterator[None]:
  """A deviceless executable cannot be read back from jax's persistent cache (it has no
  client): keep it out, whatever the process's setting."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)


_USABLE_HBM: dict[str, tuple[float, str]] = {}  # By device kind: one probe each.


def usable_hbm_bytes(devices: list[Any]) -> tuple[float, str]:
  """Bytes a step may use on one device, and where the figure comes from: the compiler's
  own limit, read from its refusal of a program far too large (TPU), else the chip
  table's capacity."""
  kind = devices[0].device_kind
  if kind not in _USABLE_HBM:
    _USABLE_HBM[kind] = _probe_usable_hbm_bytes(devices)
  return _USABLE_HBM[kind]


def _probe_usable_hbm_bytes(devices: list[Any]) -> tuple[float, str]:
  if devices[0].platform == "tpu":  # XLA's GPU compiler checks no memory limit.
    mesh = jax.sharding.Mesh(devices[:1], ("d",))
    sharding = jax.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = jax.ShapeDtypeStruct((2**16, 2**16), "float32", sharding=sharding)
    try:  # 16 GiB in, 64 GiB of temporaries: more than any chip here has.
      with _no_compilation_cache():
        jax.jit(lambda x: jax.numpy.stack([x * i for i in range(4)]).sum(0)).lower(spec).compile()
    except Exception as e:  # The compiler's own error type.
      if (available := _bytes(_AVAILABLE.search(str(e)))) is not None:
        return available, "the compiler's limit"
  if (gpu_limit := gpu_targets.memory_limit_bytes(devices[0])) is not None:
    return gpu_limit, "jax's default share (75%) of the GPU spec's memory"
  chip = topology.chip_for(devices[0])
  if chip is None:
    raise ConfigError(f"no HBM figure for device kind {devices[0].device_kind!r}")
  return chip.hbm_bytes, f"{chip.source} (capacity)"


@dataclasses.dataclass
class Report:
  """What the pre-flight found for one config on one topology (JSON-ready)."""

  topology: str
  device_kind: str
  devices: int
  mesh: dict[str, int]
  batch_size: int
  fits: bool
  hbm_usable_gib: float
  hbm_source: str
  per_chip_gib: dict[str, float]
  compile_s: float  # Trace, FLOP count, lowering and XLA's compile.
  lower_s: float = 0.0  # The part before XLA's compile.
  flops_per_step: float = 0.0
  roofline: dict[str, Any] = dataclasses.field(default_factory=dict)
  collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  largest_arrays: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  matmul_dtypes: dict[str, int] = dataclasses.field(default_factory=dict)
  # The model operations of the matrix products not in bfloat16 (each once).
  non_bf16_matmuls: list[str] = dataclasses.field(default_factory=list)
  compiler_error: str = ""
  suggestions: list[str] = dataclasses.field(default_factory=list)
  overrides: list[str] = dataclasses.field(default_factory=list)


def roofline(flops_per_step: float, per_chip: dict[str, float], build: StepBuild) -> dict:
  """A lower bound on step time from the chip table: the step's FLOPs at peak bf16, and
  the state read and written once at HBM bandwidth; whichever is longer. A bound, never
  a measurement: real steps also wait on collectives, elementwise work and the host."""
  device = build.parts.mesh.devices.flat[0]
  chip = topology.chip_for(device)
  if chip is None:
    return {}
  devices = build.parts.mesh.size
  compute_s = flops_per_step / devices / chip.peak_flops
  memory_s = (per_chip["arguments"] + per_chip["outputs"]) * GIB / chip.hbm_bandwidth
  bound_s = max(compute_s, memory_s)
  return {
    "step_s_bound": bound_s,
    "compute_s": compute_s,
    "memory_s": memory_s,
    "bound_by": "compute" if compute_s >= memory_s else "memory",
    "mfu_bound": compute_s / bound_s if bound_s else 0.0,
    "examples_per_s_per_chip_bound": build.parts.batch_size / devices / bound_s,
    "peak_flops_per_chip": chip.peak_flops,
    "hbm_bandwidth": chip.hbm_bandwidth,
    "source": chip.source,
  }


def compile_report(build: StepBuild, topology_name: str) -> Report:
  """Compiles the step with the target's compiler and reads what it says; a step the
  compiler refuses for memory is a Report with fits=False, not an exception."""
  parts, mesh = build.parts, build.parts.mesh
  devices = list(mesh.devices.flat)
  state = build.state
  per_chip = {
    "params": per_device_bytes(state.params),
    "optimizer": per_device_bytes(state.opt_state),
    "extra_state": per_device_bytes(state.extra),
    "batch": per_device_bytes(build.batch),
  }
  usable, source = usable_hbm_bytes(devices)
  start = time.time()
  traced = trainer.compile_step(parts, build.shardings).trace(state, build.batch)
  flops = progress.step_flops(traced)
  lowered = traced.lower()
  lowered_s = time.time() - start
  # A long compile (minutes for unrolled towers on a small host) says where it is.
  print(
    f"traced, counted and lowered in {lowered_s:.0f} s; XLA compiling for "
    f"{len(devices)} x {devices[0].device_kind}...",
    file=sys.stderr,
    flush=True,
  )
  error, compiled = "", None
  try:
    with _no_compilation_cache():
      # Deviceless GPU targets need options (gpu_targets); real devices and TPUs none.
      compiled = lowered.compile(compiler_options=gpu_targets.compiler_options(devices))
  except Exception as e:  # XLA's runtime error; anything but memory is re-raised.
    if not _OUT_OF_MEMORY.search(str(e)):
      raise
    error = str(e).strip().splitlines()[0]
  compile_s = time.time() - start
  report = Report(
    topology=topology_name,
    device_kind=devices[0].device_kind,
    devices=len(devices),
    mesh=dict(mesh.shape),
    batch_size=parts.batch_size,
    fits=False,
    hbm_usable_gib=usable / GIB,
    hbm_source=source,
    per_chip_gib={k: v / GIB for k, v in per_chip.items()},
    compile_s=compile_s,
    lower_s=lowered_s,
    flops_per_step=flops,
    compiler_error=error,
  )
  if compiled is None:
    required = _bytes(_REQUIRED.search(error))
    if required is not None:
      report.per_chip_gib["temporaries"] = required / GIB
    return report
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  figures = {
    "arguments": memory.argument_size_in_bytes,
    "outputs": memory.output_size_in_bytes,
    "aliased": memory.alias_size_in_bytes,
    "temporaries": memory.temp_size_in_bytes,
  }
  peak = getattr(memory, "peak_memory_in_bytes", 0) or (
    figures["arguments"] + figures["outputs"] - figures["aliased"] + figures["temporaries"]
  )
  report.per_chip_gib.update({k: v / GIB for k, v in figures.items()}, peak=peak / GIB)
  report.fits = peak <= usable
  report.roofline = roofline(flops, report.per_chip_gib, build)
  report.collectives = hlo.collective_bytes(text)
  report.largest_arrays = hlo.largest_arrays(text)
  report.matmul_dtypes = hlo.matmul_dtypes(text)
  others = {f"{dtype} {op}" for dtype, op in hlo.matmuls(text) if dtype != "bf16"}
  report.non_bf16_matmuls = sorted(others)
  return report
