"""Low-rank matrix completion: skreg's LowRankCompleter against the usual anchors.

Sections (all in one process, on the same data):

1. ``synthetic``: rank 10, 1000 x 1000, 10% observed, sigma = 0.1 (RMSE on the
   unobserved entries against the noiseless truth; noise floor ~0.05). skreg
   ``altmin`` (approximate CG half-steps) and ``altmin_exact``, a plain NumPy ALS
   (a loop over rows, ridge 1e-3, 20 sweeps), fancyimpute ``SoftImpute
   (max_rank=10)`` (and ``MatrixFactorization`` with ``--slow-anchors``: minutes),
   scikit-learn ``IterativeImputer`` (capped: 10 nearest features, 3 rounds, on a
   300-column slice).
2. ``large``: 10,000 x 10,000 at 1% (1e6 entries): skreg and NumPy ALS (the
   dense anchors would need the 1e8-entry matrix).
3. ``scaling``: seconds per sweep at 1e5, 1e6 (and, with ``--large``, 1e7 =
   100,000 x 50,000 at 0.2%, k = 16) observed entries, the log-log slope, the
   RMSE reached and the peak memory (resident set on the CPU, allocator peak on
   CUDA).
4. ``movielens``: MovieLens-100k, random 80/20 split (seed 0), test RMSE.

Optional anchors live outside the package's environment. Install them with::

    pip install --no-deps --target .venv-bench/site fancyimpute==0.7.0 neighbors==0.2.1

(``.venv-bench/`` is ignored by git; ``--bench-site`` points elsewhere). fancyimpute
0.7 calls ``check_array(force_all_finite=...)``, removed in scikit-learn 1.8: the
benchmark loads its solver modules without the package ``__init__`` (which imports
cvxpy) and shims that keyword here, never in skreg. MovieLens is read from the
``neighbors`` wheel's data file, located with ``importlib.metadata`` without
importing the package. Missing anchors are reported and their rows skipped.

Run ``python benchmarks/bench_completion.py`` (CPU, a few minutes on two cores),
``--threads 1`` for single-thread timings, or
``python benchmarks/bench_completion.py --device cuda --large --sections scaling``.
"""

import argparse
import importlib.metadata
import importlib.util
import math
import resource
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from skreg._device import device_name, resolve_device
from skreg.completion import LowRankCompleter
from skreg.completion._solver import alternating_minimization, observed_entries
from skreg.datasets import make_low_rank_matrix_completion

REPO = Path(__file__).resolve().parents[1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeats, device):
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


# ---------------------------------------------------------------- anchors
def numpy_als(X_csr, rank, alpha, n_sweeps, seed=0):
    """Plain alternating least squares: one ``np.linalg.solve`` per row/column."""
    rng = np.random.RandomState(seed)
    m, n = X_csr.shape
    X_csc = X_csr.tocsc()
    U = rng.standard_normal((m, rank)) / rank**0.25
    V = rng.standard_normal((n, rank)) / rank**0.25
    eye = alpha * np.eye(rank)
    for _ in range(n_sweeps):
        for j in range(n):
            lo, hi = X_csc.indptr[j], X_csc.indptr[j + 1]
            F = U[X_csc.indices[lo:hi]]
            V[j] = np.linalg.solve(F.T @ F + eye, F.T @ X_csc.data[lo:hi])
        for i in range(m):
            lo, hi = X_csr.indptr[i], X_csr.indptr[i + 1]
            F = V[X_csr.indices[lo:hi]]
            U[i] = np.linalg.solve(F.T @ F + eye, F.T @ X_csr.data[lo:hi])
    return U, V


def _site_paths(bench_site):
    site = Path(bench_site) if bench_site else REPO / ".venv-bench" / "site"
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))


