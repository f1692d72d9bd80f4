r"""Evaluates the newest (or a given, or every) checkpoint of a run.

python eval.py --workdir=/tmp/demo [--step=600 | --all_checkpoints] [--config.eval.batch_size=64]
python eval.py --config=configs/demo.py --workdir=/tmp/demo  # another config than the run's
python eval.py --workdir=... --tasks=zeroshot_retrieval,sugarcrepe,winoground \
    --data.zeroshot_retrieval=/data/coco/dataset_coco.json,images=/data/coco \
    --data.sugarcrepe=/data/sugar-crepe/data,images=/data/coco/val2017 \
    --data.winoground=/data/winoground/data

Writes <output_dir>/step_<N>/<dataset>_<task>.json (CLIP_benchmark's layout) and
<output_dir>/summary.md (default output_dir: <workdir>/eval). Without --config the run's
own config (<workdir>/config.json: model, tokenizer, data) is used, and --config.<field>=...
override its fields.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from vlp_jax import cli
from vlp_jax import eval_runner as runner
from vlp_jax.config_lib import ConfigError
from vlp_jax.evaluation import REGISTRY, task_names

_CONFIG_HELP = (
  "Config file (path[:arg]) or packaged config name; default: the run's <workdir>/config.json."
)
_CONFIG: flags.FlagHolder | None = None  # define_config_flag's, before the flags are parsed.
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
_ALL = flags.DEFINE_bool("all_checkpoints", False, "Evaluate every checkpoint of the run.")
_TASKS = flags.DEFINE_string(
  "tasks", None, f"Comma list of {', '.join(REGISTRY)}; default: config.eval.tasks."
)
_OUTPUT = flags.DEFINE_string("output_dir", "", "Where results go; default: <workdir>/eval.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Draw progress bars.")
# One --data.<task> per task registered by now that reads a dataset (the others:
# --config.eval.data.<task>).
_DATA = {
  name: flags.DEFINE_string(
    f"data.{name}", None, f"Dataset of {name}: path[,key=value...]; sets config.eval.data.{name}."
  )
  for name, task in REGISTRY.items()
  if task.reads_data
}
flags.mark_flags_as_required(["workdir"])


def define_config_flag(argv: list[str]) -> flags.FlagHolder:
  """--config: a config file, or else the config.json of --workdir's run.

  config_flags parses --config.<field> overrides against the config its flag is defined
  with, so without --config the run's config must be read before absl parses argv.
  """
  peek = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=peek)
  flags.DEFINE_string("config", None, "", flag_values=peek)
  try:
    peek(argv, known_only=True)
  except flags.Error:
    peek.workdir = None  # app.run's parse reports the malformed flag.
  if peek.config is not None or peek.workdir is None:
    holder = cli.define_config_flag(help_string=_CONFIG_HELP)
    flags.declare_key_flag("config")  # Defined in vlp_jax.cli; --helpshort lists it here.
    return holder
  try:
    config = runner.load_run_config(peek.workdir)
  except (FileNotFoundError, ConfigError) as e:
    sys.exit(f"eval.py: {e}")
  return config_flags.DEFINE_config_dict("config", config, _CONFIG_HELP)


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
  try:
    runner.evaluate_run(
      config,
      _WORKDIR.value,
      tasks=task_names(_TASKS.value) if _TASKS.value is not None else None,
      step=_STEP.value,
      all_checkpoints=_ALL.value,
      output_dir=_OUTPUT.value,
      show_progress=_PROGRESS.value,
    )
  except (FileNotFoundError, ConfigError) as e:  # Named paths and keys: no traceback needed.
    sys.exit(f"eval.py: {e}")


if __name__ == "__main__":
  _CONFIG = define_config_flag(sys.argv)
  cli.run(main)
