import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Test tensors are tiny: intra-op threads gain nothing and, on a loaded 2-core machine, cost a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
