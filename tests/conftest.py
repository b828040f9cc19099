"""Shared test setup: deterministic, quiet, CPU-only, small thread count (CI has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see maskformer_cli/__init__.py
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# one thread per xdist worker: the workers already use every core between them
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A datasets root shared by a test module (the synthetic dataset is generated into it once)."""
    return tmp_path_factory.mktemp("datasets")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_ddp_job_at_a_time(request):
    """Tests marked `distributed` (they start several processes) take this lock: two torchrun jobs started
    at once by two xdist workers were seen to abort each other's ranks ('terminate called without an active
    exception'), while each passes alone. Serialising them costs nothing on 2 cores, where they cannot run
    side by side anyway. Autouse, keyed on the marker, so that a new multi-process test cannot forget it."""
    if request.node.get_closest_marker("distributed") is None:
        yield
        return
    import fcntl
    import tempfile

    with open(os.path.join(tempfile.gettempdir(), "maskformer-tests-ddp.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
