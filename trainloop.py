"""trainloop: one readable file that trains a PyTorch model right on one CPU, one GPU or many.

Devices, DDP, mixed precision, exact crash-safe resume and clean logs, with no hidden machinery.
Copy this file into your project, or install it, and use it three ways:

    python trainloop.py --epochs 10 --gpus 0,1              # the CLI (also the `trainloop` command)
    torchrun --nproc-per-node 8 trainloop.py --epochs 10    # many processes, many machines
    from trainloop import fit; fit(model, train_data, val_data, epochs=10)
"""

# ---- imports ---------------------------------------------------------------------------------

import contextlib
import copy
import dataclasses
import difflib
import errno
import functools
import gc
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import numbers
import os
import pickle
import random
import re
import shutil
import signal
import stat
import sys
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset

__version__ = "0.3.6"
# fmt: off
__all__ = [
    "Config", "Runtime", "TrainState", "UsageError", "CheckpointError", "NonFiniteLossError",
    "SaveError", "WorkerDiedError", "OutOfMemoryError",
    "Stopped", "check_config", "parse_gpus", "parse_duration", "setup_device", "teardown",
    "default_workers", "make_loader", "set_epoch", "train_step", "evaluate", "save_checkpoint",
    "load_checkpoint", "fit", "synthetic_images", "load_data", "small_cnn", "build_model", "main",
]
# fmt: on

# Exit statuses a batch script can act on (documented in the README).
EXIT_USAGE = 2  # a bad option or input: fix the command
EXIT_CHECKPOINT = 3  # a checkpoint is corrupt, truncated or unsafe to load
EXIT_NONFINITE = 4  # the loss became NaN or inf
EXIT_SAVE = 5  # a checkpoint could not be written (disk full, read-only, permission)
EXIT_WORKER = 6  # a DataLoader worker died, most often killed for memory
EXIT_MEMORY = 7  # out of memory in a training step
EXIT_TIME_LIMIT = 75  # --time-limit reached, checkpoint written: requeue and rerun (EX_TEMPFAIL)
# A preemption signal exits with 128 + the signal number (143 for SIGTERM).

CHECKPOINT_FORMAT = 2


class UsageError(ValueError):
    """A mistake in the user's settings or inputs; the CLI prints it as one line and exits 2."""


class _DataError(UsageError):
    """Bad input data met by one process (an unreadable file): printed by every process."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: corrupt, truncated, or holding executable pickle."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint was left untouched."""


class SaveError(CheckpointError):
    """A checkpoint could not be written (disk full, read-only); the previous one is intact."""


class WorkerDiedError(RuntimeError):
    """A DataLoader worker died; with one process, the last completed step was saved first."""


class OutOfMemoryError(torch.OutOfMemoryError):
    """A training step ran out of memory; it is not counted, the last checkpoint is kept."""


# The faults that end a run with their own exit status, printed by the process that met them.
_FAULTS = {SaveError: EXIT_SAVE, WorkerDiedError: EXIT_WORKER, OutOfMemoryError: EXIT_MEMORY}


class Stopped(SystemExit):
    """Training stopped on purpose (signal or time limit) after writing a checkpoint. Uncaught,
    this SystemExit exits with `.code` (143 on SIGTERM, 75 at the time limit) and no traceback;
    catch it to carry on in your own script."""


# ---- configuration ---------------------------------------------------------------------------


def _opt(default, help: str, panel: str = "Training", **cli):
    return field(default=default, metadata={"help": help, "rich_help_panel": panel, **cli})


D, M, R = "Data", "Model", "Run"  # help panels of the CLI


@dataclass(frozen=True)
class Config:
    """Every knob in one place: the CLI has one option per field; change it with `replace`.
    Path fields (data, data_root, out, resume, weights) also take an os.PathLike, e.g. a Path."""

    data: str = _opt(
        "synthetic",
        "DIR of class folders, or one of synthetic, mnist, fashionmnist, cifar10, cifar100.",
        D,
        metavar="DIR|NAME",
    )
    data_root: str = _opt("data", "Where torchvision data sets are stored.", D)
    download: bool = _opt(False, "Download a missing torchvision data set.", D)
    image_size: int = _opt(0, "Pixels a side (0: weights' or 224, smallcnn 64; built-ins own).", D)
    mean: str = _opt("", "Per-channel mean of 0-1 pixels (empty: the weights', else measured).", D)
    std: str = _opt("", "Per-channel std of 0-1 pixels, e.g. 0.229,0.224,0.225 (like --mean).", D)
    val_fraction: float = _opt(0.1, "Share of each class held out to validate when no DIR/val.", D)
    augment: bool = _opt(True, "Random crop and horizontal flip of training images.", D)
    workers: int = _opt(-1, "Loader processes per training process (-1 = from CPU count).", D)
    model: str = _opt("smallcnn", "smallcnn, or a torchvision classifier (resnet18, ...).", M)
    weights: str = _opt("", "Pretrained: a torchvision name (DEFAULT, ...) or state_dict file.", M)
    compile: bool = _opt(False, "torch.compile the model (checkpoints stay plain).", M)
    channels_last: bool = _opt(False, "Channels-last memory format (faster GPU convs).", M)
    sync_bn: bool = _opt(False, "Synchronize BatchNorm statistics across processes.", M)
    shard: bool = _opt(False, "Shard weights, grads and optimizer state over processes (FSDP2).", M)
    epochs: int = _opt(3, "Passes over the training data.")
    batch_size: int = _opt(64, "Samples per step per process (global: x processes x accumulate).")
    lr: float = _opt(0.05, "Peak learning rate (about 1e-3 suits adamw).")
    optimizer: str = _opt("sgd", "sgd (momentum, nesterov) | adamw.")
    momentum: float = _opt(0.9, "SGD momentum.")
    weight_decay: float = _opt(5e-4, "Weight decay (none on biases and norm weights).")
    schedule: str = _opt("cosine", "LR schedule, per step: constant|cosine|step|onecycle.")
    warmup: float = _opt(0.0, "Linear LR warmup: steps if >= 1, else a fraction of all steps.")
    accumulate: int = _opt(1, "Micro-batches per optimizer step (gradient accumulation).")
    clip_grad: float = _opt(0.0, "Clip the gradient norm to this (0 = off).")
    label_smoothing: float = _opt(0.0, "Label smoothing of the default cross-entropy.")
    ema: float = _opt(0.0, "EMA of weights with this decay, e.g. 0.999, for val/best.pt (0 = off).")
    precision: str = _opt("auto", "auto (bf16 on capable GPUs, else fp32)|fp32|bf16|fp16.")
    seed: int = _opt(0, "Seed of initialization, data order and augmentation.")
    gpus: str = _opt("", "GPU ids as nvidia-smi shows (0,1: a process each) | cpu | empty=best.", R)
    out: str = _opt("", "Run directory (CLI: runs/<data>-<model>; fit(): none).", R, metavar="DIR")
    resume: str = _opt("auto", "auto (OUT/last.pt or last/) | none | PATH.", R, metavar="PATH")
    save_every: int = _opt(0, "Also checkpoint every N optimizer steps (0 = epoch ends only).", R)
    log_every: int = _opt(50, "Log (and, with several processes, agree to stop) every N steps.", R)
    patience: int = _opt(0, "Stop after N epochs without a better --monitor (0 = off).", R)
    monitor: str = _opt("auto", "Metric for best.pt and early stop (auto: val_acc/val_loss).", R)
    monitor_mode: str = _opt("auto", "max | min | auto (from the name: min for loss, max acc).", R)
    time_limit: str = _opt("", "Checkpoint and exit 75 before this time, e.g. 2h30m or 90s.", R)
    deterministic: bool = _opt(False, "Deterministic CUDA kernels (slower; CPU is always).", R)
    eval_only: bool = _opt(False, "Only evaluate the --resume checkpoint (auto: OUT/best.pt).", R)
    quiet: bool = _opt(False, "Print only the final summary.", R)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (DTensor) tensor, sharing its memory; else `tensor`."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _ema_pairs(ema: nn.Module, model: nn.Module) -> tuple:
    """(EMA floats, live floats, EMA others, live others) of state_dict() (a sharded model's own
    shards, even right after a forward), each tensor once: a tied weight would be averaged twice."""
    ema_state, live_state = (m.state_dict(keep_vars=True) for m in (ema, model))
    once = {id(v): k for k, v in reversed(ema_state.items()) if isinstance(v, torch.Tensor)}
    floats = [k for k in once.values() if ema_state[k].is_floating_point()]
    others = [k for k in once.values() if not ema_state[k].is_floating_point()]
    return tuple(
        [_local(state[k].detach()) for k in keys]
        for keys in (floats, others)
        for state in (ema_state, live_state)
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers."""
    parallel = isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
    inner = model.module if parallel else getattr(model, "_orig_mod", None)
    return _unwrap(inner) if isinstance(inner, nn.Module) else model


def _is_sharded(model: nn.Module) -> bool:
    """Whether fully_shard (FSDP2) was applied to `model` itself."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not even imported: nothing is sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def _check_state_parts(model, optimizer, scheduler) -> None:
    """A UsageError for parts of a TrainState that cannot train together."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(
            f"optimizer={repr(optimizer).splitlines()[0]:.60} is not a torch optimizer; build one "
            "on the model's parameters, e.g. torch.optim.SGD(model.parameters(), lr=0.1)"
        )
    if isinstance(optimizer, torch.optim.LBFGS):
        raise UsageError("LBFGS steps with a closure, which train_step does not pass; use another")
    mine = {id(p) for p in model.parameters()}  # (it may also hold a loss's own parameters)
    if not any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
        raise UsageError("the optimizer holds none of the model's parameters; build it on them")
    if isinstance(scheduler, torch.amp.GradScaler):
        raise UsageError("a GradScaler goes to TrainState(..., scaler=...), not scheduler")
    if scheduler is not None and not hasattr(scheduler, "step"):
        what = "a function: call it" if callable(scheduler) else f"a {type(scheduler).__name__}"
        raise UsageError(f"scheduler= takes an LR scheduler, not {what}")
    if getattr(scheduler, "optimizer", optimizer) is not optimizer:
        raise UsageError(
            "the scheduler is built on another optimizer; build it on the one given (fit "
            "also takes a function optimizer -> scheduler, which works with its own optimizer)"
        )


@dataclass
class TrainState:
    """Everything a checkpoint restores, in one object; train_step updates it in place. Build it
    after moving the model to its device: the EMA update holds on to the model's tensors."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None  # stepped after each optimizer step; a ReduceLROnPlateau after evaluation
    scaler: Optional[torch.amp.GradScaler] = None  # None: no loss scaling (all but fp16)
    ema_decay: float = 0.0  # > 0: keep `ema`; early steps decay by at most (1+step)/(10+step)
    ema: Optional[nn.Module] = None  # the moving average of the model (a copy of it unless given)
    net: Optional[nn.Module] = None  # what the step calls: the model, or it in DDP/torch.compile
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    seen: int = 0  # samples of this epoch consumed by all processes (fit keeps it, not train_step)
    batches: int = 0  # micro-batches of the current epoch consumed by this process
    best: Optional[float] = None  # best value of the monitored metric
    best_epoch: int = 0  # the epoch that reached it
    lr: float = 0.0  # learning rate applied by the last optimizer step (of the first group)
    history: list = field(default_factory=list)  # one dict per completed epoch
    epoch_loss: list = field(default_factory=lambda: [0.0, 0.0])  # [sum loss x weight, weight]
    epoch_seconds: float = 0.0  # time spent in the current epoch before a resume
    _ema_tensors: tuple = field(default=(), init=False, repr=False)  # see _ema_pairs
    _fast_path: tuple = field(default=(None, None), init=False, repr=False)  # _step_scheduler
    _scheduled: tuple = field(default=(None, 0, None), init=False, repr=False)  # _step_scheduler

    def __post_init__(self):
        _check_state_parts(self.model, self.optimizer, self.scheduler)
        self.net = self.model if self.net is None else self.net
        self.model = _unwrap(self.model)  # checkpoints hold the plain module's names
        self.scaler = self.scaler or torch.amp.GradScaler("cpu", enabled=False)
        if self.ema is not None or self.ema_decay:
            if not 0 < self.ema_decay < 1:
                raise UsageError(f"ema_decay={self.ema_decay!r} must be in (0, 1), e.g. 0.999")
            if self.ema is None and _is_sharded(self.model):
                raise UsageError(  # FSDP refuses deepcopy
                    "ema_decay with a sharded model needs ema=: a copy of the model made before "
                    "sharding, sharded the same way"
                )
            if self.ema is None:
                self.ema = copy.deepcopy(self.model).requires_grad_(False)
            self._ema_tensors = _ema_pairs(self.ema, self.model)

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and deploy: the EMA when there is one."""
        return self.ema if self.ema is not None else self.model


def _check_state(state, call: str) -> None:
    """A UsageError for a model (or anything else) passed where a TrainState goes."""
    if not isinstance(state, TrainState):
        raise UsageError(
            f"{call} takes a TrainState, not a {type(state).__name__}; build one first: "
            "state = TrainState(model, optimizer)"
        )


# The plain-value part of TrainState that a checkpoint carries.
_COUNTERS = "epoch step seen batches best best_epoch lr history epoch_loss epoch_seconds".split()

CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("constant", "cosine", "step", "onecycle"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "monitor_mode": ("auto", "min", "max"),
}

_RANGES = (  # (fields, test, what the error says); counts fit torch's int64
    (
        "epochs batch_size accumulate log_every",
        lambda v: 1 <= v < 2**63,
        "must be at least 1 (below 2**63)",
    ),
    ("save_every patience seed", lambda v: 0 <= v < 2**63, "must be zero or more (below 2**63)"),
    (
        "weight_decay clip_grad warmup",
        lambda v: 0 <= v < math.inf,
        "must be zero or more (and finite)",
    ),
    ("momentum", lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.9"),
    ("workers", lambda v: -1 <= v <= 256, "must be -1 (one per spare core) or 0 to 256"),
    ("lr", lambda v: 0 < v < math.inf, "must be a positive number, e.g. 0.05"),
    ("label_smoothing", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("ema", lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.999 (0 turns it off)"),
    ("image_size", lambda v: v == 0 or 4 <= v <= 8192, "must be 0 (keep) or 4 to 8192 pixels"),
    ("val_fraction", lambda v: 0 < v < 1, "must be between 0 and 1"),
)


def parse_gpus(text: str) -> Optional[tuple]:
    """'' -> None (best device), 'cpu' -> (), '0,1' -> (0, 1); anything else is a UsageError."""
    text = text.strip().lower()
    if text in ("", "cpu"):
        return None if text == "" else ()
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch("[0-9]+", p) for p in parts):  # (isdigit() takes "²" too)
        raise UsageError(f"gpus={text!r} is not a list of GPU ids; use e.g. '0' or '0,1' or 'cpu'")
    ids = tuple(int(p) for p in parts)
    if len(set(ids)) != len(ids):
        raise UsageError(f"gpus={text!r} names a GPU twice; list each id once")
    return ids


def _per_channel(name: str, text: str) -> Optional[tuple]:
    try:
        values = tuple(float(v) for v in text.split(",")) if text else None
    except ValueError:
        values = ()
    # A channel may be dark throughout (mean 0); the std divides, so it must not be 0.
    fits = [0 < v <= 1 or (v == 0 and name == "mean") for v in values or ()]
    if values is not None and (len(values) not in (1, 3) or not all(fits)):
        interval = "[0, 1]" if name == "mean" else "(0, 1]"
        raise UsageError(
            f"{name}={text!r} is not 1 or 3 comma-separated numbers in {interval} (of pixels "
            f"scaled to 0-1), e.g. {name}='0.5' or {name}='0.45,0.45,0.4'"
        )
    return values * 3 if values and len(values) == 1 else values


def parse_duration(text: str) -> Optional[float]:
    """'2h30m' / '45m' / '90s' / '3600' -> seconds; '' or '0' -> None (no limit)."""
    text = text.strip().lower()
    if not text:
        return None
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
    if not match or not any(match.groups()):
        raise UsageError(f"time_limit={text!r} is not a duration; use e.g. '2h30m', '45m' or '90s'")
    if match[3] and (match[1] or match[2]) and not text.endswith("s"):  # most mean 1h30 as 1h30m
        fixed = text + ("s" if match[2] else "m")
        raise UsageError(f"time_limit={text!r} ends in a number without a unit; write {fixed!r}")
    total = sum(float(g or 0) * unit for g, unit in zip(match.groups(), (3600, 60, 1)))
    return total if total > 0 else None  # 0 is no limit, as 0 turns other options off


_PATHS = ("data", "data_root", "out", "resume", "weights")


def check_config(config: Config) -> Config:
    """`config` with paths as strings, or a UsageError naming the first bad field and the fix."""
    for f in dataclasses.fields(Config):
        given = value = getattr(config, f.name)
        if f.name in _PATHS and isinstance(value, os.PathLike):
            value = os.fspath(value)
        kind = {int: numbers.Integral, float: numbers.Real}.get(f.type, f.type)  # NumPy's too
        if not isinstance(value, kind) or (isinstance(value, bool) and f.type is not bool):
            example = f", e.g. {f.default!r}" if f.default != "" else ""
            raise UsageError(f"{f.name}={value!r} must be of type {f.type.__name__}{example}")
        if type(given) is not f.type:  # Path -> str, 3 -> 3.0, np.float32(0.1) -> 0.1: to save
            config = dataclasses.replace(config, **{f.name: f.type(value)})
        if f.name in _PATHS and any(len(os.fsencode(p)) > 255 for p in Path(value).parts):
            raise UsageError(f"{f.name}={value!r:.80}... has a name over 255 bytes; shorten it")
    if not (config.data.strip() and config.resume.strip()):  # '' would read as '.'
        name = "data" if not config.data.strip() else "resume"
        raise UsageError(f"{name}={getattr(config, name)!r} is empty; see the help for its values")
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise UsageError(f"{name}={getattr(config, name)!r} is not one of {', '.join(allowed)}")
    for names, ok, must in _RANGES:  # every test is False for NaN
        for name in names.split():
            if not ok(getattr(config, name)):
                raise UsageError(f"{name}={getattr(config, name)!r} {must}")
    if config.monitor_mode != "auto" and config.monitor == "auto":
        raise UsageError(  # auto takes val_acc or val_loss: opposite directions
            f"monitor_mode={config.monitor_mode!r} needs a monitor too, e.g. monitor='val_loss'"
        )
    parse_duration(config.time_limit)
    parse_gpus(config.gpus)
    _per_channel("mean", config.mean)
    _per_channel("std", config.std)
    return config


def _line(error: BaseException, index: int = 0) -> str:
    """One line of an error's text; the last (-1) names the cause in a worker's or DCP's trace."""
    lines = str(error).strip().splitlines()
    return lines[index] if lines else type(error).__name__


# ---- device and distributed ------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where this process computes and how it talks to its peers; decided once in setup."""

    device: torch.device
    rank: int = 0  # global process index
    local_rank: int = 0  # process index on this machine
    world_size: int = 1
    amp_dtype: Optional[torch.dtype] = None  # autocast dtype; None = full fp32
    owns_process_group: bool = False  # setup_device started it, so teardown ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @functools.cached_property
    def on_cpu(self) -> bool:  # read every step; device.type builds a new string each time
        return self.device.type == "cpu"


def _given(runtime) -> Optional[Runtime]:
    """`runtime` when it is a Runtime or None; else a UsageError."""
    if runtime is None or isinstance(runtime, Runtime):
        return runtime
    raise UsageError(
        f"runtime={runtime!r} is not a trainloop.Runtime; pass what setup_device() returns"
    )


def _check_gpus_exist(ids: tuple) -> None:
    # Ids as nvidia-smi numbers them (PCI bus order): CUDA reads the order once, at its first
    # call. A user's own setting wins.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    count = torch.cuda.device_count()  # 0 without CUDA
    if missing := [i for i in ids if i >= count]:
        have = f"GPUs 0..{count - 1}" if count else "no CUDA GPU"
        raise UsageError(
            f"gpus={','.join(map(str, ids))!r} names GPU {missing[0]} but this machine has "
            f"{have}; pick from nvidia-smi's list or use gpus='cpu'"
        )


def _pick_device(ids: Optional[tuple], local_rank: int) -> torch.device:
    if ids:
        _check_gpus_exist(ids)
        return torch.device("cuda", ids[local_rank % len(ids)])
    if ids is None and torch.cuda.is_available():  # () is 'cpu'
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if ids is None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_PRECISIONS = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # by autocast dtype


def _amp_dtype(precision: str, device_type: str, bf16_ok: bool) -> Optional[torch.dtype]:
    if precision not in CHOICES["precision"]:
        raise UsageError(f"precision={precision!r} is not one of {', '.join(CHOICES['precision'])}")
    if precision == "auto":
        return torch.bfloat16 if device_type == "cuda" and bf16_ok else None
    if precision == "bf16" and not bf16_ok:
        raise UsageError(  # only a GPU can lack it
            "precision='bf16': this GPU has no bfloat16 support; use precision='fp16' or 'fp32'"
        )
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def setup_device(
    gpus: str = "", *, precision: str = "auto", deterministic: bool = False
) -> Runtime:
    """Pick the device, join torchrun's process group (from RANK, LOCAL_RANK, WORLD_SIZE), fix
    precision once, and set torch's process-wide cuDNN autotuning or deterministic kernels. `gpus`
    as in parse_gpus: process LOCAL_RANK takes the LOCAL_RANK-th listed GPU (or GPU LOCAL_RANK)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _pick_device(parse_gpus(gpus), local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
        # A dead peer surfaces through torchrun's agent within seconds; this timeout only bounds
        # a wait at a collective that no agent watches.
        dist.init_process_group(backend, timeout=timedelta(minutes=10), device_id=device_id)
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()  # CPU and MPS have bf16
    return Runtime(device, rank, local_rank, world, _amp_dtype(precision, device.type, bf16), owns)


def teardown(runtime: Runtime) -> None:
    """Leave the process group if setup_device joined it."""
    if runtime.owns_process_group and dist.is_initialized():
        # Sharded models left as garbage hold the group: free them while Python still runs,
        # since gloo's threads abort the process if the group ends during interpreter exit.
        gc.collect()
        dist.destroy_process_group()


def _all_reduce(values: list, runtime: Runtime, op=None) -> list:
    """Reduce a few numbers over all processes (one small collective: a sync point)."""
    if runtime.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


def _gather(value, runtime: Runtime) -> list:
    """Every process's `value` (any picklable object), in rank order."""
    if runtime.world_size == 1:
        return [value]
    values = [None] * runtime.world_size
    dist.all_gather_object(values, value)
    return values


def _barrier(runtime: Runtime) -> None:
    if runtime.world_size > 1:
        dist.barrier()


def _sync_buffers(modules, runtime: Runtime) -> None:
    """Every process takes rank 0's buffers (BatchNorm statistics) of `modules` (None: none),
    those a checkpoint saves: DDP broadcasts the model's at its next forward, FSDP never."""
    for module in modules if runtime.world_size > 1 else ():
        for buffer in module.buffers() if module is not None else ():
            if not hasattr(buffer, "to_local"):  # a DTensor's placement says where it is alike
                dist.broadcast(buffer, 0)


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _runtime_for(runtime, model: Optional[nn.Module], alone: str = "", stacklevel=3) -> Runtime:
    """What a building block runs with: `runtime`, else the model's device (a sharded model's
    also the process group's rank and size); given none while several processes run, it warns
    that `alone` (what then goes wrong)."""
    if _given(runtime) is not None:
        return runtime
    device = _device_of(model) if model is not None else torch.device("cpu")
    if model is not None and _is_sharded(model) and dist.is_initialized():
        return Runtime(device, dist.get_rank(), world_size=dist.get_world_size())
    if alone and dist.is_initialized() and dist.get_world_size() > 1:
        warnings.warn(
            f"{alone}; pass runtime= (setup_device()'s) from every process", stacklevel=stacklevel
        )
    return Runtime(device)


# ---- data ------------------------------------------------------------------------------------


def _mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from small integers (seed, epoch, purpose)."""
    state = np.random.SeedSequence(list(parts)).generate_state(2, np.uint32)
    return int(state.view(np.uint64)[0] >> np.uint64(1))


class _EpochBatches(Sampler):
    """Per-process batches of one epoch, resumable at any sample. The epoch's order depends on
    (seed, epoch) alone; its unseen part (from `seen`) is dealt round-robin to the processes, so a
    run resumed on another number of them still sees each sample once. Training (`shuffle`) drops
    at most world - 1 tail samples: all take equal steps. `sample_seeds`: batches of keys
    (index, per-sample seed)."""

    def __init__(self, size, batch_size, shuffle, seed, rank=0, world=1, sample_seeds=False):
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world, self.sample_seeds = rank, world, sample_seeds
        self.epoch, self.seen = 0, 0  # where the next iteration starts (see set_epoch)
        self.read = False  # whether an iteration ran to the end since set_epoch

    def indices(self) -> torch.Tensor:
        """This process's sample indices for the rest of the epoch, in order."""
        if self.shuffle and self.read:  # a loop without set_epoch (evaluate clears it)
            warnings.warn(
                "make_loader's batches read again, in the same order; call loader = "
                "set_epoch(loader, epoch) before each epoch (a loader to evaluate: train=False)",
                stacklevel=3,
            )
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        return order[self.seen :][self.rank :: self.world][: self._per_rank()]

    def __iter__(self):
        base = _mix_seed(self.seed, self.epoch, 1) >> 8
        mine = self.indices()  # a tensor: a Python list of a large epoch takes 40x the memory
        for idx in mine.split(self.batch_size) if len(mine) else ():  # split() of none gives [[]]
            idx = idx.tolist()
            yield [(i, base + i) for i in idx] if self.sample_seeds else idx
        if not self.sample_seeds:  # (loader workers prefetch: a peek would count as a read)
            self.read = True

    def _per_rank(self) -> int:
        rest = self.size - min(self.seen, self.size)
        if self.shuffle:
            rest -= rest % self.world
        return len(range(self.rank, rest, self.world))

    def seen_after(self, batches: int) -> int:
        """The epoch's global position once every process has taken `batches` more batches."""
        return self.seen + self.world * min(batches * self.batch_size, self._per_rank())

    def __len__(self) -> int:
        return math.ceil(self._per_rank() / self.batch_size)


class _SeededSample(Dataset):
    """Seeds a loader worker's RNGs from each sample's key, so augmentation depends on (seed,
    epoch, index), not on the worker: a resumed run augments as an uninterrupted one. (Without
    workers, the checkpoint stores the main process's RNG streams whole.)"""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        # The CPU generator alone, which is all a loader worker may use: torch.manual_seed also
        # queues the seed for CUDA, MPS and XPU with a formatted stack, 0.2-0.4 ms a sample.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]


# The fast path gathers this many bytes of samples at a time and slices batches out of them:
# an indexing op has a fixed cost as large as a tiny model's forward pass.
_GATHER_BYTES = 16 * 2**20


def _crop_flip(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int):
    """Random-crop (zero padding `pad`) and mirror a batch (N, C, H, W) in one gather."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = torch.arange(h, device=images.device) + shifts[:, :1]  # (N, H)
    cols = torch.arange(w, device=images.device) + shifts[:, 1:]  # (N, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chans = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


@dataclass
class _TensorBatches:
    """The in-memory fast path: a DataLoader's batches over the same sampler, in its order, but
    gathered by indexing whole tensors (no collate). `augment_pad` > 0 random-crops and flips the
    first tensor, with parameters drawn per sample index and epoch."""

    tensors: tuple
    batch_sampler: _EpochBatches
    augment_pad: int = 0

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        sampler, device, pad = self.batch_sampler, self.tensors[0].device, self.augment_pad
        if pad:
            generator = torch.Generator().manual_seed(_mix_seed(sampler.seed, sampler.epoch, 2))
            shifts = torch.randint(0, 2 * pad + 1, (sampler.size, 2), generator=generator)
            flips = torch.rand(sampler.size, generator=generator) < 0.5
            shifts, flips = shifts.to(device), flips.to(device)
        order, size = sampler.indices().to(device), sampler.batch_size
        batch_bytes = size * sum(math.prod(t.shape[1:]) * t.element_size() for t in self.tensors)
        chunk = size * max(1, _GATHER_BYTES // max(1, batch_bytes))  # whole batches
        for idx in order.split(chunk) if len(order) else ():  # split() of nothing gives [[]]
            parts = [t[idx] for t in self.tensors]
            if pad:
                parts[0] = _crop_flip(parts[0], shifts[idx], flips[idx], pad)
            for batch in zip(*(part.split(size) for part in parts)):
                yield list(batch)  # a list, as a DataLoader's collate gives
        sampler.read = True


def default_workers(world_size: int = 1) -> int:
    """One loader process per spare CPU core of this training process, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(8, (cores or 1) // max(1, world_size) - 1))


def _length(data) -> Optional[int]:
    """len(data), or None when it has none (a DataLoader over a stream raises TypeError)."""
    try:
        return len(data)
    except TypeError:
        return None


def make_loader(
    dataset,
    *,
    batch_size: int,
    train: bool = True,
    seed: int = 0,
    workers: int = -1,
    runtime: Optional[Runtime] = None,
    collate_fn=None,
):
    """Batches of `dataset` for this process: shuffled per epoch and resumable when `train`.

    Call set_epoch(loader, epoch) before each epoch. A plain TensorDataset takes the in-memory
    fast path (moved onto the GPU when it fits); anything else gets a DataLoader with `workers`
    processes (-1 = default_workers(); none for a list of samples, read as fast in-process).
    """
    alone = "make_loader without runtime= gives every process all the batches"
    rt = _runtime_for(runtime, None, alone)
    tensors = isinstance(dataset, tuple) and all(map(torch.is_tensor, dataset))  # (x, y)
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or tensors:
        raise UsageError(
            f"make_loader takes a map-style Dataset, not a {type(dataset).__name__}; batch a "
            "stream with a DataLoader of your own, or tensors (x, y) as TensorDataset(x, y)"
        )
    for name, value in (("batch_size", batch_size), ("seed", seed), ("workers", workers)):
        if not isinstance(value, numbers.Integral):  # (a float batch size fails only when read)
            example = {"batch_size": 64, "seed": 0, "workers": 2}[name]
            raise UsageError(f"{name}={value!r} must be an int, e.g. {example}")
    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size} must be at least 1")
    if workers < 0:  # a list holds ready samples: a worker would only copy them between processes
        ready = isinstance(dataset, (list, tuple)) and collate_fn is None
        workers = 0 if ready else default_workers(rt.world_size)
    seeded = train and workers > 0
    sampler = _EpochBatches(len(dataset), batch_size, train, seed, rt.rank, rt.world_size, seeded)
    # A TensorDataset subclass that overrides __getitem__ must be read through it.
    plain = type(dataset).__getitem__ is TensorDataset.__getitem__
    if isinstance(dataset, TensorDataset) and plain and collate_fn is None:
        tensors = dataset.tensors
        if rt.device.type == "cuda":  # onto the GPU when it takes at most a quarter of it
            size = sum(t.nbytes for t in tensors)
            if size <= torch.cuda.get_device_properties(rt.device).total_memory // 4:
                tensors = tuple(t.to(rt.device) for t in tensors)
        pad = getattr(dataset, "augment_pad", 0) if train else 0
        return _TensorBatches(tensors, sampler, pad)
    return DataLoader(
        _SeededSample(dataset) if seeded else dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=rt.device.type == "cuda",
        persistent_workers=workers > 0,
        # Own generator: creating an iterator must not draw from the global RNG,
        # or a mid-epoch resume would shift every later random number.
        generator=torch.Generator().manual_seed(seed),
    )


@dataclass
class _SkipBatches:
    """A loader without its first `count` batches, which are read and dropped. Starting it draws
    nothing from torch's RNG (a DataLoader draws a seed): the run being resumed drew when the
    epoch began, before its checkpoint saved the RNG state."""

    loader: Any
    count: int
    source: Any  # the loader set_epoch was given: the next epoch starts from it again

    def __iter__(self):
        with torch.random.fork_rng(devices=[]):
            batches = iter(self.loader)
        return itertools.islice(batches, self.count, None)

    def __len__(self):
        return len(self.loader) - self.count


def set_epoch(loader, epoch: int, *, seen: int = 0, batches: int = 0):
    """Point `loader` at `epoch` and past what was consumed of it; returns what to iterate.

    A make_loader loader reshuffles for `epoch` and starts at sample `seen` (of all processes;
    else after `batches` batches of each) without reading the samples before. Any other loader
    gets `set_epoch(epoch)` on its sampler (a DistributedSampler reshuffles) and skips `batches`
    batches: through its sampler if a DataLoader over a map-style dataset, else by reading them.
    """
    source = loader = loader.source if isinstance(loader, _SkipBatches) else loader
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, _EpochBatches):
        sampler.epoch, sampler.seen = epoch, 0
        sampler.read = False  # (even the same epoch again: the caller asked for it)
        sampler.seen = seen or sampler.seen_after(batches)  # batches: all processes took as many
        return loader
    for shuffler in (getattr(loader, "sampler", None), sampler, getattr(sampler, "sampler", None)):
        if hasattr(shuffler, "set_epoch"):  # a DistributedSampler, maybe in a batch sampler
            shuffler.set_epoch(epoch)
    if not batches:
        return loader
    streams = isinstance(getattr(loader, "dataset", None), IterableDataset)
    if isinstance(loader, DataLoader) and sampler is not None and not streams:
        settings = "multiprocessing_context persistent_workers pin_memory_device collate_fn timeout"
        settings += " num_workers pin_memory worker_init_fn generator prefetch_factor in_order"
        kept = {k: getattr(loader, k) for k in settings.split() if hasattr(loader, k)}
        order = getattr(sampler, "sampler", None)  # torch's random samplers draw from generator
        if hasattr(order, "generator") and not hasattr(order, "set_epoch"):
            warnings.warn(
                "resuming mid-epoch a DataLoader whose sampler draws a new order each time (as "
                "shuffle=True does): the rest of the epoch may repeat or skip samples; for an "
                "exact resume give fit the Dataset, or use make_loader or a sampler with set_epoch",
                stacklevel=2,
            )
        with torch.random.fork_rng(devices=[]):  # a RandomSampler draws its seed
            rest = list(sampler)[batches:]  # the seen batches leave the sampler: none is loaded
        loader, batches = DataLoader(loader.dataset, batch_sampler=rest, **kept), 0
    return _SkipBatches(loader, batches, source)


