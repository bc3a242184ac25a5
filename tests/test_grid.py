"""``juap run``: grid expansion, resumability, shards, tables, and every shipped experiment file."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from juap.app.runs import finish_run
from juap.commands.cli import main
from juap.commands.run import (
    ExperimentConfig,
    TableConfig,
    cell_config,
    dry_run_experiment,
    load_experiment,
    parse_shard,
    pivot,
    plan,
    run_grid,
    write_results,
)
from juap.commands.shipped import CONFIG_DIR
from juap.commands.train_classifier import TrainClassifierConfig
from juap.commands.train_rts import TrainRTSConfig
from juap.errors import ConfigError, JuapError
from juap.runtime.config import load_config

CONFIGS = CONFIG_DIR
EXPERIMENTS = sorted(  # real/ (EfficientNet-Lite0's files) is planned in test_pretrained
    p
    for p in CONFIGS.rglob("*.yaml")
    if p.name.startswith(("table", "claims", "pareto", "fronts", "longer")) and p.parent.name != "real"
)


def _exp(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


GRID = """
name: tiny
grid:
  attacks: [uap, guap, juap]
  generators: [resnet, unet]
  interpreters: [cam, gradcam]
attack_params:
  guap: {generator: resnet}
"""


def test_plan_applies_each_axis_only_where_it_belongs(tmp_path):
    exp = load_experiment(_exp(tmp_path, GRID))
    variants = [c.variant for c in plan(exp)]
    # UAP takes no generator or interpreter; GUAP's generator is fixed by attack_params; JUAP crosses both.
    assert variants == [
        "UAP",
        "GUAP",
        "R-JUAP-CAM",
        "R-JUAP-GradCAM",
        "U-JUAP-CAM",
        "U-JUAP-GradCAM",
    ]
    ids = [c.id for c in plan(exp)]
    assert len(set(ids)) == len(ids)
    assert ids == [c.id for c in plan(load_experiment(_exp(tmp_path, GRID, "again.yaml")))]  # stable


def test_cell_ids_change_with_hyperparameters_only_for_the_cells_they_touch(tmp_path):
    a = {c.variant: c.id for c in plan(load_experiment(_exp(tmp_path, GRID)))}
    b = {
        c.variant: c.id
        for c in plan(load_experiment(_exp(tmp_path, GRID), ["attack_params.juap={lam: 0.2}"]))
    }
    assert a["UAP"] == b["UAP"] and a["GUAP"] == b["GUAP"]
    assert a["R-JUAP-CAM"] != b["R-JUAP-CAM"]


def test_interpreter_params_touch_only_that_interpreters_cells(tmp_path):
    """``interpreter_params.cam`` changes the CAM cells of the attacks that take an interpreter (their
    params and ids), and nothing else; a variant still wins over it; typos are refused."""
    a = {c.variant: c for c in plan(load_experiment(_exp(tmp_path, GRID)))}
    exp = load_experiment(_exp(tmp_path, GRID), ["interpreter_params={cam: {lam: 0.01}}"])
    b = {c.variant: c for c in plan(exp)}
    assert b["R-JUAP-CAM"].params["lam"] == 0.01 and b["U-JUAP-CAM"].params["lam"] == 0.01
    assert "lam" not in b["R-JUAP-GradCAM"].params
    assert a["R-JUAP-CAM"].id != b["R-JUAP-CAM"].id
    assert all(a[v].id == b[v].id for v in ("UAP", "GUAP", "R-JUAP-GradCAM", "U-JUAP-GradCAM"))
    with_variant = load_experiment(
        _exp(tmp_path, GRID), ["interpreter_params={cam: {lam: 0.01}}", "grid.variants=[{lam: 0.3}]"]
    )
    assert all(c.params["lam"] == 0.3 for c in plan(with_variant) if c.attack == "juap")
    with pytest.raises(ConfigError, match="interpreter_params.cam"):
        load_experiment(_exp(tmp_path, GRID), ["interpreter_params={cam: {lamb: 0.01}}"])
    with pytest.raises(JuapError, match="nope"):
        load_experiment(_exp(tmp_path, GRID), ["interpreter_params={nope: {lam: 0.01}}"])


def test_picture_choices_do_not_change_a_cells_id(tmp_path):
    """evaluate.figure_images / figure_count change maps.png only: the cells keep their ids (so cells run
    before the keys existed, e.g. benchmarks/results/claims, are still found); a measured key changes them."""
    ids = [c.id for c in plan(load_experiment(_exp(tmp_path, GRID)))]
    pictures = ["evaluate.figure_images=random", "evaluate.figure_count=0"]
    assert [c.id for c in plan(load_experiment(_exp(tmp_path, GRID), pictures))] == ids
    measured = plan(load_experiment(_exp(tmp_path, GRID), ["evaluate.batch_size=7"]))
    assert not set(c.id for c in measured) & set(ids)


def test_variants_objectives_and_labels(tmp_path):
    text = """
