"""Generation (DDPM noise prediction): denoising loss to adapt and to keep, DoS / negated MSE to suppress.

A raw batch ``(x, y)`` of images in [-1, 1] becomes model inputs ``(x_t, t)``
and target noise ``eps`` (:meth:`GenerationTask.prepare`); labels are unused.
The model is any ``model(x_t, t) -> eps_hat`` (e.g. :class:`~sophon_ext.tasks.generation.unet.TinyUNet`).
The headline metric is the test denoising loss ``mean ||eps_hat - eps||^2``
(the paper's), evaluated with a fixed seed so every model sees the same
timesteps and noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..base import weighted_mean
from .diffusion import NoiseSchedule, draw_noising, per_sample_mse

SUPPRESSION_LOSSES = ("dos", "neg_mse", "none")


@dataclass
class GenerationTask:
    """``suppression`` picks SOPHON's loss on the restricted domain:

    - ``"dos"``: denial of service, ``mean ||eps_hat||^2`` (predict no noise at all),
    - ``"neg_mse"``: negated denoising loss ``-mean ||eps_hat - eps||^2`` (unbounded below),
    - ``"none"``: zero suppression (for ablations: protection switched off).

    The schedule is DDPM's linear one with ``num_timesteps`` steps from
    ``beta_start`` to ``beta_end``. :meth:`evaluate` averages over
    ``eval_draws`` seeded draws of ``(t, eps)`` per image.
    """

    suppression: str = "dos"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    eval_draws: int = 1
    #: samples drawn (DDIM, ``sample_steps`` steps, fixed seed) by :meth:`inspect_model`
    num_samples: int = 64
    sample_steps: int = 50
    schedule: NoiseSchedule = field(init=False, repr=False, compare=False)

    name = "generation"
    metric_name = "denoising_loss"
    higher_is_better = False
    #: a noise predictor has no classifier head: head-based attack methods do not apply
    has_head = False

    def __post_init__(self) -> None:
        if self.suppression not in SUPPRESSION_LOSSES:
            raise ValueError(f"suppression: unknown loss {self.suppression!r}; choose one of {SUPPRESSION_LOSSES}")
        for name in ("eval_draws", "num_samples", "sample_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if self.num_samples < 2:
            raise ValueError(f"num_samples: must be >= 2 (the distribution distance needs pairs), got {self.num_samples}")
        self.schedule = NoiseSchedule.linear(self.num_timesteps, self.beta_start, self.beta_end)

    def prepare(self, x, y, generator=None):
        """``((x_t, t), eps)``: timesteps and noise drawn from ``generator``, ``x_t ~ q(x_t | x)``."""
        _check_images(x)
        t, noise = draw_noising(x, self.num_timesteps, generator)
        return (self.schedule.q_sample(x, t, noise), t), noise

    def adaptation_loss(self, output, targets, weight=None):
        """The denoising loss ``||eps_hat - eps||^2`` (mean over pixels, weighted mean over the batch)."""
        return weighted_mean(per_sample_mse(output, targets), weight)

    original_loss = adaptation_loss

    def suppression_loss(self, output, targets, weight=None):
        from ... import functional as SF  # noqa: N812 - the package's loss functions

        if self.suppression == "dos":
            values = SF.denial_of_service_loss(output, reduction="none")
        elif self.suppression == "neg_mse":
            values = SF.negated_mse(output, targets, reduction="none")
        else:  # "none"
            values = output.reshape(output.shape[0], -1).sum(dim=1) * 0.0
        return weighted_mean(values, weight)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512, seed: int = 0) -> dict[str, float]:
        """Mean test denoising loss over ``x`` with ``(t, eps)`` drawn from ``seed`` (same draws for any batch size)."""
        _check_images(x)
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(int(seed))
        total, count = 0.0, 0
        for _ in range(self.eval_draws):
            # One draw for the whole set, then batches: the result does not depend on batch_size.
            t, noise = draw_noising(x, self.num_timesteps, generator)  # drawn on the CPU generator, moved to x's device
            for start in range(0, x.shape[0], batch_size):
                part = slice(start, start + batch_size)
                x_t = self.schedule.q_sample(x[part], t[part], noise[part])
                output = model(x_t, t[part])
                total += per_sample_mse(output.float(), noise[part].to(output.device).float()).sum().item()
                count += x_t.shape[0]
        model.train(was_training)
        loss = total / max(count, 1)
        return {self.metric_name: loss, "loss": loss}

    @torch.no_grad()
    def inspect_model(self, model: nn.Module, reference: torch.Tensor, path: str | Path | None = None, seed: int = 0) -> dict:
        """Draw samples from ``model`` and compare them with real ``reference`` images.

        ``num_samples`` DDIM samples (``sample_steps`` steps, ``seed``) are written
        as a PNG grid to ``path`` (if given); returns their MMD^2 to ``reference``
        on random-conv features and on pixels (:func:`~sophon_ext.tasks.generation.metrics.generation_distance`),
        and the PNG's path. The attack harness calls this on every fine-tuned model.
        """
        from .diffusion import ddim_sample
        from .metrics import generation_distance, save_sample_grid

        _check_images(reference)
        if reference.shape[0] < 2:
            raise ValueError(f"reference: needs at least 2 real images, got {reference.shape[0]}")
        params = list(model.parameters())
        device = params[0].device if params else reference.device
        shape = (self.num_samples, *reference.shape[1:])
        samples = ddim_sample(model, self.schedule, shape, steps=min(self.sample_steps, self.num_timesteps), seed=seed, device=device).cpu()
        reference = reference.detach().float().cpu()
        out = {
            "samples": self.num_samples,
            "mmd_random_conv": generation_distance(samples, reference, features="random_conv", seed=seed),
            "mmd_pixels": generation_distance(samples, reference, features="pixels", seed=seed),
            "samples_png": None,
        }
        if path is not None:
            out["samples_png"] = str(save_sample_grid(samples, path))
        return out

    def check_model(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        _check_images(x)
        if x.shape[0] == 0:
            raise ValueError("dataset: is empty")
        (x_t, t), _ = self.prepare(x[:2], y[:2], torch.Generator().manual_seed(0))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x_t, t)
        except TypeError as exc:
            raise TypeError(f"model: a noise-prediction model must be callable as model(x_t, t); calling it failed: {exc}") from exc
        finally:
            model.train(was_training)
        if not isinstance(out, torch.Tensor) or out.shape != x_t.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model: a noise-prediction model must return eps_hat shaped like x_t {tuple(x_t.shape)}, got {shape}")


def _check_images(x) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x: generation needs a floating-point image tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2:
        raise ValueError(f"x: generation needs images (N, C, H, W), got shape {tuple(x.shape)}")


#: The built-in generation default (``sophon demo --mode generation``), as overrides of
#: :class:`~sophon_ext.config.Config`. Original domain: 2000 MNIST digits; restricted domain:
#: scikit-learn's 1797 8x8 digits upsampled to 16x16 (smooth, thick strokes: a different image
#: distribution, the pretrained model's denoising loss on it is ~2.4x its MNIST loss). Suppression:
#: the negated denoising loss, because the scratch baseline starts at a loss of exactly
#: E[eps^2] = 1 (zero-initialised output) and only an unbounded loss can start above it.
#: The attack: full fine-tuning with Adam at its default rate (1e-3), 10 epochs.
DEFAULT_CONFIG_OVERRIDES = {
    "data": {"original": {"name": "mnist", "limit": 2000}, "restricted": {"name": "digits"}},
    "task": {"suppression": "neg_mse", "eval_draws": 4},
    "model": {"name": "tiny_unet", "kwargs": {"base_channels": 16, "channel_mults": [1, 2], "attention_resolutions": [], "image_size": 16}},
    "pretrain": {"epochs": 6, "lr": 2e-3, "batch_size": 64, "optimizer": "adam"},
    "protect": {
        "iterations": 1000,
        "num_strategies": 0,
        "inner_steps": 3,
        # the simulated attacker is continued to 21 steps (7 parts of 3): the real attack's first
        # epoch is 20 steps, where 3-step trajectories alone left the protected model below scratch
        "horizon": 21,
        "query_size": 32,
        "alpha": 3e-3,
        "beta": 1.5e-3,
        "ntr_steps": 6,
        "ntr_batch_size": 32,
        "strategies": [{"optimizer": "adam", "lr": 1e-3, "batch_size": 32, "method": "full"}],
        "guard": {"every": 10, "max_drop": 0.1, "drop_is_fraction": True, "action": "lower_lr", "max_rollbacks": 6},
    },
    "attack": {"epochs": 10, "batch_size": 64, "attacks": [{"method": "full", "optimizer": "adam", "lr": 1e-3}]},
}
