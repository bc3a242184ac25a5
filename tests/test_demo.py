"""``juap demo``: the grid of ``embedded/demo.yaml`` run by the grid engine, plus the demo's own steps."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from helpers import run_cli as run
from juap.commands.demo import DEMO_EXPERIMENT, DemoSettings, attack_split, demo_experiment, headline_checks
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
    "demo.generator_ngf=8",
    "--set",
    "demo.uap_passes=1",
    "--set",
    "demo.sgd_epochs=1",
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
    # the universal attacks are the grid's cells: one juap-attack run folder each, on the demo's split
    cells = sorted((out / "cells").iterdir())
    assert len(cells) == 9
    for d in cells:
        assert json.loads((d / "run.json").read_text())["status"] == "complete"
        assert (d / "perturbation.safetensors").is_file() and (d / "config.yaml").is_file()
        assert len(json.loads((d / "split.json").read_text())["attack_test"]) == 12
    m = json.loads((out / "metrics.json").read_text())
    assert {r["variant"] for r in m["universal"]} == VARIANTS
    assert m["cells"] == {"cells": 9, "complete": 9, "ran": 9}
    assert {c["claim"] for c in m["claims"]} == {f"{v} vs GUAP" for v in VARIANTS if "JUAP" in v}
    assert all(f"[{'holds' if c['holds'] else 'does not hold'}] {c['claim']}" in stdout for c in m["claims"])
    assert "The paper's headline" in (out / "results.md").read_text()
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
    """demo.yaml as `juap run` reads it and the demo's default settings mapped onto it plan the same cells
    with the same hyperparameters (the demo adds only the seed, which the attacks default to)."""
    from_file = plan(load_experiment(DEMO_EXPERIMENT))
    mapped = plan(demo_experiment(DemoSettings()))
    assert [c.variant for c in mapped] == [c.variant for c in from_file]
    assert {c.variant for c in mapped} == VARIANTS
    for a, b in zip(mapped, from_file, strict=True):
        assert {k: v for k, v in a.params.items() if k != "seed"} == b.params, a.variant
        assert a.params.get("seed") == 0 and a.budget == b.budget
    juap = {c.interpreter: c.params for c in mapped if c.attack == "juap" and c.generator == "resnet"}
    assert juap["cam"]["lam"] == 0.2 and juap["rts"]["lam"] == 0.01 and juap["rts"]["rts_feature_weight"] == 0
    assert juap["cam"]["steps"] == 200 and juap["cam"]["hinge"] == "image" and juap["cam"]["delta"] == -1.5


def test_demo_settings_map_onto_the_experiment():
    s = DemoSettings(steps=8, eps=10.0, seed=3, lam=0.3, rts_lam=0.02, sgd_epochs=2, uap_passes=1)
    exp = demo_experiment(
        s, data={"name": "synthetic", "num_images": 120}, classifier={"name": "small_resnet"}
    )
    assert (
        exp.seed == 3
        and exp.data.num_images == 120
        and [c.name for c in exp.grid.classifiers] == ["small_resnet"]
    )
    cells = {c.variant: c for c in plan(exp)}
    assert all(c.budget.eps == 10.0 and c.params["seed"] == 3 for c in cells.values())
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
