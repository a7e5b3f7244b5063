"""The fused multi-trajectory update vs the functional optimizers and torch.optim."""

from __future__ import annotations

import copy

import pytest
import torch

from sophon_ext.models import SmallCNN
from sophon_ext.optim import (
    FusedMultiTrajectoryOptimizer,
    get_functional_optimizer,
    make_torch_optimizer,
    torch_optimizer_kwargs,
)
import sophon_ext.optim.fused as fused_module
from sophon_ext.ops.multi_step import _check_arguments, _reference, multi_step_update_op
from sophon_ext.optim.fused import flat_views

# (kind, nesterov) pairs; sgd covers plain, momentum+dampening and Nesterov rows
KINDS = [("sgd", False), ("sgd", True), ("adam", False), ("adamw", False), ("lion", False)]
STATE_NAMES = {"sgd": ("momentum_buffer", None), "adam": ("exp_avg", "exp_avg_sq"),
               "adamw": ("exp_avg", "exp_avg_sq"), "lion": ("exp_avg", None)}
# 1 and 37 are not multiples of any SIMD width; 1030 spans several vectors
SIZES = [(1, 1), (3, 37), (5, 1030)]


def _random_hparams(n: int, kind: str, nesterov: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    hp = {
        "lr": uniform(0.01, 0.2),
        "momentum": uniform(0.1, 0.95),
        "dampening": torch.zeros(n, dtype=torch.float64) if nesterov else uniform(0.0, 0.5),
        "beta1": uniform(0.3, 0.95),  # both sides of torch's lerp branch at 0.5
        "beta2": uniform(0.9, 0.999),
        "weight_decay": uniform(0.0, 0.2),
        "eps": uniform(1e-8, 1e-3),
    }
    hp["weight_decay"][0] = 0.0  # the no-decay branch
    if kind == "sgd" and not nesterov and n > 1:
        hp["momentum"][1] = 0.0  # plain SGD row among momentum rows
    return hp


def _run_functional_rows(kind, nesterov, params, grads_seq, hp):
    """Each trajectory through the functional optimizer on its own, with float hyperparameters."""
    opt = get_functional_optimizer(kind)
    rows = []
    for i in range(params.shape[0]):
        row_hp = {k: hp[k][i].item() for k in opt.defaults if k in hp}
        if kind == "sgd":
            row_hp["nesterov"] = nesterov
        p, state = {"flat": params[i]}, opt.init({"flat": params[i]})
        for grads in grads_seq:
            p, state = opt.step(p, {"flat": grads[i]}, state, row_hp)
        rows.append((p["flat"], state))
    return rows


@pytest.mark.parametrize("kind,nesterov", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,size", SIZES)
def test_op_matches_functional_optimizer_per_trajectory(kind, nesterov, dtype, n, size):
    gen = torch.Generator().manual_seed(hash((kind, nesterov, n, size)) % 2**31)
    params = torch.randn(n, size, generator=gen, dtype=dtype)
    grads_seq = [torch.randn(n, size, generator=gen, dtype=dtype) for _ in range(3)]
    hp = _random_hparams(n, kind, nesterov, gen)
    first, second = STATE_NAMES[kind]
    # SGD's first step copies the gradient into the buffer, so its old content must not matter;
    # an unused state2 must be neither read nor written
    state1 = torch.randn_like(params) if kind == "sgd" else torch.zeros_like(params)
    state2 = torch.zeros_like(params) if second is not None else torch.randn_like(params)
    unused_state2 = state2.clone()
    initial_state1 = state1.clone()
    step = torch.zeros(n, dtype=dtype)
    fused_params = params.clone()
    for grads in grads_seq:
        multi_step_update_op(fused_params, grads, state1, state2, step, *hp.values(), kind, nesterov)

    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    opt = get_functional_optimizer(kind)
    if dtype == torch.float32:
        # Adam at lr up to 0.2 amplifies rounding (m / (sqrt(v) + eps)): two float32 implementations
        # can differ by more than a fixed tolerance; the fused op must be as close to float64 as torch is
        truth = _run_functional_rows(kind, nesterov, params.double(), [g.double() for g in grads_seq], hp)
        rows32 = _run_functional_rows(kind, nesterov, params, grads_seq, hp)
        for i, ((p64, _), (p32, _)) in enumerate(zip(truth, rows32)):
            fused_error = (fused_params[i].double() - p64).abs().max()
            torch_error = (p32.double() - p64).abs().max()
            assert fused_error <= 4 * torch_error + 2e-6, (i, float(fused_error), float(torch_error))
        tol = {"rtol": 1e-4, "atol": 2e-5}  # state buffers, and a coarse check of the parameters
    for i, (p_ref, state_ref) in enumerate(_run_functional_rows(kind, nesterov, params, grads_seq, hp)):
        torch.testing.assert_close(fused_params[i], p_ref, **tol)
        if kind == "sgd" and hp["momentum"][i] == 0:
            assert torch.equal(state1[i], initial_state1[i])  # plain SGD keeps no buffer
        else:
            torch.testing.assert_close(state1[i], state_ref[opt.state_key(first, "flat")], **tol)
        if second is not None:
            torch.testing.assert_close(state2[i], state_ref[opt.state_key(second, "flat")], **tol)
    if second is None:
        assert torch.equal(state2, unused_state2)
    assert torch.equal(step, torch.full((n,), 3.0, dtype=dtype))
    assert not torch.equal(fused_params, params)


def test_plain_sgd_needs_no_state_buffers():
    params, grads = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    hp = _random_hparams(2, "sgd", False, torch.Generator().manual_seed(0))
    hp["momentum"].zero_()
    expected = params - hp["lr"][:, None] * (grads + hp["weight_decay"][:, None] * params)
    empty = torch.empty(0, dtype=torch.float64)
    multi_step_update_op(params, grads, empty, empty, torch.zeros(2, dtype=torch.float64), *hp.values(), "sgd", False)
    torch.testing.assert_close(params, expected, rtol=1e-14, atol=1e-14)
    hp["momentum"][1] = 0.9
    with pytest.raises(ValueError, match=r"momentum must be 0 when state1 \(momentum buffers\) is empty.*trajectory 1"):
        step = torch.zeros(2, dtype=torch.float64)
        multi_step_update_op(params, grads, empty, empty, step, *hp.values(), "sgd", False)


@pytest.mark.parametrize("kind,nesterov", [("sgd", True), ("adamw", False)])
def test_opcheck(kind, nesterov):
    gen = torch.Generator().manual_seed(1)
    n, size = 3, 19
    args = (torch.randn(n, size, generator=gen), torch.randn(n, size, generator=gen), torch.zeros(n, size),
            torch.zeros(n, size), torch.zeros(n), *_random_hparams(n, kind, nesterov, gen).values(), kind, nesterov)
    torch.library.opcheck(torch.ops.sophon_ext.multi_step_update_.default, args)


def _models(n: int):
    torch.manual_seed(0)
    base = SmallCNN(width=4, depth=2)
    return [copy.deepcopy(base) for _ in range(n)], torch.randn(n, 6, 1, 8, 8), torch.randint(0, 10, (n, 6))


@pytest.mark.parametrize("preset", ["nesterov", "adam", "adamw", "lion"])
def test_bound_modules_train_like_separate_torch_optimizers(preset):
    n = 3
    rows = [{"lr": 0.01 * (i + 1), "weight_decay": 0.01 * i} for i in range(n)]
    fused_models, x, y = _models(n)
    ref_models = copy.deepcopy(fused_models)
    fused = FusedMultiTrajectoryOptimizer.from_modules(fused_models, preset, rows)
    refs = [make_torch_optimizer(preset, m.parameters(), **_split(preset, row)) for m, row in zip(ref_models, rows)]
    for step in range(4):
        if step == 2:
            for m in fused_models:
                m.zero_grad(set_to_none=True)  # breaks the .grad binding: step() must re-bind
        else:
            fused.zero_grad()
        for i, (m, ref, opt) in enumerate(zip(fused_models, ref_models, refs)):
            torch.nn.functional.cross_entropy(m(x[i]), y[i]).backward()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x[i]), y[i]).backward()
            opt.step()
        fused.step()
    for m, ref in zip(fused_models, ref_models):
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert fused_models[0].head.weight.data_ptr() == fused.params["head.weight"][0].data_ptr()


