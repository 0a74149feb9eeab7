"""Orthogonal dictionary learning: recovery, optimality, API and bad input."""

import pickle

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import load_digits
from sklearn.decomposition import sparse_encode
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skreg._device import torch_generator
from skreg.datasets import make_orthogonal_sparse_data
from skreg.decomposition import OrthogonalDictionaryLearning, dictionary_recovery
from skreg.decomposition._solver import (
    frank_wolfe_step_sizes,
    polar_factor,
    random_orthogonal,
)

ALGORITHMS = ["msp", "procrustes", "frank_wolfe"]


@pytest.fixture(scope="module")
def planted():
    return make_orthogonal_sparse_data(4000, 12, sparsity=0.1, random_state=0)


def _lp_objective(components, Y, power=4):
    return np.mean(np.sum(np.abs(Y @ components.T) ** power, axis=1))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_recovers_every_planted_atom(planted, algorithm, device):
    Y, D, _ = planted
    odl = OrthogonalDictionaryLearning(
        algorithm=algorithm, max_iter=3 if algorithm == "frank_wolfe" else None,
        batch_size=64, random_state=0, device=device,
    ).fit(Y)
    result = dictionary_recovery(odl.components_, D)
    assert result.recovery == 1.0
    assert result.l4 > 0.99


def test_msp_reaches_the_planted_dictionary_objective_within_1e3(planted):
    # the l4 value of the learned atoms against the truth, the papers' error figure
    Y, D, _ = planted
    odl = OrthogonalDictionaryLearning(power=3, random_state=1, device="cpu").fit(Y)
    assert abs(dictionary_recovery(odl.components_, D).l4 - 1) < 1e-2


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n_components", [None, 5])
def test_components_have_orthonormal_rows_to_1e10_in_float64(
    planted, algorithm, n_components
):
    Y, _, _ = planted
    odl = OrthogonalDictionaryLearning(
        n_components, algorithm=algorithm, max_iter=5, random_state=0, device="cpu"
    ).fit(Y)
    k = odl.components_.shape[0]
    assert k == (n_components or Y.shape[1])
    assert np.abs(odl.components_ @ odl.components_.T - np.eye(k)).max() < 1e-10


def test_undercomplete_fit_recovers_atoms_of_a_planted_subspace():
    Y, D, _ = make_orthogonal_sparse_data(
        4000, 12, n_components=6, sparsity=0.15, random_state=3
    )
    odl = OrthogonalDictionaryLearning(6, random_state=0, device="cpu").fit(Y)
    assert odl.components_.shape == (6, 12)
    assert dictionary_recovery(odl.components_, D).recovery == 1.0


def test_msp_objective_history_never_decreases(planted):
    Y, _, _ = planted
    odl = OrthogonalDictionaryLearning(max_iter=30, tol=0, random_state=0,
                                       device="cpu").fit(Y)
    assert len(odl.objective_) == odl.n_iter_ > 5
    assert np.all(np.diff(odl.objective_) >= -1e-12 * odl.objective_[1:])


def test_procrustes_objective_history_never_increases(planted):
    Y, _, _ = planted
    odl = OrthogonalDictionaryLearning(algorithm="procrustes", alpha=0.5,
                                       max_iter=30, tol=0, random_state=0,
                                       device="cpu").fit(Y)
    assert np.all(np.diff(odl.objective_) <= 1e-12 * odl.objective_[1:])


def test_polar_factor_attains_the_nuclear_norm_as_linear_maximum():
    generator = torch.Generator().manual_seed(0)
    M = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    P = polar_factor(M)
    nuclear = torch.linalg.svdvals(M).sum()
    assert torch.isclose((P * M).sum(), nuclear, rtol=1e-12)
    for _ in range(20):
        Q = random_orthogonal(4, 7, generator=generator, dtype=torch.float64,
                              device="cpu")
        assert (Q * M).sum() <= nuclear


def test_frank_wolfe_weights_stay_in_the_unit_interval_and_decay():
    steps = [frank_wolfe_step_sizes(t) for t in range(1, 2000)]
    rho, gamma = np.array(steps).T
    assert np.all((rho > 0) & (rho <= 1)) and np.all((gamma > 0) & (gamma < 1))
    assert np.all(np.diff(rho) <= 0) and np.all(np.diff(gamma) < 0)
    assert rho[-1] < 0.1 and gamma[-1] < 0.01


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("transform_algorithm", ["hard", "soft", "none"])
def test_fit_transform_equals_fit_then_transform_exactly(
    planted, algorithm, transform_algorithm
):
    Y = planted[0][:500]
    params = dict(algorithm=algorithm, transform_algorithm=transform_algorithm,
                  transform_alpha=0.3, center=True, max_iter=5, random_state=0,
                  device="cpu")
    codes = OrthogonalDictionaryLearning(**params).fit_transform(Y)
    assert_array_equal(codes, OrthogonalDictionaryLearning(**params).fit(Y)
                       .transform(Y))


