"""The demo models shipped inside the package: loaded (hash checked) instead of trained on each machine."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import juap
from juap.commands import demo_models as dm
from juap.commands.demo_models import (
    RTS_EPOCHS,
    SHIPPED_DIR,
    classifier_key,
    demo_classifier,
    demo_classifier_path,
    read_manifest,
    rts_key,
    sha256_of,
    shipped_model,
)
from juap.commands.train_classifier import TrainClassifierConfig
from juap.errors import CheckpointError


def test_the_shipped_models_match_their_manifest_and_load():
    models = read_manifest()["models"]
    assert set(models) == {"classifier", "rts"}
    for entry in models.values():
        path = SHIPPED_DIR / entry["file"]
        assert sha256_of(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
        assert entry["command"].startswith("juap train-")
    # the demo's default configs are the shipped models' (a refactor that changes their key would make
    # every newcomer's demo train them again)
    ccfg = TrainClassifierConfig()
    clf_model = shipped_model("classifier", classifier_key(ccfg))
    rts_model = shipped_model("rts", rts_key(ccfg, RTS_EPOCHS))
    assert clf_model is not None and rts_model is not None and clf_model.source == "shipped"
    clf = juap.load_classifier(clf_model.path).eval()
    rts = juap.create_interpreter("rts", clf, checkpoint=str(rts_model.path))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps = rts(x, clf(x).argmax(1))
    assert clf.num_classes == 6 and maps.shape[0] == 2 and torch.isfinite(maps).all()


def test_the_demo_models_come_from_the_package_without_training(tmp_path, monkeypatch):
    """What ``weights: demo`` / ``checkpoints: {rts: demo}`` resolve to: the shipped files, nothing trained
    and nothing written to the cache."""

    def never(*args, **kwargs):
        raise AssertionError("the demo models were trained")

    monkeypatch.setattr(dm, "train_on_splits", never)
    monkeypatch.setattr(dm, "run_train_rts", never)
    dm._demo_models.cache_clear()
    clf, rts = dm.demo_models(cache_dir=tmp_path, progress=False)
    assert Path(clf).parent == SHIPPED_DIR and Path(rts).parent == SHIPPED_DIR
    assert dm.demo_models(cache_dir=tmp_path, learned=False, progress=False) == (clf, None)
    assert not any(tmp_path.iterdir())
    dm._demo_models.cache_clear()


@pytest.mark.parametrize("kind", ["classifier", "rts"])
def test_a_damaged_or_missing_shipped_model_is_a_clear_error(tmp_path, kind):
    folder = tmp_path / "demo"
    shutil.copytree(SHIPPED_DIR, folder)
    entry = read_manifest(folder)["models"][kind]
    path = folder / entry["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged: its sha256 is .* demo\.retrain=true"):
        shipped_model(kind, entry["key"], folder=folder)
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        shipped_model(kind, entry["key"], folder=folder)


def test_retrain_and_other_configs_use_the_cache(tmp_path):
    """``demo.retrain`` (or a config other than the shipped models') reads and trains the cache's."""
    ccfg = TrainClassifierConfig()
    ckpt = demo_classifier_path(ccfg, tmp_path)
    ckpt.parent.mkdir(parents=True)
    shutil.copyfile(SHIPPED_DIR / read_manifest()["models"]["classifier"]["file"], ckpt)
    ckpt.with_suffix(".json").write_text(json.dumps({"test_accuracy": 0.5}))
    model = demo_classifier(ccfg, cache_dir=tmp_path, retrain=True, progress=False)
    assert (model.path, model.source, model.metrics) == (ckpt, "cache", {"test_accuracy": 0.5})
    assert demo_classifier(ccfg, cache_dir=tmp_path, progress=False).source == "shipped"
    other = dataclasses.replace(ccfg, seed=1)
    assert shipped_model("classifier", classifier_key(other)) is None
    assert shipped_model("rts", rts_key(ccfg, RTS_EPOCHS + 1)) is None
