"""Demo section: PRESTO against proportional odds on simulated and marital data."""

from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skreg.datasets import make_rare_ordinal
from skreg.ordinal import PrestoClassifier, ProportionalOddsClassifier
from skreg.utils._demo import run_search


def _fair_marriage_data():
    import statsmodels.api as sm

    fair = sm.datasets.fair.load_pandas().data
    y = fair["rate_marriage"].to_numpy().astype(int)
    X = fair.drop(columns=["rate_marriage"]).to_numpy(dtype=float)
    return X, y


def run_demo(device, quick):
    """Grid-search the difference penalty, with proportional odds as a candidate.

    Each search chooses, by cross-validated log-loss, between the
    proportional-odds model and PRESTO at several penalties, on the paper's
    simulation (rare top class) and on the ``fair`` data shipped with statsmodels
    (self-rated marriage quality, 5 classes, rarest 1.6%).
    """
    X_sim, y_sim, _ = make_rare_ordinal(n_samples=500 if quick else 2500,
                                        random_state=0)
    X_fair, y_fair = _fair_marriage_data()
    if quick:
        X_fair, y_fair = X_fair[:1000], y_fair[:1000]
        alphas = [0.01]
    else:
        alphas = [0.03, 0.01, 0.003, 0.001, 0.0003]
    rows = []
    for label, X, y in [
        (f"make_rare_ordinal ({X_sim.shape[0]} x 10, K=4)", X_sim, y_sim),
        (f"statsmodels fair, rate_marriage ({X_fair.shape[0]} x 8, K=5)",
         X_fair, y_fair),
    ]:
        pipe = Pipeline([("scale", StandardScaler()),
                         ("clf", PrestoClassifier(device=device))])
        grid = [{"clf": [ProportionalOddsClassifier(device=device)]},
                {"clf": [PrestoClassifier(device=device)], "clf__alpha": alphas}]
        search = GridSearchCV(pipe, grid, scoring="neg_log_loss",
                              cv=StratifiedKFold(3, shuffle=True, random_state=0))
        row = run_search("ordinal", "PrestoClassifier vs ProportionalOdds", label,
                         search, X, y, device=device, metric="neg log-loss")
        chosen = type(search.best_params_["clf"]).__name__
        alpha = search.best_params_.get("clf__alpha")
        row.best_params = chosen + ("" if alpha is None else f", alpha={alpha!r}")
        rows.append(row)
    return rows


