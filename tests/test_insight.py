"""Insight into a run (issue 16, parts 3 and 4): where the fooled images go, per-class figures, and the
pictures a run folder holds (amplified perturbation, the benign vs adversarial map figure).

The figures are checked against each other (the transition matrix sums to the images, per-class ratios
weighted by class counts give the overall ones) and against an independent count from the predictions.
The torchrun side (2 gloo processes equal 1) is in tests/test_distributed.py.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import juap
from helpers import CLI_TINY_DATA, texture_classifier
from helpers import run_cli as run
from juap.app.artifacts import amplify, save_perturbation
from juap.app.report import transition_heatmaps, transition_section, transitions_csv
from juap.budget import apply_perturbation
from juap.commands.attack import FIGURE_SELECTIONS, pick_images
from juap.errors import ConfigError
from juap.metrics import MetricSums, iou_topk, l1_distance

EPS = 64  # 0-255 units: a random sign pattern this strong fools part of the texture classifier's images


@pytest.fixture(scope="module")
def evaluated():
    """(classifier, cam, images, perturbation, evaluation with per_class=True) on 64 texture images."""
    clf, x, y = texture_classifier()
    n = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).sign() * EPS / 255
    cam = juap.create_interpreter("cam", clf)
    gradcam = juap.create_interpreter("gradcam", clf)
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]  # uneven batches: sums must add across them
    ev = juap.evaluate(clf, n, batches, interpreters={"cam": cam, "gradcam": gradcam}, per_class=True)
    return clf, cam, x, n, ev


def test_transition_matrix_sums_to_the_evaluated_images(evaluated):
    clf, _, x, n, ev = evaluated
    t = torch.tensor(ev["transitions"])  # (K, K): rows benign, columns adversarial prediction
    assert t.shape == (3, 3) and ev["num_classes"] == 3
    assert int(t.sum()) == ev["n_images"] == len(x)
    assert 0.1 < ev["fooling_ratio"] < 0.9  # some fooled, some not: every check below can fail
    assert int(t.sum() - t.diag().sum()) == round(ev["fooling_ratio"] * len(x))
    with torch.no_grad():  # an independent count from the predictions themselves
        pb, pa = clf(x).argmax(1), clf(apply_perturbation(x, n)).argmax(1)
    expected = torch.zeros(3, 3, dtype=torch.long).index_put_((pb, pa), torch.tensor(1), accumulate=True)
    assert torch.equal(t, expected)
    assert t.sum(1).tolist() == ev["per_class"]["n_images"]


def test_dominant_label_is_where_most_fooled_images_land(evaluated):
    clf, _, x, n, ev = evaluated
    with torch.no_grad():
        pb, pa = clf(x).argmax(1), clf(apply_perturbation(x, n)).argmax(1)
    landed = Counter(pa[pb != pa].tolist())
    label, count = landed.most_common(1)[0]
    assert ev["dominant_label"] == label
    assert ev["dominant_label_share"] == pytest.approx(count / sum(landed.values()))
    assert ev["per_class"]["n_fooled_into"][label] == count


def test_per_class_figures_weighted_by_class_counts_give_the_overall_ones(evaluated):
    _, _, _, _, ev = evaluated
    pc = ev["per_class"]
    n_c = pc["n_images"]
    assert sum(n_c) == ev["n_images"] and sum(1 for c in n_c if c) >= 2
    fr = sum(c * f for c, f in zip(n_c, pc["fooling_ratio"], strict=True) if c) / sum(n_c)
    assert fr == pytest.approx(ev["fooling_ratio"], abs=1e-12)
    assert len({f for f in pc["fooling_ratio"] if f is not None}) > 1  # the classes differ
    for name, m in ev["interpreters"].items():
        mc = m["per_class"]
        assert mc["n_images"] == n_c, name
        for key in ("l1", "iou"):
            mean = sum(c * v for c, v in zip(n_c, mc[key], strict=True) if c) / sum(n_c)
            assert mean == pytest.approx(m[key], abs=1e-6), (name, key)


def test_per_class_map_figures_match_an_independent_computation(evaluated):
    clf, cam, x, n, ev = evaluated
    with torch.no_grad():
        lb, mb = cam.explain(x)
        la, ma = cam.explain(apply_perturbation(x, n))
    pb = lb.argmax(1)
    l1 = l1_distance(ma, mb)
    iou = torch.stack([iou_topk(ma, mb, k) for k in (10, 20, 30, 40, 50)]).mean(0)
    got = ev["interpreters"]["cam"]["per_class"]
    for c in range(3):
        sel = pb == c
        if not sel.any():
            assert got["l1"][c] is None
            continue
        assert got["l1"][c] == pytest.approx(float(l1[sel].mean()), abs=1e-5)
        assert got["iou"][c] == pytest.approx(float(iou[sel].mean()), abs=1e-5)


def test_per_class_figures_are_off_unless_asked(evaluated):
    clf, _, x, n, _ = evaluated
    ev = juap.evaluate(clf, n, x[:8], interpreters={"cam": juap.create_interpreter("cam", clf)})
    assert "transitions" not in ev and "per_class" not in ev and "per_class" not in ev["interpreters"]["cam"]


def test_sums_of_shards_merge_to_the_whole():
    g = torch.Generator().manual_seed(0)
    benign, adv = torch.randn(30, 5, generator=g), torch.randn(30, 5, generator=g)
    whole, a, b = MetricSums(), MetricSums(), MetricSums()
    whole.update_classes(benign, adv)
    a.update_classes(benign[:7], adv[:7])
    b.update_classes(benign[7:], adv[7:])
    assert a.merge(b).summary() == whole.summary()
    s = whole.summary()
    assert s["num_classes"] == 5 and sum(map(sum, s["transitions"])) == 30


def test_nothing_fooled_gives_no_dominant_label():
    logits = torch.eye(3)[[0, 1, 2, 2]]
    s = MetricSums()
    s.update_predictions(logits, logits)
    s.update_classes(logits, logits)
    out = s.summary()
    assert out["dominant_label"] is None and out["dominant_label_share"] is None
    assert out["per_class"]["fooling_ratio"] == [0.0, 0.0, 0.0]


def test_transitions_csv_and_heat_map(tmp_path):
    t = [[5, 1, 0], [2, 3, 0], [0, 4, 1]]
    transitions_csv(tmp_path / "t.csv", t, ["a", "b", "c"])
    rows = _csv(tmp_path / "t.csv")
    assert rows[0] == ["benign\\adversarial", "a", "b", "c"]
    assert [r[0] for r in rows[1:]] == ["a", "b", "c"]
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == t
    transitions_csv(tmp_path / "u.csv", t)  # no names: class indices
    assert _csv(tmp_path / "u.csv")[0][1:] == ["0", "1", "2"]
    transition_heatmaps(tmp_path / "t.png", {"GUAP": t, "R-JUAP (CAM)": t}, class_names=["a", "b", "c"])
    assert _size(tmp_path / "t.png")[0] > 100


def test_results_section_reports_the_dominant_label_of_the_evaluation(evaluated, tmp_path):
    *_, ev = evaluated
    md = transition_section(
        tmp_path, {"noise": ev["transitions"], "none": torch.eye(3).long().tolist()}, "abc"
    )
    assert (tmp_path / "transitions.png").is_file() and "![transitions](transitions.png)" in md
    noise = next(line for line in md.splitlines() if line.startswith("| noise |"))
    cells = [c.strip() for c in noise.strip("|").split("|")]
    assert cells[1] == f"{ev['fooling_ratio']:.3f}" and cells[2] == "abc"[ev["dominant_label"]]
    assert cells[3] == f"{ev['dominant_label_share']:.3f}"
    assert "| none | 0.000 | - | - | - |" in md  # nothing fooled: no dominant label


# -- perturbation pictures ---------------------------------------------------------------------------
def test_amplified_perturbation_is_symmetric_around_grey():
    n = torch.zeros(3, 4, 4)
    n[0, 0, 0], n[1, 1, 1], n[2, 2, 2] = 10 / 255, -4 / 255, 2 / 255
    a = amplify(n)
    assert a[0, 0, 0] == pytest.approx(1.0) and a[1, 1, 1] == pytest.approx(0.5 - 0.2)
    assert a[0, 3, 3] == pytest.approx(0.5)  # zero stays grey
    assert torch.equal(amplify(torch.zeros(3, 2, 2)), torch.full((3, 2, 2), 0.5))


def test_save_perturbation_writes_raw_and_amplified_pictures(tmp_path):
    n = (torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 10 / 255
    save_perturbation(tmp_path / "p", n, attack="uap", norm="linf", eps=10)
    raw, amp = (_pixels(tmp_path / name) for name in ("p.png", "p_amplified.png"))
    assert (raw - 127.5).abs().max() <= 10 + 1  # true scale: within eps of mid-grey
    assert (amp - 127.5).abs().max() >= 127  # full range
    assert (tmp_path / "p.safetensors").is_file()


def _pixels(path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im, dtype=np.float32))


def _size(path) -> tuple:
    with Image.open(path) as im:
        return im.size


def _csv(path) -> list:
    return list(csv.reader(path.read_text().splitlines()))


# -- which images the map figure shows ----------------------------------------------------------------
def test_pick_images_by_each_selection():
    fooled = torch.tensor([False, True, False, True, True, False])
    change = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.9, 0.2])
    picks, how = pick_images(fooled, change, "fooled", 2)
    assert [i for i, _ in picks] == [1, 3] and "fooled" in how
    picks, _ = pick_images(fooled, change, "map_change", 4)
    assert [i for i, _ in picks] == [4, 1, 2, 0]  # two largest, then two smallest
    picks, _ = pick_images(fooled, change, "map_change", 3)
    assert [i for i, _ in picks] == [4, 1, 2]
    a, _ = pick_images(fooled, change, "random", 3, seed=1)
    b, _ = pick_images(fooled, change, "random", 3, seed=1)
    c, _ = pick_images(fooled, change, "random", 3, seed=2)
    assert a == b and len({i for i, _ in a}) == 3 and all(0 <= i < 6 for i, _ in a + c)
    picks, how = pick_images(torch.zeros(5, dtype=torch.bool), change[:5], "fooled", 2)
    assert [i for i, _ in picks] == [0, 1] and "no image" in how  # none fooled: the first ones, said so
    with pytest.raises(ConfigError, match="Allowed values: fooled, map_change, random"):
        pick_images(fooled, change, "largest", 2)
    assert FIGURE_SELECTIONS == ("fooled", "map_change", "random")


def test_map_rows_show_the_picked_images_under_every_interpreter(evaluated):
    from juap.commands.attack import map_rows

    clf, cam, x, n, ev = evaluated
    interps = {"cam": cam, "gradcam": juap.create_interpreter("gradcam", clf)}
    rows, how = map_rows(clf, n, [x[:20], x[20:]], interps, main="cam", select="fooled", count=3, pool=40)
    assert len(rows) == 3 and "fooled" in how
    assert [len(r["panels"]) for r in rows] == [6, 6, 6]  # benign, adversarial, then 2 maps per interpreter
    assert all(r["panels"][2][1] is not None and r["panels"][0][1] is None for r in rows)
    captions = [r["panels"][0][2] != r["panels"][1][2].replace("adversarial", "benign") for r in rows]
    assert all(captions)  # fooled: the adversarial prediction differs from the benign one
    assert map_rows(clf, n, [], interps, main="cam") == ([], "no test images")


# -- the command line --------------------------------------------------------------------------------
def test_cli_attack_writes_transitions_pictures_and_map_figure(tmp_path, capsys, clf_path):
    out = tmp_path / "att"
    code, _, err = run(
        capsys,
        "attack",
        "--out",
        str(out),
        "--no-progress",
        *CLI_TINY_DATA,
        "--set",
        f"classifier.weights={clf_path}",
        "--set",
        "attack.name=guap",
        "--set",
        "attack.eps=64",
        "--set",
        "attack.params={steps: 4, batch_size: 16, eval_every: 2, generator_options: {ngf: 8, n_blocks: 1}}",
        "--set",
        "evaluate.figure_images=map_change",
        "--set",
        "evaluate.figure_count=3",
    )
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["class_names"] == ["circle", "cross", "ring", "square"]
    assert sum(map(sum, m["transitions"])) == m["n_images"] == 24
    assert set(m["per_class"]) >= {"n_images", "fooling_ratio"}
    assert {"l1", "iou"} <= set(m["transfer"]["cam"]["per_class"])
    assert "dominant_label_share" in m
    rows = _csv(out / "transitions.csv")
    assert rows[0] == ["benign\\adversarial", *m["class_names"]]
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == m["transitions"]
    for name in ("perturbation.png", "perturbation_amplified.png", "maps.png"):
        assert (out / name).is_file(), name
    width, height = _size(out / "maps.png")
    assert height > width / 3  # 3 rows of 6 panels

    ev = tmp_path / "ev"
    code, _, err = run(
        capsys,
        "evaluate",
        "--perturbation",
        str(out / "perturbation.safetensors"),
        "--out",
        str(ev),
        "--no-progress",
        *CLI_TINY_DATA,
        "--set",
        f"classifier.weights={clf_path}",
        "--set",
        "evaluate.figure_images=random",
    )
    assert code == 0, err
    m2 = json.loads((ev / "metrics.json").read_text())
    assert m2["transitions"] == m["transitions"]
    assert (ev / "transitions.csv").read_text() == (out / "transitions.csv").read_text()
    assert (ev / "maps.png").is_file()


def test_grid_tables_pivot_per_class_figures():
    from juap.commands.run import ExperimentConfig, GridConfig, TableConfig, cell_rows, pivot, plan

    cell = plan(ExperimentConfig(grid=GridConfig(attacks=("guap",), interpreters=("cam",))))[0]
    per_interp = {
        "l1": 0.2,
        "iou": 0.5,
        "per_class": {"n_images": [3, 1], "l1": [0.1, 0.5], "iou": [0.6, 0.2]},
    }
    m = {
        "fooling_ratio": 0.5,
        "class_names": ["circle", "cross"],
        "num_classes": 2,
        "dominant_label": 1,
        "dominant_label_name": "cross",
        "dominant_label_share": 1.0,
        "per_class": {"n_images": [3, 1], "fooling_ratio": [2 / 3, 0.0]},
        "transfer": {"cam": per_interp, "gradcam": per_interp},
    }
    folder = Path("cell")
    rows = cell_rows(cell, m, folder)
    assert rows[0]["fooling_ratio[circle]"] == pytest.approx(2 / 3) and rows[0]["iou[cross]"] == 0.2
    assert rows[0]["dominant_label"] == "cross" and rows[0]["folder"] == str(folder)
    header, body = pivot(rows, TableConfig(rows=("variant",), values=("fooling_ratio[*]", "dominant_label")))
    assert header == ["variant", "fooling_ratio[circle]", "fooling_ratio[cross]", "dominant_label"]
    assert body == [[cell.variant, pytest.approx(2 / 3), 0.0, "cross"]]
    header, body = pivot(rows, TableConfig(rows=("variant",), columns=("interpreter",), values=("iou[*]",)))
    assert header == [
        "variant",
        "cam iou[circle]",
        "cam iou[cross]",
        "gradcam iou[circle]",
        "gradcam iou[cross]",
    ]
    assert body == [[cell.variant, 0.6, 0.2, 0.6, 0.2]]


def test_cli_refuses_an_unknown_figure_selection(tmp_path, capsys):
    code, _, err = run(
        capsys,
        "attack",
        "--out",
        str(tmp_path / "bad"),
        "--no-progress",
        *CLI_TINY_DATA,
        "--set",
        "evaluate.figure_images=biggest",
    )
    assert code != 0
    assert "evaluate.figure_images" in err and "fooled, map_change, random" in err
    assert "Traceback" not in err