def _split(preset, row):
    from sophon_ext.optim import resolve_preset

    base, merged = resolve_preset(preset, row)
    kwargs = torch_optimizer_kwargs(base, merged)
    return {"lr": kwargs.pop("lr"), "hparams": {k: v for k, v in kwargs.items() if k not in merged or k in row}}


def test_stacked_params_and_functional_state_round_trip():
    gen = torch.Generator().manual_seed(4)
    params = {
        "w": torch.randn(2, 3, 4, generator=gen, dtype=torch.float64),
        "b": torch.randn(2, 4, generator=gen, dtype=torch.float64),
    }
    hp = {"lr": [0.1, 0.2], "beta1": torch.tensor([0.9, 0.5], dtype=torch.float64), "weight_decay": 0.1}
    fused = FusedMultiTrajectoryOptimizer(params, "adam", hp)
    grads = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()} for _ in range(2)]
    for g in grads:
        fused.step(g)
    opt = get_functional_optimizer("adam")
    state = torch.func.vmap(opt.init)(params)
    stacked_hp = {
        name: torch.tensor(values, dtype=torch.float64)
        for name, values in {"lr": [0.1, 0.2], "beta1": [0.9, 0.5], "weight_decay": [0.1, 0.1]}.items()
    }
    ref = params
    for g in grads:
        ref, state = torch.func.vmap(opt.step)(ref, g, state, stacked_hp)
    for k in params:
        torch.testing.assert_close(fused.params[k], ref[k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.functional_state(), state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset", ["nesterov", "adamw", "lion"])
def test_state_dict_round_trip_continues_identically(preset):
    gen = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(3, 2, 5, generator=gen, dtype=torch.float64), "b": torch.randn(3, 5, generator=gen, dtype=torch.float64)}
    grads = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()} for _ in range(6)]
    rows = [{"lr": 0.01 * (i + 1), "weight_decay": 0.1 * i} for i in range(3)]
    straight = FusedMultiTrajectoryOptimizer({k: v.clone() for k, v in params.items()}, preset, rows)
    first = FusedMultiTrajectoryOptimizer({k: v.clone() for k, v in params.items()}, preset, rows)
    for g in grads[:3]:
        straight.step(g)
        first.step(g)
    saved = copy.deepcopy(first.state_dict())
    resumed = FusedMultiTrajectoryOptimizer({k: v.clone() for k, v in first.params.items()}, preset)  # default hparams
    resumed.load_state_dict(saved)
    for g in grads[3:]:
        straight.step(g)
        resumed.step(g)
    for k in params:
        torch.testing.assert_close(resumed.params[k], straight.params[k], rtol=0, atol=0)
    torch.testing.assert_close(resumed.functional_state(), straight.functional_state(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="kind"):
        FusedMultiTrajectoryOptimizer(params, "adam" if preset != "adamw" else "sgd").load_state_dict(saved)
    with pytest.raises(ValueError, match="does not fit"):
        FusedMultiTrajectoryOptimizer({"w": params["w"]}, preset).load_state_dict(saved)


def test_given_buffers_are_updated_in_place():
    # rows 1..2 of a larger (3, P) buffer: the optimizer works on them without copying
    flat, flat_grads = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    views = flat_views(flat[1:], {"w": (2, 3), "b": (1,)})
    expected = {k: v.clone() for k, v in views.items()}
    fused = FusedMultiTrajectoryOptimizer(views, "sgd", {"lr": 0.5}, buffers=(flat[1:], flat_grads[1:]))
    before = flat[0].clone()
    fused.step()
    grads = flat_views(flat_grads[1:], {"w": (2, 3), "b": (1,)})
    for k in views:
        torch.testing.assert_close(views[k], expected[k] - 0.5 * grads[k])
    assert fused.flat_params.data_ptr() == flat[1:].data_ptr() and torch.equal(flat[0], before)
    with pytest.raises(ValueError, match=r"buffers: flat_grads must be a contiguous \(2, 7\)"):
        FusedMultiTrajectoryOptimizer(views, "sgd", buffers=(flat[1:], flat_grads[1:, :6]))


def _op_args(kind="adam", n=2, size=5, dtype=torch.float32, **override):
    args = {"params": torch.zeros(n, size, dtype=dtype), "grads": torch.zeros(n, size, dtype=dtype),
            "state1": torch.zeros(n, size, dtype=dtype), "state2": torch.zeros(n, size, dtype=dtype),
            "step": torch.zeros(n, dtype=dtype)}
    args.update(_random_hparams(n, kind, False, torch.Generator().manual_seed(0)))
    args.update(override)
    return list(args.values())


@pytest.mark.parametrize(
    "kind,override,error,match",
    [
        ("nadam", {}, ValueError, r"unknown kind 'nadam'; accepted: 'adam', 'adamw', 'lion', 'sgd'"),
        (
            "adam",
            {"lr": torch.tensor([0.1, -0.5], dtype=torch.float64)},
            ValueError,
            r"lr must be finite and >= 0 for every trajectory, got -0.5 at trajectory 1",
        ),
        ("adam", {"beta2": torch.tensor([0.9, 1.0], dtype=torch.float64)}, ValueError, r"beta2 must be in \[0, 1\)"),
        ("adam", {"grads": torch.zeros(2, 4)}, ValueError, r"grads must have the shape of params \[2, 5\], got \[2,"),
        ("adam", {"grads": torch.zeros(2, 5, dtype=torch.float64)}, TypeError, "grads must have dtype"),
        ("adam", {"state2": torch.zeros(2, 3)}, ValueError, r"state2 \(exp_avg_sq\) must have the shape of params"),
        ("adam", {"params": torch.zeros(2, 5, dtype=torch.int64)}, TypeError, "params must be float32 or float64"),
        ("adam", {"params": torch.zeros(10)}, ValueError, "params must be 2-D"),
        ("adam", {"params": torch.zeros(5, 2).t()}, ValueError, "params must be contiguous"),
        ("adam", {"lr": torch.zeros(3)}, ValueError, r"lr must have shape \[2\] \(one value per trajectory\)"),
        ("adam", {"eps": torch.zeros(2, dtype=torch.int64)}, TypeError, "eps must be a floating-point tensor"),
    ],
)
def test_op_rejects_bad_input_with_clear_errors(kind, override, error, match):
    with pytest.raises(error, match=match):
        multi_step_update_op(*_op_args(kind if kind in ("adam", "sgd") else "adam", **override), kind, False)


def test_op_rejects_nesterov_outside_sgd_and_without_momentum():
    with pytest.raises(ValueError, match="nesterov applies only to kind 'sgd'"):
        multi_step_update_op(*_op_args("adam"), "adam", True)
    args = _op_args("sgd")
    args[6][0] = 0.0  # momentum of trajectory 0
    with pytest.raises(ValueError, match="momentum must be > 0 with nesterov"):
        multi_step_update_op(*args, "sgd", True)


# the compiled op (its kernel when built) and the pure-PyTorch reference
UPDATES = pytest.mark.parametrize("update", [multi_step_update_op, _reference], ids=["op", "reference"])


@UPDATES
@pytest.mark.parametrize("kind,nesterov,buffers", [(k, nv, True) for k, nv in KINDS] + [("sgd", False, False)])
def test_unchecked_values_give_the_checked_update(update, kind, nesterov, buffers):
    # valid values: check_values=False changes nothing but the check (sgd without buffers: every momentum 0)
    gen = torch.Generator().manual_seed(11)
    n, size = 3, 37
    hp = _random_hparams(n, kind, nesterov, gen)
    if not buffers:
        hp["momentum"].zero_()
    params = torch.randn(n, size, generator=gen, dtype=torch.float64)
    grads_seq = [torch.randn(n, size, generator=gen, dtype=torch.float64) for _ in range(3)]
    state1 = torch.randn_like(params) if buffers else torch.empty(0, dtype=torch.float64)
    runs = {}
    for check_values in (True, False):
        tensors = [params.clone(), state1.clone(), torch.zeros_like(params), torch.zeros(n, dtype=torch.float64)]
        p, s1, s2, step = tensors
        for grads in grads_seq:
            update(p, grads, s1, s2, step, *hp.values(), kind, nesterov, check_values)
        runs[check_values] = tensors
    for checked, unchecked in zip(runs[True], runs[False]):
        assert torch.equal(checked, unchecked)
    assert torch.equal(runs[False][3], torch.full((n,), 3.0, dtype=torch.float64))
    assert not torch.equal(runs[False][0], params)


@UPDATES
def test_unchecked_values_are_used_as_given(update):
    # the contract of check_values=False: the caller checked the values; out-of-range ones are not refused
    lr, eps = torch.tensor([0.1, -0.5], dtype=torch.float64), torch.full((2,), 1e-12, dtype=torch.float64)
    args = _op_args("adam", dtype=torch.float64, lr=lr, eps=eps)
    args[1].copy_(torch.randn(2, 5, generator=torch.Generator().manual_seed(12), dtype=torch.float64))
    refused = "lr must be finite and >= 0 for every trajectory, got -0.5 at trajectory 1"
    for checked in ((), (True,)):  # the default checks
        with pytest.raises(ValueError, match=refused):
            update(*args, "adam", False, *checked)
        assert not args[0].any() and not args[4].any()  # refused before anything was written
    update(*args, "adam", False, False)
    # Adam's first step moves by lr * sign(grad) (up to eps): here uphill on trajectory 1
    torch.testing.assert_close(args[0], -lr[:, None] * args[1].sign(), rtol=0, atol=1e-6)
    assert torch.equal(args[4], torch.ones(2, dtype=torch.float64))


@UPDATES
def test_unchecked_momentum_without_buffers_is_plain_sgd(update):
    # an unchecked momentum cannot make the kernels touch momentum buffers that were not given
    gen = torch.Generator().manual_seed(13)
    params, grads = (torch.randn(2, 37, generator=gen, dtype=torch.float64) for _ in range(2))
    hp = _random_hparams(2, "sgd", False, gen)
    hp["momentum"].fill_(0.9)
    expected = params - hp["lr"][:, None] * (grads + hp["weight_decay"][:, None] * params)
    empty = torch.empty(0, dtype=torch.float64)
    step = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"momentum must be 0 when state1 \(momentum buffers\) is empty"):
        update(params, grads, empty, empty, step, *hp.values(), "sgd", False, True)
    update(params, grads, empty, empty, step, *hp.values(), "sgd", False, False)
    torch.testing.assert_close(params, expected, rtol=1e-14, atol=1e-14)


