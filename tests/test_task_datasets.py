"""The built-in VQA and NLVR2 sets (input_pipeline/builtin_vqa.py, builtin_nlvr2.py):
questions and statements that the scenes answer, the official file formats round-tripped
through the readers, balanced labels, determinism and reuse; and the grain datasets of
VQA and NLVR2 batches over them (vqa_data.py, nlvr2_data.py, task_data.py)."""

import logging
import os
import shutil
import zlib
from collections import Counter

import numpy as np
import pytest

from vlp_jax.evaluation import nlvr2, vqa
from vlp_jax.input_pipeline import builtin, builtin_nlvr2, builtin_vqa, nlvr2_data, vqa_data
from vlp_jax.input_pipeline.builtin import Scene, Shape


class WordTokenizer:
  """A tokenizer with the pipeline's protocol and no TensorFlow: one id per word."""

  context_length = 12
  pad_id = 0
  vocab_size = 1000

  def encode_with_word_ids(self, texts):
    ids = np.zeros((len(texts), self.context_length), np.int32)
    words = np.full((len(texts), self.context_length), -1, np.int32)
    for row, text in enumerate(texts):
      pieces = [2 + zlib.crc32(w.encode()) % 990 for w in text.split()][: self.context_length - 2]
      ids[row, : len(pieces) + 2] = [1, *pieces, 999]
      words[row, 1 : len(pieces) + 1] = range(len(pieces))
    return ids, words

  def __call__(self, texts):
    return self.encode_with_word_ids(texts)[0]


@pytest.fixture(scope="module")
def vqa_set(tmp_path_factory):
  return builtin_vqa.ensure_builtin_vqa(
    str(tmp_path_factory.mktemp("tasks")), num_train=60, num_val=20, image_size=64, seed=0
  )


@pytest.fixture(scope="module")
def nlvr2_set(tmp_path_factory):
  return builtin_nlvr2.ensure_builtin_nlvr2(
    str(tmp_path_factory.mktemp("tasks")), num_train=60, num_dev=21, image_size=64, seed=0
  )


# ---------------------------------------------------------------------- built-in sets


def _scene_answer(scene: Scene, question: str) -> str:
  """The answer to a built-in question, worked out from the scene independently."""
  words = question.rstrip("?").split()
  objects = scene.objects
  if question.startswith("what colour is the"):
    (obj,) = [o for o in objects if o.shape == words[-1]]
    return obj.colour
  if question.startswith("what shape is the"):
    (obj,) = [o for o in objects if o.colour == words[-2]]
    return obj.shape
  if question == "how many shapes are there?":
    return str(len(objects))
  if question.startswith("how many"):
    return str(sum(words[2] in (o.shape + "s", o.shape + "es") for o in objects))
  if question.startswith("is there a"):
    return "yes" if any((o.colour, o.shape) == (words[3], words[4]) for o in objects) else "no"
  a, b = words[2], words[-1]
  relation = " ".join(words[3:-2])
  (obj_a,), (obj_b,) = [o for o in objects if o.shape == a], [o for o in objects if o.shape == b]
  return "yes" if builtin.relation_holds(relation, obj_a, obj_b) else "no"


def test_vqa_questions_are_answered_by_the_scene():
  rng = np.random.default_rng(0)
  kinds, yes_no = Counter(), Counter()
  for _ in range(300):
    scene = builtin.sample_scene(rng, heldout=False)
    for q in builtin_vqa.vqa_questions(scene, rng):
      assert q.answer == _scene_answer(scene, q.question), q
      kinds[q.question_type] += 1
      if q.answer_type == "yes/no":
        yes_no[q.answer] += 1
      # Every spelling an annotator may use normalises back to the answer.
      assert {vqa.normalize_answer(s) for s in builtin_vqa.spellings(q.answer, q.answer_type)} == {
        q.answer
      }
      answers, most_common = builtin_vqa.annotate(q, rng)
      assert len(answers) == 10 and most_common == q.answer
  assert len(kinds) == 5 and min(kinds.values()) > 60
  assert 0.4 < yes_no["yes"] / sum(yes_no.values()) < 0.6


def test_builtin_vqa_round_trips_through_the_reader(vqa_set):
  train, val = vqa_set.examples("train"), vqa_set.examples("val")
  assert len(train) == 60 * builtin_vqa.QUESTIONS_PER_IMAGE and len(val) == 60
  assert not {e.question_id for e in train} & {e.question_id for e in val}
  assert all(os.path.isfile(e.image) for e in train + val)
  # The files hold what the generator made, and annotators disagree sometimes.
  generated = builtin_vqa.generate_vqa_image(0, "val", 3, 64)
  by_id = {e.question_id: e for e in val}
  for question, annotation in zip(generated["questions"], generated["annotations"]):
    example = by_id[question["question_id"]]
    assert example.question == question["question"]
    assert list(example.answers) == [a["answer"] for a in annotation["answers"]]
  assert {e.answer_type for e in train} == {"yes/no", "number", "other"}
  assert sum(len(set(e.answers)) > 1 for e in train) > len(train) / 2
  assert all(vqa.answer_scores(e.answers)[e.multiple_choice_answer] >= 0.9 for e in train)
  # Blind baselines are well below a perfect score.
  assert (
    vqa.majority_baseline(train, val) < vqa.majority_baseline(train, val, by="question_type") < 70
  )


