"""Data parallelism: rank-disjoint sampling, gradient accumulation, and torchrun (gloo) against one process."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mstok.data import EpochSampler, InMemoryImages, RandomResizedCropFlip
from mstok.demo import TRAIN_PHOTOS, skimage_photos
from mstok.training import Trainer, load_train_config
from mstok.training.distributed import DistContext

ROOT = Path(__file__).resolve().parents[1]


def test_ranks_take_disjoint_slices_whose_union_is_the_single_stream():
    world, chunk, n = 3, 4, 50
    single = list(itertools.islice(EpochSampler(n, seed=7, start=12).global_stream(), 5 * world * chunk))
    ranks = [
        list(itertools.islice(EpochSampler(n, 7, start=12, rank=r, world_size=world, chunk=chunk), 5 * chunk))
        for r in range(world)
    ]
    # step j of the global stream is rank 0's j-th micro-batch, then rank 1's, then rank 2's
    rebuilt = [item for j in range(5) for r in range(world) for item in ranks[r][j * chunk : (j + 1) * chunk]]
    assert rebuilt == single
    seen = [set(r) for r in ranks]
    assert all(not (a & b) for a, b in itertools.combinations(seen, 2))  # (index, seed) pairs are disjoint
    with pytest.raises(ValueError, match="outside world size"):
        EpochSampler(n, 0, rank=3, world_size=3)


def test_single_process_context_makes_collectives_no_ops():
    ctx = DistContext()
    t = torch.arange(6.0).reshape(3, 2)
    assert not ctx.enabled and ctx.is_main
    assert ctx.all_reduce_mean(t) is t and ctx.all_gather_cat(t) is t and ctx.broadcast_object(3) == 3
    ctx.barrier()


def _config(out, *extra):
    return load_train_config(
        None,
        [
            "model.preset='mstok_tiny'",
            "steps=2",
            "batch_size=8",
            f"out_dir='{out}'",
            "data.num_workers=0",
            "optim.lr=1e-3",
            "optim.warmup_steps=1",
            "log_every=1",
            "tensorboard=false",
            "loss.gan_weight=0.1",
            "loss.gan_start_step=1",
            "discriminator.base_channels=8",
            *extra,
        ],
    )


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Two micro-batches of 4 give the gradients (tokenizer and discriminator) of one batch of 8."""
    photos = skimage_photos(TRAIN_PHOTOS[:2])
    dataset = InMemoryImages(photos, RandomResizedCropFlip(64, scale=(0.05, 0.3)))
    batch = torch.stack([dataset[(i % 2, i)][0] for i in range(8)])
    grads, terms = {}, {}
    for accum in (1, 2):
        torch.manual_seed(0)
        trainer = Trainer(
            _config(tmp_path / str(accum), f"grad_accum={accum}", "loss.gan_start_step=0"), dataset, False
        )
        terms[accum] = trainer.train_step([(c, torch.zeros(len(c), dtype=torch.long)) for c in batch.chunk(accum)])
        grads[accum] = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        grads[accum] += [p.grad.clone() for p in trainer.adversarial.parameters()]
    assert len(grads[1]) == len(grads[2]) > 0
    for one, two in zip(grads[1], grads[2], strict=True):
        assert (one - two).abs().max() <= 1e-5 * one.abs().max() + 1e-9
    for key in ("loss", "mse", "l1", "d_loss", "gan_g"):
        assert terms[2][key].item() == pytest.approx(terms[1][key].item(), rel=1e-5), key
    with pytest.raises(ValueError, match="divisible"):
        Trainer(_config(tmp_path / "x", "grad_accum=3"), dataset, False)


