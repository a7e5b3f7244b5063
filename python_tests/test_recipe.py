"""Recipe: one check of the shared fields for strategies and attacks, each kind's own rules, the conversion."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sophon_ext import FineTuneStrategy, Recipe, Sophon
from sophon_ext.attack import AttackSpec
from sophon_ext.errors import UserInputError, UserInputTypeError
from sophon_ext.recipe import RECIPE_FIELDS

from test_engine import clone, domains, pretrained, small_config  # noqa: F401  (fixtures)

KINDS = (FineTuneStrategy, AttackSpec)


# ---------------------------------------------------------------- the shared check

@pytest.mark.parametrize("kwargs, error, message", [
    ({"optimizer": "adamax"}, UserInputError, r"optimizer: unknown name 'adamax'; choose one of \['adadelta'"),
    ({"lr": 0.0}, UserInputError, r"lr: must be a finite number > 0, got 0\.0"),
    ({"lr": -1e-3}, UserInputError, r"lr: must be a finite number > 0, got -0\.001"),
    ({"lr": math.nan}, UserInputError, r"lr: must be a finite number > 0, got nan"),
    ({"lr": math.inf}, UserInputError, r"lr: must be a finite number > 0, got inf"),
    ({"lr": "fast"}, UserInputTypeError, r"lr: must be a finite number > 0, got 'fast'"),
    ({"lr": None}, UserInputTypeError, r"lr: must be a finite number > 0, got None"),
    ({"batch_size": 0}, UserInputError, r"batch_size: must be an int >= 1, got 0"),
    ({"batch_size": -3}, UserInputError, r"batch_size: must be an int >= 1, got -3"),
    ({"batch_size": True}, UserInputTypeError, r"batch_size: must be an int >= 1, got True"),
    ({"batch_size": 2.5}, UserInputTypeError, r"batch_size: must be an int >= 1, got 2\.5"),
    ({"seed": 1.5}, UserInputTypeError, r"seed: expected an int, got 1\.5"),
    ({"seed": "3"}, UserInputTypeError, r"seed: expected an int, got '3'"),
    ({"seed": False}, UserInputTypeError, r"seed: expected an int, got False"),
    ({"hparams": [1]}, UserInputTypeError, r"hparams: expected a dict of optimizer hyperparameters, got list"),
    ({"hparams": {"lr": 0.1}}, UserInputError, r"hparams: set the learning rate with the lr field, not hparams\['lr'\]"),
])
def test_every_kind_checks_the_shared_fields_with_the_same_named_error(kwargs, error, message):
    texts = []
    for kind in KINDS:
        with pytest.raises(error, match=f"^{message}") as caught:
            kind(**kwargs)
        assert isinstance(caught.value, ValueError)  # callers that catch ValueError keep working
        if error is UserInputTypeError:
            assert isinstance(caught.value, TypeError)
        texts.append(str(caught.value))
    assert len(set(texts)) == 1, texts


def test_an_unknown_method_is_named_by_every_kind():
    for kind, word in ((FineTuneStrategy, "method"), (AttackSpec, "attack method")):
        with pytest.raises(UserInputError, match=rf"^method: unknown {word} 'nope'; choose one of \('full'"):
            kind(method="nope")


def test_layers_given_as_a_tuple_are_kept_as_a_list_by_every_kind():
    for kind in KINDS:
        recipe = kind(method="freeze_first", layers=("features.0", "features.1"))
        assert recipe.layers == ["features.0", "features.1"]
        assert kind(method="freeze_first", layers=2).layers == 2


def test_both_kinds_are_recipes_with_the_shared_fields():
    for kind in (FineTuneStrategy, AttackSpec):
        assert issubclass(kind, Recipe)
        assert set(RECIPE_FIELDS) <= {f.name for f in dataclasses.fields(kind)}


# ---------------------------------------------------------------- each kind's own fields, defaults and rules

def test_a_strategy_keeps_its_fields_order_defaults_and_rules():
    assert [f.name for f in dataclasses.fields(FineTuneStrategy)] == [
        "optimizer", "lr", "batch_size", "steps", "method", "hparams", "layers", "seed", "surgery", "input_transform"]
    default = FineTuneStrategy()
    assert (default.optimizer, default.lr, default.batch_size, default.steps, default.method) == ("sgd", 1e-2, 32, 10, "full")
    assert (default.hparams, default.layers, default.seed, default.surgery, default.input_transform) == ({}, None, 0, None, None)
    positional = FineTuneStrategy("adam", 1e-3, 16, 3, "reinit_layers", {"weight_decay": 1e-4}, 2, 7)
    assert positional == FineTuneStrategy(optimizer="adam", lr=1e-3, batch_size=16, steps=3, method="reinit_layers",
                                          hparams={"weight_decay": 1e-4}, layers=2, seed=7)
    assert repr(positional).startswith("FineTuneStrategy(optimizer='adam', lr=0.001, batch_size=16, steps=3, ")
    # simulated methods and "custom" only; the weight decay stays in hparams; lr is a number, not text
    for method in ("lora", "probe"):
        with pytest.raises(ValueError, match=f"method: unknown method '{method}'"):
            FineTuneStrategy(method=method)
    assert FineTuneStrategy(method="custom", surgery=lambda params, generator: {}).method == "custom"
    with pytest.raises(ValueError, match="surgery: method 'custom' needs a callable"):
        FineTuneStrategy(method="custom")
    with pytest.raises(ValueError, match="steps: must be an int >= 1, got 0"):
        FineTuneStrategy(steps=0)
    with pytest.raises(TypeError, match="input_transform: expected a callable"):
        FineTuneStrategy(input_transform=3)
    with pytest.raises(ValueError, match="lr: must be a finite number > 0, got '0.1'"):
        FineTuneStrategy(lr="0.1")
    assert FineTuneStrategy(optimizer="adamw", hparams={"weight_decay": 1e-2}).hparams == {"weight_decay": 1e-2}
    assert not hasattr(FineTuneStrategy(), "weight_decay")


def test_an_attack_keeps_its_fields_order_defaults_and_rules():
    assert [f.name for f in dataclasses.fields(AttackSpec)] == [
        "method", "optimizer", "lr", "batch_size", "epochs", "weight_decay", "schedule", "layers", "rank", "seed",
        "hparams", "lora_alpha", "target_modules", "adapter"]
    default = AttackSpec()
    assert (default.method, default.optimizer, default.lr, default.batch_size, default.epochs) == ("full", "adam", 1e-3, 64, 10)
    assert (default.weight_decay, default.schedule, default.layers, default.rank, default.seed) == (0.0, "constant", None, 4, 0)
    assert (default.hparams, default.lora_alpha, default.target_modules, default.adapter) == ({}, None, None, "builtin")
    positional = AttackSpec("lora", "sgd", 0.1, 8, 2, 1e-4, "cosine", None, 2, 5, {}, 4.0, ("q", "v"))
    assert positional == AttackSpec(method="lora", optimizer="sgd", lr=0.1, batch_size=8, epochs=2, weight_decay=1e-4,
                                    schedule="cosine", rank=2, seed=5, lora_alpha=4.0, target_modules=["q", "v"])
    assert positional.name == "lora-sgd-lr0.1-bs8-ep2-wd0.0001-cosine-r2-a4-Tq+v-s5"
    assert list(positional.to_dict()) == ["method", "optimizer", "lr", "batch_size", "epochs", "weight_decay", "schedule",
                                          "layers", "rank", "seed", "hparams", "lora_alpha", "target_modules"]
    assert repr(default).startswith("AttackSpec(method='full', optimizer='adam', lr=0.001, batch_size=64, epochs=10, ")
    # every registered method, lora fields only with lora, the weight decay a field, numbers also as text
    for method in ("lora", "probe", "reframe"):
        assert AttackSpec(method=method).method == method
    with pytest.raises(ValueError, match="method: unknown attack method 'custom'"):
        AttackSpec(method="custom")
    with pytest.raises(ValueError, match="target_modules: only the lora method reads them, got method 'full'"):
        AttackSpec(target_modules=["q"])
    with pytest.raises(ValueError, match=r"hparams: set the weight decay with the weight_decay field, not hparams\["):
        AttackSpec(hparams={"weight_decay": 1e-4})
    with pytest.raises(ValueError, match="weight_decay: must be >= 0, got -1.0"):
        AttackSpec(weight_decay=-1)
    with pytest.raises(TypeError, match="epochs: expected an int, got 2.5"):
        AttackSpec(epochs=2.5)
    with pytest.raises(ValueError, match="epochs, rank: must be >= 1, got 10, 0"):
        AttackSpec(rank=0)
    as_text = AttackSpec(lr="1e-3", weight_decay="1e-4")  # YAML reads 1e-3 as a string
    assert (as_text.lr, as_text.weight_decay) == (1e-3, 1e-4) and isinstance(as_text.lr, float)


# ---------------------------------------------------------------- conversion

def test_a_strategy_converts_to_an_attack_and_back_with_its_weight_decay_moved():
    strategy = FineTuneStrategy(optimizer="adamw", lr=3e-3, batch_size=16, steps=4, method="freeze_first",
                                hparams={"weight_decay": 1e-2, "beta2": 0.99}, layers=["features.0"], seed=11)
    attack = AttackSpec.from_recipe(strategy, epochs=2, schedule="cosine")
    assert {name: getattr(attack, name) for name in RECIPE_FIELDS} == {
        "method": "freeze_first", "optimizer": "adamw", "lr": 3e-3, "batch_size": 16, "layers": ["features.0"],
        "seed": 11, "hparams": {"beta2": 0.99}}
    assert (attack.weight_decay, attack.epochs, attack.schedule) == (1e-2, 2, "cosine")
    # the source is not changed and shares no mutable value with the result
    assert strategy.hparams == {"weight_decay": 1e-2, "beta2": 0.99}
    assert attack.hparams is not strategy.hparams and attack.layers is not strategy.layers
    back = FineTuneStrategy.from_recipe(attack, steps=4)
    assert back == strategy
    assert {name: getattr(back, name) for name in RECIPE_FIELDS} == {name: getattr(strategy, name) for name in RECIPE_FIELDS}


def test_an_attack_converts_to_a_strategy_and_back():
    attack = AttackSpec(method="reinit_head", optimizer="sgd_momentum", lr=0.05, batch_size=20, epochs=3,
                        weight_decay=1e-4, hparams={"momentum": 0.5}, seed=2)
    strategy = FineTuneStrategy.from_recipe(attack)
    assert strategy.hparams == {"momentum": 0.5, "weight_decay": 1e-4}
    assert (strategy.method, strategy.optimizer, strategy.lr, strategy.batch_size, strategy.seed) == (
        "reinit_head", "sgd_momentum", 0.05, 20, 2)
    assert strategy.steps == 10  # a field only strategies have: its default unless given
    assert AttackSpec.from_recipe(strategy, epochs=3) == attack
    # no weight decay: none in hparams, and 0.0 on the way back
    plain = AttackSpec(optimizer="adam", lr=1e-2)
    assert FineTuneStrategy.from_recipe(plain).hparams == {}
    assert AttackSpec.from_recipe(FineTuneStrategy.from_recipe(plain)) == plain


def test_conversion_between_like_kinds():
    attack = AttackSpec(method="full", optimizer="rmsprop", lr=1e-3, weight_decay=5e-3, seed=4)
    assert AttackSpec.from_recipe(attack) == attack  # field to field
    strategy = FineTuneStrategy(optimizer="adam", hparams={"weight_decay": 0.0}, seed=3, steps=2)
    assert FineTuneStrategy.from_recipe(strategy, steps=2) == strategy  # hparams to hparams, kept as they are
    # fields override shared ones; a weight decay given explicitly wins over the carried one
    assert AttackSpec.from_recipe(strategy, lr=0.5, weight_decay=1e-3).lr == 0.5
    assert AttackSpec.from_recipe(strategy, weight_decay=1e-3).weight_decay == 1e-3


def test_conversion_checks_the_target_kind_rules():
    with pytest.raises(UserInputTypeError, match="recipe: expected a Recipe"):
        AttackSpec.from_recipe({"method": "full"})
    custom = FineTuneStrategy(method="custom", surgery=lambda params, generator: {})
    with pytest.raises(UserInputError, match="method: unknown attack method 'custom'"):
        AttackSpec.from_recipe(custom)
    with pytest.raises(UserInputError, match="method: unknown method 'lora'"):
        FineTuneStrategy.from_recipe(AttackSpec(method="lora"))
    with pytest.raises(UserInputError, match="steps: must be an int >= 1"):
        FineTuneStrategy.from_recipe(AttackSpec(), steps=0)


# ---------------------------------------------------------------- the engine's probe attacks

FAMILY = {"optimizers": ["adamw", "sgd_momentum", "adam"], "methods": ["full", "freeze_first", "reinit_head"],
          "batch_sizes": [16], "layers": [1, 2],
          "hparams": {"adamw": {"weight_decay": [1e-4, 1e-2]}, "sgd_momentum": {"momentum": [0.5, 0.9], "weight_decay": 1e-3}}}


def test_the_engines_probe_attacks_equal_the_field_by_field_construction(domains, pretrained):  # noqa: F811
    original, restricted = domains
    config = small_config(iterations=1, strategies=FAMILY, num_strategies=2,
                          probes={"every": 1, "count": 24, "epochs": 1, "batch_size": 32})
    engine = Sophon(clone(pretrained), original, restricted, config)
    state = engine.generator.get_state()
    specs = engine._probe_specs()
    engine.generator.set_state(state)
    reference = []
    for _ in range(config.protect.probes.count):  # the probe attacks built field by field from the drawn strategies
        index = engine.sampler.draw_member(engine.generator)
        strategy = engine.sampler.strategy_for(index, engine.generator)
        hparams = dict(strategy.hparams)
        reference.append(AttackSpec(**{
            "epochs": config.protect.probes.epochs, "batch_size": config.protect.probes.batch_size,
            "seed": engine.probes.seed, "method": strategy.method, "optimizer": strategy.optimizer, "lr": strategy.lr,
            "layers": strategy.layers, "weight_decay": float(hparams.pop("weight_decay", 0.0)), "hparams": hparams}))
    assert specs == reference
    assert [s.name for s in specs] == [s.name for s in reference]
    assert [s.to_dict() for s in specs] == [s.to_dict() for s in reference]
    # the draws covered what the conversion moves: weight decays, optimizer hparams, layers
    assert any(s.weight_decay > 0 for s in specs) and any(s.hparams for s in specs)
    assert any(s.layers is not None for s in specs) and all("weight_decay" not in s.hparams for s in specs)
