"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny tensors gain nothing from two, and on a shared 2-core
    machine two OpenMP threads fighting for one core are several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
