"""``python -m skreg`` section: domain adaptation on rotated two-moons."""

import numpy as np
import sklearn
from sklearn.datasets import make_moons
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC

from skreg.transport._estimators import SparseOTDomainAdaptationClassifier
from skreg.utils._demo import run_search


def rotated_moons(n_source, n_target, angle_deg=40.0, random_state=0):
    """Two-moons source and the same distribution rotated as target."""
    rng = np.random.RandomState(random_state)
    Xs, ys = make_moons(n_source, noise=0.08, random_state=rng)
    Xt, yt = make_moons(n_target, noise=0.08, random_state=rng)
    theta = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(theta), -np.sin(theta)],
                         [np.sin(theta), np.cos(theta)]])
    center = Xt.mean(axis=0)
    Xt = (Xt - center) @ rotation.T + center
    return Xs, ys, Xt, yt


def run_demo(device, quick):
    """Tune the sparse-OT domain-adaptation classifier by GridSearchCV.

    Training folds are the labelled source; the validation fold is a fifth of
    the target with its labels; the whole unlabelled target is routed to
    ``fit`` as ``X_target``.
    """
    n = 60 if quick else 200
    Xs, ys, Xt, yt = rotated_moons(n, n)
    X = np.r_[Xs, Xt[::5]]
    y = np.r_[ys, yt[::5]]
    folds = np.r_[np.full(len(Xs), -1), np.zeros(len(Xt[::5]))]
    grid = {
        "sparseotdomainadaptationclassifier__max_nz": [1, 3] if quick else [1, 2, 5],
        "sparseotdomainadaptationclassifier__gamma": [0.1] if quick else [0.1, 1.0],
        "sparseotdomainadaptationclassifier__estimator__C": [1.0, 10.0],
    }
    with sklearn.config_context(enable_metadata_routing=True):
        clf = SparseOTDomainAdaptationClassifier(
            SVC(), max_iter=50 if quick else 200, device=device,
        ).set_fit_request(X_target=True, sample_weight=False)
        search = GridSearchCV(make_pipeline(clf), grid, cv=PredefinedSplit(folds))
        row = run_search("transport", "SparseOTDomainAdaptationClassifier(SVC)",
                         f"rotated moons 40 deg ({n}+{n})", search, X, y,
                         device=device, metric="target accuracy", X_target=Xt)
    return [row]
