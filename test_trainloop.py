"""Tests for trainloop: CPU only, tiny synthetic data, every file under tmp_path.

Distributed tests run real processes with torchrun and the gloo backend.
"""

import dataclasses
import enum
import errno
import functools
import io
import json
import math
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import trainloop as tl

REPO = Path(__file__).resolve().parent
CPU = tl.Runtime(torch.device("cpu"))


# ---- helpers ---------------------------------------------------------------------------------


def tiny_images(n=256, seed=0, size=8):
    (x, y), (xv, yv) = tl.synthetic_images(seed, train_size=n, val_size=n // 4, size=size)
    return TensorDataset(x, y), TensorDataset(xv, yv)


def mlp(inputs=8, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, 16), nn.ReLU(), nn.Linear(16, classes))


def blobs(n=96, inputs=8, classes=3, seed=0):
    """Linearly separable-ish clusters: a task an MLP learns in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, inputs, generator=g) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, inputs, generator=g), y)


class Rows(Dataset):
    """The same tensors read one sample at a time (forces the general DataLoader path)."""

    def __init__(self, *tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors[0])

    def __getitem__(self, i):
        return tuple(t[i] for t in self.tensors)


def quiet(**overrides):
    return dict(quiet=True, log=lambda line: None, **overrides)


def fit_mlp(n=64, val=None, **settings):
    """fit() a fresh mlp() on blobs(n), quietly and 16 samples a batch unless told otherwise."""
    return tl.fit(mlp(), blobs(n), val, **{"batch_size": 16, **quiet(), **settings})


def state_tensors(ckpt: dict) -> dict:
    """Every tensor of model, optimizer, scheduler and EMA in a checkpoint, by path."""
    found = {}

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            found[path] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}/{i}")

    for key in ("model", "optimizer", "scheduler", "ema"):
        walk(ckpt.get(key), key)
    return found


def assert_same_state(a: Path, b: Path):
    ta = state_tensors(torch.load(a, weights_only=True))
    tb = state_tensors(torch.load(b, weights_only=True))
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ: {different[:5]}"
    sa = torch.load(a, weights_only=True)["scheduler"]
    sb = torch.load(b, weights_only=True)["scheduler"]
    assert sa == sb


def run_cli(*args, cwd, env=None, timeout=240):
    return subprocess.run(
        [sys.executable, str(REPO / "trainloop.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def make_image_folder(root: Path, classes=("cat", "dog"), per_class=12, size=8, mode="RGB"):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = torch.full((size, size, 3), 60.0 + 120 * c)
            pixels = (base + 30 * torch.randn(size, size, 3, generator=g)).clamp(0, 255)
            image = Image.fromarray(pixels.to(torch.uint8).numpy(), "RGB").convert(mode)
            image.save(root / name / f"{i}.png")
    return root


# ---- configuration and CLI parsing -----------------------------------------------------------


def test_parse_gpus_accepts_ids_cpu_and_empty():
    assert tl.parse_gpus("") is None
    assert tl.parse_gpus("cpu") == ()
    assert tl.parse_gpus("0") == (0,)
    assert tl.parse_gpus(" 0, 1 ") == (0, 1)


@pytest.mark.parametrize("text", ["x", "0,,1", "-1", "0,0", "gpu0"])
def test_parse_gpus_rejects_bad_lists(text):
    with pytest.raises(tl.UsageError, match="gpus="):
        tl.parse_gpus(text)


def test_parse_duration_units():
    assert tl.parse_duration("2h30m") == 9000
    assert tl.parse_duration("45m") == 2700
    assert tl.parse_duration("90s") == 90
    assert tl.parse_duration("1.5h") == 5400
    assert tl.parse_duration("") is None
    assert tl.parse_duration("0") is None and tl.parse_duration("0m") is None  # no limit
    with pytest.raises(tl.UsageError, match="time_limit='soon'"):
        tl.parse_duration("soon")


@pytest.mark.parametrize("text,explicit", [("1h30", "1h30m"), ("2m5", "2m5s"), ("1h2m5", "1h2m5s")])
def test_parse_duration_refuses_a_number_without_a_unit_after_hours_or_minutes(text, explicit):
    with pytest.raises(tl.UsageError) as failed:
        tl.parse_duration(text)  # '1h30' would be 1 h 30 s, where most mean 1 h 30 min
    assert str(failed.value) == (
        f"time_limit={text!r} ends in a number without a unit; write {explicit!r}"
    )
    assert tl.parse_duration("2h") == 7200 and tl.parse_duration("90") == 90


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("epochs", 0, "epochs=0 must be at least 1"),
        ("batch_size", 0, "batch_size=0 must be at least 1"),
        ("lr", -0.1, "lr=-0.1 must be a positive number"),
        ("lr", float("nan"), "lr=nan must be a positive number"),
        ("optimizer", "adam", "optimizer='adam' is not one of sgd, adamw"),
        ("precision", "fp8", "precision='fp8'"),
        ("ema", 1.0, "ema=1.0 must be in"),
        ("mean", "2", "mean='2' is not 1 or 3 comma-separated numbers in"),
        ("warmup", float("inf"), r"warmup=inf must be zero or more \(and finite\)"),
        ("weight_decay", float("inf"), "weight_decay=inf must be zero or more"),
        ("momentum", 5.0, r"momentum=5.0 must be in \[0, 1\)"),
        ("workers", -5, "workers=-5 must be -1"),
        ("time_limit", 5, "time_limit=5 must be of type str$"),
        ("std", "0.2,0.2", "std='0.2,0.2' is not 1 or 3"),
        ("std", "0.2,0.2,0", r"std='0.2,0.2,0' is not 1 or 3 comma-separated numbers in \(0, 1\]"),
        ("monitor_mode", "max", "monitor_mode='max' needs a monitor too, e.g. monitor='val_loss'"),
        ("batch_size", 10**30, rf"batch_size={10**30} must be at least 1 \(below 2\*\*63\)"),
        ("seed", 2**64, r"seed=18446744073709551616 must be zero or more \(below 2\*\*63\)"),
        ("workers", 10**6, "workers=1000000 must be -1 .one per spare core. or 0 to 256"),
        ("image_size", 100000, "image_size=100000 must be 0 .keep. or 4 to 8192 pixels"),
        ("gpus", "\u00b2", "gpus='\u00b2' is not a list of GPU ids"),
        ("data", " ", "data=' ' is empty"),
        ("resume", "", "resume='' is empty"),
        ("out", "runs/" + "x" * 256, "out='runs/xxx.* has a name over 255 bytes; shorten it"),
        ("weights", "x" * 256 + ".pt", "weights='xxx.* has a name over 255 bytes; shorten it"),
    ],
)
def test_check_config_names_field_value_and_fix(field, value, message):
    with pytest.raises(tl.UsageError, match=message):
        tl.check_config(dataclasses.replace(tl.Config(), **{field: value}))


def test_check_config_takes_a_mean_of_zero_for_a_channel_dark_throughout():
    config = tl.check_config(tl.Config(mean="0.45,0.4,0", std="0.2,0.2,0.001"))
    assert config.mean == "0.45,0.4,0"


def test_catch_signals_after_a_stop_wraps_torchs_handler_not_the_stopped_runs():
    stopped, before = tl._Stop(), signal.getsignal(signal.SIGINT)  # (ignored when run with &)
    with tl._catch_signals(stopped):
        stopped.signal = signal.SIGINT  # a notebook's interrupt: fit returns, Python goes on
    left = signal.getsignal(signal.SIGCHLD)  # kept: the stopped loader's workers die on
    assert signal.getsignal(signal.SIGINT) is before
    with tl._catch_signals(tl._Stop()):
        assert signal.getsignal(signal.SIGCHLD).wrapped is left.wrapped  # (it wrapped `left`)
    assert signal.getsignal(signal.SIGCHLD) is left.wrapped  # torch's own again
    finished = []
    thread = threading.Thread(target=lambda: finished.append(fit_mlp(16) and None))
    thread.start()  # not the main thread: signals are left to the caller, torch's SIGCHLD too
    thread.join()
    assert finished == [None] and signal.getsignal(signal.SIGCHLD) is left.wrapped


def test_fault_finds_the_workers_of_a_loader_resumed_mid_epoch():
    class BrokenRead:  # as a read that a dead worker broke, with no SIGCHLD noted
        num_workers = 2

        def __iter__(self):
            return self

        def __next__(self):
            raise EOFError

    skipped = tl._SkipBatches(BrokenRead(), 0, None)  # what set_epoch gives mid-epoch
    with pytest.raises(EOFError) as read:
        next(tl._groups(skipped, 1))
    job = types.SimpleNamespace(config=tl.Config(), runtime=CPU, out=None, last=None)
    state = types.SimpleNamespace(step=3, epoch=0)
    noted = tl._Stop(deaths=["a death"])
    fault = tl._fault(read.value, state, job, loader=skipped, stop=noted)
    assert isinstance(fault, tl.WorkerDiedError), fault
    fault = tl._fault(read.value, state, job, loader=skipped, stop=tl._Stop())
    assert isinstance(fault, tl.WorkerDiedError), fault  # known broken: 2 workers


def test_check_config_takes_numpy_numbers_as_plain_ones():
    import numpy as np

    config = tl.check_config(tl.Config(lr=np.float32(0.5), epochs=np.int64(2), warmup=3))
    assert (config.lr, config.epochs, config.warmup) == (0.5, 2, 3.0)
    assert (type(config.lr), type(config.epochs), type(config.warmup)) == (float, int, float)


def test_amp_dtype_is_decided_from_precision_and_device():
    assert tl._amp_dtype("auto", "cuda", True) is torch.bfloat16
    assert tl._amp_dtype("auto", "cuda", False) is None
    assert tl._amp_dtype("auto", "cpu", True) is None
    assert tl._amp_dtype("fp16", "cpu", True) is torch.float16
    with pytest.raises(tl.UsageError, match="precision='bf16'"):
        tl._amp_dtype("bf16", "cuda", False)


def test_import_has_no_side_effects(tmp_path):
    code = textwrap.dedent("""
        import os, random, sys
        import numpy, torch
        before = dict(os.environ)
        rngs = (random.getstate(), numpy.random.get_state()[1].tolist(), torch.get_rng_state())
        import trainloop
        assert dict(os.environ) == before, "import changed the environment"
        after = (random.getstate(), numpy.random.get_state()[1].tolist(), torch.get_rng_state())
        assert after[:2] == rngs[:2] and torch.equal(after[2], rngs[2]), "import seeded"
        assert "typer" not in sys.modules and "torchvision" not in sys.modules
        assert "rich" not in sys.modules
        assert not torch.cuda.is_initialized()
        print("ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.stdout.strip() == "ok", result.stderr
    assert list(tmp_path.iterdir()) == []


def test_setup_device_cpu_single_process():
    rt = tl.setup_device("cpu")
    assert rt.device == torch.device("cpu")
    assert (rt.rank, rt.world_size, rt.amp_dtype) == (0, 1, None)


def test_setup_device_missing_gpu_is_a_usage_error():
    with pytest.raises(tl.UsageError, match="names GPU 3"):
        tl.setup_device("3")


# ---- data ------------------------------------------------------------------------------------


def test_make_loader_fast_path_matches_dataloader_path():
    x, y = torch.randn(50, 4), torch.arange(50)
    fast = tl.make_loader(TensorDataset(x, y), batch_size=8, seed=3)
    slow = tl.make_loader(Rows(x, y), batch_size=8, seed=3, workers=0)
    assert isinstance(fast, tl._TensorBatches) and isinstance(slow, DataLoader)
    for epoch in (0, 1):
        tl.set_epoch(fast, epoch)
        tl.set_epoch(slow, epoch)
        pairs = list(zip(fast, slow, strict=True))
        for (xf, yf), (xs, ys) in pairs:
            assert torch.equal(xf, xs) and torch.equal(yf, ys)
    assert len(fast) == len(slow) == 7


@pytest.mark.parametrize("seen", [0, 9])
def test_fast_path_gathers_in_chunks_without_changing_a_batch(monkeypatch, seen):
    data = tl._ImageTensors(torch.randn(50, 1, 4, 4), torch.arange(50), augment_pad=1)

    def batches(gather_bytes):  # one batch is 8 x (64 + 8) bytes
        monkeypatch.setattr(tl, "_GATHER_BYTES", gather_bytes)
        loader = tl.make_loader(data, batch_size=8, seed=3)
        tl.set_epoch(loader, 1, seen=seen, batches=0)
        return list(loader)

    one, three, whole = batches(1), batches(3 * 8 * 72), batches(2**30)
    assert len(one) == len(three) == len(whole) == math.ceil((50 - seen) / 8)
    for a, b, c in zip(one, three, whole):
        assert all(torch.equal(u, v) and torch.equal(u, w) for u, v, w in zip(a, b, c))
    assert torch.cat([y for _, y in one]).unique().numel() == 50 - seen


def test_make_loader_reshuffles_per_epoch_and_covers_every_sample():
    loader = tl.make_loader(TensorDataset(torch.arange(40)), batch_size=16, seed=0)
    orders = []
    for epoch in range(2):
        tl.set_epoch(loader, epoch)
        orders.append(torch.cat([b[0] for b in loader]).tolist())
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(40))
    assert orders[0] != orders[1]


def test_make_loader_warns_when_an_epoch_is_read_again_without_set_epoch():
    data = TensorDataset(torch.arange(40.0)[:, None], torch.arange(40) % 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loader workers prefetch the whole epoch: a peek is
        loader = tl.make_loader(Rows(*data.tensors), batch_size=16, workers=2)  # no read
        next(iter(loader))
        list(loader)
    for dataset in (data, Rows(*data.tensors)):  # the fast path, and a DataLoader
        loader = tl.make_loader(dataset, batch_size=16, workers=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a peek, an evaluation: no read of the epoch
            next(iter(loader))
            first = [b[0] for b in loader]
            tl.evaluate(nn.Linear(1, 2), loader, runtime=CPU)
        with pytest.warns(UserWarning, match="batches read again.*loader = set_epoch"):
            assert torch.equal(torch.cat([b[0] for b in loader]), torch.cat(first))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # with set_epoch, even to the same epoch: none
            for epoch in (0, 0, 1):
                list(tl.set_epoch(loader, epoch))
            list(tl.make_loader(data, batch_size=16, train=False))


def test_make_loader_reads_a_list_of_samples_in_process_unless_told(monkeypatch):
    monkeypatch.setattr(tl, "default_workers", lambda world_size=1: 2)  # as on 3 or more cores
    samples = list(blobs(16))
    assert tl.make_loader(samples, batch_size=4).num_workers == 0  # (default_workers() before)
    assert tl.make_loader(samples, batch_size=4, workers=1).num_workers == 1
    assert tl.make_loader(Rows(*blobs(16).tensors), batch_size=4).num_workers == 2


@pytest.mark.parametrize("setting", [{"batch_size": 16.0}, {"seed": None}, {"workers": "2"}])
def test_make_loader_refuses_settings_that_are_no_int_in_one_line(setting):
    settings = {"batch_size": 16, **setting}
    name, value = next(iter(setting.items()))
    with pytest.raises(tl.UsageError, match=f"^{name}={value!r} must be an int, e.g. "):
        tl.make_loader(TensorDataset(torch.arange(40)), **settings)


def test_make_loader_seeds_a_workers_samples_without_torch_manual_seed(monkeypatch):
    class Noise(Dataset):  # random augmentation, as a worker process runs it
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(2)

    seeded = tl.make_loader(Noise(), batch_size=2, workers=1).dataset  # what each worker reads
    # torch.manual_seed formats a stack for every device kind: 0.2-0.4 ms a sample
    monkeypatch.setattr(torch, "manual_seed", lambda seed: pytest.fail("seeded every device"))
    first = seeded[(1, 12345)]
    assert torch.equal(first, torch.rand(2, generator=torch.Generator().manual_seed(12345)))
    assert torch.equal(seeded[(3, 12345)], first)  # the sample's seed alone decides


def test_make_loader_resumes_at_any_sample_without_reading_earlier_ones():
    reads = []

    class Logged(Rows):
        def __getitem__(self, i):
            reads.append(i)
            return super().__getitem__(i)

    data = Logged(torch.arange(30))
    loader = tl.make_loader(data, batch_size=4, seed=1, workers=0)
    tl.set_epoch(loader, 2)
    full = torch.cat([b[0] for b in loader]).tolist()
    reads.clear()
    tl.set_epoch(loader, 2, seen=12, batches=3)
    rest = torch.cat([b[0] for b in loader]).tolist()
    assert rest == full[12:]
    assert sorted(reads) == sorted(full[12:])
    tl.set_epoch(loader, 2, batches=3)  # what a user's loop counts: the same place
    assert torch.cat([b[0] for b in loader]).tolist() == full[12:]


def test_epoch_batches_shard_the_rest_across_any_number_of_processes():
    def shard(world, seen):
        parts = []
        for rank in range(world):
            s = tl._EpochBatches(20, 3, shuffle=True, seed=5, rank=rank, world=world)
            s.epoch, s.seen = 1, seen
            parts += s.indices().tolist()
        return parts

    single = tl._EpochBatches(20, 3, shuffle=True, seed=5)
    single.epoch = 1
    order = single.indices().tolist()
    assert sorted(shard(2, 0)) == sorted(order)
    assert sorted(shard(2, 8)) == sorted(order[8:])  # elastic: 1 -> 2 processes mid-epoch
    assert sorted(shard(4, 8)) == sorted(order[8:])


def test_crop_flip_is_per_sample_and_keeps_shape():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).reshape(2, 1, 4, 4)
    shifts = torch.tensor([[1, 1], [0, 2]])  # (1, 1) = the centre: no shift
    out = tl._crop_flip(images, shifts, torch.tensor([False, True]), pad=1)
    assert out.shape == images.shape
    assert torch.equal(out[0], images[0])
    expected = F.pad(images[1], (1, 1, 1, 1))[:, 0:4, 2:6].flip(-1)
    assert torch.equal(out[1], expected)


def test_synthetic_images_are_deterministic_per_seed():
    a = tl.synthetic_images(4, train_size=64, val_size=16)
    b = tl.synthetic_images(4, train_size=64, val_size=16)
    c = tl.synthetic_images(5, train_size=64, val_size=16)
    assert torch.equal(a[0][0], b[0][0]) and not torch.equal(a[0][0], c[0][0])
    assert a[0][0].shape == (64, 3, 32, 32)


# ---- steps and evaluation --------------------------------------------------------------------


def one_step_state(model, lr=1.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return tl.TrainState(model, opt, sched)


def test_train_step_accumulated_short_batches_equal_one_big_batch():
    data = blobs(11)
    x, y = data.tensors
    big = mlp()
    small = mlp()
    tl.train_step(one_step_state(big), [(x, y)], runtime=CPU)
    micro = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # 4 + 4 + 3 samples
    tl.train_step(one_step_state(small), micro, runtime=CPU)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_step_explicit_weights_act_like_token_counts():
    # A per-token mean loss: micro-batches weighted by their token counts must give the
    # gradient of the mean over all tokens, as one big batch would.
    torch.manual_seed(0)
    tokens_a, tokens_b = torch.randn(6, 8), torch.randn(2, 8)
    targets_a, targets_b = torch.randint(0, 3, (6,)), torch.randint(0, 3, (2,))
    big, small = mlp(), mlp()
    tl.train_step(
        one_step_state(big),
        [(torch.cat([tokens_a, tokens_b]), torch.cat([targets_a, targets_b]))],
        runtime=CPU,
    )
    tl.train_step(
        one_step_state(small), [(tokens_a, targets_a, 6), (tokens_b, targets_b, 2)], runtime=CPU
    )
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_step_refuses_weights_that_do_not_fit_before_any_backward():
    x, y = blobs(8).tensors
    micro = [(x[:4], y[:4]), (x[4:], y[4:])]
    for weights in ([1.0], [1.0, 2.0, 3.0], [0.0, 0.0]):
        state = one_step_state(mlp())
        with pytest.raises(tl.UsageError, match="one weight per micro-batch"):
            tl.train_step(state, micro, runtime=CPU, weights=weights)
        assert all(p.grad is None for p in state.model.parameters())


def test_train_step_clips_the_gradient_norm():
    model = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(model.weight)
    x, y = torch.ones(8, 4) * 100, torch.zeros(8, 1)
    loss = lambda out, target: (out - target - 1).pow(2).mean()  # noqa: E731
    tl.train_step(one_step_state(model, lr=1.0), [(x, y)], runtime=CPU, loss_fn=loss, clip_grad=0.5)
    assert model.weight.norm().item() == pytest.approx(0.5, rel=1e-4)


def test_train_step_returns_a_detached_device_tensor_and_counts_steps():
    model = mlp()
    state = one_step_state(model, lr=0.1)
    x, y = blobs(16).tensors
    loss = tl.train_step(state, [(x, y)], runtime=CPU)
    assert isinstance(loss, torch.Tensor) and not loss.requires_grad and loss.dim() == 0
    assert state.step == 1
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_weights_by_samples_and_restores_mode():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1]])
    y = torch.tensor([0, 0, 0, 0])  # 3 of 4 right, batches of 3 and 1
    model.train()
    scores = tl.evaluate(model, [(x[:3], y[:3]), (x[3:], y[3:])], runtime=CPU)
    assert scores["acc"] == pytest.approx(0.75)  # a per-batch mean would give 0.5
    assert "top5" not in scores
    assert model.training
    with pytest.raises(RuntimeError):  # a batch that fails: the mode is restored all the same
        tl.evaluate(model, [(torch.zeros(2, 3), y[:2])], runtime=CPU)
    assert model.training


def test_evaluate_reports_top5_only_with_more_than_five_classes():
    model = nn.Identity()  # the inputs are the logits
    logits = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1]]).repeat(3, 1)
    target = torch.tensor([0, 2, 6])  # ranked 1st, 3rd and 7th
    scores = tl.evaluate(model, [(logits, target)], runtime=CPU)
    assert scores["acc"] == pytest.approx(1 / 3) and scores["top5"] == pytest.approx(2 / 3)
    few = tl.evaluate(model, [(logits[:, :5], torch.tensor([0, 2, 4]))], runtime=CPU)
    assert "top5" not in few


def test_a_batchnorm_frozen_with_eval_stays_frozen_through_fit_and_evaluate():
    def model_with_norm():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    frozen = model_with_norm()
    frozen[1].eval()  # the user's: keep its statistics
    tl.fit(frozen, blobs(64), blobs(32), epochs=2, batch_size=16, **quiet())
    assert not frozen[1].training and frozen[0].training
    assert frozen[1].running_mean.eq(0).all() and frozen[1].num_batches_tracked == 0
    whole = model_with_norm().eval()  # a model in eval mode as a whole trains
    tl.fit(whole, blobs(64), epochs=1, batch_size=16, **quiet())
    assert whole[1].num_batches_tracked == 4


def test_evaluate_accuracy_only_on_the_class_axis():
    tokens = torch.randint(0, 4, (6, 3))  # (N, T) labels of 4 classes
    logits = F.one_hot(tokens, 4).float()  # (N, T, C): classes last, all right

    def loss(output, target):
        return F.cross_entropy(output.flatten(0, 1), target.flatten())

    scores = tl.evaluate(nn.Identity(), [(logits, tokens)], runtime=CPU, loss_fn=loss)
    assert "acc" not in scores  # axis 1 holds tokens, not classes: no accuracy (it crashed)
    square = F.one_hot(torch.randint(0, 3, (6, 3)), 3).float()  # T == C: both axes would fit
    scores = tl.evaluate(nn.Identity(), [(square, square.argmax(-1))], runtime=CPU, loss_fn=loss)
    assert "acc" not in scores  # (it reported the wrong axis's accuracy)
    ce = tl.evaluate(nn.Identity(), [(square.transpose(1, 2), square.argmax(-1))], runtime=CPU)
    assert ce["acc"] == 1.0  # cross-entropy reads axis 1 as the classes: (N, C, T)


def test_evaluate_counts_a_square_batch_when_other_batches_are_classes_first():
    def loss(output, target):  # the user's own cross-entropy: nothing says which axis
        return F.cross_entropy(output, target, ignore_index=-100)

    long = torch.randint(0, 3, (4, 5))  # (N, T) with T = 5, 3 classes: only (N, C, T) fits
    square = torch.randint(0, 3, (4, 3))  # T = C = 3: (N, C, T) and (N, T, C) both fit
    batches = [(F.one_hot(t, 3).transpose(1, 2).float(), t) for t in (long, square)]
    batches[1] = (batches[1][0].roll(1, dims=1), square)  # every label of the square one wrong
    scores = tl.evaluate(nn.Identity(), batches, runtime=CPU, loss_fn=loss)
    assert scores["acc"] == pytest.approx(20 / 32)  # (it left the square batch out: 1.0)

    def own_acc(output, target):  # a metric of the user's named acc is theirs alone
        return (output.argmax(1) == target).float().mean()

    mine = tl.evaluate(nn.Identity(), batches, runtime=CPU, loss_fn=loss, metrics={"acc": own_acc})
    assert mine["acc"] == pytest.approx(0.5)  # by samples, 4 and 4 (the labels added in: 0.2)


def test_evaluate_reports_no_accuracy_when_no_label_was_counted():
    ages = torch.tensor([30, 41, 57, 62])  # int64 targets of a regression, none in 0..1
    scores = tl.evaluate(nn.Identity(), [(torch.randn(4, 2), ages)], runtime=CPU, loss_fn=nll)
    assert "acc" not in scores and "loss" in scores  # (it reported acc 0.0)
    x = torch.randn(64, 8)
    data = TensorDataset(x, (40 + 10 * x[:, 0]).round().long())
    history = tl.fit(nn.Linear(8, 2), data, data, loss_fn=nll, epochs=2, lr=0.01, **quiet())
    assert "val_acc" not in history[-1]  # so best.pt and patience follow val_loss
    state = one_step_state(mlp())  # resumed from a run of 0.3.3, which reported acc 0.0
    state.history = [{"epoch": 1, "val_acc": 0.0, "val_loss": 9.0}, {"epoch": 2, "val_loss": 3.0}]
    tl._rebest(state, tl.Config())
    assert (state.best, state.best_epoch) == (3.0, 2)  # (it was 0.0 at epoch 1: best.pt stuck)


def nll(output, target):
    """A Gaussian negative log-likelihood of a (mean, log-variance) head."""
    return F.gaussian_nll_loss(output[:, 0], target.float(), output[:, 1].exp())


def test_evaluate_refuses_data_without_a_batch():
    with pytest.raises(tl.UsageError, match="^evaluate got no batch: the data"):
        tl.evaluate(mlp(), [], runtime=CPU)

    class Nothing(torch.utils.data.IterableDataset):  # a stream without length, and empty
        def __iter__(self):
            return iter(())

    with pytest.raises(tl.UsageError, match="pass val_data=None"):  # (no val_ metric, silently)
        tl.fit(mlp(), blobs(32), DataLoader(Nothing(), batch_size=8), epochs=1, **quiet())


def test_fit_takes_a_validation_loader_over_a_stream_without_length():
    unsized = DataLoader(Endless(), batch_size=8)  # a DataLoader whose len() raises
    history = tl.fit(mlp(), blobs(32), unsized, epochs=1, **quiet())  # (TypeError from len)
    assert "val_acc" in history[0]
    two = tl.Runtime(torch.device("cpu"), world_size=2)  # sharded, every process needs a count
    with pytest.raises(tl.UsageError, match="^shard=True needs val_data with a length"):
        tl._check_data(blobs(32), [1], unsized, unsized, two, shard=True)


def test_evaluate_accuracy_leaves_out_ignored_labels():
    logits = torch.tensor([[[5.0, 5, 5, 5], [0, 0, 0, 0]], [[0, 0, 0, 0], [5, 5, 5, 5]]])  # (2,2,4)
    target = torch.tensor([[0, -100, 0, -100], [-100, -100, 1, 1]])  # 4 labelled, all right
    scores = tl.evaluate(nn.Identity(), [(logits, target)], runtime=CPU)
    assert scores["acc"] == 1.0  # (it counted the ignored positions as wrong: 0.5)


def test_evaluate_weighs_accuracy_by_labels_and_the_loss_as_training_does():
    logits = torch.stack([torch.ones(8, 10), -torch.ones(8, 10)], 1)  # (8, 2, 10): class 0
    few = torch.full((8, 10), -100)
    few[:, 0] = 1  # 8 labels, all wrong
    many = torch.zeros(8, 10, dtype=torch.long)  # 80 labels, all right
    losses = [F.cross_entropy(logits, target).item() for target in (few, many)]
    scores = tl.evaluate(nn.Identity(), [(logits, few), (logits, many)], runtime=CPU)
    assert scores["acc"] == pytest.approx(80 / 88)  # (batches weighed by samples: 0.5)
    assert scores["loss"] == pytest.approx(sum(losses) / 2)  # as train_loss: 8 samples each
    weighed = tl.evaluate(nn.Identity(), [(logits, few, 8), (logits, many, 80)], runtime=CPU)
    assert weighed["loss"] == pytest.approx((8 * losses[0] + 80 * losses[1]) / 88)  # (ignored)


def test_evaluate_accuracy_leaves_out_labels_beyond_the_classes():
    logits = torch.tensor([[5.0, 0], [0, 5], [5, 0], [5, 0]])
    target = torch.tensor([0, 1, 255, 255])  # a VOC-style ignore label
    loss_fn = nn.CrossEntropyLoss(ignore_index=255)
    scores = tl.evaluate(nn.Identity(), [(logits, target)], runtime=CPU, loss_fn=loss_fn)
    assert scores["acc"] == 1.0  # (it counted 255 as wrong: 0.5)


@pytest.mark.parametrize(
    "metrics,message",
    [
        ({"loss": lambda out, y: out.abs().mean()}, "metrics={'loss': ...} would replace the loss"),
        ({"m": lambda out, y: None}, "metrics['m'] returned None; return the batch's mean"),
        ([len], "metrics must be a dict of functions"),
    ],
)
def test_evaluate_refuses_metrics_it_cannot_report_in_one_line(metrics, message):
    with pytest.raises(tl.UsageError, match=re.escape(message)):
        tl.evaluate(mlp(), [(torch.randn(4, 8), torch.zeros(4).long())], metrics=metrics)


def test_sizes_count_per_sample_tensors_of_a_list_as_samples():
    images, boxes = torch.randn(3, 8), [torch.rand(k, 4) for k in (1, 5, 2)]  # boxes per image
    assert tl._sizes([(images, boxes)]) == (3, [3.0])  # (it counted the first image's: 1)
    two_tasks = [torch.zeros(3).long(), torch.zeros(3, 2)]  # a batched target per task
    assert tl._sizes([(images, two_tasks)]) == (3, [3.0])
    two_each = [torch.rand(2, 4)] * 3  # as many boxes in every image: the inputs tell
    assert tl._sizes([(images, two_each)]) == (3, [3.0])
    named = (torch.zeros(3).long(), ["a.jpg", "b.jpg", "c.jpg"])  # labels and file names
    assert tl._sizes([(images, named)]) == (3, [3.0])


