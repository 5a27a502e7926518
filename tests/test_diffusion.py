"""The diffusion objectives: DDPM/DDIM and rectified flow against hand-written equations,
classifier-free guidance, a toy 2-D distribution learned with the flow loss, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mstok.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    RectifiedFlow,
    classifier_free_guidance,
    create_diffusion,
)


def linear_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A fixed "network" that reads all three inputs: 0.3 x + t / 1000 + 0.1 y."""
    view = (-1,) + (1,) * (x.dim() - 1)
    return 0.3 * x + (t / 1000).view(view) + 0.1 * y.to(x.dtype).view(view)


class Recorder:
    """Wraps a model and records every call's (batch size, times, labels)."""

    def __init__(self, model=linear_model) -> None:
        self.model, self.calls = model, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.float32 and t.shape == y.shape == (x.shape[0],)
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        return self.model(x, t, y)


def labels(b: int, value: int = 1) -> torch.Tensor:
    return torch.full((b,), value, dtype=torch.long)


# ----------------------------------------------------------------- DDPM: schedule and loss
def test_ddpm_schedule_is_the_hand_computed_linear_product() -> None:
    t, b0, b1 = 7, 0.05, 0.3
    d = GaussianDiffusion(t, b0, b1)
    product = 1.0
    for i in range(t):
        beta = b0 + (b1 - b0) * i / (t - 1)
        product *= 1.0 - beta
        assert d.betas[i].item() == pytest.approx(beta, abs=1e-15)
        assert d.alphas_cumprod[i].item() == pytest.approx(product, rel=1e-12)
    default = GaussianDiffusion()
    assert default.betas[0].item() == pytest.approx(1e-4) and default.betas[-1].item() == pytest.approx(0.02)
    expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert default.alphas_cumprod[-1].item() == pytest.approx(expected, rel=1e-9)


def test_q_sample_is_the_closed_form() -> None:
    d = GaussianDiffusion()
    x0, noise = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64)
    i = torch.tensor([0, 500, 999])
    out = d.q_sample(x0, i, noise)
    for row, step in enumerate(i.tolist()):
        abar = math.prod(1 - (1e-4 + (0.02 - 1e-4) * j / 999) for j in range(step + 1))
        expected = math.sqrt(abar) * x0[row] + math.sqrt(1 - abar) * noise[row]
        torch.testing.assert_close(out[row], expected)