def test_partial_fit_over_chunks_raises_held_out_objective_and_recovers(planted):
    Y, D, _ = planted
    Y_train, Y_test = Y[:3200], Y[3200:]
    odl = OrthogonalDictionaryLearning(batch_size=16, random_state=0, device="cpu")
    chunks = np.array_split(Y_train, 100)
    held_out = []
    for chunk in chunks:
        odl.partial_fit(chunk)
        held_out.append(_lp_objective(odl.components_, Y_test))
    windows = np.array(held_out).reshape(10, 10).mean(axis=1)
    # rising on average: each window beats the first, the late ones beat the early
    assert np.all(windows[1:] > windows[0])
    assert windows[5:].mean() > windows[:5].mean()
    assert odl.n_samples_seen_ == 3200
    assert odl.n_steps_ == len(odl.objective_) == sum(-(-len(c) // 16) for c in chunks)
    assert dictionary_recovery(odl.components_, D).recovery == 1.0


def test_partial_fit_does_not_depend_on_how_the_stream_is_chunked(planted, device):
    Y = planted[0][:960]
    whole = OrthogonalDictionaryLearning(batch_size=32, random_state=0,
                                         device=device).partial_fit(Y)
    chunked = OrthogonalDictionaryLearning(batch_size=32, random_state=0,
                                           device=device)
    for chunk in np.split(Y, [64, 320, 384]):
        chunked.partial_fit(chunk)
    assert_allclose(chunked.components_, whole.components_, atol=1e-10)
    assert_allclose(chunked.objective_, whole.objective_, rtol=1e-10)


@pytest.mark.parametrize("algorithm", ["msp", "procrustes"])
@pytest.mark.parametrize("n_samples", [1, 16])
def test_small_partial_fit_after_batch_fit_keeps_the_recovered_atoms(
    planted, algorithm, n_samples
):
    Y, D, _ = planted
    odl = OrthogonalDictionaryLearning(algorithm=algorithm, random_state=0,
                                       device="cpu").fit(Y)
    before = dictionary_recovery(odl.components_, D).cosines.min()
    odl.partial_fit(Y[:n_samples])
    after = dictionary_recovery(odl.components_, D).cosines.min()
    assert before > 0.99
    assert after > before - 1e-3
    assert odl.n_steps_ == odl.n_iter_ * -(-len(Y) // odl.batch_size) + 1


def test_partial_fit_keeps_no_sample_sized_state(planted):
    Y = planted[0]
    odl = OrthogonalDictionaryLearning(batch_size=100, random_state=0, device="cpu")
    sizes = []
    for chunk in np.array_split(Y, 4):
        odl.partial_fit(chunk)
        state = {k: v for k, v in vars(odl).items() if k != "objective_"}
        sizes.append(len(pickle.dumps(state)))
    assert len(set(sizes)) == 1


def test_dask_ml_incremental_streams_blocks_through_partial_fit(planted):
    da = pytest.importorskip("dask.array")
    dask = pytest.importorskip("dask")
    wrappers = pytest.importorskip("dask_ml.wrappers")
    Y, D, _ = planted
    Y = Y[:1920]
    with dask.config.set(scheduler="synchronous"):
        incremental = wrappers.Incremental(
            OrthogonalDictionaryLearning(batch_size=32, random_state=0, device="cpu"),
            shuffle_blocks=False,
        ).fit(da.from_array(Y, chunks=(320, Y.shape[1])))
    streamed = OrthogonalDictionaryLearning(batch_size=32, random_state=0,
                                            device="cpu").partial_fit(Y)
    assert incremental.estimator_.n_steps_ == 60
    assert_allclose(incremental.estimator_.components_, streamed.components_,
                    atol=1e-12)


def test_score_is_the_mean_lp_objective_and_prefers_the_planted_atoms(planted):
    Y, D, _ = planted
    odl = OrthogonalDictionaryLearning(power=3, max_iter=3, random_state=0,
                                       device="cpu").fit(Y)
    assert odl.score(Y) == pytest.approx(_lp_objective(odl.components_, Y, 3))
    planted_model = OrthogonalDictionaryLearning(power=3, max_iter=3, random_state=0,
                                                 device="cpu").fit(Y)
    planted_model.components_ = D
    rotated = OrthogonalDictionaryLearning(power=3, max_iter=3, random_state=0,
                                           device="cpu").fit(Y)
    rotated.components_ = np.linalg.qr(np.random.RandomState(1).standard_normal(
        (12, 12)))[0]
    assert planted_model.score(Y) > rotated.score(Y)


def test_running_mean_of_partial_fit_equals_the_data_mean(planted):
    Y = planted[0][:900] + 5.0
    odl = OrthogonalDictionaryLearning(center=True, random_state=0, device="cpu")
    for chunk in np.array_split(Y, 7):
        odl.partial_fit(chunk)
    assert_allclose(odl.mean_, Y.mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("n_components", [None, 5])
def test_unthresholded_codes_round_trip_through_inverse_transform(
    planted, center, n_components
):
    Y, D, X = planted
    Y = Y[:300] + 2.0 * center
    odl = OrthogonalDictionaryLearning(n_components, transform_algorithm="none",
                                       center=center, max_iter=5, random_state=0,
                                       device="cpu").fit(Y)
    codes = odl.transform(Y)
    restored = odl.inverse_transform(codes)
    if n_components is None:
        assert_allclose(restored, Y, atol=1e-10)
    else:
        # undercomplete: an orthogonal projection, idempotent and norm-reducing
        assert_allclose(odl.inverse_transform(odl.transform(restored)), restored,
                        atol=1e-10)
        assert np.all(np.linalg.norm(restored - odl.mean_, axis=1)
                      <= np.linalg.norm(Y - odl.mean_, axis=1) + 1e-10)


def test_soft_thresholded_codes_match_scikit_learn_lasso_codes(planted):
    Y = planted[0][:200]
    odl = OrthogonalDictionaryLearning(transform_algorithm="soft",
                                       transform_alpha=0.3, max_iter=5,
                                       random_state=0, device="cpu").fit(Y)
    lasso = sparse_encode(Y, odl.components_, algorithm="lasso_cd", alpha=0.3,
                          max_iter=10_000)
    assert_allclose(odl.transform(Y), lasso, atol=1e-6)


def test_hard_thresholded_codes_keep_exactly_the_large_projections(planted):
    Y = planted[0][:200]
    odl = OrthogonalDictionaryLearning(transform_alpha=0.4, max_iter=5,
                                       random_state=0, device="cpu").fit(Y)
    projections = Y @ odl.components_.T
    codes = odl.transform(Y)
    large = np.abs(projections) > 0.4
    assert_array_equal(codes[large], projections[large])
    assert np.all(codes[~large] == 0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_float32_input_keeps_float32_components_and_codes(
    planted, algorithm, device
):
    Y = planted[0][:500].astype(np.float32)
    odl = OrthogonalDictionaryLearning(algorithm=algorithm, max_iter=3,
                                       random_state=0, device=device).fit(Y)
    assert odl.components_.dtype == np.float32
    assert odl.transform(Y).dtype == np.float32
    assert odl.inverse_transform(odl.transform(Y)).dtype == np.float32
    odl.partial_fit(Y[:100])
    assert odl.components_.dtype == np.float32


def test_codes_feed_a_classifier_in_a_grid_search_on_digits():
    X, y = load_digits(return_X_y=True)
    X, y = X[:360], y[:360]
    pipe = make_pipeline(
        StandardScaler(),
        OrthogonalDictionaryLearning(transform_algorithm="soft", max_iter=10,
                                     random_state=0, device="cpu"),
        LogisticRegression(max_iter=300),
    )
    search = GridSearchCV(
        pipe, {"orthogonaldictionarylearning__transform_alpha": [0.05, 5.0]}, cv=3
    ).fit(X, y)
    # alpha=5 zeroes almost every standardized code; the search must reject it
    assert search.best_params_["orthogonaldictionarylearning__transform_alpha"] == 0.05
    assert search.best_score_ > 0.85


def test_dictionary_recovery_ignores_sign_and_order_but_not_rotation():
    rng = np.random.RandomState(0)
    D = np.linalg.qr(rng.standard_normal((6, 6)))[0].T
    flipped = D[[3, 1, 0, 5, 4, 2]] * np.array([[1], [-1], [1], [-1], [-1], [1]])
    exact = dictionary_recovery(flipped, D)
    assert exact.recovery == 1.0 and exact.l4 == pytest.approx(1.0)
    assert_array_equal(np.sort(exact.assignment[:, 1]), np.arange(6))
    rotated = np.linalg.qr(rng.standard_normal((6, 6)))[0].T
    assert dictionary_recovery(rotated, D).l4 < 0.9


def test_generator_draws_bernoulli_gaussian_codes_on_orthonormal_atoms():
    Y, D, X = make_orthogonal_sparse_data(5000, 10, sparsity=0.2, random_state=0)
    assert_allclose(D @ D.T, np.eye(10), atol=1e-12)
    assert_allclose(Y, X @ D)
    assert abs(np.mean(X != 0) - 0.2) < 0.01
    Y_noisy, _, _ = make_orthogonal_sparse_data(5000, 10, sparsity=0.2, noise=0.5,
                                                random_state=0)
    assert np.std(Y_noisy - Y) == pytest.approx(0.5, rel=0.02)


def _fitted():
    Y = np.random.RandomState(0).standard_normal((20, 4))
    return OrthogonalDictionaryLearning(device="cpu", max_iter=2).fit(Y)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: OrthogonalDictionaryLearning(5, device="cpu").fit(np.ones((9, 4))),
         ValueError, "n_components=5 must be at most n_features=4"),
        (lambda: OrthogonalDictionaryLearning(5, device="cpu")
         .partial_fit(np.ones((9, 4))), ValueError, "n_components=5"),
        (lambda: OrthogonalDictionaryLearning(device="cpu")
         .fit(np.array([[1.0, np.nan], [0.0, 1.0]])), ValueError, "NaN"),
        (lambda: OrthogonalDictionaryLearning(device="cpu")
         .fit(np.array([[1.0, np.inf], [0.0, 1.0]])), ValueError, "infinity"),
        (lambda: OrthogonalDictionaryLearning(device="cpu").fit(np.ones((1, 4))),
         ValueError, "minimum of 2 is required"),
        (lambda: _fitted().transform(np.ones((3, 5))), ValueError,
         "X has 5 features, but OrthogonalDictionaryLearning is expecting 4"),
        (lambda: _fitted().partial_fit(np.ones((3, 3))), ValueError,
         "X has 3 features, but OrthogonalDictionaryLearning is expecting 4"),
        (lambda: _fitted().inverse_transform(np.ones((3, 2))), ValueError,
         "X has 2 features .codes., but OrthogonalDictionaryLearning has 4"),
        (lambda: _fitted().transform(np.array([[np.nan, 0, 0, 0]])), ValueError,
         "NaN"),
        (lambda: OrthogonalDictionaryLearning(algorithm="ksvd").fit(np.ones((3, 2))),
         ValueError, "'algorithm' parameter"),
        (lambda: OrthogonalDictionaryLearning(power=2).fit(np.ones((3, 2))),
         ValueError, "'power' parameter"),
        (lambda: OrthogonalDictionaryLearning(device="tpu").fit(np.ones((3, 2))),
         ValueError, "device must be"),
        (lambda: OrthogonalDictionaryLearning(device=3).fit(np.ones((3, 2))),
         ValueError, "'device' parameter"),
        (lambda: dictionary_recovery(np.eye(3), np.eye(4)), ValueError,
         "same number of features"),
        (lambda: make_orthogonal_sparse_data(10, 3, n_components=4), ValueError,
         "n_components must be at most n_features=3"),
    ],
    ids=["n_components>n_features", "partial_fit n_components>n_features",
         "nan", "inf", "one sample", "transform n_features", "partial_fit n_features",
         "inverse_transform n_components", "transform nan", "unknown algorithm",
         "power<=2", "unknown device", "device type", "recovery shapes",
         "generator n_components"],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_unfitted_transform_raises_not_fitted():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        OrthogonalDictionaryLearning().transform(np.ones((2, 2)))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype, exponent", [(np.float32, 40), (np.float32, -40),
                                             (np.float64, -500)])
def test_data_scaled_by_a_power_of_two_give_the_same_dictionary_exactly(
    algorithm, dtype, exponent
):
    # |y a|^3 used to overflow (float32 at 2^40 = 1e12: LinAlgError from the
    # SVD) or underflow to a zero gradient (2^-40, 2^-500: the random start
    # came back, recovery 0). The solvers work at unit scale now.
    Y, D, _ = make_orthogonal_sparse_data(300, 5, sparsity=0.2, random_state=0)
    Y = Y.astype(dtype)
    scale = 2.0**exponent

    def fit(data, alpha):
        return OrthogonalDictionaryLearning(algorithm=algorithm, alpha=alpha,
                                            max_iter=5, batch_size=64,
                                            random_state=0, device="cpu").fit(data)

    unit, scaled = fit(Y, 1.0), fit(Y * dtype(scale), scale)
    assert_array_equal(scaled.components_, unit.components_)
    degree = 2 if algorithm == "procrustes" else 4
    assert_allclose(scaled.objective_, unit.objective_ * scale**degree, rtol=1e-12)
    assert scaled.score(Y * dtype(scale)) == pytest.approx(
        unit.score(Y) * scale**4, rel=1e-5)


def test_partial_fit_stream_scaled_by_a_power_of_two_gives_the_same_dictionary():
    # The chunks' scales differ, so the gradient average is rescaled between
    # them: exactly, by powers of two.
    Y = make_orthogonal_sparse_data(300, 5, sparsity=0.2, random_state=0)[0]
    Y = Y.astype(np.float32)
    streams = []
    for scale in [1.0, 2.0**40]:
        odl = OrthogonalDictionaryLearning(batch_size=32, random_state=0,
                                           device="cpu")
        for chunk in np.split(Y * np.float32(scale), [64, 96, 200]):
            odl.partial_fit(chunk)
        streams.append(odl)
    assert_array_equal(streams[1].components_, streams[0].components_)
    assert_allclose(streams[1].objective_, streams[0].objective_ * 2.0**160,
                    rtol=1e-12)


def test_a_zero_chunk_first_does_not_move_the_random_start():
    # The gradient average of zero samples is zero, whose polar factor is
    # whatever the SVD makes of it; the step used to pull the dictionary
    # towards it (here near the identity).
    odl = OrthogonalDictionaryLearning(random_state=0, device="cpu")
    odl.partial_fit(np.zeros((4, 5)))
    start = random_orthogonal(5, 5, generator=torch_generator(
        np.random.RandomState(0), "cpu"), dtype=torch.float64, device="cpu")
    assert_array_equal(odl.components_, start.numpy())
    assert_array_equal(odl.objective_, [0.0])


def test_a_threshold_above_every_code_gives_half_the_mean_squared_norm():
    # alpha**2 used to raise OverflowError from Python's float power.
    Y = np.random.RandomState(0).standard_normal((20, 4))
    odl = OrthogonalDictionaryLearning(algorithm="procrustes", alpha=1e200,
                                       max_iter=2, device="cpu").fit(Y)
    assert_allclose(odl.objective_, 0.5 * np.mean(np.sum(Y**2, axis=1)))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: OrthogonalDictionaryLearning(device="cpu").fit(
            np.random.RandomState(0).standard_normal((20, 4)) * 1e100),
         "objective of X overflows float64"),
        (lambda: _fitted().score(np.full((2, 4), 1e100)),
         "objective of X overflows float64"),
        (lambda: _fitted().transform(np.full((2, 4), 3.3e38, dtype=np.float32)),
         "codes of this X overflow float32"),
        (lambda: _fitted().set_params(transform_algorithm="none")
         .inverse_transform(np.full((2, 4), 3.3e38, dtype=np.float32)),
         "samples of this X overflow float32"),
        (lambda: OrthogonalDictionaryLearning(center=True, device="cpu").fit(
            np.array([[1.7e308, 1.0], [1.7e308, 1.0], [-1.7e308, 1.0]])),
         "X minus mean_ overflows"),
    ],
    ids=["fit objective", "score", "transform", "inverse_transform", "centering"],
)
def test_results_beyond_the_float_range_raise_instead_of_inf(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_random_state_gives_the_same_dictionary_on_the_cpu_and_cuda(planted,
                                                                     algorithm):
    # The start and the minibatch order are drawn on the CPU whatever the
    # device; CUDA used its own generator, so the same seed gave another
    # dictionary (another order of the atoms) there.
    Y, _, _ = planted
    fits = [OrthogonalDictionaryLearning(
        algorithm=algorithm, max_iter=3 if algorithm == "frank_wolfe" else None,
        batch_size=64, random_state=0, device=device).fit(Y).components_
        for device in ("cpu", "cuda")]
    np.testing.assert_allclose(fits[0], fits[1], atol=1e-6)
