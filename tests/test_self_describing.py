"""A run describes itself: eval.py and the open_clip export read what the trainer wrote
into the workdir (config.json, tokenizer.json), and a run needs no vocab file of its own.

One training run (train.py, clip_bpe, non-default pixel statistics) serves every test that
needs checkpoints.
"""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests import runs
from tests.configs import tiny
from tests.conftest import ROOT
from vlp_jax import eval_runner as runner
from vlp_jax.config_lib import ConfigError
from vlp_jax.evaluation import ImageRef, embedding
from vlp_jax.input_pipeline import records, tokenizers
from vlp_jax.models import CLIP
from vlp_jax.weights import convert

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
RUN_FLAGS = (
  "--config.data.tokenizer=clip_bpe",
  f"--config.data.vocab_file={tokenizers.CLIP_BPE_MERGES}",
  f"--config.model.image.mean={MEAN}",
  f"--config.model.image.std={STD}",
)
HELDOUT = "builtin-heldout_zeroshot_retrieval.json"


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir) -> str:
  """The workdir of a 4-step tiny run trained with CLIP's BPE and its own mean / std."""
  workdir = str(tmp_path_factory.mktemp("self_describing_run"))
  config = f"tests/configs/tiny.py:cache_dir={cache_dir}"
  proc = runs.run_train_in_process(config, workdir, *RUN_FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def run_eval_py(*flags: str) -> runs.ScriptResult:
  """`python eval.py --noprogress <flags>`, run in this process."""
  return runs.run_script("eval.py", "--noprogress", *flags)


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------- the run's config


def test_load_run_config_gives_back_the_config_the_run_trained_with(run, cache_dir):
  config = runner.load_run_config(run)
  expected = tiny.get_config(f"cache_dir={cache_dir}")
  with expected.unlocked():
    expected.data.tokenizer = "clip_bpe"
    expected.data.vocab_file = tokenizers.CLIP_BPE_MERGES
    expected.model.image.mean, expected.model.image.std = MEAN, STD
  assert config.to_json(sort_keys=True) == expected.to_json(sort_keys=True)
  assert config.model.image.mean == MEAN and isinstance(config.data.crop_scale, tuple)
  assert config.model.text.vocab_size is None
  with pytest.raises(AttributeError):  # Locked, as a config file's.
    config.model.typo = 1


def test_load_run_config_restores_types_and_references(tmp_path):
  values = {"num_epochs": 2, "model": {"image": {"mean": [0.1, 0.2, 0.3]}}}
  (tmp_path / "config.json").write_text(json.dumps(values))
  config = runner.load_run_config(str(tmp_path))
  assert config.num_epochs == 2.0 and isinstance(config.num_epochs, float)
  assert config.model.image.mean == (0.1, 0.2, 0.3)
  # Fields left at None keep their FieldReference type: a later override is checked.
  assert config.model.image.get_ref("width").get_type() is int
  with config.unlocked(), pytest.raises(TypeError):
    config.model.image.width = "wide"


def test_unknown_fields_and_missing_files_fail_naming_them(tmp_path):
  values = {"seed": 1, "modle": {"x": 1}, "data": {"tokeniser": "clip_bpe"}}
  (tmp_path / "config.json").write_text(json.dumps(values))
  with pytest.raises(ConfigError, match=r"config\.modle, config\.data\.tokeniser"):
    runner.load_run_config(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"batch_size": "big"}))
  with pytest.raises(ConfigError, match=r"config\.batch_size='big'"):
    runner.load_run_config(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"empty/config\.json does not exist"):
    os.makedirs(tmp_path / "empty")
    runner.load_run_config(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match=r"no run at .*/nowhere"):
    runner.load_run_config(str(tmp_path / "nowhere"))


def test_a_config_with_another_tokenizer_fails_naming_both(run, cache_dir):
  wordpiece = runs.small_tokenizer(runs.small_builtin(cache_dir))
  with pytest.raises(ConfigError, match=r"clip_bpe tokenizer of 49408 .* wordpiece"):
    runner.check_tokenizer(run, wordpiece, "wordpiece")
  clip_bpe = tokenizers.create_tokenizer("clip_bpe", tokenizers.CLIP_BPE_MERGES, 24)
  runner.check_tokenizer(run, clip_bpe, "clip_bpe")


