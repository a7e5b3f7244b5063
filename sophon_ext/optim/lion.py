"""Lion as a torch.optim.Optimizer (Chen et al. 2023, "Symbolic Discovery of
Optimization Algorithms"), the class behind the ``"lion"`` preset."""

from __future__ import annotations

import torch


class Lion(torch.optim.Optimizer):
    """Sign-of-momentum optimizer: for each parameter ``p`` with gradient ``g``::

        c = beta1 * m + (1 - beta1) * g
        p = p - lr * (sign(c) + weight_decay * p)
        m = beta2 * m + (1 - beta2) * g

    Args mirror :class:`torch.optim.AdamW`: ``lr`` (default 1e-4),
    ``betas=(beta1, beta2)`` (default (0.9, 0.99)), ``weight_decay`` (decoupled).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if not lr >= 0:
            raise ValueError(f"lr: must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas: must be two values in [0, 1), got {betas}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                update = (exp_avg * beta1).add_(p.grad, alpha=1 - beta1).sign_()
                if weight_decay != 0:
                    update.add_(p, alpha=weight_decay)
                p.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss
