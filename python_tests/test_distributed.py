"""Scaling out with torch.distributed: 2 processes on loopback (gloo) give the single-process results.

The multi-process tests start their processes themselves (``torchrun`` or, where
one rank must be killed, plain processes with torchrun's environment), run this
file as their script (``python test_distributed.py WORKER OUT``), and compare
what they wrote with a single-process run here. They skip when 127.0.0.1
cannot be bound.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sophon_ext import distributed
from sophon_ext.distributed import Communicator, DistributedError

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
CLASSES, SIDE = 4, 8
MODEL_SPEC = {"name": "small_cnn", "kwargs": {"in_channels": 1, "num_classes": CLASSES, "width": 4, "depth": 1}}
# 5 strategies over 2 ranks: uneven shards (3 + 2), several optimizers and methods
STRATEGIES = [
    {"optimizer": "sgd_momentum", "lr": 1e-2, "batch_size": 8},
    {"optimizer": "adam", "lr": 1e-3, "batch_size": 8, "method": "reinit_head"},
    {"optimizer": "sgd", "lr": 5e-2, "batch_size": 6},
    {"optimizer": "rmsprop", "lr": 1e-3, "batch_size": 8, "method": "head_only"},
    {"optimizer": "adam", "lr": 3e-3, "batch_size": 8},
]
ATTACK_GRID = {"methods": ["full", "head_only"], "optimizers": ["adam", "sgd_momentum"], "lrs": [1e-2],
               "batch_sizes": [32], "epochs": [1]}
VOLATILE = {"time_s", "seconds", "command", "versions"}  # wall-clock and provenance fields of a report


# ---------------------------------------------------------------- shared by this process and the workers

def write_inputs(directory: Path, iterations: int, checkpoint_every: int = 1) -> Path:
    """Two small .npz domains, a random-init model file and a protect config using them; returns the config."""
    import numpy as np
    import yaml

    from sophon_ext import checkpoint as ckpt
    from sophon_ext.models import build_model

    rng = np.random.default_rng(0)
    for name in ("original", "restricted"):
        prototypes = rng.normal(size=(CLASSES, 1, SIDE, SIDE)).astype(np.float32)
        y = rng.integers(0, CLASSES, size=200)
        x = prototypes[y] + rng.normal(size=(200, 1, SIDE, SIDE)).astype(np.float32)
        np.savez(directory / f"{name}.npz", x=x, y=y)
    torch.manual_seed(0)
    ckpt.save_model(directory / "model.safetensors", build_model(MODEL_SPEC["name"], **MODEL_SPEC["kwargs"]), MODEL_SPEC)
    config = {
        "seed": 5,
        "data": {side: {"source": "arrays", "path": str(directory / f"{side}.npz"), "image_size": SIDE}
                 for side in ("original", "restricted")},
        "model": {"name": MODEL_SPEC["name"], "kwargs": MODEL_SPEC["kwargs"], "weights": str(directory / "model.safetensors")},
        "protect": {"iterations": iterations, "inner_steps": 2, "pool_size": 64, "query_size": 8, "ntr_batch_size": 16,
                    "checkpoint_every": checkpoint_every, "simulate_path": "loop",
                    "strategies": STRATEGIES, "num_strategies": 0,  # every strategy each step
                    "horizon": 4,  # trajectories continued across steps (chains) on every rank
                    "guard": {"every": 2, "max_drop": None}},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def protect_in_process(config_path: Path, out: Path):
    """The Python API: Sophon on the config's data and model; returns (model, history)."""
    from sophon_ext.config import load_config
    from sophon_ext.engine import Sophon
    from sophon_ext.checkpoint import load_model
    from sophon_ext.workflow import load_domains

    config = load_config(config_path)
    model = load_model(config.model.weights, map_location=config.device)
    original, restricted = load_domains(config)
    result = Sophon(model, original, restricted, config, out_dir=out).run()
    return model, result.history


def attack_argv(directory: Path, out: Path) -> list[str]:
    grid = directory / "grid.json"
    if not grid.exists():
        grid.write_text(json.dumps(ATTACK_GRID))
    model = str(directory / "model.safetensors")
    return ["attack", "--protected", model, "--unprotected", model, "--restricted", str(directory / "restricted.npz"),
            "--original", str(directory / "original.npz"), "--grid", str(grid), "--out", str(out),
            "--no-plots", "--no-progress"]


