"""Generation mode: the GenerationTask plug-in, sample grids, the MMD distance, the built-in domains."""

import math

import pytest
import torch

from sophon_ext import functional as SF
from sophon_ext.tasks import make_task
from sophon_ext.tasks.generation import GenerationTask
from sophon_ext.tasks.generation.metrics import (
    generation_distance,
    make_grid,
    median_bandwidth,
    mmd2,
    random_conv_features,
    save_labelled_grids,
    save_sample_grid,
)
from sophon_ext.tasks.generation.unet import TinyUNet


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    model = TinyUNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(), image_size=8, groups=4)
    with torch.no_grad():  # a non-zero output so losses depend on the weights
        model.conv_out.weight.normal_(0, 0.1)
    return model


def images(n=6, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- the task


def test_make_task_builds_generation_task():
    task = make_task("generation", suppression="neg_mse", num_timesteps=50)
    assert isinstance(task, GenerationTask)
    assert task.metric_name == "denoising_loss" and task.higher_is_better is False and task.name == "generation"
    assert task.has_head is False  # head-based attacks refuse a noise predictor
    with pytest.raises(ValueError, match="suppression:"):
        GenerationTask(suppression="ice")
    with pytest.raises(ValueError, match="eval_draws:"):
        GenerationTask(eval_draws=0)
    with pytest.raises(ValueError, match="num_timesteps:"):
        GenerationTask(num_timesteps=0)


def test_prepare_draws_timesteps_and_noise_from_the_generator():
    task = GenerationTask(num_timesteps=100)
    x, y = images(), torch.zeros(6, dtype=torch.long)
    (x_t, t), eps = task.prepare(x, y, torch.Generator().manual_seed(1))
    (x_t2, t2), eps2 = task.prepare(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(x_t, x_t2) and torch.equal(t, t2) and torch.equal(eps, eps2)
    assert t.shape == (6,) and eps.shape == x.shape and 0 <= int(t.min()) and int(t.max()) < 100
    abar = task.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * x + (1 - abar).sqrt() * eps)
    with pytest.raises(TypeError, match="x:"):
        task.prepare(torch.zeros(2, 1, 8, 8, dtype=torch.long), y[:2])


def test_losses_closed_forms_and_weights():
    task = GenerationTask()
    out = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    eps = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    mse = ((out - eps) ** 2).mean(dim=(1, 2, 3))
    weight = torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(task.adaptation_loss(out, eps), mse.mean())
    torch.testing.assert_close(task.original_loss(out, eps, weight), (mse * weight).sum() / weight.sum())
    # A zero-weight sample does not count: same as dropping it.
    torch.testing.assert_close(task.adaptation_loss(out, eps, weight.clamp(max=1)), mse[[0, 2, 3]].mean())
    dos = (out**2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(GenerationTask(suppression="dos").suppression_loss(out, eps, weight), (dos * weight).sum() / weight.sum())
    torch.testing.assert_close(GenerationTask(suppression="neg_mse").suppression_loss(out, eps), -mse.mean())
    none = GenerationTask(suppression="none").suppression_loss(out.requires_grad_(), eps)
    assert none.item() == 0.0
    none.backward()
    assert torch.count_nonzero(out.grad) == 0
    # The package's loss functions are what the task calls.
    torch.testing.assert_close(SF.denial_of_service_loss(out.detach()), dos.mean())


def test_evaluate_is_seeded_and_independent_of_batch_size():
    task = GenerationTask(num_timesteps=100)
    model, x = tiny_unet(), images(10)
    model.train()
    a = task.evaluate(model, x, torch.zeros(10, dtype=torch.long), batch_size=3, seed=4)
    b = task.evaluate(model, x, torch.zeros(10, dtype=torch.long), batch_size=512, seed=4)
    c = task.evaluate(model, x, torch.zeros(10, dtype=torch.long), seed=5)
    assert model.training
    assert set(a) == {"denoising_loss", "loss"} and a["loss"] == a["denoising_loss"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["loss"] != c["loss"]
    # Reference: the same draws by hand.
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 100, (10,), generator=g)
    eps = torch.randn(x.shape, generator=g)
    model.eval()
    with torch.no_grad():
        expected = (model(task.schedule.q_sample(x, t, eps), t) - eps).square().mean().item()
    assert a["loss"] == pytest.approx(expected, rel=1e-5)


def test_evaluate_with_several_draws_averages_them():
    model, x, y = tiny_unet(), images(5), torch.zeros(5, dtype=torch.long)
    two = GenerationTask(num_timesteps=100, eval_draws=2).evaluate(model, x, y, seed=0)["loss"]
    g = torch.Generator().manual_seed(0)
    task = GenerationTask(num_timesteps=100)
    total = 0.0
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            t = torch.randint(0, 100, (5,), generator=g)
            eps = torch.randn(x.shape, generator=g)
            total += (model(task.schedule.q_sample(x, t, eps), t) - eps).square().mean().item()
    assert two == pytest.approx(total / 2, rel=1e-5)


def test_check_model_errors():
    task = GenerationTask()
    x, y = images(3), torch.zeros(3, dtype=torch.long)
    task.check_model(tiny_unet(), x, y)
    with pytest.raises(TypeError, match="model:"):
        task.check_model(torch.nn.Conv2d(1, 1, 3, padding=1), x, y)  # takes one argument, not (x_t, t)
    with pytest.raises(ValueError, match="model:"):
        task.check_model(lambda_module(lambda x_t, t: x_t.flatten(1)), x, y)
    with pytest.raises(ValueError, match="dataset:"):
        task.check_model(tiny_unet(), x[:0], y[:0])


def lambda_module(fn):
    class Wrapped(torch.nn.Module):
        def forward(self, x_t, t):
            return fn(x_t, t)

    return Wrapped()


def test_suppression_lowers_restricted_objective_and_training_lowers_denoising_loss():
    # A few plain gradient steps on each loss move it the right way (the losses are usable objectives).
    task = GenerationTask(num_timesteps=100)
    x, y = images(16), torch.zeros(16, dtype=torch.long)
    for loss_fn in (task.suppression_loss, task.adaptation_loss):
        model = tiny_unet()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        inputs, eps = task.prepare(x, y, torch.Generator().manual_seed(0))
        before = loss_fn(model(*inputs), eps).item()
        for _ in range(15):
            loss = loss_fn(model(*inputs), eps)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss_fn(model(*inputs), eps).item() < before


# ----------------------------------------------------------------------------- grids and distance


def test_make_grid_layout():
    imgs = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    grid = make_grid(imgs, nrow=2, padding=1)
    assert grid.shape == (1, 2 * 3 + 1, 2 * 3 + 1)
    assert grid[0, 1:3, 1:3].eq(0.0).all() and grid[0, 1:3, 4:6].eq(0.5).all() and grid[0, 4:6, 1:3].eq(1.0).all()
    assert grid[0, 0].eq(1.0).all()  # padding
    with pytest.raises(ValueError, match="images:"):
        make_grid(torch.zeros(2, 2, 4, 4))


def test_save_sample_grid_png(tmp_path):
    from PIL import Image

    path = save_sample_grid(images(5), tmp_path / "sub" / "grid.png", nrow=5, scale=2)
    with Image.open(path) as img:
        assert img.size == ((5 * 9 + 1) * 2, (9 + 1) * 2) and img.mode == "L"
    rgb = save_sample_grid(torch.zeros(4, 3, 4, 4), tmp_path / "rgb.png", scale=1)
    with Image.open(rgb) as img:
        assert img.mode == "RGB" and img.size == (11, 11)
    panels = save_labelled_grids({"a": images(4), "b": images(4, seed=1)}, tmp_path / "panels.png", title="t")
    assert panels.stat().st_size > 0


def naive_mmd2(x, y, bw):
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / (2 * bw * bw))  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd2_matches_naive_double_sum():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64) + 0.5
    assert mmd2(x, y, 1.3) == pytest.approx(naive_mmd2(x, y, 1.3), rel=1e-10)
    assert mmd2(x, y, 1.3) == pytest.approx(mmd2(y, x, 1.3), rel=1e-12)
    # two points at distance d, one point each: k(x,x') terms need pairs, so use 2 + 2
    a, b = torch.tensor([[0.0], [0.0]]), torch.tensor([[1.0], [1.0]])
    assert mmd2(a, b, 1.0) == pytest.approx(2 - 2 * math.exp(-0.5))
    with pytest.raises(ValueError, match="bandwidth:"):
        mmd2(x, y, 0.0)
    with pytest.raises(ValueError, match="x, y:"):
        mmd2(x, y[:, :2], 1.0)


