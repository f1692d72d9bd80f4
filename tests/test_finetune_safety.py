"""Fine-tuning and evaluation as safe as pretraining (issue 34): user images read by one
bounded reader, unreadable files found before training and all listed, the checkpoint
saved before anything at the end of a run can fail, errors naming file and line, no
silently wrong results, SIGTERM honoured during the end-of-run evaluation.

Reader-level tests on small generated files; one tiny end-to-end VQA fine-tune (from
random initialisation, said explicitly) whose run the eval.py checks and the SIGTERM
test reuse.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import logging
import os
import signal
import time

import jax
import numpy as np
import pytest
from PIL import Image

from tests.runs import fails_after
from tests.test_vlc_finetune import shrink_vlc
from vlp_jax import config_lib, eval_runner, experiment, sharding, trainer
from vlp_jax.config_lib import ConfigError
from vlp_jax.configs import common, demo_vqa
from vlp_jax.evaluation import readers, vqa
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.tasks import batches
from vlp_jax.evaluation.tasks.vqa import VqaTask
from vlp_jax.input_pipeline import finetune_data, image_files, nlvr2_data, task_data, vqa_data
from vlp_jax.input_pipeline.image_sources import DataError, ImageRef
from vlp_jax.input_pipeline.task_data import TaskDataError
from vlp_jax.methods import DataContext, MethodContext, vlc_classify, vlc_vqa

TOKENS = experiment.TokenizerSpec(64, 0, 12, cls_id=2, sep_id=3, mask_id=4)
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_jpeg(path, colour, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  pixels = np.clip(np.asarray(colour) + rng.integers(-20, 20, (32, 32, 3)), 0, 255)
  Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)


def write_vqa(root, num_images: int = 16, answers: int = 10, name: str = "train") -> dict:
  """VQAv2-format questions and annotations (two questions per image) and COCO-named
  JPEGs under root/images; returns the paths and the spec string."""
  images = root / "images"
  images.mkdir(parents=True, exist_ok=True)
  questions, annotations = [], []
  for i in range(num_images):
    colour = list(COLOURS)[i % 3]
    write_jpeg(images / f"COCO_train2014_{i:012d}.jpg", COLOURS[colour], i)
    asked = [
      ("what color is it", colour, "other", "what color is the"),
      ("is it red", "yes" if colour == "red" else "no", "yes/no", "is the"),
    ]
    for j, (question, answer, answer_type, question_type) in enumerate(asked):
      qid = 10 * i + j
      questions.append({"question_id": qid, "image_id": i, "question": question})
      annotations.append(
        {
          "question_id": qid,
          "answers": [{"answer": answer, "answer_id": k + 1} for k in range(answers)],
          "multiple_choice_answer": answer,
          "answer_type": answer_type,
          "question_type": question_type,
        }
      )
  q_path, a_path = root / f"{name}_questions.json", root / f"{name}_annotations.json"
  q_path.write_text(json.dumps({"data_subtype": "train2014", "questions": questions}))
  a_path.write_text(json.dumps({"annotations": annotations}))
  spec = f"{q_path},annotations={a_path},images={images}"
  return {"questions": str(q_path), "annotations": str(a_path), "images": images, "spec": spec}


def single_device():
  return sharding.create_mesh({"data": 1}, jax.devices()[:1])


def read(path) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def image_path(files: dict, i: int) -> str:
  return str(files["images"] / f"COCO_train2014_{i:012d}.jpg")


def hostile_files(tmp_path) -> dict[str, str]:
  """A symlink to /dev/zero, a 2 GiB sparse file and a FIFO, named as images."""
  paths = {k: str(tmp_path / f"{k}.jpg") for k in ("zero", "sparse", "fifo")}
  os.symlink("/dev/zero", paths["zero"])
  with open(paths["sparse"], "wb") as f:
    f.truncate(2 << 30)  # No disk used; a whole read would take 2 GiB of memory.
  os.mkfifo(paths["fifo"])  # Opening it for reading waits for a writer forever.
  return paths


# ---------------------------------------------------------------- one bounded reader


def test_devices_sparse_files_and_fifos_are_refused_by_every_image_reader(tmp_path):
  paths = hostile_files(tmp_path)
  reasons = {
    "zero": "image_not_a_regular_file",
    "sparse": "image_file_too_large",
    "fifo": "image_not_a_regular_file",
  }
  with fails_after(30):
    for kind, path in paths.items():
      with pytest.raises(image_files.ImageFileError) as e:
        task_data.load_image(path, 32)  # The fine-tuning task readers.
      assert e.value.reason == reasons[kind] and path in str(e.value)
      with pytest.raises(DataError, match=f"cannot read image {path}"):
        ImageRef(path).open()  # The evaluation readers.
      assert reasons[kind] in task_data.screen_images([path])[path]  # The first pass.


def test_an_unreadable_image_in_training_is_skipped_counted_and_listed(tmp_path):
  files = write_vqa(tmp_path, num_images=4)
  paths = hostile_files(tmp_path)
  examples = vqa_data.read_vqa(files["questions"], files["annotations"], str(files["images"]))
  examples[0] = dataclasses.replace(examples[0], image=paths["fifo"])
  examples[2] = dataclasses.replace(examples[2], image=paths["zero"])
  skip_list = str(tmp_path / image_files.SKIP_LIST_FILE)
  answers = vqa.build_answer_vocab(examples, 1)
  with fails_after(60):
    dataset = vqa_data.create_vqa_dataset(
      examples,
      lambda texts: np.zeros((len(texts), 12), np.int32),
      answers,
      image_size=32,
      batch_size=3,
      seed=0,
      train=True,
      skip_list=skip_list,
    )
    batches = [b for _, b in zip(range(4), dataset)]  # One and a half epochs of 8 rows.
  assert sum(int(b["skipped"].sum()) for b in batches) >= 2
  listed = dict(line.split("\t") for line in read(skip_list).splitlines())
  assert set(listed) == {paths["fifo"], paths["zero"]}  # Each named once, however often.
  assert "image_not_a_regular_file" in listed[paths["fifo"]]


# ---------------------------------------------------------------- before training


def test_unreadable_images_over_the_threshold_stop_the_run_before_training(tmp_path):
  files = write_vqa(tmp_path)
  os.remove(image_path(files, 5))  # 1 of 16 images missing: 2 of 32 questions.
  examples = vqa_data.read_vqa(files["questions"], files["annotations"], str(files["images"]))
  skip_list = str(tmp_path / image_files.SKIP_LIST_FILE)
  with pytest.raises(TaskDataError) as e:
    task_data.drop_unreadable(
      examples, source="config.finetune.train", max_skipped_fraction=0.01, skip_list=skip_list
    )
  message = str(e.value)
  assert "2 of 32 training examples of config.finetune.train" in message
  assert image_path(files, 5) in message and "config.data.max_skipped_fraction=0.01" in message
  assert read(skip_list).startswith(image_path(files, 5) + "\tmissing_image")
  # Under the threshold the rows are left out, with the file still listed.
  kept = task_data.drop_unreadable(
    examples, source="x", max_skipped_fraction=0.1, skip_list=skip_list
  )
  assert len(kept) == 30 and image_path(files, 5) in read(skip_list)


def tiny_vlc(method: str = "vlc_vqa", **finetune_fields):
  config = demo_vqa.get_config("pretrained=none,steps=5,batch_size=8")
  config.unlock()
  config.finetune.min_answer_count = 1
  return shrink_vlc(config, method, **finetune_fields)


def test_the_fine_tuning_method_screens_its_data_and_lists_every_bad_file(tmp_path):
  files = write_vqa(tmp_path / "data")
  for i in (3, 11):  # Two images, each in the way a user meets them.
    os.remove(image_path(files, i))
  os.symlink("/dev/zero", image_path(files, 11))
  method = vlc_vqa.create(MethodContext(tiny_vlc(train=files["spec"]), single_device(), TOKENS, 5))
  workdir = tmp_path / "run"
  workdir.mkdir()
  with pytest.raises(TaskDataError, match=r"4 of 32 training examples"):
    method.train_data(DataContext(str(workdir), None, None, (), TOKENS, 8))
  listed = (workdir / image_files.SKIP_LIST_FILE).read_text().splitlines()
  assert [line.split("\t")[0] for line in listed] == [image_path(files, 3), image_path(files, 11)]


class ZeroTokenizer:
  context_length = 12

  def __call__(self, texts):
    return np.zeros((len(texts), self.context_length), np.int32)


def test_evaluation_lists_the_images_it_could_not_read_beside_the_results(tmp_path):
  files = write_vqa(tmp_path)
  os.remove(image_path(files, 4))
  with open(image_path(files, 7), "r+b") as f:
    f.truncate(100)
  examples = vqa_data.read_vqa(files["questions"], files["annotations"], str(files["images"]))
  answers = vqa.build_answer_vocab(examples, 1)
  task = VqaTask(
    "val",
    examples,
    answers,
    lambda params, images, tokens: jax.numpy.zeros((images.shape[0], len(answers))),
  )
  embedder = Embedder(
    {},
    sharding.create_mesh({"data": -1}),
    ZeroTokenizer(),
    batch_size=16,
    image_size=32,
    read_threads=2,
  )
  (result,) = task.evaluate(embedder, {})
  assert result.metrics["num_unreadable"] == 4  # Two images, two questions each.
  result.files[image_files.SKIP_LIST_FILE](str(tmp_path / "listed.txt"))
  listed = dict(line.split("\t") for line in read(tmp_path / "listed.txt").splitlines())
  assert list(listed) == [image_path(files, 4), image_path(files, 7)]
  assert "missing_image" in listed[image_path(files, 4)]


def test_classification_fine_tuning_screens_its_image_files_before_training(tmp_path):
  for split, count in (("train", 6), ("val", 2)):
    for c, colour in enumerate(COLOURS.values()):
      folder = tmp_path / split / f"class{c}"
      folder.mkdir(parents=True)
      for i in range(count):
        write_jpeg(folder / f"{i}.jpg", colour, i)
  fifo, zero = tmp_path / "train" / "class0" / "fifo.jpg", tmp_path / "train" / "class1" / "z.jpg"
  os.mkfifo(fifo)
  os.symlink("/dev/zero", zero)
  config = tiny_vlc("vlc_classify", train=str(tmp_path))
  method = vlc_classify.create(MethodContext(config, single_device(), TOKENS, 5))
  ctx = DataContext(str(tmp_path), None, None, (), TOKENS, 8)
  with fails_after(60), pytest.raises(TaskDataError, match=r"2 of 20 training examples"):
    method.train_data(ctx)
  listed = read(tmp_path / image_files.SKIP_LIST_FILE)
  assert str(fifo) in listed and str(zero) in listed and "image_not_a_regular_file" in listed


# ---------------------------------------------------------------- errors name file and line


def test_every_image_missing_names_the_images_directory(tmp_path):
  files = write_vqa(tmp_path)
  wrong = tmp_path / "elsewhere"
  wrong.mkdir()
  with pytest.raises(TaskDataError, match=rf"none of the 16 images .* images={wrong}"):
    vqa_data.read_vqa(files["questions"], files["annotations"], str(wrong))
  jsonl = tmp_path / "dev.json"
  jsonl.write_text(json.dumps({"identifier": "dev-1-0-0", "sentence": "s", "label": "True"}))
  with pytest.raises(TaskDataError, match=rf"{jsonl}: none of the 2 images .* images={wrong}"):
    nlvr2_data.read_nlvr2(str(jsonl), str(wrong))


def test_bytes_that_are_not_utf8_are_named_with_file_and_line(tmp_path):
  files = write_vqa(tmp_path)
  text = json.dumps(json.loads(read(files["questions"])), indent=1).encode()
  at = text.index(b"is it red")
  with open(files["questions"], "wb") as f:
    f.write(text[:at] + b"is it r\xe9d" + text[at + 9 :])  # Latin-1, not UTF-8.
  line = text[:at].count(b"\n") + 1
  with pytest.raises(TaskDataError, match=rf"{files['questions']}:{line}: byte b'\\xe9'"):
    vqa_data.read_vqa(files["questions"], files["annotations"], str(files["images"]))
  # eval.py reads its --data.vqa through the same reader.
  builtin = finetune_data.BuiltinSets("", 2, 1, 32, 0)
  with pytest.raises(TaskDataError, match=rf"{files['questions']}:{line}:"):
    finetune_data.read_vqa_spec(files["spec"], False, builtin)
  jsonl = tmp_path / "train.json"
  good = json.dumps({"identifier": "train-1-0-0", "sentence": "one", "label": "True"})
  jsonl.write_bytes(good.encode() + b"\n" + good.encode().replace(b"one", b"\xff\xfe") + b"\n")
  with pytest.raises(TaskDataError, match=rf"{jsonl}:2: byte b'\\xff' at column \d+"):
    nlvr2_data.read_nlvr2(str(jsonl), str(tmp_path))
  with pytest.raises(DataError, match=rf"{jsonl}:2: byte b'\\xff'"):
    readers.read_json(str(jsonl))  # The other evaluation readers' files alike.


def test_an_empty_nlvr2_file_and_repeated_identifiers_are_refused_naming_the_file(tmp_path):
  empty = tmp_path / "train.json"
  empty.write_text("\n")
  with pytest.raises(TaskDataError, match=rf"{empty}: no examples"):
    nlvr2_data.read_nlvr2(str(empty), str(tmp_path))
  lines = [
    {"identifier": "train-7-1-0", "sentence": "a", "label": "True"},
    {"identifier": "train-7-1-1", "sentence": "b", "label": "False"},
    {"identifier": "train-7-1-0", "sentence": "c", "label": "False"},
  ]
  repeated = tmp_path / "dev.json"
  repeated.write_text("\n".join(json.dumps(line) for line in lines))
  with pytest.raises(
    TaskDataError, match=rf"{repeated}:3: identifier 'train-7-1-0' repeats line 1"
  ):
    nlvr2_data.read_nlvr2(str(repeated), str(tmp_path))


# ---------------------------------------------------------------- no result that only looks valid


def test_fine_tuning_without_pretrained_weights_needs_pretrained_none(tmp_path):
  files = write_vqa(tmp_path)
  mesh = single_device()
  refused = vlc_vqa.create(
    MethodContext(tiny_vlc(train=files["spec"], pretrained=""), mesh, TOKENS, 5)
  )

  def gather():
    raise AssertionError("no parameters are needed to refuse")

  with pytest.raises(ConfigError, match=r"config\.finetune\.pretrained is empty: .*'none'"):
    refused.pretrained_params(gather)
  allowed = vlc_vqa.create(MethodContext(tiny_vlc(train=files["spec"]), mesh, TOKENS, 5))
  assert allowed.pretrained == "none" and allowed.pretrained_params(gather) is None


def test_an_answers_file_is_normalised_as_the_annotations(tmp_path):
  answers = tmp_path / "answers.txt"
  answers.write_text("Red\n yes\nTwo\n")
  vocab = vqa.read_answer_vocab(str(answers))
  assert vocab == ["red", "yes", "2"]
  example = vqa_data.VqaExample(1, 1, "x.jpg", "what color", ("red",) * 10, "red")
  ((ids, scores),) = vqa_data.vqa_targets([example], vocab)
  assert ids.tolist() == [0] and scores.tolist() == [1.0]  # Not dropped for "Red".
  answers.write_text("2\nTwo\n")
  with pytest.raises(TaskDataError, match=rf"{answers}:2: 'Two' repeats line 1"):
    vqa.read_answer_vocab(str(answers))


def test_fewer_than_ten_answers_warn_with_the_count_and_the_metrics_cap(tmp_path, caplog):
  files = write_vqa(tmp_path, num_images=2, answers=3)
  with caplog.at_level(logging.WARNING):
    vqa_data.read_vqa(files["questions"], files["annotations"], str(files["images"]))
  assert "4 of 4 questions have fewer than 10 annotator answers (as few as 3)" in caplog.text
  assert "caps their accuracy at 66.7%" in caplog.text
  assert vqa.vqa_accuracy("red", ["red"] * 3) == pytest.approx(vqa_data.metric_cap(3))


def test_a_cmask_mask_ratio_of_zero_is_refused_naming_the_key():
  config = common.base_config("cmask")
  config.cmask.mask_ratio = 0.0
  with pytest.raises(ConfigError, match=r"config\.cmask\.mask_ratio.*\(0, 1\]"):
    config_lib.check_rules(config, common.config_rules("cmask"))
  config.cmask.mask_ratio = 1.0
  config_lib.check_rules(config, common.config_rules("cmask"))


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def corrupt_run(cache_dir, tmp_path_factory):
  """A tiny VQA fine-tune whose training data holds two JPEGs truncated in their body
  (their headers pass the first look): it trains its 5 steps and fails at its only log
  flush, at the end. Returns (config, workdir, files, the error)."""
  root = tmp_path_factory.mktemp("corrupt_run")
  files = write_vqa(root / "data")
  eval_files = write_vqa(root / "data", name="val")
  for i in (2, 9):
    path = image_path(files, i)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) - 10)  # The header parses; the body ends early.
  config = tiny_vlc(train=files["spec"])
  config.data.cache_dir = cache_dir
  config.data.num_workers = 0
  config.data.builtin.num_train, config.data.builtin.num_heldout = 256, 64
  config.data.builtin.image_size = 32
  config.eval.data.vqa = eval_files["spec"]
  config.eval.batch_size = 8
  config.log_every_steps = 100  # Only the final flush checks the skipped share.
  config = config_lib.lock(config)
  workdir = str(root / "run")
  with pytest.raises(RuntimeError) as e:
    trainer.train_and_evaluate(config, workdir)
  return config, workdir, files, e.value


def test_a_run_stopped_at_its_end_keeps_its_checkpoint_and_lists_every_bad_file(corrupt_run):
  _, workdir, files, error = corrupt_run
  assert "records were corrupt and skipped" in str(error)
  assert "The checkpoint of step 5 is saved" in str(error)
  assert os.path.join(workdir, image_files.SKIP_LIST_FILE) in str(error)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "5"))
  listed = read(os.path.join(workdir, image_files.SKIP_LIST_FILE)).splitlines()
  assert sorted(line.split("\t")[0] for line in listed) == [
    image_path(files, 2),
    image_path(files, 9),
  ]


def test_eval_py_checks_tasks_method_and_output_dir_before_computing(corrupt_run, tmp_path):
  config, workdir, _, _ = corrupt_run
  with pytest.raises(ConfigError, match=r"offers no nlvr2 head for evaluation task 'nlvr2'"):
    eval_runner.evaluate_run(config, workdir, tasks=["nlvr2"], show_progress=False)
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ConfigError, match=rf"--output_dir '{blocker}/out' is not writable"):
    eval_runner.evaluate_run(config, workdir, output_dir=str(blocker / "out"), show_progress=False)
  no_tasks = copy.deepcopy(config)
  with no_tasks.unlocked():
    no_tasks.eval.tasks = ""
  with pytest.raises(
    ConfigError, match=r"nothing to evaluate: the run's config\.eval\.tasks is empty"
  ):
    eval_runner.evaluate_run(no_tasks, workdir, show_progress=False)
  assert not glob.glob(os.path.join(workdir, "eval", "step_*"))  # Nothing was computed.


def test_sigterm_during_the_end_of_run_evaluation_stops_it_within_a_batch(
  corrupt_run, monkeypatch, caplog
):
  config, workdir, _, _ = corrupt_run
  pulled, sent = [], []
  real = batches.with_rows

  def with_rows(batches, row_of):
    for batch in real(batches, row_of):
      pulled.append(batch)
      if not sent:
        sent.append(time.time())
        os.kill(os.getpid(), signal.SIGTERM)  # As a preemptible VM's notice.
      yield batch

  monkeypatch.setattr(batches, "with_rows", with_rows)
  # Resumed at its last step, the run evaluates its final state (4 batches of 8).
  with caplog.at_level(logging.WARNING):
    trainer.train_and_evaluate(config, workdir)
  assert sent and time.time() - sent[0] < 30
  assert len(pulled) <= 2
  assert "SIGTERM during the evaluation of step 5" in caplog.text
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "5"))
  assert not glob.glob(os.path.join(workdir, "eval", "step_*", "*.json"))
