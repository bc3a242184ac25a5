"""Reliability: resume after any interruption, atomic artifacts, safe loading, clear errors on bad input.

The fault-injection tests run a tiny ``juap attack`` as a real process, kill it (SIGKILL at three points,
resuming each time; SIGINT once) and check that the final perturbation is bitwise the uninterrupted
run's. The bad-input tests run every row of the reliability table of docs/reliability.md through the
CLI and check for a message and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import juap
from helpers import CLI_TINY_DATA
from helpers import run_cli as run
from juap.commands.cli import main
from juap.errors import CheckpointError, NumericalError
from juap.runtime import io as juap_io
from juap.runtime.checkpoint import (
    CHECKPOINT_NAME,
    LoopCheckpoints,
    ResumableLoader,
    RunInterrupted,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from juap.runtime.io import DiskFullError, load_tensors, read_metadata, write_bytes, write_json
from juap.runtime.loop import Checkpointing

DATA = CLI_TINY_DATA
STEPS = 30
ATTACK = [
    "--set",
    "attack.name=guap",
    "--set",
    "attack.eps=16",
    "--set",
    f"attack.params={{steps: {STEPS}, batch_size: 8, eval_every: 5, "
    "generator_options: {ngf: 16, n_blocks: 2}}",
]
SMALL = ["--set", "attack.params={steps: 2, batch_size: 8, generator_options: {ngf: 8, n_blocks: 1}}"]


@pytest.fixture(scope="module")
def clf_path(tmp_path_factory):
    """An (untrained, seeded) tiny classifier: resume must be exact whatever the model is."""
    torch.manual_seed(0)
    clf = juap.create_classifier("small_resnet", num_classes=4, widths=(4, 8, 8))
    path = tmp_path_factory.mktemp("clf") / "classifier.safetensors"
    juap.save_classifier(clf, path)
    return str(path)


def attack_argv(out, clf_path, *extra):
    weights = ["--set", f"classifier.weights={clf_path}"]
    return ["attack", "--out", str(out), "--no-progress", *DATA, *weights, *ATTACK, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, clf_path):
    """The uninterrupted run (in this process, one torch thread like the subprocesses)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(attack_argv(out, clf_path, "--checkpoint-every", "2")) == 0
    return out


def checkpoint_step(folder: Path) -> int:
    try:
        return int(read_metadata(folder / CHECKPOINT_NAME)["step"])
    except (CheckpointError, KeyError, TypeError):
        return -1


def wait_for_step(proc: subprocess.Popen, folder: Path, step: int, timeout: float = 120.0) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        s = checkpoint_step(folder)
        if s >= step:
            return s
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before step {step}")
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


def juap_process(argv) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "juap", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def same_artifacts(a: Path, b: Path) -> None:
    ta, _ = load_tensors(a / "perturbation.safetensors")
    tb, _ = load_tensors(b / "perturbation.safetensors")
    assert torch.equal(ta["perturbation"], tb["perturbation"])  # bitwise
    ga, _ = load_tensors(a / "generator.safetensors")
    gb, _ = load_tensors(b / "generator.safetensors")
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    ma, mb = (json.loads((f / "metrics.json").read_text()) for f in (a, b))
    ma.pop("fit_seconds", None), mb.pop("fit_seconds", None)
    assert ma == mb


def no_leftovers(folder: Path) -> None:
    """Nothing half-written: no temporary files, and the loop checkpoint is gone once complete."""
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not (folder / CHECKPOINT_NAME).exists()
    assert json.loads((folder / "run.json").read_text())["status"] == "complete"


# -- fault injection: real kills of a real `juap attack` ------------------------------------------------
def test_sigkill_at_three_points_then_resume_is_bitwise_identical(tmp_path, capsys, clf_path, reference):
    out = tmp_path / "run"
    argv = attack_argv(out, clf_path, "--checkpoint-every", "2")
    resume_same = [*argv, "--resume"]
    resume_bare = ["attack", "--out", str(out), "--no-progress", "--resume", "--checkpoint-every", "2"]
    kills = []
    for k, cmd in ((4, argv), (12, resume_same), (20, resume_bare)):  # the last resume reuses config.yaml
        proc = juap_process(cmd)
        seen = wait_for_step(proc, out, k)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        assert json.loads((out / "run.json").read_text())["status"] == "running"  # killed: no clean-up ran
        kills.append((k, seen))
    code, _, err = run(capsys, *resume_same)  # the last resume in this process (same thread count)
    assert code == 0 and "Traceback" not in err, err
    run_info = json.loads((out / "run.json").read_text())
    assert len(run_info["resumed"]) == 3
    same_artifacts(out, reference)
    no_leftovers(out)
    assert len({s for _, s in kills}) == 3, kills  # three different points
    print("killed at checkpoint steps", [s for _, s in kills], "of", STEPS)


