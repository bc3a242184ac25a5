"""Detection of universal perturbations from attribution maps: ranking metrics, inspectors, the deployable
detector's train/test separation, and ``juap detect`` end to end."""

import itertools
import json

import pytest
import torch

import juap
from helpers import texture_classifier, textures
from juap import detection
from juap.commands import detect
from juap.commands.cli import main
from juap.commands.detect import DetectorSettings, detect_interpreter
from juap.detection import LogisticDetector, inspector_scores, map_features, split_images
from juap.errors import ConfigError
from juap.metrics import auroc, roc_curve, tpr_at_fpr


def pairwise_auroc(neg, pos):
    """The definition, pair by pair: P(pos > neg) + P(pos == neg) / 2."""
    wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos.tolist(), neg.tolist()))
    return wins / (len(pos) * len(neg))


def blobs(n, *, size=8, centres=None, width=0.06, seed=0):
    """Gaussian-blob maps (n, size, size) at the given (or random) centres in [0, 1]^2."""
    g = torch.Generator().manual_seed(seed)
    c = centres if centres is not None else 0.25 + 0.5 * torch.rand(n, 2, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    d2 = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2
    return torch.exp(-d2 / width) + 0.02 * torch.rand(n, size, size, generator=g), c


# -- AUROC and TPR -----------------------------------------------------------------------------------
def test_auroc_identical_scores_is_one_half_and_separated_is_one():
    s = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert auroc(s, s) == 0.5
    assert auroc(torch.zeros(7), torch.zeros(3)) == 0.5  # every pair tied
    assert auroc(torch.arange(10.0), torch.arange(10.0) + 100) == 1.0
    assert auroc(torch.arange(10.0) + 100, torch.arange(10.0)) == 0.0


def test_auroc_counts_ties_as_half_and_matches_the_pairwise_definition():
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])) == pytest.approx(3.5 / 4)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        neg = torch.randint(0, 6, (37,), generator=g).float()  # heavy ties
        pos = torch.randint(1, 8, (23,), generator=g).float()
        assert auroc(neg, pos) == pytest.approx(pairwise_auroc(neg, pos), abs=1e-12)


def test_auroc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(2)
    neg = torch.randint(0, 20, (200,), generator=g).float()
    pos = torch.randint(5, 25, (120,), generator=g).float()
    y = [0] * len(neg) + [1] * len(pos)
    ref = metrics.roc_auc_score(y, torch.cat([neg, pos]).numpy())
    assert auroc(neg, pos) == pytest.approx(ref, abs=1e-12)


def test_roc_curve_and_tpr_at_fpr():
    neg = torch.arange(100.0)  # 0..99
    pos = torch.arange(100.0) + 90  # 90..189: overlaps the top 10 negatives
    f, t = roc_curve(neg, pos)
    assert f[0] == 0 and t[0] == 0 and f[-1] == 1 and t[-1] == 1
    assert bool((f[1:] >= f[:-1]).all()) and bool((t[1:] >= t[:-1]).all())
    # At most 5% FPR: threshold >= 95, which flags the positives 95..189 = 95 of 100.
    assert tpr_at_fpr(neg, pos, 0.05) == pytest.approx(0.95)
    assert tpr_at_fpr(neg, neg + 1000, 0.0) == 1.0
    # Ties are flagged together: an all-tied score cannot reach 5% FPR with any positive.
    assert tpr_at_fpr(torch.zeros(10), torch.zeros(10), 0.05) == 0.0


def test_ranking_needs_both_classes():
    with pytest.raises(ConfigError, match="at least one benign and one adversarial"):
        auroc(torch.zeros(3), torch.zeros(0))
    with pytest.raises(ConfigError, match="finite"):
        auroc(torch.tensor([float("nan")]), torch.zeros(2))


# -- the reference inspector on constructed maps -----------------------------------------------------
def test_inspector_identical_maps_give_one_half_and_shifted_maps_give_near_one():
    benign, centres = blobs(200)
    control = benign + 0.02 * torch.rand(benign.shape, generator=torch.Generator().manual_seed(3))
    shifted, _ = blobs(200, centres=1 - centres + 0.3 * (centres > 0.5).float(), seed=4)
    ctrl = inspector_scores(benign, control)
    same = inspector_scores(benign, control.clone())  # the "adversarial" maps are the control maps
    moved = inspector_scores(benign, shifted)
    for name in detection.INSPECTORS:
        assert auroc(ctrl[name], same[name]) == 0.5
        assert auroc(ctrl[name], moved[name]) > 0.97, name
    assert float(inspector_scores(benign, benign)["inspector L1"].max()) == 0.0
    assert float(inspector_scores(benign, benign)["inspector 1-IoU"].max()) == 0.0


