"""Small trained models and data for tests, made in seconds from the embedded synthetic renderer."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import juap
from juap.data.synthetic import render_sample

# JUAP_TEST_SEED=k (default 0) moves every seed the tests leave to chance: the per-test global seed
# (tests/conftest.py) and the seeds of the data and small models made here. A test whose verdict
# changes with it asserts a lucky draw, not a mechanism (tests/README.md).
SEED_OFFSET = int(os.environ.get("JUAP_TEST_SEED", "0"))


def seeded(k: int) -> int:
    """The seed ``k`` of a helper, moved by ``JUAP_TEST_SEED`` (0: ``k`` itself)."""
    return k + 7919 * SEED_OFFSET


@functools.cache
def synthetic_tensors(n: int = 240, size: int = 32, num_classes: int = 4, seed: int = 0):
    """(images (n, 3, size, size) in [0, 1], labels (n,), boxes (n, 4)) rendered directly."""
    xs, ys, boxes = [], [], []
    for i in range(n):
        img, box, label = render_sample(i, seed=seeded(seed), image_size=size, num_classes=num_classes)
        xs.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
        ys.append(label)
        boxes.append(box)
    return torch.stack(xs), torch.tensor(ys), torch.tensor(boxes)


@functools.cache
def tiny_trained_classifier(size: int = 32, num_classes: int = 4, epochs: int = 20):
    """A small_resnet (8, 16, 32) trained for ~10 s, well above chance: (classifier, x_test, y_test)."""
    x, y, _ = synthetic_tensors(800, size, num_classes)
    xtr, ytr, xte, yte = x[:640], y[:640], x[640:], y[640:]
    torch.manual_seed(seeded(0))
    clf = juap.create_classifier("small_resnet", num_classes=num_classes, widths=(8, 16, 32))
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    steps_per_epoch = (len(xtr) + 31) // 32
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=epochs * steps_per_epoch)
    clf.train()
    g = torch.Generator().manual_seed(seeded(0))
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 32):
            idx = perm[i : i + 32]
            loss = F.cross_entropy(clf(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    clf.eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    return clf, xte, yte


def textures(n: int, *, size: int = 32, seed: int = 0):
    """Three procedural classes (horizontal stripes, vertical stripes, a blob) in random colours."""
    import math

    g = torch.Generator().manual_seed(seeded(seed))
    y = torch.arange(n) % 3
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    freq, phase = 2 + 3 * torch.rand(n, 1, 1, generator=g), 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    cx, cy = 0.3 + 0.4 * torch.rand(n, 1, 1, generator=g), 0.3 + 0.4 * torch.rand(n, 1, 1, generator=g)
    blob = 2 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02) - 1
    stripes = [torch.sin(2 * math.pi * freq * u + phase) for u in (yy, xx)]
    t = (torch.stack([*stripes, blob], 1)[torch.arange(n), y].unsqueeze(1) + 1) / 2  # (n, 1, s, s)
    c1, c2 = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    return (c1 * t + c2 * (1 - t) + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1), y


@functools.cache
def texture_classifier():
    """A tiny small_resnet trained for ~3 s on :func:`textures` (> 80% held out): (clf, x_test, y_test)."""
    torch.manual_seed(seeded(0))
    clf = juap.create_classifier("small_resnet", num_classes=3, widths=(8, 16, 32))
    x, y = textures(2048, seed=0)
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    clf.train()
    for _ in range(60):
        idx = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        F.cross_entropy(clf(x[idx]), y[idx]).backward()
        opt.step()
    clf.eval()
    x_test, y_test = textures(64, seed=1)
    with torch.no_grad():
        assert (clf(x_test).argmax(1) == y_test).float().mean() > 0.8
    return clf, x_test, y_test


def art_classifier(clf, input_shape):
    """ART's PyTorchClassifier around a juap classifier (images in [0, 1]), for parity tests."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=clf,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=clf.num_classes,
        clip_values=(0.0, 1.0),
    )


# `--set` options for a tiny embedded data set (96 images, 32x32, 4 classes) in CLI tests.
CLI_TINY_DATA = [
    "--set",
    "data.num_images=96",
    "--set",
    "data.image_size=32",
    "--set",
    "data.num_classes=4",
    "--set",
    "data.train_fraction=0.5",
    "--set",
    "data.test_fraction=0.25",
]


def run_cli(capsys, *argv):
    """``juap ARGV`` in-process: (exit code, stdout, stderr)."""
    from juap.commands.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for each module that imports this fixture (results compared bit for bit)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