# ---- steps -----------------------------------------------------------------------------------


def _split_batch(batch):
    """(inputs, target[, weight]) or a dict for model(**batch) -> (inputs, target, weight)."""
    # The common case, tested first: this runs twice a micro-batch.
    if isinstance(batch, (tuple, list)) and 2 <= len(batch) <= 3:
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    if isinstance(batch, dict):
        return batch, None, None
    what = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    raise UsageError(
        f"a batch must be (inputs, target), (inputs, target, weight) or a dict, not "
        f"{what or type(batch).__name__}; give each sample a target, or batch it with a collate_fn"
    )


def _count(obj, samples: Optional[int] = None) -> int:
    """Samples in a batch part, from host metadata (no sync): a tensor's first dimension; a
    dict's first value's; a list's or tuple's length when it holds one item per sample
    (detection targets: a dict or a tensor of boxes per image), else its tensors' one first
    dimension (batched parts), told apart by `samples` (the inputs') when all items agree."""
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.shape else 1
    if isinstance(obj, dict):
        return _count(next(iter(obj.values()), None))
    if isinstance(obj, (list, tuple)) and obj:
        firsts = {v.shape[0] for v in obj if isinstance(v, torch.Tensor) and v.dim()}
        batched = isinstance(obj[0], torch.Tensor) and len(firsts) == 1 and len(obj) != samples
        return firsts.pop() if batched else len(obj)
    return 0


def _sizes(batches: list) -> tuple:
    """(samples, weights) of one step's micro-batches, from host metadata (no sync). A weight is
    how much a micro-batch counts in its step: its explicit third element (a number or CPU
    tensor, e.g. a token count), else its number of samples."""
    samples, weights = 0, []
    for batch in batches:
        inputs, target, weight = _split_batch(batch)
        count = _count(target, _count(inputs) if isinstance(inputs, torch.Tensor) else None)
        count = count or _count(inputs)
        if isinstance(weight, torch.Tensor):  # per-sample weights or token counts: their total
            weight = weight.sum()
        samples += count
        weights.append(float(count if weight is None else weight))
    return samples, weights


def _groups(batches, size: int):
    """Lists of `size` consecutive batches (the last may be shorter): one optimizer step each."""
    batches = iter(batches)
    while group := list(itertools.islice(batches, size)):
        yield group


def _map_tensors(obj, fn: Callable):
    """Apply `fn` to every tensor inside nested dicts, lists and tuples (named ones too)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_map_tensors(v, fn) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _to_device(batch, device: torch.device, channels_last: bool):
    def move(t):  # non_blocking overlaps the copy when memory is pinned
        fmt = torch.channels_last if channels_last and t.dim() == 4 else torch.preserve_format
        return t.to(device, non_blocking=True, memory_format=fmt)

    return _map_tensors(batch, move)


def _kind(value) -> str:
    """A value as an error names it: a tensor's shape and dtype, else its type."""
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return type(value).__name__


def _is_oom(error: BaseException) -> bool:
    # The host's allocator raises a plain RuntimeError, as does a CUDA kernel ("CUDA error: out
    # of memory"); the CUDA allocator a torch.OutOfMemoryError.
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or bool(
        isinstance(error, RuntimeError) and re.search("allocate memory|out of mem", str(error))
    )


_CROSS_ENTROPY = (nn.CrossEntropyLoss, nn.NLLLoss)


def _is_cross_entropy(loss_fn) -> bool:
    """Whether loss_fn compares class logits (N, C, ...) with labels: cross-entropy or NLL."""
    function = getattr(loss_fn, "func", loss_fn)  # a partial's
    return function in (F.cross_entropy, F.nll_loss) or isinstance(loss_fn, _CROSS_ENTROPY)


# Losses that compare output and target element by element: other shapes broadcast, silently.
_ELEMENTWISE = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)
_ELEMENTWISE += (F.binary_cross_entropy, F.binary_cross_entropy_with_logits)
_ELEMENTWISE_CLASSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss)
_ELEMENTWISE_CLASSES += (nn.BCEWithLogitsLoss,)
# Those of them that fail on integer targets: binary cross-entropy's, and huber's in backward.
_FLOAT_TARGETS = (F.binary_cross_entropy, F.binary_cross_entropy_with_logits)
_FLOAT_TARGETS += (nn.BCELoss, nn.BCEWithLogitsLoss)
_FLOAT_GRADIENTS = _FLOAT_TARGETS + (F.huber_loss, nn.HuberLoss)


def _returned_loss(output):
    """The loss a model returned: a scalar output, or output["loss"] / output.loss; else None."""
    if isinstance(output, torch.Tensor):
        return output if output.numel() == 1 else None
    return output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)


def _loss_of(loss_fn, output, target):
    """loss_fn(output, target), with the mistakes of torch's own losses said in one line."""
    function = getattr(loss_fn, "func", loss_fn)  # a partial's
    if isinstance(loss_fn, type):  # nn.MSELoss for nn.MSELoss()
        name = loss_fn.__name__
        raise UsageError(f"loss_fn={name} is a class; pass an instance: {name}()")
    elementwise = function in _ELEMENTWISE or isinstance(loss_fn, _ELEMENTWISE_CLASSES)
    if elementwise and getattr(output, "shape", None) != getattr(target, "shape", None):
        raise UsageError(  # (N, 1) against (N,) broadcasts to (N, N): a loss that never falls
            f"the loss compares output {_kind(output)} with target {_kind(target)} element "
            "by element; give them one shape, e.g. target.view(-1, 1) or output.squeeze(1)"
        )
    integers = isinstance(target, torch.Tensor) and not target.is_floating_point()
    kinds = _FLOAT_GRADIENTS if torch.is_grad_enabled() else _FLOAT_TARGETS
    if integers and (function in kinds or type(loss_fn) in kinds):
        raise UsageError(f"the loss takes float targets, not {_kind(target)}: use target.float()")
    nll = function is F.nll_loss or type(loss_fn) is nn.NLLLoss
    plain = nll or function is F.cross_entropy or type(loss_fn) is nn.CrossEntropyLoss
    if plain and not nll and getattr(output, "ndim", 0) > 1 and output.shape[1] == 1:
        raise UsageError(  # a softmax over one class is 1: the loss is 0 and nothing trains
            "cross-entropy over 1 output is always 0; give the model 2 outputs and int64 labels, "
            "or pass loss_fn=nn.BCEWithLogitsLoss() with float labels of the output's shape"
        )
    try:
        return loss_fn(output, target)
    except (RuntimeError, IndexError, TypeError, ValueError) as e:
        if not plain or _is_oom(e) or "CUDA error" in str(e):  # (maybe an earlier kernel's)
            raise  # the error of a loss of the user's own (a subclass, too), or a fault
        other = "; else pass your own loss_fn" if function is F.cross_entropy else ""
        if other and _returned_loss(output) is not None:
            other = "; the model returns its own loss: pass loss_fn=None"
        name, scores = ("nll_loss", "log-probabilities") if nll else ("cross-entropy", "logits")
        raise UsageError(
            f"{name} cannot take output {_kind(output)} with target {_kind(target)} "
            f"({_line(e)}); it takes class {scores} (N, C, ...) and int64 class indices "
            f"(N, ...) below C{other}"
        ) from None


def _compiler_missing(error: Exception) -> None:
    if "InvalidCxxCompiler" in str(error):  # torch.compile on a CPU builds C++, maybe in backward
        raise UsageError(
            "torch.compile on a CPU needs a C++ compiler, and none was found; install one (g++), "
            "or train without compile=True"
        ) from None


def _forward_mistake(error: Exception, net: nn.Module, inputs) -> None:
    """A UsageError for the model's error on inputs that are a user's slip, else nothing."""
    dtypes = []
    _map_tensors(inputs, lambda t: dtypes.append(t.dtype))
    single = any(p.is_floating_point() and p.dtype != torch.float64 for p in net.parameters())
    if torch.float64 in dtypes and single and re.search(r"\b[Dd]ouble\b", str(error)):
        raise UsageError(  # NumPy's and scikit-learn's arrays are float64
            "the inputs are float64 and the model is not; convert them, e.g. "
            "torch.tensor(x, dtype=torch.float32), or the model: model.double()"
        ) from error
    halves = {p.dtype for p in net.parameters()} & {torch.float16, torch.bfloat16}
    if halves and torch.float32 in dtypes and re.search(r"\b(Half|BFloat16)\b", str(error)):
        raise UsageError(  # autocast computes in half precision, with float32 weights
            f"the model's weights are {str(halves.pop())[6:]} and the inputs float32; keep the "
            "model in float32 (model.float()) and pass precision='bf16' or 'fp16'"
        ) from error
    if isinstance(error, TypeError) and isinstance(inputs, (dict, tuple, list)):
        _check_binds(_unwrap(net).forward, inputs, error)
    _compiler_missing(error)
    if "parameters that were not used in producing loss" in str(error):  # DDP's, a step later
        raise UsageError(
            "the model has parameters its forward did not use, whose gradients DDP waits for; "
            "freeze them (requires_grad_(False)), or wrap the model yourself and pass that: "
            "DistributedDataParallel(model, find_unused_parameters=True)"
        ) from error
    small = r"Output size is too small|Kernel size can't be greater|Wrong image (height|width)"
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 4 and re.search(small, str(error)):
        raise UsageError(  # (torchvision's vision transformers assert their size)
            f"the model cannot take images of {inputs.shape[-2]}x{inputs.shape[-1]} pixels "
            f"({_line(error)}); give it the size it was made for (the command line: image_size=224)"
        ) from error
    if "Expected more than 1 value per channel when training" in str(error):
        raise UsageError(
            "a batch of 1 sample reached a BatchNorm layer, which cannot train on it (the last "
            "batch of an epoch of N % batch_size == 1 samples); pick another batch_size"
        ) from error


def _check_binds(forward: Callable, inputs, error: TypeError) -> None:
    """A UsageError when the batch's inputs do not bind to the model's forward (the TypeError
    came from the call itself, not from inside the model)."""
    code, tb = getattr(inspect.unwrap(forward), "__code__", None), error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:  # the forward ran: the model's own error
            return
        tb = tb.tb_next
    try:
        signature = inspect.signature(forward)
        signature.bind(**inputs) if isinstance(inputs, dict) else signature.bind(*inputs)
    except ValueError:  # (a forward without a signature)
        return
    except TypeError:
        how = (
            "inputs that are a dict (a dict batch is, whole) go to model(**inputs): name the "
            "forward's arguments as its keys"
            if isinstance(inputs, dict)
            else f"inputs that are a {type(inputs).__name__} go to model(*inputs), one argument "
            "each: to pass them as one, wrap them: ((items,), target)"
        )
        raise UsageError(f"the model cannot take the inputs ({_line(error)}); {how}") from error