# ------------------------------------------------------------------------ eval.py


def test_eval_py_with_only_the_workdir_reproduces_the_final_metrics(run, tmp_path):
  proc = run_eval_py(f"--workdir={run}", f"--output_dir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  trained = read_json(os.path.join(run, "eval", "step_00000004", HELDOUT))
  evaluated = read_json(os.path.join(tmp_path, "step_00000004", HELDOUT))
  assert evaluated["metrics"] == trained["metrics"]


def test_eval_py_overrides_fields_of_the_run_config(run, tmp_path):
  proc = run_eval_py(
    f"--workdir={run}", f"--output_dir={tmp_path}", "--config.eval.recall_ks=(1,2)"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = read_json(os.path.join(tmp_path, "step_00000004", HELDOUT))["metrics"]
  assert "image_retrieval_recall@2" in metrics and "image_retrieval_recall@5" not in metrics


@pytest.mark.parametrize("with_config", [False, True])
def test_a_mistyped_workdir_fails_in_one_line_and_is_not_created(tmp_path, with_config):
  missing = str(tmp_path / "typo")
  flags = [f"--config={ROOT}/tests/configs/tiny.py"] if with_config else []
  proc = run_eval_py(f"--workdir={missing}", *flags)
  assert proc.returncode == 1
  assert (
    proc.stderr.strip().splitlines()[-1]
    == f"eval.py: no run at {missing}: the directory does not exist"
  )
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(missing)


# -------------------------------------------------------------------- open_clip export


def _export(run: str, dst: str) -> runs.ScriptResult:
  """`python -m vlp_jax.weights.convert --to=open_clip`, run in this process."""
  args = ["--to=open_clip", f"--src={run}", f"--dst={dst}"]
  umask = os.umask(0o022)  # The usual one: files 0644.
  try:
    return runs.run_main(lambda: convert.main(args))
  finally:
    os.umask(umask)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> str:
  dst = str(tmp_path_factory.mktemp("open_clip_export"))
  proc = _export(run, dst)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # absl's warning lines start "W<mmdd>"; a valid checkpoint gives none.
  assert not re.search(r"^W\d{4} ", proc.stderr, re.MULTILINE), proc.stderr
  assert "_CHECKPOINT_METADATA" not in proc.stderr
  return dst


def _our_clip(run: str) -> tuple[CLIP, dict]:
  params, info = convert.read_params(run)
  fields = {**info["model"]}
  fields["text"] = {**fields["text"], "vocab_size": info["tokenizer"]["vocab_size"]}
  return convert.model_from_fields(fields), params


def test_open_clip_loads_the_export_with_the_runs_preprocessing_and_tokenizer(
  run, exported, tmp_path
):
  import open_clip
  import torch

  for name in ("open_clip_config.json", "open_clip_model.safetensors"):
    assert os.stat(os.path.join(exported, name)).st_mode & 0o777 == 0o644
  path = str(tmp_path / "wide.png")  # Not square: the resize and the crop both matter.
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (37, 53, 3), np.uint8)).save(path)
  texts = ["a small red circle left of a large blue square", "a Green TRIANGLE"]

  model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{exported}")
  model.eval()
  tokenizer = open_clip.get_tokenizer(f"local-dir:{exported}")
  with torch.no_grad():
    theirs_image = model.encode_image(preprocess(Image.open(path))[None], normalize=True)
    their_tokens = tokenizer(texts)
    theirs_text = model.encode_text(their_tokens, normalize=True)

  clip, params = _our_clip(run)
  our_tokens = tokenizers.create_tokenizer("clip_bpe", tokenizers.CLIP_BPE_MERGES, 24)(texts)
  np.testing.assert_array_equal(their_tokens.numpy(), our_tokens)
  pixels = embedding.load_pixels(ImageRef(path), 32)[None]
  ours_image = clip.apply({"params": params}, jnp.asarray(pixels), method=CLIP.encode_image)
  ours_text = clip.apply({"params": params}, jnp.asarray(our_tokens), method=CLIP.encode_text)
  np.testing.assert_allclose(theirs_image.numpy(), np.asarray(ours_image), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(theirs_text.numpy(), np.asarray(ours_text), rtol=1e-5, atol=1e-6)


def test_open_clip_config_carries_the_runs_pixel_statistics(exported):
  config = read_json(os.path.join(exported, "open_clip_config.json"))
  assert config["preprocess_cfg"] == {
    "size": 32,
    "mean": list(MEAN),
    "std": list(STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
  }


def test_a_single_safetensors_file_is_readable(run, tmp_path):
  dst = str(tmp_path / "model.safetensors")
  proc = _export(run, dst)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.stat(dst).st_mode & 0o777 == 0o644


# --------------------------------------------------------------- a run's own vocabulary


def _caption_shards(directory: str, captions: list[str], num_shards: int = 2) -> list[str]:
  rows = [records.encode_record(f"k{i}", b"\xff", c) for i, c in enumerate(captions)]
  rows.insert(3, b"not a record")  # Skipped, as the training pipeline skips it.
  return records.write_shards(rows, directory, "train", num_shards)


def test_ensure_learned_vocab_learns_once_and_reuses(tmp_path, monkeypatch):
  words = ["red", "green", "blue", "circle", "square", "triangle", "left", "right"]
  captions = [f"a {words[i % 3]} {words[3 + i % 3]} {words[6 + i % 2]} of it" for i in range(90)]
  shards = _caption_shards(str(tmp_path / "shards"), captions)
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  path = tokenizers.ensure_learned_vocab(workdir, shards, vocab_size=200)
  assert path == os.path.join(workdir, "vocab.txt")
  vocab = tokenizers.read_vocab(path)
  assert vocab[:5] == list(tokenizers.RESERVED_TOKENS) and set(words) <= set(vocab)
  tokenizer = tokenizers.create_tokenizer("wordpiece", path, 12)
  assert tokenizer.unk_id not in tokenizer(captions)
  assert os.listdir(workdir) == ["vocab.txt"]  # No temporary file left behind.

  def fail(*args, **kwargs):
    raise AssertionError("learned again")

  monkeypatch.setattr(tokenizers, "learn_wordpiece_vocab", fail)
  assert tokenizers.ensure_learned_vocab(workdir, shards) == path


def test_shard_captions_spreads_over_the_shards_and_skips_bad_records(tmp_path):
  captions = [f"caption {i}" for i in range(40)]
  shards = _caption_shards(str(tmp_path), captions)
  assert sorted(tokenizers.shard_captions(shards, 1_000)) == sorted(captions)
  some = tokenizers.shard_captions(shards, 8)
  assert 6 <= len(some) <= 8 and len(set(some)) == len(some)
  for shard in shards:
    assert set(some) & set(tokenizers.shard_captions([shard], 1_000))


def test_learning_from_shards_without_captions_fails(tmp_path):
  shards = records.write_shards([b"junk"] * 3, str(tmp_path), "train", 1)
  with pytest.raises(ValueError, match="no caption"):
    tokenizers.ensure_learned_vocab(str(tmp_path), shards)


# Need the lead's wiring in create_experiment (default_vocab_file / ensure_learned_vocab).


def test_clip_bpe_needs_no_vocab_file(tiny_config, tmp_path):
  from vlp_jax import trainer

  tiny_config.data.tokenizer = "clip_bpe"
  exp = trainer.create_experiment(tiny_config, str(tmp_path))
  assert exp.tokenizer.vocab_size == 49408


def test_training_shards_without_a_vocab_file_get_a_learned_one(tiny_config, cache_dir, tmp_path):
  from vlp_jax import trainer

  data = runs.small_builtin(cache_dir)
  tiny_config.data.train = ",".join(data.train_shards)
  tiny_config.data.eval = ",".join(data.heldout_shards)
  exp = trainer.create_experiment(tiny_config, str(tmp_path))
  learned = os.path.join(tmp_path, "vocab.txt")
  assert exp.tokenizer.vocab == tokenizers.read_vocab(learned)
  assert (
    trainer.create_experiment(tiny_config, str(tmp_path)).tokenizer.vocab == exp.tokenizer.vocab
  )
