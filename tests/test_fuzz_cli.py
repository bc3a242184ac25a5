"""Property-based tests of the command line (hypothesis): whatever a user passes, `juap attack` and
`juap evaluate` either finish (exit 0) with finite metrics, or stop with exit code 2 and a one-line
error, never a Python traceback.

Inputs: random ``--set`` values for the keys a user touches (budget, norm, attack and its
hyperparameters, data size and split, interpreters, batch sizes, unknown keys, values of the wrong type),
random data folders of small files (images of random PIL modes and sizes, random bytes, empty, truncated
and text files), and random perturbation files (safetensors of random shapes, dtypes and values, with or
without a budget; random bytes; pickles). Every example is a real in-process CLI run on tiny models and
data, so the default examples are few and derandomised (the same inputs every run: CI cannot turn red
by chance); ``-m slow`` runs many more, freshly drawn.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import juap
from helpers import CLI_TINY_DATA
from helpers import run_cli as run

FAST = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MANY = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- values ------------------------------------------------------------------------------------------
ODD_FLOATS = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-9, 0.5, 1.0, 24.0, 1e9]
YAML_SCALARS = st.one_of(
    st.sampled_from(ODD_FLOATS),
    st.integers(-3, 300),
    st.booleans(),
    st.none(),
    st.text("abcxyz_-.", max_size=6),
    st.sampled_from(["[]", "[1, 2]", "{a: 1}", "'10'", "~", "1e400", "-0", "0x10"]),
)


def yaml(v) -> str:
    """A value as a user types it after ``--set key=``."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return ".nan" if math.isnan(v) else (".inf" if v > 0 else "-.inf") if math.isinf(v) else repr(v)
    return str(v)


# Cheap hyperparameters for each attack; random extras are drawn on top. Never drawn: what makes a
# run long (the generator's width, torch.compile, bf16 autocast, many steps).
CHEAP = {
    "guap": {"steps": 2, "batch_size": 8, "eval_every": 2, "generator_options": "{ngf: 4, n_blocks: 1}"},
    "juap": {"steps": 2, "batch_size": 8, "eval_every": 2, "generator_options": "{ngf: 4, n_blocks: 1}"},
    "guap_ct": {"steps": 2, "batch_size": 8, "target": 1, "generator_options": "{ngf: 4, n_blocks: 1}"},
    "jap": {"steps": 2, "generator_options": "{ngf: 4, n_blocks: 1}"},
    "pgd": {"steps": 2},
    "sgd_uap": {"epochs": 1},
    "uap": {"max_passes": 1, "deepfool_steps": 2},
}
SIZE_KEYS = ("steps", "epochs", "max_passes", "deepfool_steps", "nb_grads", "batch_size", "eval_every")
EXTRA_KEYS = ("lam", "delta", "objective", "target", "generator", "lr", "tau", "fool_loss", "hinge",
              "warmup", "selection", "step_size", "decay", "beta", "overshoot", "random_start", "seed",
              "target_fooling_rate", "use_labels", "fr_target", "stpes", "nope")  # fmt: skip


def either(odd: bool):
    """``pick(valid, odd_values)``: the valid values alone, or (``odd``) the valid and the odd ones."""
    return (lambda valid, odd_values: st.one_of(valid, odd_values)) if odd else (lambda valid, _: valid)


@st.composite
def attack_params(draw, name: str, odd: bool) -> str:
    params = dict(CHEAP.get(name, {"steps": 2}))
    if odd:
        for key in draw(st.lists(st.sampled_from(SIZE_KEYS + EXTRA_KEYS), max_size=2, unique=True)):
            params[key] = yaml(draw(st.integers(-1, 4)) if key in SIZE_KEYS else draw(YAML_SCALARS))
    else:
        params["seed"] = draw(st.integers(0, 9))
        if name in ("juap", "jap", "guap", "guap_ct"):
            params["steps"] = draw(st.integers(1, 3))
    return "{" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}"