def test_fused_optimizer_checks_values_once_then_calls_the_op_unchecked(monkeypatch):
    params = {"w": torch.zeros(2, 3, dtype=torch.float64)}
    # the same errors as before, when the hyperparameters are given
    with pytest.raises(ValueError, match=r"hp\['lr'\]: must be >= 0.*-1"):
        FusedMultiTrajectoryOptimizer(params, "adam", {"lr": [0.1, -1.0]})
    with pytest.raises(ValueError, match=r"hp\['beta1'\]: must be in \[0, 1\).*1"):
        FusedMultiTrajectoryOptimizer(params, "adam", {"beta1": [0.9, 1.0]})
    # a rule only the op has: the op's message
    with pytest.raises(ValueError, match="multi_step_update_: lr must be finite and >= 0 for every trajectory, "
                                         "got inf at trajectory 1"):
        FusedMultiTrajectoryOptimizer(params, "adam", {"lr": [0.1, float("inf")]})
    fused = FusedMultiTrajectoryOptimizer(params, "adam", {"lr": [0.1, 0.2]})
    with pytest.raises(ValueError, match="lr must be finite and >= 0 for every trajectory, got inf at trajectory 0"):
        fused.set_hparams({"lr": [float("inf"), 0.2]})
    assert torch.equal(fused.state_dict()["hparams"]["lr"], torch.tensor([0.1, 0.2], dtype=torch.float64))

    check_values_seen = []

    def recording(*args, **kwargs):
        check_values_seen.append(kwargs.get("check_values", args[14] if len(args) > 14 else True))
        return multi_step_update_op(*args, **kwargs)

    monkeypatch.setattr(fused_module, "multi_step_update_op", recording)
    for _ in range(3):
        fused.step({"w": torch.ones(2, 3, dtype=torch.float64)})
    assert check_values_seen == [False, False, False]
    assert torch.equal(fused.step_count, torch.full((2,), 3.0, dtype=torch.float64))
    # a loaded state is checked when loaded (its step counts were not written by the op), and refused whole
    saved = fused.state_dict()
    saved["state"]["step"][1] = -1.0
    with pytest.raises(ValueError, match="step must be finite and >= 0 for every trajectory, got -1.0 at trajectory 1"):
        fused.load_state_dict(saved)
    saved = fused.state_dict()
    saved["hparams"]["eps"][0] = -1.0
    with pytest.raises(ValueError, match="eps must be >= 0 for every trajectory, got -1.0 at trajectory 0"):
        fused.load_state_dict(saved)
    assert torch.equal(fused.step_count, torch.full((2,), 3.0, dtype=torch.float64))
    assert torch.equal(fused.state_dict()["hparams"]["eps"], torch.full((2,), 1e-8, dtype=torch.float64))


