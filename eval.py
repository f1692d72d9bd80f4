r"""Evaluates the newest (or a given) checkpoint of a run.

python eval.py --config=configs/demo.py --workdir=/tmp/demo [--step=600]
"""

from absl import app, flags
from ml_collections import config_flags

from vlp_jax import cli, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  trainer.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _STEP.value)


if __name__ == "__main__":
  app.run(main)
