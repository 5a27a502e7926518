"""The MaskGIT generator: schedules, sampler, guidance, model variants, loss and save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mstok.generators import (
    MASK_SCHEDULES,
    GeneratorConfig,
    MaskGITGenerator,
    SamplingConfig,
    create_generator,
    guidance_weight,
    guided_logits,
    mask_ratio,
    masked_counts,
    sample,
)
from mstok.layers.blocks import SelfAttentionBlock
from mstok.losses import MaskedTokenLoss, mask_tokens
from mstok.persistence import load_generator
from mstok.tokenizers import create_tokenizer

SMALL = {"width": 32, "depth": 2, "num_heads": 2, "num_tokens": 16, "codebook_size": 64, "num_classes": 5}


def small(architecture: str = "vit", **kw) -> MaskGITGenerator:
    torch.manual_seed(0)
    extra = {"qkv_bias": False} if architecture == "uvit" else {}
    return MaskGITGenerator(GeneratorConfig(**{**SMALL, "architecture": architecture, "dropout": 0.0, **extra, **kw}))


# ----------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", list(MASK_SCHEDULES))
def test_mask_schedules_go_from_all_to_none_and_decrease(name: str) -> None:
    r = torch.linspace(0, 1, 101, dtype=torch.float64)
    gamma = mask_ratio(r, name)
    assert gamma[0].item() == pytest.approx(1.0) and gamma[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert (gamma[1:] <= gamma[:-1] + 1e-12).all()


@pytest.mark.parametrize("name", list(MASK_SCHEDULES))
@pytest.mark.parametrize(("k", "steps"), [(32, 8), (64, 12), (128, 64), (5, 8)])
def test_masked_counts_follow_the_schedule(name: str, k: int, steps: int) -> None:
    counts = masked_counts(k, steps, name)
    assert len(counts) == steps and counts[-1] == 0
    previous = k
    for t, c in enumerate(counts[:-1]):
        assert c <= previous  # never re-masks more than before
        assert c >= 1  # something stays masked until the last step
        # the paper's gamma written out here (not the implementation's mask_ratio), then clamped
        gamma = {
            "cosine": math.cos(math.pi / 2 * (t + 1) / steps),
            "arccos": math.acos((t + 1) / steps) * 2 / math.pi,
            "linear": 1 - (t + 1) / steps,
            "sqrt": 1 - math.sqrt((t + 1) / steps),
        }[name]
        assert c == max(1, min(previous - 1, math.floor(k * gamma)))
        if previous > 1:
            assert c < previous  # at least one token revealed per step while possible
        previous = c


def test_guidance_weight_schedules() -> None:
    assert guidance_weight(3.0, 5, 8, "constant") == 3.0
    assert guidance_weight(3.0, 0, 8, "linear") == 0.0 and guidance_weight(3.0, 4, 8, "linear") == 1.5
    assert guidance_weight(3.0, 0, 8, "power_cosine") == 0.0
    assert guidance_weight(3.0, 4, 8, "power_cosine", power=1.0) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="guidance schedule"):
        guidance_weight(1.0, 0, 8, "cubic")
    official = SamplingConfig.official_titok(9.5, 4.5, "power-cosine")
    assert official.guidance_scale == 3.5 and official.guidance_schedule == "power_cosine"
    assert official.anneal_temperature and official.confidence == "logit" and official.choice_temperature == 9.5


# ----------------------------------------------------------------- model
@pytest.mark.parametrize("variant", ["vit", "uvit", "bert"])
def test_forward_shapes_and_every_parameter_gets_a_gradient(variant: str) -> None:
    model = small("vit", norm_first=False, embed_norm=True, norm_eps=1e-12) if variant == "bert" else small(variant)
    tokens = torch.randint(0, 65, (3, 16))
    labels = torch.tensor([0, 4, 5])  # 5 = null class
    logits = model(tokens, labels)
    assert logits.shape == (3, 16, 64)
    logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_post_norm_block_matches_a_plain_reference() -> None:
    torch.manual_seed(0)
    block = SelfAttentionBlock(16, 2, norm_first=False, norm_eps=1e-12).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    q, k, v = block.attn.qkv(x).chunk(3, dim=-1)
    heads = [slice(0, 8), slice(8, 16)]
    outs = [torch.softmax(q[..., h] @ k[..., h].transpose(1, 2) / math.sqrt(8), -1) @ v[..., h] for h in heads]
    y = F.layer_norm(x + block.attn.proj(torch.cat(outs, -1)), (16,), block.norm1.weight, block.norm1.bias, 1e-12)
    mlp = block.mlp.fc2(F.gelu(block.mlp.fc1(y)))
    expected = F.layer_norm(y + mlp, (16,), block.norm2.weight, block.norm2.bias, 1e-12)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


def test_uvit_fuses_the_matching_skip() -> None:
    model = small("uvit", depth=4).double().eval()
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.tensor([1, 2])
    x = F.embedding(torch.cat([labels[:, None] + 65, tokens], 1), model.token_embed) + model.pos_embed
    a = model.in_blocks[0](x)
    b = model.in_blocks[1](a)
    m = model.mid_block(b)
    c = model.out_blocks[0](model.skips[0](torch.cat([m, b], -1)))  # innermost skip first
    d = model.out_blocks[1](model.skips[1](torch.cat([c, a], -1)))
    expected = model.head(model.norm(d))[:, 1:]
    torch.testing.assert_close(model(tokens, labels), expected)


def test_bad_inputs_get_clear_errors() -> None:
    model = small()
    with pytest.raises(ValueError, match="tokens must be integer ids of shape"):
        model(torch.zeros(2, 15, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        model(torch.zeros(2, 16, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\)"):
        sample(model, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="integer class ids"):
        sample(model, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="masking schedule"):
        SamplingConfig(schedule="cubic")
    with pytest.raises(ValueError, match="architecture"):
        GeneratorConfig(architecture="mamba")


def test_save_load_round_trip(tmp_path) -> None:
    model = small("uvit")
    model.save_pretrained(tmp_path / "gen")
    loaded = load_generator(tmp_path / "gen")
    tokens, labels = torch.randint(0, 65, (2, 16)), torch.tensor([0, 3])
    torch.testing.assert_close(loaded(tokens, labels), model.eval()(tokens, labels), rtol=0, atol=0)
    create_tokenizer("titok_tiny").save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="not a generator"):
        load_generator(tmp_path / "tok")


def test_presets_match_the_papers_sizes() -> None:
    with torch.device("meta"):
        vit = create_generator("maskgit_vit", num_tokens=64, codebook_size=4096, num_classes=1000)
    assert round(vit.parameter_counts()["total"] / 1e6) == 177  # MaskGIT-ViT, ~177M
    with pytest.raises(ValueError, match="unknown generator preset"):
        create_generator("maskgit_vitt")


# ----------------------------------------------------------------- sampling
def test_sampling_reveals_per_schedule_and_never_changes_revealed_tokens() -> None:
    model = small()
    config = SamplingConfig(steps=6, schedule="cosine")
    ids, history = sample(model, torch.arange(4) % 5, config, torch.Generator().manual_seed(0), return_history=True)
    expected = [15, 13, 11, 8, 4, 0]  # floor(16 cos(pi/2 (t+1)/6)), hand-evaluated (test_sampling_reference.py)
    for step, state in enumerate(history):
        assert ((state == 64).sum(1) == expected[step]).all()
        if step:
            before = history[step - 1]
            fixed = before != 64
            assert torch.equal(state[fixed], before[fixed])  # revealed tokens are final
    assert torch.equal(history[-1], ids) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 64


def test_sampling_is_reproducible_with_a_seed() -> None:
    model = small()
    labels = torch.tensor([0, 1, 2, 3])
    config = SamplingConfig(guidance_scale=2.0, guidance_schedule="linear")
    a = sample(model, labels, config, torch.Generator().manual_seed(7))
    b = sample(model, labels, config, torch.Generator().manual_seed(7))
    c = sample(model, labels, config, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_formula_and_its_neutral_scale() -> None:
    model = small().eval()
    tokens, labels = torch.randint(0, 65, (3, 16)), torch.tensor([0, 1, 2])
    with torch.no_grad():
        cond, uncond = model(tokens, labels), model(tokens, torch.full_like(labels, 5))
        torch.testing.assert_close(guided_logits(model, tokens, labels, 2.5), cond + 2.5 * (cond - uncond))
        assert torch.equal(guided_logits(model, tokens, labels, 0.0), cond)  # w = 0: plain conditional

    calls = []
    model.register_forward_hook(lambda _m, args, _out: calls.append(args[1].clone()))
    sample(model, labels, SamplingConfig(steps=4), torch.Generator().manual_seed(0))
    assert len(calls) == 4 and all((c < 5).all() for c in calls)  # no unconditional pass at w = 0
    calls.clear()
    sample(model, labels, SamplingConfig(steps=4, guidance_scale=1.0), torch.Generator().manual_seed(0))
    assert all(len(c) == 6 and (c[3:] == 5).all() for c in calls)  # one batched cond + null pass


def test_guidance_has_no_effect_when_the_class_carries_no_information() -> None:
    model = small().double()
    with torch.no_grad():
        model.token_embed[65:] = model.token_embed[65]  # every class and the null class alike
    labels = torch.tensor([0, 1, 2, 3])
    plain = sample(model, labels, SamplingConfig(), torch.Generator().manual_seed(3))
    guided = sample(model, labels, SamplingConfig(guidance_scale=4.0), torch.Generator().manual_seed(3))
    assert torch.equal(plain, guided)


def test_zero_temperatures_make_sampling_deterministic_and_greedy() -> None:
    model = small()
    config = SamplingConfig(temperature=0.0, choice_temperature=0.0, steps=1)
    ids = sample(model, torch.tensor([1, 2]), config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        greedy = model(torch.full((2, 16), 64), torch.tensor([1, 2])).argmax(-1)
    assert torch.equal(ids, greedy)


# ----------------------------------------------------------------- training objective
def test_mask_tokens_masks_a_schedule_fraction() -> None:
    tokens = torch.randint(0, 64, (512, 16))
    masked, mask = mask_tokens(tokens, 64, "arccos", torch.Generator().manual_seed(0))
    assert torch.equal(masked[mask], torch.full((int(mask.sum()),), 64))
    assert torch.equal(masked[~mask], tokens[~mask])
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 16
    # E[arccos(r) / (pi/2)] over r ~ U(0,1) is 2/pi
    assert abs(counts.float().mean().item() / 16 - 2 / math.pi) < 0.05


def test_masked_loss_matches_a_hand_computation() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 4, 6), torch.randint(0, 6, (2, 4))
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    loss, terms = MaskedTokenLoss(label_smoothing=0.2, unmasked_weight=0.1)(logits, targets, mask)
    logp = logits.log_softmax(-1)
    smooth = 0.8 * F.one_hot(targets, 6) + 0.2 / 6
    ce = -(smooth * logp).sum(-1)
    w = mask.float() + 0.1 * (~mask).float()
    torch.testing.assert_close(loss, (ce * w).sum() / w.sum())
    plain = -logp.gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(terms["masked_ce"], plain[mask].mean())
    assert terms["accuracy"] == (logits.argmax(-1) == targets)[mask].float().mean()


def test_masked_tokens_are_a_function_of_the_sample_seed() -> None:
    from mstok.losses import MaskedTokens

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, key):
            return torch.arange(16) + key[0], key[0]

    data = MaskedTokens(Rows(), mask_id=64, schedule="arccos", class_dropout=0.5, null_class=5)
    (stacked, label), (again, label_again) = data[(2, 11)], data[(2, 11)]
    assert torch.equal(stacked, again) and label == label_again
    masked, mask, target = stacked
    assert torch.equal(target, torch.arange(16) + 2)
    assert torch.equal(masked, torch.where(mask.bool(), 64, target)) and mask.sum() >= 1
    draws = [data[(0, seed)] for seed in range(400)]
    dropped = sum(label == 5 for _, label in draws) / 400
    assert 0.4 < dropped < 0.6  # class dropout 0.5
    fraction = sum(int(s[1].sum()) for s, _ in draws) / (400 * 16)
    assert abs(fraction - 2 / math.pi) < 0.04  # arccos schedule: E[gamma(r)] = 2/pi
