r"""Trains a model from an ml_collections config: vlp_jax/train.py, which also runs as
`python -m vlp_jax.train` (installed, from any directory).

  python train.py --config=configs/demo.py --workdir=/tmp/demo
  python train.py --config=configs/clip_vitb16.py:variant=S/16 --workdir=... \
      --config.batch_size=64 --config.data.train=/data/shards
"""

from absl import flags

import vlp_jax.train as entry
from vlp_jax import cli

main = entry.main
flags.adopt_module_key_flags(entry)  # --helpshort lists --config and --workdir.

if __name__ == "__main__":
  cli.run(main)
