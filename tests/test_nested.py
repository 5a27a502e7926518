"""Nested tokens: any prefix decodes (TiTok, MsTok, SemTok), nested dropout in training, and the
length chosen per image (encode_adaptive)."""

from __future__ import annotations

import math

import pytest
import torch

from mstok.data import InMemoryImages, RandomResizedCropFlip
from mstok.demo import TRAIN_PHOTOS, skimage_photos
from mstok.tokenizers import create_tokenizer
from mstok.tokenizers.nested import image_psnr, prefix_choices, prefix_lengths
from mstok.training import Trainer, load_train_config

FAMILIES = ("titok_tiny", "mstok_tiny", "semtok_tiny")
K = 32


def _options(name: str) -> dict:
    """decode() options: SemTok's tiny preset is a flow decoder (one seeded Euler step keeps it fast)."""
    return {"steps": 1, "seed": 0} if name == "semtok_tiny" else {}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=FAMILIES)
def nested(request) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    return request.param, create_tokenizer(request.param, nested=True).eval()


def test_every_prefix_encodes_and_decodes(nested, images) -> None:
    name, model = nested
    tokens = model.encode(images)
    assert tokens.shape == (2, K) and model.decoder.tail_token.shape == (1, model.config.code_dim)
    for k in range(1, K + 1):
        prefix = model.encode(images, num_tokens=k)
        assert prefix.shape == (2, k) and torch.equal(prefix, tokens[:, :k])
        assert model.decode(prefix, **_options(name)).shape == (2, 3, 64, 64)


def test_a_prefix_decodes_as_the_full_sequence_with_the_tail_masked(nested, images) -> None:
    name, model = nested
    tokens = model.encode(images)
    options = _options(name)
    for k in (1, 7, K):
        prefix = model.decode(tokens[:, :k], **options)
        # ids past a row's length are ignored, whatever they hold (here: other ids)
        assert torch.equal(prefix, model.decode(tokens, lengths=torch.full((2,), k), **options))
        if name != "semtok_tiny":  # by hand: the code slots past k hold the tail token
            codes = model.quantizer.indices_to_codes(tokens).clone()
            codes[:, k:] = model.decoder.tail_token
            assert torch.allclose(prefix, model.decode_codes(codes).clamp(0, 1), atol=1e-6)
    # ragged rows: each decodes as its own prefix
    ragged = model.decode(tokens, lengths=torch.tensor([3, 20]), **options)
    for row, k in ((0, 3), (1, 20)):
        alone = model.decode(tokens[row : row + 1, :k], **options)
        assert torch.allclose(ragged[row : row + 1], alone, atol=1e-5)


def test_gradients_reach_the_tail_token_only_when_a_tail_is_dropped(images) -> None:
    model = create_tokenizer("mstok_tiny", nested=True).train()
    model(images, lengths=torch.tensor([K, K])).reconstruction.square().mean().backward()
    assert model.decoder.tail_token.grad is None or not model.decoder.tail_token.grad.any()
    model.zero_grad()
    model(images, lengths=torch.tensor([2, K])).reconstruction.square().mean().backward()
    assert model.decoder.tail_token.grad.abs().sum() > 0


def test_semtok_forward_drops_the_tail_in_both_decoder_modes(images) -> None:
    for mode in ("flow", "refine"):
        model = create_tokenizer("semtok_tiny", nested=True, decoder_mode=mode).train()
        with torch.no_grad():  # adaLN-Zero starts the decoder's output at zero, which passes no gradient back
            for param in model.decoder.parameters():
                param.add_(0.02 * torch.randn_like(param))
        out = model(images, lengths=torch.tensor([1, 4]))
        loss = out.reconstruction if mode == "refine" else out.flow_prediction
        loss.square().mean().backward()
        assert model.decoder.tail_token.grad.abs().sum() > 0, mode


