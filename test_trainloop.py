"""Tests for trainloop: CPU only, tiny synthetic data, every file under tmp_path.

Distributed tests run real processes with torchrun and the gloo backend.
"""

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

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
    return subprocess.run([sys.executable, str(REPO / "trainloop.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


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
    with pytest.raises(tl.UsageError, match="--gpus"):
        tl.parse_gpus(text)


def test_parse_duration_units():
    assert tl.parse_duration("2h30m") == 9000
    assert tl.parse_duration("45m") == 2700
    assert tl.parse_duration("90s") == 90
    assert tl.parse_duration("1.5h") == 5400
    assert tl.parse_duration("") is None
    with pytest.raises(tl.UsageError, match="--time-limit"):
        tl.parse_duration("soon")


@pytest.mark.parametrize("field,value,message", [
    ("epochs", 0, "--epochs 0 must be at least 1"),
    ("batch_size", 0, "--batch-size 0 must be at least 1"),
    ("lr", -0.1, "--lr -0.1 must be a positive number"),
    ("lr", float("nan"), "--lr nan must be a positive number"),
    ("optimizer", "adam", "--optimizer 'adam' is not one of sgd, adamw"),
    ("precision", "fp8", "--precision 'fp8'"),
    ("ema", 1.0, "--ema 1.0 must be in"),
])
def test_check_config_names_field_value_and_fix(field, value, message):
    with pytest.raises(tl.UsageError, match=message):
        tl.check_config(dataclasses.replace(tl.Config(), **{field: value}))


def test_amp_dtype_is_decided_from_precision_and_device():
    assert tl._amp_dtype("auto", "cuda", True) is torch.bfloat16
    assert tl._amp_dtype("auto", "cuda", False) is None
    assert tl._amp_dtype("auto", "cpu", True) is None
    assert tl._amp_dtype("fp16", "cpu", True) is torch.float16
    with pytest.raises(tl.UsageError, match="--precision bf16"):
        tl._amp_dtype("bf16", "cuda", False)


def test_import_has_no_side_effects(tmp_path):
    code = textwrap.dedent("""
        import os, sys
        before = dict(os.environ)
        import trainloop, torch
        assert dict(os.environ) == before, "import changed the environment"
        assert "typer" not in sys.modules and "torchvision" not in sys.modules
        assert "rich" not in sys.modules
        assert not torch.cuda.is_initialized()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip() == "ok", result.stderr
    assert list(tmp_path.iterdir()) == []


def test_setup_device_cpu_single_process():
    rt = tl.setup_device("cpu")
    assert rt.device == torch.device("cpu")
    assert (rt.rank, rt.world_size, rt.amp_dtype) == (0, 1, None)


def test_setup_device_missing_gpu_is_a_usage_error():
    with pytest.raises(tl.UsageError, match="--gpus names GPU 3"):
        tl.setup_device("3")


# ---- data ------------------------------------------------------------------------------------


def test_make_loader_fast_path_matches_dataloader_path():
    x, y = torch.randn(50, 4), torch.arange(50)
    fast = tl.make_loader(TensorDataset(x, y), batch_size=8, seed=3)
    slow = tl.make_loader(Rows(x, y), batch_size=8, seed=3, workers=0)
    assert isinstance(fast, tl._TensorBatches) and isinstance(slow, DataLoader)
    for epoch in (0, 1):
        tl._set_position(fast, epoch, 0, 0)
        tl._set_position(slow, epoch, 0, 0)
        pairs = list(zip(fast, slow, strict=True))
        for (xf, yf), (xs, ys) in pairs:
            assert torch.equal(xf, xs) and torch.equal(yf, ys)
    assert len(fast) == len(slow) == 7


def test_make_loader_reshuffles_per_epoch_and_covers_every_sample():
    loader = tl.make_loader(TensorDataset(torch.arange(40)), batch_size=16, seed=0)
    orders = []
    for epoch in range(2):
        tl._set_position(loader, epoch, 0, 0)
        orders.append(torch.cat([b[0] for b in loader]).tolist())
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(40))
    assert orders[0] != orders[1]


def test_make_loader_resumes_at_any_sample_without_reading_earlier_ones():
    reads = []

    class Logged(Rows):
        def __getitem__(self, i):
            reads.append(i)
            return super().__getitem__(i)

    data = Logged(torch.arange(30))
    loader = tl.make_loader(data, batch_size=4, seed=1, workers=0)
    tl._set_position(loader, 2, 0, 0)
    full = torch.cat([b[0] for b in loader]).tolist()
    reads.clear()
    tl._set_position(loader, 2, 12, 3)
    rest = torch.cat([b[0] for b in loader]).tolist()
    assert rest == full[12:]
    assert sorted(reads) == sorted(full[12:])


def test_epoch_batches_shard_the_rest_across_any_number_of_processes():
    def shard(world, seen):
        parts = []
        for rank in range(world):
            s = tl._EpochBatches(20, 3, shuffle=True, seed=5, rank=rank, world=world)
            s.set_position(1, seen)
            parts += torch.cat(list(s.index_batches())).tolist()
        return parts

    single = tl._EpochBatches(20, 3, shuffle=True, seed=5)
    single.set_position(1)
    order = torch.cat(list(single.index_batches())).tolist()
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
    return tl.TrainState(model, model, opt, sched, torch.amp.GradScaler("cpu", enabled=False))


def test_train_step_accumulated_short_batches_equal_one_big_batch():
    data = blobs(11)
    x, y = data.tensors
    big = mlp()
    small = mlp()
    config = tl.Config(accumulate=3)
    tl.train_step(one_step_state(big), [(x, y)], config, rt=CPU)
    micro = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # 4 + 4 + 3 samples
    tl.train_step(one_step_state(small), micro, config, rt=CPU)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_step_explicit_weights_act_like_token_counts():
    # A per-token mean loss: micro-batches weighted by their token counts must give the
    # gradient of the mean over all tokens, as one big batch would.
    torch.manual_seed(0)
    tokens_a, tokens_b = torch.randn(6, 8), torch.randn(2, 8)
    targets_a, targets_b = torch.randint(0, 3, (6,)), torch.randint(0, 3, (2,))
    big, small = mlp(), mlp()
    config = tl.Config(accumulate=2)
    tl.train_step(one_step_state(big), [(torch.cat([tokens_a, tokens_b]),
                                         torch.cat([targets_a, targets_b]))], config, rt=CPU)
    tl.train_step(one_step_state(small), [(tokens_a, targets_a, 6), (tokens_b, targets_b, 2)],
                  config, rt=CPU)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_step_clips_the_gradient_norm():
    model = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(model.weight)
    x, y = torch.ones(8, 4) * 100, torch.zeros(8, 1)
    config = tl.Config(clip_grad=0.5)
    loss = lambda out, target: (out - target - 1).pow(2).mean()  # noqa: E731
    tl.train_step(one_step_state(model, lr=1.0), [(x, y)], config, rt=CPU, loss_fn=loss)
    assert model.weight.norm().item() == pytest.approx(0.5, rel=1e-4)


def test_train_step_returns_a_detached_device_tensor_and_counts_steps():
    model = mlp()
    state = one_step_state(model, lr=0.1)
    x, y = blobs(16).tensors
    loss = tl.train_step(state, [(x, y)], tl.Config(), rt=CPU)
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
    scores = tl.evaluate(model, [(x[:3], y[:3]), (x[3:], y[3:])], rt=CPU)
    assert scores["acc"] == pytest.approx(0.75)  # a per-batch mean would give 0.5
    assert "top5" not in scores
    assert model.training


def test_evaluate_reports_top5_only_with_more_than_five_classes():
    model = nn.Linear(4, 7)
    scores = tl.evaluate(model, [(torch.randn(10, 4), torch.randint(0, 7, (10,)))], rt=CPU)
    assert {"loss", "acc", "top5"} <= scores.keys()
    assert scores["top5"] >= scores["acc"]


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


def test_fit_accepts_dataloaders_and_a_user_optimizer():
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    loader = DataLoader(blobs(96), batch_size=16, shuffle=True)
    history = tl.fit(model, loader, DataLoader(blobs(32), batch_size=16), epochs=3,
                     optimizer=optimizer, schedule="constant", **quiet())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert optimizer.state  # the user's optimizer did the stepping


def test_fit_unknown_setting_suggests_the_field():
    with pytest.raises(tl.UsageError, match="did you mean epochs"):
        tl.fit(mlp(), blobs(8), epoch=3)


def test_fit_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    train, val = blobs(64), blobs(32, seed=0)
    tl.fit(mlp(), train, val, epochs=2, batch_size=16, out=str(out), **quiet())
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt"} <= {p.name for p in
                                                                       out.iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert 0 <= rows[-1]["val_acc"] <= 1
    assert json.loads((out / "config.json").read_text())["epochs"] == 2


def test_checkpoint_holds_the_unwrapped_model_and_loads_weights_only(tmp_path):
    model = mlp()
    compiled = torch.compile(model)  # not run: only its wrapper's key prefix matters here
    assert tl._unwrap(compiled) is model
    state = one_step_state(model)
    tl.save_checkpoint(tmp_path / "c.pt", state, tl.Config())
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert list(ckpt["model"]) == list(model.state_dict())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    for key in ("optimizer", "scheduler", "scaler", "epoch", "step", "seen", "rng", "config",
                "format", "world_size", "checksum", "best"):
        assert key in ckpt
    assert isinstance(ckpt["rng"][0]["numpy"][1], torch.Tensor)
