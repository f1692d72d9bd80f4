"""Experiment configs, installed with the package: each file defines get_config(arg).

`--config=configs/<name>.py` (README's paths) and `--config=<name>` name these files from
any directory (vlp_jax.cli.resolve_config_file); common.py holds the base config.
"""