def _train_command(out: Path, data: Path) -> list[str]:
    return [
        "-m",
        "mstok.cli",
        "train",
        "--config",
        str(ROOT / "configs" / "mstok_tiny.toml"),
        "--no-progress",
        "--set",
        "steps=3",
        "batch_size=8",
        "data.num_workers=0",
        "log_every=1",
        "ckpt_every=3",
        "tensorboard=false",
        "optim.warmup_steps=1",
        "loss.gan_weight=0.1",
        "loss.gan_start_step=1",
        "discriminator.base_channels=8",
        f"data.path='{data}'",
        "data.val_path=''",  # this folder alone, not the shipped validation set
        f"out_dir='{out}'",
    ]


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and "epoch" not in r]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path, tiny_imagenet):
    """``torchrun --nproc_per_node=2`` (gloo, CPU) with GAN on equals one process with the same global batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            *_train_command(tmp_path / "ddp", tiny_imagenet),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, *_train_command(tmp_path / "single", tiny_imagenet)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)
    a = load_file(tmp_path / "ddp" / "checkpoints" / "step_0000003" / "model.safetensors")
    b = load_file(tmp_path / "single" / "checkpoints" / "step_0000003" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-5  # measured 2.5e-6: reduction order only
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step_0000003" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["samples_seen"] == 24
    start = json.loads((tmp_path / "ddp" / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["micro_batch"] == 4


@pytest.mark.slow
def test_torchrun_generator_training_matches_one_process(tmp_path):
    """``mstok train-generator`` under torchrun (2 ranks) equals one process: the masking and the
    class dropout are drawn per sample, so the two runs see identical inputs."""
    from mstok.data.tokens import pretokenize
    from mstok.tokenizers import create_tokenizer

    class Noise(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 40

        def __getitem__(self, key):
            g = torch.Generator().manual_seed(key[0])
            return torch.rand(3, 64, 64, generator=g), key[0] % 4

    pretokenize(create_tokenizer("titok_tiny"), Noise(), tmp_path / "tokens", flip=True, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}

    def command(out: str) -> list[str]:
        settings = ["steps=3", "batch_size=8", "log_every=1", "ckpt_every=3", "tensorboard=false", "sample_every=0"]
        settings += ["optim.warmup_steps=1", f"data.path='{tmp_path / 'tokens'}'", f"out_dir='{tmp_path / out}'"]
        config = str(ROOT / "configs" / "maskgit_tiny.toml")
        return ["-m", "mstok.cli", "train-generator", "--config", config, "--no-progress", "--set", *settings]

    runs = {
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command("ddp")],
        "single": [sys.executable, *command("single")],
    }
    for name, argv in runs.items():
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (name, done.stderr[-3000:])
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)
    a = load_file(tmp_path / "ddp" / "checkpoints" / "step_0000003" / "model.safetensors")
    b = load_file(tmp_path / "single" / "checkpoints" / "step_0000003" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-5


_INTERRUPT_SCRIPT = """
import json, os, sys
from mstok.data import InMemoryImages, RandomResizedCropFlip
from mstok.demo import TRAIN_PHOTOS, skimage_photos
from mstok.training import Trainer, load_train_config
from mstok.training.engine import TrainingInterrupted

out = sys.argv[1]
settings = ["steps=20", "batch_size=4", f"out_dir='{out}'", "data.num_workers=0", "log_every=3", "ckpt_every=20",
            "tensorboard=false", "val_every=0", "model.preset='titok_tiny'", "model.overrides.width=32",
            "model.overrides.depth=1", "model.overrides.num_heads=2", "threads=1"]
data = InMemoryImages(skimage_photos(TRAIN_PHOTOS[:2]), RandomResizedCropFlip(64, scale=(0.2, 0.5)))
trainer = Trainer(load_train_config(None, settings), data, progress=False)
rank = int(os.environ["RANK"])
step = trainer.train_step

def train_step(micro_batches):
    terms = step(micro_batches)
    if rank == 1 and trainer.step == 3:  # this step becomes step 4: Ctrl-C on rank 1 only, mid-window
        trainer.interrupt.requested = True
    return terms

trainer.train_step = train_step
try:
    trainer.fit()
    stopped = None
except TrainingInterrupted:
    stopped = trainer.step
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"stopped": stopped}, f)
"""


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step_and_saves(tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(_INTERRUPT_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    run = subprocess.run([*command, str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    stops = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text())["stopped"] for r in (0, 1)]
    assert stops == [6, 6]  # requested during step 4; the ranks agree at the next log boundary
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_0000006" / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["world_size"] == 2
