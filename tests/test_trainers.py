"""One declared trainer (issue 28): every training loop (the universal attacks, the classifier trainer, the
RTS trainer) is a :class:`~juap.runtime.loop.Trainer`, and the loop engine resumes each the same way.

The resume test runs every trainer N steps straight, then again killed after step k (the last checkpoint
is step k, the step after it dies before its own checkpoint, as under SIGKILL), and resumed from that
checkpoint with new objects to step N: the result is bitwise the straight run's (same process, CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

import pytest
import torch
from torch.utils.data import TensorDataset

import juap
from helpers import one_thread  # noqa: F401  (autouse: one thread for this module)
from juap.attacks.base import UniversalAttack
from juap.classifiers.training import ClassifierTrainer, train_classifier
from juap.data import InMemoryLoader, make_loader
from juap.interpreters.rts import RTS
from juap.interpreters.rts_training import RTSTrainer, train_rts
from juap.runtime.checkpoint import CHECKPOINT_NAME
from juap.runtime.io import read_metadata
from juap.runtime.loop import Checkpointing, Trainer, TrainLoop

CPU = torch.device("cpu")
GEN = {"ngf": 4, "n_blocks": 1}


def _classifier(seed: int = 0) -> juap.Classifier:
    torch.manual_seed(seed)
    return juap.create_classifier("small_resnet", num_classes=3, widths=(4, 8, 8))


def _images(n: int, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


@dataclass
class Case:
    """A trainer under test: ``run(checkpoint, log)`` trains fresh objects and returns their final tensors."""

    run: Callable[[Checkpointing, Any], Dict[str, torch.Tensor]]
    steps: int
    kill_after: int


def _attack_case(name: str, total: int, kill_after: int, loader: bool = False, **params) -> Case:
    clf = _classifier()
    x, y = _images(24, size=32)
    cam = juap.create_interpreter("cam", clf)

    def run(checkpoint, log):
        torch.manual_seed(5)
        extra = {"interpreter": cam} if juap.ATTACKS.get(name).takes_interpreter else {}
        attack = juap.create_attack(name, classifier=clf, norm="linf", eps=16, **extra, **params)
        data = make_loader(TensorDataset(x, y), batch_size=8, shuffle=True, seed=6) if loader else x
        n_hat = attack.fit(data, val_data=x[:8], progress=False, checkpoint=checkpoint, log=log)
        return {"perturbation": n_hat}

    return Case(run, total, kill_after)


def _classifier_case() -> Case:
    x, y = _images(32)

    def run(checkpoint, log):
        clf = _classifier(seed=2)
        loader = InMemoryLoader(x, y, batch_size=8, augment=True, seed=3, drop_last=True)
        train_classifier(clf, loader, epochs=3, lr=0.05, device=CPU, progress=False, checkpoint=checkpoint,
                         log=log)  # fmt: skip
        return clf.state_dict()  # weights and BatchNorm statistics

    return Case(run, steps=12, kill_after=5)  # 3 epochs x 4 batches: killed mid-epoch


def _rts_case() -> Case:
    clf = _classifier().eval()
    x, y = _images(32, size=32)
    batches = [(x[i : i + 8], y[i : i + 8], 0) for i in range(0, 32, 8)]

    def run(checkpoint, log):
        torch.manual_seed(4)
        rts = RTS(clf, width=8)
        train_rts(rts, batches, epochs=2, lr=1e-2, fake_label_prob=0.5, device=CPU, progress=False,
                  checkpoint=checkpoint, log=log)  # fmt: skip
        return rts.trainable_state_dict()

    return Case(run, steps=8, kill_after=3)


CASES = {
    "juap": lambda: _attack_case("juap", 6, 3, steps=6, eval_every=2, batch_size=8, generator_options=GEN),
    "guap": lambda: _attack_case("guap", 6, 4, steps=6, eval_every=3, batch_size=8, generator_options=GEN),
    "sgd_uap": lambda: _attack_case("sgd_uap", 3, 1, epochs=3, batch_size=8),
    "uap": lambda: _attack_case(  # a shuffled loader: its order is part of the state
        "uap", 3, 1, loader=True, max_passes=3, target_fooling_rate=1.0, deepfool_steps=5
    ),
    "classifier": _classifier_case,
    "rts": _rts_case,
}


class _Killed(Exception):
    pass


def _kill_at(step: int):
    """A history log that dies while step ``step`` ends (its row is logged before its checkpoint)."""

    def log(row, images):
        if next(iter(row.values())) >= step:  # the row's first key is the loop's unit: its step
            raise _Killed

    return log


@pytest.mark.parametrize("name", list(CASES))
def test_a_killed_and_resumed_training_equals_a_straight_one(name, tmp_path):
    case = CASES[name]()
    straight = case.run(None, None)
    with pytest.raises(_Killed):
        case.run(Checkpointing(tmp_path, every=1), _kill_at(case.kill_after + 1))
    assert int(read_metadata(tmp_path / CHECKPOINT_NAME)["step"]) == case.kill_after
    resumed = case.run(Checkpointing(tmp_path, resume=True), None)
    assert straight.keys() == resumed.keys()
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), f"{name}: {k} differs after resuming at step {case.kill_after}"
    assert int(read_metadata(tmp_path / CHECKPOINT_NAME)["step"]) == case.steps


def test_every_trainer_declares_the_base():
    universal = [juap.ATTACKS.get(n) for n in juap.list_attacks() if juap.ATTACKS.get(n).universal]
    assert {"juap", "guap", "sgd_uap", "uap"} <= {c.name for c in universal}
    for cls in [*universal, UniversalAttack, ClassifierTrainer, RTSTrainer]:
        assert issubclass(cls, Trainer), cls


def test_the_base_declares_the_members_and_the_engine_drives_only_trainers():
    abstract = {"num_steps", "init", "step", "state_dict", "load_state_dict", "result"}
    assert Trainer.__abstractmethods__ == abstract

    class Half(Trainer):  # no step, no result
        num_steps = 1

        def init(self, data, val_data=None, *, progress=True):
            pass

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    with pytest.raises(TypeError, match="abstract"):
        Half()
    with pytest.raises(TypeError, match="not a juap.runtime.loop.Trainer"):
        TrainLoop("toy", progress=False).train(object(), data=None)
