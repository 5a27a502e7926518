"""DiT as a first-class generator: continuous token shards, the diffusion objective on the
shared engine (exact resume, global-batch normalisation), sampling back to the tokenizer's
scale, one registry for both families, the family/data checks, and the CLI chain
pretokenize -> train-generator -> sample on a tiny KL tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from mstok.cli import build_parser, main
from mstok.cli_generation import _sampling_fields
from mstok.data import TokenDataset, pretokenize
from mstok.diffusion import DiffusionConfig, GaussianDiffusion, RectifiedFlow, create_diffusion
from mstok.generators import (
    FAMILIES,
    GENERATOR_PRESETS,
    DiT,
    DiTSamplingConfig,
    MaskGITGenerator,
    SamplingConfig,
    create_generator,
    generate_images,
    sample_latents,
)
from mstok.generators.dit_sampling import denormalize_latents
from mstok.losses.diffusion import DiffusionInputs, DiffusionObjective, sample_generator
from mstok.persistence import load_generator, load_tokenizer
from mstok.tokenizers import create_tokenizer
from mstok.training import GeneratorTrainConfig, load_train_config
from mstok.training.generator_trainer import GeneratorTrainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SMALL = {"width": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny batches: a second thread only waits for a core


class RandomImages:
    """Deterministic random 64x64 images of 3 classes; the items in ``broken`` fail to decode."""

    def __init__(self, n: int, broken: tuple[int, ...] = ()) -> None:
        self.n, self.broken = n, set(broken)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        if key[0] in self.broken:
            return None
        return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(key[0])), key[0] % 3


class ToyLatents(Dataset):
    """Continuous tokens without a tokenizer: class c's latents sit around c, channel j has spread j + 1."""

    continuous, num_tokens, token_dim, num_classes = True, 4, 3, 3

    def __init__(self, size: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 3, (size,), generator=g)
        spread = torch.arange(1.0, 4.0)
        self.latents = self.labels[:, None, None].float() + spread * torch.randn(size, 4, 3, generator=g)
        self.latent_mean = self.latents.double().mean((0, 1))
        self.latent_std = self.latents.double().std((0, 1), correction=0)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        return self.latents[key[0]], int(self.labels[key[0]])


class IntTokens(ToyLatents):
    """Token ids, for the family/data mismatch."""

    continuous, codebook_size = False, 16


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return create_tokenizer("titok_tiny", quantizer="vae").save_pretrained(tmp_path_factory.mktemp("kl") / "tok")


@pytest.fixture(scope="module")
def kl(kl_dir: Path):
    return load_tokenizer(kl_dir)


def toy_config(out: Path, steps: int, preset: str = "dit_tiny", **extra) -> GeneratorTrainConfig:
    settings = [
        f"steps={steps}", "batch_size=8", f"out_dir='{out}'", "device='cpu'", "log_every=1", "tensorboard=false",
        f"model.preset='{preset}'", *[f"model.overrides.{k}={v}" for k, v in SMALL.items()],
        "optim.lr=1e-3", "optim.warmup_steps=2", "ema_decay=0.9", "threads=1",
        *[f"{k}={v}" for k, v in extra.items()],
    ]  # fmt: skip
    return load_train_config(None, settings, GeneratorTrainConfig)


# ----------------------------------------------------------------- continuous shards
def encoded(tok, data, batch_size: int, flip: bool) -> torch.Tensor:
    """(N_valid, views, K, C) latents of the valid items, encoded in pretokenize's batches."""
    out = []
    for lo in range(0, len(data), batch_size):
        items = [data[(i, 0)] for i in range(lo, min(lo + batch_size, len(data)))]
        images = torch.stack([item[0] for item in items if item is not None])
        views = [tok.encode(images)] + ([tok.encode(images.flip(-1))] if flip else [])
        out.append(torch.stack(views, dim=1))
    return torch.cat(out)