# -- the deployable detector -------------------------------------------------------------------------
def test_map_features_shapes_and_invariances():
    maps, _ = blobs(16)
    f = map_features(maps)
    assert f.shape == (16, len(detection.MAP_FEATURES)) and torch.isfinite(f).all()
    logits = torch.randn(16, 5)
    assert map_features(maps, logits).shape == (
        16,
        len(detection.MAP_FEATURES) + len(detection.CONF_FEATURES),
    )
    # Min-max normalised statistics do not change when a map is shifted by a constant; the scale feature does.
    g = map_features(maps + 3.0)
    assert torch.allclose(f[:, :-1], g[:, :-1], atol=1e-5)
    assert torch.isfinite(map_features(torch.zeros(2, 4, 4))).all()  # constant maps: no NaN


def test_logistic_detector_separates_shifted_maps_on_held_out_data_and_not_identical_ones():
    benign, _ = blobs(400, seed=5)
    diffuse, _ = blobs(400, width=0.5, seed=6)  # spread-out maps: a clear change
    twin, _ = blobs(400, seed=7)  # drawn like the benign maps: nothing to find
    fb, fd, ft = map_features(benign), map_features(diffuse), map_features(twin)
    tr, te = slice(0, 200), slice(200, 400)
    y = torch.cat([torch.zeros(200), torch.ones(200)])
    det = LogisticDetector().fit(torch.cat([fb[tr], fd[tr]]), y)
    assert auroc(det.score(fb[te]), det.score(fd[te])) > 0.97
    det = LogisticDetector().fit(torch.cat([fb[tr], ft[tr]]), y)
    assert abs(auroc(det.score(fb[te]), det.score(ft[te])) - 0.5) < 0.12


def test_logistic_detector_errors():
    with pytest.raises(ConfigError, match="not fitted"):
        LogisticDetector().score(torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="one class only"):
        LogisticDetector().fit(torch.randn(4, 3), torch.zeros(4))


def test_split_images_is_disjoint_complete_and_seeded():
    tr, te = split_images(101, 0.5, seed=3)
    assert not set(tr.tolist()) & set(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(101))
    assert abs(len(tr) - 50) <= 1
    again = split_images(101, 0.5, seed=3)
    assert torch.equal(again[0], tr) and torch.equal(again[1], te)
    assert not torch.equal(split_images(101, 0.5, seed=4)[0], tr)
    with pytest.raises(ConfigError):
        split_images(1, 0.5)


@pytest.fixture(scope="module")
def tiny():
    clf, _, _ = texture_classifier()
    x, _ = textures(96, seed=2)
    g = torch.Generator().manual_seed(0)
    strong = (torch.rand(3, 32, 32, generator=g) * 2 - 1).sign() * 40 / 255
    blocky = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=32)[0] * 2 - 1
    return clf, x, {"A": strong, "B": blocky * 40 / 255}


def test_deployable_detector_trains_on_train_images_only(tiny, monkeypatch):
    clf, x, perts = tiny
    cam = juap.create_interpreter("cam", clf)
    seen = []
    real_fit = LogisticDetector.fit

    def spy(self, features, labels):
        seen.append((features.clone(), labels.clone()))
        return real_fit(self, features, labels)

    monkeypatch.setattr(LogisticDetector, "fit", spy)
    settings = DetectorSettings(train_fraction=0.5, only_fooled=False)
    res = detect_interpreter(cam, x, perts, settings=settings, seed=1, interpreter_name="cam")
    tr, te = res["train_images"], res["test_images"]
    assert not set(tr.tolist()) & set(te.tolist()) and len(tr) + len(te) == len(x)

    logits, maps = detection.explain_all(cam, x)
    feats = {
        "map": map_features(maps),
        "map+conf": map_features(maps, logits),
    }
    adv = {k: detection.explain_all(cam, x, p) for k, p in perts.items()}
    # Two feature sets x (in-distribution + cross-attack) x two perturbations.
    assert len(seen) == 8
    for features, labels in seen:
        fs = "map" if features.shape[1] == len(detection.MAP_FEATURES) else "map+conf"
        benign = features[labels == 0]
        # the benign rows are exactly the training images' features, none from a held-out image
        assert torch.allclose(benign.float(), feats[fs][tr], atol=1e-5)
        pos = features[labels == 1].float()
        train_adv = torch.cat(
            [map_features(m, lg if fs == "map+conf" else None)[tr] for lg, m in adv.values()]
        )
        test_adv = torch.cat(
            [map_features(m, lg if fs == "map+conf" else None)[te] for lg, m in adv.values()]
        )
        for row in pos:  # every adversarial training row is an adversarial *training* image
            assert torch.isclose(train_adv, row, atol=1e-5).all(1).any()
            assert not torch.isclose(test_adv, row, atol=1e-6).all(1).any()

    rows = res["rows"]
    assert {r["detector"] for r in rows} == set(detect.DETECTOR_COLUMNS + detect.NOISE_COLUMNS)
    for r in rows:
        assert r["n_benign"] == len(te) and r["n_adversarial"] == len(te)  # only_fooled=False
        assert 0 <= r["auroc"] <= 1 and 0 <= r["tpr_at_fpr"] <= 1
        if r["setting"] == "cross-attack":
            assert r["attack"] not in r["trained_on"].split("+")


