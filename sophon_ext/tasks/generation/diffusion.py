"""DDPM pieces: the noise schedule, the noise-prediction objective, DDPM and DDIM sampling.

Notation (Ho et al. 2020): ``beta_t`` the variance added at step ``t``
(0-based here, ``t = 0 .. T-1``), ``alpha_t = 1 - beta_t``,
``abar_t = prod_{s <= t} alpha_s``. The forward process is
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with ``eps ~ N(0, I)``,
and a model ``model(x_t, t)`` predicts ``eps``. Any module with that
signature works with everything here (the package's :class:`~sophon_ext.tasks.generation.unet.TinyUNet`
is one).

Schedule tables are computed in float64 and cast to the data's dtype when used,
so long schedules do not accumulate float32 error in ``abar_t``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NoiseSchedule:
    """A discrete DDPM noise schedule given by its ``betas`` (T,), each in (0, 1)."""

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas: must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas: every value must lie in (0, 1), got min {betas.min().item()} max {betas.max().item()}")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # abar_{t-1}, with abar_{-1} = 1 (no noise before the first step).
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # Variance of q(x_{t-1} | x_t, x_0): beta_t (1 - abar_{t-1}) / (1 - abar_t).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self._device_cache: dict[tuple[torch.device, torch.dtype, str], torch.Tensor] = {}

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """Betas evenly spaced from ``beta_start`` to ``beta_end`` (DDPM's schedule)."""
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps: must be a positive int, got {num_timesteps!r}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"beta_start, beta_end: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def coefficient(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at timesteps ``t`` (B,), shaped (B, 1, ..., 1) to broadcast against ``like``."""
        key = (like.device, like.dtype, name)
        table = self._device_cache.get(key)
        if table is None:
            table = getattr(self, name).to(device=like.device, dtype=like.dtype)
            self._device_cache[key] = table
        return table[t.to(like.device)].reshape(-1, *([1] * (like.dim() - 1)))

    def check_timesteps(self, t: torch.Tensor, batch: int) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"t: must be an integer tensor of timesteps, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.shape != (batch,):
            raise ValueError(f"t: must have shape ({batch},) to match the batch, got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise IndexError(f"t: timesteps must lie in [0, {self.num_timesteps}), got [{int(t.min())}, {int(t.max())}]")

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x_0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise: must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        self.check_timesteps(t, x0.shape[0])
        abar = self.coefficient("alphas_cumprod", t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert the forward process given a noise estimate: ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
        abar = self.coefficient("alphas_cumprod", t, x_t)
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()


def draw_noising(x0: torch.Tensor, num_timesteps: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform timesteps ``t`` (B,) and standard normal noise shaped like ``x0``.

    Drawn on the generator's device (CPU when ``generator`` is None and ``x0`` is
    on CPU) and moved to ``x0``'s device, so a seeded CPU generator gives the same
    draws whatever device the data lives on.
    """
    device = generator.device if generator is not None else x0.device
    t = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator, device=device)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    return t.to(x0.device), noise.to(x0.device)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample (B,): the mean over every non-batch dimension."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction: must have the shape of the target noise {tuple(target.shape)}, got {tuple(prediction.shape)}")
    return (prediction - target).square().reshape(prediction.shape[0], -1).mean(dim=1)


def denoising_loss(model: NoisePredictor, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDPM's simple objective ``E_{t, eps} ||eps - model(x_t, t)||^2`` (mean over pixels and batch)."""
    t, noise = draw_noising(x0, schedule.num_timesteps, generator)
    return per_sample_mse(model(schedule.q_sample(x0, t, noise), t), noise).mean()


def _start_noise(shape, seed: int, device, dtype) -> tuple[torch.Tensor, torch.Generator]:
    if len(shape) < 2 or any(int(s) < 1 for s in shape):
        raise ValueError(f"shape: must be (N, C, ...) with positive sizes, got {tuple(shape)}")
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype), generator


def _model_device_dtype(model: nn.Module | NoisePredictor, device, dtype):
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    if dtype is None:
        dtype = params[0].dtype if params else torch.float32
    return torch.device(device), dtype


class _EvalMode:
    """Run ``model`` in eval mode and restore its training flag afterwards."""

    def __init__(self, model):
        self.model = model if isinstance(model, nn.Module) else None

    def __enter__(self):
        self.was_training = self.model.training if self.model is not None else False
        if self.model is not None:
            self.model.eval()

    def __exit__(self, *exc):
        if self.model is not None:
            self.model.train(self.was_training)


@torch.no_grad()
def ddpm_sample(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    shape,
    seed: int = 0,
    variance: str = "posterior",
    clip: bool = True,
    device=None,
    dtype=None,
) -> torch.Tensor:
    """Ancestral DDPM sampling from ``x_T ~ N(0, I)`` through all ``T`` steps.

    Each step predicts ``x_0`` from the noise estimate (clipped to [-1, 1] if
    ``clip``), takes the mean of ``q(x_{t-1} | x_t, x_0)`` and adds noise of
    variance ``posterior`` (``beta_t (1 - abar_{t-1}) / (1 - abar_t)``) or
    ``beta`` (``beta_t``); no noise is added at the last step. The same ``seed``
    gives the same samples.
    """
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance: must be 'posterior' or 'beta', got {variance!r}")
    device, dtype = _model_device_dtype(model, device, dtype)
    x, generator = _start_noise(shape, seed, device, dtype)
    variance_table = "posterior_variance" if variance == "posterior" else "betas"
    with _EvalMode(model):
        for step in reversed(range(schedule.num_timesteps)):
            t = torch.full((x.shape[0],), step, device=device, dtype=torch.long)
            x0 = schedule.predict_x0(x, t, model(x, t))
            if clip:
                x0 = x0.clamp(-1.0, 1.0)
            abar = schedule.coefficient("alphas_cumprod", t, x)
            abar_prev = schedule.coefficient("alphas_cumprod_prev", t, x)
            beta = schedule.coefficient("betas", t, x)
            alpha = schedule.coefficient("alphas", t, x)
            # Posterior mean of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 7).
            mean = (abar_prev.sqrt() * beta * x0 + alpha.sqrt() * (1.0 - abar_prev) * x) / (1.0 - abar)
            if step > 0:
                noise = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
                x = mean + schedule.coefficient(variance_table, t, x).sqrt() * noise
            else:
                x = mean
    return x


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spread over [0, T-1], descending, always ending at 0."""
    if not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps: must be an int in [1, {num_timesteps}], got {steps!r}")
    grid = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long().tolist()
    return sorted(set(grid), reverse=True)


@torch.no_grad()
def ddim_sample(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    shape,
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    clip: bool = True,
    device=None,
    dtype=None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021) over ``steps`` of the schedule's timesteps.

    ``eta = 0`` is the deterministic sampler; ``eta = 1`` matches DDPM's
    posterior noise level. The same ``seed`` gives the same samples.
    """
    if eta < 0:
        raise ValueError(f"eta: must be >= 0, got {eta}")
    device, dtype = _model_device_dtype(model, device, dtype)
    x, generator = _start_noise(shape, seed, device, dtype)
    timesteps = ddim_timesteps(schedule.num_timesteps, steps)
    one = torch.ones((), device=device, dtype=dtype)
    with _EvalMode(model):
        for i, step in enumerate(timesteps):
            t = torch.full((x.shape[0],), step, device=device, dtype=torch.long)
            eps = model(x, t)
            abar = schedule.coefficient("alphas_cumprod", t, x)
            if i + 1 < len(timesteps):
                abar_prev = schedule.coefficient("alphas_cumprod", torch.full_like(t, timesteps[i + 1]), x)
            else:
                abar_prev = one.expand_as(abar)  # the final step lands on x_0
            x0 = schedule.predict_x0(x, t, eps)
            if clip:
                x0 = x0.clamp(-1.0, 1.0)
                # Re-derive the noise direction from the clipped x_0 so both stay consistent.
                eps = (x - abar.sqrt() * x0) / (1.0 - abar).sqrt()
            sigma = eta * ((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)).clamp_min(0).sqrt()
            x = abar_prev.sqrt() * x0 + (1.0 - abar_prev - sigma.square()).clamp_min(0).sqrt() * eps
            if eta > 0 and i + 1 < len(timesteps):
                x = x + sigma * torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
    return x