def test_the_config_field_is_saved_only_when_on_and_round_trips(tmp_path, images) -> None:
    assert "nested" not in create_tokenizer("mstok_tiny").config.to_dict()  # older files unchanged
    model = create_tokenizer("titok_tiny", nested=True).eval()
    from mstok.persistence import load_tokenizer

    loaded = load_tokenizer(model.save_pretrained(tmp_path / "m"))
    assert loaded.config.nested and torch.equal(loaded.decoder.tail_token, model.decoder.tail_token)
    tokens = model.encode(images)
    assert torch.equal(loaded.decode(tokens[:, :5]), model.decode(tokens[:, :5]))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, x, t: m.encode(x, num_tokens=0), r"num_tokens must be an integer in 1\.\.32 \(the model's K\).*0"),
        (lambda m, x, t: m.encode(x, num_tokens=33), r"num_tokens must be an integer in 1\.\.32.*got 33"),
        (lambda m, x, t: m.encode(x, num_tokens=2.0), r"num_tokens must be an integer in 1\.\.32.*got 2\.0"),
        (lambda m, x, t: m.encode(x, num_tokens=True), r"num_tokens must be an integer.*got True"),
        (lambda m, x, t: m.decode(t[:, :0]), r"a prefix \(B, k\) with k in 1\.\.32, got shape \(2, 0\)"),
        (lambda m, x, t: m.decode(torch.zeros(2, 33, dtype=torch.long)), r"k in 1\.\.32, got shape \(2, 33\)"),
        (lambda m, x, t: m.decode(t[:, :4], lengths=torch.tensor([5, 1])), r"lengths must be in 1\.\.4.*\[1, 5\]"),
        (lambda m, x, t: m.decode(t, lengths=torch.tensor([0, 1])), r"lengths must be in 1\.\.32.*\[0, 1\]"),
        (lambda m, x, t: m.decode(t, lengths=torch.tensor([1.0, 2.0])), r"lengths must be an integer tensor"),
        (lambda m, x, t: m.decode(t, lengths=torch.tensor([1])), r"lengths must have shape \(2,\)"),
        (lambda m, x, t: m.encode_adaptive(x, math.nan), r"min_psnr must be a number of dB"),
        (lambda m, x, t: m.encode_adaptive(x, 20.0, max_tokens=40), r"max_tokens must be an integer in 1\.\.32"),
        (lambda m, x, t: m.encode_adaptive(x, 20.0, 8, [4, 16]), r"candidates must be lengths in 1\.\.8"),
    ],
)
def test_bad_prefix_requests_say_what_is_allowed(images, call, match) -> None:
    model = create_tokenizer("mstok_tiny", nested=True).eval()
    with pytest.raises(ValueError, match=match):
        call(model, images, model.encode(images))


def test_a_model_without_nested_tokens_refuses_prefixes_and_says_how_to_get_them(images) -> None:
    model = create_tokenizer("titok_tiny").eval()
    tokens = model.encode(images)
    why = r"trained without nested tokens \(config\.nested = false\).*\[nested\] section"
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, 32\), got \(2, 8\): .*" + why):
        model.decode(tokens[:, :8])
    for call in (
        lambda: model.encode(images, num_tokens=8),
        lambda: model.decode(tokens, lengths=torch.full((2,), 8)),
        lambda: model(images, lengths=torch.full((2,), 8)),
        lambda: model.encode_adaptive(images, 20.0),
    ):
        with pytest.raises(ValueError, match=why):
            call()
    assert model.encode(images, num_tokens=K).shape == (2, K)  # all K is always fine
    with pytest.raises(ValueError, match=r"HieraTok's prefixes are its scales: decode\(tokens, scales=n\)"):
        create_tokenizer("hieratok_tiny", nested=True)
    with pytest.raises(ValueError, match=r"a conv autoencoder's tokens are a 2D grid"):
        create_tokenizer("convae_tiny", nested=True)