def _output_and_loss(net, inputs, target, batch, loss_fn) -> tuple:
    """(output, loss, what the loss compared the output with: the target, else the batch)."""
    if target is None:  # a dict batch (a subclass of torch's losses may take it whole)
        function = getattr(loss_fn, "func", loss_fn)
        if function in (F.cross_entropy, F.nll_loss) or type(loss_fn) in _CROSS_ENTROPY:
            raise UsageError(
                "a dict batch goes whole to model(**batch), so cross-entropy has no target; pass "
                "loss_fn=None (the model returns its loss) or a loss_fn(output, batch) of yours"
            )
    try:
        if isinstance(inputs, dict):
            output = net(**inputs)
        elif isinstance(inputs, (tuple, list)):
            output = net(*inputs)
        else:
            output = net(inputs)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        _forward_mistake(e, net, inputs)
        raise
    target = batch if target is None else target  # a dict batch: loss and metrics take it whole
    if loss_fn is not None:
        loss = _loss_of(loss_fn, output, target)
    elif (loss := _returned_loss(output)) is None:
        raise UsageError(
            "loss_fn=None needs the model to return its loss: a scalar tensor, or a "
            f"dict / object with a 'loss' entry (got {type(output).__name__})"
        )
    if not isinstance(loss, torch.Tensor):
        raise UsageError(
            f"the loss is a {type(loss).__name__}, not a tensor; return one number as a tensor "
            "(report other values through metrics=)"
        )
    if loss.ndim:  # one number in any shape is taken as it is; more, backward cannot start from
        if loss.numel() != 1:
            raise UsageError(f"the loss has shape {tuple(loss.shape)}; reduce it to one number")
        loss = loss.reshape(())
    return output, loss, target


def _forward(net, batch, loss_fn, runtime: Runtime, channels_last: bool = False):
    """Move a batch to the device, run the model under autocast -> (output, loss, target)."""
    if not runtime.on_cpu:
        batch = _to_device(batch, runtime.device, channels_last)
    inputs, target, _ = _split_batch(batch)
    if runtime.amp_dtype is None:  # full precision: not even a disabled autocast context
        return _output_and_loss(net, inputs, target, batch, loss_fn)
    with torch.autocast(runtime.device.type, dtype=runtime.amp_dtype):
        return _output_and_loss(net, inputs, target, batch, loss_fn)


@contextlib.contextmanager
def _no_sync_sharded(model):
    """FSDP2's no_sync: gradients stay whole and unreduced on each process and gathered weights
    stay gathered until the last micro-batch, so nothing is gathered or reduced in between (at
    the cost of whole weights and gradients in memory meanwhile)."""
    blocks = [m for m in model.modules() if m is not model and _is_sharded(m)]
    model.set_requires_gradient_sync(False)
    model.set_reshard_after_backward(False)
    for block in blocks:  # the root keeps its own setting
        block.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
        model.set_reshard_after_backward(True)
        for block in blocks:
            block.set_reshard_after_forward(True, recurse=False)


def _backward(state: TrainState, batch, share, loss_fn, runtime: Runtime, channels_last: bool):
    """Forward and backward one micro-batch whose loss counts `share` of the step (None: all).
    Returns its (scaled-down) loss, detached."""
    _, loss, _ = _forward(state.net, batch, loss_fn, runtime, channels_last)
    if not loss.requires_grad:  # (torch: "element 0 of tensors does not require grad")
        raise UsageError(
            "the loss needs no gradient: every parameter the model used has requires_grad=False "
            "(unfreeze some), or the model's forward detached its output"
        )
    if share is not None:
        loss = loss * share
    try:
        state.scaler.scale(loss).backward()
    except RuntimeError as e:
        _compiler_missing(e)
        raise
    return loss.detach()


def _accumulate(state: TrainState, batches, weights, loss_fn, runtime: Runtime, channels_last):
    """Sum the gradients of several micro-batches as if they were one batch -> the summed loss.
    Under DDP and sharded, gradients are reduced on the last micro-batch only."""
    no_sync = getattr(state.net, "no_sync", contextlib.nullcontext)
    if _is_sharded(state.net):
        no_sync = functools.partial(_no_sync_sharded, state.net)
    total, losses = sum(weights), []
    for i, (batch, weight) in enumerate(zip(batches, weights)):
        with contextlib.nullcontext() if i == len(batches) - 1 else no_sync():
            losses.append(_backward(state, batch, weight / total, loss_fn, runtime, channels_last))
    return sum(losses[1:], start=losses[0])


def _step_scheduler(state: TrainState) -> None:
    """Advance the LR schedule by one optimizer step; a ReduceLROnPlateau waits for evaluate."""
    scheduler = state.scheduler
    # (scheduler, step, last_epoch) after train_step last stepped it: a scheduler that moved
    # since was stepped by the user's loop too, and its schedule runs ahead.
    mark = (scheduler, state.step, _steps_taken(scheduler))
    if scheduler is not None and state._scheduled[:2] == mark[:2] and state._scheduled != mark:
        warnings.warn(
            "the scheduler was stepped outside train_step, which steps it after every optimizer "
            "step, so its schedule runs ahead; remove your scheduler.step()",
            stacklevel=3,
        )
    # Decided once per scheduler object: the one function of a plain LambdaLR that serves every
    # group alike, with float LRs (then a step is lr = base x f(step)), else None.
    if state._fast_path[0] is not scheduler:
        lambdas = getattr(scheduler, "lr_lambdas", [None])
        plain = type(scheduler) is LambdaLR and "step" not in vars(scheduler)
        floats = not any(torch.is_tensor(g["lr"]) for g in state.optimizer.param_groups)
        alike = plain and floats and all(f is lambdas[0] for f in lambdas)
        state._fast_path = (scheduler, lambdas[0] if alike else None)
    lr_lambda = state._fast_path[1]
    if lr_lambda is not None:  # LambdaLR.step() without its per-call checks and wrappers
        scheduler.last_epoch += 1  # (a few % of a small model's step on a CPU)
        factor = lr_lambda(scheduler.last_epoch)
        scheduler._last_lr = [base * factor for base in scheduler.base_lrs]
        for group, lr in zip(state.optimizer.param_groups, scheduler._last_lr, strict=True):
            group["lr"] = lr
    elif scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step()
    else:
        return  # nothing to step (a ReduceLROnPlateau steps after evaluation)
    state._scheduled = (scheduler, state.step + 1, _steps_taken(scheduler))


def _steps_taken(scheduler) -> list:
    """The step counts of a scheduler and of those it chains (a ChainedScheduler has none)."""
    chained = getattr(scheduler, "_schedulers", ())
    return [getattr(s, "last_epoch", None) for s in (scheduler, *chained)]


def _update_ema(pairs: tuple, decay: float, step: int) -> None:
    # Ramp the decay up early on so the average is not dominated by the random init.
    decay = min(decay, (1 + step) / (10 + step))
    ema_floats, live_floats, ema_others, live_others = pairs
    torch._foreach_lerp_(ema_floats, live_floats, 1.0 - decay)
    if ema_others:
        torch._foreach_copy_(ema_others, live_others)


def train_step(
    state: TrainState,
    batches: list,
    *,
    runtime: Optional[Runtime] = None,
    loss_fn: Optional[Callable] = F.cross_entropy,
    clip_grad: float = 0.0,
    channels_last: bool = False,
    weights: Optional[list] = None,
):
    """One optimizer step over `batches`, the micro-batches of one accumulation group.

    Returns the step's mean loss, a detached device tensor (no host sync). Mutates model,
    optimizer, scheduler, scaler and EMA in place; advances state.step and state.lr (the LR this
    step applied). `weights`, one per micro-batch (default: its weight or sample count, see
    _sizes), weigh their losses: the gradient is one big batch's even if the last is short.
    `clip_grad` > 0 clips the total gradient norm; `channels_last` makes 4-d inputs channels-last.
    """
    _check_state(state, "train_step(state, batches)")
    runtime = _runtime_for(runtime, state.model)
    weights = _check_step(state, batches, weights, runtime)
    if len(batches) == 1:
        step_loss = _backward(state, batches[0], None, loss_fn, runtime, channels_last)
    else:
        weights = weights or _sizes(batches)[1]
        step_loss = _accumulate(state, batches, weights, loss_fn, runtime, channels_last)
    if clip_grad:
        state.scaler.unscale_(state.optimizer)  # clip the true gradient, not the fp16-scaled one
        nn.utils.clip_grad_norm_(state.model.parameters(), clip_grad)
    if state.scaler.is_enabled():  # fp16 only: a disabled GradScaler's calls cost for nothing
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.lr = float(state.optimizer.param_groups[0]["lr"])  # a copy even of a tensor LR
    _step_scheduler(state)
    if state._ema_tensors:
        _update_ema(state._ema_tensors, state.ema_decay, state.step)
    state.step += 1
    return step_loss


def _check_step(state: TrainState, batches, weights, runtime: Runtime) -> Optional[list]:
    """train_step's `batches` and `weights` (returned as a list) checked against the state and
    runtime: a UsageError, or a warning when each process would train alone."""
    if not isinstance(batches, (list, tuple)) or batches and torch.is_tensor(batches[0]):
        raise UsageError(
            f"train_step takes a list of micro-batches, not a {type(batches).__name__} of "
            "tensors; pass [batch] for one batch"
        )
    if not batches:
        raise UsageError("train_step needs at least one micro-batch in batches=[...]")
    if runtime.world_size > 1 and not _reduces_gradients(state.net):
        warnings.warn(
            "train_step with several processes on a model that is not wrapped in "
            "DistributedDataParallel (or sharded): each process trains alone; set state.net",
            stacklevel=3,
        )
    if runtime.amp_dtype is torch.float16 and not state.scaler.is_enabled():
        raise UsageError(  # fp16 gradients underflow to zero without loss scaling
            "fp16 training needs a loss scaler: TrainState(..., "
            f"scaler=torch.amp.GradScaler({runtime.device.type!r}))"
        )
    if weights is not None:
        weights = weights.tolist() if torch.is_tensor(weights) else list(weights)
        if len(weights) != len(batches) or min(weights) < 0 or not sum(weights) > 0:
            raise UsageError(
                f"train_step needs one weight per micro-batch ({len(batches)}), none negative "
                f"and a positive total, not weights={weights}"
            )
    return weights


def _reduces_gradients(net: nn.Module) -> bool:
    """Whether `net`, maybe compiled, averages gradients over processes: DDP, FSDP or sharded."""
    while not isinstance(net, nn.parallel.DistributedDataParallel) and not _is_sharded(net):
        if type(net).__name__ == "FullyShardedDataParallel":  # FSDP1: not imported unless used
            return True
        net = getattr(net, "_orig_mod", None)
        if not isinstance(net, nn.Module):
            return False
    return True


def _peak_lr(state: TrainState) -> float:
    """The learning rate the optimizer was built with (trainloop's: config.lr)."""
    return float(state.optimizer.defaults.get("lr", state.lr))


def _lr_factor(schedule: str, total: int, warmup: int, step: int) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based)."""
    if schedule == "onecycle":  # ramp up from lr/25 over `warmup` (default 30%), anneal to ~0
        warmup = warmup or max(1, int(0.3 * total))
        if step < warmup:
            return 1 / 25 + (1 - 1 / 25) * step / warmup
    elif step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "step":  # x0.1 at half and at three quarters of training
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 0.5 * (1 + math.cos(math.pi * progress))  # cosine and onecycle


def _batch_metrics(output, target, loss, sizes: tuple, metrics: dict, classes_first) -> dict:
    """{name: (sum, weight)} of one batch of `sizes` (samples, [its weight]), weighted as evaluate
    says. Accuracy counts the integer labels (N, ...) in 0..C-1 of class logits (N, C, ...) (not
    cross-entropy's ignore_index); logits that also read as (N, ..., C) count as acc? and top5?
    unless `classes_first` (a cross-entropy loss: classes on dim 1); evaluate merges those into
    acc and top5 when other batches were classes-first."""
    samples, [weight] = sizes
    values = {"loss": (loss.float() * weight, weight)}
    tensors = isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor)
    labels = tensors and not target.is_floating_point() and target.dtype != torch.bool
    fits = labels and output.is_floating_point() and output.dim() > 1 and output.shape[1] > 1
    fits = fits and output.shape[:1] + output.shape[2:] == target.shape
    classes_last = fits and output.dim() > 2 and output.shape[1:-1] == target.shape[1:]
    if fits:
        unsure = "?" if classes_last and not classes_first else ""
        valid = (target >= 0) & (target < output.shape[1])
        counted = valid.sum()
        values["acc" + unsure] = (((output.argmax(1) == target) & valid).sum(), counted)
        if output.shape[1] > 5:
            top5 = (output.topk(5, dim=1).indices == target.unsqueeze(1)).any(1)
            values["top5" + unsure] = ((top5 & valid).sum(), counted)
    for name, fn in metrics.items():
        value = fn(output, target)
        try:
            values[name] = (torch.as_tensor(value).float().mean() * samples, samples)
        except (TypeError, RuntimeError, ValueError):
            raise UsageError(
                f"metrics[{name!r}] returned {value!r:.40}; return the batch's mean as a number "
                "or tensor"
            ) from None
    return values


def _check_metrics(metrics) -> dict:
    """`metrics` ({} for None), or a UsageError."""
    functions = isinstance(metrics, dict) and all(map(callable, metrics.values()))
    if metrics is not None and not (functions and all(isinstance(k, str) for k in metrics)):
        raise UsageError("metrics must be a dict of functions, e.g. {'mae': my_mae}")
    if metrics and "loss" in metrics:
        raise UsageError("metrics={'loss': ...} would replace the loss; name it otherwise")
    for name, function in (metrics or {}).items():
        try:
            inspect.signature(function).bind(None, None)
        except TypeError:
            raise UsageError(
                f"metrics[{name!r}] must take two arguments: (output, target)"
            ) from None
        except ValueError:  # a builtin without a signature
            pass
    return metrics or {}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    *,
    runtime: Optional[Runtime] = None,
    loss_fn: Optional[Callable] = F.cross_entropy,
    metrics: Optional[dict] = None,
) -> dict:
    """Mean loss, accuracy (and top-5 with more than 5 classes) and `metrics` over `data`,
    summed over all processes: the loss weighted as in training (a batch's weight, else its
    samples), accuracy by labels, metrics by samples. Restores each module's mode (a BatchNorm
    you froze with .eval() stays so)."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"evaluate takes a model (state.eval_model), not a {type(model).__name__}")
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        raise UsageError(
            "evaluate takes batches: a DataLoader, make_loader(dataset, batch_size=..., "
            "train=False) or a list of batches, not a Dataset (of ready batches: pass "
            "DataLoader(dataset, batch_size=None))"
        )
    alone = "evaluate without runtime= scores this process's batches alone"
    rt = _runtime_for(runtime, model, alone, stacklevel=4)
    _sync_buffers([model], rt)  # so that all score the weights a checkpoint holds
    sums, weights, batch = {}, {}, None
    metrics, classes_first = _check_metrics(metrics), _is_cross_entropy(loss_fn)
    extra = _extra_forwards(model, data, rt)
    sampler = getattr(data, "batch_sampler", None)
    read = getattr(sampler, "read", False)  # evaluating a training loader is no read of it
    if isinstance(sampler, _EpochBatches):
        sampler.read = False
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for [batch] in _groups(data, 1):  # (the loader's own frame, for _fault)
            output, loss, target = _forward(model, batch, loss_fn, rt)
            scores = _batch_metrics(output, target, loss, _sizes([batch]), metrics, classes_first)
            for name, (value, counted) in scores.items():
                sums[name] = sums.get(name, 0) + value.detach()
                weights[name] = weights.get(name, 0) + counted
        for _ in range(extra):  # so that this process takes part in the others' last gathers
            _forward(model, batch, loss_fn, rt)
    finally:  # also when a batch fails
        if isinstance(sampler, _EpochBatches):
            sampler.read = read
        for module, training in modes:
            module.training = training
        if _is_sharded(model):  # FSDP keeps a root's weights gathered after no-grad forwards,
            model.reshard()  # and an EMA update of its shards would not reach them
    return _mean_scores(sums, weights, metrics, rt)


def _extra_forwards(model: nn.Module, data, rt: Runtime) -> int:
    """The forwards this process makes beyond its batches: each forward of a model sharded over
    several processes gathers weights from all, so all make as many as the one with most."""
    if not (_is_sharded(model) and rt.world_size > 1):
        return 0
    if (size := _length(data)) is None:
        raise UsageError("evaluate on a sharded model needs data with a len(), e.g. a list")
    most, fewest = _all_reduce([size, -size], rt, dist.ReduceOp.MAX)
    if fewest == 0:  # -0: a process without a batch has no input to take part with
        raise UsageError("evaluate on a sharded model needs a batch on every process")
    return int(most) - size


def _mean_scores(sums: dict, weights: dict, metrics: dict, rt: Runtime) -> dict:
    """evaluate's scores: each sum over all processes by its weight over all processes."""
    # A process that had no batch does not know the metric names.
    names = sorted(set().union(*_gather(sorted(sums), rt)))
    parts = [d.get(k, 0) for d in (sums, weights) for k in names]
    totals = [torch.as_tensor(v, device=rt.device).float() for v in parts]
    if not names:
        raise UsageError(  # (fit refuses empty val_data it can measure before training)
            "evaluate got no batch: the data (fit's val_data) is empty; pass val_data=None to "
            "train without validation"
        )
    totals = _all_reduce(torch.stack(totals).tolist(), rt)  # sync point
    totals = dict(zip(names, zip(totals[: len(names)], totals[len(names) :])))
    for name in ("acc", "top5"):  # see _batch_metrics
        value, weight = totals.pop(name + "?", (0, 0))
        if name in totals and name not in metrics:
            totals[name] = (totals[name][0] + value, totals[name][1] + weight)
    # A metric nothing was counted for (no label in 0..C-1) is not reported, rather than as 0.
    return {name: value / weight for name, (value, weight) in totals.items() if weight}


# ---- checkpoints -----------------------------------------------------------------------------


def _rng_state(runtime: Runtime) -> dict:
    # NumPy's state holds an ndarray, which weights_only loading refuses: store it as a tensor.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    keys = torch.from_numpy(keys.astype(np.int64))
    return {
        "python": random.getstate(),
        "numpy": (name, keys, int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(runtime.device) if runtime.device.type == "cuda" else None,
    }


def _set_rng_state(state: dict, runtime: Runtime) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], runtime.device)


def _seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; each process gets its own stream (dropout differs by rank)."""
    random.seed(_mix_seed(seed, rank, 3))
    np.random.seed(_mix_seed(seed, rank, 4) % 2**32)
    torch.manual_seed(_mix_seed(seed, rank, 5))


def _previous(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def _kept(path: Optional[Path]) -> str:
    """Where the last good checkpoint is (a failed save leaves `path` or its previous version)."""
    path = next((p for p in (path, path and _previous(path)) if p and p.exists()), None)
    return f"the last good checkpoint {path} is intact" if path else "there is no checkpoint yet"


def _save_failure(error: Exception, path: Path, checkpoint: Optional[Path]) -> str:
    """One line on a file that could not be written: why, the last good checkpoint, what to do."""
    # An errno says why; torch's zip writer raises its own error with the OSError as context.
    cause = next((e for e in (error, error.__context__) if getattr(e, "errno", None)), None)
    if cause is not None:
        why = os.strerror(cause.errno).lower()  # e.g. read-only
    elif path.parent.is_dir() and shutil.disk_usage(path.parent).free < 2**20:
        why = "no space left on device"
    else:
        why = f"write failed ({_line(error)})"
    return (
        f"could not write {path}: {why}; {_kept(checkpoint)}. Free space on {path.parent} (or "
        "make it writable) and run the same command again"
    )


def _fsync_directory(path: Path) -> None:
    """Make the renames in a directory survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What weights_only loading takes back, beside lists, tuples, sets and dicts of these: exactly
# these types (a subclass, such as an IntEnum, is refused), and tensors, dtypes, devices.
_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _plain(value, where: str):
    """`value` as weights_only loading takes it back (NumPy numbers as Python's), or a UsageError
    naming where it holds anything else, so that no checkpoint is written that cannot load."""
    if isinstance(value, (torch.Tensor, torch.dtype, torch.device)) or type(value) in _SCALARS:
        return value
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        kind = next(k for k in (list, set, tuple) if isinstance(value, k))  # torch.Size: a tuple
        return kind(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, np.generic):
        return value.item()
    raise UsageError(
        f"{where} holds a {type(value).__name__}, which loading refuses; keep to tensors, "
        "numbers, strings, lists and dicts, e.g. dataclasses.asdict(config) with os.fspath(path)"
    )


def _atomic_save(entries: dict, path: Path, checkpoint: Optional[Path] = None) -> None:
    """Write `entries` to `path` so that a kill at any instant leaves a loadable file there. A
    failure raises SaveError naming the run's last good `checkpoint` and leaves what was there;
    without `checkpoint`, `path` is it, and its previous version is kept as `<name>.prev.pt`."""
    payload = {"format": CHECKPOINT_FORMAT, "trainloop": __version__, **entries}
    payload = _map_tensors(payload, lambda t: t.detach().cpu())  # (callers checked _plain)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        if checkpoint is None and path.exists():
            os.replace(path, _previous(path))
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except (OSError, RuntimeError) as e:  # torch's zip writer raises a full disk as RuntimeError
        raise SaveError(_save_failure(e, path, checkpoint or path)) from e
    finally:
        with contextlib.suppress(OSError):  # read-only: even a missing file raises; next start
            tmp.unlink()  # clears what is left (_run_directory)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _checksums(directory: Path, runtime: Runtime) -> dict:
    """{file name: CRC-32} of the files in `directory`; each process reads a share of them."""
    names = sorted(p.name for p in directory.iterdir() if p.name != "checksums.json")
    mine = {name: _crc32(directory / name) for name in names[runtime.rank :: runtime.world_size]}
    return {name: crc for share in _gather(mine, runtime) for name, crc in share.items()}


