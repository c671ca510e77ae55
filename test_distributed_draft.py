"""Distributed tests: real processes on the CPU with the gloo backend, started by torchrun or by
trainloop's own launcher. No mocks; every file under tmp_path."""

import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import trainloop as tl

REPO = Path(__file__).resolve().parent
CPU = tl.Runtime(torch.device("cpu"))

# Generous: other jobs may share the CPU. A healthy run of any job below takes 3 to 15 s.
TIMEOUT = 240

# ---- helpers ---------------------------------------------------------------------------------

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
    if opts.pop("cwd_per_rank", False):  # a file written by rank r lands under rank<r>/
        Path(f"rank{rank}").mkdir(exist_ok=True)
        os.chdir(f"rank{rank}")
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(n, 8, generator=g), torch.arange(n))
    val = TensorDataset(torch.randn(n_val, 8, generator=g), torch.arange(n_val)) if n_val else None
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(16)] if batch_norm else []
    model = nn.Sequential(nn.Linear(8, 16), *norm, nn.Tanh(), nn.Linear(16, 1))
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
        if hit and fault[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
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


def child_env():
    dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def torchrun_cmd(*args):
    return [sys.executable, "-m", "torch.distributed.run", *map(str, args)]


def run_worker(tmp_path, opts, nproc=2, launcher=(), timeout=TIMEOUT):
    """WORKER under `torchrun --standalone --nproc-per-node nproc`, in tmp_path."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = torchrun_cmd("--standalone", "--nproc-per-node", nproc, *launcher, script,
                       json.dumps(opts))
    return subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


def processes_running(marker: str) -> list:
    """Pids of live processes whose command line contains `marker`."""
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("needs /proc to list processes")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        if marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


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


def test_torchrun_cli_trains_the_default_job_on_two_cpu_processes(tmp_path):
    cmd = torchrun_cmd("--standalone", "--nproc-per-node", 2, REPO / "trainloop.py", "--gpus",
                       "cpu", "--epochs", 1, "--image-size", 16, "--out", "run")
    result = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = assert_run_directory(tmp_path / "run", world_size=2)
    assert 0.5 < rows[0]["val_acc"] <= 1  # a fraction, and it learned (chance is 0.1)
    # 10000 samples split over 2 processes of 64 a step: ceil(5000 / 64) steps, not 157.
    assert rows[0]["step"] == 79
    assert result.stdout.count("done: best val_acc=") == 1  # rank 0 alone reports


@pytest.fixture(scope="module")
def same_global_batch(tmp_path_factory):
    """The same job as 2 processes x 8 samples and as 1 process x 16 (100 samples: short last
    batches too); returns their run directories."""
    tmp_path = tmp_path_factory.mktemp("global_batch")
    opts = dict(n=100, n_val=30, epochs=2, quiet=True)
    two = run_worker(tmp_path, dict(opts, batch_size=8, out="two"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_worker(tmp_path, dict(opts, batch_size=16, out="one"), nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    return tmp_path / "two", tmp_path / "one"


def test_fit_two_processes_equal_one_process_with_their_global_batch(same_global_batch):
    two, one = same_global_batch
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


@pytest.mark.xfail(strict=True, reason="train_loss under DDP is rank 0's shard only: "
                   "_sync_point never all-reduces epoch_loss")
def test_fit_train_loss_is_over_every_process_sample(same_global_batch):
    two, one = same_global_batch
    rows_a, rows_b = read_rows(two / "metrics.jsonl"), read_rows(one / "metrics.jsonl")
    for ra, rb in zip(rows_a, rows_b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)


def test_fit_only_rank_0_writes_files_and_prints(tmp_path):
    logs = tmp_path / "logs"
    opts = dict(n=96, n_val=20, epochs=2, batch_size=8, save_every=2, log_every=2, out="run",
                cwd_per_rank=True)
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


def test_torchrun_crash_on_one_rank_ends_the_job_quickly_and_leaves_no_process(tmp_path):
    started = time.monotonic()
    result = run_worker(tmp_path, dict(n=400, epochs=5, batch_size=8, quiet=True,
                                       fault=[1, 3, "raise"]))
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "RuntimeError: injected failure on rank 1 at step 3" in result.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after rank 1 failed"
    assert processes_running(str(tmp_path / "worker.py")) == []


def test_fit_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    opts = dict(n=400, epochs=1, batch_size=8, save_every=2, log_every=3, out="run", quiet=True,
                own_runtime=True, fault=[1, 5, "nan"])
    result = run_worker(tmp_path, opts)
    assert result.returncode != 0
    for rank in (0, 1):  # rank 0's losses were finite, yet it stopped at the same point
        message = (tmp_path / f"error-{rank}.txt").read_text()
        assert message.startswith("the loss became NaN or inf at step 5 (epoch 1)")
    ckpt = tl.load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == 4 and ckpt["seen"] == 4 * 8 * 2  # the last good one, both ranks'
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_fit_nan_on_one_rank_exits_4_naming_the_step(tmp_path):
    result = run_worker(tmp_path, dict(n=400, epochs=1, batch_size=8, log_every=3, quiet=True,
                                       fault=[1, 5, "nan"]))
    assert result.returncode != 0
    # The launcher stops the other rank when the first exits, so one message is guaranteed.
    assert ("trainloop: error: the loss became NaN or inf at step 5 (epoch 1)"
            in result.stderr), result.stderr[-3000:]
    assert re.search(r"exitcode +: 4 ", result.stderr)  # EXIT_NONFINITE, no traceback
    assert "]: Traceback" not in result.stderr


def test_torchrun_two_nodes_on_localhost_complete_a_run(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    opts = json.dumps(dict(n=96, n_val=20, epochs=2, batch_size=8, out="run"))
    nodes = [subprocess.Popen(
        torchrun_cmd("--nnodes", 2, "--nproc-per-node", 1, "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"two-nodes-{port}",
                     "--local-addr", "127.0.0.1", script, opts),
        cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert_run_directory(tmp_path / "run", world_size=2, epochs=2)
    # Exactly one node hosts global rank 0, which alone prints.
    assert sorted("done: best val_loss=" in out for out, _ in outputs) == [False, True]


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
    options = dict(gpus="cpu", epochs=1, workers=0, out=str(tmp_path / "run"), **options)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(script), json.dumps(options)], cwd=tmp_path,
                            env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    return result, time.monotonic() - started


def test_launch_local_trains_to_completion_on_cpu(tmp_path):
    result, _ = launch_local(tmp_path, image_size=8, batch_size=128)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = assert_run_directory(tmp_path / "run", world_size=2)
    assert rows[0]["step"] == 40  # ceil(5000 / 128): each process took half the samples
    assert 0 <= rows[0]["val_acc"] <= 1
    assert result.stdout.count("done: best val_acc=") == 1


def make_image_folder(root: Path, classes=("cat", "dog"), per_class=12, size=8):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = torch.full((size, size, 3), 60.0 + 120 * c)
            pixels = (base + 30 * torch.randn(size, size, 3, generator=g)).clamp(0, 255)
            Image.fromarray(pixels.to(torch.uint8).numpy(), "RGB").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def launch_with_bad_image_on_rank_1(tmp_path_factory):
    """_launch_local on an ImageFolder where one image, read only by rank 1 (in its second
    batch), is not an image: rank 1 fails with a usage error while rank 0 trains on."""
    tmp_path = tmp_path_factory.mktemp("bad_image")
    pytest.importorskip("PIL")
    pytest.importorskip("torchvision")
    root = make_image_folder(tmp_path / "pets", per_class=40)
    config = tl.Config(data=str(root), batch_size=4)
    train, _, _ = tl._image_folder(config, rgb=False)
    rank1 = tl._EpochBatches(len(train), 4, shuffle=True, seed=0, rank=1, world=2)._mine()
    index = next(i for i in rank1[4:].tolist() if i != 0)  # sample 0 sets the image size
    bad = Path(train.samples[index][0])
    bad.write_bytes(b"not an image")
    result, elapsed = launch_local(tmp_path, data=str(root), batch_size=4, epochs=3)
    return result, elapsed, bad, tmp_path


def test_launch_local_returns_the_failed_worker_status_quickly(launch_with_bad_image_on_rank_1):
    result, elapsed, _, tmp_path = launch_with_bad_image_on_rank_1
    assert result.returncode == tl.EXIT_USAGE, result.stderr[-3000:]
    assert "a training process failed (exit status 2); the others were stopped" in result.stderr
    assert elapsed < 60, f"the launcher took {elapsed:.0f} s to return after rank 1 failed"
    assert processes_running(str(tmp_path / "launch.py")) == []
    assert not (tmp_path / "run" / "last.pt").exists()  # no epoch finished


@pytest.mark.xfail(strict=True, reason="_exit_code_of prints a UsageError only on rank 0, so a "
                   "data error hit by rank 1 alone is never shown")
def test_launch_local_reports_the_error_of_a_worker_other_than_rank_0(
        launch_with_bad_image_on_rank_1):
    result, _, bad, _ = launch_with_bad_image_on_rank_1
    assert f"cannot read image {bad}" in result.stderr


# ---- elastic resume --------------------------------------------------------------------------

ELASTIC = dict(n=101, epochs=1, batch_size=4, save_every=4, log_every=100, quiet=True,
               out="run")


@pytest.fixture(scope="module")
def elastic_resume(tmp_path_factory):
    """2 processes, rank 0 SIGKILLed at step 10 (last checkpoint: step 8), resumed on 1."""
    tmp_path = tmp_path_factory.mktemp("elastic")
    killed = run_worker(tmp_path, dict(ELASTIC, record="killed", fault=[0, 10, "kill"]))
    ckpt = tl.load_checkpoint(tmp_path / "run" / "last.pt")
    resumed = run_worker(tmp_path, dict(ELASTIC, record="resumed"), nproc=1)
    return killed, ckpt, resumed, tmp_path


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


def test_fit_elastic_resume_warns_about_the_process_count(elastic_resume):
    _, _, resumed, _ = elastic_resume
    warning = next(line for line in resumed.stdout.splitlines() if line.startswith("warning:"))
    assert "world_size 2 -> 1 (elastic resume" in warning


@pytest.mark.xfail(strict=True, reason="the LR schedule's length is counted in optimizer steps "
                   "of the current process count, so 2 -> 1 stretches it: the run ends at 27% "
                   "of the peak LR instead of near 0")
def test_fit_elastic_resume_still_anneals_the_lr_to_zero(elastic_resume):
    _, _, resumed, tmp_path = elastic_resume
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["lr"] < 0.05 * tl.Config().lr  # an uninterrupted run ends at 1.5% of it


# ---- evaluation and BatchNorm ----------------------------------------------------------------


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
        range(n_val))
    (row,) = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert row["val_index"] == pytest.approx((n_val - 1) / 2, abs=1e-9)  # mean index: 18
    # The same weights evaluated here, in one process with another batch size.
    model = regression_model()
    model.load_state_dict(tl.load_checkpoint(tmp_path / "run" / "best.pt")["model"])
    _, val = regression_data(96, n_val)
    scores = tl.evaluate(model, tl.make_loader(val, batch_size=5, train=False), rt=CPU,
                         loss_fn=val_loss_fn)
    assert row["val_loss"] == pytest.approx(scores["loss"], rel=1e-5)


@pytest.mark.xfail(strict=True, reason="evaluate() all-reduces a tensor of a different length "
                   "on a rank that got no validation batch: that rank aborts")
def test_evaluate_with_fewer_validation_samples_than_processes(tmp_path):
    result = run_worker(tmp_path, dict(n=96, n_val=1, epochs=1, batch_size=8, out="run",
                                       quiet=True))
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert row["val_index"] == 0


@pytest.mark.xfail(strict=True, reason="--sync-bn on CPU processes: DDP raises 'SyncBatchNorm "
                   "layers only work with GPU modules' (a traceback, exit 1)")
def test_fit_sync_bn_runs_on_two_cpu_processes(tmp_path):
    opts = dict(n=96, n_val=20, epochs=1, batch_size=8, out="run", quiet=True, batch_norm=True,
                sync_bn=True)
    result = run_worker(tmp_path, opts)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_run_directory(tmp_path / "run", world_size=2)
    ckpt = tl.load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == 6
    assert ckpt["model"]["1.num_batches_tracked"] == 6
    assert ckpt["model"]["1.running_mean"].abs().sum() > 0