@st.composite
def settings_for(draw, command: str, odd: bool) -> list:
    """``--set`` options: the attack (for `attack`), then random values of the keys users change; with
    ``odd``, values out of range, of the wrong type, unknown keys and names."""
    pick = either(odd)
    out = []
    if command == "attack":
        name = draw(pick(st.sampled_from(list(CHEAP)), st.just("nope")))
        out += ["attack.name=" + name, "attack.params=" + draw(attack_params(name, odd))]
        if name in ("juap", "jap"):
            interpreter = pick(st.sampled_from(["cam", "gradcam"]), st.sampled_from(["null", "rts", "nope"]))
            out.append("interpreter.name=" + draw(interpreter))
    choices = {
        "attack.val_fraction": pick(st.sampled_from([0.0, 0.1, 0.5]), st.sampled_from([-0.1, 0.9, math.nan])),
        "data.image_size": pick(st.sampled_from([16, 24, 32, 64]), st.sampled_from([0, 8, 15, 33])),
        "data.num_images": pick(st.sampled_from([24, 40, 96, 150]), st.sampled_from([-1, 0, 11, 12])),
        "data.num_classes": pick(st.integers(2, 6), st.sampled_from([-1, 0, 1, 7])),
        "data.train_fraction": pick(st.sampled_from([0.2, 0.5, 0.7]), st.sampled_from([0.0, 0.05, 1.5])),
        "data.test_fraction": pick(st.sampled_from([0.1, 0.25, 0.3]), st.sampled_from([0.0, 0.05, -1.0])),
        "data.split_seed": st.integers(0, 5),
        "evaluate.batch_size": pick(st.integers(1, 70), st.integers(-1, 0)),
        "evaluate.max_images": pick(st.sampled_from(["null", "1", "5"]), st.sampled_from(["0", "-3"])),
        "evaluate.interpreters": pick(
            st.sampled_from(["[]", "[cam]", "[cam, gradcam]", "[gradcam]"]),
            st.sampled_from(["[rts]", "[nope]", "cam"]),
        ),  # fmt: skip
        "device": pick(st.sampled_from(["cpu", "auto"]), st.sampled_from(["cuda", "tpu"])),
        "seed": st.integers(0, 3),
    }
    if command == "attack" or odd:  # evaluate takes the file's budget; a config budget is for odd runs
        choices["attack.eps"] = pick(st.sampled_from([1.0, 10.0, 24.0, 255.0, 2000.0]),
                                     st.one_of(st.sampled_from(ODD_FLOATS), st.just("ten")))  # fmt: skip
        choices["attack.norm"] = pick(st.sampled_from(["linf", "l2"]), st.sampled_from(["l1", "3", "null"]))
    if odd:
        choices.update({
            "data.name": st.sampled_from(["folder", "imagenet", "nope"]),
            "classifier.name": st.sampled_from(["resnet18", "nope"]),
            "classifier.num_classes": st.sampled_from(["0", "3"]),
            "data.nope": YAML_SCALARS,
        })  # fmt: skip
    for key in draw(st.lists(st.sampled_from(sorted(choices)), max_size=3, unique=True)):
        out.append(f"{key}={yaml(draw(choices[key]))}")
    return [a for v in out for a in ("--set", v)]


# -- files -------------------------------------------------------------------------------------------
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
FORMATS = {".png": "PNG", ".tif": "TIFF", ".jpg": "JPEG", ".bmp": "BMP", ".gif": "GIF"}


@st.composite
def small_file(draw, odd: bool) -> tuple:
    """(name, bytes) of one file of a data folder: an image of a random PIL mode and size, or (``odd``)
    random bytes, an empty, truncated or text file."""
    kind = draw(either(odd)(st.just("image"), st.sampled_from(["bytes", "empty", "truncated", "text"])))
    ext = draw(st.sampled_from([*FORMATS, *([".txt"] if odd else [])]))
    if kind in ("image", "truncated"):
        mode = draw(st.sampled_from(MODES))
        w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        arr = np.random.default_rng(draw(st.integers(0, 1000))).random((h, w, 3))
        im = Image.fromarray((arr * 255).astype(np.uint8))
        if mode in ("I;16", "I", "F"):
            gray = arr[..., 0]
            peak = draw(st.sampled_from([1.0, 3.0])) if odd else 1.0  # a float image beyond [0, 1]: refused
            im = Image.fromarray(
                {
                    "I;16": (gray * 65535).astype(np.uint16),
                    "I": (gray * 65535).astype(np.int32),
                    "F": (gray * peak).astype(np.float32),
                }[mode]  # fmt: skip
            )
        elif mode != "RGB":
            im = im.convert(mode)
        buf = io.BytesIO()
        try:
            im.save(buf, format=FORMATS.get(ext, "PNG"))
        except (OSError, ValueError, KeyError):  # this format cannot hold this mode: a PNG or TIFF then
            buf = io.BytesIO()
            ext = ".tif" if mode in ("I", "F", "CMYK") else ".png"
            im.save(buf, format=FORMATS[ext])
        data = buf.getvalue()
        if kind == "truncated":
            data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "bytes":
        data = draw(st.binary(max_size=300))
    elif kind == "text":
        data = draw(st.text(max_size=50)).encode()
    else:
        data = b""
    return kind + ext, data