def test_ddpm_loss_is_the_hand_computation() -> None:
    d = GaussianDiffusion(50, 1e-3, 0.05)
    x0, y = torch.randn(6, 5, 3), torch.arange(6)
    model = Recorder()
    loss, terms = d.loss(model, x0, y, generator=torch.Generator().manual_seed(3))
    # the documented draw order: steps first, then the noise
    g = torch.Generator().manual_seed(3)
    i = torch.randint(0, 50, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = d.alphas_cumprod[i].float()[:, None, None]
    x_i = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    pred = 0.3 * x_i + i.float()[:, None, None] / 1000 + 0.1 * y.float()[:, None, None]
    expected = ((pred - eps) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["mse"].item() == terms["loss"].item() == loss.item()
    assert torch.equal(model.calls[0][1], i.float())  # model time = step index
    same, _ = d.loss(model, x0, y, generator=torch.Generator().manual_seed(3))
    assert same.item() == loss.item()


def test_diffusion_losses_reach_every_parameter() -> None:
    net = nn.Linear(3, 3)
    for objective in (GaussianDiffusion(), RectifiedFlow()):
        net.zero_grad()
        loss, _ = objective.loss(lambda x, t, y: net(x) + t[:, None, None] * 0, torch.randn(4, 2, 3), labels(4))
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# ----------------------------------------------------------------- DDPM: samplers
def test_ddpm_step_is_ho_et_al_algorithm_2() -> None:
    d = GaussianDiffusion()
    x, eps, z = (torch.randn(8, dtype=torch.float64) for _ in range(3))
    abar = d.alphas_cumprod.tolist()
    # a full-schedule step, written in the eps form of the paper
    t = 500
    beta, alpha = d.betas[t].item(), 1 - d.betas[t].item()
    tilde = (1 - abar[t - 1]) / (1 - abar[t]) * beta
    expected = (x - beta / math.sqrt(1 - abar[t]) * eps) / math.sqrt(alpha) + math.sqrt(tilde) * z
    torch.testing.assert_close(d.ddpm_step(x, eps, t, t - 1, noise=z), expected)
    # a respaced step from 600 to 400: the same form on beta' = 1 - abar_600 / abar_400
    beta = 1 - abar[600] / abar[400]
    tilde = (1 - abar[400]) / (1 - abar[600]) * beta
    expected = (x - beta / math.sqrt(1 - abar[600]) * eps) / math.sqrt(1 - beta) + math.sqrt(tilde) * z
    torch.testing.assert_close(d.ddpm_step(x, eps, 600, 400, noise=z), expected)
    # the last step returns x0_hat and ignores the noise
    x0_hat = (x - math.sqrt(1 - abar[20]) * eps) / math.sqrt(abar[20])
    torch.testing.assert_close(d.ddpm_step(x, eps, 20, -1, noise=z), x0_hat)


def test_ddim_step_is_song_et_al_eq_12() -> None:
    d = GaussianDiffusion()
    x, eps, z = (torch.randn(8, dtype=torch.float64) for _ in range(3))
    abar_t, abar_p = d.alphas_cumprod[700].item(), d.alphas_cumprod[300].item()
    x0_hat = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    for eta in (0.0, 0.5):
        sigma = eta * math.sqrt((1 - abar_p) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_p)
        expected = math.sqrt(abar_p) * x0_hat + math.sqrt(1 - abar_p - sigma**2) * eps + sigma * z
        torch.testing.assert_close(d.ddim_step(x, eps, 700, 300, eta=eta, noise=z), expected)
    # eta = 1 is the ancestral step
    torch.testing.assert_close(d.ddim_step(x, eps, 700, 300, eta=1.0, noise=z), d.ddpm_step(x, eps, 700, 300, noise=z))


def test_ddpm_sampler_is_the_hand_loop_with_the_same_draws() -> None:
    d = GaussianDiffusion(20, 1e-3, 0.2)
    noise, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    out = d.sample(linear_model, noise, y, steps=5, generator=torch.Generator().manual_seed(1))
    g, x = torch.Generator().manual_seed(1), noise.clone()
    abar = d.alphas_cumprod.tolist()
    taus = [0, 5, 10, 14, 19]  # floor(k * 19 / 4 + 1/2)
    for k in range(4, -1, -1):
        t, p = taus[k], taus[k - 1] if k else -1
        eps = 0.3 * x + t / 1000 + 0.1 * y.double()[:, None]
        a_p = abar[p] if p >= 0 else 1.0
        beta = 1 - abar[t] / a_p
        x = (x - beta / math.sqrt(1 - abar[t]) * eps) / math.sqrt(1 - beta)
        if p >= 0:
            x = x + math.sqrt((1 - a_p) / (1 - abar[t]) * beta) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    torch.testing.assert_close(out, x)


def test_respaced_timesteps_span_the_schedule_and_the_sampler_visits_them_downwards() -> None:
    d = GaussianDiffusion()
    taus = d.timesteps(50)
    assert taus.tolist() == [math.floor(k * 999 / 49 + 0.5) for k in range(50)]
    assert taus[0] == 0 and taus[-1] == 999 and (taus.diff() > 0).all()
    assert d.timesteps().tolist() == list(range(1000)) == d.timesteps(1000).tolist()
    assert d.timesteps(1).tolist() == [999]
    model = Recorder()
    d.sample(model, torch.randn(2, 3), labels(2), steps=50, sampler="ddim")
    assert [c[1][0].item() for c in model.calls] == taus.flip(0).float().tolist()


def test_ddim_eta_0_is_deterministic_and_ddpm_is_not() -> None:
    d = GaussianDiffusion()
    noise, y = torch.randn(4, 3, 2), labels(4)

    def run(sampler: str, seed: int, progress: bool = False) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return d.sample(linear_model, noise, y, steps=10, sampler=sampler, generator=generator, progress=progress)

    assert torch.equal(run("ddim", 0), run("ddim", 1))
    assert not torch.allclose(run("ddpm", 0), run("ddpm", 1))
    assert torch.equal(run("ddpm", 2), run("ddpm", 2))
    assert torch.equal(run("ddpm", 2), run("ddpm", 2, progress=True))  # the bar changes nothing
    # a shape instead of the noise: the start comes from the generator too
    a = d.sample(linear_model, (4, 3, 2), y, steps=3, generator=torch.Generator().manual_seed(5))
    b = d.sample(linear_model, (4, 3, 2), y, steps=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (4, 3, 2)


@pytest.mark.parametrize("steps", [1, 7, 1000])
def test_ddim_with_the_exact_noise_of_a_point_recovers_it(steps: int) -> None:
    d, c = GaussianDiffusion(), torch.tensor([1.5, -0.5], dtype=torch.float64)

    def exact_eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        abar = d.alphas_cumprod[t.long()][:, None]  # the data is c, so x_t determines eps
        return (x - abar.sqrt() * c) / (1 - abar).sqrt()

    out = d.sample(exact_eps, torch.randn(5, 2, dtype=torch.float64), labels(5), steps=steps, sampler="ddim")
    torch.testing.assert_close(out, c.expand(5, 2))


# ----------------------------------------------------------------- rectified flow
def test_flow_interpolation_target_and_loss_by_hand() -> None:
    flow = RectifiedFlow()
    x0, noise, t = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.tensor([0.0, 0.25, 1.0])
    xt = flow.interpolate(x0, noise, t)
    for row in range(3):
        torch.testing.assert_close(xt[row], (1 - t[row]) * x0[row] + t[row] * noise[row])
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    torch.testing.assert_close(flow.velocity_target(x0, noise), noise - x0)
    for sampling in ("uniform", "logit_normal"):
        flow = RectifiedFlow(sampling, logit_mean=0.5, logit_std=2.0)
        model = Recorder()
        loss, terms = flow.loss(model, x0, labels(3), generator=torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        if sampling == "uniform":
            t = torch.rand(3, generator=g)
        else:
            t = torch.sigmoid(0.5 + 2.0 * torch.randn(3, generator=g))
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        pred = 0.3 * xt + t[:, None, None] + 0.1
        assert loss.item() == pytest.approx(((pred - (eps - x0)) ** 2).mean().item(), rel=1e-5)
        torch.testing.assert_close(model.calls[0][1], t * 1000)  # model time = 1000 t
        assert terms["loss"].item() == loss.item()


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_time_shift_moves_training_times_toward_noise(sampling) -> None:
    """time_shift s maps each drawn t to s t / (1 + (s - 1) t): same draws, by hand; s = 1 is the identity."""
    plain = RectifiedFlow(sampling).sample_time(2000, torch.Generator().manual_seed(3))
    shifted = RectifiedFlow(sampling, time_shift=10.0).sample_time(2000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(shifted, 10 * plain / (1 + 9 * plain))
    assert shifted.median() > plain.median() + 0.2 and shifted.max() < 1
    same = RectifiedFlow(sampling, time_shift=1.0).sample_time(2000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(same, plain)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="time_shift"):
            RectifiedFlow(sampling, time_shift=bad)


def test_euler_and_heun_steps_by_hand() -> None:
    flow, x, y = RectifiedFlow(), torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 3])

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        return 0.3 * x + t + 0.1 * y.double()[:, None]

    model = Recorder()
    torch.testing.assert_close(flow.sample(model, x, y, steps=1, sampler="euler"), x - v(x, 1.0))
    model = Recorder()
    guess = x - v(x, 1.0)
    heun = flow.sample(model, x, y, steps=1, sampler="heun")
    torch.testing.assert_close(heun, x - 0.5 * (v(x, 1.0) + v(guess, 0.0)))
    assert [c[1][0].item() for c in model.calls] == [1000.0, 0.0]
    # several Euler steps: h = -1/S at the times 1, 3/4, 1/2, 1/4
    model, ref = Recorder(), x.clone()
    out = flow.sample(model, x, y, steps=4)
    for t in (1.0, 0.75, 0.5, 0.25):
        ref = ref - 0.25 * v(ref, t)
    torch.testing.assert_close(out, ref)
    assert [c[1][0].item() for c in model.calls] == [1000.0, 750.0, 500.0, 250.0]


@pytest.mark.parametrize("steps", [1, 3, 17])
def test_euler_integrates_the_exact_gaussian_to_point_field_exactly(steps: int) -> None:
    c = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)

    def exact_velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - c) / (t[:, None] / 1000)  # x_t = (1 - t) c + t eps  =>  eps - c = (x_t - c) / t

    out = RectifiedFlow().sample(exact_velocity, torch.randn(6, 3, dtype=torch.float64), labels(6), steps=steps)
    torch.testing.assert_close(out, c.expand(6, 3))


class ToyVelocity(nn.Module):
    """A tiny class-conditional MLP velocity field on 2-D points (labels 0, 1; 2 = null)."""

    def __init__(self) -> None:
        super().__init__()
        self.label = nn.Embedding(3, 32)
        self.net = nn.Sequential(nn.Linear(3 + 32, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None] / 1000, self.label(y)], dim=1))