def test_median_bandwidth():
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    assert median_bandwidth(x) == pytest.approx(2.0)  # distances 1, 2, 3
    assert median_bandwidth(torch.zeros(3, 2)) == 1.0


def test_generation_distance_orders_distributions():
    g = torch.Generator().manual_seed(0)
    real = torch.tanh(torch.randn(60, 1, 8, 8, generator=g))
    same = torch.tanh(torch.randn(60, 1, 8, 8, generator=g))
    shifted = torch.tanh(torch.randn(60, 1, 8, 8, generator=g) + 1.0)
    for features in ("pixels", "random_conv"):
        near = generation_distance(same, real, features=features)
        far = generation_distance(shifted, real, features=features)
        assert abs(near) < far and far > 0
    assert random_conv_features(real, seed=3).shape == (60, 64)
    torch.testing.assert_close(random_conv_features(real, seed=3), random_conv_features(real, seed=3))
    with pytest.raises(ValueError, match="features:"):
        generation_distance(same, real, features="inception")
    with pytest.raises(ValueError, match="generated, real:"):
        generation_distance(same[:, :, :4], real)


def test_inspect_model_samples_grid_and_distance(tmp_path):
    from PIL import Image

    task = GenerationTask(num_timesteps=50, num_samples=6, sample_steps=4)
    model, real = tiny_unet(), images(10)
    first = task.inspect_model(model, real, tmp_path / "grid.png", seed=1)
    second = task.inspect_model(model, real, None, seed=1)
    assert set(first) == {"samples", "mmd_random_conv", "mmd_pixels", "samples_png"} and first["samples"] == 6
    with Image.open(first["samples_png"]) as img:
        assert img.size == ((3 * 9 + 1) * 4, (2 * 9 + 1) * 4)
    # seeded: the same samples, hence the same distances
    assert second["samples_png"] is None
    assert first["mmd_pixels"] == second["mmd_pixels"] and first["mmd_random_conv"] == second["mmd_random_conv"]
    with pytest.raises(ValueError, match="num_samples:"):
        GenerationTask(num_samples=1)
    with pytest.raises(ValueError, match="reference:"):
        task.inspect_model(model, real[:1])


