import pickle

import numpy as np
import pytest
import torch

from skreg._device import (
    cuda_available,
    resolve_device,
    seed_torch,
    to_numpy,
    to_tensor,
    torch_generator,
)


def test_auto_resolves_to_cuda_exactly_when_cuda_is_available():
    expected = "cuda" if cuda_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu ", torch.device("cpu")])
def test_cpu_specifications_resolve_to_the_cpu(spec):
    assert resolve_device(spec) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "tpu", "", "cpu:0x"])
def test_unknown_device_strings_are_rejected_with_the_parameter_named(spec):
    with pytest.raises(ValueError, match="device must be"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", [0, 1.5, None, ["cpu"]])
def test_non_string_devices_are_a_type_error(spec):
    with pytest.raises(TypeError, match="device must be a string"):
        resolve_device(spec)


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_value_error(spec):
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(spec)


@pytest.mark.gpu
def test_cuda_index_beyond_the_visible_devices_is_rejected():
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_keeps_the_float_dtype_and_every_bit(dtype, device):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((7, 5)).astype(dtype)
    tensor = to_tensor(X, device)
    assert tensor.dtype == {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    assert tensor.device.type == device
    back = to_numpy(tensor)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, X)


@pytest.mark.parametrize("dtype", [np.int64, np.float16, bool])
def test_non_float32_input_becomes_float64(dtype):
    X = np.arange(6).reshape(2, 3).astype(dtype)
    tensor = to_tensor(X)
    assert tensor.dtype == torch.float64
    np.testing.assert_array_equal(to_numpy(tensor), X.astype(np.float64))


def test_explicit_dtype_wins_over_the_input_dtype():
    X = np.ones((2, 2), dtype=np.float64)
    assert to_tensor(X, dtype=np.float32).dtype == torch.float32
    assert to_tensor(torch.ones(2), dtype=torch.float64).dtype == torch.float64


def test_seed_torch_makes_torch_draws_reproducible():
    seed_torch(42)
    first = torch.randn(4)
    seed_torch(42)
    np.testing.assert_array_equal(first.numpy(), torch.randn(4).numpy())
    seed_torch(43)
    assert not torch.equal(first, torch.randn(4))


def test_torch_generator_is_reproducible_and_leaves_global_state_alone():
    torch.manual_seed(0)
    expected_global = torch.rand(3)
    torch.manual_seed(0)
    a = torch.rand(3, generator=torch_generator(7))
    assert torch.equal(torch.rand(3), expected_global)
    b = torch.rand(3, generator=torch_generator(7))
    assert torch.equal(a, b)
    from_rng = torch_generator(np.random.RandomState(7))
    assert torch.equal(torch.rand(3, generator=from_rng), a)


def test_negative_random_state_is_rejected():
    with pytest.raises(ValueError):
        seed_torch(-1)


def test_numpy_results_pickle_without_torch_objects():
    arr = to_numpy(to_tensor(np.eye(3)))
    assert isinstance(arr, np.ndarray)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(arr)), np.eye(3))


def test_read_only_arrays_convert_without_a_warning(recwarn):
    X = np.arange(6.0).reshape(2, 3)
    X.setflags(write=False)
    tensor = to_tensor(X)
    assert not [w for w in recwarn if "writable" in str(w.message)]
    tensor[0, 0] = -1.0  # the tensor owns its memory; the input is untouched
    assert X[0, 0] == 0.0


def _fitted_models():
    from skreg.completion import LowRankCompleter
    from skreg.decomposition import OrthogonalDictionaryLearning
    from skreg.ordinal import PrestoClassifier
    from skreg.transport import SparseOTTransport

    rng = np.random.RandomState(0)
    X = rng.randn(40, 4)
    y = np.digitize(X[:, 0] + 0.5 * rng.randn(40), [-0.5, 0.5])
    M = X[:, :2] @ rng.randn(2, 8)
    M[rng.rand(*M.shape) < 0.3] = np.nan
    # (estimator, fit arguments, data to predict on, methods)
    return [
        (OrthogonalDictionaryLearning(random_state=0, device="cpu"), (X,), {}, X,
         ("transform", "inverse_transform", "score")),
        (PrestoClassifier(device="cpu"), (X, y), {}, X, ("predict_proba", "predict")),
        (LowRankCompleter(rank=2, tol=1e-3, random_state=0, device="cpu"), (M,), {}, M,
         ("transform",)),
        (SparseOTTransport(max_nz=2, device="cpu"), (X,), {"X_target": X + 1.0}, X,
         ("transform", "inverse_transform")),
    ]


def test_a_model_fitted_on_cuda_predicts_on_a_machine_without_it(monkeypatch):
    # Fitted attributes are NumPy: a model fitted with device="cuda" and
    # unpickled where there is no CUDA must still predict (it raised).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for model, args, kwargs, X, methods in _fitted_models():
        model.fit(*args, **kwargs)
        expected = {name: getattr(model, name)(X) for name in methods}
        moved = pickle.loads(pickle.dumps(model))
        moved.device = "cuda"  # as if fitted there
        for name in methods:
            with pytest.warns(UserWarning, match="computing on the CPU"):
                got = getattr(moved, name)(X)
            np.testing.assert_allclose(got, expected[name], rtol=1e-12, atol=1e-12)
        # Fitting still asks for the device it names.
        with pytest.raises(ValueError, match="CUDA is not available"):
            moved.fit(*args, **kwargs)
