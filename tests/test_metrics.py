"""Metrics on tiny arrays whose scores are worked out by hand in the comments."""

import math

import numpy as np
import pytest
import torch
from segmentation_models_pytorch.metrics import get_stats

from covidseg import metrics
from covidseg.metrics import (
    confusion_counts,
    dice,
    evaluate_studies,
    iou,
    pooled_scores,
    precision,
    recall,
    scores,
    slice_dice,
    study_scores,
)

# Four 2x2 slices, one for each case (slice axis first):
#   0: empty truth, empty prediction
#   1: empty truth, one false-positive voxel
#   2: one lesion voxel, empty prediction        -> tp 0, fp 0, fn 1
#   3: tp 1, fp 1, fn 1                           -> Dice 2/(2+1+1) = 0.5
PRED = np.array(
    [
        [[0, 0], [0, 0]],
        [[1, 0], [0, 0]],
        [[0, 0], [0, 0]],
        [[1, 1], [0, 0]],
    ],
    dtype=np.uint8,
)
TRUTH = np.array(
    [
        [[0, 0], [0, 0]],
        [[0, 0], [0, 0]],
        [[0, 0], [1, 0]],
        [[1, 0], [1, 0]],
    ],
    dtype=np.uint8,
)
NAN = float("nan")
# Per-slice Dice of the four slices under each policy.
PER_SLICE = {
    "one": [1.0, 0.0, 0.0, 0.5],
    "skip": [NAN, NAN, 0.0, 0.5],
    "zero": [0.0, 0.0, 0.0, 0.5],
}
# Means: one (1 + 0 + 0 + 0.5) / 4; skip (0 + 0.5) / 2 over the two lesion slices; zero 0.5 / 4.
MEANS = {"one": 0.375, "skip": 0.25, "zero": 0.125}


def same(a, b):
    return np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ primitives


def test_dice_has_the_factor_two():
    # tp 1, fp 1, fn 1: 2*1 / (2*1 + 1 + 1) = 0.5 (without the factor 2: 1/3).
    assert dice(1, 1, 1) == pytest.approx(0.5)
    # A perfect prediction scores 1, not 0.5.
    assert dice(7, 0, 0) == 1.0
    # tp 2, fp 1, fn 0: 4/5.
    assert dice(2, 1, 0) == pytest.approx(0.8)


def test_iou_precision_recall_by_hand():
    # tp 2, fp 1, fn 0
    assert iou(2, 1, 0) == pytest.approx(2 / 3)
    assert precision(2, 1, 0) == pytest.approx(2 / 3)
    assert recall(2, 1, 0) == 1.0
    # tp 1, fp 3, fn 4
    assert iou(1, 3, 4) == pytest.approx(1 / 8)
    assert precision(1, 3, 4) == pytest.approx(1 / 4)
    assert recall(1, 3, 4) == pytest.approx(1 / 5)
    assert scores(1, 3, 4) == pytest.approx({"dice": 2 / 9, "iou": 1 / 8, "precision": 1 / 4, "recall": 1 / 5})


def test_iou_is_dice_over_two_minus_dice():
    rng = np.random.default_rng(3)
    tp, fp, fn = (rng.integers(0, 50, size=100) for _ in range(3))
    tp[0] = 5  # at least one non-empty case
    d = dice(tp, fp, fn)
    same(iou(tp, fp, fn), d / (2 - d))


@pytest.mark.parametrize("metric", [dice, iou, precision, recall])
def test_empty_cases_for_every_policy(metric):
    # empty truth & empty prediction
    assert metric(0, 0, 0, empty="one") == 1.0
    assert metric(0, 0, 0, empty="zero") == 0.0
    assert math.isnan(metric(0, 0, 0, empty="skip"))
    # empty truth & non-empty prediction
    assert metric(0, 3, 0, empty="one") == 0.0
    assert metric(0, 3, 0, empty="zero") == 0.0
    assert math.isnan(metric(0, 3, 0, empty="skip"))
    # non-empty truth & empty prediction: 0 under every policy (precision's 0/0 included)
    for policy in metrics.EMPTY_POLICIES:
        assert metric(0, 0, 5, empty=policy) == 0.0


def test_primitives_work_elementwise():
    tp, fp, fn = np.array([0, 0, 0, 1]), np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    for policy, expected in PER_SLICE.items():
        same(dice(tp, fp, fn, empty=policy), expected)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="valid policies"):
        dice(1, 0, 0, empty="nan")
    with pytest.raises(ValueError, match="valid policies"):
        slice_dice(PRED, TRUTH, empty="ignore")


# ------------------------------------------------------------------ counts and inputs


