"""Compositional benchmark scores on crafted score arrays, against values worked by hand."""

import numpy as np
import pytest

from vlp_jax.evaluation import compositional


def scores_1xn(*rows):
  """Items with one image: (N, 1, captions)."""
  return np.asarray(rows, np.float64)[:, None, :]


def test_winoground_text_image_group_scores():
  # [image, caption] per item; image i belongs with caption i.
  scores = np.array(
    [
      [[0.9, 0.1], [0.2, 0.8]],  # all right: text, image, group
      [[0.9, 0.1], [0.95, 0.8]],  # i1 prefers c0 (text no); c0 prefers i1 (image no)
      [[0.5, 0.6], [0.1, 0.7]],  # i0 prefers c1 (text no); c0 -> i0, c1 -> i1 (image yes)
      [[0.5, 0.5], [0.5, 0.5]],  # all tied: strict inequalities fail everything
    ]
  )
  got = compositional.winoground_scores(scores)
  assert got == {"text_score": 1 / 4, "image_score": 2 / 4, "group_score": 1 / 4}


def test_sugarcrepe_accuracy_per_subset_is_strict_and_macro_averaged():
  scores = scores_1xn([0.9, 0.1], [0.2, 0.3], [0.5, 0.5], [0.7, 0.6], [0.1, 0.2])
  subsets = np.array(["add_att", "add_att", "add_att", "swap_obj", "swap_obj"])
  got = compositional.pairwise_accuracy(scores, subsets)
  assert got["add_att"] == pytest.approx(1 / 3)  # the tie counts as wrong
  assert got["swap_obj"] == pytest.approx(1 / 2)
  assert got["mean"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_aro_vg_relation_macro_excludes_symmetric_relations_and_ties_are_wrong():
  # [false, true] captions.
  scores = scores_1xn([0.1, 0.9], [0.9, 0.1], [0.5, 0.5], [0.2, 0.3], [0.3, 0.2], [0.0, 1.0])
  relations = np.array(["on", "on", "on", "holding", "holding", "next to"])
  excluded = compositional.load_list("aro_vg_relation_excluded.txt")
  assert "next to" in excluded and "on" not in excluded
  got = compositional.aro_vg_accuracy(scores, relations, exclude=excluded)
  # on: 1/3 right (tie wrong), holding: 1/2; "next to" excluded from the macro average.
  assert got["macro_accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)
  assert got["accuracy"] == pytest.approx(3 / 6)
  assert got["num_groups"] == 2


def test_aro_vg_attribution_needs_25_items_per_attribute_pair():
  right, wrong = [0.0, 1.0], [1.0, 0.0]
  scores = scores_1xn(*([right] * 20 + [wrong] * 5 + [right] * 3 + [wrong] * 21))
  pairs = np.array(["white_black"] * 25 + ["big_small"] * 24)
  got = compositional.aro_vg_accuracy(scores, pairs, min_count=25)
  assert got["macro_accuracy"] == pytest.approx(20 / 25)  # big_small has 24 items
  assert got["num_groups"] == 1


def test_aro_order_takes_the_first_maximum_like_np_argmax():
  scores = scores_1xn(
    [0.9, 0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.1, 0.1, 0.1], [0.1, 0.2, 0.1, 0.1, 0.1]
  )
  assert compositional.order_precision(scores) == pytest.approx(2 / 3)


def test_crepe_ranks_count_ties_against_the_positive_and_padding_never():
  pad = compositional.PAD
  item_texts = np.array([[0, 1, 2, pad], [3, 4, 5, 6], [7, 8, pad, pad]])
  raw = np.array([[0.5, 0.9, 0.1, 0.0], [0.2, 0.3, 0.4, 0.2], [0.8, 0.1, 0.0, 0.0]], np.float64)[
    :, None, :
  ]
  scores = np.where((item_texts != pad)[:, None, :], raw, -np.inf)
  ranks = compositional.positive_ranks(scores)
  assert ranks.tolist() == [1, 3, 0]  # item 1: 0.3, 0.4 and the tied 0.2 are not below
  got = compositional.crepe_metrics(ranks)
  assert got["R@1"] == pytest.approx(1 / 3)
  assert got["R@3"] == pytest.approx(2 / 3)
  assert got["R@5"] == got["R@10"] == 1.0
  assert got["mean_rank"] == pytest.approx(1 + 4 / 3)
  assert got["median_rank"] == 2.0


def test_item_scores_are_cosines_with_padding_minus_infinity():
  image_emb = np.array([[1.0, 0.0], [0.0, 1.0]])
  text_emb = np.array([[1.0, 0.0], [0.6, 0.8]])
  scores = compositional.item_scores(
    image_emb, text_emb, np.array([[0, 1]]), np.array([[1, compositional.PAD]])
  )
  np.testing.assert_allclose(scores[0, :, 0], [0.6, 0.8])
  assert np.all(np.isneginf(scores[0, :, 1]))


def test_svo_accuracies_with_a_given_threshold_count_shared_pairs_once():
  # Rows: (s(sentence, pos), s(sentence, neg)); rows 0 and 1 share their positive pair.
  pos = np.array([0.6, 0.6, 0.2, 0.7, 0.4])
  neg = np.array([0.3, 0.55, 0.1, 0.8, 0.45])
  pos_pairs = np.array([0, 0, 2, 3, 4])
  neg_pairs = np.array([10, 11, 12, 13, 14])
  kinds = np.array(["subj", "subj", "verb", "obj", "obj"])
  got = compositional.svo_metrics(pos, neg, pos_pairs, neg_pairs, kinds, threshold=0.5)
  # Unique positive pairs 0 (0.6), 2 (0.2), 3 (0.7), 4 (0.4): matches 2 of 4.
  assert got["all/pos_accuracy"] == pytest.approx(2 / 4)
  # Negatives 0.3, 0.55, 0.1, 0.8, 0.45: non-matches (<= 0.5) 3 of 5.
  assert got["all/neg_accuracy"] == pytest.approx(3 / 5)
  assert got["all/accuracy"] == pytest.approx((2 / 4 + 3 / 5) / 2)
  assert got["subj/pos_accuracy"] == 1.0 and got["subj/neg_accuracy"] == pytest.approx(1 / 2)
  assert got["verb/accuracy"] == pytest.approx((0 + 1) / 2)
  assert got["obj/pos_accuracy"] == pytest.approx(1 / 2) and got["obj/neg_accuracy"] == 1 / 2
  assert got["all/pairwise_accuracy"] == pytest.approx(3 / 5)
  assert got["threshold"] == 0.5


def test_svo_oracle_threshold_maximises_macro_accuracy():
  pos = np.array([0.9, 0.8, 0.35])
  neg = np.array([0.3, 0.4, 0.5])
  ids = np.arange(3)
  got = compositional.svo_metrics(pos, neg, ids, ids + 3, np.array(["subj"] * 3))
  # Any threshold in [0.5, 0.8) separates 2/3 positives and 3/3 negatives: the best.
  assert 0.5 <= got["threshold"] < 0.8
  assert got["all/accuracy"] == pytest.approx((2 / 3 + 1) / 2)
