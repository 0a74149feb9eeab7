"""Demo section: low-rank completion as the imputer before a classifier."""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skreg.completion import LowRankCompleter
from skreg.utils._demo import run_search


def run_demo(device, quick):
    """Grid-search the rank of a completer that imputes half-erased digits.

    Half of the pixels of each digit image are erased at random; the completer
    fills them from a low-rank model of the training images (test rows are
    folded in), then a standardized logistic regression classifies the digits.
    The search picks the rank (and, in full mode, the ridge penalty).
    """
    X, y = load_digits(return_X_y=True)
    if quick:
        X, y = X[:600], y[:600]
        grid = {"complete__rank": [4, 12]}
    else:
        grid = {"complete__rank": [4, 8, 12, 20], "complete__alpha": [1.0, 10.0]}
    X = X.copy()
    X[np.random.RandomState(0).rand(*X.shape) < 0.5] = np.nan
    pipe = Pipeline([
        ("complete", LowRankCompleter(alpha=10.0, max_iter=100, tol=1e-3,
                                      random_state=0, device=device)),
        ("scale", StandardScaler()),
        ("clf", LogisticRegression(C=0.1, max_iter=500)),
    ])
    search = GridSearchCV(pipe, grid, cv=StratifiedKFold(3, shuffle=True,
                                                         random_state=0))
    return [run_search("completion", "LowRankCompleter",
                       f"digits, 50% pixels erased ({X.shape[0]} x 64)", search, X,
                       y, device=device, metric="accuracy")]