grid:
  attacks: [juap, guap_ct]
  interpreters: [cam]
  objectives: [untargeted, least_likely, targeted]
  variants: [{lam: 0.01}, {lam: 0.1}]
attack_params:
  juap: {target: 1}
  guap_ct: {target: 1}
"""
    cells = plan(load_experiment(_exp(tmp_path, text)))
    names = [c.variant for c in cells]
    assert "R-JUAP-CAM-CE [lam=0.01]" in names and "R-JUAP-CAM-Ct [lam=0.1]" in names
    assert names.count("GUAP-Ct") == 1  # guap_ct takes no lam and has its objective built in
    assert len(cells) == 3 * 2 + 1
    juap_ct = next(c for c in cells if c.variant == "R-JUAP-CAM-Ct [lam=0.1]")
    assert juap_ct.params["objective"] == "targeted" and juap_ct.params["lam"] == 0.1


def test_a_variant_that_names_its_objective_keeps_it_and_dry_runs_at_dry_run_sizes(tmp_path):
    text = """
grid:
  attacks: [juap]
  interpreters: [cam]
  objectives: [least_likely, untargeted]
  variants: [{lam: 0.1}, {objective: untargeted, hinge: image, delta: -1.5}, {steps: 600, lam: 0.3}]
attack_params:
  juap: {steps: 300}
interpreter_params:
  cam: {eval_every: 50}
