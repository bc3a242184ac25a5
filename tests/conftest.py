import os
import random
import zlib

import numpy as np
import pytest
import torch

import juap
from helpers import SEED_OFFSET

# Small convolutions on a busy 2-core machine run far faster on one thread.
torch.set_num_threads(int(os.environ.get("JUAP_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test starts from its own global seed (torch, NumPy, random): its name and JUAP_TEST_SEED,
    so its verdict does not depend on which tests ran before it, and JUAP_TEST_SEED=k redraws it."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + 1_000_003 * SEED_OFFSET) % 2**32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's cache (synthetic data, demo models) out of the user's home."""
    if "JUAP_CACHE" not in os.environ:
        monkeypatch.setenv("JUAP_CACHE", str(tmp_path_factory.getbasetemp() / "juap-cache"))


@pytest.fixture(scope="session")
def clf_path(tmp_path_factory):
    """The tiny trained classifier of tests/helpers.py as a checkpoint file for the command line (a test
    module that wants an untrained one defines its own ``clf_path``)."""
    from helpers import tiny_trained_classifier

    clf, _, _ = tiny_trained_classifier()
    path = tmp_path_factory.mktemp("clf") / "classifier.safetensors"
    juap.save_classifier(clf, path)
    return str(path)
