r"""Trains a model from an ml_collections config: `python -m vlp_jax.train` (installed or
not) and the repository's train.py, which calls this module.

  python -m vlp_jax.train --config=configs/demo.py --workdir=/tmp/demo
  python -m vlp_jax.train --config=demo --workdir=/tmp/demo   # a packaged config by name
  python -m vlp_jax.train --config=configs/clip_vitb16.py:variant=S/16 --workdir=... \
      --config.batch_size=64 --config.data.train=/data/shards

--config takes a file path or a config of vlp_jax/configs by name or by README's path
("configs/<name>.py", resolved against the package where no such file exists here).
"""

from absl import app, flags

from vlp_jax import cli, trainer

_CONFIG = cli.define_config_flag()
flags.declare_key_flag("config")  # Defined in vlp_jax.cli; --helpshort lists it here.
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
