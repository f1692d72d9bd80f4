"""VQAv2 and NLVR2: answer normalisation, metrics, readers, datasets and the built-in sets.

Expected numbers are worked out by hand from the official scripts' definitions (VQA
API's vqaEval.py, NLVR2's eval/metrics.py), in the comments next to them.
"""

import json
import logging
import os
import shutil
import zlib
from collections import Counter

import numpy as np
import pytest

from vlp_jax.evaluation import nlvr2, vqa
from vlp_jax.input_pipeline import builtin, builtin_tasks, task_data
from vlp_jax.input_pipeline.builtin import Scene, Shape
from vlp_jax.input_pipeline.task_data import Nlvr2Example, TaskDataError, VqaExample


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
  return builtin_tasks.ensure_builtin_vqa(
    str(tmp_path_factory.mktemp("tasks")), num_train=60, num_val=20, image_size=64, seed=0
  )


@pytest.fixture(scope="module")
def nlvr2_set(tmp_path_factory):
  return builtin_tasks.ensure_builtin_nlvr2(
    str(tmp_path_factory.mktemp("tasks")), num_train=60, num_dev=21, image_size=64, seed=0
  )


# ---------------------------------------------------------------- answer normalisation


@pytest.mark.parametrize(
  "raw, normalised",
  [
    ("Two", "2"),
    ("none", "0"),  # number words, "none" included
    ("ten dogs", "10 dogs"),
    ("the dog", "dog"),
    ("a dog", "dog"),
    ("An apple", "apple"),
    ("dont", "don't"),  # contractions restored
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("couldntve", "couldntve"),  # not in the table: one apostrophe is always left
    ("Im", "im"),  # the table's "Im" never meets a lower-cased word
    ("yes.", "yes"),  # a period goes unless a digit follows
    ("3.5", "3.5"),
    ("x.y", "xy"),
    ("black/white", "black white"),  # a mark between letters becomes a space...
    ("black / white", "black white"),  # ...one touching a space goes
    ("t-shirt", "t shirt"),
    ("1,000", "1000"),  # a comma between digits: every mark goes
    ("red,blue", "red blue"),
    ("red, blue", "red blue"),
    ("red,blue 1,2", "redblue 12"),
    ("it's", "it's"),  # apostrophes are not punctuation to the script
    (" yes\n", "yes"),
    ("ice cream!", "ice cream"),
  ],
)
def test_normalisation_follows_the_official_script(raw, normalised):
  assert vqa.normalize_answer(raw) == normalised


def test_contraction_table_is_the_scripts():
  table = task_data.CONTRACTIONS
  assert len(table) == 120
  assert table["hadnt've"] == table["hadn'tve"] == "hadn't've"
  assert table["yall'd've"] == table["y'alld've"] == table["y'all'dve"] == "y'all'd've"
  assert table["twas"] == "'twas" and table["somebody'd"] == "somebodyd"


def test_at_most_32_periods_are_removed():
  # The script passes re.UNICODE (32) as sub()'s count.
  assert task_data.process_punctuation("." * 40) == "." * 8


def test_soft_scores_are_exact():
  answers = ["yes"] * 3 + ["no"] + ["maybe"] * 2 + ["Two", "2", "two", "2."]
  assert vqa.answer_scores(answers) == {"yes": 0.9, "no": 0.3, "maybe": 0.6, "2": 1.0}
  assert vqa.answer_scores(answers, normalize=False)["2"] == 0.3  # ViLT's raw counting
  assert [vqa.soft_score(c) for c in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]


def test_leave_one_out_accuracy_by_hand():
  others = ["a", "b", "c", "d", "e", "f", "g", "h"]
  # 2 of 10 match: 8 nine-annotator subsets hold both (2/3), 2 hold one (1/3):
  # (8 * 2/3 + 2 * 1/3) / 10 = 0.6.
  assert vqa.vqa_accuracy("cat", ["cat", "cat", *others]) == pytest.approx(0.6)
  # 3 match: 7 subsets hold all three (1), 3 hold two (2/3): (7 + 3 * 2/3) / 10 = 0.9.
  assert vqa.vqa_accuracy("cat", ["cat"] * 3 + others[:7]) == pytest.approx(0.9)
  # 1 match: 9 subsets hold it (1/3), 1 does not: 9 / 30 = 0.3.
  assert vqa.vqa_accuracy("cat", ["cat", *others, "i"]) == pytest.approx(0.3)
  assert vqa.vqa_accuracy("cat", ["cat"] * 4 + others[:6]) == 1.0  # 3 left in every subset
  # With ten annotators the soft score of an answer is exactly its accuracy.
  for count in range(11):
    answers = ["cat"] * count + [f"x{i}" for i in range(10 - count)]
    assert vqa.vqa_accuracy("cat", answers) == pytest.approx(vqa.soft_score(count))


