"""Orthogonal dictionary learning against scikit-learn's dictionary learners.

Planted data (``make_orthogonal_sparse_data``: Haar-random orthogonal atoms,
Bernoulli-Gaussian codes, theta = 0.1, no noise). For each learner: fit time
(median over ``--repeats`` for the skreg fits, one fit for the slow scikit-learn
ones), fraction of atoms recovered (|cos| > 0.95 after optimal matching), the l4
error | ||A D0||_4^4 / n - 1 |, and the relative reconstruction error of OMP codes
with the same number of non-zeros per sample for every dictionary ("equal
sparsity"). The last column is the time relative to scikit-learn's tuned
MiniBatchDictionaryLearning, on the same data in the same process.

Run ``python benchmarks/bench_decomposition.py`` (CPU sizes, a few minutes on two
cores) or ``python benchmarks/bench_decomposition.py --device cuda --large``.
"""

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.decomposition import (
    DictionaryLearning,
    MiniBatchDictionaryLearning,
    sparse_encode,
)
from threadpoolctl import threadpool_limits

from skreg._device import device_name, resolve_device
from skreg.datasets import make_orthogonal_sparse_data
from skreg.decomposition import OrthogonalDictionaryLearning, dictionary_recovery


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_fit(make, Y, repeats, device):
    times = []
    for _ in range(repeats):
        estimator = make()
        _sync(device)
        start = time.perf_counter()
        estimator.fit(Y)
        _sync(device)
        times.append(time.perf_counter() - start)
    return estimator, statistics.median(times)


def _quality(components, D, Y_eval, n_nonzero):
    recovery = dictionary_recovery(components, D)
    with warnings.catch_warnings():
        # samples with fewer non-zeros than asked end OMP early: expected here
        warnings.simplefilter("ignore", RuntimeWarning)
        codes = sparse_encode(Y_eval, components, algorithm="omp",
                              n_nonzero_coefs=n_nonzero)
    error = np.linalg.norm(Y_eval - codes @ components) / np.linalg.norm(Y_eval)
    return recovery.recovery, abs(recovery.l4 - 1), error


def _partial_fit_throughput(Y, device, chunk, batch_size):
    odl = OrthogonalDictionaryLearning(batch_size=batch_size, random_state=0,
                                       device=device)
    _sync(device)
    start = time.perf_counter()
    for begin in range(0, Y.shape[0], chunk):
        odl.partial_fit(Y[begin:begin + chunk])
    _sync(device)
    return odl, Y.shape[0] / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--large", action="store_true",
                        help="n_features=256, n_samples=200,000 (GPU sizes); "
                             "scikit-learn learners are skipped")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fits of each skreg learner (median reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="cap torch and BLAS threads (default: library defaults)")
    parser.add_argument("--dl-samples", type=int, default=2000,
                        help="subsample given to the batch DictionaryLearning")
    parser.add_argument("--skip-sklearn", action="store_true")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_features, n_samples = (256, 200_000) if args.large else (64, 20_000)
    theta = 0.1
    n_nonzero = max(1, round(theta * n_features))
    Y, D, _ = make_orthogonal_sparse_data(n_samples, n_features, sparsity=theta,
                                          random_state=0)
    Y_eval = Y[:2000]

    rows = []

    def record(name, library, fitted_on, components, seconds, note=""):
        rec, l4_error, error = _quality(components, D, Y_eval, n_nonzero)
        rows.append((name, library, fitted_on, seconds, rec, l4_error, error, note))
        # each row as soon as it exists: a slow anchor cut short loses no results
        print(f"  | {name} | {library} | {fitted_on:,} | {seconds:.2f} | {rec:.3f} "
              f"| {l4_error:.1e} | {error:.4f} | {note} |", flush=True)

    skreg_runs = [
        ("msp (p=4)", dict(algorithm="msp", power=4)),
        ("msp (p=3)", dict(algorithm="msp", power=3)),
        ("procrustes (alpha=0.5)", dict(algorithm="procrustes", alpha=0.5)),
        ("frank_wolfe 1 pass (p=4)", dict(algorithm="frank_wolfe", power=4)),
        ("frank_wolfe 1 pass (p=3)", dict(algorithm="frank_wolfe", power=3)),
    ]
    with threadpool_limits(limits=args.threads):
        print(f"skreg on {device_name(device)}, {n_samples} x {n_features}",
              flush=True)
        # one untimed fit pays the start-up costs (CUDA context, kernels, LAPACK)
        OrthogonalDictionaryLearning(max_iter=2, device=device).fit(Y[:1000])
        for name, params in skreg_runs:
            estimator, seconds = _time_fit(
                lambda p=params: OrthogonalDictionaryLearning(
                    random_state=0, device=device, **p),
                Y, args.repeats, device)
            record(name, "skreg", n_samples, estimator.components_, seconds,
                   f"{estimator.n_iter_} it" if "pass" not in name
                   else f"{estimator.n_steps_} steps of 256")
        odl, throughput = _partial_fit_throughput(Y, device, chunk=2000,
                                                  batch_size=256)
        record("partial_fit, chunks of 2000", "skreg", n_samples, odl.components_,
               n_samples / throughput, f"{throughput:,.0f} samples/s")

        if not (args.large or args.skip_sklearn):
            print("scikit-learn", flush=True)
            sklearn_runs = [
                ("MiniBatchDictionaryLearning defaults", n_samples,
                 lambda: MiniBatchDictionaryLearning(n_features, random_state=0)),
                ("MiniBatchDictionaryLearning tuned", n_samples,
                 lambda: MiniBatchDictionaryLearning(
                     n_features, alpha=0.3, fit_algorithm="cd", max_iter=20,
                     tol=0, max_no_improvement=None, random_state=0)),
                ("DictionaryLearning defaults", args.dl_samples,
                 lambda: DictionaryLearning(n_features, random_state=0)),
            ]
            for name, n_fit, make in sklearn_runs:
                estimator, seconds = _time_fit(make, Y[:n_fit], 1, device)
                record(name, "scikit-learn", n_fit, estimator.components_, seconds,
                       f"{estimator.n_iter_} it")

    record_reference = _quality(D, D, Y_eval, n_nonzero)
    reference = next((r[3] for r in rows if r[0].endswith("tuned")), None)
    print()
    print(f"n_features={n_features}, n_samples={n_samples}, theta={theta}, "
          f"OMP codes with {n_nonzero} non-zeros; device {device_name(device)}; "
          f"threads {args.threads or torch.get_num_threads()}")
    print()
    print("| learner | library | samples fitted | fit s | recovery | |l4 - 1| "
          "| rel. error | time / tuned MiniBatch | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, library, n_fit, seconds, rec, l4_error, error, note in rows:
        ratio = f"{seconds / reference:.3f}" if reference else "n/a"
        print(f"| {name} | {library} | {n_fit:,} | {seconds:.2f} | {rec:.3f} "
              f"| {l4_error:.1e} | {error:.4f} | {ratio} | {note} |")
    print(f"| planted dictionary | - | - | - | 1.000 | 0.0e+00 "
          f"| {record_reference[2]:.4f} | - | reference |")


if __name__ == "__main__":
    main()
