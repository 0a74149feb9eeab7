"""Regularized skorch nets: penalties against hand-computed cases, estimator
behaviour (labels, seeding, pickling, tuning) and bad input."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.datasets import load_iris, make_regression
from sklearn.model_selection import GridSearchCV
from skorch.dataset import ValidSplit
from torch import nn

from skreg.datasets import make_noisy_labels
from skreg.nets import (
    MLP,
    ConvOrthogonality,
    EarlyLearningRegularization,
    GroupSparsity,
    RegularizedNetClassifier,
    RegularizedNetRegressor,
    SmallCNN,
    SoftOrthogonality,
    conv_singular_values,
    orthogonality_errors,
)
from skreg.nets._penalties import (
    circular_conv_singular_values,
    conv_orthogonality_penalty,
    elr_penalty,
    group_lasso_prox_,
    soft_orthogonality_penalty,
    spectral_orthogonality_penalty,
)


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    labels = np.array(["setosa", "versicolor", "virginica"])[y]
    return X, labels


def _net(**params):
    defaults = {"module__hidden_units": (16,), "lr": 0.02, "max_epochs": 15,
                "random_state": 0, "device": "cpu"}
    return RegularizedNetClassifier(**{**defaults, **params})


def _circular_conv_matrix(kernel, image_size, stride):
    """Dense matrix of a strided convolution with circular padding k // 2."""
    n_in = kernel.shape[1]
    pad = kernel.shape[-1] // 2
    basis = torch.eye(n_in * image_size**2, dtype=kernel.dtype)
    images = basis.reshape(-1, n_in, image_size, image_size)
    padded = F.pad(images, (pad, pad, pad, pad), mode="circular")
    return F.conv2d(padded, kernel, stride=stride).flatten(1).T


# Penalties against hand-computed cases -------------------------------------


def test_soft_orthogonality_is_zero_for_orthonormal_columns_and_hand_value_else():
    assert soft_orthogonality_penalty(torch.eye(3, 2)) == 0
    # diag(2, 1): W^T W - I = diag(3, 0)
    assert soft_orthogonality_penalty(torch.diag(torch.tensor([2.0, 1.0]))) == 9
    # 2 x 3 takes the row side: W W^T = diag(2, 1), residual diag(1, 0)
    wide = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert soft_orthogonality_penalty(wide) == 1


def test_spectral_orthogonality_matches_the_top_singular_value_squared():
    weight = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    residual = weight.T @ weight - torch.eye(4)
    u = F.normalize(torch.ones(4), dim=0)
    value = spectral_orthogonality_penalty(weight, u, n_power_iterations=200)
    expected = torch.linalg.matrix_norm(residual, ord=2) ** 2
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5)


def test_conv_penalty_is_zero_for_the_identity_kernel():
    kernel = torch.zeros(3, 3, 3, 3)
    kernel[range(3), range(3), 1, 1] = 1
    assert conv_orthogonality_penalty(kernel, stride=1) == 0


def test_conv_penalty_of_an_all_ones_kernel_is_the_hand_computed_344():
    # autocorrelation (3 - |dx|)(3 - |dy|): sum of squares 19^2 = 361, centre 9
    # becomes 9 - 1 = 8, so 361 - 81 + 64.
    assert conv_orthogonality_penalty(torch.ones(1, 1, 3, 3), stride=1) == 344


def test_conv_penalty_is_zero_for_an_orthogonal_stride_two_kernel():
    kernel = torch.zeros(4, 1, 3, 3)
    for m, (i, j) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2)]):
        kernel[m, 0, i, j] = 1
    assert conv_orthogonality_penalty(kernel, stride=2) == 0
    # The OCNN code's fixed padding=1 has no zero shift at stride 2, so it
    # charges this orthogonal kernel a positive penalty.
    official = F.conv2d(kernel, kernel, stride=2, padding=1)
    identity = torch.zeros_like(official)
    identity[range(4), range(4), 1, 1] = 1
    assert (official - identity).square().sum() > 1