def test_sigint_stops_cleanly_with_a_resume_message_and_resumes_exactly(
    tmp_path, capsys, clf_path, reference
):
    out = tmp_path / "run"
    argv = attack_argv(out, clf_path, "--checkpoint-every", "2")
    proc = juap_process(argv)
    wait_for_step(proc, out, 8)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGINT after step" in stderr and f"juap attack --out {out} --resume" in stderr
    assert "Traceback" not in stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted"
    stopped_at = checkpoint_step(out)
    assert 8 <= stopped_at < STEPS
    code, _, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    same_artifacts(out, reference)
    no_leftovers(out)


@pytest.mark.slow
def test_sigterm_and_a_kill_during_evaluation_also_resume_exactly(tmp_path, clf_path, reference):
    out = tmp_path / "run"
    argv = attack_argv(out, clf_path, "--checkpoint-every", "2")
    proc = juap_process(argv)
    wait_for_step(proc, out, 6)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    proc = juap_process([*argv, "--resume"])
    wait_for_step(proc, out, STEPS)  # the final checkpoint: training is over, evaluation runs
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    proc = juap_process([*argv, "--resume"])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    same_artifacts(out, reference)
    no_leftovers(out)


# -- resume of the training commands (a real SIGINT to this process) -----------------------------------
def interrupt_at(folder: Path, step: int) -> threading.Thread:
    """Send SIGINT to this process once the checkpoint in ``folder`` reaches ``step``."""

    def watch():
        t0 = time.monotonic()
        while checkpoint_step(folder) < step and time.monotonic() - t0 < 120:
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(
    "command,artifact,extra",
    [
        ("train-classifier", "classifier.safetensors", ["--set", "classifier.options={widths: [4, 8, 8]}"]),
        ("train-rts", "rts.safetensors", []),
    ],
)
def test_training_commands_resume_after_sigint_to_the_same_weights(
    tmp_path, capsys, clf_path, command, artifact, extra
):
    argv = [command, "--no-progress", *DATA, "--set", "train.epochs=3", "--set", "train.batch_size=8", *extra]
    if command == "train-rts":
        argv += ["--set", f"classifier.weights={clf_path}"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    code, _, err = run(capsys, *argv, "--out", str(ref), "--checkpoint-every", "2")
    assert code == 0, err
    watcher = interrupt_at(out, 5)
    code, _, err = run(capsys, *argv, "--out", str(out), "--checkpoint-every", "2")
    watcher.join()
    assert code == 130 and f"juap {command} --out {out} --resume" in err, err
    stopped = checkpoint_step(out)
    assert 5 <= stopped < 18  # 3 epochs x 6 steps
    code, _, err = run(capsys, *argv, "--out", str(out), "--checkpoint-every", "2", "--resume")
    assert code == 0, err
    a, _ = load_tensors(ref / artifact)
    b, _ = load_tensors(out / artifact)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    no_leftovers(out)


# -- the checkpoint format and the loop helper ---------------------------------------------------------
def test_checkpoint_round_trips_every_kind_of_state(tmp_path):
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.999))
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    np.random.seed(3)
    state = {
        "step": 7,
        "model": m.state_dict(),
        "optimizer": opt.state_dict(),  # int keys, tuples, tensors, None
        "rng": rng_states(),  # python tuples, a numpy uint32 array, a torch byte tensor
        "history": [{"loss": 0.1, "nan": float("nan")}, {"__odd__": 1}],
        "nothing": None,
    }
    save_checkpoint(tmp_path / "c.safetensors", state, kind="test")
    back = load_checkpoint(tmp_path / "c.safetensors", kind="test")
    assert back["step"] == 7 and back["nothing"] is None and back["history"][1] == {"__odd__": 1}
    assert math.isnan(back["history"][0]["nan"])
    assert all(torch.equal(back["model"][k], v) for k, v in m.state_dict().items())
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.5, 0.999)
    assert set(back["optimizer"]["state"]) == {0, 1}
    torch.optim.Adam(m.parameters()).load_state_dict(back["optimizer"])
    a = (np.random.rand(), torch.rand(1), __import__("random").random())
    set_rng_states(back["rng"])
    b = (np.random.rand(), torch.rand(1), __import__("random").random())
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert read_metadata(tmp_path / "c.safetensors")["step"] == 7
    with pytest.raises(CheckpointError, match="checkpoint of 'test', not of 'juap'"):
        load_checkpoint(tmp_path / "c.safetensors", kind="juap")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "c.safetensors").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="cannot store a object"):
        save_checkpoint(tmp_path / "x.safetensors", {"f": object()}, kind="test")