def test_continuous_pretokenize_round_trip_and_statistics(kl, tmp_path: Path) -> None:
    data = RandomImages(5, broken=(2,))
    index = pretokenize(kl, data, tmp_path, flip=True, batch_size=2, shard_size=4, progress=False)
    want = encoded(kl, data, batch_size=2, flip=True)  # (4, 2, K, C) float32
    ds = TokenDataset(tmp_path)
    assert ds.continuous and ds.token_dim == kl.config.code_dim == 12 and ds.codebook_size is None
    assert ds.tokens.dtype == torch.float16 and ds.tokens.shape == (4, 2, 32, 12)
    assert torch.equal(ds.tokens, want.half())  # the posterior means, to float16 precision
    assert not torch.equal(want.half().float(), want)  # (so the comparison is at float16's precision)
    assert index["continuous"] and index["sampled"] is False and index["token_dim"] == 12
    # per-channel statistics over every valid image, view and token, by hand
    values = want.half().double().reshape(-1, 12)
    torch.testing.assert_close(ds.latent_mean, values.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(ds.latent_std, values.std(0, correction=0), rtol=0, atol=1e-12)
    assert "latent_mean" not in json.loads((tmp_path / "meta.json").read_text())  # only the index has them
    latents, label = ds[(0, 5)]
    assert latents.dtype == torch.float32 and latents.shape == (32, 12) and label == 0
    assert any(torch.equal(latents, want[0, view].half().float()) for view in (0, 1))


def test_sampled_latents_are_reproducible_draws_around_the_mean(kl, tmp_path: Path) -> None:
    data = RandomImages(5)
    kwargs = {"batch_size": 2, "shard_size": 2, "progress": False, "sample_latents": True}
    pretokenize(kl, data, tmp_path / "one", **kwargs)
    pretokenize(kl, data, tmp_path / "two", rank=1, world_size=2, **kwargs)  # another split over ranks
    pretokenize(kl, data, tmp_path / "two", rank=0, world_size=2, **kwargs)
    one, two = TokenDataset(tmp_path / "one"), TokenDataset(tmp_path / "two")
    assert torch.equal(one.tokens, two.tokens) and one.index["sampled"] is True
    means = encoded(kl, data, batch_size=2, flip=False).half()
    assert not torch.equal(one.tokens, means)
    # the tiny random encoder's posterior std is ~1: samples lie around the means, not on them
    assert 0.3 < (one.tokens.float() - means.float()).std() < 3.0
    with pytest.raises(ValueError, match="sampled=False but this run has sampled=True"):
        pretokenize(kl, data, tmp_path / "mean", batch_size=2, shard_size=2, progress=False)
        pretokenize(kl, data, tmp_path / "mean", **kwargs)
    with pytest.raises(ValueError, match="only quantizer='vae' tokenizers have one"):
        pretokenize(create_tokenizer("titok_tiny"), data, tmp_path / "vq", sample_latents=True, progress=False)


def test_latents_past_float16_are_refused_when_written(kl, tmp_path: Path, monkeypatch) -> None:
    encode = kl.encode
    monkeypatch.setattr(kl, "encode", lambda images, **kw: encode(images, **kw) * 1e6)  # |x| past 65504
    with pytest.raises(ValueError, match=r"latents of images 0\.\.1 are not finite in float16"):
        pretokenize(kl, RandomImages(2), tmp_path, batch_size=2, progress=False)


def test_continuous_reader_refuses_corrupt_latents(kl, tmp_path: Path) -> None:
    pretokenize(kl, RandomImages(4), tmp_path, batch_size=2, shard_size=4, progress=False)
    shard = tmp_path / "shard-000000.safetensors"
    tensors = load_file(shard)
    good = dict(tensors)
    tensors["tokens"][1, 0, 3, 2] = float("nan")
    save_file(tensors, shard)
    with pytest.raises(ValueError, match="NaN or infinite latents"):
        TokenDataset(tmp_path)
    save_file({**good, "tokens": good["tokens"].long()}, shard)
    with pytest.raises(ValueError, match=r"tokens of dtype torch\.int64"):
        TokenDataset(tmp_path)
    save_file({**good, "tokens": good["tokens"][..., :5].contiguous()}, shard)
    with pytest.raises(ValueError, match=r"the index expects \(4, 1, 32, 12\)"):
        TokenDataset(tmp_path)
    save_file(good, shard)
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**index, "latent_std": [-1.0] * 12}))
    with pytest.raises(ValueError, match="latent_std must be a list of token_dim = 12 finite numbers >= 0"):
        TokenDataset(tmp_path)