def test_counts_by_hand():
    tp, fp, fn, tn = confusion_counts(PRED, TRUTH, axis=0)
    same(tp, [0, 0, 0, 1])
    same(fp, [0, 1, 0, 1])
    same(fn, [0, 0, 1, 1])
    same(tn, [4, 3, 3, 1])
    assert tuple(int(v) for v in confusion_counts(PRED, TRUTH)) == (1, 2, 2, 11)


def test_counts_agree_with_smp_get_stats():
    rng = np.random.default_rng(0)
    # probabilities on a 0.25 grid, so that some equal the threshold 0.5 exactly
    prob = rng.integers(0, 5, size=(6, 1, 16, 16)) / 4
    truth = rng.integers(0, 2, size=(6, 1, 16, 16))
    ours = confusion_counts(prob, truth, threshold=0.5, axis=0)
    theirs = get_stats(torch.from_numpy(prob), torch.from_numpy(truth).long(), mode="binary", threshold=0.5)
    for mine, smp in zip(ours, theirs):
        same(mine, smp[:, 0].numpy())


def test_threshold_is_greater_or_equal():
    truth = np.array([[0, 1, 1, 0]])
    prob = np.array([[0.49, 0.5, 0.51, 0.9]])
    # >= 0.5 -> [0, 1, 1, 1]: tp 2, fp 1, fn 0 -> Dice 4/5
    assert study_scores(prob, truth)["dice"] == pytest.approx(0.8)
    # > 0.5 would give [0, 0, 1, 1]: tp 1, fp 1, fn 1 -> 0.5; a threshold just above 0.5 does that
    assert study_scores(prob, truth, threshold=0.500001)["dice"] == pytest.approx(0.5)
    # nothing reaches 0.95: a lesion and an empty prediction -> 0
    assert study_scores(prob, truth, threshold=0.95)["dice"] == 0.0
    # boolean predictions are used as they are, whatever the threshold
    assert study_scores(prob >= 0.5, truth, threshold=0.99)["dice"] == pytest.approx(0.8)


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(1)
    prob = rng.random((5, 1, 8, 8)).astype(np.float32)
    truth = (rng.random((5, 1, 8, 8)) < 0.3).astype(np.uint8)
    truth[1] = 0  # one empty-truth slice
    prob_t = torch.from_numpy(prob).requires_grad_(True)
    truth_t = torch.from_numpy(truth).long()
    for policy in metrics.EMPTY_POLICIES:
        same(slice_dice(prob_t, truth_t, empty=policy), slice_dice(prob, truth, empty=policy))
    assert study_scores(prob_t, truth_t) == study_scores(prob, truth)
    assert pooled_scores([prob_t], [truth_t]) == pooled_scores(prob, truth)
    assert study_scores(prob_t.to(torch.bfloat16), truth_t)["dice"] == pytest.approx(study_scores(prob, truth)["dice"], abs=0.05)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        study_scores(PRED, TRUTH[:2])
    with pytest.raises(ValueError, match="only 0 and 1"):
        study_scores(PRED, TRUTH * 255)
    with pytest.raises(ValueError, match="only 0 and 1"):
        study_scores(PRED, TRUTH * 0.7)  # a probability map passed as the truth
    with pytest.raises(ValueError, match="NaN"):
        study_scores(np.full(PRED.shape, np.nan), TRUTH)
    with pytest.raises(ValueError, match="reduction"):
        slice_dice(PRED, TRUTH, reduction="sum")
    with pytest.raises(ValueError, match="predictions but"):
        pooled_scores([PRED], [TRUTH, TRUTH])
    with pytest.raises(ValueError, match="both as sequences"):
        pooled_scores([PRED], TRUTH)


# ------------------------------------------------------------------ the three averagings


@pytest.mark.parametrize("policy", metrics.EMPTY_POLICIES)
def test_slice_dice_per_policy(policy):
    same(slice_dice(PRED, TRUTH, empty=policy), PER_SLICE[policy])
    assert slice_dice(PRED, TRUTH, empty=policy, reduction="mean") == pytest.approx(MEANS[policy])


def test_slice_axis_leading_or_trailing():
    volume_pred, volume_truth = np.moveaxis(PRED, 0, -1), np.moveaxis(TRUTH, 0, -1)  # (H, W, N)
    for policy in metrics.EMPTY_POLICIES:
        same(slice_dice(volume_pred, volume_truth, empty=policy, axis=-1), PER_SLICE[policy])
    # a channel axis (N, 1, H, W) changes nothing
    same(slice_dice(PRED[:, None], TRUTH[:, None], empty="one"), PER_SLICE["one"])


def test_skip_mean_of_only_empty_slices_is_nan():
    assert math.isnan(slice_dice(PRED[:2], TRUTH[:2], empty="skip", reduction="mean"))