def load_fancyimpute():
    """SoftImpute and MatrixFactorization from fancyimpute 0.7, or None."""
    spec = importlib.util.find_spec("fancyimpute")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = types.ModuleType("fancyimpute")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("fancyimpute", package)
    from sklearn.utils import check_array

    def check_array_shim(X, *args, force_all_finite=None, **kwargs):
        if force_all_finite is not None:
            kwargs["ensure_all_finite"] = force_all_finite
        return check_array(X, *args, **kwargs)

    modules = {}
    for name in ("solver", "soft_impute", "matrix_factorization"):
        module = importlib.import_module(f"fancyimpute.{name}")
        module.check_array = check_array_shim
        modules[name] = module
    return types.SimpleNamespace(
        SoftImpute=modules["soft_impute"].SoftImpute,
        MatrixFactorization=modules["matrix_factorization"].MatrixFactorization,
    )


def movielens_path():
    try:
        dist = importlib.metadata.distribution("neighbors")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("neighbors/data/movielens100k.csv"))
    return path if path.is_file() else None


# ---------------------------------------------------------------- sections
def _table(title, header, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    sys.stdout.flush()


def _skreg_rows(X, truth_fn, missing, device, repeats, rank, alpha, center,
                label_suffix=""):
    rows = []
    for solver in ("altmin", "altmin_exact"):
        def fit(solver=solver):
            return LowRankCompleter(rank=rank, alpha=alpha, center=center,
                                    solver=solver, random_state=0,
                                    device=device).fit(X)
        completer, seconds = _timed(fit, repeats, device)
        rmse = _rmse(completer.predict_entries(*missing), truth_fn(*missing))
        rows.append((f"skreg {solver}{label_suffix}", seconds, rmse,
                     completer.n_iter_))
    return rows


def section_synthetic(args, device, anchors):
    m = n = 1000
    X, U, V = make_low_rank_matrix_completion(m, n, rank=10, density=0.1,
                                              noise=0.1, random_state=0)
    observed = ~np.isnan(X)
    missing = np.nonzero(~observed)
    truth = U @ V.T
    X_csr = sp.csr_matrix(np.where(observed, X, 0.0))
    X_csr.eliminate_zeros()
    results = _skreg_rows(X, lambda r, c: truth[r, c], missing, device,
                          args.repeats, 10, 1e-3, False)
    (U_np, V_np), seconds = _timed(lambda: numpy_als(X_csr, 10, 1e-3, 20), 1, device)
    results.append(("NumPy ALS (20 sweeps)", seconds,
                    _rmse((U_np @ V_np.T)[missing], truth[missing]), 20))
    if anchors is None:
        print("fancyimpute not found: SoftImpute/MatrixFactorization rows skipped "
              "(see the module docstring to install it).")
    else:
        soft, seconds = _timed(lambda: anchors.SoftImpute(
            max_rank=10, verbose=False).fit_transform(X), args.repeats, device)
        results.append(("fancyimpute SoftImpute(max_rank=10)", seconds,
                         _rmse(soft[missing], truth[missing]), ""))
        if args.slow_anchors:
            mf, seconds = _timed(lambda: anchors.MatrixFactorization(
                rank=10, verbose=False).fit_transform(X), 1, device)
            results.append(("fancyimpute MatrixFactorization(rank=10)", seconds,
                            _rmse(mf[missing], truth[missing]), ""))
    if not args.skip_slow:
        from sklearn.experimental import enable_iterative_imputer  # noqa: F401
        from sklearn.impute import IterativeImputer

        cols = slice(0, 300)
        sub = X[:, cols]
        sub_missing = np.isnan(sub)
        imputer = IterativeImputer(n_nearest_features=10, max_iter=3, random_state=0)
        filled, seconds = _timed(lambda: imputer.fit_transform(sub), 1, device)
        results.append(("IterativeImputer (300 columns, 10 neighbours, 3 rounds)",
                         seconds, _rmse(filled[sub_missing],
                                        truth[:, cols][sub_missing]), ""))
    base = results[0][1]
    _table(f"Synthetic rank 10, {m} x {n}, 10% observed, sigma = 0.1 "
           f"({X_csr.nnz} entries)",
           ["method", "seconds", "x skreg altmin", "RMSE (unobserved vs truth)",
            "sweeps"],
           [(name, f"{sec:.3f}", f"{sec / base:.1f}", f"{rmse:.4f}", it)
            for name, sec, rmse, it in results])


def section_large(args, device):
    m = n = 10_000
    X, U, V = make_low_rank_matrix_completion(m, n, rank=10, density=0.01,
                                              noise=0.1, sparse=True, random_state=1)
    rng = np.random.RandomState(0)
    probe = (rng.randint(0, m, 100_000), rng.randint(0, n, 100_000))

    def truth(r, c):
        return np.einsum("ij,ij->i", U[r], V[c])

    results = _skreg_rows(X, truth, probe, device, args.repeats, 10, 1e-3, False)
    if not args.skip_slow:
        (U_np, V_np), seconds = _timed(lambda: numpy_als(X, 10, 1e-3, 10), 1, device)
        rmse = _rmse(np.einsum("ij,ij->i", U_np[probe[0]], V_np[probe[1]]),
                     truth(*probe))
        results.append(("NumPy ALS (10 sweeps)", seconds, rmse, 10))
    base = results[0][1]
    _table(f"Synthetic rank 10, {m} x {n}, 1% observed ({X.nnz} entries), RMSE on "
           "100,000 random entries",
           ["method", "seconds", "x skreg altmin", "RMSE vs truth", "sweeps"],
           [(name, f"{sec:.3f}", f"{sec / base:.1f}", f"{rmse:.4f}", it)
            for name, sec, rmse, it in results])


def _peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def section_scaling(args, device):
    sizes = [(1000, 1000, 0.1, 10), (10_000, 10_000, 0.01, 10)]
    if args.large:
        sizes.append((100_000, 50_000, 0.002, 16))
    dtype = torch.float32 if args.float32 else torch.float64
    rows, points = [], []
    for m, n, density, rank in sizes:
        X, U, V = make_low_rank_matrix_completion(m, n, rank=rank, density=density,
                                                  noise=0.1, sparse=True,
                                                  random_state=2)
        coo = X.tocoo()
        nnz = coo.nnz
        rows_t = torch.as_tensor(coo.row.astype(np.int64), device=device)
        cols_t = torch.as_tensor(coo.col.astype(np.int64), device=device)
        values = torch.as_tensor(coo.data, dtype=dtype, device=device)
        del coo
        for solver in ("altmin", "altmin_exact"):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            stamps = []

            def record(sweep, rmse, stamps=stamps):
                stamps.append(time.perf_counter())

            _sync(device)
            start = time.perf_counter()
            entries = observed_entries(rows_t, cols_t, values, (m, n))
            Uf, Vf, _, _, result = alternating_minimization(
                entries, rank, alpha=1e-3, max_iter=args.sweeps, tol=args.tol,
                exact=solver == "altmin_exact", n_cg_steps=2, offsets=False,
                generator=torch.Generator(device=device).manual_seed(0),
                callback=record)
            _sync(device)
            total = time.perf_counter() - start
            per_sweep = statistics.median(np.diff([start, *stamps]))
            rng = np.random.RandomState(0)
            probe = (rng.randint(0, m, 100_000), rng.randint(0, n, 100_000))
            Uh, Vh = Uf.double().cpu().numpy(), Vf.double().cpu().numpy()
            rmse = _rmse(np.einsum("ij,ij->i", Uh[probe[0]], Vh[probe[1]]),
                         np.einsum("ij,ij->i", U[probe[0]], V[probe[1]]))
            floor = 0.1 * math.sqrt(rank * (m + n) / nnz)
            peak = _peak_memory_mb(device)
            rows.append((f"{m} x {n}", f"{nnz:.2e}", rank, solver, f"{per_sweep:.4f}",
                         result.n_iter, f"{total:.3f}", f"{rmse:.4f}",
                         f"{floor:.4f}", f"{peak:.0f}", f"{m * n * 8 / 2**20:.0f}"))
            points.append((solver, nnz, per_sweep))
            del entries, Uf, Vf
        del X, rows_t, cols_t, values
    _table(f"Scaling ({'float32' if args.float32 else 'float64'}, up to "
           f"{args.sweeps} sweeps, tol {args.tol:g})",
           ["matrix", "entries", "k", "solver", "s / sweep", "sweeps", "total s",
            "RMSE vs truth", "noise floor", "peak MB", "dense would be MB"], rows)
    for solver in ("altmin", "altmin_exact"):
        xs = [math.log10(nnz) for s, nnz, _ in points if s == solver]
        ys = [math.log10(t) for s, _, t in points if s == solver]
        if len(xs) >= 2:
            slope = np.polyfit(xs, ys, 1)[0]
            print(f"log-log slope of seconds per sweep against entries, {solver}: "
                  f"{slope:.2f}")


def section_movielens(args, device, anchors):
    path = movielens_path()
    if path is None:
        print("\nMovieLens-100k not found: install the neighbors wheel (see the "
              "module docstring); section skipped.")
        return
    import pandas as pd

    frame = pd.read_csv(path)
    users = frame["User"].astype("category").cat.codes.to_numpy()
    items = frame["Item"].astype("category").cat.codes.to_numpy()
    ratings = frame["Rating"].to_numpy(dtype=np.float64)
    order = np.random.RandomState(0).permutation(ratings.size)
    split = int(0.8 * ratings.size)
    train, test = order[:split], order[split:]
    shape = (users.max() + 1, items.max() + 1)
    X = sp.csr_matrix((ratings[train], (users[train], items[train])), shape=shape)
    results = [("global mean", 0.0,
                _rmse(ratings[train].mean(), ratings[test]))]
    for solver in ("altmin", "altmin_exact"):
        def fit(solver=solver):
            return LowRankCompleter(rank=10, alpha=10.0, solver=solver,
                                    random_state=0, device=device).fit(X)
        completer, seconds = _timed(fit, args.repeats, device)
        results.append((f"skreg {solver} (rank 10, alpha 10, offsets)", seconds,
                        _rmse(completer.predict_entries(users[test], items[test]),
                              ratings[test])))
    (U_np, V_np), seconds = _timed(lambda: numpy_als(X, 10, 10.0, 20), 1, device)
    results.append(("NumPy ALS (rank 10, ridge 10, no offsets, 20 sweeps)", seconds,
                    _rmse(np.einsum("ij,ij->i", U_np[users[test]], V_np[items[test]]),
                          ratings[test])))
    if anchors is not None:
        dense = np.full(shape, np.nan)
        dense[users[train], items[train]] = ratings[train]
        soft, seconds = _timed(lambda: anchors.SoftImpute(
            max_rank=10, verbose=False).fit_transform(dense), 1, device)
        results.append(("fancyimpute SoftImpute(max_rank=10)", seconds,
                         _rmse(soft[users[test], items[test]], ratings[test])))
    _table(f"MovieLens-100k, 80/20 random split (train {train.size}, test "
           f"{test.size})", ["method", "seconds", "test RMSE"],
           [(name, f"{sec:.3f}", f"{rmse:.4f}") for name, sec, rmse in results])
    print("surprise's SVD publishes 0.9355 (5-fold cross-validation).")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--large", action="store_true",
                        help="add the 1e7-entry case (100,000 x 50,000, k = 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and BLAS threads (default: leave as is)")
    parser.add_argument("--sections", default="synthetic,large,scaling,movielens")
    parser.add_argument("--skip-slow", action="store_true",
                        help="skip IterativeImputer and the NumPy ALS at 1e6")
    parser.add_argument("--slow-anchors", action="store_true",
                        help="add fancyimpute MatrixFactorization (minutes on a CPU)")
    parser.add_argument("--sweeps", type=int, default=20,
                        help="maximum sweeps in the scaling series")
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="tolerance in the scaling series")
    parser.add_argument("--float32", action="store_true",
                        help="scaling series in float32")
    parser.add_argument("--bench-site", default=None,
                        help="folder holding fancyimpute and neighbors "
                             "(default: .venv-bench/site)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    _site_paths(args.bench_site)
    if args.threads:
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    sections = args.sections.split(",")
    anchors = load_fancyimpute() if {"synthetic", "movielens"} & set(sections) \
        else None
    print(f"device: {device_name(device)}; torch threads: {torch.get_num_threads()}; "
          f"torch {torch.__version__}")
    if "synthetic" in sections:
        section_synthetic(args, device, anchors)
    if "large" in sections:
        section_large(args, device)
    if "scaling" in sections:
        section_scaling(args, device)
    if "movielens" in sections:
        section_movielens(args, device, anchors)


if __name__ == "__main__":
    main()
