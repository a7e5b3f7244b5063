"""The torch.optim drop-ins on the fused kernel (FusedSGD, FusedAdam, FusedAdamW, FusedLion) against torch.optim.

Each case trains the same float64 model with both optimizers for 50 steps,
with two param groups (different lr and weight decay), an lr scheduler and,
for the fused one, a save / restore into fresh objects halfway.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sophon_ext.optim import FusedAdam, FusedAdamW, FusedLion, FusedSGD, Lion

STEPS = 50
RESTORE_AT = 23
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _one_cycle(opt):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS)  # cycles momentum / betas too


def _step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)


# name -> (fused class, reference class, shared kwargs, scheduler factory)
CASES = {
    "sgd": (FusedSGD, torch.optim.SGD, {"lr": 0.05}, _step_lr),
    "sgd_momentum_dampening": (FusedSGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}, _one_cycle),
    "nesterov": (FusedSGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}, _step_lr),
    "adam": (FusedAdam, torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99)}, _one_cycle),
    "adamw": (FusedAdamW, torch.optim.AdamW, {"lr": 0.01}, _step_lr),
    "lion": (FusedLion, Lion, {"lr": 1e-3, "betas": (0.9, 0.99)}, _step_lr),
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)


def _groups(model: nn.Module):
    return [
        {"params": model[0].parameters(), "weight_decay": 0.05},
        {"params": model[2].parameters(), "lr": 0.02, "weight_decay": 0.0},
    ]


def _closure(model, opt, step, set_to_none=True):
    x, y = _batch(step)

    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_optim_with_groups_scheduler_and_mid_run_restore(case):
    fused_cls, ref_cls, kwargs, make_scheduler = CASES[case]
    ref_model, model = _model(), _model()
    ref_opt = ref_cls(_groups(ref_model), **kwargs)
    ref_sched = make_scheduler(ref_opt)
    opt = fused_cls(_groups(model), **kwargs)
    sched = make_scheduler(opt)
    for step in range(STEPS):
        if step == RESTORE_AT:  # save everything, continue in fresh objects
            saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
            model = _model(seed=99)
            model.load_state_dict(saved["model"])
            opt = fused_cls(_groups(model), **kwargs)
            sched = make_scheduler(opt)
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
        ref_loss = ref_opt.step(_closure(ref_model, ref_opt, step))
        loss = opt.step(_closure(model, opt, step, set_to_none=step % 2 == 0))  # zero_grad both ways
        torch.testing.assert_close(loss, ref_loss, **TOL)
        ref_sched.step()
        sched.step()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=name)
    # the state has torch.optim's layout and values
    ref_state, state = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    assert set(state) == set(ref_state)
    for index in ref_state:
        assert set(state[index]) == set(ref_state[index]) - {"max_exp_avg_sq"}
        for key in state[index]:
            torch.testing.assert_close(state[index][key].double(), ref_state[index][key].double(), **TOL)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([g["lr"] for g in ref_opt.param_groups])


@pytest.mark.parametrize("case", ["sgd_momentum_dampening", "adam", "lion"])
def test_parameters_without_gradient_are_skipped(case):
    """A parameter that gets a gradient only every other step, and one that never does, as in torch.optim."""
    fused_cls, ref_cls, kwargs, _ = CASES[case]
    ref_model, model = _model(), _model()
    extra, ref_extra = nn.Parameter(torch.ones(3, dtype=torch.float64)), nn.Parameter(torch.ones(3, dtype=torch.float64))
    never, ref_never = nn.Parameter(torch.ones(2, dtype=torch.float64)), nn.Parameter(torch.ones(2, dtype=torch.float64))
    ref_opt = ref_cls([*ref_model.parameters(), ref_extra, ref_never], **kwargs)
    opt = fused_cls([*model.parameters(), extra, never], **kwargs)
    for step in range(12):
        for m, e, o in ((ref_model, ref_extra, ref_opt), (model, extra, opt)):
            x, y = _batch(step)
            o.zero_grad()
            logits = m(x) + (e if step % 2 == 0 else 0)
            nn.functional.cross_entropy(logits, y).backward()
            o.step()
    for p, q in zip([*model.parameters(), extra, never], [*ref_model.parameters(), ref_extra, ref_never]):
        torch.testing.assert_close(p, q, **TOL)
    assert set(opt.state_dict()["state"]) == set(ref_opt.state_dict()["state"])  # no state for `never`
    torch.testing.assert_close(never.detach(), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("case", ["sgd_momentum_dampening", "adam", "adamw"])
def test_state_dicts_move_between_torch_optim_and_fused(case):
    fused_cls, ref_cls, kwargs, _ = CASES[case]
    ref_model, model = _model(), _model()
    ref_opt = ref_cls(_groups(ref_model), **kwargs)
    opt = fused_cls(_groups(model), **kwargs)
    for step in range(6):
        ref_opt.step(_closure(ref_model, ref_opt, step))
    model.load_state_dict(ref_model.state_dict())
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # torch -> fused
    _step_both_and_compare(ref_model, ref_opt, model, opt, range(6, 12))
    back = ref_cls(_groups(model), **kwargs)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))  # fused -> torch
    _step_both_and_compare(ref_model, ref_opt, model, back, range(12, 15))


def _step_both_and_compare(ref_model, ref_opt, model, opt, steps):
    for step in steps:
        ref_opt.step(_closure(ref_model, ref_opt, step))
        opt.step(_closure(model, opt, step))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)


def test_parameters_live_in_one_flat_buffer_and_gradients_stay_bound():
    model = _model()
    opt = FusedAdam(model.parameters(), lr=0.01)
    opt.step(_closure(model, opt, 0))
    flat = opt._flat[0].params_flat
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert all(flat.data_ptr() <= ptr < flat.data_ptr() + flat.numel() * flat.element_size() for ptr in ptrs)
    grad_ptrs = [p.grad.data_ptr() for p in model.parameters()]
    opt.step(_closure(model, opt, 1, set_to_none=False))  # backward accumulates into the bound views
    assert [p.grad.data_ptr() for p in model.parameters()] == grad_ptrs
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    # replacing .data (e.g. loading new values that way) is picked up, not lost
    ref = copy.deepcopy(model)
    ref_opt = FusedAdam(ref.parameters(), lr=0.01)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    model[0].bias.data = torch.zeros(8, dtype=torch.float64)
    ref[0].bias.data.zero_()
    opt.step(_closure(model, opt, 2))
    ref_opt.step(_closure(ref, ref_opt, 2))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **TOL)


def test_float32_and_tensor_learning_rate():
    ref_model, model = _model().float(), _model().float()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=torch.tensor(0.01))
    opt = FusedAdamW(model.parameters(), lr=torch.tensor(0.01))
    for step in range(10):
        x, y = _batch(step)
        for m, o in ((ref_model, ref_opt), (model, opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x.float()), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda ps: FusedSGD(ps, lr=-1.0), ValueError, "lr"),
        (lambda ps: FusedSGD(ps, momentum=-0.1), ValueError, "momentum"),
        (lambda ps: FusedSGD(ps, nesterov=True), ValueError, "nesterov"),
        (lambda ps: FusedAdam(ps, betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        (lambda ps: FusedAdamW(ps, eps=-1.0), ValueError, "eps"),
        (lambda ps: FusedLion(ps, weight_decay=-1.0), ValueError, "weight_decay"),
        (lambda ps: FusedAdam(ps, lr="0.1"), TypeError, "lr"),
        (lambda ps: FusedAdam([{"params": ps, "weight_decay": float("nan")}]), ValueError, "weight_decay"),
        (lambda ps: FusedSGD([nn.Parameter(p.detach().half()) for p in ps]), TypeError, "float32 or float64"),
        (lambda ps: FusedSGD([ps[0], nn.Parameter(ps[1].detach().float())]), ValueError, "one dtype"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, error, match):
    params = [nn.Parameter(torch.zeros(2, dtype=torch.float64)) for _ in range(2)]
    with pytest.raises(error, match=match):
        make(params)


def test_unsupported_torch_options_in_a_loaded_state_dict_are_refused():
    model = _model()
    torch_state = torch.optim.Adam(model.parameters(), amsgrad=True).state_dict()
    opt = FusedAdam(model.parameters())
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(torch_state)
