"""The juap command line as a user runs it: run folders, artifacts, and clear errors without tracebacks."""

import json
import subprocess
import sys

import pytest
import torch

import juap
import juap.commands.cli
from helpers import CLI_TINY_DATA
from helpers import run_cli as run
from juap.commands.cli import main
from juap.runtime.io import load_tensors

DATA = CLI_TINY_DATA


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "train-classifier", "train-rts", "attack", "evaluate"):
        assert cmd in out


def test_train_classifier_writes_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(
        capsys,
        "train-classifier",
        "--out",
        str(out),
        "--no-progress",
        *DATA,
        "--set",
        "train.epochs=1",
        "--set",
        "classifier.options={widths: [4, 8, 8]}",
    )
    assert code == 0, stdout
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["test_accuracy"] <= 1 and m["test_images"] == 24
    assert (out / "classifier.safetensors").is_file() and (out / "config.yaml").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 48 and not set(split["train"]) & set(split["test"])
    again = juap.load_classifier(out / "classifier.safetensors")
    assert again.num_classes == 4


def test_attack_and_evaluate_end_to_end(tmp_path, capsys, clf_path):
    out = tmp_path / "att"
    code, stdout, err = run(
        capsys,
        "attack",
        "--out",
        str(out),
        "--no-progress",
        *DATA,
        "--set",
        f"classifier.weights={clf_path}",
        "--set",
        "interpreter.name=cam",
        "--set",
        "attack.name=juap",
        "--set",
        "attack.eps=16",
        "--set",
        "attack.params={steps: 4, batch_size: 16, eval_every: 2, generator_options: {ngf: 8, n_blocks: 1}}",
    )
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "attack",
        "generator",
        "interpreter",
        "norm",
        "eps",
        "perturbation_norm",
        "fooling_ratio",
        "l1",
        "iou",
        "iou_per_k",
        "random_iou",
        "clean_accuracy",
        "adversarial_accuracy",
    ):
        assert key in m, key
    assert set(m["transfer"]) == {"cam", "gradcam"}
    assert m["perturbation_norm"] <= 16 + 1e-3
    summary = m["data_summary"]  # 96 images of 4 classes, 48 train (minus 5 validation), 24 test
    assert sum(summary["per_class"].values()) == 96 and len(summary["per_class"]) == 4
    assert (summary["train_images"], summary["val_images"], summary["test_images"]) == (43, 5, 24)
    assert sum(summary["test_per_class"].values()) == m["n_images"] == 24
    assert summary["skipped_files"] == 0 and summary["test_skipped_images"] == 0
    tensors, meta = load_tensors(out / "perturbation.safetensors")
    assert tensors["perturbation"].shape == (3, 32, 32) and meta["norm"] == "linf"
    assert (out / "perturbation.png").is_file() and (out / "generator.safetensors").is_file()
    assert "fooling ratio" in stdout and "applied in 8 bits" in stdout
    # the file says where it comes from and what it measured, as float and as applied in 8 bits
    clf = juap.load_classifier(clf_path)
    assert meta["classifier_fingerprint"] == juap.runtime.provenance.fingerprint(clf)
    assert meta["seed"] == 0 and meta["params"]["steps"] == 4 and meta["input_size"] == [32, 32]
    assert meta["data"]["image_size"] == 32 and "num_workers" not in meta["data"]  # which images, not how
    assert "classifier_weights" not in meta  # a file of this machine is no name to record
    assert meta["metrics"]["fooling_ratio"] == m["fooling_ratio"]
    assert meta["metrics"]["as_8bit"] == m["as_8bit"] and m["as_8bit"]["map_interpreter"] == "cam"
    assert abs(m["as_8bit"]["fooling_ratio"] - m["fooling_ratio"]) <= 0.25  # 8-bit rounding of 16 steps

    ev = tmp_path / "ev"
    code, stdout, err = run(
        capsys,
        "evaluate",
        "--perturbation",
        str(out / "perturbation.safetensors"),
        "--out",
        str(ev),
        "--no-progress",
        *DATA,
        "--set",
        f"classifier.weights={clf_path}",
    )
    assert code == 0, err
    m2 = json.loads((ev / "metrics.json").read_text())
    assert m2["fooling_ratio"] == pytest.approx(m["fooling_ratio"])
    assert (m2["attack"], m2["norm"], m2["eps"], m2["budget_source"]) == ("juap", "linf", 16, "file")
    assert m2["perturbation_norm"] == pytest.approx(m["perturbation_norm"])

    # the 8-bit PNG: its figures are those the attack's run reported as applied in 8 bits
    ev8 = tmp_path / "ev8"
    code, stdout, err = run(
        capsys, "evaluate", "--perturbation", str(out / "perturbation.png"), "--out", str(ev8),
        "--no-progress", *DATA, "--set", f"classifier.weights={clf_path}",
        "--set", "evaluate.transforms=[jpeg:75, resize:0.5]",
    )  # fmt: skip
    assert code == 0, err
    m3 = json.loads((ev8 / "metrics.json").read_text())
    assert m3["fooling_ratio"] == m["as_8bit"]["fooling_ratio"] == m3["as_8bit"]["fooling_ratio"]
    assert set(m3["robustness"]) == {"jpeg:75", "resize:0.5"} and "after jpeg:75: fooling ratio" in stdout
    robust = m3["robustness"].values()
    assert all(0 <= r["fooling_ratio"] <= 1 and r["map_interpreter"] == "cam" for r in robust)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--set", "attack.eps=0"], "attack.eps = 0.0 is out of range"),
        (["--set", "atack.name=juap"], "Did you mean 'attack'"),
        (["--set", "attack.name=juapp"], "unknown attack 'juapp'"),
        (["--set", "attack.params={stepz: 3}"], "Did you mean 'attack.params.steps'"),
        (["--set", "attack.name=juap"], "juap needs an interpreter"),
        (["--set", "interpreter.name=rts"], "needs its trained file"),
        (["--set", "classifier.weights=/nonexistent/c.safetensors"], "does not exist"),
    ],
)
def test_attack_errors_are_messages_not_tracebacks(tmp_path, capsys, clf_path, argv, message):
    base = ["attack", "--out", str(tmp_path / "x"), "--no-progress", *DATA]
    if not any("classifier.weights" in a for a in argv):
        base += ["--set", f"classifier.weights={clf_path}"]
    if "juap needs an interpreter" not in message:
        base += ["--set", "attack.name=guap"] if "attack.name" not in " ".join(argv) else []
    code, _, err = run(capsys, *base, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_evaluate_refuses_a_perturbation_of_another_size(tmp_path, capsys, clf_path):
    p = tmp_path / "p.safetensors"
    juap.runtime.io.save_tensors(p, {"perturbation": torch.zeros(3, 64, 64)})
    code, _, err = run(
        capsys,
        "evaluate",
        "--perturbation",
        str(p),
        "--out",
        str(tmp_path / "e"),
        *DATA,
        "--set",
        f"classifier.weights={clf_path}",
    )
    assert code == 2 and "64x64 but the data is resized to 32x32" in err and "--resize" in err
    code, _, err = run(
        capsys, "evaluate", "--perturbation", str(p), "--resize", "--out", str(tmp_path / "r"), *DATA,
        "--set", f"classifier.weights={clf_path}", "--set", "attack.eps=8",
    )  # fmt: skip
    assert code == 0, err
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["resized_from"] == [64, 64] and m["fooling_ratio"] == 0.0  # a zero perturbation stays zero


def test_existing_run_folder_is_refused(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x").write_text("x")
    code, _, err = run(capsys, "train-classifier", "--out", str(tmp_path / "r"), *DATA)
    assert code == 2 and "--overwrite" in err


def test_train_rts_then_attack_against_it(tmp_path, capsys, clf_path):
    rts_dir = tmp_path / "rts"
    code, stdout, err = run(
        capsys,
        "train-rts",
        "--out",
        str(rts_dir),
        "--no-progress",
        *DATA,
        "--set",
        f"classifier.weights={clf_path}",
        "--set",
        "train.epochs=1",
    )
    assert code == 0, err
    assert (rts_dir / "rts.safetensors").is_file() and "pointing game" in stdout
    code, _, err = run(
        capsys,
        "train-rts",
        "--out",
        str(tmp_path / "bad"),
        *DATA,
        "--set",
        f"classifier.weights={clf_path}",
        "--set",
        "classifier.name=resnet18",
    )
    assert (
        code == 2 and "saved for classifier 'small_resnet', not 'resnet18'" in err and "Traceback" not in err
    )
    out = tmp_path / "att"
    code, _, err = run(
        capsys,
        "attack",
        "--out",
        str(out),
        "--no-progress",
        *DATA,
        "--set",
        f"classifier.weights={clf_path}",
        "--set",
        "interpreter.name=rts",
        "--set",
        f"interpreter.checkpoint={rts_dir / 'rts.safetensors'}",
        "--set",
        "attack.params={steps: 2, batch_size: 16, generator_options: {ngf: 8, n_blocks: 1}}",
    )
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["transfer"]) == {"cam", "gradcam", "rts"} and m["map_interpreter"] == "rts"


def test_a_closed_pipe_ends_every_command_quietly(monkeypatch, capsys):
    """``juap ... | head``: when the reader goes away, exit 0 without an error line (any command)."""

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(juap.commands.cli, "_run_command", closed)
    code, out, err = run(capsys, "configs")
    assert (code, err) == (0, "")


def test_a_closed_pipe_in_a_real_process():
    cmd = [sys.executable, "-m", "juap", "configs"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before juap writes its first line
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == "", err
