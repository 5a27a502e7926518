"""MaskGIT sampling pinned by references written here, not by the implementation's own expressions.

The masking schedules follow the MaskGIT paper (Chang et al. 2022, eq. 1 and Fig. 3) and TiTok's
arccos choice: after step t of S (0-based), ``floor(K * gamma((t + 1) / S))`` tokens stay masked,
with at least one token revealed per step and all revealed at the last. The confidence of a new
token is, by default, its log-probability under the (guided) distribution.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mstok.generators import GeneratorConfig, MaskGITGenerator, SamplingConfig, mask_ratio, masked_counts, sample

# gamma(r) from the papers, in numpy: independent of mstok.generators.schedules.
GAMMA = {
    "cosine": lambda r: np.cos(np.pi / 2 * r),
    "arccos": lambda r: np.arccos(r) / (np.pi / 2),
    "linear": lambda r: 1.0 - r,
    "sqrt": lambda r: 1.0 - np.sqrt(r),
}


def reference_counts(k: int, steps: int, name: str) -> list[int]:
    """Masked tokens after each step: the paper's floor(K gamma), at least one revealed and one kept
    masked per step, none masked after the last step."""
    out, masked = [], k
    for t in range(steps):
        target = 0 if t == steps - 1 else int(np.floor(k * GAMMA[name]((t + 1) / steps)))
        if t < steps - 1:
            if target >= masked:  # the schedule would reveal nothing: reveal one anyway
                target = masked - 1
            if target < 1:  # keep one masked until the last step
                target = 1
        masked = target
        out.append(masked)
    return out


# Hand-evaluated tables (gamma values to 4 digits in the comments), pinned literally.
PINNED = {
    # cos(pi/2 r) at r = 1/6 .. 5/6: .9659 .8660 .7071 .5000 .2588 -> x16, floored
    ("cosine", 16, 6): [15, 13, 11, 8, 4, 0],
    # arccos(r) / (pi/2) at r = 1/8 .. 7/8: .9202 .8391 .7551 .6667 .5719 .4681 .3218 -> x32, floored
    ("arccos", 32, 8): [29, 26, 24, 21, 18, 14, 10, 0],
    # 1 - r at r = .25 .5 .75 -> x10: 7.5 5 2.5
    ("linear", 10, 4): [7, 5, 2, 0],
    # 1 - sqrt(r) at r = 1/4 .. 3/4: .5 .2929 .1340 -> x8: 4 2.34 1.07
    ("sqrt", 8, 4): [4, 2, 1, 0],
    # K = 5 over 8 steps: the schedule would reveal nothing at some steps; one per step is forced
    ("cosine", 5, 8): [4, 3, 2, 1, 1, 1, 1, 0],
}


@pytest.mark.parametrize(("name", "k", "steps"), list(PINNED))
def test_masked_counts_pinned_tables(name: str, k: int, steps: int) -> None:
    assert masked_counts(k, steps, name) == PINNED[(name, k, steps)]
    assert reference_counts(k, steps, name) == PINNED[(name, k, steps)]


@pytest.mark.parametrize("name", list(GAMMA))
@pytest.mark.parametrize(("k", "steps"), [(32, 8), (64, 12), (128, 64), (256, 8), (3, 5)])
def test_masked_counts_match_the_paper_formula(name: str, k: int, steps: int) -> None:
    assert masked_counts(k, steps, name) == reference_counts(k, steps, name)


@pytest.mark.parametrize("name", list(GAMMA))
def test_mask_ratio_values(name: str) -> None:
    r = np.array([0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
    got = mask_ratio(torch.from_numpy(r), name).numpy()
    np.testing.assert_allclose(got, GAMMA[name](r), rtol=0, atol=1e-12)
    assert mask_ratio(0.5, "arccos").item() == pytest.approx(2 / 3, abs=1e-12)  # arccos(1/2) = pi/3
    assert mask_ratio(0.5, "cosine").item() == pytest.approx(math.sqrt(0.5), abs=1e-12)


# ----------------------------------------------------------------------------- confidence
K, V = 6, 8
# Fixed logits per slot (the stub model ignores its input). Slot 0 has the largest winning logit
# but a near tie (low probability); slot 1 a small winning logit but a clear winner. Raw-logit and
# log-probability confidences therefore rank them in opposite orders.
LOGITS = torch.full((K, V), -4.0)
LOGITS[0, :2] = torch.tensor([9.0, 8.9])
LOGITS[1, 3] = 2.0
LOGITS[2, 5] = 1.0
LOGITS[3, [1, 2, 6]] = torch.tensor([3.0, 2.5, 2.4])
LOGITS[4, 7] = 0.5
LOGITS[5, [0, 4]] = torch.tensor([6.0, 5.0])


def _stub_generator() -> MaskGITGenerator:
    torch.manual_seed(0)
    cfg = GeneratorConfig(width=16, depth=1, num_heads=2, num_tokens=K, codebook_size=V, num_classes=3, dropout=0.0)
    model = MaskGITGenerator(cfg)
    model.forward = lambda tokens, labels: LOGITS.expand(tokens.shape[0], K, V).clone()  # type: ignore[method-assign]
    return model


def _reference_history(confidence: np.ndarray, counts: list[int]) -> list[set[int]]:
    """Greedy MaskGIT with constant logits: after step t the counts[t] least confident slots stay masked."""
    order = np.argsort(confidence, kind="stable")  # least confident first
    return [set(order[:c].tolist()) for c in counts]


@pytest.mark.parametrize("confidence", ["log_prob", "logit"])
def test_greedy_sampling_remasks_the_least_confident(confidence: str) -> None:
    model = _stub_generator()
    config = SamplingConfig(steps=4, schedule="linear", temperature=0.0, choice_temperature=0.0, confidence=confidence)
    ids, history = sample(model, torch.tensor([0, 2]), config, torch.Generator().manual_seed(0), return_history=True)
    x = LOGITS.double().numpy()
    drawn = x.argmax(1)
    winner = x.max(1)
    log_prob = winner - np.log(np.exp(x).sum(1))
    score = log_prob if confidence == "log_prob" else winner
    expected = _reference_history(score, [4, 3, 1, 0])  # linear, K=6, S=4: floor(6 * (1 - r)) = 4, 3, 1
    mask_id = model.config.mask_id
    for step, state in enumerate(history):
        for row in state:
            assert {i for i in range(K) if row[i] == mask_id} == expected[step], (confidence, step)
    assert (ids == torch.from_numpy(drawn)).all()


def test_default_confidence_is_the_log_probability() -> None:
    assert SamplingConfig().confidence == "log_prob"
    model = _stub_generator()
    greedy = {"steps": 4, "schedule": "linear", "temperature": 0.0, "choice_temperature": 0.0}
    _, default = sample(model, torch.tensor([1]), SamplingConfig(**greedy), return_history=True)
    _, logit = sample(model, torch.tensor([1]), SamplingConfig(**greedy, confidence="logit"), return_history=True)
    _, log_prob = sample(model, torch.tensor([1]), SamplingConfig(**greedy, confidence="log_prob"), return_history=True)
    assert all(torch.equal(a, b) for a, b in zip(default, log_prob, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(default, logit, strict=True))
    # Slot 0 (near tie, large logit) stays masked longer than slot 1 under log-probabilities.
    mask_id = model.config.mask_id
    assert default[0][0, 0] == mask_id and default[0][0, 1] != mask_id


def test_sampling_defaults() -> None:
    config = SamplingConfig()
    assert (config.steps, config.schedule, config.temperature, config.choice_temperature) == (8, "arccos", 1.0, 4.5)
    assert config.guidance_scale == 0.0 and not config.anneal_temperature and not config.softmax_annealing
