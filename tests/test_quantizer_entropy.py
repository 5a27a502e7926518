"""Entropies beyond one process and one small codebook: the LFQ/BSQ entropy loss under DDP, the
benchmark's naive full-codebook version, and codebook usage statistics up to 2^32 codes.

DDP: two gloo processes on the CPU, each with half of a batch, against one process with all of
it. The benchmark (benchmarks/quantizer_entropy.py) is checked to compute the same numbers as
the quantizers, so its table compares like with like.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from mstok.quantizers import BinarySphericalQuantizer, FiniteScalarQuantizer, Quantizer, build_quantizer

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "quantizer_entropy.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("_bench_quantizer_entropy", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_naive_entropy_equals_the_quantizer() -> None:
    bench = _benchmark()
    z = torch.randn(40, 6)
    naive = bench.naive_entropy(z)
    ours = BinarySphericalQuantizer(6, inverse_temperature=1.0).entropy_terms(z)  # the benchmark's tau
    for a, b in zip(naive, ours, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    row = bench.run_row("grouped", 32, tokens=16, repeats=1, device="cpu")
    assert math.isfinite(row["value"]) and row["seconds"] > 0 and row["peak_mib"] >= 0


def test_per_position_codebook_entropy_is_the_mean_of_each_positions_exact_entropy() -> None:
    bench = _benchmark()
    z = torch.randn(12, 3, 6)  # (B, K, C)
    per_sample, codebook = BinarySphericalQuantizer(6, inverse_temperature=1.0).entropy_terms(z)
    naive = [bench.naive_entropy(z[:, k]) for k in range(3)]  # each position's own batch
    torch.testing.assert_close(codebook, torch.stack([c for _, c in naive]).mean(), rtol=1e-5, atol=1e-6)
    flat = BinarySphericalQuantizer(6, inverse_temperature=1.0, entropy_per_position=False)
    torch.testing.assert_close(per_sample, flat.entropy_terms(z)[0])
    # grouped bits (above exact_max_bits) follow the same rule per position
    grouped = BinarySphericalQuantizer(6, exact_max_bits=4, group_bits=3)
    wide = BinarySphericalQuantizer(6, exact_max_bits=4, group_bits=3, entropy_per_position=False)
    each = [wide.entropy_terms(z[:, k])[1] for k in range(3)]
    torch.testing.assert_close(grouped.entropy_terms(z)[1], torch.stack(each).mean())
    # (N, C) latents have no position axis: one position, the batch-wide entropy
    torch.testing.assert_close(grouped.entropy_terms(z[:, 0])[1], each[0])
    with pytest.raises(ValueError, match=r"per-position entropy needs \(B, K, C\) logits"):
        grouped.entropy_terms(z[None])


def test_position_constant_codes_score_high_batch_wide_but_zero_per_position() -> None:
    # what a 1D tokenizer's learnt queries do when the codes ignore the image: token k always
    # emits code k. Over the whole batch that looks diverse (log K nats); per position it is 0.
    sharp = 50.0 * torch.where(torch.rand(8, 6) > 0.5, 1.0, -1.0)  # (K, C) one sure code per position
    z = sharp.expand(16, 8, 6)  # (B, K, C): every image the same
    lfq = {"type": "lfq", "inverse_temperature": 1.0, "layer_norm": False}
    _, wide = build_quantizer({**lfq, "entropy_per_position": False}, 6).entropy_terms(z)
    _, per_position = build_quantizer(lfq, 6).entropy_terms(z)  # the default
    distinct = len({tuple(row.tolist()) for row in sharp})
    assert wide.item() == pytest.approx(math.log(distinct), abs=1e-4)
    assert per_position.item() == pytest.approx(0.0, abs=1e-4)


DDP_CASES = [("lfq", {"inverse_temperature": 0.5}), ("bsq", {}), ("bsq", {"exact_max_bits": 4, "group_bits": 3})]


def _ddp_quantizer(case: int) -> Quantizer:
    kind, extra = DDP_CASES[case]
    return build_quantizer({"type": kind, "entropy_weight": 1.0, **extra}, 6).train()


def _ddp_worker(rank: int, world: int, port: int, z: torch.Tensor, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for case in range(len(DDP_CASES)):
            q = _ddp_quantizer(case)
            part = z.chunk(world)[rank].clone().requires_grad_(True)
            loss = q(part).losses["entropy"]
            loss.backward()
            results.put((rank, case, float(loss.detach()), part.grad.numpy()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_entropy_equals_one_process_on_the_whole_batch() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    z = torch.randn(4, 6, 6)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, port, z, results), nprocs=2, start_method="spawn")
    got = [results.get(timeout=60) for _ in range(2 * len(DDP_CASES))]
    assert sorted((rank, case) for rank, case, _, _ in got) == [(r, c) for r in range(2) for c in range(3)]
    for rank, case, _, grad in got:
        whole = z.clone().requires_grad_(True)
        want = _ddp_quantizer(case)(whole).losses["entropy"]
        want.backward()
        # the per-sample term is each rank's own mean, the codebook term the global one: the mean
        # over ranks (what DDP optimises) is the one-process loss
        ranks_mean = sum(loss for _, c, loss, _ in got if c == case) / 2
        assert ranks_mean == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
        # a rank's gradient is the one-process gradient times the world size (DDP then divides by it)
        torch.testing.assert_close(torch.from_numpy(grad) / 2, whole.grad.chunk(2)[rank], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- usage statistics


def test_usage_is_exact_for_small_codebooks() -> None:
    q = build_quantizer({"type": "fsq", "levels": [8, 5, 5, 5]}, 4)
    stats = q.usage(torch.tensor([[0, 0, 1, 2]]))
    assert stats["method"] == "counts" and stats["usage"] == pytest.approx(3 / 1000)
    probs = torch.tensor([0.5, 0.25, 0.25])
    assert stats["perplexity"] == pytest.approx(float((-(probs * probs.log()).sum()).exp()))


def test_usage_of_a_2_to_the_32_codebook_never_builds_a_v_sized_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    q = BinarySphericalQuantizer(32)
    ids = q(torch.randn(4, 64, 32)).indices
    for fn in ("zeros", "ones", "empty", "full", "arange"):
        real = getattr(torch, fn)

        def guarded(*args, _real=real, _fn=fn, **kwargs):
            size = args[0] if (args and not isinstance(args[0], (int, float))) or _fn == "arange" else args
            numel = math.prod(size) if isinstance(size, (tuple, list, torch.Size)) else 0
            assert numel <= 2**20 and not (_fn == "arange" and args and float(args[-1]) > 2**20), f"{_fn}{args}"
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, fn, guarded)
    stats = q.usage(ids)
    assert stats["method"] == "bits" and stats["distinct_ids"] == 256.0  # random 32-bit ids do not collide
    assert stats["bit_usage"] == 1.0 and 2**25 < stats["perplexity_bits"] <= 2**32 + 1
    assert stats["batch_perplexity"] == pytest.approx(256.0) and stats["usage"] == 256 / 2**32
    huge_fsq = FiniteScalarQuantizer([3] * 30)  # 3^30 codes, not a power of two: hashed
    hashed = huge_fsq.usage(huge_fsq(torch.randn(2, 50, 30)).indices)
    assert hashed["method"] == "hashed" and 1 < hashed["perplexity_hashed"] <= 100


def test_entropy_warm_start_counts_the_entropy_term_boost_times_then_once() -> None:
    from mstok.losses import TokenizerLoss
    from mstok.tokenizers.contract import TokenizerOutput

    torch.manual_seed(0)
    quant = build_quantizer({"type": "bsq"}, code_dim=6)
    quant.train()
    out = quant(torch.randn(4, 8, 6))
    assert "entropy" in out.losses
    output = TokenizerOutput.from_quantizer(out, reconstruction=torch.rand(4, 3, 8, 8))
    images = torch.rand(4, 3, 8, 8)
    plain = TokenizerLoss()
    warm = TokenizerLoss(entropy_boost=5.0, entropy_boost_steps=100)
    entropy = out.losses["entropy"]
    base, _ = plain(output, images)
    for step, factor in ((0, 5.0), (50, 3.0), (100, 1.0), (1000, 1.0)):
        assert warm.entropy_factor(step) == pytest.approx(factor)
        total, terms = warm(output, images, step=step)
        torch.testing.assert_close(total, base + (factor - 1.0) * entropy)
        torch.testing.assert_close(terms["entropy"], entropy.detach())  # logged as the quantizer weighted it
    # a warm start reaches the latents' gradient through the entropy term only
    z = torch.randn(4, 8, 6, requires_grad=True)
    q = quant(z)
    loss, _ = warm(TokenizerOutput.from_quantizer(q, reconstruction=images.clone()), images, step=0)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="entropy_boost must be >= 1"):
        TokenizerLoss(entropy_boost=0.5)