@pytest.mark.parametrize("n_out, n_in, stride, image_size",
                         [(2, 3, 1, 5), (3, 2, 2, 6), (5, 2, 2, 6)])
def test_conv_penalty_scales_to_the_dense_gram_error_of_the_circular_conv(
        n_out, n_in, stride, image_size):
    kernel = torch.randn(n_out, n_in, 3, 3, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1))
    matrix = _circular_conv_matrix(kernel, image_size, stride)
    gram = matrix @ matrix.T if n_out <= n_in * stride**2 else matrix.T @ matrix
    # Row orthogonality when M <= C S^2, column orthogonality otherwise; the
    # penalty's "- max(0, M - C S^2)" is exactly the gap between the two.
    dense_error = (gram - torch.eye(gram.shape[0], dtype=gram.dtype)).square().sum()
    expected = (image_size / stride) ** 2 * conv_orthogonality_penalty(kernel, stride)
    torch.testing.assert_close(dense_error, expected)


@pytest.mark.parametrize("stride, image_size", [(1, 5), (2, 6)])
def test_fft_singular_values_equal_those_of_the_dense_circular_conv(
        stride, image_size):
    kernel = torch.randn(3, 2, 3, 3, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
    dense = torch.linalg.svdvals(_circular_conv_matrix(kernel, image_size, stride))
    fft = circular_conv_singular_values(kernel, image_size, stride=stride)
    dense = dense[: fft.numel()]
    torch.testing.assert_close(fft.sort(descending=True).values, dense)


def test_an_orthogonal_stride_two_layer_has_all_singular_values_one():
    conv = nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for m, (i, j) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2)]):
            conv.weight[m, 0, i, j] = 1
    spectrum = conv_singular_values(nn.Sequential(conv), image_size=8)["0"]
    np.testing.assert_allclose(spectrum, 1.0, atol=1e-6)


def test_elr_term_and_target_update_match_the_formula_on_a_fixed_batch():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 9.0]])
    targets = torch.zeros(4, 3)
    targets[3] = torch.tensor([0.2, 0.3, 0.5])
    index = torch.tensor([3, 1])
    value = elr_penalty(logits, targets, index, beta=0.7)

    proba = np.clip(torch.softmax(logits, dim=1).numpy(), 1e-4, 1 - 1e-4)
    expected_t3 = 0.7 * np.array([0.2, 0.3, 0.5]) + 0.3 * proba[0] / proba[0].sum()
    expected_t1 = 0.3 * proba[1] / proba[1].sum()
    np.testing.assert_allclose(targets[3].numpy(), expected_t3, rtol=1e-6)
    np.testing.assert_allclose(targets[1].numpy(), expected_t1, rtol=1e-6)
    assert torch.all(targets[[0, 2]] == 0)
    expected = np.mean(np.log(1 - np.array([expected_t3 @ proba[0],
                                            expected_t1 @ proba[1]])))
    np.testing.assert_allclose(value.item(), expected, rtol=1e-6)


def test_group_lasso_prox_zeroes_small_groups_and_shrinks_the_rest_by_threshold():
    weight = torch.tensor([[3.0, 4.0], [0.3, 0.0], [0.0, 1.0]])
    bias = torch.tensor([0.0, 0.4, 0.0])
    norms = torch.cat([weight, bias[:, None]], dim=1).norm(dim=1)
    returned = group_lasso_prox_(weight, bias, threshold=0.6)
    assert torch.all(weight[1] == 0) and bias[1] == 0
    new_norms = torch.cat([weight, bias[:, None]], dim=1).norm(dim=1)
    torch.testing.assert_close(returned, new_norms)
    torch.testing.assert_close(new_norms[[0, 2]], norms[[0, 2]] - 0.6)
    torch.testing.assert_close(weight[0], torch.tensor([3.0, 4.0]) * (1 - 0.6 / 5))