def test_prefix_length_distributions() -> None:
    assert prefix_choices("pow2", 32) == [1, 2, 4, 8, 16, 32]
    assert prefix_choices("pow2", 24, min_tokens=3) == [4, 8, 16, 24]  # K itself when not a power of two
    assert prefix_choices("uniform", 5, min_tokens=2) == [2, 3, 4, 5]
    drawn = prefix_lengths("uniform", 8, 4000, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == set(range(1, 9)) and abs(drawn.float().mean().item() - 4.5) < 0.1
    generator = torch.Generator().manual_seed(0)
    half = prefix_lengths("pow2", 32, 4000, generator, full_fraction=0.5)  # half keep all 32, the rest pow2
    share_full = (half == 32).double().mean().item()
    assert abs(share_full - (0.5 + 0.5 / 6)) < 0.03 and set(half.tolist()) == {1, 2, 4, 8, 16, 32}
    assert (prefix_lengths("uniform", 8, 50, full_fraction=1.0) == 8).all()
    with pytest.raises(ValueError, match=r"full_fraction must be in \[0, 1\], got 1.5"):
        prefix_lengths("pow2", 8, 4, full_fraction=1.5)
    with pytest.raises(ValueError, match="unknown prefix distribution 'linear'"):
        prefix_choices("linear", 8)
    with pytest.raises(ValueError, match=r"min_tokens must be an integer in 1\.\.8"):
        prefix_choices("uniform", 8, min_tokens=9)


def _trainer(tmp_path, photos, *extra) -> Trainer:
    config = load_train_config(
        None,
        ["model.preset='mstok_tiny'", "steps=40", "batch_size=8", f"out_dir='{tmp_path}'", "data.num_workers=0",
         "tensorboard=false", "ckpt_every=40", "log_every=10", "optim.lr=2e-3", "optim.end_lr=2e-4",
         "optim.warmup_steps=5", "optim.betas=[0.9, 0.95]", *extra],
    )  # fmt: skip
    return Trainer(config, dataset=InMemoryImages(photos, RandomResizedCropFlip(64, (0.05, 0.3))), progress=False)


@pytest.fixture(scope="module")
def photos():
    return skimage_photos(TRAIN_PHOTOS[:2])


def test_nested_dropout_draws_seeded_lengths_per_slot(tmp_path, photos) -> None:
    trainer = _trainer(tmp_path / "a", photos, "nested.distribution='pow2'", "grad_accum=2")
    assert trainer.model.config.nested  # the run builds its model with the tail token
    first = torch.cat([trainer.prefix_lengths(0, 4), trainer.prefix_lengths(1, 4)])
    assert set(first.tolist()) <= {1, 2, 4, 8, 16, 32} and len(set(first.tolist())) > 1  # varies within a step
    trainer.step = 1
    assert not torch.equal(first, torch.cat([trainer.prefix_lengths(0, 4), trainer.prefix_lengths(1, 4)]))
    same = _trainer(tmp_path / "b", photos, "nested.distribution='pow2'")  # one micro-batch of 8: the same slots
    assert torch.equal(same.prefix_lengths(0, 8), first)
    other = _trainer(tmp_path / "c", photos, "nested.distribution='pow2'", "seed=1")
    assert not torch.equal(other.prefix_lengths(0, 8), first)
    full = _trainer(tmp_path / "d", photos, "nested.distribution='pow2'", "nested.full_fraction=1.0")
    assert (full.prefix_lengths(0, 8) == 32).all()  # every image keeps all K


@pytest.mark.slow  # ~30 s: three short runs
def test_a_resumed_nested_run_is_bit_identical(tmp_path, photos) -> None:
    """The lengths come from (seed, step): a run stopped after step 2 and resumed to 4 ends as a straight run."""
    settings = ("nested.distribution='uniform'", "steps=4", "ckpt_every=2", "batch_size=4", "log_every=1")
    straight = _trainer(tmp_path / "a", photos, *settings)
    straight.fit()
    first = _trainer(tmp_path / "b", photos, *settings)
    first.config.steps = 2  # "killed" after step 2
    first.fit()
    resumed = _trainer(tmp_path / "b", photos, *settings)
    assert resumed.resume("auto").name == "step_0000002"
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in straight.history[2:]] == [h["loss"] for h in resumed.history]


def test_a_nested_model_trained_without_nested_dropout_keeps_its_tail_token(tmp_path, photos) -> None:
    """No prefix dropped, no gradient for the tail token: it stays out of the optimizer (DDP would refuse it)."""
    trainer = _trainer(tmp_path, photos, "model.overrides.nested=true", "steps=1")
    before = trainer.model.decoder.tail_token.detach().clone()
    trainer.fit()
    assert not trainer.model.decoder.tail_token.requires_grad
    assert torch.equal(trainer.model.decoder.tail_token, before)


