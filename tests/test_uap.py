"""UAP (DeepFool-based): budget, range, fooling, ART's fooling-rate formula, and parity with ART."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import juap
from helpers import art_classifier, texture_classifier
from juap.attacks.uap import UAP
from juap.budget import perturbation_norm, project
from juap.runtime.loop import Checkpointing

# At 32x32, L_2 960 has the per-pixel RMS of L_inf ~17. Budgets where DeepFool-UAP fools this fixture on
# every draw: at L_inf 10 / L_2 600 it fooled 0.00-0.25 of the images depending on the fixture's seed
# (JUAP_TEST_SEED), so the checks below that need a fooled classifier flipped with the draw.
BUDGETS = {"linf": 24.0, "l2": 960.0}


@pytest.fixture(scope="module")
def setup():
    """A tiny classifier trained to well above chance, and 64 held-out images."""
    clf, x_test, _ = texture_classifier()
    return clf, x_test


def _fooled(clf, x, v) -> float:
    with torch.no_grad():
        return (clf((x + v).clamp(0, 1)).argmax(1) != clf(x).argmax(1)).float().mean().item()


def test_registered(setup):
    clf, _ = setup
    attack = juap.create_attack("uap", classifier=clf, norm="l2", eps=600, max_passes=2)
    assert isinstance(attack, UAP) and attack.max_passes == 2 and attack.overshoot == 0.02


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_budget_range_and_fooling(setup, norm):
    """Budget, valid images, the fooling rate it reports is the real one, it stops at its target, and it
    fools more than random noise on the boundary of the same ball. Measured over 7 draws x 2 CPU kernels:
    UAP 0.36-0.62 where the noise fools 0.03-0.25 (the smallest gap 0.25); asserted: the target 0.2 and
    a gap of 0.1."""
    clf, x = setup
    eps = BUDGETS[norm]
    attack = UAP(classifier=clf, norm=norm, eps=eps, max_passes=3, target_fooling_rate=0.2)
    v = attack.fit(x, progress=False)
    assert v.shape == x.shape[1:] and attack.perturbation is v
    assert perturbation_norm(v, norm) <= eps * (1 + 1e-5) + 1e-4
    x_adv = attack.perturb(x)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert attack.fooling_rate_ == pytest.approx(_fooled(clf, x, v))
    assert attack.fooling_rate_ >= 0.2 and attack.converged_  # stopped at the target
    assert 1 <= len(attack.history) <= 3 and attack.history[-1]["fooling_rate"] == attack.fooling_rate_
    noise = project(
        torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(0)) * 1e3, norm=norm, eps=eps
    )  # random noise on the boundary of the same ball
    assert attack.fooling_rate_ > _fooled(clf, x, noise) + 0.1


def test_loader_and_tensor_agree(setup):
    """A loader of (x, y) in the tensor's order gives the same perturbation as the tensor (seed=None)."""
    clf, x = setup
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(len(x))), batch_size=8)
    kw = {"classifier": clf, "norm": "linf", "eps": 10, "max_passes": 1, "seed": None}
    v_tensor = UAP(**kw).fit(x, progress=False)
    v_loader = UAP(**kw).fit(loader, progress=True)
    assert torch.allclose(v_tensor, v_loader, atol=1e-6)


