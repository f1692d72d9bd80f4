import pytest

from configs import clip_vitb16, cluster_vitb16, demo, flip_vitb16
from vlp_jax.config_lib import ConfigError, parse_arg


def test_cluster_config_carries_the_paper_recipe():
  config = cluster_vitb16.get_config()
  assert config.model.image.variant == "B/16" and config.batch_size == 2048
  assert config.num_epochs == 32 and config.optim.lr == 5e-4 and config.optim.warmup_steps == 2000
  masking = config.masking
  assert (masking.kind, masking.ratio, masking.min_ratio, masking.anchor_ratio) == (
    "cluster",
    0.5,
    0.3,
    0.03,
  )
  assert cluster_vitb16.get_config("kind=kmeans").masking.kind == "kmeans"


def test_baselines_and_the_unmasked_tuning_switch():
  assert clip_vitb16.get_config().masking.kind == "none"
  flip = flip_vitb16.get_config("ratio=0.75")
  assert (flip.masking.kind, flip.masking.ratio) == ("random", 0.75)
  tuning = flip_vitb16.get_config("unmasked_tuning=True")
  assert tuning.masking.kind == "none"
  assert tuning.optim.lr < flip.optim.lr and tuning.num_epochs < 1


def test_demo_takes_a_masking_arg_and_configs_are_locked():
  for kind in ("none", "random", "cluster", "kmeans"):
    assert demo.get_config(f"masking={kind}").masking.kind == kind
  config = demo.get_config()
  with pytest.raises(AttributeError, match="nope"):
    config.nope = 1


def test_parse_arg_types_values_and_rejects_unknown_keys():
  args = parse_arg("steps=5,ratio=0.25,flag=false,name=x", steps=1, ratio=0.5, flag=True, name="")
  assert (args.steps, args.ratio, args.flag, args.name) == (5, 0.25, False, "x")
  with pytest.raises(ConfigError, match="unknown config arg 'stpes'"):
    parse_arg("stpes=5", steps=1)
  with pytest.raises(ConfigError, match="'steps' wants int"):
    parse_arg("steps=five", steps=1)