def test_nested_config_errors(tmp_path) -> None:
    base = ["model.preset='mstok_tiny'", f"out_dir='{tmp_path}'"]
    with pytest.raises(ValueError, match=r"nested\.distribution.*'none', 'uniform', 'pow2'"):
        load_train_config(None, [*base, "nested.distribution='linear'"])
    with pytest.raises(ValueError, match=r"nested\.min_tokens must be at most K = 32, got 40"):
        load_train_config(None, [*base, "nested.distribution='uniform'", "nested.min_tokens=40"])
    with pytest.raises(ValueError, match=r"model\.overrides\.nested must be true or left out: .*trains nested tokens"):
        load_train_config(None, [*base, "nested.distribution='uniform'", "model.overrides.nested=false"])
    with pytest.raises(ValueError, match=r"nested\.distribution: .*HieraTok's prefixes are its scales"):
        load_train_config(None, [*base, "model.preset='hieratok_tiny'", "nested.distribution='uniform'"])


def _prefix_mse(model: torch.nn.Module, images: torch.Tensor, k: int) -> float:
    model.eval()
    with torch.no_grad():
        return float((model.decode(model.encode(images, num_tokens=k)) - images).square().mean())


@pytest.mark.slow  # ~75 s on a busy 2-core machine: 41 training steps
def test_training_with_nested_dropout_lowers_the_short_prefix_loss(tmp_path, photos) -> None:
    """A few dozen steps on photo crops: the 2- and 8-token prefixes reconstruct better than at the start,
    and the run started from a model without nested tokens (init_from: the tail token starts new)."""
    plain = _trainer(tmp_path / "plain", photos, "steps=1", "ckpt_every=1")
    plain.fit()
    trainer = _trainer(tmp_path / "nested", photos, "nested.distribution='pow2'", f"model.init_from='{tmp_path}/plain'")
    crops = InMemoryImages(photos, RandomResizedCropFlip(64, (0.05, 0.3)))
    images = torch.stack([crops[(i % 2, 100 + i)][0] for i in range(8)])
    before = {k: _prefix_mse(trainer.model, images, k) for k in (2, 8)}
    trainer.fit()
    after = {k: _prefix_mse(trainer.model, images, k) for k in (2, 8)}
    assert all(after[k] < 0.8 * before[k] for k in before), (before, after)
    assert trainer.model.decoder.tail_token.grad is not None


def test_encode_adaptive_picks_the_shortest_prefix_that_reaches_the_target(images) -> None:
    torch.manual_seed(0)
    model = create_tokenizer("mstok_tiny", nested=True).eval()
    tokens = model.encode(images)
    scores = torch.stack([image_psnr(images, model.decode(tokens[:, :k])) for k in range(1, K + 1)], 1)  # (B, K)
    target = float(scores.median())
    chosen = model.encode_adaptive(images, target)
    for row in range(2):
        reached = (scores[row] >= target).nonzero()
        expected = int(reached[0]) + 1 if len(reached) else K
        assert int(chosen.lengths[row]) == expected
        assert chosen.psnr[row] == pytest.approx(float(scores[row, expected - 1]))
    assert chosen.ids.shape == (2, int(chosen.lengths.max()))
    for row in range(2):  # the ids are the prefix, zero after it; decoding them gives the PSNR reported
        n = int(chosen.lengths[row])
        assert torch.equal(chosen.ids[row, :n], tokens[row, :n]) and not chosen.ids[row, n:].any()
    recon = model.decode(chosen.ids, lengths=chosen.lengths)
    assert torch.allclose(image_psnr(images, recon), chosen.psnr)
    assert model.encode_adaptive(images, -math.inf).lengths.tolist() == [1, 1]
    capped = model.encode_adaptive(images, math.inf, max_tokens=8, candidates=[2, 4])
    assert capped.lengths.tolist() == [8, 8] and capped.ids.shape == (2, 8)


def test_nested_grid_latents_start_coarse_to_fine() -> None:
    """With latent_init='grid', a nested model's latent k starts at a cell of a coarse-to-fine order, so the
    first tokens start spread over the image (a raster order would give its top rows)."""
    from mstok.layers.embeddings import latent_grid, spread_order

    cells = latent_grid(K, 8)
    order = spread_order(cells)
    assert sorted(order.tolist()) == list(range(K))
    quadrants = {(r >= 3.5, c >= 3.5) for r, c in cells[order[:4]].tolist()}
    assert len(quadrants) == 4  # the first four cells lie in the four quadrants
    plain = create_tokenizer("mstok_tiny").config.latent_init_table()
    nested = create_tokenizer("mstok_tiny", nested=True).config.latent_init_table()
    assert torch.equal(nested, plain[order])
