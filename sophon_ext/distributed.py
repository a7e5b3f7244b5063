"""torchrun glue: one small communicator object the engine and the attack grid hold.

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), :func:`setup` joins the ``torch.distributed``
process group (gloo for CPU tensors, nccl for CUDA tensors) and returns a
:class:`TorchCommunicator`; in a plain process it returns the
single-process :class:`Communicator`, whose collectives do nothing, so the
code using it has one path.

What the communicator offers is exactly what SOPHON needs:

- :meth:`~Communicator.shard_indices`: trajectory / attack ``i`` belongs to
  rank ``i % world``; the union over ranks is the single-process set.
- :meth:`~Communicator.weighted_mean`: one all-reduce of a flattened dict of
  gradients, each rank's contribution weighted by its count of strategies, so
  the result is the mean over all strategies, as in one process.
- :meth:`~Communicator.gather_shards`: the inverse of the sharding for
  per-strategy rows (the query losses of the log).
- :meth:`~Communicator.broadcast_`: rank 0's tensors everywhere (parameters at
  the start, the normal-training gradient), so every rank holds the same model.
- :meth:`~Communicator.gather_objects`, :meth:`~Communicator.barrier`,
  :attr:`~Communicator.is_main` (rank-0-only files and logs).

Every collective runs under the process group's timeout, and a failure (a peer
killed, a network cut, a peer stuck past the timeout) is raised as
:class:`DistributedError`, naming the rank and saying how to resume.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

#: seconds a collective may wait for the other ranks (env ``SOPHON_DIST_TIMEOUT`` overrides)
DEFAULT_TIMEOUT = 1800.0
#: seconds the grid-gathering group waits: attack shards may finish hours apart
PATIENT_TIMEOUT = 7 * 24 * 3600.0
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed: a peer died, the network failed, or a peer stopped answering."""


def _env_int(env, name: str, default: int | None = None) -> int:
    text = env.get(name)
    if text is None:
        if default is None:
            raise DistributedError(f"{name}: torchrun sets it; it is missing from the environment")
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name}: expected an integer, got {text!r}") from None


def timeout_seconds(timeout: float | None = None, env=os.environ) -> float:
    """``timeout``, else ``SOPHON_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`; must be > 0."""
    if timeout is None:
        text = env.get("SOPHON_DIST_TIMEOUT")
        try:
            timeout = float(text) if text else DEFAULT_TIMEOUT
        except ValueError:
            raise ValueError(f"SOPHON_DIST_TIMEOUT: expected seconds (a number), got {text!r}") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout: must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def backend_for() -> str:
    """gloo for CPU tensors, plus nccl for CUDA tensors where CUDA is available.

    Collectives then run where the tensors are (the engine's device), so the
    backend follows ``config.device`` with nothing to choose. nccl only starts
    on the first CUDA collective, so a CPU run on a GPU machine never uses it."""
    import torch.distributed as dist

    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