def _swap_in(new: Path, path: Path) -> None:
    """Move the complete directory `new` to `path`, the old one to <name>.prev: at every
    instant `path` or its previous version is a complete checkpoint."""
    prev, old = _previous(path), path.with_name(f".{path.name}.prev.tmp")
    if path.exists():  # (after a fallback there is none: the previous one is the last good one)
        if prev.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(prev, old)
        os.replace(path, prev)
    os.replace(new, path)
    _fsync_directory(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _save_sharded(path: Path, state: TrainState, header: dict, runtime: Runtime) -> None:
    """Write the directory `path`: model, optimizer and EMA as DCP shards (each process its own),
    `header` as trainloop.pt, and last checksums.json (CRC-32s), in .<name>.tmp, then swap it in."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    tensors = dict(zip(("model", "optimizer"), get_state_dict(state.model, state.optimizer)))
    # Buffers (BatchNorm statistics) are not sharded and differ between processes: each
    # process's are kept, so that a resumed run goes on as an unbroken one.
    buffers = {"model": dict(state.model.named_buffers())}
    if state.ema is not None:
        tensors["ema"] = get_model_state_dict(state.ema)
        buffers["ema"] = dict(state.ema.named_buffers())
    buffers = _map_tensors(buffers, lambda t: t.detach().cpu())
    header = {**header, "buffers": _gather(buffers, runtime)}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if runtime.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
            tmp.mkdir(parents=True)
            _atomic_save({"sharded": sorted(tensors), **header}, tmp / "trainloop.pt", path)
        _barrier(runtime)
        dcp.save(tensors, checkpoint_id=tmp)  # returns once every file, .metadata too, is written
        crcs = _checksums(tmp, runtime)
        if runtime.is_main:
            with open(tmp / "checksums.json", "w") as f:
                json.dump(crcs, f, indent=0)
                f.flush()
                os.fsync(f.fileno())
            _swap_in(tmp, path)
    except (OSError, RuntimeError, dcp.CheckpointException) as e:
        if runtime.is_main:  # partial shards would keep the disk full
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, SaveError):  # trainloop.pt's, already said
            raise
        raise SaveError(_save_failure(e, path, path)) from e


# The state's own checkpoint entries.
_RESERVED = {"format", "trainloop", "model", "optimizer", "optimizer_type", "scheduler", "scaler"}
_RESERVED |= {"ema", "rng", "sharded", "buffers", "world_size", *_COUNTERS}


def _check_extra(extra: dict) -> dict:
    """Extra checkpoint entries, which must not shadow the state's, as they load back."""
    for key in extra:
        if key in _RESERVED:
            raise UsageError(f"save_checkpoint(..., {key}=...): {key!r} is the state's own entry")
    return {key: _plain(value, f"save_checkpoint(..., {key}=...)") for key, value in extra.items()}


def _scheduler_kind(scheduler) -> str:
    """A scheduler's class, with those it chains: SequentialLR(LinearLR, CosineAnnealingLR)."""
    inner = getattr(scheduler, "_schedulers", None)
    name = type(scheduler).__name__
    return f"{name}({', '.join(map(_scheduler_kind, inner))})" if inner else name


def save_checkpoint(path, state: TrainState, *, runtime: Optional[Runtime] = None, **extra):
    """Write a complete checkpoint of `state` (and the plain values `extra`) atomically to `path`.

    With several processes every one must call it (their RNG states are gathered); rank 0
    writes, and a barrier keeps all from reading a half-written file. The previous file is kept
    as `<name>.prev.pt` until the new one is complete. Refuses non-finite weights. A sharded
    model (FSDP2's fully_shard at its root) is saved as a directory, each process its shards.
    """
    alone = "save_checkpoint without runtime= saves as one process: called by all, they all "
    alone += "write the file; by one, the others' RNG streams are not saved"
    _check_state(state, "save_checkpoint(path, state)")
    runtime = _runtime_for(runtime, state.model, alone)
    sharded = _is_sharded(state.model)
    extra = _check_extra(extra)
    if not sharded and Path(path).is_dir():
        raise UsageError(f"{path} is a directory; pass a file path, e.g. {Path(path) / 'last.pt'}")
    finite = [_local(p.detach()).isfinite().all() for p in state.model.parameters()]
    finite = torch.stack(finite or [torch.tensor(True)]).all().item()  # sync point: once a save
    if sharded:  # each process checked its own shards
        finite = _all_reduce([float(finite)], runtime, dist.ReduceOp.MIN)[0]
    if not finite:
        raise NonFiniteLossError(
            "the weights are no longer finite (NaN or inf), so they were not saved; lower the "
            f"learning rate below lr={_peak_lr(state):g} or use clip_grad=1.0"
        )
    scheduler = state.scheduler
    if scheduler is not None:
        if not hasattr(scheduler, "state_dict"):
            raise UsageError("the scheduler has no state_dict(), so no checkpoint can restore it")
        scheduler = {"type": _scheduler_kind(scheduler), **scheduler.state_dict()}
    header = {  # checked by every process: when one refuses, all do
        "scheduler": scheduler,
        "optimizer_type": type(state.optimizer).__name__,
        "scaler": state.scaler.state_dict(),
        **{k: getattr(state, k) for k in _COUNTERS},
        "rng": _gather(_rng_state(runtime), runtime),
        "world_size": runtime.world_size,
        **extra,
    }
    if sharded:
        _save_sharded(Path(path), state, _plain(header, "the checkpoint"), runtime)
    else:  # _plain checks a model's extra state and an optimizer's state too
        ema = state.ema.state_dict() if state.ema is not None else None
        tensors = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict()}
        entries = _plain({**header, **tensors, "ema": ema}, "the checkpoint")
        if runtime.is_main:
            _atomic_save(entries, Path(path))
    _barrier(runtime)


def _check_archive(path: Path, checksums: bool = True) -> None:
    """Refuse anything torch.save does not write, and (with `checksums`) any entry whose CRC-32
    does not match, before unpickling a byte of it."""
    try:
        with zipfile.ZipFile(path) as archive:
            compressed = [e for e in archive.infolist() if e.compress_type != zipfile.ZIP_STORED]
            damaged = archive.testzip() if checksums and not compressed else None
    except Exception as e:  # damaged bytes raise many kinds (a flipped flag: "is encrypted")
        raise CheckpointError(
            f"{path} is corrupt or truncated (not a complete torch.save archive: {_line(e)})"
        ) from None
    if compressed:
        raise CheckpointError(
            f"{path} refused: entry {compressed[0].filename!r} is compressed, which "
            "torch.save never writes (a possible zip bomb)"
        )
    if damaged is not None:
        raise CheckpointError(f"{path} is corrupt: entry {damaged!r} fails its checksum")


def _read_checkpoint(path: Path, runtime: Runtime) -> dict:
    """The verified header of the checkpoint file or directory `path` (see load_checkpoint)."""
    if path.is_dir():
        _check_directory(path, runtime)
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    file = path / "trainloop.pt" if path.is_dir() else path
    _check_archive(file)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip reader errors, truncation: all untrusted input
        blocked = re.search(r".*(GLOBAL|Unsupported).*", str(e))  # the line naming the class
        if not (isinstance(e, pickle.UnpicklingError) and blocked):
            raise CheckpointError(f"{file} is corrupt or truncated ({_line(e)})") from None
        raise CheckpointError(
            f"{file} refused: it holds Python objects, not only tensors and numbers, and "
            f"loading it could run code ({blocked[0].strip().split('. ')[0]}); nothing from it "
            "was run"
        ) from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(
            f"{file} is not a trainloop checkpoint; load its weights with "
            "torch.load(path, weights_only=True) instead"
        )
    if "sharded" in ckpt and file == path:
        raise UsageError(f"{path} is part of a sharded checkpoint; pass {path.parent}")
    return ckpt


_TORCH_RECORDS = {("torch", "Size"), ("torch.serialization", "_get_layout")} | {
    ("pathlib", kind) for kind in ("Path", "PosixPath", "WindowsPath", "PurePosixPath")
}


class _CheckpointRecords(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's metadata and nothing else: its own classes,
    torch dtypes, sizes and layouts, and paths. Names are checked before anything is imported
    or looked up, and a class must be defined where the file says it is."""

    def find_class(self, module: str, name: str):
        own = module.startswith("torch.distributed.checkpoint.") and "." not in name
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if own or dtype or (module, name) in _TORCH_RECORDS:
            found = super().find_class(module, name)
            if not own or isinstance(found, type) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"holds {module}.{name}, which could run code")


def _check_directory(path: Path, runtime: Runtime) -> None:
    """Refuse a sharded checkpoint with a missing or damaged file, or whose .metadata (which
    torch.distributed.checkpoint unpickles) would build anything but its own records."""
    try:
        crcs = json.loads((path / "checksums.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is incomplete (no readable checksums.json: {_line(e)})"
        ) from None
    files = {p.name for p in path.iterdir()} - {"checksums.json"}
    missing = sorted((set(crcs) | {".metadata", "trainloop.pt"}) - files)
    if missing:
        raise CheckpointError(f"{path} is incomplete: {missing[0]} is missing")
    unlisted = sorted(files - set(crcs))  # refused before reading a byte of it
    if unlisted:
        raise CheckpointError(f"{path} is corrupt: {unlisted[0]} is not in checksums.json")
    bad = sorted(name for name, crc in _checksums(path, runtime).items() if crc != crcs[name])
    if bad:
        raise CheckpointError(f"{path} is corrupt: {bad[0]} fails its checksum")
    try:
        with open(path / ".metadata", "rb") as f:
            _CheckpointRecords(f).load()
    except Exception as e:  # untrusted input: any failure is a refusal
        raise CheckpointError(f"{path} refused: its .metadata {_line(e)}") from None


def _mismatch(error: Exception) -> str:
    """The lines of a load_state_dict error that say what did not match, as one line."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    return " ".join(lines[1:] or lines)[:400]


def _check_fits(saved: dict, mine: dict) -> None:
    """A ValueError naming the first entry that only one of the state dicts `saved` and `mine`
    holds, or that has two shapes (one that is no tensor, such as extra state, has ())."""
    for name in [*mine, *(k for k in saved if k not in mine)]:
        if name not in saved or name not in mine:
            there = "in the checkpoint, not" if name in saved else "not in the checkpoint, but"
            raise ValueError(f"{name}: {there} in the model")
        shapes = [tuple(getattr(d[name], "shape", ())) for d in (saved, mine)]
        if shapes[0] != shapes[1]:
            raise ValueError(f"{name}: {shapes[0]} in the checkpoint, {shapes[1]} in the model")


def _unflattened(name: str, state: dict) -> str:
    """The entry of `state` that DCP's flattened `name` is part of (extra state that is a dict
    is saved as name.key), else `name`."""
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))  # longest first
    return next((prefix for prefix in prefixes if prefix in state), name)


def _read_shards(parts: dict, path: Path, alone: bool) -> None:
    """Fill the tensors of `parts` (model, optimizer, ema) in place from the sharded checkpoint
    `path`; `alone`: without the other processes. DCP ignores what `parts` does not ask for, so
    first a ValueError names an entry that only one side holds, or unequal optimizer groups; the
    optimizer's state is pruned to what was saved (none for a parameter with no gradient yet)."""
    import torch.distributed.checkpoint as dcp

    with open(path / ".metadata", "rb") as f:  # (checked by _check_directory)
        saved = _CheckpointRecords(f).load().state_dict_metadata  # by flattened names
    for part, state in parts.items():
        if part != "optimizer":
            theirs = {
                _unflattened(k[len(part) + 1 :], state) for k in saved if k.startswith(f"{part}.")
            }
            _check_fits(dict.fromkeys(sorted(theirs)), dict.fromkeys(state))  # (DCP checks shapes)
            continue
        groups = {k.split(".")[2] for k in saved if k.startswith("optimizer.param_groups.")}
        mine = len(state["param_groups"])
        if len(groups) != mine:
            raise ValueError(f"{len(groups)} optimizer groups in the checkpoint, {mine} here")
        # DCP makes state for every parameter; a checkpoint has none for those with no gradient yet
        states = {
            name: {k: v for k, v in values.items() if f"optimizer.state.{name}.{k}" in saved}
            for name, values in state["state"].items()
        }
        state["state"] = {name: values for name, values in states.items() if values}
    try:
        with warnings.catch_warnings():  # torch would warn every time a process reads alone
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(parts, checkpoint_id=path, no_dist=alone or not dist.is_initialized())
    except dcp.CheckpointException as e:  # a BaseException holding every process's traceback
        raise ValueError(_line(e, -1)) from None


def _load_shards(state: TrainState, ckpt: dict, path: Path, runtime: Runtime) -> None:
    """Fill a sharded or plain state from a sharded checkpoint; torch.distributed.checkpoint
    reads the pieces of each tensor that this process holds, however it was sharded. Buffers
    are this process's own (rank 0's on another number of processes)."""
    from torch.distributed.checkpoint import state_dict as sd

    model, optimizer = sd.get_state_dict(state.model, state.optimizer)
    alone = not _is_sharded(state.model)  # whole tensors: no process needs another
    _read_shards({"model": model, "optimizer": optimizer}, path, alone)
    sd.set_model_state_dict(state.model, model)
    lenient = sd.StateDictOptions(strict=False)  # (parameters with no gradient yet have no state)
    sd.set_optimizer_state_dict(state.model, state.optimizer, optimizer, options=lenient)
    if state.ema is not None:  # an EMA turned on only now starts from the weights
        ema = sd.get_model_state_dict(state.ema)
        _read_shards({"ema" if "ema" in ckpt["sharded"] else "model": ema}, path, alone)
        sd.set_model_state_dict(state.ema, ema)
    buffers = ckpt["buffers"][runtime.rank if ckpt["world_size"] == runtime.world_size else 0]
    for part, module in (("model", state.model), ("ema", state.ema)):
        for name, buffer in module.named_buffers() if module is not None else ():
            buffer.copy_(buffers[part if part in buffers else "model"][name])


def _load_whole(state: TrainState, ckpt: dict) -> None:
    """Fill a sharded state from a checkpoint file of the whole model: each process keeps its
    shards of the full tensors. The optimizer state is keyed by parameter names for that."""
    from torch.distributed.checkpoint import state_dict as sd

    whole = sd.StateDictOptions(full_state_dict=True)
    names = {p: name for name, p in state.model.named_parameters()}
    saved, optimizer = ckpt["optimizer"], {"state": {}, "param_groups": []}
    for theirs, group in zip(saved["param_groups"], state.optimizer.param_groups, strict=True):
        params = [names[p] for p in group["params"]]
        for index, name in zip(theirs["params"], params, strict=True):
            if index in saved["state"]:
                optimizer["state"][name] = saved["state"][index]
        optimizer["param_groups"].append({**theirs, "params": params})
    sd.set_model_state_dict(state.model, ckpt["model"], options=whole)
    sd.set_optimizer_state_dict(state.model, state.optimizer, optimizer, options=whole)
    if state.ema is not None:
        sd.set_model_state_dict(state.ema, ckpt["ema"] or ckpt["model"], options=whole)


def _restore(state: TrainState, ckpt: dict, runtime: Runtime, path: Path) -> None:
    if "optimizer" not in ckpt and "optimizer" not in ckpt.get("sharded", ()):
        raise UsageError(
            f"{path} holds weights only; resume from a last.pt, or evaluate it with eval_only=True"
        )
    optimizer = type(state.optimizer).__name__
    if ckpt.get("optimizer_type", optimizer) != optimizer:  # (not recorded before 0.3.1)
        raise UsageError(
            f"{path} was trained with optimizer {ckpt['optimizer_type']}, not {optimizer}; pass "
            "the same kind of optimizer, or start over with resume='none'"
        )
    saved = ckpt["scheduler"]
    kind = _scheduler_kind(state.scheduler) if state.scheduler is not None else None
    saved_kind = saved.get("type", "LambdaLR") if saved is not None else None  # 0.1: LambdaLR
    # (0.3.2 and before saved a chain as its outer class alone: SequentialLR)
    if saved_kind not in (kind, kind and kind.split("(")[0]):  # before anything changes
        own = getattr(getattr(state.scheduler, "lr_lambdas", [None])[0], "func", None)
        if own is _lr_factor:
            kind += " (trainloop's own schedule)"
        raise UsageError(
            f"{path} was trained with scheduler {saved_kind}, not {kind}; pass the same kind "
            "of scheduler, or start over with resume='none'"
        )
    try:
        if path.is_dir():
            _load_shards(state, ckpt, path, runtime)
        elif _is_sharded(state.model):
            _load_whole(state, ckpt)
        else:  # load_state_dict copies what fits before it says what does not: check first
            _check_fits(ckpt["model"], state.model.state_dict())
            state.optimizer.load_state_dict(ckpt["optimizer"])  # it checks before it changes
            state.model.load_state_dict(ckpt["model"])
            if state.ema is not None:  # an EMA turned on only now starts from the weights
                state.ema.load_state_dict(ckpt["ema"] or ckpt["model"])
        if state.scheduler is not None:
            state.scheduler.load_state_dict({k: v for k, v in saved.items() if k != "type"})
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:  # (any content)
        raise UsageError(
            f"{path} does not match this model, optimizer or scheduler ({_mismatch(e)}); "
            "use resume='none' or another out"
        ) from None
    if ckpt["scaler"]:
        state.scaler.load_state_dict(ckpt["scaler"])
    for key in _COUNTERS:
        setattr(state, key, ckpt[key])
    if state.ema is not None:  # a sharded model's tensors may have been replaced
        state._ema_tensors = _ema_pairs(state.ema, state.model)
    if ckpt["world_size"] == runtime.world_size:
        _set_rng_state(ckpt["rng"][runtime.rank], runtime)
    else:  # elastic resume: old per-process streams do not map onto new processes
        config = ckpt.get("config")  # fit's; a user's loop may have saved anything there
        seed = config.get("seed", 0) if isinstance(config, dict) else 0
        _seed_everything(_mix_seed(seed, state.step), runtime.rank)


def load_checkpoint(
    path, state: Optional[TrainState] = None, *, runtime: Optional[Runtime] = None
) -> dict:
    """Read and verify a checkpoint; with `state`, restore training state into it.

    Never runs code from the file: only tensors and plain Python values load (weights_only).
    Raises CheckpointError naming the file when it is corrupt, truncated, fails a checksum or
    holds anything else. Restoring also sets this process's RNG states. A sharded checkpoint (a
    directory) or a file restores into a sharded or a plain model on any number of processes;
    with several processes every one must call it.
    """
    path = Path(path)
    if state is not None and not isinstance(state, TrainState):
        raise UsageError(
            f"load_checkpoint(path, state) restores a TrainState, not a {type(state).__name__}; "
            "for weights alone: model.load_state_dict(load_checkpoint(path)['model'])"
        )
    alone = "load_checkpoint without runtime= restores as one process alone: every process "
    alone += "takes one and the same RNG stream, not its own"
    runtime = _runtime_for(runtime, state and state.model, alone if state else "")
    if (path / "config.json").is_file():  # a run directory (a sharded checkpoint has none)
        inside = [p for p in (path / "last.pt", path / "last", path / "best.pt") if p.exists()]
        example = f", e.g. {inside[0]}" if inside else " (it holds none yet)"
        raise UsageError(f"{path} is a run directory; pass a checkpoint in it{example}")
    ckpt = _read_checkpoint(path, runtime)
    if state is not None:
        _restore(state, ckpt, runtime, path)
    return ckpt


def _weights(model: nn.Module) -> dict:
    """The whole model's state_dict on the CPU, gathered from its shards to rank 0 when it is
    sharded (every process must call it; the others get {})."""
    if not _is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint import state_dict as sd

    whole = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return sd.get_model_state_dict(model, options=whole)


def _load_weights(model: nn.Module, ckpt: dict, path: Path) -> None:
    """Load a plain `model` with the weights to evaluate (the EMA if any) from either checkpoint."""
    if path.is_dir():
        weights = model.state_dict()
        _read_shards({"ema" if "ema" in ckpt["sharded"] else "model": weights}, path, alone=True)
    else:  # best.pt holds no "ema": its "model" is the weights evaluated
        weights = ckpt.get("ema") or ckpt["model"]
    model.load_state_dict(weights)


# ---- fit -------------------------------------------------------------------------------------
# fit (at the end) checks its arguments, builds a TrainState and hands it to _train, which
# resumes, then runs each epoch: _train_epoch (steps, logs, periodic saves, agreed stops), then
# _end_epoch (evaluation, best.pt, metrics, last.pt). The pieces come first, in that order.


def _make_optimizer(model: nn.Module, config: Config, fp16: bool) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the model has no trainable parameters (requires_grad is off for all)")
    sparse = any(  # fused kernels, AdamW and weight decay refuse sparse gradients
        isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad
        for m in model.modules()
    )
    if sparse and (config.optimizer == "adamw" or config.weight_decay):
        raise UsageError(
            "the model has sparse gradients (an embedding with sparse=True), which torch's "
            "AdamW and weight decay cannot take; use optimizer='sgd', weight_decay=0"
        )
    # No weight decay on biases and norm scales (it only fights the normalization); "decay"
    # marks trainloop's own groups for _apply_config.
    groups = [
        {"params": ps, "weight_decay": config.weight_decay if decay else 0.0, "decay": decay}
        for decay in (True, False)
        if (ps := [p for p in params if (p.dim() > 1) == decay])
    ]
    # A CPU gets torch's fused kernel, about twice as fast as its default loop in Python (GPUs
    # keep foreach, which fused may not beat); not shards, nor fp16: after a skipped step fused
    # SGD starts its momentum from uninitialised memory (torch 2.14; weights reached 1e32 on CPU).
    on_cpu = all(p.device.type == "cpu" and p.is_floating_point() for p in params)
    fused = True if on_cpu and not (sparse or config.shard or fp16) else None
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, fused=fused)
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0, fused=fused
    )


def _new_state(model, config: Config, runtime: Runtime, optimizer, scheduler, steps: int, ema=None):
    """The TrainState fit starts from; `steps` is the number of optimizer steps per epoch."""
    fp16 = runtime.amp_dtype == torch.float16
    optimizer = optimizer or _make_optimizer(model, config, fp16)
    total = config.epochs * steps
    if callable(scheduler):  # a function optimizer -> scheduler
        scheduler = scheduler(optimizer)
    if scheduler is None:
        warmup = int(config.warmup) if config.warmup >= 1 else int(config.warmup * total)
        patched = "step" in vars(optimizer)  # by the user's own scheduler or hook: keep it
        # (the step comes last: a partial with only positional arguments is the cheapest call)
        factor = functools.partial(_lr_factor, config.schedule, total, warmup)
        scheduler = LambdaLR(optimizer, factor)
        if not patched:  # LambdaLR's wrapper checks the order of calls to scheduler.step(),
            del optimizer.step  # which trainloop never makes (see _step_scheduler)
    elif config.out and not hasattr(scheduler, "state_dict"):
        raise UsageError(
            "the scheduler has no state_dict(), so a checkpoint cannot restore it; give it "
            "state_dict() and load_state_dict(), or pass out=''"
        )
    elif getattr(scheduler, "total_steps", total) < total:
        raise UsageError(  # OneCycleLR: torch would fail at the step past its end
            f"the scheduler's total_steps={scheduler.total_steps} is fewer than the run's "
            f"{total} optimizer steps ({config.epochs} epochs of {steps})"
        )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=fp16)
    return TrainState(model, optimizer, scheduler, scaler, ema_decay=config.ema, ema=ema)