def test_resumable_loader_continues_mid_pass_with_the_same_order():
    from juap.data import InMemoryLoader

    x, y = torch.rand(40, 3, 8, 8), torch.arange(40)

    def make():
        return InMemoryLoader(x, y, batch_size=6, augment=True, seed=1)

    def labels(wrapped, n, peek_at=2):
        """``n`` batches' labels; after ``peek_at`` batches a validation-like pass draws from the
        loader's generator too (as GeneratorUAP.fit does when it validates on its training data)."""
        out, it = [], iter(wrapped)
        while len(out) < n:
            b = next(it, None)
            if b is None:
                it = iter(wrapped)
                continue
            out.append(b[1].tolist())
            if len(out) == peek_at:
                next(iter(wrapped.loader))
        return out

    full = labels(ResumableLoader(make()), 14)
    part = ResumableLoader(make())
    first = labels(part, 4)
    again = ResumableLoader(make(), part.position())
    rest = labels(again, 10, peek_at=-1)
    assert first + rest == full  # 7 batches a pass: the resume point is mid-pass, the rest spans passes
    # the augmentation draws are restored too: the same pixels after the resume point
    ref = ResumableLoader(make())
    it = iter(ref)
    for _ in range(4):
        next(it)
    pos = ref.position()
    assert torch.equal(next(it)[0], next(iter(ResumableLoader(make(), pos)))[0])


def test_nan_loss_rolls_back_lowers_the_lr_and_finishes(tmp_path):
    clf, x = _toy()
    flaky = _Flaky(bad={6})  # call 6 = step 5 (steps 1-3, the validation at 3, step 4, step 5)
    attack = juap.create_attack(
        "guap", classifier=clf, norm="linf", eps=16, steps=10, batch_size=8, eval_every=3, generator=flaky
    )
    n_hat = attack.fit(x, progress=False, checkpoint=Checkpointing(tmp_path, every=2))
    rolled = [h for h in attack.history if "rolled_back_to" in h]
    assert len(rolled) == 1 and rolled[0]["rolled_back_to"] == 4 and "loss became nan" in rolled[0]["error"]
    assert torch.isfinite(n_hat).all() and n_hat.abs().max() <= 16 / 255 + 1e-6
    final = load_checkpoint(tmp_path / CHECKPOINT_NAME, kind="guap")
    assert final["step"] == 10 and final["rollbacks"] == 1
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(attack.lr * 0.5)


def test_a_roll_back_scales_a_cosine_schedule(tmp_path):
    """With ``lr_schedule="cosine"`` the roll-back's halving holds for the rest of the schedule: the
    final rate is half the cosine's, not the cosine's (the schedule moves the rate relative to the step
    before instead of setting it)."""
    clf, x = _toy()
    attack = juap.create_attack(
        "guap",
        classifier=clf,
        norm="linf",
        eps=16,
        steps=10,
        batch_size=8,
        eval_every=3,
        generator=_Flaky(bad={6}),
        lr_schedule="cosine",
    )
    attack.fit(x, progress=False, checkpoint=Checkpointing(tmp_path, every=2))
    assert [h["rolled_back_to"] for h in attack.history if "rolled_back_to" in h] == [4]
    final = load_checkpoint(tmp_path / CHECKPOINT_NAME, kind="guap")
    assert final["step"] == 10
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.5 * attack.lr_at(10))


def test_persistent_nan_stops_with_a_clear_error_after_bounded_tries(capsys):
    clf, x = _toy()
    flaky = _Flaky(bad=range(4, 99))  # from step 4 on, every output is NaN
    attack = juap.create_attack(
        "guap", classifier=clf, norm="linf", eps=16, steps=20, batch_size=8, generator=flaky
    )
    with pytest.raises(NumericalError, match=r"gave up after 3 roll-back\(s\)"):
        attack.fit(x, progress=False, checkpoint=Checkpointing(every=2))


def test_nan_in_classifier_training_is_rolled_back():
    from juap.classifiers.training import train_classifier

    torch.manual_seed(0)
    clf = juap.create_classifier("small_resnet", num_classes=3, widths=(4, 8, 8))
    xs = [torch.rand(8, 3, 16, 16) for _ in range(6)]
    xs[3] = xs[3] * float("nan")  # a poisoned batch
    batches = [(x, torch.arange(8) % 3, 0) for x in xs]

    class Loader(list):
        dataset = range(48)

    cpu = torch.device("cpu")
    m = train_classifier(clf, Loader(batches), epochs=1, lr=0.05, device=cpu,
                         checkpoint=Checkpointing(every=2))  # fmt: skip
    assert math.isfinite(m["train_accuracy"])
    assert all(torch.isfinite(p).all() for p in clf.parameters())


