"""What a training loop leaves in its run folder (issue 16, parts 1 and 2) and the loop engine under it:
history.csv and curves.png for every trainer, a resumed run continuing the same files, TensorBoard
events read back with TensorBoard's own reader."""

from __future__ import annotations

import csv
import json
import signal
import sys

import pytest
import torch

import juap
from helpers import CLI_TINY_DATA, tiny_trained_classifier
from helpers import run_cli as run
from juap.app.history import RunLog, flatten
from juap.errors import ConfigError
from juap.runtime.checkpoint import RunInterrupted
from juap.runtime.loop import Checkpointing, TrainLoop

GEN = {"ngf": 4, "n_blocks": 1}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "attack, params, step_key, steps",
    [
        (
            "juap",
            {"steps": 6, "eval_every": 3, "batch_size": 8, "lam": 0.2, "delta": -0.5, "hinge": "image"},
            "step",
            6,
        ),
        ("guap", {"steps": 4, "eval_every": 2, "batch_size": 8}, "step", 4),
        ("sgd_uap", {"epochs": 2}, "epoch", 2),
        ("uap", {"max_passes": 2, "target_fooling_rate": 1.0}, "pass", 2),
        ("jap", {"steps": 3}, "step", None),
    ],
)
def test_every_attack_with_steps_writes_its_history_and_curves(
    tmp_path, capsys, clf_path, attack, params, step_key, steps
):
    out = tmp_path / attack
    params = {**params, "generator_options": GEN} if attack in ("juap", "guap", "jap") else params
    sets = [
        f"classifier.weights={clf_path}",
        f"attack.name={attack}",
        "attack.eps=16",
        f"attack.params={json.dumps(params)}",
    ]
    if attack in ("juap", "jap"):
        sets.append("interpreter.name=cam")
    argv = ["attack", "--out", str(out), "--no-progress", *CLI_TINY_DATA]
    code, _, err = run(capsys, *argv, *(a for s in sets for a in ("--set", s)))
    assert code == 0, err
    rows = _rows(out / "history.csv")
    assert rows and list(rows[0])[0] == step_key
    seen = [int(r[step_key]) for r in rows]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # one row per step, in order
    if steps is not None:
        assert seen == list(range(1, steps + 1))
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows if r.get("loss"))  # finite numbers
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    if attack in ("juap", "guap"):  # validations: every eval_every steps and at the end
        val = [int(r["step"]) for r in rows if r["val_fooling_ratio"]]
        assert val == list(range(params["eval_every"], steps + 1, params["eval_every"]))
        assert all(0 <= float(r["batch_fooling_ratio"]) <= 1 for r in rows)
    if attack == "juap":  # lambda, the map term and the share of images at the hinge are logged
        assert {"lam", "map_loss", "fool_loss", "at_hinge"} <= set(rows[0])
        assert all(float(r["fool_loss"]) >= params["delta"] - 1e-6 for r in rows)  # the hinge holds


