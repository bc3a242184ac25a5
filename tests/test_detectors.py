"""The differentiable detectors (juap.detectors): conformance over every registered detector and the
interpreters CAM, Grad-CAM and RTS, today's map features reproduced, separation of an obvious case, the
threshold and evasion rate on hand-made scores, and save/load with its refusals."""

import copy
import math

import pytest
import torch

import juap
from helpers import one_thread, texture_classifier, textures  # noqa: F401  (one_thread: autouse fixture)
from juap.detection import map_features
from juap.errors import CheckpointError, ConfigError
from juap.interpreters.rts import RTS
from juap.interpreters.rts_training import train_rts
from juap.metrics import auroc, calibrate_threshold, evasion_rate, normalize_maps
from juap.runtime.io import save_tensors

INTERPRETERS = ("cam", "gradcam", "rts")


@pytest.fixture(scope="module")
def setup():
    """A tiny trained classifier, its three interpreters (a tiny trained RTS), clean images and the same
    images plus one large fixed sign pattern (an obvious "universal perturbation")."""
    clf, _, _ = texture_classifier()
    x, y = textures(96, seed=2)
    g = torch.Generator().manual_seed(0)
    pattern = (torch.rand(3, 32, 32, generator=g) * 2 - 1).sign() * 0.5
    adv = (x + pattern).clamp(0, 1)
    torch.manual_seed(0)
    rts = RTS(clf, width=8)
    batches = [(x[i : i + 16], y[i : i + 16], 0) for i in range(0, 96, 16)]
    train_rts(rts, batches, epochs=2, lr=1e-2, fake_label_prob=0.0, device="cpu", progress=False)
    interps = {
        "cam": juap.create_interpreter("cam", clf),
        "gradcam": juap.create_interpreter("gradcam", clf),
        "rts": rts.eval(),
    }
    return clf, interps, x, adv


def fitted(setup, name, interp="cam", **hp):
    clf, interps, x, adv = setup
    hp = {"steps": 10, **hp} if name == "cnn" else hp
    det = juap.create_detector(name, classifier=clf, interpreter=interps[interp], **hp)
    return det.fit(x[:48], adv[:48], seed=0)


# -- conformance -------------------------------------------------------------------------------------
def test_registry_and_declared_capabilities():
    assert juap.list_detectors() == ["cnn", "hyperneuron", "map", "map_conf"]
    for name in juap.list_detectors():
        cls = juap.DETECTORS.get(name)
        assert cls.name == name and cls.label
        assert cls.needs_interpreter == (name != "hyperneuron")


@pytest.mark.parametrize("interp", INTERPRETERS)
@pytest.mark.parametrize("name", ["map", "map_conf", "cnn", "hyperneuron"])
def test_score_is_finite_and_has_an_input_gradient(setup, name, interp):
    clf, interps, x, adv = setup
    det = fitted(setup, name, interp)
    xb = adv[:6].clone().requires_grad_(True)
    s = det.score(xb)
    assert s.shape == (6,) and s.dtype == torch.float32 and bool(torch.isfinite(s).all())
    assert torch.equal(det(xb).detach(), s.detach())  # forward = score
    (grad,) = torch.autograd.grad(s.sum(), xb)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 1e-6, (name, interp)


@pytest.mark.parametrize("interp", INTERPRETERS)
@pytest.mark.parametrize("name", ["map", "map_conf", "cnn"])
def test_gradients_flow_into_given_maps_and_logits(setup, name, interp):
    clf, interps, x, adv = setup
    det = fitted(setup, name, interp)
    with torch.no_grad():
        logits, maps = interps[interp].explain(adv[:6])
    logits, maps = logits.clone().requires_grad_(True), maps.clone().requires_grad_(True)
    s = det.score(adv[:6], logits=logits, maps=maps)
    with torch.no_grad():
        assert torch.allclose(s, det.score(adv[:6]), atol=1e-4)  # the given inputs are the ones it computes
    s.sum().backward()
    assert float(maps.grad.abs().sum()) > 1e-6
    if det.uses_logits:
        assert float(logits.grad.abs().sum()) > 1e-6
    else:
        assert logits.grad is None  # not read


