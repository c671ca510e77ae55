"""How much memory does --shard save per process, and what does trainloop cost over FSDP2 by hand?

Trains the same model (a stack of square Linear layers, AdamW) for the same steps three ways,
each on N processes started by torchrun:

  ddp     trainloop.fit, plain: DDP keeps whole weights, gradients and AdamW state everywhere
  shard   trainloop.fit(..., shard=True): FSDP2, each process holds about 1/N of them
  hand    a hand-written FSDP2 loop (fully_shard per layer and at the root, AdamW, no
          checkpoint), the reference for step time

Per process it reports the weights that process trains (its local shards; fit(shard=True)
trains a sharded copy and leaves the model passed, whole, on the CPU); the memory held in
the last step's loss (weights, AdamW's state, DDP's gradient buckets, a step's activations: on
a CPU the growth of the resident set since before the model was built, on a GPU
torch.cuda.memory_allocated); the peak (on a CPU the peak resident set, torch
itself included; on a GPU torch.cuda.max_memory_allocated); and the median step time.
No checkpoint is written (out=None), so only training is measured.

    python benchmarks/shard_memory.py                    # 2 processes on the CPU, ~1 minute
    python benchmarks/shard_memory.py --nproc 4 --width 4096 --layers 8
    python benchmarks/shard_memory.py --gpus             # one process per GPU, NCCL
"""

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import trainloop as tl  # noqa: E402


def build(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(layers)]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def resident(device: torch.device) -> int:
    """Memory in use now: on a CPU the resident set after glibc returns what is free."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    """One process of one variant: train, then print a JSON line of figures."""
    runtime = tl.setup_device("" if args.gpus else "cpu")
    g = torch.Generator().manual_seed(1)
    n = args.batch_size * runtime.world_size * args.steps
    data = TensorDataset(
        torch.randn(n, args.width, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    before = resident(runtime.device)
    model = build(args.width, args.layers)  # fit(shard=True) moves only a sharded copy
    if args.variant != "shard":
        model = model.to(runtime.device)
    trained = [model]  # the module that trains: for shard, fit's sharded copy

    def keep_copy(*args, **kwargs):
        copy, ema = shard(*args, **kwargs)
        trained[0] = copy
        return copy, ema

    shard, tl._shard = tl._shard, keep_copy
    times, held = [], []

    def timed_loss(output, target):  # called once a step: the time between calls is a step
        times.append(time.perf_counter())
        if len(times) == args.steps:  # the last step: weights, optimizer state, DDP's buckets
            held.append(resident(runtime.device) - before)
        return F.cross_entropy(output, target)

    if args.variant == "hand":
        from torch.distributed.fsdp import fully_shard

        for block in model:
            fully_shard(block)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for i in range(0, n // runtime.world_size, args.batch_size):
            start = runtime.rank * (n // runtime.world_size) + i
            x, y = (t[start : start + args.batch_size].to(runtime.device) for t in data.tensors)
            timed_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    else:
        options = dict(epochs=1, batch_size=args.batch_size, optimizer="adamw", lr=1e-3)
        options.update(quiet=True, workers=0, shard=args.variant == "shard", schedule="constant")
        tl.fit(model, data, loss_fn=timed_loss, runtime=runtime, **options)
    step = statistics.median(b - a for a, b in zip(times[1:], times[2:]))
    figures = {"variant": args.variant, "rank": runtime.rank, "world": runtime.world_size}
    figures.update(peak=peak(runtime.device), step_ms=1000 * step)
    figures.update(held=held[0])
    figures.update(params=sum(tl._local(p).nbytes for p in trained[0].parameters()))
    rows = tl._gather(figures, runtime)  # printed by one process: no interleaved lines
    for row in rows if runtime.is_main else ():
        print("FIGURES " + json.dumps(row), flush=True)
    tl.teardown(runtime)


def launch(variant: str, args) -> list:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(args.nproc), __file__, "--variant", variant,
        "--width", str(args.width), "--layers", str(args.layers),
        "--batch-size", str(args.batch_size), "--steps", str(args.steps),
    ] + (["--gpus"] if args.gpus else [])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    rows = [
        json.loads(line[8:]) for line in result.stdout.splitlines() if line.startswith("FIGURES ")
    ]
    if result.returncode or len(rows) != args.nproc:
        sys.exit(f"{variant} failed (exit status {result.returncode}):\n{result.stderr[-3000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("ddp", "shard", "hand"))  # set for the workers
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gpus", action="store_true", help="one process per GPU (NCCL)")
    args = parser.parse_args()
    if args.variant:
        return worker(args)
    if args.gpus and torch.cuda.device_count() < args.nproc:
        sys.exit(f"shard_memory.py --gpus needs {args.nproc} CUDA GPUs")
    model = build(args.width, args.layers)
    whole = sum(p.nbytes for p in model.parameters())
    print(
        f"model: {args.layers} x Linear({args.width}, {args.width}) + head, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"{whole / 2**20:.0f} MiB fp32; AdamW; {args.nproc} processes; "
        f"{'GPU (max_memory_allocated)' if args.gpus else 'CPU (peak RSS, torch included)'}"
    )
    print("variant  rank  weights MiB  held MiB  peak MiB  step ms")
    for variant in ("ddp", "shard", "hand"):
        for row in launch(variant, args):
            print(
                f"{variant:8} {row['rank']:>4} {row['params'] / 2**20:>12.0f} "
                f"{row['held'] / 2**20:>9.0f} {row['peak'] / 2**20:>9.0f} {row['step_ms']:>8.0f}"
            )


if __name__ == "__main__":
    main()
