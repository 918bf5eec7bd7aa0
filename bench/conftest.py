import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # as `python -m bench` does on CPU: one thread keeps timings meaningful on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
