"""Data-parallel training with ``torch.distributed`` (DDP), as launched by ``torchrun``.

``torchrun --standalone --nproc-per-node N -m deepwatch train ...`` (or ``deepwatch train
--nproc N``, which launches exactly that) starts N copies of ``train``. Each reads and splits the
data the same way (the splits are seeded), so every rank holds the same arrays and no data moves
between processes. Each training step draws one global batch of ``batch_size`` rows from the
same seeded sampler on every rank; rank ``r`` takes its contiguous share of it, and DDP averages
the gradients. With equal shares this is the gradient of the mean loss over the whole batch: the
optimisation is that of one process, only spread over N. Validation losses are summed over the
ranks' shares of the validation rows, so every rank takes the same early-stopping decision.

Only rank 0 shows progress, logs and writes the bundle. After each network is trained, rank 0's
weights and buffers are sent to every rank, so all ranks continue from identical models.

On CUDA each rank uses the GPU of its local rank, the NCCL backend, and batch normalisation
synchronised across ranks. On CPU (gloo) batch statistics are per rank (SyncBatchNorm needs a
GPU), so networks with batch normalisation (``mlp``) train close to, not exactly as, one process.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._cpus import usable_cores


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a distributed run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (shares differ by at most one)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)


_SINGLE = Dist()
_current: Dist = _SINGLE


def current() -> Dist:
    return _current


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


#: Set by :func:`launch_local` for its ranks: the file-based rendezvous of the process group.
STORE_ENV = "DEEPWATCH_DIST_STORE"


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` or :func:`launch_local`."""
    return _env_int("WORLD_SIZE", 1) > 1 and ("MASTER_ADDR" in os.environ
                                               or STORE_ENV in os.environ)


@contextmanager
def session(device: str = "auto") -> Iterator[Dist]:
    """Join the process group ``torchrun`` set up (when it did) for the duration of a run.

    Outside a launcher, or inside an already initialised group, this only reports the state.
    """
    global _current
    if not launched():
        yield _current
        return
    import torch.distributed as tdist

    owned = not tdist.is_initialized()
    cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    local_rank = _env_int("LOCAL_RANK", 0)
    if owned:
        if cuda:
            torch.cuda.set_device(local_rank)
        store_path = os.environ.get(STORE_ENV)
        if store_path:  # launch_local: a rendezvous file, no TCP store
            world = _env_int("WORLD_SIZE", 1)
            tdist.init_process_group(backend, store=tdist.FileStore(store_path, world),
                                     rank=_env_int("RANK", 0), world_size=world)
        else:  # torchrun: its environment
            tdist.init_process_group(backend)
    _current = Dist(tdist.get_rank(), tdist.get_world_size(), local_rank,
                    _env_int("LOCAL_WORLD_SIZE", tdist.get_world_size()))
    try:
        yield _current
    except RuntimeError as exc:
        if not _is_peer_failure(exc):
            raise
        from ..errors import DistributedError

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(f"rank {_current.rank} lost contact with the other training "
                               f"processes (did one of them fail?): {first[:300]}") from None
    finally:
        _current = _SINGLE
        if owned:
            tdist.destroy_process_group()