def test_answers_are_normalised_only_when_annotators_disagree():
  assert vqa.vqa_accuracy("yes", ["Yes"] * 10) == 0.0  # all agree: exact comparison
  assert vqa.vqa_accuracy(" Yes ", ["Yes"] * 10) == 1.0  # (after trimming)
  assert vqa.vqa_accuracy("yes", ["Yes"] * 9 + ["no"]) == 1.0
  assert vqa.vqa_accuracy("two", ["2", "2", "Two", "two", "3", "3", "3", "3", "3", "3"]) == 1.0


def _example(qid, answers, answer_type, question_type="what", mc=None):
  return VqaExample(
    qid, 1, "x.jpg", "q?", tuple(answers), mc or answers[0], answer_type, question_type
  )


def test_evaluate_vqa_overall_and_per_answer_type():
  annotations = [
    _example(1, ["yes"] * 10, "yes/no", "is the"),
    _example(2, ["2", "2", *"abcdefgh"], "number", "how many"),
    _example(3, ["red"] * 10, "other", "what colour is the"),
    _example(4, ["blue"] * 10, "other", "what colour is the"),
  ]
  predictions = {1: "yes", 2: "2", 3: "green", 4: "blue"}
  result = vqa.evaluate_vqa(predictions, annotations)
  # (1 + 0.6 + 0 + 1) / 4 = 65%.
  assert result["overall"] == 65.0
  assert result["perAnswerType"] == {"yes/no": 100.0, "number": 60.0, "other": 50.0}
  assert result["perQuestionType"]["what colour is the"] == 50.0
  assert result["num_questions"] == 4
  # Two decimals, as the script rounds: (1 + 0.6 + 0) / 3 = 53.333...%.
  assert vqa.evaluate_vqa(predictions, annotations, question_ids=[1, 2, 3])["overall"] == 53.33
  with pytest.raises(ValueError, match="no prediction"):
    vqa.evaluate_vqa({1: "yes"}, annotations)


def test_answer_vocab_threshold_is_exact(tmp_path):
  annotations = []
  for answer, count in [("red", 9), ("blue", 8), ("Two", 5), ("2", 4), ("yes", 10)]:
    annotations += [_example(len(annotations), [answer] * 10, "other", mc=answer)] * count
  # "Two" and "2" are one answer: 5 + 4 = 9; "blue" 8 < 9. First-occurrence order.
  assert vqa.build_answer_vocab(annotations, min_count=9) == ["red", "2", "yes"]
  assert vqa.build_answer_vocab(annotations, min_count=10) == ["yes"]
  # Counting annotators instead: every answer here has 10 per question.
  assert vqa.build_answer_vocab(annotations, 80, count="annotators") == ["red", "blue", "2", "yes"]
  path = str(tmp_path / "answers.txt")
  vqa.write_answer_vocab(path, ["red", "2", "yes"])
  assert vqa.read_answer_vocab(path) == ["red", "2", "yes"]
  with open(path, "a") as f:
    f.write("red\n")
  with pytest.raises(TaskDataError, match=r"answers.txt:4: 'red' repeats line 1"):
    vqa.read_answer_vocab(path)


def test_results_file_is_the_submission_format(tmp_path):
  path = str(tmp_path / "results.json")
  vqa.write_vqa_results(path, {5: "yes", 7: "2"})
  with open(path) as f:
    assert json.load(f) == [{"question_id": 5, "answer": "yes"}, {"question_id": 7, "answer": "2"}]


# ------------------------------------------------------------------------ NLVR2 metrics


