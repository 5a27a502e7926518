"""Tests for mutants that survived tools/mutate.py (docs/MUTATION.md): each pins a behaviour that a
plausible one-line bug changed without any other test noticing. Inputs are chosen so that the
mutant and the original disagree (e.g. a mean count other than 1, a count of exactly 1)."""

from __future__ import annotations

import math

import pytest
import torch

from mstok.evaluation.metrics import codebook_usage, mean_colour
from mstok.quantizers import VectorQuantizer


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
