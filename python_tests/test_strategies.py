"""FineTuneStrategy validation and StrategySampler ranges/reproducibility."""

from __future__ import annotations

import math

import pytest

from sophon_ext import FineTuneStrategy, StrategySampler
from sophon_ext.families import DEFAULT_LR_RANGES
from sophon_ext.strategies import STRATEGY_METHODS


def test_defaults_are_valid_and_every_preset_constructs():
    assert FineTuneStrategy().optimizer == "sgd"
    for name in DEFAULT_LR_RANGES:
        FineTuneStrategy(name, lr=1e-3)
    for method in STRATEGY_METHODS:
        extra = {}
        if method == "custom":
            extra["surgery"] = lambda params, generator: {}
        assert FineTuneStrategy(method=method, **extra).method == method


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"optimizer": "adamax"}, ValueError, r"optimizer: unknown name 'adamax'; choose one of \['adadelta'"),
        ({"lr": -1e-3}, ValueError, "lr: must be a finite number > 0"),
        ({"lr": 0.0}, ValueError, "lr: must be a finite number > 0"),
        ({"lr": float("nan")}, ValueError, "lr: must be a finite number > 0"),
        ({"batch_size": 0}, ValueError, "batch_size: must be an int >= 1"),
        ({"batch_size": 2.5}, ValueError, "batch_size: must be an int >= 1"),
        ({"steps": 0}, ValueError, "steps: must be an int >= 1"),
        ({"method": "lora"}, ValueError, r"method: unknown method 'lora'; choose one of \('full'"),
        ({"method": "probe"}, ValueError, r"method: unknown method 'probe'"),
        ({"method": "custom"}, ValueError, "surgery: method 'custom' needs a callable"),
        ({"surgery": lambda p, g: {}}, ValueError, "surgery: only used with method 'custom'"),
        ({"hparams": {"lr": 0.1}}, ValueError, "set the learning rate with the lr field"),
        ({"optimizer": "adam", "hparams": {"momentum": 0.9}}, ValueError, r"unknown hyperparameter\(s\) \['momentum'\].*accepted"),
        ({"optimizer": "sgd_momentum", "hparams": {"momentum": -0.5}}, ValueError, r"hp\['momentum'\]: must be >= 0"),
        ({"optimizer": "adam", "hparams": {"beta1": 1.5}}, ValueError, r"hp\['beta1'\]: must be in \[0, 1\)"),
        ({"hparams": [1]}, TypeError, "hparams: expected a dict"),
        ({"input_transform": 3}, TypeError, "input_transform: expected a callable"),
        ({"seed": 1.5}, TypeError, "seed: expected an int"),
    ],
)
def test_bad_strategies_name_the_field_and_what_is_accepted(kwargs, error, message):
    with pytest.raises(error, match=message):
        FineTuneStrategy(**kwargs)


def test_sampler_is_reproducible_and_respects_ranges():
    sampler = dict(optimizers=("sgd", "adam", "nesterov"), lr_ranges={"sgd": (1e-3, 1e-2)},
                   methods=("full", "head_only", "freeze_first"), batch_sizes=(8, 16), steps=7, layers=(1, 2),
                   hparams={"adam": {"weight_decay": (0.0, 0.1), "beta2": {"choices": [0.99, 0.999]}, "eps": [1e-8, 1e-6]}},
                   seed=5)
    first = StrategySampler(**sampler).sample(200)
    assert first == StrategySampler(**sampler).sample(200)
    assert first != StrategySampler(**{**sampler, "seed": 6}).sample(200)
    assert {s.optimizer for s in first} == {"sgd", "adam", "nesterov"}
    assert {s.method for s in first} == {"full", "head_only", "freeze_first"}
    assert {s.batch_size for s in first} == {8, 16} and {s.steps for s in first} == {7}
    for s in first:
        low, high = (1e-3, 1e-2) if s.optimizer == "sgd" else DEFAULT_LR_RANGES[s.optimizer]
        assert low <= s.lr <= high
        assert (s.layers in (1, 2)) == (s.method == "freeze_first")
        if s.optimizer == "adam":
            assert 0.0 <= s.hparams["weight_decay"] <= 0.1 and s.hparams["beta2"] in (0.99, 0.999)
            assert 1e-8 <= s.hparams["eps"] <= 1e-6
        else:
            assert s.hparams == {}
    # log-uniform: about half of the SGD rates lie below the geometric midpoint
    sgd = [s.lr for s in first if s.optimizer == "sgd"]
    below = sum(lr < math.sqrt(1e-3 * 1e-2) for lr in sgd) / len(sgd)
    assert 0.3 < below < 0.7
    assert len({s.seed for s in first}) == len(first)


def test_sampler_calls_continue_the_stream():
    a = StrategySampler(seed=1)
    b = StrategySampler(seed=1)
    assert a.sample(3) + a.sample(2) == b.sample(5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizers": ("sgd", "adamax")}, r"optimizers\[1\]: unknown optimizer 'adamax'"),
        ({"optimizers": ()}, "optimizers: must list at least one optimizer"),
        ({"methods": ("custom",)}, r"methods\[0\]: unknown method 'custom'"),
        ({"methods": ()}, "methods: must list at least one method"),
        ({"lr_ranges": {"sgd": (1e-2, 1e-3)}}, r"lr_ranges.sgd: need 0 < low <= high"),
        ({"lr_ranges": {"sgdd": (1e-3, 1e-2)}}, "lr_ranges.sgdd: unknown optimizer"),
        ({"batch_sizes": (0,)}, r"batch_sizes\[0\]: must be >= 1"),
        ({"batch_sizes": (2.5,)}, r"batch_sizes\[0\]: expected int"),
        ({"layers": ()}, "layers: must list at least one layer count"),
        ({"steps": 0}, "steps: must be an int >= 1"),
        ({"hparams": {"adam": {"beta2": (0.999, 0.99)}}}, "hparams.adam.beta2: expected .low, high. with low <= high"),
        ({"hparams": {"adam": {"beta2": {"choices": []}}}}, "hparams.adam.beta2: expected"),
        ({"hparams": {"adam": {"beta1": {"choices": [0.9, 1.5]}}}}, r"hparams.adam: hp\['beta1'\]: must be in \[0, 1\)"),
        ({"hparams": {"adam": {"momentum": 0.9}}}, r"hparams.adam: .*unknown hyperparameter"),
    ],
)
def test_bad_sampler_ranges(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StrategySampler(**kwargs)


def test_sample_count_must_be_positive():
    with pytest.raises(ValueError, match="n: must be an int >= 1"):
        StrategySampler().sample(0)