def test_pooled_and_study_scores_by_hand():
    # all voxels of the four slices: tp 1, fp 2, fn 2 -> Dice 2/(2+2+2) = 1/3, IoU 1/5,
    # precision 1/3, recall 1/3
    expected = {"dice": 1 / 3, "iou": 1 / 5, "precision": 1 / 3, "recall": 1 / 3}
    assert study_scores(PRED, TRUTH) == pytest.approx(expected)
    assert pooled_scores(PRED, TRUTH) == pytest.approx(expected)
    # pooling a list of pieces of different shapes gives the same
    assert pooled_scores([PRED[:1], PRED[1:]], [TRUTH[:1], TRUTH[1:]]) == pytest.approx(expected)
    # 1/3 differs from every per-slice mean (0.375 / 0.25 / 0.125): the averaging matters


def test_study_without_lesion_follows_the_policy():
    nothing = np.zeros((2, 3, 3), dtype=np.uint8)
    assert study_scores(nothing, nothing)["dice"] == 1.0
    assert study_scores(nothing, nothing, empty="zero")["dice"] == 0.0
    assert math.isnan(study_scores(nothing, nothing, empty="skip")["dice"])
    false_alarm = nothing.copy()
    false_alarm[0, 0, 0] = 1
    assert study_scores(false_alarm, nothing) == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}


# ------------------------------------------------------------------ a test set

# Study "b": (2, 2, 2): slice 0 perfect (tp 2), slice 1 empty truth and empty prediction.
PRED_B = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=np.uint8)
TRUTH_B = PRED_B.copy()


def test_evaluate_studies_by_hand():
    result = evaluate_studies({"a": PRED, "b": PRED_B}, {"a": TRUTH, "b": TRUTH_B})
    # per study: a pooled tp 1, fp 2, fn 2 -> 1/3; b perfect -> 1
    assert result["per_study"]["a"]["dice"] == pytest.approx(1 / 3)
    assert result["per_study"]["b"] == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "slices": 2, "lesion_slices": 1}
    assert (result["n_studies"], result["n_slices"], result["n_lesion_slices"]) == (2, 6, 3)
    assert result["mean_dice"] == pytest.approx(2 / 3)
    assert result["median_dice"] == pytest.approx(2 / 3)
    assert result["max_dice"] == 1.0
    assert result["min_dice"] == pytest.approx(1 / 3)
    # pooled: tp 1 + 2, fp 2 + 0, fn 2 + 0 -> 6 / (6 + 2 + 2) = 0.6
    assert result["pooled_dice"] == pytest.approx(0.6)
    # per slice, six slices: a [1, 0, 0, 0.5], b [1, 1]
    assert result["per_slice_dice_one"] == pytest.approx(3.5 / 6)
    assert result["per_slice_dice_skip"] == pytest.approx(1.5 / 3)  # a [0, 0.5], b [1]
    assert result["per_slice_dice_zero"] == pytest.approx(1.5 / 6)  # a [0, 0, 0, 0.5], b [1, 0]
    assert result["lesion_slices_missed"] == 1  # a's slice 2


def test_predict_nothing_baseline_by_hand():
    result = evaluate_studies({"a": PRED, "b": PRED_B}, {"a": TRUTH, "b": TRUTH_B})
    base = result["baseline"]
    # both studies have a lesion: per-study and pooled Dice 0
    assert (base["mean_dice"], base["max_dice"], base["pooled_dice"]) == (0.0, 0.0, 0.0)
    # three of the six slices have no lesion: "one" scores them 1
    assert base["per_slice_dice_one"] == pytest.approx(0.5)
    assert (base["per_slice_dice_skip"], base["per_slice_dice_zero"]) == (0.0, 0.0)
    assert base["lesion_slices_missed"] == 3
    # the same as evaluating an actual empty prediction
    empty = evaluate_studies({"a": np.zeros_like(PRED), "b": np.zeros_like(PRED_B)}, {"a": TRUTH, "b": TRUTH_B})
    for key, value in base.items():
        assert empty[key] == pytest.approx(value), key


def test_evaluate_studies_slice_axis_and_ids():
    flipped = evaluate_studies({1: np.moveaxis(PRED, 0, -1)}, {1: np.moveaxis(TRUTH, 0, -1)}, axis=-1)
    assert flipped["per_slice_dice_skip"] == pytest.approx(MEANS["skip"])
    with pytest.raises(ValueError, match="no prediction for \\['b'\\]"):
        evaluate_studies({"a": PRED}, {"a": TRUTH, "b": TRUTH_B})
    with pytest.raises(ValueError, match="no studies"):
        evaluate_studies({}, {})
