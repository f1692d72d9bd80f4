"""Evaluation tasks: one module each, in one registry that the evaluator loops over.

A task module declares a `TaskDef`: its name (config.eval.tasks, eval.py --tasks), the
prediction functions it needs from a method (`Method.predict_fns` names), whether it
reads a dataset spec from config.eval.data.<name>, its own options (config.eval.<name>,
defaults and rules) and `create(Context) -> [Task]`, which reads its data (bad paths
fail before any compute). A method that offers the
functions a task needs gets the task; adding one is a module and a line in `REGISTRY`
(or `register(TaskDef(...))` from outside the package, before the config is built).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from vlp_jax.config_lib import Rule
from vlp_jax.evaluation.tasks import (
  agent_masking,
  classify,
  compositional,
  itm_retrieval,
  linear_probe,
  nlvr2,
  retrieval,
  vqa,
  zeroshot_classification,
)
from vlp_jax.evaluation.tasks.base import Context, Result, Task, TaskDef

# name -> task, in the order eval.py's help lists them.
REGISTRY: dict[str, TaskDef] = {
  "heldout": retrieval.HELDOUT,  # The run's eval shards (+ the built-in compositional probe).
  "zeroshot_retrieval": retrieval.ZEROSHOT,
  "zeroshot_classification": zeroshot_classification.TASK,
  "linear_probe": linear_probe.TASK,
  "sugarcrepe": compositional.SUGARCREPE,
  "aro": compositional.ARO,
  "winoground": compositional.WINOGROUND,
  "crepe": compositional.CREPE,
  "svo": compositional.SVO,
  # Fine-tuned heads: VQAv2, NLVR2, classification, retrieval by a matching head.
  "vqa": vqa.TASK,
  "nlvr2": nlvr2.TASK,
  "classify_finetuned": classify.TASK,
  "itm_retrieval": itm_retrieval.TASK,
  "agent_masking": agent_masking.TASK,  # CMask: which words its agent masks.
}


def register(task: TaskDef) -> None:
  """Adds `task` (a ValueError if its name is taken). Register before the config is
  built (configs/common.py gives each data-reading task its config.eval.data field and
  each task with options its config.eval.<name>)."""
  if task.name in REGISTRY and REGISTRY[task.name] is not task:
    raise ValueError(f"an evaluation task {task.name!r} is already registered")
  REGISTRY[task.name] = task


def data_fields() -> dict[str, str]:
  """config.eval.data's fields: one dataset spec per task that reads one ("": unset)."""
  return {name: "" for name, task in REGISTRY.items() if task.reads_data}


def option_fields() -> dict[str, ml_collections.ConfigDict]:
  """config.eval.<name> of every task that declares options: their defaults."""
  return {name: task.options() for name, task in REGISTRY.items() if task.options}


def option_rules() -> dict[str, Rule]:
  """The rules of every task's options, keyed by their path ("eval.svo.threshold")."""
  return {key: rule for task in REGISTRY.values() for key, rule in task.config_rules().items()}


def _lookup(name: str) -> TaskDef:
  if name not in REGISTRY:
    raise ValueError(f"unknown evaluation task {name!r}; known: {', '.join(REGISTRY)}")
  return REGISTRY[name]


def check_servable(names: Sequence[str], available: Sequence[str], method: str) -> None:
  """Raises ValueError naming the task and the method when a task needs a prediction
  function the method does not provide (checked before any data is read)."""
  for name in names:
    task = _lookup(name)
    missing = [fn for fn in task.needs if fn not in available]
    if missing:
      raise ValueError(
        f"this run's method {method!r} offers no {task.needs_what} for evaluation task "
        f"{name!r}: it needs {', '.join(missing)}, the method has "
        f"{', '.join(sorted(available)) or 'none'}"
      )


def create_tasks(names: Sequence[str], ctx: Context, method: str = "this") -> list[Task]:
  """The tasks of `names`, in order, each built from `ctx` (its data read now)."""
  check_servable(names, list(ctx.predict_fns), method)
  return [task for name in names for task in _lookup(name).create(ctx)]


__all__ = [
  "REGISTRY",
  "Context",
  "Result",
  "Task",
  "TaskDef",
  "check_servable",
  "create_tasks",
  "data_fields",
  "option_fields",
  "option_rules",
  "register",
]
