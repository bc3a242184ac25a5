"""``juap demo``: the grid of ``embedded/demo.yaml`` run by the grid engine, plus the demo's own steps."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from helpers import run_cli as run
from juap.commands.demo import (
    DEMO_EXPERIMENT,
    DEMO_PEERS,
    DemoSettings,
    attack_split,
    claims_spread,
    demo_cell_params,
    demo_experiment,
    headline_checks,
    threshold_distance,
    verdict_line,
)
from juap.commands.run import load_experiment, plan

TINY = [
    "--set",
    "data.num_images=120",
    "--set",
    "data.image_size=32",
    "--set",
    "train.epochs=1",
    "--set",
    "classifier.options={widths: [4, 8, 8]}",
    "--set",
    "demo.steps=2",
    "--set",
    "demo.experiment.attack_params.guap.generator_options={ngf: 8}",
    "--set",
    "demo.experiment.attack_params.juap.generator_options={ngf: 8}",
    "--set",
    "demo.experiment.attack_params.uap.max_passes=1",
    "--set",
    "demo.experiment.attack_params.sgd_uap.epochs=1",
    "--set",
    "demo.jap_images=4",
    "--set",
    "demo.jap_steps=2",
    "--set",
    "demo.rts_epochs=1",
]
VARIANTS = {"UAP", "SGD-UAP", "GUAP"} | {
    f"{g}-{i}" for g in ("R-JUAP", "U-JUAP") for i in ("CAM", "GradCAM", "RTS")
}


def _cells(run_dir):
    return {json.loads((d / "metrics.json").read_text())["attack"]: d for d in (run_dir / "cells").iterdir()}


def test_demo_runs_its_grid_into_cells_and_reuses_them(tmp_path, capsys):
    cache, out = str(tmp_path / "cache"), tmp_path / "d1"
    code, stdout, err = run(capsys, "demo", "--out", str(out), "--no-progress", "--cache-dir", cache, *TINY)
    assert code == 0, err
    for name in (
        "results.md",
        "results.csv",
        "transfer.csv",
        "transfer_peers.csv",
        "metrics.json",
        "figure.png",
        "discrepancy.png",
        "config.yaml",
        "perturbations/GUAP.png",
        "perturbations/U-JUAP-RTS.safetensors",
        "perturbations/SGD-UAP.safetensors",
    ):
        assert (out / name).is_file(), name
    with open(out / "results.csv") as f:
        header = f.readline().strip().split(",")
    assert header == ["method", "generator", "interpreter", "norm", "fooling_ratio", "l1", "iou"]
    assert "trained in" in stdout
    # the maps under methods no attack trained against: every perturbation under every demo peer
    with open(out / "transfer_peers.csv") as f:
        peers = list(csv.DictReader(f))
    assert {r["perturbation"] for r in peers} == VARIANTS
    assert {r["interpreter"] for r in peers} == set(DEMO_PEERS)
    assert all(0 <= float(r["iou"]) <= 1 for r in peers)
    assert "## Maps under methods no attack trained against" in (out / "results.md").read_text()
    # the universal attacks are the grid's cells: one juap-attack run folder each, on the demo's split
    # each an ordinary attack run (juap attack's fit_and_measure): history, generator artifact,
    # its perturbation picked on validation images it was not trained on
    cells = sorted((out / "cells").iterdir())
    assert len(cells) == 9
    for d in cells:
        assert json.loads((d / "run.json").read_text())["status"] == "complete"
        for name in ("perturbation.safetensors", "config.yaml", "history.csv", "metrics.json", "maps.png"):
            assert (d / name).is_file(), (d.name, name)
        split = json.loads((d / "split.json").read_text())
        assert len(split["attack_test"]) == 12 and len(split["attack_val"]) == 1  # val_fraction 0.1 of 12
        assert len(split["attack_train"]) == 11
        parts = [set(split[k]) for k in ("attack_train", "attack_val", "attack_test")]
        assert sum(map(len, parts)) == len(set.union(*parts))  # disjoint
        generator = json.loads((d / "metrics.json").read_text())["generator"]
        if generator is not None:  # GUAP, R-JUAP, U-JUAP
            assert (d / "generator.safetensors").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert {r["variant"] for r in m["universal"]} == VARIANTS
    assert m["cells"] == {"cells": 9, "complete": 9, "ran": 9}
    assert {c["claim"] for c in m["claims"]} == {f"{v} vs GUAP" for v in VARIANTS if "JUAP" in v}
    assert all(f"[{'holds' if c['holds'] else 'does not hold'}] {c['claim']}" in stdout for c in m["claims"])
    assert "The paper's headline" in (out / "results.md").read_text()
    # every perturbation's figures as applied in 8 bits, beside the float ones
    assert "### As applied in 8 bits" in (out / "results.md").read_text()
    assert all(0 <= r["fooling_ratio_8bit"] <= 1 for r in m["universal"])
    own = {"-": "cam"}  # GUAP, UAP, SGD-UAP: the first evaluated interpreter; JUAP: its own
    main = [r for r in m["universal"] if r["interpreter"] == own.get(*[r["trained_against"]] * 2)]
    assert main and all(r["iou_8bit"] is not None for r in main)  # the maps of each run's main interpreter
    # the same --out again: every cell is reused, and the tables and figures are the same
    stamps = {d.name: (d / "metrics.json").stat().st_mtime_ns for d in cells}
    code, stdout, err = run(capsys, "demo", "--out", str(out), "--no-progress", "--cache-dir", cache, *TINY)
    assert code == 0, err
    assert "trained in" not in stdout and stdout.count("done earlier, reused") == 9
    assert {d.name: (d / "metrics.json").stat().st_mtime_ns for d in (out / "cells").iterdir()} == stamps
    again = json.loads((out / "metrics.json").read_text())
    assert again["cells"]["ran"] == 0 and again["claims"] == m["claims"]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_demo_refuses_a_folder_of_another_command(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run.json").write_text(json.dumps({"command": "attack", "status": "complete"}))
    code, _, err = run(capsys, "demo", "--out", str(tmp_path / "other"), "--no-progress", *TINY)
    assert code == 2 and "already exists" in err


def test_the_experiment_file_is_the_demo_settings():
    """The demo's default settings change nothing in demo.yaml: its cells are the file's, with the file's
    hyperparameters (the recipe is written in the YAML only)."""
    from_file = plan(load_experiment(DEMO_EXPERIMENT))
    mapped = plan(demo_experiment(DemoSettings()))
    assert [(c.variant, c.params, c.budget, c.id) for c in mapped] == [
        (c.variant, c.params, c.budget, c.id) for c in from_file
    ]
    assert {c.variant for c in mapped} == VARIANTS
    juap = {c.interpreter: c.params for c in mapped if c.attack == "juap" and c.generator == "resnet"}
    assert demo_cell_params("juap", interpreter="rts") == juap["rts"]
    assert juap["cam"]["lam"] == 0.2 and juap["rts"]["lam"] == 0.01 and juap["rts"]["feature_weight"] == 0
    assert juap["cam"]["steps"] == 200 and juap["cam"]["hinge"] == "image" and juap["cam"]["delta"] == -1.5


def test_demo_settings_map_onto_the_experiment():
    s = DemoSettings(
        steps=8,
        eps=10.0,
        seed=3,
        experiment={
            "attack_params": {"juap": {"lam": 0.3}, "sgd_uap": {"epochs": 2}, "uap": {"max_passes": 1}},
            "interpreter_params": {"rts": {"lam": 0.02}},
        },
    )
    exp = demo_experiment(
        s, data={"name": "synthetic", "num_images": 120}, classifier={"name": "small_resnet"}
    )
    assert (
        exp.seed == 3
        and exp.data.num_images == 120
        and [c.name for c in exp.grid.classifiers] == ["small_resnet"]
    )
    cells = {c.variant: c for c in plan(exp)}
    assert exp.seed == 3 and all(c.budget.eps == 10.0 and c.budget.norm == "linf" for c in cells.values())
    assert cells["GUAP"].params["steps"] == 8 and cells["GUAP"].params["eval_every"] == 2
    assert cells["R-JUAP-CAM"].params["lam"] == 0.3 and cells["U-JUAP-RTS"].params["lam"] == 0.02
    assert cells["SGD-UAP"].params["epochs"] == 2 and cells["UAP"].params["max_passes"] == 1
    # a different split is a different cell, whatever the data section says
    ids = {c.id for c in plan(exp)}
    assert ids.isdisjoint(c.id for c in plan(exp, data_key={"demo_split": 1}))


def test_attack_split_is_seeded_disjoint_and_halves_when_too_small():
    held = [(torch.full((3, 4, 4), float(i)), i % 3) for i in range(20)]
    a = attack_split(held, n_train=6, n_test=8, seed=0)
    assert a.x_train.shape == (6, 3, 4, 4) and a.x_test.shape == (8, 3, 4, 4) and a.y_test.shape == (8,)
    train, test = a.x_train[:, 0, 0, 0].tolist(), a.x_test[:, 0, 0, 0].tolist()
    assert not set(train) & set(test)
    assert a.record["attack_train"] == [int(v) for v in train] and a.record["attack_test"] == [
        int(v) for v in test
    ]
    assert a.y_test.tolist() == [int(v) % 3 for v in test]
    assert torch.equal(attack_split(held, n_train=6, n_test=8, seed=0).x_test, a.x_test)
    assert not torch.equal(attack_split(held, n_train=6, n_test=8, seed=1).x_test, a.x_test)
    half = attack_split(held, n_train=15, n_test=15)
    assert len(half.x_train) == len(half.x_test) == 10
    assert attack_split(held, n_train=0, n_test=5).x_train.shape == (0, 3, 4, 4)


def test_the_validation_images_are_carved_out_of_the_training_images():
    """As ``juap attack``: a seeded val_fraction of the attack-train images picks the perturbation and is
    never trained on; the three parts are disjoint and split.json's record names each."""
    held = [(torch.full((3, 4, 4), float(i)), i % 3) for i in range(40)]
    a = attack_split(held, n_train=20, n_test=10, seed=0, val_fraction=0.1)
    train, val, test = (t[:, 0, 0, 0].long().tolist() for t in (a.x_train, a.x_val, a.x_test))
    assert (len(train), len(val), len(test)) == (18, 2, 10)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert (a.record["attack_train"], a.record["attack_val"], a.record["attack_test"]) == (train, val, test)
    assert a.y_train.tolist() == [v % 3 for v in train] and a.y_val.tolist() == [v % 3 for v in val]
    no_val = attack_split(held, n_train=20, n_test=10, seed=0)
    assert set(no_val.record["attack_train"]) == set(train) | set(val)  # the same 20, 2 of them held out
    assert (
        a.record["attack_val"]
        != attack_split(held, n_train=20, n_test=10, seed=1, val_fraction=0.1).record["attack_val"]
    )
    assert attack_split(held, n_train=1, n_test=10, val_fraction=0.1).x_val.shape == (0, 3, 4, 4)


