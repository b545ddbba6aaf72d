"""finetune.metrics and finetune.evaluation against scikit-learn, scipy and torch on random data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from sklearn import metrics as skm

from finetune.evaluation import score_classifier, score_regressor
from finetune.metrics import load_metric

SEEDS = [0, 1, 2, 3]
TOL = 1e-9


@pytest.fixture(scope="module")
def classification():
    return load_metric("classification")


@pytest.fixture(scope="module")
def regression():
    return load_metric("regression")


def random_labels(rng: np.random.Generator, n: int, k: int,
                  accuracy: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """References with every class present, predictions right about `accuracy` of the time."""
    ref = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    rng.shuffle(ref)
    pred = np.where(rng.random(n) < accuracy, ref, rng.integers(0, k, n))
    return pred, ref


def tied_probabilities(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Rows drawn from a few fixed distributions (so scores tie a lot); every row sums to 1."""
    bank = rng.dirichlet(np.ones(k), size=4)
    return bank[rng.integers(0, len(bank), n)]


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_classification_matches_sklearn(classification, seed):
    rng = np.random.default_rng(seed)
    pred, ref = random_labels(rng, 60, 2)
    out = classification.compute(predictions=pred, references=ref, num_labels=2)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(ref, pred), abs=TOL)
    assert out["precision"] == pytest.approx(skm.precision_score(ref, pred, zero_division=0), abs=TOL)
    assert out["recall"] == pytest.approx(skm.recall_score(ref, pred, zero_division=0), abs=TOL)
    assert out["f1"] == pytest.approx(skm.f1_score(ref, pred, zero_division=0), abs=TOL)
    assert out["mcc"] == pytest.approx(skm.matthews_corrcoef(ref, pred), abs=TOL)
    assert out["confusion_matrix"] == skm.confusion_matrix(ref, pred, labels=[0, 1]).tolist()
    assert "roc_auc" not in out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_multiclass_averages_match_sklearn(classification, seed, k, average):
    rng = np.random.default_rng(seed)
    pred, ref = random_labels(rng, 80, k)
    out = classification.compute(predictions=pred, references=ref, num_labels=k, average=average)
    labels = list(range(k))
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(ref, pred), abs=TOL)
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        expected = fn(ref, pred, labels=labels, average=average, zero_division=0)
        assert out[name] == pytest.approx(expected, abs=TOL), name
    assert out["mcc"] == pytest.approx(skm.matthews_corrcoef(ref, pred), abs=TOL)
    assert out["confusion_matrix"] == skm.confusion_matrix(ref, pred, labels=labels).tolist()


def test_default_average_is_binary_for_two_classes_and_macro_otherwise(classification):
    rng = np.random.default_rng(5)
    pred, ref = random_labels(rng, 50, 2)
    out = classification.compute(predictions=pred, references=ref, num_labels=2)
    assert out["f1"] == pytest.approx(skm.f1_score(ref, pred, average="binary"), abs=TOL)
    pred, ref = random_labels(rng, 50, 3)
    out = classification.compute(predictions=pred, references=ref, num_labels=3)
    assert out["f1"] == pytest.approx(skm.f1_score(ref, pred, average="macro"), abs=TOL)


@pytest.mark.parametrize("average", ["macro", "weighted", "micro"])
def test_class_never_predicted_scores_zero_like_sklearn(classification, average):
    ref = np.array([0, 1, 2, 2, 1, 0, 2, 1, 0, 2])
    pred = np.array([0, 1, 1, 0, 1, 0, 1, 1, 0, 0])  # class 2 never predicted
    out = classification.compute(predictions=pred, references=ref, num_labels=3, average=average)
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        expected = fn(ref, pred, labels=[0, 1, 2], average=average, zero_division=0)
        assert out[name] == pytest.approx(expected, abs=TOL), name
    assert out["confusion_matrix"][2] == [2, 2, 0]


def test_binary_never_predicting_positive_gives_zero_precision(classification):
    ref = np.array([0, 1, 1, 0, 1])
    pred = np.zeros(5, dtype=int)
    out = classification.compute(predictions=pred, references=ref, num_labels=2)
    assert out["precision"] == out["recall"] == out["f1"] == 0.0
    assert out["mcc"] == pytest.approx(skm.matthews_corrcoef(ref, pred), abs=TOL) == 0.0
    assert out["accuracy"] == pytest.approx(0.4)


