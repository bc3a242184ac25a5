"""Data-parallel runs (juap.distributed): 2 gloo processes on CPU compute what 1 process computes.

The 2-process side is spawned with ``torch.multiprocessing`` and torchrun's environment variables; the
1-process side runs the same function in this process. Same global batch and seed on both sides:
- the generator's gradient of one JUAP-Grad-CAM step (double backward through the surrogate, losses
  all-reduced before the log and the hinge, DDP averaging) equals the 1-process gradient to 1e-5;
- the perturbation after a few Adam steps equals the 1-process one to 1e-5 (0-1 pixel units);
- the evaluation metrics (fooling ratio, accuracies, L1, IoU and its random floor) are equal to 1e-6
  and the image counts exactly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import juap
from juap import distributed
from juap.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8
PERTURBATION_TOL = 1e-5
GRAD_TOL = 1e-5
METRIC_TOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(40, 3, 32, 32, generator=g)  # (N, 3, 32, 32) in [0, 1]
    y = torch.randint(0, 4, (40,), generator=g)
    return x[:24], x[24:32], x[32:], y[32:]


def _models():
    torch.manual_seed(0)
    clf = juap.create_classifier("small_resnet", num_classes=4, widths=(4, 8, 16)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random affine BatchNorm and head: predictions that differ between images
        for m in clf.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1, 0.5, generator=g)
                m.bias.normal_(0, 0.5, generator=g)
        clf.fc.weight.normal_(0, 1, generator=g)
    return clf, juap.create_interpreter("gradcam", clf), juap.create_interpreter("cam", clf)


def _attack(clf, gradcam, **kw):
    return juap.create_attack(
        "juap",
        classifier=clf,
        interpreter=gradcam,
        norm="linf",
        eps=16,
        lam=0.5,
        steps=STEPS,
        batch_size=GLOBAL_BATCH,
        eval_every=STEPS,
        generator_options={"ngf": 4, "n_blocks": 1},
        seed=3,
        **kw,
    )


def run_experiment() -> dict:
    """One-step gradient, a few-step fit and an evaluation; the same code for any world size."""
    from juap.attacks.base import rebind
    from juap.interpreters.smooth_relu import make_surrogate

    torch.set_num_threads(1)
    x_train, x_val, x_test, y_test = _data()
    clf, gradcam, cam = _models()

    # 1. the gradient of one step on the global batch x_train[:8] (SGD with lr 0: nothing moves)
    att = _attack(clf, gradcam)
    att.noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(5)
    G = att._make_generator().train()
    opt = torch.optim.SGD(G.parameters(), lr=0.0)
    surrogate = rebind(gradcam, make_surrogate(clf, tau=att.tau))
    loss, parts = att._step(
        distributed.wrap_ddp(G), opt, distributed.local_slice(x_train[:GLOBAL_BATCH]), surrogate
    )
    grads = torch.cat([p.grad.flatten() for p in G.parameters()])

    # 2. a few Adam steps and the validation that picks the kept perturbation
    att = _attack(clf, gradcam)
    n_hat = att.fit(x_train, val_data=x_val, progress=False)

    # 3. evaluation: batches of 5 and 3 test images shared out unevenly between the ranks
    batches = [(x_test[:5], y_test[:5]), (x_test[5:], y_test[5:])]
    ev = juap.evaluate(clf, n_hat, batches, interpreters={"gradcam": gradcam, "cam": cam})
    strong = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5  # fools some images
    ev_strong = juap.evaluate(clf, strong, batches, interpreters={"gradcam": gradcam}, target=1)
    return {
        "grad": grads,
        "step_loss": loss,
        "step_parts": parts,
        "n_hat": n_hat,
        "history": [h["loss"] for h in att.history],
        "val": att.best_val,
        "eval": ev,
        "eval_strong": ev_strong,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        assert distributed.init_from_env("gloo")
        res = run_experiment()
        torch.manual_seed(rank)  # a classifier built with another seed on each rank must be refused
        other = juap.create_classifier("small_resnet", num_classes=4, widths=(4, 8, 16))
        try:
            distributed.check_same_across_ranks(other, "classifier")
        except ConfigError as e:
            res["different_models_error"] = str(e)
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.cleanup()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    # fork: the workers inherit the imported modules (spawn would import torch and juap again, ~10 s)
    torch.multiprocessing.start_processes(
        _worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True, start_method="fork"
    )
    multi = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = run_experiment()
    return single, multi


def _flat_metrics(ev: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in ev.items():
        if isinstance(v, dict):
            out.update(_flat_metrics(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_gradient_of_one_step_equals_one_process(results):
    single, multi = results
    for m in multi:
        scale = single["grad"].abs().max()
        assert scale > 0
        assert (m["grad"] - single["grad"]).abs().max() <= GRAD_TOL * scale
        assert m["step_loss"] == pytest.approx(single["step_loss"], abs=1e-6)
        assert m["step_parts"]["batch_fooling_ratio"] == single["step_parts"]["batch_fooling_ratio"]


def test_perturbation_after_steps_equals_one_process(results):
    single, multi = results
    assert single["n_hat"].abs().max() > 0
    for m in multi:
        assert (m["n_hat"] - single["n_hat"]).abs().max() <= PERTURBATION_TOL
        assert m["history"] == pytest.approx(single["history"], abs=1e-5)
    assert torch.equal(multi[0]["n_hat"], multi[1]["n_hat"])  # the ranks agree exactly


@pytest.mark.parametrize("which", ["eval", "eval_strong"])
def test_metrics_equal_one_process(results, which):
    single, multi = results
    ref = _flat_metrics(single[which])
    assert ref["n_images"] == 8 and "interpreters.gradcam.iou" in ref
    if which == "eval_strong":
        assert 0 < ref["fooling_ratio"] < 1 and "target_success_rate" in ref
    for m in multi:
        got = _flat_metrics(m[which])
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k] == pytest.approx(ref[k], rel=METRIC_TOL, abs=METRIC_TOL), k
        assert m["val"] == pytest.approx(single["val"], rel=METRIC_TOL, abs=METRIC_TOL)


def test_models_that_differ_between_ranks_are_refused(results):
    _, multi = results
    for m in multi:
        assert "differs between the torchrun ranks" in m.get("different_models_error", "")


# -- helpers and bad configurations (one process) ----------------------------------------------------
def test_slices_cover_a_batch_once():
    for n in (0, 1, 7, 8, 30):
        for w in (1, 2, 3, 4):
            bounds = [distributed.slice_bounds(n, rank_=r, world=w) for r in range(w)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_single_process_is_a_no_op(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.init_from_env() is False
    assert distributed.world_size() == 1 and distributed.is_main() and distributed.rank_seed(5) == 5
    x = torch.arange(6)
    assert distributed.local_slice(x) is x
    assert distributed.all_reduce_sums({"a": 2}) == {"a": 2.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_nccl_without_gpu_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="nccl.*needs CUDA GPUs"):
        distributed.init_from_env("nccl")
    with pytest.raises(ConfigError, match="allowed values"):
        distributed.init_from_env("mpi")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cli_nccl_without_gpu_is_a_message(monkeypatch, capsys):
    from juap.cli import main

    monkeypatch.setenv("JUAP_DIST_BACKEND", "nccl")
    assert main(["attack", "--no-progress"]) == 2
    assert "the nccl backend needs CUDA GPUs" in capsys.readouterr().err


def test_partial_torchrun_environment_is_refused(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun"):
        distributed.init_from_env()


def test_batch_not_divisible_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(ConfigError, match="batch_size = 30 is not divisible.*use batch_size = 32 or 28"):
        distributed.check_divisible(30)
    distributed.check_divisible(32)
    clf, gradcam, _ = _models()
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ConfigError, match="batch_size = 8 is not divisible by the number of processes"):
        _attack(clf, gradcam)  # refused at construction under torchrun


# -- the command line under torchrun -----------------------------------------------------------------
def _torchrun(args, tmp_path, nproc=2, **env):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "-m", "juap", *args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=240)


def test_cli_attack_under_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    r = _torchrun(
        [
            "attack",
            "--no-progress",
            "--out",
            str(out),
            "--set",
            "data.image_size=32",
            "--set",
            "data.num_images=48",
            "--set",
            "data.train_fraction=0.5",
            "--set",
            "data.test_fraction=0.25",
            "--set",
            "classifier.options={widths: [4, 8, 16]}",
            "--set",
            "interpreter.name=cam",
            "--set",
            "attack.name=juap",
            "--set",
            "attack.params={steps: 2, batch_size: 8, eval_every: 2, "
            "generator_options: {ngf: 4, n_blocks: 1}}",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("Running juap") == 1  # only rank 0 prints
    import json

    m = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run.get("world_size") == 2
    assert m["n_images"] > 0 and 0 <= m["fooling_ratio"] <= 1
    assert (out / "perturbation.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no other rank wrote a folder


@pytest.mark.slow  # a second torchrun launch (~15 s); the message itself is checked above
def test_cli_batch_not_divisible_fails_clearly(tmp_path):
    r = _torchrun(
        [
            "attack",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "data.image_size=32",
            "--set",
            "data.num_images=48",
            "--set",
            "data.train_fraction=0.5",
            "--set",
            "data.test_fraction=0.25",
            "--set",
            "attack.name=guap",
            "--set",
            "attack.params={steps: 1, batch_size: 7}",
        ],
        tmp_path,
    )
    assert r.returncode != 0
    assert "batch_size = 7 is not divisible by the number of processes (2)" in r.stderr
    assert "/src/juap/" not in r.stderr  # a message, not a juap traceback (torchrun prints its own summary)