def test_train_classifier_and_train_rts_write_history_and_curves(tmp_path, capsys):
    clf_dir, rts_dir = tmp_path / "clf", tmp_path / "rts"
    code, _, err = run(
        capsys,
        "train-classifier",
        "--out",
        str(clf_dir),
        "--no-progress",
        *CLI_TINY_DATA,
        "--set",
        "train.epochs=2",
        "--set",
        "train.batch_size=16",
        "--set",
        "classifier.options={widths: [4, 8, 8]}",
    )
    assert code == 0, err
    rows = _rows(clf_dir / "history.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))  # 48 images / 16 per step x 2 epochs
    assert {"loss", "accuracy", "lr", "epoch"} <= set(rows[0]) and (clf_dir / "curves.png").is_file()
    assert [int(r["epoch"]) for r in rows] == [1, 1, 1, 2, 2, 2]
    code, _, err = run(
        capsys,
        "train-rts",
        "--out",
        str(rts_dir),
        "--no-progress",
        *CLI_TINY_DATA,
        "--set",
        f"classifier.weights={clf_dir / 'classifier.safetensors'}",
        "--set",
        "classifier.options={widths: [4, 8, 8]}",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=16",
    )
    assert code == 0, err
    rows = _rows(rts_dir / "history.csv")
    assert len(rows) == 3 and {"total", "preserve", "destroy", "area", "tv", "lr"} <= set(rows[0])
    assert (rts_dir / "curves.png").is_file()


def test_a_resumed_run_continues_the_same_history(tmp_path):
    """Interrupted by SIGINT (at the step after the signal), resumed: history.csv holds steps 1-8 once,
    equal to an uninterrupted run's."""
    clf, x, _ = tiny_trained_classifier()
    x = x[:48]
    cam = juap.create_interpreter("cam", clf)
    kw = dict(
        classifier=clf,
        interpreter=cam,
        norm="linf",
        eps=16,
        steps=8,
        eval_every=2,
        batch_size=8,
        generator_options=GEN,
        seed=3,
    )
    whole_dir, cut_dir = tmp_path / "whole", tmp_path / "cut"
    whole_dir.mkdir()
    cut_dir.mkdir()
    log = RunLog(whole_dir)
    juap.create_attack("juap", **kw).fit(x, progress=False, log=log)
    log.finish()

    def stop_at_4(step, perturbation):
        if step == 4:
            signal.raise_signal(signal.SIGINT)

    log = RunLog(cut_dir)
    with pytest.raises(RunInterrupted):
        juap.create_attack("juap", **kw).fit(
            x, progress=False, checkpoint=Checkpointing(cut_dir, every=100), log=log, callback=stop_at_4
        )
    assert [int(r["step"]) for r in _rows(cut_dir / "history.csv")] == [1, 2, 3, 4, 5]  # = the checkpoint's
    log = RunLog(cut_dir)
    juap.create_attack("juap", **kw).fit(
        x, progress=False, checkpoint=Checkpointing(cut_dir, resume=True), log=log
    )
    log.finish()
    whole, resumed = _rows(whole_dir / "history.csv"), _rows(cut_dir / "history.csv")
    assert [int(r["step"]) for r in resumed] == list(range(1, 9))
    assert resumed == whole  # the same losses, ratios and validations, bitwise (CPU)


def test_tensorboard_events_are_read_back_by_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, tensorboard=True)
    n_hat = torch.linspace(-0.04, 0.04, 3 * 8 * 8).reshape(3, 8, 8)
    for step in range(1, 6):
        row = {"step": step, "loss": 1.0 / step, "batch_fooling_ratio": step / 10}
        if step % 2 == 0:
            row["val"] = {"fooling_ratio": step / 8, "iou": 0.5, "interpreters": {"cam": {}}}
        log(row, {"perturbation": n_hat} if step % 2 == 0 else None)
    log.finish(selected=4, hinge=-0.8)
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/batch_fooling_ratio", "val/fooling_ratio", "val/iou"} <= set(tags["scalars"])
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert [e.step for e in acc.Scalars("val/fooling_ratio")] == [2, 4]
    assert [e.step for e in acc.Images("perturbation")] == [2, 4]
    assert (tmp_path / "history.csv").is_file() and (tmp_path / "curves.png").is_file()


def test_tensorboard_through_the_command_line(tmp_path, capsys, clf_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    params = {"steps": 4, "eval_every": 2, "batch_size": 8, "generator_options": GEN}
    sets = [
        f"classifier.weights={clf_path}",
        "attack.name=guap",
        "attack.eps=16",
        f"attack.params={json.dumps(params)}",
        "log.tensorboard=true",
    ]
    code, _, err = run(
        capsys,
        "attack",
        "--out",
        str(out),
        "--no-progress",
        *CLI_TINY_DATA,
        *(a for s in sets for a in ("--set", s)),
    )
    assert code == 0, err
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/fool_loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("val/fooling_ratio")] == [2, 4]


def test_missing_tensorboard_is_a_one_line_message_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"juap\[tensorboard\]"):
        RunLog(".", tensorboard=True)


def test_flatten_keeps_one_level_of_scalars():
    row = {"step": 3, "loss": 0.5, "val": {"iou": 0.4, "per_class": {"a": 1}, "n": 7}, "skip": [1, 2]}
    assert flatten(row) == {"step": 3, "loss": 0.5, "val_iou": 0.4, "val_n": 7}


def test_the_loop_engine_rolls_back_stops_early_and_resumes(tmp_path):
    """The engine by itself: a NaN step is rolled back with the lr halved, a trainer can end the loop
    early, and a resumed loop continues from the checkpoint's step with its history."""
    w = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([w], lr=1.0)
    calls = []

    def step(i):
        calls.append(i)
        if i == 3 and calls.count(3) == 1:
            from juap.errors import NumericalError

            raise NumericalError("the loss became nan")
        w.data += 1
        loop.finished = i == 5
        return {"loss": float(w.detach())}

    snap = lambda: {"w": w.detach().clone()}  # noqa: E731
    load = lambda s: w.data.copy_(s["w"])  # noqa: E731
    loop = TrainLoop("toy", 10, checkpoint=Checkpointing(tmp_path, every=1), progress=False)
    loop.run(step, snapshot=snap, load=load, optimizer=opt)
    assert calls == [1, 2, 3, 4, 5]  # step 3 rolled back (not rerun), and the loop ended after step 5
    assert [r.get("rolled_back_to") for r in loop.history if "rolled_back_to" in r] == [2]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    loop = TrainLoop("toy", 10, checkpoint=Checkpointing(tmp_path, resume=True), progress=False)
    calls.clear()
    loop.run(step, snapshot=snap, load=load, optimizer=opt)
    assert calls == [6, 7, 8, 9, 10] and float(w.detach()) == 4 + 5
    assert [r["step"] for r in loop.history if "loss" in r] == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    with pytest.raises(ConfigError):
        TrainLoop("toy", 10, checkpoint=Checkpointing(tmp_path, every=0))
