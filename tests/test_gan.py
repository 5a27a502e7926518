"""Adversarial loss: hinge and LeCam by hand, the PatchGAN discriminator, and the two GAN steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mstok.losses import AdversarialLoss, LeCamEMA, PatchDiscriminator, hinge_d_loss, hinge_g_loss, lecam_loss

REAL = [2.0, 0.5, -1.0]
FAKE = [-2.0, 0.0, 1.5]


def _small_adv(**kwargs: float) -> AdversarialLoss:
    return AdversarialLoss(base_channels=8, **kwargs)


def _relu(x: float) -> float:
    return max(x, 0.0)


# ----------------------------------------------------------------------------- hand computations
def test_hinge_losses_by_hand() -> None:
    real, fake = torch.tensor(REAL), torch.tensor(FAKE)
    expected_d = 0.5 * (sum(_relu(1 - r) for r in REAL) / len(REAL) + sum(_relu(1 + f) for f in FAKE) / len(FAKE))
    assert expected_d == pytest.approx(1.0)  # (0 + 0.5 + 2) / 3 and (0 + 1 + 2.5) / 3, halved
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected_d)
    assert hinge_g_loss(fake).item() == pytest.approx(-sum(FAKE) / len(FAKE))
    # a discriminator beyond both margins pays nothing
    assert hinge_d_loss(torch.tensor([1.5, 3.0]), torch.tensor([-1.0, -4.0])).item() == 0.0


def test_lecam_loss_by_hand() -> None:
    ema = LeCamEMA()
    real, fake = torch.tensor(REAL), torch.tensor(FAKE)
    assert lecam_loss(real, fake, ema).item() == 0.0  # no anchor before the first update
    ema.update(torch.tensor(0.3), torch.tensor(-0.2))
    expected = sum(_relu(r - -0.2) ** 2 for r in REAL) / 3 + sum(_relu(0.3 - f) ** 2 for f in FAKE) / 3
    assert lecam_loss(real, fake, ema).item() == pytest.approx(expected, rel=1e-6)
    # works on patch maps too: the mean runs over every logit
    maps = lecam_loss(real.view(1, 1, 1, 3), fake.view(1, 1, 3, 1), ema)
    assert maps.item() == pytest.approx(expected, rel=1e-6)


def test_lecam_ema_update_sequence() -> None:
    decay = 0.9
    ema = LeCamEMA(decay=decay)
    assert not bool(ema.initialized)
    observed = [(1.0, -1.0), (3.0, 0.0), (-2.0, 4.0), (0.5, 0.5)]
    want_real = want_fake = None
    for step, (r, f) in enumerate(observed):
        ema.update(torch.tensor(r), torch.tensor(f))
        if step == 0:  # the first update copies instead of blending with the zero buffers
            want_real, want_fake = r, f
        else:
            want_real = decay * want_real + (1 - decay) * r
            want_fake = decay * want_fake + (1 - decay) * f
        assert ema.ema_real.item() == pytest.approx(want_real, rel=1e-6)
        assert ema.ema_fake.item() == pytest.approx(want_fake, rel=1e-6)
    assert bool(ema.initialized)
    assert ema.ema_real.dtype == torch.float32 and ema.ema_real.dim() == 0


def test_lecam_ema_first_update_is_a_copy_even_with_heavy_decay() -> None:
    ema = LeCamEMA()  # decay 0.999: blending with zeros would give 0.005, not 5
    ema.update(torch.tensor(5.0, dtype=torch.float64), torch.tensor(-3.0))
    assert ema.ema_real.item() == pytest.approx(5.0)
    assert ema.ema_fake.item() == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="decay"):
        LeCamEMA(decay=1.0)


# ----------------------------------------------------------------------------- discriminator
@pytest.mark.parametrize(("size", "logits"), [(32, 2), (64, 6), (256, 30)])
def test_patch_logit_map_shape(size: int, logits: int) -> None:
    disc = PatchDiscriminator(base_channels=8)
    out = disc(torch.rand(2, 3, size, size))
    assert out.shape == (2, 1, logits, logits)
    assert torch.isfinite(out).all()


def test_default_discriminator_layout() -> None:
    disc = PatchDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    norms = [m for m in disc.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == 32 for n in norms)
    # init_weights: GroupNorm starts as identity affine, convs LeCun-normal with zero biases
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    assert all(torch.count_nonzero(n.bias) == 0 for n in norms)
    assert convs[0].weight.abs().max().item() <= 2 * (3 * 16) ** -0.5
    assert torch.count_nonzero(convs[0].bias) == 0
    # channels cap at 8x: a fifth layer stays at 512
    deep = PatchDiscriminator(base_channels=4, num_layers=5)
    assert [c.out_channels for c in deep.modules() if isinstance(c, nn.Conv2d)] == [4, 8, 16, 32, 32, 32, 1]


def test_logits_do_not_depend_on_batch_mates() -> None:
    disc = PatchDiscriminator(base_channels=8).train()
    batch = torch.rand(4, 3, 32, 32)
    alone = disc(batch[:1])
    with_others = disc(batch)[:1]
    with_other_others = disc(torch.cat([batch[:1], torch.zeros(3, 3, 32, 32)]))[:1]
    torch.testing.assert_close(alone, with_others, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, with_other_others, rtol=1e-5, atol=1e-5)


def test_discriminator_is_deterministic_under_a_seed() -> None:
    images = torch.rand(2, 3, 32, 32)
    torch.manual_seed(123)
    a = PatchDiscriminator(base_channels=8)
    torch.manual_seed(123)
    b = PatchDiscriminator(base_channels=8)
    torch.manual_seed(124)
    c = PatchDiscriminator(base_channels=8)
    assert torch.equal(a(images), b(images))
    assert not torch.allclose(a(images), c(images))


# ----------------------------------------------------------------------------- the two GAN steps
def test_discriminator_loss_terms_and_gradients() -> None:
    adv = _small_adv(lecam_weight=0.5)
    real = torch.rand(2, 3, 32, 32)
    fake = torch.rand(2, 3, 32, 32, requires_grad=True)
    adv.lecam_ema.update(torch.tensor(0.2), torch.tensor(-0.1))  # so the LeCam term is live
    loss, terms = adv.discriminator_loss(real, fake)
    assert set(terms) == {"d_loss", "d_hinge", "d_lecam", "logits_real", "logits_fake"}
    assert all(isinstance(t, torch.Tensor) and t.dim() == 0 and not t.requires_grad for t in terms.values())
    assert terms["d_lecam"].item() > 0
    assert loss.item() == pytest.approx(terms["d_hinge"].item() + 0.5 * terms["d_lecam"].item(), rel=1e-6)
    loss.backward()
    for name, p in adv.discriminator.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert fake.grad is None  # the tokenizer learns nothing from the discriminator's step


def test_only_update_ema_moves_the_lecam_anchor() -> None:
    adv = _small_adv()
    real, fake = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    _, terms = adv.discriminator_loss(real, fake)
    assert not bool(adv.lecam_ema.initialized) and adv.lecam_ema.ema_real.item() == 0.0
    assert terms["d_lecam"].item() == 0.0 and terms["d_loss"].item() == terms["d_hinge"].item()
    # the trainer averages the means over micro-batches and ranks and hands them back
    adv.update_ema(terms["logits_real"], terms["logits_fake"])
    assert adv.lecam_ema.ema_real.item() == pytest.approx(terms["logits_real"].item())
    _, terms2 = adv.discriminator_loss(real, fake)
    adv.update_ema(terms2["logits_real"], terms2["logits_fake"])
    # the regulariser of this step used the anchor handed in above, not this batch's means
    with torch.no_grad():
        real_logits, fake_logits = adv.discriminator(real), adv.discriminator(fake)
    expected = (F.relu(real_logits - terms["logits_fake"]) ** 2).mean() + (
        F.relu(terms["logits_real"] - fake_logits) ** 2
    ).mean()
    assert terms2["d_lecam"].item() == pytest.approx(expected.item(), rel=1e-5)
    d = adv.lecam_ema.decay
    assert adv.lecam_ema.ema_fake.item() == pytest.approx(
        d * terms["logits_fake"].item() + (1 - d) * terms2["logits_fake"].item(), rel=1e-5
    )


def test_generator_loss_reaches_the_fakes_but_not_the_discriminator() -> None:
    adv = _small_adv()
    real = torch.rand(2, 3, 32, 32)
    fake = torch.rand(2, 3, 32, 32, requires_grad=True)
    d_loss, _ = adv.discriminator_loss(real, fake)
    d_loss.backward()
    before = {n: p.grad.clone() for n, p in adv.discriminator.named_parameters()}

    g_loss, terms = adv.generator_loss(fake)
    assert set(terms) == {"g_loss", "logits_fake_g"}
    assert g_loss.item() == pytest.approx(-terms["logits_fake_g"].item())
    g_loss.backward()
    for name, p in adv.discriminator.named_parameters():
        assert torch.equal(p.grad, before[name]), name  # untouched, not merely zero-added
        assert p.requires_grad, name  # the flags are restored for the next discriminator step
    assert fake.grad is not None and fake.grad.abs().sum() > 0

    # the input gradient is the plain one: same as differentiating through a free copy of D
    reference = fake.detach().clone().requires_grad_(True)
    (-adv.discriminator(reference).mean()).backward()
    torch.testing.assert_close(fake.grad, reference.grad)


def test_generator_loss_on_a_fresh_discriminator_leaves_grad_none() -> None:
    adv = _small_adv()
    fake = torch.rand(1, 3, 32, 32, requires_grad=True)
    adv.generator_loss(fake)[0].backward()
    assert all(p.grad is None for p in adv.discriminator.parameters())
    assert fake.grad is not None


def test_losses_are_float32_under_autocast() -> None:
    adv = _small_adv()
    real, fake = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    ref, _ = adv.discriminator_loss(real, fake)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = adv.discriminator_loss(real.bfloat16(), fake.bfloat16())
        g_loss, _ = adv.generator_loss(fake.bfloat16())
    assert loss.dtype == g_loss.dtype == terms["logits_real"].dtype == torch.float32
    # bf16 inputs lose ~3 digits, but no layer ran in bf16 (that would be ~1e-2 off)
    assert loss.item() == pytest.approx(ref.item(), abs=5e-3)


def test_state_dict_round_trip_keeps_the_lecam_buffers() -> None:
    adv = _small_adv()
    real, fake = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    for _ in range(3):
        _, terms = adv.discriminator_loss(real, fake)
        adv.update_ema(terms["logits_real"], terms["logits_fake"])
    state = adv.state_dict()
    assert {"lecam_ema.ema_real", "lecam_ema.ema_fake", "lecam_ema.initialized"} <= set(state)
    torch.manual_seed(99)  # a different init, so equality below comes from the load
    restored = _small_adv()
    restored.load_state_dict(state)
    assert bool(restored.lecam_ema.initialized)
    assert torch.equal(restored.lecam_ema.ema_real, adv.lecam_ema.ema_real)
    assert torch.equal(restored.lecam_ema.ema_fake, adv.lecam_ema.ema_fake)
    a_loss, a_terms = adv.discriminator_loss(real, fake)
    b_loss, b_terms = restored.discriminator_loss(real, fake)
    assert torch.equal(a_loss, b_loss) and torch.equal(a_terms["d_lecam"], b_terms["d_lecam"])
    assert a_terms["d_lecam"].item() > 0  # the restored anchor is live, not reset


def test_discriminator_learns_smooth_images_from_noise() -> None:
    adv = _small_adv()
    opt = torch.optim.Adam(adv.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.99))
    losses = []
    for _ in range(20):
        real = F.interpolate(torch.rand(8, 3, 4, 4), size=32, mode="bilinear", align_corners=False)  # (8, 3, 32, 32)
        fake = torch.rand(8, 3, 32, 32)
        loss, terms = adv.discriminator_loss(real, fake)
        opt.zero_grad()
        loss.backward()
        opt.step()
        adv.update_ema(terms["logits_real"], terms["logits_fake"])
        losses.append(terms["d_loss"].item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
    assert terms["logits_real"].item() > terms["logits_fake"].item()
