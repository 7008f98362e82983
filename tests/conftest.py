import os

import pytest
import torch

# Two CI cores: keep intra-op threads predictable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen():
    """A fresh generator per test, seeded from the test's name (inputs differ per test)."""
    import zlib

    name = os.environ.get("PYTEST_CURRENT_TEST", "seed")
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))