def test_train_step_refuses_a_loss_that_is_not_one_tensor_in_one_line():
    state = one_step_state(mlp())
    batch = [(torch.randn(4, 8), torch.zeros(4).long())]
    with pytest.raises(tl.UsageError, match="the loss is a tuple, not a tensor"):
        tl.train_step(state, batch, loss_fn=lambda out, y: (F.cross_entropy(out, y), {}))
    with pytest.raises(tl.UsageError, match=re.escape("CrossEntropyLoss is a class; pass an")):
        tl.train_step(state, batch, loss_fn=nn.CrossEntropyLoss)
    with pytest.raises(tl.UsageError, match=re.escape("loss_fn=MSELoss is a class")):
        tl.train_step(state, [(torch.randn(1, 8), torch.zeros(1, 3))], loss_fn=nn.MSELoss)

    class Focal(nn.CrossEntropyLoss):  # the user's own loss, built on torch's
        def forward(self, output, target):
            raise RuntimeError("a bug in my focal loss")

    with pytest.raises(RuntimeError, match="a bug in my focal loss"):  # its own error, whole
        tl.train_step(state, batch, loss_fn=Focal())
    with pytest.raises(tl.UsageError, match=re.escape("cross-entropy cannot take output (4, 3)")):
        tl.train_step(state, [(torch.randn(4, 8), torch.zeros(4))], loss_fn=nn.CrossEntropyLoss())


@pytest.mark.parametrize(
    "loss_fn", [F.mse_loss, nn.L1Loss(), nn.HuberLoss(), nn.BCEWithLogitsLoss()]
)
def test_train_step_refuses_an_elementwise_loss_of_shapes_that_broadcast(loss_fn):
    state = one_step_state(nn.Linear(8, 1))
    with pytest.raises(tl.UsageError, match=re.escape("output (4, 1) float32 with target (4,)")):
        tl.train_step(state, [(torch.randn(4, 8), torch.randn(4))], loss_fn=loss_fn)
    tl.train_step(state, [(torch.randn(4, 8), torch.rand(4, 1))], loss_fn=loss_fn)
    assert state.step == 1


def test_small_real_data_slips_are_one_line():
    x, y = torch.randn(17, 8, dtype=torch.float64), torch.arange(17) % 3  # as NumPy gives them
    with pytest.raises(tl.UsageError, match="^the inputs are float64 and the model is not"):
        tl.fit(mlp(), TensorDataset(x, y), **quiet())

    class Narrow(nn.Module):  # a float64 model with a bug of its own: its error stays its own
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 8, dtype=torch.float64))

        def forward(self, x):
            raise ValueError("wrong width; double-check the features")

    with pytest.raises(ValueError, match="^wrong width; double-check"):
        tl.fit(Narrow(), TensorDataset(x, y), **quiet())
    torch.manual_seed(0)
    normed = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(tl.UsageError, match="^a batch of 1 sample reached a BatchNorm layer"):
        tl.fit(normed, TensorDataset(x.float(), y), batch_size=8, **quiet())  # 17 = 8 + 8 + 1
    binary = TensorDataset(x.float(), (y == 1).float()[:, None])
    with pytest.raises(tl.UsageError, match="^cross-entropy over 1 output is always 0"):
        tl.fit(nn.Linear(8, 1), binary, **quiet())  # (the loss was 0: nothing trained)
    lines = []
    tl.fit(mlp(), blobs(16), optimizer="adamw", quiet=True, log=lines.append)
    assert lines[0] == "warning: adamw at lr=0.05, the default for sgd; try lr=1e-3"
    fp16 = tl._make_optimizer(mlp(), tl.Config(), fp16=True)
    assert fp16.defaults["fused"] is None  # (fused SGD's momentum went to 1e32 after a skip)
    assert tl._make_optimizer(mlp(), tl.Config(), fp16=False).defaults["fused"] is True


def test_precision_follows_the_runtime_given_and_a_laptops_slips_are_one_line(capsys):
    fp16 = tl.Runtime(torch.device("cpu"), amp_dtype=torch.float16)  # setup_device(precision=)
    state = tl._new_state(mlp(), tl.Config(), fp16, None, None, steps=4)
    assert state.optimizer.defaults["fused"] is None and state.scaler.is_enabled()  # (fused: NaN)
    with pytest.raises(tl.UsageError, match="^precision='bf16', but the runtime given computes"):
        tl.fit(mlp(), blobs(16), precision="bf16", runtime=CPU, **quiet())  # (fp32, silently)
    with pytest.raises(tl.UsageError, match=re.escape("scaler=torch.amp.GradScaler('cpu'))")):
        tl.train_step(one_step_state(mlp()), [blobs(4)[:]], runtime=fp16)  # (a CUDA one: off)
    compiler = RuntimeError("InvalidCxxCompiler: No working C++ compiler found in cxx")
    with pytest.raises(tl.UsageError, match="needs a C\\+\\+ compiler, and none was found"):
        tl._forward_mistake(compiler, mlp(), torch.randn(2, 8))  # (134 lines of inductor)

    class CompiledBackward(torch.autograd.Function):  # inductor may first build C++ in backward
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise compiler

    class Compiled(nn.Linear):
        def forward(self, x):
            return CompiledBackward.apply(super().forward(x))

    with pytest.raises(tl.UsageError, match="needs a C\\+\\+ compiler"):
        tl.train_step(one_step_state(Compiled(8, 3)), [blobs(4)[:]], runtime=CPU)
    info = {"classes": 2, "image_size": 32, "mean": (), "std": ()}
    tl._data_settings(
        tl.Config(), info, tl.Runtime(torch.device("cpu"), amp_dtype=torch.bfloat16), (8, 2)
    )
    assert capsys.readouterr().out.startswith("trainloop: cpu bf16; data synthetic: 2 classes")


def test_channels_last_converts_each_layer_as_its_rank_allows():
    model = nn.Sequential(
        nn.Conv3d(1, 2, 1), nn.Flatten(1, 2), nn.Conv2d(8, 2, 1), nn.Flatten(), nn.Linear(18, 2)
    )
    x = torch.randn(8, 1, 4, 3, 3)
    tl.fit(model, TensorDataset(x, torch.arange(8) % 2), channels_last=True, epochs=1, **quiet())
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last_3d)  # (it raised)
    assert model[2].weight.is_contiguous(memory_format=torch.channels_last)

    class Mixed(nn.Module):  # its own 4-d kernel and 5-d buffer, beside a child
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.register_buffer("volume", torch.randn(2, 2, 2, 2, 2))
            self.head = nn.Linear(2, 2)

    mixed = Mixed()
    tl._to_channels_last(mixed)  # (skipped: a module with children; or raised: 4-d beside 5-d)
    assert mixed.kernel.is_contiguous(memory_format=torch.channels_last)
    assert mixed.volume.is_contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(tl.UsageError, match="^the model has lazy layers"):  # (torch's ValueError)
        tl.fit(nn.Sequential(nn.LazyLinear(2)), blobs(16), **quiet())


def test_evaluate_metrics_take_a_dict_batch_whole():
    seen = []

    def labelled(output, batch):
        seen.append(sorted(batch))
        return (output["logits"].argmax(1) == batch["labels"]).float().mean()

    model = OwnLoss()
    scores = tl.evaluate(
        model,
        [next(iter(DataLoader(DictBatches(8), batch_size=8)))],
        runtime=CPU,
        loss_fn=None,
        metrics={"hits": labelled},
    )
    assert seen == [["features", "labels"]] and 0 <= scores["hits"] <= 1  # (it got None)


@pytest.mark.parametrize(
    "target,words",
    [
        (torch.zeros(4), "target (4,) float32"),  # float labels
        (torch.full((4,), 7), "target (4,) int64"),  # a label beyond the 3 classes
        (torch.zeros(4, 1, dtype=torch.long), "target (4, 1) int64"),
    ],
)
def test_train_step_default_loss_mistakes_are_one_line(target, words):
    model = mlp()
    state = tl.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(tl.UsageError, match=re.escape(f"output (4, 3) float32 with {words}")):
        tl.train_step(state, [(torch.randn(4, 8), target)], runtime=CPU)

    def own(output, target):  # the user's own loss
        return F.cross_entropy(output, target)

    with pytest.raises((RuntimeError, IndexError)):  # its own error, as torch raised it
        tl.train_step(state, [(torch.randn(4, 8), target)], runtime=CPU, loss_fn=own)


@pytest.mark.parametrize(
    "loss_fn,target,message",
    [
        (
            nn.BCEWithLogitsLoss(),
            torch.ones(4, 3, dtype=torch.long),
            "takes float targets, not (4, 3) int64",
        ),
        (F.huber_loss, torch.ones(4, 3, dtype=torch.long), "takes float targets"),  # (in backward)
        (F.nll_loss, torch.zeros(4), "nll_loss cannot take output (4, 3) float32 with target (4,)"),
    ],
)
def test_train_step_target_dtype_slips_are_one_line(loss_fn, target, message):
    state = one_step_state(mlp())
    with pytest.raises(tl.UsageError, match=re.escape(message)):
        tl.train_step(state, [(torch.randn(4, 8), target)], runtime=CPU, loss_fn=loss_fn)
    if loss_fn is F.huber_loss:  # which takes them without a backward
        assert tl.evaluate(mlp(), [(torch.randn(4, 8), target)], loss_fn=loss_fn)["loss"] > 0
    elif target.dtype == torch.long:  # binary cross-entropy fails on them in evaluate too
        with pytest.raises(tl.UsageError, match=re.escape(message)):
            tl.evaluate(mlp(), [(torch.randn(4, 8), target)], loss_fn=loss_fn)


def test_inputs_the_model_cannot_take_are_one_line():
    state = one_step_state(nn.Linear(8, 3))
    records = {"x": torch.randn(4, 8), "y": torch.zeros(4, dtype=torch.long)}

    def loss(output, batch):
        return F.cross_entropy(output, batch["y"])

    with pytest.raises(
        tl.UsageError, match="unexpected keyword argument 'x'.*model\\(\\*\\*inputs\\)"
    ):
        tl.train_step(state, [records], runtime=CPU, loss_fn=loss)
    rows = [torch.randn(8) for _ in range(4)]  # a list of per-sample tensors: 4 arguments
    with pytest.raises(tl.UsageError, match="a list go to model\\(\\*inputs\\).*\\(\\(items,\\)"):
        tl.train_step(state, [(rows, torch.zeros(4, dtype=torch.long))], runtime=CPU)

    class Broken(nn.Linear):  # a TypeError inside the model stays the model's own
        def forward(self, x, y):
            return len(5)

    with pytest.raises(TypeError, match="has no len"):
        tl.train_step(one_step_state(Broken(8, 3)), [records], loss_fn=loss)

    def takes_y(forward):  # a decorator that hides the forward's own signature
        @functools.wraps(forward)
        def call(self, x, y):
            return forward(self, x)

        return call

    class Decorated(nn.Linear):
        @takes_y
        def forward(self, x):
            return len(5)

    with pytest.raises(TypeError, match="has no len"):  # (blamed on the batch's inputs)
        tl.train_step(one_step_state(Decorated(8, 3)), [records], loss_fn=loss)


# ---- fit -------------------------------------------------------------------------------------


def test_fit_learns_and_returns_history():
    train, val = blobs(192), blobs(64, seed=0)
    model = mlp()
    history = tl.fit(model, train, val, epochs=4, batch_size=16, lr=0.05, **quiet())
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 0.5
    assert history[-1]["val_acc"] > 0.9
    keys = {"epoch", "step", "train_loss", "val_loss", "val_acc", "lr", "seconds"}
    assert keys <= history[-1].keys()


def test_command_line_mistakes_are_said_by_the_first_process_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")  # every process parses the same flags
    assert tl.main(["--epoch", "1"]) == 2 and capsys.readouterr().err == ""  # (each said it)
    monkeypatch.setenv("RANK", "0")
    assert tl.main(["--epoch", "1"]) == 2 and "No such option: --epoch" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 2])  # 2: persistent, whose first iter() draws a seed
def test_fit_resumes_a_dataloader_with_its_own_generator_exactly_at_an_epoch_end(tmp_path, workers):
    def run(epochs, out):
        model, lines = mlp(), []
        generator = torch.Generator().manual_seed(0)  # as torch's reproducibility notes advise
        loader = DataLoader(
            blobs(64),
            batch_size=16,
            shuffle=True,
            generator=generator,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        settings = dict(schedule="constant", quiet=True, log=lines.append)
        tl.fit(model, loader, epochs=epochs, out=str(out), **settings)
        return model.state_dict(), lines

    straight, _ = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed, lines = run(4, tmp_path / "b")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # (epoch 3 redid 1's order)
    assert not any("warning" in line for line in lines)  # (epochs 2 -> 4 warned, with constant LR)


def test_fit_resumes_a_dataloader_generator_saved_by_0_3_3(tmp_path):
    def run(epochs):
        loader = DataLoader(blobs(64), batch_size=16, shuffle=True, generator=torch.Generator())
        return tl.fit(mlp(), loader, epochs=epochs, out=tmp_path, **quiet())

    run(1)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["loader_rng"] = ckpt["loader_rng"][0]  # 0.3.3 saved one process's list, not one per rank
    torch.save(ckpt, tmp_path / "last.pt")
    assert [row["epoch"] for row in run(2)] == [1, 2]


def test_fit_accepts_dataloaders_and_a_user_optimizer():
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    loader = DataLoader(blobs(96), batch_size=16, shuffle=True)
    history = tl.fit(
        model,
        loader,
        DataLoader(blobs(32), batch_size=16),
        epochs=3,
        optimizer=optimizer,
        schedule="constant",
        **quiet(),
    )
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert optimizer.state  # the user's optimizer did the stepping


def test_fit_keeps_a_step_the_user_patched_onto_their_optimizer():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    calls = []

    def counted_step(self, *args, **kwargs):  # a hook a user or a library put on the instance
        calls.append(1)
        return torch.optim.SGD.step(self, *args, **kwargs)

    optimizer.step = types.MethodType(counted_step, optimizer)
    tl.fit(model, blobs(64), epochs=2, batch_size=16, optimizer=optimizer, **quiet())
    assert len(calls) == 8  # 2 epochs x 4 steps, all through the user's step


class SparseBag(nn.Module):
    """Token ids -> class scores through an embedding with sparse gradients."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8, sparse=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


def test_own_optimizer_uses_fused_kernels_on_cpu_except_for_sparse_gradients():
    for name in ("sgd", "adamw"):
        state = tl._new_state(mlp(), tl.Config(optimizer=name), CPU, None, None, 4)
        assert [g["fused"] for g in state.optimizer.param_groups] == [True, True], name
    state = tl._new_state(SparseBag(), tl.Config(weight_decay=0), CPU, None, None, 4)
    assert not any(g["fused"] for g in state.optimizer.param_groups)
    ids = torch.randint(0, 20, (32, 5), generator=torch.Generator().manual_seed(0))
    data = TensorDataset(ids, ids[:, 0] % 3)
    history = tl.fit(SparseBag(), data, data, epochs=2, batch_size=8, weight_decay=0, **quiet())
    assert math.isfinite(history[-1]["train_loss"])  # fused kernels refuse sparse gradients
    for setting in (dict(optimizer="adamw", weight_decay=0), dict(weight_decay=1e-4)):
        with pytest.raises(tl.UsageError, match="optimizer='sgd', weight_decay=0"):
            tl.fit(SparseBag(), data, epochs=1, batch_size=8, **setting, **quiet())
    frozen = SparseBag()
    frozen.embed.requires_grad_(False)
    frozen.sparse = True  # an attribute of the user's own, not sparse gradients
    state = tl._new_state(frozen, tl.Config(optimizer="adamw"), CPU, None, None, 4)
    assert [g["fused"] for g in state.optimizer.param_groups] == [True, True]


def test_resume_uses_this_machines_optimizer_kernels(tmp_path):
    fit_mlp(32, epochs=1, out=tmp_path)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:  # as from a GPU run's checkpoint
        group["fused"] = None
    torch.save(ckpt, tmp_path / "last.pt")
    fit_mlp(32, epochs=2, out=tmp_path)
    groups = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["fused"] for g in groups] == [True, True]


def test_fit_unknown_setting_suggests_the_field():
    with pytest.raises(tl.UsageError, match="did you mean epochs"):
        tl.fit(mlp(), blobs(8), epoch=3)
    with pytest.raises(tl.UsageError, match="'learning_rate'; did you mean lr"):
        tl.fit(mlp(), blobs(8), learning_rate=0.1)


def test_fit_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    train, val = blobs(64), blobs(32, seed=0)
    tl.fit(mlp(), train, val, epochs=2, batch_size=16, out=str(out), **quiet())
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert json.loads((out / "config.json").read_text())["epochs"] == 2


def test_fit_config_json_records_the_users_optimizer_and_scheduler_not_unused_defaults(tmp_path):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5)
    tl.fit(model, blobs(32), optimizer=optimizer, scheduler=scheduler, out=tmp_path, **quiet())
    record = json.loads((tmp_path / "config.json").read_text())
    assert (record["optimizer"], record["lr"], record["schedule"]) == ("Adam", 3e-3, "StepLR")
    assert record["model"] is record["data"] is record["weight_decay"] is None  # (smallcnn, sgd)
    tl.fit(mlp(), blobs(32), optimizer="adamw", lr=1e-3, out=tmp_path / "a", **quiet())
    record = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (record["optimizer"], record["momentum"], record["lr"]) == ("adamw", None, 1e-3)
    config = tl.Config(model="resnet18", data="photos")  # a config= records them, as the CLI's
    tl.fit(mlp(), blobs(32), config=config, out=tmp_path / "b", **quiet())
    record = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (record["model"], record["optimizer"], record["lr"]) == ("resnet18", "sgd", 0.05)


def test_fit_refuses_an_out_that_another_run_is_using(tmp_path):
    out = tmp_path / "run"
    fit_mlp(32, epochs=1, out=out)
    holder = subprocess.Popen(  # another process holds the run's lock, as a running fit does
        [sys.executable, "-c", HOLDS_A_LOCK, str(out / ".lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(tl.UsageError, match=r"out=.* is in use by another run \(pid \d+ on "):
            fit_mlp(32, epochs=2, out=out)
        assert tl.load_checkpoint(out / "last.pt")["epoch"] == 1  # nothing was touched
    finally:
        holder.communicate("")  # it lets go when it ends
    assert len(fit_mlp(32, epochs=2, out=out)) == 2


HOLDS_A_LOCK = """
import fcntl, sys
with open(sys.argv[1], "a+") as f:
    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.truncate(0)
    f.write("pid 12345 on elsewhere")
    f.flush()
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_rerun_of_a_finished_run_writes_nothing_and_a_refused_resume_keeps_config(tmp_path):
    out = tmp_path / "run"
    fit_mlp(32, blobs(16), epochs=2, out=out)

    def files():  # all but the lock, which a read-only out goes without
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("[!.]*")}

    before = files()
    fit_mlp(32, blobs(16), epochs=2, out=out)  # complete: a read-only out would do
    assert files() == before
    with pytest.raises(tl.UsageError, match="trained with 'sgd'"):
        fit_mlp(32, blobs(16), epochs=3, optimizer="adamw", out=out)
    assert json.loads((out / "config.json").read_text())["optimizer"] == "sgd"


def test_checkpoint_holds_the_unwrapped_model_and_loads_weights_only(tmp_path):
    model = mlp()
    compiled = torch.compile(model)  # not run: only its wrapper's key prefix matters here
    assert tl._unwrap(compiled) is model
    state = one_step_state(model)
    tl.save_checkpoint(tmp_path / "c.pt", state, note="mine")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ckpt["note"] == "mine"
    assert list(ckpt["model"]) == list(model.state_dict())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    for key in (
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "step",
        "seen",
        "rng",
        "format",
        "world_size",
        "best",
    ):
        assert key in ckpt
    assert isinstance(ckpt["rng"][0]["numpy"][1], torch.Tensor)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fit_takes_the_optimizer_by_name_without_decay_on_biases_and_norms(name, monkeypatch):
    built = []

    class Spy(Built):  # a TrainState still (the steps check that), which notes its optimizer
        def __post_init__(self):
            built.append(self.optimizer)
            super().__post_init__()

    monkeypatch.setattr(tl, "TrainState", Spy)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    tl.fit(model, blobs(32), epochs=1, batch_size=16, optimizer=name, lr=1e-3, **quiet())
    [optimizer] = built
    assert type(optimizer) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}  # not biases, not the norm's
    if name == "sgd":
        assert all(g["nesterov"] and g["momentum"] == 0.9 for g in optimizer.param_groups)
    assert model[0].weight.grad is None  # trained and cleaned up


Built = tl.TrainState


def test_warmup_below_one_is_a_share_of_all_steps_and_a_users_optimizer_follows_the_schedule():
    def lrs(**settings):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        history = tl.fit(model, blobs(64), epochs=2, optimizer=optimizer, **quiet(**settings))
        return [row["lr"] for row in history]

    assert lrs(warmup=0.5, batch_size=8) == lrs(warmup=8, batch_size=8)  # 16 steps
    assert lrs(warmup=0.5, batch_size=8) != lrs(warmup=4, batch_size=8)
    cosine = [0.05 * (1 + math.cos(math.pi * step / 4)) for step in (1, 3)]  # 4 steps
    assert lrs(batch_size=32) == pytest.approx(cosine)  # the default schedule
    assert lrs(batch_size=32, schedule="constant") == [0.1, 0.1]


def test_fit_without_out_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit_mlp(32, blobs(16), epochs=2, save_every=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "setting,message",
    [
        (dict(gpus=0), "gpus=0 must be of type str"),
        (dict(lr="0.1"), "lr='0.1' must be of type float"),
        (dict(epochs=1.5), "epochs=1.5 must be of type int"),
        (dict(image_size=2), "image_size=2 must be 0 (keep) or 4 to 8192 pixels"),
        (dict(loss_fn=5), "loss_fn=5 is not a function; pass one, or None"),
        (dict(log="print"), "log='print' is not a function"),
        (dict(scheduler=torch.optim.lr_scheduler.StepLR), "scheduler=StepLR is a class; pass lam"),
        (dict(metrics={5: len}), "metrics must be a dict of functions, e.g. {'mae': my_mae}"),
        (dict(val_data=5), "val_data=5 is not data; pass a Dataset or a DataLoader"),
        (
            dict(monitor="val_f1"),
            "monitor='val_f1' is not a reported metric; choose from train_loss",
        ),
    ],
)
def test_fit_bad_settings_fail_before_training(setting, message):
    with pytest.raises(tl.UsageError, match=re.escape(message)):
        settings = dict(setting)
        fit_mlp(16, settings.pop("val_data", blobs(16)), **settings)


def test_fit_dict_batch_with_the_default_loss_says_what_to_pass():
    for loss_fn in (F.cross_entropy, nn.CrossEntropyLoss(), nn.NLLLoss()):
        with pytest.raises(tl.UsageError, match="cross-entropy has no target; pass loss_fn=None"):
            tl.fit(OwnLoss(), DictBatches(16), loss_fn=loss_fn, workers=0, **quiet())

    class BatchCrossEntropy(nn.CrossEntropyLoss):  # a subclass of the user's: it takes the batch
        def forward(self, output, batch):
            return super().forward(output["logits"], batch["labels"])

    history = tl.fit(OwnLoss(), DictBatches(16), loss_fn=BatchCrossEntropy(), workers=0, **quiet())
    assert history[-1]["train_loss"] > 0

    class Features(nn.Linear):  # takes only some of the batch's keys: model(**batch) fails
        def forward(self, features):
            return super().forward(features)

    with pytest.raises(tl.UsageError, match="pass loss_fn=None"):  # (a TypeError from forward)
        tl.fit(Features(8, 3), DictBatches(16), workers=0, **quiet())