def test_benchmarks_use_the_demo_split(monkeypatch):
    """benchmarks/_common.demo_data returns attack_split's images of the demo classifier's held-out split."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import _common
    finally:
        sys.path.pop(0)
    held = [(torch.full((3, 4, 4), float(i)), i % 6) for i in range(40)]
    fake = dataclasses.make_dataclass("Splits", ["test"])(held)

    class Clf(torch.nn.Module):
        arch = "tiny"

    monkeypatch.setattr(
        "juap.commands.demo_models.cached_demo_classifier",
        lambda cfg, progress=False: (Clf(), fake, {"test_accuracy": 1.0}, True),
    )
    _, x_train, x_test, y_test, _ = _common.demo_data(5, 7, seed=2)
    want = attack_split(held, n_train=5, n_test=7, seed=2)
    assert torch.equal(x_train, want.x_train) and torch.equal(x_test, want.x_test)
    assert torch.equal(y_test, want.y_test)


def test_headline_checks_compare_each_juap_cell_with_guap_under_its_interpreter():
    def row(method, variant, against, interp, fr, iou, l1):
        return dict(
            method=method,
            variant=variant,
            trained_against=against,
            interpreter=interp,
            fooling_ratio=fr,
            iou=iou,
            l1=l1,
        )

    rows = [
        row("GUAP", "GUAP", "-", "cam", 0.9, 0.3, 0.2),
        row("GUAP", "GUAP", "-", "rts", 0.9, 0.3, 0.2),
        row("R-JUAP", "R-JUAP-CAM", "cam", "cam", 0.86, 0.45, 0.1),
        row("R-JUAP", "R-JUAP-CAM", "cam", "rts", 0.86, 0.1, 0.9),  # a transfer row: not a claim
        row("R-JUAP", "R-JUAP-RTS", "rts", "rts", 0.8, 0.5, 0.1),
    ]
    got = {c["claim"]: c for c in headline_checks(rows)}
    assert set(got) == {"R-JUAP-CAM vs GUAP", "R-JUAP-RTS vs GUAP"}
    assert got["R-JUAP-CAM vs GUAP"]["holds"]
    assert not got["R-JUAP-RTS vs GUAP"]["holds"] and "misses: FR" in got["R-JUAP-RTS vs GUAP"]["figures"]


def test_each_verdict_says_how_far_it_is_from_the_thresholds_beside_the_seed_spread():
    def row(method, variant, against, interp, fr, iou, l1):
        return dict(
            method=method, variant=variant, trained_against=against, interpreter=interp, fooling_ratio=fr,
            iou=iou, l1=l1,
        )  # fmt: skip

    rows = [
        row("GUAP", "GUAP", "-", "cam", 0.80, 0.45, 0.25),
        row("GUAP", "GUAP", "-", "rts", 0.80, 0.45, 0.25),
        row("R-JUAP", "R-JUAP-CAM", "cam", "cam", 0.747, 0.60, 0.1),  # FR 0.003 short of 0.75
        row("R-JUAP", "R-JUAP-RTS", "rts", "rts", 0.85, 0.50, 0.1),  # IoU 0.05 short of 0.55
    ]
    spread = {"R-JUAP-CAM": {"FR": 0.012, "IoU": 0.01}, "R-JUAP-RTS": {"FR": 0.01, "IoU": 0.02}}
    got = {c["claim"]: c for c in headline_checks(rows, spread=spread)}
    cam, rts = got["R-JUAP-CAM vs GUAP"], got["R-JUAP-RTS vs GUAP"]
    assert cam["margins"]["FR"] == pytest.approx(-0.003) and cam["margins"]["IoU"] == pytest.approx(0.05)
    assert not cam["holds"] and cam["borderline"]
    line = verdict_line(cam)
    assert line.startswith("[does not hold] R-JUAP-CAM vs GUAP: FR 0.747 vs 0.800")
    assert line.endswith(
        "FR misses by 0.003 (3-seed sd 0.012), IoU clears by 0.050 (3-seed sd 0.010): borderline"
    )
    assert (
        not rts["holds"] and not rts["borderline"]
    )  # 0.05 short of the IoU threshold, sd 0.02: a clear miss
    assert verdict_line(rts).endswith(
        "FR clears by 0.100 (3-seed sd 0.010), IoU misses by 0.050 (3-seed sd 0.020)"
    )
    # no spread at this budget: the distances alone, never called borderline
    assert threshold_distance({"FR": 0.001, "IoU": -0.2}, None) == (
        "FR clears by 0.001, IoU misses by 0.200",
        False,
    )


def test_the_shipped_spread_is_the_claims_benchmarks():
    """headline_spread.json is made from benchmarks/results/claims/claims.json (make_demo_data.py spread)."""
    claims = json.loads(
        (Path(__file__).resolve().parents[1] / "benchmarks/results/claims/claims.json").read_text()
    )
    want = {
        r["variant"]: {"FR": r["fooling_ratio_sd"], "IoU": r["iou_sd"]}
        for r in claims["headline"]
        if r["budget"] == "linf-10" and r["method"].endswith("JUAP")
    }
    assert claims_spread("linf", 10.0) == want and set(want) == {v for v in VARIANTS if "JUAP" in v}
    assert claims_spread("linf", 13.0) == {}  # a budget the benchmark did not measure


@pytest.mark.parametrize("bad", ["demo.nope=1", "demo.eps=-3"])
def test_a_bad_demo_setting_is_one_line(tmp_path, capsys, bad):
    code, _, err = run(capsys, "demo", "--out", str(tmp_path / "d"), "--no-progress", "--set", bad)
    assert code == 2 and "Traceback" not in err and err.strip()


def test_the_default_folder_is_reopened_so_a_second_demo_reuses_its_cells(tmp_path, monkeypatch):
    """``./run.sh demo`` twice: the second run goes into the same runs/demo and reuses the cells there."""
    from juap.commands.demo import open_demo_dir

    monkeypatch.chdir(tmp_path)
    first = open_demo_dir(None)
    (first / "cells").mkdir()
    assert first == Path("runs") / "demo" and (first / "run.json").is_file()
    again = open_demo_dir(None)
    assert again == first and (again / "cells").is_dir()  # reopened, not emptied nor refused