def _to_channels_last(model: nn.Module) -> None:
    """Convert the 4-d weights and buffers to channels-last and the 5-d ones (Conv3d) to its
    3-d kind, which model.to(memory_format=...) refuses to mix."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    model._apply(
        lambda t: t.contiguous(memory_format=formats[t.dim()]) if t.dim() in formats else t
    )


def _sync_bn(model: nn.Module, config: Config, runtime: Runtime) -> nn.Module:
    """`model` with SyncBatchNorm layers when sync_bn=True across processes, else as it is."""
    if not config.sync_bn or runtime.world_size == 1:
        return model
    if runtime.device.type != "cuda":
        raise UsageError(
            "sync_bn=True needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernels); "
            "drop it for CPU processes"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _ddp_options(model: nn.Module) -> dict:
    """What fit's DDP keeps of a user's own DDP wrapper (maybe compiled): find_unused_parameters."""
    wrapper = getattr(model, "_orig_mod", model)
    if not isinstance(wrapper, nn.parallel.DistributedDataParallel):
        return {}
    return {"find_unused_parameters": wrapper.find_unused_parameters}


def _wrap(model: nn.Module, config: Config, runtime: Runtime, ddp: dict) -> nn.Module:
    """What the training step calls: DDP (with the options `ddp`) across processes, then
    torch.compile if asked. A sharded model is called as it is (_shard compiled its blocks)."""
    if _is_sharded(model):
        return model
    net = _sync_bn(model, config, runtime)  # shares model's parameters
    if runtime.world_size > 1:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=device_ids, **ddp)
    if config.compile:
        net = torch.compile(net)
    return net


def _holders(module: nn.Module) -> list:
    """The children that hold parameters, with a ModuleList's or ModuleDict's own in its place
    (such a container has no forward, which FSDP needs)."""
    found = []
    for child in module.children():
        container = isinstance(child, (nn.ModuleList, nn.ModuleDict))
        if container and type(child).forward is nn.Module.forward:
            found += _holders(child)
        elif next(child.parameters(), None) is not None:
            found.append(child)
    return found


def _blocks(model: nn.Module, types) -> list:
    """The modules to shard one by one, innermost first."""
    if types:
        found = [m for m in model.modules() if isinstance(m, tuple(types)) and m is not model]
        if not found:
            names = [t.__name__ for t in types]
            raise UsageError(f"shard_blocks={names}: the model holds no such module")
        return found[::-1]
    while True:  # go down through wrappers: a module whose parameters all sit in one child
        holders = _holders(model)
        if len(holders) != 1 or next(model.parameters(recurse=False), None) is not None:
            return holders
        model = holders[0]


def _shard(model: nn.Module, config: Config, runtime: Runtime, blocks) -> tuple:
    """(a copy of `model`, its EMA or None), sharded with FSDP2 over all processes: each block
    (instances of the classes `blocks`, else the children that hold parameters), then the root.
    Each device holds 1/N of the parameters, gradients and optimizer state; a block's whole
    weights exist only while it computes, in autocast's dtype; gradients reduce in fp32. A copy:
    FSDP holds the process group in the modules it shards; gloo aborts if one outlives the group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = _sync_bn(copy.deepcopy(model), config, runtime)
    ema = copy.deepcopy(model).requires_grad_(False) if config.ema else None  # FSDP cannot copy
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=runtime.amp_dtype, reduce_dtype=torch.float32)
    whole = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # fp32, as under autocast
    for module in [m for m in (model, ema) if m is not None]:
        for norm in module.modules() if runtime.amp_dtype else ():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm is not module:
                fully_shard(norm, mesh=mesh, mp_policy=whole)  # fp32 statistics need fp32 weights
        for block in _blocks(module, blocks):
            if config.compile and module is model:
                block.compile()  # in place: the checkpoint's names stay plain
            if not _is_sharded(block):  # (a BatchNorm, already)
                fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
    return model, ema


def _copy_whole(source: nn.Module, plain: nn.Module) -> None:
    """Write the weights and buffers of `source` into `plain`; a sharded source is gathered one
    tensor at a time (every process must call)."""
    with torch.no_grad():
        pairs = zip(plain.state_dict().values(), source.state_dict().values(), strict=True)
        for target, source in pairs:
            if isinstance(target, torch.Tensor):  # not a module's extra state
                target.copy_(source.full_tensor() if hasattr(source, "full_tensor") else source)


@dataclass(frozen=True)
class _Console:
    """Where rank 0's output goes; other ranks get one that says nothing."""

    write: Callable[[str], None]  # always shown: warnings, stops, the summary
    quiet: bool = False  # progress and epoch lines are not shown
    live: bool = False  # a rich progress bar on a terminal

    def line(self, text: str) -> None:
        if not self.quiet:
            self.write(text)


def _console(log: Optional[Callable], quiet: bool, runtime: Runtime) -> _Console:
    if log is not None and not callable(log):
        raise UsageError(f"log={log!r:.40} is not a function; pass one, or None")
    if not runtime.is_main:
        return _Console(lambda text: None, quiet=True)
    if log is not None:
        return _Console(log, quiet)
    # rich comes with typer; it is optional when this file is vendored
    live = sys.stdout.isatty() and not quiet and importlib.util.find_spec("rich") is not None
    return _Console(lambda text: print(text, flush=True), quiet, live)


@contextlib.contextmanager
def _progress_bar(console: _Console, title: str, total: int, done: int):
    """Yields update(**fields): a live bar on a terminal, a no-op elsewhere."""
    if not console.live:
        yield lambda advance=1, **fields: None
        return
    from rich import progress as rp

    loss = rp.TextColumn("loss {task.fields[loss]}  {task.fields[speed]} samples/s")
    columns = (rp.TextColumn(title), rp.BarColumn(), rp.MofNCompleteColumn(), loss)
    with rp.Progress(*columns, rp.TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(title, total=total, completed=done, loss="-", speed="-")
        yield lambda advance=1, **fields: bar.update(task, advance=advance, **fields)


@dataclass
class _Stop:
    """Reasons to stop early: a signal (set by its handler) or the --time-limit deadline."""

    limit: Optional[float] = None  # seconds after `started` by which we must have exited
    started: float = field(default_factory=time.monotonic)
    signal: int = 0
    signal_time: float = 0.0  # time.monotonic() when it arrived
    deaths: list = field(default_factory=list)  # loader workers' deaths (see _catch_signals)

    def agreed(self, runtime: Runtime, ahead: float) -> int:
        """0 to go on, else the exit status to stop with: the signal's, or the time limit's when
        the next `ahead` seconds (until the next chance to stop, checkpoint included) would pass
        it. The highest over all processes: they all stop, at the same step."""
        late = self.limit is not None and time.monotonic() + ahead > self.started + self.limit
        code = 128 + self.signal if self.signal else (EXIT_TIME_LIMIT if late else 0)
        return int(_all_reduce([code], runtime, dist.ReduceOp.MAX)[0])


@contextlib.contextmanager
def _catch_signals(stop: _Stop):
    """SIGTERM, SIGINT and SIGUSR1 only set stop.signal; the loop checkpoints and stops. A
    repeat within a second is an echo (Ctrl-C reaches a worker from the terminal and from
    torchrun), ignored; a later one gets the previous handler back: a second Ctrl-C stops at
    once. torch's SIGCHLD handler raises a loader worker's death wherever the main thread is,
    maybe mid-step; here it is only noted in stop.deaths, for the loader to raise at its next
    fetch (within 5 s), between two steps (see _faults)."""
    previous = {}

    def handler(signum, frame):
        if not stop.signal:
            stop.signal, stop.signal_time = signum, time.monotonic()
        elif time.monotonic() - stop.signal_time > 1.0:
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)

    def note(signum, frame):
        try:
            note.wrapped(signum, frame)
        except RuntimeError as e:
            stop.deaths.append(_line(e))

    with contextlib.suppress(ValueError):  # not the main thread: leave signals to the caller
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup'd or background: keep it so
                previous[sig] = signal.signal(sig, handler)
    with contextlib.suppress(AttributeError, ValueError):  # no SIGCHLD (Windows)
        from torch.utils.data._utils.signal_handling import _set_SIGCHLD_handler

        _set_SIGCHLD_handler()  # torch's first (it installs once), so that ours wraps it
        current = signal.getsignal(signal.SIGCHLD)
        if callable(current):  # a stopped run's note (see below) gives back what it wrapped
            note.wrapped = getattr(current, "wrapped", current)
            signal.signal(signal.SIGCHLD, note)  # (not the main thread: ValueError)
            previous[signal.SIGCHLD] = note.wrapped
    try:
        yield stop
    finally:  # after a stop signal, loader workers that got it too die on: noted, not raised
        for sig, old in previous.items():
            if not (stop.signal and sig == getattr(signal, "SIGCHLD", None)):
                signal.signal(sig, old)


@dataclass(frozen=True)
class _Job:
    """What fit decided before training; the epoch loop reads it and never changes it."""

    config: Config
    runtime: Runtime
    loss_fn: Optional[Callable]
    metrics: dict
    console: _Console
    out: Optional[Path]
    train_size: int  # samples in the training set (0: unknown)
    steps_per_epoch: int
    own_schedule: bool  # the LR schedule is trainloop's (config.schedule), not the user's
    command_line: bool  # config's data and model settings built them (given in a config=)
    classes: Optional[list]  # the name of each label, when the training data says (_classes)
    generators: list  # those the user's training loader draws from (_generators)
    ddp: dict  # the option of the user's own DDP wrapper that fit's keeps

    @property
    def last(self) -> Optional[Path]:
        """Where the training checkpoint goes: a directory of shards when sharded."""
        return self.out and self.out / ("last" if self.config.shard else "last.pt")


@dataclass
class _LossWindow:
    """The losses of the steps since the last sync point (the last one is step state.step's)."""

    losses: list = field(default_factory=list)  # one detached device scalar per step
    weights: list = field(default_factory=list)  # what each step's loss counts in the mean

    def drain(self, state: TrainState, runtime: Runtime) -> None:
        """Add the window's losses, summed over all processes, to state.epoch_loss; raise on a
        NaN or inf (on any process: all stop at the same step) or collapsed fp16 loss scaling."""
        values = torch.stack(self.losses).tolist() if self.losses else []  # sync point
        collapsed = state.scaler.is_enabled() and state.scaler.get_scale() < 2.0**-16
        n, weighted = len(values), [v * w for v, w in zip(values, self.weights)]
        sums = _all_reduce(weighted + self.weights + [float(collapsed)], runtime)
        bad = [state.step - n + 1 + i for i, v in enumerate(sums[:n]) if not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(
                f"the loss became NaN or inf at step {bad[0]} (epoch {state.epoch + 1}) "
                "and no checkpoint was written after it; lower the learning rate below "
                f"lr={_peak_lr(state):g}, use clip_grad=1.0, or check the data"
            )
        if sums[-1]:
            raise NonFiniteLossError(
                f"fp16 gradients overflow at every step (loss scale below 2^-16 at step "
                f"{state.step}); use precision='bf16' or 'fp32'"
            )
        for loss_sum, weight_sum in zip(sums[:n], sums[n:-1]):  # step by step: the same sums
            state.epoch_loss[0] += loss_sum  # however the steps fall into windows
            state.epoch_loss[1] += weight_sum
        self.losses, self.weights = [], []


def _train_loss(state: TrainState) -> float:
    """The epoch's mean training loss so far, over all samples of all processes."""
    return state.epoch_loss[0] / max(state.epoch_loss[1], 1e-12)


def _out_of_memory(job: _Job, when: str, done: str, reading=False, workers=0) -> OutOfMemoryError:
    """One line: when, the batch size, the device's memory, and what uses less of it (`reading`
    a batch, fewer loader `workers` also do)."""
    config, device = job.config, job.runtime.device
    memory = ""
    if device.type == "cuda":  # the allocator's own counters: no sync
        total, peak = torch.cuda.mem_get_info(device)[1], torch.cuda.max_memory_allocated(device)
        memory = f" ({total / 2**30:.1f} GiB, peak use {peak / 2**30:.1f} GiB)"
    size, twice = config.batch_size, 2 * config.accumulate
    knobs = [  # those not in use already
        f"workers={workers // 2}" if reading and workers else "",
        f"batch_size={max(1, size // 2)} accumulate={twice} (the same global batch)",
        "precision='bf16'" if job.runtime.amp_dtype is None and not reading else "",
        "channels_last=True" if not (config.channels_last or reading) else "",
        f"image_size={config.image_size // 2}" if config.image_size else "",
        "shard=True" if job.runtime.world_size > 1 and not config.shard else "",
    ]
    knobs = [k for k in knobs if k]
    use = f"{', '.join(knobs[:-1])} or {knobs[-1]}" if len(knobs) > 1 else knobs[0]
    return OutOfMemoryError(
        f"out of memory {when} on {device}{memory} at batch_size={size} per process; {done}. "
        f"Use {use}, then run again"
    )


def _worker_died(error, deaths: list, job: _Job, when: str, done: str, workers: int):
    """One line: which worker, how it died, when, what was saved, and what to do."""
    deadline = time.monotonic() + 1.0  # the SIGCHLD naming the signal follows a broken read
    while not deaths and time.monotonic() < deadline:
        time.sleep(0.01)
    what = (deaths or [_line(error)])[0].split(". ")[0].rstrip(".")  # names the signal
    what = what if "DataLoader worker" in what else f"a DataLoader worker died ({what})"
    fix = ", or with workers=0 to see the worker's own error"
    if "Killed" in what:  # SIGKILL: most often the kernel's out-of-memory killer
        when += ", most likely by the out-of-memory killer"
        size, pixels = job.config.batch_size, job.config.image_size or "<pixels>"
        fix = f"; if it recurs, lower workers={workers}, batch_size={size} or image_size={pixels}"
    return WorkerDiedError(f"{what} {when}; {done}. Run the same command again to continue{fix}")


def _save(state: TrainState, job: _Job) -> None:
    if job.out is not None:
        config = dataclasses.asdict(job.config)
        extra = dict(config=config, train_size=job.train_size, classes=job.classes)
        if job.generators:  # (each process's, as the RNG streams)
            states = [generator.get_state() for generator in job.generators]
            extra["loader_rng"] = _gather(states, job.runtime)
        save_checkpoint(job.last, state, runtime=job.runtime, **extra)


def _position(state: TrainState) -> str:
    """Where training stands, as a message says it."""
    if state.epoch and not state.batches:
        return f"at step {state.step} (the end of epoch {state.epoch})"
    return f"at step {state.step} (epoch {state.epoch + 1})"


def _stopped(code: int, state: TrainState, job: _Job, saved: bool = True) -> Stopped:
    why = "time limit reached" if code == EXIT_TIME_LIMIT else ""
    why = why or f"{signal.Signals(code - 128).name} received"
    then = f"checkpoint {job.last}" if saved else _kept(job.last)
    then = f"{then}; run the same command again to continue"
    then = then if job.out else "nothing was saved (pass out= to be able to continue)"
    job.console.write(f"stopped: {why} {_position(state)}; {then} (exit status {code})")
    return Stopped(code)


def _fault(error, state: TrainState, job: _Job, *, loader, stop: _Stop, settle=None):
    """The error to end training with for a fault met in the epoch loop or in validation
    (`settle` None), or None: not one of ours. A fetch (a dead loader worker, see
    _catch_signals; a data set's unreadable file) or validation leaves the state whole: with one
    process it is saved (mid-epoch once settle() records the position). Workers dead after a
    stop signal got it too (it goes to the process group): that is the stop."""
    oom = _is_oom(error)
    tb, reading = error.__traceback__, False
    while tb is not None and not reading:  # a fetch from the loader, not a step or a metric
        reading = tb.tb_frame.f_code is _groups.__code__
        tb = tb.tb_next
    # A worker that died holding a batch breaks the reading of that batch in any way; an error
    # the worker's own code raised comes back re-raised by torch ("Caught X in DataLoader ...").
    workers = getattr(getattr(loader, "loader", loader), "num_workers", job.config.workers)
    own = "in DataLoader worker process" in str(error)
    broken = workers > 0 and isinstance(error, (EOFError, ConnectionError)) and not own
    died = (stop.deaths or broken or "DataLoader worker (pid" in str(error)) and reading
    unreadable = isinstance(error, _DataError) and reading  # a damaged image file
    if not (oom or died or unreadable):
        return None
    # Several processes save together, not one alone; a step that ran out of memory is half done.
    saved = job.runtime.world_size == 1 and job.out is not None and (reading or settle is None)
    if saved:
        if settle is not None:
            settle()
        _save(state, job)
    if died and stop.signal:
        return _stopped(128 + stop.signal, state, job, saved)
    done = f"checkpoint {job.last} written" if saved else _kept(job.last)
    when = _position(state)
    if settle is None:
        when = f"in the validation of epoch {state.epoch + 1}"
    elif oom and not reading:  # the step that ran out is the next one, and half done
        when = f"in step {state.step + 1} (epoch {state.epoch + 1})"
        done = f"the step was not counted and {done}"
    if unreadable:  # a worker's comes re-raised: "... trainloop._DataError: cannot read ..."
        cause = re.sub(r"^[\w.]*Error: ", "", _line(error, -1))
        return _DataError(f"{cause}, then run the same command again to continue ({when}; {done})")
    if oom:
        when = f"reading a batch {when}" if reading else when
        return _out_of_memory(job, when, done, reading, workers)
    return _worker_died(error, stop.deaths, job, when, done, workers)


@contextlib.contextmanager
def _faults(state: TrainState, job: _Job, loader, stop: _Stop, settle=None):
    """Ends training with one of our errors when the block meets a fault (see _fault)."""
    try:
        yield
    except Exception as e:  # _worker_died waits here for a death's SIGCHLD still on its way
        fault = _fault(e, state, job, loader=loader, stop=stop, settle=settle)
        if fault is None:
            raise
        raise fault from e


def _log_progress(state, job: _Job, advance, speed: float, eta: float, step: int, steps: int):
    mean = _train_loss(state)
    advance(advance=0, loss=f"{mean:.4f}", speed=f"{speed:,.0f}")
    if not job.console.live:
        job.console.line(
            f"epoch={state.epoch + 1}/{job.config.epochs} step={step}/{steps} loss={mean:.4f} "
            f"lr={state.lr:.4g} samples_per_s={speed:.0f} eta={eta:.0f}s"
        )


def _train_epoch(state: TrainState, loader, job: _Job, stop: _Stop, reserve: float) -> int:
    """Train to the end of the epoch, logging and checkpointing on schedule; return 0, or the
    exit status of an early stop (checkpoint written). `reserve`: seconds the end of an epoch
    last took (evaluation and checkpoint)."""
    config, rt = job.config, job.runtime
    start_batches, start_seen, start_seconds = state.batches, state.seen, state.epoch_seconds
    loader = set_epoch(loader, state.epoch, seen=state.seen, batches=state.batches)
    sampler = getattr(loader, "batch_sampler", None)
    ours = isinstance(sampler, _EpochBatches)
    first, left = state.step, math.ceil(len(loader) / config.accumulate)
    end, per_epoch = first + left, math.ceil(state.batches / config.accumulate) + left
    # Processes stop at the same step, so they must agree (a collective): one process checks
    # for a signal or the time limit after every step, several at every log point.
    agree_every = 1 if rt.world_size == 1 else config.log_every
    window, started, counted = _LossWindow(), time.monotonic(), 0

    def settle() -> None:  # a sync point: the epoch's global position and losses, for a save
        done = state.batches - start_batches
        state.seen = sampler.seen_after(done) if ours else start_seen + counted * rt.world_size
        state.epoch_seconds = start_seconds + time.monotonic() - started
        window.drain(state, rt)

    title = f"epoch {state.epoch + 1}/{config.epochs}"
    bar = _progress_bar(job.console, title, per_epoch, per_epoch - left)
    with bar as advance, _faults(state, job, loader, stop, settle):
        for batches in _groups(loader, config.accumulate):
            samples, weights = _sizes(batches)
            loss = train_step(
                state,
                batches,
                runtime=rt,
                loss_fn=job.loss_fn,
                clip_grad=config.clip_grad,
                channels_last=config.channels_last,
                weights=weights,
            )
            window.losses.append(loss)
            window.weights.append(sum(weights))
            state.batches += len(batches)
            counted += samples
            advance()
            log_now = state.step % config.log_every == 0 or state.step == end
            save_now = config.save_every and state.step % config.save_every == 0
            code, elapsed = 0, time.monotonic() - started
            if log_now or agree_every == 1:
                per_step = elapsed / (state.step - first)
                code = stop.agreed(rt, 2 * per_step * agree_every + reserve)
            if not (log_now or save_now or code):
                continue
            settle()
            if log_now:
                remaining = end - state.step
                speed, eta = counted * rt.world_size / elapsed, per_step * remaining
                _log_progress(state, job, advance, speed, eta, per_epoch - remaining, per_epoch)
            if save_now or code:
                _save(state, job)
            if code:
                return code
    settle()  # nothing leaves the epoch unchecked
    return 0


def _monitor_name(config: Config, names) -> str:
    """The metric that picks best.pt and early stopping: one of `names`, else a UsageError."""
    auto = next((k for k in ("val_acc", "val_loss", "train_loss") if k in names), "train_loss")
    name = auto if config.monitor == "auto" else config.monitor
    if name not in names:
        choices = ", ".join(k for k in names if k not in ("epoch", "step", "lr", "seconds"))
        raise UsageError(f"monitor={name!r} is not a reported metric; choose from {choices}")
    return name


# Words of a metric's name (between _ and -) that say which way is better, for monitor_mode auto.
_LOWER_BETTER = r"\w*loss|err|errors?|r?mse|mae|s?mape|nll|ppl|perplexity|wer|cer|bp[cb]"
_HIGHER_BETTER = (
    r"acc\w*|top\d+|f\d\w*|auc\w*|au[pr]oc|auprc|iou|miou|dice|precision|recall|r2|m?ap\d*|"
    r"bleu\w*|rouge\w*|psnr|ssim|ndcg\w*|mrr|kappa|mcc|corr\w*|pearson|spearman"
)


def _maximized(name: str, mode: str) -> bool:
    """Whether a higher `name` is better: monitor_mode, or for 'auto' the words of its name."""
    if mode != "auto":
        return mode == "max"
    words = re.split(r"[^a-z0-9]+", name.lower())
    for pattern, higher in ((_LOWER_BETTER, False), (_HIGHER_BETTER, True)):
        if any(re.fullmatch(pattern, word) for word in words):
            return higher
    raise UsageError(
        f"monitor={name!r}: is a higher {name} better? Say so with monitor_mode='max' or 'min'"
    )


def _rebest(state: TrainState, config: Config) -> None:
    """state.best and best_epoch: the history's first best row by the monitor (NaN never is)."""
    state.best, state.best_epoch = None, 0
    if not state.history:
        return
    name = config.monitor  # one name for all rows: an older version's rows may hold others
    name = _monitor_name(config, state.history[-1]) if name == "auto" else name
    higher = _maximized(name, config.monitor_mode)
    for row in state.history:
        value, best = row.get(name, math.nan), state.best
        if not math.isnan(value) and (best is None or (value > best if higher else value < best)):
            state.best, state.best_epoch = value, row["epoch"]


def _step_plateau(scheduler: ReduceLROnPlateau, row: dict, config: Config) -> None:
    name = _monitor_name(config, row)
    maximized = _maximized(name, config.monitor_mode)
    if maximized != (scheduler.mode == "max"):  # it would cut the LR as the metric improves
        raise UsageError(
            f"scheduler=ReduceLROnPlateau(mode={scheduler.mode!r}) follows {name}, which is "
            f"better when {'higher' if maximized else 'lower'}; give it "
            f"mode={'max' if maximized else 'min'!r} (or set monitor and monitor_mode)"
        )
    scheduler.step(row[name])


_EVENTS = "events.out.tfevents.*"  # TensorBoard's file


def _write_metrics(history: list, job: _Job, tensorboard) -> None:
    """metrics.jsonl rewritten from the checkpointed history: a resume never duplicates rows. A
    NaN or inf is written as null, as JSON has no such numbers."""
    tmp, path = job.out / ".metrics.jsonl.tmp", job.out / "metrics.jsonl"
    finite = [{k: v if math.isfinite(v) else None for k, v in row.items()} for row in history]
    try:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in finite))
        os.replace(tmp, path)
        if tensorboard is not None:
            path = job.out / _EVENTS
            for key, value in history[-1].items():
                if key not in ("epoch", "step"):
                    tensorboard.add_scalar(key, value, history[-1]["step"])
            tensorboard.flush()
    except OSError as e:  # a full disk: the same one line as for a checkpoint
        raise SaveError(_save_failure(e, path, job.last)) from e


