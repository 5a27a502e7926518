"""Time and peak memory of the LFQ/BSQ entropy loss: grouped vs exact vs a naive full codebook.

The entropy objective E[H(q(z))] - H(E[q(z)]) needs the batch-mean distribution over 2^C codes.
The naive version (what vector-quantize-pytorch's LFQ does) builds the (N, 2^C) soft
assignment with a softmax over every code; mstok's (``mstok.quantizers.binary``) computes the
per-sample term in closed form per bit and the codebook term exactly in chunks (C <= 16) or
over groups of at most 9 bits (C > 16). Each row runs forward + backward of the entropy loss of
N = ``--tokens`` latents of BSQ (the LFQ loss is the same computation with another scale) in a
fresh subprocess, so its peak memory is its own: the row's number is the growth of the
process's peak resident memory over the baseline after the inputs were made (CPU), or
``torch.cuda.max_memory_allocated`` (CUDA). The naive version runs only up to C = 18, where its
(N, 2^C) tensors still fit.

    OMP_NUM_THREADS=1 python benchmarks/quantizer_entropy.py            # prints, writes its section of RESULTS.md
    python benchmarks/quantizer_entropy.py --tokens 1024 --no-write

Prints a markdown table and writes its section of ``--out`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness

ROWS = [  # (method, C)
    ("naive", 10),
    ("exact", 10),
    ("naive", 14),
    ("exact", 14),
    ("naive", 18),
    ("grouped", 18),
    ("grouped", 32),
]


def naive_entropy(z, tau: float = 1.0):
    """Per-sample and codebook entropy from the full (N, 2^C) soft assignment of BSQ."""
    import torch
    import torch.nn.functional as F

    c = z.shape[-1]
    u = F.normalize(z.reshape(-1, c), dim=-1)
    ids = torch.arange(2**c, device=z.device)
    codes = (((ids[:, None] >> torch.arange(c, device=z.device)) & 1).float() * 2 - 1) / math.sqrt(c)  # (2^C, C)
    probs = torch.softmax(tau * u @ codes.t(), dim=-1)  # q(c|u) = prod_d sigmoid(2 tau c_d u_d)
    per_sample = -torch.special.xlogy(probs, probs).sum(-1).mean()
    mean = probs.mean(0)
    return per_sample, -torch.special.xlogy(mean, mean.clamp_min(1e-30)).sum()


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_row(method: str, c: int, tokens: int, repeats: int, device: str) -> dict:
    """One row, in this process: seconds (median of ``repeats``) and peak bytes of fwd + bwd."""
    import torch

    from mstok.quantizers import BinarySphericalQuantizer

    torch.manual_seed(0)
    z = torch.randn(tokens, c, device=device, requires_grad=True)
    q = BinarySphericalQuantizer(c)
    if method == "grouped":
        q.exact_max_bits = 16  # C > 16 -> groups of <= 9 bits
    elif method == "exact":
        q.exact_max_bits = 62
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_bytes(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        per_sample, codebook = naive_entropy(z) if method == "naive" else q.entropy_terms(z)
        (per_sample - codebook).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        z.grad = None
    return {"seconds": statistics.median(times), "peak_mib": (_peak_bytes(device) - base) / 2**20,
            "value": float((per_sample - codebook).detach())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="latents N (batch x tokens per image)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    harness.add_output_arguments(parser)
    parser.add_argument("--row", nargs=2, help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(args.row[0], int(args.row[1]), args.tokens, args.repeats, args.device)))
        return 0
    head = ["method", "C", "codebook", "N", "seconds (fwd+bwd)", "peak MiB", "loss"]
    rows = []
    failed = False
    for method, c in ROWS:
        cmd = [sys.executable, __file__, "--row", method, str(c), "--tokens", str(args.tokens),
               "--repeats", str(args.repeats), "--device", args.device]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            failed = True
            rows.append([method, str(c), f"2^{c}", str(args.tokens), f"failed: {done.stderr.strip()[-80:]}", "", ""])
        else:
            r = json.loads(done.stdout.strip().splitlines()[-1])
            numbers = [f"{r['seconds']:.4f}", f"{r['peak_mib']:.1f}", f"{r['value']:.4f}"]
            rows.append([method, str(c), f"2^{c}", str(args.tokens), *numbers])
        print(harness.table_line(rows[-1]), flush=True)
    table = harness.markdown_table(head, rows)
    print(table)
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    command = f"OMP_NUM_THREADS={threads} {harness.command_line(__file__, argv)}"
    notes = [f"Device {args.device}; peak = growth of the process's peak memory during the row."]
    title = "Entropy loss of LFQ/BSQ: grouped vs exact vs naive"
    harness.publish(args, "quantizer_entropy", title, __file__, argv, [table], notes, args.device, command=command)
    return 1 if failed else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
