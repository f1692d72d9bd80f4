"""NVIDIA GPUs to compile for on a host without one (`vlp_jax.preflight --topology=h100:8`).

XLA compiles for a GPU it cannot see from a description of it, a GpuTargetConfig text
proto. XLA keeps them for common GPUs (openxla/xla, xla/backends/gpu/target_config/specs/);
the ones named in GPU_TARGETS ship here as data, each file's header naming its source
commit and what was changed. Compiling needs jax's CUDA plugin (INSTALL_LINE); reading
the specs (`parse_text_proto`, `target_info`) does not.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import re
from typing import Any

# What the plugin needs; the same line as requirements.txt's GPU note.
INSTALL_LINE = 'pip install "jax[cuda12]==0.10.2"'
# Deviceless compiles only: XLA's Triton GEMM autotuner has no GPU to time its tilings on
# and was seen to fail at odd shapes such as ViT-B/16's 197 tokens (issue 33); cuBLAS GEMMs
# need no autotuning. (The tiny step and CLIP ViT-B/16's at batch 8 with cuDNN attention
# compiled with it too, 2026-12-07: the failure is shape-dependent.)
DEVICELESS_COMPILER_OPTIONS: dict[str, Any] = {"xla_gpu_enable_triton_gemm": False}


# --topology family -> the shipped spec (chip figures for rooflines: vlp_jax.topology.CHIPS).
GPU_TARGETS: dict[str, str] = {
  "h100": "h100_sxm.txtpb",
  "h200": "h200.txtpb",
  "a100": "a100_sxm_80.txtpb",
}
# How many GPUs one host holds: "h100:8" is an 8-GPU node (XLA's topology "1x1x8").
MAX_GPUS_PER_HOST = 8


def spec_text(name: str) -> str:
  """The GpuTargetConfig text proto shipped for `name` (a GPU_TARGETS key)."""
  return importlib.resources.files(__package__).joinpath(GPU_TARGETS[name]).read_text()


_TOKEN = re.compile(
  r'\s*(?:(#[^\n]*)|([A-Za-z_][\w.]*)\s*(:)?\s*|(\{)|(\})|("(?:[^"\\]|\\.)*"|[^\s{}#]+))'
)


def parse_text_proto(text: str) -> dict[str, list[Any]]:
  """The structure of a protobuf text-format message, without its schema: {field: [values]}
  with messages as nested dicts and scalars as strings (quotes stripped). Enough to check
  a shipped spec is well formed and to read figures from it; ValueError where it is not."""
  stack: list[dict[str, list[Any]]] = [{}]
  pos, pending = 0, None  # pending: a field name waiting for its value.
  while pos < len(text.rstrip()):
    match = _TOKEN.match(text, pos)
    if not match or match.end() == pos:
      raise ValueError(f"text proto: unreadable at offset {pos}: {text[pos : pos + 40]!r}")
    pos = match.end()
    comment, name, colon, opening, closing, scalar = match.groups()
    if comment:
      continue
    if name and pending is None:
      pending = name
      if colon or text[pos : pos + 1] == "{":
        continue
      raise ValueError(f"text proto: field {name!r} at offset {pos} has no value")
    if opening and pending is not None:
      child: dict[str, list[Any]] = {}
      stack[-1].setdefault(pending, []).append(child)
      stack.append(child)
      pending = None
    elif closing and pending is None and len(stack) > 1:
      stack.pop()
    elif pending is not None and (scalar or name):
      value = scalar or name
      stack[-1].setdefault(pending, []).append(value.strip('"') if value else value)
      pending = None
    else:
      raise ValueError(f"text proto: unexpected {match.group().strip()!r} at offset {pos}")
  if len(stack) != 1 or pending is not None:
    raise ValueError("text proto: unbalanced braces or a field without a value at the end")
  return stack[0]


@dataclasses.dataclass(frozen=True)
class TargetInfo:
  """What the pre-flight reads from a shipped spec."""

  device_kind: str  # As jax reports it for the topology's devices.
  memory_bytes: int  # device_memory_size: the whole HBM, before any preallocation share.
  compute_capability: tuple[int, int]


def target_info(name: str) -> TargetInfo:
  """The device kind, memory and compute capability in `name`'s shipped spec."""
  spec = parse_text_proto(spec_text(name))
  info = spec["gpu_device_info"][0]
  capability = info["cuda_compute_capability"][0]
  return TargetInfo(
    device_kind=info.get("name", spec["device_description_str"])[0],
    memory_bytes=int(info["device_memory_size"][0]),
    compute_capability=(int(capability["major"][0]), int(capability.get("minor", ["0"])[0])),
  )


