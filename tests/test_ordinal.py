"""PRESTO and proportional-odds ordinal regression."""

import warnings

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.datasets import load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skreg.datasets import make_rare_ordinal
from skreg.ordinal import (
    PrestoClassifier,
    PrestoClassifierCV,
    ProportionalOddsClassifier,
)


def _class_proba(eta):
    """Reference class probabilities from cumulative logits, in NumPy."""
    cum = expit(eta)
    n = len(eta)
    return np.diff(np.hstack([np.zeros((n, 1)), cum, np.ones((n, 1))]), axis=1)


def _nll(eta, y, w=None):
    proba = _class_proba(eta)[np.arange(len(y)), y]
    w = np.full(len(y), 1 / len(y)) if w is None else w / w.sum()
    return -(w * np.log(proba)).sum()


def _nll_grad_eta(eta, y):
    """Reference gradient of the mean NLL with respect to the cumulative logits."""
    n, km1 = eta.shape
    cum = expit(eta)
    dens = cum * (1 - cum)
    proba = _class_proba(eta)[np.arange(n), y]
    grad = np.zeros_like(eta)
    rows = np.arange(n)
    upper = y < km1
    grad[rows[upper], y[upper]] -= dens[rows[upper], y[upper]] / proba[upper]
    lower = y > 0
    grad[rows[lower], y[lower] - 1] += dens[rows[lower], y[lower] - 1] / proba[lower]
    return grad / n