# The estimators ---------------------------------------------------------------


def test_string_labels_come_back_from_predict_and_probabilities_follow_classes_(
        iris):
    X, y = iris
    net = _net().fit(X, y)
    assert list(net.classes_) == ["setosa", "versicolor", "virginica"]
    assert set(net.predict(X)) <= set(net.classes_)
    proba = net.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    assert np.mean(net.classes_[proba.argmax(axis=1)] == y) > 0.85


def test_refits_with_the_same_random_state_are_identical_and_leave_torch_alone(
        iris):
    X, y = iris
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    net = _net(regularizers=[EarlyLearningRegularization()])
    first = net.fit(X, y).predict_proba(X)
    second = net.fit(X, y).predict_proba(X)
    after = torch.rand(1)
    np.testing.assert_array_equal(first, second)
    assert before == after


def test_float32_and_float64_inputs_train_the_same_net(iris):
    X, y = iris
    p64 = _net().fit(X, y).predict_proba(X)
    p32 = _net().fit(X.astype(np.float32), y).predict_proba(X.astype(np.float32))
    np.testing.assert_allclose(p64, p32, rtol=1e-5, atol=1e-6)


def test_history_splits_the_loss_into_data_loss_and_penalty(iris):
    X, y = iris
    net = _net(regularizers=[SoftOrthogonality(strength=0.05)]).fit(X, y)
    for epoch in net.history:
        assert epoch["train_penalty"] > 0
        np.testing.assert_allclose(
            epoch["train_loss"], epoch["train_data_loss"] + epoch["train_penalty"],
            rtol=1e-5)
    plain = _net().fit(X, y)
    assert all(epoch["train_penalty"] == 0 for epoch in plain.history)


def test_grid_search_tunes_a_regularizer_strength_with_string_labels(iris):
    X, y = iris
    net = _net(max_epochs=5, regularizers=[SoftOrthogonality(strength=1.0)])
    grid = [0.0, 0.5]
    search = GridSearchCV(
        net, {"regularizers__soft_orthogonality__strength": grid}, cv=2).fit(X, y)
    tuned = search.best_estimator_.regularizers[0]
    assert tuned.strength == search.best_params_[
        "regularizers__soft_orthogonality__strength"]
    assert net.regularizers[0].strength == 1.0
    assert search.predict(X).dtype.kind == "U"
    strengths = {p["regularizers__soft_orthogonality__strength"]
                 for p in search.cv_results_["params"]}
    assert strengths == set(grid)


def test_clone_keeps_named_regularizers_as_fresh_copies():
    elr = EarlyLearningRegularization(strength=2.0, beta=0.9)
    net = _net(regularizers=[("noise", elr), SoftOrthogonality(0.1)])
    cloned = clone(net)
    params = cloned.get_params()
    assert params["regularizers__noise__beta"] == 0.9
    assert params["regularizers__soft_orthogonality__strength"] == 0.1
    assert cloned.regularizers[0][1] is not elr


def test_set_params_on_a_fitted_net_reaches_the_trained_regularizer(iris):
    X, y = iris
    net = _net(max_epochs=2, regularizers=[GroupSparsity(0.01)]).fit(X, y)
    net.set_params(regularizers__group_sparsity__strength=0.5)
    assert net.regularizers[0].strength == 0.5
    assert net.regularizers_[0][1].strength == 0.5


def test_warm_start_refit_with_other_classes_raises_and_keeps_the_fitted_classes(
        iris):
    X, y = iris
    net = _net(max_epochs=1, warm_start=True).fit(X, y)
    with pytest.raises(ValueError, match="warm_start.*classes"):
        net.fit(X[50:], y[50:])
    assert list(net.classes_) == ["setosa", "versicolor", "virginica"]
    assert net.module_.output.out_features == 3
    # Naming every label keeps a warm refit on a subset aligned with the outputs,
    # and partial_fit takes a subset of the known classes.
    net.set_params(classes=net.classes_).fit(X[50:], y[50:])
    net.partial_fit(X[:50], y[:50])
    assert list(net.classes_) == ["setosa", "versicolor", "virginica"]


