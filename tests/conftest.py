import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """The real CIFAR-10 layout built from ../shared (as CI has it); skips with a reason if ../shared is absent.

    In CI (CI=true) a missing ../shared is a failure, not a skip: the real-data tests must run there.
    """
    maker = os.path.join(SHARED, "data", "make_cifar10.py")
    if not os.path.exists(maker):
        if os.environ.get("CI"):
            pytest.fail("../shared/data/make_cifar10.py is missing in CI")
        pytest.skip("../shared/data/make_cifar10.py not found: real-data tests need ../shared beside the repo")
    cache = os.path.join(ROOT, ".cache", "cifar")
    if not os.path.exists(os.path.join(cache, "cifar-10-batches-py", "test_batch")):
        import subprocess

        subprocess.run([sys.executable, maker, cache, "--tar"], check=True, stdout=subprocess.DEVNULL)
    return cache


@pytest.fixture
def one_thread():
    """Run on one intra-op thread, restored afterwards: the test models are small, and on a busy 2-core machine two
    OpenMP threads spin against other processes (measured here: 4x the CPU time, 4x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
