"""Evaluation tasks are a registry the evaluator does not know: a method defined here,
offering only embeddings, gets zero-shot retrieval and classification, and a task
registered here runs through eval.py, neither with an edit outside this module."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import ROOT
from tests.runs import run_script
from tests.test_eval_readers import write_image, write_json
from vlp_jax import checkpointing, trainer
from vlp_jax.config_lib import ConfigError, in_range
from vlp_jax.evaluation import tasks
from vlp_jax.input_pipeline import classification_readers as cls_readers
from vlp_jax.methods import METHODS, Method, MethodContext

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


class ColourMatcher(Method):
  """Embeds an image as its mean colour (centred, unit length) and a caption as the
  colour words it names: a method that offers embeddings and nothing else."""

  name = "colour"

  def __init__(self, ctx: MethodContext):
    self.image_size = ctx.config.model.image.image_size
    rows = np.asarray(ctx.tokenizer(list(COLOURS)))
    common = set.intersection(*(set(r.tolist()) for r in rows))  # [CLS], [SEP], padding.
    words = [sorted(set(r.tolist()) - common) for r in rows]
    assert all(len(w) == 1 for w in words), words  # One token per colour word.
    self.colour_ids = jnp.asarray([w[0] for w in words])

  def batch_spec(self, batch_size):
    shape = (batch_size, self.image_size, self.image_size, 3)
    return {"image": jax.ShapeDtypeStruct(shape, jnp.uint8)}

  def init(self, rng):
    return {"scale": jnp.ones(())}, {}

  def loss(self, params, extra, batch, rng, step):
    loss = (params["scale"] - 1) ** 2
    return loss, ({"loss": loss}, extra)

  def predict_fns(self):
    def unit(x):
      return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def embed_image(params, images):
      rgb = images.astype(jnp.float32).mean(axis=(1, 2))
      return unit(rgb - rgb.mean(axis=-1, keepdims=True)) * params["scale"]

    def embed_text(params, tokens):
      named = (tokens[..., None] == self.colour_ids).sum(axis=1).astype(jnp.float32)
      return unit(named + 1e-6)

    return {"embed_image": embed_image, "embed_text": embed_text}


@pytest.fixture
def colour_method(monkeypatch):
  monkeypatch.setitem(METHODS, "colour", ColourMatcher)


def write_colour_sets(root: str) -> dict[str, str]:
  """Class folders test/<colour>/<i>.png (2 shades each) and a Karpathy JSON naming them."""
  entries = []
  for name, colour in COLOURS.items():
    for i in range(2):
      shade = tuple(max(0, c - 15 * i) for c in colour)
      write_image(f"{root}/shapes/test/{name}/{i}.png", shade, (24, 24))
      entries.append(
        {"filename": f"{name}/{i}.png", "split": "test", "sentences": [{"raw": f"a {name} box"}]}
      )
  write_json(f"{root}/karpathy.json", {"images": entries})
  return {
    "zeroshot_retrieval": f"{root}/karpathy.json,images={root}/shapes/test",
    "zeroshot_classification": f"{root}/shapes",
  }


def test_a_method_with_embeddings_gets_zero_shot_retrieval_and_classification(
  colour_method, tiny_config, tmp_path
):
  tiny_config.method = "colour"
  for task, spec in write_colour_sets(str(tmp_path)).items():
    tiny_config.eval.data[task] = spec
  tiny_config.eval.tasks = "zeroshot_retrieval,zeroshot_classification"
  exp = trainer.create_experiment(tiny_config, str(tmp_path / "run"))
  params, _ = exp.method.init(jax.random.PRNGKey(0))
  results = {r.task: r for r in exp.evaluator().evaluate(params)}
  assert set(results) == {"zeroshot_retrieval", "zeroshot_classification"}
  retrieval = results["zeroshot_retrieval"].metrics
  # Two images per colour, one caption each: the right one is within the top 2 either way.
  assert retrieval["num_images"] == 6 and retrieval["num_texts"] == 6
  assert retrieval["image_retrieval_recall@5"] == retrieval["text_retrieval_recall@5"] == 1
  assert retrieval["image_retrieval_recall@1"] >= 0.5
  classification = results["zeroshot_classification"].metrics
  assert classification["acc1"] == 1  # Each prompt names its class's colour.


# ------------------------------------------------------------ a task from outside


class ColourShareTask(tasks.Task):
  """The share of a folder's images whose embedding points to their folder's colour."""

  name = "colour_share"

  def __init__(self, data: cls_readers.ClassificationSet, min_share: float):
    self.data, self.min_share = data, min_share

  def evaluate(self, embedder, params):
    emb = embedder.images(params, self.data.images, len(self.data.labels))
    order = [self.data.classnames.index(c) for c in COLOURS]  # Folder order -> RGB order.
    right = np.argmax(emb, axis=1) == np.asarray(order)[self.data.labels]
    share = float(right.mean())
    metrics = {"share": share, "num_images": float(len(right))}
    metrics["passed"] = float(share >= self.min_share)
    return [tasks.Result(self.name, self.data.name, metrics, ["share"])]


def create_colour_share(ctx: tasks.Context) -> list[tasks.Task]:
  (spec,) = ctx.specs("colour_share", ("split",))
  data = cls_readers.read_classification(spec, spec.get("split", "test"))
  return [ColourShareTask(data, ctx.config.eval.colour_share.min_share)]


def colour_share_options() -> ml_collections.ConfigDict:
  options = ml_collections.ConfigDict()
  options.min_share = 0.5  # The share at which the result's "passed" is 1.
  return options


COLOUR_SHARE = tasks.TaskDef(
  "colour_share",
  ("embed_image",),
  create_colour_share,
  options=colour_share_options,
  rules={"min_share": in_range(0, 1)},
)


@pytest.fixture
def colour_share_task():
  tasks.register(COLOUR_SHARE)
  yield
  del tasks.REGISTRY["colour_share"]  # Later configs of this process lack its field.


def test_a_task_registered_outside_the_package_runs_through_eval_py(
  colour_method, colour_share_task, tiny_config, cache_dir, tmp_path
):
  with pytest.raises(ValueError, match="already registered"):
    tasks.register(tasks.TaskDef("colour_share", (), create_colour_share))
  assert "colour_share" in tasks.data_fields()
  assert tiny_config.eval.colour_share.min_share == 0.5  # Its options, with their defaults.
  tiny_config.method = "colour"
  exp = trainer.create_experiment(tiny_config, str(tmp_path / "run"))
  state, _ = trainer.create_train_state(exp.method, exp.tx, exp.mesh, tiny_config.seed)
  manager = checkpointing.create_checkpoint_manager(exp.workdir, exp.config)
  manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
  manager.wait_until_finished()
  shapes = write_colour_sets(str(tmp_path / "data"))["zeroshot_classification"]
  args = [
    f"--config={ROOT}/tests/configs/tiny.py:cache_dir={cache_dir}",
    "--config.method=colour",
    f"--config.eval.data.colour_share={shapes}",
    f"--workdir={exp.workdir}",
    "--tasks=colour_share",
    "--noprogress",
  ]
  # Its options' rules are the config's: a bad value fails before any compute.
  proc = run_script("eval.py", *args, "--config.eval.colour_share.min_share=1.5")
  assert proc.returncode != 0
  assert "config.eval.colour_share.min_share=1.5: must be in [0, 1]" in proc.stderr
  proc = run_script("eval.py", *args, "--config.eval.colour_share.min_share=1.0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads(
    Path(exp.workdir, "eval", "step_00000001", "shapes_colour_share.json").read_text()
  )
  assert saved["task"] == "colour_share"
  assert saved["metrics"] == {"share": 1.0, "num_images": 6.0, "passed": 1.0}
  assert "### colour_share" in Path(exp.workdir, "eval", "summary.md").read_text()


def test_a_fine_tuned_heads_task_on_a_config_without_config_finetune_names_the_key(tiny_config):
  # A method offering vqa_logits whose config lacks the fine-tuning methods' block.
  tiny_config.eval.data.vqa = "builtin"
  ctx = tasks.Context(tiny_config, {"vqa_logits": lambda *args: None}, None)
  with pytest.raises(ConfigError, match=r"config\.finetune\.builtin is read from a VLC fine-tun"):
    tasks.create_tasks(["vqa"], ctx)