def test_warm_start_refit_with_other_features_or_outputs_raises():
    X, y = make_regression(n_samples=30, n_features=4, n_targets=2, random_state=0)
    params = {"module__hidden_units": (4,), "max_epochs": 1, "warm_start": True,
              "random_state": 0, "device": "cpu"}
    net = RegularizedNetRegressor(**params).fit(X, y[:, 0])
    with pytest.raises(ValueError, match="column.*warm_start"):
        net.fit(X, y)
    with pytest.raises(ValueError, match="3 features"):
        net.fit(X[:, :3], y[:, 0])
    assert net.n_outputs_ == 1 and net.n_features_in_ == 4
    classifier = _net(max_epochs=1, warm_start=True).fit(X, y[:, 0] > 0)
    with pytest.raises(ValueError, match="3 features"):
        classifier.fit(X[:, :3], y[:, 0] > 0)


@pytest.mark.parametrize("params, match", [
    ({"bogus": 3}, "unexpected argument.*bogus"),
    ({"optimizer_lr": 0.1}, "did you mean optimizer__lr"),
])
def test_unknown_constructor_arguments_raise_on_the_first_fit(iris, params, match):
    X, y = iris
    net = _net(max_epochs=1, **params)
    with pytest.raises(ValueError, match=match):
        net.fit(X, y)
    assert not net.__sklearn_is_fitted__()


def test_set_params_replaces_a_named_regularizer_and_round_trips_get_params(iris):
    X, y = iris
    net = _net(max_epochs=1, regularizers=[("a", SoftOrthogonality(0.1)),
                                           GroupSparsity()])
    net.set_params(**net.get_params(deep=True))
    net.set_params(regularizers__a=GroupSparsity(0.5),
                   regularizers__group_sparsity__strength=0.2)
    assert net.get_params()["regularizers__a__strength"] == 0.5
    assert isinstance(net.regularizers[0][1], GroupSparsity)
    assert net.regularizers[1].strength == 0.2
    # Replacing under a default name keeps that name.
    net.set_params(regularizers__group_sparsity=SoftOrthogonality(0.3))
    assert net.get_params()["regularizers__group_sparsity__strength"] == 0.3
    with pytest.raises(TypeError, match="regularizers__a"):
        net.set_params(regularizers__a=3)
    # On a fitted net the training uses the new regularizer.
    net.fit(X, y).set_params(regularizers__a=SoftOrthogonality(0.7))
    assert isinstance(net.regularizers_[0][1], SoftOrthogonality)
    assert net.regularizers_[0][1].strength == 0.7


def test_set_params_of_the_regularizer_list_reaches_a_later_partial_fit(iris):
    X, y = iris
    net = _net(max_epochs=1, regularizers=[SoftOrthogonality(0.0)]).fit(X, y)
    assert net.history[-1, "train_penalty"] == 0.0
    # The new list trains from the next partial_fit on (it kept the old one).
    net.set_params(regularizers=[SoftOrthogonality(10.0)])
    assert net.regularizers_[0][1].strength == 10.0
    net.partial_fit(X, y)
    assert net.history[-1, "train_penalty"] > 0.0


def test_grid_search_swaps_whole_regularizer_objects(iris):
    X, y = iris
    net = _net(max_epochs=1, regularizers=[("a", SoftOrthogonality(0.1))])
    candidates = [SoftOrthogonality(0.1), GroupSparsity(0.1)]
    search = GridSearchCV(net, {"regularizers__a": candidates}, cv=2).fit(X, y)
    tried = [type(p["regularizers__a"]) for p in search.cv_results_["params"]]
    assert tried == [SoftOrthogonality, GroupSparsity]
    fitted = search.best_estimator_.regularizers_[0][1]
    assert type(fitted) is type(search.best_params_["regularizers__a"])


