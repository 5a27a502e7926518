"""Tests for mutants that survived tools/mutate.py (docs/MUTATION.md): each pins a behaviour that a
plausible one-line bug changed without any other test noticing. Inputs are chosen so that the
mutant and the original disagree (e.g. a mean count other than 1, a count of exactly 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mstok.evaluation.metrics import codebook_usage, mean_colour
from mstok.quantizers import BinarySphericalQuantizer, FiniteScalarQuantizer, LookupFreeQuantizer, VectorQuantizer
from mstok.quantizers.base import DENSE_USAGE_MAX, usage_statistics


def test_codebook_usage_counts_codes_used_once() -> None:
    # A code used exactly once must count as used; 2 of 5 used is not half the codebook.
    stats = codebook_usage(torch.tensor([3, 1, 0, 0, 0]))
    assert stats["codes_used"] == 2 and stats["codebook_usage"] == pytest.approx(0.4)
    assert stats["perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_codebook_usage_of_no_tokens_is_defined() -> None:
    # No tokens at all (every image skipped): no code used, perplexity 1 (not 0/0 = nan).
    stats = codebook_usage(torch.zeros(4, dtype=torch.long))
    assert stats == {"codebook_usage": 0.0, "perplexity": 1.0, "codes_used": 0}


def test_mean_colour_paints_each_image_in_its_channel_means() -> None:
    images = torch.zeros(2, 3, 2, 2)
    images[0, 0] = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # red mean 0.75
    images[1, 2] = 0.5
    flat = mean_colour(images)
    assert flat.shape == images.shape
    assert torch.equal(flat[0, 0], torch.full((2, 2), 0.75)) and torch.equal(flat[0, 1:], torch.zeros(2, 2, 2))
    assert torch.equal(flat[1, 2], torch.full((2, 2), 0.5)) and float(flat[1, :2].abs().max()) == 0.0


def test_dead_code_threshold_scales_with_the_mean_count() -> None:
    # 8 ids over 4 codes: mean count 2, so a code dies when its EMA drops below 0.01 * 2 = 0.02.
    vq = VectorQuantizer(codebook_size=4, code_dim=3, use_l2_norm=False)
    latents = torch.randn(4, 2, 3)
    always = torch.zeros(4, 2, dtype=torch.long)
    assert vq.revive_dead_codes(latents, always, decay=0.9, threshold=0.01) == 3  # unused: revived at once
    # revived codes restart at the mean count 2: 2 * 0.9**n < 0.02 first holds at n = 44
    calls, revived = 0, 0
    while not revived and calls < 200:
        revived = vq.revive_dead_codes(latents, always, decay=0.9, threshold=0.01)
        calls += 1
    assert calls == 44 and revived == 3


def test_l2_normalised_search_is_the_default() -> None:
    vq = VectorQuantizer(8, 4)
    assert vq.use_l2_norm
    z = torch.randn(2, 3, 4) * 5
    assert torch.allclose(vq(z).codes.norm(dim=-1), torch.ones(2, 3), atol=1e-5)


def test_half_precision_codebook_is_searched_in_float32() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, use_l2_norm=False)
    reference = VectorQuantizer(16, 4, use_l2_norm=False)
    vq.embedding.to(torch.bfloat16)
    reference.embedding.weight.data.copy_(vq.embedding.weight.data.float())
    z = torch.randn(2, 5, 4)
    out, expected = vq(z), reference(z)
    assert out.codes.dtype == torch.float32
    assert torch.equal(out.indices, expected.indices)
    torch.testing.assert_close(out.codes, expected.codes)


# ---------------------------------------------------------------- the quantizer zoo (docs/MUTATION.md)
def test_bit_quantizers_keep_their_defaults() -> None:
    # the measured defaults (lfq.py, bsq.py; benchmarks/RESULTS.md "Binary quantizers that keep their
    # codes: diagnosis"): BSQ inverse temperature C, no commitment; LFQ 0.5 on a layer-normalised
    # latent, no commitment; both with the codebook entropy per token position
    bsq, lfq = BinarySphericalQuantizer(8), LookupFreeQuantizer(8)
    assert (bsq.inverse_temperature, bsq.commitment_weight, bsq.entropy_per_position) == (8.0, 0.0, True)
    assert BinarySphericalQuantizer(18).inverse_temperature == 18.0
    assert (lfq.inverse_temperature, lfq.commitment_weight, lfq.entropy_per_position, lfq.layer_norm) == (
        0.5,
        0.0,
        True,
        True,
    )
    out = bsq(torch.randn(2, 4, 8))
    assert float(out.losses.get("commitment", torch.zeros(()))) == 0.0


def test_fsq_refuses_a_single_level_even_when_built_directly() -> None:
    # the spec checker refuses it first; the class must too (a channel with one level is constant)
    with pytest.raises(ValueError, match="integers >= 2"):
        FiniteScalarQuantizer([8, 1])


def test_fsq_quantizes_low_precision_latents_in_float32() -> None:
    # bf16 latents (no autocast) are searched in float32: same ids as the float32 latents, float32 codes
    q = FiniteScalarQuantizer([8, 5, 5, 5])
    z = torch.randn(64, 64, 4).bfloat16()  # enough values that bf16 arithmetic would round some differently
    low, full, double = q(z), q(z.float()), q(z.double())
    assert low.codes.dtype == torch.float32 and torch.equal(low.indices, full.indices)
    # float64 latents too: the contract is float32 codes whatever the input precision
    assert double.codes.dtype == torch.float32 and double.latents.dtype == torch.float32


def test_usage_counts_exactly_up_to_the_dense_limit() -> None:
    # V = 2^20 still gets exact per-code counts; only above it do bit statistics take over
    ids = torch.tensor([0, 1, 1, DENSE_USAGE_MAX - 1])
    assert DENSE_USAGE_MAX == 2**20
    assert usage_statistics(ids, DENSE_USAGE_MAX)["method"] == "counts"
    assert usage_statistics(ids, 2 * DENSE_USAGE_MAX)["method"] == "bits"


def test_batch_perplexity_of_a_huge_codebook_is_exact_in_float64() -> None:
    # 3 distinct ids with counts 1, 2 and 10^6 - 3: float32 arithmetic is off in the 7th digit
    ids = torch.cat([torch.tensor([5, 9, 9]), torch.full((10**6 - 3,), 2**40, dtype=torch.long)])
    counts = torch.tensor([1.0, 2.0, 10**6 - 3], dtype=torch.float64)
    probs = counts / counts.sum()
    expected = float((-(probs * probs.log()).sum()).exp())
    stats = usage_statistics(ids, 2**42)
    assert stats["batch_perplexity"] == pytest.approx(expected, rel=1e-12, abs=0)


# ---------------------------------------------------------------- sampling and attention (docs/MUTATION.md)
def _tiny_pair():
    from mstok.generators import create_generator
    from mstok.tokenizers import create_tokenizer

    torch.manual_seed(0)
    generator = create_generator("maskgit_tiny", num_tokens=8, codebook_size=64, num_classes=40).eval()
    return generator, create_tokenizer("titok_tiny", num_latent_tokens=8, codebook_size=64).eval()


def test_generate_images_is_reproducible_under_its_seed_and_varies_with_it() -> None:
    from mstok.generators import SamplingConfig
    from mstok.generators.sampling import generate_images

    generator, tokenizer = _tiny_pair()
    noisy = SamplingConfig(steps=4, temperature=2.0, choice_temperature=3.0)
    labels = torch.tensor([1, 2, 3, 4])
    ids = [generate_images(generator, tokenizer, labels, noisy, seed=s)[1] for s in (3, 3, 4)]
    assert torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], ids[2])
    assert generate_images(generator, tokenizer, labels, noisy, seed=None)[1].shape == (4, 8)  # unseeded works


def test_a_sample_grid_shows_at_most_32_classes(tmp_path) -> None:
    from PIL import Image

    from mstok.generators.sampling import write_samples

    images = torch.rand(33, 3, 8, 8)
    labels = torch.arange(33)
    write_samples(images, labels, labels[:, None], per_class=1, grid=tmp_path / "33.png")
    write_samples(images[:32], labels[:32], labels[:32, None], per_class=1, grid=tmp_path / "32.png")
    a, b = Image.open(tmp_path / "33.png"), Image.open(tmp_path / "32.png")
    assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_attention_with_a_single_head_is_allowed() -> None:
    from mstok.layers import SelfAttention

    attn = SelfAttention(8, 1)
    assert attn(torch.randn(2, 5, 8)).shape == (2, 5, 8)
    with pytest.raises(ValueError, match="positive multiple of num_heads 0"):
        SelfAttention(8, 0)


def test_attention_dropout_acts_in_training_only() -> None:
    from mstok.layers import SelfAttention

    torch.manual_seed(0)
    plain, dropped = SelfAttention(8, 2), SelfAttention(8, 2, dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 8)
    # eval: no dropout at all, i.e. the output of a dropout-free module in training mode
    assert torch.equal(dropped.eval()(x), plain.train()(x))
    assert not torch.allclose(dropped.train()(x), plain.train()(x))  # training: dropout on


# ---------------------------------------------------------------- tokenizers (docs/MUTATION.md)
def test_mstok_config_defaults_are_mstok_b() -> None:
    # a bare MsTokConfig() is the paper's Base model: width 768, 12 blocks, memory from blocks 3, 6, 9, 12
    from mstok.tokenizers.mstok import MsTokConfig
    from mstok.tokenizers.registry import MEMORY_LAYERS

    config = MsTokConfig()
    assert (config.width, config.depth, config.num_heads) == (768, 12, 12)
    assert config.memory_layers == MEMORY_LAYERS["B"] == (3, 6, 9, 12)


# ---------------------------------------------------------------- losses and optimiser (docs/MUTATION.md)
def test_a_resume_with_changed_settings_applies_the_new_lr_at_the_restored_step() -> None:
    from torch import nn

    from mstok.training.optim import build_optimizer, build_scheduler, load_optimizer_state

    model = nn.Linear(4, 4)
    opt = build_optimizer(model, 1e-3, 0.01)
    sched = build_scheduler(opt, 100, 10, 1e-3, 1e-4)
    for _ in range(30):
        opt.step()
        sched.step()
    fresh_opt = build_optimizer(model, 4e-3, 0.01)  # the resumed run asks for a new peak lr
    fresh_sched = build_scheduler(fresh_opt, 100, 10, 4e-3, 1e-4)
    load_optimizer_state(fresh_opt, fresh_sched, opt.state_dict(), sched.state_dict(), keep_settings=True)
    rule = fresh_sched.lr_lambdas[0]  # the schedule's factor at a step
    for group in fresh_opt.param_groups:
        assert group["lr"] == pytest.approx(4e-3 * rule(30)) and group["lr"] != pytest.approx(4e-3 / rule(30))
    assert fresh_sched.get_last_lr() == [g["lr"] for g in fresh_opt.param_groups]


def test_the_discriminator_sees_mid_grey_as_zero() -> None:
    # images in [0, 1] enter the PatchGAN as [-1, 1]: mid-grey is the zero input
    from mstok.losses.gan import PatchDiscriminator

    torch.manual_seed(0)
    d = PatchDiscriminator().eval()
    grey = torch.full((1, 3, 32, 32), 0.5)
    assert torch.equal(d(grey), d.layers(torch.zeros_like(grey)))
    assert torch.equal(d(torch.ones_like(grey)), d.layers(torch.ones_like(grey)))


def test_the_objective_defaults_and_its_checks() -> None:
    import torch.nn.functional as F

    from mstok.losses import TokenizerLoss
    from mstok.tokenizers.contract import TokenizerOutput

    with pytest.raises(ValueError, match="needs an LPIPS module"):
        TokenizerLoss(perceptual_weight=0.5)  # any positive weight, not only > 1
    loss = TokenizerLoss(l1_weight=0, mse_weight=0, quantizer_weight=0, proxy_ce_weight=1)  # default smoothing: none
    logits = torch.randn(2, 4, 8).bfloat16()
    codes = torch.randint(0, 8, (2, 4))
    zero = torch.zeros(())
    out = TokenizerOutput(None, logits, None, torch.zeros(2, 4, 3), zero, zero, zero)
    _, terms = loss(out, torch.rand(2, 3, 8, 8), codes)
    reference = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())  # in float32, unsmoothed
    assert terms["proxy_ce"].dtype == torch.float32 and torch.allclose(terms["proxy_ce"], reference)


# ---------------------------------------------------------------- evaluation (docs/MUTATION.md)
def test_feature_statistics_of_a_single_vector() -> None:
    from mstok.evaluation.fid import FeatureStats

    stats = FeatureStats(dim=3)
    with pytest.raises(ValueError, match="no features"):
        _ = stats.mu
    stats.update(torch.tensor([[1.0, 2.0, 3.0]]))
    assert stats.mu.tolist() == [1.0, 2.0, 3.0]  # one vector is a mean, not an error


def test_evaluation_timing_and_grid(tmp_path) -> None:
    import time

    from PIL import Image

    from mstok.data import InMemoryImages, center_crop_transform
    from mstok.demo import TRAIN_PHOTOS, skimage_photos
    from mstok.evaluation.evaluate import evaluate_reconstruction
    from mstok.tokenizers import create_tokenizer

    model = create_tokenizer("titok_tiny", width=32, depth=1, num_heads=2, patch_size=16).eval()
    model.decode = lambda tokens: torch.zeros(tokens.shape[0], 3, 64, 64)  # black reconstructions
    data = InMemoryImages(skimage_photos(TRAIN_PHOTOS[:2]), center_crop_transform(64))
    started = time.perf_counter()
    results = evaluate_reconstruction(model, data, batch_size=2, out_dir=tmp_path, progress=False)
    assert 0 <= results["seconds"] <= time.perf_counter() - started  # a duration, not a clock reading
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("L"), dtype=float)
    top, bottom = grid[: grid.shape[0] // 2], grid[grid.shape[0] // 2 :]
    assert top.mean() > bottom.mean() + 20  # originals above, the black reconstructions below


# ---------------------------------------------------------------- training engine (docs/MUTATION.md)
def test_the_log_closes_each_epoch_once(tmp_path) -> None:
    import json

    from mstok.data import InMemoryImages, RandomResizedCropFlip
    from mstok.demo import TRAIN_PHOTOS, skimage_photos
    from mstok.training import Trainer, load_train_config

    settings = ["steps=5", "batch_size=4", f"out_dir='{tmp_path}'", "data.num_workers=0", "log_every=1"]
    settings += ["ckpt_every=5", "tensorboard=false", "val_every=0", "model.preset='titok_tiny'"]
    settings += ["model.overrides.width=32", "model.overrides.depth=1", "model.overrides.num_heads=2"]
    data = InMemoryImages(skimage_photos(TRAIN_PHOTOS), RandomResizedCropFlip(64, scale=(0.2, 0.5)))  # 6 images
    Trainer(load_train_config(None, settings), data, progress=False).fit()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    epochs = [(r["epoch"], r["step"]) for r in rows if "epoch" in r]
    # 20 images seen of 6: epochs 0, 1 and 2 end, at the steps that cross 6, 12 and 18 images
    assert epochs == [(0, 2), (1, 3), (2, 5)]


def test_the_discriminator_step_gets_detached_reconstructions(tmp_path, monkeypatch) -> None:
    from mstok.data import InMemoryImages, RandomResizedCropFlip
    from mstok.demo import TRAIN_PHOTOS, skimage_photos
    from mstok.training import Trainer, load_train_config

    settings = ["steps=2", "batch_size=2", f"out_dir='{tmp_path}'", "data.num_workers=0", "val_every=0"]
    settings += ["tensorboard=false", "model.preset='titok_tiny'", "model.overrides.width=32"]
    settings += ["model.overrides.depth=1", "model.overrides.num_heads=2", "loss.gan_weight=0.1"]
    settings += ["loss.gan_start_step=0", "discriminator.base_channels=8"]
    data = InMemoryImages(skimage_photos(TRAIN_PHOTOS[:2]), RandomResizedCropFlip(64, scale=(0.2, 0.5)))
    trainer = Trainer(load_train_config(None, settings), data, progress=False)
    seen = []
    real_step = trainer.discriminator_step

    def spy(reals, fakes):
        seen.extend(f.requires_grad for f in fakes)
        return real_step(reals, fakes)

    monkeypatch.setattr(trainer, "discriminator_step", spy)
    trainer.fit()
    assert seen and not any(seen)  # no graph back into the tokenizer from the discriminator's loss
