"""The RTS masking model (eq 12): shapes, gradients, frozen nets, loss, checkpoints, training, pointing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import juap
from helpers import one_thread  # noqa: F401  (autouse: one thread for this module)
from juap.commands.configs import ClassifierConfig
from juap.commands.train_rts import RTSTrainConfig, TrainRTSConfig, run_train_rts
from juap.data import DataConfig, load_splits
from juap.errors import CheckpointError, ConfigError
from juap.interpreters import make_surrogate
from juap.interpreters.rts import RTS, area, blend, fingerprint, gaussian_blur, load_rts, rts_loss, save_rts
from juap.interpreters.rts_training import evaluate_rts, train_rts
from juap.metrics import pointing_game
from juap.runtime.config import load_config

WIDTHS = (8, 16, 32)


def _toy_batch(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two classes on a noisy grey background: 0 = a fine checkerboard patch, 1 = a plain coloured patch.

    Returns images (n, 3, size, size), labels (n,) and the patches' boxes (n, 4). Blurring removes the
    checkerboard (class 0's only evidence), so a classifier trained on this is confident on x and not on
    blur(x) for class 0.
    """
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + 0.05 * torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % 2
    p = size // 4
    yy, xx = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    checker = (((yy // 2) + (xx // 2)) % 2).float()
    boxes = torch.zeros(n, 4, dtype=torch.long)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(0, size - p, (2,), generator=g))
        if y[i] == 0:
            x[i, :, r : r + p, c : c + p] = checker
        else:
            x[i, :, r : r + p, c : c + p] = torch.rand(3, 1, 1, generator=g)
        boxes[i] = torch.tensor([c, r, c + p, r + p])
    return x.clamp(0, 1), y, boxes


def _tiny_classifier(num_classes: int = 2, seed: int = 0) -> juap.Classifier:
    torch.manual_seed(seed)
    return juap.create_classifier("small_resnet", num_classes=num_classes, widths=WIDTHS).eval()


@pytest.fixture(scope="module")
def toy_clf() -> juap.Classifier:
    """A tiny small_resnet trained for a few seconds on the toy task (confident on clean images)."""
    clf = _tiny_classifier()
    x, y, _ = _toy_batch(128, seed=1)
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    clf.train()
    for step in range(40):
        idx = torch.arange(step * 32, step * 32 + 32) % 128
        loss = F.cross_entropy(clf(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    xt, yt, _ = _toy_batch(32, seed=2)
    with torch.no_grad():
        acc = (clf(xt).argmax(1) == yt).float().mean()
    assert acc > 0.9, f"toy classifier did not learn the toy task (accuracy {acc:.2f})"
    return clf


# -- the model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 96, 128])
def test_mask_shape_range_and_input_gradient(size):
    clf = _tiny_classifier(num_classes=4)
    rts = juap.create_interpreter("rts", clf)
    x = torch.rand(3, 3, size, size, requires_grad=True)
    masks = rts(x, torch.tensor([0, 3, 1]))
    assert masks.shape == (3, size // 4, size // 4)
    assert masks.min() >= 0 and masks.max() <= 1
    (masks * torch.rand_like(masks)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in clf.parameters())  # frozen: no gradient accumulates there


def test_classes_select_different_masks_and_none_means_predicted():
    clf = _tiny_classifier(num_classes=4)
    rts = RTS(clf)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits, masks = rts.explain(x)
        pred = clf(x).argmax(1)
        assert torch.allclose(masks, rts(x, pred))
        assert torch.allclose(masks, rts(x))
        other = (pred + 1) % 4
        assert not torch.allclose(rts(x, other), masks)
    with pytest.raises(ConfigError, match=r"\[0, 4\)"):
        rts(x, torch.tensor([0, 4]))


def test_explain_logits_equal_classifier_and_encode_shape():
    clf = _tiny_classifier(num_classes=3)
    rts = RTS(clf)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits, masks = rts.explain(x)
        assert torch.allclose(logits, clf(x), atol=1e-6)
        feats = rts.encode(x)
        assert feats.shape == (2, WIDTHS[-1], 8, 8)
        assert torch.equal(feats, clf.forward_features(x))
    assert rts.encoder_stride == 8 and rts.encoder_channels == WIDTHS[-1]


def test_frozen_networks_unchanged_and_decoder_learns_after_a_training_step(toy_clf):
    clf = juap.create_classifier("small_resnet", num_classes=2, widths=WIDTHS)
    clf.model.load_state_dict(toy_clf.model.state_dict())
    rts = RTS(clf.eval())
    assert all(not p.requires_grad for p in clf.parameters())
    assert all(p.requires_grad for p in rts.trainable_parameters())
    before_clf = {k: v.clone() for k, v in clf.state_dict().items()}  # params and BatchNorm statistics
    before_rts = {k: v.clone() for k, v in rts.trainable_state_dict().items()}
    x, y, _ = _toy_batch(16, seed=3)
    loader = [(x, y, 0)]
    train_rts(rts, loader, epochs=1, lr=1e-2, fake_label_prob=0.0, device=torch.device("cpu"), progress=False)
    assert not clf.training and not rts.training
    for k, v in clf.state_dict().items():
        assert torch.equal(v, before_clf[k]), f"frozen classifier tensor {k} changed"
    changed = [k for k, v in rts.trainable_state_dict().items() if not torch.equal(v, before_rts[k])]
    assert any(k.startswith("decoder.") for k in changed) and any(k.startswith("embedding") for k in changed)
    assert not any(k.startswith(("classifier.", "encoder_net.")) for k in rts.trainable_state_dict())


def test_train_mode_keeps_classifier_in_eval():
    clf = _tiny_classifier()
    rts = RTS(clf).train()
    assert rts.training and rts.decoder.training and not clf.training


def test_named_encoder_needs_weights_and_works_with_a_checkpoint(tmp_path):
    import torchvision

    clf = _tiny_classifier(num_classes=3)
    with pytest.raises(ConfigError, match="randomly initialised"):
        RTS(clf, encoder="resnet18")
    with pytest.raises(ConfigError, match="randomly initialised"):
        juap.create_interpreter("rts", clf, encoder="resnet18", encoder_weights=None)
    with pytest.raises(ConfigError, match="allowed"):
        RTS(clf, encoder="vgg16", encoder_weights="DEFAULT")
    with pytest.raises(ConfigError, match="named encoder"):
        RTS(clf, encoder_weights="IMAGENET1K_V1")
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # stands in for downloaded weights
    rts = RTS(clf, encoder="resnet18", encoder_weights=str(weights), width=16)
    assert rts.encoder_stride == 32 and rts.encoder_channels == 512
    assert all(not p.requires_grad for p in rts.encoder_net.parameters())
    x = torch.rand(1, 3, 224, 224, requires_grad=True)
    masks = rts(x, torch.tensor([2]))
    assert masks.shape == (1, 56, 56)
    masks.sum().backward()
    assert x.grad.abs().sum() > 0
    assert rts.encode(x).shape == (1, 512, 7, 7)
    with torch.no_grad():
        logits, _ = rts.explain(x)
        assert torch.allclose(logits, clf(x), atol=1e-6)
    # a checkpoint keeps the encoder's name and weights, and refuses other encoder weights
    path = save_rts(rts, tmp_path / "rts.safetensors")
    with torch.no_grad():
        assert torch.equal(load_rts(path, clf)(x, [2]), rts(x, [2]))
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(CheckpointError, match="encoder weights"):
        load_rts(path, clf, encoder_weights=str(other))


# -- eq 12 ---------------------------------------------------------------------------------------------


def test_rts_loss_parts_are_finite_and_behave(toy_clf):
    x, y, _ = _toy_batch(8, seed=4)
    zeros, ones = torch.zeros(8, 8, 8), torch.ones(8, 8, 8)
    _, p0 = rts_loss(toy_clf, x, zeros, y)
    _, p1 = rts_loss(toy_clf, x, ones, y)
    for parts in (p0, p1):
        assert all(torch.isfinite(v) for v in parts.values())
        assert set(parts) == {"tv", "area", "preserve", "destroy", "total"}
    assert p1["area"] > p0["area"]
    assert float(p1["area"]) == pytest.approx(1.0) and float(p0["area"]) == pytest.approx(0.0)
    assert float(p0["tv"]) == 0.0 and float(p1["tv"]) == 0.0
    # class 0's evidence (the checkerboard) is removed by the blur: keeping the image keeps the class
    k = y == 0
    _, q1 = rts_loss(toy_clf, x[k], ones[k], y[k])
    _, q0 = rts_loss(toy_clf, x[k], zeros[k], y[k])
    assert q1["preserve"] < q0["preserve"] - 0.5
    assert q1["destroy"] < q0["destroy"]  # M = 1 destroys everything: the blurred image, class lost
    noisy = torch.rand(8, 8, 8)
    _, pn = rts_loss(toy_clf, x, noisy, y)
    assert pn["tv"] > 0


def test_rts_loss_is_differentiable_wrt_mask_and_fake_labels_shrink_the_mask(toy_clf):
    x, y, _ = _toy_batch(4, seed=5)
    mask = torch.full((4, 8, 8), 0.5, requires_grad=True)
    loss, _ = rts_loss(toy_clf, x, mask, y)
    (grad,) = torch.autograd.grad(loss, mask)
    assert grad.abs().sum() > 0
    # a fake class (a wrong selector): -log(1 - f_c(Phi(x, M))) replaces -log f_c, no destruction term
    fake = (y + 1) % 2
    ones = torch.ones(4, 8, 8)
    _, as_real = rts_loss(toy_clf, x, ones, fake)
    _, as_fake = rts_loss(toy_clf, x, ones, fake, real=torch.zeros(4, dtype=torch.bool))
    with torch.no_grad():
        p_fake = torch.softmax(toy_clf(x), 1).gather(1, fake[:, None]).squeeze(1)
    assert float(as_real["preserve"]) == pytest.approx(float(-p_fake.log().mean()), rel=1e-4)
    assert float(as_fake["preserve"]) == pytest.approx(float(-torch.log1p(-p_fake).mean()), rel=1e-4)
    assert float(as_fake["destroy"]) == 0.0 and float(as_real["destroy"]) > 0


def test_blend_and_blur():
    x = torch.rand(2, 3, 32, 32)
    blurred = gaussian_blur(x, 2.0)
    assert blurred.shape == x.shape and blurred.std() < x.std()
    assert torch.allclose(gaussian_blur(torch.full_like(x, 0.3), 3.0), torch.full_like(x, 0.3), atol=1e-6)
    m = torch.ones(2, 8, 8)
    assert torch.allclose(blend(x, m, blurred), x) and torch.allclose(blend(x, 0 * m, blurred), blurred)
    assert area(torch.full((1, 4, 4), 0.25)).item() == pytest.approx(0.25)


# -- checkpoints ---------------------------------------------------------------------------------------


def test_save_load_round_trip_and_refusals(tmp_path, toy_clf):
    torch.manual_seed(0)
    rts = RTS(toy_clf, width=16, image_size=64)
    with torch.no_grad():  # make the decoder non-trivial (BatchNorm statistics included)
        for p in rts.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
        rts.bottleneck[1].running_mean.add_(0.3)
    path = save_rts(rts, tmp_path / "rts.safetensors")
    tensors, meta = juap.runtime.io.load_tensors(path)
    assert not any(k.startswith(("classifier.", "encoder_net.")) for k in tensors)
    assert meta["classifier_arch"] == "small_resnet" and meta["num_classes"] == 2
    assert meta["classifier_fingerprint"] == fingerprint(toy_clf) and meta["image_size"] == 64
    x = torch.rand(3, 3, 32, 32)
    loaded = juap.create_interpreter("rts", toy_clf, checkpoint=str(path))
    assert isinstance(loaded, RTS) and not loaded.training and loaded.width == 16
    assert loaded.checkpoint == str(path) and rts.checkpoint is None
    with torch.no_grad():
        assert torch.equal(loaded(x, [0, 1, 1]), rts.eval()(x, [0, 1, 1]))

    other = _tiny_classifier(num_classes=2, seed=7)  # same architecture, other weights
    with pytest.raises(CheckpointError, match="other weights"):
        load_rts(path, other)
    with pytest.raises(CheckpointError, match="3 classes"):
        load_rts(path, _tiny_classifier(num_classes=3))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_rts(tmp_path / "missing.safetensors", toy_clf)
    clf_ckpt = juap.save_classifier(toy_clf, tmp_path / "clf.safetensors")
    with pytest.raises(CheckpointError, match="not an RTS checkpoint"):
        load_rts(clf_ckpt, toy_clf)
    with pytest.raises(ConfigError, match="unknown option"):
        juap.create_interpreter("rts", toy_clf, checkpoint=str(path), width=8)
    # the same weights reloaded from disk, or the attack's smoothed-ReLU surrogate, are accepted
    assert isinstance(load_rts(path, juap.load_classifier(clf_ckpt)), RTS)
    on_surrogate = load_rts(path, make_surrogate(toy_clf))
    with torch.no_grad():
        assert torch.allclose(on_surrogate(x, [0, 1, 1]), loaded(x, [0, 1, 1]), atol=1e-6)


# -- training ------------------------------------------------------------------------------------------


def test_short_training_decreases_the_loss(toy_clf):
    torch.manual_seed(0)
    rts = RTS(toy_clf, width=16)
    x, y, _ = _toy_batch(64, seed=6)
    xe, ye, boxes = _toy_batch(32, seed=8)

    def held_out_loss() -> float:
        rts.eval()
        with torch.no_grad():
            return float(rts_loss(toy_clf, xe, rts(xe, ye), ye)[0])

    before = held_out_loss()
    loader = [(x[i : i + 16], y[i : i + 16], 0) for i in range(0, 64, 16)]
    m = train_rts(rts, loader, epochs=6, lr=5e-3, fake_label_prob=0.0, device="cpu", progress=False)
    after = held_out_loss()
    assert after < before - 0.1, (before, after)
    assert m["loss_history"][-1] < m["loss_history"][0]
    assert m["steps"] == 24 and m["epochs_done"] == 6 and not m["stopped_early"]
    assert set(m["train_loss"]) == {"total", "preserve", "destroy", "area", "tv"}


def test_training_stops_at_the_time_bound(toy_clf):
    rts = RTS(toy_clf, width=8)
    x, y, _ = _toy_batch(8, seed=9)
    m = train_rts(rts, [(x, y, 0)], epochs=50, max_minutes=1e-6, device=torch.device("cpu"), progress=False)
    assert m["stopped_early"] and m["steps"] <= 1


def test_train_rts_trains_the_masking_model_from_the_core_api_alone(toy_clf):
    """``train_rts`` (no command, no run folder): the masking model's tensors move, the classifier's (the
    encoder here) stay, keyword settings equal the command's config, and an unknown setting is refused."""
    x, y, _ = _toy_batch(16, seed=12)
    before_clf = {k: v.clone() for k, v in toy_clf.state_dict().items()}  # params and BatchNorm statistics

    def fresh() -> RTS:
        torch.manual_seed(3)
        return juap.create_interpreter("rts", toy_clf, width=8)

    rts = fresh()
    before = {k: v.clone() for k, v in rts.trainable_state_dict().items()}
    loader = [(x[:8], y[:8], 0), (x[8:], y[8:], 0)]
    m = train_rts(rts, loader, epochs=2, batch_size=8, lr=1e-2, progress=False)
    assert m["steps"] == 4 and m["epochs_done"] == 2 and len(m["loss_history"]) == 2
    assert not rts.training and not toy_clf.training
    for k, v in toy_clf.state_dict().items():
        assert torch.equal(v, before_clf[k]), f"frozen classifier tensor {k} changed"
    moved = [k for k, v in rts.trainable_state_dict().items() if not torch.equal(v, before[k])]
    for part in ("bottleneck.", "embedding.", "decoder."):
        assert any(k.startswith(part) for k in moved), (part, moved)

    twin = fresh()  # the same training through the command's config section: the same weights
    cfg = RTSTrainConfig(epochs=2, batch_size=8, lr=1e-2)
    train_rts(twin, loader, device=torch.device("cpu"), progress=False, **cfg.trainer_settings())
    assert all(torch.equal(v, twin.trainable_state_dict()[k]) for k, v in rts.trainable_state_dict().items())
    with pytest.raises(ConfigError, match="unknown settings \\['epoch'\\]"):
        train_rts(fresh(), [(x, y, 0)], epoch=2, progress=False)
    with pytest.raises(ConfigError, match="lr = 0.0"):
        train_rts(fresh(), [(x, y, 0)], lr=0.0, progress=False)


class _Gappy(torch.utils.data.Dataset):
    """Toy images with every third one unreadable (``None``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return None if i % 3 == 2 else (self.x[i], int(self.y[i]))


def test_evaluate_rts_counts_every_readable_image_once_whatever_the_batch_size(toy_clf):
    torch.manual_seed(0)
    rts = RTS(toy_clf, width=8)
    x, y, boxes = _toy_batch(20, seed=13)
    ds = _Gappy(x, y)
    box_of = {i: boxes[i].tolist() for i in range(0, 20, 2)}  # every other image has a box
    rng = torch.get_rng_state()
    runs = [
        evaluate_rts(rts, ds, device=torch.device("cpu"), batch_size=b, boxes=box_of) for b in (1, 4, 128)
    ]
    assert torch.equal(torch.get_rng_state(), rng)  # measuring draws nothing from the global RNG
    readable = [i for i in range(20) if i % 3 != 2]
    with torch.no_grad():
        logits, masks = rts.explain(x[readable])
    pred = logits.argmax(1)
    for r in runs:
        assert r["images"] == len(readable) and r["skipped"] == 20 - len(readable)
        assert r["pointing_images"] == sum(1 for i in readable if i in box_of)
        assert 0.0 <= r["pointing_top20"] <= 1.0
        assert r["classifier_accuracy"] == pytest.approx(float((pred == y[readable]).float().mean()))
        assert r["mean_mask_area"] == pytest.approx(float(masks.mean()), rel=1e-5)
        assert set(r["loss"]) == {"total", "preserve", "destroy", "area", "tv"}
        assert r["loss"]["total"] == pytest.approx(runs[-1]["loss"]["total"], rel=1e-5)
        assert r["pointing_top20"] == pytest.approx(runs[-1]["pointing_top20"])
    assert "pointing_top20" not in evaluate_rts(rts, ds, device=torch.device("cpu"))  # no boxes


# -- the pointing game ---------------------------------------------------------------------------------


def test_pointing_game():
    maps = torch.zeros(4, 10, 10)
    boxes = torch.tensor([[0, 0, 5, 5]] * 4)
    maps[0, 0:4, 0:5] = 1  # all of the top 20 pixels inside the box
    maps[1, 6:10, 5:10] = 1  # all outside
    maps[2, 0:2, 0:5] = 1  # top 20 = 10 inside (value 1) + 10 ties of 0 (outside or inside): >= half inside
    maps[2, 8:10, 5:10] = 1
    maps[3] = torch.rand(10, 10)
    maps[3, 0:5, 0:5] += 10
    assert pointing_game(maps[:2], boxes[:2]) == 0.5
    assert pointing_game(maps[2:3], boxes[2:3], top=0.2, inside=0.5) == 1.0
    assert pointing_game(maps[2:3], boxes[2:3], top=0.2, inside=0.6) == 0.0
    assert pointing_game(maps[3:], boxes[3:].tolist()) == 1.0
    assert pointing_game(maps[1:2], boxes[1:2], top=1.0, inside=0.25) == 1.0  # a quarter of the image
    assert pointing_game(maps[:0], boxes[:0]) == 0.0
    with pytest.raises(ValueError, match="boxes"):
        pointing_game(maps, boxes[:2])
    with pytest.raises(ConfigError):
        pointing_game(maps, boxes, top=0.0)


def test_trained_rts_points_at_the_toy_object(toy_clf):
    """After training on the toy task, the masks of class 0 images sit on the checkerboard."""
    torch.manual_seed(0)
    rts = RTS(toy_clf, width=16)
    x, y, _ = _toy_batch(64, seed=10)
    loader = [(x[i : i + 16], y[i : i + 16], 0) for i in range(0, 64, 16)]
    train_rts(rts, loader, epochs=8, lr=5e-3, fake_label_prob=0.0, device=torch.device("cpu"), progress=False)
    xe, ye, boxes = _toy_batch(32, seed=11)
    k = ye == 0
    with torch.no_grad():
        masks = juap.interpreters.upsample_maps(rts(xe[k], ye[k]), 32)
    assert pointing_game(masks, boxes[k], top=0.05) >= 0.7


# -- configs and the command ---------------------------------------------------------------------------


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="classifier.weights is required"):
        load_config(TrainRTSConfig)
    with pytest.raises(ConfigError, match="rts.encoder_weights"):
        load_config(TrainRTSConfig, overrides=["classifier.weights=c.safetensors", "rts.encoder=resnet50"])
    with pytest.raises(ConfigError, match="Did you mean 'train.area_weight'"):
        load_config(TrainRTSConfig, overrides=["classifier.weights=c.safetensors", "train.area_wieght=1"])
    with pytest.raises(ConfigError, match="fake_label_prob"):
        load_config(TrainRTSConfig, overrides=["classifier.weights=c.safetensors", "train.fake_label_prob=2"])
    cfg = load_config(
        TrainRTSConfig, overrides=["classifier.weights=c.safetensors", "train.epochs=2", "rts.width=32"]
    )
    assert cfg.train.epochs == 2 and cfg.rts.width == 32 and cfg.rts.encoder == "classifier"


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    """A 24-image, 32x32 synthetic data set and an (untrained) 6-class classifier checkpoint for it."""
    root = tmp_path_factory.mktemp("rts-data")
    data = DataConfig(root=str(root), image_size=32, num_images=24)
    splits = load_splits(data)
    clf = _tiny_classifier(num_classes=6)
    ckpt = juap.save_classifier(clf, root / "clf.safetensors", classes=splits.classes)
    return data, ckpt, splits.classes


def _cfg(data: DataConfig, weights: Path, name: str = "small_resnet") -> TrainRTSConfig:
    return TrainRTSConfig(
        data=data,
        classifier=ClassifierConfig(name=name, weights=str(weights)),
        train=RTSTrainConfig(epochs=1, batch_size=8),
        device="cpu",
    )


def test_run_train_rts_writes_a_loadable_checkpoint_and_metrics(tmp_path, tiny_synthetic):
    data, ckpt, classes = tiny_synthetic
    t0 = time.perf_counter()
    m = run_train_rts(_cfg(data, ckpt), tmp_path, progress=False)
    assert time.perf_counter() - t0 < 30
    for name in ("rts.safetensors", "metrics.json", "config.yaml", "split.json"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= saved["pointing_top20"] <= 1.0 and saved["pointing_images"] == m["test_images"] > 0
    assert 0.0 < saved["mean_mask_area"] < 1.0
    assert set(saved["test_loss"]) == {"total", "preserve", "destroy", "area", "tv"}
    assert saved["classes"] == list(classes) and saved["encoder"] == "classifier"
    clf = juap.load_classifier(ckpt)
    rts = juap.create_interpreter("rts", clf, checkpoint=str(tmp_path / "rts.safetensors"))
    assert rts(torch.rand(2, 3, 32, 32), [0, 5]).shape == (2, 8, 8)


def test_run_train_rts_refuses_a_mismatching_classifier(tmp_path, tiny_synthetic):
    data, ckpt, classes = tiny_synthetic
    with pytest.raises(CheckpointError, match="does not exist"):
        run_train_rts(_cfg(data, tmp_path / "nope.safetensors"), tmp_path / "a", progress=False)
    five = juap.save_classifier(_tiny_classifier(num_classes=5), tmp_path / "five.safetensors")
    with pytest.raises(CheckpointError, match="5 classes but the data has 6"):
        run_train_rts(_cfg(data, five), tmp_path / "b", progress=False)
    with pytest.raises(CheckpointError, match="saved for classifier 'small_resnet', not 'resnet18'"):
        run_train_rts(_cfg(data, ckpt, name="resnet18"), tmp_path / "c", progress=False)
    renamed = juap.save_classifier(
        _tiny_classifier(num_classes=6), tmp_path / "renamed.safetensors", classes=[f"c{i}" for i in range(6)]
    )
    with pytest.raises(CheckpointError, match="trained on classes"):
        run_train_rts(_cfg(data, renamed), tmp_path / "d", progress=False)
    assert not (tmp_path / "b" / "rts.safetensors").exists()


# -- the demo (slow) -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_rts_points_at_the_objects(tmp_path):
    """The demo classifier (as ``juap demo`` trains it) and an RTS with the default config: the masks point
    at the objects of the embedded data (pointing_top20 >= 0.8; the classifier's CAM gets about 0.9).

    Minutes on a CPU (the classifier is reused from $JUAP_CACHE when set)."""
    from juap.commands.demo_models import cached_demo_classifier
    from juap.commands.train_classifier import TrainClassifierConfig

    clf, splits, _, _ = cached_demo_classifier(TrainClassifierConfig(), progress=False)
    ckpt = juap.save_classifier(clf, tmp_path / "classifier.safetensors", classes=splits.classes)
    cfg = TrainRTSConfig(classifier=ClassifierConfig(weights=str(ckpt)), device="cpu")
    m = run_train_rts(cfg, tmp_path / "rts", progress=False)
    assert m["pointing_top20"] >= 0.8, m
    assert 0.05 < m["mean_mask_area"] < 0.5, m