def test_constant_maps_give_finite_gradients():
    maps = torch.zeros(3, 4, 4, requires_grad=True)
    juap.detectors.map_statistics(maps).sum().backward()
    assert bool(torch.isfinite(maps.grad).all())


# -- today's map features ----------------------------------------------------------------------------
def reference_map_features(maps, logits=None):
    """``juap.detection.map_features`` as it was before the detectors (commit 0bb64e9), kept verbatim."""
    maps = maps.detach().float()
    n, h, w = maps.shape
    m = normalize_maps(maps)
    flat = m.flatten(1)
    npix = flat.shape[1]
    total = flat.sum(1).clamp_min(1e-12)
    p = flat / total[:, None]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(max(npix, 2))
    desc = flat.sort(1, descending=True).values
    top = [desc[:, : max(1, round(npix * q))].sum(1) / total for q in (0.1, 0.3)]
    yy, xx = torch.meshgrid(
        (torch.arange(h, dtype=torch.float32) + 0.5) / h,
        (torch.arange(w, dtype=torch.float32) + 0.5) / w,
        indexing="ij",
    )
    yy, xx = yy.flatten(), xx.flatten()
    cy, cx = (p * yy).sum(1), (p * xx).sum(1)
    spread = ((p * ((yy - cy[:, None]) ** 2 + (xx - cx[:, None]) ** 2)).sum(1)).clamp_min(0).sqrt()
    center = ((cy - 0.5) ** 2 + (cx - 0.5) ** 2).sqrt()
    tv = torch.zeros(n)
    if w > 1:
        tv = tv + (m[:, :, 1:] - m[:, :, :-1]).abs().flatten(1).mean(1)
    if h > 1:
        tv = tv + (m[:, 1:, :] - m[:, :-1, :]).abs().flatten(1).mean(1)
    raw = maps.flatten(1)
    scale = torch.log1p((raw.amax(1) - raw.amin(1)).clamp_min(0))
    feats = [
        entropy,
        *top,
        flat.mean(1),
        flat.std(1) if npix > 1 else torch.zeros(n),
        spread,
        center,
        tv,
        scale,
    ]
    if logits is not None:
        logits = logits.detach().float()
        prob = logits.softmax(1)
        two = logits.topk(min(2, logits.shape[1]), dim=1).values
        ent = -(prob * prob.clamp_min(1e-12).log()).sum(1)
        feats += [prob.amax(1), two[:, 0] - two[:, -1], ent]
    return torch.stack(feats, 1)


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_differentiable_features_equal_todays_map_features(setup, interp):
    clf, interps, x, adv = setup
    with torch.no_grad():
        logits, maps = interps[interp].explain(torch.cat([x[:16], adv[:16]]))
    g = torch.Generator().manual_seed(1)
    extra = torch.rand(4, 7, 5, generator=g)
    extra[0] = 0.3  # a constant map
    for lg, mp in ((logits, maps), (torch.randn(4, 3, generator=g), extra)):
        ref = reference_map_features(mp, lg)
        ours = torch.cat([juap.detectors.map_statistics(mp), juap.detectors.confidence_statistics(lg)], 1)
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(map_features(mp, lg), ref, rtol=1e-5, atol=1e-6)  # juap detect's numbers
        assert torch.allclose(map_features(mp), ref[:, :9], rtol=1e-5, atol=1e-6)


def test_map_detectors_score_their_statistics(setup):
    clf, interps, x, adv = setup
    det = fitted(setup, "map_conf")
    with torch.no_grad():
        logits, maps = interps["cam"].explain(adv[:8])
        z = (map_features(maps, logits) - det.mean) / det.std
        assert torch.allclose(det.score(adv[:8]), z @ det.weight + det.bias, atol=1e-4)