def test_nlvr2_accuracy_and_consistency():
  def ex(identifier, label):
    return Nlvr2Example(identifier, "s", label, "l.png", "r.png")

  examples = [
    ex("dev-1-0-0", True),  # sentence 0 of set 1, with three image pairs
    ex("dev-1-1-0", False),
    ex("dev-1-2-0", True),
    ex("dev-1-0-1", False),  # sentence 1 of set 1
    ex("dev-2-0-0", True),
  ]
  predictions = {
    "dev-1-0-0": True,
    "dev-1-1-0": "True",  # wrong: sentence 0 of set 1 is not consistent
    "dev-1-2-0": 1,
    "dev-1-0-1": "false",
    "dev-2-0-0": True,
  }
  result = nlvr2.evaluate_nlvr2(predictions, examples)
  assert result["accuracy"] == 100 * 4 / 5
  # Sentences (pair id blanked): dev-1--0 (one wrong), dev-1--1, dev-2--0: 2 of 3.
  assert result["consistency"] == pytest.approx(100 * 2 / 3)
  assert result["num_sentences"] == 3
  assert nlvr2.sentence_key("dev-850-2-1") == "dev-850--1"
  with pytest.raises(ValueError, match="no prediction"):
    nlvr2.evaluate_nlvr2({}, examples)
  # By image set; an empty group is left out.
  by_set = nlvr2.accuracy_by_group(predictions, examples, lambda e: e.identifier.split("-")[1])
  assert by_set == {"1": 75.0, "2": 100.0}
  first_only = nlvr2.accuracy_by_group(
    predictions, examples, lambda e: "first" if e.identifier == "dev-1-0-0" else ""
  )
  assert first_only == {"first": 100.0}


# ----------------------------------------------------------------------------- readers


def _write_json(path, data):
  with open(path, "w") as f:
    json.dump(data, f)
  return str(path)


def test_vqa_reader_errors_name_file_and_key(tmp_path):
  bad = tmp_path / "q.json"
  bad.write_text('{"questions": [\n{"question_id": 1,}]}')
  with pytest.raises(TaskDataError, match=r"q.json:2: not valid JSON"):
    task_data.read_vqa(str(bad), None, str(tmp_path))
  questions = _write_json(
    tmp_path / "q2.json",
    {
      "data_subtype": "val2014",
      "questions": [
        {"question_id": 1, "image_id": 1, "question": "a?"},
        {"image_id": 1, "question": "b?"},
      ],
    },
  )
  with pytest.raises(TaskDataError, match=r"q2.json: questions\[1\]: missing 'question_id'"):
    task_data.read_vqa(questions, None, str(tmp_path))
  questions = _write_json(
    tmp_path / "q3.json",
    {"data_subtype": "val2014", "questions": [{"question_id": 1, "image_id": 1, "question": "a?"}]},
  )
  annotations = _write_json(
    tmp_path / "a3.json", {"annotations": [{"question_id": 1, "answers": [{"answer": "x"}]}]}
  )
  with pytest.raises(
    TaskDataError,
    match=r"a3.json: annotations\[0\] \(question_id 1\): missing 'multiple_choice_answer'",
  ):
    task_data.read_vqa(questions, annotations, str(tmp_path))


def test_vqa_test_dev_questions_need_no_annotations(tmp_path):
  (tmp_path / "test2015").mkdir()
  (tmp_path / "test2015" / "COCO_test2015_000000000042.jpg").write_bytes(b"x")  # Not none.
  questions = _write_json(
    tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
    {
      "data_subtype": "test-dev2015",
      "questions": [{"question_id": 7, "image_id": 42, "question": "why?"}],
    },
  )
  (example,) = task_data.read_vqa(questions, None, str(tmp_path))
  # test-dev's questions are about the test2015 images.
  assert example.image == str(tmp_path / "test2015" / "COCO_test2015_000000000042.jpg")
  assert example.answers == () and example.question == "why?"


def test_nlvr2_reader_finds_images_in_any_layout(tmp_path, caplog):
  root = tmp_path / "images"
  for folder, name in [
    ("7", "train-1-0-img0.png"),  # the official train layout, named by "directory"
    ("7", "train-1-0-img1.png"),
    ("", "train-2-0-img0.png"),  # flat
    ("deep/er", "train-2-0-img1.jpg"),  # elsewhere, re-encoded: found by stem
  ]:
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / name).write_bytes(b"x")
  lines = [
    {"identifier": "train-1-0-0", "sentence": "one", "label": "True", "directory": 7},
    {"identifier": "train-2-0-1", "sentence": "two", "label": "False"},
    {"identifier": "train-3-0-0", "sentence": "three", "label": "False"},  # no images
  ]
  jsonl = tmp_path / "train.json"
  jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
  with caplog.at_level(logging.WARNING):
    first, second, third = task_data.read_nlvr2(str(jsonl), str(root))
  assert first.left == str(root / "7" / "train-1-0-img0.png") and first.label
  assert second.right == str(root / "deep/er/train-2-0-img1.jpg") and not second.label
  assert third.left == str(root / "train-3-0-img0.png")  # kept: the dataset skips the row
  assert "2 of 6 images" in caplog.text
  jsonl.write_text('{"identifier": "dev-1-0-0", "sentence": "s", "label": "yes"}\n')
  with pytest.raises(TaskDataError, match=r"train.json:1: label 'yes'"):
    task_data.read_nlvr2(str(jsonl), str(root))


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
    for q in builtin_tasks.vqa_questions(scene, rng):
      assert q.answer == _scene_answer(scene, q.question), q
      kinds[q.question_type] += 1
      if q.answer_type == "yes/no":
        yes_no[q.answer] += 1
      # Every spelling an annotator may use normalises back to the answer.
      assert {
        vqa.normalize_answer(s) for s in builtin_tasks.spellings(q.answer, q.answer_type)
      } == {q.answer}
      answers, most_common = builtin_tasks.annotate(q, rng)
      assert len(answers) == 10 and most_common == q.answer
  assert len(kinds) == 5 and min(kinds.values()) > 60
  assert 0.4 < yes_no["yes"] / sum(yes_no.values()) < 0.6


