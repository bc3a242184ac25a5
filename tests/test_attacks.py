"""Every attack on a tiny trained model: budgets held, images valid, the classifier fooled, maps kept."""

import pytest
import torch

import juap
from helpers import tiny_trained_classifier
from juap.budget import perturbation_norm
from juap.evaluation import evaluate
from juap.metrics import MetricSums

FAST = {
    "steps": 40,
    "batch_size": 32,
    "lr": 1e-3,
    "eval_every": 20,
    "generator_options": {"ngf": 8, "n_blocks": 2},
}


@pytest.fixture(scope="module")
def model():
    clf, x, y = tiny_trained_classifier()
    acc = (clf(x).argmax(1) == y).float().mean().item()
    assert acc > 0.4, f"the fixture classifier must be well above chance (0.25), got {acc:.2f}"
    return clf, x, y


@pytest.mark.parametrize("norm,eps", [("linf", 16.0), ("l2", 400.0)])
@pytest.mark.parametrize("name", ["guap", "juap"])
def test_generator_attacks_hold_budget_and_fool(model, name, norm, eps):
    clf, x, y = model
    kw = dict(FAST)
    if name == "juap":
        kw.update(interpreter=juap.create_interpreter("cam", clf), lam=0.1)
    attack = juap.create_attack(name, classifier=clf, norm=norm, eps=eps, **kw)
    n_hat = attack.fit(x, progress=False)
    assert n_hat.shape == (3, 32, 32)
    assert float(perturbation_norm(n_hat, norm)) <= eps * (1 + 1e-5)
    x_adv = attack.perturb(x)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    fr = evaluate(clf, n_hat, x)["fooling_ratio"]
    assert fr > 0.2, f"{name} {norm}: fooling ratio {fr:.2f}"