def test_nlvr2_statements_hold_where_they_should():
  def scene(*shapes):
    return Scene(
      tuple(
        Shape(size, colour, shape, 0.2 * i + 0.1, 0.5)
        for i, (size, colour, shape) in enumerate(shapes)
      ),
      (),
    )

  left = scene(("small", "red", "circle"), ("large", "red", "circle"))
  right = scene(
    ("small", "blue", "circle"), ("large", "red", "square"), ("small", "green", "cross")
  )
  Statement = builtin_nlvr2.Statement
  cases = [
    (Statement("more", side="left", shape="circle"), True),
    (Statement("more", side="right", shape="circle"), False),
    (Statement("more", side="right", shape="cross"), True),
    (Statement("both_colour", colour="red"), True),
    (Statement("both_colour", colour="blue"), False),
    (Statement("contains", side="right", size="small", shape="cross"), True),
    (Statement("contains", side="left", size="small", shape="cross"), False),
    (Statement("fewer_shapes", side="left"), True),
    (Statement("total", number=5), True),
  ]
  for statement, label in cases:
    assert statement.holds(left, right) == label, statement.text()
    assert builtin_nlvr2.statement_kind(statement.text()) == statement.kind
  rng = np.random.default_rng(0)
  for statement in (builtin_nlvr2.random_statement(rng) for _ in range(300)):
    assert builtin_nlvr2.statement_kind(statement.text()) == statement.kind, statement
  assert builtin_nlvr2.statement_kind("the left image is a photograph") == ""
  assert cases[2][0].text() == "the right image has more crosses than the left image"


def test_nlvr2_statements_use_only_the_letters_of_the_builtin_captions():
  """The demo's WordPiece vocabulary is learned from the built-in captions: their words and
  letters, no digits. A word with any other character is one [UNK] there, so its statement
  cannot be read (version 1's "there are 4 shapes in total": every N the same [UNK])."""
  rng = np.random.default_rng(0)
  letters = set("".join(builtin.caption(builtin.sample_scene(rng, False)) for _ in range(300)))
  statements = [builtin_nlvr2.random_statement(rng) for _ in range(2000)]
  for statement in statements:
    assert set(statement.text()) <= letters, (statement.text(), set(statement.text()) - letters)
  totals = {s.number: s.text() for s in statements if s.kind == "total"}
  assert sorted(totals) == [2, 3, 4, 5]  # Two scenes hold 2..6 shapes; "six" has an "x".
  assert totals[4] == "there are four shapes in total"


def test_builtin_nlvr2_round_trips_with_balanced_labels(nlvr2_set):
  train, dev = nlvr2_set.examples("train"), nlvr2_set.examples("dev")
  assert len(train) == 60 and len(dev) == 21
  assert abs(sum(e.label for e in train) - 30) <= 1 and abs(sum(e.label for e in dev) - 10.5) <= 1
  # Training images lie in numbered subdirectories, as NLVR2's; all are found.
  assert all(os.path.isfile(e.left) and os.path.isfile(e.right) for e in train + dev)
  assert {os.path.basename(os.path.dirname(e.left)) for e in train} == set(map(str, range(10)))
  # Each sentence is true of one pair and false of the other: a constant answer is never
  # consistent.
  by_sentence = {}
  for e in train:
    by_sentence.setdefault(nlvr2.sentence_key(e.identifier), []).append(e)
  assert all(
    len({e.sentence for e in g}) == 1 and {e.label for e in g} == {True, False}
    for g in by_sentence.values()
  )
  always_true = nlvr2.evaluate_nlvr2({e.identifier: True for e in train}, train)
  assert always_true["accuracy"] == 50.0 and always_true["consistency"] == 0.0
  assert 45 < nlvr2.majority_baseline(train, dev) < 55


def test_builtin_sets_are_deterministic_and_reused(vqa_set, tmp_path):
  again = builtin_vqa.ensure_builtin_vqa(
    os.path.dirname(vqa_set.root), num_train=60, num_val=20, image_size=64, seed=0
  )
  assert again == vqa_set  # found, not rewritten
  a = builtin_nlvr2.generate_nlvr2_set(3, "dev", 5, 32)
  b = builtin_nlvr2.generate_nlvr2_set(3, "dev", 5, 32)
  assert [x["sentence"] for x in a] == [x["sentence"] for x in b]
  np.testing.assert_array_equal(a[0]["images"][0], b[0]["images"][0])


