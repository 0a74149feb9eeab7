"""Demo section: orthogonal dictionary codes of digits feeding a classifier."""

from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skreg.decomposition import OrthogonalDictionaryLearning
from skreg.utils._demo import run_search


def run_demo(device, quick):
    """Grid-search the coding threshold of an orthogonal dictionary on digits.

    Digits (8 x 8 images, 64 features) are standardized, coded on a learned
    orthogonal basis with soft thresholding, and classified by a logistic
    regression; the search picks the threshold (and, in full mode, the solver).
    """
    X, y = load_digits(return_X_y=True)
    if quick:
        X, y = X[:450], y[:450]
        grid = {"odl__transform_alpha": [0.0, 0.5]}
    else:
        grid = {
            "odl__algorithm": ["msp", "procrustes"],
            "odl__transform_alpha": [0.0, 0.1, 0.3, 1.0],
        }
    pipe = Pipeline([
        ("scale", StandardScaler()),
        ("odl", OrthogonalDictionaryLearning(transform_algorithm="soft",
                                             max_iter=10 if quick else 100,
                                             random_state=0, device=device)),
        ("clf", LogisticRegression(max_iter=500)),
    ])
    search = GridSearchCV(pipe, grid, cv=StratifiedKFold(3, shuffle=True,
                                                         random_state=0))
    row = run_search("decomposition", "OrthogonalDictionaryLearning",
                     f"digits ({X.shape[0]} x 64)", search, X, y,
                     device=device, metric="accuracy")
    return [row]