def test_stop_signals_restore_the_previous_handlers(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    ckpt = LoopCheckpoints(tmp_path, every=100, kind="t")
    with pytest.raises(RunInterrupted, match="stopped by SIGINT after step 2") as info:
        for step in ckpt.steps(range(1, 5)):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)
            ckpt.step_end(step, lambda s=step: {"step": s})
    assert info.value.checkpoint == tmp_path / CHECKPOINT_NAME
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME, kind="t")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before


def _stop_worker(rank: int, port: int, out_dir: str) -> None:
    from juap.runtime import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    try:
        assert distributed.init_from_env("gloo")
        ckpt = LoopCheckpoints(out_dir, every=100, kind="t", write=distributed.is_main())
        stopped = None
        try:
            for step in ckpt.steps(range(1, 10)):
                if rank == 1 and step == 3:
                    os.kill(os.getpid(), signal.SIGINT)  # only rank 1 is told to stop
                ckpt.step_end(step, lambda s=step: {"step": s})
        except RunInterrupted as e:
            stopped = e.step
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(stopped))
    finally:
        distributed.cleanup()


def test_a_signal_to_one_process_of_a_torchrun_stops_every_rank_at_the_same_step(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.start_processes(
        _stop_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [3, 3]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME, kind="t")["step"] == 3  # written by rank 0


# -- atomic artifacts and a full disk ------------------------------------------------------------------
_READ_ONLY_PROBE = """
import contextlib, io, json, sys
from juap.commands.cli import main
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    out[name] = [code, err.getvalue()]
print(json.dumps(out))
"""


def _without_file_permission_override() -> list:
    """A command prefix that runs a process whose file-permission checks apply (root bypasses them)."""
    if os.geteuid() != 0:
        return []
    drop = [shutil.which("setpriv") or "setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    try:
        if subprocess.run([*drop, "true"], capture_output=True, timeout=30).returncode == 0:
            return drop
    except OSError:
        pass
    pytest.skip("as root without a working setpriv to drop CAP_DAC_OVERRIDE, permissions are not checked")


def test_read_only_run_folders_are_a_message_not_a_traceback(tmp_path):
    """--out in a read-only folder, --out naming an empty read-only folder (issue 14), and a checkpoint one
    may not read: one line, exit 2, nothing created. Run as a process without root's permission override,
    so the permissions apply."""
    prefix = _without_file_permission_override()
    parent, empty = tmp_path / "read_only_parent", tmp_path / "read_only_empty"
    parent.mkdir()
    empty.mkdir()
    unreadable = tmp_path / "classifier.pth"
    torch.save({"w": torch.zeros(2)}, unreadable)
    unreadable.chmod(0o000)
    train = ["train-classifier", "--no-progress", "--out"]
    cases = {
        "in a read-only folder": [*train, str(parent / "run")],
        "an empty read-only folder": [*train, str(empty)],
        "an unreadable checkpoint": [
            "attack",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
            *DATA,
            "--set",
            f"classifier.weights={unreadable}",
        ],  # fmt: skip
    }
    for folder in (parent, empty):
        folder.chmod(0o555)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([*prefix, sys.executable, "-c", _READ_ONLY_PROBE, json.dumps(cases)],
                              capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        for name, where in (("in a read-only folder", parent), ("an empty read-only folder", empty)):
            code, err = results[name]
            assert code == 2, err
            assert err.startswith("juap train-classifier: error: could not create the run folder")
            assert f"no permission to write in {where} (Permission denied)" in err, err
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert list(parent.iterdir()) == [] and list(empty.iterdir()) == []  # nothing half-written
        code, err = results["an unreadable checkpoint"]
        assert code == 2 and f"cannot read {unreadable}: no permission to read it" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    finally:
        for folder in (parent, empty):
            folder.chmod(0o755)


def test_a_full_disk_while_creating_the_run_folder_leaves_nothing(tmp_path, capsys, monkeypatch):
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        real_mkdir(self, *a, **k)  # the folders appear, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "mkdir", mkdir)
    out = tmp_path / "new" / "run"
    code, _, err = run(capsys, "train-classifier", "--no-progress", "--out", str(out))
    assert code == 2 and f"could not create the run folder {out}: the disk is full" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone again


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json(target, {"v": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match="the disk is full.*nothing was written"):
        write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    monkeypatch.undo()
    write_bytes(tmp_path / "new.bin", b"x")
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_any_os_error_writing_an_artifact_is_a_write_error_naming_it(tmp_path, monkeypatch):
    from juap.runtime.io import WriteError

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteError, match=f"could not write {tmp_path / 'm.json'}: no permission to write in"):
        write_json(tmp_path / "m.json", {"v": 1})
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone
    monkeypatch.undo()
    (tmp_path / "m.json").mkdir()
    with pytest.raises(WriteError, match="a folder of that name is in the way"):
        write_json(tmp_path / "m.json", {"v": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_disk_full_while_writing_the_perturbation_is_a_message(tmp_path, capsys, clf_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if "perturbation.safetensors" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    argv = [*attack_argv(out, clf_path)[: -len(ATTACK)], "--set", "attack.name=guap", *SMALL]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    assert "perturbation.safetensors: the disk is full" in err and "nothing was written" in err
    assert not (out / "perturbation.safetensors").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "DiskFullError" in info["error"]
    assert (out / CHECKPOINT_NAME).is_file()  # the training is kept: --resume after freeing space
    monkeypatch.undo()
    code, _, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    no_leftovers(out)


@pytest.mark.slow
def test_a_real_file_size_limit_mid_write_is_a_message(tmp_path, clf_path):
    """The kernel refuses the write part-way (RLIMIT_FSIZE): a DiskFullError, no partial file."""
    script = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
        "from juap.commands.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [sys.executable, "-c", script, *attack_argv(out, clf_path)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "the file size limit was reached" in proc.stderr and "Traceback" not in proc.stderr
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# -- every row of the bad-input table through the CLI: a message and exit code 2, no traceback ----------
def _img(path, seed=0, size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    messy = root / "messy"
    for c in ("a", "b"):
        for i in range(8):
            _img(messy / c / f"{i}.png", seed=i + 10 * (c == "b"))
    (messy / "a" / "notes.txt").write_text("not an image")
    (messy / "a" / "garbage.jpg").write_bytes(b"\xff\xd8 not a jpeg" * 20)
    good = (messy / "b" / "0.png").read_bytes()
    (messy / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "empty").mkdir()
    _img(root / "flat" / "x.png")
    for i in range(12):
        _img(root / "one_class" / "cat" / f"{i}.png", seed=i)
    for c, n in (("a", 11), ("b", 1)):  # a 10% train split of these holds class a alone
        for i in range(n):
            _img(root / "lopsided" / c / f"{i}.png", seed=i)
    return root


def _bad_cases(root: Path, clf_path: str, tmp: Path):
    """(argv, expected message) for each row of the table."""
    other_arch = tmp / "resnet.safetensors"
    juap.save_classifier(juap.create_classifier("small_resnet", num_classes=6, widths=(4, 8, 8)), other_arch)
    evil = tmp / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (print, ("this would run code",))

    with open(evil, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    cut = tmp / "cut.safetensors"
    cut.write_bytes(Path(clf_path).read_bytes()[:500])
    noise = tmp / "noise.bin"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty_ckpt = tmp / "empty.pth"
    empty_ckpt.write_bytes(b"")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    p64, p2d = tmp / "p64.safetensors", tmp / "p2d.safetensors"
    juap_io.save_tensors(p64, {"perturbation": torch.zeros(3, 64, 64)})
    juap_io.save_tensors(p2d, {"perturbation": torch.zeros(32, 32)})
    p_nan, p_inf, p48, p48_says_10 = (tmp / f"{n}.safetensors" for n in ("nan", "inf", "p48", "p48_says_10"))
    for path, value in ((p_nan, float("nan")), (p_inf, float("inf"))):
        n = torch.zeros(3, 32, 32)
        n[0, 0, 0] = value
        juap_io.save_tensors(path, {"perturbation": n})
    linf48 = torch.full((3, 32, 32), 48 / 255)
    juap_io.save_tensors(p48, {"perturbation": linf48}, {"attack": "uap", "norm": "linf", "eps": 48})
    juap_io.save_tensors(p48_says_10, {"perturbation": linf48}, {"attack": "uap", "norm": "linf", "eps": 10})
    p_odd_budget = tmp / "odd_budget.safetensors"
    juap_io.save_tensors(p_odd_budget, {"perturbation": linf48}, {"norm": "linf", "eps": "ten"})
    bare48 = tmp / "bare48.safetensors"
    juap_io.save_tensors(bare48, {"perturbation": linf48})
    existing = tmp / "existing"
    existing.mkdir()
    (existing / "x").write_text("x")
    w = f"classifier.weights={clf_path}"
    att = ["attack", "--no-progress", *DATA, "--set", w]
    ev = ["evaluate", "--no-progress", *DATA, "--set", w]
    folder = ["train-classifier", "--set", "data.name=folder", "--set", "data.image_size=32", "--set"]
    train = ["train-classifier", *DATA, "--out"]
    juap_cam = ["--set", "attack.name=juap", "--set", "interpreter.name=cam"]
    return {
        "empty folder": ([*folder, f"data.root={root / 'empty'}"], "it is empty"),
        "no class subfolders": ([*folder, f"data.root={root / 'flat'}"], "no class subfolders"),
        "missing folder": ([*folder, f"data.root={root / 'nope'}"], "does not exist"),
        "one class (train-classifier)": ([*folder, f"data.root={root / 'one_class'}"], "of 1 class (cat)"),
        "one class (attack)": (
            ["attack", *DATA, "--set", "data.name=folder", "--set", f"data.root={root / 'one_class'}"],
            "need at least 2 classes",
        ),
        "train split of one class": (
            [*folder, f"data.root={root / 'lopsided'}", "--set", "data.train_fraction=0.1"],
            "the train split holds images of 1 class (a) of 2",
        ),
        "perturbation of another size": ([ev[0], "-p", str(p64), *ev[1:]], "64x64 but the data"),
        "perturbation of another shape": ([ev[0], "-p", str(p2d), *ev[1:]], "(3, H, W)"),
        "perturbation holding NaN": ([ev[0], "-p", str(p_nan), *ev[1:]], "holds 1 NaN and 0 infinite"),
        "perturbation holding Inf": ([ev[0], "-p", str(p_inf), *ev[1:]], "holds 0 NaN and 1 infinite"),
        "config budget other than the file's": (
            [ev[0], "-p", str(p48), *ev[1:], "--set", "attack.eps=8"],
            "records its budget as L_inf eps=48 (measured 48), but the config gives L_inf eps=8",
        ),
        "perturbation above the config's budget": (
            [ev[0], "-p", str(bare48), *ev[1:], "--set", "attack.eps=8"],
            "measures 48 in L_inf (0-255 units), more than L_inf eps=8, the budget the config gives",
        ),
        "perturbation with a budget that is not one": (
            [ev[0], "-p", str(p_odd_budget), *ev[1:]],
            "records a budget juap cannot read (norm='linf', eps='ten'",
        ),
        "perturbation above its file's budget": (
            [ev[0], "-p", str(p48_says_10), *ev[1:]],
            "more than L_inf eps=10, the budget its file records: the metadata does not describe the tensor",
        ),
        "checkpoint of another class count": (
            [*att[:-1], f"classifier.weights={other_arch}"],
            "has 6 classes but the data set has 4",
        ),
        "checkpoint of another architecture": (
            [*att, "--set", "classifier.name=resnet18"],
            "saved for classifier 'small_resnet', not 'resnet18'",
        ),
        "unsafe pickle": ([*att[:-1], f"classifier.weights={evil}"], "refused to load"),
        "truncated checkpoint": ([*att[:-1], f"classifier.weights={cut}"], "truncated"),
        "random bytes as a .bin checkpoint": (
            [*att[:-1], f"classifier.weights={noise}"],
            "is not a PyTorch checkpoint: it is neither a zip archive (torch.save) nor a pickle",
        ),
        "misspelt config key": ([*att, "--set", "data.image_sise=32"], "Did you mean 'data.image_size'"),
        "classifier option another architecture does not take": (
            ["attack", *DATA, "--set", "classifier.name=resnet18", "--set", "classifier.options={c: 4}"],
            "classifier 'resnet18' got an unexpected keyword argument 'c' (check classifier.options)",
        ),
        "a generator that is not a name": (
            [*att, "--set", "attack.name=guap", "--set", "attack.params={steps: 1, generator: 3}"],
            "attack.params.generator must be str or Module, got 3",
        ),
        "misspelt attack parameter": (
            [*att, "--set", "attack.params={stpes: 2}"],
            "Did you mean 'attack.params.steps'",
        ),
        "budget 0": ([*att, "--set", "attack.eps=0"], "attack.eps = 0.0 is out of range"),
        "budget < 0": ([*att, "--set", "attack.eps=-3"], "out of range"),
        "budget NaN": ([*att, "--set", "attack.eps=.nan"], "NaN"),
        "lambda < 0": ([*att, *juap_cam, "--set", "attack.params={lam: -0.1}"], "lam"),
        "target class out of range": (
            [*att, "--set", "attack.name=guap_ct", "--set", "attack.params={target: 9}"],
            "target class 9 is out of range",
        ),
        "output folder exists": ([*train, str(existing)], "pass --overwrite to replace it, or --resume"),
        "resume without a run": ([*train, str(tmp / "none"), "--resume"], "nothing to resume"),
        "resume and overwrite": ([*train, str(existing), "--resume", "--overwrite"], "pass only one"),
        "empty checkpoint": ([*att[:-1], f"classifier.weights={empty_ckpt}"], "is empty (0 bytes)"),
        "--out is a file": ([*train, str(a_file)], f"--out '{a_file}' is a file, not a folder"),
        "--out under a file": ([*train, str(a_file / "run")], f"{a_file} is a file, not a folder (Not a dir"),
        "--out with a name too long": (
            [*train, str(tmp / ("x" * 300) / "run")],
            "a name in the path is too long for the file system",
        ),
        "checkpoint period 0": ([*att, "--checkpoint-every", "0"], "--checkpoint-every 0 is out of range"),
    }


def test_every_bad_input_is_a_message_and_exit_code_not_a_traceback(tmp_path, capsys, clf_path, folders):
    cases = _bad_cases(folders, clf_path, tmp_path)
    for name, (argv, message) in cases.items():
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / name.replace(" ", "_").replace("/", "_"))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code, _, err = run(capsys, *argv)  # an exception escaping main() would fail the test here
        assert code == 2, (name, err)
        assert message in err, (name, err)
        assert "Traceback" not in err and f"juap {argv[0]}: error:" in err, (name, err)
        errors = [ln for ln in err.strip().splitlines() if not ln.startswith("warning: ")]
        assert len(errors) == 1, (name, err)  # one line, beside the warnings
    assert not [n for n in os.listdir(tmp_path) if n.startswith("xxx")]  # nothing half-made
    assert (tmp_path / "a_file").read_text() == "x"
    assert len(cases) == 36


def test_evaluate_reports_the_perturbation_own_budget_and_norm(tmp_path, capsys, clf_path):
    """The budget in metrics.json is the file's (never the config's default), or the config's for a file
    that records none, or none at all; the measured norms are always the perturbation's own."""
    linf48 = torch.full((3, 32, 32), 48 / 255)
    linf48[1] = -20 / 255
    with_budget, bare = tmp_path / "p48.safetensors", tmp_path / "bare.safetensors"
    juap_io.save_tensors(with_budget, {"perturbation": linf48}, {"attack": "uap", "norm": "linf", "eps": 48})
    juap_io.save_tensors(bare, {"perturbation": linf48})
    l2 = float(linf48.norm() * 255)
    ev = ["evaluate", "--no-progress", *DATA, "--set", f"classifier.weights={clf_path}"]
    runs = {
        "file's budget, none given": ([str(with_budget)], ("uap", "linf", 48, "file", 48)),
        "file's budget, the same given": (
            [str(with_budget), "--set", "attack.eps=48"],
            ("uap", "linf", 48, "file", 48),
        ),
        "no budget anywhere": ([str(bare)], (None, None, None, None, 48)),
        "config's budget for a bare file": (
            [str(bare), "--set", "attack.norm=l2", "--set", f"attack.eps={l2 + 1}"],
            (None, "l2", l2 + 1, "config", l2),
        ),
    }  # fmt: skip
    for k, (argv, expected) in enumerate(runs.values()):
        out = tmp_path / f"ev{k}"
        code, stdout, err = run(capsys, ev[0], "-p", *argv, *ev[1:], "--out", str(out))
        assert code == 0, err
        m = json.loads((out / "metrics.json").read_text())
        got = (m["attack"], m["norm"], m["eps"], m["budget_source"], m["perturbation_norm"])
        assert got[:4] == expected[:4] and got[4] == pytest.approx(expected[4], rel=1e-5), (argv, got)
        assert m["perturbation_linf"] == pytest.approx(48, rel=1e-5)
        assert m["perturbation_l2"] == pytest.approx(l2, rel=1e-5)
        assert math.isfinite(m["fooling_ratio"])
        assert ("none recorded" in stdout) == (expected[2] is None)


def test_a_perturbation_over_its_budget_or_not_finite_is_neither_saved_nor_evaluated(tmp_path):
    from juap.app.artifacts import save_perturbation
    from juap.errors import JuapError

    over = torch.full((3, 8, 8), 10.5 / 255)
    with pytest.raises(JuapError, match="measures 10.5 in linf, above its budget eps=10: not saved"):
        save_perturbation(tmp_path / "p", over, attack="uap", norm="linf", eps=10)
    save_perturbation(tmp_path / "p", over * (10 / 10.5), attack="uap", norm="linf", eps=10)  # on the budget
    nan = torch.zeros(3, 8, 8)
    nan[0, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match="holds 1 NaN"):
        save_perturbation(tmp_path / "q", nan, attack="uap", norm="linf", eps=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "p.safetensors", "p_amplified.png"]
    clf, x = _toy()
    with pytest.raises(NumericalError, match="holds 1 NaN"):
        juap.evaluate(clf, torch.nn.functional.pad(nan, (4, 4, 4, 4)), x[:4])


def test_an_attack_on_a_train_split_of_one_image_holds_none_out(tmp_path, capsys):
    """Found by tests/test_fuzz_cli.py: validation took the only train image and the fit crashed."""
    for c in ("a", "b"):
        _img(tmp_path / "data" / c / "0.png", seed=ord(c))
    sets = [
        "data.name=folder",
        f"data.root={tmp_path / 'data'}",
        "data.image_size=32",
        "data.train_fraction=0.5",
        "data.test_fraction=0.5",
        "classifier.options={widths: [4, 8, 8]}",
        "attack.name=guap",
        "attack.params={steps: 1, generator_options: {ngf: 4, n_blocks: 1}}",
    ]
    out = tmp_path / "run"
    argv = ["attack", "--no-progress", "--out", str(out), *(a for v in sets for a in ("--set", v))]
    with pytest.warns(UserWarning, match="the train split holds 1 image"):
        code, _, err = run(capsys, *argv)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["data_summary"]["train_images"] == 1 and "val_images" not in m["data_summary"]


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys, folders):
    out = tmp_path / "run"
    sets = [
        "data.name=folder",
        f"data.root={folders / 'messy'}",
        "data.image_size=16",
        "train.epochs=1",
        "classifier.options={widths: [4, 8, 8]}",
        "data.train_fraction=0.5",
        "data.test_fraction=0.5",
    ]
    argv = ["train-classifier", "--out", str(out), "--no-progress", *[a for v in sets for a in ("--set", v)]]
    with pytest.warns(UserWarning, match="skipped 3 unreadable or non-image files"):
        code, _, err = run(capsys, *argv)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_images"] + 8 == 16  # 16 readable, half tested
    summary = m["data_summary"]
    assert summary["per_class"] == {"a": 8, "b": 8} and summary["images"] == 16
    assert summary["skipped_files"] == 3 and len(summary["skipped_examples"]) == 3
    assert sum(summary["train_per_class"].values()) == summary["train_images"] == 8
    assert sum(summary["test_per_class"].values()) == summary["test_images"] == 8


def test_resume_refuses_another_config_and_a_complete_run(tmp_path, capsys, clf_path):
    out = tmp_path / "run"
    base = [*attack_argv(out, clf_path)[: -len(ATTACK)], "--set", "attack.name=guap"]
    code, _, err = run(capsys, *base, *SMALL)
    assert code == 0, err
    code, _, err = run(capsys, *base, *SMALL, "--resume")
    assert code == 2 and "already complete" in err
    info = json.loads((out / "run.json").read_text())
    info["status"] = "interrupted"
    write_json(out / "run.json", info)
    wider = "attack.params={steps: 2, batch_size: 8, generator_options: {ngf: 16, n_blocks: 1}}"
    code, _, err = run(capsys, *base, "--set", wider, "--resume")
    assert code == 2 and "another config" in err and "ngf" in err and "Traceback" not in err
    # a loop checkpoint of another generator (e.g. copied in by hand) is refused too
    save_checkpoint(out / CHECKPOINT_NAME, {"step": 1, "identity": {"generator": "unet"}}, kind="guap")
    code, _, err = run(capsys, *base, *SMALL, "--resume")
    assert code == 2 and "written by another setup" in err and "generator" in err
    (out / CHECKPOINT_NAME).write_bytes(b"\x00" * 10)
    code, _, err = run(capsys, *base, *SMALL, "--resume")
    assert code == 2 and "truncated" in err


# -- helpers -----------------------------------------------------------------------------------------
class _Flaky(torch.nn.Module):
    """A tiny generator whose output becomes NaN on the given (1-based) calls."""

    calls = 0

    def __init__(self, bad) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bad = set(bad)

    def forward(self, z):
        type(self).calls += 1
        out = torch.tanh(self.conv(z))
        return out * float("nan") if type(self).calls in self.bad else out


def _toy():
    _Flaky.calls = 0
    torch.manual_seed(0)
    clf = juap.create_classifier("small_resnet", num_classes=3, widths=(4, 8, 8))
    return clf, torch.rand(32, 3, 16, 16)