class Communicator:
    """The single-process communicator: rank 0 of 1; every collective returns its input."""

    rank = 0
    world_size = 1
    local_rank = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the rank that writes checkpoints, logs and reports (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def shard_indices(self, count: int) -> list[int]:
        """The indices in ``range(count)`` this rank handles: ``i % world_size == rank``."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count: must be an int >= 0, got {count!r}")
        return list(range(self.rank, count, self.world_size))

    def shard(self, items: Sequence) -> list:
        """This rank's items of ``items`` (see :meth:`shard_indices`)."""
        return [items[i] for i in self.shard_indices(len(items))]

    def device(self, requested: str | torch.device) -> torch.device:
        """The device this rank uses for ``requested``: ``"cuda"`` without an index means
        the GPU of this rank's ``LOCAL_RANK``; anything else is kept."""
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def weighted_mean(self, tensors: dict[str, Tensor | None], weight: float,
                      like: dict[str, Tensor]) -> dict[str, Tensor | None]:
        """``sum_r weight_r * tensors_r / sum_r weight_r`` over the ranks, name by name.

        ``like`` names every tensor any rank may send, with its shape and dtype
        (e.g. the parameters). A name missing or None on a rank contributes
        nothing there; it is None in the result when no rank has it (or the
        total weight is 0)."""
        unknown = set(tensors) - set(like)
        if unknown:
            raise ValueError(f"tensors: names not in like: {sorted(unknown)}")
        if not weight:
            return {name: None for name in like}
        return {name: tensors.get(name) for name in like}

    def gather_shards(self, local: Tensor, count: int) -> Tensor:
        """Rows ``local`` (one per index of :meth:`shard_indices(count)`) of every rank,
        in index order: ``(count, ...)``."""
        if local.shape[0] != len(self.shard_indices(count)):
            raise ValueError(f"local: expected {len(self.shard_indices(count))} rows for count {count}, got {local.shape[0]}")
        return local

    def broadcast_(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values."""

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (picklable) on every rank."""
        return obj

    def gather_objects(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order; waits as long as the slowest rank takes."""
        return [obj]

    def barrier(self) -> None:
        """Wait until every rank gets here (or the timeout passes)."""

    def close(self) -> None:
        """Leave the process group (nothing to do in one process)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, backend={self.backend})"


class TorchCommunicator(Communicator):
    """A :class:`Communicator` over the ``torch.distributed`` default process group.

    Tensors travel on their own device (nccl for CUDA, gloo for CPU) and are
    flattened, so each call is one collective per dtype.
    """

    def __init__(self, local_rank: int | None = None, timeout: float | None = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise DistributedError("TorchCommunicator: the torch.distributed process group is not initialised; use setup()")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = _env_int(os.environ, "LOCAL_RANK", self.rank) if local_rank is None else local_rank
        self.backend = str(dist.get_backend())
        self.timeout = timeout_seconds(timeout)
        self._patient_group = None

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except DistributedError:
            raise
        except (RuntimeError, ConnectionError, TimeoutError) as exc:
            raise DistributedError(
                f"rank {self.rank} of {self.world_size} lost contact with its peers during {what} "
                f"(a process died, hung past the {self.timeout:g} s timeout, or the network failed): {exc}. "
                "Stop every process, then start the same command again with --resume (Python: "
                "Sophon.resume()) to continue from the last checkpoint."
            ) from exc

    def weighted_mean(self, tensors: dict[str, Tensor | None], weight: float,
                      like: dict[str, Tensor]) -> dict[str, Tensor | None]:
        unknown = set(tensors) - set(like)
        if unknown:
            raise ValueError(f"tensors: names not in like: {sorted(unknown)}")
        names = list(like)
        present = [tensors.get(n) is not None for n in names]
        # one presence count per name, then the weight; every rank sends the same sizes
        device = next(iter(like.values())).device if like else torch.device("cpu")
        counts = torch.tensor([float(p) for p in present] + [float(weight)], dtype=torch.float64, device=device)
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name in names:
            by_dtype.setdefault(like[name].dtype, []).append(name)
        sums: dict[str, Tensor] = {}
        with self._collective("an all-reduce of gradients"), torch.no_grad():
            self._dist.all_reduce(counts)
            for dtype, members in by_dtype.items():
                flat = torch.cat([_weighted(tensors.get(n), like[n], weight, device) for n in members])
                self._dist.all_reduce(flat)
                offset = 0
                for n in members:
                    sums[n] = flat[offset : offset + like[n].numel()].view(like[n].shape)
                    offset += like[n].numel()
        total = float(counts[-1])
        return {n: (sums[n] / total).to(like[n].device) if counts[i] > 0 and total > 0 else None
                for i, n in enumerate(names)}

    def gather_shards(self, local: Tensor, count: int) -> Tensor:
        mine = self.shard_indices(count)
        if local.shape[0] != len(mine):
            raise ValueError(f"local: expected {len(mine)} rows for count {count}, got {local.shape[0]}")
        rows = -(-count // self.world_size)  # every rank sends the same shape: pad to the longest shard
        padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: len(mine)] = local.detach()
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        with self._collective("the gathering of per-strategy losses"):
            self._dist.all_gather(pieces, padded)
        out = torch.empty((count, *local.shape[1:]), dtype=local.dtype, device=local.device)
        for rank, piece in enumerate(pieces):
            indices = list(range(rank, count, self.world_size))
            out[indices] = piece[: len(indices)]
        return out

    def broadcast_(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        groups: dict[tuple, list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        with self._collective("a broadcast from rank 0"), torch.no_grad():
            for members in groups.values():
                flat = torch.cat([t.detach().reshape(-1) for t in members])
                self._dist.broadcast(flat, src)
                offset = 0
                for t in members:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        with self._collective("a broadcast from rank 0"):
            self._dist.broadcast_object_list(box, src)
        return box[0]

    def gather_objects(self, obj: Any) -> list:
        out = [None] * self.world_size
        with self._collective("the gathering of results"):
            self._dist.all_gather_object(out, obj, group=self._objects_group())
        return out

    def _objects_group(self):
        """A gloo group with a long timeout for gathering results: one shard of a grid may
        finish hours after another (a dead peer still fails at once: its sockets close)."""
        if self._patient_group is None:
            self._patient_group = self._dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=PATIENT_TIMEOUT))
        return self._patient_group

    def barrier(self) -> None:
        with self._collective("a barrier"):
            if self.backend == "gloo":
                # names the ranks that did not arrive, where a plain barrier would only time out
                self._dist.monitored_barrier(timeout=datetime.timedelta(seconds=self.timeout))
            else:
                self._dist.barrier()

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()
        _forget(self)


def simulate_sharded(comm: Communicator, simulate_fn, model: torch.nn.Module, strategies: Sequence, *,
                     generator: torch.Generator | None = None, **kwargs):
    """``simulate_fn(model, strategies, generator=generator, **kwargs)`` with the
    strategies shared out over the ranks; returns what one process would.

    Rank ``r`` simulates strategies ``i % world == r``. The batch seed of every
    trajectory is drawn here, for all of them, from ``generator`` exactly as
    :func:`sophon_ext.simulate` draws them in one process, and each rank passes
    its trajectories' seeds on (``batch_seeds``), so every trajectory sees the
    same batches as in one process and ``generator`` ends in the same state.
    The meta-gradient is the mean over all trajectories (each rank weighted by
    its count); ``query_losses`` (and ``params`` when asked for) are gathered
    back into the single-process order. ``path`` is this rank's.
    """
    if not comm.is_distributed:
        return simulate_fn(model, strategies, generator=generator, **kwargs)
    import inspect

    from .simulation.batches import draw_seeds
    from .simulation import SimulationResult

    if "batch_seeds" not in inspect.signature(simulate_fn).parameters:
        raise TypeError("simulate_fn: must accept batch_seeds=... (as sophon_ext.simulate does) to be sharded over ranks")
    strategies = list(strategies)
    if not strategies:
        raise ValueError("strategies: expected a non-empty list of FineTuneStrategy")
    count = len(strategies)
    seeds = draw_seeds(count, generator)
    mine = comm.shard_indices(count)
    like = dict(model.named_parameters())
    if mine:
        local = simulate_fn(model, [strategies[i] for i in mine], generator=generator,
                            batch_seeds=[seeds[i] for i in mine], **kwargs)
        meta, losses, path, params, chunk = local.meta_grad, local.query_losses, local.path, local.params, local.chunk_size
    else:  # more ranks than strategies: this one only takes part in the collectives
        steps = strategies[0].steps
        first = next(iter(like.values()))
        meta, path, chunk = {}, "none", None
        losses = torch.zeros((0, steps), dtype=first.dtype, device=first.device)
        params = ({n: p.new_zeros((0, *p.shape)) for n, p in like.items()} if kwargs.get("return_params") else None)
    meta = {n: g for n, g in comm.weighted_mean(meta, len(mine), like).items() if g is not None}
    losses = comm.gather_shards(losses, count)
    if params is not None:
        params = {n: comm.gather_shards(v, count) for n, v in params.items()}
    return SimulationResult(query_losses=losses, meta_grad=meta, path=path, params=params, chunk_size=chunk)


def _weighted(value: Tensor | None, like: Tensor, weight: float, device: torch.device) -> Tensor:
    """``value * weight`` flattened (zeros when None), checked against ``like``'s shape."""
    if value is None:
        return torch.zeros(like.numel(), dtype=like.dtype, device=device)
    if value.shape != like.shape:
        raise ValueError(f"tensors: expected shape {tuple(like.shape)}, got {tuple(value.shape)}")
    return (value.detach().to(device, like.dtype) * weight).reshape(-1)


_current: Communicator | None = None


def exit_after_lost_peer(code: int) -> None:
    """Leave this process now, with ``code``, skipping interpreter teardown.

    A process group whose peer died cannot be torn down cleanly: gloo's threads
    may still wait on the dead socket, and destroying them at interpreter exit
    aborted the surviving rank (std::terminate, exit status -6) instead of
    exiting with ``code``, now and then (seen in CI). Everything this library
    writes is already on disk at that point (checkpoints are atomic, each log
    line is closed as written), so only the standard streams need flushing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launched_by_torchrun(env=os.environ) -> bool:
    """True when the environment describes more than one process (torchrun's variables)."""
    return all(name in env for name in _LAUNCH_VARS) and _env_int(env, "WORLD_SIZE") > 1


def setup(timeout: float | None = None) -> Communicator:
    """The communicator of this process, created on the first call.

    - a process group already initialised (by the caller): wrapped as it is;
    - started by ``torchrun`` with ``WORLD_SIZE`` > 1: joins the process group
      (gloo, plus nccl where CUDA is available: see :func:`backend_for`;
      plain ``"cuda"`` then means GPU ``LOCAL_RANK``), with collectives timing
      out after ``timeout`` seconds (default ``SOPHON_DIST_TIMEOUT`` or 1800);
    - otherwise: the single-process :class:`Communicator`.
    """
    global _current
    if _current is not None:
        return _current
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _current = TorchCommunicator(timeout=timeout)
        return _current
    if not launched_by_torchrun():
        _current = Communicator()
        return _current
    if not dist.is_available():
        raise DistributedError("torch.distributed: not available in this torch build; run one process or install a torch with it")
    seconds = timeout_seconds(timeout)
    local_rank = _env_int(os.environ, "LOCAL_RANK", 0)
    rank = _env_int(os.environ, "RANK")
    backend = backend_for()
    if "nccl" in backend and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)  # plain "cuda" now means this rank's GPU everywhere
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ConnectionError, TimeoutError, ValueError) as exc:
        raise DistributedError(f"rank {rank} could not join the process group at {where} with backend {backend} "
                               f"within {seconds:g} s: {exc}") from exc
    _current = TorchCommunicator(local_rank=local_rank, timeout=seconds)
    atexit.register(_close_at_exit)
    return _current


def current() -> Communicator:
    """The communicator :func:`setup` made, or the single-process one when it was never called."""
    return _current if _current is not None else Communicator()


def _forget(comm: Communicator) -> None:
    global _current
    if _current is comm:
        _current = None


def _close_at_exit() -> None:
    # leaving the group cleanly avoids torch's "process group was not destroyed" warning
    if _current is not None:
        try:
            _current.close()
        except Exception:  # a dead peer may make this fail; the process ends anyway
            pass


__all__ = ["Communicator", "TorchCommunicator", "DistributedError", "setup", "current", "backend_for", "simulate_sharded",
           "launched_by_torchrun", "timeout_seconds", "DEFAULT_TIMEOUT"]