def test_gradients_reach_every_generator_parameter(model):
    clf, x, _ = model
    cam = juap.create_interpreter("gradcam", clf)
    attack = juap.create_attack(
        "juap", classifier=clf, interpreter=cam, norm="linf", eps=10, **dict(FAST, steps=1, eval_every=1)
    )
    G = attack.make_generator().train()
    attack.noise = torch.rand(1, 3, 32, 32)
    opt = torch.optim.SGD(G.parameters(), lr=0.0)
    attack.train_step(G, opt, x[:8], attack.interpreter)
    missing = [n for n, p in G.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


def test_guap_targeted_hits_target_more_than_chance(model):
    clf, x, _ = model
    target = 2
    attack = juap.create_attack("guap_ct", classifier=clf, norm="linf", eps=24, target=target, **FAST)
    n_hat = attack.fit(x, progress=False)
    m = evaluate(clf, n_hat, x, target=target)
    assert m["target_success_rate"] > 0.5, m


def test_a_strong_map_term_keeps_the_maps_where_guap_moves_them(model):
    """The map term's mechanism, not the headline: with lambda 2 (so strong it fools almost nothing) the
    maps stay near the benign ones, where GUAP's perturbation from the same seed moves them. Measured
    over 3 attack seeds x 3 draws x 3 CPU kernels: IoU 0.88-0.96 vs 0.33-0.39, L1 0.02-0.04 vs
    0.24-0.28; the asserted gaps (0.3 and 0.1) are far inside them. Whether JUAP keeps GUAP's fooling
    ratio *and* the maps is a trained figure: benchmarks/bench_claims.py measures it with seeds."""
    clf, x, _ = model
    cam = juap.create_interpreter("cam", clf)
    common = dict(FAST, steps=60, seed=1)
    guap = juap.create_attack("guap", classifier=clf, norm="linf", eps=16, **common)
    juap_ = juap.create_attack(
        "juap", classifier=clf, interpreter=cam, norm="linf", eps=16, lam=2.0, **common
    )
    mg = evaluate(clf, guap.fit(x, progress=False), x, interpreters={"cam": cam})
    mj = evaluate(clf, juap_.fit(x, progress=False), x, interpreters={"cam": cam})
    assert mj["interpreters"]["cam"]["l1"] < mg["interpreters"]["cam"]["l1"] - 0.1, (mj, mg)
    assert mj["interpreters"]["cam"]["iou"] > mg["interpreters"]["cam"]["iou"] + 0.3, (mj, mg)


@pytest.mark.parametrize(
    "interp,norm,eps", [(None, "linf", 16), ("cam", "linf", 16), ("gradcam", "linf", 16), ("cam", "l2", 400)]
)
def test_jap_per_image(model, interp, norm, eps):
    clf, x, _ = model
    it = juap.create_interpreter(interp, clf) if interp else None
    jap = juap.create_attack("jap", classifier=clf, interpreter=it, norm=norm, eps=eps, steps=15, lr=1e-2)
    xs = x[:12]
    x_adv = jap(xs)
    assert (perturbation_norm(x_adv - xs, norm) <= eps * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    fooled = (clf(x_adv).argmax(1) != clf(xs).argmax(1)).float().mean()
    assert fooled > 0.3


def test_metrics_by_construction():
    maps = torch.rand(4, 8, 8)
    s = MetricSums()
    s.update_maps(maps, maps.clone())
    out = s.summary()
    assert out["l1"] == 0 and abs(out["iou"] - 1) < 1e-6
    assert 0.05 < out["random_iou"] < 0.35  # top-k IoU of independent random maps
    s2 = MetricSums()
    s2.update_maps(maps, -maps)  # reversed ranking: top 10..50% never overlap
    assert s2.summary()["iou"] == 0
    logits = torch.eye(3)[[0, 1, 2, 0]]
    s3 = MetricSums()
    s3.update_predictions(logits, torch.eye(3)[[1, 1, 2, 2]], labels=torch.tensor([0, 1, 2, 1]))
    r = s3.summary()
    assert r["fooling_ratio"] == 0.5 and r["clean_accuracy"] == 0.75 and r["adversarial_accuracy"] == 0.5


def test_fooled_only_map_metrics_split_the_mean():
    """Maps of fooled images are also averaged apart: kept maps of unfooled images must not hide changed
    maps of fooled ones."""
    maps = torch.rand(4, 8, 8)
    adv = torch.stack([maps[0], maps[1], -maps[2], -maps[3]])  # the last two maps turned upside down
    s = MetricSums()
    s.update_maps(maps, adv, fooled=torch.tensor([False, False, True, True]))
    out = s.summary()
    assert out["iou"] == pytest.approx(0.5) and out["iou_fooled"] == 0 and out["n_fooled"] == 2
    assert out["l1_fooled"] == pytest.approx(2 * out["l1"])
    s = MetricSums()
    s.update_maps(maps, adv, fooled=torch.zeros(4, dtype=torch.bool))
    assert s.summary()["iou_fooled"] is None  # nothing fooled: undefined, not 0


def test_bad_input_errors(model):
    clf, x, _ = model
    with pytest.raises(juap.ConfigError, match="positive finite"):
        juap.create_attack("guap", classifier=clf, norm="linf", eps=0)
    with pytest.raises(juap.ConfigError, match="linf, l2"):
        juap.create_attack("guap", classifier=clf, norm="l3", eps=10)
    with pytest.raises(juap.JuapError, match="Known attacks: .*guap.*juap"):
        juap.create_attack("juapp", classifier=clf)
    with pytest.raises(juap.JuapError, match="Known generators: resnet, unet"):
        juap.create_attack("guap", classifier=clf, generator="resnt")
    with pytest.raises(juap.JuapError, match="Known interpreters"):
        juap.create_interpreter("gradcamm", clf)
    with pytest.raises(juap.ConfigError, match="target class 9 is out of range"):
        juap.create_attack("guap_ct", classifier=clf, target=9)
    with pytest.raises(juap.ConfigError, match="lam"):
        juap.create_attack("juap", classifier=clf, interpreter=juap.create_interpreter("cam", clf), lam=-1)
    with pytest.raises(juap.ConfigError, match="does not fit images"):
        evaluate(clf, torch.zeros(3, 64, 64), x)


def test_juap_against_rts_uses_the_encoder_loss(model, tmp_path):
    from juap.interpreters.rts import save_rts

    clf, x, _ = model
    with pytest.raises(juap.ConfigError, match="untrained"):
        juap.create_attack("juap", classifier=clf, interpreter=juap.create_interpreter("rts", clf))
    save_rts(juap.create_interpreter("rts", clf), tmp_path / "rts.safetensors")
    rts = juap.create_interpreter("rts", clf, checkpoint=str(tmp_path / "rts.safetensors"))
    attack = juap.create_attack(
        "juap", classifier=clf, interpreter=rts, norm="linf", eps=16, **dict(FAST, steps=4, eval_every=2)
    )
    n_hat = attack.fit(x[:64], progress=False)
    assert float(perturbation_norm(n_hat, "linf")) <= 16 * (1 + 1e-5)
    assert all("feature_loss" in h for h in attack.history)


def test_headline_misses_names_each_missed_part():
    """The paper's headline in one place (the demo and the claims benchmarks call it)."""
    from juap.metrics import headline_misses

    guap = {"fooling_ratio": 0.9, "iou": 0.4, "l1": 0.2, "iou_fooled": 0.35}
    holds = {"fooling_ratio": 0.86, "iou": 0.5, "l1": 0.19, "iou_fooled": 0.40}
    assert headline_misses(holds, guap, fooled=True) == []
    worse = {"fooling_ratio": 0.84, "iou": 0.49, "l1": 0.2, "iou_fooled": None}
    assert headline_misses(worse, guap) == ["FR", "IoU", "L1"]
    assert headline_misses(worse, guap, fooled=True) == ["FR", "IoU", "L1", "IoU fooled"]
