"""The adaptive attacker and `juap evade`: the detector term, mu = 0 as today's attack, the arms race's
bookkeeping and resume, and the errors a user meets. Mechanisms on a tiny model, seconds each."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import juap
from helpers import one_thread, run_cli, tiny_trained_classifier  # noqa: F401
from juap.app.artifacts import load_generator
from juap.attacks.parts import DetectorTerm, Selection
from juap.budget import apply_perturbation, scale_to_budget
from juap.commands import evade
from juap.commands.run import BudgetConfig
from juap.commands.shipped import CONFIG_DIR
from juap.errors import ConfigError
from juap.losses import evasion_loss
from juap.runtime.io import load_tensors, save_tensors

GEN = dict(steps=4, batch_size=16, eval_every=2, lr=2e-3, generator_options={"ngf": 8}, seed=1)


@pytest.fixture(scope="module")
def setup():
    clf, x, _ = tiny_trained_classifier()
    return clf, x, juap.create_interpreter("cam", clf)


def calibrated(kind, clf, interp, clean, adversarial, calibration):
    det = juap.create_detector(kind, classifier=clf, interpreter=interp)
    det.fit(clean, adversarial, seed=0)
    det.calibrate(calibration, fpr=0.05)
    return det


# -- the loss term -----------------------------------------------------------------------------------
def test_evasion_loss_is_a_smooth_hinge_over_the_chosen_images():
    s = torch.tensor([3.0, -3.0, 0.0])
    expected = torch.nn.functional.softplus((s - 1.0) / 2.0)
    assert torch.allclose(evasion_loss(s, 1.0, scale=2.0), expected.mean())
    assert torch.allclose(evasion_loss(s, 1.0, scale=0.5, temperature=4.0), expected.mean())
    only = torch.tensor([True, False, False])
    assert torch.allclose(evasion_loss(s, 1.0, scale=2.0, only=only), expected[0])
    assert evasion_loss(s, 1.0, only=torch.zeros(3, dtype=torch.bool)).item() == 0.0
    # a small temperature is close to max{s - t, 0} / (temperature * scale)
    assert abs(0.01 * evasion_loss(torch.tensor([3.0]), 1.0, temperature=0.01).item() - 2.0) < 1e-3
    with pytest.raises(ConfigError, match="temperature"):
        evasion_loss(s, 1.0, temperature=0.0)


def test_the_detector_term_needs_a_calibrated_detector_and_mu_needs_a_detector(setup):
    clf, x, cam = setup
    det = juap.create_detector("map", classifier=clf, interpreter=cam)
    det.fit(x[:40], (x[:40] + 0.2).clamp(0, 1))
    with pytest.raises(ConfigError, match="calibrat"):
        DetectorTerm(det, classifier=clf, interpreter=cam)
    with pytest.raises(ConfigError, match="detector="):
        juap.create_attack("juap", classifier=clf, interpreter=cam, mu=1.0, **GEN)
    with pytest.raises(ConfigError, match="evasion"):
        Selection.resolve("evasion", constrained=False, joint=True, adaptive=False)
    assert Selection.resolve("auto", constrained=False, joint=True, adaptive=True) == "evasion"


@pytest.mark.parametrize("interp_name", ["cam", "gradcam"])
def test_the_detector_term_has_a_gradient_in_the_perturbation(setup, interp_name):
    clf, x, _ = setup
    interp = juap.create_interpreter(interp_name, clf)
    pattern = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.3
    det = calibrated("map_conf", clf, interp, x[:60], apply_perturbation(x[:60], pattern), x[60:100])
    term = DetectorTerm(det, classifier=clf, interpreter=interp, temperature=1.0)
    n = pattern.clone().requires_grad_(True)
    xb = x[100:130]
    from juap.attacks.parts import InterpreterWiring, JointLoss

    loss = JointLoss(objective="untargeted")
    benign = loss.benign(xb, clf, interp)
    explainer = InterpreterWiring.check(interp).trainer(clf)
    adv = loss.adversarial(apply_perturbation(xb, n), benign, clf, explainer)
    # count every image as fooled so the term is not empty whatever the tiny model predicts
    benign = dataclasses.replace(benign, logits=-adv.logits.detach())
    value = term(benign, adv)
    (g,) = torch.autograd.grad(value, n)
    assert value.item() > 0 and g.abs().sum() > 0


# -- mu = 0 is today's attack ------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["juap", "guap"])
def test_mu_zero_gives_todays_attack_bitwise(setup, attack):
    clf, x, cam = setup
    det = calibrated("map", clf, cam, x[:60], (x[:60] * 0.6 + 0.3), x[60:100])
    interp = {"interpreter": cam} if attack == "juap" else {}
    torch.manual_seed(0)
    plain = juap.create_attack(attack, classifier=clf, eps=16, **interp, **GEN).fit(
        x[:64], val_data=x[64:96], progress=False
    )
    torch.manual_seed(0)
    a = juap.create_attack(attack, classifier=clf, eps=16, **interp, detector=det, mu=0.0, **GEN)
    with_det = a.fit(x[:64], val_data=x[64:96], progress=False)
    assert torch.equal(plain, with_det)
    assert not a.loss.terms  # no term at all
    assert "evasion_rate" in a.history[-1]["val"]  # validations report the evasion rate all the same


# -- mu > 0 lowers the detector's score ---------------------------------------------------------------
# the two detectors that flag the plain JUAP perturbation clearly on this tiny model (its 4x4 CAM maps
# leave the map statistics little to see), so that evading them has room: measured 3.7 and 4.5 clean
# standard deviations lower with mu = 10, against the 1 asserted
@pytest.mark.parametrize("kind", ["cnn", "hyperneuron"])
def test_an_adaptive_juap_scores_lower_on_a_frozen_detector(setup, kind):
    clf, x, cam = setup
    common = dict(classifier=clf, interpreter=cam, eps=24, steps=30, batch_size=16, eval_every=10, lr=3e-3,
                  objective="untargeted", generator_options={"ngf": 8}, seed=3)  # fmt: skip
    torch.manual_seed(0)
    n0 = juap.create_attack("juap", **common).fit(x[:64], val_data=x[64:96], progress=False)
    interp = cam if juap.DETECTORS.get(kind).needs_interpreter else None
    det = calibrated(kind, clf, interp, x[:80], apply_perturbation(x[:80], n0), x[80:120])
    torch.manual_seed(0)
    adaptive = juap.create_attack("juap", **common, detector=det, mu=10.0, detector_temperature=0.5)
    n1 = adaptive.fit(x[:64], val_data=x[64:96], progress=False)
    held_out = x[120:]
    with torch.no_grad():
        s0 = det.score(apply_perturbation(held_out, n0))
        s1 = det.score(apply_perturbation(held_out, n1))
        spread = det.score(held_out).std()
    assert "detector_loss" in adaptive.history[-1]
    assert s1.mean() < s0.mean() - spread, (s0.mean(), s1.mean(), spread)


# -- the experiment ---------------------------------------------------------------------------------
def tiny_config(tmp_path, clf, **evade_kw):
    weights = tmp_path / "clf.safetensors"
    if not weights.exists():
        juap.save_classifier(clf, weights)
    settings = dict(
        interpreters=("cam",),
        detectors=("map", "hyperneuron"),
        budgets=(BudgetConfig("linf", 10.0), BudgetConfig("linf", 24.0)),
        headline=BudgetConfig("linf", 10.0),
        rounds=2,
        sanity=("map",),
        batch_size=32,
    )
    settings.update(evade_kw)
    step = {"steps": 2, "batch_size": 8, "eval_every": 1, "generator_options": {"ngf": 8}}
    return evade.EvadeConfig(
        data=juap.commands.evade.DataConfig(
            num_images=200, image_size=32, num_classes=4, train_fraction=0.3, test_fraction=0.6
        ),
        classifier=juap.commands.evade.ClassifierConfig(name="small_resnet", weights=str(weights)),
        attack_params={
            "uap": {"max_passes": 1, "batch_size": 16},
            "sgd_uap": {"epochs": 1, "batch_size": 16},
            "guap": step,
            "juap": {**step, "objective": "untargeted"},
        },
        evade=evade.EvadeSettings(**settings),
        device="cpu",
    )


def test_the_arms_race_books_every_round_and_resumes_after_a_kill(setup, tmp_path, monkeypatch):
    clf, _, _ = setup
    cfg = tiny_config(tmp_path, clf)
    straight = tmp_path / "straight"
    straight.mkdir()
    res = evade.run_evade(cfg, straight, progress=False, say=lambda s: None)
    assert res["complete"] == res["cells"] == 2
    rows = res["rows"]
    head = [r for r in rows if r["eps"] == 10.0]
    other = [r for r in rows if r["eps"] == 24.0]
    # headline: 4 round-0 + 2 rounds x 2 detectors of adaptive JUAP + 3 sanity + noise; detectors r0..r2
    assert {r["detector_round"] for r in head} == {0, 1, 2}
    assert {r["detector_round"] for r in other} == {0, 1}
    perts = {r["perturbation"] for r in head}
    assert {"UAP", "SGD-UAP", "GUAP", "R-JUAP", "noise"} <= perts
    assert {"JUAP@map-r1", "JUAP@map-r2", "JUAP@hyperneuron-r1", "JUAP@hyperneuron-r2"} <= perts
    assert {"JUAP@map-r1-2x-steps", "JUAP@map-r1-half-steps", "JUAP@map-r1-restart"} <= perts
    assert len(head) == 6 * len(perts)  # every detector (2 kinds x 3 rounds) against every perturbation
    r1 = next(r for r in head if r["perturbation"] == "JUAP@map-r1" and r["detector_round"] == 0)
    assert r1["adaptive"] and r1["against"] == "map-r0" and r1["attack_round"] == 1
    for r in rows:
        assert 0.0 <= r["evasion_rate"] <= r["fooling_ratio"] + 1e-12
    for name in ("results.md", "evasion.csv", "evasion.json", "evasion_vs_budget.png", "rounds.png"):
        assert (straight / name).is_file(), name
    shared = {q.stem for q in (straight / "shared" / "linf10_s0").glob("*.safetensors")}
    assert shared == {"UAP", "SGD-UAP", "GUAP", "GUAP.generator"}  # once for every interpreter
    # the adaptive attacks start from round 0's trained generators, saved beside their perturbations:
    # the file's generator on its noise gives back the perturbation
    for folder, label in ((straight / "cells" / "cam_linf10_s0" / "perturbations", "R-JUAP"),
                          (straight / "shared" / "linf10_s0", "GUAP")):  # fmt: skip
        G, noise = load_generator(folder / f"{label}.generator.safetensors")
        with torch.no_grad():
            again = scale_to_budget(G(noise), norm="linf", eps=10.0)[0]
        saved = load_tensors(folder / f"{label}.safetensors")[0]["perturbation"]
        assert torch.allclose(again, saved, atol=1e-6)
    flags = json.loads((straight / "evasion.json").read_text())["flags"]
    checks = {f["check"] for f in flags}
    assert {"doubling the steps changes evasion little", "a restart changes evasion little"} <= checks
    assert all(f["status"] in ("ok", "CHECK") for f in flags)

    # killed after 6 fits, then run again: the saved perturbations and detectors are reused, and the
    # rows are those of the straight run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    real, calls = juap.create_attack, []

    def dying(*a, **k):
        calls.append(a[0])
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(juap, "create_attack", dying)
    with pytest.raises(KeyboardInterrupt):
        evade.run_evade(cfg, resumed, progress=False, say=lambda s: None)
    assert not (resumed / "cells" / "cam_linf10_s0" / "rows.json").exists()
    calls.clear()
    monkeypatch.setattr(juap, "create_attack", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    again = evade.run_evade(cfg, resumed, progress=False, say=lambda s: None)
    made = [
        *(straight / "cells").rglob("perturbations/*.safetensors"),
        *(straight / "shared").rglob("*.safetensors"),
    ]
    total = len([p for p in made if not p.name.endswith(".generator.safetensors")])
    assert len(calls) == total - 6
    assert again["rows"] == rows


def test_bad_experiment_settings_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="budgets is empty"):
        evade.EvadeSettings(budgets=())
    for fpr in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="fpr"):
            evade.EvadeSettings(fpr=fpr)
    with pytest.raises(ConfigError, match="headline"):
        evade.EvadeSettings(headline=BudgetConfig("linf", 7.0))
    with pytest.raises(juap.JuapError, match="Known detectors"):
        evade.EvadeSettings(detectors=("mapp",))
    with pytest.raises(ConfigError, match="adaptive_attacks"):
        evade.EvadeSettings(adaptive_attacks=("uap",))
    with pytest.raises(ConfigError, match="max_images"):  # at load time, not an hour into the run
        evade.load_evade_config("embedded/evasion.yaml", ["attack_params.uap={max_images: 64}"])
    with pytest.raises(ConfigError, match="unknown|not a field|evade.rounds"):
        evade.load_evade_config("embedded/evasion.yaml", ["evade.roundz=2"])


def test_a_calibration_split_too_small_for_the_fpr_says_how_many_images_it_needs(setup, tmp_path):
    clf, _, _ = setup
    cfg = tiny_config(tmp_path, clf, fpr=0.01)
    with pytest.raises(ConfigError, match="at least 100 clean calibration images"):
        evade.build_bench(cfg, tmp_path, progress=False)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*evasion*.yaml")), ids=lambda p: p.name)
def test_the_shipped_experiments_load_with_a_budget_sweep(path):
    cfg = evade.load_evade_config(path)
    s = cfg.evade
    assert s.headline in s.budgets and len({b.eps for b in s.budgets if b.norm == "linf"}) >= 4
    assert evade.plan_cells(s)[0].headline and set(s.detectors) == set(juap.list_detectors())


def test_juap_evade_lists_the_default_experiments_cells(capsys):
    code, out, _ = run_cli(capsys, "evade", "--list")
    assert code == 0 and "cam_linf10_s0" in out and "cam_l2571_s0" in out and "5 cells" in out


def test_the_detector_term_waits_for_its_warm_up_then_ramps_to_mu(setup):
    clf, x, cam = setup
    det = calibrated("map", clf, cam, x[:60], (x[:60] * 0.6 + 0.3), x[60:100])
    kw = dict(classifier=clf, interpreter=cam, detector=det, mu=2.0, steps=11, detector_warmup=5)
    ramp = juap.create_attack("juap", **kw, mu_schedule="ramp")
    assert [ramp.term_factor(i) for i in (1, 5)] == [0.0, 0.0]
    assert ramp.term_factor(6) == pytest.approx(1e-3) and ramp.term_factor(11) == pytest.approx(1.0)
    factors = [ramp.term_factor(i) for i in range(6, 12)]
    assert factors == sorted(factors)  # growing
    flat = juap.create_attack("juap", **kw)
    assert [flat.term_factor(i) for i in (5, 6, 11)] == [0.0, 1.0, 1.0]


def test_an_attack_given_a_trained_generator_starts_where_it_ended(setup, tmp_path):
    # juap evade's warm start: round 0's generator, saved and loaded again, handed to the adaptive attack
    clf, x, cam = setup
    first = juap.create_attack("juap", classifier=clf, interpreter=cam, eps=16, **GEN)
    n_first = first.fit(x[:64], val_data=x[64:96], progress=False)
    tensors, meta = first.generator_artifact()
    save_tensors(tmp_path / "g.safetensors", tensors, meta)
    G, noise = load_generator(tmp_path / "g.safetensors")
    assert torch.equal(noise, first.noise.cpu())
    # one step at a vanishing learning rate: the warm-started attack's perturbation is the first one's
    one_step = {**GEN, "steps": 1, "lr": 1e-9}
    warm = juap.create_attack("juap", classifier=clf, interpreter=cam, eps=16, **one_step, generator=G)
    n_warm = warm.fit(x[:64], val_data=x[64:96], progress=False)
    assert torch.allclose(n_warm, n_first, atol=1e-6)
    assert next(G.parameters()).requires_grad and warm.generator is not G  # a copy was trained
    cold = juap.create_attack("juap", classifier=clf, interpreter=cam, eps=16, **one_step)
    assert not torch.allclose(cold.fit(x[:64], val_data=x[64:96], progress=False), n_first, atol=1e-3)


def test_a_generator_file_that_is_not_one_is_refused(tmp_path):
    save_tensors(tmp_path / "p.safetensors", {"perturbation": torch.zeros(3, 8, 8)}, {})
    with pytest.raises(juap.JuapError, match="not a juap generator file"):
        load_generator(tmp_path / "p.safetensors")
