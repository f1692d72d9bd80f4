"""FLOPs of a traced program counted from its jaxpr, aware of loops.

XLA's cost analysis counts a `while` body once, so a step with scanned layers
(config.model.scan_layers) reads about depth times low. Counting the jaxpr instead
multiplies each scan body by its length and recurses into every sub-program (jit, remat,
custom derivatives, the branches of a cond). Matrix products (dot_general) and
convolutions count 2 FLOPs per multiply-add, elementwise arithmetic one per element and
reductions one per input element, as XLA's cost analysis counts them (transcendentals,
which XLA counts apart, are left out), so the count matches XLA's on an unrolled model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from jax.extend import core as jex_core


def _dot_general_flops(eqn: Any) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
  contracted = math.prod(lhs[d] for d in lhs_contract)
  batch = math.prod(lhs[d] for d in lhs_batch)
  lhs_free = math.prod(n for d, n in enumerate(lhs) if d not in (*lhs_contract, *lhs_batch))
  rhs_free = math.prod(n for d, n in enumerate(rhs) if d not in (*rhs_contract, *rhs_batch))
  return 2.0 * batch * contracted * lhs_free * rhs_free


def _conv_flops(eqn: Any) -> float:
  # Each output element takes (kernel size / output features) multiply-adds, whatever
  # the feature or batch grouping.
  out = eqn.outvars[0].aval.shape
  kernel = eqn.invars[1].aval.shape
  out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
  return 2.0 * math.prod(out) * math.prod(kernel) / out_features


def _output_elements(eqn: Any) -> float:
  return float(sum(math.prod(v.aval.shape) for v in eqn.outvars))


def _input_elements(eqn: Any) -> float:
  return float(math.prod(eqn.invars[0].aval.shape))


_LEAF_FLOPS = {"dot_general": _dot_general_flops, "conv_general_dilated": _conv_flops}
# Elementwise arithmetic at one FLOP per element and reductions at one per input element,
# as XLA's cost analysis counts them (transcendentals such as exp are counted apart there,
# and left out here).
_ELEMENTWISE = [
  "add",
  "add_any",
  "sub",
  "mul",
  "div",
  "rem",
  "max",
  "min",
  "neg",
  "abs",
  "sign",
  "floor",
  "ceil",
  "round",
  "square",
  "integer_pow",
  "select_n",
  "and",
  "or",
  "not",
  "xor",
  "eq",
  "ne",
  "lt",
  "le",
  "gt",
  "ge",
]
_REDUCTIONS = ["reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"]
_LEAF_FLOPS.update(dict.fromkeys(_ELEMENTWISE, _output_elements))
_LEAF_FLOPS.update(dict.fromkeys(_REDUCTIONS, _input_elements))


def _sub_jaxprs(value: Any) -> Iterator[Any]:
  """The jaxprs held in one equation parameter (a jaxpr, a closed one, or a sequence)."""
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, list | tuple):
    for item in value:
      yield from _sub_jaxprs(item)


def _eqn_flops(eqn: Any) -> float:
  name = eqn.primitive.name
  if name in _LEAF_FLOPS:
    return _LEAF_FLOPS[name](eqn)
  if name == "cond":  # One branch runs: count the dearest.
    return max((count_flops(b) for b in _sub_jaxprs(eqn.params["branches"])), default=0.0)
  inner = sum(count_flops(j) for value in eqn.params.values() for j in _sub_jaxprs(value))
  if name == "scan":
    return inner * eqn.params["length"]
  return inner  # while (trip count unknown: once), pjit, remat, custom_jvp/vjp, shard_map...


def count_flops(jaxpr: Any) -> float:
  """Matrix FLOPs of one run of `jaxpr` (a Jaxpr or ClosedJaxpr: e.g. `jax.jit(f).trace(
  *args).jaxpr`), for the whole (global, unsharded) computation; scans times their length."""
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  return float(sum(_eqn_flops(eqn) for eqn in jaxpr.eqns))
