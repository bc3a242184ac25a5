"""Data-parallel runs (juap.runtime.distributed): 2 gloo processes on CPU compute what 1 process computes.

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
from juap.errors import ConfigError
from juap.runtime import distributed

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
    G = att.make_generator().train()
    opt = torch.optim.SGD(G.parameters(), lr=0.0)
    surrogate = rebind(gradcam, make_surrogate(clf, tau=att.tau))
    loss, parts = att.train_step(
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
        "val": att.fit_result.validation,
        "eval": ev,
        "eval_strong": ev_strong,
    }


def _in_process_group(rank: int, port: int, out_dir: str, work) -> None:
    """A torchrun-like rank: join a gloo group of WORLD processes, save ``work(out_dir)`` as rank<r>.pt."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    try:
        assert distributed.init_from_env("gloo")
        torch.save(work(Path(out_dir)), Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.cleanup()


def _run_ranks(work, out: Path) -> list:
    """``work`` in WORLD forked processes (they inherit the imported modules; spawn would import torch and
    juap again, ~10 s); returns each rank's result."""
    torch.multiprocessing.start_processes(
        _in_process_group, args=(_free_port(), str(out), work), nprocs=WORLD, join=True, start_method="fork"
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _experiment_on_rank(out_dir: Path) -> dict:
    res = run_experiment()
    torch.manual_seed(distributed.rank())  # a classifier built with another seed on each rank must be refused
    other = juap.create_classifier("small_resnet", num_classes=4, widths=(4, 8, 16))
    try:
        distributed.check_same_across_ranks(other, "classifier")
    except ConfigError as e:
        res["different_models_error"] = str(e)
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    multi = _run_ranks(_experiment_on_rank, tmp_path_factory.mktemp("ddp"))
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
        val, ref_val = _flat_metrics(m["val"]), _flat_metrics(single["val"])
        assert val.keys() == ref_val.keys()
        for k, v in ref_val.items():  # None: a metric of the fooled images when none was fooled
            same = val[k] is None if v is None else val[k] == pytest.approx(v, rel=METRIC_TOL, abs=METRIC_TOL)
            assert same, k


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
    from juap.commands.cli import main

    monkeypatch.setenv("JUAP_DIST_BACKEND", "nccl")
    assert main(["attack", "--no-progress"]) == 2
    assert "the nccl backend needs CUDA GPUs" in capsys.readouterr().err


_TEARDOWN = """
import os, torch
from juap.runtime import distributed
assert distributed.init_from_env("gloo")
model = distributed.wrap_ddp(torch.nn.Linear(4, 2))  # DDP: what kept the group alive before
model(torch.rand(3, 4)).sum().backward()
assert distributed.all_reduce_sums({"n": 1}) == {"n": 2.0}
del model
distributed.cleanup(wait_for_others=True)
tasks = os.listdir("/proc/self/task")
print(",".join(sorted(n for t in tasks if "gloo" in (n := open(f"/proc/self/task/{t}/comm").read().strip()))))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_no_gloo_thread_outlives_the_process_group():
    """The cause of the random SIGABRT at exit: a gloo worker thread that outlives the process group can
    release the last reference to a finished collective's tensor while Python shuts down; the release
    needs the GIL, and the rank dies with "terminate called without an active exception". After
    cleanup() the group is freed and its threads joined, so Python never shuts down with them alive."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, "-c", _TEARDOWN], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == "", f"gloo threads alive after cleanup: {out.strip()}"


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
    history = (out / "history.csv").read_text().splitlines()  # rank 0 alone writes it: one row per step
    assert [line.split(",")[0] for line in history] == ["step", "1", "2"] and (out / "curves.png").is_file()


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


# -- data-parallel training (train_classifier, train-classifier, train-rts) -----------------------------
# The 2-process side trains with the same global batches as the 1-process side (an InMemoryLoader whose
# ranks each take half of every global batch, augmentation drawn for the whole batch): the model has no
# BatchNorm, so a rank's loss on its half, averaged over the ranks by DDP, is exactly the 1-process loss
# on the whole batch and the weights agree up to float summation order. With BatchNorm each rank would
# normalise with its half's statistics (plain BN on CPU/gloo), a different computation from one process.
TRAIN_TOL = 1e-5  # max |w_2proc - w_1proc| after 8 SGD steps (measured ~1e-7)


def _tiny_classifier(bn: bool = False):
    torch.manual_seed(0)
    clf = juap.create_classifier("small_resnet", num_classes=4, widths=(4, 8, 8))
    if not bn:  # no BatchNorm: the 2-process computation is the 1-process one
        for name, m in list(clf.named_modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                parent, _, child = name.rpartition(".")
                setattr(clf.get_submodule(parent), child, torch.nn.Identity())
    return clf


def _train_data():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(43, 3, 16, 16, generator=g)
    y = torch.randint(0, 4, (43,), generator=g)
    test = [(x[i], int(y[i])) for i in range(32, 43)]  # 11 test images: 6 and 5 per rank
    return x[:32], y[:32], test


def run_training(out_dir: Path) -> dict:
    """Train the tiny classifier (uninterrupted, then interrupted at step 5 and resumed), the same code
    for any world size."""
    import signal

    from juap.commands.configs import TrainConfig
    from juap.commands.train_classifier import train_classifier
    from juap.data import InMemoryLoader, make_loader
    from juap.runtime.checkpoint import RunInterrupted
    from juap.runtime.distributed import shard_train_loader
    from juap.runtime.loop import Checkpointing

    torch.set_num_threads(1)
    x, y, test = _train_data()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=5e-4)
    cpu = torch.device("cpu")

    def loader():
        return InMemoryLoader(x, y, batch_size=8, augment=True, seed=1, drop_last=True)

    clf = _tiny_classifier()
    m = train_classifier(clf, loader(), make_loader(test, batch_size=4), cfg, device=cpu, progress=False)
    res = {"weights": {k: v.clone() for k, v in clf.state_dict().items()}, "metrics": m}

    # interrupted after step 5 (a SIGINT to rank 0 only), then resumed from rank 0's checkpoint
    ck = out_dir / "ck"
    clf = _tiny_classifier()
    calls = [0]

    def stop_at_5(module, inputs):
        calls[0] += 1
        if calls[0] == 5 and distributed.is_main():
            os.kill(os.getpid(), signal.SIGINT)

    hook = clf.register_forward_pre_hook(stop_at_5)
    try:
        train_classifier(clf, loader(), None, cfg, device=cpu, progress=False, checkpoint=Checkpointing(ck))
    except RunInterrupted as e:
        res["stopped_at"] = e.step
    hook.remove()
    clf = _tiny_classifier()
    train_classifier(
        clf, loader(), None, cfg, device=cpu, progress=False, checkpoint=Checkpointing(ck, resume=True)
    )
    res["resumed"] = {k: v.clone() for k, v in clf.state_dict().items()}

    # a DataLoader is shared out by a DistributedSampler: disjoint shares of each epoch
    dl = shard_train_loader(make_loader(test[:10], batch_size=2, shuffle=True, seed=3, drop_last=True))
    if distributed.world_size() > 1:
        dl.sampler.set_epoch(1)
    res["shard"] = list(dl.sampler)
    # with BatchNorm (plain, per rank, on CPU) the ranks still end with identical models
    bn = _tiny_classifier(bn=True)
    train_classifier(bn, loader(), None, TrainConfig(epochs=1, batch_size=8), device=cpu, progress=False)
    res["bn"] = {k: v.clone() for k, v in bn.state_dict().items()}
    return res


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    multi = _run_ranks(run_training, tmp_path_factory.mktemp("ddp-train"))
    single_dir = tmp_path_factory.mktemp("one-train")
    return run_training(single_dir), multi


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def test_training_two_processes_equals_one_process(trained):
    single, multi = trained
    for r in range(WORLD):
        assert _max_diff(multi[r]["weights"], single["weights"]) <= TRAIN_TOL
    assert _max_diff(multi[0]["weights"], multi[1]["weights"]) == 0.0  # DDP: identical on every rank
    assert _max_diff(single["weights"], _tiny_classifier().state_dict()) > 1e-3  # the weights did move


def test_training_metrics_are_sums_over_the_ranks(trained):
    single, multi = trained
    for r in range(WORLD):
        m, s = multi[r]["metrics"], single["metrics"]
        assert m["test_images"] == s["test_images"] == 11  # every test image counted once
        assert m["test_accuracy"] == s["test_accuracy"]  # same weights to 1e-5: same predictions here
        assert m["train_accuracy"] == s["train_accuracy"]  # 2 x 4 steps of 8 images, over both halves
        assert m["train_images"] == s["train_images"] == 32


def test_training_resumed_under_two_processes_is_the_uninterrupted_run(trained):
    single, multi = trained
    for res in (single, *multi):
        assert res["stopped_at"] == 5  # every rank stopped at the step rank 0 was signalled in
        assert _max_diff(res["resumed"], res["weights"]) == 0.0  # bitwise the uninterrupted weights


def test_dataloader_shards_are_disjoint_and_cover_the_epoch(trained):
    _, multi = trained
    a, b = multi[0]["shard"], multi[1]["shard"]
    assert len(a) == len(b) == 5 and sorted(a + b) == list(range(10))


def test_batchnorm_models_agree_between_ranks(trained):
    _, multi = trained
    assert _max_diff(multi[0]["bn"], multi[1]["bn"]) == 0.0  # weights and rank 0's running statistics


def test_sync_batchnorm_swap_is_undone(monkeypatch):
    from juap.runtime import loop

    clf = _tiny_classifier(bn=True)
    before = {n: type(m) for n, m in clf.named_modules()}
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    swapped = loop.to_sync_batchnorm(clf, torch.device("cuda"))  # only swaps modules: no GPU needed
    assert swapped and all(isinstance(getattr(p, c), torch.nn.SyncBatchNorm) for p, c, _ in swapped)
    assert all(getattr(p, c).weight is m.weight for p, c, m in swapped)  # shares the parameters
    loop.restore_batchnorm(swapped)
    assert {n: type(m) for n, m in clf.named_modules()} == before
    assert loop.to_sync_batchnorm(clf, torch.device("cpu")) == []  # CPU/gloo: plain BatchNorm


def test_cli_train_classifier_and_rts_under_torchrun(tmp_path):
    import json

    data = ["--set", "data.image_size=32", "--set", "data.num_images=48", "--set", "data.train_fraction=0.5",
            "--set", "data.test_fraction=0.25"]  # fmt: skip
    out = tmp_path / "clf"
    r = _torchrun(
        ["train-classifier", "--no-progress", "--out", str(out), *data, "--set", "train.epochs=1",
         "--set", "train.batch_size=8", "--set", "classifier.options={widths: [4, 8, 8]}"],
        tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("Test top-1 accuracy") == 1  # only rank 0 prints
    m = json.loads((out / "metrics.json").read_text())
    split = json.loads((out / "split.json").read_text())
    assert m["test_images"] == len(split["test"]) == 12  # all test images, as one process counts them
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]  # no other rank wrote a folder

    rts_out = tmp_path / "rts"
    r = _torchrun(
        ["train-rts", "--no-progress", "--out", str(rts_out), *data, "--set", "train.epochs=1",
         "--set", "train.batch_size=8", "--set", "rts.width=8",
         "--set", f"classifier.weights={out / 'classifier.safetensors'}",
         "--set", "classifier.options={widths: [4, 8, 8]}"],
        tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("Done in") == 1
    m = json.loads((rts_out / "metrics.json").read_text())
    assert m["test_images"] == 12 and m["pointing_images"] == 12  # every test image measured once
    assert m["steps"] == 3 and len(m["loss_history"]) == 1  # 24 train images / global batch 8
    assert (rts_out / "rts.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf", "rts"]


# -- per-class figures (issue 16): where the fooled images go, under torchrun ------------------------
def per_class_evaluation(out_dir=None) -> dict:
    """``evaluate(per_class=True)`` of a strong perturbation on 40 images in uneven batches (11, 13, 16):
    the ranks' slices differ in size and in the classes they see."""
    torch.set_num_threads(1)
    x_train, x_val, x_test, _ = _data()
    x = torch.cat([x_train, x_val, x_test])
    clf, gradcam, cam = _models()
    strong = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5  # fools some images
    batches = [x[:11], x[11:24], x[24:]]
    return juap.evaluate(clf, strong, batches, interpreters={"gradcam": gradcam, "cam": cam}, per_class=True)


def test_per_class_figures_equal_one_process(tmp_path):
    multi = _run_ranks(per_class_evaluation, tmp_path)
    single = per_class_evaluation()
    assert sum(map(sum, single["transitions"])) == single["n_images"] == 40
    assert 0 < single["fooling_ratio"] < 1 and single["dominant_label"] is not None
    assert sum(1 for n in single["per_class"]["n_images"] if n) >= 2  # more than one class to split
    for m in multi:
        assert m["transitions"] == single["transitions"]  # counts: exactly equal
        assert (m["num_classes"], m["dominant_label"]) == (single["num_classes"], single["dominant_label"])
        assert m["dominant_label_share"] == pytest.approx(single["dominant_label_share"], abs=METRIC_TOL)
        pairs = [(m["per_class"], single["per_class"])]
        pairs += [
            (m["interpreters"][n]["per_class"], ev["per_class"]) for n, ev in single["interpreters"].items()
        ]
        for got, ref in pairs:
            assert got.keys() == ref.keys()
            for key, values in ref.items():  # lists by class; None: a class no image was predicted as
                assert len(got[key]) == len(values), key
                same = [
                    g is None if r is None else g == pytest.approx(r, rel=METRIC_TOL, abs=METRIC_TOL)
                    for g, r in zip(got[key], values, strict=True)
                ]
                assert all(same), key
