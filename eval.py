r"""Evaluates the newest (or a given, or every) checkpoint of a run.

python eval.py --config=configs/demo.py --workdir=/tmp/demo [--step=600 | --all_checkpoints]
python eval.py --config=... --workdir=... --tasks=zeroshot_retrieval,sugarcrepe,winoground \
    --data.zeroshot_retrieval=/data/coco/dataset_coco.json,images=/data/coco \
    --data.sugarcrepe=/data/sugar-crepe/data,images=/data/coco/val2017 \
    --data.winoground=/data/winoground/data

Writes <output_dir>/step_<N>/<dataset>_<task>.json (CLIP_benchmark's layout) and
<output_dir>/summary.md (default output_dir: <workdir>/eval).
"""

from absl import app, flags
from ml_collections import config_flags

from vlp_jax import cli
from vlp_jax.evaluation import TASKS, runner, task_names

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
_ALL = flags.DEFINE_bool("all_checkpoints", False, "Evaluate every checkpoint of the run.")
_TASKS = flags.DEFINE_string(
  "tasks", None, f"Comma list of {', '.join(TASKS)}; default: config.eval.tasks."
)
_OUTPUT = flags.DEFINE_string("output_dir", "", "Where results go; default: <workdir>/eval.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Draw progress bars.")
_DATA = {
  task: flags.DEFINE_string(
    f"data.{task}", None, f"Dataset of {task}: path[,key=value...]; sets config.eval.data.{task}."
  )
  for task in TASKS
  if task != "heldout"
}
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _STEP.value is not None and _ALL.value:
    raise app.UsageError("--step and --all_checkpoints exclude each other")
  cli.quiet_library_logs()
  cli.initialize_distributed()
  config = _CONFIG.value
  with config.unlocked():
    for task, flag in _DATA.items():
      if flag.value is not None:
        config.eval.data[task] = flag.value
  runner.evaluate_run(
    config,
    _WORKDIR.value,
    tasks=task_names(_TASKS.value) if _TASKS.value is not None else None,
    step=_STEP.value,
    all_checkpoints=_ALL.value,
    output_dir=_OUTPUT.value,
    show_progress=_PROGRESS.value,
  )


if __name__ == "__main__":
  app.run(main)
