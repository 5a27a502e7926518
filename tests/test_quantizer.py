"""VectorQuantizer: nearest-code search and losses against brute force, straight-through
gradients, float32 under autocast, id -> code lookup and usage statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mstok.quantizers import VectorQuantizer

V, C = 16, 4


def _quantizer(use_l2_norm: bool, codebook_size: int = V, code_dim: int = C) -> VectorQuantizer:
    q = VectorQuantizer(codebook_size, code_dim, use_l2_norm=use_l2_norm)
    with torch.no_grad():
        # Codes of very different norms, so cosine and Euclidean search disagree.
        q.embedding.weight.mul_(torch.rand(codebook_size, 1) * 3 + 0.1)
    return q


def _brute_force(z: torch.Tensor, codebook: torch.Tensor, use_l2_norm: bool):
    """Loop over every vector and every code in float64 -> (indices, chosen codes, z used)."""
    z, codebook = z.double(), codebook.double()
    if use_l2_norm:
        z = z / z.norm(dim=-1, keepdim=True)
        codebook = codebook / codebook.norm(dim=-1, keepdim=True)
    b, k, _ = z.shape
    indices = torch.empty(b, k, dtype=torch.long)
    for i in range(b):
        for j in range(k):
            if use_l2_norm:  # cosine similarity: largest dot product of unit vectors
                scores = [float(z[i, j] @ codebook[v]) for v in range(codebook.shape[0])]
                indices[i, j] = max(range(len(scores)), key=scores.__getitem__)
            else:
                dists = [float(((z[i, j] - codebook[v]) ** 2).sum()) for v in range(codebook.shape[0])]
                indices[i, j] = min(range(len(dists)), key=dists.__getitem__)
    return indices, codebook[indices], z


@pytest.mark.parametrize("use_l2_norm", [True, False])
def test_forward_matches_brute_force(use_l2_norm: bool) -> None:
    q = _quantizer(use_l2_norm)
    z = torch.randn(3, 7, C) * 2
    out = q(z)
    indices, chosen, zz = _brute_force(z, q.embedding.weight.detach(), use_l2_norm)
    assert out.indices.dtype == torch.long
    assert out.indices.shape == (3, 7)
    assert torch.equal(out.indices, indices)
    assert_close(out.codes.double(), chosen, rtol=1e-5, atol=1e-6)
    n = zz.numel()
    commitment = 0.25 * sum(float(d) ** 2 for d in (zz - chosen).flatten()) / n
    codebook = sum(float(d) ** 2 for d in (chosen - zz).flatten()) / n
    assert out.commitment_loss.dim() == 0
    assert out.commitment_loss.item() == pytest.approx(commitment, rel=1e-5)
    assert out.codebook_loss.item() == pytest.approx(codebook, rel=1e-5)
    assert out.loss.item() == pytest.approx(commitment + codebook, rel=1e-5)


def test_cosine_and_euclidean_search_differ() -> None:
    z = torch.tensor([[[1.0, 0.0]]])
    codes = torch.tensor([[10.0, 1.0], [0.5, -0.5]])  # far but well aligned / near but at 45 degrees
    for use_l2_norm, expected in ((True, 0), (False, 1)):
        q = VectorQuantizer(2, 2, use_l2_norm=use_l2_norm)
        with torch.no_grad():
            q.embedding.weight.copy_(codes)
        assert q(z).indices.item() == expected


def test_commitment_weight_is_used() -> None:
    q = _quantizer(False)
    q.commitment_weight = 1.0
    z = torch.randn(2, 5, C)
    out = q(z)
    assert_close(out.commitment_loss, out.codebook_loss)


# ------------------------------------------------------------------ gradients
def test_straight_through_identity_without_l2() -> None:
    q = _quantizer(False)
    z = torch.randn(2, 6, C, requires_grad=True)
    w = torch.randn(2, 6, C)
    (q(z).codes * w).sum().backward()
    assert torch.equal(z.grad, w)
    assert q.embedding.weight.grad is None  # the codes' value path carries no gradient to the codebook


def test_straight_through_through_normalize_with_l2() -> None:
    q = _quantizer(True)
    z = torch.randn(2, 6, C, requires_grad=True)
    w = torch.randn(2, 6, C)
    (q(z).codes * w).sum().backward()
    (expected,) = torch.autograd.grad((F.normalize(z, dim=-1) * w).sum(), z)
    assert_close(z.grad, expected)
    assert q.embedding.weight.grad is None


def test_codebook_loss_moves_only_the_codebook() -> None:
    q = _quantizer(False)
    z = torch.randn(2, 6, C, requires_grad=True)
    out = q(z)
    out.codebook_loss.backward()
    assert z.grad is None
    # d/dE_v mean((E[idx] - z)^2) = 2 / numel * sum_{positions using v} (E_v - z)
    weight = q.embedding.weight.detach()
    expected = torch.zeros_like(weight)
    flat_idx, flat_z = out.indices.flatten(), z.detach().reshape(-1, C)
    for pos in range(flat_idx.numel()):
        v = flat_idx[pos]
        expected[v] += 2.0 / z.numel() * (weight[v] - flat_z[pos])
    assert_close(q.embedding.weight.grad, expected)
    unused = torch.ones(V, dtype=torch.bool)
    unused[flat_idx] = False
    assert torch.count_nonzero(q.embedding.weight.grad[unused]) == 0


def test_commitment_loss_moves_only_the_encoder() -> None:
    q = _quantizer(False)
    z = torch.randn(2, 6, C, requires_grad=True)
    out = q(z)
    out.commitment_loss.backward()
    assert q.embedding.weight.grad is None
    expected = 0.25 * 2.0 / z.numel() * (z.detach() - q.embedding.weight.detach()[out.indices])
    assert_close(z.grad, expected)


def test_total_loss_gradients_with_l2() -> None:
    q = _quantizer(True)
    z = torch.randn(2, 6, C, requires_grad=True)
    q(z).loss.backward()
    assert z.grad is not None and torch.count_nonzero(z.grad) > 0
    assert q.embedding.weight.grad is not None and torch.count_nonzero(q.embedding.weight.grad) > 0


# ------------------------------------------------------------------ autocast
def test_autocast_bfloat16_keeps_float32_and_indices() -> None:
    # Many codes and vectors: a bf16 distance matmul flips a few argmins here.
    q = VectorQuantizer(1024, 12)
    z = torch.randn(8, 64, 12)
    reference = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    for name in ("codes", "loss", "commitment_loss", "codebook_loss"):
        assert getattr(out, name).dtype == torch.float32, name
    assert torch.equal(out.indices, reference.indices)
    assert_close(out.codes, reference.codes)


def test_autocast_with_bfloat16_encoder_output() -> None:
    q = VectorQuantizer(1024, 12)
    encoder = torch.nn.Linear(32, 12)
    x = torch.randn(8, 64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = encoder(x)
        out = q(z)
    assert z.dtype == torch.bfloat16
    assert out.codes.dtype == torch.float32
    assert out.loss.dtype == torch.float32
    assert torch.equal(out.indices, q(z.float()).indices)


# ------------------------------------------------------------------ lookup and statistics
@pytest.mark.parametrize("use_l2_norm", [True, False])
def test_indices_to_codes_matches_forward(use_l2_norm: bool) -> None:
    q = _quantizer(use_l2_norm)
    z = torch.randn(3, 5, C)
    out = q(z)
    codes = q.indices_to_codes(out.indices)
    assert codes.shape == (3, 5, C)
    assert codes.dtype == torch.float32
    assert_close(codes, out.codes.detach(), rtol=1e-6, atol=1e-6)
    if use_l2_norm:
        assert_close(codes.norm(dim=-1), torch.ones(3, 5))
    else:
        assert torch.equal(codes, q.embedding.weight.detach()[out.indices])


def test_usage_statistics_uniform() -> None:
    q = VectorQuantizer(V, C)
    stats = q.usage_statistics(torch.arange(V).repeat(3).view(6, 8))
    assert stats["usage"] == pytest.approx(1.0)
    assert stats["perplexity"] == pytest.approx(V)


def test_usage_statistics_single_code() -> None:
    q = VectorQuantizer(V, C)
    stats = q.usage_statistics(torch.full((4, 8), 5))
    assert stats["usage"] == pytest.approx(1.0 / V)
    assert stats["perplexity"] == pytest.approx(1.0)


def test_usage_statistics_half_the_codes() -> None:
    q = VectorQuantizer(V, C)
    stats = q.usage_statistics(torch.arange(0, V, 2).repeat(5))
    assert stats["usage"] == pytest.approx(0.5)
    assert stats["perplexity"] == pytest.approx(V / 2)
    skewed = q.usage_statistics(torch.tensor([0, 0, 0, 1]))
    # entropy of (3/4, 1/4)
    assert skewed["perplexity"] == pytest.approx(
        float(torch.tensor([0.75, 0.25]).pow(-torch.tensor([0.75, 0.25])).prod())
    )


# ------------------------------------------------------------------ dead-code revival
def test_first_revival_seeds_the_codebook_from_latents() -> None:
    vq = VectorQuantizer(codebook_size=16, code_dim=4, use_l2_norm=True)
    out = vq(torch.randn(8, 4, 4))
    revived = vq.revive_dead_codes(out.latents, out.indices)
    # usage starts at zero: every code not picked in this batch is dead and moves onto a latent
    picked = set(out.indices.unique().tolist())
    assert revived == 16 - len(picked)
    latents = out.latents.reshape(-1, 4)
    for code in set(range(16)) - picked:
        distances = (latents - vq.embedding.weight[code]).norm(dim=1)
        assert distances.min().item() < 1e-6


def test_used_codes_survive_and_unused_codes_die_after_a_while() -> None:
    vq = VectorQuantizer(codebook_size=8, code_dim=3, use_l2_norm=False)
    latents = torch.randn(4, 2, 3)
    always = torch.zeros(4, 2, dtype=torch.long)  # only code 0 is ever used
    vq.usage_ema.fill_(1.0)  # pretend all codes were in use
    before = vq.embedding.weight.detach().clone()
    calls, revived = 0, 0
    while not revived and calls < 200:
        revived = vq.revive_dead_codes(latents, always, decay=0.9, threshold=0.01)
        calls += 1
    # 1.0 * 0.9**n < 0.01 * mean count (8 ids / 8 codes = 1) first holds at n = 44
    assert calls == 44 and revived == 7
    assert torch.equal(vq.embedding.weight[0], before[0])
    moved = vq.embedding.weight[1:]
    flat = latents.reshape(-1, 3)
    assert all((flat - row).norm(dim=1).min() < 1e-6 for row in moved)