"""
    exp = load_experiment(_exp(tmp_path, text))
    cells = plan(exp)
    # the grid's two objectives cross the variants that leave it open; the one that names it runs once
    assert [(c.params["objective"], c.setting) for c in cells] == [
        ("least_likely", {"lam": 0.1}),
        ("untargeted", {"objective": "untargeted", "hinge": "image", "delta": -1.5}),
        ("least_likely", {"steps": 600, "lam": 0.3}),
        ("untargeted", {"lam": 0.1}),
        ("untargeted", {"steps": 600, "lam": 0.3}),
    ]
    assert len(cells) == 5 and len({c.id for c in cells}) == 5
    named = [c for c in cells if "objective" in c.setting]
    assert len(named) == 1 and named[0].objective == "untargeted"
    # a dry run trains one step, also where a variant asks for 600
    tiny = dry_run_experiment(exp, tmp_path)
    dry_steps = tiny.attack_params["juap"]["steps"]
    assert dry_steps < 300
    assert all(c.params["steps"] == dry_steps for c in plan(tiny))
    assert all(c.params["eval_every"] == tiny.attack_params["juap"]["eval_every"] < 50 for c in plan(tiny))
    assert {c.params["lam"] for c in plan(tiny) if "lam" in c.setting} == {0.1, 0.3}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("grid: {attacks: [juapp]}", "juap"),
        ("grid: {interpreters: [gradcm]}", "gradcam"),
        ("grid: {generators: []}", "grid.generators is empty"),
        ("grid: {objectives: [least]}", "least_likely"),
        ("attack_params: {juap: {lamda: 1}}", "lam"),
        ("grid: {atacks: [uap]}", "Did you mean 'grid.attacks'"),
        ("grid: {budgets: [{norm: linf, eps: -1}]}", "eps"),
        ("grid: {classifiers: [{name: resnet18}, {name: resnet18}]}", "label"),
    ],
)
def test_bad_experiment_files_are_refused_with_a_message(tmp_path, text, needle):
    with pytest.raises(JuapError, match=needle):
        load_experiment(_exp(tmp_path, text))


def test_extends_merges_and_refuses_loops(tmp_path):
    _exp(tmp_path, "name: base\ngrid: {attacks: [uap], interpreters: [cam]}\nseed: 3\n", "base.yaml")
    exp = load_experiment(_exp(tmp_path, "extends: base.yaml\nname: top\ngrid: {attacks: [guap]}\n"))
    assert (exp.name, exp.seed, exp.grid.attacks, exp.grid.interpreters) == ("top", 3, ("guap",), ("cam",))
    _exp(tmp_path, "extends: b.yaml\n", "a.yaml")
    _exp(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="loops"):
        load_experiment(tmp_path / "a.yaml")


def _fake_cell(calls):
    """A stand-in for ``run_attack`` that records the call and finishes the cell folder like it."""

    def run(cfg, d, resume=False):
        calls.append(d.name)
        m = {
            "fooling_ratio": 0.5 if cfg.attack.name != "uap" else 0.25,
            "transfer": {i: {"l1": 0.1, "iou": 0.7, "random_iou": 0.2} for i in ("cam", "gradcam")},
            "map_interpreter": "cam",
            "l1": 0.1,
            "iou": 0.7,
        }
        finish_run(d, config={}, metrics=m)
        return m

    return run


def test_a_rerun_skips_finished_cells_and_redoes_failed_ones(tmp_path):
    exp = load_experiment(_exp(tmp_path, GRID))
    calls: list = []
    res = run_grid(exp, tmp_path / "run", run_cell=_fake_cell(calls))
    assert res["complete"] == res["cells"] == 6 and len(calls) == 6
    calls.clear()
    res = run_grid(exp, tmp_path / "run", run_cell=_fake_cell(calls))
    assert calls == [] and res["complete"] == 6  # nothing is run twice
    # A cell interrupted half-way is not "complete": it runs again, and only it.
    victim = plan(exp)[3].id
    run_json = tmp_path / "run" / "cells" / victim / "run.json"
    run_json.write_text(json.dumps({"command": "attack", "status": "interrupted"}))
    run_grid(exp, tmp_path / "run", run_cell=_fake_cell(calls))
    assert calls == [victim]
    # With the attack's checkpoint there, the cell resumes instead of starting over.
    resumed = []

    def resuming(cfg, d, resume=False):
        resumed.append(resume)
        return _fake_cell(calls)(cfg, d)

    run_json.write_text(json.dumps({"command": "attack", "status": "interrupted"}))
    (run_json.parent / "checkpoint.safetensors").write_bytes(b"stand-in")
    run_grid(exp, tmp_path / "run", run_cell=resuming)
    assert resumed == [True]


def test_a_failing_cell_is_marked_and_the_grid_stops_with_the_error(tmp_path):
    exp = load_experiment(_exp(tmp_path, GRID))

    def boom(cfg, d, resume=False):
        raise ConfigError("broken cell")

    with pytest.raises(ConfigError, match="broken cell"):
        run_grid(exp, tmp_path / "run", run_cell=boom)
    first = tmp_path / "run" / "cells" / plan(exp)[0].id / "run.json"
    assert json.loads(first.read_text())["status"] == "failed"


def test_shards_split_the_cells_and_merge_into_one_table(tmp_path):
    exp = load_experiment(_exp(tmp_path, GRID))
    seen = []
    for i in (1, 2, 3):
        calls: list = []
        run_grid(exp, tmp_path / f"shard{i}", shard=(i, 3), run_cell=_fake_cell(calls))
        seen.append(set(calls))
    assert set().union(*seen) == {c.id for c in plan(exp)}
    assert sum(len(s) for s in seen) == 6  # disjoint
    calls = []
    res = run_grid(
        exp,
        tmp_path / "merged",
        shard=(1, 3),
        merge=[tmp_path / "shard2", tmp_path / "shard3"],
        run_cell=_fake_cell(calls),
    )
    assert res["complete"] == 6 and len(calls) == 2  # shard 1's cells run here, the rest are merged
    write_results(exp, tmp_path / "merged", res)
    md = (tmp_path / "merged" / "results.md").read_text()
    assert "6 of 6 cells finished" in md and "U-JUAP-GradCAM" in md


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "two/3", "1-2"])
def test_shard_out_of_range_is_refused(text):
    with pytest.raises(ConfigError, match="shard"):
        parse_shard(text)


def test_pivot_shapes_the_paper_tables():
    rows = [
        {
            "classifier": "r18",
            "method": "GUAP",
            "variant": "GUAP",
            "interpreter": i,
            "fooling_ratio": 0.8,
            "l1": l1,
            "iou": 0.3,
            "trained_against": "-",
        }
        for i, l1 in (("cam", 0.4), ("gradcam", 0.5))
    ] + [
        {
            "classifier": "r18",
            "method": "R-JUAP",
            "variant": f"R-JUAP-{i}",
            "interpreter": i,
            "fooling_ratio": fr,
            "l1": 0.1,
            "iou": 0.7,
            "trained_against": i,
        }
        for i, fr in (("cam", 0.75), ("gradcam", 0.7))
    ]
    header, body = pivot(rows, TableConfig(rows=("classifier", "variant"), values=("fooling_ratio",)))
    assert header == ["classifier", "variant", "FR"]
    assert body == [["r18", "GUAP", 0.8], ["r18", "R-JUAP-cam", 0.75], ["r18", "R-JUAP-gradcam", 0.7]]
    header, body = pivot(rows, TableConfig(rows=("method",), columns=("interpreter",), values=("l1", "iou")))
    assert header == ["method", "cam L1", "cam IoU", "gradcam L1", "gradcam IoU"]
    assert body == [["GUAP", 0.4, 0.3, 0.5, 0.3], ["R-JUAP", 0.1, 0.7, 0.1, 0.7]]


def test_cli_run_list_and_errors(tmp_path, capsys):
    exp = _exp(tmp_path, GRID)
    assert main(["run", str(exp), "--list", "--shard", "2/2"]) == 0
    out = capsys.readouterr().out
    assert "6 cells; * = in shard 2/2" in out and out.count("\n* ") + out.startswith("* ") == 3
    assert main(["run", str(exp), "--shard", "5/2", "--out", str(tmp_path / "o")]) == 2
    assert "between 1 and 2" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a run")
    assert main(["run", str(exp), "--out", str(tmp_path / "other")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_run_end_to_end_then_continues(tmp_path, capsys):
    """A real grid (one-step attacks on tiny data) through the CLI; the second call reuses every cell."""
    exp = load_experiment(_exp(tmp_path, GRID + "evaluate: {interpreters: [cam]}\n"))
    tiny = dry_run_experiment(exp, tmp_path)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(_plain(tiny)))
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out), "--no-progress"]) == 0
    assert "6 of 6 cells finished (6 run now" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0].startswith("method,generator,interpreter,norm,fooling_ratio,l1,iou")
    # UAP and GUAP with cam (the evaluated interpreter); each JUAP cell with the interpreter it fooled.
    assert len(csv) == 1 + 6
    assert main(["run", str(spec), "--out", str(out), "--no-progress"]) == 0
    assert "(0 run now" in capsys.readouterr().out


def _plain(exp: ExperimentConfig) -> dict:
    import dataclasses

    d = dataclasses.asdict(exp)
    return json.loads(json.dumps(d))


# -- every shipped experiment file (juap/configs/) -----------------------------------------------------
def test_configs_cover_every_table_for_every_data_set():
    names = {(p.parent.name, p.stem.split("_")[0]) for p in EXPERIMENTS}
    for ds in ("embedded", "imagenet", "chestxray", "intel"):
        for table in ("table2", "table3", "table4", "table5", "table6"):
            assert (ds, table) in names, f"{ds}/{table}_*.yaml is missing"


@pytest.mark.parametrize("path", [p for p in CONFIGS.rglob("*.yaml") if p.name.startswith("train_")], ids=str)
def test_training_configs_load(path):
    cfg = load_config(TrainClassifierConfig, path)
    assert cfg.data.image_size == 224 and cfg.classifier.reset_head


@pytest.mark.parametrize("path", [p for p in CONFIGS.rglob("*.yaml") if p.name.startswith("rts_")], ids=str)
def test_rts_configs_load(path):
    cfg = load_config(TrainRTSConfig, path)
    assert cfg.classifier.weights


@pytest.fixture(scope="module")
def dry_run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dry-run")


def _code_path(cell) -> tuple:
    """What decides which code a cell runs: its attack, norm, interpreter, the values of its
    categorical parameters (hinge, objective, selection, ...) and whether lambda is constrained; not the
    numbers."""
    categorical = (str, bool, type(None))
    kinds = tuple(sorted((k, v) for k, v in cell.params.items() if isinstance(v, categorical)))
    constrained = cell.params.get("fr_target") is not None or cell.params.get("fr_margin") is not None
    return (cell.attack, cell.budget.norm, cell.interpreter, kinds, constrained)


def test_every_kind_of_cell_in_the_shipped_experiments_dry_runs(tmp_path, monkeypatch):
    """Every experiment loads and plans; one cell of each kind (:func:`_code_path`) across all of them
    trains one step on tiny data and is evaluated. The first cell draws its pictures (the same code for
    every cell); the others skip them. Every cell of every file, pictures included: the slow test below."""
    from juap.app import history
    from juap.app.runs import new_run_dir
    from juap.commands.attack import run_attack

    seen, ran = set(), 0
    for path in EXPERIMENTS:
        exp = load_experiment(path)
        assert plan(exp), f"{path} plans no cell"
        tiny = dry_run_experiment(exp, tmp_path / path.parent.name / path.stem)
        if ran:
            tiny = dataclasses.replace(tiny, evaluate=dataclasses.replace(tiny.evaluate, figure_count=0))
        for cell in plan(tiny):
            # each kind of cell once, and each classifier with each attack and interpreter once
            kinds = {_code_path(cell), (cell.classifier.name, cell.attack, cell.interpreter)}
            if kinds <= seen:
                continue
            seen |= kinds
            d = new_run_dir(tmp_path / "cells" / f"{ran:03d}", command="attack", overwrite=True)
            m = run_attack(cell_config(tiny, cell, progress=False), d, progress=False)
            assert 0.0 <= m["fooling_ratio"] <= 1.0, (path.name, cell.variant)
            if (d / "curves.png").is_file():  # drawn once here (test_history checks the plot)
                monkeypatch.setattr(history, "plot_curves", lambda *a, **k: None)
            ran += 1
    assert ran >= 20  # the shipped files hold many kinds (a guard against a plan that came out empty)


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_experiment_config_loads_resolves_and_dry_runs(path, dry_run_dir):
    """Each experiment loads, resolves every name, and every cell runs one step on tiny data. Identical
    dry-run cells across data sets (ImageNet / Chest X-Ray / Intel differ only in data and weights) share
    one folder, so each distinct cell runs once."""
    exp = load_experiment(path)
    cells = plan(exp)
    assert cells, f"{path} plans no cell"
    tiny = dry_run_experiment(exp, dry_run_dir)
    res = run_grid(tiny, dry_run_dir / "run", progress=False)
    assert res["complete"] == res["cells"] == len(cells)
    for r in res["rows"]:
        assert 0.0 <= r["fooling_ratio"] <= 1.0
    write_results(tiny, dry_run_dir / "run", res)
    for table in exp.tables:
        assert table.title in (dry_run_dir / "run" / "results.md").read_text()


def test_merge_reuses_the_same_configuration_under_another_label(tmp_path):
    """A lambda-sweep point equal to another experiment's cell (same config, other name) is not rerun."""
    base = GRID + "  juap: {lam: 0.05}\n"
    a = load_experiment(_exp(tmp_path, base, "a.yaml"))
    b = load_experiment(_exp(tmp_path, base, "b.yaml"), ["grid.variants=[{lam: 0.05}, {lam: 0.1}]"])
    run_grid(a, tmp_path / "a", run_cell=_fake_cell([]))
    calls: list = []
    res = run_grid(b, tmp_path / "b", merge=[tmp_path / "a"], run_cell=_fake_cell(calls))
    assert res["complete"] == res["cells"] == 2 + 8
    assert len(calls) == 4 and all("lam=0.1" in c for c in calls)


