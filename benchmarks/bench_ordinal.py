"""PRESTO against proportional odds, statsmodels, mord and rare-class logistic.

Prints Markdown tables:

1. exactness: ProportionalOddsClassifier vs statsmodels OrderedModel(logit, bfgs)
   coefficients, PrestoClassifier with a huge difference penalty vs the
   proportional-odds MLE, and the KKT violation of a penalized fit;
2. speed: proportional odds vs statsmodels at p = 50, and a 20-value path with
   5-fold CV at n = 2500, p = 50;
3. simulations (Faletto & Bien 2023, section 4.1): MSE of the rare-class
   probability against the truth (in-sample and on 20,000 fresh points), test
   log-loss and fit time, per setting, medians over replications;
4. real data shipped with statsmodels (``fair``: rate_marriage, ``anes96``: PID):
   out-of-sample log-loss and calibration of the rarest class.

By default 3 replications per setting (about 5-8 minutes on 2 shared cores);
``--reps 20`` runs the paper's 20.
"""

import argparse
import time
import warnings

import numpy as np
import torch
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from skreg.datasets import make_rare_ordinal
from skreg.ordinal import (
    PrestoClassifier,
    PrestoClassifierCV,
    ProportionalOddsClassifier,
)


def _statsmodels_fit(X, y):
    from statsmodels.miscmodels.ordinal_model import OrderedModel

    model = OrderedModel(y, X, distr="logit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = model.fit(method="bfgs", gtol=1e-8, maxiter=5000, disp=False)
    p = X.shape[1]
    coef = -np.asarray(result.params[:p])
    intercept = model.transform_threshold_params(np.asarray(result.params))[1:-1]
    return coef, intercept


class _Fitted:
    """Common face of the compared models: rare-class probability and class proba."""

    def __init__(self, name, proba_fn, seconds):
        self.name, self.proba_fn, self.seconds = name, proba_fn, seconds


def _cumulative_proba(eta):
    cum = np.sort(expit(eta), axis=1)
    n = len(eta)
    return np.diff(np.hstack([np.zeros((n, 1)), cum, np.ones((n, 1))]), axis=1)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _fit_all(X, y, n_classes, device, include_statsmodels=True):
    fitted = []
    presto, s = _timed(lambda: PrestoClassifierCV(device=device).fit(X, y))
    fitted.append(_Fitted("PrestoClassifierCV", presto.predict_proba, s))
    po, s = _timed(lambda: ProportionalOddsClassifier(device=device).fit(X, y))
    fitted.append(_Fitted("ProportionalOddsClassifier", po.predict_proba, s))
    if include_statsmodels:
        (coef, intercept), s = _timed(lambda: _statsmodels_fit(X, y))
        fitted.append(_Fitted(
            "statsmodels OrderedModel",
            lambda Z, c=coef, b=intercept: _cumulative_proba(b + (Z @ c)[:, None]), s))
    try:
        from mord import LogisticAT
    except ImportError:
        LogisticAT = None
    if LogisticAT is not None:
        at, s = _timed(lambda: LogisticAT(alpha=1.0).fit(X, y))
        fitted.append(_Fitted("mord LogisticAT", at.predict_proba, s))
    rare = (y == n_classes - 1).astype(int)
    lr, s = _timed(lambda: LogisticRegression(C=np.inf, max_iter=5000).fit(X, rare))
    fitted.append(_Fitted("logistic (rare class)",
                          lambda Z, m=lr: m.predict_proba(Z), s))
    return fitted


def _rare(model, Z, n_classes):
    proba = model.proba_fn(Z)
    return proba[:, -1]


def _log_loss(model, Z, y, n_classes):
    proba = model.proba_fn(Z)
    if proba.shape[1] != n_classes:
        return np.nan
    picked = np.clip(proba[np.arange(len(y)), y], 1e-15, None)
    return float(-np.mean(np.log(picked)))


SETTINGS = [
    ("sparse q=1/2, (0,3,5)", dict(intercepts=(0, 3, 5), sparsity=0.5)),
    ("sparse q=1/2, (0,3.5,5.5)", dict(intercepts=(0, 3.5, 5.5), sparsity=0.5)),
    ("sparse q=1/2, (0,4,6)", dict(intercepts=(0, 4, 6), sparsity=0.5)),
    ("sparse q=1/3, (0,3,5)", dict(intercepts=(0, 3, 5), sparsity=1 / 3)),
    ("dense, (0,3,5)", dict(intercepts=(0, 3, 5), differences="dense")),
    ("sparse p=50 q=0.1, (0,3,5)", dict(n_features=50, intercepts=(0, 3, 5),
                                        sparsity=0.1)),
]


def simulations(reps, device, n_test=20000):
    print("\n### Simulations: rare-class probability MSE x 1e4 (median over "
          f"{reps} replications)\n")
    print("| setting | method | MSE in-sample | MSE test | test log-loss | fit s |")
    print("|---|---|---|---|---|---|")
    sparse_summary = {}
    for label, params in SETTINGS:
        rows = {}
        for rep in range(reps):
            X, y, proba, beta = make_rare_ordinal(return_coef=True, random_state=rep,
                                                  **params)
            rng = np.random.RandomState(10_000 + rep)
            Z = rng.uniform(-1, 1, size=(n_test, X.shape[1]))
            eta = np.asarray(params["intercepts"]) + Z @ beta.T
            true_test = _cumulative_proba(eta)
            cum = np.cumsum(true_test, 1)[:, :-1]
            y_test = (rng.uniform(size=(n_test, 1)) > cum).sum(1)
            n_classes = proba.shape[1]
            if np.unique(y).size < n_classes:
                continue
            for model in _fit_all(X, y, n_classes, device):
                rows.setdefault(model.name, []).append((
                    np.mean((_rare(model, X, n_classes) - proba[:, -1]) ** 2),
                    np.mean((_rare(model, Z, n_classes) - true_test[:, -1]) ** 2),
                    _log_loss(model, Z, y_test, n_classes),
                    model.seconds,
                ))
        for name, values in rows.items():
            med = np.median(np.asarray(values), axis=0)
            print(f"| {label} | {name} | {1e4 * med[0]:.3f} | {1e4 * med[1]:.3f} | "
                  f"{med[2]:.4f} | {med[3]:.2f} |", flush=True)
            if label.startswith("sparse") and "p=50" not in label:
                sparse_summary.setdefault(name, []).append(1e4 * med[0])
    print("\nAveraged over the p = 10 sparse-differences settings (MSE in-sample "
          "x 1e4): " + ", ".join(f"{k} {np.mean(v):.3f}"
                                  for k, v in sparse_summary.items()))


def exactness(device):
    print("\n### Exactness\n")
    print("| check | value |")
    print("|---|---|")
    X, y, _ = make_rare_ordinal(n_samples=2500, n_features=10, random_state=0)
    po = ProportionalOddsClassifier(device=device).fit(X, y)
    coef, intercept = _statsmodels_fit(X, y)
    diff = max(np.abs(po.coef_ - coef).max(), np.abs(po.intercept_ - intercept).max())
    print(f"| max abs diff, ProportionalOdds vs statsmodels (logit, bfgs) | "
          f"{diff:.2e} |")
    huge = PrestoClassifier(alpha=1e3, penalize_first=False, tol=1e-10,
                            device=device).fit(X, y)
    diff = max(np.abs(huge.coef_ - po.coef_).max(),
               np.abs(huge.intercept_ - po.intercept_).max())
    print(f"| max abs diff, Presto(alpha=1e3, penalize_first=False) vs "
          f"proportional odds | {diff:.2e} |")
    lam = 2e-3
    fit = PrestoClassifier(alpha=lam, standardize=False, tol=1e-9,
                           device=device).fit(X, y)
    eta = fit.intercept_ + X @ fit.coef_.T
    cum = expit(eta)
    dens = cum * (1 - cum)
    n = len(y)
    proba = _cumulative_proba(eta)[np.arange(n), y]
    g = np.zeros_like(eta)
    up, lo = y < 3, y > 0
    g[np.flatnonzero(up), y[up]] -= dens[up, y[up]] / proba[up]
    g[np.flatnonzero(lo), y[lo] - 1] += dens[lo, y[lo] - 1] / proba[lo]
    g /= n
    g_psi = np.cumsum((g.T @ X)[::-1], 0)[::-1]
    psi = np.diff(fit.coef_, axis=0, prepend=0)
    viol = np.where(psi == 0, np.maximum(np.abs(g_psi) - lam, 0),
                    np.abs(g_psi + lam * np.sign(psi)))
    kkt = max(np.abs(g.sum(0)).max(), viol.max())
    print(f"| KKT violation of Presto(alpha={lam}) recomputed in NumPy | {kkt:.2e} |")


def _timed_both(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def speed(device, reps=3):
    print("\n### Speed (n = 2500, p = 50; median of "
          f"{reps} runs; wall and process-CPU seconds)\n")
    X, y, _ = make_rare_ordinal(n_features=50, sparsity=0.1, random_state=0)
    po = np.median([_timed_both(lambda: ProportionalOddsClassifier(
        device=device).fit(X, y)) for _ in range(reps)], axis=0)
    sm = np.median([_timed_both(lambda: _statsmodels_fit(X, y))
                    for _ in range(reps)], axis=0)
    cv = np.median([_timed_both(lambda: PrestoClassifierCV(
        device=device).fit(X, y)) for _ in range(reps)], axis=0)
    print("| task | skreg wall s | skreg CPU s | anchor wall s | anchor CPU s | "
          "anchor / skreg (wall) |")
    print("|---|---|---|---|---|---|")
    print(f"| proportional-odds MLE vs statsmodels OrderedModel(logit, bfgs) | "
          f"{po[0]:.3f} | {po[1]:.3f} | {sm[0]:.3f} | {sm[1]:.3f} | "
          f"{sm[0] / po[0]:.1f} |")
    print(f"| PrestoClassifierCV, 20 penalties x 5 folds + full data (target 10 s) "
          f"| {cv[0]:.2f} | {cv[1]:.2f} | | | |")


def _real_data():
    import statsmodels.api as sm

    fair = sm.datasets.fair.load_pandas().data
    y = fair["rate_marriage"].to_numpy().astype(int)
    X = fair.drop(columns=["rate_marriage"]).to_numpy(dtype=float)
    yield "fair (rate_marriage, 5 classes)", X, y
    anes = sm.datasets.anes96.load_pandas().data
    y = anes["PID"].to_numpy().astype(int)
    X = anes.drop(columns=["PID", "vote"]).to_numpy(dtype=float)
    yield "anes96 (PID, 7 classes)", X, y


def real_data(reps, device):
    print(f"\n### Real data (70/30 stratified splits, median of {reps})\n")
    print("| data | method | test log-loss | rarest class: mean predicted | "
          "observed | Brier (rarest) |")
    print("|---|---|---|---|---|---|")
    for label, X, y in _real_data():
        classes, counts = np.unique(y, return_counts=True)
        rarest = int(np.argmin(counts))
        codes = np.searchsorted(classes, y)
        rows = {}
        for rep in range(reps):
            X_tr, X_te, y_tr, y_te = train_test_split(
                X, codes, test_size=0.3, stratify=codes, random_state=rep)
            mean, sd = X_tr.mean(0), X_tr.std(0)
            X_tr, X_te = (X_tr - mean) / sd, (X_te - mean) / sd
            n_classes = classes.size
            for model in _fit_all(X_tr, y_tr, n_classes, device,
                                  include_statsmodels=True):
                if model.name.startswith("logistic"):
                    continue
                proba = model.proba_fn(X_te)
                target = (y_te == rarest).astype(float)
                rows.setdefault(model.name, []).append((
                    _log_loss(model, X_te, y_te, n_classes),
                    proba[:, rarest].mean(), target.mean(),
                    np.mean((proba[:, rarest] - target) ** 2)))
        for name, values in rows.items():
            med = np.median(np.asarray(values), axis=0)
            print(f"| {label} | {name} | {med[0]:.4f} | {med[1]:.4f} | "
                  f"{med[2]:.4f} | {med[3]:.5f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3,
                        help="replications per simulation setting (paper: 20)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine a "
                             "second OpenMP thread mostly spins; 0 = torch's choice)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["exactness", "speed", "simulations", "real"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_ordinal: device={args.device}, torch threads="
          f"{torch.get_num_threads()}, reps={args.reps}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "exactness" not in args.skip:
            exactness(args.device)
        if "speed" not in args.skip:
            speed(args.device)
        if "simulations" not in args.skip:
            simulations(args.reps, args.device)
        if "real" not in args.skip:
            real_data(args.reps, args.device)


if __name__ == "__main__":
    main()