def assert_same_report(got, want, path="report"):
    """Equal structure and values; floats within 1e-5 relative (ranks may run
    with another thread count than one process, which reorders float sums)."""
    if isinstance(want, float) and isinstance(got, float):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-9), f"{path}: {got} != {want}"
    elif isinstance(want, dict) and isinstance(got, dict):
        assert got.keys() == want.keys(), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same_report(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, list) and isinstance(got, list):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_report(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def stable(report):
    """``report`` without its wall-clock and provenance fields."""
    if isinstance(report, dict):
        return {k: stable(v) for k, v in report.items() if k not in VOLATILE}
    if isinstance(report, list):
        return [stable(v) for v in report]
    return report


# ---------------------------------------------------------------- workers (run as this file's __main__)

def worker_session(out: Path) -> None:
    """On each of 2 ranks: the communicator's collectives, a protection run (Python API), `sophon attack`."""
    comm = distributed.setup()
    rank = comm.rank
    assert comm.world_size == WORLD and "gloo" in comm.backend, comm
    like = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1), "d": torch.zeros(2)}
    local = {"a": torch.full((2, 3), rank + 1.0), "b": torch.arange(4.0) * (rank + 1)}
    if rank == 0:
        local["c"] = torch.tensor([7.0])  # only rank 0 has it; nobody has "d"
    rows = torch.tensor([[10.0 * i, 10.0 * i + 1] for i in comm.shard_indices(5)])
    mine = torch.full((3,), float(rank))
    comm.broadcast_([mine])
    comm.barrier()
    torch.save({
        "shard": comm.shard_indices(5),
        "mean": comm.weighted_mean(local, weight=3.0 if rank == 0 else 2.0, like=like),
        "idle_mean": comm.weighted_mean({"a": torch.ones(2, 3)} if rank == 0 else {}, weight=1.0 if rank == 0 else 0.0, like=like),
        "rows": comm.gather_shards(rows, 5),
        "broadcast": mine,
        "objects": comm.gather_objects({"rank": rank}),
        "object": comm.broadcast_object({"from": rank}),
    }, out / f"primitives-{rank}.pt")

    model, history = protect_in_process(out / "config.yaml", out / "protect")
    torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "history": history},
               out / f"protect-{rank}.pt")

    from sophon_ext.cli import main

    assert main(attack_argv(out, out / "attack")) == 0


WORKERS = {"session": worker_session}


# ---------------------------------------------------------------- launching