def test_num_labels_pads_the_confusion_matrix(classification):
    out = classification.compute(predictions=[0, 1, 1], references=[0, 1, 0], num_labels=4)
    assert out["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_roc_auc_uses_the_positive_column_with_ties(classification, seed):
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 2, 70)
    ref[:2] = [0, 1]
    positive = np.round(np.clip(0.3 * ref + rng.random(70) * 0.7, 0, 1), 1)  # rounded: many ties
    assert len(np.unique(positive)) < 70
    scores = np.stack([1 - positive, positive], axis=1)
    out = classification.compute(predictions=scores.argmax(1), references=ref, num_labels=2,
                                 prediction_scores=scores)
    assert out["roc_auc"] == pytest.approx(skm.roc_auc_score(ref, positive), abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [3, 4])
def test_multiclass_roc_auc_is_one_vs_rest_macro(classification, seed, k):
    rng = np.random.default_rng(seed)
    _, ref = random_labels(rng, 90, k)
    probs = tied_probabilities(rng, 90, k)
    out = classification.compute(predictions=probs.argmax(1), references=ref, num_labels=k,
                                 prediction_scores=probs)
    expected = skm.roc_auc_score(ref, probs, multi_class="ovr", average="macro", labels=list(range(k)))
    assert out["roc_auc"] == pytest.approx(expected, abs=TOL)


def test_roc_auc_is_nan_with_one_class(classification):
    scores = np.array([[0.2, 0.8], [0.6, 0.4]])
    out = classification.compute(predictions=[1, 0], references=[1, 1], num_labels=2,
                                 prediction_scores=scores)
    assert np.isnan(out["roc_auc"])


@pytest.mark.parametrize("seed", SEEDS)
def test_regression_matches_sklearn_and_scipy(regression, seed):
    rng = np.random.default_rng(seed)
    ref = rng.normal(3.0, 1.0, 50)
    pred = ref + rng.normal(0.0, 0.5, 50)
    out = regression.compute(predictions=pred, references=ref)
    assert out["mse"] == pytest.approx(skm.mean_squared_error(ref, pred), abs=TOL)
    assert out["mae"] == pytest.approx(skm.mean_absolute_error(ref, pred), abs=TOL)
    assert out["r2"] == pytest.approx(skm.r2_score(ref, pred), abs=TOL)
    assert out["pearson"] == pytest.approx(pearsonr(pred, ref)[0], abs=TOL)
    assert out["pearson"] == pytest.approx(np.corrcoef(pred, ref)[0, 1], abs=TOL)


def test_regression_constant_predictions_give_nan_pearson(regression):
    out = regression.compute(predictions=[2.0, 2.0, 2.0], references=[1.0, 2.0, 3.0])
    assert np.isnan(out["pearson"])
    assert out["mse"] == pytest.approx(2 / 3) and out["r2"] == pytest.approx(0.0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [2, 3])
def test_score_classifier_loss_is_cross_entropy(seed, k):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, (40, k)).astype(np.float32)
    labels = rng.integers(0, k, 40)
    out = score_classifier(logits, labels, num_labels=k)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels))
    assert out["eval_loss"] == pytest.approx(expected.item(), abs=1e-9)
    assert out["num_examples"] == 40
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, logits.argmax(1)), abs=TOL)
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    expected_auc = (skm.roc_auc_score(labels, probs[:, 1]) if k == 2
                    else skm.roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(k))))
    assert out["roc_auc"] == pytest.approx(expected_auc, abs=TOL)


def test_score_classifier_is_stable_for_large_logits():
    logits = np.array([[1000.0, 0.0], [0.0, 1000.0]], dtype=np.float32)
    out = score_classifier(logits, np.array([0, 0]), num_labels=2)
    assert out["eval_loss"] == pytest.approx(500.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_score_regressor_loss_is_mse(seed):
    rng = np.random.default_rng(seed)
    preds = rng.normal(0.0, 1.0, (30, 1)).astype(np.float32)  # the model's [n, 1] output
    labels = rng.normal(0.0, 1.0, 30).astype(np.float32)
    out = score_regressor(preds, labels)
    expected = torch.nn.functional.mse_loss(torch.from_numpy(preds[:, 0]).double(),
                                            torch.from_numpy(labels).double())
    assert out["eval_loss"] == pytest.approx(expected.item(), abs=TOL)
    assert out["eval_loss"] == out["mse"]
    assert out["num_examples"] == 30