def toy_data(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussians of std 0.3 at (-2, 0) (class 0) and (2, 0) (class 1)."""
    y = torch.randint(0, 2, (n,), generator=g)
    centre = torch.stack([4.0 * y - 2.0, torch.zeros(n)], dim=1)
    return centre + 0.3 * torch.randn(n, 2, generator=g), y


@pytest.fixture
def one_thread():
    """One intra-op thread: a 64-wide MLP gains nothing from two, and on a loaded machine the
    second thread's barrier waits made this test 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # ~1 s alone, ~3 s on a loaded machine
def test_flow_learns_a_two_gaussian_mixture_and_guidance_picks_the_class(one_thread: None) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model, flow = ToyVelocity(), RectifiedFlow()
    data, _ = toy_data(2000, g)
    target = torch.cat([data.mean(0), data.std(0)])  # mean and spread per axis

    def draw(label: int, scale: float) -> torch.Tensor:
        return flow.sample(model, (1000, 2), labels(1000, label), steps=20, guidance_scale=scale, null_label=2)

    error_at_init = (torch.cat([draw(2, 1.0).mean(0), draw(2, 1.0).std(0)]) - target).abs().max()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 400)
    for _ in range(400):
        x0, y = toy_data(256, g)
        y = torch.where(torch.rand(256, generator=g) < 0.2, 2, y)  # label dropout teaches the null label
        loss, _ = flow.loss(model, x0, y, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    samples = draw(2, 1.0)  # the null label: both modes with the data's spread
    error = (torch.cat([samples.mean(0), samples.std(0)]) - target).abs().max()
    assert error < 0.25 * error_at_init and error < 0.3
    near_mode = ((samples[:, 0].abs() - 2).abs() < 0.9) & (samples[:, 1].abs() < 0.9)
    assert near_mode.float().mean() > 0.8
    for label, centre in ((0, -2.0), (1, 2.0)):
        conditional = draw(label, 1.0)
        assert (conditional.mean(0) - torch.tensor([centre, 0.0])).abs().max() < 0.25
        assert (conditional[:, 0] * centre > 0).float().mean() > 0.97
        guided = draw(label, 3.0)  # classifier-free guidance through the batched null pass
        assert (guided[:, 0] * centre > 0).float().mean() > 0.97


# ----------------------------------------------------------------- classifier-free guidance
def test_guidance_is_uncond_plus_scale_times_the_difference_in_one_call() -> None:
    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * (1 + y.float())[:, None] + t[:, None]  # the label scales x: a known dependence

    x, t, y = torch.randn(4, 3), torch.rand(4) * 1000, torch.tensor([1, 2, 3, 4])
    recorder = Recorder(model)
    out = classifier_free_guidance(recorder, y, 2.5, null_label=0)(x, t)
    cond, uncond = x * (1 + y.float())[:, None] + t[:, None], x + t[:, None]
    torch.testing.assert_close(out, uncond + 2.5 * (cond - uncond))
    assert len(recorder.calls) == 1 and recorder.calls[0][0] == 8
    assert recorder.calls[0][2].tolist() == [1, 2, 3, 4, 0, 0, 0, 0]
    torch.testing.assert_close(classifier_free_guidance(model, y, 1.0)(x, t), cond)
    torch.testing.assert_close(classifier_free_guidance(model, y, 0.0, null_label=0)(x, t), uncond)


@pytest.mark.parametrize(
    ("objective", "sampler", "calls_per_step"),
    [("ddpm", "ddpm", 1), ("ddpm", "ddim", 1), ("flow", "euler", 1), ("flow", "heun", 2)],
)
@pytest.mark.parametrize("scale", [1.0, 0.0, 3.0])
def test_samplers_call_the_model_once_per_evaluation(
    objective: str, sampler: str, calls_per_step: int, scale: float
) -> None:
    diffusion = create_diffusion(DiffusionConfig(objective=objective))
    model = Recorder()
    diffusion.sample(model, torch.randn(3, 2), labels(3), steps=6, sampler=sampler, guidance_scale=scale, null_label=9)
    assert len(model.calls) == 6 * calls_per_step
    assert {c[0] for c in model.calls} == ({6} if scale not in (0.0, 1.0) else {3})
    seen = {v for c in model.calls for v in c[2].tolist()}
    assert seen == {1: {1}, 0: {9}}.get(scale, {1, 9})


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_timesteps": 0}, "num_timesteps"),
        ({"num_timesteps": 2.5}, "num_timesteps"),
        ({"beta_start": 0.0}, "beta_start"),
        ({"beta_end": 1.0}, "beta_end"),
        ({"beta_start": 0.03, "beta_end": 0.02}, "must not exceed"),
    ],
)
def test_bad_ddpm_schedules_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(**kwargs)


