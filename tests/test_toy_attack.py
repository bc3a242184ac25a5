"""A new attack is one file: a toy universal attack written against the trainer protocol (the class below,
about 20 lines) runs through ``juap attack`` and a one-cell ``juap run`` grid and gets its tables, with no
other change to juap. The fit itself (checks, loop, checkpoints, history) is the base class's."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import CLI_TINY_DATA, run_cli
from juap._registry import ATTACKS
from juap._validate import Param
from juap.attacks.base import FitResult, UniversalAttack, first_images
from juap.budget import apply_perturbation, perturbation_norm, project


class ToySign(UniversalAttack):
    """Signed-gradient ascent of the CE on one perturbation, on the first batch only."""

    name, label = "toy_sign", "Toy"
    hyperparams = {"steps": Param(int, low=1), "step_size": Param(float, low=0, low_open=True)}

    def __init__(self, *, steps: int = 3, step_size: float = 0.5, **kw) -> None:
        super().__init__(**kw)
        self.check_arguments(locals())
        self.steps, self.step_size = steps, step_size

    num_steps = property(lambda self: self.steps)

    def init(self, data, val_data, *, progress: bool = True) -> None:
        self.x = first_images(data, self.device)
        self.y, self.v = self.classifier(self.x).argmax(1), torch.zeros_like(self.x[0])

    def step(self, i: int):
        v = self.v.clone().requires_grad_(True)
        loss = F.cross_entropy(self.classifier(apply_perturbation(self.x, v)), self.y)
        loss.backward()
        self.v = project(self.v + self.step_size * self.zeta * v.grad.sign(), norm=self.norm, eps=self.eps)
        return {"loss": loss.item()}

    def state_dict(self):
        return {"v": self.v}

    def load_state_dict(self, state) -> None:
        self.v = state["v"].to(self.device)

    def result(self) -> FitResult:
        return FitResult(self.v)


@pytest.fixture
def toy(monkeypatch):
    """ToySign registered as ``toy_sign`` for one test (the registry is the only place juap looks)."""
    monkeypatch.setitem(ATTACKS._entries, "toy_sign", ToySign)
    return ToySign


@pytest.fixture(scope="module")
def clf_path(tmp_path_factory):
    import juap

    torch.manual_seed(0)
    clf = juap.create_classifier("small_resnet", num_classes=4, widths=(4, 8, 8))
    return str(juap.save_classifier(clf, tmp_path_factory.mktemp("clf") / "classifier.safetensors"))


def test_the_protocol_gives_a_fit_with_defaults_checks_and_history(toy):
    import juap

    assert toy.hyperparams["steps"].default == 3  # the declaration takes the constructor's default
    clf = juap.create_classifier("small_resnet", num_classes=4, widths=(4, 8, 8))
    with pytest.raises(juap.ConfigError, match="steps"):
        juap.create_attack("toy_sign", classifier=clf, steps=0)
    attack = juap.create_attack("toy_sign", classifier=clf, norm="linf", eps=8, steps=4)
    v = attack.fit(torch.rand(6, 3, 32, 32), progress=False)
    assert v.shape == (3, 32, 32) and float(perturbation_norm(v, "linf")) <= 8 + 1e-3
    assert [r["step"] for r in attack.history] == [1, 2, 3, 4] and attack.fit_result.perturbation is v
    with pytest.raises(juap.ConfigError, match="empty"):
        attack.fit(torch.rand(0, 3, 32, 32), progress=False)


def test_juap_attack_runs_a_new_attack(toy, clf_path, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["attack", "--out", str(out), "--no-progress", *CLI_TINY_DATA]
    argv += ["--set", f"classifier.weights={clf_path}", "--set", "attack.name=toy_sign"]
    argv += ["--set", "attack.eps=16", "--set", "attack.params={steps: 2}"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["attack"] == "toy_sign" and 0 <= metrics["fooling_ratio"] <= 1
    assert metrics["perturbation_linf"] <= 16 + 1e-3 and (out / "perturbation.safetensors").is_file()
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 2  # the header and two steps


def test_a_one_cell_grid_runs_a_new_attack_and_tables_it(toy, clf_path, tmp_path, capsys):
    spec = {
        "name": "toy-grid",
        "data": {"image_size": 32, "num_images": 96, "num_classes": 4, "train_fraction": 0.5},
        "grid": {
            "attacks": ["toy_sign"],
            "classifiers": [{"name": "small_resnet", "weights": clf_path, "options": {"widths": [4, 8, 8]}}],
        },
        "attack_params": {"toy_sign": {"steps": 2}},
        "evaluate": {"interpreters": ["cam"]},
        "device": "cpu",
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = run_cli(capsys, "run", str(path), "--out", str(tmp_path / "grid"), "--no-progress")
    assert code == 0, err
    assert "1 of 1 cells finished" in out
    rows = (tmp_path / "grid" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("Toy,")  # the declared label names the row


class ToyRounds(ToySign):
    """ToySign for ``rounds`` rounds of ``steps``: a loop length under a name no juap command knows, with
    its dry-run size declared beside its type."""

    name, label = "toy_rounds", "ToyRounds"
    hyperparams = {
        "steps": Param(int, low=1, dry_run=1),
        "step_size": Param(float, low=0, low_open=True),
        "rounds": Param(int, low=1, dry_run=1),
    }

    def __init__(self, *, rounds: int = 4, **kw) -> None:
        super().__init__(**kw)
        self.check_arguments(locals())
        self.rounds = rounds

    num_steps = property(lambda self: self.steps * self.rounds)


def test_a_new_attack_dry_runs_in_one_step_from_its_declarations(monkeypatch, clf_path, tmp_path):
    """``juap run --dry-run`` shrinks an attack by what its parameters declare (``dry_run=1`` on ``rounds``
    and ``steps``), not by parameter names the command knows: the toy's cell trains one step."""
    from juap.commands.run import dry_run_experiment, load_experiment, run_grid

    monkeypatch.setitem(ATTACKS._entries, "toy_rounds", ToyRounds)
    spec = {
        "name": "toy-dry",
        "grid": {"attacks": ["toy_rounds"], "classifiers": [{"name": "small_resnet", "weights": clf_path}]},
        "attack_params": {"toy_rounds": {"steps": 5, "rounds": 3, "step_size": 0.25}},
        "evaluate": {"interpreters": []},
        "device": "cpu",
    }
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(spec))
    tiny = dry_run_experiment(load_experiment(tmp_path / "toy.yaml"), tmp_path)
    assert tiny.attack_params["toy_rounds"] == {"steps": 1, "rounds": 1, "step_size": 0.25}
    res = run_grid(tiny, tmp_path / "run", progress=False)
    assert res["complete"] == res["cells"] == 1
    (history,) = (tmp_path / "run" / "cells").glob("*/history.csv")
    assert len(history.read_text().splitlines()) == 1 + 1  # the header and one step


def test_a_dry_run_size_must_fit_its_declaration():
    import juap

    with pytest.raises(juap.ConfigError, match="dry_run"):
        Param(int, low=1, dry_run=0)
    shrunk = ToyRounds.dry_run_params({"rounds": 9, "step_size": 0.1})
    assert shrunk == {"rounds": 1, "step_size": 0.1, "steps": 1}  # declared sizes win; the rest is kept