def _proportional_odds_data(n, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    coef = np.array([1.0, -0.5, 0.0])
    intercept = np.array([-1.0, 0.5, 2.0])
    cum = expit(intercept + (X @ coef)[:, None])
    y = (rng.uniform(size=(n, 1)) > cum).sum(1)
    return X, y, coef, intercept


def test_proportional_odds_recovers_planted_parameters_on_large_n():
    X, y, coef, intercept = _proportional_odds_data(20000, seed=0)
    clf = ProportionalOddsClassifier(device="cpu").fit(X, y)
    np.testing.assert_allclose(clf.coef_, coef, atol=0.05)
    np.testing.assert_allclose(clf.intercept_, intercept, atol=0.06)


def test_presto_recovers_planted_non_parallel_weights_on_large_n():
    X, y, _, beta = make_rare_ordinal(n_samples=20000, n_features=3,
                                      intercepts=(0, 2), return_coef=True,
                                      random_state=1)
    assert np.any(beta[1] != beta[0])
    clf = PrestoClassifier(alpha=0.0, device="cpu").fit(X, y)
    np.testing.assert_allclose(clf.coef_, beta, atol=0.12)
    np.testing.assert_allclose(clf.intercept_, [0, 2], atol=0.12)


def test_proportional_odds_matches_statsmodels_ordered_logit():
    from statsmodels.miscmodels.ordinal_model import OrderedModel

    X, y, _ = make_rare_ordinal(n_samples=400, n_features=4, random_state=3)
    model = OrderedModel(y, X, distr="logit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = model.fit(method="bfgs", gtol=1e-8, maxiter=2000, disp=False).params
    clf = ProportionalOddsClassifier(device="cpu").fit(X, y)
    np.testing.assert_allclose(clf.coef_, -params[:4], atol=1e-4)
    thresholds = model.transform_threshold_params(params)[1:-1]
    np.testing.assert_allclose(clf.intercept_, thresholds, atol=1e-4)


def test_huge_difference_penalty_gives_the_proportional_odds_fit():
    X, y, _ = make_rare_ordinal(n_samples=600, n_features=4, random_state=4)
    presto = PrestoClassifier(alpha=1e3, penalize_first=False, tol=1e-9,
                              device="cpu").fit(X, y)
    po = ProportionalOddsClassifier(device="cpu").fit(X, y)
    np.testing.assert_allclose(presto.coef_, np.tile(po.coef_, (3, 1)), atol=1e-6)
    np.testing.assert_allclose(presto.intercept_, po.intercept_, atol=1e-6)


def test_huge_penalty_with_first_penalized_gives_the_intercept_only_fit():
    X, y, _ = make_rare_ordinal(n_samples=300, n_features=4, random_state=5)
    clf = PrestoClassifier(alpha=1e3, device="cpu").fit(X, y)
    assert np.all(clf.coef_ == 0)
    shares = np.cumsum(np.bincount(y, minlength=4) / len(y))[:-1]
    np.testing.assert_allclose(expit(clf.intercept_), shares, atol=1e-8)


def test_zero_penalty_gives_the_separate_cumulative_logit_mle():
    X, y, _ = make_rare_ordinal(n_samples=500, n_features=2, intercepts=(0, 2.5),
                                random_state=6)
    clf = PrestoClassifier(alpha=0.0, tol=1e-9, device="cpu").fit(X, y)
    assert clf.count_crossings(X) == 0

    def objective(theta):
        intercept, coef = theta[:2], theta[2:].reshape(2, 2)
        eta = intercept + X @ coef.T
        if np.any(np.diff(eta, axis=1) <= 0):
            return np.inf
        return _nll(eta, y)

    start = np.r_[np.log([0.5, 0.9 / 0.1]), np.zeros(4)]
    ref = minimize(objective, start, method="BFGS", options={"gtol": 1e-9}).x
    np.testing.assert_allclose(clf.intercept_, ref[:2], atol=1e-4)
    np.testing.assert_allclose(clf.coef_, ref[2:].reshape(2, 2), atol=1e-4)


@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
@pytest.mark.parametrize("penalize_first", [True, False])
def test_returned_solution_satisfies_the_kkt_conditions(l1_ratio, penalize_first):
    X, y, _ = make_rare_ordinal(n_samples=400, n_features=5, random_state=7)
    lam = 0.004
    clf = PrestoClassifier(alpha=lam, l1_ratio=l1_ratio, standardize=False,
                           penalize_first=penalize_first, tol=1e-8,
                           device="cpu").fit(X, y)
    eta = clf.intercept_ + X @ clf.coef_.T
    g_eta = _nll_grad_eta(eta, y)
    np.testing.assert_allclose(g_eta.sum(0), 0, atol=1e-6)
    psi = np.diff(clf.coef_, axis=0, prepend=0)
    mask = np.ones((3, 1))
    mask[0] = float(penalize_first)
    # d/dpsi_j = sum over thresholds k >= j of d/dbeta_k
    g_psi = np.cumsum((g_eta.T @ X)[::-1], axis=0)[::-1]
    g_psi = g_psi + lam * (1 - l1_ratio) * mask * psi
    lasso = lam * l1_ratio * mask * np.ones_like(psi)
    zero = psi == 0
    assert zero.any() and (~zero).any()
    assert np.all(np.abs(g_psi[zero]) <= lasso[zero] + 1e-6)
    np.testing.assert_allclose(g_psi[~zero], -lasso[~zero] * np.sign(psi[~zero]),
                               atol=1e-6)


def test_binary_target_gives_unpenalized_logistic_regression():
    X, y, _ = make_rare_ordinal(n_samples=300, n_features=3, intercepts=(0.5,),
                                random_state=8)
    clf = PrestoClassifier(alpha=0.0, tol=1e-10, device="cpu").fit(X, y)
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(X, y)
    # P(y <= 0) = sigmoid(intercept_ + coef_ x) is P(y = 1) with the signs flipped
    np.testing.assert_allclose(clf.coef_[0], -ref.coef_[0], atol=1e-4)
    np.testing.assert_allclose(clf.intercept_, -ref.intercept_, atol=1e-4)
    np.testing.assert_allclose(clf.decision_function(X), ref.decision_function(X),
                               atol=1e-4)


def test_probabilities_are_valid_where_fitted_curves_cross():
    X, y, _ = make_rare_ordinal(n_samples=300, n_features=4, random_state=9)
    clf = PrestoClassifier(alpha=0.0, device="cpu").fit(X, y)
    X_far = 6 * np.random.RandomState(0).uniform(-1, 1, size=(500, 4))
    n_crossed = clf.count_crossings(X_far)
    assert n_crossed > 0
    eta = clf.intercept_ + X_far @ clf.coef_.T
    assert np.sum((np.diff(eta, axis=1) < 0).any(1)) == n_crossed
    proba = clf.predict_proba(X_far)
    assert proba.min() >= 0 and proba.max() <= 1
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-12)
    # rearrangement = sorting the cumulative probabilities
    np.testing.assert_allclose(np.cumsum(proba, 1)[:, :-1],
                               np.sort(expit(eta), axis=1), atol=1e-12)


def test_string_labels_give_the_same_fit_as_integer_labels():
    X, y, _ = make_rare_ordinal(n_samples=300, n_features=3, intercepts=(0, 2, 3.5),
                                random_state=10)
    names = np.array(["a_low", "b_mid", "c_high", "d_rare"])
    ints = PrestoClassifier(alpha=0.01, device="cpu").fit(X, y)
    strings = PrestoClassifier(alpha=0.01, device="cpu").fit(X, names[y])
    assert list(strings.classes_) == list(names)
    np.testing.assert_allclose(strings.predict_proba(X), ints.predict_proba(X))
    assert np.array_equal(strings.predict(X), names[ints.predict(X)])


_LABELS = np.array(["low", "mid", "high", "top"])  # not in alphabetical order


@pytest.mark.parametrize("make", [
    lambda: ProportionalOddsClassifier(device="cpu"),
    lambda: PrestoClassifier(alpha=0.01, tol=1e-9, device="cpu"),
    lambda: PrestoClassifierCV(alphas=3, cv=3, tol=1e-9, device="cpu"),
])
@pytest.mark.parametrize("as_series", [True, False])
def test_ordered_categorical_target_fits_in_its_category_order(make, as_series):
    pd = pytest.importorskip("pandas")
    X, y, _ = make_rare_ordinal(n_samples=200, n_features=3, intercepts=(0, 1.5, 3),
                                random_state=19)
    y_cat = pd.Categorical(_LABELS[y], categories=_LABELS, ordered=True)
    fitted = make().fit(X, pd.Series(y_cat) if as_series else y_cat)
    explicit = make().set_params(categories=_LABELS).fit(X, _LABELS[y])
    assert list(fitted.classes_) == list(_LABELS)
    np.testing.assert_allclose(fitted.coef_, explicit.coef_, atol=1e-8)
    np.testing.assert_allclose(fitted.intercept_, explicit.intercept_, atol=1e-8)
    assert np.array_equal(fitted.predict(X), explicit.predict(X))


def test_unused_categories_of_an_ordered_target_are_dropped():
    pd = pytest.importorskip("pandas")
    X, y, _ = make_rare_ordinal(n_samples=200, n_features=3, intercepts=(0, 1.5, 3),
                                random_state=19)
    order = ["low", "mid", "unused", "high", "top"]
    y_cat = pd.Series(pd.Categorical(_LABELS[y], categories=order, ordered=True))
    clf = ProportionalOddsClassifier(device="cpu").fit(X, y_cat)
    assert list(clf.classes_) == list(_LABELS)


def test_unordered_categorical_target_keeps_the_sorted_label_order():
    pd = pytest.importorskip("pandas")
    X, y, _ = make_rare_ordinal(n_samples=200, n_features=3, intercepts=(0, 1.5, 3),
                                random_state=19)
    y_cat = pd.Series(pd.Categorical(_LABELS[y], categories=_LABELS))
    clf = ProportionalOddsClassifier(device="cpu").fit(X, y_cat)
    assert list(clf.classes_) == sorted(_LABELS)


@pytest.mark.parametrize("make", [
    lambda: ProportionalOddsClassifier(device="cpu"),
    lambda: PrestoClassifier(alpha=0.01, penalize_first=False, tol=1e-9,
                             device="cpu"),
])
def test_reversing_the_categories_mirrors_the_model(make):
    X, y, _ = make_rare_ordinal(n_samples=300, n_features=3, intercepts=(0, 2, 3.5),
                                random_state=11)
    labels = np.array(["none", "some", "many", "all"])
    forward = make().set_params(categories=labels).fit(X, labels[y])
    backward = make().set_params(categories=labels[::-1]).fit(X, labels[y])
    assert list(backward.classes_) == list(labels[::-1])
    np.testing.assert_allclose(backward.predict_proba(X)[:, ::-1],
                               forward.predict_proba(X), atol=1e-6)


def test_integer_sample_weights_equal_repeated_rows():
    X, y, _ = make_rare_ordinal(n_samples=200, n_features=3, random_state=12)
    weights = np.random.RandomState(0).randint(0, 3, size=200)
    weighted = PrestoClassifier(alpha=0.005, tol=1e-9, device="cpu").fit(
        X, y, sample_weight=weights)
    repeated = PrestoClassifier(alpha=0.005, tol=1e-9, device="cpu").fit(
        np.repeat(X, weights, axis=0), np.repeat(y, weights))
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, atol=1e-6)
    np.testing.assert_allclose(weighted.intercept_, repeated.intercept_, atol=1e-6)


