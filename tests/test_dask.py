"""Scale-out with existing engines: joblib's dask backend and dask-ml's Incremental.

Both tests start a ``distributed.LocalCluster`` of worker processes bound to the
loopback address, so nothing leaves the machine.
"""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skreg.datasets import make_orthogonal_sparse_data
from skreg.decomposition import OrthogonalDictionaryLearning, dictionary_recovery

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")
joblib = pytest.importorskip("joblib")


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True,
            host="127.0.0.1", dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def test_grid_search_on_a_dask_cluster_equals_the_local_run(client):
    X, y = load_digits(return_X_y=True)
    X, y = X[:300], y[:300]
    pipe = make_pipeline(
        StandardScaler(),
        OrthogonalDictionaryLearning(max_iter=10, random_state=0, device="cpu"),
        LogisticRegression(max_iter=300),
    )
    grid = {"orthogonaldictionarylearning__transform_alpha": [0.05, 0.5]}
    local = GridSearchCV(clone(pipe), grid, cv=3, n_jobs=1).fit(X, y)
    with joblib.parallel_config(backend="dask"):
        remote = GridSearchCV(clone(pipe), grid, cv=3, n_jobs=-1).fit(X, y)
    assert remote.best_params_ == local.best_params_
    np.testing.assert_allclose(remote.cv_results_["mean_test_score"],
                               local.cv_results_["mean_test_score"])
    # The work really ran on the cluster's workers.
    assert any(v for v in client.run(lambda: 1).values())


def test_incremental_streams_chunks_through_partial_fit_on_the_cluster(client):
    from dask_ml.wrappers import Incremental

    Y, D, _ = make_orthogonal_sparse_data(6000, 8, sparsity=0.2, random_state=0)
    Y_chunks = da.from_array(Y, chunks=(1000, 8))
    assert Y_chunks.numblocks[0] > 1
    odl = OrthogonalDictionaryLearning(batch_size=100, random_state=0, device="cpu")
    streamed = Incremental(clone(odl), shuffle_blocks=False)
    streamed.fit(Y_chunks)

    local = clone(odl)
    for start in range(0, len(Y), 1000):
        local.partial_fit(Y[start:start + 1000])
    np.testing.assert_allclose(streamed.estimator_.components_, local.components_,
                               atol=1e-10)
    assert streamed.estimator_.n_samples_seen_ == len(Y)
    assert dictionary_recovery(streamed.estimator_.components_, D).recovery == 1.0