# ----------------------------------------------------------------------------- through the engine

SIDE = 8


def blob_domain(seed: int, n: int = 160) -> "ArrayDataset":
    """Smooth bright blobs at random places (one image distribution)."""
    from sophon_ext.data import ArrayDataset

    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, 1, 1, generator=g) * (SIDE - 1)
    grid = torch.arange(SIDE, dtype=torch.float32)
    d2 = (grid.view(1, SIDE, 1) - centre[:, 0]) ** 2 + (grid.view(1, 1, SIDE) - centre[:, 1]) ** 2
    return ArrayDataset((2 * torch.exp(-d2 / 4.0) - 1).unsqueeze(1), torch.zeros(n, dtype=torch.long))


def stripe_domain(seed: int, n: int = 160) -> "ArrayDataset":
    """Vertical stripes of random phase (another image distribution)."""
    from sophon_ext.data import ArrayDataset

    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(n, 1, 1, 1, generator=g) * 6.28
    x = torch.sin(torch.arange(SIDE, dtype=torch.float32).view(1, 1, 1, SIDE) * 1.5 + phase).expand(n, 1, SIDE, SIDE)
    return ArrayDataset(x.contiguous(), torch.zeros(n, dtype=torch.long))


@pytest.fixture(scope="module")
def gen_domains():
    from sophon_ext.data import domain_splits

    return domain_splits(blob_domain(1), seed=0), domain_splits(stripe_domain(2), seed=0)


@pytest.fixture(scope="module")
def gen_pretrained(gen_domains):
    from sophon_ext.config import PretrainConfig
    from sophon_ext.pretrain import pretrain

    torch.manual_seed(0)
    model = TinyUNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(4,), image_size=SIDE, groups=4)
    task = GenerationTask(num_timesteps=100)
    pretrain(model, gen_domains[0].train, task, PretrainConfig(epochs=12, lr=3e-3, batch_size=32), seed=0)
    return model


