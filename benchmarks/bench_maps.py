"""Do the maps mean something? Pointing game and a model-randomisation check on the embedded data.

    python benchmarks/bench_maps.py --classifier CLF.safetensors [--rts RTS.safetensors] [--images 300]

Prints, for CAM, Grad-CAM and (given a checkpoint) RTS: the share of held-out images whose top-20% map
pixels mostly lie on the object's box (goal: >= 80%), the same for a randomly re-initialised copy of
the classifier (Adebayo et al.'s sanity check: it should drop), and the mean Spearman rank correlation
between the trained and the randomised model's maps (near 0: the maps depend on what was learned).
"""

from __future__ import annotations

import argparse

import torch

import juap
from juap.data import DataConfig, load_splits
from juap.interpreters.sanity import (
    held_out_images_with_boxes,
    pointing_rates,
    randomized_copy,
    rank_correlation,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classifier", required=True, help="classifier checkpoint trained on the synthetic data")
    p.add_argument("--rts", help="RTS checkpoint for that classifier")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args()
    clf = juap.load_classifier(args.classifier)
    splits = load_splits(DataConfig(image_size=args.image_size))
    x, y, boxes = held_out_images_with_boxes(splits, args.images)
    interps = {"cam": juap.create_interpreter("cam", clf), "gradcam": juap.create_interpreter("gradcam", clf)}
    if args.rts:
        interps["rts"] = juap.create_interpreter("rts", clf, checkpoint=args.rts)
    rand = randomized_copy(clf)
    rand_interps = {
        "cam": juap.create_interpreter("cam", rand),
        "gradcam": juap.create_interpreter("gradcam", rand),
    }
    with torch.no_grad():
        acc = (clf(x).argmax(1) == y).float().mean().item()
    trained = pointing_rates(interps, x, boxes)
    randomised = pointing_rates(rand_interps, x, boxes)
    print(
        f"{len(x)} held-out images, classifier accuracy {acc:.1%}; pointing: top-20% pixels mostly in the box"
    )
    print(f"{'interpreter':<12}{'pointing':>10}{'goal':>8}{'randomised':>12}{'rank corr.':>12}")
    for name, rate in trained.items():
        if name in rand_interps:
            with torch.no_grad():
                corr = rank_correlation(interps[name](x), rand_interps[name](x)).mean().item()
            r_s, c_s = f"{randomised[name]:.1%}", f"{corr:.2f}"
        else:
            r_s = c_s = "-"
        print(f"{name:<12}{rate:>10.1%}{'>=80%':>8}{r_s:>12}{c_s:>12}  {'met' if rate >= 0.8 else 'missed'}")


if __name__ == "__main__":
    main()