def test_zero_weight_row_where_warm_start_curves_cross_is_ignored():
    X, y, _, _ = _proportional_odds_data(150, seed=1)
    first = PrestoClassifier(alpha=0.0, device="cpu").fit(X, y)
    # far along this direction the curves of thresholds 0 and 1 cross; a class-1
    # row there lies outside the likelihood's domain at the warm start
    direction = first.coef_[0] - first.coef_[1]
    x_far = 50 * direction / np.linalg.norm(direction)
    eta = first.intercept_ + first.coef_ @ x_far
    assert eta[1] < eta[0]
    X_all, y_all = np.vstack([X, x_far]), np.r_[y, 1]
    weights = np.r_[np.ones(len(y)), 0.0]
    warm = PrestoClassifier(alpha=0.0, warm_start=True, max_iter=2000, tol=1e-9,
                            device="cpu").fit(X_all, y_all, sample_weight=weights)
    warm.set_params(alpha=0.01).fit(X_all, y_all, sample_weight=weights)
    dropped = PrestoClassifier(alpha=0.01, tol=1e-9, device="cpu").fit(X, y)
    np.testing.assert_allclose(warm.coef_, dropped.coef_, atol=1e-6)
    np.testing.assert_allclose(warm.intercept_, dropped.intercept_, atol=1e-6)


