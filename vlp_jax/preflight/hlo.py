"""What a compiled step's optimized HLO text says: collectives by kind and bytes (loop
bodies times their trip count), its largest arrays, and the dtypes of its matrix products.

Shapes in the optimized HLO of an SPMD program are per device.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ITEM_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1}
_ITEM_BYTES.update({f"{t}16": 2 for t in "sfub"} | {"bf16": 2})
_ITEM_BYTES.update({f"{t}32": 4 for t in "suf"} | {f"{t}64": 8 for t in "suf"} | {"c64": 8})
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_CALLED = re.compile(
  r"\b(body|condition|calls|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  shape: str  # The result type as the HLO writes it: "bf16[8,197,768]{...}" or a tuple.
  opcode: str
  rest: str  # Operands and attributes.

  @property
  def bytes(self) -> float:
    return shape_bytes(self.shape)

  @property
  def op_name(self) -> str:
    match = _OP_NAME.search(self.rest)
    return match.group(1) if match else ""


def shape_bytes(shape: str) -> float:
  """Bytes of every array in an HLO result type (a tuple's elements summed)."""
  return sum(
    _ITEM_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    for dtype, dims in _ARRAY.findall(shape.split("{", 1)[0] if "(" not in shape else shape)
  )


def parse_computations(hlo: str) -> tuple[dict[str, list[Instruction]], str]:
  """{computation name: its instructions} and the entry computation's name."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in hlo.splitlines():
    if current is None:
      if match := _COMPUTATION.match(line):
        current = match.group(1)
        computations[current] = []
        entry = current if line.startswith("ENTRY") else entry
    elif line.strip() == "}":
      current = None
    elif match := _INSTRUCTION.match(line):
      computations[current].append(Instruction(*match.groups()))
  return computations, entry


def _trip_count(
  loop: Instruction, condition: str, computations: dict[str, list[Instruction]]
) -> int:
  """A while loop's trip count: XLA's known_trip_count where it is written (GPU), else
  the bound its condition compares the counter with (a scan: `i < length` from 0);
  1 where neither is there."""
  if match := _TRIP_COUNT.search(loop.rest):
    return int(match.group(1))
  bounds = [
    int(m.group(1))
    for inst in computations.get(condition.strip("%"), ())
    if inst.opcode == "constant" and (m := re.match(r"(\d+)\)", inst.rest))
  ]
  return bounds[0] if len(bounds) == 1 else 1


def execution_counts(computations: dict[str, list[Instruction]], entry: str) -> dict[str, int]:
  """How many times each computation runs per call of the entry: a while body (and its
  condition) times its known trip count, nested loops multiplied."""
  counts: dict[str, int] = collections.defaultdict(int)

  def visit(name: str, times: int) -> None:
    counts[name] += times
    for inst in computations.get(name, ()):
      called = _CALLED.findall(inst.rest)
      trips = _trip_count(inst, dict(called).get("condition", ""), computations)
      for kind, callees in called:
        for callee in re.split(r"[{},\s%]+", callees):
          if callee in computations:
            visit(callee, times * (trips if kind in ("body", "condition") else 1))

  visit(entry, 1)
  return dict(counts)


def collective_bytes(hlo: str) -> dict[str, dict[str, float]]:
  """{kind: {"count": ops run per step, "bytes": their per-device result bytes}} for each
  collective kind in COLLECTIVES; async pairs (-start/-done) count once, at the start."""
  computations, entry = parse_computations(hlo)
  counts = execution_counts(computations, entry)
  out = {kind: {"count": 0.0, "bytes": 0.0} for kind in COLLECTIVES}
  for name, instructions in computations.items():
    for inst in instructions:
      kind = inst.opcode.removesuffix("-start")
      if kind in out and not inst.opcode.endswith("-done"):
        times = counts.get(name, 0)
        shape = inst.shape
        if inst.opcode.endswith("-start") and shape.startswith("("):
          shape = shape[1:].split(", ", 1)[-1]  # (operand, result, ...): the result.
        out[kind]["count"] += times
        out[kind]["bytes"] += times * shape_bytes(shape)
  return {kind: stats for kind, stats in out.items() if stats["count"]}


def largest_arrays(hlo: str, top: int = 8) -> list[dict[str, object]]:
  """The largest array results of the step's instructions (per device), with the model
  operation they come from: where a step that does not fit spends its memory."""
  computations, _ = parse_computations(hlo)
  seen: dict[tuple[str, str], dict[str, object]] = {}
  for instructions in computations.values():
    for inst in instructions:
      if inst.shape.startswith("(") or inst.opcode in ("parameter", "constant", "bitcast"):
        continue
      key = (inst.shape.split("{", 1)[0], inst.op_name)
      if key not in seen:
        seen[key] = {"shape": key[0], "bytes": inst.bytes, "op": inst.op_name or inst.opcode}
  return sorted(seen.values(), key=lambda row: -float(row["bytes"]))[:top]


def matmuls(hlo: str) -> list[tuple[str, str]]:
  """(first operand's dtype, model operation) of every matrix product (dot, convolution)
  in the step; an operand fused into a kernel is read from the fusion's parameter."""
  computations, _ = parse_computations(hlo)
  types = {inst.name: inst.shape for insts in computations.values() for inst in insts}
  found = []
  for instructions in computations.values():
    for inst in instructions:
      if inst.opcode in ("dot", "convolution"):
        operand = re.match(r"\s*%?([\w.\-]+)", inst.rest)
        dtype = _ARRAY.search(types.get(operand.group(1), "") if operand else "")
        found.append((dtype.group(1) if dtype else "?", inst.op_name))
  return found


def matmul_dtypes(hlo: str) -> dict[str, int]:
  """How many matrix products take operands of each dtype."""
  return dict(collections.Counter(dtype for dtype, _ in matmuls(hlo)))