# ----------------------------------------------------------------- the objective
@pytest.mark.parametrize(
    "diffusion",
    [DiffusionConfig(), DiffusionConfig(objective="flow", time_sampling="logit_normal", logit_mean=0.3)],
    ids=["ddpm", "flow"],
)
def test_each_sample_draws_what_the_objectives_loss_draws_for_a_batch_of_one(diffusion: DiffusionConfig) -> None:
    data = ToyLatents()
    mean, std = data.latent_mean.float(), data.latent_std.float()
    inputs = DiffusionInputs(data, diffusion, mean, std, class_dropout=0.0, null_class=3)
    seen = {}

    def spy(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.update(x=x, t=t, y=y)
        return torch.zeros_like(x)

    for index, seed in ((0, 11), (5, 2**40 + 3)):
        stacked, label = inputs[(index, seed)]
        x0 = ((data.latents[index] - mean) / std)[None]  # the normalised latents (1, K, C)
        reference, _ = create_diffusion(diffusion).loss(spy, x0, torch.tensor([label]), sample_generator(seed))
        assert torch.equal(stacked[0], seen["x"][0]) and label == int(data.labels[index])
        assert torch.equal(stacked[2], torch.full((4, 3), float(seen["t"][0])))
        # the loss of a zero prediction is the target's mean square: the targets agree too
        torch.testing.assert_close(stacked[1].square().mean(), reference, rtol=1e-6, atol=0)
    process = create_diffusion(diffusion)
    if isinstance(process, GaussianDiffusion):  # DDPM: model time is an integer step, target the noise
        i = int(stacked[2, 0, 0])
        assert stacked[2, 0, 0] == i and 0 <= i < 1000
        abar = float(process.alphas_cumprod[i])
        torch.testing.assert_close(stacked[0], abar**0.5 * x0[0] + (1 - abar) ** 0.5 * stacked[1])
    else:
        assert isinstance(process, RectifiedFlow)
        t = float(stacked[2, 0, 0]) / 1000  # flow: x_t = (1 - t) x0 + t eps, target eps - x0
        torch.testing.assert_close(stacked[0], (1 - t) * x0[0] + t * (stacked[1] + x0[0]))


def test_label_dropout_is_per_seed_and_at_the_configured_rate() -> None:
    inputs = DiffusionInputs(ToyLatents(), DiffusionConfig(), torch.zeros(3), torch.ones(3), 0.25, null_class=3)
    dropped = [inputs[(0, seed)][1] == 3 for seed in range(2000)]
    assert abs(np.mean(dropped) - 0.25) < 0.03
    assert all(inputs[(0, seed)][1] == (3 if dropped[seed] else inputs.dataset[(0, 0)][1]) for seed in range(50))


def test_objective_loss_is_the_batch_mse_and_never_drops_labels_at_random() -> None:
    torch.manual_seed(0)
    model = create_generator("dit_tiny", num_tokens=4, token_dim=3, num_classes=3, class_dropout=1.0, **SMALL)
    for p in model.final.parameters():  # the zero-started output layer: give it signal
        torch.nn.init.normal_(p, std=0.1)
    objective = DiffusionObjective(DiffusionConfig(), torch.zeros(3), torch.ones(3), 1.0, 3)
    items = [objective.inputs(ToyLatents())[(i, i)] for i in range(5)]
    stacked, labels = torch.stack([s for s, _ in items]), torch.tensor([y for _, y in items])
    batch = objective.prepare(stacked, labels, torch.device("cpu"))
    totals = objective.totals(batch)
    assert totals.tolist() == [5 * 4 * 3]
    prediction = objective.forward(model.train(), batch)  # train mode, class_dropout 1: no random drops
    torch.testing.assert_close(prediction, model.eval()(batch[0], batch[1], batch[3]), rtol=0, atol=0)
    loss, terms = objective.loss(prediction, batch, totals)  # one process: the share is the total
    torch.testing.assert_close(loss, F.mse_loss(prediction, batch[2]), rtol=1e-6, atol=0)
    assert terms["loss"] == loss.detach()


# ----------------------------------------------------------------- training
@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_dit_resume_is_bit_identical(tmp_path: Path, objective: str) -> None:
    extra = {"ckpt_every": 2, "diffusion.objective": f"'{objective}'"}
    straight = GeneratorTrainer(toy_config(tmp_path / "a", 4, **extra), dataset=ToyLatents(), progress=False)
    straight.fit()
    first = GeneratorTrainer(toy_config(tmp_path / "b", 4, **extra), dataset=ToyLatents(), progress=False)
    first.config.steps = 2  # "killed" after step 2 (the run's settings stay those it was built with)
    first.fit()
    resumed = GeneratorTrainer(toy_config(tmp_path / "b", 4, **extra), dataset=ToyLatents(), progress=False)
    assert resumed.resume("auto") is not None and resumed.step == 2
    resumed.fit()
    assert isinstance(straight.model, DiT) and straight.history[-1]["loss"] > 0
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(straight.ema.module.parameters(), resumed.ema.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_accumulation_gives_the_gradient_of_one_big_batch(tmp_path: Path) -> None:
    one = GeneratorTrainer(toy_config(tmp_path / "a", 1), dataset=ToyLatents(), progress=False)
    two = GeneratorTrainer(toy_config(tmp_path / "b", 1, grad_accum=2), dataset=ToyLatents(), progress=False)
    grads = []
    for trainer in (one, two):
        trainer.optimizer_step = lambda: torch.tensor(0.0)  # keep the gradients, skip the update
        trainer.train_step(next(trainer.batches()))
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_the_trained_dit_records_the_data_statistics_and_the_objective(tmp_path: Path) -> None:
    data = ToyLatents()
    trainer = GeneratorTrainer(toy_config(tmp_path, 1, **{"diffusion.objective": "'flow'"}), data, progress=False)
    cfg = trainer.model.config
    assert (cfg.num_tokens, cfg.token_dim, cfg.num_classes) == (4, 3, 3)
    assert cfg.latent_mean == tuple(data.latent_mean.tolist()) and cfg.latent_std == tuple(data.latent_std.tolist())
    assert cfg.diffusion == trainer.config.diffusion.to_dict() and cfg.diffusion["objective"] == "flow"
    given = {
        f"model.overrides.{k}": v for k, v in (("latent_mean", "[0.0, 0.0, 0.0]"), ("latent_std", "[2.0, 2.0, 2.0]"))
    }
    given["model.overrides.token_dim"] = 3  # the config is checked at load against the preset's C otherwise
    cfg = GeneratorTrainer(toy_config(tmp_path / "o", 1, **given), data, progress=False).model.config
    assert cfg.latent_std == (2.0, 2.0, 2.0)  # explicit statistics replace the data's


def test_family_and_data_mismatches_are_named(tmp_path: Path) -> None:
    ids = r"'maskgit_tiny' is a MaskGIT generator, which models token ids, but the token data holds K=4 "
    with pytest.raises(ValueError, match=ids + r"continuous latents of C=3 channels: train a DiT preset \(dit_tiny"):
        GeneratorTrainer(toy_config(tmp_path, 1, "maskgit_tiny"), dataset=ToyLatents())
    latents = r"'dit_tiny' is a DiT generator, which models continuous latents, but the token data holds K=4 "
    with pytest.raises(ValueError, match=latents + r"token ids of V=16 codes: train a MaskGIT or BitMAR preset"):
        GeneratorTrainer(toy_config(tmp_path, 1), dataset=IntTokens())
    with pytest.raises(ValueError, match="token_dim = 5, but the token data has token_dim = 3"):
        GeneratorTrainer(toy_config(tmp_path, 1, **{"model.overrides.token_dim": 5}), dataset=ToyLatents())
    with pytest.raises(ValueError, match=r"is set in the \[diffusion\] section"):
        GeneratorTrainer(toy_config(tmp_path, 1, **{"model.overrides.diffusion": "{}"}), dataset=ToyLatents())


@pytest.mark.slow
def test_torchrun_dit_training_matches_one_process(kl, tmp_path: Path) -> None:
    """Two DDP ranks train what one process trains: time, noise and label drops are per sample."""
    pretokenize(kl, RandomImages(16), tmp_path / "latents", flip=True, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}

    def command(out: str) -> list[str]:
        settings = ["steps=3", "batch_size=8", "log_every=1", "ckpt_every=3", "tensorboard=false", "sample_every=0"]
        settings += ["model.overrides={width=32, depth=2, num_heads=2}", "optim.warmup_steps=1"]
        settings += [f"data.path='{tmp_path / 'latents'}'", f"out_dir='{tmp_path / out}'"]
        config = str(CONFIGS / "dit_tiny.toml")
        return ["-m", "mstok.cli", "train-generator", "--config", config, "--no-progress", "--set", *settings]

    runs = {
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command("ddp")],
        "single": [sys.executable, *command("single")],
    }
    losses = {}
    for name, argv in runs.items():
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        lines = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        losses[name] = [line["loss"] for line in lines if "loss" in line and "epoch" not in line]
    assert len(losses["single"]) == 3 and losses["ddp"] == pytest.approx(losses["single"], rel=1e-5)
    a = load_file(tmp_path / "ddp" / "checkpoints" / "step_0000003" / "model.safetensors")
    b = load_file(tmp_path / "single" / "checkpoints" / "step_0000003" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-5


# ----------------------------------------------------------------- registry and sampling
def test_one_registry_creates_and_loads_both_families(tmp_path: Path) -> None:
    assert {"maskgit_tiny", "dit_tiny", "dit_xl"} <= set(GENERATOR_PRESETS)
    assert isinstance(create_generator("maskgit_tiny"), MaskGITGenerator)
    torch.manual_seed(0)
    dit = create_generator("dit_tiny", num_tokens=4, token_dim=3, num_classes=3, latent_std=(1.0, 2.0, 3.0),
                           latent_mean=(0.0, 0.0, 1.0), diffusion={"objective": "flow"}, **SMALL)  # fmt: skip
    for p in dit.final.parameters():
        torch.nn.init.normal_(p, std=0.1)
    dit.save_pretrained(tmp_path / "dit")
    loaded = load_generator(tmp_path / "dit")
    assert isinstance(loaded, DiT) and loaded.config == dit.config and not loaded.training
    x, t, y = torch.randn(2, 4, 3), torch.tensor([10.0, 900.0]), torch.tensor([0, 3])
    torch.testing.assert_close(loaded(x, t, y), dit.eval()(x, t, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown generator preset 'dit_tinny' \\(did you mean dit_tiny"):
        create_generator("dit_tinny")


def test_sampling_runs_the_models_objective_and_undoes_the_normalisation() -> None:
    torch.manual_seed(0)
    dit = create_generator("dit_tiny", num_tokens=4, token_dim=3, num_classes=3, latent_std=(1.0, 2.0, 3.0),
                           latent_mean=(0.0, 0.0, 1.0), diffusion={"objective": "flow"}, **SMALL)  # fmt: skip
    for p in dit.final.parameters():
        torch.nn.init.normal_(p, std=0.1)
    labels = torch.tensor([0, 2])
    settings = DiTSamplingConfig(sampler="heun", steps=3, guidance_scale=2.0)
    got = sample_latents(dit, labels, settings, generator=torch.Generator().manual_seed(1))
    plain = RectifiedFlow().sample(dit, (2, 4, 3), labels, steps=3, sampler="heun", guidance_scale=2.0,
                                   null_label=3, generator=torch.Generator().manual_seed(1))  # fmt: skip
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 1.0]) + torch.tensor([1.0, 2.0, 3.0]) * plain)
    torch.testing.assert_close(denormalize_latents(dit.config, plain), got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="trained with the 'flow' objective: use euler or heun"):
        sample_latents(dit, labels, DiTSamplingConfig(sampler="ddim"))
    with pytest.raises(ValueError, match=r"eta = 0\.5 is DDIM's noise scale"):
        sample_latents(dit, labels, DiTSamplingConfig(eta=0.5))


def test_generate_images_decodes_dit_latents_and_checks_the_pair(kl) -> None:
    torch.manual_seed(0)
    dit = create_generator("dit_tiny", num_tokens=32, token_dim=12, num_classes=3, **SMALL)
    settings = DiTSamplingConfig(sampler="ddim", steps=2)
    images, latents = generate_images(dit, kl, [0, 1, 2], settings, seed=0, batch_size=2)
    assert images.shape == (3, 3, 64, 64) and latents.shape == (3, 32, 12) and latents.dtype == torch.float32
    torch.testing.assert_close(images, kl.decode(latents), rtol=0, atol=1e-5)  # decoded in batches of 2 there
    again, _ = generate_images(dit, kl, [0, 1, 2], settings, seed=0, batch_size=2)
    assert torch.equal(images, again)
    with pytest.raises(TypeError, match="a DiT generator samples with a DiTSamplingConfig, got SamplingConfig"):
        generate_images(dit, kl, [0], SamplingConfig())
    wrong = create_generator("dit_tiny", num_tokens=32, token_dim=6, num_classes=3, **SMALL)
    with pytest.raises(ValueError, match="models K=32 continuous latents of C=6 channels but the tokenizer has "
                       "K=32 continuous latents of C=12 channels"):  # fmt: skip
        generate_images(wrong, kl, [0])
    with pytest.raises(ValueError, match="models K=32 token ids of V=1024 codes but the tokenizer has K=32 continuous"):
        generate_images(create_generator("maskgit_tiny", **SMALL), kl, [0])


def test_sample_flags_map_to_the_familys_settings() -> None:
    parse = build_parser().parse_args
    args = parse(["sample", "--generator", "g", "--tokenizer", "t", "--guidance-scale", "0", "--steps", "7"])
    assert _sampling_fields(args, FAMILIES["dit"]) == {"guidance_scale": 0.0, "steps": 7}  # 0 is a value
    args = parse(["sample", "--generator", "g", "--tokenizer", "t", "--sampler", "ddim", "--anneal-temperature"])
    with pytest.raises(ValueError, match="--anneal-temperature: not a setting of DiT sampling"):
        _sampling_fields(args, FAMILIES["dit"])
    with pytest.raises(ValueError, match="--sampler: not a setting of MaskGIT sampling"):
        _sampling_fields(
            parse(["sample", "--generator", "g", "--tokenizer", "t", "--sampler", "x"]), FAMILIES["maskgit"]
        )


@pytest.mark.slow  # it builds every tokenizer preset too (on the meta device)
def test_presets_command_lists_the_dit_presets_with_their_sizes(capsys) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("dit_tiny", "dit_b", "dit_xl"):
        with torch.device("meta"):
            total = create_generator(name).parameter_counts()["total"]
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert f"{total / 1e6:.2f}M" in row and "C=" in row, row


# ----------------------------------------------------------------- the CLI chain
def test_cli_chain_pretokenize_train_sample(kl_dir: Path, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    latents = tmp_path / "latents"
    argv = ["pretokenize", "--checkpoint", str(kl_dir), "--data", str(tmp_path / "images"), "--out", str(latents)]
    assert main([*argv, "--flip", "--workers", "0", "--no-progress", "--device", "cpu"]) == 0
    assert TokenDataset(latents).continuous and "C=12 latents" in capsys.readouterr().out

    run = tmp_path / "dit"
    settings = [f"data.path='{latents}'", f"out_dir='{run}'", f"tokenizer='{kl_dir}'", "steps=2", "batch_size=4"]
    settings += ["model.overrides={width=32, depth=2, num_heads=2}", "sample_every=2", "num_samples=2"]
    settings += ["device='cpu'", "tensorboard=false", "log_every=1", "dit_sampling.steps=3"]
    config = str(CONFIGS / "dit_tiny.toml")
    assert main(["train-generator", "--config", config, "--no-progress", "--set", *settings]) == 0
    assert (run / "generated" / "step_0000002.png").is_file()
    generator = load_generator(run)
    assert isinstance(generator, DiT) and generator.config.num_classes == 2 and len(generator.config.latent_std) == 12

    out = tmp_path / "samples"
    argv = ["sample", "--generator", str(run), "--tokenizer", str(kl_dir), "--classes", "0,1", "--n", "2"]
    argv += ["--out-dir", str(out), "--no-progress", "--device", "cpu", "--sampler", "ddim", "--steps", "3"]
    assert main(argv) == 0
    batch = np.load(out / "samples.npz")
    assert batch["arr_0"].shape == (4, 64, 64, 3) and batch["tokens"].shape == (4, 32, 12)
    assert batch["labels"].tolist() == [0, 0, 1, 1] and len(list(out.glob("class*.png"))) == 4
    first = batch["tokens"].copy()
    assert main(argv) == 0  # same seed, same samples
    assert np.array_equal(np.load(out / "samples.npz")["tokens"], first)

    capsys.readouterr()
    assert main([*argv, "--schedule", "cosine"]) == 2
    assert "--schedule: not a setting of DiT sampling" in capsys.readouterr().err
    assert main([*argv[:-4], "--sampler", "euler"]) == 2
    assert "use ddpm or ddim" in capsys.readouterr().err
    wrong = tmp_path / "tok6"
    create_tokenizer("titok_tiny", quantizer="vae", code_dim=6).save_pretrained(wrong)
    assert main(["sample", "--generator", str(run), "--tokenizer", str(wrong), "--out", str(tmp_path / "x.png")]) == 2
    assert "C=12 channels but the tokenizer has K=32 continuous latents of C=6" in capsys.readouterr().err
    maskgit = [f"data.path='{latents}'", f"out_dir='{tmp_path / 'mg'}'", "device='cpu'"]
    assert main(["train-generator", "--config", str(CONFIGS / "maskgit_tiny.toml"), "--set", *maskgit]) == 2
    assert "is a MaskGIT generator, which models token ids" in capsys.readouterr().err
