"""``deepwatch train --nproc 2`` stopped part-way, with real processes and real signals: SIGTERM
to the launcher, Ctrl-C to the terminal's process group, SIGTERM or SIGKILL to one rank, SIGKILL
to the launcher. Every rank ends, nothing is left at ``--out`` or beside it, the launcher's
temporary directory is removed (by the next launcher, where it was killed outright), and one
line says what happened, with the exit status a one-process ``train`` gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import head_lines

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="needs Linux /proc to find the ranks")

#: Put on the ranks' PYTHONPATH: rank 0 pauses inside save_bundle, after writing the first
#: file of the bundle it assembles beside (here: in) ``--out``, and says so by touching a file.
_PAUSE_IN_SAVE = """
import os, pathlib, time
if os.environ.get("RANK") == "0":
    write = pathlib.Path.write_bytes
    def paused(self, data):
        done = write(self, data)
        if self.parent.name.startswith("."):  # a file of the bundle being assembled
            pathlib.Path(os.environ["PAUSED_FLAG"]).touch()
            time.sleep(120)
        return done
    pathlib.Path.write_bytes = paused
"""


@pytest.fixture(scope="module")
def kdd_3k(tmp_path_factory: pytest.TempPathFactory, kdd_train_file: Path) -> Path:
    """3,000 records spread over the KDD 10% file: a few seconds of training."""
    p = tmp_path_factory.mktemp("data") / "kdd_3k.csv"
    p.write_text("".join(head_lines(kdd_train_file, 3000, every=24)))
    return p


def _state(pid: int) -> str | None:
    """The process's state letter (``Z``: a zombie), None where it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


