"""ROC metrics of membership / property inference (fl_sim.metrics.roc_metrics) against
scikit-learn's roc_curve / roc_auc_score, and an independent O(N^2) definition where sklearn
is absent. Cases: seeded draws fixed before looking at any outcome."""

from __future__ import annotations

import numpy as np
import pytest

from fl_sim.metrics import roc_curve, roc_metrics


def _pairwise_auc(s: np.ndarray, y: np.ndarray) -> float:
    """P(member score > non-member score) + 1/2 P(tie): the AUC's definition, pair by pair."""
    pos, neg = s[y], s[~y]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _brute_tpr_at(s: np.ndarray, y: np.ndarray, level: float) -> float:
    """Best TPR over every threshold 'score >= t' whose FPR is at most ``level``."""
    best = 0.0
    for t in np.r_[np.inf, np.unique(s)]:
        pred = s >= t
        fpr = (pred & ~y).sum() / (~y).sum()
        if fpr <= level:
            best = max(best, (pred & y).sum() / y.sum())
    return float(best)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_curve_match_sklearn_or_pairwise(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.4
    s = rng.normal(size=300) + 0.8 * y
    if ties:
        s = np.round(s, 1)  # many tied scores
    m = roc_metrics(s, y)
    assert m["auc"] == pytest.approx(_pairwise_auc(s, y), abs=1e-12)
    fpr, tpr = roc_curve(s, y)
    try:
        from sklearn.metrics import roc_auc_score
        from sklearn.metrics import roc_curve as sk_roc
    except ImportError:  # pragma: no cover - sklearn is in the dev venv
        return
    assert m["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    sk_fpr, sk_tpr, _ = sk_roc(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_tpr_at_low_fpr_and_balanced_accuracy_by_brute_force(seed: int) -> None:
    rng = np.random.default_rng(10 + seed)
    y = np.r_[np.ones(200, bool), np.zeros(1000, bool)]
    s = np.round(rng.normal(size=1200) + 1.5 * y, 2)
    m = roc_metrics(s, y)
    assert m["tpr_at_fpr_10pct"] == pytest.approx(_brute_tpr_at(s, y, 0.1))
    assert m["tpr_at_fpr_1pct"] == pytest.approx(_brute_tpr_at(s, y, 0.01))
    assert m["tpr_at_fpr_0.1pct"] == pytest.approx(_brute_tpr_at(s, y, 0.001))
    assert m["tpr_at_fpr_0"] == pytest.approx(_brute_tpr_at(s, y, 0.0))
    # 1000 non-members cannot resolve an FPR of 0.01 %: reported as None, never as a number
    assert m["tpr_at_fpr_0.01pct"] is None
    best = max(((s >= t) & y).sum() / y.sum() / 2 + ((s < t) & ~y).sum() / (~y).sum() / 2
               for t in np.r_[np.inf, np.unique(s)])
    assert m["balanced_accuracy"] == pytest.approx(best)
    assert (m["num_members"], m["num_nonmembers"]) == (200, 1000)


def test_perfect_random_and_inverted_scores() -> None:
    y = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    perfect = roc_metrics(np.r_[np.ones(50), np.zeros(50)], y)
    assert perfect["auc"] == 1.0 and perfect["tpr_at_fpr_0"] == 1.0
    assert perfect["balanced_accuracy"] == 1.0
    inverted = roc_metrics(np.r_[np.zeros(50), np.ones(50)], y)
    assert inverted["auc"] == 0.0 and inverted["tpr_at_fpr_10pct"] == 0.0
    constant = roc_metrics(np.zeros(100), y)
    assert constant["auc"] == 0.5 and constant["balanced_accuracy"] == 0.5


def test_refuses_one_class_and_nan() -> None:
    with pytest.raises(ValueError, match="members and non-members"):
        roc_metrics(np.ones(3), np.ones(3, bool))
    with pytest.raises(ValueError, match="NaN"):
        roc_metrics(np.array([np.nan, 1.0]), np.array([True, False]))