# ---------------------------------------------------------------------------- datasets


def _vocab(examples):
  return vqa.build_answer_vocab(examples, min_count=1)


def test_vqa_datasets_yield_the_documented_batches(vqa_set):
  train, val = vqa_set.examples("train"), vqa_set.examples("val")
  vocab = _vocab(train)
  tokenizer = WordTokenizer()

  def dataset(**kw):
    return vqa_data.create_vqa_dataset(
      train, tokenizer, vocab, image_size=32, batch_size=8, seed=1, train=True, **kw
    )

  batches = [b for _, b in zip(range(3), dataset())]
  batch = batches[0]
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["tokens"].shape == (8, 12) and batch["tokens"].dtype == np.int32
  assert batch["targets"].shape == (8, len(vocab)) and batch["targets"].dtype == np.float32
  assert batch["question_id"].dtype == np.int64 and batch["skipped"].sum() == 0
  by_id = {e.question_id: e for e in train}
  for qid, target in zip(batch["question_id"], batch["targets"]):
    expected = vqa.answer_scores(by_id[qid].answers)
    assert {vocab[i]: float(s) for i, s in enumerate(target) if s} == pytest.approx(expected)
  again = [b for _, b in zip(range(3), dataset())]
  assert all((a["question_id"] == b["question_id"]).all() for a, b in zip(batches, again))
  # Evaluation: one ordered pass; the last batch is padded and marked.
  passes = [
    list(
      vqa_data.create_vqa_dataset(
        val,
        tokenizer,
        vocab,
        image_size=32,
        batch_size=8,
        seed=0,
        train=False,
        process_index=p,
        process_count=2,
      )
    )
    for p in range(2)
  ]
  assert len(passes[0]) == len(passes[1]) == 4  # ceil(ceil(60 / 2) / 8)
  ids = [qid for p in passes for b in p for qid, ok in zip(b["question_id"], b["valid"]) if ok]
  assert sorted(ids) == sorted(e.question_id for e in val)
  assert [b["valid"].sum() for b in passes[0]] == [8, 8, 8, 6]
  assert (passes[0][-1]["question_id"][6:] == -1).all()


def test_nlvr2_datasets_yield_the_documented_batches(nlvr2_set):
  train, dev = nlvr2_set.examples("train"), nlvr2_set.examples("dev")
  tokenizer = WordTokenizer()
  batch = next(
    iter(
      nlvr2_data.create_nlvr2_dataset(
        train, tokenizer, image_size=32, batch_size=4, seed=0, train=True
      )
    )
  )
  assert batch["image"].shape == batch["image2"].shape == (4, 32, 32, 3)
  assert not (batch["image"] == batch["image2"]).all()
  assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int64
  assert list(batch["label"]) == [train[i].label for i in batch["index"]]
  batches = list(
    nlvr2_data.create_nlvr2_dataset(
      dev, tokenizer, image_size=32, batch_size=8, seed=0, train=False
    )
  )
  assert [b["valid"].sum() for b in batches] == [8, 8, 5]
  assert list(np.concatenate([b["index"] for b in batches])[:21]) == list(range(21))


def test_unreadable_images_are_skipped_and_counted(vqa_set, tmp_path, caplog):
  root = tmp_path / "vqa"
  shutil.copytree(vqa_set.root, root)
  questions, annotations = (
    str(root / os.path.basename(p)) for p in (vqa_set.train_questions, vqa_set.train_annotations)
  )
  train = vqa_data.read_vqa(questions, annotations, str(root))[:24]
  corrupt, missing = train[0].image, train[3 * 3].image  # images 1 and 4 (3 questions each)
  with open(corrupt, "r+b") as f:
    f.truncate(100)
  os.remove(missing)
  vocab = _vocab(train)
  with caplog.at_level(logging.WARNING):
    dataset = vqa_data.create_vqa_dataset(
      train, WordTokenizer(), vocab, image_size=32, batch_size=6, seed=0, train=True
    )
    batches = [b for _, b in zip(range(12), dataset)]  # three epochs of 24 rows
  assert os.path.basename(corrupt) in caplog.text or os.path.basename(missing) in caplog.text
  bad = {e.question_id for e in train if e.image in (corrupt, missing)}
  seen = np.concatenate([b["question_id"] for b in batches])
  assert not bad & set(seen.tolist())
  # Every epoch drops the 6 rows of the two images and counts them.
  assert sum(int(b["skipped"].sum()) for b in batches) >= 12
  # Evaluation keeps the rows (with their ids) and marks them invalid.
  (eval_batch, *_) = list(
    vqa_data.create_vqa_dataset(
      train, WordTokenizer(), vocab, image_size=32, batch_size=24, seed=0, train=False
    )
  )
  invalid = set(eval_batch["question_id"][~eval_batch["valid"]].tolist())
  assert invalid == bad
