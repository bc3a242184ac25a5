"""SGD-UAP: budget and projection for both norms, parity with the public ``uap_sgd``, at least ART's UAPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import juap
from helpers import art_classifier, texture_classifier, textures
from juap.attacks.sgd_uap import SGDUAP
from juap.budget import perturbation_norm
from juap.runtime.loop import Checkpointing

BUDGETS = {"linf": 10.0, "l2": 600.0}  # at 32x32: L_2 600 has the per-pixel RMS of L_inf ~11


@pytest.fixture(scope="module")
def setup():
    clf, x_test, _ = texture_classifier()
    x_train, _ = textures(256, seed=2)
    return clf, x_train, x_test


def _fooled(clf, x, v) -> float:
    with torch.no_grad():
        return (clf((x + v).clamp(0, 1)).argmax(1) != clf(x).argmax(1)).float().mean().item()


def test_registered(setup):
    clf, _, _ = setup
    attack = juap.create_attack("sgd_uap", classifier=clf, norm="linf", eps=10, epochs=2)
    assert isinstance(attack, SGDUAP) and attack.epochs == 2 and attack.universal


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_budget_projection_and_fooling(setup, norm):
    """Every step is projected: the norm never exceeds the budget (and sits on its boundary at the end,
    where sign / normalised steps push it); the perturbation fools far more than noise of that norm."""
    clf, x_train, x_test = setup
    eps = BUDGETS[norm]
    seen = []  # the norm after every step, through the public callback
    attack = SGDUAP(classifier=clf, norm=norm, eps=eps, epochs=4, batch_size=32, step_size=0.5)
    v = attack.fit(
        x_train, progress=False, callback=lambda step, v: seen.append((step, perturbation_norm(v(), norm)))
    )
    assert v.shape == x_train.shape[1:] and attack.perturbation is v
    assert [k for k, _ in seen] == list(range(1, 4 * 8 + 1))  # 4 epochs of 8 batches
    assert max(n for _, n in seen) <= eps * (1 + 1e-5) + 1e-4
    assert perturbation_norm(v, norm) >= 0.9 * eps
    noise = torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
    noise = juap.budget.project(noise * 1e3, norm=norm, eps=eps)
    assert _fooled(clf, x_test, v) > _fooled(clf, x_test, noise) + 0.2
    x_adv = attack.perturb(x_test)
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def _public_uap_sgd(model, loader, nb_epoch, eps, beta=12.0, step_decay=0.8):
    """The public ``uap_sgd`` (kenny-co/sgd-uap-torch, attacks.py) restated on the CPU: sign of the
    batch-mean gradient of the beta-clipped CE, step ``eps * step_decay`` in every epoch, clamp to eps."""
    x0, _ = next(iter(loader))
    batch_delta = torch.zeros_like(x0)
    delta = batch_delta[0]
    batch_delta.requires_grad_()
    for _ in range(nb_epoch):
        eps_step = eps * step_decay
        for x, y in loader:
            out = model(torch.clamp(x + batch_delta, 0, 1))
            loss = torch.mean(torch.min(F.cross_entropy(out, y, reduction="none"), torch.tensor([beta])))
            loss.backward()
            delta = torch.clamp(delta + batch_delta.grad.mean(dim=0).sign() * eps_step, -eps, eps)
            batch_delta.data = delta.unsqueeze(0).repeat([len(x0), 1, 1, 1])
            batch_delta.grad.zero_()
    return delta.detach()


def test_matches_the_public_uap_sgd(setup):
    """Same loader (labels = the classifier's predictions, as juap attacks f(x)), 3 epochs, step 0.8 eps
    without decay (the public code's): the same perturbation."""
    clf, x_train, _ = setup
    with torch.no_grad():
        y = clf(x_train).argmax(1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y), batch_size=32)
    ref = _public_uap_sgd(clf, loader, 3, 10 / 255)
    attack = SGDUAP(classifier=clf, norm="linf", eps=10, epochs=3, step_size=0.8, decay=1.0, seed=None)
    v = attack.fit(loader, progress=False)
    assert torch.equal(v, ref)


@pytest.mark.parametrize("attacker", ["deepfool", "fgsm"])
def test_fools_at_least_arts_uap(setup, attacker):
    """On held-out images, SGD-UAP's perturbation (its defaults, 5 epochs) fools as many as ART's
    UniversalPerturbation with DeepFool or FGSM steps (2 passes) at the same L_inf budget, trained on
    the same images, within the noise of 64 images. Measured over 3 seeds x 3 draws x 3 CPU kernels:
    ours 0.41-0.48, ART 0.06-0.34, the smallest lead +0.06; so "at least ART's minus 0.1" (6 images,
    1.6 binomial sd) holds on any machine and still fails a broken SGD-UAP, which fools ~0."""
    pytest.importorskip("art")
    from art.attacks.evasion import UniversalPerturbation

    clf, x_train, x_test = setup
    x_train = x_train[:96]
    art_clf = art_classifier(clf, x_train.shape[1:])
    params = {"epsilon": 0.02, "max_iter": 5, "verbose": False} if attacker == "deepfool" else {}
    art = UniversalPerturbation(
        art_clf, attacker=attacker, attacker_params=params, delta=0.0, max_iter=2, eps=10 / 255, norm=np.inf
    )
    np.random.seed(0)
    art.generate(x_train.numpy())
    art_fr = _fooled(clf, x_test, torch.from_numpy(art.noise[0]))
    v = SGDUAP(classifier=clf, norm="linf", eps=10, epochs=5).fit(x_train, progress=False)
    ours = _fooled(clf, x_test, v)
    assert ours >= art_fr - 0.1, (ours, art_fr)
    assert ours > 0.3  # a setting where the comparison means something (measured 0.41-0.48)


def test_targeted_and_validation_selection(setup):
    clf, x_train, x_test = setup
    attack = SGDUAP(classifier=clf, norm="linf", eps=16, epochs=3, objective="targeted", target=1)
    v = attack.fit(x_train, val_data=x_test, progress=False)
    with torch.no_grad():
        hit = (clf((x_test + v).clamp(0, 1)).argmax(1) == 1).float().mean().item()
    assert hit > 0.6
    assert attack.fit_result.selected in (1, 2, 3)
    vals = [h["val_fooling_ratio"] for h in attack.history]
    assert attack.fooling_ratio(x_test, v) == pytest.approx(max(vals))


def test_resume_after_an_epoch_is_exact(setup, tmp_path):
    clf, x_train, _ = setup
    kw = {"classifier": clf, "norm": "l2", "eps": 600, "seed": 4}
    whole = SGDUAP(epochs=3, **kw).fit(x_train, progress=False)
    SGDUAP(epochs=1, **kw).fit(x_train, progress=False, checkpoint=Checkpointing(tmp_path))
    assert (tmp_path / "checkpoint.safetensors").is_file()
    resumed = SGDUAP(epochs=3, **kw)
    v = resumed.fit(x_train, progress=False, checkpoint=Checkpointing(tmp_path, resume=True))
    assert torch.equal(v, whole) and [h["epoch"] for h in resumed.history] == [1, 2, 3]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"epochs": 0}, "epochs"),
        ({"step_size": 0}, "step_size"),
        ({"decay": 1.5}, "decay"),
        ({"beta": -1}, "beta"),
        ({"objective": "least_likely"}, "objective"),
        ({"objective": "targeted", "target": 7}, "target"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_name_the_field(setup, kwargs, field):
    clf, _, _ = setup
    with pytest.raises(juap.ConfigError, match=field):
        SGDUAP(classifier=clf, **kwargs)