def _end_epoch(state: TrainState, val, job: _Job, stop: _Stop, tensorboard) -> bool:
    """Evaluate, record, checkpoint and report one finished epoch; True = stop early."""
    config = job.config
    started = time.monotonic()
    row = {"epoch": state.epoch + 1, "step": state.step, "train_loss": _train_loss(state)}
    _sync_buffers((state.model, state.ema), job.runtime)  # all evaluate, best.pt holds, rank 0's
    if val is not None:  # a dead loader worker or out of memory ends the run as in training
        with _faults(state, job, val, stop):
            scores = evaluate(
                state.eval_model, val, runtime=job.runtime, loss_fn=job.loss_fn, metrics=job.metrics
            )
        row.update({f"val_{k}": v for k, v in scores.items()})
        if not math.isfinite(scores.get("loss", 0.0)):  # (one step can leave weights that overflow)
            raise NonFiniteLossError(
                f"the validation loss is {scores['loss']} after epoch {state.epoch + 1}, which "
                "was not saved; lower the learning rate below "
                f"lr={_peak_lr(state):g}, use clip_grad=1.0, or check the data"
            )
    row.update(lr=state.lr, seconds=round(state.epoch_seconds + time.monotonic() - started, 3))
    if isinstance(state.scheduler, ReduceLROnPlateau) and config.monitor in (*row, "auto"):
        _step_plateau(state.scheduler, row, config)
    state.history.append(row)
    _rebest(state, config)
    improved = state.best_epoch == row["epoch"]
    state.epoch, state.seen, state.batches = state.epoch + 1, 0, 0
    state.epoch_loss, state.epoch_seconds = [0.0, 0.0], 0.0
    # best.pt and metrics.jsonl first: a kill before last.pt redoes the epoch and rewrites them.
    if improved and job.out is not None:  # best.pt: the weights to deploy, no training state
        best = {"model": _weights(state.eval_model), "epoch": row["epoch"], "step": state.step}
        best.update(metrics=row, classes=job.classes, config=dataclasses.asdict(config))
        best = _plain(best, "best.pt")  # (as _save)
    if job.out is not None and job.runtime.is_main:
        if improved:
            _atomic_save(best, job.out / "best.pt", job.last)
        _write_metrics(state.history, job, tensorboard)
    _save(state, job)
    _monitor_name(config, row)  # one this run does not report is refused once the epoch is saved
    shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
    job.console.line(f"epoch={state.epoch}/{config.epochs} " + " ".join(list(shown)[1:]))
    return bool(config.patience) and state.epoch - state.best_epoch >= config.patience


def _tensorboard(job: _Job):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    try:
        return SummaryWriter(str(job.out), filename_suffix=".trainloop")
    except OSError as e:  # it writes its file's header at once
        raise SaveError(_save_failure(e, job.out / _EVENTS, job.last)) from e


@contextlib.contextmanager
def _run_directory(config: Config, runtime: Runtime):
    """Yields the run directory (None without out), created, locked and cleared of what a killed
    save left. out/.lock refuses a second run on it (two would overwrite each other's files): a
    POSIX lock, which the kernel drops however the process ends, and which loader workers do not
    inherit."""
    out = Path(config.out) if config.out else None
    with contextlib.ExitStack() as stack:
        if out is not None and runtime.is_main:
            if out.exists() and not out.is_dir():
                raise UsageError(f"out={config.out!r} is a file; pick a directory for the run")
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(
                    f"out={config.out!r} is not writable ({e.strerror}); pick another directory"
                ) from None
            with contextlib.suppress(OSError):  # read-only: a finished run's rerun writes nothing
                _lock(stack.enter_context(open(out / ".lock", "a+")), config)
                for tmp in out.glob(".*.tmp"):  # a file, or a directory of shards
                    shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        _barrier(runtime)
        yield out


def _lock(file, config: Config) -> None:
    """Lock the open `file` for this process, or a UsageError naming the process that holds it."""
    with contextlib.suppress(ImportError):  # Windows: no lock
        import fcntl

        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # a filesystem without locks
                return
            file.seek(0)
            raise UsageError(
                f"out={config.out!r} is in use by another run ({file.read().strip()}); wait "
                "for it to end or stop it, or pick another out"
            ) from None
        file.truncate(0)
        file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        file.flush()


def _write_config(job: _Job, state: TrainState) -> None:
    """Record the run's settings in config.json before it trains: also the first write, which
    finds early that out cannot be written. Settings that did not shape the run are null, and
    the user's optimizer and scheduler are named."""
    record = dict(dataclasses.asdict(job.config), world_size=job.runtime.world_size)
    record.update(classes=job.classes, trainloop=__version__)
    if not job.command_line:
        record.update(dict.fromkeys(_COMMAND_LINE | {"model"}))
    if not all("decay" in group for group in state.optimizer.param_groups):  # not built by fit
        record.update(optimizer=type(state.optimizer).__name__, momentum=None, weight_decay=None)
        record["lr"] = _peak_lr(state)
    elif job.config.optimizer != "sgd":  # (AdamW's betas are its own)
        record["momentum"] = None
    if not job.own_schedule:
        record.update(schedule=_scheduler_kind(state.scheduler), warmup=None)
    path = job.out / "config.json"
    try:
        path.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:  # a run to go on with, or a disk's fault: not the path's
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or any(job.out.glob("last*")):
            raise SaveError(_save_failure(e, path, job.last)) from e
        raise UsageError(
            f"out={job.config.out!r} is not writable ({e.strerror}); pick another directory"
        ) from None


# Settings that leave a run's trajectory as it is: resuming with another value is not warned about.
_NOT_TRAJECTORY = set(
    "out resume quiet log_every save_every time_limit eval_only patience workers download "
    "data_root monitor monitor_mode gpus".split()
)


def _candidates(config: Config, out: Optional[Path]) -> list:
    """The checkpoints to resume from, in the order to try: the one named, else OUT's newest
    (a file or a directory of shards), then their previous versions."""
    if config.resume not in ("auto", "none"):
        if not Path(config.resume).exists():
            raise UsageError(
                f"resume={config.resume!r}: no such file or directory; use resume='auto', "
                "resume='none' or an existing checkpoint"
            )
        return [Path(config.resume)]
    if config.resume == "none" or out is None:
        return []
    last = [out / "last.pt", out / "last"]  # both are there only after shard changed
    found = [p for p in (*last, *map(_previous, last)) if p.exists()]
    return sorted(found, key=lambda p: (p not in last, -p.stat().st_mtime))


def _check_classes(path: Path, saved: Optional[list], classes: Optional[list]) -> None:
    """A UsageError when the data's class names differ from those `path` was trained on (a
    renamed folder): its labels would mean other classes."""
    if saved is None or classes is None or saved == classes:
        return
    gone, new = [c for c in saved if c not in classes], [c for c in classes if c not in saved]
    change = ", ".join([*(f"-{c}" for c in gone[:3]), *(f"+{c}" for c in new[:3])])
    raise UsageError(
        f"{path} was trained on other classes ({change or 'in another order'}); use the data "
        "it was trained on, or start over with resume='none'"
    )


def _warn_changes(ckpt: dict, job: _Job) -> None:
    moot = _NOT_TRAJECTORY | (set() if job.own_schedule else {"epochs", "schedule", "warmup"})
    if job.config.schedule == "constant" and not 0 < job.config.warmup < 1:
        moot = moot | {"epochs"}  # the LR of no step depends on the number of epochs
    changes = [
        f"{k} {v} -> {getattr(job.config, k)}"
        for k, v in ckpt.get("config", {}).items()
        if k not in moot and getattr(job.config, k, v) != v
    ]
    gpu, was_gpu = job.runtime.device.type == "cuda", ckpt["rng"][0]["cuda"] is not None
    if gpu != was_gpu:  # (which GPUs, or how gpus chose them, changes nothing)
        changes.append(f"device {'a GPU' if was_gpu else 'no GPU'} -> {job.runtime.device}")
    if ckpt["world_size"] != job.runtime.world_size:
        why = "elastic resume: each remaining sample of the epoch is still seen once"
        if job.runtime.world_size > 1:
            why += f", but for at most {job.runtime.world_size - 1} at its end, as in every epoch"
        changes.append(f"world_size {ckpt['world_size']} -> {job.runtime.world_size} ({why})")
    if ckpt.get("train_size", job.train_size) != job.train_size:
        changes.append(f"training samples {ckpt['train_size']} -> {job.train_size}")
    if changes:
        job.console.write(
            "warning: resuming with changed settings, so the run is no longer "
            f"exactly reproducible: {'; '.join(changes)}"
        )


def _apply_config(state: TrainState, job: _Job, ckpt: dict) -> None:
    """After a restore, settings changed since the checkpoint win for trainloop's own optimizer
    (lr, weight decay, momentum; fused kernels are this machine's choice) and schedule, which
    goes on from the same share of training when an epoch's number of steps changed."""
    config, groups, saved = job.config, state.optimizer.param_groups, ckpt.get("config", {})
    changed = {k for k in ("lr", "weight_decay", "momentum") if saved.get(k) != getattr(config, k)}
    if all("decay" in g for g in groups):  # built from the config, not the user's own
        for g in groups:
            g["fused"] = state.optimizer.defaults["fused"]
            if "weight_decay" in changed:
                g["weight_decay"] = config.weight_decay if g["decay"] else 0.0
            if "momentum" in changed and "momentum" in g:
                g["momentum"], g["nesterov"] = config.momentum, config.momentum > 0
            if "lr" in changed and job.own_schedule:
                g["initial_lr"] = config.lr
    if not job.own_schedule:
        return
    scheduler = state.scheduler
    scheduler.base_lrs = [g["initial_lr"] for g in groups]
    then = [saved.get(k, getattr(config, k)) for k in ("batch_size", "accumulate")]
    then += [ckpt["world_size"], ckpt.get("train_size", job.train_size)]
    now = [config.batch_size, config.accumulate, job.runtime.world_size, job.train_size]
    if then != now:  # another number of steps per epoch
        done = state.epoch + state.seen / max(job.train_size, 1)
        scheduler.last_epoch = round(done * job.steps_per_epoch)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for g, base in zip(groups, scheduler.base_lrs):
        g["lr"] = base * factor


def _is_number(value) -> bool:
    """A float or int (not a bool), or a tensor of one (state.best = a user's loss tensor)."""
    if torch.is_tensor(value):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What fit writes in each entry of a checkpoint to train on (of a file: model and optimizer too).
_ENTRY_CHECKS = {
    **dict.fromkeys(
        ("epoch", "step", "seen", "batches", "best_epoch"), lambda v: type(v) is int and v >= 0
    ),
    **dict.fromkeys(("lr", "epoch_seconds"), _is_number),
    "best": lambda v: v is None or _is_number(v),
    "history": lambda v: isinstance(v, list) and all(isinstance(row, dict) for row in v),
    "epoch_loss": lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)),
    "world_size": lambda v: type(v) is int and v > 0,
    "rng": lambda v: isinstance(v, list) and all(isinstance(state, dict) for state in v),
    **dict.fromkeys(("scaler", "model", "optimizer"), lambda v: isinstance(v, dict)),
    "scheduler": lambda v: v is None or isinstance(v, dict),
    "classes": lambda v: v is None or isinstance(v, list) and all(isinstance(c, str) for c in v),
}


def _check_entries(ckpt: dict, path: Path) -> None:
    """A CheckpointError on a checkpoint to train on that holds what fit never writes (one edited
    by hand) or lacks an entry (one of the first trainloop), before any is restored; one of
    weights alone is left to _restore to name."""
    sharded = ckpt.get("sharded", ())  # (its model and optimizer are in the shards)
    if "optimizer" not in ckpt and "optimizer" not in sharded:
        return
    for key, fits in _ENTRY_CHECKS.items():
        # A user's loop writes no classes; a sharded checkpoint's model and optimizer are shards.
        optional = key == "classes" or sharded and key in ("model", "optimizer")
        if key not in ckpt and not optional:
            version = ckpt.get("trainloop", "?")
            raise CheckpointError(f"{path} holds no {key} (trainloop {version}, or edited by hand)")
        if key in ckpt and not fits(ckpt[key]):
            held = f"{key}={ckpt[key]!r:.60}"
            raise CheckpointError(f"{path} holds {held}, which fit never writes (edited by hand?)")
    if len(ckpt["rng"]) != ckpt["world_size"]:
        raise CheckpointError(
            f"{path} holds {len(ckpt['rng'])} RNG states for world_size={ckpt['world_size']}, "
            "which fit never writes (edited by hand?)"
        )


def _restore_generators(loader, generators: list, states: list) -> None:
    """Set the user's loader's generators to the states saved at an epoch's end (mid-epoch, its
    order was drawn from them already: see set_epoch). Persistent workers draw their seed (from
    them or torch's RNG) on the first iteration alone: that one is made here, before the states
    are set."""
    ours = isinstance(getattr(loader, "batch_sampler", None), _EpochBatches)
    if getattr(loader, "persistent_workers", False) and loader.num_workers and not ours:
        with torch.random.fork_rng(devices=[]):
            iter(loader)
    for generator, saved in zip(generators, states):
        generator.set_state(saved)


def _resume(state: TrainState, train, job: _Job) -> None:
    """Continue from the newest good checkpoint, falling back past a corrupt one."""
    config, rt = job.config, job.runtime
    candidates = _candidates(config, job.out)
    earlier = job.out and any((job.out / n).exists() for n in ("metrics.jsonl", "best.pt"))
    if config.resume == "auto" and earlier and not candidates:
        job.console.write(
            f"warning: {job.out} has no checkpoint to resume ({job.last.name}); starting "
            "over, replacing best.pt and metrics.jsonl"
        )
    corrupt = []
    for i, path in enumerate(candidates):
        try:
            ckpt = load_checkpoint(path, runtime=rt)
            _check_entries(ckpt, path)
        except CheckpointError as e:
            if i + 1 == len(candidates):  # the last, or the one file named
                raise CheckpointError(
                    f"{e}; resume from another checkpoint (resume=PATH) or start over "
                    "(resume='none')"
                ) from None
            job.console.write(f"warning: {e}; falling back to {candidates[i + 1]}")
            corrupt.append(path)
            continue
        if not isinstance(ckpt.get("config"), dict):  # a user's loop may save anything there
            ckpt["config"] = {}
        saved = ckpt["config"]
        if saved.get("optimizer", config.optimizer) != config.optimizer:
            raise UsageError(
                f"optimizer={config.optimizer!r}: {path} was trained with "
                f"{saved['optimizer']!r}; keep it, or start over with resume='none'"
            )
        _check_classes(path, ckpt.get("classes"), job.classes)
        _restore(state, ckpt, rt, path)
        if ckpt["world_size"] == rt.world_size and not state.batches:
            saved = ckpt.get("loader_rng") or []
            if saved and not torch.is_tensor(saved[0]):  # per process; 0.3.3 kept rank 0's alone
                saved = saved[rt.rank]
            _restore_generators(train, job.generators, saved)
        _warn_changes(ckpt, job)
        _apply_config(state, job, ckpt)
        _rebest(state, config)  # by this run's monitor and monitor_mode
        said = f"resumed from {path}: epoch {state.epoch + 1}, step {state.step}"
        if state.epoch >= config.epochs:
            said = f"{path}: already complete ({state.epoch} of {config.epochs} epochs); "
            said += "pass more epochs to train further"
        job.console.line(said)
        break
    _barrier(rt)
    if rt.is_main:
        for path in corrupt:  # set aside, so that no save rotates it over a good file
            aside = path.with_name(path.stem + ".corrupt" + path.suffix)
            if aside.is_dir():  # a directory is not replaced
                shutil.rmtree(aside)
            os.replace(path, aside)


def _as_loader(data, config: Config, runtime: Runtime, train: bool, console: _Console):
    streams = isinstance(data, IterableDataset)  # it cannot be indexed: batched as it streams
    if streams or data is None or isinstance(data, DataLoader) or not hasattr(data, "__getitem__"):
        sharded = hasattr(getattr(data, "sampler", None), "set_epoch")
        if train and runtime.world_size > 1 and not sharded:
            mine = "IterableDataset" if streams else "DataLoader has no DistributedSampler and"
            console.write(
                f"warning: your {mine} is read whole by every process, so each sees the same "
                "batches unless it splits them by rank itself; pass a map-style Dataset to shard it"
            )
        return DataLoader(data, batch_size=config.batch_size) if streams else data
    settings = dict(batch_size=config.batch_size, seed=config.seed, workers=config.workers)
    return make_loader(data, train=train, runtime=runtime, **settings)


def _classes(data) -> Optional[list]:
    """The name of each label, from the training data's `classes` (an image folder's, a
    torchvision data set's, a DataLoader's data set's), else None."""
    names = getattr(data, "classes", getattr(getattr(data, "dataset", None), "classes", None))
    plain = isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)
    return list(names) if plain and names else None


def _generators(loader) -> list:
    """The torch.Generators a loader of the user's draws its order (and worker seeds) from,
    as DataLoader(..., shuffle=True, generator=g) does: checkpoints keep their states."""
    batches = getattr(loader, "batch_sampler", None)
    if isinstance(batches, _EpochBatches):
        return []  # make_loader's order depends on (seed, epoch) alone
    holders = (loader, getattr(loader, "sampler", None), batches, getattr(batches, "sampler", None))
    found = [getattr(holder, "generator", None) for holder in holders]
    return list({id(g): g for g in found if isinstance(g, torch.Generator)}.values())


def _check_data(train_data, train, val_data, val, runtime: Runtime, shard: bool) -> int:
    """The number of training samples (0: unknown); a UsageError for data that cannot train."""
    batches = _length(train)
    if batches is None:
        raise UsageError(
            "train_data has no length; give your IterableDataset a __len__ (the LR schedule "
            "and progress need the epoch length)"
        )
    size = _length(getattr(train_data, "dataset", train_data))  # a DataLoader's is in batches
    if batches == 0 or size == 0:
        raise UsageError("train_data is empty: there is nothing to train on")
    if _length(val_data) == 0:
        raise UsageError("val_data is empty; pass val_data=None to train without validation")
    val_batches = _length(val)  # every sharded forward needs all processes
    if shard and val is not None and val_batches is None and runtime.world_size > 1:
        raise UsageError("shard=True needs val_data with a length; give your stream a __len__")
    if shard and val_batches is not None:
        if not _all_reduce([val_batches], runtime, dist.ReduceOp.MIN)[0]:
            raise UsageError(
                "val_data has fewer batches than processes; give it more samples or drop shard=True"
            )
    return size or 0


# Settings with which the command line builds its data and model; fit takes both ready-made.
_COMMAND_LINE = set(
    "data data_root download image_size mean std val_fraction augment weights eval_only".split()
)

# Other libraries' names for settings, which no spelling distance finds.
_OTHER_NAMES = {
    "learning_rate": "lr",
    "max_epochs": "epochs",
    "num_epochs": "epochs",
    "num_workers": "workers",
    "gradient_accumulation_steps": "accumulate",
    "max_grad_norm": "clip_grad",
    "gradient_clip_val": "clip_grad",
    "output_dir": "out",
    "mixed_precision": "precision",
}


def _settings(config: Optional[Config], overrides: dict) -> Config:
    """`config` (default: Config()) with fit's keyword overrides, checked."""
    if config is not None and not isinstance(config, Config):
        raise UsageError(
            f"config= takes a trainloop.Config, not a {type(config).__name__}; pass settings "
            "as keywords, e.g. fit(..., epochs=5)"
        )
    names = [f.name for f in dataclasses.fields(Config)]
    for bad in (k for k in overrides if k not in names):
        close = _OTHER_NAMES.get(bad) or ", ".join(difflib.get_close_matches(bad, names))
        hint = f"; did you mean {close}?" if close else ""
        raise UsageError(f"fit() got an unknown setting {bad!r}{hint}")
    config = check_config(dataclasses.replace(config or Config(), **overrides))
    if command_line := sorted(overrides.keys() & _COMMAND_LINE):
        raise UsageError(
            f"fit() got {command_line[0]}=...: a setting of the command line, which builds the "
            "data and model; fit trains the model and data it is given"
        )
    if config.eval_only:  # (the other command-line settings in a config are only recorded)
        raise UsageError("fit() trains; to only evaluate a model, call evaluate(model, data)")
    return config