@st.composite
def data_folder(draw, odd: bool) -> dict:
    """{class name: [(file name, bytes), ...]}: two or three class folders (``odd``: or one)."""
    names = st.lists(st.sampled_from(["a", "b", "c"]), min_size=2, max_size=3, unique=True)
    classes = draw(either(odd)(names, st.just(["a"])))
    return {c: draw(st.lists(small_file(odd), min_size=1, max_size=6)) for c in classes}


def write_folder(root: Path, folder: dict) -> None:
    for c, files in folder.items():
        (root / c).mkdir(parents=True)
        for k, (name, data) in enumerate(files):
            (root / c / f"{k}{name}").write_bytes(data)


@st.composite
def perturbation_file(draw, odd: bool) -> tuple:
    """(suffix, writer(path)): a (3, 32, 32) perturbation with or without its budget; with ``odd``, also
    other shapes and dtypes, NaN/Inf, huge values, budgets it exceeds, a wrong key, random bytes,
    pickles and empty files."""
    pick = either(odd)
    kind = draw(pick(st.just("safetensors"), st.sampled_from(["bytes", "pth", "empty"])))
    if kind == "bytes":
        data = draw(st.binary(max_size=500))
        return ".safetensors", lambda p: p.write_bytes(data)
    if kind == "empty":
        return draw(st.sampled_from([".safetensors", ".pth"])), lambda p: p.write_bytes(b"")
    odd_shapes = st.sampled_from([(3, 16, 16), (1, 32, 32), (32, 32), (3, 32, 32, 1)])
    shape = draw(pick(st.just((3, 32, 32)), odd_shapes))
    dtype = draw(pick(st.just(torch.float32), st.sampled_from([torch.float16, torch.float64, torch.int64])))
    scale = draw(pick(st.sampled_from([0.0, 1 / 255, 10 / 255, 0.5]), st.sampled_from([2.0, 1e30])))
    n = (torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) * 2 - 1) * scale
    if odd and draw(st.booleans()):
        n.view(-1)[draw(st.integers(0, n.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf]))
    n = n.to(dtype)
    key = draw(pick(st.just("perturbation"), st.just("noise")))
    norm = draw(pick(st.sampled_from(["linf", "l2"]), st.sampled_from(["l7", 3, ["linf"], None])))
    measured = float((n.float().norm() if norm == "l2" else n.float().abs().max()) * 255)  # its own norm
    odd_eps = st.sampled_from([0.0, 10.0, 255.0, 1e9, -1, "ten", math.inf, math.nan])
    eps = draw(pick(st.just(measured), odd_eps))
    meta = draw(st.one_of(st.none(), st.just({"norm": norm, "eps": eps, "attack": "uap"})))
    if kind == "pth":
        return ".pth", lambda p: torch.save({key: n}, p)
    return ".safetensors", lambda p: juap.runtime.io.save_tensors(p, {key: n}, meta)


# -- the property --------------------------------------------------------------------------------------
def finite_numbers(obj, where: str = "") -> list:
    """Paths of the non-finite numbers in a metrics.json object."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in finite_numbers(v, f"{where}.{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in finite_numbers(v, f"{where}[{i}]")]
    return [where] if isinstance(obj, float) and not math.isfinite(obj) else []


def check_outcome(command: str, code: int, err: str, out: Path) -> None:
    """Exit 0 with finite metrics, or exit 2 with one error line (beside warnings) and no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if code == 0:
        metrics = json.loads((out / "metrics.json").read_text())
        assert not finite_numbers(metrics), (finite_numbers(metrics), err)
        assert metrics.get("n_images", 1) >= 0
        return
    assert code == 2, (code, err)
    errors = [ln for ln in lines if ln.startswith(f"juap {command}: error: ")]
    assert len(errors) == 1, err
    others = [ln for ln in lines if ln not in errors and not ln.startswith(("warning: ", "WARNING: "))]
    assert not others, err


def _outcome(code: int, err: str) -> str:
    last = (err.strip().splitlines() or [""])[-1]
    return f"exit {code}" + ("" if code == 0 else ": " + last.split("error: ")[-1][:40])


