"""Attack families: the sampler's ranges and coverage, worst-case preference, probes, reproducibility."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from sophon_ext import Sophon
from sophon_ext.config import Config, ConfigError, FamilyConfig
from sophon_ext.families import DEFAULT_LR_RANGES, FamilySampler

from test_engine import clone, domains, pretrained, small_config  # noqa: F401  (fixtures)


def family(**kwargs) -> FamilyConfig:
    return Config.from_dict({"protect": {"strategies": kwargs}}).protect.family


def test_uniform_sampler_draws_every_member_within_its_ranges():
    fam = family(optimizers=["sgd", "adam", "adagrad", "lion"], methods=["full", "reinit_layers", "head_only"],
                 lr_ranges={"adam": [1e-4, 1e-3]}, batch_sizes=[8, 16], layers=[1, 2],
                 hparams={"sgd": {"momentum": [0.5, 0.9]}, "adam": {"beta1": 0.8},
                          "adagrad": {"weight_decay": {"choices": [0.0, 1e-4, 1e-2]}}}, sampler="uniform")
    sampler = FamilySampler(fam, steps=4)
    generator = torch.Generator().manual_seed(0)
    drawn = [sampler.draw(generator) for _ in range(600)]
    counts = Counter(i for i, _ in drawn)
    assert set(counts) == set(range(12)) and min(counts.values()) > 20  # 12 members, ~50 each
    for index, s in drawn:
        member = sampler.members[index]
        assert (s.optimizer, s.method, s.steps) == (member.optimizer, member.method, 4)
        low, high = fam.lr_ranges.get(s.optimizer, DEFAULT_LR_RANGES[s.optimizer])
        assert low <= s.lr <= high
        assert s.batch_size in (8, 16)
        assert (s.layers in (1, 2)) == (s.method == "reinit_layers")
        if s.optimizer == "sgd":
            assert 0.5 <= s.hparams["momentum"] <= 0.9
        if s.optimizer == "adam":
            assert s.hparams == {"beta1": 0.8}
    decays = Counter(s.hparams["weight_decay"] for _, s in drawn if s.optimizer == "adagrad")
    assert set(decays) == {0.0, 1e-4, 1e-2}  # each choice drawn, nothing else
    lrs = [math.log10(s.lr) for _, s in drawn if s.optimizer == "adam"]
    assert min(lrs) < -3.8 and max(lrs) > -3.2  # log-uniform over the whole range
    assert sum(sampler.draws) == 600


@pytest.mark.parametrize("sharpness, low, high", [(1.0, 0.0, 0.1), (3.0, 0.9, 1.0)])
def test_sharpness_concentrates_draws_on_the_worst_of_many_members(sharpness, low, high):
    # 243 members (the strong preset's count), one escaping: estimate 2.0 against 0.1 elsewhere
    fam = family(optimizers=["sgd", "adam", "adagrad"], methods=["full", "reinit_head", "head_only"], lr_bins=27,
                 sampler="worst_case", floor=0.0, sharpness=sharpness)
    sampler = FamilySampler(fam, steps=2)
    assert len(sampler.members) == 243
    for index in range(243):
        sampler.observe(index, 2.0 if index == 100 else 0.1)
        sampler.estimates[index] = 2.0 if index == 100 else 0.1  # exactly, past the smoothing
    probs = sampler.probabilities()
    assert sum(probs) == pytest.approx(1.0)
    assert low <= probs[100] <= high
    assert probs[100] == pytest.approx(2.0 ** sharpness / (2.0 ** sharpness + 242 * 0.1 ** sharpness))


def test_worst_case_sampler_prefers_the_escaping_member_and_keeps_the_floor():
    fam = family(optimizers=["sgd", "adam"], methods=["full", "reinit_head"], sampler="worst_case", floor=0.2)
    sampler = FamilySampler(fam, steps=2)
    assert sampler.probabilities() == pytest.approx([0.25] * 4)  # nothing seen yet
    for index, loss in enumerate([0.1, 0.1, 2.0, 0.1]):
        sampler.observe(index, loss)
    probs = sampler.probabilities()
    assert sum(probs) == pytest.approx(1.0)
    assert probs[2] == max(probs) and probs[2] > 0.7
    assert min(probs) >= 0.2 / 4  # the floor: every member is still drawn
    generator = torch.Generator().manual_seed(1)
    counts = Counter(sampler.draw(generator)[0] for _ in range(2000))
    assert counts[2] > 1400 and all(counts[i] > 50 for i in range(4))
    # the running estimate moves towards new observations
    before = sampler.estimates[2]
    sampler.observe(2, 0.0)
    assert sampler.estimates[2] == pytest.approx(0.9 * before)
    sampler.observe(2, float("nan"))  # ignored
    assert sampler.estimates[2] == pytest.approx(0.9 * before)
    # an escaping probe makes its member the worst one
    sampler.boost(0)
    assert sampler.probabilities()[0] == max(sampler.probabilities())
    # state round trip
    other = FamilySampler(fam, steps=2)
    other.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert other.probabilities() == sampler.probabilities()
    uniform = FamilySampler(family(optimizers=["sgd", "adam"], methods=["full", "reinit_head"], sampler="uniform"), 2)
    uniform.observe(2, 5.0)
    assert uniform.probabilities() == pytest.approx([0.25] * 4)


@pytest.mark.parametrize("fields, message", [
    ({"optimizers": []}, r"protect.strategies.optimizers: must list at least one"),
    ({"optimizers": ["adamax"]}, r"protect.strategies.optimizers\[0\]: unknown optimizer 'adamax'"),
    ({"methods": []}, r"protect.strategies.methods: must list at least one"),
    ({"methods": ["probe"]}, r"protect.strategies.methods\[0\]: unknown method 'probe'"),
    ({"lr_ranges": {"adam": [1e-2, 1e-3]}}, r"protect.strategies.lr_ranges.adam: need 0 < low <= high"),
    ({"lr_ranges": {"adam": [1e-3]}}, r"protect.strategies.lr_ranges.adam: expected \[low, high\]"),
    ({"lr_ranges": {"adamx": [1e-3, 1e-2]}}, r"protect.strategies.lr_ranges.adamx: unknown optimizer"),
    ({"batch_sizes": []}, r"protect.strategies.batch_sizes: must list at least one"),
    ({"batch_sizes": [0]}, r"protect.strategies.batch_sizes\[0\]: must be >= 1"),
    ({"layers": [0]}, r"protect.strategies.layers\[0\]: must be >= 1"),
    ({"hparams": {"sgd_momentum": {"momentum": [0.9, 0.5]}}}, r"protect.strategies.hparams.sgd_momentum.momentum: expected"),
    ({"hparams": {"adam": {"beta1": [0.5, 1.5]}}}, r"protect.strategies: hparams.adam: .*beta1"),
    ({"hparams": {"adam": {"momentum": 0.9}}}, r"protect.strategies: hparams.adam: .*momentum"),
    ({"hparams": {"adam": {"beta1": {"choices": []}}}}, r"protect.strategies.hparams.adam.beta1: expected"),
    ({"hparams": {"adam": {"beta1": {"values": [0.9]}}}}, r"protect.strategies.hparams.adam.beta1: expected"),
    ({"hparams": {"adam": {"beta1": {"choices": [0.9, 1.0]}}}}, r"protect.strategies: hparams.adam: .*beta1"),
    ({"sampler": "best"}, r"protect.strategies.sampler: must be one of"),
    ({"floor": 1.5}, r"protect.strategies.floor: must be in \[0, 1\]"),
    ({"sharpness": 0}, r"protect.strategies.sharpness: must be in \(0, 16\]"),
    ({"smoothing": 0.0}, r"protect.strategies.smoothing: must be in \(0, 1\]"),
])
def test_bad_family_configs_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        family(**fields)


def test_family_needs_trajectories_and_a_large_enough_pool():
    with pytest.raises(ConfigError, match="protect.num_strategies: must be >= 1 with a family"):
        Config.from_dict({"protect": {"strategies": {}, "num_strategies": 0}})
    with pytest.raises(ConfigError, match="protect.pool_size: must be >= the largest strategy batch_size"):
        Config.from_dict({"protect": {"strategies": {"batch_sizes": [64]}, "pool_size": 70, "query_size": 32}})
    assert Config().protect.family is not None  # the default simulates an attack family
    fixed = Config.from_dict({"protect": {"strategies": [{"optimizer": "adam"}]}}).protect
    assert fixed.family is None and fixed.strategies[0].optimizer == "adam"
    with pytest.raises(ConfigError, match=r"protect.strategies\[0\].optimizer: unknown optimizer"):
        Config.from_dict({"protect": {"strategies": [{"optimizer": "adamx"}]}})
    with pytest.raises(ConfigError, match=r"protect.probes.attacks\[0\].method: unknown attack method"):
        Config.from_dict({"protect": {"probes": {"every": 1, "attacks": [{"method": "nope"}]}}})
    with pytest.raises(ConfigError, match="protect.scale_bound: must be >= 1"):
        Config.from_dict({"protect": {"scale_bound": 0.5}})


FAMILY = {"optimizers": ["sgd_momentum", "adam", "rmsprop"], "methods": ["full", "reinit_head"], "batch_sizes": [16],
          "lr_ranges": {"sgd_momentum": [1e-3, 1e-2], "adam": [1e-4, 1e-3], "rmsprop": [1e-4, 1e-3]}}


def test_engine_draws_from_the_family_continues_slots_and_resumes_exactly(domains, pretrained, tmp_path):  # noqa: F811
    original, restricted = domains
    config = small_config(iterations=6, checkpoint_every=2, strategies=FAMILY, num_strategies=2, horizon=6)
    full = Sophon(clone(pretrained), original, restricted, config, out_dir=tmp_path / "full")
    full.run()
    members = [r["members"] for r in full.history]
    assert all(len(m) == 2 for m in members)
    # horizon 6 = 2 FTS steps of K=3: a slot keeps its member for two iterations, then draws again
    assert members[0] == members[1] and members[2] == members[3]
    assert [r["chain_depths"] for r in full.history][:2] == [[0, 0], [3, 3]]
    assert sum(full.sampler.draws) == 6
    assert all(e is not None for e, d in zip(full.sampler.estimates, full.sampler.draws) if d)

    cut = Sophon(clone(pretrained), original, restricted, config, out_dir=tmp_path / "cut")
    cut.run(stop_after=3)
    resumed = Sophon(clone(pretrained), original, restricted, config, out_dir=tmp_path / "cut").resume()
    assert resumed.iteration == 2
    resumed.run()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.sampler.state_dict() == full.sampler.state_dict()


def test_two_runs_with_one_seed_are_identical_on_the_auto_path(domains, pretrained):  # noqa: F811
    """"auto" is settled without timing, so the same config and seed give the same numbers."""
    original, restricted = domains
    config = small_config(iterations=4, strategies=FAMILY, num_strategies=2, simulate_path="auto")
    runs = [Sophon(clone(pretrained), original, restricted, config) for _ in range(2)]
    for run in runs:
        run.run()
    drop = ("seconds",)
    a, b = ([{k: v for k, v in r.items() if k not in drop} for r in run.history] for run in runs)
    assert a == b
    assert runs[0].variant == a[0]["variant"] == "stacked_channels_last"  # the MLP traces; image inputs
    for x, y in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(x, y)


def test_probes_run_real_attacks_and_feed_the_sampler(domains, pretrained, tmp_path):  # noqa: F811
    original, restricted = domains
    config = small_config(iterations=2, strategies=FAMILY, num_strategies=2,
                          probes={"every": 1, "count": 2, "epochs": 1, "batch_size": 32})
    engine = Sophon(clone(pretrained), original, restricted, config, out_dir=tmp_path)
    calls = []

    def always_escapes(model, specs):
        calls.append([s.name for s in specs])
        return [{"attack": s.name, "method": s.method, "optimizer": s.optimizer, "lr": s.lr, "escape": True} for s in specs]

    real_run = engine.probes.run
    engine.probes.run = always_escapes
    record = engine.step()
    assert len(calls) == 1 and len(record["probes"]) == 2
    escaped = engine.sampler.member_of(record["probes"][0]["optimizer"], record["probes"][0]["method"])
    assert engine.sampler.probabilities()[escaped] == max(engine.sampler.probabilities())
    # the real harness: protected and scratch curves on the held-out restricted part, scratch cached per recipe
    spec = engine.probes.spec({"method": "full", "optimizer": "adam", "lr": 1e-3})
    first = real_run(engine.model, [spec])[0]
    assert set(first) >= {"protected_final", "scratch_final", "protected_area", "scratch_area", "escape"}
    assert spec.name in engine.probes._scratch
    assert real_run(engine.model, [spec])[0]["scratch_final"] == first["scratch_final"]
    log = [json.loads(line) for line in engine.log_path.read_text().splitlines()]
    assert log[0]["probes"][0]["escape"] is True


def test_scale_bound_holds_every_tensor_to_its_pretrained_norm(domains, pretrained):  # noqa: F811
    original, restricted = domains
    config = small_config(iterations=5, alpha=5e-2, scale_bound=1.05, guard={"enabled": False})
    engine = Sophon(clone(pretrained), original, restricted, config)
    engine.run()
    for name, p in engine.params.items():
        assert float(p.detach().norm()) <= 1.05 * engine.reference_norms[name] * (1 + 1e-6), name


def test_presets_are_valid_configs():
    from sophon_ext.presets import preset_names, preset_overrides

    assert {"demo", "strong"} <= set(preset_names())
    demo = Config().replace(preset_overrides("demo"))
    assert demo.protect.family is None and len(demo.protect.strategies) == 6  # a fixed list
    strong = Config().replace(preset_overrides("strong"))
    assert strong.protect.iterations > demo.protect.iterations and strong.protect.family is not None
    assert Config().protect.family is not None  # the library default: an attack family
    with pytest.raises(ConfigError, match="preset: unknown preset 'nope'"):
        preset_overrides("nope")


def test_lr_bins_split_each_range_into_members():
    fam = family(optimizers=["adam"], methods=["full"], lr_ranges={"adam": [1e-4, 1e-1]}, lr_bins=3, sampler="uniform")
    sampler = FamilySampler(fam, steps=2)
    assert [m.name for m in sampler.members] == ["full/adam/lr1of3", "full/adam/lr2of3", "full/adam/lr3of3"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        index, s = sampler.draw(generator)
        band = sampler.members[index].lr_bin
        assert 10 ** (-4 + band) <= s.lr <= 10 ** (-3 + band) * (1 + 1e-12)
        assert sampler.member_of("adam", "full", s.lr) == index
    assert sampler.member_of("adam", "full", 1.0) == 2 and sampler.member_of("adam", "full", 1e-9) == 0
    assert sampler.member_of("sgd", "full", 1e-2) is None
    with pytest.raises(ConfigError, match="protect.strategies.lr_bins: must be >= 1"):
        family(lr_bins=0)


def test_sophon_demo_runs_the_demo_preset_unless_told_otherwise():
    from sophon_ext.cli import build_config, build_parser
    from sophon_ext.presets import preset_overrides

    parse = build_parser().parse_args
    demo = Config().replace(preset_overrides("demo"))
    assert build_config(parse(["demo"])) == demo
    assert build_config(parse(["demo", "--preset", "strong"])).protect.family is not None
    assert build_config(parse(["config"])) == Config()  # other commands start from the library default
    assert build_config(parse(["demo", "--mode", "generation"])).mode == "generation"  # generation keeps its own


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_sampler_steps_must_be_a_positive_int(steps):
    with pytest.raises(ValueError, match="steps: must be an int >= 1"):
        FamilySampler(family(), steps=steps)


def test_a_family_may_simulate_redo_and_a_model_it_cannot_change_is_refused_first(domains, pretrained):  # noqa: F811
    original, restricted = domains
    fam = {"optimizers": ["adam"], "methods": ["redo_head", "redo"], "batch_sizes": [16], "lr_ranges": {"adam": [1e-3, 1e-2]}}
    config = small_config(iterations=2, strategies=fam, num_strategies=2)
    engine = Sophon(clone(pretrained), original, restricted, config)
    engine.run()
    assert {m.split("/")[0] for r in engine.history for m in r["members"]} <= {"redo_head", "redo"}
    assert all(math.isfinite(r["sup_loss"]) for r in engine.history)
    normed = clone(pretrained)
    normed.body.insert(2, torch.nn.BatchNorm1d(normed.head.in_features))
    with pytest.raises(ValueError, match=r"protect.strategies.methods\[0\]: method 'redo_head' cannot change this model: "
                                         "ReDo: models with normalisation layers are not supported"):
        Sophon(normed, original, restricted, config)