def test_module_params_set_on_a_fitted_auto_device_net_rebuild_the_module(iris):
    X, y = iris
    net = _net(device="auto").fit(X, y)
    net.set_params(module__hidden_units=(5,))
    assert net.module_.hidden_units == (5,)
    assert net.get_params()["device"] == "auto"
    net.set_params(device="cpu")
    assert net.device == "cpu"


def test_skorch_internal_validation_split_works_with_elr_and_reports_accuracy(iris):
    X, y = iris
    net = _net(train_split=ValidSplit(3, stratified=True),
               regularizers=[EarlyLearningRegularization()]).fit(X, y)
    accuracy = net.history[-1, "valid_acc"]
    assert 0.7 < accuracy <= 1.0
    assert net.regularizers_[0][1].targets_.shape == (150, 3)


def test_pickle_round_trip_keeps_predictions_and_elr_state(iris):
    X, y = iris
    net = _net(regularizers=[EarlyLearningRegularization()]).fit(X, y)
    loaded = pickle.loads(pickle.dumps(net))
    np.testing.assert_array_equal(loaded.predict_proba(X), net.predict_proba(X))
    targets = loaded.regularizers_[0][1].targets_
    assert targets.device.type == "cpu"
    torch.testing.assert_close(targets, net.regularizers_[0][1].targets_.cpu())
    assert loaded.get_params()["device"] == "cpu"


def test_elr_targets_track_the_running_average_of_predictions(iris):
    X, y = iris
    net = _net(regularizers=[EarlyLearningRegularization(beta=0.0)]).fit(X, y)
    targets = net.regularizers_[0][1].targets_.numpy()
    # With beta = 0 each target is the last prediction seen for that sample.
    assert targets.shape == (150, 3)
    np.testing.assert_allclose(targets.sum(axis=1), 1, rtol=1e-5)
    agreement = np.mean(targets.argmax(axis=1) == net.predict_proba(X).argmax(1))
    assert agreement > 0.9


def test_strong_soft_orthogonality_makes_the_hidden_layer_orthonormal(iris):
    X, y = iris
    net = _net(max_epochs=60, lr=0.01, module__hidden_units=(4,),
               regularizers=[SoftOrthogonality(strength=100.0)]).fit(X, y)
    errors = orthogonality_errors(net.module_, layers="hidden")
    assert errors["hidden.0"] < 1e-2
    assert net.score(X, y) > 0.8


def test_conv_orthogonality_brings_cnn_spectra_towards_one():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 64))
    y = rng.integers(0, 2, 64)
    params = {"module": SmallCNN, "module__channels": (4, 8), "max_epochs": 20,
              "lr": 0.01, "random_state": 0, "device": "cpu"}
    plain = RegularizedNetClassifier(**params).fit(X, y)
    ortho = RegularizedNetClassifier(
        **params, regularizers=[ConvOrthogonality(strength=1.0)]).fit(X, y)

    def spread(net):
        spectra = conv_singular_values(net.module_, image_size=8)
        return max(np.abs(np.log(s)).max() for s in spectra.values())

    assert spread(ortho) < 0.5 * spread(plain)


def test_group_sparsity_zeroes_units_exactly_and_pruning_keeps_predictions(iris):
    X, y = iris
    net = _net(max_epochs=40, module__hidden_units=(32,),
               regularizers=[GroupSparsity(strength=1.0)]).fit(X, y)
    fraction = net.group_sparsity()["hidden.0"]
    assert 0 < fraction < 1
    pruned = net.module_.prune()
    assert pruned.hidden_units[0] == round(32 * (1 - fraction))
    inputs = torch.as_tensor(X, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(inputs), net.module_(inputs))


def test_a_module_instance_is_copied_not_trained_in_place_so_refits_agree(iris):
    X, y = iris
    module = MLP(4, 3, hidden_units=(8,))
    original = module.output.weight.detach().clone()
    net = RegularizedNetClassifier(module=module, lr=0.02, max_epochs=5,
                                   random_state=0, device="cpu")
    first = net.fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(net.fit(X, y).predict_proba(X), first)
    torch.testing.assert_close(module.output.weight, original)