# jax preallocates this share of a GPU's memory for XLA (XLA_PYTHON_CLIENT_MEM_FRACTION's
# default, jax docs "GPU memory allocation"): what a step may use unless the user changes it.
DEFAULT_MEM_FRACTION = 0.75


def memory_limit_bytes(device: Any) -> float | None:
  """What a step on `device` (a shipped target's) may use by default: its memory times
  DEFAULT_MEM_FRACTION. XLA's GPU compiler does not refuse a step that exceeds it (the TPU
  compiler does), so the pre-flight compares. None for a device of no shipped target."""
  for name in GPU_TARGETS:
    info = target_info(name)
    if device.device_kind == info.device_kind:
      return info.memory_bytes * DEFAULT_MEM_FRACTION
  return None


def compiler_options(devices: Any) -> dict[str, Any]:
  """Options for compiling over `devices`: DEVICELESS_COMPILER_OPTIONS for GPUs this
  process cannot see (a shipped target's), none otherwise (real GPUs autotune)."""
  first = next(iter(devices))
  deviceless = first.platform == "gpu" and first not in _local_devices()
  return dict(DEVICELESS_COMPILER_OPTIONS) if deviceless else {}


def _local_devices() -> list[Any]:
  import jax

  return jax.local_devices()


def parse_topology(topology: str) -> tuple[str, int] | None:
  """ "h100" -> ("h100", 1), "h200:8" -> ("h200", 8); None for a name that is not a GPU's
  (a TPU topology such as "v5e:4x4"); ValueError naming the flag for a bad GPU count."""
  name, _, count = topology.lower().partition(":")
  if name not in GPU_TARGETS:
    return None
  if not count:
    return name, 1
  if not count.isdigit() or not 1 <= int(count) <= MAX_GPUS_PER_HOST:
    raise ValueError(
      f"--topology={topology}: the GPU count after ':' must be 1..{MAX_GPUS_PER_HOST} "
      f"(one host; e.g. {name}:8)"
    )
  return name, int(count)


def cuda_plugin_installed() -> bool:
  """Whether jax's CUDA plugin (the GPU compiler) is importable in this environment."""
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # No jax plugin at all.
    return False


def topology_devices(topology: str) -> list[Any]:
  """The devices of `topology` ("h100", "h100:8", ...) to build a mesh over and compile
  for, with no GPU present (jax.experimental.topologies). Compile with
  DEVICELESS_COMPILER_OPTIONS. RuntimeError naming the flag and the install line where
  jax's CUDA plugin is missing."""
  parsed = parse_topology(topology)
  if parsed is None:
    raise ValueError(f"--topology={topology}: not a GPU (one of {sorted(GPU_TARGETS)})")
  name, count = parsed
  if not cuda_plugin_installed():
    raise RuntimeError(
      f"--topology={topology} compiles with jax's CUDA plugin, which is not installed: "
      f"{INSTALL_LINE} (a GPU is not needed)"
    )
  from jax.experimental import topologies

  description = topologies.get_topology_desc(
    platform="cuda", topology=f"1x1x{count}", target_config=spec_text(name)
  )
  return list(description.devices)
