"""Data-parallel throughput: JUAP-CAM training steps in 2 gloo processes against 1 process, on this CPU.

    python benchmarks/bench_distributed.py [--quick] [--steps N] [--batch B] [--out DIR]

Setting: the demo classifier's architecture (small_resnet 16-32-64, random weights, 6 classes) at 64x64,
the JUAP attack against CAM with the default ResNet generator (ngf 64, 6 blocks), global batch 30 split
over the ranks exactly as ``torchrun --nproc_per_node N -m juap attack`` does (juap.runtime.distributed). Each
process uses one torch thread; the 1-process run is also timed with as many threads as the 2-process
run has processes, the fair comparison on one machine. Throughput = global images per second of wall
time over the timed steps (after warm-up steps), from rank 0, between barriers.

The generator's forward and backward on its one noise input is the same on every rank and is not split
(Amdahl's serial part): with the small demo classifier it is most of a step at 64x64 (0.52 s of ~0.55 s
here), so more processes cannot help there; ``--classifier resnet18`` shows a setting where the
classifier's per-image work dominates, as it does for ResNet18/DenseNet121 at 224x224.

On a GPU machine the same command with ``--device cuda`` (NCCL, one GPU per rank) measures multi-GPU
scaling; on a 2-core CPU the two processes compete with everything else running on it (the load average
is printed beside the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "src"))

import juap  # noqa: E402
from juap.runtime import distributed  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: Dict[str, Any], out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(cfg["threads"])
    distributed.init_from_env(cfg["backend"])
    try:
        res = time_steps(cfg)
        if distributed.is_main():
            Path(out).write_text(json.dumps(res))
    finally:
        distributed.cleanup()


def time_steps(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Warm-up and timed JUAP steps on this rank's slice of each global batch (as ``fit`` runs them)."""
    from juap.attacks.fastpaths import FastPaths

    dev = torch.device(cfg["device"])
    dev = distributed.device_for_rank(dev)
    torch.manual_seed(0)
    clf = juap.create_classifier(cfg["classifier"], num_classes=6).to(dev).eval()
    cam = juap.create_interpreter("cam", clf)
    attack = juap.create_attack(
        "juap", classifier=clf, interpreter=cam, norm="linf", eps=10, batch_size=cfg["batch"], device=dev
    )
    size = cfg["size"]
    g = torch.Generator().manual_seed(0)
    x_all = torch.rand(cfg["batch"] * 4, 3, size, size, generator=g)
    attack.noise = torch.rand(1, 3, size, size, generator=g).to(dev)
    G = attack.make_generator().to(dev).train()
    opt = torch.optim.Adam(G.parameters(), lr=attack.lr, betas=attack.betas)
    fast = FastPaths(device=dev)
    G_fwd, interp = fast.prepare(distributed.wrap_ddp(G), cam, clf)
    batches = [
        distributed.local_slice(x_all[i : i + cfg["batch"]]).to(dev)
        for i in range(0, len(x_all), cfg["batch"])
    ]
    for i in range(cfg["warmup"]):
        attack.train_step(G_fwd, opt, batches[i % len(batches)], interp)
    distributed.barrier()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(cfg["steps"]):
        attack.train_step(G_fwd, opt, batches[i % len(batches)], interp)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier()
    wall = time.perf_counter() - t0
    comm = float("nan")
    if distributed.world_size() > 1:  # the gradient all-reduce alone: DDP's communication per step
        flat = torch.zeros(sum(p.numel() for p in G.parameters()), device=dev)
        t1 = time.perf_counter()
        for _ in range(5):
            torch.distributed.all_reduce(flat)
        comm = (time.perf_counter() - t1) / 5
    return {
        "generator_parameters": sum(p.numel() for p in G.parameters()),
        "allreduce_seconds": comm,
        "world": distributed.world_size(),
        "threads_per_process": torch.get_num_threads(),
        "seconds_per_step": wall / cfg["steps"],
        "images_per_second": cfg["batch"] * cfg["steps"] / wall,
    }


def run_world(world: int, cfg: Dict[str, Any], tmp: Path) -> Dict[str, Any]:
    out = tmp / f"world{world}-threads{cfg['threads']}.json"
    if world == 1:  # one process: this one, without a process group
        torch.set_num_threads(cfg["threads"])
        res = time_steps(cfg)
        out.write_text(json.dumps(res))
    else:
        torch.multiprocessing.start_processes(
            _worker, args=(world, _free_port(), cfg, str(out)), nprocs=world, join=True, start_method="spawn"
        )
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20, quick 6)")
    ap.add_argument("--batch", type=int, default=30, help="global batch (default 30)")
    ap.add_argument("--size", type=int, default=64, help="image side (default 64)")
    ap.add_argument("--classifier", default="small_resnet", help="classifier architecture (random weights)")
    ap.add_argument("--no-threads-baseline", action="store_true", help="skip 1 process with N threads")
    ap.add_argument("--world", type=int, default=2, help="processes of the data-parallel run (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="where the JSON goes")
    args = ap.parse_args()
    steps = args.steps or (6 if args.quick else 20)
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    base = {
        "batch": args.batch,
        "size": args.size,
        "steps": steps,
        "warmup": 2,
        "device": args.device,
        "backend": backend,
        "classifier": args.classifier,
    }
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="juap-bench-ddp-"))
    runs = {
        "1 process, 1 thread": run_world(1, {**base, "threads": 1}, tmp),
        f"{args.world} processes, 1 thread each": run_world(args.world, {**base, "threads": 1}, tmp),
    }
    if not args.no_threads_baseline:
        runs[f"1 process, {args.world} threads"] = run_world(1, {**base, "threads": args.world}, tmp)
    load = [round(v, 2) for v in os.getloadavg()]
    print(
        f"JUAP-CAM steps, {args.classifier} {args.size}x{args.size}, global batch {args.batch}, "
        f"{steps} timed steps, {args.device}; load average {load}"
    )
    print("| run | s/step | images/s |")
    print("|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['seconds_per_step']:.3f} | {r['images_per_second']:.1f} |")
    one, multi = runs["1 process, 1 thread"], runs[f"{args.world} processes, 1 thread each"]
    fair = runs.get(f"1 process, {args.world} threads", {"images_per_second": float("nan")})
    print(
        f"gradient all-reduce of the generator ({multi['generator_parameters'] / 1e6:.1f} M parameters) "
        f"alone: {multi['allreduce_seconds']:.3f} s per step"
    )
    line = (
        f"speed-up of {args.world} processes: {multi['images_per_second'] / one['images_per_second']:.2f}x "
    )
    line += "over 1 process with 1 thread"
    if fair["images_per_second"] == fair["images_per_second"]:  # not NaN: the threads baseline ran
        line += f", {multi['images_per_second'] / fair['images_per_second']:.2f}x over 1 process with "
        line += f"{args.world} threads"
    print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"distributed_{args.classifier}.json"
    path.write_text(json.dumps({"setting": base, "load_average": load, "runs": runs}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
