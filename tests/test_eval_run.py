"""The embedder on the 8-device mesh, and eval.py end to end on checkpoints of a tiny run."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.runs import run_script
from tests.test_eval_readers import image_bytes, write_image, write_json
from vlp_jax import checkpointing, trainer
from vlp_jax.evaluation import DataError, Embedder, ImageRef, embedding
from vlp_jax.models import CLIP


def read_json(*parts: str) -> dict:
  return json.loads(Path(*parts).read_text())


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, cache_dir):
  from tests.configs import tiny

  config = tiny.get_config(f"cache_dir={cache_dir}")
  workdir = str(tmp_path_factory.mktemp("eval_run"))
  exp = trainer.create_experiment(config, workdir)
  state, _ = trainer.create_train_state(exp.method, exp.tx, exp.mesh, config.seed)
  return exp, state


def _embedder(exp, batch_size: int, read_threads: int) -> Embedder:
  return Embedder(
    exp.method.predict_fns(),
    exp.mesh,
    exp.tokenizer,
    batch_size=batch_size,
    image_size=32,
    read_threads=read_threads,
  )


def test_embedder_returns_the_models_embeddings_in_order(experiment):
  exp, state = experiment
  assert jax.device_count() == 8
  embedder = _embedder(exp, 16, 2)
  rng = np.random.default_rng(0)
  # 37 images: three batches of 16, the last one padded.
  images = [
    ImageRef(data=image_bytes(tuple(int(c) for c in rng.integers(0, 256, 3)))) for _ in range(37)
  ]
  got = embedder.images(state.params, images)
  pixels = np.stack([embedding.load_pixels(i, 32) for i in images])
  expected = exp.method.model.apply(
    {"params": state.params}, jnp.asarray(pixels), method=CLIP.encode_image
  )
  np.testing.assert_allclose(got, np.asarray(expected), atol=1e-5)
  texts = [f"a {c} circle above a small square" for c in ("red", "green", "blue")] * 7
  got = embedder.texts(state.params, texts[:20])
  tokens = jnp.asarray(exp.tokenizer(texts[:20]))
  expected = exp.method.model.apply({"params": state.params}, tokens, method=CLIP.encode_text)
  np.testing.assert_allclose(got, np.asarray(expected), atol=1e-5)
  with pytest.raises(ValueError, match="batch_size=12"):
    _embedder(exp, 12, 1)


def test_a_missing_image_fails_naming_it(experiment):
  exp, state = experiment
  embedder = _embedder(exp, 8, 1)
  with pytest.raises(DataError, match=r"nowhere/x\.jpg"):
    embedder.images(state.params, [ImageRef("/nowhere/x.jpg")])


def _save_checkpoints(exp, state, steps) -> None:
  manager = checkpointing.create_checkpoint_manager(exp.workdir, exp.config)
  for step in steps:
    # Different parameters per step, so the two evaluations differ.
    params = jax.tree.map(lambda x, s=step: x * (1.0 + 0.05 * s), state.params)
    manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state.replace(params=params))),
      force=True,
    )
  manager.wait_until_finished()


def _fixtures(root) -> dict[str, str]:
  colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
  for split, count in (("train", 6), ("test", 3)):
    for name, colour in colours.items():
      for i in range(count):
        shade = tuple(max(0, c - 12 * i) for c in colour)
        write_image(f"{root}/shapes/{split}/{name}/{i}.png", shade, (24, 24))
  images = [f"{name}/{i}.png" for name in colours for i in range(3)]
  karpathy = {
    "images": [
      {"filename": p, "split": "test", "sentences": [{"raw": f"a {p.split('/')[0]} square"}]}
      for p in images
    ]
  }
  write_json(f"{root}/karpathy.json", karpathy)
  for i in range(4):
    write_image(f"{root}/val2017/{i}.jpg", (40 * i, 90, 200 - 40 * i))

  def entry(i):
    return {"filename": f"{i}.jpg", "caption": "a red circle", "negative_caption": "a blue circle"}

  os.makedirs(f"{root}/sugarcrepe")
  for subset in ("swap_att", "replace_obj"):
    write_json(f"{root}/sugarcrepe/{subset}.json", {str(i): entry(i) for i in range(4)})
  os.makedirs(f"{root}/winoground/images")
  lines = []
  for i in range(3):
    for j in (0, 1):
      write_image(f"{root}/winoground/images/ex_{i}_img_{j}.png", (80 * j, 60 * i, 100))
    lines.append(
      json.dumps(
        {
          "id": i,
          "caption_0": "a red square left of a circle",
          "caption_1": "a circle left of a red square",
          "image_0": f"ex_{i}_img_0",
          "image_1": f"ex_{i}_img_1",
          "collapsed_tag": "Relation",
        }
      )
    )
  with open(f"{root}/winoground/examples.jsonl", "w") as f:
    f.write("\n".join(lines) + "\n")
  return {
    "zeroshot_retrieval": f"{root}/karpathy.json,images={root}/shapes/test",
    "zeroshot_classification": f"{root}/shapes",
    "linear_probe": f"{root}/shapes",
    "sugarcrepe": f"{root}/sugarcrepe,images={root}/val2017",
    "winoground": f"{root}/winoground",
  }


def test_eval_py_evaluates_every_checkpoint_and_writes_clip_benchmark_files(
  experiment, tmp_path, cache_dir
):
  exp, state = experiment
  _save_checkpoints(exp, state, (1, 2))
  data = _fixtures(str(tmp_path))
  tasks = ["heldout", *data]
  proc = run_script(  # eval.py's flags and run, in this process.
    "eval.py",
    f"--config={ROOT}/tests/configs/tiny.py:cache_dir={cache_dir}",
    f"--workdir={exp.workdir}",
    "--all_checkpoints",
    "--noprogress",
    f"--tasks={','.join(tasks)}",
    "--config.eval.linear_probe.epochs=2",
    *[f"--data.{task}={spec}" for task, spec in data.items()],
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = os.path.join(exp.workdir, "eval")
  for step in (1, 2):
    files = sorted(os.listdir(os.path.join(out, f"step_{step:08d}")))
    assert files == [
      "builtin-heldout_compositional.json",
      "builtin-heldout_zeroshot_retrieval.json",
      "karpathy_zeroshot_retrieval.json",
      "shapes_linear_probe.json",
      "shapes_zeroshot_classification.json",
      "sugar_crepe_sugarcrepe.json",
      "winoground_winoground.json",
    ]
  result = read_json(out, "step_00000002", "shapes_zeroshot_classification.json")
  assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(result)
  assert np.isnan(result["metrics"]["acc5"])  # 3 classes
  probe = read_json(out, "step_00000002", "builtin-heldout_compositional.json")
  assert set(probe["metrics"]) >= {"swap_att", "replace_att", "replace_rel", "replace_obj", "mean"}
  summary = Path(out, "summary.md").read_text()
  for task in (
    "compositional",
    "linear_probe",
    "sugarcrepe",
    "winoground",
    "zeroshot_classification",
  ):
    assert f"### {task}" in summary
  assert "| 1 | builtin-heldout |" in summary and "| 2 | builtin-heldout |" in summary
  assert "### sugarcrepe" in proc.stdout  # the table is printed too
  retrieval = read_json(exp.workdir, "eval_retrieval.json")
  assert retrieval["step"] == 2 and retrieval["dataset"] == "builtin-heldout"


def test_unknown_task_and_missing_dataset_fail_before_compute(experiment):
  exp, _ = experiment
  with pytest.raises(ValueError, match="unknown evaluation task 'sugar'"):
    exp.evaluator(["sugar"])
  with pytest.raises(ValueError, match=r"--data\.aro=<path>"):
    exp.evaluator(["aro"])
