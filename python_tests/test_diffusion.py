"""DDPM schedule, noise-prediction loss, DDPM/DDIM samplers and the tiny UNet."""

import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

from sophon_ext.models import MODEL_REGISTRY, build_model
from sophon_ext.tasks.generation.diffusion import (
    NoiseSchedule,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    denoising_loss,
    draw_noising,
    per_sample_mse,
)
from sophon_ext.tasks.generation.unet import TinyUNet, timestep_embedding


def tiny_unet(**kwargs):
    torch.manual_seed(0)
    defaults = dict(base_channels=8, channel_mults=(1, 2), attention_resolutions=(4,), image_size=8, groups=4)
    return TinyUNet(**{**defaults, **kwargs})


class PointOracle(torch.nn.Module):
    """The exact noise predictor when the data is the single image ``x0``."""

    def __init__(self, x0, schedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, x_t, t):
        abar = self.schedule.coefficient("alphas_cumprod", t, x_t)
        return (x_t - abar.sqrt() * self.x0) / (1.0 - abar).sqrt()


class GaussianOracle(torch.nn.Module):
    """The exact noise predictor for data ~ N(0, s^2 I): E[eps | x_t] = sqrt(1-abar) x_t / (abar s^2 + 1 - abar)."""

    def __init__(self, std, schedule):
        super().__init__()
        self.std, self.schedule = std, schedule

    def forward(self, x_t, t):
        abar = self.schedule.coefficient("alphas_cumprod", t, x_t)
        return (1.0 - abar).sqrt() * x_t / (abar * self.std**2 + 1.0 - abar)


# ----------------------------------------------------------------------------- schedule


def test_linear_schedule_matches_closed_form():
    s = NoiseSchedule.linear(4, beta_start=0.1, beta_end=0.4)
    betas = [0.1, 0.2, 0.3, 0.4]
    torch.testing.assert_close(s.betas, torch.tensor(betas, dtype=torch.float64))
    abar = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7, 0.9 * 0.8 * 0.7 * 0.6]
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor(abar, dtype=torch.float64))
    torch.testing.assert_close(s.alphas_cumprod_prev, torch.tensor([1.0] + abar[:-1], dtype=torch.float64))
    # beta_t (1 - abar_{t-1}) / (1 - abar_t); zero at t = 0.
    expected = [0.0] + [betas[t] * (1 - abar[t - 1]) / (1 - abar[t]) for t in range(1, 4)]
    torch.testing.assert_close(s.posterior_variance, torch.tensor(expected, dtype=torch.float64))


def test_default_schedule_end_is_nearly_pure_noise():
    s = NoiseSchedule.linear()
    assert s.num_timesteps == 1000
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # DDPM's linear schedule: abar_T = prod(1 - beta) ~ 4e-5, computed here independently in log space.
    expected = math.exp(sum(math.log(1 - (1e-4 + (0.02 - 1e-4) * i / 999)) for i in range(1000)))
    assert s.alphas_cumprod[-1].item() == pytest.approx(expected, rel=1e-9)


def test_q_sample_closed_form_and_broadcast():
    s = NoiseSchedule.linear(10)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 5, 9])
    abar = s.alphas_cumprod[t].float().view(3, 1, 1, 1)
    torch.testing.assert_close(s.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    # predict_x0 inverts q_sample given the true noise
    torch.testing.assert_close(s.predict_x0(s.q_sample(x0, t, noise), t, noise), x0, atol=1e-5, rtol=1e-5)


def test_q_sample_moments():
    s = NoiseSchedule.linear(100)
    x0 = torch.full((20000, 1), 0.5, dtype=torch.float64)
    t = torch.full((20000,), 60)
    x_t = s.q_sample(x0, t, torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    abar = s.alphas_cumprod[60].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.5, abs=0.03)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=0.05)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(num_timesteps=0), ValueError),
        (dict(beta_start=0.0), ValueError),
        (dict(beta_start=0.3, beta_end=0.2), ValueError),
        (dict(beta_end=1.0), ValueError),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        NoiseSchedule.linear(**kwargs)


def test_q_sample_rejects_bad_timesteps_and_noise():
    s = NoiseSchedule.linear(10)
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(IndexError, match="t:"):
        s.q_sample(x0, torch.tensor([0, 10]), torch.zeros_like(x0))
    with pytest.raises(IndexError, match="t:"):
        s.q_sample(x0, torch.tensor([-1, 0]), torch.zeros_like(x0))
    with pytest.raises(TypeError, match="t:"):
        s.q_sample(x0, torch.tensor([0.0, 1.0]), torch.zeros_like(x0))
    with pytest.raises(ValueError, match="t:"):
        s.q_sample(x0, torch.tensor([0, 1, 2]), torch.zeros_like(x0))
    with pytest.raises(ValueError, match="noise:"):
        s.q_sample(x0, torch.tensor([0, 1]), torch.zeros(2, 1, 4, 5))


