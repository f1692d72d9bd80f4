"""VQAv2 and NLVR2: answer normalisation, metrics and readers (the built-in sets and the
datasets of batches: test_task_datasets.py).

Expected numbers are worked out by hand from the official scripts' definitions (VQA
API's vqaEval.py, NLVR2's eval/metrics.py), in the comments next to them.
"""

import json
import logging

import pytest

from vlp_jax.evaluation import nlvr2, vqa
from vlp_jax.input_pipeline import nlvr2_data, vqa_data
from vlp_jax.input_pipeline.nlvr2_data import Nlvr2Example
from vlp_jax.input_pipeline.task_data import TaskDataError
from vlp_jax.input_pipeline.vqa_data import VqaExample

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
  table = vqa_data.CONTRACTIONS
  assert len(table) == 120
  assert table["hadnt've"] == table["hadn'tve"] == "hadn't've"
  assert table["yall'd've"] == table["y'alld've"] == table["y'all'dve"] == "y'all'd've"
  assert table["twas"] == "'twas" and table["somebody'd"] == "somebodyd"


def test_at_most_32_periods_are_removed():
  # The script passes re.UNICODE (32) as sub()'s count.
  assert vqa_data.process_punctuation("." * 40) == "." * 8


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
    vqa_data.read_vqa(str(bad), None, str(tmp_path))
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
    vqa_data.read_vqa(questions, None, str(tmp_path))
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
    vqa_data.read_vqa(questions, annotations, str(tmp_path))


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
  (example,) = vqa_data.read_vqa(questions, None, str(tmp_path))
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
    first, second, third = nlvr2_data.read_nlvr2(str(jsonl), str(root))
  assert first.left == str(root / "7" / "train-1-0-img0.png") and first.label
  assert second.right == str(root / "deep/er/train-2-0-img1.jpg") and not second.label
  assert third.left == str(root / "train-3-0-img0.png")  # kept: the dataset skips the row
  assert "2 of 6 images" in caplog.text
  jsonl.write_text('{"identifier": "dev-1-0-0", "sentence": "s", "label": "yes"}\n')
  with pytest.raises(TaskDataError, match=r"train.json:1: label 'yes'"):
    nlvr2_data.read_nlvr2(str(jsonl), str(root))
