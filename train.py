r"""Trains a model from an ml_collections config.

  python train.py --config=configs/demo.py --workdir=/tmp/demo
  python train.py --config=configs/clip_vitb16.py:variant=S/16 --workdir=... \
      --config.batch_size=64 --config.data.train=/data/shards
"""

from absl import app, flags
from ml_collections import config_flags

from vlp_jax import cli, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  cli.initialize_distributed()
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