# -- fitting -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["map", "map_conf", "cnn", "hyperneuron"])
def test_fit_separates_an_obvious_perturbation(setup, name):
    clf, interps, x, adv = setup
    hp = {"steps": 100} if name == "cnn" else {}
    det = juap.create_detector(name, classifier=clf, interpreter=interps["cam"], **hp).fit(x, adv, seed=0)
    assert auroc(det.scores(x), det.scores(adv)) > 0.8, (
        name
    )  # measured 0.92-1.0 (JUAP_TEST_SEED 0-5); chance: 0.5


def test_cnn_is_seeded_and_leaves_the_global_rng_alone(setup):
    state = torch.get_rng_state()
    a, b = fitted(setup, "cnn"), fitted(setup, "cnn")
    assert torch.equal(torch.get_rng_state(), state)
    x = setup[3][:8]
    assert torch.equal(a.scores(x), b.scores(x))
    clf, interps, xs, adv = setup
    c = juap.create_detector("cnn", classifier=clf, interpreter=interps["cam"], steps=10)
    assert not torch.equal(c.fit(xs[:48], adv[:48], seed=1).scores(x), a.scores(x))


@pytest.mark.parametrize("size", [64, 224])
def test_cnn_works_at_64_and_224_pixels(setup, size):
    clf, interps, _, _ = setup
    g = torch.Generator().manual_seed(size)
    x = torch.rand(4, 3, size, size, generator=g)
    det = juap.create_detector("cnn", classifier=clf, interpreter=interps["cam"], width=4, steps=5)
    det.fit(x[:2], x[2:], seed=0, batch_size=2)
    assert det.score(x).shape == (4,) and det.image_size == (size, size)


def test_bad_arguments_are_config_errors(setup):
    clf, interps, x, adv = setup
    with pytest.raises(ConfigError, match="takes no parameter 'widht'"):
        juap.create_detector("cnn", classifier=clf, interpreter=interps["cam"], widht=8)
    with pytest.raises(ConfigError, match="steps"):
        juap.create_detector("cnn", classifier=clf, interpreter=interps["cam"], steps=0)
    with pytest.raises(ConfigError, match="interpreter="):
        juap.create_detector("map", classifier=clf)
    assert juap.create_detector("hyperneuron", classifier=clf, interpreter=interps["cam"]).interpreter is None
    det = juap.create_detector("map", classifier=clf, interpreter=interps["cam"])
    with pytest.raises(ConfigError, match="not fitted"):
        det.score(x[:2])
    with pytest.raises(ConfigError, match="one class only"):
        det.fit(x[:4], x[:0])
    det.fit(x[:8], adv[:8])
    with pytest.raises(ConfigError, match="fitted on 32x32 images, got 16x16"):
        det.score(x[:2, :, :16, :16])
    with pytest.raises(ConfigError, match="maps must have shape"):
        det.score(x[:2], maps=torch.zeros(3, 4, 4))


# -- threshold and evasion rate ----------------------------------------------------------------------
def test_calibrate_threshold_on_hand_made_scores():
    scores = torch.arange(1.0, 101.0)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    assert calibrate_threshold(scores, 0.05) == 95.0  # 96..100 above: exactly 5 of 100
    assert calibrate_threshold(scores, 0.01) == 99.0
    assert calibrate_threshold(scores, 0.29) == 71.0  # floor(0.29 * 100) = 29, not 28 (float rounding)
    ties = torch.tensor([0.0] * 15 + [1.0] * 5)
    assert calibrate_threshold(ties, 0.05) == 1.0  # 0.0 would let 25% through: none above 1.0
    assert calibrate_threshold(ties, 0.25) == 0.0  # 5 of 20 above 0.0: exactly 25%
    assert calibrate_threshold([3.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.1) == 9.0


def test_calibrate_threshold_errors():
    with pytest.raises(ConfigError, match="needs at least 100 clean calibration images, got 99"):
        calibrate_threshold(torch.zeros(99), 0.01)
    with pytest.raises(ConfigError, match="needs at least 34 clean calibration images, got 33"):
        calibrate_threshold(torch.zeros(33), 0.03)
    assert calibrate_threshold(torch.zeros(34), 0.03) == 0.0
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="fpr"):
            calibrate_threshold(torch.zeros(1000), bad)
    with pytest.raises(ConfigError, match="finite"):
        calibrate_threshold(torch.tensor([float("nan")] * 20), 0.05)