def test_only_fooled_counts_fooled_test_images(tiny):
    clf, x, perts = tiny
    cam = juap.create_interpreter("cam", clf)
    res = detect_interpreter(cam, x, {"A": perts["A"]}, settings=DetectorSettings(), seed=0)
    te = res["test_images"]
    with torch.no_grad():
        fooled = clf(juap.budget.apply_perturbation(x, perts["A"])).argmax(1) != clf(x).argmax(1)
    rows = {r["detector"]: r for r in res["rows"]}
    assert rows["inspector L1"]["n_adversarial"] == int(fooled[te].sum())
    assert rows["inspector L1"]["fooling_ratio"] == pytest.approx(float(fooled.float().mean()))
    assert "detector (map) cross" not in rows  # one perturbation: nothing else to train on
    assert rows["detector (map) noise"]["n_adversarial"] == len(te)  # every held-out image, shuffled
    res = detect_interpreter(cam, x, {"A": perts["A"]}, settings=DetectorSettings(control="none"), seed=0)
    rows = {r["detector"]: r for r in res["rows"]}
    assert "detector (map) noise" not in rows
    # With no control the inspector compares I(x) with itself: every benign score is 0.
    assert (
        rows["inspector L1"]["tpr_at_fpr"] == pytest.approx(1.0) or rows["inspector L1"]["n_adversarial"] == 0
    )


def test_demo_detection_appends_a_section_and_writes_figures(tmp_path, tiny):
    clf, x, perts = tiny
    interps = {"cam": juap.create_interpreter("cam", clf), "gradcam": juap.create_interpreter("gradcam", clf)}
    (tmp_path / "results.md").write_text("# juap demo results\n")
    out = detect.demo_detection(
        tmp_path,
        interps,
        {"UAP": perts["A"], "GUAP": perts["B"], "R-JUAP-cam": perts["B"] * 0.5},
        x[:40],
        class_names=["h", "v", "blob"],
        settings=DetectorSettings(figure_images=1),
    )
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# juap demo results") and "## Detection" in text and "| cam | JUAP |" in text
    assert "| gradcam | JUAP |" not in text  # no R-JUAP-gradcam perturbation: UAP and GUAP only
    for f in ("detection.csv", "detection.md", "roc.png", "fig1.png"):
        assert (tmp_path / f).is_file(), f
    assert {r["interpreter"] for r in out["rows"]} == {"cam", "gradcam"}


# -- juap detect end to end --------------------------------------------------------------------------
def test_cli_detect_writes_the_table(tmp_path, capsys, tiny):
    from juap.app.artifacts import save_perturbation

    clf, _, perts = tiny
    clf_path = tmp_path / "clf.safetensors"
    juap.save_classifier(clf, clf_path)
    save_perturbation(tmp_path / "a", perts["A"], attack="guap", norm="linf", eps=40)
    save_perturbation(tmp_path / "b", perts["B"], attack="juap", norm="linf", eps=40)
    out = tmp_path / "run"
    code = main(
        [
            "detect",
            "--out",
            str(out),
            "--no-progress",
            "-p",
            str(tmp_path / "a.safetensors"),
            "-p",
            f"mine={tmp_path / 'b.safetensors'}",
            "--set",
            f"classifier.weights={clf_path}",
            "--set",
            "data.num_images=96",
            "--set",
            "data.image_size=32",
            "--set",
            "data.num_classes=3",
            "--set",
            "data.train_fraction=0.2",
            "--set",
            "data.test_fraction=0.5",
            "--set",
            "evaluate.interpreters=[cam, pgc:gradcam++]",  # a peer's maps inspect too (evaluation only)
            "--set",
            "detect.only_fooled=false",
            "--set",
            "detect.figure_images=1",
        ]
    )
    cap = capsys.readouterr()
    stdout = cap.out
    assert code == 0, cap.err
    for f in ("detection.csv", "detection.md", "roc.png", "fig1.png", "metrics.json", "config.yaml"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["perturbations"] == ["GUAP", "mine"] and m["interpreters"] == ["cam", "pgc:gradcam++"]
    assert m["train_images"] + m["test_images"] == m["n_images"] == 48
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    csv = (out / "detection.csv").read_text().splitlines()
    assert len(csv) == 1 + 2 * 2 * (len(detect.DETECTOR_COLUMNS) + len(detect.NOISE_COLUMNS))
    assert "AUROC" in stdout and "mine" in (out / "detection.md").read_text()


def test_cli_detect_refuses_a_perturbation_of_another_size(tmp_path, capsys, tiny):
    from juap.app.artifacts import save_perturbation

    save_perturbation(tmp_path / "p", torch.zeros(3, 16, 16), attack="uap", norm="linf", eps=10)
    code = main(
        [
            "detect",
            "--out",
            str(tmp_path / "r"),
            "-p",
            str(tmp_path / "p.safetensors"),
            "--set",
            "data.image_size=32",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "16x16" in err and "data.image_size" in err