def test_bad_sampling_arguments_are_refused() -> None:
    d, flow, x, y = GaussianDiffusion(100), RectifiedFlow(), torch.randn(2, 3), labels(2)
    cases = [
        (lambda: d.sample(linear_model, x, y, steps=0), "steps must be an int in \\[1, 100\\]"),
        (lambda: d.sample(linear_model, x, y, steps=101), "steps must be an int in \\[1, 100\\]"),
        (lambda: d.sample(linear_model, x, labels(3)), "batch mismatch: x has 2 rows but y has 3"),
        (lambda: d.sample(linear_model, x, y, guidance_scale=-1, null_label=0), "guidance_scale must be >= 0"),
        (lambda: d.sample(linear_model, x, y, guidance_scale=float("nan"), null_label=0), "finite"),
        (lambda: d.sample(linear_model, x, y, guidance_scale=2.0), "needs null_label"),
        (lambda: d.sample(linear_model, x, y, sampler="euler"), "unknown sampler 'euler'"),
        (lambda: d.sample(linear_model, x, y, eta=0.5), "eta is a DDIM setting"),
        (lambda: d.sample(linear_model, x, y, sampler="ddim", eta=2), "eta must be"),
        (lambda: d.sample(linear_model, (2, 0), y), "positive ints"),
        (lambda: d.sample(linear_model, 2, y), "positive ints"),
        (lambda: d.sample(lambda x, t, y: x[:, :1], x, y), "shaped like x"),
        (lambda: d.loss(linear_model, x, labels(5)), "batch mismatch"),
        (lambda: d.loss(linear_model, x.long(), y), "x0 must be a float tensor"),
        (lambda: d.q_sample(x, torch.tensor([0, 100]), x), "step indices must lie in \\[0, 100\\)"),
        (lambda: d.ddpm_step(x, x, 5, 5), "prev < t"),
        (lambda: flow.sample(linear_model, x, y, steps=0), "steps must be an int"),
        (lambda: flow.sample(linear_model, x, y, sampler="ddim"), "unknown sampler 'ddim'"),
        (lambda: flow.loss(lambda x, t, y: x.sum(), x, y), "shaped like x"),
        (lambda: RectifiedFlow("cosine"), "unknown time_sampling"),
        (lambda: RectifiedFlow(logit_std=0.0), "logit_std"),
        (lambda: DiffusionConfig(beta_start=0.5, beta_end=0.1), "must not exceed"),
        (lambda: DiffusionConfig(objective="edm"), "objective"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="integer tensor"):
        d.sample(linear_model, x, torch.zeros(2))


def test_config_builds_the_described_objective() -> None:
    d = create_diffusion(DiffusionConfig(num_timesteps=10, beta_start=0.01, beta_end=0.1))
    assert isinstance(d, GaussianDiffusion) and d.num_timesteps == 10 and d.betas[-1].item() == pytest.approx(0.1)
    flow = create_diffusion(DiffusionConfig.from_dict({"objective": "flow", "time_sampling": "logit_normal"}))
    assert isinstance(flow, RectifiedFlow) and flow.time_sampling == "logit_normal"
