"""Images per second of ResNet-18 on one GPU: a hand-written loop against trainloop.fit.

Synthetic 3x224x224 images and 10 classes, held on the GPU, batch 128, SGD. For each setting
(fp32, bf16, bf16 + channels_last, and the same with torch.compile) it trains a fresh model for
two epochs twice: with the shortest hand-written loop (tensors sliced by a random permutation,
autocast, no .item()) and with trainloop.fit on the TensorDataset (its in-memory path). The first
epoch warms up (cuDNN autotuning, compilation); the figure is the second epoch's images/s.

    python benchmarks/gpu_resnet.py                # needs CUDA and torchvision
    python benchmarks/gpu_resnet.py --no-compile   # skip the torch.compile settings
"""

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
trainloop = importlib.import_module("trainloop")

SETTINGS = {  # name: (autocast dtype, channels_last, compile)
    "fp32": (None, False, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16 + channels_last": (torch.bfloat16, True, False),
    "bf16 + channels_last + compile": (torch.bfloat16, True, True),
}


def resnet18() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def hand_epochs(data: TensorDataset, batch: int, dtype, channels_last: bool, compile_: bool):
    """Seconds of each of two epochs of the shortest hand-written loop."""
    model = resnet18().cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    torch.backends.cudnn.benchmark = True
    images, labels = data.tensors
    seconds = []
    for _ in range(2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for idx in torch.randperm(len(images), device="cuda").split(batch):
            x = images[idx]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds


def fit_epochs(data: TensorDataset, batch: int, dtype, channels_last: bool, compile_: bool):
    """Seconds of each of two epochs of trainloop.fit, from its history."""
    precision = {None: "fp32", torch.bfloat16: "bf16"}[dtype]
    history = trainloop.fit(
        resnet18(),
        data,
        None,
        epochs=2,
        batch_size=batch,
        lr=0.1,
        weight_decay=0.0,
        schedule="constant",
        precision=precision,
        channels_last=channels_last,
        compile=compile_,
        gpus="0",
        augment=False,
        log_every=10**9,
        quiet=True,
        log=lambda line: None,
    )
    return [row["seconds"] for row in history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128 * 24)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_resnet.py needs a CUDA GPU")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, 224, 224, generator=g).cuda()
    labels = torch.randint(0, 10, (args.images,), generator=g).cuda()
    data = TensorDataset(images, labels)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, "
        f"{args.images} images per epoch; images/s of the second epoch"
    )
    print("| setting | hand loop | fit | fit / hand |")
    print("|---|---:|---:|---:|")
    for name, (dtype, channels_last, compile_) in SETTINGS.items():
        if compile_ and args.no_compile:
            continue
        hand = args.images / hand_epochs(data, args.batch, dtype, channels_last, compile_)[1]
        fit = args.images / fit_epochs(data, args.batch, dtype, channels_last, compile_)[1]
        print(f"| {name} | {hand:,.0f} | {fit:,.0f} | {fit / hand:.3f} |", flush=True)


if __name__ == "__main__":
    main()