def test_regressor_recovers_a_linear_map_and_keeps_the_target_shape():
    X, y = make_regression(n_samples=120, n_features=4, n_targets=2, noise=0.0,
                           random_state=0)
    y = y / y.std(axis=0)
    params = {"module__hidden_units": (16,), "lr": 0.02, "max_epochs": 80,
              "random_state": 0, "device": "cpu"}
    multi = RegularizedNetRegressor(**params).fit(X, y)
    assert multi.predict(X).shape == (120, 2)
    assert multi.score(X, y) > 0.95
    single = RegularizedNetRegressor(**params).fit(X, y[:, 0])
    assert single.predict(X).shape == (120,)
    assert single.predict(X).dtype == np.float64
    assert not hasattr(single, "predict_proba")


def test_device_auto_stays_the_parameter_after_fit(iris, device):
    X, y = iris
    net = _net(device=device if device == "cuda" else "auto",
               regularizers=[EarlyLearningRegularization()]).fit(X, y)
    assert net.get_params()["device"] in ("auto", "cuda")
    assert net.predict(X).shape == (150,)


@pytest.mark.gpu
def test_a_gpu_trained_net_with_elr_pickles_and_predicts_on_a_cpu_only_process(
        iris, tmp_path):
    X, y = iris
    net = _net(device="cuda", regularizers=[EarlyLearningRegularization(),
                                            SoftOrthogonality(kind="spectral")])
    net.fit(X, y)
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps(net))
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "proba.npy", net.predict_proba(X))
    script = (
        "import pickle, sys, warnings, numpy as np, torch\n"
        "assert not torch.cuda.is_available()\n"
        "warnings.simplefilter('ignore')\n"
        "d = sys.argv[1]\n"
        "net = pickle.load(open(d + '/net.pkl', 'rb'))\n"
        "p = net.predict_proba(np.load(d + '/X.npy'))\n"
        "np.testing.assert_allclose(p, np.load(d + '/proba.npy'), atol=1e-5)\n"
        "assert net.regularizers_[0][1].targets_.device.type == 'cpu'\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_noisy_labels_flip_about_the_rate_and_never_keep_the_class():
    y = np.repeat(np.array(["a", "b", "c", "d"]), 500)
    y_noisy, corrupted = make_noisy_labels(y, 0.4, random_state=0)
    np.testing.assert_array_equal(y_noisy != y, corrupted)
    assert abs(corrupted.mean() - 0.4) < 0.03
    assert set(y_noisy) == set(y)


# Bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, X, y, error, match",
    [
        ({}, [["a", "b"], ["c", "d"]], [0, 1], ValueError, "convert|string"),
        ({}, [[np.nan, 1.0], [0.0, 1.0]], [0, 1], ValueError, "NaN"),
        ({}, [[0.0, 1.0], [1.0, 0.0]], ["a", "a"], ValueError, "one class"),
        ({}, [[0.0], [1.0]], [0.5, 1.5], ValueError, "Unknown label type"),
        ({"regularizers": [SoftOrthogonality(strength=-1.0)]}, None, None,
         ValueError, "strength"),
        ({"regularizers": [EarlyLearningRegularization(beta=1.0)]}, None, None,
         ValueError, "beta"),
        ({"regularizers": [EarlyLearningRegularization(beta=-0.1)]}, None, None,
         ValueError, "beta"),
        ({"regularizers": [GroupSparsity(), GroupSparsity()]}, None, None,
         ValueError, "unique"),
        ({"regularizers": ["l2"]}, None, None, TypeError, "Regularizer"),
        ({"regularizers": [SoftOrthogonality(layers=["nope"])]}, None, None,
         ValueError, "nope"),
        ({"device": "tpu"}, None, None, ValueError, "device"),
        ({"lr": -1.0}, None, None, ValueError, "lr"),
        ({"module__hidden_units": 16}, None, None, TypeError, "hidden_units"),
        ({"module__dropout": -0.5}, None, None, ValueError, "dropout"),
    ],
)
def test_bad_input_raises_a_clear_error_before_training(params, X, y, error, match):
    if X is None:
        X, y = [[0.0, 1.0], [1.0, 0.0]], [0, 1]
    with pytest.raises(error, match=match):
        _net(max_epochs=1, **params).fit(X, y)


