import json
from pathlib import Path

import jax
import ml_collections
import pytest
from absl import flags

from tests.runs import run_script
from vlp_jax import cli, config_lib, eval_runner, experiment, methods, sharding
from vlp_jax.config_lib import ConfigError, parse_arg
from vlp_jax.configs import clip_vitb16, cluster_vitb16, common, demo, flip_vitb16


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


# ---------------------------------------------------------------- configs in the package


def test_readmes_config_paths_and_names_resolve_to_the_package_from_any_directory(
  tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)  # No configs/ here: README's paths name the packaged files.
  packaged = Path(demo.__file__)
  for path in ("configs/demo.py", "demo", "demo.py", "/old/checkout/configs/demo.py"):
    assert Path(cli.resolve_config_file(path)) == packaged, path
  with pytest.raises(ConfigError, match=r"'configs/nope.py' does not exist.*: .*\bdemo\b"):
    cli.resolve_config_file("configs/nope.py")
  own = tmp_path / "configs" / "demo.py"  # A file of the user's own at that path wins.
  own.parent.mkdir()
  own.write_text("")
  assert cli.resolve_config_file("configs/demo.py") == "configs/demo.py"


def _parse(*argv: str) -> ml_collections.ConfigDict:
  argv = ["train.py", *argv]
  flag_values = flags.FlagValues()
  holder = cli.define_config_flag(flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return holder.value


def test_the_config_flag_overrides_the_selected_methods_block_not_anothers(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = _parse("--config=configs/demo.py:method=albef", "--config.albef.queue_size=128")
  assert (config.method, config.albef.queue_size) == ("albef", 128)
  with pytest.raises(KeyError, match="albef"):
    _parse("--config=configs/demo.py", "--config.albef.queue_size=128")
  # train.py says it in one line naming the flag (the demo's method is "contrastive").
  bad = "--config.albef.queue_size=128"
  result = run_script("train.py", "--config=configs/demo.py", bad, f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert f"error: {bad}: the config has no field 'albef'" in result.stderr


@pytest.mark.parametrize(
  ("method", "blocks"),
  [
    ("contrastive", set()),
    ("negclip", {"negclip"}),
    ("albef", {"albef"}),
    ("cmask", {"albef", "cmask"}),
    ("vlc", {"vlc"}),
    ("vlc_nlvr2", {"vlc", "finetune"}),
  ],
)
def test_a_config_carries_its_methods_blocks_and_no_other(method, blocks):
  owned = set(methods.block_owners())
  assert owned & set(common.base_config(method)) == blocks
  written = json.loads(demo.get_config().to_json_best_effort())  # What config.json holds.
  assert owned & set(written) == set()


def test_switching_a_method_keeps_shared_blocks_and_drops_the_others():
  cmask = demo.get_config("method=cmask")  # demo.use_albef, then CMask over it.
  assert cmask.albef.fusion_layer == 2 and cmask.cmask.agent_layers == 1
  config = demo.get_config("method=albef")
  config.unlock()
  common.use_method(config, "vlc")
  assert "albef" not in config and config.vlc.decoder_depth == 8


def test_a_method_without_its_block_or_with_anothers_fails_naming_the_block(tiny_config):
  mesh = sharding.create_mesh({"data": 1}, jax.devices()[:1])
  tiny_config.method = "albef"  # --config.method=albef on a contrastive config.
  with pytest.raises(ConfigError, match=r"config.method='albef' reads config\.albef"):
    experiment.check_step_config(tiny_config, mesh)
  config = demo.get_config("method=vlc")
  config.unlock()
  config.method = "contrastive"
  with pytest.raises(ConfigError, match=r"config\.vlc is a block of config\.method vlc"):
    experiment.check_step_config(config, mesh)


def test_a_block_rule_names_the_key():
  config = common.base_config("albef")
  config.albef.momentum = 1.5
  with pytest.raises(ConfigError, match=r"config\.albef\.momentum=1\.5: must be in \[0, 1\]"):
    config_lib.check_rules(config, common.config_rules("albef"))


def test_a_task_option_rule_names_the_key():
  config = common.base_config()
  config.eval.svo.threshold = 1.5  # A cosine similarity.
  with pytest.raises(ConfigError, match=r"config\.eval\.svo\.threshold=1\.5: must be in \[-1, 1\]"):
    config_lib.check_rules(config, common.config_rules("contrastive"))


def test_a_run_written_with_every_methods_block_still_loads(tmp_path):
  # config.json of a run before the methods' own blocks: every method's block in it.
  values = json.loads(common.base_config("vlc").to_json_best_effort())
  values.update(json.loads(common.base_config("cmask").to_json_best_effort()))
  (tmp_path / "config.json").write_text(json.dumps(values))
  config = eval_runner.load_run_config(str(tmp_path))
  assert config.method == "cmask" and "vlc" not in config and config.albef.queue_size == 65_536


def test_a_run_written_before_the_tasks_declared_their_options_still_loads(tmp_path):
  # config.json of a run whose task options sat in config.eval and config.finetune.
  values = json.loads(common.base_config("vlc_retrieval").to_json_best_effort())
  for name in ("zeroshot_classification", "svo", "itm_retrieval"):
    del values["eval"][name]
  values["eval"].update(templates="/prompts.txt", svo_threshold=0.25)
  values["finetune"].update(shortlist="/runs/clip", shortlist_k=16)
  (tmp_path / "config.json").write_text(json.dumps(values))
  config = eval_runner.load_run_config(str(tmp_path))
  assert config.eval.zeroshot_classification.templates == "/prompts.txt"
  assert config.eval.svo.threshold == 0.25 and "shortlist" not in config.finetune
  assert (config.eval.itm_retrieval.shortlist, config.eval.itm_retrieval.shortlist_k) == (
    "/runs/clip",
    16,
  )
