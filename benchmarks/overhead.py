"""How much time does trainloop add over a hand-written PyTorch loop?

Trains the same model on the same data for the same number of optimizer steps five ways:

  a  hand loop    the shortest correct PyTorch loop: DataLoader(TensorDataset, shuffle=True,
                  num_workers=0), SGD(momentum=0.9, nesterov=True) at a constant LR, no .item()
  b  fit(loader)  trainloop.fit given a DataLoader built exactly like (a): the general path,
                  with fit's own optimizer (on a CPU, SGD's fused kernel: see below)
  c  fit(tensors) trainloop.fit given the TensorDataset itself: the in-memory fast path that
                  gathers many batches per indexing op and slices them, with no DataLoader
  d  hand slices  a hand loop that indexes the tensors by a random permutation: the physical
                  limit of the fast path, for reference
  e  fit(loader,  (b) given (a)'s own optimizer object: the loop's own cost alone
     a's optim)

(a), (b) and (e) do the same math: the same parameter groups, SGD update and shuffle order.
On a CPU fit builds SGD with fused=True, torch's one-call kernel for all tensors, where (a) gets
torch's default, a Python loop over tensors; the two round differently now and then. So the
check, run once per case, wants identical final weights from (a) and (e), and from (b) and (a)
run with the fused kernel. b/a is what a user gets from fit; e/a is what the loop itself costs.

The variants alternate, in a rotated order, over several repeats so that drift of a shared
machine cancels; the script reports the median time of each variant, the median of the
per-repeat ratios to a (column "x a", which the targets judge), and the ratio of the fastest
runs ("best x a"), the steadier figure when other work shares the CPU. Two cases: a tiny MLP,
where per-step overhead dominates, and trainloop's default small CNN on 3x32x32 images.

It also times `python trainloop.py --help` against `python -c "import torch"` and reports
whether `import trainloop` pulls in torchvision or typer.

It prints figures and PASS/MISS beside each target; it never fails the run. Threads: torch's
default (torch.get_num_threads()).

    python benchmarks/overhead.py               # full run (about 3-4 minutes on 2 cores)
    python benchmarks/overhead.py --quick       # smoke run, fewer steps and repeats
    python benchmarks/overhead.py --repeats 11
"""

import argparse
import functools
import gc
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
LR = 0.05
SEED = 0
NOISY = 0.25  # (slowest - fastest) / median above this: the machine was busy
VARIANTS = {
    "a": "hand loop (DataLoader)",
    "b": "fit(DataLoader)",
    "c": "fit(TensorDataset)",
    "d": "hand loop (tensor slices)",
    "e": "fit(DataLoader, a's optimizer)",
}


def import_trainloop():
    """The trainloop.py next to this folder (not an installed copy)."""
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("trainloop")


trainloop = import_trainloop()


# ---- the machine -----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_line() -> str:
    """The 1-minute load average: well above 0 before a run means other work shares the CPU."""
    if not hasattr(os, "getloadavg"):
        return "load average unknown"
    return f"load average {os.getloadavg()[0]:.2f} on {usable_cores()} cores"


