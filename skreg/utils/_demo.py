"""Shared machinery of the ``python -m skreg`` demo sections.

Each family module ``skreg.<family>._demo`` defines ``run_demo(device, quick)``
returning a list of :class:`DemoRow`; most rows come from :func:`run_search`,
which times one ``GridSearchCV`` over a ``Pipeline``.
"""

import time
from dataclasses import dataclass


@dataclass
class DemoRow:
    """One line of the demo table."""

    family: str
    estimator: str
    data: str
    best_params: str
    score: float
    metric: str
    fit_seconds: float
    device: str


def _format_params(params):
    return ", ".join(f"{key.split('__')[-1]}={value!r}" for key, value in
                     params.items())


def run_search(family, estimator, data, search, X, y=None, *, device, metric,
               **fit_params):
    """Fit a search (e.g. ``GridSearchCV``) and describe it as a :class:`DemoRow`.

    ``metric`` names the search's scoring; the score reported is the best mean
    cross-validated score.
    """
    start = time.perf_counter()
    search.fit(X, y, **fit_params)
    seconds = time.perf_counter() - start
    return DemoRow(
        family=family,
        estimator=estimator,
        data=data,
        best_params=_format_params(search.best_params_),
        score=float(search.best_score_),
        metric=metric,
        fit_seconds=seconds,
        device=str(device),
    )


def format_table(rows):
    """Render demo rows as a Markdown table."""
    header = ["family", "estimator", "data", "best params", "score", "metric",
              "fit s", "device"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.family, row.estimator, row.data, row.best_params,
                 f"{row.score:.4f}", row.metric, f"{row.fit_seconds:.2f}", row.device]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
