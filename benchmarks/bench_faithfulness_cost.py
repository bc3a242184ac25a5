"""What the deletion / insertion curves cost (juap.faithfulness), beside Quantus and beside the limit.

One deletion curve of S steps needs S + 1 forward passes per image: the limit is the time of that many
plain forward passes, batched as juap batches them. Quantus 0.6's PixelFlipping computes the same
curve (without step 0; black baseline, one channel per feature: the one-channel view of
``tests/test_faithfulness.py``). Interleaved rounds in one process, median process CPU time, one thread.

    python benchmarks/bench_faithfulness_cost.py [--images 32] [--steps 16] [--size 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

import juap
from _common import RESULTS, interleaved, machine, print_table, setup_threads, write_json
from juap.faithfulness import deletion_insertion


class Grey(nn.Module):
    def __init__(self, clf: nn.Module) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf(x.expand(-1, 3, -1, -1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    setup_threads(1)
    torch.manual_seed(0)
    clf = juap.create_classifier("small_resnet", num_classes=6, widths=(16, 32, 64)).eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    model = Grey(clf).eval()
    n, s, side = args.images, args.steps, args.size
    x = torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(n, side, side, generator=torch.Generator().manual_seed(1))
    classes = torch.zeros(n, dtype=torch.long)
    batch = 4 * n  # as juap.evaluate batches the curves
    stack = x.repeat(s + 1, 1, 1, 1)

    def limit() -> None:  # the forward passes alone, no masks
        with torch.no_grad():
            for i in range(0, len(stack), batch):
                model(stack[i : i + batch]).softmax(1)

    fns = {
        "limit: (S + 1) N forward passes": limit,
        "juap deletion curve": lambda: deletion_insertion(
            model, x, maps, classes, steps=s, baseline="black", batch_size=batch, curves=("deletion",)
        ),
    }
    try:
        import quantus

        metric = quantus.PixelFlipping(
            features_in_step=side * side // s, perturb_baseline=0.0, normalise=False, disable_warnings=True
        )
        fns["Quantus PixelFlipping"] = lambda: metric(
            model=model, x_batch=x.numpy(), y_batch=classes.numpy(), a_batch=maps[:, None].numpy(),
            device="cpu", softmax=True, channel_first=True,
        )  # fmt: skip
    except ImportError:
        print("Quantus is not installed (pip install --no-deps quantus; pandas, cachetools): no row for it")
    med = interleaved(fns, repeats=args.repeats, warmup=1)
    base = med["limit: (S + 1) N forward passes"]
    rows = [{"what": k, "cpu s": v, "x limit": v / base} for k, v in med.items()]
    print(f"{n} images {side}x{side}, S = {s} steps, small_resnet (16, 32, 64), one thread")
    print_table(rows, ["what", "cpu s", "x limit"])
    out = {"machine": machine(), "setting": vars(args), "rows": rows}
    write_json(RESULTS / "faithfulness_cost.json", out)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