def test_cv_with_zero_weights_equals_the_cv_without_those_rows():
    X, y, _, _ = _proportional_odds_data(150, seed=1)
    weights = (np.random.RandomState(0).uniform(size=150) < 0.6).astype(float)
    keep = np.flatnonzero(weights > 0)
    position = np.full(150, -1)
    position[keep] = np.arange(keep.size)
    test_folds = [np.flatnonzero(np.arange(150) % 3 == k) for k in range(3)]
    folds = [(np.setdiff1d(np.arange(150), test), test) for test in test_folds]
    folds_kept = [(position[train[weights[train] > 0]],
                   position[test[weights[test] > 0]]) for train, test in folds]
    params = {"alphas": [0.1, 0.01, 0.001], "tol": 1e-9, "max_iter": 1000,
              "device": "cpu"}
    weighted = PrestoClassifierCV(cv=folds, **params).fit(X, y, sample_weight=weights)
    dropped = PrestoClassifierCV(cv=folds_kept, **params).fit(X[keep], y[keep])
    np.testing.assert_allclose(weighted.cv_results_["mean_test_loss"],
                               dropped.cv_results_["mean_test_loss"], rtol=1e-6)
    assert weighted.alpha_ == dropped.alpha_
    np.testing.assert_allclose(weighted.coef_, dropped.coef_, atol=1e-6)


def test_a_fit_with_non_finite_coefficients_raises_instead_of_storing_them(
        monkeypatch):
    import skreg.ordinal._presto as presto

    solve = presto.fit_presto

    def nan_solver(*args, **kwargs):
        intercept, psi, result = solve(*args, **kwargs)
        return intercept, psi * np.nan, result

    monkeypatch.setattr(presto, "fit_presto", nan_solver)
    with pytest.raises(ValueError, match="non-finite coefficients"):
        PrestoClassifier(device="cpu").fit(_X_OK, _Y_OK)
    with pytest.raises(ValueError, match="every penalty in alphas gave a non-finite"):
        PrestoClassifierCV(alphas=3, cv=2, device="cpu").fit(_X_OK, _Y_OK)


def test_cv_raises_when_a_test_fold_has_no_positive_weight():
    weights = np.r_[np.zeros(10), np.ones(30)]
    with pytest.raises(ValueError, match="fold 0 has no test sample with positive"):
        PrestoClassifierCV(cv=[(np.arange(10, 40), np.arange(10))], alphas=3,
                           device="cpu").fit(_X_OK, _Y_OK, sample_weight=weights)


def test_warm_start_reaches_the_same_solution():
    X, y, _ = make_rare_ordinal(n_samples=300, n_features=3, random_state=13)
    cold = PrestoClassifier(alpha=0.002, tol=1e-9, device="cpu").fit(X, y)
    warm = PrestoClassifier(alpha=0.02, tol=1e-9, warm_start=True, device="cpu")
    warm.fit(X, y).set_params(alpha=0.002).fit(X, y)
    np.testing.assert_allclose(warm.coef_, cold.coef_, atol=1e-6)