def _ranks(launcher: int) -> dict[str, int]:
    """The launcher's children, by their RANK."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                found[kv[5:].decode()] = int(entry.name)
    return found


class _Run:
    """``deepwatch train --nproc 2`` in a session of its own (its own process group, as a
    terminal's foreground job), stderr collected line by line. Runs of one test share their
    TMPDIR; each has its own ``--out``, named ``name``."""

    def __init__(self, tmp_path: Path, data: Path, *, epochs: int, pause_in_save: bool,
                 name: str):
        self.out = tmp_path / name
        self.out.mkdir()  # an empty --out: a stray temporary directory in it would be kept
        self.tmp = tmp_path / "tmp"  # the launcher's TMPDIR
        self.tmp.mkdir(exist_ok=True)
        self.flag = tmp_path / f"{name}.paused"
        env = {**os.environ, "TMPDIR": str(self.tmp), "DEEPWATCH_PROGRESS": "0",
               "PAUSED_FLAG": str(self.flag)}
        if pause_in_save:
            hook = tmp_path / "hook"
            hook.mkdir(exist_ok=True)
            (hook / "sitecustomize.py").write_text(_PAUSE_IN_SAVE)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deepwatch", "train", "--nproc", "2", "--format", "kdd",
             "--model", "mlp", "--epochs", str(epochs), "--out", str(self.out), str(data)],
            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.ranks: dict[str, int] = {}

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # (ends when every holder of the pipe, ranks too, has)
            self.lines.append(line.rstrip("\n"))

    def when(self, ready: Callable[[], bool], within: float = 120) -> None:
        """Wait until ``ready()``, the launcher still running; note its ranks then."""
        deadline = time.monotonic() + within
        while not ready():
            assert self.proc.poll() is None, "\n".join(self.lines)
            assert time.monotonic() < deadline, "\n".join(self.lines)
            time.sleep(0.05)
        self.ranks = _ranks(self.proc.pid)
        assert set(self.ranks) == {"0", "1"}, self.ranks

    def said(self, text: str) -> Callable[[], bool]:
        return lambda: any(text in line for line in self.lines)

    def finish(self, timeout: float = 60) -> tuple[int, list[str]]:
        """The launcher's exit status and its stderr lines after ``training in 2 processes``,
        the ranks' startup lines left out."""
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=timeout)
        said = [line for line in self.lines
                if not line.startswith(("training in 2 processes", "training data:",
                                        "features:"))]
        return code, said

    def kill_launcher(self) -> None:
        """SIGKILL to the launcher alone (the OOM killer's way); wait until its ranks end."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in self.ranks.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [rank for rank, pid in self.ranks.items() if _alive(pid)]

    def left_behind(self) -> list[str]:
        """Temporary files the run left: in or beside ``--out``, or in its TMPDIR."""
        return ([p.name for p in self.out.iterdir()]
                + [p.name for p in self.out.parent.iterdir() if p.name.startswith(".")]
                + [p.name for p in self.tmp.iterdir() if p.name.startswith("deepwatch-")])

    def close(self) -> None:
        """Kill whatever is still running (a failing test's leftovers)."""
        for pid in [self.proc.pid, *self.ranks.values()]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.reader.join(timeout=30)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture()
def run(tmp_path: Path, kdd_3k: Path) -> Iterator[Callable[..., _Run]]:
    runs: list[_Run] = []

    def start(*, epochs: int = 1, pause_in_save: bool = True, name: str = "b") -> _Run:
        runs.append(_Run(tmp_path, kdd_3k, epochs=epochs, pause_in_save=pause_in_save,
                         name=name))
        return runs[-1]

    yield start
    for r in runs:
        r.close()


@pytest.mark.parametrize("stop", ["SIGTERM to the launcher", "Ctrl-C"])
def test_a_stopped_launcher_stops_every_rank_and_leaves_no_trace(
        run: Callable[..., _Run], stop: str) -> None:
    """Stopped while rank 0 writes the bundle into an empty ``--out``. SIGTERM used to kill the
    launcher alone (exit status -15, not a word), leaving the ranks to finish the training
    and write the bundle after all, and the launcher's temporary directory behind; Ctrl-C
    reached the ranks too, each stopping in its own words, racing the launcher's SIGTERM."""
    r = run()
    r.when(r.flag.exists)
    if stop == "Ctrl-C":  # the terminal sends it to the whole foreground process group
        os.killpg(r.proc.pid, signal.SIGINT)
        word, status = "interrupted", 130
    else:
        r.proc.send_signal(signal.SIGTERM)
        word, status = "terminated", 143
    code, said = r.finish()
    assert code == status, said
    assert said == [f"{word}: every training rank was stopped, no bundle was written"]
    assert not [rank for rank, pid in r.ranks.items() if _alive(pid)]
    assert r.left_behind() == []  # --out as it was: empty, no temporary directory in it


def test_a_launcher_killed_outright_takes_its_ranks_with_it(run: Callable[..., _Run]) -> None:
    """SIGKILL (the OOM killer) cannot be handled by the launcher; its ranks used to train on
    as orphans and write the bundle. Now each stops when the launcher dies, cleanly: rank 0's
    half-written bundle is removed, not left in ``--out``."""
    r = run()
    r.when(r.flag.exists)
    r.kill_launcher()
    assert [p.name for p in r.out.iterdir()] == []


def test_the_directory_of_a_launcher_killed_outright_is_removed_by_the_next_one(
        run: Callable[..., _Run]) -> None:
    """A launcher killed outright cannot remove its temporary directory, and its ranks did not
    either: one more ``deepwatch-ddp-*`` directory in the temporary directory for every such
    kill. The next ``train --nproc`` removes those whose lock nobody holds; not one a live
    process holds, nor one with no lock file (another user's, or an older deepwatch's)."""
    import fcntl

    killed = run(epochs=200, pause_in_save=False)
    killed.when(killed.said("features:"))  # the ranks train
    killed.kill_launcher()
    [left] = killed.tmp.glob("deepwatch-ddp-*")  # nobody removed it
    held, foreign = killed.tmp / "deepwatch-ddp-held", killed.tmp / "deepwatch-ddp-foreign"
    held.mkdir()
    (held / "lock").touch()
    foreign.mkdir()
    lock = os.open(held / "lock", os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)  # as a live launcher, or a rank, holds its own
        code, said = run(pause_in_save=False, name="next").finish()
    finally:
        os.close(lock)
    assert code == 0, said
    assert not left.exists()
    assert sorted(p.name for p in killed.tmp.glob("deepwatch-ddp-*")) == [foreign.name, held.name]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_rank_stopped_mid_training_fails_the_run_in_one_line(
        run: Callable[..., _Run], sig: signal.Signals) -> None:
    """Rank 1 stopped while the ranks train: rank 0 used to say that it had lost contact (with
    gloo's message) before the launcher said which rank failed; the launcher's line alone is
    the news."""
    r = run(epochs=200, pause_in_save=False)
    r.when(r.said("features:"))  # rank 0 starts training right after this line
    os.kill(r.ranks["1"], sig)
    code, said = r.finish()
    assert code == 1, said
    assert said == [f"error: training rank 1 failed (signal {int(sig)})"]
    assert not [rank for rank, pid in r.ranks.items() if _alive(pid)]
    assert r.left_behind() == []


def test_rank_0_stopped_while_saving_leaves_no_half_bundle(run: Callable[..., _Run]) -> None:
    """SIGTERM to rank 0 while it writes the bundle into an empty ``--out``: it used to die
    mid-save, leaving its temporary directory inside ``--out``, which the next run then refused
    to write into. Now the save is undone, and the launcher says what happened."""
    r = run()
    r.when(r.flag.exists)
    os.kill(r.ranks["0"], signal.SIGTERM)
    code, said = r.finish()
    assert code == 1, said
    assert said == ["error: training rank 0 failed (signal 15)"]
    assert not [rank for rank, pid in r.ranks.items() if _alive(pid)]
    assert r.left_behind() == []
