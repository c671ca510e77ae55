"""Image folders: trainloop's loader and CLI against the standard torchvision pipeline.

The reference (issue 15) is the shortest standard torchvision pipeline: ImageFolder (PIL open +
convert("RGB")), transforms.v2 RandomResizedCrop + RandomHorizontalFlip + ToDtype + Normalize
for training, Resize + CenterCrop for validation, a plain DataLoader, SGD with a one-cycle
schedule. trainloop: load_data's data sets (uint8 crops) and, for training, its CLI.

    python benchmarks/photos.py make DIR               # photo-like folder: DIR/train, DIR/val
    python benchmarks/photos.py make DIR --small-only  # the same without phone photos
    python benchmarks/photos.py fashion IDX_DIR DIR    # a small real set from Fashion-MNIST
    python benchmarks/photos.py loader DIR             # images/s at 224 px, 2 workers
    python benchmarks/photos.py train DIR --epochs 8   # CLI vs reference: epoch time, val_acc

`make` draws 4 classes (a disc, a square, a triangle or stripes of random colour, size and place
on a smooth random background, with noise and a random global tint) as files of the kinds a
folder of photos holds: phone photos (4000x3000 JPEG, some EXIF-rotated, some CMYK), web-size
JPEGs, PNGs (RGBA, 16-bit grayscale), small 32x32 files. It is not real data; `fashion` is
(Fashion-MNIST's own 28x28 photos of clothing, a few hundred per split).
Threads: torch's default. Timings on a shared machine drift: run twice and compare.
"""

import argparse
import gzip
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import trainloop as tl  # noqa: E402

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ---- data --------------------------------------------------------------------------------------


def draw(label: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (height, width, 3): class `label`'s shape on a smooth random background."""
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 5, 7))).float()
    small_h, small_w = max(8, height // 8), max(8, width // 8)  # draw small, then upscale
    image = F.interpolate(coarse, size=(small_h, small_w), mode="bicubic")[0].numpy()
    y, x = np.mgrid[0:small_h, 0:small_w] / max(small_h, small_w)
    cy, cx = rng.uniform(0.3, 0.7) * small_h / max(small_h, small_w), rng.uniform(0.3, 0.7)
    cx *= small_w / max(small_h, small_w)
    r = rng.uniform(0.12, 0.3)
    if label == 0:
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r**2
    elif label == 1:
        mask = (abs(y - cy) < r * 0.8) & (abs(x - cx) < r * 0.8)
    elif label == 2:
        mask = (y - cy < r) & (y - cy > -r) & (abs(x - cx) < (y - cy + r) / 2)
    else:
        mask = (np.sin((x * math.cos(cy * 9) + y * math.sin(cy * 9)) * 60) > 0) & (
            (y - cy) ** 2 + (x - cx) ** 2 < (1.3 * r) ** 2
        )
    image[:, mask] = rng.uniform(0, 255, (3, 1))
    image = torch.from_numpy(image)[None]
    image = F.interpolate(image, size=(height, width), mode="bilinear")[0]
    tint = torch.from_numpy(rng.uniform(0.7, 1.2, (3, 1, 1))).float()
    image = image * tint + torch.from_numpy(rng.normal(0, 8, (1, height, width))).float()
    return image.clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


def save(pixels: np.ndarray, path: Path, kind: str) -> None:
    from PIL import Image

    image = Image.fromarray(pixels)
    if kind == "rotated":  # stored on its side, shown upright by EXIF orientation 6
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)
    elif kind == "cmyk":
        image.convert("CMYK").save(path, quality=90)
    elif kind == "rgba":
        image.convert("RGBA").save(path)
    elif kind == "gray16":
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(path)
    else:
        image.save(path, quality=90)


# (kind, width, height, suffix, share of the files)
KINDS = (
    ("phone", 4000, 3000, "jpg", 0.06),
    ("rotated", 4000, 3000, "jpg", 0.02),
    ("cmyk", 1600, 1200, "jpg", 0.02),
    ("web", 500, 375, "jpg", 0.5),
    ("web", 375, 500, "jpg", 0.2),
    ("rgba", 640, 480, "png", 0.08),
    ("gray16", 320, 240, "png", 0.06),
    ("tiny", 32, 32, "png", 0.06),
)


def make(root: Path, train: int, val: int, seed: int, small_only: bool) -> None:
    rng = np.random.default_rng(seed)
    shares = np.array([0 if small_only and k[1] > 1000 else k[-1] for k in KINDS])
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            label = i % 4
            kind, width, height, suffix, _ = KINDS[rng.choice(len(KINDS), p=shares / shares.sum())]
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            save(draw(label, width, height, rng), folder / f"{i}.{suffix}", kind)
    print(f"wrote {train} + {val} files under {root}")


def fashion(idx_dir: Path, root: Path, per_class: int, val_per_class: int) -> None:
    """Fashion-MNIST's first images of each class as PNG files: a small real data set."""
    from PIL import Image

    def read(name, offset):
        with gzip.open(idx_dir / name) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    images = read("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = read("train-labels-idx1-ubyte.gz", 8)
    for split, start, count in (("train", 0, per_class), ("val", per_class, val_per_class)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == label)[start : start + count]:
                Image.fromarray(images[i]).save(folder / f"{i}.png")
    print(f"wrote {10 * per_class} + {10 * val_per_class} Fashion-MNIST files under {root}")


# ---- the reference pipeline --------------------------------------------------------------------


def reference_data(root: Path, size: int):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(*IMAGENET)]
    train = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *tail])
    val = v2.Compose([v2.ToImage(), v2.Resize(round(size / 0.875)), v2.CenterCrop(size), *tail])
    return ImageFolder(str(root / "train"), train), ImageFolder(str(root / "val"), val)