def test_the_runs_seed_seeds_the_attack_unless_its_params_do():
    """``--set seed=1`` (a grid's seed, or juap attack's) reaches an attack's own ``seed`` (its generator,
    noise and data order), not only the loader; an explicit ``attack.params.seed`` wins."""
    import juap
    from juap.commands.build import build_attack
    from juap.commands.configs import AttackConfig

    clf = juap.create_classifier("small_resnet", num_classes=4, widths=(4, 8, 8))
    assert build_attack(AttackConfig(name="guap", norm="linf", eps=10), clf, None, seed=5).seed == 5
    fixed = AttackConfig(name="sgd_uap", norm="linf", eps=10, params={"seed": 2})
    assert build_attack(fixed, clf, None, seed=5).seed == 2
    assert build_attack(AttackConfig(name="pgd", norm="linf", eps=10), clf, None, seed=5).seed is None


# -- learned interpreters' checkpoints: declared by capability, not named --------------------------------
RECORDED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "claims"
RECORDED_VERSION = "0.2.0"  # the juap version the recorded claims cells were run with (part of every id)


@pytest.mark.parametrize(
    "config, run",
    [("claims.yaml", f"embedded-claims/seed{s}") for s in (0, 1, 2)]
    + [("pareto.yaml", "embedded-pareto/seed0")]
    + [
        (f"{name}.yaml", f"embedded-{name.replace('_', '-')}/seed0")
        for name in ("fronts", "fronts_rts", "longer")
    ],
)
def test_the_recorded_claims_cells_are_still_planned(config, run, monkeypatch):
    """Every cell of the recorded claims run (benchmarks/results/claims/*/transfer.csv) keeps its id, so
    ``bench_claims.py --collect-only`` and a re-run still find it: ``checkpoints: {rts: ...}`` hashes as
    the ``rts_checkpoint`` key it replaced. A recorded cell of a setting the experiment no longer has
    (a variant dropped from the grid) is not asked for."""
    import csv

    import juap.commands.run as run_module

    monkeypatch.setattr(run_module, "__version__", RECORDED_VERSION)
    exp = load_experiment(CONFIGS / "embedded" / config)
    seed = int(run.rsplit("seed", 1)[1])
    ids = {c.id for c in plan(dataclasses.replace(exp, seed=seed))}
    with open(RECORDED / run / "transfer.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = {i.rsplit("-", 1)[0] for i in ids}  # a cell's name is its id without the hash
    recorded = {r["cell"] for r in rows if r["cell"].rsplit("-", 1)[0] in names}
    assert recorded and recorded <= ids


def test_the_committed_real_model_cells_keep_their_ids():
    """benchmarks/bench_real_fronts.py reuses its committed cells (real_model/fronts_cells.json) by id:
    every one of them is planned again by the shipped real-model configs (the shipped files now write
    ``feature_weight``, which a cell's id hashes under its first name, ``rts_feature_weight``)."""
    import json

    committed = json.loads((RECORDED.parent / "real_model" / "fronts_cells.json").read_text())
    exps = [
        load_experiment(CONFIGS / "real" / n)
        for n in ("efficientnet_lite0.yaml", "fronts_efficientnet_lite0.yaml")
    ]
    ids = set()
    for exp in exps:  # as the benchmark plans them: one variant at a time, the ResNet generator
        for variants in [(v,) for v in exp.grid.variants] or [()]:
            one = dataclasses.replace(exp, grid=dataclasses.replace(exp.grid, variants=variants))
            for seed in {r["seed"] for r in committed}:
                ids |= {c.id for c in plan(dataclasses.replace(one, seed=seed))}
    recorded = {r["cell"] for r in committed if r["generator"] != "unet" and r["method"] != "U-JUAP"}
    assert recorded and recorded <= ids


def test_a_renamed_hyperparameter_keeps_the_cell_id(tmp_path):
    """A config with a hyperparameter's old name (``rts_feature_weight``) plans the same cells as one with
    its new name (``feature_weight``): a renaming does not make recorded cells run again."""
    base = "name: t\ngrid:\n  attacks: [juap]\n  interpreters: [cam]\nattack_params:\n  juap: {{{}: 0.1}}\n"
    old = plan(load_experiment(_exp(tmp_path, base.format("rts_feature_weight"), "old.yaml")))
    new = plan(load_experiment(_exp(tmp_path, base.format("feature_weight"), "new.yaml")))
    assert [c.id for c in old] == [c.id for c in new]
    other = plan(
        load_experiment(_exp(tmp_path, base.format("feature_weight").replace("0.1", "0.2"), "x.yaml"))
    )
    assert [c.id for c in other] != [c.id for c in new]


def test_no_shipped_config_uses_an_old_hyperparameter_name():
    """The shipped files use the current names: a run of them prints no FutureWarning of a renaming."""
    from juap import ATTACKS

    old = {name for a in ATTACKS.names() for name in getattr(ATTACKS.get(a), "renamed", {})}
    assert old
    for path in CONFIGS.rglob("*.yaml"):
        text = path.read_text()
        assert not [n for n in old if f"{n}:" in text], path


def test_the_old_rts_checkpoint_key_is_migrated_with_a_warning(tmp_path):
    """``rts_checkpoint`` (before ``checkpoints``) still loads, moved to ``checkpoints: {rts: ...}`` with a
    FutureWarning naming the new key, and plans the same cells as the new spelling."""
    base = "name: t\ngrid:\n  attacks: [juap]\n  interpreters: [cam, rts]\n  classifiers:\n"
    old = _exp(tmp_path, base + "    - {name: small_resnet, rts_checkpoint: m.safetensors}\n", "old.yaml")
    new = _exp(tmp_path, base + "    - {name: small_resnet, checkpoints: {rts: m.safetensors}}\n", "new.yaml")
    with pytest.warns(
        FutureWarning, match=r"rts_checkpoint is deprecated: write .*checkpoints: \{rts: PATH\}"
    ):
        a = load_experiment(old)
    assert a.grid.classifiers[0].checkpoints == {"rts": "m.safetensors"}
    assert [c.id for c in plan(a)] == [c.id for c in plan(load_experiment(new))]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("grid: {classifiers: [{name: small_resnet, checkpoints: {cam: x}}]}", "takes no checkpoint"),
        ("grid: {classifiers: [{name: small_resnet, checkpoints: {rst: x}}]}", "Did you mean 'rts'"),
        ("evaluate: {checkpoints: {rts: x}}", "grid.classifiers[i].checkpoints"),
    ],
)
def test_checkpoints_name_learned_interpreters_per_classifier(tmp_path, text, needle):
    with pytest.raises(JuapError, match=re.escape(needle)):
        load_experiment(_exp(tmp_path, "name: t\n" + text))


def test_a_learned_interpreter_without_its_checkpoint_is_refused_by_its_cell(tmp_path):
    """The table's learned interpreters (evaluate.interpreters or the attacked one) need a file per
    classifier; the message names the capability's key, not a command."""
    exp = load_experiment(_exp(tmp_path, "name: t\ngrid: {attacks: [juap], interpreters: [rts]}\n"))
    with pytest.raises(ConfigError, match=r"RTS interpreter is a learned model.*checkpoints: \{rts: PATH\}"):
        cell_config(exp, plan(exp)[0])
    with_file = load_experiment(
        _exp(
            tmp_path,
            "name: t\ngrid: {attacks: [uap], classifiers: [{name: small_resnet, checkpoints: {rts: f}}]}\n",
        )
    )
    cfg = cell_config(with_file, plan(with_file)[0])
    assert cfg.evaluate.checkpoints == {"rts": "f"} and cfg.interpreter.checkpoint is None
