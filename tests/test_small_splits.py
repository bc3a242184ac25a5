"""No run reports success after zero steps of training (issue 20): a split smaller than one batch trains
with that one smaller batch in every command that trains, and a loader that yields no batch is refused
with the numbers and the fix."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import juap
from helpers import CLI_TINY_DATA, tiny_trained_classifier
from helpers import run_cli as run
from juap.classifiers.training import ClassifierTrainer
from juap.data import InMemoryLoader
from juap.errors import ConfigError
from juap.runtime.loop import run_epochs

TINY_CLF = ["--set", "classifier.options={widths: [4, 8, 8]}"]


def _steps(path) -> list:
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_train_classifier_on_a_split_smaller_than_a_batch_trains(tmp_path, capsys):
    """48 training images with the default batch of 64 (the case that used to train 0 steps and exit 0):
    one step per epoch, a history, a warning that names both numbers."""
    out = tmp_path / "clf"
    with pytest.warns(UserWarning, match=r"48 images, fewer than one batch of train.batch_size=64"):
        code, _, err = run(
            capsys, "train-classifier", "--out", str(out), "--no-progress", *CLI_TINY_DATA, *TINY_CLF,
            "--set", "train.epochs=3",
        )  # fmt: skip
    assert code == 0, err
    assert _steps(out / "history.csv") == [1, 2, 3]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_accuracy"] > 0  # the accuracy of images it was trained on, not of none


def test_train_rts_on_a_split_smaller_than_a_batch_trains(tmp_path, capsys, clf_path):
    out = tmp_path / "rts"
    code, _, err = run(
        capsys, "train-rts", "--out", str(out), "--no-progress", *CLI_TINY_DATA,
        "--set", f"classifier.weights={clf_path}", "--set", "train.epochs=2", "--set", "train.batch_size=64",
    )  # fmt: skip
    assert code == 0, err
    assert _steps(out / "history.csv") == [1, 2]


def test_a_loader_without_a_batch_is_refused():
    """drop_last with fewer images than a batch yields nothing: the engine refuses it, naming the batch."""
    loader = InMemoryLoader(torch.rand(5, 3, 8, 8), torch.zeros(5, dtype=torch.long), batch_size=8,
                            drop_last=True)  # fmt: skip
    assert len(loader) == 0
    with pytest.raises(ConfigError, match=r"no batch of train.batch_size=8.*lower train.batch_size"):
        run_epochs("train-classifier", ClassifierTrainer(tiny_trained_classifier()[0], epochs=2), loader,
                   batch_size=8, checkpoint=None, progress=False)  # fmt: skip


@pytest.mark.parametrize("name", ["guap", "sgd_uap", "uap"])
def test_universal_attacks_train_on_fewer_images_than_a_batch(name):
    """10 images, a batch of 30 (the paper's): every step or pass sees all 10, none is skipped."""
    clf, x, _ = tiny_trained_classifier()
    x = x[:10]
    seen = []
    kw = {"generator_options": {"ngf": 4, "n_blocks": 1}, "steps": 3, "batch_size": 30, "eval_every": 3}
    params = {
        "guap": kw,
        "sgd_uap": {"epochs": 2, "batch_size": 30},
        "uap": {"max_passes": 1, "batch_size": 30, "deepfool_steps": 5},
    }[name]
    attack = juap.create_attack(name, classifier=clf, norm="linf", eps=16, **params)
    n_hat = attack.fit(x, progress=False, callback=lambda *a, **k: seen.append(1))
    assert n_hat.abs().amax() > 0  # something was learned
    assert n_hat.abs().amax() <= 16 / 255 + 1e-6
    assert len(seen) == {"guap": 3, "sgd_uap": 2, "uap": 1}[name]  # one call per step / batch


@pytest.mark.parametrize("name", ["guap", "sgd_uap", "uap"])
def test_universal_attacks_refuse_empty_data(name):
    clf, _, _ = tiny_trained_classifier()
    attack = juap.create_attack(name, classifier=clf, norm="linf", eps=16)
    with pytest.raises(ConfigError, match="empty"):
        attack.fit(torch.rand(0, 3, 32, 32), progress=False)


def test_no_figures_from_no_images():
    """evaluate on empty data, and JAP on no images, refuse instead of returning a result without figures."""
    clf, _, _ = tiny_trained_classifier()
    empty = torch.rand(0, 3, 32, 32)
    with pytest.raises(ConfigError, match="no images"):
        juap.evaluate(clf, torch.zeros(3, 32, 32), empty)
    jap = juap.create_attack("jap", classifier=clf, interpreter=juap.create_interpreter("cam", clf), eps=10)
    with pytest.raises(ConfigError, match="no images"):
        jap(empty)