def loader(dataset, workers: int, batch_size: int, shuffle: bool):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def images_per_second(batches, seconds: float) -> float:
    """Images per second over `seconds` of batches, after a first warm-up batch."""
    it = iter(batches)
    next(it)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        try:
            images, _ = next(it)
        except StopIteration:
            it = iter(batches)
            continue
        count += len(images)
    return count / (time.perf_counter() - started)


def cpu_ms_per_image(dataset, count: int = 300) -> float:
    """CPU time of reading one sample in this process on one thread: steadier than images/s
    when other work shares the machine."""
    started = time.process_time()
    for i in range(min(count, len(dataset))):
        dataset[i * len(dataset) // min(count, len(dataset))]
    return 1000 * (time.process_time() - started) / min(count, len(dataset))


def bench_loader(root: Path, size: int, workers: int, batch_size: int, seconds: float) -> None:
    """The issue's measure: load_data's training set in a plain DataLoader. The normalization
    of a batch is not in it: the model does that on the training device (a GPU's ~0.1 ms)."""
    ours, _, _ = tl.load_data(tl.Config(data=str(root), image_size=size), rgb=True)
    theirs, _ = reference_data(root, size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu = {"ours": cpu_ms_per_image(ours), "torchvision": cpu_ms_per_image(theirs)}
    torch.set_num_threads(threads)
    results = {"ours": [], "torchvision": []}
    for _ in range(2):  # alternate, so that drift of a shared machine hits both
        for name, dataset in (("ours", ours), ("torchvision", theirs)):
            batches = loader(dataset, workers, batch_size, shuffle=True)
            results[name].append(round(images_per_second(batches, seconds), 1))
            del batches
    best = {k: max(v) for k, v in results.items()}
    ratio = best["ours"] / best["torchvision"]
    print(
        f"loader {size} px, {workers} workers, batch {batch_size}, {len(ours)} files: ours "
        f"{best['ours']:.0f} images/s, torchvision {best['torchvision']:.0f} images/s: "
        f"{ratio:.2f}x ({'PASS' if ratio >= 1.5 else 'MISS'} >= 1.5x); runs {results}; "
        f"CPU per image, one thread: ours {cpu['ours']:.2f} ms, torchvision "
        f"{cpu['torchvision']:.2f} ms ({cpu['torchvision'] / cpu['ours']:.2f}x)"
    )


def reference_train(root: Path, epochs: int, size: int, workers: int, batch_size: int, lr: float):
    """The reference loop: small_cnn, SGD(momentum 0.9, nesterov, wd 5e-4), one-cycle LR."""
    train, val = reference_data(root, size)
    torch.manual_seed(0)
    model = tl.small_cnn(3, len(train.classes))
    train_batches = loader(train, workers, batch_size, shuffle=True)
    val_batches = loader(val, workers, 256, shuffle=False)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * len(train_batches)
    )
    rows = []
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        for images, labels in train_batches:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        right = 0
        with torch.no_grad():
            for images, labels in val_batches:
                right += (model(images).argmax(1) == labels).sum().item()
        rows.append({"epoch": epoch + 1, "val_acc": right / len(val)})
        rows[-1]["seconds"] = time.perf_counter() - started
    return rows


def ours_train(root: Path, epochs: int, size: int, workers: int, batch_size: int, extra: list):
    out = root.parent / f"run-{root.name}"
    command = [
        sys.executable,
        str(Path(tl.__file__)),
        *("--data", root, "--epochs", epochs, "--image-size", size, "--workers", workers),
        *("--batch-size", batch_size, "--out", out, "--resume", "none", "--log-every", 1000),
        *extra,
    ]
    started = time.perf_counter()
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        sys.exit(result.stderr)
    start_line = next(line for line in result.stdout.splitlines() if "px" in line)
    print(f"  {start_line}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, wall


def bench_train(root: Path, epochs: int, size: int, workers: int, batch_size: int, args) -> None:
    for name in args.order:
        if name == "torchvision":
            started = time.perf_counter()
            rows = reference_train(root, epochs, size, workers, batch_size, args.lr)
            wall = time.perf_counter() - started
        else:
            rows, wall = ours_train(root, epochs, size, workers, batch_size, args.extra)
        epoch = sorted(r["seconds"] for r in rows)[len(rows) // 2]
        accs = " ".join(f"{r['val_acc']:.3f}" for r in rows)
        print(f"{name:12s} median epoch {epoch:.2f} s, wall {wall:.1f} s, val_acc by epoch: {accs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("make", "fashion", "loader", "train"))
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--train", type=int, default=600, help="make/fashion: training files")
    parser.add_argument("--val", type=int, default=200, help="make/fashion: validation files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small-only", action="store_true", help="make: no files over 1000 px")
    parser.add_argument("--image-size", type=int, default=0, help="loader 224, train 64")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20, help="loader: per measurement")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05, help="reference peak LR")
    parser.add_argument("--order", nargs="+", default=["ours", "torchvision"])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="CLI options")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.mode == "make":
        make(args.paths[0], args.train, args.val, args.seed, args.small_only)
    elif args.mode == "fashion":
        fashion(args.paths[0], args.paths[1], args.train // 10, args.val // 10)
    elif args.mode == "loader":
        size = args.image_size or 224
        bench_loader(args.paths[0], size, args.workers, args.batch_size, args.seconds)
    else:
        size = args.image_size or 64
        bench_train(args.paths[0], args.epochs, size, args.workers, args.batch_size, args)


if __name__ == "__main__":
    main()
