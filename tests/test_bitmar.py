"""BitMAR, SemTok's bitwise masked generator: bit inputs and heads, the masked bitwise loss,
per-seed masking, random-order sampling with top-p and linear guidance, learning a toy
distribution, save/load, exact resume on the engine, and the CLI chain on a tiny BSQ tokenizer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mstok.cli import main
from mstok.generators import FAMILIES, BitMAR, BitSamplingConfig, create_generator, generate_images, sample_bits
from mstok.generators.bitmar_sampling import (
    categorical_logits,
    draw,
    guidance_scales,
    guided,
    top_p_filter,
    values_to_ids,
)
from mstok.generators.schedules import masked_counts
from mstok.losses.bitwise import BitMaskedTokens, BitwiseObjective, bitwise_sums, group_values
from mstok.persistence import load_generator, load_tokenizer
from mstok.quantizers.bsq import BinarySphericalQuantizer
from mstok.tokenizers import create_tokenizer
from mstok.training import GeneratorTrainConfig, load_train_config
from mstok.training.generator_trainer import GeneratorTrainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = {"width": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny(bits: int = 6, tokens: int = 4, classes: int = 3, **extra) -> BitMAR:
    torch.manual_seed(0)
    fields = {"num_tokens": tokens, "codebook_size": 2**bits, "num_classes": classes, **SMALL, **extra}
    return create_generator("bitmar_tiny", **fields)


def randomize_head(model: BitMAR, std: float = 0.5) -> BitMAR:
    """Give the zero-started modulations and head random weights, so outputs depend on inputs."""
    for module in (model.head, model.modulation, model.final_modulation):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=std)
    for block in model.blocks:
        torch.nn.init.normal_(block.modulation, std=std)
    return model


def hand_bits(ids: list[int], bits: int) -> torch.Tensor:
    return torch.tensor([[(i >> b) & 1 for b in range(bits)] for i in ids], dtype=torch.float32)


# ----------------------------------------------------------------- model
def test_shapes_of_the_bit_and_group_heads_and_bad_inputs() -> None:
    model = tiny(bits=12)
    ids, mask, labels = torch.randint(0, 2**12, (2, 4)), torch.rand(2, 4) < 0.5, torch.tensor([0, 3])
    assert model(ids, mask, labels).shape == (2, 4, 12)  # one logit per bit
    grouped = tiny(bits=12, group_bits=4)
    assert grouped(ids, mask, labels).shape == (2, 4, 3, 16)  # 3 groups of 4 bits, 16-way each
    assert grouped.head.out_features == 48 and model.head.out_features == 12
    with pytest.raises(ValueError, match="group_bits 5 must divide the C = 12 bits"):
        tiny(bits=12, group_bits=5)
    with pytest.raises(ValueError, match="codebook_size 1000 is not a power of two"):
        create_generator("bitmar_tiny", codebook_size=1000)
    with pytest.raises(ValueError, match=r"ids must be integer ids of shape \(B, 4\)"):
        model(ids.float(), mask, labels)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        model(ids, mask.long(), labels)
    with pytest.raises(ValueError, match=r"labels must be integer class ids of shape \(2,\)"):
        model(ids, mask, labels[:1])


def test_bit_inputs_are_the_ids_bits_as_signs_and_the_bsq_codes() -> None:
    model = tiny(bits=6)
    ids = torch.tensor([[0, 1, 37, 63]])
    signs = hand_bits([0, 1, 37, 63], 6) * 2 - 1  # bit i of id is (id >> i) & 1
    torch.testing.assert_close(model.bit_signs(ids)[0], signs, rtol=0, atol=0)
    codes = BinarySphericalQuantizer(6).indices_to_codes(ids)  # +-1/sqrt(C)
    torch.testing.assert_close(model.bit_signs(ids), codes * math.sqrt(6))
    # a known position is embedded by Linear(C, D) of its signs, a masked one by the mask embedding only
    randomize_head(model)
    mask = torch.tensor([[False, True, False, False]])
    other = ids.clone()
    other[0, 1] = 12  # a masked id is ignored
    label = torch.tensor([1])
    torch.testing.assert_close(model(ids, mask, label), model(other, mask, label), rtol=0, atol=0)
    assert not torch.equal(model(ids, mask, label), model(ids, ~mask, label))


def test_untrained_model_predicts_fair_coins_and_gradients_reach_every_parameter() -> None:
    model = tiny(bits=6)
    ids, mask, labels = torch.randint(0, 64, (3, 4)), torch.rand(3, 4) < 0.7, torch.tensor([0, 1, 3])
    assert torch.equal(model(ids, mask, labels), torch.zeros(3, 4, 6))  # zero-started head
    randomize_head(model)  # from a nonzero start every parameter gets a gradient
    model(ids, mask | torch.eye(3, 4, dtype=torch.bool), labels).square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = randomize_head(tiny(bits=8, group_bits=2))
    model.save_pretrained(tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    assert isinstance(loaded, BitMAR) and loaded.config == model.config and not loaded.training
    ids, mask, labels = torch.randint(0, 256, (2, 4)), torch.rand(2, 4) < 0.5, torch.tensor([0, 2])
    torch.testing.assert_close(loaded(ids, mask, labels), model.eval()(ids, mask, labels), rtol=0, atol=0)
    assert FAMILIES["bitmar"].tokens(loaded.config).size == 256


# ----------------------------------------------------------------- objective
def test_the_loss_counts_masked_positions_only_by_hand() -> None:
    torch.manual_seed(0)
    ids = torch.tensor([[5, 2, 7], [0, 6, 1]])  # C = 3 bits
    mask = torch.tensor([[True, False, True], [False, False, True]])
    logits = torch.randn(2, 3, 3, requires_grad=True)
    eps = 0.1
    expected, right = 0.0, 0
    for b in range(2):
        for k in range(3):
            if not mask[b, k]:
                continue
            for i in range(3):
                y = (int(ids[b, k]) >> i) & 1
                p = 1 / (1 + math.exp(-logits[b, k, i].item()))
                t = y * (1 - eps) + eps / 2
                expected += -(t * math.log(p) + (1 - t) * math.log(1 - p))
                right += int((p > 0.5) == bool(y))
    s = bitwise_sums(logits, ids, mask, group_bits=1, label_smoothing=eps)
    assert s["loss"].item() == pytest.approx(expected, rel=1e-5) and s["bits_right"].item() == right
    s["loss"].backward()
    assert torch.equal(logits.grad[~mask], torch.zeros(3, 3))  # unmasked positions get no gradient
    objective = BitwiseObjective(3, 1, null_class=4, label_smoothing=eps)
    loss, terms = objective.loss(logits, (ids, mask, torch.zeros(2)), objective.totals((ids, mask, None)))
    assert loss.item() == pytest.approx(expected / (3 * 3), rel=1e-5)  # mean over 3 masked x 3 bits
    assert terms["bit_accuracy"].item() == pytest.approx(right / 9)


def test_grouped_loss_is_the_cross_entropy_of_each_groups_value() -> None:
    torch.manual_seed(0)
    ids, mask = torch.tensor([[0b1101, 0b0110]]), torch.tensor([[True, False]])
    assert group_values(ids, 4, 2).tolist() == [[[0b01, 0b11], [0b10, 0b01]]]  # low bits first
    logits = torch.randn(1, 2, 2, 4)
    expected = F.cross_entropy(logits[0, 0], torch.tensor([1, 3]), reduction="sum")
    s = bitwise_sums(logits, ids, mask, group_bits=2)
    torch.testing.assert_close(s["loss"], expected)
    tokens = int(logits[0, 0, 0].argmax() == 1 and logits[0, 0, 1].argmax() == 3)
    assert s["tokens_right"].item() == tokens


def test_masking_ratios_are_in_range_and_deterministic_per_seed() -> None:
    data = {(0, seed): (torch.arange(20), 1) for seed in range(400)}  # ds[(index, seed)] -> (ids, label)
    inputs = BitMaskedTokens(data, 0.7, 1.0, class_dropout=0.25, null_class=9)
    ratios, drops = [], 0
    for seed in range(400):
        stacked, label = inputs[(0, seed)]
        again, _ = inputs[(0, seed)]
        assert torch.equal(stacked, again) and torch.equal(stacked[0], torch.arange(20))
        ratios.append(stacked[1].sum().item() / 20)
        drops += label == 9
    assert min(ratios) >= 0.7 and max(ratios) == 1.0 and len(set(ratios)) == 7  # 14..20 of 20 masked
    assert abs(np.mean(ratios) - 0.85) < 0.02 and 70 < drops < 130
    assert not torch.equal(inputs[(0, 1)][0], inputs[(0, 2)][0])
    with pytest.raises(ValueError, match="0 < min_mask_ratio <= max_mask_ratio <= 1"):
        BitMaskedTokens(data, 0.9, 0.8, 0.0, 9)


# ----------------------------------------------------------------- sampling
@pytest.mark.parametrize("bits", [18, 32])
def test_sampled_ids_are_valid_int64_and_every_bit_is_reachable(bits: int) -> None:
    model = tiny(bits=bits, tokens=8)  # untrained: every bit a fair coin
    settings = BitSamplingConfig(steps=4, guidance_scale=3.0)
    ids = sample_bits(model, torch.tensor([0, 1, 2] * 4), settings, generator=torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int64 and ids.shape == (12, 8)
    assert int(ids.min()) >= 0 and int(ids.max()) < 2**bits
    seen = (ids[..., None] >> torch.arange(bits)) & 1  # (12, 8, C)
    assert torch.all(seen.flatten(0, 1).amax(0) == 1) and torch.all(seen.flatten(0, 1).amin(0) == 0)
    again = sample_bits(model, torch.tensor([0, 1, 2] * 4), settings, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)


def test_grouped_sampling_assembles_ids_from_group_values() -> None:
    assert values_to_ids(torch.tensor([[1, 3], [2, 0]]), 2).tolist() == [1 + 3 * 4, 2]
    model = tiny(bits=8, group_bits=4)
    ids = sample_bits(model, [0, 1], BitSamplingConfig(steps=2, top_p=1.0), generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 4) and int(ids.max()) < 256


def test_every_position_is_revealed_exactly_once_by_the_last_step() -> None:
    model = randomize_head(tiny(bits=6, tokens=10))
    for steps in (4, 10, 13):  # fewer, as many and more steps than tokens
        counts = masked_counts(10, steps, "cosine")
        _, history = sample_bits(model, [0, 1], BitSamplingConfig(steps=steps), torch.Generator(), True)
        assert len(history) == steps and not history[-1].any()
        previous = torch.ones(2, 10, dtype=torch.bool)
        for t, mask in enumerate(history):
            assert not (mask & ~previous).any()  # a revealed token stays revealed (never redrawn)
            assert mask.sum(1).tolist() == [counts[t]] * 2
            previous = mask


def test_top_p_keeps_the_nucleus_by_hand() -> None:
    bit = categorical_logits(torch.tensor([math.log(4.0), math.log(1.0)]), 1)  # P(1) = 0.8 and 0.5
    filtered = top_p_filter(bit, 0.75)
    assert filtered.isfinite().tolist() == [[False, True], [True, True]]  # 0.8 >= 0.75: the likelier bit alone;
    assert torch.equal(filtered[filtered.isfinite()], bit[filtered.isfinite()])  # 0.5 < 0.75: both, unchanged
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    kept = top_p_filter(probs.log(), 0.7).isfinite()
    assert kept.tolist() == [False, True, False, True]  # 0.5 + 0.25 reaches 0.7
    assert top_p_filter(probs.log(), 0.76).isfinite().tolist() == [False, True, True, True]
    assert draw(probs.log().expand(100, 4), 0.0, 1.0).eq(1).all()  # temperature 0: argmax
    drawn = draw(probs.log().expand(2000, 4), 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 3} and abs(drawn.eq(1).float().mean().item() - 2 / 3) < 0.05


def test_guidance_combination_and_linear_schedule_by_hand() -> None:
    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.5])
    torch.testing.assert_close(guided(cond, uncond, 3.0), torch.tensor([0.5 + 3 * 1.5, 0.5 - 3 * 1.5]))
    counts = masked_counts(8, 4, "cosine")
    assert guidance_scales(counts, 8, 6.0) == [1 + 5 * (8 - n) / 8 for n in counts]
    assert guidance_scales(counts, 8, 6.0)[-1] == 6.0 and guidance_scales(counts, 8, 2.0, "constant") == [2.0] * 4
    # the sampler's logits at a step are uncond + s (cond - uncond) of two passes of the model
    # (float64 passes: the sampler batches both halves, whose float32 rounding s = 4 would amplify)
    model = randomize_head(tiny(bits=6)).double()
    from mstok.generators.bitmar_sampling import _predict

    rng = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(0, 64, (2, 4), generator=rng), torch.rand(2, 4, generator=rng) < 0.5
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        c, u = model(ids, mask, labels).float(), model(ids, mask, torch.full_like(labels, 3)).float()
        torch.testing.assert_close(_predict(model, ids, mask, labels, 4.0), u + 4.0 * (c - u), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------- learning and the engine
class ToySequences(Dataset):
    """K = 4 tokens of C = 6 bits; class c always has the same id sequence."""

    num_tokens, codebook_size, num_classes = 4, 64, 3
    sequences = torch.tensor([[3, 60, 17, 42], [0, 63, 21, 8], [45, 45, 9, 30]])

    def __init__(self, size: int = 96) -> None:
        self.labels = torch.arange(size) % 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        label = int(self.labels[key[0]])
        return self.sequences[label], label


def toy_config(out: Path, steps: int, **extra) -> GeneratorTrainConfig:
    settings = [
        f"steps={steps}", "batch_size=12", f"out_dir='{out}'", "device='cpu'", "log_every=1", "tensorboard=false",
        "model.preset='bitmar_tiny'", *[f"model.overrides.{k}={v}" for k, v in SMALL.items()],
        "optim.lr=3e-3", "optim.warmup_steps=5", "optim.end_lr=3e-4", "ema_decay=0.9", "threads=1",
        *[f"{k}={v}" for k, v in extra.items()],
    ]  # fmt: skip
    return load_train_config(None, settings, GeneratorTrainConfig)


@pytest.mark.slow
def test_a_generator_learns_a_toy_distribution(tmp_path: Path) -> None:
    # K = 4: masking 20-100% lets training see the states of every sampling step (1 to 4 masked)
    extra = {"bit_loss.class_dropout": 0.0, "bit_loss.min_mask_ratio": 0.2, "optim.weight_decay": 0.0}
    config = toy_config(tmp_path, 200, **extra)
    trainer = GeneratorTrainer(config, dataset=ToySequences(), progress=False)
    history = trainer.fit()
    assert history[0]["ce"] > 0.6 and history[-1]["ce"] < 0.05, (history[0]["ce"], history[-1]["ce"])
    labels = torch.tensor([0, 1, 2] * 8)
    settings = BitSamplingConfig(steps=4, guidance_scale=1.0)  # the paper's top-p 0.75 snaps near-sure bits
    ids = sample_bits(trainer.model, labels, settings, generator=torch.Generator().manual_seed(0))
    accuracy = (ids == ToySequences.sequences[labels]).float().mean().item()
    assert accuracy > 0.95, ids


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    straight = GeneratorTrainer(toy_config(tmp_path / "a", 4, ckpt_every=2), dataset=ToySequences(), progress=False)
    straight.fit()
    first = GeneratorTrainer(toy_config(tmp_path / "b", 4, ckpt_every=2), dataset=ToySequences(), progress=False)
    first.config.steps = 2  # "killed" after step 2
    first.fit()
    resumed = GeneratorTrainer(toy_config(tmp_path / "b", 4, ckpt_every=2), dataset=ToySequences(), progress=False)
    assert resumed.resume("auto") is not None and resumed.step == 2
    resumed.fit()
    assert isinstance(straight.model, BitMAR) and straight.history[-1]["loss"] > 0
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(straight.ema.module.parameters(), resumed.ema.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_data_sets_c_and_a_codebook_that_is_no_power_of_two_is_named(tmp_path: Path) -> None:
    trainer = GeneratorTrainer(toy_config(tmp_path / "a", 1), dataset=ToySequences(), progress=False)
    assert (trainer.model.config.num_bits, trainer.model.config.num_tokens, trainer.model.config.num_classes) == (
        6,
        4,
        3,
    )

    class Vq(ToySequences):
        codebook_size = 1000

    with pytest.raises(ValueError, match="codebook_size 1000 is not a power of two"):
        GeneratorTrainer(toy_config(tmp_path / "b", 1), dataset=Vq(), progress=False)
    with pytest.raises(ValueError, match=r"bit_loss\.min_mask_ratio must be at most max_mask_ratio"):
        toy_config(tmp_path, 1, **{"bit_loss.min_mask_ratio": 0.9, "bit_loss.max_mask_ratio": 0.8})


def test_shipped_config_parses() -> None:
    config = load_train_config(CONFIGS / "bitmar_tiny.toml", [], GeneratorTrainConfig)
    assert config.model.preset == "bitmar_tiny" and config.bit_sampling.steps >= 1


# ----------------------------------------------------------------- the CLI chain
def test_cli_chain_pretokenize_train_sample(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    tok_dir = create_tokenizer("titok_tiny", quantizer="bsq", code_dim=10).save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    tokens = tmp_path / "tokens"
    argv = ["pretokenize", "--checkpoint", str(tok_dir), "--data", str(tmp_path / "images"), "--out", str(tokens)]
    assert main([*argv, "--workers", "0", "--no-progress", "--device", "cpu"]) == 0

    run = tmp_path / "bitmar"
    settings = [f"data.path='{tokens}'", f"out_dir='{run}'", f"tokenizer='{tok_dir}'", "steps=2", "batch_size=4"]
    settings += ["model.overrides={width=32, depth=2, num_heads=2}", "sample_every=2", "num_samples=2"]
    settings += ["device='cpu'", "tensorboard=false", "log_every=1", "bit_sampling.steps=3"]
    assert (
        main(["train-generator", "--config", str(CONFIGS / "bitmar_tiny.toml"), "--no-progress", "--set", *settings])
        == 0
    )
    assert (run / "generated" / "step_0000002.png").is_file()
    generator = load_generator(run)
    assert isinstance(generator, BitMAR) and generator.config.num_bits == 10 and generator.config.num_classes == 2

    out = tmp_path / "samples"
    argv = ["sample", "--generator", str(run), "--tokenizer", str(tok_dir), "--classes", "0,1", "--n", "2"]
    argv += ["--out-dir", str(out), "--no-progress", "--device", "cpu", "--steps", "3", "--guidance-scale", "2"]
    argv += ["--top-p", "0.9"]
    assert main(argv) == 0
    batch = np.load(out / "samples.npz")
    assert batch["arr_0"].shape == (4, 64, 64, 3) and batch["tokens"].shape == (4, 32)
    assert batch["tokens"].max() < 1024 and batch["labels"].tolist() == [0, 0, 1, 1]
    capsys.readouterr()
    assert main([*argv, "--confidence", "logit"]) == 2
    assert "--confidence: not a setting of BitMAR sampling" in capsys.readouterr().err
    tokenizer = load_tokenizer(tok_dir)
    images, ids = generate_images(generator, tokenizer, [0, 1], BitSamplingConfig(steps=2), seed=0)
    assert images.shape == (2, 3, 64, 64) and ids.dtype == torch.int64