def machine_line() -> str:
    return (
        f"{cpu_model()}, {usable_cores()} usable cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


# ---- the four training loops -----------------------------------------------------------------


def param_groups(model: nn.Module) -> list:
    """The groups fit() builds: matrices and vectors apart (weight decay is 0 in both here)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": 0.0},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, fused=None) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model), lr=LR, momentum=0.9, nesterov=True, fused=fused)


def torch_loader(data: TensorDataset, batch_size: int) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=0)


def fit_seed() -> None:
    """Seed the global RNG as fit() does before its first epoch, so (a) shuffles as (b) does."""
    torch.manual_seed(trainloop._mix_seed(SEED, 0, 5))


def hand_loop(model: nn.Module, data: TensorDataset, batch_size: int, epochs: int, fused=None):
    """(a) The shortest correct hand-written loop."""
    loader = torch_loader(data, batch_size)
    opt = make_optimizer(model, fused)
    fit_seed()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def hand_slices(model: nn.Module, data: TensorDataset, batch_size: int, epochs: int) -> None:
    """(d) A hand loop over batches sliced from the tensors by a random permutation."""
    inputs, targets = data.tensors
    opt = make_optimizer(model)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs))
        for idx in order.split(batch_size):
            out = model(inputs[idx])
            loss = F.cross_entropy(out, targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def run_fit(model: nn.Module, train_data, batch_size: int, epochs: int, optimizer=None) -> None:
    trainloop.fit(
        model,
        train_data,
        None,
        epochs=epochs,
        batch_size=batch_size,
        lr=LR,
        momentum=0.9,
        weight_decay=0.0,
        schedule="constant",
        gpus="cpu",
        seed=SEED,
        log_every=10**9,
        quiet=True,
        log=lambda s: None,
        optimizer=optimizer,
    )


def fit_loader(model: nn.Module, data: TensorDataset, batch_size: int, epochs: int) -> None:
    """(b) fit() on a DataLoader built like (a)'s."""
    run_fit(model, torch_loader(data, batch_size), batch_size, epochs)


def fit_tensors(model: nn.Module, data: TensorDataset, batch_size: int, epochs: int) -> None:
    """(c) fit() on the TensorDataset: trainloop's in-memory fast path."""
    run_fit(model, data, batch_size, epochs)


def fit_loader_hand_optimizer(model: nn.Module, data: TensorDataset, batch_size: int, epochs: int):
    """(e) fit() on (a)'s DataLoader and with (a)'s optimizer: nothing differs but the loop."""
    run_fit(model, torch_loader(data, batch_size), batch_size, epochs, make_optimizer(model))


LOOPS = {
    "a": hand_loop,
    "b": fit_loader,
    "c": fit_tensors,
    "d": hand_slices,
    "e": fit_loader_hand_optimizer,
}


# ---- the two cases ---------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]  # a fresh model (seeded by the caller)
    data: TensorDataset
    batch_size: int
    epochs: int
    targets: dict  # {"b": 1.05, ...}: the ratio to a that each variant should stay under

    @property
    def steps(self) -> int:
        return self.epochs * -(-len(self.data) // self.batch_size)

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.data.tensors[0].shape[1:])
        return (
            f"{self.name}: {len(self.data)} samples of {shape}, batch {self.batch_size}, "
            f"{self.epochs} epoch(s) = {self.steps} optimizer steps"
        )


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def tiny_case(quick: bool) -> Case:
    generator = torch.Generator().manual_seed(SEED)
    n = 64 * 64  # 64 steps per epoch at batch 64
    x = torch.randn(n, 32, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return Case(
        "tiny MLP", tiny_mlp, TensorDataset(x, y), 64, 4 if quick else 32, {"b": 1.05, "c": 0.7}
    )


def cnn_case(quick: bool) -> Case:
    steps = 8 if quick else 64
    (x, y), _ = trainloop.synthetic_images(SEED, train_size=64 * steps, val_size=64)
    return Case(
        "small CNN", lambda: trainloop.small_cnn(3, 10), TensorDataset(x, y), 64, 1, {"b": 1.02}
    )


# ---- timing ----------------------------------------------------------------------------------


def fresh_model(case: Case) -> nn.Module:
    torch.manual_seed(SEED)
    return case.build()


def time_variant(case: Case, key: str, data: TensorDataset, epochs: int) -> float:
    """Seconds for one training run of variant `key` on a freshly built model."""
    model = fresh_model(case)
    gc.collect()
    started = time.perf_counter()
    LOOPS[key](model, data, case.batch_size, epochs)
    return time.perf_counter() - started


def same_math(case: Case) -> dict:
    """Largest weight differences after one epoch, 0 for the same math: (e) against (a), and
    (b) against (a) run with SGD's fused kernel, as fit builds it on a CPU. (b) against plain
    (a) differs by float rounding, which training with BatchNorm can amplify to ~1e-2."""
    runs = {"a": hand_loop, "a fused": functools.partial(hand_loop, fused=True)}
    runs.update(b=LOOPS["b"], e=LOOPS["e"])
    weights = {}
    for key, loop in runs.items():
        model = fresh_model(case)
        loop(model, case.data, case.batch_size, 1)
        weights[key] = [t.double() for t in model.state_dict().values()]

    def most(u, v):
        return max((x - y).abs().max().item() for x, y in zip(weights[u], weights[v]))

    return {"e": most("a", "e"), "b": most("a fused", "b")}


def warm_up(case: Case) -> None:
    """One short run of every variant: first-call costs (allocator, kernels) out of the way."""
    count = min(len(case.data), 8 * case.batch_size)
    head = TensorDataset(*(t[:count] for t in case.data.tensors))
    for key in LOOPS:
        time_variant(case, key, head, 1)


def measure(case: Case, repeats: int) -> dict:
    """{variant: [seconds per repeat]}, the variants rotated each repeat."""
    keys = list(LOOPS)
    times = {key: [] for key in keys}
    for r in range(repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            times[key].append(time_variant(case, key, case.data, case.epochs))
        print(
            f"  repeat {r + 1}/{repeats}: " + "  ".join(f"{k}={times[k][-1]:.3f}s" for k in keys),
            flush=True,
        )
    return times


def ratios(times: dict) -> dict:
    """{variant: median over repeats of its time / a's time in the same repeat}."""
    return {
        key: statistics.median(t / a for t, a in zip(times[key], times["a"]))
        for key in times
        if key != "a"
    }


def verdict(value: float, limit: float) -> str:
    return ("PASS" if value <= limit else "MISS") + f" (target <= {limit:g})"


def report_case(case: Case, times: dict) -> dict:
    rel = ratios(times)
    print(
        f"  {'variant':<30} {'median s':>9} {'spread':>7} {'ms/step':>8} {'x a':>6} {'best x a':>8}"
    )
    for key, label in VARIANTS.items():
        median = statistics.median(times[key])
        spread = (max(times[key]) - min(times[key])) / median
        ratio = 1.0 if key == "a" else rel[key]
        best = min(times[key]) / min(times["a"])
        mark = verdict(ratio, case.targets[key]) if key in case.targets else ""
        print(
            f"  {key} {label:<28} {median:9.3f} {spread:7.0%} "
            f"{1000 * median / case.steps:8.3f} {ratio:6.3f} {best:8.3f}  {mark}"
        )
    if max((max(t) - min(t)) / statistics.median(t) for t in times.values()) > NOISY:
        print(
            f"  warning: a variant's times spread over more than {NOISY:.0%} of its median: "
            "other work shared the CPU; trust the ratios less, or rerun on a quiet machine"
        )
    return rel


def run_case(case: Case, repeats: int) -> dict:
    print(f"\n== {case.describe()}")
    diff = same_math(case)
    print(
        f"  same math check after one epoch: max |w_a - w_e| {diff['e']:.3g}, "
        f"max |w_a(fused SGD) - w_b| {diff['b']:.3g}"
        + ("" if max(diff.values()) < 1e-5 else "  (the variants differ!)")
    )
    warm_up(case)
    times = measure(case, repeats)
    return {"case": case, "times": times, "ratios": report_case(case, times)}


# ---- startup ---------------------------------------------------------------------------------


def median_wall(argv: list, repeats: int) -> float:
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


def heavy_imports() -> str:
    """Which optional heavy modules a bare `import trainloop` loads."""
    code = (
        "import sys, trainloop; print(' '.join(m for m in ('torchvision', 'typer', 'rich') "
        "if m in sys.modules) or 'none')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def startup(repeats: int) -> dict:
    print(f"\n== startup (subprocess wall time, median of {repeats} runs)")
    median_wall([sys.executable, "-c", "import torch"], 1)  # warm the file cache
    torch_s = median_wall([sys.executable, "-c", "import torch"], repeats)
    help_s = median_wall([sys.executable, "trainloop.py", "--help"], repeats)
    loaded = heavy_imports()
    print(f"  python -c 'import torch'     {torch_s:6.3f} s")
    print(f"  python trainloop.py --help   {help_s:6.3f} s")
    print(
        f"  difference                   {help_s - torch_s:6.3f} s  "
        f"{verdict(help_s - torch_s, 0.3)}"
    )
    print(f"  heavy modules loaded by `import trainloop`: {loaded}")
    return {"torch": torch_s, "help": help_s, "loaded": loaded}


# ---- summary ---------------------------------------------------------------------------------


def summary(results: list, start: dict, repeats: int) -> None:
    print("\n== summary (paste into the README)\n")
    print(f"Machine: {machine_line()}; median of {repeats} alternated repeats.\n")
    print(
        "| case | steps | hand loop ms/step | fit(DataLoader) b/a | fit(TensorDataset) c/a "
        "| hand slices d/a | loop alone e/a |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for res in results:
        case, rel = res["case"], res["ratios"]
        ms = 1000 * statistics.median(res["times"]["a"]) / case.steps
        cells = [
            f"{rel[k]:.3f}" + (f" (<= {case.targets[k]:g})" if k in case.targets else "")
            for k in "bcde"
        ]
        print(f"| {case.name} | {case.steps} | {ms:.3f} | " + " | ".join(cells) + " |")
    extra = start["help"] - start["torch"]
    print(
        f"\n`trainloop --help`: {start['help']:.2f} s vs {start['torch']:.2f} s for "
        f"`import torch` (+{extra:.2f} s, target <= 0.3 s); `import trainloop` loads: "
        f"{start['loaded']}."
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="alternated repeats per case (default 7, or 3 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps: a smoke run")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    print(f"trainloop overhead benchmark: {machine_line()}")
    print(
        f"trainloop {trainloop.__version__} from {ROOT / 'trainloop.py'}; "
        f"repeats {args.repeats}{', quick' if args.quick else ''}; {load_line()}"
    )
    results = [
        run_case(tiny_case(args.quick), args.repeats),
        run_case(cnn_case(args.quick), args.repeats),
    ]
    start = startup(3 if args.quick else 5)
    summary(results, start, args.repeats)
    print(
        f"\n(benchmark took {time.perf_counter() - started:.0f} s; {load_line()} at the end, "
        "this run included)"
    )


if __name__ == "__main__":
    main()
