"""Functional optimizers vs torch.optim (and Lion vs its published rule)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from sophon_ext.models import SmallCNN
from sophon_ext.optim import (
    FUNCTIONAL_OPTIMIZERS,
    Lion,
    defaults,
    get_functional_optimizer,
    make_torch_optimizer,
    torch_optimizer_kwargs,
    validate_hparams,
)

STEPS = 20

# (base name, hyperparameters) covering every option of every optimizer
CASES = [
    ("sgd", {"lr": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.02}),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.05}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1}),
    ("rmsprop", {"lr": 0.01}),
    ("rmsprop", {"lr": 0.005, "alpha": 0.9, "momentum": 0.5, "weight_decay": 0.01}),
    ("rmsprop", {"lr": 0.005, "centered": True, "momentum": 0.3}),
    ("adagrad", {"lr": 0.05, "lr_decay": 0.01, "initial_accumulator_value": 0.1, "weight_decay": 0.01}),
    ("adadelta", {"lr": 1.0, "rho": 0.8, "weight_decay": 0.01}),
    ("lion", {"lr": 1e-3, "beta1": 0.8, "beta2": 0.95, "weight_decay": 0.1}),
]


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN(width=4, depth=2).double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    return model, x, y


def _loss_fn(model, x, y):
    def loss(params):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def _torch_trajectory(base, hp, model, x, y):
    if base == "lion":
        opt = Lion(model.parameters(), **torch_optimizer_kwargs(base, hp))
    else:
        opt = make_torch_optimizer(base, model.parameters(), **_split_lr(base, hp))
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def _split_lr(base, hp):
    kwargs = torch_optimizer_kwargs(base, hp)
    return {"lr": kwargs.pop("lr"), "hparams": kwargs}


def _functional_trajectory(base, hp, model, x, y):
    opt = get_functional_optimizer(base)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = opt.init(params)
    loss = _loss_fn(model, x, y)
    for _ in range(STEPS):
        params, state = opt.step(params, grad(loss)(params), state, hp)
    return params


@pytest.mark.parametrize("base,hp", CASES, ids=[f"{b}-{i}" for i, (b, _) in enumerate(CASES)])
def test_matches_torch_optim_for_20_steps_on_small_cnn(base, hp):
    model, x, y = _setup()
    functional = _functional_trajectory(base, hp, model, x, y)
    reference = _torch_trajectory(base, hp, model, x, y)
    start = dict(_setup()[0].named_parameters())
    for name, p in reference.items():
        assert not torch.equal(p, start[name]), f"{name} never moved: the comparison would be vacuous"
        torch.testing.assert_close(functional[name], p, rtol=1e-6, atol=1e-9, msg=f"{base} {hp}: {name}")


def test_lion_class_follows_the_published_rule():
    torch.manual_seed(1)
    p0 = torch.randn(5, 3, dtype=torch.float64)
    grads = [torch.randn(5, 3, dtype=torch.float64) for _ in range(6)]
    lr, beta1, beta2, wd = 0.01, 0.9, 0.99, 0.3
    # the rule written out by hand
    p, m = p0.clone(), torch.zeros_like(p0)
    for g in grads:
        c = beta1 * m + (1 - beta1) * g
        p = p - lr * (torch.sign(c) + wd * p)
        m = beta2 * m + (1 - beta2) * g
    param = torch.nn.Parameter(p0.clone())
    opt = Lion([param], lr=lr, betas=(beta1, beta2), weight_decay=wd)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    torch.testing.assert_close(param.detach(), p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("base", FUNCTIONAL_OPTIMIZERS)
def test_vmap_over_per_trajectory_hyperparameters_equals_separate_runs(base):
    torch.manual_seed(2)
    n = 3
    opt = get_functional_optimizer(base)
    params = {"w": torch.randn(n, 4, 3, dtype=torch.float64), "b": torch.randn(n, 3, dtype=torch.float64)}
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(3)]
    hp_rows = [{"lr": 0.01 * (i + 1), "weight_decay": 0.1 * i} for i in range(n)]
    if base in ("adam", "adamw", "lion"):
        for i, row in enumerate(hp_rows):
            row["beta1"] = 0.8 + 0.05 * i
    if base == "sgd":
        for i, row in enumerate(hp_rows):
            row["momentum"], row["dampening"] = 0.5 * i, 0.2  # row 0: momentum 0 -> plain SGD
    stacked_hp = {k: torch.tensor([row[k] for row in hp_rows], dtype=torch.float64) for k in hp_rows[0]}

    state = vmap(opt.init)(params)
    batched = params
    for g in grads:
        batched, state = vmap(opt.step)(batched, g, state, stacked_hp)
    for i in range(n):
        single = {k: v[i] for k, v in params.items()}
        single_state = opt.init(single)
        for g in grads:
            single, single_state = opt.step(single, {k: v[i] for k, v in g.items()}, single_state, hp_rows[i])
        for k in params:
            torch.testing.assert_close(batched[k][i], single[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("base", FUNCTIONAL_OPTIMIZERS)
def test_gradcheck_through_two_steps(base):
    torch.manual_seed(3)
    opt = get_functional_optimizer(base)
    g1, g2 = torch.randn(2, 4, dtype=torch.float64).unbind(0)
    hp_extra = {"momentum": 0.9, "nesterov": True} if base == "sgd" else {}

    def two_steps(p, lr):
        hp = {"lr": lr, "weight_decay": 0.05, **hp_extra}
        state = opt.init({"p": p})
        # gradients that depend on p, as in a meta-learning inner loop
        params, state = opt.step({"p": p}, {"p": g1 + p * p}, state, hp)
        params, state = opt.step(params, {"p": g2 + params["p"].sin()}, state, hp)
        return params["p"]

    p = torch.randn(4, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(two_steps, (p, lr))


@pytest.mark.parametrize("base", ["adam", "rmsprop", "adagrad"])
def test_meta_gradient_is_finite_for_parameters_that_never_get_a_gradient(base):
    opt = get_functional_optimizer(base)
    p = torch.randn(3, dtype=torch.float64)

    def final_loss(p):
        params, state = {"p": p}, opt.init({"p": p})
        mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)  # entry 1 gets no gradient
        for _ in range(2):
            params, state = opt.step(params, {"p": mask * params["p"]}, state, {"lr": 0.1})
        return (params["p"] ** 2).sum()

    meta = grad(final_loss)(p)
    assert torch.isfinite(meta).all()
    assert meta[1] == pytest.approx(2 * p[1].item())  # untouched entry: d(p^2)/dp only


def test_state_layout_and_defaults():
    opt = get_functional_optimizer("adam")
    state = opt.init({"a.weight": torch.zeros(2, 3)})
    assert set(state) == {"step", "exp_avg:a.weight", "exp_avg_sq:a.weight"}
    assert state["step"].shape == () and state["step"].dtype == torch.float32
    assert opt.state_key("exp_avg", "a.weight") == "exp_avg:a.weight"
    assert defaults("adamw")["weight_decay"] == 0.01
    assert defaults("sgd") is not defaults("sgd")  # a fresh copy each call


@pytest.mark.parametrize(
    "base,hp,error,match",
    [
        ("adam", {"momentum": 0.9}, ValueError, r"unknown hyperparameter.*accepted: \['beta1'"),
        ("sgd", {"lr": -0.1}, ValueError, r"hp\['lr'\]: must be >= 0"),
        ("adam", {"lr": torch.tensor([0.1, -1.0])}, ValueError, r"hp\['lr'\]: must be >= 0.*-1"),
        ("adam", {"beta2": 1.0}, ValueError, r"beta2.*in \[0, 1\)"),
        ("sgd", {"nesterov": True}, ValueError, "requires momentum > 0"),
        ("sgd", {"nesterov": torch.tensor(1.0)}, TypeError, "Python bool"),
        ("adam", {"lr": "fast"}, TypeError, "expected a float or a tensor"),
        ("nadam", {}, ValueError, r"unknown base name 'nadam'; choose one of \['adadelta'"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(base, hp, error, match):
    with pytest.raises(error, match=match):
        validate_hparams(base, hp)


def test_step_rejects_unknown_names_and_mismatched_grads():
    opt = get_functional_optimizer("sgd")
    params = {"w": torch.zeros(3)}
    state = opt.init(params)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        opt.step(params, {"w": torch.zeros(3)}, state, {"betas": 0.9})
    with pytest.raises(ValueError, match=r"missing \['w'\], unexpected \['v'\]"):
        opt.step(params, {"v": torch.zeros(3)}, state, {})
    with pytest.raises(ValueError, match=r"grads\['w'\]: shape \(4,\)"):
        opt.step(params, {"w": torch.zeros(4)}, state, {})


def test_torch_kwargs_and_lion_preset():
    assert torch_optimizer_kwargs("adam", {"beta2": 0.9, "lr": 0.1}) == {"lr": 0.1, "betas": (0.9, 0.9)}
    opt = make_torch_optimizer("lion", [torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert isinstance(opt, Lion) and opt.defaults["betas"] == (0.9, 0.99)