def _is_peer_failure(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective that failed because a peer went away."""
    backend_error = getattr(torch.distributed, "DistBackendError", ())
    if backend_error and isinstance(exc, backend_error):
        return True
    text = str(exc)
    return any(mark in text for mark in ("gloo", "NCCL", "Connection reset", "Connection closed"))


def device_for(dev: torch.device, dist: Dist) -> torch.device:
    """The device of this rank: its local GPU when training on CUDA."""
    if dist.active and dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", dist.local_rank)
    return dev


def wrap(net: nn.Module, dev: torch.device, dist: Dist) -> nn.Module:
    """The module the training steps run: ``net`` itself, or a DDP replica sharing its weights.

    On CUDA the replica is a copy with synchronised batch normalisation, so the caller must
    read the trained weights back with :func:`unwrap_into`.
    """
    if not dist.active:
        return net
    from torch.nn.parallel import DistributedDataParallel

    if dev.type == "cuda":
        replica = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
        return DistributedDataParallel(replica, device_ids=[dev.index])
    return DistributedDataParallel(net)


def inner(trained: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(trained, "module", trained)


def all_sum(values: list[float], dev: torch.device, dist: Dist) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves in one process)."""
    if not dist.active:
        return values
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64, device=dev)
    tdist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def broadcast_module(net: nn.Module, dist: Dist) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's (``net`` on this rank's
    training device)."""
    if not dist.active:
        return
    import torch.distributed as tdist

    for t in list(net.parameters()) + list(net.buffers()):
        tdist.broadcast(t.data, src=0)


def _loopback_interface() -> str | None:
    import socket

    names = [name for _, name in socket.if_nameindex()]
    for name in ("lo", "lo0"):
        if name in names:
            return name
    return next((n for n in names if n.startswith("lo")), None)


def launch_local(command: list[str], nproc: int, log: Callable[[str], None]) -> int:
    """Run ``command`` as ``nproc`` ranks of one data-parallel job on this machine.

    The ranks meet through a file (no TCP store), and gloo/NCCL talk over the loopback
    interface only, so nothing listens beyond this machine. When a rank fails the others are
    stopped. Returns 0, else rank 0's exit code where it failed, else the highest of the others'
    (at least 1; 130 when interrupted).
    """
    import signal
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryDirectory(prefix="deepwatch-ddp-") as tmp, ExitStack() as opened:
        base = dict(os.environ)
        base.update({STORE_ENV: os.path.join(tmp, "store"), "WORLD_SIZE": str(nproc),
                     "LOCAL_WORLD_SIZE": str(nproc)})
        base.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc)))
        lo = _loopback_interface()
        if lo:
            base.setdefault("GLOO_SOCKET_IFNAME", lo)
            base.setdefault("NCCL_SOCKET_IFNAME", lo)
        procs: list[subprocess.Popen[bytes]] = []
        logs: list[Any] = []
        codes: dict[int, int] = {}  # exit codes of the ranks that ended on their own
        interrupted = False
        try:
            for rank in range(nproc):
                env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                # rank 0 speaks to the terminal; the others' words are kept for their failures
                err = None if rank == 0 else opened.enter_context(
                    open(os.path.join(tmp, f"rank{rank}.log"), "w+b"))
                logs.append(err)
                procs.append(subprocess.Popen(command, env=env, stderr=err))
            def collect() -> None:
                codes.update({r: int(p.returncode) for r, p in enumerate(procs)
                              if r not in codes and p.poll() is not None})

            while len(codes) < nproc:
                time.sleep(0.2)
                collect()
                if any(codes.values()):
                    time.sleep(1.0)  # peers that die of the same failure do so now
                    collect()
                    break
        except KeyboardInterrupt:
            interrupted = True
        finally:
            for p in procs:  # a rank left waiting for a failed peer would wait for ever
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if interrupted:
            log("interrupted: every training rank was stopped, no bundle was written")
            return 130
        failures = {r: c for r, c in codes.items() if c}
        first = failures.get(0, 0)
        for rank, code in sorted(failures.items()):
            if rank == 0 and code > 0:
                continue  # rank 0 has said what went wrong
            if rank > 0 and code == first:
                continue  # the same failure as rank 0's, said once
            if rank > 0:
                logs[rank].seek(0)
                said = logs[rank].read().decode(errors="replace").strip().splitlines()
                for line in said[-20:]:
                    log(f"rank {rank}: {line}")
            what = f"signal {-code}" if code < 0 else f"exit code {code}"
            log(f"error: training rank {rank} failed ({what})")
        if not failures:
            return 0
        return first if first > 0 else max(max(failures.values()), 1)