@pytest.fixture(scope="module")
def clf_path(tmp_path_factory):
    torch.manual_seed(0)
    clf = juap.create_classifier("small_resnet", num_classes=4, widths=(4, 8, 8))
    path = tmp_path_factory.mktemp("fuzz") / "classifier.safetensors"
    juap.save_classifier(clf, path)
    return str(path)


def _attack(capsys, clf_path, sets, folder) -> None:
    with tempfile.TemporaryDirectory(prefix="juap-fuzz-") as tmp:
        tmp = Path(tmp)
        weights = ["--set", f"classifier.weights={clf_path}"]
        if folder is not None:  # a random classifier with as many classes as the folder has
            write_folder(tmp / "data", folder)
            weights = ["--set", "data.name=folder", "--set", f"data.root={tmp / 'data'}",
                       "--set", "classifier.options={widths: [4, 8, 8]}"]  # fmt: skip
        argv = ["attack", "--no-progress", "--out", str(tmp / "run"), *CLI_TINY_DATA, *weights, *sets]
        with warnings.catch_warnings():
            code, _, err = run(capsys, *argv)
        event(_outcome(code, err))  # --hypothesis-show-statistics: how many finish, and why the others stop
        check_outcome("attack", code, err, tmp / "run")


def _evaluate(capsys, clf_path, sets, pfile) -> None:
    suffix, write = pfile
    with tempfile.TemporaryDirectory(prefix="juap-fuzz-") as tmp:
        tmp = Path(tmp)
        path = tmp / f"p{suffix}"
        write(path)
        argv = ["evaluate", "-p", str(path), "--no-progress", "--out", str(tmp / "run"), *CLI_TINY_DATA,
                "--set", f"classifier.weights={clf_path}", *sets]  # fmt: skip
        with warnings.catch_warnings():
            code, _, err = run(capsys, *argv)
        event(_outcome(code, err))
        check_outcome("evaluate", code, err, tmp / "run")


@FAST
@given(sets=settings_for("attack", odd=False), folder=st.one_of(st.none(), data_folder(odd=False)))
def test_attack_with_random_valid_settings_and_images_finishes(capsys, clf_path, sets, folder):
    _attack(capsys, clf_path, sets, folder)


@FAST
@given(sets=settings_for("attack", odd=True), folder=st.one_of(st.none(), data_folder(odd=True)))
def test_attack_with_random_odd_settings_and_files_finishes_or_says_why(capsys, clf_path, sets, folder):
    _attack(capsys, clf_path, sets, folder)


@FAST
@given(sets=settings_for("evaluate", odd=False), pfile=perturbation_file(odd=False))
def test_evaluate_with_random_valid_settings_and_perturbations_finishes(capsys, clf_path, sets, pfile):
    _evaluate(capsys, clf_path, sets, pfile)


@FAST
@given(sets=settings_for("evaluate", odd=True), pfile=perturbation_file(odd=True))
def test_evaluate_with_random_odd_settings_and_files_finishes_or_says_why(capsys, clf_path, sets, pfile):
    _evaluate(capsys, clf_path, sets, pfile)


@pytest.mark.slow
@MANY
@given(odd=st.booleans(), data=st.data())
def test_attack_fuzzed_at_length(capsys, clf_path, odd, data):
    folder = data.draw(st.one_of(st.none(), data_folder(odd)))
    _attack(capsys, clf_path, data.draw(settings_for("attack", odd)), folder)


@pytest.mark.slow
@MANY
@given(odd=st.booleans(), data=st.data())
def test_evaluate_fuzzed_at_length(capsys, clf_path, odd, data):
    pfile = data.draw(perturbation_file(odd))
    _evaluate(capsys, clf_path, data.draw(settings_for("evaluate", odd)), pfile)


def test_the_outcome_check_can_fail(tmp_path):
    """The property's own check refuses a traceback, a second error line and a NaN in the metrics."""
    (tmp_path / "metrics.json").write_text(json.dumps({"fooling_ratio": float("nan")}))
    bad = [(0, ""), (2, "Traceback (most recent call last):\n..."), (2, "juap attack: error: a\nb"),
           (1, "juap attack: error: a")]  # fmt: skip
    for code, err in bad:
        with pytest.raises(AssertionError):
            check_outcome("attack", code, err, tmp_path)
    check_outcome("attack", 2, "warning: skipped 1 file\njuap attack: error: a", tmp_path)
    assert os.environ.get("JUAP_CACHE")  # the synthetic data of the examples stays in the test cache
