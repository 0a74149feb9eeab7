"""Tests of skreg.completion: recovery, solver agreement, fold-in, inputs, pipelines."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn import config_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline

from skreg.completion import LowRankCompleter
from skreg.completion._solver import observed_entries, spectral_init
from skreg.datasets import make_low_rank_matrix_completion


def _rmse(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


@pytest.mark.parametrize("solver", ["altmin_exact", "altmin"])
def test_noiseless_low_rank_matrix_is_recovered_to_1e_minus_6(solver, device):
    X, U, V = make_low_rank_matrix_completion(120, 90, rank=3, density=0.35,
                                              random_state=0)
    truth = U @ V.T
    completer = LowRankCompleter(rank=3, alpha=0.0, center=False, tol=0.0,
                                 max_iter=60, solver=solver, random_state=0,
                                 device=device)
    filled = completer.fit_transform(X)
    relative = np.linalg.norm(filled - truth) / np.linalg.norm(truth)
    assert relative < 1e-6


def test_approximate_solver_rmse_is_within_one_percent_of_exact_solver():
    X, U, V = make_low_rank_matrix_completion(200, 160, rank=4, density=0.25,
                                              noise=0.1, random_state=1)
    truth = U @ V.T
    missing = np.isnan(X)
    errors = {}
    for solver in ("altmin_exact", "altmin"):
        completer = LowRankCompleter(rank=4, center=False, solver=solver,
                                     n_cg_steps=2, random_state=0, device="cpu")
        errors[solver] = _rmse(completer.fit_transform(X)[missing], truth[missing])
    assert errors["altmin"] <= 1.01 * errors["altmin_exact"]
    # and both are near the noise floor sigma * sqrt(dof / |Omega|), not the signal
    floor = 0.1 * np.sqrt(4 * (200 + 160) / (~missing).sum())
    assert errors["altmin_exact"] < 2 * floor


def _uncentered_low_rank(kind):
    # Matrices whose mean dwarfs their other components: the default CG
    # half-steps used to stall there far from the exact solver's answer.
    rng = np.random.default_rng(0)
    if kind == "offset":
        truth = rng.normal(size=(60, 3)) @ rng.normal(size=(40, 3)).T + 300
        rank = 4
    else:
        rng.random(60 * 3 + 40 * 3 + 60 * 40)  # skip to the draws that stalled
        truth = rng.uniform(size=(60, 5)) @ rng.uniform(size=(40, 5)).T
        rank = 5
    missing = rng.random(truth.shape) >= 0.5
    return np.where(missing, np.nan, truth), truth, missing, rank


@pytest.mark.parametrize("kind", ["offset", "nonnegative"])
def test_default_solver_matches_the_exact_solver_on_uncentered_matrices(kind):
    X, truth, missing, rank = _uncentered_low_rank(kind)
    errors = {}
    for solver in ("altmin_exact", "altmin"):
        completer = LowRankCompleter(rank=rank, center=False, solver=solver,
                                     random_state=0, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            filled = completer.fit_transform(X)
        errors[solver] = _rmse(filled[missing], truth[missing])
    assert errors["altmin_exact"] < 1e-2
    assert errors["altmin"] <= 1.1 * errors["altmin_exact"]


@pytest.mark.parametrize("scale", [1e-100, 1e-200])
def test_default_solver_matches_the_exact_solver_on_tiny_values(scale):
    X, _, _ = make_low_rank_matrix_completion(30, 20, rank=2, density=0.6,
                                              random_state=0)
    filled = {}
    for solver in ("altmin_exact", "altmin"):
        completer = LowRankCompleter(rank=2, solver=solver, max_iter=5,
                                     random_state=0, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            filled[solver] = completer.fit_transform(X * scale) / scale
    # alpha dwarfs values this small: the factors vanish, the offsets remain
    assert np.all(np.isfinite(filled["altmin"]))
    np.testing.assert_allclose(filled["altmin"], filled["altmin_exact"], atol=1e-9)


@pytest.mark.parametrize("dtype, scale", [(np.float64, 1e200), (np.float32, 1e20)])
def test_observed_values_whose_squares_overflow_raise_before_fitting(dtype, scale):
    X, _, _ = make_low_rank_matrix_completion(30, 20, rank=2, density=0.6,
                                              random_state=0)
    completer = LowRankCompleter(rank=2, device="cpu")
    with pytest.raises(ValueError, match="sum of their squares overflows"):
        completer.fit((X * scale).astype(dtype))


def test_stopping_at_max_iter_before_tol_warns():
    X, _, _ = make_low_rank_matrix_completion(40, 30, rank=2, density=0.5,
                                              noise=0.1, random_state=15)
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        LowRankCompleter(rank=2, max_iter=2, random_state=0, device="cpu").fit(X)


def test_exact_fit_stops_at_the_rounding_level_without_warning():
    X, U, V = make_low_rank_matrix_completion(120, 90, rank=3, density=0.35,
                                              random_state=0)
    completer = LowRankCompleter(rank=3, alpha=0.0, center=False, tol=0.0,
                                 max_iter=100, solver="altmin_exact",
                                 random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        filled = completer.fit_transform(X)
    assert completer.n_iter_ < 100
    assert completer.reconstruction_err_[-1] < 1e-12
    assert np.abs(filled - U @ V.T).max() < 1e-10


def test_training_error_of_exact_alternating_least_squares_never_increases():
    X, _, _ = make_low_rank_matrix_completion(80, 70, rank=3, density=0.3,
                                              noise=0.2, random_state=2)
    completer = LowRankCompleter(rank=3, alpha=0.0, center=False, tol=0.0,
                                 max_iter=15, solver="altmin_exact", init="random",
                                 random_state=0, device="cpu").fit(X)
    history = completer.reconstruction_err_
    assert history.shape == (completer.n_iter_,) == (15,)
    assert np.all(np.diff(history) <= 1e-12 * history[:-1])


def test_dense_with_nan_and_sparse_inputs_give_the_same_model():
    X, _, _ = make_low_rank_matrix_completion(70, 50, rank=3, density=0.4,
                                              noise=0.05, random_state=3)
    X[4, 7] = 0.0  # an observed zero must stay observed in the sparse matrix
    rows, cols = np.nonzero(~np.isnan(X))
    X_sparse = sp.coo_matrix((X[rows, cols], (rows, cols)), shape=X.shape).tocsr()
    assert X_sparse.nnz == rows.size
    params = dict(rank=3, alpha=1e-2, random_state=0, device="cpu")
    dense = LowRankCompleter(**params).fit(X)
    sparse = LowRankCompleter(**params).fit(X_sparse)
    np.testing.assert_allclose(sparse.components_, dense.components_, atol=1e-10)
    np.testing.assert_allclose(sparse.row_factors_, dense.row_factors_, atol=1e-10)
    np.testing.assert_allclose(sparse.mean_, dense.mean_, atol=1e-10)
    np.testing.assert_allclose(sparse.transform(X_sparse), dense.transform(X),
                               atol=1e-10)


def test_duplicate_coo_entries_are_summed_as_scipy_reads_them():
    X, _, _ = make_low_rank_matrix_completion(40, 30, rank=2, density=0.5,
                                              noise=0.05, random_state=16)
    rows, cols = np.nonzero(~np.isnan(X))
    values = X[rows, cols]
    # the first entry stored as two halves: scipy's matrix is unchanged
    coo = sp.coo_matrix(
        (np.r_[values[0] / 2, values[0] / 2, values[1:]],
         (np.r_[rows[0], rows], np.r_[cols[0], cols])), shape=X.shape)
    canonical = sp.csr_matrix((values, (rows, cols)), shape=X.shape)
    assert np.array_equal(coo.toarray(), canonical.toarray())
    params = dict(rank=2, alpha=1e-2, random_state=0, device="cpu")
    from_coo = LowRankCompleter(**params).fit(coo)
    expected = LowRankCompleter(**params).fit(canonical)
    np.testing.assert_allclose(from_coo.components_, expected.components_,
                               atol=1e-10)
    np.testing.assert_allclose(from_coo.transform(coo), expected.transform(canonical),
                               atol=1e-10)
    assert coo.nnz == values.size + 1  # the caller's matrix is left as it was


def test_a_numeric_missing_value_placeholder_acts_like_nan():
    X, _, _ = make_low_rank_matrix_completion(40, 30, rank=2, density=0.5,
                                              noise=0.05, random_state=14)
    placeholder = np.where(np.isnan(X), -999.0, X)
    params = dict(rank=2, random_state=0, device="cpu")
    with_nan = LowRankCompleter(**params).fit_transform(X)
    with_placeholder = LowRankCompleter(missing_values=-999.0,
                                        **params).fit_transform(placeholder)
    np.testing.assert_allclose(with_placeholder, with_nan, rtol=1e-10)


def test_spectral_start_alone_is_close_to_a_noiseless_low_rank_matrix():
    X, U, V = make_low_rank_matrix_completion(300, 300, rank=2, density=0.5,
                                              random_state=4)
    rows, cols = np.nonzero(~np.isnan(X))
    entries = observed_entries(torch.as_tensor(rows), torch.as_tensor(cols),
                               torch.as_tensor(X[rows, cols]), X.shape)
    U0, V0 = spectral_init(entries, 2, torch.Generator().manual_seed(0))
    truth = U @ V.T
    start = (U0 @ V0.T).numpy()
    # P_Omega(M)/p is unbiased; its top-2 part is a rough but real estimate
    assert np.linalg.norm(start - truth) / np.linalg.norm(truth) < 0.5


def test_fold_in_of_a_held_out_row_equals_refitting_that_row():
    X, _, _ = make_low_rank_matrix_completion(90, 40, rank=3, density=0.5,
                                              noise=0.1, random_state=5)
    alpha = 0.5
    completer = LowRankCompleter(rank=3, alpha=alpha, random_state=0,
                                 device="cpu").fit(X[1:])
    row = X[:1]
    filled = completer.transform(row)
    observed = ~np.isnan(row[0])
    # Refit that row by hand: ridge least squares on [V, 1] against x - mean_.
    design = np.column_stack([completer.components_.T, np.ones(X.shape[1])])
    target = row[0, observed] - completer.mean_[observed]
    d = design[observed]
    coef = np.linalg.solve(d.T @ d + alpha * np.eye(4), d.T @ target)
    expected = np.where(observed, row[0], design @ coef + completer.mean_)
    np.testing.assert_allclose(filled[0], expected, rtol=1e-9, atol=1e-9)


def test_transform_of_the_training_rows_reproduces_fit_transform():
    X, _, _ = make_low_rank_matrix_completion(60, 30, rank=2, density=0.5,
                                              noise=0.1, random_state=6)
    completer = LowRankCompleter(rank=2, alpha=0.1, random_state=0, device="cpu")
    np.testing.assert_allclose(completer.fit_transform(X), completer.transform(X),
                               rtol=1e-9, atol=1e-9)


def test_predict_entries_matches_the_completed_matrix():
    X, _, _ = make_low_rank_matrix_completion(50, 30, rank=2, density=0.5,
                                              random_state=7)
    completer = LowRankCompleter(rank=2, random_state=0, device="cpu")
    filled = completer.fit_transform(X)
    rows, cols = np.nonzero(np.isnan(X))
    np.testing.assert_allclose(completer.predict_entries(rows, cols),
                               filled[rows, cols], rtol=1e-12)


def test_float32_input_is_completed_in_float32():
    X, U, V = make_low_rank_matrix_completion(60, 40, rank=2, density=0.5,
                                              random_state=8)
    completer = LowRankCompleter(rank=2, random_state=0, device="cpu")
    filled = completer.fit_transform(X.astype(np.float32))
    assert filled.dtype == np.float32
    assert completer.components_.dtype == np.float32
    assert _rmse(filled, U @ V.T) < 1e-2


def test_all_missing_column_and_row_are_filled_with_means_never_nan():
    X, _, _ = make_low_rank_matrix_completion(40, 30, rank=2, density=0.6,
                                              random_state=9)
    X[:, 5] = np.nan
    X[3, :] = np.nan
    completer = LowRankCompleter(rank=2, alpha=0.0, random_state=0, device="cpu")
    filled = completer.fit_transform(X)
    assert np.all(np.isfinite(filled))
    assert np.all(completer.components_[:, 5] == 0)
    # the column is filled with the global mean plus each row's offset
    global_mean = np.nanmean(X)
    np.testing.assert_allclose(completer.mean_[5], global_mean, rtol=1e-12)
    np.testing.assert_allclose(filled[:, 5], global_mean + completer.row_offsets_,
                               rtol=1e-12)
    # the row has no information of its own: it gets the column offsets
    np.testing.assert_allclose(filled[3], completer.mean_, rtol=1e-12)


def test_mask_hides_entries_like_missing_values_and_routes_through_a_pipeline():
    X, _, _ = make_low_rank_matrix_completion(50, 30, rank=2, density=0.7,
                                              noise=0.1, random_state=10)
    mask = np.random.RandomState(0).rand(*X.shape) < 0.8
    hidden = X.copy()
    hidden[~mask] = np.nan
    expected = LowRankCompleter(rank=2, random_state=0, device="cpu").fit(hidden)
    with config_context(enable_metadata_routing=True):
        completer = LowRankCompleter(rank=2, random_state=0, device="cpu")
        completer.set_fit_request(mask=True)
        pipe = make_pipeline(completer).fit(X, mask=mask)
    np.testing.assert_allclose(pipe[0].components_, expected.components_,
                               atol=1e-12)


def test_completer_as_imputer_in_a_grid_search_finds_the_rank_and_beats_the_mean():
    # The label is a linear function of the hidden row factors: a classifier can
    # only read it well from rows whose missing entries were filled correctly.
    X, U, _ = make_low_rank_matrix_completion(240, 40, rank=3, density=0.25,
                                              noise=0.1, random_state=0)
    y = (U @ np.array([1.0, -1.0, 0.5]) > 0).astype(int)
    search = GridSearchCV(
        make_pipeline(LowRankCompleter(alpha=1.0, random_state=0, device="cpu"),
                      LogisticRegression()),
        {"lowrankcompleter__rank": [1, 3]}, cv=3,
    ).fit(X, y)
    mean_score = cross_val_score(make_pipeline(SimpleImputer(), LogisticRegression()),
                                 X, y, cv=3).mean()
    assert search.best_params_["lowrankcompleter__rank"] == 3
    assert search.best_score_ > mean_score + 0.03


def test_verbose_shows_a_progress_bar_with_the_training_rmse(capsys):
    X, _, _ = make_low_rank_matrix_completion(30, 20, rank=2, density=0.5,
                                              random_state=11)
    LowRankCompleter(rank=2, max_iter=3, verbose=1, device="cpu").fit(X)
    assert "rmse=" in capsys.readouterr().err


def test_generator_observes_the_requested_fraction_of_a_unit_variance_truth():
    X, U, V = make_low_rank_matrix_completion(400, 300, rank=5, density=0.1,
                                              noise=0.0, random_state=12)
    observed = ~np.isnan(X)
    assert abs(observed.mean() - 0.1) < 0.01
    assert abs((U @ V.T).std() - 1.0) < 0.1
    X_sparse, U2, V2 = make_low_rank_matrix_completion(
        400, 300, rank=5, density=0.1, noise=0.0, sparse=True, random_state=12)
    assert sp.issparse(X_sparse) and abs(X_sparse.nnz / (400 * 300) - 0.1) < 0.01
    coo = X_sparse.tocoo()
    np.testing.assert_allclose(coo.data, np.einsum("ij,ij->i", U2[coo.row],
                                                   V2[coo.col]))


def _fitted():
    X, _, _ = make_low_rank_matrix_completion(20, 10, rank=2, density=0.6,
                                              random_state=13)
    return X, LowRankCompleter(rank=2, device="cpu").fit(X)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("rank_above_min_shape", ValueError, "must not exceed min"),
        ("all_missing", ValueError, "no observed entry"),
        ("inf_value", ValueError, "infinity"),
        ("transform_wrong_width", ValueError, "features"),
        ("mask_wrong_shape", ValueError, "mask must be a boolean array"),
        ("mask_with_sparse_X", TypeError, "mask is only supported with dense"),
        ("negative_alpha", ValueError, "alpha"),
        ("bad_solver", ValueError, "solver"),
        ("bad_device", ValueError, "device"),
        ("entries_out_of_range", ValueError, "cols must lie in"),
        ("entries_not_integers", TypeError, "rows must be a 1-d array of integers"),
        ("missing_values_inf", ValueError, "missing_values=inf is not supported"),
        ("missing_values_minus_inf", ValueError,
         "missing_values=-inf is not supported"),
        ("fold_in_row_out_of_range", ValueError, r"rows must lie in \[0, 1\)"),
        ("fold_in_col_out_of_range", ValueError, r"cols must lie in \[0, 10\)"),
        ("fold_in_nan_value", ValueError, "values contains NaN"),
        ("fold_in_lengths_differ", ValueError, "rows, cols and values must be"),
        ("fold_in_n_rows_not_integer", TypeError, "n_rows must be an integer"),
    ],
)
def test_malformed_input_raises_a_clear_error(case, error, match):
    X, fitted = _fitted()
    with pytest.raises(error, match=match):
        if case == "rank_above_min_shape":
            LowRankCompleter(rank=11, device="cpu").fit(X)
        elif case == "all_missing":
            LowRankCompleter(rank=1, device="cpu").fit(np.full((5, 4), np.nan))
        elif case == "inf_value":
            X[0, 0] = np.inf
            LowRankCompleter(rank=2, device="cpu").fit(X)
        elif case == "transform_wrong_width":
            fitted.transform(X[:, :-1])
        elif case == "mask_wrong_shape":
            LowRankCompleter(rank=2, device="cpu").fit(X, mask=np.ones((20, 9), bool))
        elif case == "mask_with_sparse_X":
            LowRankCompleter(rank=2, device="cpu").fit(
                sp.csr_matrix(np.nan_to_num(X)), mask=np.ones(X.shape, bool))
        elif case == "negative_alpha":
            LowRankCompleter(alpha=-1.0, device="cpu").fit(X)
        elif case == "bad_solver":
            LowRankCompleter(solver="svd", device="cpu").fit(X)
        elif case == "bad_device":
            LowRankCompleter(rank=2, device="tpu").fit(X)
        elif case == "entries_out_of_range":
            fitted.predict_entries([0, 1], [2, 10])
        elif case == "entries_not_integers":
            fitted.predict_entries([0.5], [1])
        elif case in ("missing_values_inf", "missing_values_minus_inf"):
            placeholder = np.inf if case == "missing_values_inf" else -np.inf
            LowRankCompleter(rank=2, missing_values=placeholder, device="cpu").fit(
                np.where(np.isnan(X), placeholder, X))
        elif case == "fold_in_row_out_of_range":
            fitted.fold_in(1, [5], [0], [1.0])
        elif case == "fold_in_col_out_of_range":
            fitted.fold_in(1, [0], [10], [1.0])
        elif case == "fold_in_nan_value":
            fitted.fold_in(1, [0], [0], [np.nan])
        elif case == "fold_in_lengths_differ":
            fitted.fold_in(1, [0, 0], [0, 1], [1.0])
        elif case == "fold_in_n_rows_not_integer":
            fitted.fold_in(1.5, [0], [0], [1.0])


def test_integral_rank_of_any_type_fits_as_that_rank():
    # The rank constraint admits any Integral (as scikit-learn's do: PCA
    # takes n_components=True as 1); a bool rank once reached the solver as
    # a mask index and failed with a tensor size error.
    X, _, _ = make_low_rank_matrix_completion(40, 30, rank=1, density=0.6,
                                              random_state=3)
    reference = LowRankCompleter(rank=1, random_state=0, device="cpu").fit(X)
    for rank in (True, np.int64(1)):
        fitted = LowRankCompleter(rank=rank, random_state=0, device="cpu").fit(X)
        np.testing.assert_array_equal(fitted.components_, reference.components_)