def _check_arguments(
    model, train_data, val_data, optimizer, scheduler, loss_fn, metrics, blocks, config
):
    """Refuse arguments of the wrong kind or that do not go together, before anything is built."""
    if config.patience and val_data is None and config.monitor != "train_loss":
        raise UsageError("patience needs validation data; pass val_data, or monitor='train_loss'")
    reported = ("loss", "acc", "top5", *_check_metrics(metrics))
    names = ["train_loss", *(f"val_{m}" for m in reported if val_data is not None)]
    _maximized(_monitor_name(config, names), config.monitor_mode)
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if any(map(nn.parameter.is_lazy, itertools.chain(model.parameters(), model.buffers()))):
        raise UsageError(  # (their shapes come from the first batch: nothing can be built yet)
            "the model has lazy layers (nn.LazyLinear, ...) not yet built; run one batch through "
            "it first, e.g. with torch.no_grad(): model(x[:2])"
        )
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        raise UsageError(
            "the model's weights are on the meta device, without values; give them some first: "
            "model.to_empty(device='cpu'), then initialize them or load a state_dict"
        )
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if isinstance(data, tuple) and all(map(torch.is_tensor, data)):  # (x, y): a slip
            raise UsageError(f"{name} is a tuple of tensors; pass TensorDataset(*{name})")
        readable = hasattr(data, "__iter__") or hasattr(data, "__getitem__")
        if not readable and (data is not None or name == "train_data"):
            raise UsageError(f"{name}={data!r:.40} is not data; pass a Dataset or a DataLoader")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(
            f"optimizer={optimizer!r} is not an optimizer; pass one built on the model's "
            "parameters, or a name: 'sgd' or 'adamw'"
        )
    if scheduler is not None and not (callable(scheduler) or hasattr(scheduler, "step")):
        raise UsageError(
            f"scheduler={scheduler!r} is not a scheduler; pass a torch LR scheduler, a function "
            "optimizer -> scheduler, or a schedule name as schedule='cosine'"
        )
    if isinstance(scheduler, type):  # a class is callable, but takes more than the optimizer
        name = scheduler.__name__
        raise UsageError(f"scheduler={name} is a class; pass lambda opt: {name}(opt, ...)")
    if loss_fn is not None and not callable(loss_fn):
        raise UsageError(f"loss_fn={loss_fn!r:.40} is not a function; pass one, or None")
    if blocks is not None and not config.shard:
        raise UsageError("shard_blocks is for shard=True; pass both, or neither")
    classes = isinstance(blocks, (list, tuple)) and blocks
    if blocks is not None and not all(isinstance(b, type) for b in classes or [None]):
        raise UsageError(f"shard_blocks={blocks!r} must be a list of module classes, e.g. [Block]")
    objects = optimizer is not None or scheduler is not None and not callable(scheduler)
    if config.shard and objects:  # the model's parameters change when it is sharded
        raise UsageError(
            "shard=True builds the optimizer after sharding the model; pass its name "
            "(optimizer='sgd' or 'adamw'), and a scheduler as a function optimizer -> scheduler"
        )


@contextlib.contextmanager
def _group_of_one(needed: bool, runtime: Runtime):
    """A process group of this process alone, when sharding needs one and there is none."""
    if not needed or dist.is_initialized():
        yield
        return
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        gc.collect()  # see teardown
        dist.destroy_process_group()


def _summary(state: TrainState, job: _Job, stopped_early: bool) -> None:
    if not state.history:
        return
    name = _monitor_name(job.config, state.history[-1])
    text = f"done: {name} was never a finite number"
    if state.best is not None:
        text = f"done: best {name}={state.best:.4g} at epoch {state.best_epoch}"
    if stopped_early:
        text += f" (early stop after epoch {state.epoch}: no better {name} for "
        text += f"{job.config.patience} epoch{'s' if job.config.patience > 1 else ''})"
    if job.out is not None:
        text += f"; weights {job.out / 'best.pt'}, checkpoint {job.last}, "
        text += f"metrics {job.out / 'metrics.jsonl'}"
    job.console.write(text)


def _train(state: TrainState, train, val, job: _Job) -> list:
    """Resume if there is a checkpoint, then train epoch by epoch until done or stopped."""
    config, rt = job.config, job.runtime
    state.optimizer.zero_grad(set_to_none=True)
    _seed_everything(config.seed, rt.rank)
    _resume(state, train, job)
    low, high = _all_reduce([-state.step, state.step], rt, dist.ReduceOp.MAX)
    if -low != high:
        raise UsageError(
            f"processes resumed from different steps ({int(-low)} and {int(high)}): out must be "
            "on a filesystem that every machine shares"
        )
    # The first process writes out's files; a finished run's rerun writes nothing.
    writes = job.out is not None and rt.is_main and state.epoch < config.epochs
    if writes:
        _write_config(job, state)
    if not state.model.training:  # a model in eval mode trains whole; parts you froze with
        state.model.train()  # .eval() in a model in train mode stay frozen
    state.net = _wrap(state.model, config, rt, job.ddp)
    stop, stop_early, reserve = _Stop(parse_duration(config.time_limit)), False, 1.0
    tensorboard = _tensorboard(job) if writes else None
    try:
        with _catch_signals(stop):
            while state.epoch < config.epochs and not stop_early:
                code = _train_epoch(state, train, job, stop, reserve)
                if not code:
                    started = time.monotonic()
                    stop_early = _end_epoch(state, val, job, stop, tensorboard)
                    reserve = time.monotonic() - started
                    code = stop.agreed(rt, 0.0) if state.epoch < config.epochs else 0
                if code:
                    raise _stopped(code, state, job)
    except Exception as e:
        if not stop.signal or isinstance(e, (UsageError, CheckpointError, NonFiniteLossError)):
            raise  # ours: it says what happened
        # The signal reached this process's loader workers too, or a peer stopped alone (its
        # workers died): the stop, without a checkpoint, as the processes could not agree on one.
        raise _stopped(128 + stop.signal, state, job, saved=False) from e
    finally:
        if tensorboard is not None:
            with contextlib.suppress(OSError):  # a full disk was already reported
                tensorboard.close()
    _summary(state, job, stop_early)
    return state.history


def fit(
    model: nn.Module,
    train_data,
    val_data=None,
    *,
    config: Optional[Config] = None,
    loss_fn: Optional[Callable] = F.cross_entropy,
    metrics: Optional[dict] = None,
    optimizer=None,
    scheduler=None,
    shard_blocks=None,
    log: Optional[Callable] = None,
    runtime: Optional[Runtime] = None,
    **overrides,
) -> list:
    """Train `model` in place and return the per-epoch history (a list of dicts); with ema > 0
    the model ends with the EMA's weights, those evaluated and saved as best.pt.

    train_data / val_data: map-style Datasets (exact mid-epoch resume) or your own loaders. A
    batch is (inputs, target), (inputs, target, weight) or a dict for model(**batch).
    loss_fn(output, target) -> scalar (None: the model returns its loss); metrics: {"name":
    fn(output, target) -> batch mean}. optimizer: one on the model's parameters, or its name;
    scheduler: a torch LR scheduler on it, or a function optimizer -> scheduler (it replaces
    config.schedule). shard=True: FSDP2 shards each module of the classes `shard_blocks`
    (default: each child with parameters), then the whole; give the optimizer by name.
    Settings come from `config` with keyword overrides, e.g. fit(..., epochs=5, out="runs/a").
    Raises Stopped (a SystemExit) after checkpointing on a signal or the time limit, and the
    other errors of __all__ for bad settings and faults.
    """
    ddp, command_line = _ddp_options(model), config is not None
    if isinstance(optimizer, str):  # a name, like the config field: optimizer="adamw"
        overrides["optimizer"], optimizer = optimizer, None
    config = _settings(config, overrides)
    _check_arguments(
        model, train_data, val_data, optimizer, scheduler, loss_fn, metrics, shard_blocks, config
    )
    if config.label_smoothing:
        if loss_fn is not F.cross_entropy:
            raise UsageError(
                "label_smoothing is for the default cross-entropy; give your loss_fn its own, "
                "e.g. nn.CrossEntropyLoss(label_smoothing=0.1)"
            )
        loss_fn = functools.partial(F.cross_entropy, label_smoothing=config.label_smoothing)
    rt = _given(runtime) or setup_device(
        config.gpus, precision=config.precision, deterministic=config.deterministic
    )
    if config.precision not in ("auto", _PRECISIONS[rt.amp_dtype]):
        raise UsageError(
            f"precision={config.precision!r}, but the runtime given computes in "
            f"{_PRECISIONS[rt.amp_dtype]}; pass setup_device(precision={config.precision!r})"
        )
    try:
        model = _unwrap(model)
        if not config.shard:  # sharding moves only each process's shards (see _shard)
            model = model.to(rt.device)
        if config.channels_last:
            _to_channels_last(model)
        console = _console(log, config.quiet, rt)
        if config.optimizer == "adamw" and optimizer is None and config.lr == Config.lr:
            console.write(f"warning: adamw at lr={config.lr}, the default for sgd; try lr=1e-3")
        train = _as_loader(train_data, config, rt, True, console)
        val = _as_loader(val_data, config, rt, False, console)
        size = _check_data(train_data, train, val_data, val, rt, config.shard)
        steps = math.ceil(len(train) / config.accumulate)
        with _group_of_one(config.shard, rt):
            net, ema = _shard(model, config, rt, shard_blocks) if config.shard else (model, None)
            state = _new_state(net, config, rt, optimizer, scheduler, steps, ema)
            with _run_directory(config, rt) as out:
                own = scheduler is None
                parts = (config, rt, loss_fn, metrics or {}, console, out, size, steps, own)
                job = _Job(*parts, command_line, _classes(train_data), _generators(train), ddp)
                history = _train(state, train, val, job)
            if state.ema is not None or net is not model:  # the weights evaluated, in the model
                _copy_whole(state.eval_model, model)
            del state, net, ema  # the sharded copy ends before the process group (see teardown)
            return history
    finally:
        if runtime is None:
            teardown(rt)


# ---- CLI: data, models, launcher -------------------------------------------------------------


class _ImageTensors(TensorDataset):
    """In-memory images (N, C, H, W) with labels; augment_pad > 0 turns on crop + flip."""

    def __init__(self, images, labels, augment_pad: int = 0, classes=None):
        super().__init__(images, labels)
        self.augment_pad, self.classes = augment_pad, classes


def synthetic_images(
    seed: int, *, train_size=10000, val_size=2000, classes=10, size=32, channels=3
):
    """A learnable image-classification set made from the seed, no download: a sample is its
    class's smooth random pattern shifted by up to an eighth of the image, with random contrast
    and pixel noise three times stronger, so a model must pool evidence across the image (the
    small CNN reaches about 92% validation accuracy after one epoch, 99% after three)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(classes, channels, 4, 4, generator=generator)
    patterns = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    patterns = patterns / patterns.std(dim=(1, 2, 3), keepdim=True)
    pad = max(1, size // 8)

    def draw(n):
        labels = torch.randint(0, classes, (n,), generator=generator)
        shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
        images = _crop_flip(patterns[labels], shifts, torch.zeros(n, dtype=torch.bool), pad)
        contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=generator)
        noise = 3.0 * torch.randn(images.shape, generator=generator)  # per-pixel SNR well below 1
        return images * contrast + noise, labels

    return draw(train_size), draw(val_size)


_TORCHVISION_DATA = {
    name.lower(): name for name in ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100")
}
_BUILTIN_DATA = ("synthetic", *_TORCHVISION_DATA)  # any other --data is a directory

# Image files by their name's ending, in any case: torchvision's IMG_EXTENSIONS, GIF and JPEG's
# other endings.
_IMAGE_SUFFIXES = tuple(".jpg .jpeg .jpe .jfif .png .ppm .bmp .pgm .tif .tiff .webp .gif".split())

# Folders that hold a data set's splits, by their lower-case names.
_TRAIN_NAMES, _VAL_NAMES = ("train", "training"), ("val", "valid", "validation")
_SPLITS = (*_TRAIN_NAMES, *_VAL_NAMES, "test")

# Image folders. Training crops cover this share of the area (torchvision's 0.08 is tuned for
# long ImageNet runs; in 4 epochs on a small real folder 0.25 did as well or better, README);
# validation crops the center _VAL_CROP of the shorter side (224 of 256).
_CROP_AREA = (0.25, 1.0)
_VAL_CROP = 0.875


def _pil_pixels(image) -> torch.Tensor:
    """uint8 (3, H, W) of an open PIL image, upright, its range kept: PIL's convert clips
    16- and 32-bit integers (I;16, I: taken as 0-65535) and floats (F: 0-1) at 255."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        gray = np.asarray(image, np.float32) * (255.0 if image.mode == "F" else 255 / 65535)
        image = Image.fromarray(np.clip(gray + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # as PIL asks, before the alpha is dropped
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def _read_image(path, size: int, box_fn) -> torch.Tensor:
    """uint8 (3, size, size): the crop box_fn(width, height) of the upright image, resized. A
    JPEG at least twice the crop's needed size is decoded at 1/2, 1/4 or 1/8 scale (PIL's draft
    mode: a 4000x3000 photo in 16-40 ms instead of 55-80), else by torchvision.io; the rest by
    PIL (torchvision's PNG decoder crashes on a damaged file, its WebP reader ignores EXIF)."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import resized_crop

    pixels = box = None
    with Image.open(path) as image:
        if image.format in ("JPEG", "MPO"):  # MPO: a phone's JPEG with a second picture after it
            turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF: rotated 90 degrees
            width, height = image.size[::-1] if turned else image.size
            box = box_fn(width, height)  # known before decoding, so it can decode less
            shrink = min(box[2:]) / size  # the crop may shrink this much and keep `size` pixels
            if shrink >= 2:
                image.draft(image.mode, (int(image.width / shrink), int(image.height / shrink)))
            else:
                with contextlib.suppress(RuntimeError):  # a JPEG it does not read: PIL's
                    pixels = decode_image(str(path), ImageReadMode.RGB, apply_exif_orientation=True)
        pixels = _pil_pixels(image) if pixels is None else pixels
    if box is None:
        width, box = pixels.shape[2], box_fn(pixels.shape[2], pixels.shape[1])
    top, left, h, w = (round(v * pixels.shape[2] / width) for v in box)  # in decoded pixels
    return resized_crop(pixels, top, left, max(1, h), max(1, w), [size, size], antialias=True)


class _ImageFiles(Dataset):
    """(uint8 RGB image (3, size, size), label) per file, decoded when read: with `augment` a
    random resized crop and flip from torch's global RNG (which loader workers seed per
    sample), else a center crop of `ratio` of the shorter side."""

    def __init__(self, samples, size: int, augment: bool, ratio: float, classes=None):
        self.samples, self.size, self.augment, self.ratio = samples, size, augment, ratio
        self.classes = classes  # the name of each label, as torchvision's data sets have

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        from PIL import Image

        path, label = self.samples[index]
        try:
            image = _read_image(path, self.size, self._box)
        except Image.DecompressionBombError:  # not an OSError; PIL's limit stays: it guards memory
            why = "larger than PIL's decompression-bomb limit"
            fix = f"shrink it to under {Image.MAX_IMAGE_PIXELS:,} pixels"
            raise _DataError(f"cannot read image {path} ({why}); {fix}") from None
        except (OSError, ValueError, RuntimeError) as e:
            if _is_oom(e):  # (a huge image_size): said as running out of memory, not as the file
                raise
            raise _DataError(f"cannot read image {path} ({_line(e)}); fix or remove it") from None
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, label

    def _box(self, width: int, height: int) -> tuple:
        """(top, left, height, width) of the crop in the upright image, in pixels."""
        if not self.augment:
            side = min(width, height) * self.ratio
            return (height - side) / 2, (width - side) / 2, side, side
        from torchvision.transforms.v2 import RandomResizedCrop

        size_only = torch.empty(0, height, width)  # before decoding: get_params reads the size
        return RandomResizedCrop.get_params(size_only, _CROP_AREA, (3 / 4, 4 / 3))


def _subfolders(folder: Path) -> list:
    """The folders in `folder`, less the hidden ones (.ipynb_checkpoints)."""
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _image_files(folder: str, skip=()) -> list:
    """The image files below `folder` (by _IMAGE_SUFFIXES, any case) in torchvision's order, each
    once, without what is hidden (the ._name.jpg a Mac leaves, .ipynb_checkpoints/), a NAS's
    thumbnails (@eaDir/), the folders `skip`, or a link up the tree (cat/up -> ..: it would add
    the other classes)."""
    top = os.path.realpath(folder)
    walked, found = {top, *map(str, skip)}, []

    def refuse(error):  # a folder it cannot list: said, not its images silently left out
        raise error

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=refuse):
        kept = []
        for name in sorted(dirs):  # of two links to one folder, the first by name is kept
            real = os.path.realpath(os.path.join(root, name))
            up = (top + os.sep).startswith(real.rstrip(os.sep) + os.sep)  # (a link to / too)
            if not (name.startswith(".") or name == "@eaDir" or up or real in walked):
                walked.add(real)
                kept.append(name)
        dirs[:] = kept
        images = [f for f in files if f.lower().endswith(_IMAGE_SUFFIXES) and not f.startswith(".")]
        found.append((root, sorted(images)))
    return [os.path.join(root, name) for root, images in sorted(found) for name in images]


def _readable(path: str) -> bool:
    """Whether `path` is a non-empty file this user may read, in one system call for most."""
    try:
        status = os.stat(path)
    except OSError:  # a broken link
        return False
    regular = stat.S_ISREG(status.st_mode) and status.st_size > 0  # not a FIFO, a socket
    everyone = status.st_mode & 0o444 == 0o444  # (else this user's rights are not in the mode)
    return regular and (everyone or os.access(path, os.R_OK))


def _class_folders(folder: Path, data: str, besides=()) -> tuple:
    """(class names, [(path, label)]) of folder/<class>/**/<image>; a hidden folder is no class
    (torchvision's find_classes takes every folder), nor are the folders `besides` (a val/
    inside it, the run's own out), nor one without images besides them that holds them or an
    earlier run (a config.json or */config.json: runs/). A class holding the out stays one."""
    besides = [p.resolve() for p in besides]
    kept = [p for p in _subfolders(folder) if p.name != "@eaDir" and p.resolve() not in besides]
    files = {p.name: _image_files(str(p), besides) for p in kept}
    bare = [p for p in kept if not files[p.name]]
    runs = {p.name for p in bare if any(p.resolve() in b.parents for b in besides)}
    runs |= {p.name for p in bare if (p / "config.json").is_file() or any(p.glob("*/config.json"))}
    classes = sorted(files.keys() - runs)
    samples = [(f, label) for label, name in enumerate(classes) for f in files[name]]
    odd = [f for f, _ in samples if not _readable(f)]  # before training: a FIFO hangs a reader
    if odd:
        raise UsageError(
            f"{data}: {len(odd)} image file(s) cannot be read, such as {odd[0]}: empty, "
            "unreadable, a broken link or no file (a FIFO, a socket); remove or replace them"
        )
    empty = [name for name in classes if not files[name]]
    if empty:
        raise UsageError(
            f"{data}: the class folder(s) {', '.join(empty)} of {folder} hold no image file "
            f"({', '.join(_IMAGE_SUFFIXES)}); add images, or remove the folder(s)"
        )
    for name in classes:  # Test/<class>/*.jpg taken for a class "Test"
        inside = os.path.join(folder, name)
        if name.lower() in _SPLITS and all(os.path.dirname(f) != inside for f in files[name]):
            raise UsageError(
                f"{data}: the class folder {name}/ of {folder} holds only folders: a split, not "
                "a class? Use DIR/train/<class>/ and DIR/val/<class>/, or move it out of DIR"
            )
    return classes, samples


def _split(samples, config: Config, root: Path) -> tuple:
    """(train, val) samples, split per class by --val-fraction: of a class's n images,
    round(fraction x n) to validation but never all (a class of one image trains); if none at
    all, one of the largest class (even its only one: fit needs a validation image). Which ones
    is drawn by a hash of the seed and each file's path below `root`, so adding or removing a
    file moves no other (but at the quota's edge), wherever the folder is."""
    counts = torch.bincount(torch.tensor([label for _, label in samples]))
    quota = torch.minimum((counts * config.val_fraction).round().long(), counts - 1)
    if quota.sum() == 0:
        quota[counts.argmax()] = 1
    # The paths start as _class_folders joined them: "cat/1.png" below ".", "/data/cat/1.png".
    quota, held, start = quota.tolist(), set(), len(str(root / "x")) - 1

    def draw(i: int) -> bytes:
        name = f"{config.seed}/" + samples[i][0][start:].replace(os.sep, "/")
        # (a name that is not UTF-8, as from an old zip, hashes as its own bytes)
        return hashlib.blake2b(os.fsencode(name), digest_size=8).digest()

    for i in sorted(range(len(samples)), key=draw):  # the first quota[c] images of class c
        label = samples[i][1]
        if quota[label] > 0:
            quota[label] -= 1
            held.add(i)
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def _weights_enum(name: str, weights: str):
    """torchvision's weights enum member that `weights` names for `name`; None for a file."""
    if Path(weights).is_file():
        return None
    if Path(weights).is_dir():
        raise UsageError(
            f"weights={weights!r} is a directory; pass a weights file, e.g. OUT/best.pt"
        )
    import torchvision

    try:
        options = list(torchvision.models.get_model_weights(name))
    except ValueError:  # torchvision has none for this model (smallcnn, or one without)
        options = []
    key = weights.split(".")[-1]  # ResNet18_Weights.DEFAULT is DEFAULT
    names = ["DEFAULT", *(w.name for w in options)] if options else []  # aliases not listed
    if key not in names:
        raise UsageError(
            f"weights={weights!r}: no such file, nor torchvision weights for model={name!r} "
            f"(it has: {', '.join(names) or 'none'})"
        )
    return type(options[0])[key]


def _image_settings(config: Config, samples) -> tuple:
    """(image size, validation crop ratio, mean, std): the flags, else the weights' transforms,
    else 224 px (as torchvision models were designed) or 64 for smallcnn (~12x less compute) and
    per-channel statistics, rounded as config.json states them, of up to 256 `samples` (center
    crops at 64 px; the same for every --seed and split: a resumed run normalizes as it began)."""
    enum = None
    with contextlib.suppress(UsageError):  # a file gone since, or a bad name: said when loaded
        enum = _weights_enum(config.model, config.weights) if config.weights else None
    preset = enum.transforms() if enum else None
    default = preset.crop_size[0] if preset else 64 if config.model == "smallcnn" else 224
    size = config.image_size or default
    ratio = preset.crop_size[0] / preset.resize_size[0] if preset else _VAL_CROP
    mean = _per_channel("mean", config.mean) or (preset and tuple(preset.mean))
    std = _per_channel("std", config.std) or (preset and tuple(preset.std))
    if not (mean and std):
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0))
        probe = _ImageFiles([samples[i] for i in order[:256].tolist()], 64, False, 1.0)
        pixels = torch.stack([image for image, _ in probe]).transpose(0, 1).reshape(3, -1) / 255
        mean = mean or tuple(round(v, 3) for v in pixels.mean(1).tolist())
        std = std or tuple(round(max(v, 1e-3), 3) for v in pixels.std(1).tolist())
    return size, ratio, mean, std


def _image_folder(config: Config):
    """DIR/train + DIR/val (or valid, validation; any case), or DIR/train or DIR split per class
    by --val-fraction (_split). Without DIR/train, a DIR/valid is a class (valid/invalid)."""
    root = Path(config.data)
    data = f"data={str(root)!r}"
    if not root.is_dir():
        raise UsageError(
            f"{data}: no such directory; give an ImageFolder (DIR/<class>/*.png) or one of "
            + ", ".join(_BUILTIN_DATA)
        )
    run = [Path(config.out)] if config.out else []  # a run directory inside DIR is no class
    try:
        # A split's folder is train/, val/ or valid/; or another split name, in any case, when
        # it holds folders (Train/ of {Bus, Car, Train}/, holding images, is a class).
        splits = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name.lower() in _SPLITS]
        splits = [p for p in splits if p.name in ("train", "val", "valid") or _subfolders(p)]
        train_dir = next((p for p in splits if p.name.lower() in _TRAIN_NAMES), root)
        names = _VAL_NAMES if train_dir != root else ("val", "validation")  # valid/: a class
        val_dir = next((p for p in splits if p.name.lower() in names), None)
        classes, samples = _class_folders(train_dir, data, run + ([val_dir] if val_dir else []))
        val_classes, val_samples = (
            _class_folders(val_dir, data, run) if val_dir else (classes, None)
        )
    except PermissionError as e:  # a folder this user may not list
        raise UsageError(f"{data}: {e}; make it readable for this user, or remove it") from None
    except OSError as e:
        raise UsageError(f"{data}: {e}; expected DIR/<class>/<image files>") from None
    if len(classes) < 2:
        raise UsageError(
            f"{data}: found {len(classes)} class folder(s) in {train_dir}; classification "
            "needs at least 2"
        )
    if val_classes != classes:
        missing = sorted(set(classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(classes))
        val, train = f"{val_dir.name}/", f"{train_dir.name}/"
        raise UsageError(
            f"{data}: {val} classes differ from {train} (missing {missing}, extra {extra}); add "
            f"or remove class folders in {val} to match, or remove {val} to split {train} instead"
        )
    size, ratio, mean, std = _image_settings(config, samples)
    split = val_samples is None  # validation drawn from DIR by --val-fraction
    if split:
        samples, val_samples = _split(samples, config, train_dir)
    info = dict(channels=3, classes=len(classes), image_size=size, mean=mean, std=std, split=split)
    val_files = _ImageFiles(val_samples, size, False, ratio, classes)
    return _ImageFiles(samples, size, config.augment, ratio, classes), val_files, info


def _load_torchvision(config: Config):
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION_DATA[config.data])
    try:
        parts = [cls(config.data_root, train=t, download=config.download) for t in (True, False)]
    except (RuntimeError, OSError) as e:  # not there; or not downloaded (URLError: an OSError)
        off = ("download is off", "add download=True to fetch it")
        why, fix = ("not downloaded", "check the network") if config.download else off
        raise UsageError(
            f"data={config.data!r}: not found under {config.data_root}/ and {why} "
            f"({_line(e, -1)}); {fix}, or copy the files there"
        ) from None
    splits = []
    for part in parts:
        images = torch.as_tensor(np.asarray(part.data))
        images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
        splits.append((images.float().div_(255), torch.as_tensor(np.asarray(part.targets))))
    mean = splits[0][0].mean(dim=(0, 2, 3), keepdim=True)  # (std_mean's differs in the last bit)
    std = splits[0][0].std(dim=(0, 2, 3), keepdim=True)
    return [((x - mean) / std, y) for x, y in splits], list(parts[0].classes)