def test_builtin_vqa_round_trips_through_the_reader(vqa_set):
  train, val = vqa_set.examples("train"), vqa_set.examples("val")
  assert len(train) == 60 * builtin_tasks.QUESTIONS_PER_IMAGE and len(val) == 60
  assert not {e.question_id for e in train} & {e.question_id for e in val}
  assert all(os.path.isfile(e.image) for e in train + val)
  # The files hold what the generator made, and annotators disagree sometimes.
  generated = builtin_tasks.generate_vqa_image(0, "val", 3, 64)
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
  Statement = builtin_tasks.Statement
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
    assert builtin_tasks.statement_kind(statement.text()) == statement.kind
  rng = np.random.default_rng(0)
  for statement in (builtin_tasks.random_statement(rng) for _ in range(300)):
    assert builtin_tasks.statement_kind(statement.text()) == statement.kind, statement
  assert builtin_tasks.statement_kind("the left image is a photograph") == ""
  assert cases[2][0].text() == "the right image has more crosses than the left image"


def test_nlvr2_statements_use_only_the_letters_of_the_builtin_captions():
  """The demo's WordPiece vocabulary is learned from the built-in captions: their words and
  letters, no digits. A word with any other character is one [UNK] there, so its statement
  cannot be read (version 1's "there are 4 shapes in total": every N the same [UNK])."""
  rng = np.random.default_rng(0)
  letters = set("".join(builtin.caption(builtin.sample_scene(rng, False)) for _ in range(300)))
  statements = [builtin_tasks.random_statement(rng) for _ in range(2000)]
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
  again = builtin_tasks.ensure_builtin_vqa(
    os.path.dirname(vqa_set.root), num_train=60, num_val=20, image_size=64, seed=0
  )
  assert again == vqa_set  # found, not rewritten
  a = builtin_tasks.generate_nlvr2_set(3, "dev", 5, 32)
  b = builtin_tasks.generate_nlvr2_set(3, "dev", 5, 32)
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
    return task_data.create_vqa_dataset(
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
      task_data.create_vqa_dataset(
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
      task_data.create_nlvr2_dataset(
        train, tokenizer, image_size=32, batch_size=4, seed=0, train=True
      )
    )
  )
  assert batch["image"].shape == batch["image2"].shape == (4, 32, 32, 3)
  assert not (batch["image"] == batch["image2"]).all()
  assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int64
  assert list(batch["label"]) == [train[i].label for i in batch["index"]]
  batches = list(
    task_data.create_nlvr2_dataset(dev, tokenizer, image_size=32, batch_size=8, seed=0, train=False)
  )
  assert [b["valid"].sum() for b in batches] == [8, 8, 5]
  assert list(np.concatenate([b["index"] for b in batches])[:21]) == list(range(21))


def test_unreadable_images_are_skipped_and_counted(vqa_set, tmp_path, caplog):
  root = tmp_path / "vqa"
  shutil.copytree(vqa_set.root, root)
  questions, annotations = (
    str(root / os.path.basename(p)) for p in (vqa_set.train_questions, vqa_set.train_annotations)
  )
  train = task_data.read_vqa(questions, annotations, str(root))[:24]
  corrupt, missing = train[0].image, train[3 * 3].image  # images 1 and 4 (3 questions each)
  with open(corrupt, "r+b") as f:
    f.truncate(100)
  os.remove(missing)
  vocab = _vocab(train)
  with caplog.at_level(logging.WARNING):
    dataset = task_data.create_vqa_dataset(
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
    task_data.create_vqa_dataset(
      train, WordTokenizer(), vocab, image_size=32, batch_size=24, seed=0, train=False
    )
  )
  invalid = set(eval_batch["question_id"][~eval_batch["valid"]].tolist())
  assert invalid == bad