_UNPENALIZED = [
    lambda: ProportionalOddsClassifier(device="cpu"),
    lambda: PrestoClassifier(alpha=0.0, device="cpu"),
    lambda: PrestoClassifier(alpha=0.01, penalize_first=False, device="cpu"),
]


@pytest.mark.parametrize("make", _UNPENALIZED)
def test_separable_data_warn_that_the_mle_does_not_exist(make):
    X = np.random.default_rng(1).normal(size=(100, 2))
    y = np.digitize(X[:, 0], [-0.5, 0.5])
    with pytest.warns(ConvergenceWarning, match="separable"):
        make().fit(X, y)


@pytest.mark.parametrize("heavy_tails", [False, True])
@pytest.mark.parametrize("make", _UNPENALIZED)
def test_non_separable_data_fit_without_a_separation_warning(make, heavy_tails):
    rng = np.random.default_rng(3)
    # Student t(2) features put a few rows so far out that they are fitted with
    # certainty at a finite optimum: certainty alone does not mean separation
    X = rng.standard_t(2, size=(300, 3)) if heavy_tails else rng.normal(
        size=(300, 3))
    latent = X @ [1.0, -0.5, 0.3] + rng.logistic(size=300)
    y = np.digitize(latent, np.quantile(latent, [0.3, 0.6, 0.9]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf = make().fit(X, y)
    if heavy_tails:
        assert np.abs(clf.intercept_ + X @ np.atleast_2d(clf.coef_).T).max() > 30


@pytest.mark.parametrize("make", _UNPENALIZED[:2])
def test_log_probabilities_stay_finite_where_probabilities_underflow(make):
    X, y, _, _ = _proportional_odds_data(200, seed=3)
    clf = make().fit(X, y)
    X_far = 60 * np.random.RandomState(1).uniform(-1, 1, size=(200, 3))
    log_proba = clf.predict_log_proba(X_far)
    assert np.all(np.isfinite(log_proba))
    eta = np.sort(clf.intercept_ + X_far @ np.atleast_2d(clf.coef_).T, axis=1)
    # the edge classes in closed form: log sigmoid(eta_0), log sigmoid(-eta_last)
    np.testing.assert_allclose(log_proba[:, 0], -np.logaddexp(0, -eta[:, 0]),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(log_proba[:, -1], -np.logaddexp(0, eta[:, -1]),
                               rtol=1e-10, atol=1e-12)
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(proba), rtol=1e-8)


def test_float32_input_gives_float32_probabilities():
    X, y, _ = make_rare_ordinal(n_samples=200, n_features=3, random_state=14)
    clf = PrestoClassifier(device="cpu").fit(X.astype(np.float32), y)
    assert clf.coef_.dtype == np.float32
    assert clf.predict_proba(X.astype(np.float32)).dtype == np.float32


def test_float32_data_is_fitted_as_its_float64_values():
    # The solvers run in float64 whatever the input type: in float32 the
    # rounding of the gradient's sums kept the KKT violation above its floor,
    # and a cross-validated path on the wine data ran every penalty to
    # max_iter with a ConvergenceWarning. The fit of float32 data must be
    # the fit of the same values in float64, rounded to float32.
    X, y = load_wine(return_X_y=True)
    X32 = StandardScaler().fit_transform(X).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit32 = PrestoClassifierCV(alphas=4, cv=3, device="cpu").fit(X32, y)
    fit64 = PrestoClassifierCV(alphas=4, cv=3, device="cpu").fit(
        X32.astype(np.float64), y)
    assert fit32.coef_.dtype == np.float32
    assert fit32.alpha_ == fit64.alpha_
    np.testing.assert_array_equal(fit32.coef_, fit64.coef_.astype(np.float32))
    np.testing.assert_allclose(fit32.predict_proba(X32), fit64.predict_proba(X32),
                               atol=1e-6)


@pytest.mark.parametrize("make", _UNPENALIZED[:2])
@pytest.mark.parametrize("scale, dtype", [(1e-150, np.float64), (1e200, np.float64),
                                          (1e-37, np.float32)])
def test_fit_on_tiny_or_huge_features_is_the_fit_on_rescaled_ones(make, scale, dtype):
    X, y, _, _ = _proportional_odds_data(100, seed=4)
    reference = make().fit(X.astype(dtype), y)
    clf = make().fit((X * scale).astype(dtype), y)
    assert np.all(np.abs(clf.coef_) > 0)
    np.testing.assert_allclose(clf.coef_ * scale, reference.coef_, rtol=1e-3,
                               atol=1e-6)
    np.testing.assert_allclose(clf.intercept_, reference.intercept_, rtol=1e-3,
                               atol=1e-6)


def test_coefficients_beyond_the_float32_range_raise():
    X, y, _, _ = _proportional_odds_data(60, seed=4)
    with pytest.raises(ValueError, match=r"non-finite coefficients \(in float32\)"):
        ProportionalOddsClassifier(device="cpu").fit((X * 1e-40).astype(np.float32), y)


@pytest.mark.parametrize("make", [
    lambda: ProportionalOddsClassifier(device="cpu"),
    lambda: PrestoClassifierCV(alphas=3, cv=2, device="cpu"),
])
def test_sample_weights_near_the_float64_maximum_act_as_unit_weights(make):
    X, y, _, _ = _proportional_odds_data(60, seed=4)
    huge = make().fit(X, y, sample_weight=np.full(60, 1e308))
    unit = make().fit(X, y)
    np.testing.assert_allclose(huge.coef_, unit.coef_, rtol=1e-10)
    np.testing.assert_allclose(huge.intercept_, unit.intercept_, rtol=1e-10)


def test_a_sample_weight_dwarfing_the_others_leaves_every_class_possible():
    X, y, _, _ = _proportional_odds_data(60, seed=4)
    weights = np.ones(60)
    weights[np.flatnonzero(y == 1)[0]] = 1e300
    clf = PrestoClassifier(device="cpu").fit(X, y, sample_weight=weights)
    # the intercept-only fit: logits of the cumulative weighted class shares
    shares = np.bincount(y, weights=weights / 1e300)
    below, above = np.cumsum(shares)[:-1], np.cumsum(shares[::-1])[::-1][1:]
    np.testing.assert_allclose(clf.intercept_, np.log(below) - np.log(above),
                               rtol=1e-12)
    assert np.all(np.isfinite(clf.predict_log_proba(X)))


def test_probabilities_stay_valid_where_the_logits_overflow_float32():
    X, y, _, _ = _proportional_odds_data(60, seed=4)
    clf = PrestoClassifier(alpha=0.0, device="cpu").fit(X.astype(np.float32), y)
    # X @ coef_ overflows to +inf (every cumulative logit) and to -inf
    X_far = np.array([[3e38, -3e38, 0], [-3e38, 3e38, 0]], dtype=np.float32)
    proba = clf.predict_proba(X_far)
    np.testing.assert_array_equal(proba, [[1, 0, 0, 0], [0, 0, 0, 1]])
    assert not np.isnan(clf.predict_log_proba(X_far)).any()
    assert not np.isnan(clf.decision_function(X_far)).any()


def test_cv_path_starts_where_every_penalized_coefficient_is_zero():
    X, y, _ = make_rare_ordinal(n_samples=300, n_features=4, random_state=15)
    cv = PrestoClassifierCV(alphas=6, cv=3, device="cpu").fit(X, y)
    assert np.all(np.diff(cv.alphas_) < 0)
    np.testing.assert_allclose(cv.alphas_[-1] / cv.alphas_[0], 0.01)
    at_max = PrestoClassifier(alpha=cv.alphas_[0], device="cpu").fit(X, y)
    assert np.all(at_max.coef_ == 0)
    below = PrestoClassifier(alpha=0.95 * cv.alphas_[0], device="cpu").fit(X, y)
    assert np.any(below.coef_ != 0)


@pytest.mark.parametrize("scoring", ["brier", "log_loss"])
def test_cv_picks_the_penalty_with_lowest_held_out_loss_and_refits(scoring):
    X, y, _ = make_rare_ordinal(n_samples=400, n_features=4, random_state=16)
    cv = PrestoClassifierCV(alphas=6, cv=3, scoring=scoring, device="cpu",
                            tol=1e-8).fit(X, y)
    mean = cv.cv_results_["mean_test_loss"]
    splits = np.array([cv.cv_results_[f"split{i}_test_loss"] for i in range(3)])
    np.testing.assert_allclose(splits.mean(0), mean)
    assert cv.best_index_ == np.argmin(mean)
    assert cv.alpha_ == cv.alphas_[cv.best_index_]
    single = PrestoClassifier(alpha=cv.alpha_, tol=1e-8, device="cpu").fit(X, y)
    np.testing.assert_allclose(cv.coef_, single.coef_, atol=1e-5)


def test_grid_search_over_a_scaled_pipeline_refits_the_best_penalty():
    X, y, _ = make_rare_ordinal(n_samples=300, n_features=3, random_state=17)
    X = X * [1.0, 10.0, 100.0]
    pipe = make_pipeline(StandardScaler(), PrestoClassifier(device="cpu", tol=1e-8))
    grid = {"prestoclassifier__alpha": [0.03, 0.003, 0.0]}
    search = GridSearchCV(pipe, grid, cv=3, scoring="neg_log_loss").fit(X, y)
    best = search.best_params_["prestoclassifier__alpha"]
    direct = PrestoClassifier(alpha=best, device="cpu", tol=1e-8).fit(
        StandardScaler().fit_transform(X), y)
    np.testing.assert_allclose(search.best_estimator_[-1].coef_, direct.coef_,
                               atol=1e-6)
    assert np.isfinite(search.best_score_)


def _bad_fit(estimator, X, y, **fit_params):
    estimator.fit(X, y, **fit_params)


_X_OK = np.random.RandomState(0).uniform(-1, 1, size=(40, 2))
_Y_OK = np.arange(40) % 3


@pytest.mark.parametrize("make", [PrestoClassifier, PrestoClassifierCV,
                                  ProportionalOddsClassifier])
@pytest.mark.parametrize("X, y, params, fit_params, error, match", [
    (np.where(_X_OK > 0.9, np.nan, _X_OK), _Y_OK, {}, {}, ValueError, "NaN"),
    (np.where(_X_OK > 0.9, np.inf, _X_OK), _Y_OK, {}, {}, ValueError, "infinity"),
    (_X_OK, np.zeros(40, int), {}, {}, ValueError, "at least 2 classes"),
    (_X_OK, _Y_OK, {"categories": [0, 1, 2, 3]}, {}, ValueError,
     r"class \[3\] has no training sample"),
    (_X_OK, _Y_OK, {"categories": [0, 1]}, {}, ValueError,
     "not named in categories"),
    (_X_OK, _Y_OK, {"categories": [0, 1, 1, 2]}, {}, ValueError, "repeat"),
    (_X_OK, _Y_OK, {}, {"sample_weight": -np.ones(40)}, ValueError,
     "Negative values in data passed to `sample_weight`"),
    (_X_OK, _Y_OK, {}, {"sample_weight": np.where(_Y_OK == 2, 0.0, 1.0)},
     ValueError, "class .* has no training sample with positive weight"),
    (_X_OK, np.array(["a", 1, "b", 2] * 10, dtype=object), {}, {}, TypeError,
     "y must hold labels of one comparable type"),
    (_X_OK, np.array(["a", "b", None, "c"] * 10, dtype=object), {}, {}, ValueError,
     "y contains None"),
    (_X_OK, _Y_OK, {"device": "tpu"}, {}, ValueError, "device"),
    (_X_OK, _Y_OK, {"tol": -1.0}, {}, ValueError, "tol"),
])
def test_malformed_input_raises_a_clear_error(make, X, y, params, fit_params, error,
                                              match):
    with pytest.raises(error, match=match):
        _bad_fit(make(**params), X, y, **fit_params)


def test_cv_raises_when_a_training_fold_misses_a_class():
    y = _Y_OK.copy()
    y[:2] = 3
    with pytest.raises(ValueError, match="fold .* has no training sample"):
        PrestoClassifierCV(cv=[(np.arange(2, 40), np.arange(2)),
                               (np.arange(40), np.arange(40))],
                           alphas=3, device="cpu").fit(_X_OK, y)


def test_gpu_fit_matches_cpu_fit(device):
    X, y, _ = make_rare_ordinal(n_samples=300, n_features=3, random_state=18)
    ref = PrestoClassifier(alpha=0.003, tol=1e-9, device="cpu").fit(X, y)
    clf = PrestoClassifier(alpha=0.003, tol=1e-9, device=device).fit(X, y)
    np.testing.assert_allclose(clf.coef_, ref.coef_, atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(X), ref.predict_proba(X), atol=1e-6)
