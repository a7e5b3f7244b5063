"""The plain way to simulate fine-tuning: one deepcopy of the model per
trajectory, a torch.optim optimizer, an ordinary training loop.

It is the oracle the batched :func:`sophon_ext.simulate` is tested against
and the baseline its benchmark measures. It shares with ``simulate`` only
the batch indices (:func:`draw_batches`) and the surgery helpers, never the
batched update code. First-order meta-gradient only.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..methods import get_method
from ..optim.functional import torch_optimizer_kwargs
from ..optim.presets import make_torch_optimizer, resolve_preset
from ..strategies import FineTuneStrategy
from .batches import apply_transform, check_data, compose_transforms, draw_batches, method_inputs, take


def _loss(fn: Callable, model: nn.Module, inputs, targets) -> Tensor:
    return fn(model(*inputs), targets)


def simulate_sequential(model: nn.Module, strategies: Sequence[FineTuneStrategy], data, adaptation_loss: Callable,
                        suppression_loss: Callable, *, query_size: int, head: str | None = None,
                        generator: torch.Generator | None = None):
    """Returns ``(query_losses (N, K), meta_grad {name: tensor}, adapted [{name: tensor}] per trajectory)``.

    ``meta_grad`` is the mean over trajectories and steps of the gradient of
    the query loss at each adapted point, carried back to the original
    parameters through the trajectory's surgery (zero for re-initialised ones).
    """
    inputs, targets = check_data(data)
    steps = strategies[0].steps
    device = next(model.parameters()).device
    batches = draw_batches(targets.shape[0], [s.batch_size for s in strategies], query_size, steps, generator)
    names = [n for n, _ in model.named_parameters()]
    meta = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    losses = torch.zeros(len(strategies), steps, dtype=torch.float64)
    adapted = []
    for i, (strategy, batch) in enumerate(zip(strategies, batches)):
        work = copy.deepcopy(model).train()
        params = dict(work.named_parameters())
        generator_i = torch.Generator().manual_seed(strategy.seed)
        theta = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        start = dict(theta)
        frozen: list[str] = []
        transform = strategy.input_transform
        if strategy.method == "custom":
            start.update(strategy.surgery(dict(theta), generator_i))
            with torch.no_grad():
                for n in names:
                    params[n].copy_(start[n])
        else:
            method = get_method(strategy.method)
            reinit, frozen = method.targets(model, strategy.layers, head)
            method_x = method_inputs(method, inputs, theta)
            method.apply_to_module(work, reinit, generator_i, method_x)  # the harness's form of the method
            # the simulator's form, only for the graph the meta-gradient is pulled back through
            start = method.simulated_start(model, theta, reinit, torch.Generator().manual_seed(strategy.seed), method_x)
            transform = compose_transforms(method.simulated_input_transform(strategy.seed), transform)
        base, hp = resolve_preset(strategy.optimizer, strategy.hparams)
        trainable = [params[n] for n in names if n not in frozen]
        optimizer = make_torch_optimizer(strategy.optimizer, trainable, strategy.lr, torch_optimizer_kwargs(base, hp))
        query_grad_sum = {n: torch.zeros_like(params[n]) for n in names}
        for k in range(steps):
            x, y = take(inputs, targets, batch.adapt[k], device)
            x = apply_transform(transform, x)
            optimizer.zero_grad(set_to_none=True)
            _loss(adaptation_loss, work, x, y).backward()
            for n in frozen:
                params[n].grad = None
            optimizer.step()
            qx, qy = take(inputs, targets, batch.query[k], device)
            query = _loss(suppression_loss, work, apply_transform(transform, qx), qy)
            grads = torch.autograd.grad(query, [params[n] for n in names])
            for n, g in zip(names, grads):
                query_grad_sum[n] += g
            losses[i, k] = query.detach().double()
        pulled = [start[n] for n in names if start[n].requires_grad]
        if pulled:
            back = torch.autograd.grad(pulled, [theta[n] for n in names],
                                       [query_grad_sum[n] for n in names if start[n].requires_grad], allow_unused=True)
            for n, g in zip(names, back):
                if g is not None:
                    meta[n] += g
        adapted.append({n: p.detach().clone() for n, p in work.named_parameters()})
    scale = 1.0 / (len(strategies) * steps)
    return losses, {n: g * scale for n, g in meta.items()}, adapted