# ----------------------------------------------------------------------------- loss


def test_draw_noising_is_seeded_and_in_range():
    x0 = torch.zeros(64, 1, 4, 4)
    t1, n1 = draw_noising(x0, 7, torch.Generator().manual_seed(3))
    t2, n2 = draw_noising(x0, 7, torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and torch.equal(n1, n2)
    assert t1.dtype == torch.long and 0 <= int(t1.min()) and int(t1.max()) < 7
    assert n1.shape == x0.shape


def test_denoising_loss_closed_forms():
    s = NoiseSchedule.linear(50)
    x0 = torch.rand(1, 1, 4, 4) * 2 - 1
    batch = x0.expand(8, -1, -1, -1)
    # The exact predictor has zero loss; predicting zero noise costs mean(eps^2).
    assert denoising_loss(PointOracle(x0, s), batch, s, torch.Generator().manual_seed(0)).item() == pytest.approx(0.0, abs=1e-10)
    zero_loss = denoising_loss(lambda x_t, t: torch.zeros_like(x_t), batch, s, torch.Generator().manual_seed(0))
    _, noise = draw_noising(batch, 50, torch.Generator().manual_seed(0))
    assert zero_loss.item() == pytest.approx(noise.square().mean().item(), rel=1e-6)


def test_per_sample_mse_reference_and_shape_check():
    a, b = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    expected = torch.stack([((a[i] - b[i]) ** 2).sum() / a[i].numel() for i in range(3)])
    torch.testing.assert_close(per_sample_mse(a, b), expected)
    with pytest.raises(ValueError, match="prediction:"):
        per_sample_mse(a, b[:, :1])


# ----------------------------------------------------------------------------- samplers


def test_ddim_timesteps():
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    assert ddim_timesteps(1000, 5) == [999, 749, 500, 250, 0]
    assert ddim_timesteps(1000, 1) == [0]
    with pytest.raises(ValueError, match="steps:"):
        ddim_timesteps(10, 11)


def test_ddim_with_the_exact_predictor_recovers_the_data_point():
    s = NoiseSchedule.linear(200)
    x0 = torch.rand(1, 1, 4, 4, dtype=torch.float64) * 1.6 - 0.8
    out = ddim_sample(PointOracle(x0, s), s, (3, 1, 4, 4), steps=20, seed=0, dtype=torch.float64)
    torch.testing.assert_close(out, x0.expand(3, -1, -1, -1))


def test_ddpm_with_the_exact_predictor_recovers_the_data_point():
    s = NoiseSchedule.linear(50)
    x0 = torch.rand(1, 1, 4, 4, dtype=torch.float64) * 1.6 - 0.8
    out = ddpm_sample(PointOracle(x0, s), s, (3, 1, 4, 4), seed=0, dtype=torch.float64)
    torch.testing.assert_close(out, x0.expand(3, -1, -1, -1))


def exact_gaussian_sample_std(s, std):
    """Std of DDPM samples for data ~ N(0, std^2) with the exact noise predictor, by scalar recursion.

    Every step is linear in x_t: x_{t-1} = m_t x_t + sigma_t z, so Var_{t-1} = m_t^2 Var_t + sigma_t^2.
    (Below ``std``: DDPM's step ignores the spread of x_0 given x_t.)
    """
    var = 1.0
    for t in reversed(range(s.num_timesteps)):
        abar, abar_prev = s.alphas_cumprod[t].item(), s.alphas_cumprod_prev[t].item()
        beta, alpha = s.betas[t].item(), s.alphas[t].item()
        eps_gain = math.sqrt(1 - abar) / (abar * std**2 + 1 - abar)
        x0_gain = (1 - math.sqrt(1 - abar) * eps_gain) / math.sqrt(abar)
        m = (math.sqrt(abar_prev) * beta * x0_gain + math.sqrt(alpha) * (1 - abar_prev)) / (1 - abar)
        var = m * m * var + (s.posterior_variance[t].item() if t > 0 else 0.0)
    return math.sqrt(var)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_stochastic_samplers_match_the_exact_gaussian_reverse_process(sampler):
    s = NoiseSchedule.linear(100, beta_start=1e-3, beta_end=0.1)
    oracle = GaussianOracle(0.3, s)
    shape = (6000, 1, 1, 1)
    if sampler == "ddpm":
        out = ddpm_sample(oracle, s, shape, seed=1, clip=False, dtype=torch.float64)
    else:  # DDIM with eta = 1 takes DDPM's posterior step
        out = ddim_sample(oracle, s, shape, steps=100, eta=1.0, seed=1, clip=False, dtype=torch.float64)
    expected = exact_gaussian_sample_std(s, 0.3)
    assert 0.25 < expected < 0.3
    assert out.mean().item() == pytest.approx(0.0, abs=0.025)
    assert out.std().item() == pytest.approx(expected, rel=0.04)


def test_deterministic_ddim_maps_gaussian_noise_to_the_data_scale():
    # eta = 0 follows the probability-flow ODE: x_T ~ N(0, 1) lands near N(0, 0.3^2).
    s = NoiseSchedule.linear(1000)
    out = ddim_sample(GaussianOracle(0.3, s), s, (6000, 1, 1, 1), steps=200, seed=2, clip=False, dtype=torch.float64)
    assert out.std().item() == pytest.approx(0.3, rel=0.05)


def test_samplers_shapes_and_determinism_with_unet():
    s = NoiseSchedule.linear(20)
    model = tiny_unet()
    with torch.no_grad():  # non-zero output so the samples depend on the model
        model.conv_out.weight.normal_(0, 0.1)
    model.train()
    a = ddpm_sample(model, s, (2, 1, 8, 8), seed=5)
    b = ddpm_sample(model, s, (2, 1, 8, 8), seed=5)
    c = ddpm_sample(model, s, (2, 1, 8, 8), seed=6)
    assert a.shape == (2, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert model.training  # the sampler restores the training flag
    d = ddim_sample(model, s, (3, 1, 8, 8), steps=5, seed=5)
    e = ddim_sample(model, s, (3, 1, 8, 8), steps=5, seed=5)
    f = ddim_sample(model, s, (3, 1, 8, 8), steps=5, eta=0.5, seed=5)
    g = ddim_sample(model, s, (3, 1, 8, 8), steps=5, eta=0.5, seed=5)
    assert d.shape == (3, 1, 8, 8) and torch.equal(d, e) and torch.equal(f, g) and not torch.equal(d, f)
    assert d.abs().max() <= 1.0 + 1e-6  # clipped x_0 estimate keeps the final image in range


def test_samplers_reject_bad_arguments():
    s = NoiseSchedule.linear(10)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="shape:"):
        ddim_sample(zero, s, (0, 1, 4, 4))
    with pytest.raises(ValueError, match="eta:"):
        ddim_sample(zero, s, (1, 1, 4, 4), steps=2, eta=-1)
    with pytest.raises(ValueError, match="variance:"):
        ddpm_sample(zero, s, (1, 1, 4, 4), variance="large")


# ----------------------------------------------------------------------------- UNet


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(torch.tensor([0, 3]), 4)
    freqs = torch.tensor([1.0, 1e-2])  # exp(-ln(1e4) * i / 2), i = 0, 1
    expected = torch.cat([torch.cos(torch.tensor([[0.0], [3.0]]) * freqs), torch.sin(torch.tensor([[0.0], [3.0]]) * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(torch.tensor([1, 2]), 5).shape == (2, 5)


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(), (2, 1, 8, 8)),
        (dict(in_channels=3, channel_mults=(1, 2, 2), image_size=16, attention_resolutions=(4, 8)), (2, 3, 16, 16)),
        (dict(attention_resolutions=(), num_res_blocks=2), (2, 1, 8, 8)),
    ],
)
def test_unet_shapes_and_zero_init(kwargs, shape):
    model = tiny_unet(**kwargs)
    x = torch.randn(shape)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv: a fresh model predicts no noise
    out.sum().backward()  # gradients reach the output conv
    assert model.conv_out.weight.grad is not None


def test_unet_uses_time_and_input():
    model = tiny_unet()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.2)
    x = torch.randn(2, 1, 8, 8)
    a = model(x, torch.tensor([1, 1]))
    assert not torch.allclose(a, model(x, torch.tensor([500, 500])))
    assert not torch.allclose(a, model(x + 0.5, torch.tensor([1, 1])))


def test_unet_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match="image_size:"):
        TinyUNet(image_size=18, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="channel_mults:"):
        TinyUNet(channel_mults=())
    with pytest.raises(ValueError, match="dropout:"):
        TinyUNet(dropout=1.0)
    model = tiny_unet()
    with pytest.raises(ValueError, match="x:"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="x:"):
        model(torch.randn(2, 1, 9, 9), torch.tensor([0, 1]))


def test_unet_in_registry_and_vmappable():
    assert MODEL_REGISTRY["tiny_unet"] is TinyUNet
    model = build_model("tiny_unet", base_channels=8, image_size=8, attention_resolutions=(4,), groups=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, t, eps = torch.randn(3, 2, 1, 8, 8), torch.randint(0, 1000, (3, 2)), torch.randn(3, 2, 1, 8, 8)

    def loss(p, x, t, eps):
        return (functional_call(model, p, (x, t)) - eps).square().mean()

    # Per-trajectory gradients under vmap equal the plain loop (what the batched simulator relies on).
    stacked = {k: v.expand(3, *v.shape).clone() for k, v in params.items()}
    batched = vmap(grad(loss))(stacked, x, t, eps)
    for i in range(3):
        single = grad(loss)(params, x[i], t[i], eps[i])
        for k in params:
            torch.testing.assert_close(batched[k][i], single[k], atol=1e-5, rtol=1e-4)
