"""Maps: throughput of evaluating Grad-CAM (and CAM) maps plus the metrics over a data set, ours vs peers.

    python benchmarks/bench_map_throughput.py [--quick] [--threads N] [--out DIR]

Every pipeline gets the same ResNet18 (random weights, 1000 classes), the same images (the demo's held-out
images resized to 224x224), the same universal perturbation (a random sign pattern at L_inf 10) and the
same batch size, and computes, per batch, the benign and adversarial predictions, the benign map (of
f(x)) and the adversarial map (of f(x_hat)), then the fooling ratio, map L1 (eq 19) and top-k IoU
(eq 20) with juap's :class:`~juap.metrics.MetricSums` (so only the maps differ):

* ``ours``: ``juap.evaluate(clf, n_hat, data, interpreters={"gradcam": ...})``: one forward gives the
  logits and the map (the gradient goes back through the linear head only);
* ``pytorch-grad-cam``: ``GradCAM(model, target_layers=[layer4])`` called with ``targets=None`` (it
  explains its own forward's argmax; the logits are ``cam.outputs``), the model used as its docs show
  (parameters require grad); its maps come upsampled to the image size and normalised;
* ``Captum``: a forward for the predictions, then ``LayerGradCam(model, layer4).attribute(x, target=...,
  relu_attributions=True)``.

Goal: ours >= 4x pytorch-grad-cam's throughput and >= 2x Captum's. ``ours CAM+Grad-CAM`` (both maps from
the same forward) is shown for reference. Process CPU time, one torch thread; interleaved repeats.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn.functional as F

import juap
from _common import demo_data, freeze, goal, interleaved, print_goals, print_table, standalone
from juap.metrics import MetricSums

GOALS = {"pytorch-grad-cam": 4.0, "Captum": 2.0}


def _batches(x: torch.Tensor, bs: int):
    return [(x[i : i + bs], None) for i in range(0, len(x), bs)]


def run(quick: bool, out_dir: Path) -> Dict[str, Any]:
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM

    n, size, bs, repeats = (32, 160, 16, 1) if quick else (48, 224, 16, 3)
    torch.manual_seed(0)
    clf = freeze(juap.create_classifier("resnet18"))
    _, _, x_small, _, _ = demo_data(0, n)
    x = F.interpolate(x_small[:n], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    v = (torch.randint(0, 2, (3, size, size), generator=torch.Generator().manual_seed(1)) * 2 - 1) * 10 / 255
    data = _batches(x, bs)

    gradcam = juap.create_interpreter("gradcam", clf)
    cam = juap.create_interpreter("cam", clf)
    peer_model = copy.deepcopy(clf).eval()  # used as pytorch-grad-cam's docs show: parameters require grad
    for p in peer_model.parameters():
        p.requires_grad_(True)
    pgc = GradCAM(model=peer_model, target_layers=[peer_model.model.layer4])
    captum = LayerGradCam(clf, clf.model.layer4)

    def ours(interps) -> Dict[str, float]:
        out = juap.evaluate(clf, v, data, interpreters=interps, batch_size=bs)
        return {"fooling_ratio": out["fooling_ratio"], **out["interpreters"]["gradcam"]}

    def pytorch_grad_cam() -> Dict[str, float]:
        preds, maps = MetricSums(), MetricSums()
        for i, (xb, _) in enumerate(data):
            xh = (xb + v).clamp(0, 1)
            bm = torch.from_numpy(pgc(input_tensor=xb, targets=None))
            bl = pgc.outputs.detach()
            am = torch.from_numpy(pgc(input_tensor=xh, targets=None))
            al = pgc.outputs.detach()
            preds.update_predictions(bl, al)
            maps.update_maps(bm, am, seed=i)
        return {**preds.summary(), **maps.summary()}

    def captum_pipeline() -> Dict[str, float]:
        preds, maps = MetricSums(), MetricSums()
        for i, (xb, _) in enumerate(data):
            xh = (xb + v).clamp(0, 1)
            with torch.no_grad():
                bl, al = clf(xb), clf(xh)
            bm = captum.attribute(xb, target=bl.argmax(1), relu_attributions=True).detach()[:, 0]
            am = captum.attribute(xh, target=al.argmax(1), relu_attributions=True).detach()[:, 0]
            preds.update_predictions(bl, al)
            maps.update_maps(bm, am, seed=i)
        return {**preds.summary(), **maps.summary()}

    pipelines = {
        "ours Grad-CAM": lambda: ours({"gradcam": gradcam}),
        "ours CAM+Grad-CAM": lambda: ours({"cam": cam, "gradcam": gradcam}),
        "pytorch-grad-cam": pytorch_grad_cam,
        "Captum": captum_pipeline,
    }
    figures = {name: fn() for name, fn in pipelines.items()}  # also the warm-up
    print(
        f"[maps] resnet18 (random weights) {size}x{size}, {n} images, batch {bs}, benign + adversarial "
        f"Grad-CAM maps + metrics; median of {repeats} (CPU s)",
        flush=True,
    )
    med = interleaved(pipelines, repeats=repeats, warmup=0)
    base = med["ours Grad-CAM"]
    rows = [
        {
            "pipeline": name,
            "cpu s": t,
            "images/s": n / t,
            "ours speed-up": t / base,
            "fooling ratio": figures[name].get("fooling_ratio"),
            "l1": figures[name].get("l1"),
            "iou": figures[name].get("iou"),
        }
        for name, t in med.items()
    ]
    print_table(rows, ["pipeline", "cpu s", "images/s", "ours speed-up", "fooling ratio", "l1", "iou"])
    goals = [
        goal(
            f"ours Grad-CAM maps + metrics >= {g:g}x {peer}'s throughput",
            med[peer] / base,
            g,
            higher_is_better=True,
        )
        for peer, g in GOALS.items()
    ]
    print_goals(goals)
    return {
        "name": "maps",
        "title": "2. Maps: Grad-CAM maps + metrics over a data set, ours vs pytorch-grad-cam and Captum",
        "setting": {"arch": "resnet18", "size": size, "images": n, "batch": bs, "repeats": repeats},
        "rows": rows,
        "goals": goals,
    }


if __name__ == "__main__":
    standalone(run, __doc__)
