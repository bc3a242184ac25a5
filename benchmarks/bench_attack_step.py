"""Step cost: one JUAP training step (CAM, Grad-CAM, RTS) as a ratio to a GUAP step and to a plain
forward+backward of the classifier, side by side.

    python benchmarks/bench_attack_step.py [--quick] [--threads N] [--out DIR]

Every step is timed on the same classifier, generator (ResNet, ngf 32), noise and images, in interleaved
rounds (median, process CPU time, one torch thread). ``plain`` is logits = f(x), cross-entropy, gradient
w.r.t. the input (the cost of a classifier-only attack step, without a generator). RTS is an untrained
model saved and loaded from a checkpoint: its step costs what a trained one's does.
Goals (issue 4): JUAP-CAM and JUAP-Grad-CAM <= 1.5x a GUAP step, JUAP-RTS <= 2.5x.
Settings: the demo (small_resnet 64x64, batch 30) and, in the full run, ResNet18 at 224x224, batch 8.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F

import juap
from _common import demo_data, freeze, goal, interleaved, print_goals, print_table, standalone
from juap.attacks.base import rebind
from juap.interpreters.smooth_relu import make_surrogate

GOALS = {"cam": 1.5, "gradcam": 1.5, "rts": 2.5}


def step_fn(attack, x: torch.Tensor) -> Callable[[], None]:
    """One training step of a generator attack (its ``_step``) on ``x``, as ``fit`` runs it."""
    torch.manual_seed(0)
    G = attack.make_generator().train()
    attack.noise = torch.rand((1,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(G.parameters(), lr=attack.lr, betas=attack.betas)
    interp = attack.interpreter
    if interp is not None and attack.use_surrogate:
        interp = rebind(interp, make_surrogate(attack.classifier))
    return lambda: attack.train_step(G, opt, x, interp)


def plain_fn(clf, x: torch.Tensor) -> Callable[[], None]:
    with torch.no_grad():
        y = clf(x).argmax(1)

    def step() -> None:
        xg = x.clone().requires_grad_()
        torch.autograd.grad(F.cross_entropy(clf(xg), y), xg)

    return step


def untrained_rts(clf) -> juap.interpreters.Interpreter:
    """An untrained RTS loaded from a temporary checkpoint (attacks refuse one without a checkpoint)."""
    from juap.interpreters.rts import save_rts

    path = tempfile.mkdtemp() + "/rts.safetensors"
    save_rts(juap.create_interpreter("rts", clf), path)
    return juap.create_interpreter("rts", clf, checkpoint=path)


def steps_for(clf, x: torch.Tensor) -> Dict[str, Callable[[], None]]:
    common = dict(classifier=clf, norm="linf", eps=10, batch_size=len(x), generator_options={"ngf": 32})
    fns = {"plain fwd+bwd": plain_fn(clf, x), "GUAP": step_fn(juap.create_attack("guap", **common), x)}
    for name in ("cam", "gradcam", "rts"):
        interp = untrained_rts(clf) if name == "rts" else juap.create_interpreter(name, clf)
        fns[f"JUAP-{name}"] = step_fn(juap.create_attack("juap", interpreter=interp, **common), x)
    return fns


def run(quick: bool, out_dir: Path) -> Dict[str, Any]:
    repeats = 3
    clf, x_train, _, _, info = demo_data(30, 0)
    settings = [("demo small_resnet", clf, x_train[:30])]
    if not quick:
        torch.manual_seed(0)
        r18 = freeze(juap.create_classifier("resnet18", num_classes=6))
        settings.append(
            ("resnet18", r18, torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
        )
    rows, goals = [], []
    for label, model, x in settings:
        med = interleaved(steps_for(model, x), repeats=repeats, warmup=1)
        setting = f"{label} {x.shape[-1]}x{x.shape[-1]} b{len(x)}"
        print(f"[step_cost] {setting}: median of {repeats} (CPU s)", flush=True)
        for name, t in med.items():
            interp = name.split("-", 1)[1] if name.startswith("JUAP-") else None
            ratio = t / med["GUAP"]
            rows.append(
                {
                    "setting": setting,
                    "step": name,
                    "cpu s": t,
                    "x plain": t / med["plain fwd+bwd"],
                    "x GUAP": ratio,
                    "goal": f"<= {GOALS[interp]}x GUAP" if interp else "",
                }
            )
            if interp:
                goals.append(
                    goal(
                        f"{setting}: JUAP-{interp} step vs GUAP step",
                        ratio,
                        GOALS[interp],
                        higher_is_better=False,
                    )
                )
    print_table(rows, ["setting", "step", "cpu s", "x plain", "x GUAP", "goal"])
    print_goals(goals)
    return {
        "name": "step_cost",
        "title": "4. Step cost: JUAP step vs a GUAP step and a plain forward+backward",
        "setting": {**info, "repeats": repeats, "generator": "resnet ngf 32"},
        "rows": rows,
        "goals": goals,
    }


if __name__ == "__main__":
    standalone(run, __doc__)