def loopback_problem() -> str | None:
    """Why 2 processes cannot talk over 127.0.0.1 here, or None."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return "torch.distributed with gloo is not available in this torch build"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
    except OSError as exc:
        return f"loopback is down: cannot bind 127.0.0.1 ({exc})"
    return None


needs_loopback = pytest.mark.skipif(loopback_problem() is not None, reason=str(loopback_problem()))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
                "SOPHON_DIST_TIMEOUT": "60", **extra})
    return env


def torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (one node, a free port)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               "--max-restarts=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=base_env(), cwd=ROOT)


def start_ranks(args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """The processes torchrun would start, without its agent (which would kill the survivors itself)."""
    port = str(free_port())
    procs = []
    for rank in range(WORLD):
        env = base_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        err = open(log_dir / f"rank{rank}.err", "w")
        procs.append(subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err))
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- in one process

def test_single_process_communicator_is_the_identity():
    comm = Communicator()
    assert (comm.rank, comm.world_size, comm.is_main, comm.is_distributed) == (0, 1, True, False)
    assert comm.shard_indices(3) == [0, 1, 2] and comm.shard("abc") == ["a", "b", "c"]
    like = {"w": torch.zeros(2), "b": torch.zeros(1)}
    grad = torch.tensor([1.0, 2.0])
    mean = comm.weighted_mean({"w": grad}, 3.0, like)
    assert mean.keys() == like.keys() and mean["w"] is grad and mean["b"] is None
    assert comm.weighted_mean({"w": grad}, 0.0, like) == {"w": None, "b": None}  # no work, no gradient
    rows = torch.randn(3, 2)
    assert comm.gather_shards(rows, 3) is rows
    assert comm.gather_objects({"x": 1}) == [{"x": 1}] and comm.broadcast_object(5) == 5
    assert comm.device("cuda") == torch.device("cuda", 0) and comm.device("cpu") == torch.device("cpu")


def test_bad_arguments_are_named():
    comm = Communicator()
    with pytest.raises(ValueError, match="count: must be an int >= 0"):
        comm.shard_indices(-1)
    with pytest.raises(ValueError, match="tensors: names not in like"):
        comm.weighted_mean({"x": torch.ones(1)}, 1.0, {"w": torch.ones(1)})
    with pytest.raises(ValueError, match="local: expected 3 rows"):
        comm.gather_shards(torch.ones(2, 1), 3)
    with pytest.raises(ValueError, match="SOPHON_DIST_TIMEOUT"):
        distributed.timeout_seconds(env={"SOPHON_DIST_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="timeout: must be a number of seconds > 0"):
        distributed.timeout_seconds(0)
    assert distributed.timeout_seconds(env={}) == distributed.DEFAULT_TIMEOUT
    assert distributed.timeout_seconds(env={"SOPHON_DIST_TIMEOUT": "12.5"}) == 12.5


def test_launch_detection_follows_torchrun_variables():
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    assert distributed.launched_by_torchrun(env)
    assert not distributed.launched_by_torchrun({**env, "WORLD_SIZE": "1"})  # one process: nothing to join
    assert not distributed.launched_by_torchrun({k: v for k, v in env.items() if k != "MASTER_PORT"})
    with pytest.raises(DistributedError, match="WORLD_SIZE: expected an integer"):
        distributed.launched_by_torchrun({**env, "WORLD_SIZE": "two"})
    assert distributed.setup() is distributed.setup()  # plain pytest process: the cached single-process one
    assert not distributed.setup().is_distributed


def test_single_process_commands_refuse_torchrun(monkeypatch, capsys):
    from sophon_ext.cli import main

    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(["demo", "--quick", "--no-progress"]) == 2
    assert "demo: runs in one process; under torchrun run sophon protect and sophon attack" in capsys.readouterr().err


def test_shards_with_their_batch_seeds_rebuild_the_full_simulation():
    """What each rank computes (its strategies, the seeds one process would give them),
    weighted by its count, is the single-process meta-gradient; its rows are the full rows."""
    from sophon_ext import FineTuneStrategy, simulate
    from sophon_ext.simulation.batches import draw_seeds
    from sophon_ext.models import build_model
    from sophon_ext.tasks import ClassificationTask

    torch.manual_seed(0)
    model = build_model(MODEL_SPEC["name"], **MODEL_SPEC["kwargs"]).double()
    x, y = torch.randn(40, 1, SIDE, SIDE, dtype=torch.float64), torch.randint(CLASSES, (40,))
    task = ClassificationTask()
    strategies = [FineTuneStrategy(**s, steps=2, seed=i) for i, s in enumerate(STRATEGIES)]
    kwargs = dict(data=((x,), y), adaptation_loss=task.adaptation_loss, suppression_loss=task.suppression_loss,
                  query_size=6, path="loop")
    generator = torch.Generator().manual_seed(1)
    full = simulate(model, strategies, generator=generator, **kwargs)
    drawn = torch.Generator().manual_seed(1)
    seeds = draw_seeds(len(strategies), drawn)
    assert torch.equal(drawn.get_state(), generator.get_state())  # the seeds are all simulate draws
    meta = {n: torch.zeros_like(g) for n, g in full.meta_grad.items()}
    for rank in range(WORLD):
        mine = list(range(rank, len(strategies), WORLD))
        part = simulate(model, [strategies[i] for i in mine], generator=None, batch_seeds=[seeds[i] for i in mine], **kwargs)
        torch.testing.assert_close(part.query_losses, full.query_losses[mine], rtol=1e-10, atol=1e-12)
        for n in meta:
            meta[n] += part.meta_grad[n] * len(mine) / len(strategies)
    for n in meta:
        torch.testing.assert_close(meta[n], full.meta_grad[n], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="batch_seeds: expected one seed per strategy"):
        simulate(model, strategies, batch_seeds=seeds[:2], **kwargs)


def test_sharding_refuses_a_simulate_fn_without_batch_seeds():
    class TwoRanks(Communicator):
        world_size = 2

    from sophon_ext import FineTuneStrategy

    def simulate_fn(model, strategies, generator=None, **kwargs):
        raise AssertionError("must not run")

    with pytest.raises(TypeError, match="simulate_fn: must accept batch_seeds"):
        distributed.simulate_sharded(TwoRanks(), simulate_fn, torch.nn.Linear(2, 2), [FineTuneStrategy()])


# ---------------------------------------------------------------- 2 processes

@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """2 ranks running :func:`worker_session` (torchrun's environment, no agent: one process less)."""
    problem = loopback_problem()
    if problem:
        pytest.skip(problem)
    out = tmp_path_factory.mktemp("dist")
    write_inputs(out, iterations=3)
    procs = start_ranks([str(Path(__file__).resolve()), "session", str(out)], out)
    try:
        codes = [proc.wait(timeout=240) for proc in procs]
    finally:
        stop(procs)
    assert codes == [0] * WORLD, "\n".join((out / f"rank{r}.err").read_text()[-3000:] for r in range(WORLD))
    return out


@needs_loopback
def test_collectives_across_two_ranks(session):
    got = [torch.load(session / f"primitives-{rank}.pt") for rank in range(WORLD)]
    assert [g["shard"] for g in got] == [[0, 2, 4], [1, 3]]  # the union is every index once
    for g in got:
        # (3 * 1 + 2 * 2) / 5 for "a"; "c" only from rank 0 (weight 3 of 5); nobody sent "d"
        torch.testing.assert_close(g["mean"]["a"], torch.full((2, 3), 7 / 5))
        torch.testing.assert_close(g["mean"]["b"], torch.arange(4.0) * 7 / 5)
        torch.testing.assert_close(g["mean"]["c"], torch.tensor([7.0 * 3 / 5]))
        assert g["mean"]["d"] is None
        torch.testing.assert_close(g["idle_mean"]["a"], torch.ones(2, 3))  # a rank with no work adds nothing
        assert g["idle_mean"]["b"] is None
        torch.testing.assert_close(g["rows"], torch.tensor([[10.0 * i, 10.0 * i + 1] for i in range(5)]))
        assert torch.equal(g["broadcast"], torch.zeros(3))
        assert g["objects"] == [{"rank": 0}, {"rank": 1}] and g["object"] == {"from": 0}


@needs_loopback
def test_distributed_protection_equals_the_single_process_run(session, tmp_path):
    ranks = [torch.load(session / f"protect-{rank}.pt") for rank in range(WORLD)]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), f"{name} differs between ranks"
    model, history = protect_in_process(session / "config.yaml", tmp_path / "single")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert len(ranks[0]["history"]) == len(history) == 3
    assert ranks[0]["history"][1]["chain_depths"] == history[1]["chain_depths"] and max(history[1]["chain_depths"]) == 2
    for dist_record, record in zip(ranks[0]["history"], history):
        assert len(dist_record["sup_loss_per_strategy"]) == len(STRATEGIES)  # every strategy, in order
        for key in ("sup_loss", "sup_loss_last", "meta_grad_norm", "ntr_loss"):
            assert dist_record[key] == pytest.approx(record[key], rel=1e-5, abs=1e-7), key
        assert dist_record["sup_loss_per_strategy"] == pytest.approx(record["sup_loss_per_strategy"], rel=1e-5, abs=1e-7)
    log = [json.loads(line) for line in (session / "protect" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2, 3]  # written once, by rank 0
    assert (session / "protect" / "checkpoint").is_dir()


@needs_loopback
def test_distributed_attack_grid_gives_the_single_process_report(session, tmp_path):
    from sophon_ext.cli import main

    assert main(attack_argv(session, tmp_path / "attack")) == 0
    single = json.loads((tmp_path / "attack" / "report.json").read_text())
    spread = json.loads((session / "attack" / "report.json").read_text())
    assert spread["complete"] and len(spread["attacks"]) == 4
    assert_same_report(stable(spread), stable(single))


@needs_loopback
def test_killed_rank_stops_the_other_with_a_clear_error_then_resume_finishes(tmp_path):
    from sophon_ext import checkpoint as ckpt

    iterations = 16
    config = write_inputs(tmp_path, iterations=iterations, checkpoint_every=2)
    out = tmp_path / "run"
    log = out / "protect" / "log.jsonl"
    procs = start_ranks(["-m", "sophon_ext", "protect", "--config", str(config), "--out", str(out), "--no-progress"], tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.has_checkpoint(out / "protect" / "checkpoint"):
            assert time.monotonic() < deadline, "no progress: " + (tmp_path / "rank0.err").read_text()[-3000:]
            assert procs[0].poll() is None, "rank 0 ended early: " + (tmp_path / "rank0.err").read_text()[-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        rc = procs[0].wait(timeout=60)
        waited = time.monotonic() - killed_at
    finally:
        stop(procs)
    err = (tmp_path / "rank0.err").read_text()
    assert rc == 1, err[-3000:]
    assert "rank 0 of 2 lost contact with its peers" in err and "--resume" in err, err[-3000:]
    assert waited < 30
    assert 2 <= len(log.read_text().splitlines()) < iterations  # killed mid-run

    proc = torchrun(["-m", "sophon_ext", "protect", "--out", str(out), "--resume", "--no-progress"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == list(range(1, iterations + 1))
    model, _ = protect_in_process(config, tmp_path / "single")
    resumed = ckpt.load_model(out / "protected.safetensors")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


if __name__ == "__main__":
    WORKERS[sys.argv[1]](Path(sys.argv[2]))
