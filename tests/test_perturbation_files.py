"""Perturbation files one can hand to someone: the exact 8-bit PNG, the provenance they carry, and the
figures of a perturbation as it is applied to 8-bit images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import juap
from helpers import tiny_trained_classifier
from juap.app.artifacts import (
    check_made_for,
    load_perturbation,
    perturbation_provenance,
    read_perturbation_metadata,
    resize_perturbation,
    save_perturbation,
)
from juap.budget import apply_perturbation, perturbation_norm, quantize_8bit
from juap.commands.attack import measure_8bit
from juap.errors import CheckpointError
from juap.evaluation import evaluate


def _linf(eps: float, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, size, size, generator=g) * 2 - 1) * eps / 255


def test_the_png_round_trips_to_the_exact_8bit_values(tmp_path):
    n = _linf(10)
    save_perturbation(tmp_path / "p", n, attack="guap", norm="linf", eps=10, provenance={"seed": 3})
    q = quantize_8bit(n, norm="linf", eps=10)
    back = load_perturbation(tmp_path / "p.png")
    assert torch.equal(back, q)
    pixels = np.asarray(Image.open(tmp_path / "p.png"))
    assert np.array_equal(pixels.astype(int), (torch.round(q * 255) + 128).permute(1, 2, 0).int().numpy())
    meta = read_perturbation_metadata(tmp_path / "p.png")
    assert meta["exact"] and (meta["norm"], meta["eps"], meta["seed"]) == ("linf", 10, 3)
    assert torch.equal(load_perturbation(tmp_path / "p.safetensors"), n)  # the float one, untouched
    assert (tmp_path / "p_amplified.png").is_file()


@pytest.mark.parametrize("norm,eps", [("linf", 10), ("linf", 10.5), ("l2", 300.0)])
def test_quantising_keeps_the_budget_and_lands_on_whole_steps(norm, eps):
    n = _linf(40, size=24, seed=1)
    n = n * min(1.0, eps / float(perturbation_norm(n, norm)))  # on the budget's surface
    q = quantize_8bit(n, norm=norm, eps=eps)
    steps = q.double() * 255
    assert torch.allclose(steps, steps.round(), atol=1e-9)
    assert float(perturbation_norm(q, norm)) <= eps * (1 + 1e-6)
    assert float((steps - n.double() * 255).abs().max()) < 1.0  # at most one step from the float value
    if (norm, eps) == ("linf", 10):  # an integer L_inf budget: nearest rounding fits
        assert float((steps - n.double() * 255).abs().max()) <= 0.5 + 1e-9


def test_figures_as_applied_in_8_bits_are_those_of_the_rounded_perturbation():
    clf, x, y = tiny_trained_classifier()
    x8 = torch.round(x[:64] * 255) / 255  # images as decoded from 8-bit files
    n = _linf(24, size=x.shape[-1], seed=2)
    got = measure_8bit(clf, n, [(x8, y[:64])], {}, norm="linf", eps=24)
    by_hand = torch.round(n * 255) / 255
    want = evaluate(clf, by_hand, [(x8, y[:64])])
    assert got["fooling_ratio"] == want["fooling_ratio"]
    x_hat = apply_perturbation(x8, quantize_8bit(n, norm="linf", eps=24)) * 255
    assert torch.allclose(x_hat, x_hat.round(), atol=1e-4)  # an 8-bit image again


def test_a_picture_is_not_a_perturbation_file(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(CheckpointError, match="not a juap perturbation PNG"):
        load_perturbation(tmp_path / "grey.png")
    big = torch.zeros(3, 8, 8)
    big[0, 0, 0] = 200 / 255  # one value beyond +-127 steps: an L2 budget allows it
    save_perturbation(tmp_path / "big", big, attack="uap", norm="l2", eps=200)
    assert not read_perturbation_metadata(tmp_path / "big.png")["exact"]
    with pytest.raises(CheckpointError, match="load the .safetensors"):
        load_perturbation(tmp_path / "big.png")
    assert torch.equal(load_perturbation(tmp_path / "big.safetensors"), big)


def test_provenance_names_the_classifier_and_a_mismatch_warns(tmp_path):
    clf, _, _ = tiny_trained_classifier()
    prov = perturbation_provenance(clf, params={"steps": 4, "bad": object()}, seed=1, input_size=(32, 32))
    assert prov["classifier_arch"] == clf.arch and len(prov["classifier_fingerprint"]) == 16
    assert prov["params"] == {"steps": 4} and prov["input_size"] == [32, 32]
    assert len(prov["normalization"]["mean"]) == 3
    save_perturbation(tmp_path / "p", _linf(8, 32), attack="guap", norm="linf", eps=8, provenance=prov)
    meta = read_perturbation_metadata(tmp_path / "p.safetensors")
    check_made_for(meta, clf, "p")  # the same weights: silent
    other = tiny_trained_classifier(epochs=1)[0]
    with pytest.warns(UserWarning, match=r"made for classifier .* it is applied to"):
        check_made_for(meta, other, "p")
    assert json.loads(json.dumps(meta))  # plain JSON all through


def test_a_resized_perturbation_stays_in_its_budget():
    n = _linf(10, size=32, seed=3)
    for norm, eps in (("linf", 10.0), ("l2", 200.0)):
        r = resize_perturbation(n, (48, 48), norm=norm, eps=eps)
        assert r.shape == (3, 48, 48) and float(perturbation_norm(r, norm)) <= eps * (1 + 1e-5)


@pytest.mark.parametrize("attack", ["juap", "guap"])
def test_training_with_8bit_rounding_keeps_a_perturbation_on_whole_steps(attack):
    clf, x, _ = tiny_trained_classifier()
    common = dict(classifier=clf, eps=16, steps=4, batch_size=16, eval_every=2, lr=5e-3, seed=1,
                  generator_options={"ngf": 8}, objective="untargeted")  # fmt: skip
    if attack == "juap":
        common["interpreter"] = juap.create_interpreter("cam", clf)
    a = juap.create_attack(attack, **common, round_8bit=True)
    n = a.fit(x[:64], val_data=x[64:96], progress=False)
    steps = n.double() * 255
    assert torch.allclose(steps, steps.round(), atol=1e-4) and float(steps.abs().max()) <= 16 + 1e-4
    start = juap.create_attack(attack, **{**common, "steps": 1, "lr": 1e-12}, round_8bit=True)
    assert not torch.equal(start.fit(x[:64], val_data=x[64:96], progress=False), n)  # it learned


def test_training_through_transformations_reaches_the_generator(tmp_path):
    clf, x, _ = tiny_trained_classifier()
    common = dict(classifier=clf, eps=16, steps=3, batch_size=16, eval_every=3, lr=5e-3, seed=1,
                  generator_options={"ngf": 8}, objective="untargeted")  # fmt: skip
    a = juap.create_attack("guap", **common, eot=("jpeg:75", "resize:0.5", "random_crop:0.8", "blur:1"))
    before = [p.detach().clone() for p in a.make_generator().parameters()]
    torch.manual_seed(0)
    n = a.fit(x[:64], val_data=x[64:96], progress=False)
    after = list(a.generator.parameters())
    assert torch.isfinite(n).all() and any(not torch.equal(b, p) for b, p in zip(before, after, strict=True))
    jpeg_only = juap.create_attack("guap", **common, eot=["jpeg:50"])  # no gradient of its own: BPDA
    assert torch.isfinite(jpeg_only.fit(x[:64], progress=False)).all()
    assert [float(v) for v in jpeg_only.history[-1].values() if isinstance(v, float)]
    with pytest.raises(juap.JuapError, match="unknown transformation"):
        juap.create_attack("guap", **common, eot=("gzip:3",))