def test_train_step_default_loss_on_a_model_that_returns_its_loss_says_loss_fn_none():
    class ReturnsLoss(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return {"logits": logits, "loss": logits.square().mean()}

    state = one_step_state(ReturnsLoss(8, 3))
    with pytest.raises(tl.UsageError, match="returns its own loss: pass loss_fn=None"):
        tl.train_step(state, [(torch.randn(4, 8), torch.zeros(4).long())])  # (own loss_fn)
    no_labels = types.SimpleNamespace(logits=torch.zeros(4, 3), loss=None)  # called without
    state = one_step_state(nn.Linear(8, 3))
    state.net = lambda x: no_labels
    with pytest.raises(tl.UsageError, match="below C; else pass your own loss_fn$"):
        tl.train_step(state, [(torch.randn(4, 8), torch.zeros(4).long())])


def test_fit_per_sample_weights_count_by_their_total():
    x, y = blobs(8).tensors
    weights = torch.tensor([1.0, 1, 1, 1, 3, 3, 3, 3])
    assert tl._sizes([(x[:4], y[:4], weights[:4]), (x[4:], y[4:], weights[4:])]) == (8, [4.0, 12.0])


def test_count_handles_one_item_per_sample_targets():
    images = torch.zeros(16, 3, 8, 8)
    targets = [{"boxes": torch.zeros(5, 4), "labels": torch.zeros(5)} for _ in range(16)]
    assert tl._sizes([(images, targets)]) == (16, [16.0])
    tokens = {"input_ids": torch.zeros(4, 12), "labels": torch.zeros(4, 12)}
    assert tl._sizes([tokens]) == (4, [4.0])
    assert tl._sizes([(images, torch.zeros(0, 5))]) == (16, [16.0])  # all boxes in one: none here


# ---- command line ----------------------------------------------------------------------------


def cli(args, tmp_path, monkeypatch):
    """Invoke the CLI in-process through Typer's test runner, inside tmp_path."""
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(tl._build_cli(), [str(a) for a in args])


@pytest.mark.slow
def test_cli_default_job_reaches_95_percent_and_writes_the_run(tmp_path):
    result = run_cli("--epochs", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "synthetic-smallcnn"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["val_acc"] >= 0.95
    assert rows[0]["val_acc"] < rows[-1]["val_acc"]  # it learns; it is not solved at once
    for name in ("last.pt", "best.pt", "config.json"):
        assert (out / name).is_file()
    assert "done: best val_acc=" in result.stdout
    assert "\x1b[" not in result.stdout  # not a terminal: plain lines, no escape codes


def test_cli_help_lists_every_config_field(tmp_path, monkeypatch):
    result = cli(["--help"], tmp_path, monkeypatch)
    assert result.exit_code == 0
    for f in dataclasses.fields(tl.Config):
        assert "--" + f.name.replace("_", "-") in result.output


def test_cli_version(tmp_path, monkeypatch):
    result = cli(["--version"], tmp_path, monkeypatch)
    assert result.exit_code == 0 and tl.__version__ in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "resnet19"], "did you mean resnet18"),
        (["--data", "no/such/dir"], "--data no/such/dir: no such directory"),
        (["--epochs", "0"], "--epochs 0 must be at least 1"),
        (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
        (["--gpus", "x"], "--gpus x is not a list of GPU ids"),
        (["--gpus", "3"], "--gpus 3 names GPU 3"),
        (["--lr", "-1"], "--lr -1.0 must be a positive number"),
        (["--lr", "nan"], "--lr nan must be a positive number"),
        (["--resume", "missing.pt"], "--resume missing.pt: no such file"),
        (["--time-limit", "later"], "--time-limit later is not a duration"),
        (["--data", "mnist"], "--data mnist: not found under data/"),
        (["--std", "0.3"], "--data synthetic comes normalized; mean and std are for an image"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, message, tmp_path, monkeypatch):
    result = cli(args, tmp_path, monkeypatch)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_out_that_is_a_file_exits_2(tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("x")
    result = cli(["--out", "taken"], tmp_path, monkeypatch)
    assert result.exit_code == 2 and "--out taken is a file" in result.output


def test_cli_unwritable_out_exits_2(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    result = cli(["--out", "file/run", "--epochs", "1"], tmp_path, monkeypatch)
    assert result.exit_code == 2 and "--out file/run is not writable" in result.output


def test_cli_empty_data_directory_exits_2(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    result = cli(["--data", "empty"], tmp_path, monkeypatch)
    assert result.exit_code == 2 and "--data empty" in result.output


def test_cli_image_folder_with_one_class_exits_2(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "one", classes=("only",))
    result = cli(["--data", "one"], tmp_path, monkeypatch)
    assert result.exit_code == 2 and "needs at least 2" in result.output


def test_cli_unreadable_image_names_the_file(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "pets", per_class=6)
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    result = cli(
        ["--data", "pets", "--epochs", "1", "--workers", "0", "--batch-size", "4"],
        tmp_path,
        monkeypatch,
    )
    assert result.exit_code == 2
    assert "cannot read image" in result.output and "broken.png" in result.output


def test_main_malformed_option_is_one_line_exit_2(capsys):
    assert tl.main(["--epochs", "many"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainloop: error:") and "--epochs" in err
    assert len(err.splitlines()) == 1


def test_cli_trains_on_an_image_folder_with_its_own_split(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "pets", per_class=20, mode="L")
    result = cli(
        ["--data", "pets", "--epochs", "2", "--batch-size", "8", "--workers", "0", "--out", "run"],
        tmp_path,
        monkeypatch,
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == "pets"
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    # "0." is the input normalization build_model puts in front of the small CNN ("1.").
    assert ckpt["model"]["1.0.weight"].shape[1] == 3  # folders are read as RGB, even gray ones
    assert ckpt["model"]["1.13.weight"].shape[0] == 2  # two classes
    assert ckpt["train_size"] == 36  # 40 images less a 10% validation split


def test_cli_records_the_class_names_and_refuses_data_whose_classes_changed(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "pets", classes=("cat", "dog"), per_class=6)
    run = ["--data", "pets", "--batch-size", "4", "--workers", "0", "--out", "run"]
    assert cli([*run, "--epochs", "1"], tmp_path, monkeypatch).exit_code == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["classes"] == ["cat", "dog"]
    for name in ("last.pt", "best.pt"):  # what each output means, for a user of the weights
        assert tl.load_checkpoint(tmp_path / "run" / name)["classes"] == ["cat", "dog"]
    (root / "cat").rename(root / "zebra")  # labels 0 and 1 would swap
    for more in (["--epochs", "2"], ["--eval-only"]):
        result = cli([*run, *more], tmp_path, monkeypatch)
        assert result.exit_code == 2, result.output
        assert "was trained on other classes (-cat, +zebra); use the data" in result.output


def test_cli_unreadable_validation_image_keeps_the_epoch_trained(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "pets" / "train", per_class=6)
    make_image_folder(tmp_path / "pets" / "val", per_class=1)
    (root.parent / "val" / "dog" / "broken.png").write_bytes(b"not a png")
    run = ["--data", "pets", "--batch-size", "4", "--workers", "0", "--out", "run", "--epochs", "2"]
    result = cli(run, tmp_path, monkeypatch)
    assert result.exit_code == 2 and "broken.png" in result.output, result.output
    assert "in the validation of epoch 1; checkpoint run/last.pt written)" in result.output
    assert tl.load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 3  # (it was lost)


def test_cli_warns_that_a_run_of_0_3_2_drew_another_validation_split(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "pets", per_class=6)
    run = ["--data", "pets", "--batch-size", "4", "--workers", "0", "--out", "run"]
    assert cli([*run, "--epochs", "1"], tmp_path, monkeypatch).exit_code == 0
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "run" / name, weights_only=True)
        torch.save({**ckpt, "trainloop": "0.3.2"}, tmp_path / "run" / name)
    for more in (["--epochs", "2"], ["--eval-only"]):
        result = cli([*run, *more], tmp_path, monkeypatch)
        assert result.exit_code == 0, result.output
        assert (
            "comes from trainloop 0.3.2, which drew a folder's validation images" in result.output
        )
        assert ("for the rest of this run" in result.output) == (more[0] == "--epochs")


def test_build_model_torchvision_by_name():
    model = tl.build_model("resnet18", channels=3, classes=7)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_cli_eval_only_reports_a_checkpoint(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "pets", per_class=10)
    args = [
        "--data",
        "pets",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--out",
        "run",
    ]
    assert cli(args, tmp_path, monkeypatch).exit_code == 0
    result = cli(args + ["--eval-only"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "eval run/best.pt: val_acc=" in result.output
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for name in ("notes.txt", "tensor.pt"):
        result = cli(args + ["--eval-only", "--resume", name], tmp_path, monkeypatch)
        assert result.exit_code == 3 and result.output.count("\n") == 1, result.output
        assert result.output.endswith("; evaluate another checkpoint (--resume PATH)\n")
    result = cli(args + ["--eval-only", "--model", "resnet18"], tmp_path, monkeypatch)
    error = result.output.splitlines()[-1]  # after the start line
    assert result.exit_code == 2 and "does not match --model resnet18 (" in error
    assert error.endswith("); leave model unset to take the checkpoint's")


def test_fit_refuses_a_model_on_meta_or_in_half_precision_and_a_metric_of_one_argument():
    with torch.device("meta"):
        unmade = mlp()
    with pytest.raises(tl.UsageError, match="weights are on the meta device, without values"):
        tl.fit(unmade, blobs(16), **quiet())
    with pytest.raises(tl.UsageError, match=r"^the model's weights are float16 and the inputs f"):
        tl.fit(mlp().half(), blobs(16), workers=0, **quiet())
    with pytest.raises(tl.UsageError, match=r"metrics\['m'\] must take two arguments"):
        fit_mlp(16, blobs(16), metrics={"m": lambda output: 1.0})


def test_fit_images_too_small_for_the_model_are_one_line():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    data = TensorDataset(torch.randn(8, 3, 3, 3), torch.randint(0, 2, (8,)))
    with pytest.raises(tl.UsageError, match=r"^the model cannot take images of 3x3 pixels \("):
        tl.fit(model, data, epochs=1, workers=0, **quiet())


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_build_model_of_torchvision_with_auxiliary_heads_returns_logits_in_training(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (torchvision warns about their init unless told)
        model = tl.build_model(name, channels=3, classes=4)
    assert model.train()(torch.randn(2, 3, 80, 80)).shape == (2, 4)


def test_build_model_refuses_weights_that_fail_their_checksum(tmp_path):
    tl.save_checkpoint(tmp_path / "c.pt", one_step_state(tl.small_cnn(3, 2)))
    data = bytearray((tmp_path / "c.pt").read_bytes())
    offset = data.index(b"/data/0") + 200  # inside the first tensor's bytes
    data[offset] ^= 0xFF
    (tmp_path / "c.pt").write_bytes(bytes(data))
    with pytest.raises(tl.CheckpointError, match="fails its checksum"):
        tl.build_model("smallcnn", channels=3, classes=2, weights=str(tmp_path / "c.pt"))


def test_image_files_out_of_memory_is_not_blamed_on_the_file(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "pets", per_class=1)

    def read_image(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9")

    monkeypatch.setattr(tl, "_read_image", read_image)
    files = tl._ImageFiles([(tmp_path / "pets" / "cat" / "0.png", 0)], 8, False, 1.0)
    with pytest.raises(RuntimeError) as failed:
        files[0]
    assert not isinstance(failed.value, tl.UsageError) and tl._is_oom(failed.value)


def test_metrics_jsonl_writes_a_nan_as_null(tmp_path):
    nan = {"odd": lambda output, target: float("nan")}
    fit_mlp(16, blobs(16), epochs=1, metrics=nan, out=tmp_path)
    line = (tmp_path / "metrics.jsonl").read_text()
    row = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert row["val_odd"] is None


def test_cli_eval_only_out_of_memory_is_one_line_with_its_status(tmp_path, monkeypatch):
    args = ["--epochs", "1", "--batch-size", "64", "--workers", "0", "--out", "run"]
    cli_args = args + ["--image-size", "8"]
    small = functools.partial(tl.synthetic_images, train_size=256, val_size=64)
    monkeypatch.setattr(tl, "synthetic_images", small)  # a run to evaluate, in a second
    assert cli(cli_args, tmp_path, monkeypatch).exit_code == 0

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")

    monkeypatch.setattr(tl, "evaluate", out_of_memory)
    result = cli(cli_args + ["--eval-only"], tmp_path, monkeypatch)
    assert result.exit_code == tl.EXIT_MEMORY, result.output  # (1, and a traceback)
    assert "out of memory on cpu evaluating run/best.pt at --batch-size 64; use a smaller " in (
        result.output
    )


def test_cli_resume_refuses_a_compressed_checkpoint_before_loading_any_of_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    fit_mlp(32, epochs=1, out=out)
    with zipfile.ZipFile(out / "last.pt") as src:
        entries = [(info.filename, src.read(info.filename)) for info in src.infolist()]
    with zipfile.ZipFile(out / "last.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in entries:  # a zip bomb's shape: it inflates when torch.load reads it
            dst.writestr(name, data)
    loaded = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loaded.append(args))
    assert tl._resumed_settings(tl.Config(out=str(out))) == (tl.Config(out=str(out)), None)
    assert loaded == []  # (torch.load inflated it before the archive was checked)


def test_cli_resumed_run_keeps_its_normalization_and_needs_no_weights_file(tmp_path, monkeypatch):
    from PIL import Image

    make_image_folder(tmp_path / "pets", per_class=10)
    torch.save(tl.small_cnn(3, 5).state_dict(), tmp_path / "start.pt")
    args = ["--data", "pets", "--batch-size", "8", "--workers", "0", "--out", "run"]
    first = cli(args + ["--epochs", "1", "--weights", "start.pt"], tmp_path, monkeypatch)
    assert first.exit_code == 0, first.output
    (tmp_path / "start.pt").unlink()  # the checkpoint holds the weights now
    for i in range(20):  # the folder grows brighter: its measured mean moves
        Image.new("RGB", (8, 8), "white").save(tmp_path / "pets" / "dog" / f"white{i}.png")
    result = cli(args + ["--epochs", "2", "--weights", "start.pt"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output  # (no such file)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["mean"]
    in_use = (ckpt["model"]["0.mean"].flatten() / 255).tolist()
    assert [float(v) for v in recorded.split(",")] == pytest.approx(in_use, abs=1e-6)  # (newly
    assert ckpt["config"]["mean"] == recorded  # measured values were recorded, not those in use)
    evaluated = cli(args + ["--eval-only"], tmp_path, monkeypatch)
    assert evaluated.exit_code == 0, evaluated.output
    other = cli(args + ["--epochs", "3", "--mean", "0.5"], tmp_path, monkeypatch)
    assert other.exit_code == 2 and "--mean 0.5: run/last.pt normalizes with" in other.output


def test_resumed_settings_take_a_checkpoint_from_before_mean_and_std(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"config": {"seed": 0, "model": "smallcnn"}}, path)  # (KeyError: 'mean')
    config, ckpt = tl._resumed_settings(tl.Config(resume=str(path)))
    assert config == tl.Config(resume=str(path)) and ckpt == {"path": path, "trainloop": None}
    torch.save(nn.Linear(2, 2).state_dict(), path)  # no checkpoint at all: fit says so
    assert tl._resumed_settings(tl.Config(resume=str(path))) == (tl.Config(resume=str(path)), None)


# ---- resume, preemption, integrity -----------------------------------------------------------

# A training job in its own process. It sends itself `signal` on its `signal_at`-th call of the
# loss (any point of training or evaluation), as a crash or a preemption would.
JOB = textwrap.dedent("""
    import json, os, signal, sys, time
    import torch, torch.nn as nn
    import trainloop as tl

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as when started from a shell
    opts = json.loads(sys.argv[1])
    signal_at, signum = opts.pop("signal_at", 0), opts.pop("signal", 9)
    repeat, data = opts.pop("repeat", 1), opts.pop("data", "tensors")
    echo = opts.pop("echo", False)  # the same signal again at once, as torchrun forwards it
    if data == "tensors":
        n = opts.pop("n", 384)
        (x, y), (xv, yv) = tl.synthetic_images(0, train_size=n, val_size=64, size=8)
        train, val = tl._ImageTensors(x, y, augment_pad=1), tl._ImageTensors(xv, yv)
    else:  # uint8 images at 16 px, which the model normalizes (as build_model's would)
        train, val, info = tl.load_data(tl.Config(data=data, seed=0, image_size=16))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, 10))
    if data != "tensors":
        model = nn.Sequential(tl._Normalize(info["mean"], info["std"]), model)
    calls = 0

    def loss_fn(output, target):
        global calls
        calls += 1
        if calls == signal_at:
            for i in range(repeat):
                if i:  # a person pressing Ctrl-C again; quicker repeats are echoes
                    # Wait in Python, not in time.sleep: the signal may land on another
                    # thread, and only Python code runs the pending handler at once.
                    until = time.monotonic() + 1.2
                    while time.monotonic() < until:
                        pass
                os.kill(os.getpid(), signum)
            if echo:
                os.kill(os.getpid(), signum)
        return nn.functional.cross_entropy(output, target)

    tl.fit(model, train, val, loss_fn=loss_fn, quiet=True, **opts)
""")


def run_job(tmp_path, **opts):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), json.dumps(opts)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def history_without_time(path):
    return [
        {k: v for k, v in row.items() if k != "seconds"}
        for row in torch.load(path, weights_only=True)["history"]
    ]


@pytest.mark.parametrize(
    "data,workers,accumulate,calls",
    [
        ("tensors", 0, 1, 60),  # 48 steps an epoch; kill within the first 60 loss calls
        ("folder", 2, 1, 14),  # 9 steps an epoch, images read by two worker processes
        ("folder", 0, 1, 14),  # the same, read in the main process
        ("tensors", 0, 3, 60),  # gradient accumulation over 3 micro-batches
    ],
)
@pytest.mark.slow
def test_sigkill_twice_then_resume_is_bit_identical(tmp_path, data, workers, accumulate, calls):
    label = f"{data}-{workers}-{accumulate}"
    if data == "folder":
        data = str(make_image_folder(tmp_path / "pets", per_class=40))
    opts = dict(
        data=data, epochs=3, batch_size=8, save_every=3, workers=workers, accumulate=accumulate
    )
    reference = run_job(tmp_path, out=str(tmp_path / "ref"), **opts)
    assert reference.returncode == 0, reference.stderr
    rng = random.Random(label)
    out = str(tmp_path / "killed")
    for _ in range(2):
        killed = run_job(tmp_path, out=out, signal_at=rng.randint(2, calls), **opts)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_job(tmp_path, out=out, **opts)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(tmp_path / "ref" / "last.pt", Path(out) / "last.pt")
    assert history_without_time(tmp_path / "ref" / "last.pt") == history_without_time(
        Path(out) / "last.pt"
    )


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_resumes_exactly(tmp_path):
    opts = dict(epochs=2, batch_size=16)
    assert run_job(tmp_path, out=str(tmp_path / "ref"), **opts).returncode == 0
    out = tmp_path / "run"
    stopped = run_job(tmp_path, out=str(out), signal_at=7, signal=signal.SIGTERM, **opts)
    assert stopped.returncode == 143, stopped.stderr
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 7 and ckpt["epoch"] == 0  # the step in progress was finished
    assert run_job(tmp_path, out=str(out), **opts).returncode == 0
    assert_same_state(tmp_path / "ref" / "last.pt", out / "last.pt")


@pytest.mark.slow
def test_sigusr1_and_sigint_also_checkpoint_and_stop(tmp_path):
    for signum in (signal.SIGUSR1, signal.SIGINT):
        out = tmp_path / signum.name
        stopped = run_job(tmp_path, out=str(out), signal_at=3, signal=signum, epochs=1)
        assert stopped.returncode == 128 + signum, stopped.stderr
        assert torch.load(out / "last.pt", weights_only=True)["step"] == 3


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_without_checkpoint(tmp_path):
    out = tmp_path / "run"
    stopped = run_job(tmp_path, out=str(out), signal_at=3, signal=signal.SIGINT, repeat=2)
    assert stopped.returncode in (-signal.SIGINT, 130)  # KeyboardInterrupt, not a checkpoint
    assert not (out / "last.pt").exists()


@pytest.mark.slow
def test_echoed_signal_still_checkpoints(tmp_path):
    out = tmp_path / "run"
    echoed = run_job(tmp_path, out=str(out), signal_at=3, signal=signal.SIGINT, repeat=1, echo=True)
    assert echoed.returncode == 130, echoed.stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3


# SIGTERM to the whole process group, as from scancel, systemd or `kill -TERM -PGID`, while the
# loader waits for its workers: they read epoch 2 only after the last step of epoch 1 says "go",
# then print "reading" and wait for the signal, which ends them too.
WAITS_FOR_ITS_WORKERS = textwrap.dedent("""
    import os, sys, threading
    from pathlib import Path
    import torch, torch.nn as nn
    import trainloop as tl

    class Waits(torch.utils.data.Dataset):
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            if Path("go").exists():
                os.write(1, b"reading\\n")  # one write: the workers' lines do not mix
                threading.Event().wait()
            return self.data[i]

    calls = []

    def loss_fn(output, target):
        calls.append(1)
        if len(calls) == 12 and sys.argv[1:] == ["go"]:  # the last step of epoch 1
            Path("go").touch()
        return nn.functional.cross_entropy(output, target)

    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
    train = Waits(torch.utils.data.TensorDataset(x, torch.arange(96) % 3))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opts = dict(loss_fn=loss_fn, epochs=2, batch_size=8, workers=2, out="run", quiet=True)
    sys.exit(tl._exit_code_of(lambda: tl.fit(model, train, **opts) and 0))
""")


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_with_143_though_the_loader_workers_die(tmp_path):
    script = tmp_path / "waits.py"
    script.write_text(WAITS_FOR_ITS_WORKERS)
    proc = start([sys.executable, str(script), "go"], tmp_path, start_new_session=True)
    assert proc.stdout.readline() == "reading\n"  # the loader waits for a worker
    os.killpg(proc.pid, signal.SIGTERM)
    stopped = finish(proc, tmp_path)
    assert stopped.returncode == 143, stopped.stderr
    assert (
        "stopped: SIGTERM received at step 12 (the end of epoch 1); checkpoint run/last.pt;"
        in stopped.stdout
    )
    ckpt = tl.load_checkpoint(tmp_path / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 12)
    (tmp_path / "go").unlink()
    resumed = run([sys.executable, str(script)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert tl.load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 24


def test_catch_signals_leaves_an_ignored_signal_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup or in background
    try:
        with tl._catch_signals(tl._Stop()):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # caught
    finally:
        signal.signal(signal.SIGINT, previous)


SAVER = textwrap.dedent("""
    import sys, torch, torch.nn as nn
    import trainloop as tl
    model = nn.Linear(1024, 2048)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = tl.TrainState(model, opt, sched)
    for step in range(10**6):
        state.step = step
        with torch.no_grad():
            model.weight.fill_(step)
        tl.save_checkpoint(sys.argv[1], state)
        print(step, flush=True)
""")


@pytest.mark.slow
def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    (tmp_path / "saver.py").write_text(SAVER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    path = tmp_path / "last.pt"
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "saver.py"), str(path)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(rng.randint(1, 3)):  # wait for whole saves to finish...
            proc.stdout.readline()
        time.sleep(rng.uniform(0, 0.05))  # ...then pick a random instant, mostly mid-save
        proc.kill()
        proc.wait()
        loadable = [p for p in (path, tl._previous(path)) if p.exists()]
        assert loadable
        ckpt = tl.load_checkpoint(loadable[0])  # the newest file present is always whole
        assert ckpt["model"]["weight"].eq(ckpt["step"]).all()  # of one save, not a mix
    with tl._run_directory(tl.Config(out=str(tmp_path)), CPU):
        pass
    assert not list(tmp_path.glob(".*.tmp"))  # what killed saves left behind is cleaned up


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    torch.save({"model": Evil(marker), "checksum": "x"}, tmp_path / "evil.pt")
    with pytest.raises(tl.CheckpointError, match="refused"):
        tl.load_checkpoint(tmp_path / "evil.pt")
    result = cli(["--resume", "evil.pt", "--epochs", "1"], tmp_path, monkeypatch)
    assert result.exit_code == 3 and "evil.pt refused" in result.output
    assert not marker.exists()
    torch.save({"format": 2, "model": Stopwatch()}, tmp_path / "object.pt")
    with pytest.raises(tl.CheckpointError, match="GLOBAL test_trainloop.Stopwatch") as refused:
        tl.load_checkpoint(tmp_path / "object.pt")
    assert "add_safe_globals" not in str(refused.value)  # torch's advice to trust it is not ours


def saved_checkpoint(tmp_path) -> Path:
    path = tmp_path / "c.pt"
    tl.save_checkpoint(path, one_step_state(mlp()))
    return path


def test_compressed_archive_entry_is_refused_before_loading(tmp_path):
    path = saved_checkpoint(tmp_path)
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(tl.CheckpointError, match="compressed"):
        tl.load_checkpoint(packed)


def test_flipped_byte_and_truncation_are_reported_as_corrupt(tmp_path):
    path = saved_checkpoint(tmp_path)
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda i: i.file_size)
    blob = bytearray(path.read_bytes())
    offset = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra)
    blob[offset + entry.file_size // 2] ^= 0x01
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(blob))
    with pytest.raises(tl.CheckpointError, match="flipped.pt is corrupt"):
        tl.load_checkpoint(flipped)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: len(blob) // 2])
    with pytest.raises(tl.CheckpointError, match="truncated.pt is corrupt or truncated"):
        tl.load_checkpoint(truncated)


@pytest.mark.parametrize("where", ["encrypted flag", "name length"])
def test_damaged_zip_headers_are_reported_as_corrupt_and_resume_falls_back(where, tmp_path):
    out = tmp_path / "run"
    fit_mlp(64, epochs=2, out=out)
    blob = bytearray((out / "last.pt").read_bytes())
    if where == "encrypted flag":  # zipfile: RuntimeError "... is encrypted, password required"
        blob[blob.find(b"PK\x01\x02") + 8] ^= 1
    else:  # the high byte of the first entry's name length: UnicodeDecodeError
        blob[27] ^= 1
    (out / "last.pt").write_bytes(bytes(blob))
    with pytest.raises(tl.CheckpointError, match="last.pt is corrupt or truncated"):
        tl.load_checkpoint(out / "last.pt")  # (a traceback, and no fallback)
    lines = []
    history = fit_mlp(64, epochs=3, out=out, log=lines.append)
    assert [r["epoch"] for r in history] == [1, 2, 3]  # epoch 1 from last.prev.pt
    assert any("falling back to" in line for line in lines), lines


@pytest.mark.parametrize(
    "key, value",
    [("step", "x"), ("epoch", -1), ("epoch_loss", []), ("rng", []), ("history", None)]
    + [("world_size", 1.5), ("scheduler", {}), ("model", None), ("optimizer", 5)]
    + [("best", "x"), ("lr", "x"), ("best_epoch", ...), ("classes", 7)],  # ...: deleted
)
def test_a_checkpoint_edited_by_hand_is_one_line_and_resume_falls_back(key, value, tmp_path):
    out = tmp_path / "run"
    fit_mlp(64, epochs=2, out=out)
    edited = torch.load(out / "last.pt", weights_only=True)
    edited[key] = value  # (tracebacks before: KeyError, TypeError, IndexError, AttributeError)
    if value is ...:
        del edited[key]
    torch.save(edited, out / "last.pt")
    with pytest.raises((tl.CheckpointError, tl.UsageError), match=r"last\.pt (holds|does not)"):
        fit_mlp(64, epochs=3, out=out, resume=out / "last.pt")
    if key == "scheduler":  # another scheduler's state: not skipped
        return
    lines = []
    history = fit_mlp(64, epochs=3, out=out, log=lines.append)
    assert [r["epoch"] for r in history] == [1, 2, 3]  # epoch 1 from last.prev.pt
    said = (
        f"(trainloop {tl.__version__}, or edited by hand)" if value is ... else "(edited by hand?)"
    )
    assert f"{said}; falling back to" in lines[0], lines


@pytest.mark.parametrize("key, value", [("model", None), ("optimizer", {"param_groups": None})])
def test_load_checkpoint_of_a_damaged_state_dict_is_one_line(key, value, tmp_path):
    state = one_step_state(mlp())
    tl.save_checkpoint(tmp_path / "c.pt", state, runtime=CPU)
    edited = torch.load(tmp_path / "c.pt", weights_only=True)
    edited[key] = value
    torch.save(edited, tmp_path / "c.pt")
    with pytest.raises(tl.UsageError, match=r"c\.pt does not match this model, optimizer or sch"):
        tl.load_checkpoint(tmp_path / "c.pt", one_step_state(mlp()), runtime=CPU)


def test_fit_resumes_a_users_checkpoint_with_a_tensor_best_and_a_config_of_its_own(tmp_path):
    def parts():
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 5)

    model, optimizer, scheduler = parts()
    state = tl.TrainState(model, optimizer, scheduler)
    tl.train_step(state, [blobs(16)[:]], runtime=CPU)
    state.best = torch.tensor(0.5)  # a user's val loss; fit recomputes best from history
    tl.save_checkpoint(tmp_path / "mine.pt", state, runtime=CPU, config="configs/mlp.yaml")
    model, optimizer, scheduler = parts()
    settings = dict(optimizer=optimizer, scheduler=scheduler, resume=tmp_path / "mine.pt")
    history = tl.fit(model, blobs(32), epochs=2, batch_size=16, **settings, **quiet())
    assert [r["epoch"] for r in history] == [1, 2]  # (refused as edited by hand; a traceback)
    config = tl.Config(resume=str(tmp_path / "mine.pt"))  # the command line's first look
    assert tl._resumed_settings(config)[0] == config  # (AttributeError)
    edited = torch.load(tmp_path / "mine.pt", weights_only=True)
    edited["config"] = {"mean": 7, "seed": 3}  # by hand: fit resumes it, as it holds no mean
    torch.save(edited, tmp_path / "mine.pt")
    assert tl._resumed_settings(config)[0] == config  # (AttributeError)


def test_mid_epoch_checkpoint_records_the_time_spent_in_its_epoch(tmp_path):
    fit_mlp(80, epochs=1, save_every=2, out=tmp_path)  # saves at steps 2 and 4, then 5
    mid_epoch = tl.load_checkpoint(tmp_path / "last.prev.pt")
    # (it was 0: an epoch resumed from it reported only the seconds after the resume)
    assert mid_epoch["step"] == 4 and mid_epoch["epoch_seconds"] > 0


def test_resume_auto_falls_back_to_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    fit_mlp(64, epochs=2, out=str(out))
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:100])
    lines = []
    history = tl.fit(
        mlp(), blobs(64), epochs=3, batch_size=16, out=str(out), quiet=True, log=lines.append
    )
    assert any("falling back to" in line and "last.prev.pt" in line for line in lines)
    assert [r["epoch"] for r in history] == [1, 2, 3]  # epoch 1 from last.prev.pt, then 2, 3
    assert (out / "last.corrupt.pt").is_file()  # set aside, never rotated over a good file
    tl.load_checkpoint(out / "last.prev.pt")


def test_resume_auto_with_every_checkpoint_corrupt_names_both_ways_out(tmp_path):
    out, lines = tmp_path / "run", []
    fit_mlp(epochs=2, out=str(out))
    for name in ("last.pt", "last.prev.pt"):
        (out / name).write_bytes((out / name).read_bytes()[:100])
    with pytest.raises(tl.CheckpointError) as failed:
        fit_mlp(epochs=3, out=str(out), log=lines.append)
    last, prev = (re.escape(str(out / name)) for name in ("last.pt", "last.prev.pt"))
    assert len(lines) == 1 and re.fullmatch(  # the fallback is automatic: no advice to take
        rf"warning: {last} is corrupt or truncated \([^;]*\); falling back to {prev}", lines[0]
    ), lines
    assert re.fullmatch(
        rf"{prev} is corrupt or truncated \([^;]*\); resume from another checkpoint "
        r"\(resume=PATH\) or start over \(resume='none'\)",
        str(failed.value),
    ), failed.value


def test_resume_auto_without_a_checkpoint_warns_before_replacing_an_earlier_run(tmp_path):
    out, first, lines = tmp_path / "run", [], []
    fit_mlp(epochs=1, out=str(out), log=first.append)
    assert not any("warning" in line for line in first)  # a new run directory
    (out / "last.pt").unlink()  # and no last.prev.pt after one epoch
    fit_mlp(epochs=1, out=str(out), log=lines.append)
    assert lines[0] == (
        f"warning: {out} has no checkpoint to resume (last.pt); starting over, replacing best.pt "
        "and metrics.jsonl"
    ), lines


def test_resume_with_changed_settings_warns_naming_them(tmp_path):
    out = str(tmp_path / "run")
    fit_mlp(64, epochs=1, out=out)
    lines = []
    tl.fit(mlp(), blobs(64), epochs=2, batch_size=8, out=out, log=lines.append)
    warning = next(line for line in lines if line.startswith("warning: resuming"))
    assert "batch_size 16 -> 8" in warning


def test_resume_warns_of_no_change_that_leaves_the_run_as_it_was(tmp_path):
    def scheduler(optimizer):  # the user's own: epochs and schedule are not what drives it
        return torch.optim.lr_scheduler.StepLR(optimizer, 4)

    out, lines = str(tmp_path / "run"), []
    fit_mlp(epochs=1, out=out, gpus="cpu", scheduler=scheduler)
    fit_mlp(epochs=2, out=out, gpus="", schedule="step", scheduler=scheduler, log=lines.append)
    assert not any(line.startswith("warning") for line in lines), lines  # any gpus, one device
    fit_mlp(epochs=3, out=out, scheduler=scheduler, momentum=0.5, log=lines.append)
    assert "momentum 0.9 -> 0.5" in lines[-2] and "epochs" not in lines[-2], lines


def test_resume_of_a_users_scheduler_without_it_names_trainloops_own(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    onecycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=8)
    tl.fit(model, blobs(64), epochs=1, optimizer=optimizer, scheduler=onecycle, out=tmp_path)
    with pytest.raises(tl.UsageError, match=r"OneCycleLR, not LambdaLR \(trainloop's own sch"):
        fit_mlp(64, epochs=2, out=tmp_path)
    model = mlp()
    state = tl.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))  # none at all
    with pytest.raises(tl.UsageError, match="OneCycleLR, not None; pass the same kind"):
        tl.load_checkpoint(tmp_path / "last.pt", state)


@pytest.mark.parametrize("change", [dict(batch_size=32), dict(accumulate=2), dict(batch_size=8)])
def test_resume_with_another_epoch_length_goes_on_with_the_schedule(tmp_path, change):
    """The cosine schedule continues from the share of training done, as if the whole run had
    had the new number of steps per epoch (it ran past its end, at lr 0, before)."""
    fit_mlp(64, epochs=1, batch_size=16, out=tmp_path / "run")
    resumed = fit_mlp(64, epochs=2, **{"batch_size": 16, **change}, out=tmp_path / "run")
    fresh = fit_mlp(64, epochs=2, **{"batch_size": 16, **change})
    assert resumed[1]["lr"] == pytest.approx(fresh[1]["lr"]) and resumed[1]["lr"] > 0


def test_resume_applies_a_new_lr_and_warns(tmp_path):
    out = str(tmp_path / "run")
    tl.fit(
        mlp(), blobs(64), epochs=1, batch_size=16, lr=0.05, schedule="constant", out=out, **quiet()
    )
    lines = []
    history = tl.fit(
        mlp(),
        blobs(64),
        epochs=2,
        batch_size=16,
        lr=0.5,
        schedule="constant",
        out=out,
        quiet=True,
        log=lines.append,
    )
    assert [r["lr"] for r in history] == [0.05, 0.5]
    assert any("lr 0.05 -> 0.5" in line for line in lines)


def test_resume_warns_when_epochs_change_the_schedule(tmp_path):
    out = str(tmp_path / "run")
    fit_mlp(64, epochs=1, out=out)
    lines = []
    tl.fit(mlp(), blobs(64), epochs=2, batch_size=16, out=out, quiet=True, log=lines.append)
    assert any("epochs 1 -> 2" in line for line in lines)


def test_resume_turning_ema_on_starts_it_from_the_trained_weights(tmp_path):
    out = str(tmp_path / "run")
    trained = mlp()
    tl.fit(trained, blobs(64), epochs=1, batch_size=16, out=out, **quiet())
    # One more epoch with the EMA on and an LR too small to move the weights.
    fit_mlp(64, epochs=2, lr=1e-12, out=out, ema=0.999)
    ema = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["ema"]
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(ema[key], value)  # not pulled back toward a random init


def test_resume_from_a_weights_only_file_says_so(tmp_path, monkeypatch):
    tl.fit(
        mlp(), blobs(32), blobs(16), epochs=1, batch_size=16, out=str(tmp_path / "run"), **quiet()
    )
    with pytest.raises(tl.UsageError, match="holds weights only"):
        fit_mlp(32, epochs=1, resume=str(tmp_path / "run" / "best.pt"))


def test_kill_between_best_and_last_leaves_a_consistent_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save = tl._atomic_save

    def dies_at_the_last_epochs_checkpoint(payload, path, checkpoint=None):
        if path.name == "last.pt" and payload["epoch"] == 2:
            raise KeyboardInterrupt  # as if killed between best.pt and last.pt
        return save(payload, path, checkpoint)

    monkeypatch.setattr(tl, "_atomic_save", dies_at_the_last_epochs_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        tl.fit(
            mlp(),
            blobs(64),
            blobs(32),
            epochs=2,
            batch_size=16,
            monitor="train_loss",
            out=str(out),
            **quiet(),
        )
    monkeypatch.undo()
    history = tl.fit(
        mlp(),
        blobs(64),
        blobs(32),
        epochs=2,
        batch_size=16,
        monitor="train_loss",
        out=str(out),
        **quiet(),
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and len(history) == 2
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 2


def test_nan_validation_metric_never_counts_as_the_best(tmp_path):
    nan_first = {"odd": lambda output, target: torch.tensor(float("nan"))}
    history = tl.fit(
        mlp(),
        blobs(64),
        blobs(32),
        epochs=3,
        batch_size=16,
        patience=2,
        monitor="val_odd",
        monitor_mode="min",  # a name that says no direction needs one
        metrics=nan_first,
        **quiet(),
    )
    assert len(history) == 2  # nothing improved from the start: stopped after patience


def test_finished_run_resumed_again_does_not_train_more(tmp_path):
    out = str(tmp_path / "run")
    first = fit_mlp(64, epochs=2, out=out)
    again = fit_mlp(64, epochs=2, out=out)
    assert again == first


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = []

    def poisoned(output, target):
        calls.append(1)
        loss = F.cross_entropy(output, target)
        return loss * float("nan") if len(calls) == 5 else loss

    out = tmp_path / "run"
    with pytest.raises(tl.NonFiniteLossError, match="at step 5"):
        tl.fit(
            mlp(),
            blobs(160),
            epochs=1,
            batch_size=16,
            save_every=2,
            log_every=3,
            loss_fn=poisoned,
            out=str(out),
            **quiet(),
        )
    ckpt = tl.load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_fit_nan_validation_loss_stops_before_the_epoch_is_saved(tmp_path):
    # One step at a huge LR: its training loss (before the update) is finite, the weights too,
    # but the outputs overflow (the run ended with exit 0, val_loss null and a best.pt).
    with pytest.raises(tl.NonFiniteLossError, match="validation loss is nan after epoch 1, w"):
        fit_mlp(16, blobs(16), epochs=1, lr=1e30, out=tmp_path)
    assert not list(tmp_path.glob("*.pt"))


def test_cli_nan_loss_gives_the_fix_in_flags(tmp_path, monkeypatch):
    result = cli(["--epochs", "1", "--lr", "1e6", "--workers", "0"], tmp_path, monkeypatch)
    assert result.exit_code == tl.EXIT_NONFINITE
    assert re.search(
        r"at step \d+ \(epoch 1\) and no checkpoint was written after it; lower the learning "
        r"rate below --lr 1e\+06, use --clip-grad 1.0, or check the data",
        result.output,
    ), result.output


def test_exit_statuses_for_each_kind_of_failure(capsys):
    def raising(error):
        def job():
            raise error

        return job

    assert tl._exit_code_of(raising(tl.UsageError("bad"))) == 2
    assert tl._exit_code_of(raising(tl.CheckpointError("x.pt is corrupt"))) == 3
    assert tl._exit_code_of(raising(tl.NonFiniteLossError("nan"))) == 4
    assert "trainloop: error: x.pt is corrupt" in capsys.readouterr().err


class Stream(torch.utils.data.IterableDataset):
    """An iterable data set, which cannot seek."""

    def __init__(self, n):
        self.data = blobs(n)

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        return iter(self.data)


class Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(blobs(16))


def test_fit_resumes_mid_epoch_on_an_iterable_dataset(tmp_path):
    def stop_at_third_step(output, target):
        stop_at_third_step.calls += 1
        if stop_at_third_step.calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return F.cross_entropy(output, target)

    stop_at_third_step.calls = 0
    loader = DataLoader(Stream(64), batch_size=8)
    with pytest.raises(tl.Stopped):
        tl.fit(mlp(), loader, epochs=1, loss_fn=stop_at_third_step, out=str(tmp_path), **quiet())
    history = tl.fit(mlp(), loader, epochs=1, out=str(tmp_path), **quiet())
    assert history[0]["step"] == 8  # 3 steps before the stop, the 5 unseen ones after it


def test_fit_batches_a_bare_iterable_dataset():
    history = tl.fit(mlp(), Stream(64), epochs=1, batch_size=16, **quiet())
    assert history[0]["step"] == 4
    lines, two = [], tl.Runtime(torch.device("cpu"), world_size=2)
    tl._as_loader(Stream(64), tl.Config(), two, True, tl._Console(lines.append))
    assert "your IterableDataset is read whole by every process" in lines[0]  # (no warning)


def test_fit_iterable_dataset_without_length_is_a_usage_error():
    with pytest.raises(tl.UsageError, match="has no length"):
        tl.fit(mlp(), DataLoader(Endless(), batch_size=8), **quiet())


def test_fit_from_code_raises_stopped_with_the_signal_status(tmp_path):
    def interrupting(output, target):
        if not interrupting.sent:
            interrupting.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return F.cross_entropy(output, target)

    interrupting.sent = False
    with pytest.raises(tl.Stopped) as stopped:
        tl.fit(
            mlp(),
            blobs(64),
            epochs=1,
            batch_size=16,
            loss_fn=interrupting,
            out=str(tmp_path),
            **quiet(),
        )
    assert stopped.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers were restored


# ---- speed: host syncs, precision ------------------------------------------------------------


def count_host_syncs(monkeypatch, samples: int) -> int:
    """Calls that copy a tensor's value to the host, during one epoch of fit."""
    calls = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        tl.fit(mlp(), blobs(samples), epochs=1, batch_size=8, log_every=10**6, **quiet())
    finally:
        monkeypatch.undo()
    return len(calls)


def test_fit_host_syncs_do_not_grow_with_steps(monkeypatch):
    few = count_host_syncs(monkeypatch, 8 * 4)
    many = count_host_syncs(monkeypatch, 8 * 64)
    assert few == many > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_fit_each_precision_trains_on_cpu(precision, tmp_path):
    history = tl.fit(
        mlp(),
        blobs(192),
        blobs(64),
        epochs=3,
        batch_size=16,
        lr=0.05,
        precision=precision,
        out=str(tmp_path),
        **quiet(),
    )
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] > 0.8
    scaler = torch.load(tmp_path / "last.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (precision == "fp16")  # the fp16 loss scale is checkpointed


def test_fit_compile_trains_and_saves_plain_weights(tmp_path):
    history = tl.fit(
        mlp(),
        blobs(96),
        blobs(32),
        epochs=2,
        batch_size=16,
        compile=True,
        out=str(tmp_path),
        **quiet(),
    )
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    keys = list(torch.load(tmp_path / "last.pt", weights_only=True)["model"])
    assert keys == list(mlp().state_dict())  # no _orig_mod. prefix


@pytest.mark.slow
def test_fit_channels_last_matches_the_default_layout(tmp_path):
    train, val = tiny_images(64)
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = tl.small_cnn(3, 10)
        history = tl.fit(
            model, train, val, epochs=1, batch_size=16, channels_last=channels_last, **quiet()
        )
        results.append((history[0]["val_loss"], model))
    (loss_a, model_a), (loss_b, model_b) = results
    assert model_b[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert loss_a == pytest.approx(loss_b, rel=1e-4)


def test_default_workers_leaves_a_core_for_training(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert tl.default_workers(1) == 8  # capped
    assert tl.default_workers(4) == 3  # 16 cores / 4 processes, one of each 4 trains
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert tl.default_workers(1) == 0


# ---- progress, logs, schedules, early stopping -----------------------------------------------


def test_fit_log_lines_are_plain_key_values(tmp_path):
    lines = []
    tl.fit(
        mlp(),
        blobs(96),
        blobs(32),
        epochs=2,
        batch_size=16,
        log_every=2,
        out=str(tmp_path),
        log=lines.append,
    )
    progress = [line for line in lines if " step=" in line and "train_loss" not in line]
    summaries = [line for line in lines if "train_loss=" in line]
    assert progress[0].startswith("epoch=1/2 step=2/6 loss=")
    assert "samples_per_s=" in progress[0] and "eta=" in progress[0]
    assert len(progress) == 6  # every 2 of 6 steps, twice
    assert [s.split()[0] for s in summaries] == ["epoch=1/2", "epoch=2/2"]
    for key in ("train_loss=", "val_loss=", "val_acc=", "lr=", "seconds="):
        assert key in summaries[0]
    assert lines[-1].startswith("done: best val_acc=") and "best.pt" in lines[-1]
    assert not any("\x1b" in line for line in lines)


def test_fit_train_loss_is_the_sample_weighted_mean_over_the_epoch():
    model, data = mlp(), blobs(100)  # batches of 16: the last one has 4 samples
    history = tl.fit(model, data, epochs=1, batch_size=16, lr=1e-12, log_every=3, **quiet())
    x, y = data.tensors
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y).item()
    assert history[0]["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_fit_quiet_prints_only_the_final_summary():
    lines = []
    tl.fit(mlp(), blobs(64), blobs(32), epochs=2, batch_size=16, quiet=True, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("done:")


@pytest.mark.slow
def test_cli_on_a_terminal_draws_a_progress_bar(tmp_path):
    make_image_folder(tmp_path / "pets", per_class=20)
    primary, secondary = os.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "trainloop.py"),
            "--data",
            "pets",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--workers",
            "0",
        ],
        cwd=tmp_path,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm"},
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    output = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in output  # the live bar
    assert "epoch=1/1 step=" in output and "done: best val_acc=" in output


@pytest.mark.parametrize(
    "schedule,step,expected",
    [
        ("constant", 50, 1.0),
        ("cosine", 0, 1.0),
        ("cosine", 50, 0.5),
        ("cosine", 100, 0.0),
        ("step", 49, 1.0),
        ("step", 50, 0.1),
        ("step", 75, 0.01),
        ("onecycle", 0, 1 / 25),
        ("onecycle", 30, 1.0),
    ],
)
def test_lr_factor_at_known_steps(schedule, step, expected):
    assert tl._lr_factor(schedule, 100, 0, step) == pytest.approx(expected, abs=1e-12)


def test_lr_factor_warmup_is_linear_then_the_schedule():
    factors = [tl._lr_factor("cosine", 110, 10, s) for s in range(12)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)


def test_fit_logs_the_lr_that_was_applied():
    model = mlp()
    history = tl.fit(
        model, blobs(64), epochs=4, batch_size=16, lr=0.1, schedule="step", warmup=0, **quiet()
    )
    # 4 steps an epoch, 16 in all: the last step of each epoch is step 3, 7, 11, 15.
    expected = [0.1 * tl._lr_factor("step", 16, 0, s) for s in (3, 7, 11, 15)]
    assert [r["lr"] for r in history] == pytest.approx(expected)


def test_fit_early_stopping_stops_at_the_right_epoch(tmp_path):
    constant = {"const": lambda output, target: torch.tensor(1.0)}
    history = tl.fit(
        mlp(),
        blobs(64),
        blobs(32),
        epochs=10,
        batch_size=16,
        patience=2,
        monitor="val_const",
        monitor_mode="min",
        metrics=constant,
        out=str(tmp_path),
        **quiet(),
    )
    assert [r["epoch"] for r in history] == [1, 2, 3]  # best at 1; no better for 2 epochs
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1


def test_fit_patience_without_validation_is_a_usage_error():
    with pytest.raises(tl.UsageError, match="patience needs validation data"):
        fit_mlp(32, patience=2)
    history = fit_mlp(32, epochs=6, patience=1, monitor="train_loss", lr=10.0)  # it diverges
    assert len(history) < 6  # an explicit train_loss may be watched (it was refused)


def test_fit_monitor_no_epoch_reports_is_refused_after_saving_the_epoch(tmp_path):
    x = torch.randn(64, 4)
    data = TensorDataset(x, x.sum(1, keepdim=True))  # regression: no val_acc
    run = dict(loss_fn=F.mse_loss, batch_size=16, out=str(tmp_path), **quiet())
    with pytest.raises(tl.UsageError, match="monitor='val_acc' is not a reported metric"):
        tl.fit(nn.Linear(4, 1), data, data, epochs=2, monitor="val_acc", **run)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1  # (it was lost)
    history = tl.fit(nn.Linear(4, 1), data, data, epochs=2, monitor="val_loss", **run)
    assert [r["epoch"] for r in history] == [1, 2]


def test_fit_refuses_a_plateau_scheduler_that_would_cut_the_lr_as_accuracy_rises():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = L.ReduceLROnPlateau(optimizer)  # mode='min', but val_acc is monitored
    with pytest.raises(tl.UsageError, match="follows val_acc, which is better when higher; give"):
        tl.fit(model, blobs(32), blobs(16), optimizer=optimizer, scheduler=plateau, **quiet())


def test_fit_leaves_the_ema_weights_it_reports_in_the_model():
    model, val = mlp(), blobs(32, seed=1)
    history = tl.fit(model, blobs(64), val, epochs=2, batch_size=16, ema=0.9, **quiet())
    scores = tl.evaluate(model, DataLoader(val, batch_size=64), runtime=CPU)
    assert scores["loss"] == pytest.approx(history[-1]["val_loss"])  # (the live weights' was not)


@pytest.mark.parametrize(
    "setting,message",
    [
        (dict(eval_only=True), "fit() got eval_only=...: a setting of the command line"),
        (dict(data="mnist"), "fit() got data=...: a setting of the command line"),
        (dict(config=tl.Config(eval_only=True)), "fit() trains; to only evaluate a model, call"),
        (dict(label_smoothing=0.1, loss_fn=F.nll_loss), "label_smoothing is for the default"),
    ],
)
def test_fit_refuses_settings_it_would_ignore(setting, message):
    with pytest.raises(tl.UsageError, match=re.escape(message)):
        fit_mlp(16, **setting)  # (each was silently ignored)


def test_fit_failure_after_a_stop_signal_is_that_stop(tmp_path):
    def failing_peer(output, target):  # a signal, then a collective whose peer stopped alone
        if failing_peer.calls == 5:
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("Connection closed by peer [127.0.0.1]:29500")
        failing_peer.calls += 1
        return F.cross_entropy(output, target)

    failing_peer.calls, lines = 0, []
    with pytest.raises(tl.Stopped) as stopped:
        tl.fit(mlp(), blobs(64), loss_fn=failing_peer, batch_size=16, epochs=3, save_every=0,
               out=tmp_path, quiet=True, log=lines.append)  # fmt: skip
    assert stopped.value.code == 143  # (exit 1 with the gloo error's traceback)
    assert "stopped: SIGTERM received" in lines[-1] and "checkpoint" in lines[-1], lines


def test_fit_stopped_without_out_says_nothing_was_saved():
    def interrupting(output, target):
        os.kill(os.getpid(), signal.SIGTERM)
        return F.cross_entropy(output, target)

    lines = []
    with pytest.raises(tl.Stopped):
        tl.fit(mlp(), blobs(32), loss_fn=interrupting, batch_size=16, quiet=True, log=lines.append)
    assert "nothing was saved (pass out= to be able to continue)" in lines[-1], lines
    assert "run the same command again" not in lines[-1]


def test_fit_label_smoothing_applies_to_the_default_loss():
    model, val = mlp(), blobs(32)
    history = tl.fit(
        model, blobs(32), val, epochs=1, batch_size=16, lr=1e-12, label_smoothing=0.2, **quiet()
    )
    x, y = val.tensors
    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(x), y, label_smoothing=0.2).item()
    assert history[0]["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_fit_without_tensorboard_installed_still_writes_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    fit_mlp(32, epochs=1, out=str(tmp_path))
    assert (tmp_path / "metrics.jsonl").is_file()
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_fit_writes_tensorboard_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit_mlp(32, blobs(16), epochs=2, out=str(tmp_path))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"train_loss", "val_loss", "val_acc", "lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val_acc")] == [2, 4]


# ---- fit for any task ------------------------------------------------------------------------


def test_fit_regression_reports_loss_and_user_metrics_without_accuracy(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.01 * torch.randn(256, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    mae = {"mae": lambda output, target: (output - target).abs().mean()}
    history = tl.fit(
        model,
        TensorDataset(x[:192], y[:192]),
        TensorDataset(x[192:], y[192:]),
        epochs=20,
        batch_size=16,
        lr=0.05,
        loss_fn=F.mse_loss,
        metrics=mae,
        out=str(tmp_path),
        **quiet(),
    )
    last = history[-1]
    assert "val_acc" not in last and {"val_loss", "val_mae"} <= last.keys()
    assert last["val_mae"] < 0.05 and last["val_loss"] < 0.005
    best = torch.load(tmp_path / "best.pt", weights_only=True)["metrics"]
    assert best["val_loss"] == min(r["val_loss"] for r in history)  # monitor auto: val_loss


class DictInputs(Dataset):
    def __init__(self, n=128):
        self.data = blobs(n)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"left": x[:4], "right": x[4:]}, y


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp()

    def forward(self, left, right):
        return self.net(torch.cat([left, right], dim=-1))


def test_fit_dict_inputs_are_passed_as_keywords():
    history = tl.fit(
        TwoInputs(), DictInputs(), DictInputs(64), epochs=4, batch_size=16, workers=0, **quiet()
    )
    assert history[-1]["val_acc"] > 0.9


def test_fit_tuple_inputs_are_passed_as_positional_arguments():
    x, y = blobs(128).tensors
    data = Rows(x[:, :4], x[:, 4:], y)

    class AsTuple(Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            left, right, target = data[i]
            return (left, right), target

    history = tl.fit(
        TwoInputs(), AsTuple(), AsTuple(), epochs=4, batch_size=16, workers=0, **quiet()
    )
    assert history[-1]["val_acc"] > 0.9


class OwnLoss(nn.Module):
    """A Hugging Face style model: takes the whole batch, returns {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp()

    def forward(self, features, labels):
        logits = self.net(features)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class DictBatches(Dataset):
    def __init__(self, n):
        self.data = blobs(n)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"features": x, "labels": y}


def test_fit_model_that_returns_its_own_loss():
    history = tl.fit(
        OwnLoss(),
        DictBatches(128),
        DictBatches(64),
        epochs=4,
        batch_size=16,
        loss_fn=None,
        workers=0,
        **quiet(),
    )
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 0.5
    assert history[-1]["val_loss"] < 0.5 and "val_acc" not in history[-1]


def test_fit_monitor_any_metric_with_its_direction(tmp_path):
    def run(mode):
        out = tmp_path / mode
        tl.fit(
            mlp(),
            blobs(64),
            blobs(32),
            epochs=3,
            batch_size=16,
            monitor="val_loss",
            monitor_mode=mode,
            out=str(out),
            **quiet(),
        )
        history = torch.load(out / "last.pt", weights_only=True)["history"]
        return torch.load(out / "best.pt", weights_only=True)["epoch"], history

    best_min, history = run("min")
    assert history[best_min - 1]["val_loss"] == min(r["val_loss"] for r in history)
    best_max, history = run("max")
    assert history[best_max - 1]["val_loss"] == max(r["val_loss"] for r in history)


@pytest.mark.parametrize(
    "name,higher",
    [
        ("val_acc", True), ("val_top5", True), ("val_f1_macro", True), ("val_r2", True),
        ("val_dice", True), ("val_mAP50", True), ("val_psnr", True), ("val_loss", False),
        ("train_loss", False), ("val_top1_error", False), ("val_iou_loss", False),
        ("val_mape", False), ("val_rmse", False),
    ],
)  # fmt: skip
def test_monitor_mode_auto_reads_the_direction_from_the_words_of_the_name(name, higher):
    assert tl._maximized(name, "auto") is higher  # (r2, dice, mAP, psnr were minimized)


def test_fit_refuses_a_monitor_whose_direction_it_cannot_tell_before_training(tmp_path):
    margin = {"margin": lambda out, y: out.max(1).values.mean()}
    settings = dict(metrics=margin, monitor="val_margin", out=tmp_path, epochs=1)
    with pytest.raises(tl.UsageError, match="is a higher val_margin better.*monitor_mode='max'"):
        fit_mlp(32, blobs(16), **settings)
    with pytest.raises(tl.UsageError, match="is a higher val_brier_score better"):
        tl._maximized("val_brier_score", "auto")  # a score, better when lower
    assert not (tmp_path / "config.json").exists()
    history = fit_mlp(32, blobs(16), monitor_mode="max", **settings)
    assert "val_margin" in history[0]


def test_set_epoch_warns_that_a_shuffling_dataloader_cannot_resume_mid_epoch_exactly():
    loader = DataLoader(list(range(20)), batch_size=4, shuffle=True)
    with pytest.warns(UserWarning, match="the rest of the epoch may repeat or skip samples"):
        tl.set_epoch(loader, 0, batches=2)
    ordered = DataLoader(list(range(20)), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its order is the epoch's: no warning
        assert [b.tolist() for b in tl.set_epoch(ordered, 0, batches=4)] == [[16, 17, 18, 19]]


def test_fit_resumed_with_another_monitor_mode_finds_its_best_again(tmp_path):
    out = str(tmp_path / "run")
    fit_mlp(64, blobs(32), epochs=2, monitor="val_loss", monitor_mode="min", out=out)
    history = fit_mlp(64, blobs(32), epochs=3, monitor="val_loss", monitor_mode="max", out=out)
    losses = [row["val_loss"] for row in history]
    best_epoch = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["best_epoch"]
    assert best_epoch == 1 + losses.index(max(losses))


# ---- in-memory fast path, time budget, EMA ---------------------------------------------------


def test_fit_fast_path_gives_the_same_result_as_the_dataloader_path():
    x, y = blobs(96).tensors
    fast, slow = mlp(), mlp()
    fast.insert(1, nn.Dropout(0.3))  # the model's own randomness must line up too
    slow.insert(1, nn.Dropout(0.3))
    h_fast = tl.fit(fast, TensorDataset(x, y), epochs=2, batch_size=16, **quiet())
    h_slow = tl.fit(slow, Rows(x, y), epochs=2, batch_size=16, workers=0, **quiet())
    assert h_fast[-1]["train_loss"] == h_slow[-1]["train_loss"]
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_fit_time_limit_checkpoints_exits_75_and_the_rerun_finishes_exactly(tmp_path):
    opts = dict(epochs=2, batch_size=16, ema=0.9)
    assert run_job(tmp_path, out=str(tmp_path / "ref"), **opts).returncode == 0
    out = tmp_path / "run"
    stopped = run_job(tmp_path, out=str(out), time_limit="1s", **opts)
    assert stopped.returncode == tl.EXIT_TIME_LIMIT, stopped.stderr
    assert "time limit reached" in stopped.stdout + stopped.stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] >= 1
    assert run_job(tmp_path, out=str(out), **opts).returncode == 0
    assert_same_state(tmp_path / "ref" / "last.pt", out / "last.pt")  # EMA included


def test_update_ema_is_the_warmed_up_moving_average():
    model, ema = nn.Linear(2, 2), nn.Linear(2, 2)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    tl._update_ema(tl._ema_pairs(ema, model), decay=0.99, step=0)  # decay ramps: min(0.99, 1/10)
    for key, value in ema.state_dict().items():
        expected = before[key] * 0.1 + model.state_dict()[key] * 0.9
        torch.testing.assert_close(value, expected)
    tl._update_ema(tl._ema_pairs(ema, model), decay=0.5, step=1000)
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key] * 0.95 + before[key] * 0.05)


def test_ema_pairs_leave_out_buffers_that_are_not_saved():
    model = mlp()
    model.register_buffer("mask", torch.ones(64, 64), persistent=False)  # e.g. a causal mask
    state = tl.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), ema_decay=0.9)
    assert len(state._ema_tensors[0]) == len(model.state_dict())  # (it averaged the mask too)


def test_ema_averages_a_tied_weight_once_a_step():
    class Tied(nn.Module):  # a language model's embedding shared with its output layer
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, tokens):
            return self.out(self.embed(tokens))

    torch.manual_seed(0)
    model = Tied()
    state = tl.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.5), ema_decay=0.9)
    state.step, before = 10**6, model.embed.weight.detach().clone()  # past the decay's ramp
    tl.train_step(state, [(torch.arange(5), torch.arange(5))])
    expected = 0.9 * before + 0.1 * model.embed.weight.detach()  # (it got 0.81 and 0.19)
    torch.testing.assert_close(state.ema.embed.weight, expected)


def test_fit_ema_is_evaluated_and_saved_as_best(tmp_path):
    model = mlp()
    history = tl.fit(
        model,
        blobs(128),
        blobs(32),
        epochs=2,
        batch_size=16,
        ema=0.9,
        monitor="train_loss",
        out=str(tmp_path),
        **quiet(),
    )
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and history[-1]["train_loss"] <= history[0]["train_loss"]
    for key, value in last["ema"].items():
        assert torch.equal(best["model"][key], value)  # best.pt holds the EMA weights
        assert not torch.equal(last["model"][key], value)
    ema_model = mlp()
    ema_model.load_state_dict(last["ema"])
    x, y = blobs(32).tensors
    with torch.no_grad():
        assert history[-1]["val_loss"] == pytest.approx(
            F.cross_entropy(ema_model.eval()(x), y).item(), rel=1e-5
        )


# ---- any torch scheduler, building blocks in a user's loop ------------------------------------

L = torch.optim.lr_scheduler
SCHEDULERS = {  # 6 steps an epoch, 24 in 4 epochs
    "StepLR": lambda o: L.StepLR(o, step_size=5, gamma=0.5),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=0.2, total_steps=24),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=7),
    "SequentialLR": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, 0.1, total_iters=4), L.ExponentialLR(o, 0.9)], milestones=[4]
    ),
    "LambdaLR": lambda o: L.LambdaLR(o, [lambda s: 0.97**s, lambda s: 1.0]),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=10),
}


def fit_with_scheduler(name, epochs, out, **settings):
    """fit over a model, optimizer (two groups) and scheduler built afresh, as a user would."""
    model = mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    scheduler = SCHEDULERS[name](optimizer)
    train, val = blobs(96), blobs(32, seed=1)
    return tl.fit(
        model, train, val, epochs=epochs, batch_size=16, optimizer=optimizer,
        scheduler=scheduler, out=out, monitor="val_loss", **settings, **quiet(),
    )  # fmt: skip


@pytest.mark.parametrize("name", SCHEDULERS)
def test_fit_any_scheduler_resumes_bit_identical(name, tmp_path):
    straight = fit_with_scheduler(name, 4, tmp_path / "straight")
    fit_with_scheduler(name, 2, tmp_path / "resumed")
    resumed = fit_with_scheduler(name, 4, tmp_path / "resumed")
    assert_same_state(tmp_path / "straight" / "last.pt", tmp_path / "resumed" / "last.pt")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(straight) == strip(resumed)
    assert len({row["lr"] for row in straight}) > 1, "the schedule never moved the LR"


def test_fit_logs_the_lr_each_scheduler_applied(tmp_path):
    rows = fit_with_scheduler("StepLR", 2, "")
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.025])  # steps 6 and 12 of 5-step decay
    rows = fit_with_scheduler("ReduceLROnPlateau", 3, "")
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.05, 0.025])  # halved per evaluation


def test_fit_scheduler_as_a_function_of_fits_own_optimizer():
    history = tl.fit(
        mlp(), blobs(96), epochs=2, batch_size=16, lr=0.1,
        scheduler=lambda optimizer: L.StepLR(optimizer, step_size=6, gamma=0.1), **quiet(),
    )  # fmt: skip
    assert [r["lr"] for r in history] == pytest.approx([0.1, 0.01])


def test_fit_refuses_a_scheduler_on_another_optimizer():
    model = mlp()
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(tl.UsageError, match="scheduler is built on another optimizer"):
        tl.fit(model, blobs(32), scheduler=L.StepLR(other, 5), **quiet())


def test_fit_resuming_with_another_kind_of_scheduler_says_so(tmp_path):
    fit_with_scheduler("StepLR", 1, tmp_path)
    with pytest.raises(tl.UsageError, match="trained with scheduler StepLR, not OneCycleLR"):
        fit_with_scheduler("OneCycleLR", 2, tmp_path)


def test_train_step_steps_any_torch_scheduler():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    state = tl.TrainState(model, optimizer, L.StepLR(optimizer, step_size=2, gamma=0.1))
    x, y = blobs(8).tensors
    applied = []
    for _ in range(4):
        tl.train_step(state, [(x, y)])
        applied.append(state.lr)
    assert applied == pytest.approx([1.0, 1.0, 0.1, 0.1])
    assert state.scheduler.last_epoch == 4 and state.scheduler.get_last_lr() == [
        pytest.approx(0.01)
    ]


@pytest.mark.parametrize("kind", ["StepLR", "ChainedScheduler", "LambdaLR", "none"])
def test_train_step_warns_when_the_users_loop_steps_the_scheduler_too(kind):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = {  # (a ChainedScheduler has no step count of its own; a LambdaLR a fast path)
        "StepLR": lambda: L.StepLR(optimizer, step_size=2, gamma=0.1),
        "ChainedScheduler": lambda: L.ChainedScheduler([L.StepLR(optimizer, 2)]),
        "LambdaLR": lambda: L.LambdaLR(optimizer, lambda step: 0.9**step),
        "none": lambda: None,
    }[kind]()
    state = tl.TrainState(model, optimizer, scheduler)
    x, y = blobs(8).tensors
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # train_step alone: no warning
        tl.train_step(state, [(x, y)])
        tl.train_step(state, [(x, y)])
    if scheduler is None:  # (it was warned about)
        return
    state.scheduler.step()  # the mistake: train_step already stepped it
    with pytest.warns(UserWarning, match="stepped outside train_step.*remove your scheduler"):
        tl.train_step(state, [(x, y)])


def test_train_step_and_save_checkpoint_refuse_a_model_for_the_state_in_one_line(tmp_path):
    model = mlp()
    x, y = blobs(8).tensors
    with pytest.raises(tl.UsageError, match=r"^train_step\(state, batches\) takes a TrainState, n"):
        tl.train_step(model, [(x, y)])
    with pytest.raises(tl.UsageError, match=r"takes a TrainState, not a Sequential; build one"):
        tl.save_checkpoint(tmp_path / "c.pt", model)
    assert not (tmp_path / "c.pt").exists()


def test_train_step_honours_a_lambda_per_parameter_group():
    model = mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    optimizer = torch.optim.SGD(groups, lr=0.5)
    state = tl.TrainState(model, optimizer, L.LambdaLR(optimizer, [lambda s: 1.0, lambda s: 0.0]))
    frozen = model[2].weight.detach().clone()
    moving = model[0].weight.detach().clone()
    x, y = blobs(8).tensors
    for _ in range(3):
        tl.train_step(state, [(x, y)])
    assert torch.equal(model[2].weight, frozen)  # factor 0: the group does not move
    assert not torch.equal(model[0].weight, moving)


def test_a_users_loop_saves_and_restores_its_state(tmp_path):
    def state_of(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        return tl.TrainState(model, optimizer, ema_decay=0.9)  # no scheduler

    trained = state_of(mlp())
    x, y = blobs(16).tensors
    for _ in range(3):
        tl.train_step(trained, [(x, y)])
    tl.save_checkpoint(tmp_path / "mine.pt", trained, runtime=CPU, note="mine")
    restored = state_of(mlp(seed=1))
    extra = tl.load_checkpoint(tmp_path / "mine.pt", restored)
    assert restored.step == 3 and extra["note"] == "mine"
    assert torch.equal(restored.model[0].weight, trained.model[0].weight)
    assert torch.equal(restored.ema[0].weight, trained.ema[0].weight)
    assert restored.optimizer.state_dict()["state"][0]["step"] == 3


def test_resume_reads_a_checkpoint_of_trainloop_0_1(tmp_path):
    fit_mlp(32, epochs=1, out=tmp_path)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    del ckpt["scheduler"]["type"]  # 0.1 saved its own LambdaLR without naming it
    ckpt["format"] = 1
    torch.save(ckpt, tmp_path / "last.pt")
    assert [r["epoch"] for r in fit_mlp(32, epochs=2, out=tmp_path)] == [1, 2]


def test_fit_own_optimizer_with_a_user_scheduler_resumes_bit_identical(tmp_path):
    def run(epochs, out):  # OneCycleLR cycles momentum and reads initial_lr: both must survive
        cycle = lambda o: L.OneCycleLR(o, max_lr=0.2, total_steps=24)  # noqa: E731
        return fit_mlp(96, epochs=epochs, out=out, scheduler=cycle, optimizer=name)

    for name in ("sgd", "adamw"):
        run(4, tmp_path / name / "straight")
        run(2, tmp_path / name / "resumed")
        run(4, tmp_path / name / "resumed")
        assert_same_state(
            tmp_path / name / "straight" / "last.pt", tmp_path / name / "resumed" / "last.pt"
        )


def test_fit_refuses_a_one_cycle_shorter_than_the_run():
    with pytest.raises(tl.UsageError, match="total_steps=20 is fewer than the run's 24"):
        fit_mlp(96, epochs=4, scheduler=lambda o: L.OneCycleLR(o, max_lr=0.2, total_steps=20))


def test_train_step_with_a_tensor_lr_reports_each_applied_lr():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1))
    state = tl.TrainState(model, optimizer, L.StepLR(optimizer, 1, gamma=0.5))
    x, y = blobs(8).tensors
    applied = []
    for _ in range(3):
        tl.train_step(state, [(x, y)])
        applied.append(state.lr)
    assert applied == pytest.approx([0.1, 0.05, 0.025])


def test_train_step_follows_a_scheduler_replaced_after_construction():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = tl.TrainState(model, optimizer, L.LambdaLR(optimizer, lambda s: 1.0))
    state.scheduler = L.StepLR(optimizer, 1, gamma=0.5)
    x, y = blobs(8).tensors
    for _ in range(2):
        tl.train_step(state, [(x, y)])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], torch.ones(2)])
def test_train_step_checks_weights_before_any_backward(weights):
    x, y = blobs(12).tensors
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    state = one_step_state(mlp())
    with pytest.raises(tl.UsageError, match="one weight per micro-batch"):
        tl.train_step(state, batches, weights=weights)
    assert all(p.grad is None for p in state.model.parameters())
    tl.train_step(state, batches, weights=torch.tensor([1.0, 1.0, 2.0]))  # a tensor is fine


def test_train_state_checks_the_ema_decay_and_unwraps_a_compiled_model():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for decay in (-0.5, 1.0, 1.5):
        with pytest.raises(tl.UsageError, match="ema_decay"):
            tl.TrainState(model, optimizer, ema_decay=decay)
    state = tl.TrainState(torch.compile(model), optimizer)  # not run: the wrapper is enough
    assert state.model is model and state.net is not model


def test_save_checkpoint_refuses_extras_it_could_not_load_back(tmp_path):
    state = one_step_state(mlp())
    with pytest.raises(tl.UsageError, match="'step' is the state's own entry"):
        tl.save_checkpoint(tmp_path / "c.pt", state, step=100)
    with pytest.raises(tl.UsageError, match="holds a Config"):
        tl.save_checkpoint(tmp_path / "c.pt", state, config=tl.Config())
    with pytest.raises(
        tl.UsageError, match=r"config=\.\.\.\)\['out'\] holds a (Posix|Windows)Path"
    ):
        tl.save_checkpoint(tmp_path / "c.pt", state, config={"out": Path("runs")})
    state.scheduler.lr_lambdas[0] = Stopwatch()  # a callable object: its __dict__ is saved
    with pytest.raises(
        tl.UsageError,
        match=r"checkpoint\['scheduler'\]\['lr_lambdas'\]\[0\]\[.*\] holds a builtin_function",
    ):
        tl.save_checkpoint(tmp_path / "c.pt", state)
    assert not (tmp_path / "c.pt").exists()
    (tmp_path / "run").mkdir()
    with pytest.raises(tl.UsageError, match="run is a directory; pass a file path"):
        tl.save_checkpoint(tmp_path / "run", state)  # (it moved the directory to run.prev)
    assert (tmp_path / "run").is_dir() and not (tmp_path / "run.prev").exists()


def test_load_checkpoint_onto_another_number_of_processes_takes_any_config_extra(tmp_path):
    state = one_step_state(mlp())
    tl.save_checkpoint(tmp_path / "c.pt", state, config="notes of my own")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    ckpt["world_size"] = 2  # as if saved by two processes: this one reseeds its RNG streams
    torch.save(ckpt, tmp_path / "c.pt")
    assert tl.load_checkpoint(tmp_path / "c.pt", state)["config"] == "notes of my own"


def test_save_checkpoint_never_writes_what_loading_refuses_in_the_model_or_optimizer(
    tmp_path, monkeypatch
):
    class Noted(nn.Sequential):
        def get_extra_state(self):
            return {"stats": self.stats}

        def set_extra_state(self, state):
            self.stats = state["stats"]

    model = Noted(nn.Linear(8, 3))
    model.stats = np.float32(2.0)  # a NumPy number is saved as a Python one
    state = one_step_state(model)
    state.optimizer.state[model[0].weight]["scale"] = np.float64(0.5)
    tl.save_checkpoint(tmp_path / "c.pt", state)
    tl.load_checkpoint(tmp_path / "c.pt", state)  # (it was refused as holding Python objects)
    assert (model.stats, state.optimizer.state[model[0].weight]["scale"]) == (2.0, 0.5)
    for bad, kind in ((np.zeros(3), "ndarray"), (Mode.FAST, "Mode")):  # an int that is no int
        model.stats = bad
        with pytest.raises(tl.UsageError, match=rf"\['_extra_state'\]\['stats'\] holds a {kind}"):
            tl.save_checkpoint(tmp_path / "d.pt", state)
    assert not (tmp_path / "d.pt").exists()
    other = tl.Runtime(torch.device("cpu"), rank=1, world_size=2)  # one of two processes:
    monkeypatch.setattr(tl, "_gather", lambda value, runtime: [value, value])
    monkeypatch.setattr(tl, "_barrier", lambda runtime: None)
    with pytest.raises(tl.UsageError, match="holds a Mode"):  # it refuses too, not only rank 0
        tl.save_checkpoint(tmp_path / "d.pt", state, runtime=other)


class Mode(enum.IntEnum):
    FAST = 1


def test_building_blocks_refuse_plausible_mistakes_in_one_line(tmp_path, monkeypatch):
    model, other = mlp(), mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    refusals = [  # (what a user wrote, what the error says)
        (lambda: tl.TrainState(model.state_dict(), sgd), "model must be a torch.nn.Module"),
        (
            lambda: tl.TrainState(model, torch.optim.LBFGS(model.parameters())),
            "^LBFGS steps with a",
        ),
        (lambda: tl.TrainState(model, torch.optim.SGD(other.parameters())), "holds none of"),
        (lambda: tl.TrainState(model, sgd, lambda o: L.StepLR(o, 2)), "not a function: call it"),
        (
            lambda: tl.TrainState(model, sgd, torch.amp.GradScaler("cpu")),
            r"goes to TrainState\(\.\.\., sc",
        ),
        (lambda: tl.train_step(state, [x, y]), "takes a list of micro-batches.*pass .batch."),
        (lambda: tl.train_step(state, (x, y, y)), "not a tuple of tensors; pass .batch."),
        (lambda: tl.train_step(state, {"x": x}), "not a dict of tensors"),
        (lambda: tl.train_step(state, [(x, y)], runtime="cpu"), "runtime='cpu' is not a trainl"),
        (
            lambda: tl.evaluate(state, [(x, y)]),
            r"takes a model \(state.eval_model\), not a TrainSt",
        ),
        (lambda: tl.evaluate(model, blobs(16)), "takes batches: a DataLoader, make_loader"),
        (lambda: tl.load_checkpoint(tmp_path / "c.pt", model), "restores a TrainState, not a Seq"),
        (lambda: tl.make_loader((x, y), batch_size=4), "map-style Dataset, not a tuple"),
        (lambda: tl.make_loader(Stream(8), batch_size=4), "map-style Dataset, not a Stream"),
    ]
    refusals.append((lambda: tl.fit(model, blobs(16), runtime="cpu"), "runtime='cpu' is not"))
    state = tl.TrainState(model, sgd)
    ((x, y),) = DataLoader(blobs(16), batch_size=16)
    tl.save_checkpoint(tmp_path / "c.pt", state)
    for mistake, message in refusals:
        with pytest.raises(tl.UsageError, match=message):
            mistake()
    stepper = types.SimpleNamespace(step=lambda: None)  # a scheduler of the user's own
    with pytest.raises(tl.UsageError, match="scheduler has no state_dict.., so a checkpoint"):
        tl.fit(model, blobs(16), optimizer=sgd, scheduler=stepper, out=tmp_path / "r", **quiet())
    assert not (tmp_path / "r" / "last.pt").exists()  # refused before training
    frozen = mlp().requires_grad_(False)
    with pytest.raises(tl.UsageError, match="^the loss needs no gradient: every parameter"):
        tl.fit(frozen, blobs(16), optimizer=torch.optim.SGD(frozen.parameters()), **quiet())
    with pytest.raises(tl.UsageError, match="scheduler has no state_dict.., so no checkpoint"):
        tl.save_checkpoint(tmp_path / "s.pt", tl.TrainState(model, sgd, stepper))
    with pytest.warns(UserWarning, match="not wrapped in DistributedDataParallel.*trains alone"):
        tl.train_step(state, [(x, y)], runtime=tl.Runtime(torch.device("cpu"), world_size=2))
    monkeypatch.setattr(tl.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(tl.dist, "get_world_size", lambda: 2)
    with pytest.warns(UserWarning, match="without runtime= gives every process all the batches"):
        tl.make_loader(blobs(16), batch_size=4)


def test_a_chained_scheduler_of_other_kinds_is_refused_and_a_new_directory_made(tmp_path):
    def state(second):
        model = mlp()
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        chained = L.SequentialLR(sgd, [L.LinearLR(sgd), second(sgd)], milestones=[2])
        return tl.TrainState(model, sgd, chained)

    path = tmp_path / "new" / "dir" / "c.pt"  # made, as torch.save would not
    tl.save_checkpoint(path, state(lambda o: L.ExponentialLR(o, 0.9)))
    tl.load_checkpoint(path, state(lambda o: L.ExponentialLR(o, 0.9)))
    with pytest.raises(tl.UsageError, match=r"SequentialLR\(LinearLR, ExponentialLR\), not Seq"):
        tl.load_checkpoint(path, state(lambda o: L.CosineAnnealingLR(o, 4)))
    ckpt = torch.load(path, weights_only=True)
    ckpt["scheduler"]["type"] = "SequentialLR"  # as 0.3.2 saved it: taken
    torch.save(ckpt, path)
    tl.load_checkpoint(path, state(lambda o: L.CosineAnnealingLR(o, 4)))


def test_load_checkpoint_of_another_optimizer_is_refused(tmp_path):
    model = mlp()
    tl.save_checkpoint(tmp_path / "c.pt", one_step_state(model))
    adam = tl.TrainState(model, torch.optim.Adam(model.parameters()))
    with pytest.raises(tl.UsageError, match="trained with optimizer SGD, not Adam"):
        tl.load_checkpoint(tmp_path / "c.pt", adam)  # (loaded; the next step failed in Adam)
    assert adam.step == 0 and not adam.optimizer.state


class Stopwatch:
    def __init__(self):
        self.clock = time.monotonic

    def __call__(self, step):
        return 1.0


def test_save_checkpoint_takes_numpy_numbers_in_optimizer_and_scheduler(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=np.float64(0.1))
    scheduler = L.CosineAnnealingLR(optimizer, T_max=np.ceil(np.float64(9.5)))
    tl.save_checkpoint(tmp_path / "c.pt", tl.TrainState(model, optimizer, scheduler))
    ckpt = tl.load_checkpoint(tmp_path / "c.pt")  # (refused: it held numpy scalars)
    assert ckpt["scheduler"]["T_max"] == 10.0 and ckpt["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_save_checkpoint_keeps_optimizer_settings_that_load(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.param_groups[0].update(dtype=torch.bfloat16, device=torch.device("cpu"), tags={1})
    tl.save_checkpoint(tmp_path / "c.pt", tl.TrainState(model, optimizer))  # (refused them)
    group = tl.load_checkpoint(tmp_path / "c.pt")["optimizer"]["param_groups"][0]
    assert group["dtype"] is torch.bfloat16 and group["tags"] == {1}
    assert group["device"] == torch.device("cpu")


def test_fit_resumes_and_averages_a_model_with_extra_state(tmp_path):
    class Noted(nn.Sequential):  # a module's own state beside its tensors, as get_extra_state
        def get_extra_state(self):
            return {"note": 1}

        def set_extra_state(self, state):
            pass

    for epochs in (1, 2):  # (the resume failed on the note's shape, the final EMA copy on copy_)
        torch.manual_seed(0)
        model = Noted(nn.Linear(8, 3))
        history = tl.fit(
            model, blobs(), epochs=epochs, batch_size=16, ema=0.9, out=tmp_path, **quiet()
        )
    assert len(history) == 2 and tl.load_checkpoint(tmp_path / "last.pt")["ema"]["_extra_state"]


def test_building_blocks_leave_a_plateau_to_the_user_and_save_numpy_extras_as_numbers(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = tl.TrainState(model, optimizer, L.ReduceLROnPlateau(optimizer, patience=0))
    ((x, y),) = DataLoader(blobs(16), batch_size=16)
    for _ in range(3):
        tl.train_step(state, [(x, y)], runtime=CPU)
    assert state.scheduler.last_epoch == 0 and state.lr == optimizer.param_groups[0]["lr"] == 0.1
    tl.save_checkpoint(tmp_path / "c.pt", state, note=np.float32(0.5), n=np.int64(3))
    ckpt = tl.load_checkpoint(tmp_path / "c.pt")
    assert (type(ckpt["note"]), type(ckpt["n"]), ckpt["n"]) == (float, int, 3)


def test_fit_resume_none_starts_over_and_deterministic_stays_on(tmp_path):
    fit_mlp(32, epochs=2, out=tmp_path)
    history = fit_mlp(32, epochs=1, out=tmp_path, resume="none", deterministic=True)
    assert len(history) == 1 and tl.load_checkpoint(tmp_path / "last.pt")["step"] == 2
    try:
        assert torch.are_deterministic_algorithms_enabled()  # left on, as the README says
        assert torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_load_checkpoint_that_does_not_fit_changes_nothing(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tl.save_checkpoint(tmp_path / "c.pt", tl.TrainState(model, optimizer, L.StepLR(optimizer, 5)))
    other = mlp(seed=1)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    before = other[0].weight.detach().clone()
    state = tl.TrainState(other, other_optimizer, L.ExponentialLR(other_optimizer, 0.9))
    with pytest.raises(tl.UsageError, match="scheduler StepLR, not ExponentialLR"):
        tl.load_checkpoint(tmp_path / "c.pt", state)
    assert torch.equal(other[0].weight, before)
    wider = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    wider_optimizer = torch.optim.SGD(wider.parameters(), lr=0.1)
    wider_state = tl.TrainState(wider, wider_optimizer, L.StepLR(wider_optimizer, 5))
    before = wider[0].weight.detach().clone()
    with pytest.raises(tl.UsageError, match=r"2.weight: \(3, 16\) in the checkpoint, \(4, 16\)"):
        tl.load_checkpoint(tmp_path / "c.pt", wider_state)
    assert torch.equal(wider[0].weight, before)  # (the layers that fitted were overwritten)
    with pytest.raises(tl.CheckpointError, match="no such checkpoint file"):
        tl.load_checkpoint(tmp_path / "missing.pt")


def test_set_epoch_skips_batches_of_a_users_loader_keeping_its_settings():
    data = TensorDataset(torch.arange(40.0))
    loader = DataLoader(
        data, batch_size=4, num_workers=1, persistent_workers=True, prefetch_factor=4
    )
    rest = tl.set_epoch(loader, 0, batches=3)
    settings = (rest.loader.persistent_workers, rest.loader.prefetch_factor)
    assert settings + (rest.loader.num_workers, len(rest)) == (True, 4, 1, 7)
    assert torch.cat([b[0] for b in rest]).tolist() == list(range(12, 40))


def test_set_epoch_given_back_its_own_result_starts_the_next_epoch_whole():
    loader = DataLoader(TensorDataset(torch.arange(16.0)), batch_size=4)
    loader = tl.set_epoch(loader, 0, batches=3)  # the README's loop reassigns the loader
    assert [b[0].tolist() for b in loader] == [[12.0, 13, 14, 15]]
    loader = tl.set_epoch(loader, 1)
    assert len(loader) == 4 and len(list(loader)) == 4  # (it replayed the leftover batch)


def test_set_epoch_reshuffles_a_distributed_sampler_inside_a_batch_sampler():
    from torch.utils.data import BatchSampler, DistributedSampler

    data = TensorDataset(torch.arange(32))
    sampler = DistributedSampler(data, num_replicas=1, rank=0)
    loader = DataLoader(data, batch_sampler=BatchSampler(sampler, 8, drop_last=False))
    orders = [torch.cat([b[0] for b in tl.set_epoch(loader, e)]).tolist() for e in (0, 1)]
    assert orders[0] != orders[1] and sorted(orders[1]) == list(range(32))  # (never reshuffled)


def test_building_blocks_resume_mid_epoch_with_a_users_loader_bit_for_bit(tmp_path):
    """Dropout draws from torch's RNG, which the checkpoint restores: starting the rest of the
    epoch must not draw from it (a DataLoader draws a seed for its workers)."""
    from torch.utils.data import DistributedSampler

    data = blobs(64)

    def train(stop_at=None, resume=False):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 3))
        state = tl.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        sampler = DistributedSampler(data, num_replicas=1, rank=0, seed=3)
        loader = DataLoader(data, batch_size=8, sampler=sampler)
        if resume:
            tl.load_checkpoint(tmp_path / "last.pt", state)
        while state.epoch < 2:
            for batch in tl.set_epoch(loader, state.epoch, batches=state.batches):
                tl.train_step(state, [batch])
                state.batches += 1
                if state.step == stop_at:
                    tl.save_checkpoint(tmp_path / "last.pt", state)
                    return None
            state.epoch, state.batches = state.epoch + 1, 0
        return model.state_dict()

    unbroken = train()
    assert train(stop_at=11) is None
    assert_same_tensors(train(resume=True), unbroken)


def test_train_step_refuses_fp16_without_a_loss_scaler():
    model = mlp()
    state = tl.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    fp16 = tl.Runtime(torch.device("cpu"), amp_dtype=torch.float16)
    with pytest.raises(tl.UsageError, match="needs a loss scaler"):
        tl.train_step(state, [blobs(8).tensors], runtime=fp16)


def test_building_blocks_refuse_arguments_of_the_wrong_kind():
    model = mlp()
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(tl.UsageError, match="scheduler is built on another optimizer"):
        tl.TrainState(model, optimizer, L.StepLR(other, 5))  # (it trained unscheduled)
    with pytest.raises(tl.UsageError, match="optimizer=None is not a torch optimizer"):
        tl.TrainState(model, None)
    with pytest.raises(tl.UsageError, match="needs at least one micro-batch"):
        tl.train_step(tl.TrainState(model, optimizer), [])
    with pytest.raises(tl.UsageError, match="precision='fp8' is not one of"):
        tl.setup_device("cpu", precision="fp8")
    with pytest.raises(tl.UsageError, match="batch_size=0 must be at least 1"):
        tl.make_loader(blobs(8), batch_size=0)


def test_train_state_builds_and_updates_its_own_ema():
    model = mlp()
    state = tl.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.5), ema_decay=0.99)
    start = model[0].weight.detach().clone()
    x, y = blobs(8).tensors
    tl.train_step(state, [(x, y)])
    decay = 1 / 10  # warmed up: min(0.99, (1 + step) / (10 + step)) at step 0
    expected = decay * start + (1 - decay) * model[0].weight.detach()
    torch.testing.assert_close(state.ema[0].weight, expected)
    assert state.eval_model is state.ema and not state.ema[0].weight.requires_grad


def test_fit_and_config_take_paths(tmp_path):
    first = fit_mlp(32, epochs=1, out=tmp_path / "run")
    assert (tmp_path / "run" / "last.pt").is_file() and len(first) == 1
    config = tl.Config(out=tmp_path / "run", resume=tmp_path / "run" / "last.pt", epochs=2)
    history = fit_mlp(32, config=config)
    assert [r["epoch"] for r in history] == [1, 2]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["out"] == str(
        tmp_path / "run"
    )
    assert tl.check_config(tl.Config(weights=tmp_path / "w.pt")).weights == str(tmp_path / "w.pt")


@pytest.mark.parametrize(
    "model,train,val,message",
    [
        (mlp, TensorDataset(torch.zeros(0, 8), torch.zeros(0).long()), None, "train_data is empty"),
        (mlp, blobs(16), [], "val_data is empty; pass val_data=None"),
        (lambda: mlp().requires_grad_(False), blobs(16), None, "no trainable parameters"),
    ],
)
def test_fit_refuses_data_and_models_that_cannot_train(model, train, val, message):
    with pytest.raises(tl.UsageError, match=re.escape(message)):
        tl.fit(model(), train, val, **quiet())


@pytest.mark.parametrize(
    "arguments,message",
    [
        (dict(model=lambda x: x), "model must be a torch.nn.Module, not function"),
        (dict(train_data=blobs(16).tensors), "pass TensorDataset(*train_data)"),
        (dict(optimizer=torch.optim.AdamW), "is not an optimizer; pass one built on"),
        (dict(optimizer=torch.optim.SGD(mlp().parameters())), "none of the model's parameters"),
        (dict(metrics=[len]), "metrics must be a dict of functions"),
        (dict(scheduler="cosine"), "scheduler='cosine' is not a scheduler; pass a torch"),
        (dict(config={"epochs": 1}), "config= takes a trainloop.Config, not a dict"),
        (dict(loss_fn=lambda out, y: out.sum(1)), "the loss has shape (16,); reduce it"),
    ],
)
def test_fit_refuses_arguments_of_the_wrong_kind_in_one_line(arguments, message):
    arguments = {"model": mlp(), "train_data": blobs(16), **arguments}
    with pytest.raises(tl.UsageError, match=re.escape(message)):
        tl.fit(**arguments, **quiet())


def test_fit_takes_a_loss_of_one_number_in_any_shape():
    history = fit_mlp(32, loss_fn=lambda out, y: F.cross_entropy(out, y).view(1, 1))
    assert math.isfinite(history[0]["train_loss"])


def test_fit_errors_name_the_keyword_and_the_mismatch(tmp_path):
    with pytest.raises(tl.UsageError, match="resume='missing.pt': no such file"):
        fit_mlp(16, resume="missing.pt")
    tl.fit(mlp(classes=3), blobs(16), epochs=1, out=tmp_path, **quiet())
    with pytest.raises(tl.UsageError, match=r"2\.weight: \(3, 16\) in the checkpoint, \(4, 16\)"):
        tl.fit(mlp(classes=4), blobs(16, classes=4), epochs=2, out=tmp_path, **quiet())


def test_fit_rerun_of_a_finished_run_says_it_is_complete(tmp_path):
    tl.fit(mlp(), blobs(16), epochs=1, out=tmp_path, quiet=True, log=lambda line: None)
    lines = []
    history = tl.fit(mlp(), blobs(16), epochs=1, out=tmp_path, log=lines.append)
    assert len(history) == 1
    assert any("already complete (1 of 1 epochs)" in line for line in lines), lines
    assert not any("resumed from" in line for line in lines)


def test_cli_help_at_80_columns_shows_that_data_takes_a_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    output = cli(["--help"], tmp_path, monkeypatch).output
    data_line = next(line for line in output.splitlines() if "--data " in line)
    assert "DIR" in data_line, output


# ---- distributed: real processes, gloo on the CPU -------------------------------------------

# Generous: other jobs may share the CPU. A healthy run of any job below takes 3 to 15 s.
TIMEOUT = 240

# ---- distributed: helpers ---------------------------------------------------------------------

# One training process of a distributed job (or a single process when started without torchrun).
# The data is a regression set whose target is the sample's index, so the loss and a metric can
# record which samples each rank saw; `fault` = [rank, step, kind] injects a failure at a training
# step: "raise" an exception, return a "nan" loss, or "kill" the process with SIGKILL.
WORKER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch, torch.nn as nn, torch.nn.functional as F
    import torch.distributed as dist
    from torch.utils.data import TensorDataset
    import trainloop as tl

    opts = json.loads(sys.argv[1])
    rank = int(os.environ.get("RANK", 0))
    n, n_val = opts.pop("n", 96), opts.pop("n_val", 0)
    fault, record = opts.pop("fault", None), opts.pop("record", None)
    batch_norm, own_runtime = opts.pop("batch_norm", False), opts.pop("own_runtime", False)
    width = opts.pop("width", 16)
    if opts.pop("cwd_per_rank", False):  # a file written by rank r lands under rank<r>/
        Path(f"rank{rank}").mkdir(exist_ok=True)
        os.chdir(f"rank{rank}")
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(n, 8, generator=g), torch.arange(n))
    val = TensorDataset(torch.randn(n_val, 8, generator=g), torch.arange(n_val)) if n_val else None
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(width)] if batch_norm else []
    model = nn.Sequential(nn.Linear(8, width), *norm, nn.Tanh(), nn.Linear(width, 1))
    steps = 0

    def note(kind, index):
        if record:
            with open(f"{record}-{kind}-{rank}.txt", "a") as f:
                f.write(f"{steps} " + " ".join(map(str, index.tolist())) + "\\n")

    def loss_fn(output, index):
        global steps
        training = torch.is_grad_enabled()  # evaluate() runs under no_grad
        if training:
            steps += 1
            note("train", index)
        hit = training and fault is not None and fault[:2] == [rank, steps]
        if hit and fault[2] == "raise":
            raise RuntimeError(f"injected failure on rank {rank} at step {steps}")
        if hit and fault[2] in ("kill", "term"):
            os.kill(os.getpid(), signal.SIGKILL if fault[2] == "kill" else signal.SIGTERM)
        goal = torch.sin(index.float()) if training else torch.cos(index.float())
        loss = F.mse_loss(output.squeeze(1), goal)
        return loss * float("nan") if hit and fault[2] == "nan" else loss

    def index_metric(output, index):
        note("val", index)
        return index.float()

    kwargs = dict(loss_fn=loss_fn, metrics={"index": index_metric}, **opts)
    def train_all():
        tl.fit(model, train, val, **kwargs)
        return 0

    if not own_runtime:  # as the CLI runs it: errors a user can fix are one line and a status
        sys.exit(tl._exit_code_of(train_all))
    # Our own runtime: fit leaves the process group up, so every rank can report its error and
    # wait for the others before any exits (the launcher stops the rest when one exits).
    rt = tl.setup_device("cpu")
    try:
        tl.fit(model, train, val, runtime=rt, **kwargs)
    except tl.NonFiniteLossError as e:
        Path(f"error-{rank}.txt").write_text(str(e))
        dist.barrier()
        sys.exit(tl.EXIT_NONFINITE)
    finally:
        tl.teardown(rt)
""")


def regression_data(n, n_val):
    """The data WORKER builds, built the same way here."""
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(n, 8, generator=g), torch.arange(n))
    return train, TensorDataset(torch.randn(n_val, 8, generator=g), torch.arange(n_val))


def regression_model():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def regression_model_init():
    torch.manual_seed(0)
    return regression_model().state_dict()


def val_loss_fn(output, index):
    return F.mse_loss(output.squeeze(1), torch.cos(index.float()))


def child_env(tmp_path):
    """The environment of a job's processes, marked with tmp_path so that every process the job
    starts (torchrun's workers, spawned ones too) can be found, and killed if it hangs."""
    dist_vars = (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "GROUP_RANK",
        "TORCHELASTIC_RUN_ID",
    )
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", MARK: str(tmp_path)}


MARK = "TRAINLOOP_TEST_JOB"


def processes_of(tmp_path) -> list:
    """Pids of live processes started by the job(s) run in tmp_path (see child_env)."""
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc to list processes")
    mark = f"{MARK}={tmp_path}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # exited meanwhile, or not ours
            continue
        if mark in environ:
            found.append(int(entry.name))
    return found


def start(cmd, tmp_path, **popen):
    return subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=child_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(proc, tmp_path, timeout=TIMEOUT):
    """Wait for `proc`; past `timeout`, SIGKILL it and every process of its job, then raise."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        for pid in processes_of(tmp_path):  # workers live in their own sessions: by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(cmd, tmp_path, timeout=TIMEOUT):
    return finish(start(cmd, tmp_path), tmp_path, timeout)


def torchrun_cmd(*args):
    return [sys.executable, "-m", "torch.distributed.run", *map(str, args)]


def run_worker(tmp_path, opts, nproc=2, launcher=(), timeout=TIMEOUT):
    """WORKER under `torchrun --standalone --nproc-per-node nproc`, in tmp_path."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = torchrun_cmd(
        "--standalone", "--nproc-per-node", nproc, *launcher, script, json.dumps(opts)
    )
    return run(cmd, tmp_path, timeout)


def run_script(tmp_path, text: str, *args, nproc=2):
    """The script `text` under `torchrun --standalone --nproc-per-node nproc`, in tmp_path."""
    script = tmp_path / "script.py"
    script.write_text(text)
    return run(torchrun_cmd("--standalone", "--nproc-per-node", nproc, script, *args), tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def recorded(tmp_path, prefix: str, kind: str = "train") -> dict:
    """{rank: [(step, [sample indices]), ...]} from the files WORKER's `record` option wrote."""
    found = {}
    for path in sorted(tmp_path.glob(f"{prefix}-{kind}-*.txt")):
        rank = int(path.stem.rsplit("-", 1)[1])
        lines = [line.split() for line in path.read_text().splitlines()]
        found[rank] = [(int(parts[0]), [int(i) for i in parts[1:]]) for parts in lines]
    return found


def assert_run_directory(out: Path, world_size: int, epochs: int = 1):
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.json"):
        assert (out / name).is_file(), f"{name} missing from {sorted(os.listdir(out))}"
    assert json.loads((out / "config.json").read_text())["world_size"] == world_size
    rows = read_rows(out / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    ckpt = tl.load_checkpoint(out / "last.pt")  # whole and checksummed
    assert ckpt["world_size"] == world_size and ckpt["epoch"] == epochs
    return rows


# ---- torchrun: the CLI and fit() across processes ------------------------------------------


@pytest.mark.slow
def test_torchrun_cli_trains_the_default_job_on_two_cpu_processes(tmp_path):
    cmd = torchrun_cmd(
        "--standalone",
        "--nproc-per-node",
        2,
        REPO / "trainloop.py",
        "--gpus",
        "cpu",
        "--epochs",
        1,
        "--image-size",
        16,
        "--out",
        "run",
    )
    result = run(cmd, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = assert_run_directory(tmp_path / "run", world_size=2)
    assert 0.5 < rows[0]["val_acc"] <= 1  # a fraction, and it learned (chance is 0.1)
    # 10000 samples split over 2 processes of 64 a step: ceil(5000 / 64) steps, not 157.
    assert rows[0]["step"] == 79
    assert result.stdout.count("done: best val_acc=") == 1  # rank 0 alone reports


@pytest.fixture(scope="module")
def same_global_batch(tmp_path_factory):
    """The same job as 2 processes x 8 samples, as 1 process x 16, and as 2 processes x 2
    accumulated micro-batches of 4 (100 samples: short last batches too); returns their run
    directories."""
    tmp_path = tmp_path_factory.mktemp("global_batch")
    opts = dict(n=100, n_val=30, epochs=2, quiet=True)
    two = run_worker(tmp_path, dict(opts, batch_size=8, out="two"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_worker(tmp_path, dict(opts, batch_size=16, out="one"), nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    acc = run_worker(tmp_path, dict(opts, batch_size=4, accumulate=2, out="acc"), nproc=2)
    assert acc.returncode == 0, acc.stderr[-3000:]
    return tmp_path / "two", tmp_path / "one", tmp_path / "acc"


@pytest.mark.slow
def test_fit_two_processes_equal_one_process_with_their_global_batch(same_global_batch):
    two, one, _ = same_global_batch
    a, b = tl.load_checkpoint(two / "last.pt"), tl.load_checkpoint(one / "last.pt")
    assert a["step"] == b["step"] == 14  # 7 steps an epoch in both
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)
    assert not torch.equal(a["model"]["0.weight"], regression_model_init()["0.weight"])
    # Validation is over the whole set in both: the same weights give the same loss.
    rows_a, rows_b = read_rows(two / "metrics.jsonl"), read_rows(one / "metrics.jsonl")
    for ra, rb in zip(rows_a, rows_b):
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-4)
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-9)


@pytest.mark.slow
def test_fit_train_loss_is_over_every_process_sample(same_global_batch):
    two, one, _ = same_global_batch
    rows_a, rows_b = read_rows(two / "metrics.jsonl"), read_rows(one / "metrics.jsonl")
    for ra, rb in zip(rows_a, rows_b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_fit_accumulating_under_ddp_equals_the_global_batch(same_global_batch):
    _, one, acc = same_global_batch
    a, b = tl.load_checkpoint(acc / "last.pt"), tl.load_checkpoint(one / "last.pt")
    assert a["step"] == b["step"] == 14
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)
    for ra, rb in zip(read_rows(acc / "metrics.jsonl"), read_rows(one / "metrics.jsonl")):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_fit_only_rank_0_writes_files_and_prints(tmp_path):
    logs = tmp_path / "logs"
    opts = dict(
        n=96,
        n_val=20,
        epochs=2,
        batch_size=8,
        save_every=2,
        log_every=2,
        out="run",
        cwd_per_rank=True,
    )
    result = run_worker(tmp_path, opts, launcher=("--log-dir", logs, "--redirects", 3))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "rank0", "rank1", "worker.py"]
    assert list((tmp_path / "rank1").iterdir()) == []  # rank 1's relative --out stays unmade
    assert_run_directory(tmp_path / "rank0" / "run", world_size=2, epochs=2)
    (stdout0,) = logs.glob("**/attempt_0/0/stdout.log")
    (stdout1,) = logs.glob("**/attempt_0/1/stdout.log")
    (stderr1,) = logs.glob("**/attempt_0/1/stderr.log")
    lines = stdout0.read_text().splitlines()
    progress = [line.split()[1] for line in lines if re.match(r"epoch=1/2 step=\d+/6 ", line)]
    assert progress == ["step=2/6", "step=4/6", "step=6/6"]
    assert lines[-1].startswith("done: best val_loss=")
    assert stdout1.read_text() == "" and stderr1.read_text() == ""


UNUSED = textwrap.dedent("""
    import sys, torch, torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import TensorDataset
    import trainloop as tl

    class Unused(nn.Module):  # a head its forward does not use (yet)
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(8, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    if sys.argv[1] == "plain":
        sys.exit(tl._exit_code_of(lambda: tl.fit(Unused(), data, batch_size=8, quiet=True)))
    rt = tl.setup_device("cpu")
    ddp = DistributedDataParallel(Unused(), find_unused_parameters=True)
    history = tl.fit(ddp, data, batch_size=8, runtime=rt, quiet=True)
    if rt.rank == 0:  # (two processes' prints may share a line)
        print("steps", history[-1]["step"], flush=True)
    tl.teardown(rt)
""")


@pytest.mark.slow
def test_torchrun_unused_parameters_are_one_line_and_a_users_ddp_options_are_kept(tmp_path):
    plain = run_script(tmp_path, UNUSED, "plain")
    assert "exitcode  : 2 " in plain.stderr, plain.stderr[-3000:]  # (DDP's traceback, exit 1)
    assert plain.stderr.count("the model has parameters its forward did not use") == 1
    wrapped = run_script(tmp_path, UNUSED, "ddp")
    assert wrapped.returncode == 0, wrapped.stderr[-3000:]  # (fit dropped the option: failed)
    assert "steps 12" in wrapped.stdout and "Warning" not in wrapped.stderr


OWN_LOOP = textwrap.dedent("""
    import json, warnings, torch, torch.nn as nn
    from torch.utils.data import TensorDataset
    import trainloop as tl

    rt = tl.setup_device("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model.eval()[1].running_mean.fill_(rt.rank)  # each process's own statistics, as after training
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    scores = tl.evaluate(model, data, runtime=rt)  # the same batch on both: the same score
    state = tl.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tl.evaluate(model, data)
        tl.save_checkpoint(f"alone{rt.rank}.pt", state)
        tl.load_checkpoint(f"alone{rt.rank}.pt", state)
    said = [str(w.message).split(" without")[0] for w in caught if "runtime=" in str(w.message)]
    mean = model[1].running_mean.tolist()
    row = {"rank": rt.rank, "loss": scores["loss"], "mean": mean, "said": said}
    with open(f"row{rt.rank}.json", "w") as f:  # (two processes' prints may share a line)
        json.dump(row, f)
    tl.teardown(rt)
""")


@pytest.mark.slow
def test_torchrun_building_blocks_score_rank_0s_buffers_and_warn_without_a_runtime(tmp_path):
    result = run_script(tmp_path, OWN_LOOP)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads((tmp_path / f"row{rank}.json").read_text()) for rank in (0, 1)]
    assert len(rows) == 2 and rows[0]["loss"] == rows[1]["loss"]  # (each scored its own means)
    assert rows[0]["mean"] == rows[1]["mean"] == [0.0] * 3  # rank 0's, which a checkpoint holds
    for row in rows:
        assert row["said"] == ["evaluate", "save_checkpoint", "load_checkpoint"]  # (silent)


@pytest.mark.slow
def test_torchrun_command_line_mistakes_are_one_line_from_one_process(tmp_path):
    flag = run(
        torchrun_cmd("--standalone", "--nproc-per-node", 2, REPO / "trainloop.py", "--epoch", 1),
        tmp_path,
    )
    assert flag.stderr.count("No such option: --epoch") == 1, flag.stderr[-3000:]  # (twice)
    missing = ("--data", tmp_path / "missing", "--workers", 0)
    data = run(
        torchrun_cmd("--standalone", "--nproc-per-node", 2, REPO / "trainloop.py", *missing),
        tmp_path,
    )
    assert data.stderr.count("trainloop: error:") == 1, data.stderr[-3000:]
    assert "exitcode  : 2 " in data.stderr, data.stderr[-3000:]
    assert not re.search(r"\[rank\d\]: Traceback", data.stderr)  # (gloo's, on rank 1)


@pytest.mark.slow
def test_torchrun_crash_on_one_rank_ends_the_job_quickly_and_leaves_no_process(tmp_path):
    started = time.monotonic()
    result = run_worker(
        tmp_path, dict(n=400, epochs=5, batch_size=8, quiet=True, fault=[1, 3, "raise"])
    )
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "RuntimeError: injected failure on rank 1 at step 3" in result.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after rank 1 failed"
    assert processes_of(tmp_path) == []


@pytest.mark.slow
def test_fit_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    opts = dict(
        n=400,
        epochs=1,
        batch_size=8,
        save_every=2,
        log_every=3,
        out="run",
        quiet=True,
        own_runtime=True,
        fault=[1, 5, "nan"],
    )
    result = run_worker(tmp_path, opts)
    assert result.returncode != 0
    for rank in (0, 1):  # rank 0's losses were finite, yet it stopped at the same point
        message = (tmp_path / f"error-{rank}.txt").read_text()
        assert message.startswith("the loss became NaN or inf at step 5 (epoch 1)")
    ckpt = tl.load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == 4 and ckpt["seen"] == 4 * 8 * 2  # the last good one, both ranks'
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.slow
def test_fit_nan_on_one_rank_prints_one_line_naming_the_step(tmp_path):
    result = run_worker(
        tmp_path, dict(n=400, epochs=1, batch_size=8, log_every=3, quiet=True, fault=[1, 5, "nan"])
    )
    assert result.returncode != 0
    # The launcher stops the other rank when the first exits, so one message is guaranteed.
    assert "trainloop: error: the loss became NaN or inf at step 5 (epoch 1)" in result.stderr, (
        result.stderr[-3000:]
    )
    assert "]: Traceback" not in result.stderr  # one line, no worker traceback
    # Not asserted: torchrun's table listing exit status 4. Once in ~20 runs a worker died with
    # SIGABRT after printing the message (gloo teardown after the peer left), so no 4 was shown.


@pytest.mark.slow
def test_torchrun_two_nodes_on_localhost_complete_a_run(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    opts = json.dumps(dict(n=96, n_val=20, epochs=2, batch_size=8, out="run"))
    cmd = torchrun_cmd(
        "--nnodes",
        2,
        "--nproc-per-node",
        1,
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"nodes-{port}",
        "--local-addr",
        "127.0.0.1",
        script,
        opts,
    )
    nodes = [start(cmd, tmp_path) for _ in range(2)]  # each a machine's torchrun
    try:
        results = [finish(node, tmp_path) for node in nodes]
    finally:
        for node in nodes:
            node.kill()  # only if the other one timed out
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert_run_directory(tmp_path / "run", world_size=2, epochs=2)
    # Exactly one node hosts global rank 0, which alone prints.
    assert sorted("done: best val_loss=" in r.stdout for r in results) == [False, True]


# ---- trainloop's own launcher (--gpus 0,1) -------------------------------------------------

LAUNCH = textwrap.dedent("""
    import json, sys
    import trainloop as tl

    if __name__ == "__main__":  # the launcher spawns processes that import this file
        sys.exit(tl._launch_local(tl.Config(**json.loads(sys.argv[1])), 2))
""")


def launch_local(tmp_path, **options):
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    options = {"gpus": "cpu", "epochs": 1, "workers": 0, "out": str(tmp_path / "run"), **options}
    started = time.monotonic()
    result = run([sys.executable, str(script), json.dumps(options)], tmp_path)
    return result, time.monotonic() - started


@pytest.mark.slow
def test_launch_local_trains_to_completion_on_cpu(tmp_path):
    result, _ = launch_local(tmp_path, image_size=8, batch_size=128)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = assert_run_directory(tmp_path / "run", world_size=2)
    assert rows[0]["step"] == 40  # ceil(5000 / 128): each process took half the samples
    assert result.stdout.count("done: best val_acc=") == 1


@pytest.mark.slow
def test_launch_local_passes_sigterm_on_and_exits_143_with_a_checkpoint(tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    options = {
        "gpus": "cpu",
        "epochs": 2,
        "workers": 0,
        "out": str(tmp_path / "run"),
        "image_size": 8,
        "batch_size": 16,
        "log_every": 5,
    }
    proc = start([sys.executable, str(script), json.dumps(options)], tmp_path)
    assert proc.stdout.readline().startswith("trainloop: cpu x 2 processes; data synthetic")
    assert proc.stdout.readline().startswith("epoch=1/2 step=5/")  # training has begun
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, tmp_path)
    assert result.returncode == 143, result.stderr[-3000:]
    ckpt = tl.load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] % 5 == 0 and ckpt["epoch"] == 0
    assert processes_of(tmp_path) == []


@pytest.fixture(scope="module")
def launch_with_bad_image_on_rank_1(tmp_path_factory):
    """_launch_local on an ImageFolder where one image, read only by rank 1 (in its second
    batch), is not an image: rank 1 fails with a usage error while rank 0 trains on. --mean and
    --std are given, so no image is read to measure them at start-up."""
    tmp_path = tmp_path_factory.mktemp("bad_image")
    root = make_image_folder(tmp_path / "pets", per_class=40)
    config = tl.Config(data=str(root), batch_size=4, mean="0.5", std="0.25")
    train, _, _ = tl._image_folder(config)
    rank1 = tl._EpochBatches(len(train), 4, shuffle=True, seed=0, rank=1, world=2).indices()
    index = rank1[4].item()
    bad = Path(train.samples[index][0])
    bad.write_bytes(b"not an image")
    result, elapsed = launch_local(
        tmp_path, data=str(root), batch_size=4, epochs=3, mean="0.5", std="0.25", image_size=8
    )
    return result, elapsed, bad, tmp_path


@pytest.mark.slow
def test_launch_local_returns_the_failed_worker_status_quickly(launch_with_bad_image_on_rank_1):
    result, elapsed, _, tmp_path = launch_with_bad_image_on_rank_1
    assert result.returncode == tl.EXIT_USAGE, result.stderr[-3000:]
    assert "a training process failed (exit status 2); the others were stopped" in result.stderr
    assert elapsed < 60, f"the launcher took {elapsed:.0f} s to return after rank 1 failed"
    assert processes_of(tmp_path) == []
    assert not (tmp_path / "run" / "last.pt").exists()  # no epoch finished


@pytest.mark.slow
def test_launch_local_reports_the_error_of_a_worker_other_than_rank_0(
    launch_with_bad_image_on_rank_1,
):
    result, _, bad, _ = launch_with_bad_image_on_rank_1
    assert f"cannot read image {bad}" in result.stderr


@pytest.mark.slow
def test_fit_time_limit_stops_every_process_at_the_same_step(tmp_path):
    opts = dict(
        n=400,
        epochs=2,
        batch_size=4,
        log_every=5,
        quiet=True,
        out="run",
        time_limit="1s",
        record="limited",
    )
    stopped = run_worker(tmp_path, opts)
    assert stopped.returncode != 0
    assert "stopped: time limit reached" in stopped.stdout
    ckpt = tl.load_checkpoint(tmp_path / "run" / "last.pt")
    steps = {
        rank: [step for step, _ in rows] for rank, rows in recorded(tmp_path, "limited").items()
    }
    assert steps[0] == steps[1]  # both processes ran exactly the same steps
    assert steps[0][-1] == ckpt["step"] and ckpt["step"] % 5 == 0  # agreed at a log point
    resumed = run_worker(tmp_path, dict(opts, time_limit=""))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert tl.load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2 * 50


# ---- elastic resume --------------------------------------------------------------------------

ELASTIC = dict(n=101, epochs=1, batch_size=4, save_every=4, log_every=100, quiet=True, out="run")


@pytest.fixture(scope="module")
def elastic_resume(tmp_path_factory):
    """2 processes, rank 0 SIGKILLed at step 10 (last checkpoint: step 8), resumed on 1."""
    tmp_path = tmp_path_factory.mktemp("elastic")
    killed = run_worker(tmp_path, dict(ELASTIC, record="killed", fault=[0, 10, "kill"]))
    ckpt = tl.load_checkpoint(tmp_path / "run" / "last.pt")
    resumed = run_worker(tmp_path, dict(ELASTIC, record="resumed"), nproc=1)
    return killed, ckpt, resumed, tmp_path


@pytest.mark.slow
def test_fit_elastic_resume_two_to_one_trains_each_sample_once(elastic_resume):
    killed, ckpt, resumed, tmp_path = elastic_resume
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 0
    assert ckpt["step"] == 8 and ckpt["seen"] == 8 * 4 * 2
    before = recorded(tmp_path, "killed")
    after = recorded(tmp_path, "resumed")
    assert sorted(before) == [0, 1] and sorted(after) == [0]
    # Up to the checkpoint's step the two ranks' samples count; the rest died with the kill.
    kept = [i for rank in (0, 1) for step, idx in before[rank] if step <= ckpt["step"] for i in idx]
    lost = [i for rank in (0, 1) for step, idx in before[rank] if step > ckpt["step"] for i in idx]
    again = [i for _, idx in after[0] for i in idx]
    assert len(kept) == ckpt["seen"] and lost  # some were trained on, then lost
    assert Counter(kept + again) == Counter(range(101))  # every sample once, the odd one too
    assert set(lost) <= set(again)  # what was lost is trained on after the resume
    assert len(after[0]) == math.ceil((101 - 64) / 4)  # 10 steps of 4 on one process
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == 8 + 10


@pytest.mark.slow
def test_fit_elastic_resume_warns_about_the_process_count(elastic_resume):
    _, _, resumed, _ = elastic_resume
    warning = next(line for line in resumed.stdout.splitlines() if line.startswith("warning:"))
    assert "world_size 2 -> 1 (elastic resume" in warning


@pytest.mark.slow
def test_fit_elastic_resume_still_anneals_the_lr_to_zero(elastic_resume):
    _, _, resumed, tmp_path = elastic_resume
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["lr"] < 0.05 * tl.Config().lr  # an uninterrupted run ends at 1.5% of it


# ---- evaluation and BatchNorm ----------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_counts_each_validation_sample_once_across_processes(tmp_path):
    n_val = 37  # odd: rank 0 gets 19 samples, rank 1 gets 18
    opts = dict(n=96, n_val=n_val, epochs=1, batch_size=8, out="run", quiet=True, record="rec")
    result = run_worker(tmp_path, opts)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = recorded(tmp_path, "rec", "val")
    assert sorted(seen) == [0, 1]
    counts = [sum(len(idx) for _, idx in seen[rank]) for rank in (0, 1)]
    assert counts == [19, 18]
    assert Counter(i for rank in (0, 1) for _, idx in seen[rank] for i in idx) == Counter(
        range(n_val)
    )
    (row,) = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert row["val_index"] == pytest.approx((n_val - 1) / 2, abs=1e-9)  # mean index: 18
    # The same weights evaluated here, in one process with another batch size.
    model = regression_model()
    model.load_state_dict(tl.load_checkpoint(tmp_path / "run" / "best.pt")["model"])
    _, val = regression_data(96, n_val)
    scores = tl.evaluate(
        model, tl.make_loader(val, batch_size=5, train=False), runtime=CPU, loss_fn=val_loss_fn
    )
    assert row["val_loss"] == pytest.approx(scores["loss"], rel=1e-5)


@pytest.mark.slow
def test_evaluate_with_fewer_validation_samples_than_processes(tmp_path):
    result = run_worker(
        tmp_path, dict(n=96, n_val=1, epochs=1, batch_size=8, out="run", quiet=True), timeout=45
    )  # it may hang
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert row["val_index"] == 0


@pytest.mark.slow
def test_fit_sync_bn_on_cpu_processes_is_a_clear_error(tmp_path):
    opts = dict(
        n=96, n_val=20, epochs=1, batch_size=8, out="run", quiet=True, batch_norm=True, sync_bn=True
    )
    result = run_worker(tmp_path, opts)
    assert result.returncode != 0
    assert "trainloop: error: --sync-bn needs CUDA GPUs" in result.stderr
    assert "Traceback" not in result.stderr.split("trainloop: error:")[0][-2000:]


# ---- the README ------------------------------------------------------------------------------


def readme_blocks(language: str) -> list:
    text = (REPO / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", code]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(readme_blocks("python"))))
def test_readme_python_examples_run_as_written(index, tmp_path):
    result = run_python(readme_blocks("python")[index], tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "scheduler",
    [
        "StepLR(optimizer, step_size=5)",
        "OneCycleLR(optimizer, max_lr=0.2, total_steps=16)",
        "ReduceLROnPlateau(optimizer)",
        "LambdaLR(optimizer, lambda step: 0.9**step)",
        "SequentialLR(optimizer, [ConstantLR(optimizer), ExponentialLR(optimizer, 0.9)], [4])",
    ],
)
@pytest.mark.slow
def test_readme_building_blocks_work_with_any_torch_scheduler(scheduler, tmp_path):
    block = next(b for b in readme_blocks("python") if "tl.train_step" in b)
    line = "scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=16)"
    assert line in block
    names = "from torch.optim.lr_scheduler import ConstantLR, ExponentialLR\n"
    code = names + block.replace(line, f"scheduler = torch.optim.lr_scheduler.{scheduler}")
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "16"  # steps saved in the checkpoint


def test_readme_test_command_is_what_ci_runs():
    found = subprocess.run(  # the line .ci/run reads from the README, as it reads it
        ["bash", "-c", (REPO / ".ci" / "run").read_text().split("command=$(")[1].split(")\n")[0]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    command = readme_blocks("bash")[1].strip()
    assert command.startswith("python -m venv") and "pytest" in command
    assert found.returncode == 0 and found.stdout.strip() in command.splitlines(), found


# ---- photo folders and pretrained weights (issue 15) ---------------------------------------


def photo(width, height, seed=0):
    """A smooth RGB picture (a photo's statistics more than noise's), uint8 (H, W, 3)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 8, generator=g) * 255
    image = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return image[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy()


def make_mixed_folder(root: Path) -> Path:
    """Two classes of files in every PIL mode a real folder holds, at mixed sizes and aspect
    ratios, one large JPEG (the reduced-size decode) and one EXIF-rotated JPEG."""
    import numpy as np
    from PIL import Image

    modes = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F")
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i, mode in enumerate(modes):
            w, h = (17 + 9 * i, 40 - 2 * i) if i % 2 else (30 + i, 12 + 3 * i)
            image = Image.fromarray(photo(w, h, seed=10 * c + i))
            if mode in ("I;16", "I", "F"):  # 16-bit or float data, up to 65535 or 1.0
                gray = np.asarray(image.convert("L"), dtype=np.float32) / 255
                data = gray if mode == "F" else (gray * 65535).astype(np.uint16)
                image = Image.fromarray(data.astype(np.int32) if mode == "I" else data)
                assert image.mode == mode
            else:
                image = image.convert(mode)
            suffix = {"CMYK": "jpg", "I": "tif", "F": "tif"}.get(mode, "png")
            image.save(root / name / f"{i}.{suffix}")
        Image.fromarray(photo(1600, 1200, seed=c)).save(root / name / "big.jpg")
        turned = Image.Exif()
        turned[0x0112] = 6  # shown rotated 90 degrees clockwise
        Image.fromarray(photo(60, 30, seed=c)).save(root / name / "turned.jpg", exif=turned)
    return root


def test_load_data_reads_every_mode_and_size_as_uint8_at_the_image_size(tmp_path):
    root = make_mixed_folder(tmp_path / "mixed")
    config = tl.Config(data=str(root), image_size=20, val_fraction=0.25)
    train, val, info = tl.load_data(config, rgb=True)
    assert info["image_size"] == 20 and info["classes"] == 2 and info["channels"] == 3
    assert len(train) + len(val) == 24
    for data in (train, val):
        for i in range(len(data)):
            image, label = data[i]
            assert image.dtype == torch.uint8 and image.shape == (3, 20, 20), data.samples[i]
            assert label in (0, 1)


def test_load_data_reads_gifs_first_frame_and_skips_hidden_files(tmp_path):
    from PIL import Image

    make_image_folder(tmp_path / "pets", per_class=3, size=12)
    frames = [Image.new("RGB", (12, 12), color) for color in ("red", "blue")]
    for name in ("cat/moving.gif", "dog/moving-gif.png"):  # a GIF, one with a PNG's name
        frames[0].save(tmp_path / "pets" / name, format="GIF", save_all=True, append_images=frames)
    (tmp_path / "pets" / "cat" / "._0.png").write_bytes(b"Mac metadata")
    config = tl.Config(data=str(tmp_path / "pets"), image_size=8, val_fraction=0.25)
    train, val, _ = tl.load_data(config)
    where = lambda path: Path(path).parent.name + "/" + Path(path).name  # noqa: E731
    images = {where(d.samples[i][0]): d[i][0] for d in (train, val) for i in range(len(d))}
    assert "cat/moving.gif" in images and len(images) == 8  # no cat/._0.png
    assert all(image.shape == (3, 8, 8) for image in images.values())
    for name in ("cat/moving.gif", "dog/moving-gif.png"):  # the first frame: red
        assert images[name][0].float().mean() > 200 and images[name][2].float().mean() < 50


def test_load_data_skips_hidden_folders_at_every_level(tmp_path):
    root = make_image_folder(tmp_path / ".cache" / "pets", per_class=3)  # a hidden parent counts
    make_image_folder(root, classes=(".ipynb_checkpoints", "cat/.thumbs"), per_class=2)
    (root / ".empty").mkdir()
    train, val, info = tl.load_data(tl.Config(data=str(root), image_size=8, mean="0.5", std="0.2"))
    samples = [*train.samples, *val.samples]
    assert info["classes"] == 2 and len(samples) == 6
    assert {(Path(path).parent.name, label) for path, label in samples} == {("cat", 0), ("dog", 1)}


def test_a_damaged_png_is_one_error_naming_it_not_a_crash(tmp_path):
    from PIL import Image

    root = make_image_folder(tmp_path / "pets", per_class=2)
    saved = io.BytesIO()
    Image.fromarray(photo(64, 48)).save(saved, format="PNG")
    data = bytearray(saved.getvalue())
    data[data.index(b"IDAT") + 104] ^= 0x55  # one bad byte: torchvision's decoder segfaulted
    (root / "cat" / "damaged.png").write_bytes(bytes(data))
    code = f"""
import trainloop as tl
train, _, _ = tl.load_data(tl.Config(data={str(root)!r}, mean="0.5", std="0.2", val_fraction=0.2))
[train[i] for i in range(len(train))]
"""
    read = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert read.returncode == 1, read  # not -11
    assert re.search(r"_DataError: cannot read image .*damaged.png \(.*\); fix or", read.stderr)


def test_orientation_is_applied_to_webp_and_phone_jpegs_take_the_fast_path(tmp_path):
    from PIL import Image

    upright = Image.fromarray(photo(30, 60))
    turned = Image.Exif()
    turned[0x0112] = 6  # shown rotated 90 degrees clockwise
    root = tmp_path / "pets"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        upright.save(root / name / "upright.png")
        upright.rotate(90, expand=True).save(
            root / name / "turned.webp", exif=turned, lossless=True
        )
    big = Image.fromarray(photo(1600, 1200))
    big.save(root / "cat" / "plain.jpg", quality=95)
    big.save(root / "cat" / "phone.jpg", "MPO", quality=95, save_all=True, append_images=[big])
    config = tl.Config(data=str(root), image_size=16, augment=False, mean="0.5", std="0.2")
    files = tl.load_data(config)[0]
    files.samples = [(str(p), 0) for p in sorted(root.glob("*/*"))]
    images = {
        Path(p).parent.name + "/" + Path(p).name: files[i][0]
        for i, (p, _) in enumerate(files.samples)
    }
    for name in ("cat", "dog"):  # (WebP came out sideways)
        difference = (images[f"{name}/turned.webp"].float() - images[f"{name}/upright.png"]).abs()
        assert difference.mean() < 2
    assert torch.equal(images["cat/phone.jpg"], images["cat/plain.jpg"])  # both decoded reduced


def test_a_folder_split_moves_no_other_file_when_one_is_removed_or_the_folder_moves(
    tmp_path, monkeypatch
):
    def split(root):
        config = tl.Config(data=str(root), mean="0.5", std="0.2", val_fraction=0.3)
        train, val, _ = tl.load_data(config)
        return sorted(Path(p).relative_to(root).as_posix() for p, _ in val.samples)

    root = make_image_folder(tmp_path / "pets", per_class=20)
    before = split(root)
    kept = sorted(set(n for n in (f"cat/{i}.png" for i in range(20))) - set(before))[0]
    (root / kept).unlink()  # a training image fixed or removed, as an error advises
    assert split(root) == before  # (every file was drawn anew)
    root.rename(tmp_path / "moved")
    assert split(tmp_path / "moved") == before
    with monkeypatch.context() as m:  # --data . from inside it
        m.chdir(tmp_path / "moved")
        assert split(Path(".")) == before
    vehicles = make_image_folder(tmp_path / "vehicles", classes=("Bus", "Car", "Train"))
    assert tl.load_data(tl.Config(data=str(vehicles), mean="0.5", std="0.2"))[0].classes == [
        "Bus",
        "Car",
        "Train",
    ]  # Train/ holds images: a class, not a split
    kaggle = tmp_path / "dogs-vs-cats"  # labels in the file names: not a layout it reads
    make_image_folder(kaggle, classes=("train", "test1"), per_class=2)
    with pytest.raises(tl.UsageError, match="found 0 class folder.s. in .*train; classification"):
        tl.load_data(tl.Config(data=str(kaggle), mean="0.5", std="0.2"))
    make_image_folder(tmp_path / "stray", classes=("train/cat", "train/dog"), per_class=3)
    (tmp_path / "stray" / "train" / "preview.png").write_bytes(b"")  # beside the classes
    stray = tl.load_data(tl.Config(data=str(tmp_path / "stray"), mean="0.5", std="0.2"))
    assert stray[0].classes == ["cat", "dog"]


def test_image_folder_layouts_a_user_makes(tmp_path):
    def classes(root, **settings):
        config = tl.Config(data=str(root), mean="0.5", std="0.2", **settings)
        train, val, info = tl.load_data(config)
        return train.classes, len(train), len(val)

    root = tmp_path / "splits"  # Windows' and macOS's capitalized names
    make_image_folder(root / "Train", per_class=3)
    make_image_folder(root / "Val", per_class=2)
    assert classes(root) == (["cat", "dog"], 6, 4)
    loop = make_image_folder(tmp_path / "loop", per_class=3)
    (loop / "cat" / "up").symlink_to("..")  # a link up the tree: each file once
    (loop / "cat" / "again").symlink_to(".")
    make_image_folder(loop / "cat" / "@eaDir", classes=("thumbs",), per_class=2)  # a NAS's
    (loop / "dog" / "b").symlink_to(loop / "cat" / "@eaDir" / "thumbs")  # (taken once, as a/)
    (loop / "dog" / "a").symlink_to(loop / "cat" / "@eaDir" / "thumbs")
    (loop / "dog" / "more.jfif").write_bytes((loop / "dog" / "0.png").read_bytes())
    assert classes(loop, val_fraction=0.25) == (["cat", "dog"], 6, 3)
    dog = tl.load_data(tl.Config(data=str(loop), mean="0.5", std="0.2"))[0]
    assert not any("/dog/b/" in path for path, _ in dog.samples)  # the first by name: a/
    nested = make_image_folder(tmp_path / "nested", per_class=2)
    make_image_folder(nested / "test", per_class=2)  # test/cat/, test/dog/: no class "test"
    with pytest.raises(tl.UsageError, match="class folder test/ of .* holds only folders: a spl"):
        classes(nested)
    inside = make_image_folder(tmp_path / "here", per_class=3)
    make_image_folder(inside / "runs" / "x", classes=("y",), per_class=1)  # a run's files
    (inside / "old" / "run").mkdir(parents=True)  # an earlier run's out, without images
    (inside / "old" / "run" / "config.json").write_text("{}")
    assert classes(inside, out=str(inside / "runs" / "x"), val_fraction=0.4)[0] == ["cat", "dog"]


def test_load_data_splits_each_class_and_keeps_a_training_image_of_each(tmp_path):
    root = make_image_folder(tmp_path / "pets", classes=("ant", "bee", "cat"), per_class=10)
    for name in [*(f"ant/{i}.png" for i in range(1, 10)), *(f"cat/{i}.png" for i in range(5))]:
        (root / name).unlink()  # ant: 1 image, bee: 10, cat: 5

    def split(seed, share=0.2):
        config = tl.Config(data=str(root), seed=seed, val_fraction=share, mean="0.5", std="0.2")
        train, val, _ = tl.load_data(config)
        return sorted(train.samples), sorted(val.samples)

    for seed in range(4):  # round(share x n) of each class, but ant's only image trains
        train, val = split(seed)
        assert Counter(label for _, label in val) == {1: 2, 2: 1}
        assert {label for _, label in train} == {0, 1, 2} and len(train) + len(val) == 16
    assert split(0) == split(0) and split(0)[1] != split(1)[1]  # fixed by the seed
    assert [label for _, label in split(0, share=0.01)[1]] == [1]  # none: one of the largest


def test_load_data_keeps_a_class_that_holds_the_runs_out(tmp_path):
    root = make_image_folder(tmp_path / "pets", per_class=4)
    for out in (root / "cat" / "run", root / "runs" / "x"):  # only runs/, without images, goes
        out.mkdir(parents=True)
        train, val, info = tl.load_data(tl.Config(data=str(root), out=str(out)))
        assert train.classes == ["cat", "dog"] and len(train) + len(val) == 8  # (cat was dropped)


def test_load_data_takes_a_valid_folder_as_validation(tmp_path):  # Kaggle's and Roboflow's
    make_image_folder(tmp_path / "pets" / "train", per_class=4)
    make_image_folder(tmp_path / "pets" / "valid", per_class=2)
    config = tl.Config(data=str(tmp_path / "pets"), mean="0.5", std="0.2")
    train, val, _ = tl.load_data(config)
    assert len(train) == 8 and {Path(path).parts[-3] for path, _ in val.samples} == {"valid"}
    root = make_image_folder(tmp_path / "forms", classes=("invalid", "valid"))  # no train/
    assert tl.load_data(dataclasses.replace(config, data=str(root)))[2]["classes"] == 2
    root = make_image_folder(tmp_path / "birds", per_class=4)  # classes beside val/, no train/
    make_image_folder(root / "val", per_class=2)
    train, val, info = tl.load_data(dataclasses.replace(config, data=str(root)))
    assert (len(train), len(val), info["classes"]) == (8, 4, 2)  # (val/ was a third class)


def test_load_data_names_an_empty_class_folder_and_the_files_that_count(tmp_path):
    root = make_image_folder(tmp_path / "pets", per_class=2)
    (root / "zebra").mkdir()
    (root / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(tl.UsageError) as error:
        tl.load_data(tl.Config(data=str(root)))
    message = str(error.value)
    assert re.search(r"class folder\(s\) zebra .*no image file \(\.jpg, .*\.gif\); add", message)
    assert ". ;" not in message, message  # torchvision's own message ended "zebra. "


def test_load_data_says_which_val_classes_differ_from_train(tmp_path):
    make_image_folder(tmp_path / "pets" / "train", classes=("cat", "dog", "zebra"), per_class=1)
    make_image_folder(tmp_path / "pets" / "val", classes=("cat", "dog", "lion"), per_class=1)
    with pytest.raises(tl.UsageError) as error:
        tl.load_data(tl.Config(data=str(tmp_path / "pets")))
    assert "missing ['zebra'], extra ['lion']" in str(error.value)
    assert "or remove val/ to split train/ instead" in str(error.value)


def test_load_data_measures_the_same_normalization_for_any_seed_and_split(tmp_path):
    make_image_folder(tmp_path / "pets", per_class=200, size=6)  # more than the 256 measured
    infos = [
        tl.load_data(tl.Config(data=str(tmp_path / "pets"), seed=seed, val_fraction=share))[2]
        for seed, share in ((0, 0.1), (5, 0.5))
    ]
    assert infos[0]["mean"] == infos[1]["mean"] and infos[0]["std"] == infos[1]["std"]


def test_load_data_says_why_a_torchvision_set_is_missing(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def offline(root, train, download):
        if download:
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        raise RuntimeError("Dataset not found or corrupted. You can use download=True")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    config = tl.Config(data="cifar10", data_root=str(tmp_path))
    with pytest.raises(tl.UsageError, match="download is off .*; add download=True to fetch it"):
        tl.load_data(config)
    with pytest.raises(tl.UsageError, match="not downloaded .*Name or service.*check the network"):
        tl.load_data(dataclasses.replace(config, download=True))


def test_load_data_keeps_the_range_of_16_bit_and_float_images(tmp_path):
    import numpy as np
    from PIL import Image

    for c, name in enumerate(("a", "b")):
        (tmp_path / "d" / name).mkdir(parents=True)
        value = 0.25 + 0.5 * c  # a flat image at a quarter or three quarters of the range
        Image.fromarray(np.full((16, 16), int(value * 65535), np.uint16)).save(
            tmp_path / "d" / name / "16.png"
        )
        Image.fromarray(np.full((16, 16), int(value * 65535), np.int32)).save(
            tmp_path / "d" / name / "32.tif"
        )
        Image.fromarray(np.full((16, 16), value, np.float32)).save(tmp_path / "d" / name / "f.tif")
    config = tl.Config(data=str(tmp_path / "d"), image_size=8, mean="0.5", std="0.25")
    train, val, _ = tl.load_data(dataclasses.replace(config, augment=False))
    for image, label in [*train, *val]:
        expected = (0.25 + 0.5 * label) * 255  # PIL's convert would clip these to 255
        assert image.shape == (3, 8, 8) and abs(image.float().mean() - expected) < 1.5


@pytest.mark.parametrize("width", [64, 1280])  # decoded whole, and at a reduced size (draft)
def test_load_data_turns_exif_rotated_photos_upright(tmp_path, width):
    import numpy as np
    from PIL import Image

    stored = np.zeros((width // 2, width, 3), np.uint8)
    stored[:, width // 2 :] = 255  # left half dark, right half bright, as stored
    turned = Image.Exif()
    turned[0x0112] = 6  # to be shown rotated 90 degrees clockwise: the left half on top
    for name in ("a", "b"):
        (tmp_path / "d" / name).mkdir(parents=True)
        Image.fromarray(stored).save(tmp_path / "d" / name / "0.jpg", exif=turned)
    config = tl.Config(data=str(tmp_path / "d"), image_size=16, augment=False)
    train, val, _ = tl.load_data(config, rgb=True)
    for image, _ in [*train, *val]:
        top, bottom = image[:, :6].float().mean(), image[:, -6:].float().mean()
        assert top < 40 and bottom > 215, (top, bottom)


def test_load_data_measures_the_normalization_and_training_crops_vary(tmp_path):
    root = make_image_folder(tmp_path / "pets", per_class=12, size=24)
    train, val, info = tl.load_data(tl.Config(data=str(root), image_size=16))
    pixels = torch.stack([image for image, _ in [*train, *val]]).float() / 255
    assert info["image_size"] == 16 and len(info["mean"]) == 3
    assert max(abs(m - v) for m, v in zip(info["mean"], pixels.mean((0, 2, 3)).tolist())) < 0.02
    torch.manual_seed(0)
    first = train[0][0]
    assert any(not torch.equal(first, train[0][0]) for _ in range(5))  # random crop and flip
    assert torch.equal(val[0][0], val[0][0])  # validation: one fixed center crop


def test_load_data_names_a_corrupt_image_read_at_start_up(tmp_path):
    root = make_image_folder(tmp_path / "pets", per_class=6)
    (root / "cat" / "0.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(tl.UsageError, match="cannot read image .*0.png"):
        tl.load_data(tl.Config(data=str(root)))


def test_load_data_refuses_a_fifo_an_empty_file_or_a_broken_link_before_reading(tmp_path):
    root = make_image_folder(tmp_path / "pets", per_class=2)
    config = tl.Config(data=str(root), mean="0.5", std="0.2")  # (nothing measured: none read)
    for name, make in (
        ("fifo.png", os.mkfifo),  # reading it hung the run
        ("empty.jpg", lambda path: path.write_bytes(b"")),
        ("gone.jpg", lambda path: path.symlink_to(tmp_path / "nowhere.jpg")),
    ):
        make(root / "cat" / name)
        with pytest.raises(
            tl.UsageError, match=f"1 image file.s. cannot be read, such as .*{name}"
        ):
            tl.load_data(config)
        (root / "cat" / name).unlink()


def test_load_data_says_what_this_user_may_not_read(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "pets", per_class=2)
    make_image_folder(root / "cat" / "more", classes=("x",), per_class=1)
    config = tl.Config(data=str(root), mean="0.5", std="0.2")
    scandir = os.scandir

    def locked(path):  # as for another user's chmod 700 folder (root may read any)
        if str(path).endswith("more"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    with monkeypatch.context() as m:
        m.setattr(os, "scandir", locked)
        with pytest.raises(tl.UsageError, match="Permission denied: .*more'; make it readable"):
            tl.load_data(config)  # (its image was left out without a word)
    with monkeypatch.context() as m:  # the data folder itself (a traceback)
        m.setattr(Path, "iterdir", lambda path: locked(path.parent / "more"))
        with pytest.raises(tl.UsageError, match="Permission denied: .*'; make it readable for"):
            tl.load_data(config)
    for path in root.rglob("0.png"):
        path.chmod(0o600)  # (another user's file: os.access is asked only then)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and "0.png" not in path)
    with pytest.raises(tl.UsageError, match="3 image file.s. cannot be read, such as .*0.png: em"):
        tl.load_data(config)


def test_load_data_splits_files_whose_names_are_not_utf8(tmp_path):  # as from an old zip
    root = make_image_folder(tmp_path / "pets", per_class=3)
    os.rename(root / "cat" / "0.png", os.fsencode(root / "cat") + b"/caf\xe9.png")
    train, val, _ = tl.load_data(tl.Config(data=str(root), mean="0.5", std="0.2"))
    files = [(data, i) for data in (train, val) for i, (path, _) in enumerate(data.samples)]
    renamed = [(data, i) for data, i in files if "caf" in data.samples[i][0]]
    assert len(files) == 6 and len(renamed) == 1
    data, i = renamed[0]
    assert data[i][0].shape == (3, 64, 64)  # read, as named


def test_image_files_names_an_image_over_pils_decompression_bomb_limit(tmp_path):
    from PIL import Image

    Image.new("1", (14000, 14000)).save(tmp_path / "huge.png")  # 196 Mpx in a 24 KB file
    with pytest.raises(tl._DataError, match="huge.png .*decompression-bomb limit.*shrink it"):
        tl._ImageFiles([(str(tmp_path / "huge.png"), 0)], 8, False, 1.0)[0]


def test_load_data_defaults_to_the_weights_size_and_normalization(tmp_path):
    root = make_image_folder(tmp_path / "pets", per_class=4)
    config = tl.Config(data=str(root), model="resnet18", weights="IMAGENET1K_V1")
    train, _, info = tl.load_data(config, rgb=True)
    assert info["image_size"] == 224 and train[0][0].shape == (3, 224, 224)
    assert info["mean"] == (0.485, 0.456, 0.406) and info["std"] == (0.229, 0.224, 0.225)
    _, _, info = tl.load_data(tl.Config(data=str(root)))  # smallcnn, no weights
    assert info["image_size"] == 64


def test_build_model_normalizes_uint8_images_on_its_own_device():
    torch.manual_seed(0)
    model = tl.build_model("smallcnn", channels=3, classes=4, mean=(0.4, 0.5, 0.6), std=(0.2,) * 3)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    model.eval()
    expected = model[1]((images / 255 - mean) / 0.2)
    assert torch.allclose(model(images), expected, atol=1e-5)
    assert set(model.state_dict()) >= {"0.mean", "0.std", "1.0.weight"}


def test_build_model_loads_weights_from_a_file_and_replaces_the_head(tmp_path):
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=10)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    wrapped = nn.Sequential(tl._Normalize((0.5,) * 3, (0.25,) * 3), source)
    torch.save({"model": wrapped.state_dict(), "step": 3}, tmp_path / "trainloop.pt")
    for name in ("plain.pt", "trainloop.pt"):
        model = tl.build_model("resnet18", channels=3, classes=3, weights=str(tmp_path / name))
        assert torch.equal(model.conv1.weight, source.conv1.weight)
        assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
        assert model.fc.weight.shape == (3, 512)  # a new head for 3 classes


def test_build_model_from_a_training_checkpoint_takes_its_ema(tmp_path):
    torch.manual_seed(1)
    live, ema = tl.small_cnn(3, 10), tl.small_cnn(3, 10)
    torch.save({"format": 2, "model": live.state_dict(), "ema": ema.state_dict()}, tmp_path / "l")
    model = tl.build_model("smallcnn", channels=3, classes=4, weights=str(tmp_path / "l"))
    assert torch.equal(model[0].weight, ema[0].weight)  # the weights best.pt would hold


def test_build_model_rejects_weights_of_another_model(tmp_path):
    torch.save(tl.small_cnn(3, 2).state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(tl.UsageError, match="does not fit model='resnet18'"):
        tl.build_model("resnet18", channels=3, classes=2, weights=str(tmp_path / "cnn.pt"))


def test_build_model_refuses_weights_that_are_not_a_state_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(tl.UsageError, match="not a readable state_dict .it holds a Tensor"):
        tl.build_model("smallcnn", channels=3, classes=2, weights=str(tmp_path / "tensor.pt"))
    with pytest.raises(tl.UsageError, match="is a directory; pass a weights file"):
        tl.build_model("smallcnn", channels=3, classes=2, weights=str(tmp_path))


def test_build_model_refuses_a_picture_or_a_pickled_model_as_weights_with_only_its_advice(
    tmp_path,
):
    (tmp_path / "some.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))  # a JPEG's start
    torch.save(nn.Linear(2, 2), tmp_path / "model.pt")  # the whole module, pickled
    (tmp_path / "empty.pt").touch()
    for name, why in [
        ("empty.pt", "the file is empty"),
        ("some.jpg", "Unsupported operand 255"),
        (
            "model.pt",
            "Unsupported global: GLOBAL torch.nn.modules.linear.Linear was not an "
            "allowed global by default",
        ),
    ]:
        with pytest.raises(tl.UsageError) as failed:
            tl.build_model("smallcnn", channels=3, classes=2, weights=str(tmp_path / name))
        assert str(failed.value) == (  # not torch's advice to load it with weights_only=False
            f"weights={str(tmp_path / name)!r}: not a readable state_dict ({why}); pass a file "
            "saved with torch.save(model.state_dict()) or a trainloop checkpoint"
        )


def fake_hub_cache(torch_home: Path, seed=2):
    """TORCH_HOME with a randomly initialised resnet18 saved where torchvision's weights API
    looks for IMAGENET1K_V1 (hub/checkpoints/<the file name of its URL>)."""
    import torchvision

    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    path = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.manual_seed(seed)
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), path)
    return source


def test_build_model_loads_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch):
    source = fake_hub_cache(tmp_path / "home")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(socket, "create_connection", None)  # any network use would fail
    model = tl.build_model("resnet18", channels=3, classes=5, weights="DEFAULT")
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert model.fc.weight.shape == (5, 512)


def offline(*args, **kwargs):
    raise OSError("Network is unreachable")


def test_cli_weights_offline_and_not_cached_exits_2_in_seconds(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "pets", per_class=4)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(socket, "create_connection", offline)
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    args = ["--data", "pets", "--model", "resnet18", "--weights", "DEFAULT", "--workers", "0"]
    result = cli(args, tmp_path, monkeypatch)
    assert result.exit_code == 2 and time.monotonic() - started < 10
    line = result.output.strip().splitlines()[-1]
    expected = tmp_path / "home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert line.startswith("trainloop: error: --weights DEFAULT: ") and str(expected) in line
    assert "download https://download.pytorch.org/models/resnet18-f37072fd.pth" in line


def test_cli_weights_unknown_name_exits_2_listing_the_names(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "pets", per_class=4)
    args = ["--data", "pets", "--model", "resnet18", "--weights", "IMAGENET9K", "--workers", "0"]
    result = cli(args, tmp_path, monkeypatch)
    assert result.exit_code == 2 and "IMAGENET1K_V1" in result.output


def test_cli_bad_mean_exits_2_naming_it(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "pets", per_class=4)
    result = cli(["--data", "pets", "--mean", "0.5,x"], tmp_path, monkeypatch)
    assert (
        result.exit_code == 2
        and "--mean 0.5,x is not 1 or 3 comma-separated numbers" in result.output
    )


def test_cli_records_image_size_and_normalization_for_eval_only(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "pets", per_class=8, size=30)
    args = ["--data", "pets", "--epochs", "1", "--batch-size", "4", "--workers", "0"]
    split = ["--seed", "3", "--val-fraction", "0.3", "--image-size", "24"]
    result = cli(args + split + ["--out", "run"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    started = "trainloop: cpu; data pets: 2 classes, 12 train / 4 val images, 24 px"
    assert started in result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    mean = torch.tensor([float(v) for v in saved["mean"].split(",")])
    assert saved["image_size"] == 24 and len(mean) == 3 and saved["std"]
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert torch.allclose(ckpt["model"]["0.mean"].flatten(), mean * 255)
    # Neither data, split nor size given: the run's own, so the same validation images.
    result = cli(["--out", "run", "--eval-only", "--workers", "0"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert f"{started}, mean {saved['mean']}, std {saved['std']}" in result.output
    assert "eval run/best.pt: val_acc=" in result.output


def test_cli_fine_tunes_pretrained_weights_from_the_cache(tmp_path, monkeypatch):
    fake_hub_cache(tmp_path / "home")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    make_image_folder(tmp_path / "pets", per_class=4, size=40)
    args = ["--data", "pets", "--model", "resnet18", "--weights", "DEFAULT", "--epochs", "1"]
    args += ["--image-size", "32", "--batch-size", "4", "--workers", "0", "--out", "run"]
    result = cli(args, tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "mean 0.485,0.456,0.406, std 0.229,0.224,0.225; model resnet18 from DEFAULT" in (
        result.output
    )
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["model"]["1.fc.weight"].shape == (2, 512)


# ---- faults: full disk, killed loader worker, out of memory (issue 17) ----------------------

# Put before JOB or WORKER: fit reads the training data through a Dataset whose loader worker
# SIGKILLs itself when it first reads sample `kill_at` (as the out-of-memory killer would; a
# marker file in the working directory makes it the first time only, so a rerun runs clean),
# and ends the process as the CLI does: one line on stderr and the exit status.
KILLS_A_WORKER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    import trainloop as tl

    class KillsItsWorker(torch.utils.data.Dataset):
        def __init__(self, data, at):
            self.data, self.at = data, at

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            in_worker = torch.utils.data.get_worker_info() is not None
            if i == self.at and in_worker and not Path("killed").exists():
                Path("killed").touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return self.data[i]

    _opts = json.loads(sys.argv[1])
    _at, _in_val = _opts.pop("kill_at", -1), _opts.pop("kill_in_val", False)
    sys.argv[1] = json.dumps(_opts)
    _fit = tl.fit

    def fit(model, train, val, **kw):  # as the CLI runs it: one line and an exit status
        if _in_val:
            val = KillsItsWorker(val, _at)
        else:
            train = KillsItsWorker(train, _at)
        sys.exit(tl._exit_code_of(lambda: _fit(model, train, val, **kw) and 0))

    tl.fit = fit
""")


def failing_save(monkeypatch, works: int, kind: str):
    """torch.save works `works` times, then writes part of a file and fails: as torch's zip writer
    does on a full disk ("zip": a RuntimeError whose context is the OSError; "bare": without
    one), or as a read-only filesystem does ("readonly")."""
    import errno

    real_save, real_unlink, calls = torch.save, Path.unlink, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= works:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 the first bytes")
        if kind == "readonly":  # remounted read-only: nothing is written, unlinking fails too
            real_unlink(Path(f.name))
            monkeypatch.setattr(Path, "unlink", read_only)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        try:
            if kind == "zip":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9 vs 7")

    def read_only(path, *args, **kwargs):  # as unlinking on a read-only filesystem does
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(torch, "save", save)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_fit_full_disk_while_writing_metrics_is_a_save_error(tmp_path, monkeypatch):
    fit_mlp(32, epochs=1, out=tmp_path)
    monkeypatch.setattr(Path, "write_text", disk_full)
    monkeypatch.setattr(tl, "_write_config", lambda *args: None)
    kept = f"the last good checkpoint {tmp_path / 'last.pt'} is intact"
    with pytest.raises(tl.SaveError, match=f"metrics.jsonl: no space left on device; {kept}"):
        fit_mlp(32, epochs=2, out=tmp_path)


def test_fit_full_disk_at_the_start_keeps_the_run_and_names_its_checkpoint(tmp_path, monkeypatch):
    from torch.utils import tensorboard

    fit_mlp(32, epochs=1, out=tmp_path)
    kept = f"; the last good checkpoint {tmp_path / 'last.pt'} is intact. Free space on"
    with monkeypatch.context() as m:  # the run directory's config.json
        m.setattr(Path, "write_text", disk_full)
        with pytest.raises(tl.SaveError, match=f"config.json: no space left on device{kept}"):
            fit_mlp(32, epochs=2, out=tmp_path)
    monkeypatch.setattr(tensorboard, "SummaryWriter", disk_full)  # its file's header
    events = re.escape(f"{tmp_path / 'events.out.tfevents.*'}: no space left on device{kept}")
    with pytest.raises(tl.SaveError, match=events):
        fit_mlp(32, epochs=2, out=tmp_path)
    assert tl.load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


@pytest.mark.parametrize(
    "kind,free,why",
    [
        ("zip", 10**9, "no space left on device"),  # the errno decides
        ("bare", 0, "no space left on device"),  # no errno: the free space decides
        ("bare", 10**9, "write failed ([enforce fail at inline_container.cc:672]"),
        ("readonly", 10**9, "read-only file system"),
    ],
)
def test_fit_failed_save_says_why_and_keeps_the_last_checkpoint(
    kind, free, why, tmp_path, monkeypatch
):
    import shutil

    failing_save(monkeypatch, works=2, kind=kind)  # the saves at steps 2 and 4 work
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=free))
    out = tmp_path / "run"
    with pytest.raises(tl.SaveError) as failed:
        tl.fit(mlp(), blobs(160), epochs=1, batch_size=16, save_every=2, out=out, **quiet())
    assert isinstance(failed.value, tl.CheckpointError)  # what callers already catch
    assert str(failed.value).startswith(f"could not write {out / 'last.pt'}: {why}"), failed.value
    assert f"the last good checkpoint {out / 'last.pt'} is intact" in str(failed.value)
    monkeypatch.undo()
    assert tl.load_checkpoint(out / "last.pt")["step"] == 4
    assert tl.load_checkpoint(out / "last.prev.pt")["step"] == 2
    assert not list(out.glob(".*.tmp"))  # the partial file is gone


class RunsOutOfMemory(nn.Module):
    """An MLP whose `at`-th training forward raises `error`, as an allocation would."""

    def __init__(self, at: int, error: Exception):
        super().__init__()
        self.net, self.at, self.error, self.calls = mlp(), at, error, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise self.error
        return self.net(x)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"
        ),
        MemoryError(),
        RuntimeError("CUDA error: out of memory"),  # from a kernel, not the allocator
    ],
)
def test_fit_out_of_memory_names_the_step_and_the_knobs_and_keeps_the_checkpoint(error, tmp_path):
    out = tmp_path / "run"
    model = RunsOutOfMemory(7, error)
    with pytest.raises(tl.OutOfMemoryError) as failed:
        tl.fit(model, blobs(160), epochs=1, batch_size=16, save_every=3, out=out, **quiet())
    assert isinstance(failed.value, torch.OutOfMemoryError)  # what callers already catch
    assert str(failed.value).startswith(
        "out of memory in step 7 (epoch 1) on cpu at batch_size=16 per process; the step was "
        f"not counted and the last good checkpoint {out / 'last.pt'} is intact. Use "
        "batch_size=8 accumulate=2 (the same global batch), precision='bf16' or "
        "channels_last=True, then run again"
    ), failed.value
    assert tl.load_checkpoint(out / "last.pt")["step"] == 6


class FailsToRead(Dataset):
    """blobs(n) read one sample at a time; reading sample `at` raises `error` once."""

    def __init__(self, n: int, at: int, error: Exception):
        self.data, self.at, self.error = blobs(n), at, error

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if i == self.at and self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.data[i]


def test_fit_out_of_memory_reading_a_batch_saves_the_last_step_and_names_the_loader(tmp_path):
    data = FailsToRead(160, at=37, error=MemoryError())
    with pytest.raises(tl.OutOfMemoryError) as failed:
        tl.fit(mlp(), data, epochs=1, batch_size=16, workers=0, out=tmp_path, **quiet())
    message = str(failed.value)
    assert message.startswith("out of memory reading a batch at step "), message
    assert f"checkpoint {tmp_path / 'last.pt'} written" in message  # (the steps were lost)
    assert "precision" not in message and "channels_last" not in message  # not a step's
    step = int(message.split("at step ")[1].split()[0])
    assert tl.load_checkpoint(tmp_path / "last.pt")["step"] == step


@pytest.mark.slow
@pytest.mark.parametrize("error", [EOFError("Ran out of input"), ConnectionResetError(104, "x")])
def test_fit_a_datasets_own_eof_or_connection_error_in_a_worker_is_not_a_dead_worker(error):
    data = FailsToRead(64, at=5, error=error)
    with pytest.raises(type(error), match="Caught .* in DataLoader worker process"):
        tl.fit(mlp(), data, epochs=1, batch_size=16, workers=1, **quiet())  # (WorkerDiedError)


class FailsInValidation(nn.Module):
    """An MLP whose first evaluation forward raises `error` (then it evaluates as usual)."""

    def __init__(self, error: Exception):
        super().__init__()
        self.net, self.error = mlp(), error

    def forward(self, x):
        if not self.training and self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.net(x)


def test_fit_out_of_memory_in_a_validation_metric_is_not_called_reading(tmp_path):
    def greedy(output, target):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(tl.OutOfMemoryError, match="^out of memory in the validation of epoch 1 "):
        fit_mlp(32, blobs(16), epochs=1, metrics={"greedy": greedy}, out=tmp_path)


def test_fit_out_of_memory_in_validation_saves_the_epochs_training_first(tmp_path):
    data, val = blobs(64), blobs(32, seed=1)
    tl.fit(
        FailsInValidation(None), data, val, epochs=2, batch_size=16, out=tmp_path / "ref", **quiet()
    )
    model = FailsInValidation(torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(tl.OutOfMemoryError) as failed:
        tl.fit(model, data, val, epochs=2, batch_size=16, out=tmp_path / "run", **quiet())
    assert str(failed.value).startswith(
        "out of memory in the validation of epoch 1 on cpu at batch_size=16 per process; "
        f"checkpoint {tmp_path / 'run' / 'last.pt'} written. Use batch_size=8 accumulate=2"
    ), failed.value
    ckpt = tl.load_checkpoint(tmp_path / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["seen"]) == (0, 4, 64)  # trained, not evaluated
    tl.fit(
        FailsInValidation(None), data, val, epochs=2, batch_size=16, out=tmp_path / "run", **quiet()
    )
    assert_same_state(tmp_path / "ref" / "last.pt", tmp_path / "run" / "last.pt")


def test_out_of_memory_on_cuda_gives_the_device_memory_and_peak_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 79.5 * 2**30)
    rt = tl.Runtime(torch.device("cuda", 1), rank=1, world_size=2)
    job = types.SimpleNamespace(config=tl.Config(batch_size=64), runtime=rt, out=None, last=None)
    not_counted = "the step was not counted and there is no checkpoint yet"  # as _fault says
    message = str(tl._out_of_memory(job, "in step 5 (epoch 1)", not_counted))
    assert message.startswith(
        "out of memory in step 5 (epoch 1) on cuda:1 (80.0 GiB, peak use 79.5 GiB) at "
        "batch_size=64 per process; the step was not counted and there is no checkpoint yet"
    ), message
    assert message.endswith("precision='bf16', channels_last=True or shard=True, then run again")
    job.config = tl.Config(batch_size=64, channels_last=True, shard=True, image_size=96)
    rt = dataclasses.replace(rt, amp_dtype=torch.bfloat16)
    job.runtime = rt
    message = str(tl._out_of_memory(job, "in step 5 (epoch 1)", not_counted))
    assert message.endswith("(the same global batch) or image_size=48, then run again"), message


def test_exit_code_of_faults_has_a_status_each_and_names_the_rank(monkeypatch, capsys):
    def raising(error):
        def job():
            raise error

        return job

    faults = [
        (tl.SaveError("could not write x.pt"), tl.EXIT_SAVE),
        (tl.WorkerDiedError("DataLoader worker (pid 7) is killed"), tl.EXIT_WORKER),
        (tl.OutOfMemoryError("out of memory in step 3"), tl.EXIT_MEMORY),
    ]
    assert [code for _, code in faults] == [5, 6, 7]
    for error, code in faults:
        assert tl._exit_code_of(raising(error)) == code
        assert capsys.readouterr().err == f"trainloop: error: {error}\n"  # one process: no rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):  # the process that met the fault says so, rank 0 too
        monkeypatch.setenv("RANK", str(rank))
        for error, code in faults:
            assert tl._exit_code_of(raising(error)) == code
            assert capsys.readouterr().err == f"trainloop: error: (rank {rank}) {error}\n"


def test_exit_code_of_an_error_without_words_names_its_kind(capsys):
    def job():
        raise tl.CheckpointError()

    assert tl._exit_code_of(job) == tl.EXIT_CHECKPOINT
    assert capsys.readouterr().err == "trainloop: error: CheckpointError\n"


@pytest.mark.slow
def test_killed_loader_worker_saves_the_last_step_and_the_rerun_is_bit_identical(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(globals(), "JOB", KILLS_A_WORKER + JOB)  # what run_job starts
    opts = dict(epochs=2, batch_size=8, workers=2)  # 48 steps an epoch
    reference = run_job(tmp_path, out="ref", **opts)
    assert reference.returncode == 0, reference.stderr
    killed = run_job(tmp_path, out="run", kill_at=200, **opts)
    assert killed.returncode == tl.EXIT_WORKER, killed.stderr
    line = re.fullmatch(
        r"trainloop: error: DataLoader worker \(pid \d+\) is killed by signal: Killed at step "
        r"(\d+) \(epoch 1\), most likely by the out-of-memory killer; checkpoint run/last.pt "
        r"written\. Run the same command again to continue; if it recurs, lower --workers 2, "
        r"--batch-size 8 or --image-size <pixels>\n",
        killed.stderr,
    )
    assert line, killed.stderr
    ckpt = tl.load_checkpoint(tmp_path / "run" / "last.pt")  # no --save-every: from the death
    assert (ckpt["epoch"], ckpt["step"]) == (0, int(line[1])) and 0 < ckpt["step"] < 48
    resumed = run_job(tmp_path, out="run", kill_at=200, **opts)  # the marker: no second kill
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(tmp_path / "ref" / "last.pt", tmp_path / "run" / "last.pt")
    assert history_without_time(tmp_path / "ref" / "last.pt") == history_without_time(
        tmp_path / "run" / "last.pt"
    )


@pytest.mark.slow
def test_killed_loader_worker_in_validation_saves_the_epochs_training(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "JOB", KILLS_A_WORKER + JOB)  # what run_job starts
    opts = dict(epochs=2, batch_size=8, workers=2, kill_in_val=True)  # 8 validation batches
    reference = run_job(tmp_path, out="ref", **opts)
    assert reference.returncode == 0, reference.stderr
    killed = run_job(tmp_path, out="run", kill_at=40, **opts)
    assert killed.returncode == tl.EXIT_WORKER, killed.stderr
    assert re.fullmatch(
        r"trainloop: error: DataLoader worker \(pid \d+\) is killed by signal: Killed in the "
        r"validation of epoch 1, most likely by the out-of-memory killer; checkpoint "
        r"run/last.pt written\. Run the same command again to continue; .*\n",
        killed.stderr,
    ), killed.stderr
    ckpt = tl.load_checkpoint(tmp_path / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["history"]) == (0, 48, [])  # trained, not scored
    resumed = run_job(tmp_path, out="run", kill_at=40, **opts)  # the marker: no second kill
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(tmp_path / "ref" / "last.pt", tmp_path / "run" / "last.pt")


# Put before WORKER: rank 1's third training step runs out of memory.
OOM_ON_RANK_1 = textwrap.dedent("""
    import os
    import torch
    import torch.nn.functional as F

    _mse, _steps = F.mse_loss, []

    def mse_loss(*args, **kwargs):
        if torch.is_grad_enabled() and os.environ.get("RANK") == "1":
            _steps.append(1)
            if len(_steps) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _mse(*args, **kwargs)

    F.mse_loss = mse_loss
""")


def run_worker_after(prelude: str, tmp_path, opts: dict):
    """WORKER with `prelude` before it, under torchrun with two processes, in tmp_path."""
    script = tmp_path / "faulty_worker.py"
    script.write_text(prelude + WORKER)
    cmd = torchrun_cmd("--standalone", "--nproc-per-node", 2, script, json.dumps(opts))
    return run(cmd, tmp_path)


@pytest.mark.slow
def test_torchrun_out_of_memory_on_one_rank_names_it_and_stops_the_job(tmp_path):
    opts = dict(n=400, epochs=1, batch_size=8, save_every=2, out="run", quiet=True)
    result = run_worker_after(OOM_ON_RANK_1, tmp_path, opts)
    assert result.returncode != 0
    assert (
        "trainloop: error: (rank 1) out of memory in step 3 (epoch 1) on cpu at --batch-size 8 "
        "per process; the step was not counted and the last good checkpoint run/last.pt is "
        "intact. Use --batch-size 4 --accumulate 2" in result.stderr
    ), result.stderr[-3000:]
    assert processes_of(tmp_path) == []
    assert tl.load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2


@pytest.mark.slow
def test_torchrun_killed_loader_worker_names_the_rank_and_the_rerun_continues(tmp_path):
    opts = dict(n=192, epochs=2, batch_size=8, workers=1, save_every=4, quiet=True)
    reference = run_worker_after(KILLS_A_WORKER, tmp_path, dict(opts, out="ref"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = run_worker_after(KILLS_A_WORKER, tmp_path, dict(opts, out="run", kill_at=100))
    assert killed.returncode != 0
    # The rank cannot save alone (a save gathers every rank's RNG state): the last one is kept.
    died = re.search(
        r"trainloop: error: \(rank [01]\) DataLoader worker \(pid \d+\) is killed by signal: "
        r"Killed at step (\d+) \(epoch 1\), most likely by the out-of-memory killer; the last "
        r"good checkpoint run/last.pt is intact\. Run the same command again to continue; if it "
        r"recurs, lower --workers 1, --batch-size 8 or --image-size <pixels>\n",
        killed.stderr,
    )
    assert died, killed.stderr[-3000:]
    assert processes_of(tmp_path) == []
    saved = tl.load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["step"] == int(died[1]) // 4 * 4 > 0
    resumed = run_worker_after(KILLS_A_WORKER, tmp_path, dict(opts, out="run", kill_at=100))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(tmp_path / "ref" / "last.pt", tmp_path / "run" / "last.pt")


# ---- sharded training: FSDP2 and torch.distributed.checkpoint (issue 16) --------------------


def sharded_tensors(path: Path, model: nn.Module, **settings) -> dict:
    """Every tensor of model, optimizer and EMA of a checkpoint (a directory of shards or a
    file), restored into a plain, unsharded state built like fit's."""
    state = tl._new_state(model, tl.Config(**settings), CPU, None, None, 1)
    tl.load_checkpoint(path, state)
    ema = state.ema.state_dict() if state.ema is not None else None
    parts = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict()}
    return state_tensors({**parts, "ema": ema})


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def test_fit_shard_on_one_process_writes_a_checksummed_directory(tmp_path):
    history = fit_mlp(n=96, val=blobs(32, seed=1), epochs=2, shard=True, out=tmp_path, ema=0.9)
    last = tmp_path / "last"
    assert sorted(p.name for p in last.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "checksums.json",
        "trainloop.pt",
    ]
    crcs = json.loads((last / "checksums.json").read_text())
    assert sorted(crcs) == [".metadata", "__0_0.distcp", "trainloop.pt"]
    assert (tmp_path / "last.prev").is_dir()  # the first epoch's, kept
    assert not list(tmp_path.glob(".*.tmp"))
    ckpt = tl.load_checkpoint(last)
    assert ckpt["sharded"] == ["ema", "model", "optimizer"] and ckpt["epoch"] == 2
    assert ckpt["history"] == history


def test_fit_shard_on_one_process_trains_as_the_plain_model(tmp_path):
    plain = fit_mlp(n=96, val=blobs(32, seed=1), epochs=2)
    sharded = fit_mlp(n=96, val=blobs(32, seed=1), epochs=2, shard=True)
    for a, b in zip(plain, sharded):  # fused vs foreach kernels: equal to rounding
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_acc"] == b["val_acc"]


def test_best_pt_of_a_sharded_run_loads_into_the_plain_model(tmp_path):
    fit_mlp(n=96, val=blobs(32, seed=1), epochs=1, shard=True, out=tmp_path)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    model = mlp()
    model.load_state_dict(best["model"])  # plain names and whole tensors
    assert_same_tensors(
        state_tensors({"model": model.state_dict()}),
        {k: v for k, v in sharded_tensors(tmp_path / "last", mlp()).items() if "model" in k},
    )


def test_fit_shard_two_plus_two_epochs_equal_four_bit_for_bit(tmp_path):
    settings = dict(n=96, val=blobs(32, seed=1), shard=True, ema=0.9, accumulate=2)
    settings.update(schedule="constant")  # the cosine's length would follow `epochs`
    fit_mlp(epochs=4, out=tmp_path / "straight", **settings)
    fit_mlp(epochs=2, out=tmp_path / "resumed", **settings)
    fit_mlp(epochs=4, out=tmp_path / "resumed", **settings)
    a = sharded_tensors(tmp_path / "straight" / "last", mlp(), ema=0.9)
    b = sharded_tensors(tmp_path / "resumed" / "last", mlp(), ema=0.9)
    assert_same_tensors(a, b)


def test_a_file_checkpoint_resumes_a_sharded_run_and_a_directory_a_plain_one(tmp_path):
    constant = dict(n=96, schedule="constant")
    fit_mlp(epochs=4, out=tmp_path / "straight", **constant)
    fit_mlp(epochs=2, out=tmp_path / "a", **constant)
    fit_mlp(epochs=3, out=tmp_path / "a", shard=True, **constant)  # last.pt -> last/
    assert (tmp_path / "a" / "last").is_dir()
    history = fit_mlp(epochs=4, out=tmp_path / "a", **constant)  # last/ (newer) -> last.pt
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    a = state_tensors(torch.load(tmp_path / "straight" / "last.pt", weights_only=True))
    b = state_tensors(torch.load(tmp_path / "a" / "last.pt", weights_only=True))
    assert a.keys() == b.keys()
    for key in a:  # foreach (sharded) and fused (plain) kernels round differently
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_a_damaged_shard_is_reported_and_the_previous_directory_resumes(tmp_path):
    fit_mlp(n=96, epochs=2, out=tmp_path, shard=True)
    damage(tmp_path / "last" / "__0_0.distcp")
    with pytest.raises(tl.CheckpointError, match="__0_0.distcp fails its checksum"):
        tl.load_checkpoint(tmp_path / "last")
    lines = []
    history = fit_mlp(n=96, epochs=2, out=tmp_path, shard=True, log=lines.append)
    assert any("fails its checksum; falling back to" in line for line in lines)
    assert [row["epoch"] for row in history] == [1, 2]  # epoch 2 redone from epoch 1's
    assert (tmp_path / "last.corrupt").is_dir()
    assert tl.load_checkpoint(tmp_path / "last.prev")["epoch"] == 1  # kept: the last good one
    history = fit_mlp(n=96, epochs=3, out=tmp_path, shard=True, log=lines.append)
    damage(tmp_path / "last" / "__0_0.distcp")  # again: the directory set aside is replaced
    history = fit_mlp(n=96, epochs=4, out=tmp_path, shard=True, log=lines.append)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]


def damage(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_incomplete_sharded_checkpoint_is_reported(tmp_path):
    fit_mlp(n=96, epochs=1, out=tmp_path, shard=True)
    (tmp_path / "last" / "checksums.json").unlink()
    with pytest.raises(tl.CheckpointError, match="is incomplete"):
        tl.load_checkpoint(tmp_path / "last")


def test_a_sharded_checkpoint_whose_metadata_could_run_code_is_refused(tmp_path):
    fit_mlp(n=96, epochs=1, out=tmp_path, shard=True)
    last = tmp_path / "last"
    (last / ".metadata").write_bytes(pickle.dumps(print))  # a global outside DCP's records
    crcs = json.loads((last / "checksums.json").read_text())
    crcs[".metadata"] = tl._crc32(last / ".metadata")
    (last / "checksums.json").write_text(json.dumps(crcs))
    with pytest.raises(tl.CheckpointError, match="refused: its .metadata holds builtins.print"):
        tl.load_checkpoint(last)
    victim = tmp_path / "victim.txt"
    victim.write_text("kept")
    pretenders = [  # a module imported just by naming it; a class reached through a module
        b"\x80\x04cthis\ns\n.",
        b"\x80\x04" + short("torch.distributed.checkpoint.filesystem") + short("io.FileIO")
        + b"\x93" + short(str(victim)) + short("w") + b"\x86R.",
    ]  # fmt: skip
    for payload in pretenders:
        (last / ".metadata").write_bytes(payload)
        crcs[".metadata"] = tl._crc32(last / ".metadata")
        (last / "checksums.json").write_text(json.dumps(crcs))
        sys.modules.pop("this", None)
        with pytest.raises(tl.CheckpointError, match="which could run code"):
            tl.load_checkpoint(last)
        assert "this" not in sys.modules and victim.read_text() == "kept"


def short(text: str) -> bytes:
    """A pickle SHORT_BINUNICODE of `text`."""
    return b"\x8c" + bytes([len(text)]) + text.encode()


def test_fit_shard_refuses_an_optimizer_or_scheduler_object_and_bad_blocks():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5)
    refused = [
        (dict(shard=True, optimizer=optimizer), "pass its name"),
        (dict(shard=True, scheduler=scheduler), "a scheduler as a function optimizer -> scheduler"),
        (dict(shard_blocks=[nn.Linear]), "shard_blocks is for shard=True"),
        (dict(shard=True, shard_blocks=nn.Linear), "must be a list of module classes"),
        (dict(shard=True, shard_blocks=["Linear"]), "must be a list of module classes"),
        (dict(shard=True, shard_blocks=[nn.Conv2d]), r"\['Conv2d'\]: the model holds no such"),
    ]
    for settings, message in refused:
        with pytest.raises(tl.UsageError, match=message):
            tl.fit(model, blobs(), **quiet(**settings))


def test_resume_auto_takes_last_before_last_prev_whatever_their_times(tmp_path):
    fit_mlp(n=96, epochs=2, out=tmp_path, shard=True)
    os.utime(tmp_path / "last.prev", (time.time() + 60, time.time() + 60))  # as a copy may leave
    lines = []
    fit_mlp(n=96, epochs=2, out=tmp_path, shard=True, log=lines.append, quiet=False)
    assert any("last: already complete (2 of 2 epochs)" in line for line in lines), lines


def test_a_file_inside_a_sharded_checkpoint_is_refused_naming_its_directory(tmp_path):
    fit_mlp(n=96, epochs=1, out=tmp_path, shard=True)
    with pytest.raises(
        tl.UsageError, match=f"part of a sharded checkpoint; pass {tmp_path / 'last'}"
    ):
        tl.load_checkpoint(tmp_path / "last" / "trainloop.pt")


def test_checksums_that_leave_out_a_file_are_refused(tmp_path):
    fit_mlp(n=96, epochs=1, out=tmp_path, shard=True)
    crcs = json.loads((tmp_path / "last" / "checksums.json").read_text())
    (tmp_path / "last" / "checksums.json").write_text(json.dumps({".metadata": 0}))
    with pytest.raises(tl.CheckpointError, match="corrupt: .*distcp is not in checksums.json"):
        tl.load_checkpoint(tmp_path / "last")
    (tmp_path / "last" / "checksums.json").write_text(json.dumps({"more.distcp": 0, **crcs}))
    with pytest.raises(tl.CheckpointError, match="incomplete: more.distcp is missing"):
        tl.load_checkpoint(tmp_path / "last")


def test_a_run_directory_passed_as_a_checkpoint_is_a_usage_error(tmp_path):
    fit_mlp(n=32, epochs=1, out=tmp_path / "run")
    message = (
        f"run is a run directory; pass a checkpoint in it, e.g. {tmp_path / 'run' / 'last.pt'}"
    )
    with pytest.raises(tl.UsageError, match=re.escape(message)):
        fit_mlp(n=32, epochs=2, out=tmp_path / "other", resume=tmp_path / "run")


def test_shard_blocks_names_the_modules_sharded_one_by_one():
    model = nn.Sequential(tl._Normalize([0.5], [0.25]), mlp())
    assert tl._blocks(model, None) == [model[1][0], model[1][2]]  # through the wrapper
    blocks = tl._blocks(model, [nn.Linear])
    assert blocks == [model[1][2], model[1][0]]  # innermost first
    stack = Stack(2)  # its blocks in a ModuleList, which has no forward to shard
    assert tl._blocks(stack, None) == [*stack.hidden, stack.head]  # (the ModuleList: a ValueError)

    class Heads(nn.ModuleList):  # a container with a forward of its own: one block
        def forward(self, x):
            return torch.stack([head(x) for head in self]).mean(0)

    heads = nn.Sequential(nn.Linear(8, 8), Heads(nn.Linear(8, 3) for _ in range(2)))
    assert tl._blocks(heads, None) == [heads[0], heads[1]]


SHARDED = dict(ELASTIC, shard=True, ema=0.9, epochs=2, batch_norm=True)


@pytest.fixture(scope="module")
def sharded_kill(tmp_path_factory):
    """2 sharded processes: an unbroken run, and one whose rank 0 is SIGKILLed at step 10 (last
    checkpoint: step 8), then rerun on 2."""
    tmp_path = tmp_path_factory.mktemp("sharded_kill")
    wide = dict(SHARDED, width=16384, lr=2e-5)  # shards large beside the files' own overhead
    reference = run_worker(tmp_path, dict(wide, out="ref"))
    started = time.monotonic()
    killed = run_worker(tmp_path, dict(wide, fault=[0, 10, "kill"]))
    elapsed = time.monotonic() - started
    resumed = run_worker(tmp_path, wide)
    return reference, killed, elapsed, resumed, tmp_path


def worker_model(width=16):
    return nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.Tanh(), nn.Linear(width, 1))


@pytest.mark.slow
def test_sharded_run_killed_and_rerun_is_bit_identical(sharded_kill):
    reference, killed, _, resumed, tmp_path = sharded_kill
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = sharded_tensors(tmp_path / "ref" / "last", worker_model(16384), ema=0.9)
    b = sharded_tensors(tmp_path / "run" / "last", worker_model(16384), ema=0.9)
    assert any(k.startswith("ema/") for k in a) and any("momentum" in k for k in a)
    assert_same_tensors(a, b)
    ref, run = (tl.load_checkpoint(tmp_path / d / "last") for d in ("ref", "run"))
    assert history_of(ref) == history_of(run)


def history_of(ckpt: dict) -> list:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in ckpt["history"]]


@pytest.mark.slow
def test_sharded_run_killed_rank_ends_the_job_quickly(sharded_kill):
    _, killed, elapsed, _, tmp_path = sharded_kill
    assert killed.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after rank 0 was killed"
    assert processes_of(tmp_path) == []


@pytest.mark.slow
def test_sharded_checkpoint_holds_a_shard_of_about_half_per_process(sharded_kill):
    _, _, _, _, tmp_path = sharded_kill
    sizes = [(tmp_path / "ref" / "last" / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert max(sizes) / min(sizes) < 1.15, sizes
    whole = (tmp_path / "ref" / "best.pt").stat().st_size  # the model alone, unsharded
    assert 2.5 * whole < sum(sizes) < 3.5 * whole  # model, momentum and EMA, each split in 2
    best = torch.load(tmp_path / "ref" / "best.pt", weights_only=True)
    worker_model(16384).load_state_dict(best["model"])


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_sharded_elastic_resume_sees_each_sample_of_the_epoch_once(tmp_path, first, then):
    opts = dict(SHARDED, epochs=1, batch_norm=False)  # 101 - 64 samples leave a batch of 1
    killed = run_worker(tmp_path, dict(opts, record="killed", fault=[0, 10, "kill"]), first)
    assert killed.returncode != 0
    resumed = run_worker(tmp_path, dict(opts, record="resumed"), nproc=then)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"world_size {first} -> {then} (elastic resume" in resumed.stdout
    before, after = recorded(tmp_path, "killed"), recorded(tmp_path, "resumed")
    kept = [i for rows in before.values() for step, idx in rows if step <= 8 for i in idx]
    again = [i for rows in after.values() for _, idx in rows for i in idx]
    assert len(kept) == 8 * 4 * first  # trained on before the step-8 checkpoint
    seen = Counter(kept + again)
    assert set(seen.values()) == {1}  # none twice
    assert len(seen) >= 101 - (then - 1)  # at most the odd tail sample left out
    ckpt = tl.load_checkpoint(tmp_path / "run" / "last")
    assert ckpt["epoch"] == 1 and ckpt["world_size"] == then


@pytest.mark.slow
def test_sharded_two_processes_train_as_ddp_clipping_the_global_norm(tmp_path):
    opts = dict(n=96, n_val=32, epochs=2, batch_size=4, accumulate=2, clip_grad=0.05, quiet=True)
    ddp = run_worker(tmp_path, dict(opts, out="ddp"))
    sharded = run_worker(tmp_path, dict(opts, out="sharded", shard=True))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    a = sharded_tensors(tmp_path / "ddp" / "last.pt", worker_model_plain())
    b = sharded_tensors(tmp_path / "sharded" / "last", worker_model_plain())
    assert a.keys() == b.keys()
    for key in a:  # the same sums in another order: equal to rounding
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    rows = [read_rows(tmp_path / d / "metrics.jsonl")[-1] for d in ("ddp", "sharded")]
    assert rows[0]["val_loss"] == pytest.approx(rows[1]["val_loss"], rel=1e-4)


def worker_model_plain():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def test_fit_shard_casts_weights_for_compute_with_bf16_and_takes_a_scheduler_function():
    model, dtypes = mlp(), []
    model[0].register_forward_pre_hook(lambda module, args: dtypes.append(module.weight.dtype))
    history = tl.fit(
        model,
        blobs(96),
        epochs=3,
        batch_size=16,
        lr=0.1,
        shard=True,
        precision="bf16",
        shard_blocks=[nn.Linear],
        scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 6),
        **quiet(),
    )
    assert set(dtypes) == {torch.bfloat16}  # FSDP's MixedPrecisionPolicy, not only autocast
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["lr"] == pytest.approx(0.1 * 0.1**2)  # 18 steps: two StepLR decays


def test_fit_shard_trains_batchnorm_in_bf16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    settings = dict(epochs=3, batch_size=16, lr=0.1, shard=True, precision="bf16")
    history = tl.fit(model, blobs(96), **settings, **quiet())  # (bf16 weights, fp32 statistics:
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]  # a RuntimeError)


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.layer = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.relu(self.layer(x))


def test_fit_shard_evaluates_the_ema_with_its_current_weights_without_checkpoints(tmp_path):
    def val_losses(out):
        torch.manual_seed(0)  # the root holds both Linears: FSDP keeps them gathered after eval
        model = nn.Sequential(nn.Linear(8, 16), Residual(16), nn.Linear(16, 3))
        settings = dict(epochs=3, batch_size=16, shard=True, shard_blocks=[Residual], ema=0.9)
        history = tl.fit(model, blobs(96), blobs(32, seed=1), out=out, **settings, **quiet())
        return [row["val_loss"] for row in history]

    assert val_losses("") == val_losses(tmp_path)  # (without saves, the EMA's root stayed stale)


class Stack(nn.Module):
    def __init__(self, depth: int):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.head(x)


def test_a_sharded_checkpoint_is_refused_by_a_model_or_optimizer_that_holds_less(tmp_path):
    tl.fit(Stack(2), blobs(96), epochs=1, batch_size=16, shard=True, out=tmp_path, **quiet())
    missing = "hidden.1.bias: in the checkpoint, not in the model"
    with pytest.raises(tl.UsageError, match=re.escape(missing)):  # (it resumed, silently)
        tl.fit(Stack(1), blobs(96), epochs=2, batch_size=16, shard=True, out=tmp_path, **quiet())
    with pytest.raises(tl.UsageError, match=re.escape(missing)):
        tl.load_checkpoint(tmp_path / "last", one_step_state(Stack(1)))
    with pytest.raises(tl.UsageError, match="2 optimizer groups in the checkpoint, 1 here"):
        tl.load_checkpoint(tmp_path / "last", one_step_state(Stack(2)))  # (group 0's decay for all)


class Counts(nn.Linear):
    """A Linear whose extra state is a dict, which DCP saves flattened (counts.calls, ...)."""

    def __init__(self):
        super().__init__(8, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)

    def get_extra_state(self):
        return {"calls": self.calls, "scale": torch.ones(1)}

    def set_extra_state(self, state):
        self.calls = state["calls"]


def test_a_sharded_checkpoint_of_a_model_with_extra_state_resumes(tmp_path):
    tl.fit(Counts(), blobs(96), epochs=1, batch_size=16, shard=True, out=tmp_path, **quiet())
    history = tl.fit(
        Counts(), blobs(96), epochs=2, batch_size=16, shard=True, out=tmp_path, **quiet()
    )
    assert [row["epoch"] for row in history] == [1, 2]  # (refused: "_extra_state: not in the ...")


class SpareHead(nn.Module):
    """An MLP beside a head that forward never uses: its parameters never get a gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.spare = mlp(), nn.Linear(8, 3)

    def forward(self, x):
        return self.body(x)


def test_a_sharded_run_with_a_parameter_never_trained_resumes_exactly(tmp_path):
    settings = dict(batch_size=16, shard=True, schedule="constant", **quiet())
    tl.fit(SpareHead(), blobs(96), epochs=2, out=tmp_path / "straight", **settings)
    tl.fit(SpareHead(), blobs(96), epochs=1, out=tmp_path / "resumed", **settings)
    # (refused: "Missing key in checkpoint state_dict: optimizer.state.spare.weight...")
    tl.fit(SpareHead(), blobs(96), epochs=2, out=tmp_path / "resumed", **settings)
    runs = [tmp_path / "straight" / "last", tmp_path / "resumed" / "last"]
    straight, resumed = (sharded_tensors(run, SpareHead()) for run in runs)
    assert_same_tensors(straight, resumed)


def test_resuming_a_sharded_checkpoint_into_another_model_names_the_mismatch(tmp_path):
    fit_mlp(n=96, epochs=1, out=tmp_path, shard=True)
    with pytest.raises(tl.UsageError, match=r"does not match this model.*model\.0\.weight"):
        tl.fit(mlp(inputs=4), blobs(96, inputs=4), epochs=2, out=tmp_path, **quiet())


@pytest.mark.slow
def test_cli_shard_on_one_process_then_eval_only_of_the_directory(tmp_path):
    args = ["--epochs", "1", "--image-size", "8", "--out", tmp_path / "run", "--quiet"]
    trained = run_cli(*args, "--shard", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"checkpoint {tmp_path / 'run' / 'last'}," in trained.stdout
    evaluated = run_cli(*args, "--eval-only", "--resume", tmp_path / "run" / "last", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert re.search(r"eval .*last: val_acc=0\.\d+ val_loss=", evaluated.stdout)


@pytest.mark.slow
def test_fit_shard_compile_compiles_each_block_in_place(monkeypatch):
    compiled, compile = [], nn.Module.compile

    def spy(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        return compile(module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", spy)
    history = tl.fit(mlp(), blobs(64), epochs=2, batch_size=16, shard=True, compile=True, **quiet())
    assert compiled == ["Linear", "Linear"]  # the two blocks, not the root
    assert history[1]["train_loss"] < history[0]["train_loss"]


def test_building_blocks_save_a_sharded_state_that_a_plain_one_loads(tmp_path):
    with tl._group_of_one(True, CPU):
        model, ema = tl._shard(mlp(), tl.Config(ema=0.9), CPU, None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        with pytest.raises(tl.UsageError, match="needs ema="):  # FSDP cannot deepcopy
            tl.TrainState(model, optimizer, ema_decay=0.9)
        state = tl.TrainState(model, optimizer, ema_decay=0.9, ema=ema)
        for batch in tl.make_loader(blobs(64), batch_size=16, workers=0):
            tl.train_step(state, [batch])
        tl.save_checkpoint(tmp_path / "ckpt", state)
        weights, ema_weights = tl._weights(model), tl._weights(ema)
    plain = mlp(seed=1)
    restored = tl.TrainState(plain, torch.optim.AdamW(plain.parameters(), lr=0.01), ema_decay=0.9)
    tl.load_checkpoint(tmp_path / "ckpt", restored)
    assert restored.step == 4
    assert_same_tensors(plain.state_dict(), weights)
    assert_same_tensors(restored.ema.state_dict(), ema_weights)
    assert len(restored.optimizer.state) == 4  # AdamW's moments of every tensor


def test_a_failed_sharded_save_leaves_no_partial_directory(tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tl, "_checksums", disk_full)
    with pytest.raises(tl.SaveError, match="no space left on device; there is no checkpoint yet"):
        fit_mlp(n=96, epochs=1, out=tmp_path, shard=True)
    assert not list(tmp_path.glob("*last*")) and not list(tmp_path.glob(".*tmp"))


@pytest.mark.slow
def test_sharded_sigterm_stop_and_rerun_is_bit_identical_with_per_process_buffers(tmp_path):
    opts = dict(SHARDED, epochs=1, save_every=0, log_every=4)
    reference = run_worker(tmp_path, dict(opts, out="ref"))
    stopped = run_worker(tmp_path, dict(opts, fault=[0, 6, "term"]))
    assert stopped.returncode != 0 and "exitcode  : 143" in stopped.stderr, stopped.stderr[-3000:]
    assert tl.load_checkpoint(tmp_path / "run" / "last")["step"] == 8  # agreed at a log point
    resumed = run_worker(tmp_path, opts)
    assert reference.returncode == 0 and resumed.returncode == 0, resumed.stderr[-3000:]
    a = sharded_tensors(tmp_path / "ref" / "last", worker_model(), ema=0.9)
    b = sharded_tensors(tmp_path / "run" / "last", worker_model(), ema=0.9)
    assert_same_tensors(a, b)  # the BatchNorm statistics of rank 1 were its own, not rank 0's


@pytest.mark.slow
def test_sharded_validation_with_fewer_batches_than_processes_is_refused_first(tmp_path):
    result = run_worker(tmp_path, dict(SHARDED, n_val=1))
    assert "exitcode  : 2 " in result.stderr, result.stderr[-3000:]  # torchrun's own is 1
    assert result.stderr.count("trainloop: error: val_data has fewer batches than processes") == 1
    assert not re.search(r"\[rank\d\]: Traceback", result.stderr)  # torchrun shows its own
    assert not (tmp_path / "run" / "last").exists()  # before any training


SHARDED_LOOP = textwrap.dedent("""
    import sys, torch, torch.nn as nn
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import TensorDataset
    import trainloop as tl

    rt = tl.setup_device("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    for block in (model[0], model[2], model):
        fully_shard(block)
    state = tl.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    for batch in tl.make_loader(data, batch_size=8, runtime=rt, workers=0):
        tl.train_step(state, [batch], runtime=rt)
    for _ in range(3):
        tl.save_checkpoint(sys.argv[1], state)  # no runtime: the process group's
    again = tl.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    tl.load_checkpoint(sys.argv[1], again)
    steps = tl._gather(again.step, rt)  # one process prints: lines are not interleaved
    try:  # a process without a batch: every process is told, none hangs
        tl.evaluate(model, [batch] if rt.rank == 0 else [], runtime=rt)
    except tl.UsageError as e:
        refused = tl._gather(str(e), rt)
    try:  # without runtime, the process group's: a stream has no len() to even processes out
        tl.evaluate(model, iter([batch]))
    except tl.UsageError as e:
        streamed = tl._gather(str(e), rt)
    scores = tl._gather(tl.evaluate(model, [batch]), rt)  # every process's batch, counted once
    if rt.is_main:
        print("steps", steps, flush=True)
        print("refused", refused, flush=True)
        print("streamed", streamed, flush=True)
        print("same scores", scores[0] == scores[1], flush=True)
    del model, state, again  # sharded modules hold the group: gone before it (README)
    tl.teardown(rt)
""")


@pytest.mark.slow
def test_building_blocks_save_a_sharded_state_under_torchrun_without_a_runtime(tmp_path):
    result = run_script(tmp_path, SHARDED_LOOP, tmp_path / "ckpt")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps [4, 4]" in result.stdout
    assert result.stdout.count("needs a batch on every process") == 2, result.stdout
    assert result.stdout.count("needs data with a len(), e.g. a list") == 2
    assert "same scores True" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if "ckpt" in p.name) == ["ckpt", "ckpt.prev"]


def test_fit_shard_fp16_scales_the_loss_and_checkpoints_the_scaler(tmp_path):
    history = fit_mlp(n=96, epochs=3, lr=0.1, shard=True, precision="fp16", out=tmp_path)
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert tl.load_checkpoint(tmp_path / "last")["scaler"]["scale"] > 0


COUNT_COLLECTIVES = textwrap.dedent("""
    import json, torch, torch.nn as nn
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as group
    from torch.utils.data import TensorDataset
    import trainloop as tl

    calls = {"gather": 0, "reduce": 0}

    def counted(kind, collective):
        def call(*args, **kwargs):
            calls[kind] += 1
            return collective(*args, **kwargs)
        return call

    group.foreach_all_gather = counted("gather", group.foreach_all_gather)
    group.foreach_reduce = counted("reduce", group.foreach_reduce)
    rt = tl.setup_device("cpu")
    torch.manual_seed(0)
    model, _ = tl._shard(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)),
                         tl.Config(), rt, None)
    state = tl.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    data = TensorDataset(torch.randn(96, 8), torch.randint(0, 3, (96,)))
    batches = list(tl.make_loader(data, batch_size=16, runtime=rt, workers=0))
    counts = []
    for group_of in (batches[:1], batches[:3]):
        tl.train_step(state, group_of, runtime=rt)
        counts.append(dict(calls))
        calls.update(gather=0, reduce=0)
    if rt.is_main:
        print(json.dumps(counts), flush=True)
    del model, state
    tl.teardown(rt)
""")


@pytest.mark.slow
def test_sharded_accumulation_gathers_and_reduces_no_more_than_one_batch(tmp_path):
    result = run_script(tmp_path, COUNT_COLLECTIVES)
    assert result.returncode == 0, result.stderr[-3000:]
    one, three = json.loads(result.stdout.strip().splitlines()[-1])
    assert one == {"gather": 4, "reduce": 2}  # 2 blocks: gathered for forward and backward
    assert three == one  # 3 micro-batches: nothing gathered or reduced in between


def test_sync_buffers_leaves_a_dtensor_buffer_to_its_placement():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    with tl._group_of_one(True, CPU):
        module = nn.Module()
        mesh = init_device_mesh("cpu", (1,))
        module.register_buffer("table", distribute_tensor(torch.ones(2), mesh, [Replicate()]))
        module.register_buffer("plain", torch.ones(2))
        tl._sync_buffers([module], tl.Runtime(torch.device("cpu"), world_size=2))  # (raised)
        assert module.plain.tolist() == [1.0, 1.0]


def test_downloads_once_lets_the_first_process_of_each_machine_go_first(monkeypatch):
    events, failed = [], [0]

    def all_reduce(values, runtime, op=None):  # the collective: failed[0] is what the first said
        events.append(f"told {values[0]}")
        return failed

    monkeypatch.setattr(tl, "_all_reduce", all_reduce)
    for local_rank in (0, 1):
        rt = tl.Runtime(torch.device("cpu"), rank=local_rank, local_rank=local_rank, world_size=2)
        with tl._downloads_once(rt):
            events.append(f"download {local_rank}")
    assert events == ["download 0", "told 0", "told 0", "download 1"]
    first = tl.Runtime(torch.device("cpu"), world_size=2)
    with pytest.raises(tl.UsageError, match="no such directory"), tl._downloads_once(first):
        raise tl.UsageError("--data x: no such directory")
    assert events[-1] == "told 1"  # so the others do not wait for it forever
    failed[0] = 1
    other = tl.Runtime(torch.device("cpu"), rank=1, local_rank=1, world_size=2)
    with pytest.raises(tl.UsageError, match="the first process could not load"):
        with tl._downloads_once(other):
            events.append("never")
    assert "never" not in events
    machine = tl.Runtime(torch.device("cpu"), rank=2, local_rank=0, world_size=4)  # the second's
    with pytest.raises(tl._DataError, match="no such directory"), tl._downloads_once(machine):
        raise tl.UsageError("--data x: no such directory")  # said by rank 2 itself (not at all)
    with pytest.raises(tl.UsageError, match="^another machine could not load the data"):
        with tl._downloads_once(first):  # rank 0, which loaded: told by the collective
            events.append("loaded")


def test_fit_shard_leaves_the_trained_weights_whole_in_the_model_passed(tmp_path):
    model = mlp()
    tl.fit(model, blobs(96), epochs=2, batch_size=16, shard=True, out=tmp_path, **quiet())
    assert all(type(p) is nn.Parameter for p in model.parameters())  # not DTensors
    saved = sharded_tensors(tmp_path / "last", mlp())
    assert_same_tensors(
        state_tensors({"model": model.state_dict()}),
        {k: v for k, v in saved.items() if k.startswith("model/")},
    )
