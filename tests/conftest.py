import pytest
import torch

from skreg._device import cuda_available

# The tests fit tiny problems, where torch's intra-op threads cost more in
# synchronization than they save, and xdist workers already share the cores.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA, and none is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Each device a test should run on: the CPU always, CUDA when present."""
    return request.param