def _art(clf, x, norm, eps, *, passes=1, deepfool_steps=5):
    pytest.importorskip("art")
    from art.attacks.evasion import UniversalPerturbation

    art_clf = art_classifier(clf, x.shape[1:])
    deepfool = {"epsilon": 0.02, "max_iter": deepfool_steps, "verbose": False}  # overshoot, iterations
    attack = UniversalPerturbation(
        art_clf,
        attacker="deepfool",
        attacker_params=deepfool,
        delta=0.0,
        max_iter=passes,
        eps=eps / 255,
        norm=np.inf if norm == "linf" else 2,
        verbose=False,
    )
    return art_clf, attack


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_at_least_arts_fooling_rate(setup, norm, monkeypatch):
    """Same 48 images in the same 4 orders (ART's per-pass shuffle is made the identity, ours runs with
    seed=None on the permuted images), same budget, 1 pass, same DeepFool settings (overshoot 0.02, 5
    iterations, top 10 classes); the mean fooling rate over the orders is compared.

    Slack 0.05: one pass's fooling rate of either method moves by +-0.1 with the order, and ours is not
    ART's trajectory (batched fold, overshoot at every DeepFool iteration), so the two agree on average,
    not per order: over 16 orders the mean difference (ours - ART) was -0.01 (L_inf) and -0.03 (L_2)
    here, +0.07 / +0.03 with 64 images and 10 DeepFool iterations, and ours is higher at the demo setting
    (benchmarks/bench_baselines.py). Here: -0.02 for both norms (ours with batch_size=1, the sequential
    algorithm, follows ART's trajectory almost image for image: -0.01). Those figures are of L_inf 10 /
    L_2 600; at today's L_inf 24 / L_2 960 the mean difference was +0.00 to +0.13 over 7 draws of the
    fixture, ART's mean fooling rate 0.23-0.54 (one order of one draw fooled 0.02, so the guard is on
    the mean)."""
    clf, x = setup
    x, eps = x[:48], BUDGETS[norm]
    import art.attacks.evasion.universal_perturbation as art_uap

    monkeypatch.setattr(art_uap.random, "sample", lambda population, k: list(population))
    orders = [torch.arange(len(x))] + [
        torch.randperm(len(x), generator=torch.Generator().manual_seed(s)) for s in range(3)
    ]
    ours, theirs = [], []
    for order in orders:
        attack = UAP(
            classifier=clf,
            norm=norm,
            eps=eps,
            max_passes=1,
            target_fooling_rate=1.0,
            deepfool_steps=5,
            seed=None,
        )
        attack.fit(x[order], progress=False)
        ours.append(attack.fooling_rate_)
        _, art_attack = _art(clf, x, norm, eps)
        art_attack.generate(x[order].numpy())
        theirs.append(art_attack.fooling_rate)
    assert np.mean(theirs) > 0.1  # a setting where the comparison means something
    assert np.mean(ours) >= np.mean(theirs) - 0.05, (ours, theirs)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fooling_rate_is_arts_formula(setup, norm):
    clf, x = setup
    eps = BUDGETS[norm]
    ours = UAP(classifier=clf, norm=norm, eps=eps, max_passes=1, target_fooling_rate=1.0)
    v = ours.fit(x, progress=False)
    art_clf, art_attack = _art(clf, x[:16], norm, eps)
    # ART's formula (UniversalPerturbation.generate) on our perturbation, with ART's own predict
    x_np, v_np = x.numpy(), v.numpy()[None]
    y_index = np.argmax(art_clf.predict(x_np), axis=1)
    y_adv = np.argmax(art_clf.predict(np.clip(x_np + v_np, 0.0, 1.0), batch_size=1), axis=1)
    assert ours.fooling_rate_ == np.sum(y_index != y_adv) / len(x_np) > 0
    # ... and ours on ART's perturbation gives ART's number
    art_attack.generate(x[:16].numpy())
    art_noise = torch.from_numpy(art_attack.noise[0])
    assert perturbation_norm(art_noise, norm) <= eps * (1 + 1e-5) + 1e-4
    assert ours.fooling_rate(x[:16], art_noise) == art_attack.fooling_rate


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_passes": 0}, "max_passes"),
        ({"deepfool_steps": 1.5}, "deepfool_steps"),
        ({"batch_size": True}, "batch_size"),
        ({"nb_grads": 1}, "nb_grads"),
        ({"target_fooling_rate": 1.5}, "target_fooling_rate"),
        ({"target_fooling_rate": 0}, "target_fooling_rate"),
        ({"overshoot": -0.1}, "overshoot"),
        ({"overshoot": float("inf")}, "overshoot"),
        ({"seed": 1.0}, "seed"),
        ({"norm": "l1"}, "norm"),
    ],
)
def test_bad_arguments_name_the_field(setup, kwargs, field):
    clf, _ = setup
    with pytest.raises(juap.ConfigError, match=field):
        UAP(classifier=clf, **kwargs)


def test_bad_data(setup):
    clf, x = setup
    with pytest.raises(juap.ConfigError, match="empty"):
        UAP(classifier=clf).fit([], progress=False)
    with pytest.raises(juap.ConfigError, match=r"\[0, 1\]"):
        UAP(classifier=clf).fit(x * 255, progress=False)
    with pytest.raises(RuntimeError, match="fit"):
        UAP(classifier=clf).perturb(x)


def test_resume_after_a_pass_gives_the_uninterrupted_perturbation(setup, tmp_path):
    """A run stopped after its first pass (checkpoint written) and resumed ends with exactly the v of an
    uninterrupted run, for a tensor and for a shuffled, seeded loader."""
    from juap.data import make_loader

    clf, x = setup
    kw = {"classifier": clf, "norm": "linf", "eps": 10, "target_fooling_rate": 1.0, "seed": 3}
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    for name, data in (
        ("tensor", lambda: x),
        ("loader", lambda: make_loader(dataset, batch_size=8, shuffle=True, seed=5)),
    ):
        whole = UAP(max_passes=3, **kw).fit(data(), progress=False)
        d = tmp_path / name
        first = UAP(max_passes=1, **kw)
        first.fit(data(), progress=False, checkpoint=Checkpointing(d))
        assert (d / "checkpoint.safetensors").is_file()
        resumed = _CountingUAP(max_passes=3, **kw)
        v = resumed.fit(data(), progress=False, checkpoint=Checkpointing(d, resume=True))
        assert torch.equal(v, whole), name
        assert [h["pass"] for h in resumed.history] == [1, 2, 3]
        assert resumed.passes_run == 2  # pass 1 came from the checkpoint, not run again
    with pytest.raises(juap.JuapError, match="eps"):
        UAP(max_passes=3, **{**kw, "eps": 12}).fit(
            x, progress=False, checkpoint=Checkpointing(tmp_path / "tensor", resume=True)
        )


class _CountingUAP(UAP):
    """Counts the passes it runs (each pass ends with one fooling-rate measurement)."""

    passes_run = 0

    def fooling_rate(self, data, v, benign=None):
        self.passes_run += 1
        return super().fooling_rate(data, v, benign)