def test_elr_on_a_regressor_raises_naming_the_regularizer():
    net = RegularizedNetRegressor(max_epochs=1, device="cpu",
                                  regularizers=[EarlyLearningRegularization()])
    with pytest.raises(ValueError, match="EarlyLearningRegularization.*Regressor"):
        net.fit([[0.0, 1.0], [1.0, 0.0]], [0.0, 1.0])


@pytest.mark.parametrize("regularizer, hidden_units", [
    (ConvOrthogonality(1.0), (4,)),
    (SoftOrthogonality(1.0), ()),
    (GroupSparsity(1.0), ()),
])
def test_a_regularizer_with_no_layer_to_act_on_warns(iris, regularizer,
                                                     hidden_units):
    X, y = iris
    net = _net(max_epochs=1, module__hidden_units=hidden_units,
               regularizers=[regularizer])
    with pytest.warns(UserWarning, match=type(regularizer).__name__):
        net.fit(X, y)


@pytest.mark.parametrize("tol", [-1.0, float("nan")])
def test_group_sparsity_and_prune_reject_a_negative_or_nan_tol(iris, tol):
    X, y = iris
    net = _net(max_epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="tol"):
        net.group_sparsity(tol=tol)
    with pytest.raises(ValueError, match="tol"):
        net.module_.prune(tol=tol)


def test_values_beyond_float32_raise_naming_x_or_y_instead_of_nan(iris):
    # The module computes in float32: 1e39 casts to inf, and the fit used to
    # "succeed" and predict NaN probabilities.
    X, y = iris
    with pytest.raises(ValueError, match="X has values beyond float32"):
        _net(max_epochs=1).fit(X * 1e39, y)
    net = _net(max_epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="X has values beyond float32"):
        net.predict_proba(X * 1e39)
    Xr, yr = make_regression(n_samples=40, n_features=3, random_state=0)
    with pytest.raises(ValueError, match="y has values beyond float32"):
        RegularizedNetRegressor(max_epochs=1, device="cpu").fit(Xr, yr * 1e39)


def test_an_output_that_overflows_float32_raises_instead_of_nan():
    X, y = make_regression(n_samples=40, n_features=10, random_state=0)
    net = RegularizedNetRegressor(max_epochs=1, device="cpu", random_state=0)
    net.fit(X, y / 100)
    # Finite in float32, but aligned with the weights of the hidden unit of
    # largest l1 norm (above 1.2 here) so that its pre-activation overflows.
    first = next(m for m in net.module_.modules() if isinstance(m, nn.Linear))
    weight = first.weight.detach().numpy().astype(np.float64)
    unit = np.abs(weight).sum(axis=1).argmax()
    assert np.abs(weight[unit]).sum() > 1.2
    x = 3e38 * np.sign(weight[unit])
    assert np.isfinite(x.astype(np.float32)).all()
    with pytest.raises(ValueError, match="NaN or infinite"):
        net.predict(x[None, :])


def test_a_diverged_fit_raises_instead_of_keeping_useless_weights():
    # y of 1e30 gives an infinite squared loss in float32: the weights never
    # move, and the fit used to return quietly.
    X, y = make_regression(n_samples=40, n_features=3, random_state=0)
    with pytest.raises(ValueError, match="diverged"):
        RegularizedNetRegressor(max_epochs=2, device="cpu", random_state=0).fit(
            X, y * 1e30)