def load_data(config: Config, rgb: bool = False):
    """The CLI's data: (train, val, info) for --data; info = {"channels", "classes",
    "image_size", "mean", "std"}. Built-in sets are normalized float tensors (mean and std
    None); an image folder's uint8 RGB images need a model from build_model(..., mean, std)."""
    if config.data not in _BUILTIN_DATA:
        return _image_folder(config)
    if config.data == "synthetic":
        splits, classes = synthetic_images(config.seed, size=config.image_size or 32), None
    else:
        splits, classes = _load_torchvision(config)
    size = config.image_size
    if size and splits[0][0].shape[-1] != size:  # (synthetic images are made at that size)
        splits = [(F.interpolate(x, size, mode="bilinear", antialias=True), y) for x, y in splits]
    if rgb and splits[0][0].shape[1] == 1:  # torchvision models expect 3 channels
        splits = [(x.expand(-1, 3, -1, -1).contiguous(), y) for x, y in splits]
    (x_train, y_train), (x_val, y_val) = splits
    pad = max(1, x_train.shape[-1] // 8) if config.augment else 0
    info = {"channels": x_train.shape[1], "classes": int(y_train.max()) + 1}
    info.update(image_size=x_train.shape[-1], mean=None, std=None)  # normalized already
    train = _ImageTensors(x_train, y_train, pad, classes)
    return train, _ImageTensors(x_val, y_val, 0, classes), info


class _Normalize(nn.Module):
    """uint8 images (N, C, H, W) in, normalized floats out, on the model's own device: loaders
    move a quarter of the bytes and convert nothing, and mean/std (buffers, in 0-255 units)
    travel in every checkpoint, so --eval-only and resume normalize as training did."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


def small_cnn(channels: int, classes: int) -> nn.Sequential:
    """The default model: three conv-BN-ReLU blocks, global pooling and a linear head."""
    layers = []
    for c_in, c_out in ((channels, 32), (32, 64), (64, 128)):
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        layers += [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    layers[-1] = nn.AdaptiveAvgPool2d(1)  # the last block pools globally
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128, classes))


_AUXILIARY_HEADS = ("googlenet", "inception_v3")


def _bare_model(name: str, channels: int, classes: int) -> nn.Module:
    if name == "smallcnn":
        return small_cnn(channels, classes)
    import torchvision

    # GoogLeNet and Inception v3 return auxiliary outputs in training unless told otherwise (as
    # their torchvision weights are); init_weights=True is their default, said to silence a warning.
    options = dict(aux_logits=False, init_weights=True) if name in _AUXILIARY_HEADS else {}
    return torchvision.models.get_model(name, weights=None, num_classes=classes, **options)


def _check_fetchable(enum, weights: str) -> None:
    """Fail within seconds, saying what to fetch and where to put it, when the weights are not
    in torch's hub cache and the network is unreachable (not after a long download timeout)."""
    import socket
    import threading
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlparse(enum.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url.path).name
    if cached.is_file() or urllib.request.getproxies().get("https"):  # a proxy may reach it
        return
    reached = []

    def probe():  # in a thread: a hung DNS lookup has no timeout of its own
        with contextlib.suppress(OSError), socket.create_connection((url.hostname, 443), 3):
            reached.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(4)
    if not reached:
        raise UsageError(
            f"weights={weights!r}: {cached} is missing and {url.hostname} cannot be reached; "
            f"download {enum.url} and put it there (or set TORCH_HOME to a cache that has it)"
        )


def _pretrained(name: str, weights: str) -> dict:
    """The state_dict of --weights: a file's, or torchvision's (from its cache or downloaded)."""
    enum = _weights_enum(name, weights)
    if enum is not None:
        import torchvision

        _check_fetchable(enum, weights)
        return torchvision.models.get_model(name, weights=enum).state_dict()
    if zipfile.is_zipfile(weights):  # (torch.load reads older formats too)
        _check_archive(Path(weights))  # a damaged one is refused, not half-loaded
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state.get("ema") or state["model"]  # a trainloop checkpoint's weights to use
        if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
            raise TypeError(f"it holds a {type(state).__name__}, not tensors by name")
    except Exception as e:  # torch.load raises many kinds
        # A refused unpickling opens with torch's advice to load unsafely; the cause comes after.
        cause = re.search(r"WeightsUnpickler error:\s*(.*)", str(e))
        why = cause[1].split(". ")[0] if cause else _line(e)
        why = "the file is empty" if os.path.getsize(weights) == 0 else why
        raise UsageError(
            f"weights={weights!r}: not a readable state_dict ({why}); pass a file "
            "saved with torch.save(model.state_dict()) or a trainloop checkpoint"
        ) from None
    if "0.mean" in state:  # build_model's normalization in front: keep the model inside
        state = {k[2:]: v for k, v in state.items() if k.startswith("1.")}
    return state


def build_model(
    name: str, *, channels: int, classes: int, weights: str = "", mean=None, std=None
) -> nn.Module:
    """smallcnn, or a torchvision classification model, with `classes` outputs. weights: a
    torchvision weights name (DEFAULT, IMAGENET1K_V1, ...; downloaded once into the torch hub
    cache) or a state_dict file (plain, or a trainloop checkpoint): all but the classifier head
    is loaded. With mean and std (per channel, of 0-1 pixels) the model takes uint8 images and
    normalizes them itself: nn.Sequential(normalize, model)."""
    model = _bare_model(name, channels, classes)
    if weights:
        with torch.device("meta"):  # no memory, no init: only tells the head's tensors apart
            other = _bare_model(name, channels, classes + 1).state_dict()
        head = {k for k, v in model.state_dict().items() if other[k].shape != v.shape}
        state = {k: v for k, v in _pretrained(name, weights).items() if k not in head}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a shape differs
            missing, unexpected = [_line(e)], []
        missing = sorted(set(missing) - head)
        if missing or unexpected:
            raise UsageError(
                f"weights={weights!r} does not fit model={name!r} (missing {missing[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}); pass weights saved from this model"
            )
    return model if mean is None else nn.Sequential(_Normalize(mean, std), model)


def _check_model_name(name: str) -> None:
    if name == "smallcnn":
        return
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)  # classification only
    if name not in names:
        close = difflib.get_close_matches(name, names + ["smallcnn"], n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models"
        raise UsageError(
            f"model={name!r} is not smallcnn or a torchvision classification model; {hint}"
        )


def _unset_from(config: Config, saved: dict, names) -> Config:
    """`config` with those of the settings `names` that it leaves at their defaults from `saved`."""
    unset = [k for k in names if k in saved and getattr(config, k) == getattr(Config(), k)]
    return dataclasses.replace(config, **{k: saved[k] for k in unset})


def _eval_checkpoint(config: Config) -> tuple:
    """(config, path, checkpoint) for --eval-only; settings left at their defaults take the
    data, split, model, image size and normalization it was trained with (another split would
    score training images)."""
    out = Path(config.out)
    path = Path(config.resume) if config.resume not in ("auto", "none") else out / "best.pt"
    if config.resume == "auto" and not path.is_file():  # the training checkpoint, either kind
        path = out / "last.pt" if (out / "last.pt").is_file() else out / "last"
    if not path.exists():
        raise UsageError(f"eval_only=True: no checkpoint at {path}; pass resume=PATH")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; evaluate another checkpoint (resume=PATH)") from None
    names = "data data_root val_fraction seed model image_size mean std weights".split()
    return _unset_from(config, ckpt.get("config", {}), names), path, ckpt


def _resumed_settings(config: Config) -> tuple:
    """(config, {"path", "trainloop"} of the checkpoint to be resumed, or None). Its model
    normalizes as it was trained to, so the run's mean and std (in config.json) are its own."""
    for path in _candidates(config, Path(config.out)):
        file = path / "trainloop.pt" if path.is_dir() else path
        with contextlib.suppress(Exception):  # a damaged one: fit falls back past it, and says so
            _check_archive(file, checksums=False)  # before torch.load inflates anything
            header = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(header, dict) and "config" in header:  # (else fit says what it is)
                saved, version = header["config"], header.get("trainloop")
                break
    else:
        return config, None
    # A user's loop may save any config; one edited by hand, any mean (fit refuses neither).
    saved = saved if isinstance(saved, dict) else {}
    saved = {k: v for k, v in saved.items() if k not in ("mean", "std") or type(v) is str}
    resumed = _unset_from(config, saved, ("mean", "std"))
    for name in ("mean", "std"):
        ours, theirs = (_per_channel(name, c) for c in (getattr(resumed, name), saved.get(name)))
        if theirs and ours != theirs:
            raise UsageError(
                f"{name}={getattr(config, name)!r}: {path} normalizes with {saved[name]!r}; "
                "keep it, or start over with resume='none'"
            )
    return resumed, {"path": path, "trainloop": version}


def _data_settings(config: Config, info: dict, runtime: Runtime, sizes: tuple) -> Config:
    """The config with the image size and normalization in use (config.json and checkpoints
    record them), after a start-up line that says what the run is about to do."""
    norm = {k: ",".join(f"{v:g}" for v in info[k]) for k in ("mean", "std") if info[k]}
    processes = f" x {runtime.world_size} processes" if runtime.world_size > 1 else ""
    processes = f" {_PRECISIONS[runtime.amp_dtype]}{processes}" if runtime.amp_dtype else processes
    _console(None, config.quiet, runtime).line(
        f"trainloop: {runtime.device}{processes}; data {config.data}: {info['classes']} "
        f"classes, {sizes[0]} train / {sizes[1]} val images, {info['image_size']} px"
        + "".join(f", {k} {v}" for k, v in norm.items())
        + f"; model {config.model}"
        + (f" from {config.weights}" if config.weights else "")
    )
    return dataclasses.replace(config, image_size=info["image_size"], **norm)


@contextlib.contextmanager
def _downloads_once(runtime: Runtime):
    """The first process of each machine runs the block (downloading data or weights into the
    machine's cache) before the others, which then find it there."""
    first = runtime.local_rank == 0
    if not first and _all_reduce([0], runtime, dist.ReduceOp.MAX)[0]:
        raise UsageError("the first process could not load the data")  # which says why
    try:
        yield
    except BaseException as e:
        if first:
            _all_reduce([1], runtime, dist.ReduceOp.MAX)
        if first and isinstance(e, UsageError) and not isinstance(e, _DataError):
            raise _DataError(str(e)) from None  # said by this process, rank 0 or not
        raise
    if first and _all_reduce([0], runtime, dist.ReduceOp.MAX)[0]:
        raise UsageError("another machine could not load the data; its first process says why")


def _warn_old_split(ckpt: dict, path: Path, config: Config, runtime: Runtime) -> None:
    """Warn that a checkpoint of trainloop 0.3.2 or before drew another validation split."""
    version = tuple(int(v) for v in re.findall(r"\d+", ckpt.get("trainloop") or "0")[:3])
    if version < (0, 3, 3):
        then = "" if config.eval_only else " for the rest of this run (--resume none starts over)"
        _console(None, False, runtime).write(
            f"warning: {path} comes from trainloop {ckpt.get('trainloop') or 'before 0.2'}, "
            "which drew a folder's validation images otherwise: some of them trained, so val_ "
            f"metrics read high{then}"
        )


def _train_or_evaluate(config: Config, runtime: Runtime) -> None:
    if config.eval_only:
        config, path, ckpt = _eval_checkpoint(config)
    else:
        config, ckpt = _resumed_settings(config)
    resuming = ckpt is not None
    with _downloads_once(runtime):
        train, val, info = load_data(config, rgb=config.model != "smallcnn")
        config = _data_settings(config, info, runtime, (len(train), len(val)))
        if info.get("split") and resuming:
            _warn_old_split(ckpt, path if config.eval_only else ckpt["path"], config, runtime)
        torch.manual_seed(config.seed)  # the same initial weights in every process
        weights = "" if resuming else config.weights  # the checkpoint has them
        shape = {k: info[k] for k in ("channels", "classes", "mean", "std")}
        model = build_model(config.model, weights=weights, **shape)
    if not config.eval_only:
        fit(model, train, val, config=config, runtime=runtime)
        return
    _check_classes(path, ckpt.get("classes"), _classes(train))
    try:
        _load_weights(model, ckpt, path)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(
            f"{path} does not match model={config.model!r} ({_mismatch(e)}); leave model unset to "
            "take the checkpoint's"
        ) from None
    console = _console(None, False, runtime)
    val = _as_loader(val, config, runtime, False, console)
    try:
        scores = evaluate(model.to(runtime.device), val, runtime=runtime)
    except Exception as e:  # the faults of training's validation, as one line
        oom, died = _is_oom(e), "DataLoader worker (pid" in str(e)
        if not (oom or died):
            raise
        why = f"out of memory on {runtime.device}" if oom else _line(e).rstrip(".")
        fewer = "--batch-size" if oom else "--workers or --batch-size"
        raise (OutOfMemoryError if oom else WorkerDiedError)(
            f"{why} evaluating {path} at batch_size={config.batch_size}; use a smaller "
            f"{fewer}, then run again"
        ) from e
    console.write(f"eval {path}: " + " ".join(f"val_{k}={v:.4f}" for k, v in scores.items()))


def _launch_local(config: Config, nproc: int) -> int:
    """Start `nproc` processes on this machine with torch.distributed's elastic launcher (the
    machinery behind torchrun). A failing process stops the others; returns its exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # A signal to this process is passed on to the workers, which checkpoint at their next
    # --log-every point; they get up to shutdown_timeout seconds before a SIGKILL.
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"trainloop-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        shutdown_timeout=300,
        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    )
    try:
        elastic_launch(launch, _worker)(dataclasses.asdict(config))
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        code = max(1, e.get_first_failure()[1].exitcode)  # the first to fail is the cause
        why = f"a training process failed (exit status {code}); the others were stopped"
        print(f"trainloop: error: {why}", file=sys.stderr)
        return code
    return 0


def _run_command(config: Config) -> int:
    """The command line's job: check what can be checked before any process starts, then
    train or evaluate here, or start one process per listed GPU, which each run this again."""
    config = check_config(config)
    if not config.out:  # runs/<data>-<model>; a built-in set's name is its own
        data = Path(config.data).name or "data"
        config = dataclasses.replace(config, out=f"runs/{data}-{config.model}")
    _check_model_name(config.model)
    if config.data in _BUILTIN_DATA and (config.mean or config.std):
        raise UsageError(  # they would be recorded as if they had been used
            f"data={config.data!r} comes normalized; mean and std are for an image folder (DIR)"
        )
    _candidates(config, None)  # a named checkpoint that is missing: before any process starts
    ids = parse_gpus(config.gpus)
    if ids and len(ids) > 1 and "LOCAL_RANK" not in os.environ:
        _check_gpus_exist(ids)  # setup_device checks them in the other cases
        return _launch_local(config, len(ids))
    runtime = setup_device(
        config.gpus, precision=config.precision, deterministic=config.deterministic
    )
    try:
        _train_or_evaluate(config, runtime)
    finally:
        teardown(runtime)  # after the model is gone (see teardown)
    return 0


def _as_flags(message: str) -> str:
    """A message about settings as the command line says it: resume='x' -> --resume x,
    sync_bn=True -> --sync-bn."""
    names = "|".join(f.name for f in dataclasses.fields(Config))

    def flag(match):
        name, value = match[1].replace("_", "-"), match[2].strip("'")
        return {"True": f"--{name}", "False": f"--no-{name}"}.get(value, f"--{name} {value}")

    return re.sub(rf"\b({names})=('[^']*'|\S+?)(?=[\s,;:)]|\.?$|\.\s)", flag, message)


def _exit_code_of(job: Callable[[], int]) -> int:
    """Run `job`; turn the errors a user can fix into one line on stderr and an exit status."""
    codes = {**_FAULTS, CheckpointError: EXIT_CHECKPOINT, NonFiniteLossError: EXIT_NONFINITE}
    try:
        return job()
    except KeyboardInterrupt:  # a second Ctrl-C: stop now
        return 130
    except (*codes, UsageError) as e:
        code = next((c for kind, c in codes.items() if isinstance(e, kind)), EXIT_USAGE)
        rank = int(os.environ.get("RANK", "0"))
        # Other ranks print only what one process may meet alone (data, checkpoint, faults);
        # the rest would repeat rank 0's line.
        if rank == 0 or isinstance(e, (_DataError, CheckpointError, *_FAULTS)):
            named = code in _FAULTS.values() and int(os.environ.get("WORLD_SIZE", "1")) > 1
            where = f"(rank {rank}) " if rank or named else ""
            message = re.sub(r"^[\w.]*Error: ", "", _line(e, -1))  # a worker's: "XError: ..."
            print(f"trainloop: error: {where}{_as_flags(message)}", file=sys.stderr)
        return code


def _worker(options: dict) -> None:
    """Entry point of each process started by _launch_local."""
    if code := _exit_code_of(lambda: _run_command(Config(**options))):
        sys.exit(code)


# ---- CLI: command line -----------------------------------------------------------------------


def _build_cli():
    """The Typer app: one command, one option per Config field, defaults from Config."""
    import inspect

    import typer

    def show_version(value: bool):
        if value:
            typer.echo(f"trainloop {__version__} (torch {torch.__version__})")
            raise typer.Exit()

    def command(**options):
        """Train an image classifier. Defaults train a small CNN on a synthetic data set (no
        download) to >95% accuracy in about a minute on a CPU; rerun the same command to resume
        it."""
        options.pop("version", None)
        raise typer.Exit(_exit_code_of(lambda: _run_command(Config(**options))))

    def option(f):  # a Config field as a Typer option
        return typer.Option(f.default, show_default=f.default != "", **f.metadata)

    version = typer.Option(
        False, "--version", callback=show_version, is_eager=True, help="Print the version and exit."
    )
    kinds = {f.name: (f.type, option(f)) for f in dataclasses.fields(Config)}
    kinds["version"] = (bool, version)
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(k, keyword, annotation=t, default=d) for k, (t, d) in kinds.items()]
    command.__signature__ = inspect.Signature(params)
    app = typer.Typer(
        add_completion=False, context_settings={"help_option_names": ["-h", "--help"]}
    )
    app.command()(command)
    return app


def main(argv: Optional[list] = None) -> int:
    """The `trainloop` command. Returns the exit status: 0, an EXIT_* code, or 128+N (signal N)."""
    import typer

    command = typer.main.get_command(_build_cli())
    try:
        return command.main(args=argv, prog_name="trainloop", standalone_mode=False) or 0
    except Exception as e:
        if not hasattr(e, "format_message"):  # not a command-line parsing error: a real bug
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # (every process parses the same flags)
            print(f"trainloop: error: {e.format_message()}", file=sys.stderr)  # one line
        return getattr(e, "exit_code", EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