def test_evasion_rate_on_hand_made_scores():
    fooled = torch.tensor([True, True, False, True, False])
    scores = torch.tensor([0.1, 0.9, 0.2, 0.5, 0.95])
    assert evasion_rate(fooled, scores, 0.5) == pytest.approx(2 / 5)  # images 0 and 3 (0.5 is not > 0.5)
    assert evasion_rate(fooled, scores, 1.0) == pytest.approx(3 / 5)
    assert evasion_rate(fooled, scores, 0.0) == 0.0
    with pytest.raises(ConfigError, match="calibrate"):
        evasion_rate(fooled, scores, float("nan"))
    with pytest.raises(ConfigError, match="5 flags and 4 scores"):
        evasion_rate(fooled, scores[:4], 0.5)


def test_calibrate_sets_the_threshold_and_flags_need_it(setup):
    clf, interps, x, adv = setup
    det = fitted(setup, "map")
    assert math.isnan(float(det.threshold)) and det.fpr is None
    with pytest.raises(ConfigError, match="calibrate"):
        det.flags(x[:4])
    clean = x[48:]
    t = det.calibrate(clean, fpr=0.05)
    assert t == calibrate_threshold(det.scores(clean), 0.05) == float(det.threshold) and det.fpr == 0.05
    assert float(det.flags(clean).float().mean()) <= 0.05
    with pytest.raises(ConfigError, match="needs at least 100"):
        det.calibrate(clean, fpr=0.01)
    det.fit(x[:48], adv[:48])
    assert math.isnan(float(det.threshold)) and det.fpr is None  # a new fit forgets the old threshold


# -- files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["map", "map_conf", "cnn", "hyperneuron"])
def test_save_load_round_trip(setup, name, tmp_path):
    clf, interps, x, adv = setup
    det = fitted(setup, name, "gradcam")
    det.calibrate(x[48:], fpr=0.1)
    path = det.save(tmp_path / "det.safetensors")
    back = juap.load_detector(
        path, clf, interps["gradcam"] if det.needs_interpreter else None, image_size=(32, 32)
    )
    assert type(back) is type(det) and back.hparams == det.hparams
    assert float(back.threshold) == float(det.threshold) and back.fpr == 0.1 and back.image_size == (32, 32)
    assert torch.equal(back.scores(adv[:8]), det.scores(adv[:8]))
    assert torch.equal(back.flags(adv[:8]), det.flags(adv[:8]))


def test_load_refuses_what_does_not_fit(setup, tmp_path):
    clf, interps, x, adv = setup
    path = fitted(setup, "map").save(tmp_path / "map.safetensors")
    other = copy.deepcopy(clf)
    with torch.no_grad():
        other.fc.weight[0, 0] += 0.1
    with pytest.raises(CheckpointError, match="other weights"):
        juap.load_detector(path, other, juap.create_interpreter("cam", other))
    with pytest.raises(CheckpointError, match="fitted on 'cam' maps, not 'gradcam'"):
        juap.load_detector(path, clf, interps["gradcam"])
    with pytest.raises(CheckpointError, match="pass interpreter="):
        juap.load_detector(path, clf)
    with pytest.raises(CheckpointError, match="fitted on 32x32 images, not 64x64"):
        juap.load_detector(path, clf, interps["cam"], image_size=(64, 64))
    two = juap.create_classifier("small_resnet", num_classes=2, widths=(8, 16, 32))
    with pytest.raises(CheckpointError, match="with 3 classes"):
        juap.load_detector(path, two, juap.create_interpreter("cam", two))
    not_a_detector = save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {"format": "other"})
    with pytest.raises(CheckpointError, match="not a juap detector file"):
        juap.load_detector(not_a_detector, clf, interps["cam"])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a juap detector file"):
        juap.load_detector(tmp_path / "notes.txt", clf, interps["cam"])
    with pytest.raises(CheckpointError, match="does not exist"):
        juap.load_detector(tmp_path / "missing.safetensors", clf, interps["cam"])
