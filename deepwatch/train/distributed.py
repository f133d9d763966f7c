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

A job :func:`launch_local` started stops as one process does: Ctrl-C or SIGTERM to the launcher
stops every rank with SIGTERM, which each takes as Ctrl-C (rank 0's bundle half written is
removed), and the launcher alone says so, in one line. A launcher killed outright (SIGKILL)
takes its ranks with it (see :func:`_follow_launcher`) but cannot remove its temporary
directory: the next launcher does (see :func:`launch_local`).
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
#: Set by :func:`launch_local` for its ranks: the launcher's process id.
LAUNCHER_ENV = "DEEPWATCH_DIST_LAUNCHER"
#: The names of :func:`launch_local`'s temporary directories, in the temporary directory.
TMP_PREFIX = "deepwatch-ddp-"
#: The exit status of a rank of :func:`launch_local` stopped by SIGTERM (as a shell gives it).
STOPPED_EXIT = 128 + 15
#: The exit status of a rank of :func:`launch_local` that lost contact with a peer that failed
#: (no deepwatch error exits with it): the launcher says which one failed.
LOST_CONTACT_EXIT = 75


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` or :func:`launch_local`."""
    return _env_int("WORLD_SIZE", 1) > 1 and ("MASTER_ADDR" in os.environ
                                               or STORE_ENV in os.environ)


@contextmanager
def session(device: str = "auto") -> Iterator[Dist]:
    """Join the process group ``torchrun`` set up (when it did) for the duration of a run.

    Outside a launcher, or inside an already initialised group, this only reports the state.
    A rank of :func:`launch_local` also stops cleanly on SIGTERM and ends quietly (see
    :func:`_as_local_rank`): its launcher speaks for it.
    """
    if not launched():
        yield _current
        return
    with ExitStack() as stack:
        if STORE_ENV in os.environ:
            stack.enter_context(_as_local_rank())
        yield stack.enter_context(_joined(device))


@contextmanager
def _joined(device: str) -> Iterator[Dist]:
    global _current
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


@contextmanager
def _as_local_rank() -> Iterator[None]:
    """For a rank of :func:`launch_local`, the length of its run: SIGTERM (its launcher's stop,
    or the kernel's when the launcher dies) stops it as Ctrl-C does, through the clean-up of
    what it was writing (rank 0's bundle, assembled beside ``--out``, removed), instead of
    ending it mid-write; further SIGTERMs are ignored so that they cannot cut that clean-up
    short (the launcher kills a rank that takes too long). Such a stop, and the loss of a
    failed peer, end the rank quietly with :data:`STOPPED_EXIT` or :data:`LOST_CONTACT_EXIT`:
    rank 0 speaks to the terminal, and the launcher, which knows what happened to every rank,
    says it once."""
    import signal
    import threading

    from ..errors import DistributedError, Interrupted

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(_signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(terminated=True)

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        _follow_launcher()
        yield
    except KeyboardInterrupt:
        raise SystemExit(STOPPED_EXIT) from None
    except DistributedError:
        raise SystemExit(LOST_CONTACT_EXIT) from None
    finally:
        if signal.getsignal(signal.SIGTERM) is terminated:
            signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


def _follow_launcher() -> None:
    """Have Linux send this rank SIGTERM when its launcher dies, so that a launcher killed
    outright (SIGKILL, the OOM killer) leaves no rank training on; stop at once where it died
    already."""
    import sys

    launcher = _env_int(LAUNCHER_ENV, 0)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    from ..errors import Interrupted

    try:
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0:  # PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # it died before the request above
        raise Interrupted(terminated=True)


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


def oversubscribed(nproc: int, cores: int | None = None) -> str | None:
    """The warning for ``train --nproc N`` with N above the CPUs this process may use
    (``cores``, by default :func:`~deepwatch._cpus.usable_cores`: its affinity capped by its
    cgroup quota), else None. Each rank is a whole training process, so N of them on fewer
    CPUs take turns on them, each step waiting for the slowest."""
    if cores is None:
        cores = usable_cores()
    if nproc <= cores:
        return None
    return (f"warning: --nproc {nproc} starts {nproc} training processes, but this machine "
            f"gives this process {cores} usable CPU{'s' if cores != 1 else ''} (its CPU "
            "affinity and cgroup quota): they will take turns on "
            f"{'them' if cores != 1 else 'it'}, slower than --nproc {cores} or less would train")


def launch_local(command: list[str], nproc: int, log: Callable[[str], None],
                 grace: float = 10.0) -> int:
    """Run ``command`` as ``nproc`` ranks of one data-parallel job on this machine.

    The ranks meet through a file (no TCP store), and gloo/NCCL talk over the loopback
    interface only, so nothing listens beyond this machine. When a rank fails the others are
    stopped. Returns 0, else rank 0's exit code where it failed on its own, else 1.

    Ctrl-C and SIGTERM stop the job as they stop a one-process run: the ranks are stopped
    with SIGTERM (killed after ``grace`` seconds), the temporary directory removed, and
    :class:`~deepwatch.errors.Interrupted` raised, saying so. The ranks do not see Ctrl-C
    themselves (it reaches the terminal's whole process group): one that did would stop on its
    own, in its own words, and race the launcher's SIGTERM.

    The temporary directory (the rendezvous file, the other ranks' stderr) holds a lock that
    the launcher and its ranks keep for as long as any of them lives: one killed outright
    (SIGKILL, the OOM killer) leaves its directory behind, and the next launcher removes those
    nobody holds any more (see :mod:`deepwatch._held_dirs`), so they do not pile up.
    """
    import shutil
    import signal
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    from .._held_dirs import make_held_dir, remove_unheld_dirs
    from ..errors import Interrupted, sigterm_stops_cleanly

    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []
    stopped: set[int] = set()  # the ranks the launcher stopped itself
    interrupted: KeyboardInterrupt | None = None
    # the first Ctrl-C or SIGTERM raises; those after it are held while the ranks are stopped
    with sigterm_stops_cleanly():
        remove_unheld_dirs(Path(tempfile.gettempdir()), TMP_PREFIX)
        made, lock = make_held_dir(TMP_PREFIX)
        tmp = str(made)
        try:
            with ExitStack() as opened:
                try:
                    base = dict(os.environ)
                    base.update({STORE_ENV: os.path.join(tmp, "store"),
                                 "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                                 LAUNCHER_ENV: str(os.getpid())})
                    base.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc)))
                    lo = _loopback_interface()
                    if lo:
                        base.setdefault("GLOO_SOCKET_IFNAME", lo)
                        base.setdefault("NCCL_SOCKET_IFNAME", lo)
                    for rank in range(nproc):
                        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                        # rank 0 speaks to the terminal; the others' words are kept for their
                        # failures
                        err = None if rank == 0 else opened.enter_context(
                            open(os.path.join(tmp, f"rank{rank}.log"), "w+b"))
                        logs.append(err)
                        _start_rank(procs, command, env, err, lock)
                    codes: dict[int, int] = {}

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
                except KeyboardInterrupt as exc:
                    interrupted = exc
                finally:
                    stopped = _stop_ranks(procs, grace)
                    said = {r: _tail(f) for r, f in enumerate(logs) if f is not None}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if lock is not None:  # (a process may launch more than one job)
                os.close(lock)
    codes = {r: int(p.returncode) for r, p in enumerate(procs)}
    if interrupted is not None:
        detail = ("the training had finished, its bundle was saved" if codes.get(0) == 0
                  else "every training rank was stopped, no bundle was written")
        raise Interrupted(detail, getattr(interrupted, "terminated", False)) from None
    # what went wrong is a rank's own failure, not a stop or a lost peer that follows from it
    failures = {r: c for r, c in codes.items()
                if c and r not in stopped and c != LOST_CONTACT_EXIT}
    first = failures.get(0, 0)
    for rank, code in sorted(failures.items()):
        if rank == 0 and 0 < code != STOPPED_EXIT:
            continue  # rank 0 has said what went wrong
        if rank > 0 and code == first:
            continue  # the same failure as rank 0's, said once
        if rank > 0 and code != STOPPED_EXIT:
            for line in said.get(rank, [])[-20:]:
                log(f"rank {rank}: {line}")
        if code == STOPPED_EXIT:  # (its SIGTERM handler's exit status)
            code = -signal.SIGTERM
        what = f"signal {-code}" if code < 0 else f"exit code {code}"
        log(f"error: training rank {rank} failed ({what})")
    if not failures and any(codes.values()):
        log("error: the training ranks lost contact with each other")
    if not any(codes.values()):
        return 0
    return first if 0 < first != STOPPED_EXIT else 1


def _start_rank(procs: list[Any], command: list[str], env: dict[str, str], err: Any,
                lock: int | None) -> None:
    """Start one rank, added to ``procs``, with Ctrl-C blocked: the mask is inherited, so the
    rank never sees the terminal's SIGINT; one sent to the launcher meanwhile waits until the
    rank is in ``procs`` (and so will be stopped), not lost. The rank is given ``lock``, the
    descriptor of the temporary directory's lock, and so holds it from its start: a rank still
    stopping after its launcher was killed keeps its directory from being removed under it."""
    import signal
    import subprocess

    fds = () if lock is None else (lock,)
    if not hasattr(signal, "pthread_sigmask"):
        procs.append(subprocess.Popen(command, env=env, stderr=err, pass_fds=fds))
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        procs.append(subprocess.Popen(command, env=env, stderr=err, pass_fds=fds))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _stop_ranks(procs: list[Any], grace: float) -> set[int]:
    """SIGTERM every rank still running and kill those still running ``grace`` seconds later
    (one blocked in a collective runs its handler only when that returns). The ranks it
    signalled."""
    import time

    stopped = set()
    for rank, p in enumerate(procs):
        if p.poll() is None:
            p.terminate()
            stopped.add(rank)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    return stopped


def _tail(f: Any) -> list[str]:
    """The lines a rank wrote to its log file."""
    f.seek(0)
    return f.read().decode(errors="replace").strip().splitlines()