def test_device_mismatch_is_reported():
    # the Python checks mirror the C++ ones; a second device is simulated with "meta"
    args = _op_args("adam")
    hps = dict(zip(("lr", "momentum", "dampening", "beta1", "beta2", "weight_decay", "eps"), args[5:]))
    with pytest.raises(ValueError, match="grads must be on device cpu like params, got meta"):
        _check_arguments(args[0], args[1].to("meta"), args[2], args[3], args[4], hps, "adam", False)


def test_wrapper_rejects_bad_configuration():
    params = {"w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"has no fused update; accepted bases: \['adam', 'adamw', 'lion', 'sgd'\]"):
        FusedMultiTrajectoryOptimizer(params, "rmsprop")
    with pytest.raises(ValueError, match="unknown name 'bogus'"):
        FusedMultiTrajectoryOptimizer(params, "bogus")
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['momentum'\]"):
        FusedMultiTrajectoryOptimizer(params, "adam", {"momentum": 0.9})
    with pytest.raises(ValueError, match=r"hp\['lr'\]: must be >= 0.*-1"):
        FusedMultiTrajectoryOptimizer(params, "sgd", [{"lr": 0.1}, {"lr": -1.0}])
    with pytest.raises(ValueError, match="expected one dict per trajectory"):
        FusedMultiTrajectoryOptimizer(params, "sgd", [{"lr": 0.1}])
    with pytest.raises(ValueError, match="must be the same for every trajectory"):
        rows = [{"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "nesterov": False}]
        FusedMultiTrajectoryOptimizer(params, "sgd", rows)
    with pytest.raises(ValueError, match=r"expected a number or 2 values"):
        FusedMultiTrajectoryOptimizer(params, "sgd", {"lr": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match=r"params\['b'\]: every tensor must be \(N=2"):
        FusedMultiTrajectoryOptimizer({"w": torch.zeros(2, 3), "b": torch.zeros(3)}, "sgd")


@pytest.mark.parametrize("kind,nesterov", [("sgd", False), ("adam", False)])
def test_threads_splitting_rows_agree_with_one_thread(kind, nesterov):
    # 3 x 40001 elements: parallel_for chunks of 32768 start and end inside rows
    gen = torch.Generator().manual_seed(5)
    n, size = 3, 40001
    params, grads = torch.randn(n, size, generator=gen), torch.randn(n, size, generator=gen)
    hp = list(_random_hparams(n, kind, nesterov, gen).values())
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p, s1, s2, step = params.clone(), torch.zeros_like(params), torch.zeros_like(params), torch.zeros(n)
            for _ in range(2):
                multi_step_update_op(p, grads, s1, s2, step, *hp, kind, nesterov)
            results.append((p, s1, s2))
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert torch.equal(one, two)


_BASELINE_ISA_SCRIPT = """
import torch, sophon_ext
from sophon_ext.ops.multi_step import _reference, multi_step_update_op
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
g = torch.Generator().manual_seed(0)
for kind in ("sgd", "adam", "adamw", "lion"):
    for dtype in (torch.float32, torch.float64):
        n, size = 3, 37
        hp = [torch.rand(n, generator=g, dtype=torch.float64) * 0.5 for _ in range(7)]
        hp[1][0] = 0.0  # a plain-SGD row
        args = [torch.randn(n, size, generator=g, dtype=dtype), torch.randn(n, size, generator=g, dtype=dtype),
                torch.zeros(n, size, dtype=dtype), torch.zeros(n, size, dtype=dtype), torch.zeros(n, dtype=dtype)]
        ref = [a.clone() for a in args]
        multi_step_update_op(*args, *hp, kind, False)
        _reference(*ref, *hp, kind, False)
        for a, b in zip(args, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
print("ok")
"""


def test_baseline_instruction_set_kernel_matches_reference():
    """The non-AVX2 build of the CPU pass (picked on CPUs without AVX2), forced by ATEN_CPU_CAPABILITY."""
    import os
    import subprocess
    import sys

    from sophon_ext.ops import has_compiled_kernel

    if not has_compiled_kernel("cpu"):
        pytest.skip("compiled library not loaded")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _BASELINE_ISA_SCRIPT]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_op_refuses_tensors_that_require_grad():
    args = _op_args("adam")
    args[1] = args[1].requires_grad_()
    with pytest.raises(ValueError, match="grads requires grad, but the fused update is not differentiable"):
        multi_step_update_op(*args, "adam", False)
    with torch.no_grad():  # no graph is being built: allowed
        multi_step_update_op(*args, "adam", False)
    assert torch.equal(args[4], torch.ones(2))


def test_binding_keeps_existing_gradients_and_updates_models_in_place():
    models, x, y = _models(2)
    for m, xi, yi in zip(models, x, y):
        torch.nn.functional.cross_entropy(m(xi), yi).backward()
    grads = [[p.grad.clone() for p in m.parameters()] for m in models]
    before = [[p.detach().clone() for p in m.parameters()] for m in models]
    fused = FusedMultiTrajectoryOptimizer.from_modules(models, "sgd", {"lr": [0.1, 0.2]})
    fused.step()
    for i, m in enumerate(models):
        for p, g, p0 in zip(m.parameters(), grads[i], before[i]):
            torch.testing.assert_close(p.detach(), p0 - (0.1 * (i + 1)) * g, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind,nesterov", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_op_matches_cpu_op(kind, nesterov, dtype):
    gen = torch.Generator().manual_seed(6)
    n, size = 4, 1031
    cpu = [torch.randn(n, size, generator=gen, dtype=dtype) for _ in range(2)]
    cpu += [torch.zeros(n, size, dtype=dtype), torch.zeros(n, size, dtype=dtype), torch.zeros(n, dtype=dtype)]
    hp = list(_random_hparams(n, kind, nesterov, gen).values())
    cuda = [t.cuda() for t in cpu]
    for _ in range(3):
        multi_step_update_op(*cpu, *hp, kind, nesterov)
        multi_step_update_op(*cuda, *(h.cuda() for h in hp), kind, nesterov)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b.cpu(), a, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_op_rejects_bad_values_and_devices():
    args = [t.cuda() for t in _op_args("adam", lr=torch.tensor([0.1, -0.5], dtype=torch.float64))]
    with pytest.raises(ValueError, match="lr must be finite and >= 0 for every trajectory, got -0.5 at trajectory 1"):
        multi_step_update_op(*args, "adam", False)
    args = [t.cuda() for t in _op_args("adam")]
    args[1] = args[1].cpu()
    with pytest.raises(ValueError, match="grads must be on device cuda:0 like params, got cpu"):
        multi_step_update_op(*args, "adam", False)
