"""PGD (L_inf and L_2): budget, range, success, targeted success, parity with torchattacks' PGD / PGDL2."""

from __future__ import annotations

import pytest
import torch

import juap
from helpers import texture_classifier
from juap.attacks.pgd import PGD
from juap.budget import perturbation_norm

BUDGETS = {"linf": 8.0, "l2": 300.0}  # L_2 300 at 32x32 ~ 2000 at 224x224 (same per-pixel RMS)


@pytest.fixture(scope="module")
def setup():
    """A tiny classifier trained to well above chance, and 64 held-out images."""
    return texture_classifier()


def _predict(clf, x):
    with torch.no_grad():
        return clf(x).argmax(1)


def test_registered_with_default_step_size(setup):
    clf, _, _ = setup
    attack = juap.create_attack("pgd", classifier=clf, norm="linf", eps=8, steps=10)
    assert isinstance(attack, PGD) and attack.step_size == pytest.approx(2.0)  # 2.5 * eps / steps


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_budget_range_and_success(setup, norm):
    clf, x, y = setup
    x_in = x.clone()
    torch.manual_seed(0)
    x_adv = PGD(classifier=clf, norm=norm, eps=BUDGETS[norm], steps=10)(x, y)
    assert torch.equal(x, x_in)  # the input is not modified
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    sizes = perturbation_norm(x_adv - x, norm)
    assert (sizes <= BUDGETS[norm] * (1 + 1e-5) + 1e-4).all(), sizes.max()
    assert (sizes > 0.5 * BUDGETS[norm]).all()  # it moves
    clean_acc = (_predict(clf, x) == y).float().mean()
    adv_acc = (_predict(clf, x_adv) == y).float().mean()
    assert adv_acc < clean_acc - 0.4, (clean_acc, adv_acc)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_targeted_hits_the_target(setup, norm):
    clf, x, _ = setup
    target = 1
    torch.manual_seed(0)
    x_adv = PGD(classifier=clf, norm=norm, eps=2 * BUDGETS[norm], steps=20, target=target)(x)
    others = _predict(clf, x) != target
    hit = (_predict(clf, x_adv)[others] == target).float().mean()
    assert hit > 0.8, hit  # chance: 1/3


def test_labels_default_to_the_prediction_and_seed_is_reproducible(setup):
    clf, x, _ = setup
    attack = PGD(classifier=clf, norm="linf", eps=8, steps=3, seed=7, use_labels=True)
    a, b = attack(x), attack(x, _predict(clf, x))
    assert torch.equal(a, b)
    wrong = (_predict(clf, x) + 1) % 3
    assert not torch.equal(attack(x, wrong), a)
    predicted = PGD(classifier=clf, norm="linf", eps=8, steps=3, seed=7, use_labels=False)
    assert torch.equal(predicted(x, wrong), a)
    no_start = PGD(classifier=clf, norm="l2", eps=300, steps=3, random_start=False)
    assert torch.equal(no_start(x), no_start(x))


def _torchattacks_pair(clf, norm, *, eps, steps, target=None):
    torchattacks = pytest.importorskip("torchattacks")
    step = 2.5 * eps / steps
    ours = PGD(
        classifier=clf, norm=norm, eps=eps, steps=steps, step_size=step, target=target, use_labels=True
    )
    cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    theirs = cls(clf, eps=eps / 255, alpha=step / 255, steps=steps, random_start=True)
    if target is not None:
        theirs.set_mode_targeted_by_function(
            lambda _images, labels: torch.full_like(labels, target), quiet=True
        )
    return ours, theirs


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("target", [None, 2])
def test_at_least_torchattacks_success(setup, norm, target):
    """Same model, images, eps, step size, steps and seed: torch's global RNG gives both the same random
    start, so the results agree to float rounding; one image of slack covers a rounding-level tie."""
    clf, x, y = setup
    ours, theirs = _torchattacks_pair(clf, norm, eps=BUDGETS[norm] / 2, steps=5, target=target)
    torch.manual_seed(1)
    x_ours = ours(x, y)
    torch.manual_seed(1)
    x_theirs = theirs(x, y)
    p_ours, p_theirs = _predict(clf, x_ours), _predict(clf, x_theirs)
    if target is None:
        win_ours, win_theirs = int((p_ours != y).sum()), int((p_theirs != y).sum())
    else:
        win_ours, win_theirs = int((p_ours == target).sum()), int((p_theirs == target).sum())
    assert 0 < win_theirs < len(x)  # a setting where the comparison means something
    assert win_ours >= win_theirs - 1, (win_ours, win_theirs)
    assert ((x_ours - x_theirs).abs() > 1e-4).float().mean() < 0.01  # the same iterates


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"step_size": -1.0}, "step_size"),
        ({"step_size": float("nan")}, "step_size"),
        ({"random_start": "yes"}, "random_start"),
        ({"use_labels": 1}, "use_labels"),
        ({"target": 3}, "target"),
        ({"target": True}, "target"),
        ({"seed": "0"}, "seed"),
        ({"norm": "l1"}, "norm"),
        ({"eps": -8}, "eps"),
    ],
)
def test_bad_arguments_name_the_field(setup, kwargs, field):
    clf, _, _ = setup
    with pytest.raises(juap.ConfigError, match=field):
        PGD(classifier=clf, **kwargs)


def test_bad_inputs(setup):
    clf, x, y = setup
    attack = PGD(classifier=clf, steps=1, use_labels=True)
    with pytest.raises(juap.ConfigError, match="labels"):
        attack(x, y[:3])
    with pytest.raises(juap.ConfigError, match=r"\[0, 1\]"):
        attack(x * 255)
    with pytest.raises(juap.ConfigError, match="Classifier"):
        PGD(classifier=torch.nn.Linear(2, 2))
