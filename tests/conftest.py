import os

import pytest
import torch

# Small convolutions on a busy 2-core machine run far faster on one thread.
torch.set_num_threads(int(os.environ.get("JUAP_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's cache (synthetic data, demo models) out of the user's home."""
    if "JUAP_CACHE" not in os.environ:
        monkeypatch.setenv("JUAP_CACHE", str(tmp_path_factory.getbasetemp() / "juap-cache"))