def gen_config(**protect):
    from sophon_ext.config import Config

    base = {
        "iterations": 4,
        "inner_steps": 2,
        "query_size": 16,
        "pool_size": 64,
        "ntr_batch_size": 32,
        "checkpoint_every": 2,
        "simulate_path": "loop",
        "strategies": [{"optimizer": "adam", "lr": 1e-3, "batch_size": 16}],
        "guard": {"every": 2, "max_drop": 0.5, "drop_is_fraction": True},
    }
    base.update(protect)
    return Config.from_dict({"mode": "generation", "seed": 3, "task": {"suppression": "dos", "num_timesteps": 100}, "protect": base})


def test_protection_lowers_suppression_objective_and_keeps_original_denoising(gen_domains, gen_pretrained):
    import copy

    from sophon_ext import Sophon

    original, restricted = gen_domains
    task = GenerationTask(num_timesteps=100)
    start = task.evaluate(gen_pretrained, original.test.x, original.test.y)["denoising_loss"]
    assert start < 0.5  # the fixture really learned to denoise its domain
    engine = Sophon(copy.deepcopy(gen_pretrained), original, restricted, gen_config(iterations=20, alpha=3e-3, beta=3e-3))
    result = engine.run()
    losses = [r["sup_loss_last"] for r in result.history]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    # The restricted-domain DoS objective (||eps_hat||^2 on held-out restricted data) went down too.
    def dos(model):
        (x_t, t), _ = task.prepare(restricted.test.x, restricted.test.y, torch.Generator().manual_seed(0))
        with torch.no_grad():
            return model.eval()(x_t, t).square().mean().item()

    assert dos(result.model) < 0.8 * dos(gen_pretrained)
    end = task.evaluate(result.model, original.test.x, original.test.y)["denoising_loss"]
    assert end <= 1.5 * start, (start, end)


def test_generation_resume_equals_uninterrupted_run(gen_domains, gen_pretrained, tmp_path):
    import copy

    from sophon_ext import Sophon

    original, restricted = gen_domains
    config = gen_config(iterations=5)
    full = Sophon(copy.deepcopy(gen_pretrained), original, restricted, config, out_dir=tmp_path / "full")
    full.run()
    first = Sophon(copy.deepcopy(gen_pretrained), original, restricted, config, out_dir=tmp_path / "cut")
    first.run(stop_after=3)  # the last checkpoint is iteration 2
    torch.manual_seed(999)  # noise draws must come from the checkpointed generator, not the global RNG
    resumed = Sophon(copy.deepcopy(gen_pretrained), original, restricted, config, out_dir=tmp_path / "cut").resume()
    assert resumed.iteration == 2
    resumed.run()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_attack_harness_reports_denoising_curves_and_sample_grids(gen_domains, gen_pretrained, tmp_path):
    import json

    from sophon_ext.attack import run_attacks

    original, restricted = gen_domains
    task = GenerationTask(num_timesteps=100, num_samples=4, sample_steps=3)
    grid = {"epochs": [2], "batch_sizes": [32], "seeds": [0], "attacks": [{"method": "full", "optimizer": "adam", "lr": 1e-3}]}

    def scratch():
        return TinyUNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(4,), image_size=SIDE, groups=4)

    report = run_attacks(gen_pretrained, gen_pretrained, scratch, restricted.train, restricted.test, task, grid,
                         original_test=original.test, out_dir=tmp_path, diagnostics=False, plots=False, progress=False)
    assert report["metric"] == "denoising_loss" and report["higher_is_better"] is False
    (attack,) = report["attacks"]
    for start in ("protected", "unprotected", "scratch"):
        curve = attack["curves"][start]
        assert len(curve["metric"]) == 3
        assert curve["metric"][0] == pytest.approx(task.evaluate(scratch() if start == "scratch" else gen_pretrained,
                                                                 restricted.test.x, restricted.test.y)["loss"], rel=1e-5)
        found = curve["inspection"]
        assert (tmp_path / "samples").is_dir() and found["samples_png"].endswith(f"-{start}.png")
        assert math.isfinite(found["mmd_random_conv"]) and math.isfinite(found["mmd_pixels"])
    # A zero-output scratch model starts at exactly E[eps^2] over the fixed draws (~1).
    assert attack["curves"]["scratch"]["metric"][0] == pytest.approx(1.0, abs=0.1)
    assert "inspection" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["attacks"][0]["curves"]["scratch"]["inspection"]["samples"] == 4
